"""The recovery decision: from a checkpoint scan and the job's settings to a :class:`Plan`.

This module owns *what to resume from*. :func:`decide` is pure: it reads a
:class:`relaunch.checkpoints.ScanResult` (what is on disk), the job's checkpoint settings, the
previous and the new world size, why the job restarts, and the record of the last conversion;
it touches no file and no cluster. The only outside knowledge it may ask for is whether a
conversion destination is already finished (an injected predicate).

Actions:

- ``fresh``: the checkpoint directory is empty, or no rank ever finished a checkpoint file
  (empty ``rank_<r>`` folders, ``.tmp`` leftovers of a first save): automatic recovery
  resumption's first start; the job trains from scratch (or from the pretrained weights its
  config names). Every later decision resumes the newest complete step.
- ``resume``: load one step as it is: a sharded step at the same world size, unified weights
  (any world size, ``auto_trans_ckpt: True``), a Checkpoint 2.0 iteration (resharded online by
  MindFormers), or the output of an earlier, finished conversion.
- ``convert``: the world size changed; a conversion Job must first merge (``Unify``) or reshard
  (``Reshard``) the chosen step into a deterministic destination directory under
  ``<output_dir>/relaunch/``. The plan's ``config`` already points at that destination.
- ``fail``: nothing can be started; ``message`` says why (a pinned step missing or corrupt on
  some ranks, checkpoints that exist but none complete, a world size that cannot be factored as
  ``data_parallel x model_parallel x pipeline_stage``, ...).

The conversion hazard: after a 4 -> 2 conversion, ``rank_0`` and ``rank_1`` still hold the
*old* 4-rank shards of old steps. If the 2-rank run fails before it saves, a scan at 2 ranks
would call those old steps "complete on 2 ranks" although they have the wrong layout. The last
conversion's record (:class:`Conversion`) carries a *fence*: the newest (epoch, step) the raw
tree held at conversion time. A raw step at or below the fence is never resumed at the new
world size; the conversion output is used instead (a step of the new run is newer than the
fence). The fence is numeric on purpose: file names cannot tell the layouts apart when the new
run reuses the old prefix.

A pinned step (``resume: <file name>``) or ``Unified`` weights are honoured on every decision,
as MindFormers honours ``resume_training: <name>`` on every launch: once the job has moved past
them, set ``resume`` back to ``Latest`` to resume its own newer checkpoints.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from relaunch.config import ConfigError, parallel_for_world_size

if TYPE_CHECKING:  # pragma: no cover
    from relaunch.checkpoints import Rejection, ScanResult

Action = Literal["fresh", "resume", "convert", "fail"]
Reason = Literal["Failure", "Resize", "ConfigChange", "Start"]
ConversionMode = Literal["Unify", "Reshard"]

ACTIONS: tuple[Action, ...] = ("fresh", "resume", "convert", "fail")
REASONS: tuple[Reason, ...] = ("Failure", "Resize", "ConfigChange", "Start")
CONVERSION_MODES: tuple[ConversionMode, ...] = ("Unify", "Reshard")
RESUME_LATEST = "Latest"
RESUME_UNIFIED = "Unified"
#: Version of the plan JSON; bumped on an incompatible change.
PLAN_VERSION = 1
#: Messages are cut to this length in the JSON so a plan stays far below Kubernetes' 4 KiB
#: termination-message cap even when a scan names a thousand ranks.
MAX_MESSAGE_CHARS = 480
#: Where conversion outputs go, under the job's output directory.
CONVERSION_SUBDIR = "relaunch"

_PATTERN = re.compile(
    r"^(?P<prefix>.*?)_rank_\{rank\}(?P<task>_\d+)?-(?P<epoch>\d+)_(?P<step>\d+)\.(?P<fmt>safetensors|ckpt)$"
)
_RESUME_NAME = re.compile(r"^(?:[^/]+-\d+_\d+(?:\.(?:safetensors|ckpt))?|iteration_\d+)$")


class PlanError(ValueError):
    """Input to :func:`decide` that is malformed (not a situation a ``fail`` plan describes)."""


@dataclass(frozen=True)
class JobSettings:
    """The job's checkpoint settings (``spec.checkpoint``), as paths inside the worker."""

    checkpoint_dir: str
    strategy_dir: str | None = None
    format: str = "safetensors"
    resume: str = RESUME_LATEST  # "Latest", "Unified" or a file name <prefix>-<epoch>_<step>.<fmt>
    unified_dir: str | None = None
    conversion: ConversionMode = "Unify"
    output_dir: str | None = None  # where conversions go; default: the checkpoint dir's parent

    def __post_init__(self) -> None:
        if self.format not in ("safetensors", "ckpt"):
            raise PlanError(f"checkpoint format must be 'safetensors' or 'ckpt', got {self.format!r}")
        if self.conversion not in CONVERSION_MODES:
            raise PlanError(
                f"conversion must be one of {', '.join(CONVERSION_MODES)}, got {self.conversion!r}"
            )
        if self.resume not in (RESUME_LATEST, RESUME_UNIFIED) and not _RESUME_NAME.match(self.resume):
            raise PlanError(
                f"resume must be 'Latest', 'Unified' or a checkpoint file name like "
                f"'qwen3_rank_0-2_100.{self.format}', got {self.resume!r}"
            )
        if self.resume == RESUME_UNIFIED and not self.unified_dir:
            raise PlanError("resume 'Unified' needs the directory of the unified weights (unifiedDir)")

    @property
    def pinned(self) -> str | None:
        """The pinned file name, or None for ``Latest``/``Unified``."""
        return None if self.resume in (RESUME_LATEST, RESUME_UNIFIED) else self.resume

    @property
    def conversion_root(self) -> str:
        base = self.output_dir or posixpath.dirname(posixpath.normpath(self.checkpoint_dir))
        return posixpath.join(base, CONVERSION_SUBDIR)


