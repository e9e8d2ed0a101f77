"""The demo trainer (examples/trainer) run as real rank processes on 127.0.0.1, no cluster.

Covers: bit-identical resume at the same world size (fault injection, SIGKILL, pinned file name),
fail-fast when a rank dies or hangs, exit code 2 for bad parallel configs, the Checkpoint 1.0
files (names, modes, contents, meta.json, pruning, prefix suffixes, strategy files), workers that
run several ranks, Checkpoint 2.0 iterations (a `checkpoint:` section: layout, bit-identical
resume, loading at another world size), and continuing after a 4 -> 2 world-size change via
reshard, unify and online transformation (within the tolerance the trainer documents).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors import safe_open

from relaunch.safetensors_format import read_header

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "trainer" / "train.yaml"
if str(REPO) not in sys.path:  # the trainer's own modules (imported inside tests) live under examples/
    sys.path.append(str(REPO))
#: Relative loss tolerance after a world-size change (float32 sums in another order); the
#: measured worst case over these runs is ~1e-6 (see examples/trainer/train.py).
WORLD_CHANGE_RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_config(directory: Path, name: str = "train.yaml", /, **changes: Any) -> Path:
    """The sample config with a tiny, fast run in ``directory/out``; ``changes`` use dotted keys."""
    document = yaml.safe_load(SAMPLE.read_text())
    document["output_dir"] = str(directory / "out")
    document["step_delay_seconds"] = 0
    document["comm_timeout_seconds"] = 20
    document["connect_timeout_seconds"] = 20
    document["runner_config"].update(epochs=2, steps_per_epoch=4, batch_size=8)
    document["callbacks"][1].update(save_checkpoint_steps=2, keep_checkpoint_max=10)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = document
        for parent in parents:
            node = node[int(parent)] if isinstance(node, list) else node[parent]
        node[key] = value
    path = directory / name
    path.write_text(yaml.safe_dump(document))
    return path


def spawn(
    config: Path,
    world: int,
    port: int,
    *,
    first_ranks: list[int] | None = None,
    per_worker: int = 1,
    env: dict[str, str] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start one process per worker (by default one worker per rank); output to files next to the config."""
    procs = []
    for first in first_ranks if first_ranks is not None else list(range(world)):
        worker_env = dict(os.environ)
        worker_env.update(
            RANK_SIZE=str(world),
            RANK_ID=str(first),
            RELAUNCH_RANKS_PER_WORKER=str(per_worker),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=str(REPO),
        )
        worker_env.pop("WORLD_SIZE", None)
        worker_env.pop("RANK", None)
        worker_env.update(env or {})
        log = open(config.parent / f"{config.stem}-worker{first}.log", "ab")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "examples.trainer", "--config", str(config)],
                cwd=config.parent,
                env=worker_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    return procs


