"""The TrainingJob API as typed values: ``spec`` parsed from a custom resource body.

Parsing happens once at the entry of every reconcile round; everything after works on these
frozen dataclasses. The CRD's schema already rejects most bad input; what it cannot express
becomes a :class:`SpecError` whose message names the field, which the controller turns into a
``Failed`` condition and an Event instead of a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GROUP = "relaunch.dev"
VERSION = "v1alpha1"
PLURAL = "trainingjobs"
KIND = "TrainingJob"
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_MOUNT_PATH = "/etc/relaunch/train.yaml"
DEFAULT_CONFIG_KEY = "train.yaml"


class SpecError(ValueError):
    """A TrainingJob spec the operator cannot run; the message names the field."""


@dataclass(frozen=True)
class ConfigSource:
    text: str | None = None
    inline: Mapping[str, Any] | None = None
    config_map: str | None = None
    config_map_key: str = DEFAULT_CONFIG_KEY
    mount_path: str = DEFAULT_MOUNT_PATH


@dataclass(frozen=True)
class CheckpointSpec:
    dir: str
    strategy_dir: str | None = None
    format: str = "safetensors"
    resume: str = "Latest"
    unified_dir: str | None = None
    conversion: str = "Unify"


@dataclass(frozen=True)
class Deadlines:
    """How long each recovery stage may wait before the status says it is stuck (and what then
    happens: see :mod:`relaunch.controller.reconcile`)."""

    stopping_seconds: int = 300
    planning_seconds: int = 600
    converting_seconds: int = 3600
    starting_seconds: int = 600

    def for_stage(self, stage: str) -> int | None:
        return {
            "Stopping": self.stopping_seconds,
            "Planning": self.planning_seconds,
            "Converting": self.converting_seconds,
            "Starting": self.starting_seconds,
        }.get(stage)


#: Why a gang can fail (``status.lastFailure.reason``); failure rules match these.
FAILURE_REASONS = (
    "WorkerFailed",
    "OOMKilled",
    "Evicted",
    "Preempted",
    "PodDeleted",
    "NodeLost",
    "NodeUnhealthy",
    "NoProgress",
    "StartupTimeout",
)
#: What a failure rule does: restart and count it, restart without counting, or fail the job.
RULE_ACTIONS = ("Restart", "RestartNotCounted", "Fail")


@dataclass(frozen=True)
class FailureRule:
    """One of ``spec.recovery.rules``: matches when every criterion it gives matches."""

    action: str
    exit_codes: frozenset[int] = frozenset()
    reasons: frozenset[str] = frozenset()
    log_pattern: str | None = None

    def matches(self, reason: str, exit_code: int | None, text: str | None) -> bool:
        if self.exit_codes and exit_code not in self.exit_codes:
            return False
        if self.reasons and reason not in self.reasons:
            return False
        return not (self.log_pattern and not re.search(self.log_pattern, text or "", re.MULTILINE))


#: After the user's rules: a disruption by the cluster (eviction, preemption, a node the user
#: marks unhealthy) is not the job's failure and is not counted; a permanent exit code fails.
DEFAULT_RULES = (
    FailureRule("RestartNotCounted", reasons=frozenset({"Evicted", "Preempted", "NodeUnhealthy"})),
)


@dataclass(frozen=True)
class Quarantine:
    """A node where ``failures`` of the job's failures happened within ``window_seconds`` is
    avoided by its next attempts for ``cooldown_seconds``."""

    failures: int = 2
    window_seconds: int = 3600
    cooldown_seconds: int = 1800


@dataclass(frozen=True)
class RecoverySpec:
    max_restarts: int = 10
    backoff_initial_seconds: int = 10
    backoff_max_seconds: int = 300
    node_loss_grace_seconds: int = 30
    permanent_exit_codes: frozenset[int] = frozenset({2})
    deadlines: Deadlines = field(default_factory=Deadlines)
    rules: tuple[FailureRule, ...] = ()
    #: maxRestarts counts the restarts of this many seconds (None: of the job's whole life).
    restart_window_seconds: int | None = None
    quarantine: Quarantine | None = field(default_factory=Quarantine)

    def action_for(self, reason: str, exit_code: int | None, text: str | None) -> tuple[str, str]:
        """The action for a failure and what decided it: the first matching user rule, then a
        permanent exit code, then the default rules, else a counted restart."""
        for number, rule in enumerate(self.rules):
            if rule.matches(reason, exit_code, text):
                return rule.action, f"spec.recovery.rules[{number}]"
        if exit_code is not None and exit_code in self.permanent_exit_codes:
            return "Fail", "spec.recovery.permanentExitCodes"
        for rule in DEFAULT_RULES:
            if rule.matches(reason, exit_code, text):
                return rule.action, "the default rules"
        return "Restart", "the default rules"

    def backoff_seconds(self, restart_number: int) -> float:
        """Delay before the ``restart_number``-th restart (1-based): initial x 2^(n-1), capped."""
        if restart_number < 1 or self.backoff_initial_seconds <= 0:
            return 0.0
        exponent = min(restart_number - 1, 30)  # 2**30 x anything already exceeds any sane cap
        return float(min(self.backoff_initial_seconds * (2**exponent), self.backoff_max_seconds))


#: MindFormers' per-step line (its loss monitor), e.g.
#: ``{ Epoch:[  1/  2], step:[    5/   10], loss: 2.1, per_step_time: 512ms, ...``.
MINDFORMERS_STEP_PATTERN = (
    r"Epoch:\[\s*(?P<epoch>\d+)/\s*(?P<epochs>\d+)\],\s*step:\[\s*(?P<step>\d+)/\s*(?P<steps>\d+)\]"
)


@dataclass(frozen=True)
class ProgressSpec:
    """The progress watchdog: training steps read from worker 0's log."""

    pattern: str = MINDFORMERS_STEP_PATTERN
    startup_seconds: int = 600
    stall_seconds: int = 300
    checkpoint_save_seconds: int = 900
    #: Steps after which a checkpoint is saved (the stall allowance becomes the save allowance);
    #: None: the config's save_checkpoint_steps.
    save_every_steps: int | None = None
    container: str | None = None


