"""The image builds from the Dockerfile and runs the way the chart runs it.

``scripts/image.sh`` builds it with podman (the first time on a fresh machine: the container tools
from Debian's packages, a base image, the build: about two minutes; then cached: seconds). The
containers run with a read-only root filesystem, as the chart's numeric non-root user, without a
network, and see checkpoints only through a read-only mount, as the planning and conversion Jobs do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from relaunch.convert import is_complete
from relaunch.strategy import Layout

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SH = ROOT / "scripts" / "image.sh"
USER = "65532:65532"  # the chart's securityContext (tests/test_dockerfile.py keeps them equal)


def _test_helper(name: str) -> ModuleType:
    """A helper module of the unit tests (tests/NAME.py: tree and shard writers), not installed."""
    spec = importlib.util.spec_from_file_location(f"relaunch_tests_{name}", ROOT / "tests" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _read_only_for_others(root: Path) -> None:
    """Readable by the container's user and nothing more (pytest's folders are private to root)."""
    for base, _dirs, files in os.walk(root):
        os.chmod(base, 0o555)
        for name in files:
            os.chmod(os.path.join(base, name), 0o444)


def _run(image: str, *args: str, mounts: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(IMAGE_SH), "podman", "run", "--rm", "--read-only", "--user", USER]
    command += ["--network", "none", *(f"--volume={mount}" for mount in mounts), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_the_entrypoint_is_the_operator_and_the_cli_runs_read_only_as_non_root(image: str) -> None:
    operator = _run(image, image, "--help")
    assert operator.returncode == 0, operator.stderr
    assert "usage: relaunch operator" in operator.stdout
    cli = _run(image, "--entrypoint", "relaunch", image, "--help")
    assert cli.returncode == 0, cli.stderr
    assert all(command in cli.stdout for command in ("scan", "plan", "convert", "operator"))


def test_the_image_holds_what_the_operator_and_its_jobs_import_and_nothing_to_install_with(
    image: str,
) -> None:
    probe = (
        "import importlib.util, os, relaunch.convert, relaunch.plan, relaunch.controller.handlers;"
        "print(os.getuid(), os.getgid(),"
        " [m for m in ('pip', 'safetensors', 'pytest') if importlib.util.find_spec(m)])"
    )
    result = _run(image, "--entrypoint", "python", image, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["65532", "65532", "[]"], result.stdout


def test_scan_reads_a_read_only_mounted_tree(image: str, tmp_path: Path) -> None:
    trees = _test_helper("trees")
    tree = tmp_path / "checkpoint"
    written = trees.build_v1(tree, 2, [(1, 10), (1, 20)])
    trees.truncate(written[(1, 20)][1])
    _read_only_for_others(tree)
    result = _run(
        image, "--entrypoint", "relaunch", image, "scan", "/ckpt", "--json", mounts=(f"{tree}:/ckpt:ro",)
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ranks"] == 2 and document["choice"]["step"] == 10
    assert document["choice"]["files"] == {
        str(rank): "/ckpt/" + os.path.relpath(path, tree) for rank, path in written[(1, 10)].items()
    }
    (rejected,) = document["rejected"]
    assert (rejected["step"], rejected["ranks"]) == (20, [1]) and "truncated" in rejected["reason"]


def test_a_conversion_runs_with_its_workers_from_a_read_only_source(image: str, tmp_path: Path) -> None:
    # What a conversion Job runs: worker processes (fork, semaphores in /dev/shm), numpy, xxhash,
    # the source mounted read-only, the result published into a writable volume.
    helpers = _test_helper("conv_helpers")
    rng = np.random.default_rng(3)
    tensors = {f"w{i}": ("BF16", helpers.raw("BF16", (64, 16), rng)) for i in range(4)}
    layouts = {name: {0: Layout((2, 2), (1, -1))} for name in tensors}
    tensors["global_step"] = ("I32", helpers.raw("I32", (1,), rng))
    model = helpers.Model(tensors, layouts, 1, 4)
    helpers.write_shards(model, str(tmp_path / "src"))
    _read_only_for_others(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    argv = ["convert", "unify", "--src", "/src/checkpoint", "--step", "10"]
    argv += ["--src-strategy", "/src/strategy", "--dst", "/out/unified", "--workers", "2"]
    result = _run(
        image, "--entrypoint", "relaunch", image, *argv, mounts=(f"{tmp_path / 'src'}:/src:ro", f"{out}:/out")
    )
    assert result.returncode == 0, result.stderr
    marker = is_complete(out / "unified")
    assert marker is not None and marker["checksum"] == "xxh3-64"
    got = helpers.read_unified(str(out / "unified"))
    for name in layouts:
        assert got[name][1].tobytes() == tensors[name][1].tobytes(), name