def wait_all(procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes


def run(config: Path, world: int, **kwargs: Any) -> list[int]:
    return wait_all(spawn(config, world, free_port(), **kwargs))


def logs(config: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in sorted(config.parent.glob(f"{config.stem}-worker*.log"))
    )


def loss_curve(output_dir: Path) -> dict[int, str]:
    """global step -> loss_hex (the last line per step); repeated steps must repeat the same bits."""
    curve: dict[int, str] = {}
    for line in (output_dir / "loss.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record["global_step"]
        if step in curve:
            assert curve[step] == record["loss_hex"], f"step {step} recomputed differently after resume"
        curve[step] = record["loss_hex"]
    return curve


def curve_values(curve: dict[int, str]) -> dict[int, float]:
    return {step: float.fromhex(value) for step, value in curve.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted 4-rank run (dp=2, mp=2), 8 steps, checkpoints every 2 steps."""
    directory = tmp_path_factory.mktemp("reference")
    config = make_config(directory)
    codes = run(config, 4)
    assert codes == [0, 0, 0, 0], logs(config)
    return {
        "dir": directory,
        "config": config,
        "out": directory / "out",
        "curve": loss_curve(directory / "out"),
    }


# --------------------------------------------------------------------------------------------
# Bad configs


@pytest.mark.parametrize(
    ("changes", "world", "message"),
    [
        ({}, 3, "world size (RANK_SIZE/WORLD_SIZE) is 3"),
        ({"parallel_config.data_parallel": 4}, 4, "= 8"),
        ({"parallel_config.pipeline_stage": 2, "parallel_config.data_parallel": 1}, 4, "pipeline_stage"),
        ({"runner_config.batch_size": 7}, 4, "not divisible by data_parallel"),
        ({"model.model_config.hidden_size": 31}, 4, "not divisible by model_parallel"),
        ({"callbacks.1.checkpoint_format": "ckpt"}, 4, "safetensors"),
        (
            {"checkpoint": {"save_max": 2}, "resume_training": "demo_rank_0-1_2.safetensors"},
            4,
            "with a `checkpoint:` section (Checkpoint 2.0) it must be true or false",
        ),
    ],
)
def test_bad_parallel_config_exits_2_on_every_rank(
    tmp_path: Path, changes: dict[str, Any], world: int, message: str
) -> None:
    config = make_config(tmp_path, **changes)
    started = time.monotonic()
    codes = run(config, world)
    assert codes == [2] * world
    assert message in logs(config)
    assert time.monotonic() - started < 15  # refused up front, no waiting for peers
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_checkpoint_of_other_world_without_auto_trans_exits_2(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    config = make_config(
        tmp_path,
        load_checkpoint=str(reference["out"] / "checkpoint"),
        resume_training=True,
        **{"parallel_config.data_parallel": 1},
    )
    assert run(config, 2) == [2, 2]
    assert "auto_trans_ckpt" in logs(config)


def test_missing_pinned_file_exits_3_and_names_it(tmp_path: Path, reference: dict[str, Any]) -> None:
    config = make_config(
        tmp_path,
        load_checkpoint=str(reference["out"] / "checkpoint"),
        resume_training="demo_rank_0-9_9.safetensors",
    )
    assert run(config, 4) == [3, 3, 3, 3]
    assert "demo_rank_3-9_9.safetensors" in logs(config)


def test_malformed_pinned_file_name_exits_2(tmp_path: Path, reference: dict[str, Any]) -> None:
    config = make_config(
        tmp_path, load_checkpoint=str(reference["out"] / "checkpoint"), resume_training="latest-weights"
    )
    assert run(config, 4) == [2, 2, 2, 2]
    assert "does not look like <prefix>-<epoch>_<step>.safetensors" in logs(config)


# --------------------------------------------------------------------------------------------
# Files


def test_checkpoint_files_names_modes_and_contents(reference: dict[str, Any]) -> None:
    from examples.trainer.config import load_config
    from examples.trainer.model import Placement, full_shapes, local_slices
    from relaunch.strategy import rank_slices, read_strategy_file

    out: Path = reference["out"]
    root = out / "checkpoint"
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    expected_steps = [(1, 2), (1, 4), (2, 2), (2, 4)]
    config = load_config(str(reference["config"]))
    shapes = full_shapes(config)
    for rank in range(4):
        rank_dir = root / f"rank_{rank}"
        assert stat.S_IMODE(rank_dir.stat().st_mode) == 0o750
        names = sorted(p.name for p in rank_dir.iterdir())
        wanted = sorted([f"demo_rank_{rank}-{e}_{s}.safetensors" for e, s in expected_steps] + ["meta.json"])
        assert names == wanted  # nothing left behind: no .tmp files
        assert json.loads((rank_dir / "meta.json").read_text()) == {
            "last_epoch": 2,
            "last_step": 4,
            "last_ckpt_file": f"demo_rank_{rank}-2_4.safetensors",
        }
        placement = Placement(rank, 2, 2)
        for epoch, step in expected_steps:
            path = rank_dir / f"demo_rank_{rank}-{epoch}_{step}.safetensors"
            assert stat.S_IMODE(path.stat().st_mode) == 0o400
            header = read_header(path)
            assert header.metadata == {"format": "ms", "remove_redundancy": "False"}
            with safe_open(str(path), framework="numpy") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            global_step = (epoch - 1) * 4 + step
            assert int(tensors["global_step"][0]) == global_step
            assert int(tensors["step_num"][0]) == global_step
            assert int(tensors["epoch_num"][0]) == epoch
            assert int(tensors["global_batch_size"][0]) == 8
            assert int(tensors["current_iterator_step"][0]) == global_step
            assert float(tensors["loss_scale"][0]) == 1.0
            for name, shape in shapes.items():
                local = tuple(s.stop - s.start for s in local_slices(name, shape, placement))
                for key in (name, f"adam_m.{name}", f"adam_v.{name}"):
                    assert tensors[key].shape == local and tensors[key].dtype == np.float32, key
            assert tensors["fc1.weight"].shape == (8, 16)  # hidden 32 split over mp=2
        strategy = read_strategy_file(out / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt")
        assert set(strategy.layouts) == {f"{p}{n}" for n in shapes for p in ("", "adam_m.", "adam_v.")}
        for name, shape in shapes.items():
            for key in (name, f"adam_m.{name}", f"adam_v.{name}"):
                layout = strategy.layouts[key]
                assert layout.dev_matrix == (2, 2)
                # The strategy file's slices are exactly the ones the trainer trains on.
                assert rank_slices(layout, shape, rank) == local_slices(name, shape, placement)


def test_keep_checkpoint_max_and_prefix_suffix_on_second_run(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, **{"callbacks.1.keep_checkpoint_max": 2, "parallel_config.data_parallel": 1}
    )
    assert run(config, 2) == [0, 0]
    # A second run into the same directory gets the `_1` prefix and prunes only its own files.
    assert run(config, 2) == [0, 0]
    for rank in range(2):
        names = sorted(p.name for p in (tmp_path / "out" / "checkpoint" / f"rank_{rank}").iterdir())
        assert names == [
            f"demo_rank_{rank}-2_2.safetensors",
            f"demo_rank_{rank}-2_4.safetensors",
            f"demo_rank_{rank}_1-2_2.safetensors",
            f"demo_rank_{rank}_1-2_4.safetensors",
            "meta.json",
        ]
        meta = json.loads((tmp_path / "out" / "checkpoint" / f"rank_{rank}" / "meta.json").read_text())
        assert meta["last_ckpt_file"] == f"demo_rank_{rank}_1-2_4.safetensors"


# --------------------------------------------------------------------------------------------
# Determinism and resume


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path: Path, reference: dict[str, Any]) -> None:
    config = make_config(tmp_path, fail_at_global_step=5, fail_rank=1)
    codes = run(config, 4)
    assert codes[1] == 1 and all(code != 0 for code in codes), logs(config)
    interrupted = loss_curve(tmp_path / "out")
    assert max(interrupted) == 5
    resumed = make_config(
        tmp_path, "resume.yaml", load_checkpoint=str(tmp_path / "out" / "checkpoint"), resume_training=True
    )
    assert run(resumed, 4, env={"RELAUNCH_ATTEMPT": "1"}) == [0, 0, 0, 0], logs(resumed)
    assert "resumed from" in logs(resumed) and "-1_4.safetensors: 4 steps done" in logs(resumed)
    assert loss_curve(tmp_path / "out") == reference["curve"]
    attempts = [
        json.loads(line)["attempt"] for line in (tmp_path / "out" / "loss.jsonl").read_text().splitlines()
    ]
    assert attempts == [None] * 5 + [1] * 4  # steps 5..8 again, after the checkpoint of step 4


def test_resume_from_pinned_file_name_substitutes_the_rank(tmp_path: Path, reference: dict[str, Any]) -> None:
    config = make_config(
        tmp_path,
        load_checkpoint=str(reference["out"] / "checkpoint"),
        resume_training="demo_rank_0-1_2.safetensors",
    )
    assert run(config, 4) == [0, 0, 0, 0], logs(config)
    for rank in range(4):
        assert f"checkpoint/rank_{rank}/demo_rank_{rank}-1_2.safetensors: 2 steps done" in logs(config)
    curve = loss_curve(tmp_path / "out")
    assert sorted(curve) == list(range(3, 9))
    assert curve == {step: value for step, value in reference["curve"].items() if step >= 3}


def test_empty_checkpoint_folder_starts_from_scratch_missing_one_fails(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    (tmp_path / "empty").mkdir()
    config = make_config(tmp_path, load_checkpoint=str(tmp_path / "empty"), resume_training=True)
    assert run(config, 4) == [0, 0, 0, 0], logs(config)
    assert loss_curve(tmp_path / "out") == reference["curve"]
    missing = make_config(
        tmp_path, "missing.yaml", load_checkpoint=str(tmp_path / "nope"), resume_training=True
    )
    assert run(missing, 4) == [3, 3, 3, 3]
    assert "neither a file nor a directory" in logs(missing)


def test_weights_only_when_resume_training_is_false(tmp_path: Path, reference: dict[str, Any]) -> None:
    config = make_config(
        tmp_path, load_checkpoint=str(reference["out"] / "checkpoint"), resume_training=False
    )
    assert run(config, 4) == [0, 0, 0, 0], logs(config)
    curve = curve_values(loss_curve(tmp_path / "out"))
    assert sorted(curve) == list(range(1, 9))  # starts over at step 1 ...
    assert curve[1] < curve_values(reference["curve"])[1]  # ... but with the trained weights


# --------------------------------------------------------------------------------------------
# Failure propagation


def _wait_for_steps(output_dir: Path, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    path = output_dir / "loss.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} steps in {path} after {timeout} s")


@pytest.mark.parametrize("victim", [0, 2])
def test_killed_rank_fails_the_others_fast_and_resume_matches(
    tmp_path: Path, reference: dict[str, Any], victim: int
) -> None:
    config = make_config(tmp_path, step_delay_seconds=0.25)
    procs = spawn(config, 4, free_port())
    try:
        _wait_for_steps(tmp_path / "out", 3)
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        others = [p for rank, p in enumerate(procs) if rank != victim]
        codes = wait_all(others, timeout=10)
        elapsed = time.monotonic() - killed_at
    finally:
        wait_all(procs, timeout=1)
    assert all(code != 0 for code in codes), (codes, logs(config))
    assert elapsed < 5.0, f"survivors took {elapsed:.1f} s to notice"
    resumed = make_config(
        tmp_path, "resume.yaml", load_checkpoint=str(tmp_path / "out" / "checkpoint"), resume_training=True
    )
    assert run(resumed, 4) == [0, 0, 0, 0], logs(resumed)
    assert loss_curve(tmp_path / "out") == reference["curve"]


def test_hung_rank_fails_the_others_by_timeout(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, step_delay_seconds=0.1, comm_timeout_seconds=1.5, **{"parallel_config.data_parallel": 1}
    )
    procs = spawn(config, 2, free_port())
    try:
        _wait_for_steps(tmp_path / "out", 2)
        procs[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = wait_all(procs[:1], timeout=10)[0]
        elapsed = time.monotonic() - stopped_at
    finally:
        procs[1].kill()
        wait_all(procs, timeout=2)
    assert code == 1
    assert "got no answer within" in logs(config)
    assert 1.0 < elapsed < 8.0


# --------------------------------------------------------------------------------------------
# Several ranks per worker


def test_workers_with_two_ranks_each_and_a_late_rank_zero(tmp_path: Path, reference: dict[str, Any]) -> None:
    config = make_config(tmp_path)
    port = free_port()
    late = spawn(config, 4, port, first_ranks=[2], per_worker=2)
    time.sleep(0.5)  # rank 0's worker starts later: the others keep retrying the connection
    early = spawn(config, 4, port, first_ranks=[0], per_worker=2)
    assert wait_all(early + late) == [0, 0], logs(config)
    assert loss_curve(tmp_path / "out") == reference["curve"]


def _processes_running(config: Path) -> list[int]:
    """Pids of processes whose command line names ``config``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(config).encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_killed_worker_takes_its_ranks_with_it(tmp_path: Path) -> None:
    # 80 steps of 0.25 s: ranks that outlived their worker would still be running at the check.
    config = make_config(
        tmp_path, step_delay_seconds=0.25, **{"parallel_config.data_parallel": 1, "runner_config.epochs": 10}
    )
    (worker,) = spawn(config, 2, free_port(), first_ranks=[0], per_worker=2)
    try:
        _wait_for_steps(tmp_path / "out", 2)
        assert len(_processes_running(config)) == 3  # the worker and its two ranks
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=5)
        deadline = time.monotonic() + 5
        while _processes_running(config) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_running(config) == []
    finally:
        for pid in _processes_running(config):
            os.kill(pid, signal.SIGKILL)


def test_worker_exits_non_zero_when_one_of_its_ranks_fails(tmp_path: Path) -> None:
    config = make_config(tmp_path, fail_at_global_step=3, fail_rank=3)
    codes = wait_all(spawn(config, 4, free_port(), first_ranks=[0, 2], per_worker=2), timeout=30)
    assert codes == [1, 1], logs(config)
    assert "rank 3 exited with code 1" in logs(config)


# --------------------------------------------------------------------------------------------
# World-size change 4 -> 2


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "optimizer-parallel"])
def interrupted_at_6(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, bool]:
    """A 4-rank run that dies after step 6 (newest complete checkpoint: epoch 2, step 2).

    Parametrized with and without optimizer parallelism (moments and saved weights split over dp).
    """
    directory = tmp_path_factory.mktemp("interrupted")
    config = make_config(
        directory, fail_at_global_step=6, fail_rank=0, **{"parallel.enable_parallel_optimizer": request.param}
    )
    assert run(config, 4)[0] == 1
    return directory / "out", request.param