@dataclass(frozen=True)
class NodeHealth:
    """What marks a node unhealthy for this job: a taint key, a label value, a condition True."""

    taints: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)
    conditions: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return bool(self.taints or self.labels or self.conditions)


#: spec.elastic.growBackAfterSeconds unless set: long enough that a node rebooting or flapping
#: does not restart the job, short next to a training run.
DEFAULT_GROW_BACK_AFTER_SECONDS = 300


#: spec.elastic.preconvert.intervalSeconds unless set: how often a running job looks for a new
#: checkpoint save in its step lines (spec.progress with a known save interval), or else starts a
#: pre-conversion Job that finds out itself.
DEFAULT_PRECONVERT_INTERVAL_SECONDS = 120


@dataclass(frozen=True)
class PreconvertSpec:
    """Conversion ahead of need (spec.elastic.preconvert): while the gang runs, a low-priority
    helper Job converts each new complete checkpoint for the size the job would resize to next."""

    enabled: bool = False
    #: How many pre-conversions are kept (the newest ones): 1 or 2.
    keep: int = 1
    #: Bytes the kept pre-conversions may take on the checkpoint volume (None: no limit).
    budget_bytes: int | None = None
    #: Bytes per second the pre-conversion may write (None: no bound beyond its idle I/O priority).
    max_write_bytes_per_second: int | None = None
    interval_seconds: int = DEFAULT_PRECONVERT_INTERVAL_SECONDS


@dataclass(frozen=True)
class ElasticSpec:
    min_replicas: int
    valid_sizes: tuple[int, ...] = ()
    #: After a shrink, how long enough nodes must have been Ready before the job grows back
    #: towards spec.replicas; 0 switches grow-back off (the job stays at its shrunk size).
    grow_back_after_seconds: int = DEFAULT_GROW_BACK_AFTER_SECONDS
    preconvert: PreconvertSpec = field(default_factory=PreconvertSpec)

    def sizes(self, replicas: int) -> tuple[int, ...]:
        """The worker counts the job may run at: validSizes, else every size from minReplicas."""
        return self.valid_sizes or tuple(range(self.min_replicas, replicas + 1))


