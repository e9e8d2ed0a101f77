"""The bridge between the state machine and :mod:`relaunch.plan` / :mod:`relaunch.config`.

Owns three things: the command line of the planning Job (``relaunch plan``), reading the plan it
reports through its termination message, and the conversion Job's command line for a ``convert``
plan. Rendering the next attempt's config is :func:`relaunch.config.rewrite`. Pure: no I/O.
"""

from __future__ import annotations

import json

from relaunch import config as config_mod
from relaunch import resources
from relaunch.controller.reconcile import PlanOutcome
from relaunch.model import TrainingJobSpec

#: Recovery reasons of the state machine -> the plan's reasons.
_PLAN_REASON = {
    "Created": "Start",
    "ReplicasChanged": "Resize",
    "ConfigChanged": "ConfigChange",
    # A finished job whose spec was edited without touching the config or the template (e.g. a
    # higher maxRestarts): it simply starts again from the latest checkpoint. An edit that does
    # change them reaches the planner as ConfigChanged.
    "SpecChanged": "Start",
    "Shrink": "Resize",
    "GrowBack": "Resize",
    # spec.suspend cleared: the newest complete step; the plan converts when the world size
    # differs from the previous attempt's (spec.replicas edited while suspended).
    "Resumed": "Start",
}


def _fail_reason(message: str) -> str:
    """A CamelCase reason for the Failed condition, from the plan's explanation."""
    text = message.lower()
    if "pinned" in text:
        return "PinnedCheckpointUnavailable"
    if "unified" in text:
        return "UnifiedWeightsUnavailable"
    if "no step is complete" in text:
        return "NoCompleteCheckpoint"
    if "factor" in text or "parallel" in text:
        return "WorldSizeNotFactorable"
    return "PlanFailed"


class RelaunchPlanner:
    """The real planner: ``relaunch plan`` in a Job, :mod:`relaunch.plan` to read its answer."""

    def plan_command(
        self,
        spec: TrainingJobSpec,
        *,
        reason: str,
        world_size: int,
        previous_world_size: int | None,
        last_conversion: str | None,
        config_text: str | None,
    ) -> list[str]:
        ckpt = spec.checkpoint
        cmd = ["relaunch", "plan", ckpt.dir, "--world-size", str(world_size), "--format", ckpt.format]
        if previous_world_size is not None:
            cmd += ["--previous-world-size", str(previous_world_size)]
        if ckpt.resume != "Latest":
            cmd += ["--resume", ckpt.resume]
        if ckpt.strategy_dir:
            cmd += ["--strategy-dir", ckpt.strategy_dir]
        if ckpt.unified_dir:
            cmd += ["--unified-dir", ckpt.unified_dir]
        cmd += ["--conversion", ckpt.conversion]
        cmd += ["--reason", _PLAN_REASON.get(reason, "Failure")]
        if last_conversion:
            cmd += ["--last-conversion", last_conversion]
        sizes = _model_sizes(config_text)
        if sizes is not None:
            # The planning Job does not see the config: it gets the sizes that stay, and the
            # plan decides data_parallel for the new world size (relaunch.plan, one place).
            cmd += ["--model-parallel", str(sizes[0]), "--pipeline-stage", str(sizes[1])]
        cmd += ["--json", "--termination-log", resources.TERMINATION_LOG]
        return cmd

    def interpret(self, message: str) -> PlanOutcome:
        from relaunch.plan import Plan

        try:
            data = json.loads(message)
        except ValueError as exc:
            raise ValueError(f"not JSON ({exc}): {message[:200]!r}") from exc
        if isinstance(data, dict) and "error" in data and "action" not in data:
            # `relaunch plan` could not even start (bad arguments, unreadable tree).
            return PlanOutcome(action="fail", message=str(data["error"]), reason="PlanningFailed")
        plan = Plan.from_json(data)
        source = plan.source
        step = source.step if source is not None else None
        epoch = source.epoch if source is not None else None
        file: str | None = None
        kind: str | None = None
        ranks: int | None = None
        if source is not None:
            kind = source.kind
            ranks = source.ranks
            file = source.name_pattern.format(rank=0) if source.name_pattern else source.directory
        convert_command: tuple[str, ...] | None = None
        record: str | None = None
        if plan.conversion is not None:
            record = json.dumps(plan.conversion.to_json(), separators=(",", ":"))
            if plan.action == "convert":
                convert_command = (
                    "relaunch",
                    "convert",
                    plan.conversion.mode.lower(),
                    "--conversion",
                    record,
                    "--termination-log",
                    resources.TERMINATION_LOG,
                )
        return PlanOutcome(
            action=plan.action,
            message=plan.message,
            reason=_fail_reason(plan.message) if plan.action == "fail" else "",
            step=step,
            epoch=epoch,
            file=file,
            ranks=ranks,
            kind=kind,
            convert_command=convert_command,
            conversion_record=record,
            detail=plan,
        )

    def render(self, text: str, outcome: PlanOutcome, spec: TrainingJobSpec) -> str:
        containers = (spec.template.get("spec") or {}).get("containers") or [{}]
        workdir = containers[0].get("workingDir")
        plan = outcome.detail
        # plan.parallel (the sizes the plan decided) sets parallel_config; see plan_command.
        return config_mod.rewrite(text, plan, expected_checkpoint_dir=spec.checkpoint.dir, workdir=workdir)

    def factorable(self, world_size: int, config_text: str | None) -> bool:
        """Whether ``world_size`` ranks fit the config's model x pipeline parallelism (asked
        before choosing an elastic size, with the same rule the plan applies)."""
        sizes = _model_sizes(config_text)
        if sizes is None:
            return True
        try:
            config_mod.parallel_for_world_size(world_size, *sizes)
        except ValueError:
            return False
        return True


def _model_sizes(config_text: str | None) -> tuple[int, int] | None:
    """The config's (model_parallel, pipeline_stage): what stays when the world size changes."""
    if config_text is None:
        return None
    try:
        settings = config_mod.read_settings(config_text)
    except ValueError:
        return None  # the planning Job's --config-free plan then keeps the sizes as they are
    return int(settings["model_parallel"]), int(settings["pipeline_stage"])
