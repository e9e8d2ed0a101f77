"""relaunch.config: real MindFormers configs rewritten with only the intended lines changed.

The two configs under tests/data/mindformers are unmodified copies of MindFormers' own
``configs/qwen3/`` files (Apache-2.0, see the LICENSE and README.md next to them).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from relaunch.config import (
    ConfigError,
    RelativePathError,
    check_checkpoint_dir,
    parallel_for_world_size,
    read_settings,
    rewrite,
    set_parallel,
)
from relaunch.plan import Conversion, Plan, Source

DATA = Path(__file__).parent / "data" / "mindformers"
CONFIGS = sorted(DATA.glob("*.yaml"))
ROOT = "/shared/output/checkpoint"


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    """(removed, added) lines of a unified diff."""
    removed: list[str] = []
    added: list[str] = []
    for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0):
        if line.startswith(("---", "+++", "@@")):
            continue
        (removed if line.startswith("-") else added).append(line[1:])
    return removed, added


def make_plan(action: str = "resume", **overrides: Any) -> Plan:
    fields: dict[str, Any] = {
        "action": action,
        "reason": "Failure",
        "world_size": 16,
        "previous_world_size": 16,
        "checkpoint_dir": ROOT,
        "layout": "v1",
        "message": "test",
        "source": Source(
            kind="sharded",
            directory=ROOT,
            epoch=2,
            step=100,
            ranks=16,
            name_pattern="qwen3_rank_{rank}-2_100.safetensors",
        ),
        "config": {
            "load_checkpoint": ROOT,
            "load_ckpt_format": "safetensors",
            "auto_trans_ckpt": False,
            "resume_training": "qwen3_rank_0-2_100.safetensors",
            "remove_redundancy": False,
        },
    }
    fields.update(overrides)
    return Plan(**fields)


def test_the_test_data_is_present() -> None:
    assert [p.name for p in CONFIGS] == ["finetune_qwen3.yaml", "pretrain_qwen3_32b_4k.yaml"]
    assert (DATA / "LICENSE").read_text().lstrip().startswith("Apache License")


# ------------------------------------------------------------------------------------------------
# read_settings


def test_read_settings_of_the_real_pretrain_config() -> None:
    found = read_settings(text_of(DATA / "pretrain_qwen3_32b_4k.yaml"))
    assert found == {
        "style": "legacy",
        "output_dir": "./output",
        "prefix": "qwen3",
        "checkpoint_format": "safetensors",
        "save_dir": None,
        "checkpoint_dir": "./output/checkpoint",
        "strategy_dir": "./output/strategy",
        "data_parallel": 1,
        "model_parallel": 4,
        "pipeline_stage": 4,
        "world_size": 16,
        "load_checkpoint": "",
        "resume_training": False,
        "auto_trans_ckpt": False,
        "load_ckpt_format": "safetensors",
        "save_checkpoint_steps": 5000,  # the CheckpointMonitor callback's
    }


def test_save_interval_of_both_layouts() -> None:
    assert read_settings("seed: 1\n")["save_checkpoint_steps"] is None
    v2 = "checkpoint:\n  save_path: /o\n  save_interleaved_steps: 20\n"
    assert read_settings(v2)["save_checkpoint_steps"] == 20


def test_read_settings_defaults_and_checkpoint_section() -> None:
    found = read_settings("seed: 1\n")
    assert (found["output_dir"], found["checkpoint_format"], found["world_size"]) == ("./output", "ckpt", 1)
    v2 = read_settings(
        "output_dir: /o\ncheckpoint:\n  load_path: /o/checkpoint\n"
        "  no_load_optim: False\n  save_path: /o/ck\n"
    )
    assert v2["style"] == "checkpoint2"
    assert (v2["load_checkpoint"], v2["resume_training"], v2["checkpoint_dir"]) == (
        "/o/checkpoint",
        True,
        "/o/ck",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "mapping at the top level"),
        ("a: [1\n", "not valid YAML"),
        ("", "empty"),
        ("parallel_config:\n  data_parallel: two\n", "positive integer"),
        ("parallel_config: 3\n", "must be a mapping"),
    ],
)
def test_read_settings_refuses_malformed_configs(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_settings(text)


# ------------------------------------------------------------------------------------------------
# rewrite: legacy keys on the real configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_resume_rewrite_changes_only_the_resume_lines(path: Path) -> None:
    before = text_of(path)
    after = rewrite(before, make_plan())
    removed, added = changed_lines(before, after)
    # Each changed line is a resume key; nothing else (lr_schedule, comments, anchors) moved.
    assert {line.split(":")[0] for line in removed} <= {
        "load_checkpoint",
        "auto_trans_ckpt",
        "resume_training",
    }
    assert all(
        line.split(":")[0] in {"load_checkpoint", "auto_trans_ckpt", "resume_training", "remove_redundancy"}
        for line in added
    )
    assert "load_checkpoint: '/shared/output/checkpoint'" in added  # the file's own quoting style
    assert "resume_training: qwen3_rank_0-2_100.safetensors" in added
    assert "remove_redundancy: False" in added  # absent before: added next to its siblings
    lines = after.splitlines()
    assert lines[lines.index("remove_redundancy: False") - 1].startswith("resume_training:")
    loaded, original = yaml.safe_load(after), yaml.safe_load(before)
    for key, value in make_plan().config.items():
        assert loaded[key] == value
    for key in set(original) - set(make_plan().config):
        assert loaded[key] == original[key], key
    assert loaded["lr_schedule"] == original["lr_schedule"]


def test_auto_trans_comment_survives_a_value_change() -> None:
    before = text_of(DATA / "finetune_qwen3.yaml")
    after = rewrite(before, make_plan())
    _, added = changed_lines(before, after)
    assert (
        "auto_trans_ckpt: False  # If true, automatically transforms the loaded checkpoint for distributed "
        "model compatibility" in added
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_unified_load_rewrite(path: Path) -> None:
    before = text_of(path)
    config = {
        "load_checkpoint": "/shared/output/relaunch/unified-qwen3-e2-s100",
        "load_ckpt_format": "safetensors",
        "src_strategy_path_or_dir": "",
        "auto_trans_ckpt": True,
        "resume_training": True,
        "remove_redundancy": False,
    }
    after = rewrite(before, make_plan("convert", config=config, world_size=32))
    loaded = yaml.safe_load(after)
    assert {key: loaded[key] for key in config} == config
    removed, _ = changed_lines(before, after)
    assert {line.split(":")[0] for line in removed} <= {
        "load_checkpoint",
        "auto_trans_ckpt",
        "resume_training",
    }


def test_rewrite_is_idempotent() -> None:
    before = text_of(DATA / "pretrain_qwen3_32b_4k.yaml")
    once = rewrite(before, make_plan())
    assert rewrite(once, make_plan()) == once


def test_a_fail_plan_is_not_rendered() -> None:
    with pytest.raises(ConfigError, match="plan is to fail"):
        rewrite("seed: 1\n", make_plan("fail", config={}))


# ------------------------------------------------------------------------------------------------
# Parallel sizes, anchors and aliases


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_world_size_change_keeps_the_anchor_so_aliases_follow(path: Path) -> None:
    before = text_of(path)
    parallel = {"data_parallel": 2, "model_parallel": 4, "pipeline_stage": 4}
    after = rewrite(before, make_plan(parallel=parallel, world_size=32))
    removed, added = changed_lines(before, after)
    assert "  data_parallel: &dp 2  # Number of data parallel" in added
    assert "  data_parallel: &dp 1  # Number of data parallel" in removed
    assert after.count("*dp") == before.count("*dp") == 4
    loaded = yaml.safe_load(after)
    assert loaded["parallel_config"]["data_parallel"] == 2
    assert loaded["parallel"]["dataset_strategy"] == [[2, 1]] * 4
    dp, mp, pp = (loaded["parallel_config"][k] for k in ("data_parallel", "model_parallel", "pipeline_stage"))
    assert dp * mp * pp == 32
    assert loaded["train_dataset_task"]["dataset_config"] == loaded["train_dataset"]  # other alias intact


def test_set_parallel_changes_one_line_and_literal_dataset_strategy() -> None:
    before = (
        "parallel_config:\n  data_parallel: 4   # dp\n  model_parallel: 2\n"
        "parallel:\n  dataset_strategy: [[4, 1], [4, 1]]  # per input\n  full_batch: False\n"
    )
    after = set_parallel(before, data_parallel=2)
    assert after == (
        "parallel_config:\n  data_parallel: 2   # dp\n  model_parallel: 2\n"
        "parallel:\n  dataset_strategy: [[2, 1], [2, 1]]  # per input\n  full_batch: False\n"
    )


def test_set_parallel_adds_missing_keys_and_sections() -> None:
    assert set_parallel("parallel_config:\n  model_parallel: 2\n", data_parallel=3) == (
        "parallel_config:\n  model_parallel: 2\n  data_parallel: 3\n"
    )
    assert set_parallel("seed: 1", data_parallel=2, model_parallel=1, pipeline_stage=1) == (
        "seed: 1\nparallel_config:\n  data_parallel: 2\n  model_parallel: 1\n  pipeline_stage: 1\n"
    )
    with pytest.raises(ConfigError, match="positive integer"):
        set_parallel("seed: 1\n", data_parallel=0)


def test_parallel_for_world_size_keeps_mp_and_pp() -> None:
    assert parallel_for_world_size(32, 4, 4) == (2, 4, 4)
    assert parallel_for_world_size(8, 2, 1) == (4, 2, 1)
    with pytest.raises(ConfigError, match=r"multiple of 16"):
        parallel_for_world_size(24, 4, 4)


def test_everything_missing_is_appended_in_order_to_a_text_without_final_newline() -> None:
    plan = make_plan(parallel={"data_parallel": 2, "model_parallel": 1, "pipeline_stage": 1})
    after = rewrite("seed: 1  # no newline at the end", plan)
    assert after.startswith("seed: 1  # no newline at the end\nload_checkpoint: /shared/output/checkpoint\n")
    assert after.endswith(
        "remove_redundancy: False\nparallel_config:\n  data_parallel: 2\n  model_parallel: 1\n"
        "  pipeline_stage: 1\n"
    )
    assert yaml.safe_load(after)["resume_training"] == "qwen3_rank_0-2_100.safetensors"


# ------------------------------------------------------------------------------------------------
# Fresh start


def test_fresh_start_clears_a_load_into_the_empty_checkpoint_dir() -> None:
    before = "load_checkpoint: '/shared/output/checkpoint'  # resume\nresume_training: True\nseed: 1\n"
    after = rewrite(before, make_plan("fresh", config={}, source=None))
    assert after == "load_checkpoint: ''  # resume\nresume_training: False\nseed: 1\n"


def test_fresh_start_clears_the_configs_own_relative_checkpoint_dir() -> None:
    before = (
        text_of(DATA / "pretrain_qwen3_32b_4k.yaml")
        .replace("load_checkpoint: ''", "load_checkpoint: './output/checkpoint/'")
        .replace("resume_training: False", "resume_training: True")
    )
    after = rewrite(before, make_plan("fresh", config={}, source=None))
    removed, added = changed_lines(before, after)
    assert removed == ["load_checkpoint: './output/checkpoint/'", "resume_training: True"]
    assert added == ["load_checkpoint: ''", "resume_training: False"]


def test_fresh_start_keeps_pretrained_weights_from_elsewhere() -> None:
    before = "load_checkpoint: /models/qwen3-8b\nauto_trans_ckpt: True\nresume_training: False\n"
    assert rewrite(before, make_plan("fresh", config={}, source=None)) == before


# ------------------------------------------------------------------------------------------------
# Checkpoint 2.0 style


V2_CONFIG = """\
output_dir: /shared/output  # root
load_checkpoint: ''
checkpoint:
  load_path: ''   # where to load from
  save_max: 2
  no_load_optim: True
