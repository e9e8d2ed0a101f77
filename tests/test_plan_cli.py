"""``relaunch plan`` on real checkpoint trees on disk (real safetensors files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trees
import yaml
from safetensors.numpy import save_file

from relaunch import cli
from relaunch.commands import plan as plan_command
from relaunch.plan import Plan

CONFIG = Path(__file__).parent / "data" / "mindformers" / "pretrain_qwen3_32b_4k.yaml"


def write_tree(root: Path, ranks: int, steps: tuple[int, ...], prefix: str = "qwen3") -> Path:
    """``root/checkpoint/rank_<r>/<prefix>_rank_<r>-1_<step>.safetensors`` + meta.json, and a strategy dir."""
    checkpoint = root / "checkpoint"
    for rank in range(ranks):
        directory = checkpoint / f"rank_{rank}"
        directory.mkdir(parents=True, exist_ok=True)
        for step in steps:
            tensors = {"w": np.full((2, 3), step + rank, dtype=np.float32), "global_step": np.array([step])}
            save_file(
                tensors,
                str(directory / f"{prefix}_rank_{rank}-1_{step}.safetensors"),
                metadata={"format": "ms", "remove_redundancy": "False"},
            )
        meta = {
            "last_epoch": 1,
            "last_step": steps[-1],
            "last_ckpt_file": f"{prefix}_rank_{rank}-1_{steps[-1]}.safetensors",
        }
        (directory / "meta.json").write_text(json.dumps(meta))
    (root / "strategy").mkdir(exist_ok=True)
    return checkpoint


def run_plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = run_plan(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_resume_plan_for_an_interrupted_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_tree(tmp_path, 4, (10, 20))
    (checkpoint / "rank_2" / "qwen3_rank_2-1_20.safetensors").write_bytes(b"\x08\x00")  # truncated
    log = tmp_path / "termination-log"
    data = run_json(
        capsys, "--checkpoint-dir", str(checkpoint), "--world-size", "4", "--termination-log", str(log)
    )
    assert data["action"] == "resume"
    assert data["source"]["step"] == 10
    assert data["config"]["resume_training"] == "qwen3_rank_0-1_10.safetensors"
    assert "epoch 1 step 20" in data["message"]
    assert json.loads(log.read_text()) == data
    assert len(log.read_bytes()) < 1024
    assert Plan.from_json(log.read_text()).step == 10


def test_readable_output_and_rewritten_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_tree(tmp_path / "output", 16, (5,))  # the config says output_dir: './output'
    code, out, _ = run_plan(
        capsys,
        str(checkpoint),
        "--world-size",
        "16",
        "--config",
        str(CONFIG),
        "--workdir",
        str(tmp_path),
        "--reason",
        "configchange",
    )
    assert code == 0
    plan_text, _, config_text = out.partition("--- rewritten config ---\n")
    assert "action:   resume" in plan_text and "counts as failure: no" in plan_text
    loaded = yaml.safe_load(config_text)
    assert loaded["load_checkpoint"] == str(checkpoint)
    assert loaded["resume_training"] == "qwen3_rank_0-1_5.safetensors"
    assert loaded["lr_schedule"] == yaml.safe_load(CONFIG.read_text())["lr_schedule"]


def test_empty_and_missing_directories_start_fresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "checkpoint").mkdir()
    assert (
        run_json(capsys, str(tmp_path / "checkpoint"), "--world-size", "2", "--reason", "Start")["action"]
        == "fresh"
    )
    missing = run_json(capsys, str(tmp_path / "never-written"), "--world-size", "2")
    assert missing["action"] == "fresh" and missing["layout"] == "empty"


def test_rank_dirs_without_finished_files_start_fresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "checkpoint"
    for rank in range(2):
        (checkpoint / f"rank_{rank}").mkdir(parents=True)
    assert run_json(capsys, str(checkpoint), "--world-size", "2")["action"] == "fresh"
    # The first save crashed: only an unfinished .tmp exists.
    (checkpoint / "rank_0" / "qwen3_rank_0-1_10.safetensors.tmp").write_bytes(b"partial")
    data = run_json(capsys, str(checkpoint), "--world-size", "2")
    assert data["action"] == "fresh" and "no finished checkpoint" in data["message"]
    # One rank finished its file, the other did not: a checkpoint exists but none is complete.
    (checkpoint / "rank_0" / "qwen3_rank_0-1_10.safetensors.tmp").unlink()
    write_tree(tmp_path, 1, (10,))
    data = run_json(capsys, str(checkpoint), "--world-size", "2")
    assert data["action"] == "fail"
    assert "no step is complete" in data["message"] and "epoch 1 step 10" in data["message"]


def test_resize_plans_a_conversion_then_reuses_the_finished_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = write_tree(tmp_path, 4, (10,))
    args = [
        "--checkpoint-dir",
        str(checkpoint),
        "--strategy-dir",
        str(tmp_path / "strategy"),
        "--world-size",
        "2",
        "--ranks",
        "4",
        "--reason",
        "Resize",
        "--config",
        str(CONFIG),
    ]
    first = run_json(capsys, *args)
    # The config has model_parallel 4 x pipeline_stage 4: 2 ranks cannot run it.
    assert first["action"] == "fail" and "multiple of 16" in first["message"]

    small = tmp_path / "small.yaml"
    small.write_text(
        CONFIG.read_text()
        .replace("model_parallel: 4", "model_parallel: 2")
        .replace("pipeline_stage: 4", "pipeline_stage: 1")
        .replace("output_dir: './output'", f"output_dir: '{tmp_path}'")
    )
    args[-1] = str(small)
    convert = run_json(capsys, *args)
    assert convert["action"] == "convert"
    assert convert["counts_as_failure"] is False
    destination = convert["conversion"]["destination"]
    assert destination == f"{tmp_path}/relaunch/unified-qwen3-e1-s10"
    assert convert["parallel"] == {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1}

    monkeypatch.setattr(plan_command, "_conversion_complete", lambda d: d == destination)
    reused = run_json(capsys, *args)
    assert reused["action"] == "resume" and reused["conversion"]["reused"] is True
    assert reused["config"]["load_checkpoint"] == destination

    # The 2-rank run fails before it saves: rank_0/1 still hold the 4-rank step 10.
    code, out, err = run_plan(
        capsys,
        "--checkpoint-dir",
        str(checkpoint),
        "--world-size",
        "2",
        "--ranks",
        "2",
        "--last-conversion",
        json.dumps(convert["conversion"]),  # as the operator keeps it: source.dir left out
        "--json",
    )
    assert code == 0, err
    after = json.loads(out)
    assert after["action"] == "resume"
    assert after["config"]["load_checkpoint"] == destination


def test_checkpoint_2_resize_resumes_the_newest_complete_iteration_without_conversion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """4 -> 2 ranks on a Checkpoint 2.0 tree whose newest save did not finish: the plan resumes the
    newest complete iteration as is (MindFormers reshards it online from its metadata.json), names
    the rejected iteration, and edits the config's `checkpoint:` section."""
    checkpoint = tmp_path / "checkpoint"
    trees.build_v2(checkpoint, 4, [100, 200])
    trees.unfinished_v2_save(checkpoint, 4, 300, on_disk=("model",))
    config = tmp_path / "train.yaml"
    config.write_text(
        f"output_dir: '{tmp_path}'\n"
        "checkpoint:\n"
        "  load_path: ''  # where to resume from\n"
        "  no_load_optim: True\n"
        "  save_max: 3\n"
        "parallel_config:\n"
        "  data_parallel: 4\n"
        "  model_parallel: 1\n"
        "  pipeline_stage: 1\n"
    )
    code, out, err = run_plan(
        capsys,
        str(checkpoint),
        "--world-size",
        "2",
        "--ranks",
        "4",
        "--reason",
        "Resize",
        "--config",
        str(config),
    )
    assert code == 0, err
    plan_text, _, config_text = out.partition("--- rewritten config ---\n")
    assert "step:     iteration 200 (Checkpoint 2.0)" in plan_text
    data = run_json(capsys, str(checkpoint), "--world-size", "2", "--ranks", "4", "--reason", "Resize")
    assert data["action"] == "resume" and "conversion" not in data
    assert data["layout"] == "v2" and data["source"]["kind"] == "iteration" and data["source"]["step"] == 200
    assert "iteration 300: optimizer shards missing on every rank" in data["message"]
    assert "epoch None" not in data["message"]
    iteration_dir = str(checkpoint / "iteration_00000200")
    assert f"  load_path: '{iteration_dir}'  # where to resume from\n" in config_text
    assert "  no_load_optim: false\n" in config_text.lower()
    assert "  data_parallel: 2\n" in config_text
    assert "load_checkpoint" not in config_text and "resume_training" not in config_text