@dataclass(frozen=True)
class Source:
    """What the job loads: one step of a tree, or unified weights. No per-rank paths."""

    kind: Literal["sharded", "unified", "iteration"]
    directory: str
    epoch: int | None = None
    step: int | None = None
    name_pattern: str | None = None  # sharded: str.format(rank=r) gives rank r's file name
    ranks: int | None = None  # sharded: how many rank_<r> directories the step spans
    format: str = "safetensors"
    remove_redundancy: bool = False

    def to_json(self, default_dir: str | None = None) -> dict[str, Any]:
        """JSON form; ``dir`` is left out when it is ``default_dir`` (the plan's checkpoint dir)."""
        return _drop_none(
            {
                "kind": self.kind,
                "dir": None if self.directory == default_dir else self.directory,
                "epoch": self.epoch,
                "step": self.step,
                "pattern": self.name_pattern,
                "ranks": self.ranks,
                "format": None if self.format == "safetensors" else self.format,
                "remove_redundancy": self.remove_redundancy or None,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any], default_dir: str | None = None) -> Source:
        directory = data.get("dir", default_dir)
        if directory is None:
            raise KeyError("dir")
        return cls(
            kind=data["kind"],
            directory=directory,
            epoch=data.get("epoch"),
            step=data.get("step"),
            name_pattern=data.get("pattern"),
            ranks=data.get("ranks"),
            format=data.get("format", "safetensors"),
            remove_redundancy=bool(data.get("remove_redundancy", False)),
        )


