"""``relaunch preconvert`` on real checkpoint trees: it converts what a recovery's plan would
convert, into the same destination, so that the recovery's plan then reuses it; it keeps at most
``--keep`` of them within ``--budget-bytes``; a half-written one is never used."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from relaunch import cli
from relaunch.commands import preconvert as preconvert_command
from relaunch.convert import is_complete
from relaunch.strategy import Layout, Strategy, write_strategy_file

ROWS = 64  # rows of the 2-rank weight: 2 x 64 x 3 float32 per rank file


def write_step(root: Path, step: int, ranks: int = 2) -> None:
    """Step ``step`` of a model-parallel-2 job: rank r holds rows r*ROWS/2.. of a ROWS x 3 weight."""
    checkpoint = root / "checkpoint"
    (root / "strategy").mkdir(exist_ok=True)
    full = np.arange(ROWS * 3, dtype=np.float32).reshape(ROWS, 3) + step
    layout = Layout(dev_matrix=(1, ranks), tensor_map=(0, -1))
    half = ROWS // ranks
    for rank in range(ranks):
        directory = checkpoint / f"rank_{rank}"
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "w": full[half * rank : half * (rank + 1)].copy(),
            "global_step": np.array([step], dtype=np.int32),
        }
        save_file(
            tensors, str(directory / f"demo_rank_{rank}-1_{step}.safetensors"), metadata={"format": "ms"}
        )
        write_strategy_file(root / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt", Strategy(0, {"w": layout}))


def preconvert(root: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    log = root / "termination-log"
    code = cli.main(
        [
            "preconvert",
            str(root / "checkpoint"),
            "--world-size",
            "2",
            "--target-world-size",
            "1",
            "--strategy-dir",
            str(root / "strategy"),
            "--termination-log",
            str(log),
            "--json",
            "--priority",
            "normal",  # not this test process: see test_low_priority
            *extra,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report: dict[str, Any] = json.loads(log.read_text())
    return report


def recovery_plan(root: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The plan a shrink from 2 to 1 rank makes now."""
    code = cli.main(
        [
            "plan",
            str(root / "checkpoint"),
            "--strategy-dir",
            str(root / "strategy"),
            "--world-size",
            "1",
            "--previous-world-size",
            "2",
            "--reason",
            "Resize",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    plan: dict[str, Any] = json.loads(out)
    return plan


def test_the_recovery_plan_reuses_the_pre_conversion_of_its_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_step(tmp_path, 10)
    before = recovery_plan(tmp_path, capsys)
    assert before["action"] == "convert"
    report = preconvert(tmp_path, capsys)
    assert report["state"] == "Ready" and report["converted"] is True, report
    assert (report["step"], report["world_size"]) == (10, 1)
    assert report["destination"] == before["conversion"]["destination"]
    assert [k["step"] for k in report["kept"]] == [10]
    after = recovery_plan(tmp_path, capsys)
    assert after["action"] == "resume" and after["conversion"]["reused"] is True, after
    assert after["config"]["load_checkpoint"] == report["destination"]

    # Again with nothing new: ready already, nothing written.
    again = preconvert(tmp_path, capsys)
    assert again["state"] == "Ready" and "converted" not in again

    # A newer step: the recovery would choose it, and its conversion is not ready yet.
    write_step(tmp_path, 20)
    newer = recovery_plan(tmp_path, capsys)
    assert newer["action"] == "convert" and newer["conversion"]["source"]["step"] == 20


def test_keep_and_budget_remove_the_oldest_and_say_when_the_budget_stops_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_step(tmp_path, 10)
    first = preconvert(tmp_path, capsys, "--keep", "2")
    write_step(tmp_path, 20)
    second = preconvert(tmp_path, capsys, "--keep", "2")
    assert [k["step"] for k in second["kept"]] == [20, 10]
    write_step(tmp_path, 30)
    third = preconvert(tmp_path, capsys, "--keep", "2")
    assert [k["step"] for k in third["kept"]] == [30, 20]
    assert third["removed"] == [first["destination"]]
    assert not os.path.exists(first["destination"])
    size = third["kept"][0]["bytes"]

    # A budget for one: the older goes before the new one is written.
    write_step(tmp_path, 40)
    fourth = preconvert(tmp_path, capsys, "--keep", "2", "--budget-bytes", str(size * 3 // 2))
    assert [k["step"] for k in fourth["kept"]] == [40]
    assert set(fourth["removed"]) == {k["destination"] for k in third["kept"]}

    # A budget too small for any: nothing written, and the report says why.
    write_step(tmp_path, 50)
    refused = preconvert(tmp_path, capsys, "--budget-bytes", "100")
    assert refused["state"] == "BudgetExceeded", refused
    assert "budgetBytes" in refused["message"] and refused["step"] == 50
    assert recovery_plan(tmp_path, capsys)["action"] == "convert"

    # The conversion the running gang loaded is never removed.
    write_step(tmp_path, 60)
    loaded = preconvert(tmp_path, capsys)
    record = recovery_plan(tmp_path, capsys)["conversion"]  # what the shrink resumed from
    assert record["reused"] is True and record["destination"] == loaded["destination"]
    write_step(tmp_path, 70)
    newer = preconvert(tmp_path, capsys, "--last-conversion", json.dumps(record))
    assert newer["step"] == 70 and loaded["destination"] not in newer.get("removed", [])
    assert is_complete(loaded["destination"]) is not None


def test_a_half_written_pre_conversion_is_never_used_and_its_leftovers_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_step(tmp_path, 10)
    destination = recovery_plan(tmp_path, capsys)["conversion"]["destination"]
    # What a killed pre-conversion leaves: a staging directory with some files, no marker.
    staging = f"{destination}.staging-dead"
    os.makedirs(staging)
    Path(staging, "part0.safetensors").write_bytes(b"\0" * 100)
    plan = recovery_plan(tmp_path, capsys)
    assert plan["action"] == "convert"  # never resumed from it
    report = preconvert(tmp_path, capsys)
    assert staging in report["removed"] and not os.path.exists(staging)
    assert report["state"] == "Ready" and is_complete(destination) is not None
    # A published one whose file was cut short counts as not converted: the plan converts again.
    part = next(p for p in Path(destination).glob("*.safetensors"))
    with open(part, "r+b") as handle:
        handle.truncate(part.stat().st_size - 1)
    assert recovery_plan(tmp_path, capsys)["action"] == "convert"
    # The next pre-conversion removes the damaged one (it is relaunch's) and writes it again.
    again = preconvert(tmp_path, capsys)
    assert destination in again["removed"] and again["converted"] is True
    assert recovery_plan(tmp_path, capsys)["action"] == "resume"


def test_nothing_to_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "strategy").mkdir()
    report = preconvert(tmp_path, capsys)
    assert report["state"] == "Nothing" and "needs no conversion" in report["message"]


def test_low_priority() -> None:
    """The helper lowers its CPU and I/O priority (in a child process: not this test run's)."""
    code = (
        "import os; from relaunch.commands.preconvert import lower_priority; "
        "print(lower_priority()); print(os.nice(0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    said, nice = out.splitlines()
    assert "nice 19" in said and int(nice) == 19
    if platform.machine() in ("x86_64", "aarch64"):
        assert "idle I/O class" in said


def test_the_write_rate_is_bounded() -> None:
    throttle = preconvert_command.Throttle(1000)
    started = time.monotonic()
    throttle({"event": "progress", "phase": "copy", "bytes": 300})
    assert time.monotonic() - started >= 0.25
    unbounded = preconvert_command.Throttle(None)
    started = time.monotonic()
    unbounded({"event": "progress", "phase": "copy", "bytes": 10**9})
    assert time.monotonic() - started < 0.1
