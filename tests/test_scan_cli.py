"""``relaunch scan``: exit codes, the JSON contract, and a table a human can read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trees

from relaunch.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["scan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_output_and_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = trees.build_v1(tmp_path, 2, [(1, 10), (1, 20)])
    trees.truncate(written[(1, 20)][1])
    code, out, err = _run(capsys, str(tmp_path), "--json")
    assert code == 0 and err == ""
    document = json.loads(out)
    assert document["format"] == "safetensors" and document["ranks"] == 2 and document["layout"] == "v1"
    assert document["choice"]["epoch"] == 1 and document["choice"]["step"] == 10
    assert document["choice"]["files"] == {str(r): p for r, p in written[(1, 10)].items()}
    (rejected,) = document["rejected"]
    assert (rejected["epoch"], rejected["step"], rejected["ranks"]) == (1, 20, [1])
    assert "truncated" in rejected["reason"]


def test_table_shows_steps_by_ranks_the_choice_and_the_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    written = trees.build_v1(tmp_path, 4, [(1, 10), (1, 20), (1, 30)])
    trees.truncate(written[(1, 30)][2])
    os.remove(written[(1, 20)][0])
    code, out, _ = _run(capsys, str(tmp_path))
    assert code == 0
    assert "resume from: epoch 1 step 10  llama_rank_{rank}-1_10.safetensors" in out
    lines = out.splitlines()
    row30 = next(line for line in lines if line.startswith("1      30"))
    assert "##X#" in row30 and "corrupt on rank 2" in row30
    row20 = next(line for line in lines if line.startswith("1      20"))
    assert ".+++" in row20 and "missing on rank 0" in row20
    assert "CHOSEN" in next(line for line in lines if line.startswith("1      10"))


def test_many_ranks_are_summarised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = trees.build_v1(tmp_path, 40, [(1, 10), (1, 20)], meta=False)
    for rank in (3, 17):
        os.remove(written[(1, 20)][rank])
    code, out, _ = _run(capsys, str(tmp_path), "--ranks", "40")
    assert code == 0
    assert "38/40 missing 3,17" in out
    assert max(len(line) for line in out.splitlines()) < 160


def test_no_complete_step_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = trees.build_v1(tmp_path, 2, [(1, 10)])
    trees.truncate(written[(1, 10)][0], 0)
    code, out, _ = _run(capsys, str(tmp_path), "--json")
    assert code == 3
    assert json.loads(out)["choice"] is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, str(empty))[0] == 3


@pytest.mark.parametrize(
    "argv_for, message",
    [
        (lambda root: [str(root / "absent")], "no such directory"),
        (lambda root: [str(root / "rank_0" / "meta.json")], "not a directory"),
        (lambda root: [str(root / "rank_0")], "not a checkpoint tree"),
        (lambda root: [str(root), "--ranks", "0"], "ranks must be at least 1"),
        (lambda root: [str(root), "--resume", "nonsense"], "<prefix>-<epoch>_<step>"),
        (lambda root: [str(root), "--resume", "llama_rank_0-1_99"], "missing on 2 of 2 ranks"),
    ],
    ids=["absent", "file", "not-a-tree", "ranks", "bad-name", "pinned-missing"],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_for, message: str
) -> None:
    trees.build_v1(tmp_path, 2, [(1, 10)])
    code, _, err = _run(capsys, *argv_for(tmp_path))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("relaunch scan: ") and message in err


def test_pinned_step_and_deep_verification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = trees.build_v1(tmp_path, 2, [(1, 10), (1, 20)], fmt="ckpt")
    code, out, _ = _run(capsys, str(tmp_path), "--resume", "llama_rank_1-1_10", "--format", "ckpt", "--json")
    assert code == 0 and json.loads(out)["choice"]["step"] == 10
    trees.truncate(written[(1, 20)][0], 30)
    code, out, _ = _run(capsys, str(tmp_path), "--verify", "deep")
    assert code == 0 and "step 10" in out


def test_installed_command_never_prints_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "rank_0").mkdir()
    (tmp_path / "rank_0" / "x_rank_0-1_1.safetensors").write_bytes(b"\x00" * 3)
    for argv in ([str(tmp_path)], [str(tmp_path / "nope")], [str(tmp_path), "--resume", "x_rank_0-1_2"]):
        done = subprocess.run(
            [sys.executable, "-m", "relaunch.cli", "scan", *argv], capture_output=True, text=True, check=False
        )
        assert done.returncode in (2, 3)
        assert "Traceback" not in done.stderr


def test_v2_report_explains_an_iteration_whose_optimizer_save_did_not_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trees.build_v2(tmp_path, 2, [100, 200])
    trees.unfinished_v2_save(tmp_path, 2, 300, on_disk=("model",))
    code, out, _ = _run(capsys, str(tmp_path))
    assert code == 0
    assert "resume from: iteration 200" in out
    rejected = next(line for line in out.splitlines() if line.startswith("  iteration 300: "))
    assert "optimizer shards missing on every rank (metadata.json names them" in rejected
    assert "resuming here would drop the optimizer state" in rejected
