"""relaunch.plan: the recovery decision, scenario by scenario (pure: scans are built in memory)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from relaunch.checkpoints import Choice, Rejection, ScanResult
from relaunch.plan import Conversion, JobSettings, Plan, PlanError, Source, decide

ROOT = "/shared/output/checkpoint"
STRATEGY = "/shared/output/strategy"
SETTINGS = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY)


def v1_scan(
    ranks: int,
    *,
    chosen: tuple[int, int] | None = (2, 100),
    older: tuple[tuple[int, int], ...] = ((1, 50),),
    rejected: tuple[Rejection, ...] = (),
    prefix: str = "qwen3",
    fmt: str = "safetensors",
    remove_redundancy: bool = False,
    pinned: str | None = None,
    pinned_error: str | None = None,
    root: str = ROOT,
) -> ScanResult:
    """A Checkpoint 1.0 scan as relaunch.checkpoints reports it."""
    choice = None
    complete: list[tuple[int, int, str]] = []
    if chosen is not None:
        epoch, step = chosen
        pattern = f"{prefix}_rank_{{rank}}-{epoch}_{step}.{fmt}"
        choice = Choice(
            kind="sharded",
            epoch=epoch,
            step=step,
            directory=root,
            name_pattern=pattern,
            files={r: f"{root}/rank_{r}/{pattern.format(rank=r)}" for r in range(ranks)},
            remove_redundancy=remove_redundancy,
        )
        complete.append((epoch, step, f"{prefix}_rank_{{rank}}"))
    complete += [(e, s, f"{prefix}_rank_{{rank}}") for e, s in older]
    return ScanResult(
        root=root,
        layout="v1",
        format=fmt,  # type: ignore[arg-type]
        ranks=ranks,
        choice=choice,
        rejected=rejected,
        complete=tuple(complete),
        pinned=pinned,
        pinned_error=pinned_error,
    )


def empty_scan(ranks: int = 4, root: str = ROOT) -> ScanResult:
    return ScanResult(
        root=root,
        layout="empty",
        format=None,
        ranks=ranks,
        choice=None,
        rejected=(),
        complete=(),
        pinned=None,
        pinned_error=None,
    )


def unified_scan(directory: str, *, hyper_param: bool = True) -> ScanResult:
    parts = [f"{directory}/part0.safetensors", f"{directory}/param_name_map.json"]
    if hyper_param:
        parts.append(f"{directory}/hyper_param.safetensors")
    choice = Choice(
        kind="unified",
        epoch=None,
        step=None,
        directory=directory,
        name_pattern=None,
        files={},
        remove_redundancy=False,
    )
    object.__setattr__(choice, "parts", tuple(parts))
    return ScanResult(
        root=directory,
        layout="unified",
        format="safetensors",
        ranks=1,
        choice=choice,
        rejected=(),
        complete=(),
        pinned=None,
        pinned_error=None,
    )


def truncated(epoch: int, step: int, rank: int) -> Rejection:
    return Rejection(epoch=epoch, step=step, prefix="qwen3_rank_{rank}", reason=f"rank {rank}: truncated")


# ------------------------------------------------------------------------------------------------
# Scenario 1: interrupted training (and node loss, which is the same decision)


@pytest.mark.parametrize("scenario", ["worker exited non-zero", "node lost"])
def test_interrupted_training_resumes_newest_complete_step_as_is(scenario: str) -> None:
    plan = decide(SETTINGS, v1_scan(4), world_size=4, previous_world_size=4, reason="Failure")
    assert plan.action == "resume"
    assert plan.counts_as_failure is True
    assert (plan.epoch, plan.step) == (2, 100)
    assert plan.conversion is None
    assert plan.config == {
        "load_checkpoint": ROOT,
        "load_ckpt_format": "safetensors",
        "auto_trans_ckpt": False,
        "resume_training": "qwen3_rank_0-2_100.safetensors",
        "remove_redundancy": False,
    }


def test_truncated_newest_step_resumes_previous_and_message_says_why() -> None:
    scan = v1_scan(4, chosen=(2, 90), rejected=(truncated(2, 100, 3),))
    plan = decide(SETTINGS, scan, world_size=4)
    assert plan.action == "resume"
    assert plan.step == 90
    assert plan.rejected == 1
    assert "epoch 2 step 100" in plan.message and "rank 3: truncated" in plan.message


def test_remove_redundancy_and_ckpt_format_are_carried_to_the_config() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY, format="ckpt")
    plan = decide(settings, v1_scan(2, fmt="ckpt", remove_redundancy=True), world_size=2)
    assert plan.config["load_ckpt_format"] == "ckpt"
    assert plan.config["remove_redundancy"] is True
    assert plan.config["resume_training"] == "qwen3_rank_0-2_100.ckpt"


# ------------------------------------------------------------------------------------------------
# Scenario 2: strategy conversion (world size changed)


def test_resize_with_unify_plans_a_merge_then_auto_trans_load() -> None:
    plan = decide(
        SETTINGS,
        v1_scan(4, rejected=(truncated(2, 110, 1),)),
        world_size=2,
        previous_world_size=4,
        reason="Resize",
        model_parallel=2,
        pipeline_stage=1,
    )
    assert plan.action == "convert"
    assert plan.counts_as_failure is False
    assert plan.parallel == {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1}
    conversion = plan.conversion
    assert conversion is not None
    assert conversion.mode == "Unify"
    assert conversion.source.ranks == 4 and conversion.source.step == 100
    assert conversion.strategy_dir == STRATEGY
    assert conversion.destination == "/shared/output/relaunch/unified-qwen3-e2-s100"
    assert conversion.world_size == 2
    assert conversion.fence == (2, 110)  # the rejected newer step counts: its shards stay on disk
    assert plan.config == {
        "load_checkpoint": conversion.destination,
        "load_ckpt_format": "safetensors",
        "src_strategy_path_or_dir": "",
        "auto_trans_ckpt": True,
        "resume_training": True,
        "remove_redundancy": False,
    }


def test_resize_with_reshard_plans_a_reshard_then_resumes_by_name() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY, conversion="Reshard")
    plan = decide(settings, v1_scan(4), world_size=2, previous_world_size=4, reason="Resize")
    assert plan.action == "convert"
    conversion = plan.conversion
    assert conversion is not None and conversion.mode == "Reshard"
    assert conversion.destination == "/shared/output/relaunch/resharded-qwen3-e2-s100-w2"
    assert conversion.destination_pattern == "qwen3_rank_{rank}-2_100.safetensors"
    assert plan.config["load_checkpoint"] == conversion.destination
    assert plan.config["resume_training"] == "qwen3_rank_0-2_100.safetensors"
    assert plan.config["auto_trans_ckpt"] is False


def test_finished_destination_is_reused_without_a_second_conversion() -> None:
    done = {"/shared/output/relaunch/unified-qwen3-e2-s100"}
    plan = decide(
        SETTINGS,
        v1_scan(4),
        world_size=2,
        previous_world_size=4,
        reason="Resize",
        conversion_complete=done.__contains__,
    )
    assert plan.action == "resume"
    assert plan.conversion is not None and plan.conversion.reused is True
    assert plan.config["load_checkpoint"] == "/shared/output/relaunch/unified-qwen3-e2-s100"


def test_destination_names_are_deterministic_and_include_the_run_suffix() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY, output_dir="/out")
    first = decide(settings, v1_scan(4), world_size=8)
    scan = v1_scan(4)
    pattern = "qwen3_rank_{rank}_1-2_100.safetensors"
    assert scan.choice is not None
    suffixed = replace(scan, choice=replace(scan.choice, name_pattern=pattern))
    second = decide(settings, suffixed, world_size=8)
    assert first.conversion is not None and second.conversion is not None
    assert first.conversion.destination == "/out/relaunch/unified-qwen3-e2-s100"
    assert second.conversion.destination == "/out/relaunch/unified-qwen3_1-e2-s100"
    again = decide(settings, v1_scan(4), world_size=8)
    assert again.to_json() == first.to_json()


def test_conversion_without_strategy_dir_fails_with_reason() -> None:
    plan = decide(JobSettings(checkpoint_dir=ROOT), v1_scan(4), world_size=2, previous_world_size=4)
    assert plan.action == "fail"
    assert "strategy" in plan.message and "strategyDir" in plan.message


def test_ckpt_checkpoints_are_not_converted() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY, format="ckpt")
    plan = decide(settings, v1_scan(4, fmt="ckpt"), world_size=2, previous_world_size=4)
    assert plan.action == "fail"
    assert "safetensors checkpoints only" in plan.message


def test_world_size_that_cannot_be_factored_fails_before_anything_else() -> None:
    plan = decide(
        SETTINGS, v1_scan(8), world_size=6, previous_world_size=8, model_parallel=4, pipeline_stage=1
    )
    assert plan.action == "fail"
    assert "6" in plan.message and "multiple of 4" in plan.message


# ------------------------------------------------------------------------------------------------
# The conversion hazard: old-layout shards left in the new ranks' directories


def _record(mode: str = "Unify", fence: tuple[int, int] = (2, 110)) -> Conversion:
    settings = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY, conversion=mode)  # type: ignore[arg-type]
    plan = decide(settings, v1_scan(4, rejected=(truncated(*fence, 2),)), world_size=2, previous_world_size=4)
    assert plan.action == "convert" and plan.conversion is not None
    return plan.conversion


@pytest.mark.parametrize("stale_step", [(2, 100), (2, 110), (1, 50)])
def test_old_steps_seen_at_the_new_world_size_are_never_resumed_as_is(stale_step: tuple[int, int]) -> None:
    # The 2-rank run failed before saving: rank_0/rank_1 still hold the 4-rank shards, which a
    # scan at 2 ranks calls complete (even the partial 2_110 that ranks 2 and 3 lacked).
    record = _record()
    scan = v1_scan(2, chosen=stale_step, older=())
    plan = decide(SETTINGS, scan, world_size=2, previous_world_size=2, last_conversion=record)
    assert plan.action == "resume"
    assert plan.source is not None and plan.source.kind == "unified"
    assert (plan.epoch, plan.step) == (2, 100)  # the step the unified weights hold, for status
    assert plan.config["load_checkpoint"] == record.destination
    assert plan.config["auto_trans_ckpt"] is True
    assert plan.conversion is not None and plan.conversion.reused


def test_a_step_saved_after_the_conversion_is_resumed_as_is() -> None:
    record = _record()
    scan = v1_scan(2, chosen=(2, 120), older=((2, 110), (2, 100)), prefix="qwen3")
    plan = decide(SETTINGS, scan, world_size=2, previous_world_size=2, last_conversion=record)
    assert plan.action == "resume"
    assert plan.source is not None and (plan.source.kind, plan.step) == ("sharded", 120)
    assert plan.config["load_checkpoint"] == ROOT
    assert plan.conversion is None


def test_reshard_output_is_reused_when_the_new_run_saved_nothing() -> None:
    record = _record("Reshard")
    settings = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY, conversion="Reshard")
    plan = decide(settings, v1_scan(2), world_size=2, previous_world_size=2, last_conversion=record)
    assert plan.action == "resume"
    assert plan.config["load_checkpoint"] == record.destination
    assert plan.config["resume_training"] == "qwen3_rank_0-2_100.safetensors"


def test_reshard_output_is_resharded_again_when_the_size_moves_on() -> None:
    record = _record("Reshard")
    settings = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY, conversion="Reshard")
    plan = decide(settings, v1_scan(2), world_size=1, previous_world_size=2, last_conversion=record)
    assert plan.action == "convert"
    assert plan.conversion is not None
    assert plan.conversion.source.directory == record.destination
    assert plan.conversion.source.ranks == 2
    assert plan.conversion.destination.endswith("-w1")


def test_the_converted_step_seen_at_its_old_size_reuses_the_output() -> None:
    record = _record()
    no_strategy = JobSettings(checkpoint_dir=ROOT)
    plan = decide(no_strategy, v1_scan(4), world_size=2, previous_world_size=4, last_conversion=record)
    assert plan.action == "resume"
    assert plan.config["load_checkpoint"] == record.destination


def test_unified_output_needs_no_new_conversion_for_another_size() -> None:
    record = _record()
    plan = decide(SETTINGS, v1_scan(2), world_size=8, previous_world_size=2, last_conversion=record)
    assert plan.action == "resume"
    assert plan.config["load_checkpoint"] == record.destination


def test_missing_conversion_output_is_not_loaded() -> None:
    record = _record()
    plan = decide(
        SETTINGS,
        v1_scan(2),
        world_size=2,
        previous_world_size=2,
        last_conversion=record,
        conversion_complete=lambda _d: False,
    )
    assert plan.action == "fail"
    assert "old-layout" in plan.message and record.destination in plan.message


def test_pinned_step_older_than_the_conversion_is_refused() -> None:
    record = _record()
    settings = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY, resume="qwen3_rank_0-1_50.safetensors")
    plan = decide(settings, v1_scan(2, chosen=(1, 50)), world_size=2, last_conversion=record)
    assert plan.action == "fail"
    assert "old-layout" in plan.message


# ------------------------------------------------------------------------------------------------
# Scenario 3: incremental training (config changed)


def test_config_change_resumes_latest_and_is_not_a_failure() -> None:
    plan = decide(SETTINGS, v1_scan(4), world_size=4, reason="ConfigChange")
    assert plan.action == "resume"
    assert plan.counts_as_failure is False
    assert plan.step == 100
    assert "lr schedule untouched" in plan.message
    assert all("lr" not in key for key in plan.config)


# ------------------------------------------------------------------------------------------------
# Scenario 4: automatic recovery resumption (empty directory first, resume later)


def test_empty_directory_starts_fresh_then_a_later_failure_resumes() -> None:
    first = decide(SETTINGS, empty_scan(), world_size=4, reason="Start")
    assert first.action == "fresh"
    assert first.counts_as_failure is False
    assert first.config == {}
    later = decide(SETTINGS, v1_scan(4, chosen=(1, 10), older=()), world_size=4, reason="Failure")
    assert later.action == "resume" and later.step == 10


def test_failure_before_the_first_checkpoint_starts_fresh_again() -> None:
    plan = decide(SETTINGS, empty_scan(), world_size=4, reason="Failure")
    assert plan.action == "fresh"
    assert plan.counts_as_failure is True


# ------------------------------------------------------------------------------------------------
# The three ways to choose weights


def test_pinned_step_is_resumed_by_its_name() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, resume="qwen3_rank_0-1_50.safetensors")
    scan = v1_scan(4, chosen=(1, 50), older=(), pinned="qwen3_rank_0-1_50.safetensors")
    plan = decide(settings, scan, world_size=4)
    assert plan.action == "resume"
    assert plan.config["resume_training"] == "qwen3_rank_0-1_50.safetensors"


def test_pinned_step_missing_on_some_ranks_fails_naming_them() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, resume="qwen3_rank_0-1_50.safetensors")
    error = "rank 2 lacks qwen3_rank_2-1_50.safetensors; rank 3 has it corrupt (truncated)"
    scan = v1_scan(4, chosen=None, older=(), pinned=settings.resume, pinned_error=error)
    plan = decide(settings, scan, world_size=4)
    assert plan.action == "fail"
    assert "rank 2" in plan.message and "rank 3" in plan.message
    assert plan.config == {}


def test_pinned_step_on_an_empty_directory_fails() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, resume="qwen3_rank_0-1_50.safetensors")
    plan = decide(settings, empty_scan(), world_size=4)
    assert plan.action == "fail" and "holds no checkpoint" in plan.message


def test_pinned_step_at_another_world_size_is_converted() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, strategy_dir=STRATEGY, resume="qwen3_rank_0-1_50.safetensors")
    plan = decide(settings, v1_scan(4, chosen=(1, 50), older=()), world_size=2, previous_world_size=4)
    assert plan.action == "convert"
    assert plan.conversion is not None and plan.conversion.source.step == 50


@pytest.mark.parametrize("hyper_param", [True, False])
def test_unified_weights_load_at_any_world_size(hyper_param: bool) -> None:
    settings = JobSettings(checkpoint_dir=ROOT, resume="Unified", unified_dir="/models/qwen3-unified")
    scan = unified_scan("/models/qwen3-unified", hyper_param=hyper_param)
    plan = decide(settings, scan, world_size=16, previous_world_size=4, model_parallel=4, pipeline_stage=2)
    assert plan.action == "resume"
    assert plan.conversion is None
    assert plan.parallel == {"data_parallel": 2, "model_parallel": 4, "pipeline_stage": 2}
    assert plan.config["load_checkpoint"] == "/models/qwen3-unified"
    assert plan.config["auto_trans_ckpt"] is True
    assert plan.config["resume_training"] is hyper_param


def test_unified_mode_on_a_directory_without_unified_weights_fails() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, resume="Unified", unified_dir="/models/nothing")
    plan = decide(settings, empty_scan(root="/models/nothing"), world_size=4)
    assert plan.action == "fail"
    assert "no unified weights" in plan.message


# ------------------------------------------------------------------------------------------------
# Other fail reasons and other layouts


def test_checkpoints_exist_but_none_complete_fails_with_the_rejections() -> None:
    scan = v1_scan(4, chosen=None, older=(), rejected=(truncated(1, 20, 0), truncated(1, 10, 2)))
    plan = decide(SETTINGS, scan, world_size=4)
    assert plan.action == "fail"
    assert "no step is complete" in plan.message
    assert "epoch 1 step 20: rank 0: truncated" in plan.message
    assert "epoch 1 step 10: rank 2: truncated" in plan.message


def test_names_that_differ_across_ranks_fail() -> None:
    scan = v1_scan(4)
    assert scan.choice is not None
    odd = replace(scan, choice=replace(scan.choice, name_pattern=None))
    plan = decide(SETTINGS, odd, world_size=4)
    assert plan.action == "fail" and "file names differ" in plan.message


def test_checkpoint_2_iteration_is_resumed_at_any_world_size() -> None:
    iteration = f"{ROOT}/iteration_00000300"
    choice = Choice(
        kind="iteration",
        epoch=None,
        step=300,
        directory=iteration,
        name_pattern="p-model-{rank:07d}-0000004.safetensors",
        files={},
        remove_redundancy=False,
    )
    scan = ScanResult(
        root=ROOT,
        layout="v2",
        format="safetensors",
        ranks=4,
        choice=choice,
        rejected=(),
        complete=((None, 300, "p"),),
        pinned=None,
        pinned_error=None,
    )
    plan = decide(SETTINGS, scan, world_size=2, previous_world_size=4)
    assert plan.action == "resume"
    assert plan.conversion is None
    assert plan.config == {"load_checkpoint": iteration, "resume_training": True}


def test_bad_inputs_raise_plan_error() -> None:
    with pytest.raises(PlanError, match="world size"):
        decide(SETTINGS, v1_scan(4), world_size=0)
    with pytest.raises(PlanError, match="reason"):
        decide(SETTINGS, v1_scan(4), world_size=4, reason="Oops")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="resume must be"):
        JobSettings(checkpoint_dir=ROOT, resume="not a checkpoint name")
    with pytest.raises(PlanError, match="unifiedDir"):
        JobSettings(checkpoint_dir=ROOT, resume="Unified")
    with pytest.raises(PlanError, match="conversion"):
        JobSettings(checkpoint_dir=ROOT, conversion="Copy")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="malformed"):
        Conversion.from_json('{"mode": "Unify"}')


# ------------------------------------------------------------------------------------------------
# JSON


def _plans(base: str, ranks: int) -> list[Plan]:
    settings = JobSettings(checkpoint_dir=f"{base}/checkpoint", strategy_dir=f"{base}/strategy")
    scan = v1_scan(
        ranks,
        root=settings.checkpoint_dir,
        prefix="qwen3_32b",
        rejected=tuple(truncated(2, 100 + i, i % ranks) for i in range(1, 40)),
    )
    half = ranks // 2
    return [
        decide(settings, scan, world_size=ranks),
        decide(
            settings, scan, world_size=half, previous_world_size=ranks, model_parallel=2, pipeline_stage=2
        ),
        decide(
            replace(settings, conversion="Reshard"),
            scan,
            world_size=half,
            previous_world_size=ranks,
            reason="Resize",
        ),
        decide(
            settings,
            scan,
            world_size=half,
            previous_world_size=ranks,
            conversion_complete=lambda _d: True,
        ),
    ]


def test_plan_json_round_trips_and_stays_under_1_kib_for_1024_ranks() -> None:
    for plan in _plans("/mnt/shared/qwen3-32b/output", 1024):
        text = plan.dumps()
        assert len(text.encode()) < 1024, (plan.action, len(text))
        assert Plan.from_json(text) == plan
        assert Plan.from_json(json.loads(text)) == plan


def test_plan_json_does_not_grow_with_the_rank_count() -> None:
    # Long paths make a plan longer, never more ranks: no per-rank list is ever in it.
    base = "/mnt/shared-training-storage/teams/llm-pretraining/qwen3-32b-run-2026-11/output"
    small = [len(p.dumps()) for p in _plans(base, 8)]
    large = [len(p.dumps()) for p in _plans(base, 1024)]
    # Only digits differ (1024 vs 8, 512 vs 4, ...).
    assert all(big - little <= 40 for little, big in zip(small, large, strict=True)), (small, large)
    assert max(large) < 2048


def test_fail_plan_with_a_thousand_ranks_named_stays_compact() -> None:
    settings = JobSettings(checkpoint_dir=ROOT, resume="qwen3_rank_0-1_50.safetensors")
    error = "; ".join(f"rank {r} lacks qwen3_rank_{r}-1_50.safetensors" for r in range(1024))
    scan = v1_scan(1024, chosen=None, pinned=settings.resume, pinned_error=error)
    plan = decide(settings, scan, world_size=1024)
    text = plan.dumps()
    assert len(text.encode()) < 1024
    assert Plan.from_json(text).message.startswith("pinned checkpoint")


def test_conversion_record_round_trips_through_its_json_text() -> None:
    record = _record("Reshard")
    assert Conversion.from_json(json.dumps(record.to_json())) == record
    assert Source.from_json(record.source.to_json()) == record.source


def test_from_json_rejects_what_is_not_a_plan() -> None:
    with pytest.raises(PlanError):
        Plan.from_json("[]")
    with pytest.raises(PlanError):
        Plan.from_json({"action": "resume"})
    with pytest.raises(PlanError, match="version"):
        Plan.from_json({**decide(SETTINGS, v1_scan(4), world_size=4).to_json(), "version": 99})