def test_the_plan_decides_data_parallel_from_the_sizes_the_operator_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The planning Job does not see the config: the operator passes the sizes that stay.
    checkpoint = tmp_path / "checkpoint"
    trees.build_v2(checkpoint, 4, [100])
    args = [str(checkpoint), "--world-size", "2", "--ranks", "4", "--reason", "Resize"]
    data = run_json(capsys, *args, "--model-parallel", "2", "--pipeline-stage", "1")
    assert data["parallel"] == {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1}
    refused = run_json(capsys, *args, "--model-parallel", "4", "--pipeline-stage", "1")
    assert refused["action"] == "fail" and "cannot be factored" in refused["message"]
    assert "parallel" not in run_json(capsys, *args)  # no sizes, no config: nothing to decide


def test_a_step_saved_by_more_ranks_than_told_is_converted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = write_tree(tmp_path, 4, (10,))
    strategy = str(tmp_path / "strategy")
    data = run_json(capsys, str(checkpoint), "--world-size", "2", "--ranks", "2", "--strategy-dir", strategy)
    assert data["action"] == "convert"
    assert data["previous_world_size"] == 4
    assert data["conversion"]["source"]["ranks"] == 4


def test_pinned_file_missing_on_a_rank_is_a_fail_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = write_tree(tmp_path, 3, (10, 20))
    os.remove(checkpoint / "rank_1" / "qwen3_rank_1-1_10.safetensors")
    log = tmp_path / "log"
    data = run_json(
        capsys,
        str(checkpoint),
        "--world-size",
        "3",
        "--resume",
        "qwen3_rank_0-1_10.safetensors",
        "--termination-log",
        str(log),
    )
    assert data["action"] == "fail"
    assert "rank 1" in data["message"]
    assert json.loads(log.read_text())["action"] == "fail"