def _step_6_files(source: Path) -> dict[int, str]:
    return {r: str(source / "checkpoint" / f"rank_{r}" / f"demo_rank_{r}-2_2.safetensors") for r in range(4)}


def _continue_at_two_ranks(
    tmp_path: Path, reference: dict[str, Any], dp: int, mp: int, optimizer_parallel: bool, **changes: Any
) -> dict[int, float]:
    config = make_config(
        tmp_path,
        resume_training=True,
        auto_trans_ckpt=True,
        **{
            "parallel_config.data_parallel": dp,
            "parallel_config.model_parallel": mp,
            "parallel.enable_parallel_optimizer": optimizer_parallel,
        },
        **changes,
    )
    assert run(config, 2) == [0, 0], logs(config)
    assert "6 steps done" in logs(config)
    resumed = curve_values(loss_curve(tmp_path / "out"))
    assert sorted(resumed) == [7, 8]
    expected = curve_values(reference["curve"])
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=WORLD_CHANGE_RTOL, abs=0), step
    return resumed


@pytest.mark.parametrize(("dp", "mp"), [(1, 2), (2, 1)])
def test_world_change_via_reshard(
    tmp_path: Path, reference: dict[str, Any], interrupted_at_6: tuple[Path, bool], dp: int, mp: int
) -> None:
    from relaunch.convert import is_complete, reshard

    source, optimizer_parallel = interrupted_at_6
    destination = tmp_path / "resharded"
    reshard(
        _step_6_files(source),
        str(source / "strategy"),
        str(destination),
        dst_parallel=f"dp={dp},mp={mp},pp=1",
        workers=1,
    )
    assert is_complete(destination) is not None
    _continue_at_two_ranks(tmp_path, reference, dp, mp, optimizer_parallel, load_checkpoint=str(destination))