#: Resources of the planning and conversion pods unless spec.helpers says otherwise. Requests
#: only where a limit could cut a legitimate run short: a conversion holds the largest tensor
#: in memory, and no default knows the largest tensor of a model.
DEFAULT_PLANNING_RESOURCES: Mapping[str, Any] = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"memory": "1Gi"},
}
DEFAULT_CONVERSION_RESOURCES: Mapping[str, Any] = {"requests": {"cpu": "1", "memory": "1Gi"}}


@dataclass(frozen=True)
class HelperSpec:
    """The planning and conversion pods' resources (a container's ``resources``)."""

    planning_resources: Mapping[str, Any] = field(default_factory=lambda: DEFAULT_PLANNING_RESOURCES)
    conversion_resources: Mapping[str, Any] = field(default_factory=lambda: DEFAULT_CONVERSION_RESOURCES)


@dataclass(frozen=True)
class TrainingJobSpec:
    replicas: int
    template: Mapping[str, Any]
    checkpoint: CheckpointSpec
    config: ConfigSource | None = None
    ranks_per_worker: int = 1
    elastic: ElasticSpec | None = None
    recovery: RecoverySpec = field(default_factory=RecoverySpec)
    image: str | None = None
    helpers: HelperSpec = field(default_factory=HelperSpec)
    progress: ProgressSpec | None = None
    node_health: NodeHealth = field(default_factory=NodeHealth)
    #: No worker (nor helper) may run: set by the user or a queue (Kueue admits and preempts
    #: through it); the operator only reads it.
    suspend: bool = False

    @property
    def world_size(self) -> int:
        return self.replicas * self.ranks_per_worker

    def restart_hash(self, config_text: str | None) -> str:
        """Fingerprint of what a running gang was started with, apart from its size.

        A change (new dataset in the config, new image in the template) means a controlled
        restart from the latest checkpoint; recovery settings are deliberately left out.
        """
        payload = {
            "template": self.template,
            "config": config_text,
            "ranksPerWorker": self.ranks_per_worker,
            "checkpoint": [
                self.checkpoint.dir,
                self.checkpoint.format,
                self.checkpoint.strategy_dir,
                self.checkpoint.unified_dir,
            ],
            "mountPath": self.config.mount_path if self.config else None,
        }
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


#: What a TrainingJob's name must be: it names the headless Service (a DNS-1035 label) and,
#: with ``-<attempt>-<index>`` appended, every worker's hostname (a DNS label of at most 63).
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = 40