def test_config_saving_elsewhere_is_a_fail_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_tree(tmp_path, 16, (5,))
    data = run_json(
        capsys, str(checkpoint), "--world-size", "16", "--config", str(CONFIG), "--workdir", "/elsewhere"
    )
    assert data["action"] == "fail"
    assert "/elsewhere/output/checkpoint" in data["message"] and "output_dir" in data["message"]


def test_rendered_config_goes_to_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = write_tree(tmp_path, 16, (5,))
    out = tmp_path / "rendered.yaml"
    run_json(
        capsys, str(checkpoint), "--world-size", "16", "--config", str(CONFIG), "--rendered-config", str(out)
    )
    assert yaml.safe_load(out.read_text())["resume_training"] == "qwen3_rank_0-1_5.safetensors"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--world-size", "2"], "checkpoint directory"),
        (["DIR", "--world-size", "2", "--resume", "not-a-name"], "resume must be"),
        (["DIR", "--world-size", "2", "--last-conversion", "{oops"], "conversion record"),
        (["FILE", "--world-size", "2"], ""),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "file").write_text("x")
    log = tmp_path / "log"
    args = [{"DIR": str(tmp_path), "FILE": str(tmp_path / "file")}.get(a, a) for a in args]
    code, out, err = run_plan(capsys, *args, "--termination-log", str(log))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("relaunch plan: ")
    assert message in err
    assert json.loads(log.read_text())["error"] in err