def test_resume_by_name_after_shrink_ignores_the_old_worlds_rank_folders(
    tmp_path: Path, reference: dict[str, Any], interrupted_at_6: tuple[Path, bool]
) -> None:
    """After 4 -> 2, rank_2/rank_3 of the old run stay in the checkpoint folder next to the new
    run's steps; resuming the new run by file name must open rank_<own id>/<name>, as MindFormers
    does, rather than take the folder count for the world size."""
    import shutil

    from relaunch.convert import reshard

    source, optimizer_parallel = interrupted_at_6
    shutil.copytree(source / "checkpoint", tmp_path / "out" / "checkpoint")
    destination = tmp_path / "resharded"
    reshard(_step_6_files(source), str(source / "strategy"), str(destination), dst_parallel="dp=1,mp=2,pp=1")
    _continue_at_two_ranks(tmp_path, reference, 1, 2, optimizer_parallel, load_checkpoint=str(destination))
    new_step = tmp_path / "out" / "checkpoint" / "rank_1" / "demo_rank_1_1-2_4.safetensors"
    assert new_step.exists() and (tmp_path / "out" / "checkpoint" / "rank_3").is_dir()

    config = make_config(
        tmp_path,
        "again.yaml",
        load_checkpoint=str(tmp_path / "out" / "checkpoint"),
        resume_training="demo_rank_0_1-2_4.safetensors",
        **{
            "parallel_config.data_parallel": 1,
            "parallel_config.model_parallel": 2,
            "parallel.enable_parallel_optimizer": optimizer_parallel,
            "runner_config.epochs": 3,
        },
    )
    assert run(config, 2) == [0, 0], logs(config)
    assert sorted(loss_curve(tmp_path / "out"))[-4:] == [9, 10, 11, 12]