def check_name(name: str) -> None:
    """Raise :class:`SpecError` for a name the objects derived from it cannot carry (the CRD
    refuses such names at apply time; this catches jobs created under an older CRD)."""
    if not NAME_PATTERN.match(name or ""):
        raise SpecError(
            f"metadata.name {name!r} cannot name the job's Service and worker hostnames: it must be "
            "lowercase letters, digits and '-', start with a letter and end with a letter or digit "
            "(no dots)"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise SpecError(
            f"metadata.name {name!r} is {len(name)} characters; at most {MAX_NAME_LENGTH} leave room for "
            "the attempt and index suffixes of worker hostnames (63 at most)"
        )


def _int(value: Any, path: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{path} must be an integer, found {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{path} must be >= {minimum}, found {value}")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{path} must be a non-empty string, found {value!r}")
    return value


def _map(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{path} must be an object, found {type(value).__name__}")
    return value


def parse_spec(spec: Mapping[str, Any]) -> TrainingJobSpec:
    """Parse ``spec`` of a TrainingJob body; raise :class:`SpecError` naming the bad field."""
    spec = _map(spec, "spec")
    replicas = _int(spec.get("replicas"), "spec.replicas", minimum=1)
    ranks_per_worker = _int(spec.get("ranksPerWorker", 1), "spec.ranksPerWorker", minimum=1)

    template = _map(spec.get("template"), "spec.template")
    containers = _map(template.get("spec"), "spec.template.spec").get("containers")
    if not isinstance(containers, list) or not containers:
        raise SpecError("spec.template.spec.containers must list at least one container")

    ckpt = _map(spec.get("checkpoint"), "spec.checkpoint")
    resume = ckpt.get("resume", "Latest")
    checkpoint = CheckpointSpec(
        dir=_str(ckpt.get("dir"), "spec.checkpoint.dir"),
        strategy_dir=ckpt.get("strategyDir"),
        format=ckpt.get("format", "safetensors"),
        resume=_str(resume, "spec.checkpoint.resume"),
        unified_dir=ckpt.get("unifiedDir"),
        conversion=ckpt.get("conversion", "Unify"),
    )
    if checkpoint.format not in ("safetensors", "ckpt"):
        raise SpecError(f"spec.checkpoint.format must be safetensors or ckpt, found {checkpoint.format!r}")
    if checkpoint.resume == "Unified" and not checkpoint.unified_dir:
        raise SpecError("spec.checkpoint.unifiedDir is required when spec.checkpoint.resume is Unified")

    config: ConfigSource | None = None
    if "config" in spec:
        cfg = _map(spec["config"], "spec.config")
        given = [k for k in ("text", "inline", "configMapRef") if cfg.get(k) is not None]
        if len(given) != 1:
            raise SpecError(f"spec.config needs exactly one of text, inline, configMapRef; found {given}")
        ref = _map(cfg.get("configMapRef"), "spec.config.configMapRef")
        config = ConfigSource(
            text=cfg.get("text"),
            inline=cfg.get("inline"),
            config_map=_str(ref.get("name"), "spec.config.configMapRef.name") if ref else None,
            config_map_key=ref.get("key", DEFAULT_CONFIG_KEY) if ref else DEFAULT_CONFIG_KEY,
            mount_path=cfg.get("mountPath", DEFAULT_MOUNT_PATH),
        )

    rec = _map(spec.get("recovery"), "spec.recovery")
    backoff = _map(rec.get("backoff"), "spec.recovery.backoff")
    dl = _map(rec.get("deadlines"), "spec.recovery.deadlines")
    defaults = Deadlines()
    deadlines = Deadlines(
        **{
            attr: _int(dl.get(key, getattr(defaults, attr)), f"spec.recovery.deadlines.{key}", minimum=1)
            for attr, key in (
                ("stopping_seconds", "stoppingSeconds"),
                ("planning_seconds", "planningSeconds"),
                ("converting_seconds", "convertingSeconds"),
                ("starting_seconds", "startingSeconds"),
            )
        }
    )
    recovery = RecoverySpec(
        max_restarts=_int(rec.get("maxRestarts", 10), "spec.recovery.maxRestarts", minimum=0),
        backoff_initial_seconds=_int(
            backoff.get("initialSeconds", 10), "spec.recovery.backoff.initialSeconds", minimum=0
        ),
        backoff_max_seconds=_int(
            backoff.get("maxSeconds", 300), "spec.recovery.backoff.maxSeconds", minimum=0
        ),
        node_loss_grace_seconds=_int(
            rec.get("nodeLossGraceSeconds", 30), "spec.recovery.nodeLossGraceSeconds", minimum=1
        ),
        permanent_exit_codes=frozenset(
            _int(c, "spec.recovery.permanentExitCodes[]") for c in rec.get("permanentExitCodes", [2])
        ),
        deadlines=deadlines,
        rules=tuple(_rule(r, f"spec.recovery.rules[{i}]") for i, r in enumerate(rec.get("rules") or [])),
        restart_window_seconds=(
            _int(rec["restartWindowSeconds"], "spec.recovery.restartWindowSeconds", minimum=1)
            if rec.get("restartWindowSeconds") is not None
            else None
        ),
        quarantine=_quarantine(_map(rec.get("quarantine"), "spec.recovery.quarantine")),
    )
    if recovery.backoff_initial_seconds > recovery.backoff_max_seconds:
        raise SpecError(
            f"spec.recovery.backoff.initialSeconds ({recovery.backoff_initial_seconds}) must be <= "
            f"spec.recovery.backoff.maxSeconds ({recovery.backoff_max_seconds})"
        )

    hl = _map(spec.get("helpers"), "spec.helpers")
    helpers = HelperSpec(
        planning_resources=_map(
            _map(hl.get("planning"), "spec.helpers.planning").get("resources", DEFAULT_PLANNING_RESOURCES),
            "spec.helpers.planning.resources",
        ),
        conversion_resources=_map(
            _map(hl.get("conversion"), "spec.helpers.conversion").get(
                "resources", DEFAULT_CONVERSION_RESOURCES
            ),
            "spec.helpers.conversion.resources",
        ),
    )

    elastic: ElasticSpec | None = None
    if spec.get("elastic") is not None:
        el = _map(spec["elastic"], "spec.elastic")
        min_replicas = _int(el.get("minReplicas", replicas), "spec.elastic.minReplicas", minimum=1)
        if min_replicas > replicas:
            raise SpecError(
                f"spec.elastic.minReplicas ({min_replicas}) must be <= spec.replicas ({replicas})"
            )
        sizes = tuple(
            sorted({_int(s, "spec.elastic.validSizes[]", minimum=1) for s in el.get("validSizes", [])})
        )
        for size in sizes:
            if not min_replicas <= size <= replicas:
                raise SpecError(
                    f"spec.elastic.validSizes entry {size} lies outside [{min_replicas}, {replicas}]"
                )
        elastic = ElasticSpec(
            min_replicas=min_replicas,
            valid_sizes=sizes,
            grow_back_after_seconds=_int(
                el.get("growBackAfterSeconds", DEFAULT_GROW_BACK_AFTER_SECONDS),
                "spec.elastic.growBackAfterSeconds",
                minimum=0,
            ),
            preconvert=_preconvert(_map(el.get("preconvert"), "spec.elastic.preconvert"), checkpoint),
        )

    progress: ProgressSpec | None = None
    if spec.get("progress") is not None:
        pr = _map(spec["progress"], "spec.progress")
        pattern = pr.get("pattern", MINDFORMERS_STEP_PATTERN)
        try:
            compiled = re.compile(_str(pattern, "spec.progress.pattern"))
        except re.error as exc:
            raise SpecError(f"spec.progress.pattern is not a regular expression: {exc}") from exc
        if "step" not in compiled.groupindex:
            raise SpecError("spec.progress.pattern needs a named group (?P<step>...) for the step number")
        save_every = pr.get("saveEverySteps")
        progress = ProgressSpec(
            pattern=pattern,
            startup_seconds=_int(pr.get("startupSeconds", 600), "spec.progress.startupSeconds", minimum=1),
            stall_seconds=_int(pr.get("stallSeconds", 300), "spec.progress.stallSeconds", minimum=1),
            checkpoint_save_seconds=_int(
                pr.get("checkpointSaveSeconds", 900), "spec.progress.checkpointSaveSeconds", minimum=1
            ),
            save_every_steps=(
                _int(save_every, "spec.progress.saveEverySteps", minimum=1)
                if save_every is not None
                else None
            ),
            container=pr.get("container"),
        )
    nh = _map(spec.get("nodeHealth"), "spec.nodeHealth")
    node_health = NodeHealth(
        taints=frozenset(_str(t, "spec.nodeHealth.taints[]") for t in nh.get("taints") or []),
        labels={str(k): str(v) for k, v in _map(nh.get("labels"), "spec.nodeHealth.labels").items()},
        conditions=frozenset(_str(c, "spec.nodeHealth.conditions[]") for c in nh.get("conditions") or []),
    )

    suspend = spec.get("suspend", False)
    if not isinstance(suspend, bool):
        raise SpecError(f"spec.suspend must be true or false, found {suspend!r}")

    image = spec.get("image")
    return TrainingJobSpec(
        replicas=replicas,
        template=template,
        checkpoint=checkpoint,
        config=config,
        ranks_per_worker=ranks_per_worker,
        elastic=elastic,
        recovery=recovery,
        image=image if isinstance(image, str) and image else None,
        helpers=helpers,
        progress=progress,
        node_health=node_health,
        suspend=suspend,
    )


def _rule(value: Any, path: str) -> FailureRule:
    rule = _map(value, path)
    action = rule.get("action")
    if action not in RULE_ACTIONS:
        raise SpecError(f"{path}.action must be one of {', '.join(RULE_ACTIONS)}, found {action!r}")
    reasons = frozenset(_str(r, f"{path}.reasons[]") for r in rule.get("reasons") or [])
    unknown = sorted(reasons - set(FAILURE_REASONS))
    if unknown:
        raise SpecError(f"{path}.reasons has {unknown}; known reasons: {', '.join(FAILURE_REASONS)}")
    pattern = rule.get("logPattern")
    if pattern is not None:
        try:
            re.compile(_str(pattern, f"{path}.logPattern"))
        except re.error as exc:
            raise SpecError(f"{path}.logPattern is not a regular expression: {exc}") from exc
    codes = frozenset(_int(c, f"{path}.exitCodes[]") for c in rule.get("exitCodes") or [])
    if not (codes or reasons or pattern):
        raise SpecError(f"{path} matches every failure: give exitCodes, reasons or logPattern")
    return FailureRule(action, codes, reasons, pattern)


def _preconvert(pc: Mapping[str, Any], checkpoint: CheckpointSpec) -> PreconvertSpec:
    path = "spec.elastic.preconvert"
    enabled = pc.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SpecError(f"{path}.enabled must be true or false, found {enabled!r}")
    keep = _int(pc.get("keep", 1), f"{path}.keep", minimum=1)
    if keep > 2:
        raise SpecError(f"{path}.keep must be 1 or 2 (the newest pre-conversions kept), found {keep}")
    budget = pc.get("budgetBytes")
    rate = pc.get("maxWriteBytesPerSecond")
    spec = PreconvertSpec(
        enabled=enabled,
        keep=keep,
        budget_bytes=_int(budget, f"{path}.budgetBytes", minimum=1) if budget is not None else None,
        max_write_bytes_per_second=(
            _int(rate, f"{path}.maxWriteBytesPerSecond", minimum=1) if rate is not None else None
        ),
        interval_seconds=_int(
            pc.get("intervalSeconds", DEFAULT_PRECONVERT_INTERVAL_SECONDS),
            f"{path}.intervalSeconds",
            minimum=1,
        ),
    )
    if enabled:
        if not checkpoint.strategy_dir:
            raise SpecError(
                f"{path}.enabled needs spec.checkpoint.strategyDir: a conversion reads the source strategy "
                "files; set it, or turn pre-conversion off"
            )
        if checkpoint.format != "safetensors":
            raise SpecError(
                f"{path}.enabled needs spec.checkpoint.format safetensors (relaunch converts safetensors "
                f"only), found {checkpoint.format!r}"
            )
        if checkpoint.resume != "Latest":
            raise SpecError(
                f"{path}.enabled needs spec.checkpoint.resume Latest: pre-conversion prepares the newest "
                f"complete step, which a pinned step or unified weights ({checkpoint.resume!r}) never load"
            )
    return spec


def _quarantine(q: Mapping[str, Any]) -> Quarantine | None:
    if q.get("enabled") is False:
        return None
    defaults = Quarantine()
    return Quarantine(
        failures=_int(q.get("failures", defaults.failures), "spec.recovery.quarantine.failures", minimum=1),
        window_seconds=_int(
            q.get("windowSeconds", defaults.window_seconds),
            "spec.recovery.quarantine.windowSeconds",
            minimum=1,
        ),
        cooldown_seconds=_int(
            q.get("cooldownSeconds", defaults.cooldown_seconds),
            "spec.recovery.quarantine.cooldownSeconds",
            minimum=1,
        ),
    )