callbacks:
  - type: CheckpointMonitor
    prefix: qwen3
"""


def test_checkpoint_section_is_edited_and_styles_never_mix() -> None:
    plan = make_plan(
        layout="v2", config={"load_checkpoint": f"{ROOT}/iteration_00000300", "resume_training": True}
    )
    after = rewrite(V2_CONFIG, plan)
    assert after == V2_CONFIG.replace(
        "  load_path: ''   #", "  load_path: '/shared/output/checkpoint/iteration_00000300'   #"
    ).replace("  no_load_optim: True", "  no_load_optim: False").replace(
        "load_checkpoint: ''", "load_checkpoint: '/shared/output/checkpoint/iteration_00000300'"
    )
    loaded = yaml.safe_load(after)
    assert "resume_training" not in loaded and "auto_trans_ckpt" not in loaded  # no legacy key added


def test_checkpoint_section_missing_keys_are_added_inside_it() -> None:
    text = "checkpoint:\n  save_max: 2\nseed: 1\n"
    plan = make_plan(
        layout="v2", config={"load_checkpoint": "/c/iteration_00000001", "resume_training": True}
    )
    assert rewrite(text, plan) == (
        "checkpoint:\n  save_max: 2\n  load_path: /c/iteration_00000001\n  no_load_optim: False\nseed: 1\n"
    )


def test_layout_and_style_mismatch_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"Checkpoint 1\.0"):
        rewrite(V2_CONFIG, make_plan())
    with pytest.raises(ConfigError, match="add a `checkpoint:` section"):
        rewrite(text_of(CONFIGS[0]), make_plan(layout="v2"))


# ------------------------------------------------------------------------------------------------
# Checkpoint location checks


def test_contradicting_output_dir_is_refused_with_a_fix() -> None:
    text = "output_dir: /elsewhere/output\n"
    with pytest.raises(ConfigError) as info:
        rewrite(text, make_plan(), expected_checkpoint_dir=ROOT)
    message = str(info.value)
    assert "/elsewhere/output/checkpoint" in message and ROOT in message
    assert "set output_dir to '/shared/output'" in message


def test_contradicting_checkpoint_monitor_directory_is_refused() -> None:
    text = "output_dir: /shared/output\ncallbacks:\n  - type: CheckpointMonitor\n    directory: /tmp/ckpt\n"
    with pytest.raises(ConfigError, match="CheckpointMonitor directory"):
        check_checkpoint_dir(text, ROOT)
    check_checkpoint_dir(text.replace("/tmp/ckpt", ROOT + "/"), ROOT)


def test_relative_output_dir_is_resolved_against_the_workdir() -> None:
    text = text_of(DATA / "finetune_qwen3.yaml")  # output_dir: './output'
    check_checkpoint_dir(text, ROOT, workdir="/shared")
    with pytest.raises(ConfigError, match="saves checkpoints to '/work/output/checkpoint'"):
        check_checkpoint_dir(text, ROOT, workdir="/work")
    with pytest.raises(RelativePathError, match="relative"):
        check_checkpoint_dir(text, ROOT)


# ------------------------------------------------------------------------------------------------
# Scalars of every kind read back as written


@settings(max_examples=60, deadline=None)
@given(
    load=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30),
    resume=st.one_of(
        st.booleans(), st.from_regex(r"[a-z0-9_]{1,12}_rank_0-[0-9]{1,3}_[0-9]{1,5}\.ckpt", fullmatch=True)
    ),
    auto=st.booleans(),
)
def test_any_value_round_trips_through_a_real_config(load: str, resume: Any, auto: bool) -> None:
    before = text_of(DATA / "finetune_qwen3.yaml")
    config = {"load_checkpoint": load, "resume_training": resume, "auto_trans_ckpt": auto}
    try:
        after = rewrite(before, make_plan(config=config))
    except ConfigError:
        # Only a value YAML cannot hold on one line may be refused.
        assert any(ch in load for ch in "\n\r\x85\u2028\u2029") or load != load.strip()
        return
    loaded = yaml.safe_load(after)
    assert {key: loaded[key] for key in config} == config
    removed, added = changed_lines(before, after)
    assert len(removed) <= 3 and len(added) <= 3


def test_conversion_plan_from_json_renders_the_same() -> None:
    plan = make_plan(
        "convert",
        conversion=Conversion(
            mode="Unify",
            source=Source(kind="sharded", directory=ROOT, epoch=2, step=100, ranks=16),
            strategy_dir="/s",
            destination="/shared/output/relaunch/unified-qwen3-e2-s100",
            world_size=32,
        ),
        config={"load_checkpoint": "/shared/output/relaunch/unified-qwen3-e2-s100", "auto_trans_ckpt": True},
    )
    text = text_of(CONFIGS[1])
    assert rewrite(text, Plan.from_json(plan.dumps())) == rewrite(text, plan)
