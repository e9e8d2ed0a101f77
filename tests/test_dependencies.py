"""pyproject.toml, requirements.lock, the Dockerfile and the Makefile agree on the dependencies.

The lock (``make lock``) pins every runtime dependency and everything they need, each with the
sha256 of its files; the image and the development venv install from it with ``--require-hashes``.
Whether each lower bound is really enough is checked by ``make unit-min`` (the unit tests on the
lowest allowed versions), not here.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)\s*\\$")
HASH = re.compile(r"^\s+--hash=sha256:[0-9a-f]{64}(\s*\\)?$")


def _runtime_requirements() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return [Requirement(text) for text in tomllib.load(handle)["project"]["dependencies"]]


def _lock() -> dict[str, tuple[Version, int]]:
    """``name -> (pinned version, number of hashes)`` from requirements.lock, checking its syntax."""
    pins: dict[str, tuple[Version, int]] = {}
    current: str | None = None
    for number, line in enumerate((ROOT / "requirements.lock").read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if pin := PIN.match(line):
            current = canonicalize_name(pin[1])
            assert current not in pins, f"requirements.lock:{number}: {current} pinned twice"
            pins[current] = (Version(pin[2]), 0)
        elif HASH.match(line) and current is not None:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        else:
            raise AssertionError(
                f"requirements.lock:{number}: neither a NAME==VERSION pin nor a hash: {line!r}"
            )
    return pins


def test_every_runtime_dependency_has_a_lower_bound() -> None:
    for requirement in _runtime_requirements():
        lower = [spec for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{requirement}: state the oldest version the code works with (>=X)"


def test_the_lock_pins_every_runtime_dependency_inside_its_range_with_hashes() -> None:
    pins = _lock()
    for requirement in _runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a runtime dependency but requirements.lock lacks it: run make lock"
        version, _ = pins[name]
        assert requirement.specifier.contains(version), (
            f"requirements.lock pins {name}=={version}, outside {requirement}: run make lock"
        )
    unhashed = [name for name, (_, hashes) in pins.items() if hashes == 0]
    assert not unhashed, f"pins without hashes: {unhashed}"
    # Only what runs in the image: no test or development tool is locked with it.
    assert not {"pytest", "hypothesis", "safetensors", "ruff", "mypy", "uv", "relaunch"} & set(pins)


def test_the_image_and_the_dev_venv_install_the_locked_dependencies_by_hash() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes --only-binary=:all: -r requirements.lock" in dockerfile
    # The project's own wheel adds nothing to what the lock installed.
    assert re.search(r"pip install --no-deps /dist/relaunch-\*\.whl", dockerfile)
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --require-hashes -r requirements.lock" in makefile
    assert re.search(r"^\$\(BIN\)/relaunch: pyproject.toml requirements.lock$", makefile, re.MULTILINE)