@dataclass(frozen=True)
class Conversion:
    """A conversion to run (in a ``convert`` plan) or that ran (the record passed back later).

    ``source`` is the step converted (``source.ranks`` is the old world size); ``destination``
    the directory the result is published in (a finished one holds ``relaunch-complete.json``);
    ``fence`` the newest (epoch, step) present anywhere in the raw tree when the conversion was
    planned: raw steps at or below it may be old-layout leftovers once the world size changed.
    """

    mode: ConversionMode
    source: Source
    strategy_dir: str | None
    destination: str
    world_size: int
    fence: tuple[int, int] | None = None
    destination_pattern: str | None = None  # Reshard: the output's name pattern
    reused: bool = False  # the destination was already complete when the plan was made

    @property
    def source_world_size(self) -> int:
        return self.source.ranks or 0

    @property
    def result(self) -> Source:
        """What the job loads once the conversion is done."""
        if self.mode == "Unify":
            # Unified weights carry no step in their name; the step they hold is the source's.
            return Source(
                kind="unified",
                directory=self.destination,
                epoch=self.source.epoch,
                step=self.source.step,
                format="safetensors",
            )
        return Source(
            kind="sharded",
            directory=self.destination,
            epoch=self.source.epoch,
            step=self.source.step,
            name_pattern=self.destination_pattern,
            ranks=self.world_size,
            format="safetensors",
        )

    def to_json(self, default_dir: str | None = None) -> dict[str, Any]:
        return _drop_none(
            {
                "mode": self.mode,
                "source": self.source.to_json(default_dir),
                "strategy_dir": self.strategy_dir,
                "destination": self.destination,
                "world_size": self.world_size,
                "fence": list(self.fence) if self.fence is not None else None,
                "destination_pattern": self.destination_pattern,
                "reused": self.reused or None,
            }
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str, default_dir: str | None = None) -> Conversion:
        """Parse a record (a dict, or its JSON text as ``--last-conversion`` passes it)."""
        try:
            if isinstance(data, str):
                data = json.loads(data)
            if not isinstance(data, Mapping):
                raise TypeError("not an object")
            fence = data.get("fence")
            return cls(
                mode=data["mode"],
                source=Source.from_json(data["source"], default_dir),
                strategy_dir=data.get("strategy_dir"),
                destination=data["destination"],
                world_size=int(data["world_size"]),
                fence=(int(fence[0]), int(fence[1])) if fence else None,
                destination_pattern=data.get("destination_pattern"),
                reused=bool(data.get("reused", False)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PlanError(
                f"the conversion record is malformed ({exc!r}); expected the JSON of a plan's "
                '\'conversion\' field: {"mode", "source", "destination", "world_size", ...}'
            ) from exc


@dataclass(frozen=True)
class Plan:
    """What to do before the next attempt starts. See the module docstring for the actions."""

    action: Action
    reason: Reason
    world_size: int
    previous_world_size: int
    checkpoint_dir: str
    layout: str  # the scanned tree: "v1", "v2", "unified" or "empty"
    message: str
    counts_as_failure: bool = True
    source: Source | None = None
    conversion: Conversion | None = None
    parallel: dict[str, int] | None = None  # parallel_config sizes for the new world size
    config: dict[str, Any] = field(default_factory=dict)  # resume keys to set (legacy names)
    rejected: int = 0  # how many newer candidates the scan rejected

    @property
    def epoch(self) -> int | None:
        return None if self.source is None else self.source.epoch

    @property
    def step(self) -> int | None:
        return None if self.source is None else self.source.step

    def to_json(self) -> dict[str, Any]:
        """The compact, documented JSON form (see ``relaunch.commands.plan``)."""
        message = self.message
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 1] + "…"
        return _drop_none(
            {
                "version": PLAN_VERSION,
                "action": self.action,
                "reason": self.reason,
                "counts_as_failure": self.counts_as_failure,
                "world_size": self.world_size,
                "previous_world_size": self.previous_world_size,
                "checkpoint_dir": self.checkpoint_dir,
                "layout": self.layout,
                # With a conversion the source is derivable from it (its input for ``convert``,
                # its output otherwise); leaving it out keeps the plan small.
                "source": self.source.to_json(self.checkpoint_dir)
                if self.source and not self.conversion
                else None,
                "conversion": self.conversion.to_json(self.checkpoint_dir) if self.conversion else None,
                "parallel": self.parallel,
                "config": self.config,
                "rejected": self.rejected or None,
                "message": message,
            }
        )

    def dumps(self) -> str:
        """``to_json()`` as one compact line of text."""
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Plan:
        try:
            if isinstance(data, str):
                data = json.loads(data)
            if not isinstance(data, Mapping):
                raise TypeError("not an object")
            version = data.get("version", PLAN_VERSION)
            if version != PLAN_VERSION:
                raise ValueError(f"plan version {version}, this relaunch reads version {PLAN_VERSION}")
            if data["action"] not in ACTIONS or data["reason"] not in REASONS:
                raise ValueError(f"unknown action {data['action']!r} or reason {data['reason']!r}")
            root = data["checkpoint_dir"]
            conversion = Conversion.from_json(data["conversion"], root) if data.get("conversion") else None
            source = Source.from_json(data["source"], root) if data.get("source") else None
            if conversion is not None and source is None:
                source = conversion.source if data["action"] == "convert" else conversion.result
            return cls(
                action=data["action"],
                reason=data["reason"],
                world_size=int(data["world_size"]),
                previous_world_size=int(data["previous_world_size"]),
                checkpoint_dir=data["checkpoint_dir"],
                layout=data["layout"],
                message=data.get("message", ""),
                counts_as_failure=bool(data["counts_as_failure"]),
                source=source,
                conversion=conversion,
                parallel=dict(data["parallel"]) if data.get("parallel") else None,
                config=dict(data.get("config") or {}),
                rejected=int(data.get("rejected", 0)),
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise PlanError(f"not a relaunch plan: {exc}") from exc

    def describe(self) -> str:
        """A few readable lines for ``relaunch plan`` without ``--json``."""
        lines = [f"action:   {self.action}", f"reason:   {self.reason}"]
        lines.append(f"counts as failure: {'yes' if self.counts_as_failure else 'no'}")
        lines.append(f"world size: {self.previous_world_size} -> {self.world_size}")
        if self.source is not None:
            where = self.source.directory
            if self.source.step is not None and self.source.epoch is None:
                lines.append(f"step:     iteration {self.source.step} (Checkpoint 2.0)")
            elif self.source.step is not None:
                lines.append(
                    f"step:     epoch {self.source.epoch}, step {self.source.step} ({self.source.kind})"
                )
            if self.source.name_pattern:
                where += f"/rank_<r>/{self.source.name_pattern.replace('{rank}', '<r>')}"
            lines.append(f"from:     {where}")
        if self.conversion is not None:
            verb = "reuse" if self.conversion.reused else "run"
            lines.append(
                f"convert:  {verb} {self.conversion.mode} {self.conversion.source_world_size} -> "
                f"{self.conversion.world_size} ranks into {self.conversion.destination}"
            )
        if self.parallel:
            lines.append("parallel: " + ", ".join(f"{k}={v}" for k, v in self.parallel.items()))
        for key, value in self.config.items():
            lines.append(f"config:   {key}: {value!r}")
        lines.append(f"why:      {self.message}")
        return "\n".join(lines)


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}


# ----------------------------------------------------------------------------------------------
# Helpers of decide()


def _step_tag(source: Source) -> str:
    """A directory-name tag for a step: ``<prefix><task>-e<epoch>-s<step>``."""
    match = _PATTERN.match(source.name_pattern or "")
    prefix = (match.group("prefix") + (match.group("task") or "")) if match else ""
    tag = f"e{source.epoch}-s{source.step}"
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", prefix)
    return f"{safe}-{tag}" if safe else tag


def _reshard_pattern(source: Source) -> str:
    """The resharded output's name pattern: the source's names, as safetensors."""
    pattern = source.name_pattern or f"checkpoint_rank_{{rank}}-{source.epoch}_{source.step}.safetensors"
    stem, _, _ = pattern.rpartition(".")
    return f"{stem}.safetensors"


def _fence(scan: ScanResult) -> tuple[int, int] | None:
    """The newest (epoch, step) present anywhere in the scanned tree, complete or not."""
    seen = [(e, s) for e, s, _ in scan.complete]
    seen += [(r.epoch, r.step) for r in scan.rejected if r.epoch is not None and r.step is not None]
    if scan.choice is not None and scan.choice.epoch is not None and scan.choice.step is not None:
        seen.append((scan.choice.epoch, scan.choice.step))
    return max(seen) if seen else None


def _nothing_finished(scan: ScanResult) -> bool:
    """True when no rank ever finished writing a checkpoint file (empty rank dirs, ``.tmp`` only).

    The trainer creates its rank directories before the first save, and a crash during that save
    leaves only ``.tmp`` files: that is still a first start. A finished file that is damaged, or
    a step that some ranks finished, is not: it fails with the scan's reasons instead.
    """
    if scan.choice is not None or scan.complete:
        return False
    candidates = getattr(scan, "candidates", ())
    if candidates:
        return all(getattr(candidate, "present", 1) == 0 for candidate in candidates)
    return not scan.rejected


def _rejected_what(rejection: Rejection) -> str:
    """``epoch 2 step 10`` (1.0), ``iteration 300`` (2.0: no epoch) or ``a file`` (unified)."""
    if rejection.step is None:
        return "a file"
    if rejection.epoch is None:
        return f"iteration {rejection.step}"
    return f"epoch {rejection.epoch} step {rejection.step}"


def _rejections(scan: ScanResult, limit: int = 3) -> str:
    parts = []
    for rejection in scan.rejected[:limit]:
        parts.append(f"{_rejected_what(rejection)}: {rejection.reason}")
    more = len(scan.rejected) - limit
    if more > 0:
        parts.append(f"and {more} more (run `relaunch scan` for all)")
    return "; ".join(parts)


def _resume_config(source: Source, settings: JobSettings) -> dict[str, Any]:
    """The MindFormers resume keys that make the job load ``source``."""
    if source.kind == "unified":
        # A directory of complete weights: MindFormers slices them for whatever strategy the job
        # compiles to (auto_trans_ckpt), and resume_training loads hyper_param.safetensors.
        return {
            "load_checkpoint": source.directory,
            "load_ckpt_format": "safetensors",
            "src_strategy_path_or_dir": "",
            "auto_trans_ckpt": True,
            "resume_training": True,
            "remove_redundancy": False,
        }
    if source.kind == "iteration":
        return {"load_checkpoint": source.directory, "resume_training": True}
    assert source.name_pattern is not None
    # A file name (not True) pins the very step relaunch verified, instead of letting every
    # rank re-run MindFormers' own meta.json choice, which may differ from ours.
    return {
        "load_checkpoint": source.directory,
        "load_ckpt_format": source.format,
        "auto_trans_ckpt": False,
        "resume_training": source.name_pattern.format(rank=0),
        "remove_redundancy": source.remove_redundancy,
    }


def _source_of(scan: ScanResult) -> Source:
    choice = scan.choice
    assert choice is not None
    return Source(
        kind=choice.kind,
        directory=choice.directory,
        epoch=choice.epoch,
        step=choice.step,
        name_pattern=choice.name_pattern if choice.kind == "sharded" else None,
        ranks=scan.ranks if choice.kind == "sharded" else None,
        format=scan.format or "safetensors",
        remove_redundancy=choice.remove_redundancy,
    )


def _has_hyper_params(scan: ScanResult) -> bool:
    choice = scan.choice
    if choice is None:
        return False
    paths = [*choice.files.values(), *getattr(choice, "parts", ())]
    return any(posixpath.basename(path) == "hyper_param.safetensors" for path in paths)


def _stale(source: Source, record: Conversion | None, scan_ranks: int) -> bool:
    """Is ``source`` (a raw sharded step) possibly an old-layout leftover of ``record``'s source?"""
    if record is None or source.kind != "sharded" or source.epoch is None or source.step is None:
        return False
    if record.world_size != scan_ranks or record.source_world_size == scan_ranks:
        return False
    if posixpath.normpath(source.directory) != posixpath.normpath(record.source.directory):
        return False
    fence = record.fence or (record.source.epoch or 0, record.source.step or 0)
    return (source.epoch, source.step) <= fence


# ----------------------------------------------------------------------------------------------
# decide()


def decide(
    settings: JobSettings,
    scan: ScanResult,
    *,
    world_size: int,
    previous_world_size: int | None = None,
    reason: Reason = "Failure",
    last_conversion: Conversion | None = None,
    model_parallel: int | None = None,
    pipeline_stage: int | None = None,
    conversion_complete: Callable[[str], bool] | None = None,
) -> Plan:
    """The plan for the next attempt (pure; see the module docstring).

    ``scan`` is the scan of ``settings.checkpoint_dir`` at ``previous_world_size`` ranks (of
    ``settings.unified_dir`` when ``settings.resume`` is ``Unified``); for a pinned resume it is
    the scan made with ``resume=<that name>``. ``model_parallel``/``pipeline_stage`` (from the
    config) let the plan set ``data_parallel`` for the new world size, and refuse a size that
    cannot be factored. ``conversion_complete(dir)`` says whether a conversion destination holds
    a finished conversion; without it, none is assumed finished except ``last_conversion``'s.
    """
    if reason not in REASONS:
        raise PlanError(f"reason must be one of {', '.join(REASONS)}, got {reason!r}")
    if world_size < 1:
        raise PlanError(f"world size must be at least 1, got {world_size}")
    previous = previous_world_size if previous_world_size is not None else world_size
    if previous < 1:
        raise PlanError(f"previous world size must be at least 1, got {previous}")
    base: dict[str, Any] = {
        "reason": reason,
        "world_size": world_size,
        "previous_world_size": previous,
        "checkpoint_dir": settings.checkpoint_dir,
        "layout": scan.layout,
        "counts_as_failure": reason == "Failure",
        "rejected": len(scan.rejected),
    }
    is_complete = conversion_complete or (lambda _dir: False)

    def fail(message: str) -> Plan:
        return Plan(action="fail", message=message, **base)

    # Parallel sizes first: a size that cannot be factored is refused before anything else.
    parallel: dict[str, int] | None = None
    if model_parallel is not None or pipeline_stage is not None:
        try:
            dp, mp, pp = parallel_for_world_size(world_size, model_parallel or 1, pipeline_stage or 1)
        except ConfigError as exc:
            return fail(str(exc))
        parallel = {"data_parallel": dp, "model_parallel": mp, "pipeline_stage": pp}
    base["parallel"] = parallel

    def resume(source: Source, message: str, conversion: Conversion | None = None) -> Plan:
        return Plan(
            action="resume",
            message=message,
            source=source,
            conversion=conversion,
            config=_resume_config(source, settings),
            **base,
        )

    # The reason is a field of its own; only incremental training says more in the message.
    purpose = "incremental training (lr schedule untouched): " if reason == "ConfigChange" else ""

    # 1. Already-unified weights chosen by the user: loadable at any world size.
    if settings.resume == RESUME_UNIFIED:
        if scan.layout != "unified" or scan.choice is None or scan.choice.kind != "unified":
            why = f"; {_rejections(scan)}" if scan.rejected else ""
            return fail(
                f"resume is 'Unified' but {settings.unified_dir!r} holds no unified weights "
                f"(param_name_map.json or hyper_param.safetensors with its parts; found layout "
                f"{scan.layout!r}){why}"
            )
        source = _source_of(scan)
        config = _resume_config(source, settings)
        config["resume_training"] = _has_hyper_params(scan)
        what = (
            "with optimizer state"
            if config["resume_training"]
            else "weights only (no hyper_param.safetensors)"
        )
        return Plan(
            action="resume",
            message=f"{purpose}load the unified weights in {source.directory} ({what})",
            source=source,
            config=config,
            **base,
        )

    # 2. A pinned step that some rank lacks or has corrupt: name them.
    if settings.pinned is not None and scan.pinned_error:
        return fail(f"pinned checkpoint {settings.pinned!r} cannot be resumed: {scan.pinned_error}")

    # 3. The output of the last conversion, if it is still there to load.
    converted: Source | None = None
    if last_conversion is not None and (
        conversion_complete is None or conversion_complete(last_conversion.destination)
    ):
        converted = last_conversion.result

    raw = _source_of(scan) if scan.choice is not None else None
    if raw is not None and raw.kind == "sharded" and _stale(raw, last_conversion, scan.ranks):
        assert last_conversion is not None
        same_step = (raw.epoch, raw.step) == (last_conversion.source.epoch, last_conversion.source.step)
        if settings.pinned is not None and not (converted is not None and same_step):
            return fail(
                f"pinned checkpoint {settings.pinned!r} (epoch {raw.epoch} step {raw.step}) predates the "
                f"conversion from {last_conversion.source_world_size} to {last_conversion.world_size} ranks: "
                "its files in the new ranks' directories are old-layout shards; pin a step saved after the "
                "conversion, or the converted step"
            )
        if converted is None:
            return fail(
                f"epoch {raw.epoch} step {raw.step} looks complete on {scan.ranks} ranks but predates the "
                f"conversion from {last_conversion.source_world_size} to {last_conversion.world_size} ranks "
                f"(old-layout shards), and the conversion output {last_conversion.destination} is missing "
                "or unfinished; restore it, or resume with the old world size"
            )
        raw = None  # old-layout leftovers of the previous world size: never resume them as is

    if raw is None:
        if converted is not None and last_conversion is not None:
            return _from_conversion(
                settings, last_conversion, converted, world_size, base, purpose, is_complete
            )
        if scan.layout == "empty" or _nothing_finished(scan):
            if settings.pinned is not None:
                return fail(
                    f"pinned checkpoint {settings.pinned!r} cannot be resumed: the checkpoint directory "
                    f"{settings.checkpoint_dir} holds no checkpoint at all"
                )
            what = "is empty" if scan.layout == "empty" else "holds no finished checkpoint file yet"
            return Plan(
                action="fresh",
                message=f"{purpose}the checkpoint directory {what}, so training starts from scratch",
                **base,
            )
        detail = _rejections(scan) or "no candidate step found"
        return fail(
            f"checkpoints exist in {settings.checkpoint_dir} but no step is complete and intact on all "
            f"{scan.ranks} ranks: {detail}; repair or remove the damaged files, or pin a step with "
            "spec.checkpoint.resume"
        )

    rejected_note = ""
    if scan.rejected:
        newest = scan.rejected[0]
        reason_text = newest.reason if len(newest.reason) <= 160 else newest.reason[:159] + "…"
        rejected_note = (
            f"; {len(scan.rejected)} newer rejected, newest: {_rejected_what(newest)}: {reason_text}"
        )
    if raw.kind == "unified":
        unified = Source(kind="unified", directory=raw.directory, format="safetensors")
        config = _resume_config(unified, settings)
        config["resume_training"] = _has_hyper_params(scan)
        return Plan(
            action="resume",
            message=f"{purpose}load the unified weights in {raw.directory}",
            source=unified,
            config=config,
            **base,
        )
    if raw.kind == "iteration":
        return resume(
            raw,
            f"{purpose}resume Checkpoint 2.0 iteration {raw.step}{rejected_note}; MindFormers reshards "
            "it online for any world size",
        )

    # A sharded step of the raw tree (newer than any conversion output: older ones are stale).
    if raw.name_pattern is None:
        return fail(
            f"epoch {raw.epoch} step {raw.step} is complete, but its file names differ across ranks beyond "
            "the rank number, so MindFormers cannot be told to load it (resume_training takes one name)"
        )
    where = f"epoch {raw.epoch} step {raw.step}"
    if scan.ranks == world_size:
        return resume(raw, f"{purpose}resume {where} as is on {world_size} ranks{rejected_note}")
    if (
        converted is not None
        and last_conversion is not None
        and (raw.epoch, raw.step, raw.ranks)
        == (last_conversion.source.epoch, last_conversion.source.step, last_conversion.source.ranks)
        and posixpath.normpath(raw.directory) == posixpath.normpath(last_conversion.source.directory)
        and (converted.kind == "unified" or last_conversion.world_size == world_size)
    ):
        # This very step was converted already and its output is usable for this world size.
        return _from_conversion(settings, last_conversion, converted, world_size, base, purpose, is_complete)
    return _convert(
        settings, raw, scan.ranks, _fence(scan), world_size, base, purpose, is_complete, rejected_note
    )


def _convert(
    settings: JobSettings,
    raw: Source,
    source_ranks: int,
    fence: tuple[int, int] | None,
    world_size: int,
    base: dict[str, Any],
    purpose: str,
    is_complete: Callable[[str], bool],
    note: str,
) -> Plan:
    """Plan a conversion of the sharded step ``raw`` (at ``source_ranks``) for ``world_size`` ranks."""
    where = f"epoch {raw.epoch} step {raw.step}"
    if not settings.strategy_dir:
        return Plan(
            action="fail",
            message=(
                f"{where} was saved by {source_ranks} ranks and the job now has {world_size}: converting "
                "it needs the source strategy files, but no strategy directory is set "
                "(spec.checkpoint.strategyDir)"
            ),
            **base,
        )
    if raw.format != "safetensors":
        return Plan(
            action="fail",
            message=(
                f"{where} was saved by {source_ranks} ranks as .{raw.format} and the job now has "
                f"{world_size}: relaunch converts safetensors checkpoints only; resume with "
                f"{source_ranks} ranks, or save with checkpoint_format: safetensors"
            ),
            **base,
        )
    tag = _step_tag(raw)
    if settings.conversion == "Unify":
        destination = posixpath.join(settings.conversion_root, f"unified-{tag}")
        pattern = None
    else:
        destination = posixpath.join(settings.conversion_root, f"resharded-{tag}-w{world_size}")
        pattern = _reshard_pattern(raw)
    conversion = Conversion(
        mode=settings.conversion,
        source=raw,
        strategy_dir=settings.strategy_dir,
        destination=destination,
        world_size=world_size,
        fence=fence,
        destination_pattern=pattern,
    )
    if is_complete(destination):
        reused = replace(conversion, reused=True)
        return Plan(
            action="resume",
            message=(
                f"{purpose}{where} was already converted ({settings.conversion}) for {world_size} ranks; "
                f"resume from the result{note}"
            ),
            source=reused.result,
            conversion=reused,
            config=_resume_config(reused.result, settings),
            **base,
        )
    verb = "unify it" if settings.conversion == "Unify" else "reshard it"
    return Plan(
        action="convert",
        message=(
            f"{purpose}{where} was saved by {source_ranks} ranks, the job now has {world_size}: {verb} "
            f"first{note}"
        ),
        source=raw,
        conversion=conversion,
        config=_resume_config(conversion.result, settings),
        **base,
    )


def _from_conversion(
    settings: JobSettings,
    record: Conversion,
    converted: Source,
    world_size: int,
    base: dict[str, Any],
    purpose: str,
    is_complete: Callable[[str], bool],
) -> Plan:
    """Resume from the last conversion's output (converting it again if the size moved on)."""
    where = f"epoch {record.source.epoch} step {record.source.step}"
    if converted.kind == "unified" or record.world_size == world_size:
        reused = replace(record, reused=True)
        return Plan(
            action="resume",
            message=(
                f"{purpose}the newest usable step is {where}, already converted for "
                f"{record.world_size} ranks; resume from the conversion's result"
            ),
            source=converted,
            conversion=reused,
            config=_resume_config(converted, settings),
            **base,
        )
    # A resharded output at another world size: reshard it again, from its own layout.
    return _convert(
        settings, converted, record.world_size, record.fence, world_size, base, purpose, is_complete, ""
    )


__all__ = [
    "ACTIONS",
    "CONVERSION_MODES",
    "REASONS",
    "RESUME_LATEST",
    "RESUME_UNIFIED",
    "Action",
    "Conversion",
    "ConversionMode",
    "JobSettings",
    "Plan",
    "PlanError",
    "Reason",
    "Source",
    "decide",
]