def test_argparse_rejects_unknown_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["plan", "/x", "--world-size", "2", "--conversion", "copy"])
    assert info.value.code == 2
    assert "Unify, Reshard" in capsys.readouterr().err


def test_plan_conversion_and_replan_with_the_real_converter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan's conversion fields are what `relaunch.convert.unify` needs, and its marker counts."""
    from relaunch.convert import unify
    from relaunch.strategy import Layout, Strategy, write_strategy_file

    # Two ranks, model parallel 2: rank r holds rows 2r..2r+1 of a 4x3 weight.
    checkpoint = tmp_path / "checkpoint"
    (tmp_path / "strategy").mkdir()
    full = np.arange(12, dtype=np.float32).reshape(4, 3)
    layout = Layout(dev_matrix=(1, 2), tensor_map=(0, -1))
    for rank in range(2):
        directory = checkpoint / f"rank_{rank}"
        directory.mkdir(parents=True)
        tensors = {"w": full[2 * rank : 2 * rank + 2].copy(), "global_step": np.array([7], dtype=np.int32)}
        save_file(tensors, str(directory / f"demo_rank_{rank}-1_7.safetensors"), metadata={"format": "ms"})
        write_strategy_file(
            tmp_path / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt", Strategy(0, {"w": layout})
        )
    base = [
        str(checkpoint),
        "--strategy-dir",
        str(tmp_path / "strategy"),
        "--world-size",
        "1",
        "--ranks",
        "2",
    ]
    plan = run_json(capsys, *base, "--reason", "Resize")
    assert plan["action"] == "convert"
    record = plan["conversion"]
    source = record["source"]
    files = {
        rank: os.path.join(
            source.get("dir", plan["checkpoint_dir"]), f"rank_{rank}", source["pattern"].format(rank=rank)
        )
        for rank in range(source["ranks"])
    }
    unify(files, record["strategy_dir"], record["destination"], workers=1)

    again = run_json(capsys, *base, "--reason", "Resize")
    assert again["action"] == "resume" and again["conversion"]["reused"] is True
    # The 1-rank run died before saving: rank_0 holds a 2-rank shard that looks complete at 1 rank.
    after = run_json(capsys, str(checkpoint), "--world-size", "1", "--last-conversion", json.dumps(record))
    assert after["action"] == "resume"
    assert after["config"]["load_checkpoint"] == record["destination"]
    assert after["config"]["auto_trans_ckpt"] is True

    # The same output as user-chosen unified weights: loads at any size, with optimizer state.
    unified = run_json(
        capsys,
        str(checkpoint),
        "--world-size",
        "3",
        "--resume",
        "Unified",
        "--unified-dir",
        record["destination"],
    )
    assert unified["action"] == "resume" and unified["source"]["kind"] == "unified"
    assert unified["config"]["resume_training"] is True


def test_planning_pods_start_without_the_conversion_and_operator_code(tmp_path: Path) -> None:
    """``relaunch plan`` runs in a pod at every recovery; it imports neither NumPy (``convert``) nor
    the operator (asyncio, kopf, the Kubernetes client), which would triple its start-up CPU, yet it
    still finds a finished conversion and plans a resume from a real tree."""
    checkpoint = write_tree(tmp_path, 2, (10,))
    probe = (
        "import json, sys\n"
        "from relaunch import cli\n"
        "code = cli.main(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('numpy', 'relaunch.convert', 'relaunch.controller', 'asyncio', 'kopf',"
        " 'kubernetes') if m in sys.modules)\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    args = ["plan", "--checkpoint-dir", str(checkpoint), "--world-size", "2", "--json"]
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["action"] == "resume"
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"code": 0, "heavy": []}

    # Every command is still listed when none is named.
    listed = subprocess.run([sys.executable, "-m", "relaunch.cli", "--help"], capture_output=True, text=True)
    assert all(name in listed.stdout for name in cli.COMMANDS), listed.stdout