def test_world_change_via_unify(
    tmp_path: Path, reference: dict[str, Any], interrupted_at_6: tuple[Path, bool]
) -> None:
    from relaunch.convert import unify

    source, optimizer_parallel = interrupted_at_6
    destination = tmp_path / "unified"
    unify(_step_6_files(source), str(source / "strategy"), str(destination), workers=1)
    assert (destination / "param_name_map.json").exists()
    _continue_at_two_ranks(tmp_path, reference, 2, 1, optimizer_parallel, load_checkpoint=str(destination))


def test_world_change_online_with_source_strategy(
    tmp_path: Path, reference: dict[str, Any], interrupted_at_6: tuple[Path, bool]
) -> None:
    source, optimizer_parallel = interrupted_at_6
    _continue_at_two_ranks(
        tmp_path,
        reference,
        2,
        1,
        optimizer_parallel,
        load_checkpoint=str(source / "checkpoint"),
        src_strategy_path_or_dir=str(source / "strategy"),
    )


# --------------------------------------------------------------------------------------------
# Optimizer parallelism


def test_optimizer_parallel_run_matches_plain_run_and_resumes(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    from relaunch.strategy import read_strategy_file

    config = make_config(
        tmp_path, fail_at_global_step=5, fail_rank=3, **{"parallel.enable_parallel_optimizer": True}
    )
    assert run(config, 4)[3] == 1
    resumed = make_config(
        tmp_path,
        "resume.yaml",
        load_checkpoint=str(tmp_path / "out" / "checkpoint"),
        resume_training=True,
        **{"parallel.enable_parallel_optimizer": True},
    )
    assert run(resumed, 4) == [0, 0, 0, 0], logs(resumed)
    # Sharding the optimizer step changes no bits: the same curve as the plain reference run.
    assert loss_curve(tmp_path / "out") == reference["curve"]
    path = tmp_path / "out" / "checkpoint" / "rank_3" / "demo_rank_3-1_4.safetensors"
    with safe_open(str(path), framework="numpy") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    # [8, 32] split over mp=2 -> [8, 16], then over dp=2 -> [4, 16]; the moments alike.
    assert shapes["fc1.weight"] == shapes["adam_m.fc1.weight"] == shapes["adam_v.fc1.weight"] == (4, 16)
    assert shapes["fc2.weight"] == (8, 4) and shapes["fc1.bias"] == (8,) and shapes["fc2.bias"] == (1,)
    layouts = read_strategy_file(tmp_path / "out" / "strategy" / "ckpt_strategy_rank_3.ckpt").layouts
    assert layouts["fc1.weight"].opt_shard_size == 2 and layouts["fc1.weight"].opt_shard_step == 2
    # fc2.bias [4] is replicated over both axes: sharded over all 4 ranks, one row each.
    assert layouts["fc2.bias"].opt_shard_size == 4 and layouts["fc2.bias"].opt_shard_step == 1


# --------------------------------------------------------------------------------------------
# Checkpoint 2.0 (a `checkpoint:` section in the config)


def test_checkpoint_2_layout_and_bit_identical_resume(tmp_path: Path, reference: dict[str, Any]) -> None:
    """With a `checkpoint:` section the trainer saves MindFormers 2.1's iterations, which relaunch's
    scan accepts, and resuming from them repeats the uninterrupted 1.0 run's losses bit for bit."""
    from relaunch.checkpoints import scan

    section = {"save_max": 2, "save_interleaved_steps": 2, "prefix": "demo2", "no_load_optim": False}
    config = make_config(tmp_path, fail_at_global_step=5, fail_rank=1, checkpoint=section)
    codes = run(config, 4)
    assert codes[1] == 1 and all(code != 0 for code in codes), logs(config)
    root = tmp_path / "out" / "checkpoint"
    assert sorted(p.name for p in root.iterdir()) == [
        "iteration_00000002",
        "iteration_00000004",
        "latest_checkpointed_iteration.txt",
    ]
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "4"
    iteration = root / "iteration_00000004"
    shards = [f"demo2-{kind}-{r:07d}-0000004.safetensors" for kind in ("model", "opt") for r in range(4)]
    assert sorted(p.name for p in iteration.iterdir()) == sorted([*shards, "common.json", "metadata.json"])
    assert stat.S_IMODE(iteration.stat().st_mode) == 0o750
    assert all(stat.S_IMODE((iteration / name).stat().st_mode) == 0o400 for name in shards)
    common = json.loads((iteration / "common.json").read_text())
    assert (common["global_step"], common["epoch_num"], common["step_num"]) == (4, 1, 4)
    metadata = json.loads((iteration / "metadata.json").read_text())
    assert metadata["state_dict_metadata"]["fc1.weight"]["global_shape"] == [8, 32]
    assert metadata["storage_data"]["('adam_m.fc1.weight', (0, 16))"][0]["file_name"] == (
        "demo2-opt-0000001-0000004.safetensors"
    )
    with safe_open(str(iteration / shards[0]), framework="numpy") as handle:
        assert sorted(handle.keys()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    result = scan(root)
    assert result.layout == "v2" and result.ranks == 4
    assert result.choice is not None and result.choice.step == 4

    # Resume from the checkpoint root (its tracker file names the iteration), as MindFormers does.
    resumed = make_config(
        tmp_path, "resume.yaml", checkpoint={**section, "load_path": str(root)}, resume_training=True
    )
    assert run(resumed, 4, env={"RELAUNCH_ATTEMPT": "1"}) == [0, 0, 0, 0], logs(resumed)
    assert "iteration 4 in" in logs(resumed) and "4 steps done" in logs(resumed)
    assert loss_curve(tmp_path / "out") == reference["curve"]
    # save_max 2: the two newest iterations are kept.
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "iteration_00000006",
        "iteration_00000008",
    ]
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "8"


@pytest.mark.parametrize("optimizer_parallel", [False, True])
def test_checkpoint_2_iteration_loads_at_another_world_size(
    tmp_path: Path, reference: dict[str, Any], optimizer_parallel: bool
) -> None:
    """An iteration saved by 4 ranks loads on 2 (its metadata.json says where every chunk is: no
    strategy files, no conversion); an iteration saved by 1 rank (no metadata.json) loads on 4."""
    section = {"save_max": 10, "save_interleaved_steps": 2}
    config = make_config(
        tmp_path,
        fail_at_global_step=6,
        fail_rank=0,
        checkpoint=section,
        **{"parallel.enable_parallel_optimizer": optimizer_parallel},
    )
    assert run(config, 4)[0] == 1, logs(config)
    iteration = tmp_path / "out" / "checkpoint" / "iteration_00000006"
    shrunk = make_config(
        tmp_path,
        "two.yaml",
        checkpoint={**section, "load_path": str(iteration)},
        **{"parallel_config.data_parallel": 1, "parallel.enable_parallel_optimizer": optimizer_parallel},
    )
    assert run(shrunk, 2) == [0, 0], logs(shrunk)
    assert "6 steps done" in logs(shrunk)
    expected = curve_values(reference["curve"])
    resumed = curve_values(loss_curve(tmp_path / "out"))
    for step in (7, 8):
        assert resumed[step] == pytest.approx(expected[step], rel=WORLD_CHANGE_RTOL, abs=0), step

    one = tmp_path / "one"
    one.mkdir()
    single = make_config(
        one,
        fail_at_global_step=4,
        checkpoint=section,
        **{"parallel_config.data_parallel": 1, "parallel_config.model_parallel": 1},
    )
    assert run(single, 1) == [1], logs(single)
    saved = one / "out" / "checkpoint" / "iteration_00000004"
    assert not (saved / "metadata.json").exists()
    grown = make_config(one, "four.yaml", checkpoint={**section, "load_path": str(saved)})
    assert run(grown, 4) == [0, 0, 0, 0], logs(grown)
    assert "4 steps done" in logs(grown)
    regrown = curve_values(loss_curve(one / "out"))
    for step in range(5, 9):
        assert regrown[step] == pytest.approx(expected[step], rel=WORLD_CHANGE_RTOL, abs=0), step


def test_checkpoint_2_no_load_optim_loads_weights_only_and_empty_root_starts_fresh(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    (tmp_path / "empty").mkdir()
    fresh = make_config(tmp_path, checkpoint={"load_path": str(tmp_path / "empty"), "no_load_optim": False})
    assert run(fresh, 4) == [0, 0, 0, 0], logs(fresh)
    assert loss_curve(tmp_path / "out") == reference["curve"]
    iteration = tmp_path / "out" / "checkpoint" / "iteration_00000008"
    weights = make_config(tmp_path / "empty", checkpoint={"load_path": str(iteration), "no_load_optim": True})
    assert run(weights, 4) == [0, 0, 0, 0], logs(weights)
    curve = curve_values(loss_curve(tmp_path / "empty" / "out"))
    assert sorted(curve) == list(range(1, 9))  # starts over at step 1 ...
    assert curve[1] < curve_values(reference["curve"])[1]  # ... but with the trained weights

    # An iteration whose optimizer shards are gone cannot be resumed: exit 3, naming the file.
    for shard in iteration.glob("*-opt-*.safetensors"):
        os.chmod(shard, 0o600)
        shard.unlink()
    broken = make_config(tmp_path / "empty", "broken.yaml", checkpoint={"load_path": str(iteration)})
    assert run(broken, 4) == [3, 3, 3, 3], logs(broken)
    assert "demo-opt-0000000-0000004.safetensors: missing (named by metadata.json)" in logs(broken)


def test_runs_as_a_script_with_config_from_environment(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, **{"parallel_config.data_parallel": 1, "parallel_config.model_parallel": 1}
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "RANK_SIZE", "WORLD_SIZE", "RANK_ID", "RANK")
    }
    env.update(RELAUNCH_CONFIG=str(config), MASTER_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "trainer" / "main.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "{ Epoch:[  2/  2], step:[    4/    4], loss: " in done.stdout  # MindFormers' step line
    assert sorted(loss_curve(tmp_path / "out")) == list(range(1, 9))


def test_rank_zero_waits_while_a_previous_attempt_holds_the_port(tmp_path: Path) -> None:
    config = make_config(tmp_path, **{"parallel_config.data_parallel": 1})
    port = free_port()
    holder = socket.create_server(("0.0.0.0", port))
    try:
        procs = spawn(config, 2, port)
        time.sleep(1.0)
        assert all(proc.poll() is None for proc in procs), logs(config)  # waiting, not failed
    finally:
        holder.close()
    assert wait_all(procs) == [0, 0], logs(config)
