"""The TrainingJob state machine, as one pure function: :func:`reconcile`.

Given the parsed spec, the current ``status``, what the cluster shows (:class:`Observed`) and the
time, it returns the actions to take (create/delete objects), the new status, the Events to
emit after the status is written, and when to look again. It performs no I/O, so every path is
unit-tested, and it is level-triggered: the same inputs give the same answer, which is what
makes an operator restart in the middle of a recovery safe.

Life of a job::

    (new) --> recovery "Created" --> Running --failure--> recovery --> Running ... --> Succeeded
                                                      \\--> Failed (permanent exit code, restarts
                                                           exhausted, plan/convert/config failed)
    any phase but Succeeded/Failed --spec.suspend--> Suspended --cleared--> recovery "Resumed"
    any phase but Succeeded/Failed --Kueue: not admitted, evicted--> Queued --admitted--> recovery "Resumed"

Recovery reasons: a failure (``WorkerFailed``, ``OOMKilled``, ``Evicted``, ``PodDeleted``,
``NodeLost``; counted as a restart, with backoff) or a controlled restart, never counted:
``Created`` (first start), ``ReplicasChanged``, ``ConfigChanged`` (config or template edited:
incremental training), ``Shrink`` (elastic: workers unschedulable for the grace period),
``GrowBack`` (elastic: after a shrink, more nodes Ready for spec.elastic.growBackAfterSeconds),
``SpecChanged`` (the spec of a Succeeded or Failed job was edited: it continues) and
``Resumed`` (``spec.suspend`` was cleared: resume from the newest complete checkpoint, converting
when ``spec.replicas`` changed meanwhile).

A job labelled with a Kueue queue (:mod:`relaunch.controller.kueue`) is held the same way while
its Workload is not admitted or has been evicted (phase Queued, the Admitted condition in Kueue's
words, supersededBy Preempted/Evicted/WaitingForAdmission), and after each round the Workload is
kept in step: created, finished, deactivated, replaced, or its quota given back once the gang stopped.

``spec.suspend`` (set by the user, or by a queue that drives jobs through it) is obeyed
in the round that first sees it, whatever the job is doing: every worker is deleted gracefully
(SIGTERM and the pods' grace period), unfinished planning and conversion Jobs are deleted (an
interrupted conversion leaves an incomplete destination, which later plans never load), and an
interrupted recovery goes to the history as superseded by ``Suspended``. Nothing is counted, no
backoff is kept, and the operator never writes ``spec.suspend`` itself. A job created suspended
creates nothing until it is cleared.

A recovery (``status.recovery``) moves through stages, each recorded before the next begins:

    Stopping   delete every worker of older attempts (force-delete those on lost nodes) and
               wait until none is left, so nothing writes checkpoints while we scan
    Planning   the Job ``<job>-plan-<attempt>`` runs ``relaunch plan`` on the job's volumes;
               its termination message (compact JSON) is stored in ``status.recovery.plan``
    Converting only when the plan says so: the Job ``<job>-convert-<attempt>``
    Starting   after the backoff: ConfigMap ``<job>-config-<attempt>`` (rendered config), the
               headless Service and the worker pods; ``status.attempt`` advances in the same
               status write; the recovery ends when every worker runs

Restarts are counted when a failure starts a recovery (in the same status write), never for
controlled restarts (``spec.replicas`` or configuration edits).

The caller applies :class:`Create` actions before writing the new status and :class:`DeletePod`
actions after it, so a crash at any point either repeats a create (409: done) or finds the
reason for a deletion already recorded.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, cast

from relaunch import config as config_mod
from relaunch import preconvert, resources
from relaunch.controller import kueue
from relaunch.controller.status import (
    CheckpointRef,
    Condition,
    JobStatus,
    LastFailure,
    Preconversion,
    Preconverted,
    Progress,
    QuarantinedNode,
    Recovery,
    RecoveryRecord,
)
from relaunch.model import NodeHealth, SpecError, TrainingJobSpec

HISTORY_LIMIT = 20
#: How long to sleep when nothing but an event can change the answer; events wake us earlier.
IDLE_REQUEUE_SECONDS = 30.0
#: While waiting for something the watches may miss (a ConfigMap edit), look this often.
POLL_SECONDS = 10.0

PENDING, RUNNING, RECOVERING, CONVERTING, SUSPENDED, QUEUED, SUCCEEDED, FAILED = (
    "Pending",
    "Running",
    "Recovering",
    "Converting",
    "Suspended",
    "Queued",
    "Succeeded",
    "Failed",
)
STOPPING, PLANNING, STAGE_CONVERTING, STARTING = "Stopping", "Planning", "Converting", "Starting"

#: Recovery reasons that are not failures (not counted as restarts, no backoff).
CONTROLLED_REASONS = frozenset(
    {"Created", "ReplicasChanged", "ConfigChanged", "Shrink", "GrowBack", "SpecChanged", "Resumed"}
)


# ----------------------------------------------------------------------------------------------
# What the cluster shows


@dataclass(frozen=True)
class PodView:
    name: str
    attempt: int
    index: int
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    node: str | None = None
    deleting: bool = False
    exit_code: int | None = None
    reason: str | None = None  # OOMKilled, Error, Evicted, ...
    message: str | None = None
    finished_at: float | None = None
    unschedulable_since: float | None = None  # PodScheduled=False (Unschedulable) since
    unschedulable_message: str | None = None  # the scheduler's words ("0/3 nodes are available: ...")
    waiting_reason: str | None = None  # a container's waiting reason (ErrImagePull, ...)
    waiting_message: str | None = None  # the kubelet's words about it
    disruption: str | None = None  # DisruptionTarget=True's reason (PreemptionByScheduler, ...)


#: Container waiting reasons that mean a pod will not start by itself soon: the kubelet's words
#: are shown at once instead of "starting" for as long as the stage deadline.
NOT_STARTING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class HelperJobView:
    """A planning or conversion Job, with what its (newest) pod shows."""

    name: str
    succeeded: bool = False
    failed: bool = False  # the Job failed (its Failed or FailureTarget condition)
    message: str | None = None  # the pod's termination message
    exit_code: int | None = None
    pod: str | None = None  # the pod that explains the Job: the one that ran last
    node: str | None = None
    pod_reason: str | None = None  # DeadlineExceeded, OOMKilled, Evicted, ...
    unschedulable_message: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None

    @property
    def killed(self) -> bool:
        """The pod was stopped from outside before it could report (worth another try)."""
        if self.pod_reason in ("DeadlineExceeded", "OOMKilled", "Evicted"):
            return True
        return self.exit_code is None or self.exit_code >= 128

    def failure_text(self, deadline_hint: str) -> str:
        if self.pod_reason == "DeadlineExceeded":
            return f"ran past its deadline ({deadline_hint})"
        if self.pod_reason == "OOMKilled":
            return "was killed for exceeding its memory limit (spec.helpers resources)"
        if self.pod_reason == "Evicted":
            return "was evicted"
        if self.exit_code is not None and self.exit_code >= 128:
            return f"was killed by signal {self.exit_code - 128} (exit code {self.exit_code})"
        if self.exit_code is None:
            return "failed before its pod reported an exit code"
        return f"exited with code {self.exit_code} and reported nothing"


@dataclass(frozen=True)
class ForeignObject:
    """An object carrying this job's name label but owned by another TrainingJob (a namesake
    deleted and re-created under the same name): never adopted, removed before we go on."""

    kind: str  # Pod | Job
    name: str
    deleting: bool = False


@dataclass(frozen=True)
class NodeView:
    name: str
    ready: bool | None = True  # Ready condition: True / False / None (Unknown or absent)
    not_ready_since: float | None = None
    last_heartbeat: float | None = None  # the node Lease's renewTime
    taints: frozenset[str] = frozenset()  # taint keys
    labels: Mapping[str, str] = field(default_factory=dict)
    true_conditions: frozenset[str] = frozenset()  # condition types other than Ready that are True
    ready_since: float | None = None  # Ready's lastTransitionTime while it is True
    unschedulable: bool = False  # spec.unschedulable (cordoned)
    heartbeat_interval: float | None = None  # seconds between the Lease's last two renewals


#: A heartbeat counts as missed only this many renew intervals after the last one, whatever the
#: grace: a kubelet renews its Lease every 10 s, so a shorter grace would take healthy nodes for lost.
HEARTBEAT_SLACK = 1.5


@dataclass(frozen=True)
class ProgressView:
    """Training progress read from worker 0's log (spec.progress): the newest step line."""

    attempt: int
    global_step: int
    step: int
    epoch: int | None = None
    at: float = 0.0  # when the step line was printed


@dataclass(frozen=True)
class Observed:
    pods: tuple[PodView, ...] = ()
    jobs: Mapping[str, HelperJobView] = field(default_factory=dict)
    #: Every node the cluster has, or None while the node watch has not synced yet (then node
    #: loss cannot be judged and is not).
    nodes: Mapping[str, NodeView] | None = None
    config_text: str | None = None
    config_error: str | None = None
    foreign: tuple[ForeignObject, ...] = ()
    #: The newest step of the current attempt (None: no step line seen yet, or no watchdog).
    progress: ProgressView | None = None
    #: The job's Kueue queue and Workload (None: the job carries no queue-name label).
    queue: kueue.QueueView | None = None


# ----------------------------------------------------------------------------------------------
# What to do


@dataclass(frozen=True)
class Create:
    manifest: dict[str, Any]


@dataclass(frozen=True)
class DeletePod:
    name: str
    force: bool = False  # grace period 0: the pod's node is gone and will never confirm


@dataclass(frozen=True)
class DeleteJob:
    """Delete a helper Job (and, in the background, its pods)."""

    name: str


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = Create | DeletePod | DeleteJob | kueue.PatchWorkload | kueue.DeleteWorkload


@dataclass
class Result:
    actions: list[Action]
    status: JobStatus
    events: list[Event]
    requeue_after: float
    completed_recovery: RecoveryRecord | None = None  # the history entry, for metrics
    conversion_report: str | None = None  # the conversion Job's termination message


# ----------------------------------------------------------------------------------------------
# When the API server says no


#: Ready-condition reasons written for an API problem (cleared by the next round that gets on).
API_PROBLEM_REASONS = frozenset({"CreateRefused", "DeleteRefused", "Throttled", "WaitingForPredecessor"})


@dataclass(frozen=True)
class ApiProblem:
    """An action the API server did not carry out: refused (4xx), throttled or unavailable
    (429, 5xx), or blocked by a namesake's leftover (409 on an object another job owns)."""

    verb: str  # create | delete
    kind: str
    name: str
    code: int
    message: str  # the server's own words
    retry_after: float | None = None  # what the server asked for (Retry-After), if anything

    @property
    def reason(self) -> str:
        if self.code == 409:
            return "WaitingForPredecessor"
        if self.code == 429 or self.code >= 500:
            return "Throttled"
        return "DeleteRefused" if self.verb == "delete" else "CreateRefused"

    @property
    def describe(self) -> str:
        if self.code == 409:
            return (
                f"{self.kind} {self.name} belongs to an earlier TrainingJob of the same name; waiting for "
                f"it to go ({self.message})"
            )
        return (
            f"{self.verb} {self.kind} {self.name}: the API server answered HTTP {self.code}: {self.message}"
        )


def api_problem_status(
    status: Mapping[str, Any], problem: ApiProblem, now: float, generation: int | None
) -> JobStatus:
    """The status to write when a round's actions were not carried out: the status as it was
    (nothing it would have recorded happened), with the problem in ``message`` and the Ready
    condition. The next round decides the same actions again (level-triggered) and retries them."""
    st = cast(JobStatus, copy.deepcopy(dict(status)))
    st["message"] = f"{problem.reason}: {problem.describe}; retrying with backoff"
    set_condition(st, "Ready", False, problem.reason, st["message"], now, generation)
    return st


# ----------------------------------------------------------------------------------------------
# The bridge to planning (injected, so the state machine stays pure and testable)


@dataclass(frozen=True)
class PlanOutcome:
    action: Literal["fresh", "resume", "convert", "fail"]
    message: str = ""
    reason: str = ""  # CamelCase cause for a "fail" (Failed condition reason)
    step: int | None = None
    epoch: int | None = None
    file: str | None = None
    ranks: int | None = None
    kind: str | None = None
    convert_command: tuple[str, ...] | None = None
    conversion_record: str | None = None  # JSON of the conversion, passed to later plans
    detail: Any = None  # the plan object itself, for rendering


class Planner(Protocol):
    def plan_command(
        self,
        spec: TrainingJobSpec,
        *,
        reason: str,
        world_size: int,
        previous_world_size: int | None,
        last_conversion: str | None,
        config_text: str | None,
    ) -> list[str]: ...

    def interpret(self, message: str) -> PlanOutcome: ...

    def render(self, text: str, outcome: PlanOutcome, spec: TrainingJobSpec) -> str: ...

    def factorable(self, world_size: int, config_text: str | None) -> bool: ...


# ----------------------------------------------------------------------------------------------
# Helpers


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_precise(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def set_condition(
    status: JobStatus,
    type_: str,
    state: bool,
    reason: str,
    message: str,
    now: float,
    generation: int | None,
) -> None:
    """Set one condition (keyed by type), keeping lastTransitionTime when the status is unchanged."""
    value = "True" if state else "False"
    conditions: list[Condition] = [Condition(**c) for c in status.get("conditions") or []]
    old = next((c for c in conditions if c.get("type") == type_), None)
    new: Condition = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"]
        if old and old.get("status") == value and old.get("lastTransitionTime")
        else iso(now),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    conditions = [c for c in conditions if c.get("type") != type_] + [new]
    order = {"Ready": 0, "Recovering": 1, "Converting": 2, "Suspended": 3, "Failed": 4}
    conditions.sort(key=lambda c: order.get(c.get("type", ""), 9))
    status["conditions"] = conditions


def node_lost_at(node: NodeView | None, grace: float) -> float | None:
    """When the node counts as lost (a time; maybe in the future), or None if it is healthy.

    A deleted node is lost at once. Otherwise the earlier of: heartbeat (Lease) older than the
    grace period (and than 1.5 of the node's own renew interval, as observed), Ready condition not
    True for the grace period.
    """
    if node is None:
        return float("-inf")
    times = []
    if node.last_heartbeat is not None:
        silence = max(grace, HEARTBEAT_SLACK * (node.heartbeat_interval or 0.0))
        times.append(node.last_heartbeat + silence)
    if node.ready is not True and node.not_ready_since is not None:
        times.append(node.not_ready_since + grace)
    return min(times) if times else None


@dataclass(frozen=True)
class Failure:
    reason: str  # one of relaunch.model.FAILURE_REASONS
    message: str
    pod: str
    node: str | None = None
    exit_code: int | None = None
    action: str = "Restart"  # what spec.recovery's rules say: Restart | RestartNotCounted | Fail
    decided_by: str = "the default rules"

    @property
    def permanent(self) -> bool:
        return self.action == "Fail"

    def as_status(self, now: float) -> LastFailure:
        out: LastFailure = {
            "reason": self.reason,
            "message": self.message,
            "pod": self.pod,
            "at": iso(now),
        }
        if self.node:
            out["node"] = self.node
        if self.exit_code is not None:
            out["exitCode"] = self.exit_code
        return out


def detect_failure(
    pods: Sequence[PodView],
    expected: int,
    nodes: Mapping[str, NodeView] | None,
    spec: TrainingJobSpec,
    now: float,
) -> tuple[Failure | None, float | None]:
    """The failure to act on among the current attempt's pods (or None), and when to look again.

    Order of precedence: a permanent exit code (retrying cannot help), a lost node, the worker
    that failed first (the others usually fail *because* of it), a deleted or missing pod.
    ``finishedAt`` has whole-second precision, so failures in the same second are ordered by
    cause: a worker killed from outside (a signal, OOMKilled, Evicted) before one that exited
    with an error of its own, which is most often its reaction to the killed peer.
    """
    grace = float(spec.recovery.node_loss_grace_seconds)
    failed: list[tuple[float, int, Failure]] = []
    node_lost: Failure | None = None
    deleted: Failure | None = None
    wake: float | None = None
    for pod in sorted(pods, key=lambda p: p.index):
        if pod.phase == "Failed":
            if pod.disruption == "PreemptionByScheduler":
                reason, text = "Preempted", f"worker {pod.name} was preempted by a higher-priority pod"
            elif pod.reason == "OOMKilled":
                reason, text = "OOMKilled", f"worker {pod.name} was killed for exceeding its memory limit"
            elif pod.reason == "Evicted" or pod.disruption is not None:
                reason = "Evicted"
                text = f"worker {pod.name} was evicted: {pod.message or pod.disruption or 'no message'}"
            else:
                reason = "WorkerFailed"
                text = f"worker {pod.name} exited with code {pod.exit_code}" + (
                    f" ({pod.reason})" if pod.reason and pod.reason != "Error" else ""
                )
            failure = ruled(Failure(reason, text, pod.name, pod.node, pod.exit_code), spec, pod.message)
            killed = reason != "WorkerFailed" or (pod.exit_code is not None and pod.exit_code >= 128)
            failed.append(
                (pod.finished_at if pod.finished_at is not None else now, 0 if killed else 1, failure)
            )
            continue
        if pod.phase == "Succeeded":
            continue
        if pod.node and nodes is not None and node_lost is None:
            lost_at = node_lost_at(nodes.get(pod.node), grace)
            if lost_at is not None and lost_at <= now:
                gone = pod.node not in nodes
                node_lost = Failure(
                    "NodeLost",
                    f"node {pod.node} of worker {pod.name} "
                    + ("was deleted" if gone else f"has been unreachable for more than {grace:g}s"),
                    pod.name,
                    pod.node,
                )
            elif lost_at is not None:
                wake = lost_at if wake is None else min(wake, lost_at)
        if pod.deleting and deleted is None:
            if pod.disruption == "PreemptionByScheduler":
                deleted = Failure("Preempted", f"worker {pod.name} was preempted", pod.name, pod.node)
            elif pod.disruption is not None:
                deleted = Failure(
                    "Evicted", f"worker {pod.name} is being evicted ({pod.disruption})", pod.name, pod.node
                )
            else:
                deleted = Failure("PodDeleted", f"worker {pod.name} is being deleted", pod.name, pod.node)
    present = {p.index for p in pods}
    missing = [i for i in range(expected) if i not in present]
    if missing and deleted is None:
        deleted = Failure("PodDeleted", f"worker index {missing[0]} disappeared", f"index-{missing[0]}")
    permanent_failures = [f for _, _, f in failed if f.permanent]
    if permanent_failures:
        return permanent_failures[0], wake
    if node_lost:
        return ruled(node_lost, spec, None), wake
    if failed:
        return min(failed, key=lambda item: item[:2])[2], wake
    return (ruled(deleted, spec, None) if deleted else None), wake


def ruled(failure: Failure, spec: TrainingJobSpec, text: str | None) -> Failure:
    """The failure with the action spec.recovery's rules give it (``text``: the failed container's
    termination message, which log patterns are matched against)."""
    action, decided_by = spec.recovery.action_for(failure.reason, failure.exit_code, text)
    message = failure.message
    if action == "Fail":
        message += f"; {decided_by} marks this as not worth retrying"
    elif action == "RestartNotCounted":
        message += " (not counted as a restart)"
    return replace(failure, action=action, decided_by=decided_by, message=message)


# ----------------------------------------------------------------------------------------------
# The state machine


@dataclass
class _Round:
    """Mutable working state of one reconcile call."""

    ref: resources.JobRef
    spec: TrainingJobSpec
    generation: int | None
    observed: Observed
    now: float
    planner: Planner
    status: JobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue: float = IDLE_REQUEUE_SECONDS
    completed: RecoveryRecord | None = None
    conversion_report: str | None = None

    def wake_in(self, seconds: float) -> None:
        self.requeue = max(0.05, min(self.requeue, seconds))

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def condition(self, type_: str, state: bool, reason: str, message: str) -> None:
        set_condition(self.status, type_, state, reason, message, self.now, self.generation)

    def notice(self, reason: str, message: str) -> None:
        """Say what the job waits for: the status message, the Ready condition's reason, and a
        Warning Event when the message is new (messages carry no countdowns, so a wait that
        does not change posts one Event, not one per round)."""
        if self.status.get("message") != message:
            self.event("Warning", reason, message)
        self.status["message"] = message
        self.condition("Ready", False, reason, message)

    def past_deadline(self, rec: Recovery, awaiting: str) -> bool:
        """Whether the stage is past its deadline (spec.recovery.deadlines); if so the Stalled
        condition (and one Event) says what it waits for. Otherwise wake up at the deadline."""
        stage = str(rec.get("stage"))
        deadline = self.spec.recovery.deadlines.for_stage(stage)
        if deadline is None:
            return False
        started = parse_time(rec.get("stageStartedAt")) or self.now
        if self.now < started + deadline:
            self.wake_in(started + deadline - self.now)
            return False
        reason = f"{stage}DeadlineExceeded"
        message = (
            f"{stage} has taken more than {deadline}s "
            f"(spec.recovery.deadlines.{stage[0].lower()}{stage[1:]}Seconds): {awaiting}"
        )
        old = next((c for c in self.status.get("conditions") or [] if c.get("type") == "Stalled"), None)
        if not (old and old.get("status") == "True" and old.get("message") == message):
            self.event("Warning", reason, message)
        self.condition("Stalled", True, reason, message)
        return True


def reconcile(
    ref: resources.JobRef,
    spec: TrainingJobSpec | SpecError,
    generation: int | None,
    status: Mapping[str, Any] | None,
    observed: Observed,
    now: float,
    planner: Planner,
) -> Result:
    """One level-triggered round: see the module docstring."""
    st = cast(JobStatus, copy.deepcopy(dict(status or {})))
    if isinstance(spec, SpecError):
        if st.get("phase") != FAILED:
            st["phase"] = FAILED
            st["finishedGeneration"] = generation
            st["message"] = f"invalid spec: {spec}"
            set_condition(st, "Failed", True, "InvalidSpec", str(spec), now, generation)
            set_condition(st, "Ready", False, "InvalidSpec", str(spec), now, generation)
            return Result([], st, [Event("Warning", "InvalidSpec", str(spec))], IDLE_REQUEUE_SECONDS)
        return Result([], st, [], IDLE_REQUEUE_SECONDS)

    r = _Round(ref, spec, generation, observed, now, planner, st)
    if generation is not None:
        st["observedGeneration"] = generation
    phase = st.get("phase")
    finished_generation = st.get("finishedGeneration")
    if (
        phase in (SUCCEEDED, FAILED)
        and not spec.suspend  # a finished job stays finished while suspended
        and generation is not None
        and finished_generation is not None
        and generation > finished_generation
    ):
        # The user edited a finished job: a fixed config or pinned step after a failure (with a
        # fresh restart budget), or more epochs / a new dataset after success. Either way it
        # continues from the latest checkpoint.
        st.pop("finishedGeneration", None)
        if phase == FAILED:
            st["restarts"] = 0
            r.condition("Failed", False, "SpecChanged", f"spec changed (generation {generation}); retrying")
        _start_recovery(
            r,
            "SpecChanged",
            f"the spec changed after the job {phase.lower()} (generation {generation})",
            counted=False,
        )
        _advance_recovery(r)
    elif phase in (SUCCEEDED, FAILED):
        _finished(r)
    else:
        _active(r)
    _sync_workload(r)
    return Result(r.actions, r.status, r.events, r.requeue, r.completed, r.conversion_report)


def _finished(r: _Round) -> None:
    """Terminal phases: make sure no worker is left running after a failure."""
    if r.status.get("phase") == FAILED:
        for pod in r.observed.pods:
            if pod.phase not in ("Succeeded", "Failed") and not pod.deleting:
                r.actions.append(DeletePod(pod.name))


def _active(r: _Round) -> None:
    st = r.status
    _quarantined_nodes(r)  # expired quarantines leave the status (and a wake-up is set for the next)
    if r.spec.suspend:
        _suspend(r)
        return
    held = kueue.hold(r.observed.queue, r.spec.replicas, finished=False)
    if held is not None:
        _queue_hold(r, held)
        return
    if st.get("phase") in (SUSPENDED, QUEUED):
        _resume(r)
    attempt = int(st.get("attempt") or 0)
    rec = st.get("recovery")

    # Workers of attempts that are neither current nor being started are leftovers (e.g. an
    # operator restart between deleting and recording); remove them. Stopping handles the rest.
    keep = {attempt} | ({int(rec["attempt"])} if rec else set())
    if not rec:
        for pod in r.observed.pods:
            if pod.attempt not in keep and not pod.deleting:
                r.actions.append(DeletePod(pod.name))

    if rec is None:
        if attempt == 0:
            _start_recovery(r, "Created", f"starting {r.spec.replicas} workers", counted=False)
        else:
            _watch_running(r, attempt)
    rec = st.get("recovery")
    if rec is None:
        return
    _stop_preconversion(r, f"the {rec['reason']} recovery started")
    if r.observed.foreign:
        _remove_predecessor_leftovers(r)
        return
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is not None and ready.get("reason") in API_PROBLEM_REASONS:
        # The problem an earlier round recorded is gone or will be recorded again by the caller.
        r.condition("Ready", False, rec["reason"], rec.get("message", ""))
    _advance_recovery(r)


def _stop_all(r: _Round, superseded_by: str, why: str) -> tuple[int, str]:
    """Stop whatever runs, at once and without counting anything: workers are deleted gracefully
    (force only on a lost node, which would never confirm), helper Jobs that have not finished
    are deleted with their pods, and a recovery in progress is recorded as superseded and
    dropped, backoff included. The status keeps the last attempt's size, so that resuming knows
    what the newest checkpoint was written by. Returns the workers left and what was interrupted."""
    st = r.status
    rec = st.get("recovery")
    interrupted = f"; the {rec['reason']} recovery was interrupted in its {rec['stage']} stage" if rec else ""
    _record_superseded(r, superseded_by)
    _stop_preconversion(r, why)
    for job in sorted(r.observed.jobs.values(), key=lambda j: j.name):
        if not (job.succeeded or job.failed):
            r.actions.append(DeleteJob(job.name))
    lost = _lost_nodes(r)
    for pod in sorted(r.observed.pods, key=lambda p: (p.attempt, p.index)):
        if pod.node in lost:
            r.actions.append(DeletePod(pod.name, force=True))
        elif not pod.deleting:
            r.actions.append(DeletePod(pod.name))
    left = len(r.observed.pods)
    st["readyWorkers"] = 0
    st.pop("runningSince", None)
    st.pop("progress", None)
    for type_ in ("Recovering", "Converting"):
        if any(c.get("type") == type_ and c.get("status") == "True" for c in st.get("conditions") or []):
            r.condition(type_, False, superseded_by, why)
    _clear_stalled(r, superseded_by.lower())
    if left:
        r.wake_in(2.0)
    return left, interrupted


def _suspend(r: _Round) -> None:
    """spec.suspend is true: stop whatever runs (:func:`_stop_all`)."""
    st = r.status
    entering = st.get("phase") != SUSPENDED
    left, interrupted = _stop_all(r, "Suspended", "spec.suspend is true")
    st["phase"] = SUSPENDED
    st["message"] = "suspended (spec.suspend is true): " + (
        f"stopping {left} workers gracefully" if left else "no worker runs until spec.suspend is cleared"
    )
    r.condition("Suspended", True, "Suspended", st["message"])
    r.condition("Ready", False, "Suspended", st["message"])
    if entering:
        workers = f"stopping {left} workers gracefully" if left else "no worker to stop"
        r.event(
            "Normal",
            "Suspended",
            f"spec.suspend is true: {workers}{interrupted}; not counted as a restart",
        )


def _queue_hold(r: _Round, held: kueue.Hold) -> None:
    """Kueue has not admitted the job's Workload, or evicted it: the job is held as a suspended
    one is (:func:`_stop_all`), in phase Queued, with Kueue's words in the Admitted condition."""
    st = r.status
    entering = st.get("phase") != QUEUED
    was_admitted = any(
        c.get("type") == "Admitted" and c.get("status") == "True" for c in st.get("conditions") or []
    )
    if st.get("phase") == SUSPENDED:
        r.condition("Suspended", False, "Resumed", "spec.suspend was cleared; waiting for admission by Kueue")
    left, interrupted = _stop_all(r, held.reason, held.message)
    st["phase"] = QUEUED
    st["message"] = held.message + (
        f"; stopping {left} workers gracefully" if left else "; no worker runs until Kueue admits the job"
    )
    old = next((c for c in st.get("conditions") or [] if c.get("type") == "Admitted"), None)
    r.condition("Admitted", False, held.reason, held.message)
    r.condition("Ready", False, held.reason, st["message"])
    if entering or was_admitted or (old or {}).get("reason") != held.reason:
        counted = "; not counted as a restart" if held.reason != kueue.WAITING else ""
        workers = f"stopping {left} workers gracefully; " if left else ""
        r.event("Normal", held.reason, f"{workers}{held.message}{interrupted}{counted}")
    # Kueue's decisions arrive through the Workload watch; this is the safety net without one.
    r.wake_in(POLL_SECONDS)


def _resume(r: _Round) -> None:
    """spec.suspend was cleared, or Kueue admitted the job: a job that ran before resumes from
    the newest complete checkpoint (a controlled restart, converted when spec.replicas changed
    meanwhile); one that never started starts as a new job would."""
    st, spec = r.status, r.spec
    queued = st.get("phase") == QUEUED
    attempt = int(st.get("attempt") or 0)
    workers = int(st.get("workers") or 0)
    requested = int(st.get("replicasRequested") or workers)
    note = ""
    if attempt and requested and requested != spec.replicas:
        note = f" (spec.replicas changed from {requested} while suspended)"
    elif attempt and workers and workers != spec.replicas:
        note = f" (the last gang had {workers}: an elastic shrink)"
    what = "resuming" if attempt else "starting"
    if queued and r.observed.queue is not None:
        message = f"{kueue.admitted_words(r.observed.queue)}: {what} with {spec.replicas} workers{note}"
        r.condition("Admitted", True, "Admitted", message)
        r.event("Normal", "Admitted", message)
    else:
        message = f"spec.suspend was cleared: {what} with {spec.replicas} workers{note}"
        r.condition("Suspended", False, "Resumed", message)
        r.event("Normal", "Resumed", message)
    if attempt == 0:
        st["phase"] = PENDING  # the Created recovery starts below, as for a new job
        return
    _start_recovery(r, "Resumed", f"{message}, from the newest complete checkpoint", counted=False)


def _sync_workload(r: _Round) -> None:
    """Keep the Kueue Workload in step with the job as this round leaves it (see
    :func:`relaunch.controller.kueue.workload_actions`)."""
    queue = r.observed.queue
    if queue is None:
        return
    st = r.status
    stopped = not r.observed.pods and all(j.succeeded or j.failed for j in r.observed.jobs.values())
    actions = kueue.workload_actions(
        r.ref,
        r.spec.template,
        r.spec.replicas,
        r.spec.suspend,
        queue,
        phase=st.get("phase"),
        stopped=stopped,
        finish_message=str(st.get("message") or ""),
        now=r.now,
    )
    for action in actions:
        if isinstance(action, dict):
            r.actions.append(Create(action))
            r.event(
                "Normal",
                "WorkloadCreated",
                f"Workload {queue.workload_name} queued in LocalQueue {queue.queue_name} "
                f"for {r.spec.replicas} workers",
            )
        else:
            r.actions.append(action)
            if isinstance(action, kueue.DeleteWorkload):
                r.event("Normal", "WorkloadReplaced", f"Workload {action.name} deleted: {action.why}")
            elif action.why == "evicted and stopped":
                r.event(
                    "Normal",
                    "QuotaReleased",
                    f"every worker stopped: the quota of Workload {action.name} "
                    "is given back to Kueue, which queues it again",
                )
    if actions:
        r.wake_in(2.0)


def _remove_predecessor_leftovers(r: _Round) -> None:
    """A namesake (a TrainingJob deleted and created again under this name) left pods or Jobs
    that carry our name label: never adopt them, delete them and wait until they are gone
    before creating anything, so that no name is shared with them."""
    foreign = sorted(r.observed.foreign, key=lambda o: (o.kind, o.name))
    for obj in foreign:
        if obj.deleting:
            continue
        r.actions.append(DeletePod(obj.name) if obj.kind == "Pod" else DeleteJob(obj.name))
    names = ", ".join(f"{o.kind.lower()} {o.name}" for o in foreign[:5])
    names += ", ..." if len(foreign) > 5 else ""
    r.notice(
        "WaitingForPredecessor",
        f"waiting for {len(foreign)} objects left by an earlier TrainingJob named {r.ref.name} to go "
        f"(deleted, not adopted): {names}",
    )
    r.wake_in(2.0)


def _current_pods(r: _Round, attempt: int) -> list[PodView]:
    return [p for p in r.observed.pods if p.attempt == attempt]


def _watch_running(r: _Round, attempt: int) -> None:
    """A gang is (supposed to be) running: succeed, fail, or start a recovery."""
    st, spec = r.status, r.spec
    pods = _current_pods(r, attempt)
    expected = int(st.get("workers") or spec.replicas)
    if len(pods) >= expected and all(p.phase == "Succeeded" for p in pods):
        _record_progress(r, attempt, now=True)  # the last step the workers printed
        st["phase"] = SUCCEEDED
        st["finishedGeneration"] = r.generation
        st["message"] = f"all {expected} workers of attempt {attempt} completed"
        st["readyWorkers"] = 0
        r.condition("Ready", False, "Succeeded", st["message"])
        r.condition("Recovering", False, "Succeeded", "")
        r.event("Normal", "Succeeded", st["message"])
        return
    failure, wake = detect_failure(pods, expected, r.observed.nodes, spec, r.now)
    if wake is not None:
        r.wake_in(wake - r.now)
    failure = failure or _unhealthy_worker(r, pods) or _watch_progress(r, attempt, pods)
    if failure is not None:
        _on_failure(r, failure)
        return
    running = sum(1 for p in pods if p.phase == "Running")
    st["readyWorkers"] = running

    requested = int(st.get("replicasRequested") or st.get("workers") or spec.replicas)
    if spec.replicas != requested:
        world = spec.replicas * spec.ranks_per_worker
        if not r.planner.factorable(world, r.observed.config_text):
            # Refused before anything is stopped: the running gang keeps training.
            message = (
                f"spec.replicas {spec.replicas} ({world} ranks) cannot be factored as data_parallel x "
                "the config's model_parallel x pipeline_stage; the job keeps running with "
                f"{st.get('workers')} workers: choose a size the layout divides"
            )
            if st.get("message") != message:
                r.event("Warning", "ReplicasRejected", message)
            st["message"] = message
            r.condition("Ready", running == expected, "ReplicasRejected", message)
            return
        _start_recovery(
            r,
            "ReplicasChanged",
            f"spec.replicas changed from {requested} to {spec.replicas}",
            counted=False,
        )
        return
    if (
        r.observed.config_error is None
        and st.get("configHash")
        and spec.restart_hash(r.observed.config_text) != st["configHash"]
    ):
        _start_recovery(r, "ConfigChanged", "the configuration or worker template changed", counted=False)
        return
    if spec.config is not None and spec.config.config_map:
        r.wake_in(POLL_SECONDS)  # ConfigMap edits are not watched: poll for them
    if _maybe_grow_back(r, attempt, pods, running == expected):
        return
    if running == expected and st.get("phase") != RUNNING:
        st["phase"] = RUNNING
        st["message"] = f"{running} workers running (attempt {attempt})"
        r.condition("Ready", True, "AllWorkersRunning", st["message"])
    _preconvert(r, attempt, running == expected)


def _unhealthy_worker(r: _Round, pods: Sequence[PodView]) -> Failure | None:
    """A worker on a node spec.nodeHealth marks unhealthy: move the gang off it before it crashes."""
    if not r.spec.node_health.enabled or r.observed.nodes is None:
        return None
    for pod in sorted(pods, key=lambda p: p.index):
        if pod.node and pod.phase in ("Pending", "Running"):
            why = _unhealthy(r.observed.nodes.get(pod.node), r.spec.node_health)
            if why:
                text = f"node {pod.node} of worker {pod.name} is unhealthy ({why}, spec.nodeHealth)"
                return ruled(Failure("NodeUnhealthy", text, pod.name, pod.node), r.spec, None)
    return None


def _watch_progress(r: _Round, attempt: int, pods: Sequence[PodView]) -> Failure | None:
    """The progress watchdog (spec.progress): a gang that prints no step within the start-up
    allowance of running, or none within the stall allowance of the last one (the save allowance
    after a step that saves a checkpoint), has failed. The newest step goes into the status."""
    spec, st = r.spec.progress, r.status
    if spec is None:
        return None
    since = parse_time(st.get("runningSince"))
    if since is None:  # not every worker has run yet: the Starting deadline watches that
        return None
    first = next((p for p in pods if p.index == 0), None)
    name, node = (
        (first.name, first.node) if first else (resources.worker_pod_name(r.ref.name, attempt, 0), None)
    )
    view = r.observed.progress
    if view is None or view.attempt != attempt:
        deadline = since + spec.startup_seconds
        if r.now < deadline:
            r.wake_in(deadline - r.now)
            return None
        text = (
            f"no training step in the log of worker {name} within {spec.startup_seconds}s of every worker "
            "running (spec.progress.startupSeconds)"
        )
        return ruled(Failure("StartupTimeout", text, name, node), r.spec, None)
    _record_progress(r, attempt)
    every = spec.save_every_steps or _save_every_steps(r.observed.config_text)
    saving = every is not None and view.global_step % every == 0
    allowance = spec.checkpoint_save_seconds if saving else spec.stall_seconds
    deadline = max(view.at, since) + allowance
    if r.now < deadline:
        r.wake_in(deadline - r.now)
        return None
    _record_progress(r, attempt, now=True)  # the step the gang stalled after
    key = "checkpointSaveSeconds" if saving else "stallSeconds"
    text = (
        f"no training step in the log of worker {name} for more than {allowance}s after step "
        f"{view.global_step} (spec.progress.{key}): the gang is hung"
    )
    return ruled(Failure("NoProgress", text, name, node), r.spec, None)


#: The live step in status.progress is rewritten at most this often while the job trains (each
#: write is an API request and an event for every watcher of the job), and at once when the
#: job succeeds or the watchdog stops it.
PROGRESS_REFRESH_SECONDS = 30.0


def _record_progress(r: _Round, attempt: int, *, now: bool = False) -> None:
    view = r.observed.progress
    if r.spec.progress is None or view is None or view.attempt != attempt:
        return
    old = r.status.get("progress") or {}
    recorded = parse_time(old.get("at"))
    fresh = recorded is not None and view.at - recorded < PROGRESS_REFRESH_SECONDS
    if not now and old.get("attempt") == attempt and fresh:
        return
    progress: Progress = {
        "attempt": attempt,
        "step": view.step,
        "globalStep": view.global_step,
        "at": iso(view.at),
    }
    if view.epoch is not None:
        progress["epoch"] = view.epoch
    r.status["progress"] = progress


def _save_every_steps(config_text: str | None) -> int | None:
    if config_text is None:
        return None
    try:
        value = config_mod.read_settings(config_text).get("save_checkpoint_steps")
    except ValueError:
        return None
    return value if isinstance(value, int) else None


def _on_failure(r: _Round, failure: Failure) -> None:
    st, spec = r.status, r.spec
    st["lastFailure"] = failure.as_status(r.now)
    _count_node_failure(r, failure)
    if failure.permanent:
        _fail(r, "PermanentFailure", failure.message)
        return
    if failure.action == "RestartNotCounted":
        _start_recovery(r, failure.reason, failure.message, counted=False)
        return
    restarts = _restarts_in_window(r)
    if restarts >= spec.recovery.max_restarts:
        window = spec.recovery.restart_window_seconds
        _fail(
            r,
            "MaxRestartsExceeded",
            f"{failure.message}; the job already restarted {restarts} times"
            + (f" in the last {window}s (spec.recovery.restartWindowSeconds)" if window else "")
            + f" (spec.recovery.maxRestarts is {spec.recovery.max_restarts})",
        )
        return
    _start_recovery(r, failure.reason, failure.message, counted=True)


def _restarts_in_window(r: _Round) -> int:
    """Counted restarts that count against maxRestarts: all of them, or those of the window."""
    window = r.spec.recovery.restart_window_seconds
    if window is None:
        return int(r.status.get("restarts") or 0)
    times = [t for t in (parse_time(v) for v in r.status.get("restartTimes") or []) if t is not None]
    return sum(1 for t in times if t > r.now - window)


#: Failure reasons that say something about the node they happened on (quarantine counts them).
NODE_FAILURE_REASONS = frozenset({"WorkerFailed", "NodeLost", "Evicted", "NodeUnhealthy"})


def _count_node_failure(r: _Round, failure: Failure) -> None:
    """Remember the failure's node; quarantine it after spec.recovery.quarantine.failures of
    them within the window (the next attempts avoid it for the cool-down)."""
    q = r.spec.recovery.quarantine
    if q is None or not failure.node or failure.reason not in NODE_FAILURE_REASONS:
        return
    st = r.status
    recent = [
        f for f in st.get("nodeFailures") or [] if (parse_time(f.get("at")) or 0) > r.now - q.window_seconds
    ]
    recent.append({"node": failure.node, "at": iso(r.now)})
    st["nodeFailures"] = recent[-HISTORY_LIMIT:]
    count = sum(1 for f in recent if f.get("node") == failure.node)
    if failure.reason == "NodeUnhealthy" or count >= q.failures:
        why = (
            "marked unhealthy (spec.nodeHealth)"
            if failure.reason == "NodeUnhealthy"
            else f"{count} failures of this job in {q.window_seconds}s"
        )
        _quarantine(r, failure.node, q.cooldown_seconds, why)


def _quarantine(r: _Round, node: str, seconds: int, why: str) -> None:
    st = r.status
    until = iso(r.now + seconds)
    entries = [e for e in st.get("quarantinedNodes") or [] if e.get("node") != node]
    entry: QuarantinedNode = {"node": node, "until": until, "reason": why}
    st["quarantinedNodes"] = [*entries, entry][-HISTORY_LIMIT:]
    r.event("Warning", "NodeQuarantined", f"node {node} is avoided by this job until {until}: {why}")


def _quarantined_nodes(r: _Round) -> set[str]:
    """Nodes still in quarantine; expired entries leave the status (and the next wake-up is set)."""
    st = r.status
    active = []
    for entry in st.get("quarantinedNodes") or []:
        until = parse_time(entry.get("until")) or 0
        if until > r.now:
            active.append(entry)
            r.wake_in(until - r.now)
        else:
            r.event("Normal", "NodeReleased", f"node {entry.get('node')} is eligible again for this job")
    if active:
        st["quarantinedNodes"] = active
    else:
        st.pop("quarantinedNodes", None)
    return {str(e.get("node")) for e in active}


def _unhealthy(node: NodeView | None, health: NodeHealth) -> str | None:
    """Why spec.nodeHealth marks the node unhealthy, or None."""
    if node is None or not health.enabled:
        return None
    taints = sorted(node.taints & health.taints)
    if taints:
        return f"taint {taints[0]}"
    for key, value in sorted(health.labels.items()):
        if node.labels.get(key) == value:
            return f"label {key}={value}"
    conditions = sorted(node.true_conditions & health.conditions)
    if conditions:
        return f"condition {conditions[0]}=True"
    return None


def _avoided_nodes(r: _Round) -> list[str]:
    """Nodes a new pod of this job must not land on: lost, quarantined, or unhealthy."""
    avoid = _lost_nodes(r) | _quarantined_nodes(r)
    if r.spec.node_health.enabled and r.observed.nodes is not None:
        avoid |= {n for n, view in r.observed.nodes.items() if _unhealthy(view, r.spec.node_health)}
    return sorted(avoid)


def _fail(r: _Round, reason: str, message: str) -> None:
    st = r.status
    st["phase"] = FAILED
    st["finishedGeneration"] = r.generation
    st["message"] = message
    st["readyWorkers"] = 0
    _record_superseded(r, reason)
    r.condition("Failed", True, reason, message)
    r.condition("Ready", False, reason, message)
    r.condition("Recovering", False, reason, "")
    r.condition("Converting", False, reason, "")
    r.event("Warning", reason, message)
    _finished(r)


def _record_superseded(r: _Round, by_reason: str) -> None:
    """Keep a recovery that a new one replaces before its workers ran in the history, so that
    every counted restart has its entry there."""
    rec = r.status.pop("recovery", None)
    if not rec:
        return
    entry: RecoveryRecord = {
        "attempt": int(rec["attempt"]),
        "reason": rec["reason"],
        "message": rec.get("message", ""),
        "detectedAt": rec.get("detectedAt"),
        "supersededBy": by_reason,
        "converted": False,
        "counted": bool(rec.get("counted")),
        "seconds": dict(rec.get("seconds") or {}),
    }
    r.status["recoveries"] = ([*list(r.status.get("recoveries") or []), entry])[-HISTORY_LIMIT:]


def _start_recovery(
    r: _Round, reason: str, message: str, *, counted: bool, replicas: int | None = None
) -> None:
    st, spec = r.status, r.spec
    _record_superseded(r, reason)
    attempt = int(st.get("attempt") or 0)
    # A recovery that failed before starting its workers used its number (its planning Job
    # exists): the next one must not reuse it.
    target = max(attempt, int(st.get("lastPlannedAttempt") or 0)) + 1
    st["lastPlannedAttempt"] = target
    rec: Recovery = {
        "attempt": target,
        "reason": reason,
        "message": message,
        "stage": STOPPING,
        "counted": counted,
        "detectedAt": iso_precise(r.now),
        "stageStartedAt": iso_precise(r.now),
        "replicas": replicas if replicas is not None else spec.replicas,
        "requested": spec.replicas,
        "seconds": {},
    }
    if attempt > 0 and st.get("worldSize"):
        rec["fromWorldSize"] = int(st["worldSize"])
    if counted:
        restarts = int(st.get("restarts") or 0) + 1
        st["restarts"] = restarts
        if spec.recovery.restart_window_seconds is not None:
            window = spec.recovery.restart_window_seconds
            times = [v for v in st.get("restartTimes") or [] if (parse_time(v) or 0) > r.now - window]
            st["restartTimes"] = [*times, iso(r.now)][-(spec.recovery.max_restarts + 1) :]
        delay = spec.recovery.backoff_seconds(restarts)
        if delay > 0:
            rec["notBefore"] = iso_precise(r.now + delay)
    st["recovery"] = rec
    st.pop("runningSince", None)  # status.progress stays: the last step of the attempt that ended
    st["phase"] = PENDING if reason == "Created" else RECOVERING
    st["message"] = f"{reason}: {message}"
    st["readyWorkers"] = 0
    if reason != "Created":
        r.condition("Ready", False, reason, message)
        r.condition("Recovering", True, reason, message)
        r.event(
            "Warning" if counted else "Normal",
            "RecoveryStarted",
            f"{message}; starting attempt {target}"
            + (f" (restart {st['restarts']} of at most {spec.recovery.max_restarts})" if counted else ""),
        )
    else:
        r.condition("Ready", False, "Starting", message)


def _enter_stage(r: _Round, stage: str) -> None:
    rec = r.status.get("recovery")
    assert rec is not None, "a stage is entered during a recovery"
    rec.pop("helperTries", None)
    rec.pop("helperRetryAt", None)
    _clear_stalled(r, f"{rec['stage']} done")
    started = parse_time(rec.get("stageStartedAt")) or r.now
    seconds = dict(rec.get("seconds") or {})
    seconds[rec["stage"]] = round(max(0.0, r.now - started), 3)
    rec["seconds"] = seconds
    rec["stage"] = stage
    rec["stageStartedAt"] = iso_precise(r.now)


def _clear_stalled(r: _Round, why: str) -> None:
    conditions = r.status.get("conditions") or []
    if any(c.get("type") == "Stalled" and c.get("status") == "True" for c in conditions):
        r.condition("Stalled", False, "Progressing", why)


def _advance_recovery(r: _Round) -> None:
    # Each stage either waits (returns False) or moves on within this same round, so a recovery
    # whose steps are all ready completes without extra wake-ups.
    for _ in range(6):
        rec = r.status.get("recovery")
        if rec is None:
            return
        stage = rec.get("stage")
        if stage == STOPPING:
            moved = _stopping(r, rec)
        elif stage == PLANNING:
            moved = _planning(r, rec)
        elif stage == STAGE_CONVERTING:
            moved = _converting(r, rec)
        elif stage == STARTING:
            moved = _starting(r, rec)
        else:  # unknown stage (hand-edited status): start the stage machine over
            rec["stage"] = STOPPING
            moved = True
        if not moved:
            return


def _lost_nodes(r: _Round) -> set[str]:
    """Nodes judged lost: those of our pods (deleted nodes included) and any other known node."""
    nodes = r.observed.nodes
    if nodes is None:
        return set()
    grace = float(r.spec.recovery.node_loss_grace_seconds)
    names = set(nodes) | {p.node for p in r.observed.pods if p.node}
    lost = set()
    for name in names:
        at = node_lost_at(nodes.get(name), grace)
        if at is not None and at <= r.now:
            lost.add(name)
    return lost


def _stopping(r: _Round, rec: Recovery) -> bool:
    target = int(rec["attempt"])
    old = [p for p in r.observed.pods if p.attempt < target]
    if not old:
        _enter_stage(r, PLANNING)
        return True
    lost = _lost_nodes(r)
    terminating = sorted(p.name for p in old if p.deleting)
    overdue = bool(terminating) and r.past_deadline(
        rec,
        f"{len(terminating)} workers still terminating ({', '.join(terminating[:5])}"
        + (", ..." if len(terminating) > 5 else "")
        + "): force-deleting them",
    )
    for pod in old:
        on_lost_node = pod.node in lost
        if on_lost_node or (overdue and pod.deleting):
            # A lost node will never confirm a deletion; a pod that outlived the stopping
            # deadline (a process ignoring SIGTERM, a kubelet that stopped answering) neither.
            r.actions.append(DeletePod(pod.name, force=True))
            last = r.status.get("lastFailure") or {}
            if on_lost_node and last.get("reason") != "NodeLost" and pod.phase not in ("Succeeded", "Failed"):
                # The gang usually fails first because a peer vanished; the lost node is the
                # cause, and the reason a worker could not be stopped gracefully.
                r.status["lastFailure"] = Failure(
                    "NodeLost",
                    f"node {pod.node} of worker {pod.name} is lost; its pods were force-deleted",
                    pod.name,
                    pod.node,
                ).as_status(r.now)
                r.event("Warning", "NodeLost", r.status["lastFailure"]["message"])
        elif not pod.deleting:
            r.actions.append(DeletePod(pod.name))
    r.status["message"] = f"{rec['reason']}: stopping {len(old)} workers"
    r.wake_in(2.0)
    return False


def _plan_outcome(r: _Round, rec: Recovery) -> PlanOutcome | None:
    text = rec.get("plan")
    if not text:
        return None
    return r.planner.interpret(text)


#: Tries of one stage's helper Job (the first and the retries after a kill, a deadline or a
#: lost node), and the delay before the second try (doubling after that).
HELPER_MAX_TRIES = 3
HELPER_RETRY_SECONDS = 5.0


def _helper(
    r: _Round, rec: Recovery, role: str, build: Callable[[int], dict[str, Any]]
) -> tuple[HelperJobView | None, str | None]:
    """Run the stage's helper Job through its tries.

    Returns the Job once it finished for good (succeeded, or failed in a way another try cannot
    mend), else None while it is created, waits, runs or is retried; and, when the tries are
    used up, why the last one failed. A helper whose pod was killed (a signal, its memory limit, its running
    deadline) or whose node is lost is tried again after a backoff, up to HELPER_MAX_TRIES; a
    disruption (eviction, preemption) is retried by the Job controller itself (pod failure
    policy) and never reaches here. A pod that cannot be scheduled or started is waited for,
    saying why, without a limit: the recovery continues when the cluster lets it run.
    """
    what = "planning" if role == resources.ROLE_PLAN else "conversion"
    key: Literal["planJob", "convertJob"] = "planJob" if role == resources.ROLE_PLAN else "convertJob"
    try_ = int(rec.get("helperTries") or 1)
    job_name = resources.plan_job_name if role == resources.ROLE_PLAN else resources.convert_job_name
    name = job_name(r.ref.name, int(rec["attempt"]), try_)
    job = r.observed.jobs.get(name)
    if job is None:
        retry_at = parse_time(rec.get("helperRetryAt"))
        if retry_at is not None and retry_at > r.now:
            r.wake_in(retry_at - r.now)
            return None, None
        r.actions.append(Create(build(try_)))
        rec[key] = name
        r.wake_in(5.0)
        return None, None
    lost = job.node is not None and not job.succeeded and job.node in _lost_nodes(r)
    if job.succeeded or (job.failed and not job.killed and not lost):
        return job, None
    if job.failed or lost:
        stage_key = "planningSeconds" if role == resources.ROLE_PLAN else "convertingSeconds"
        cause = (
            f"lost its node {job.node}" if lost else job.failure_text(f"spec.recovery.deadlines.{stage_key}")
        )
        if lost and job.pod:
            r.actions.append(DeletePod(job.pod, force=True))
        r.actions.append(DeleteJob(name))
        if try_ >= HELPER_MAX_TRIES:
            return None, f"{what} Job {name} {cause}; gave up after {try_} tries"
        delay = HELPER_RETRY_SECONDS * 2 ** (try_ - 1)
        rec["helperTries"] = try_ + 1
        rec["helperRetryAt"] = iso_precise(r.now + delay)
        r.event(
            "Warning",
            "HelperRetried",
            f"{what} Job {name} {cause}; trying again (try {try_ + 1} of {HELPER_MAX_TRIES}) in {delay:g}s",
        )
        r.wake_in(delay)
        return None, None
    # Not finished: is anything in its way?
    pod = job.pod or f"of Job {name}"
    if job.unschedulable_message:
        awaiting = f"the {what} pod {pod} cannot be scheduled: {job.unschedulable_message}"
        r.notice("HelperUnschedulable", f"{rec['reason']}: {awaiting}")
    elif job.waiting_reason in NOT_STARTING_REASONS:
        awaiting = f"the {what} pod {pod} cannot start: {job.waiting_reason}: {job.waiting_message or ''}"
        r.notice("HelperNotStarting", f"{rec['reason']}: {awaiting}".rstrip(": "))
    elif job.pod is None:
        awaiting = (
            f"{what} Job {name} has no pod yet (`kubectl describe job/{name}` says why when this lasts: "
            "a ResourceQuota or an admission webhook may refuse it)"
        )
    else:
        awaiting = f"{what} Job {name} has not finished"
    r.past_deadline(rec, awaiting)
    r.wake_in(5.0)
    return None, None


def _planning(r: _Round, rec: Recovery) -> bool:
    target = int(rec["attempt"])
    if not rec.get("plan"):
        reason = rec["reason"]
        if reason == "SpecChanged" and r.status.get("configHash") != r.spec.restart_hash(
            r.observed.config_text
        ):
            reason = "ConfigChanged"  # the edit changed what the workers run: incremental training

        def build(try_: int) -> dict[str, Any]:
            command = r.planner.plan_command(
                r.spec,
                reason=reason,
                world_size=int(rec["replicas"]) * r.spec.ranks_per_worker,
                previous_world_size=rec.get("fromWorldSize"),
                last_conversion=r.status.get("lastConversion"),
                config_text=r.observed.config_text,
            )
            return resources.build_plan_job(
                r.ref, r.spec, target, command, avoid_nodes=_avoided_nodes(r), try_=try_
            )

        if "planJob" not in rec:
            first = resources.plan_job_name(r.ref.name, target)
            r.status["message"] = f"{rec['reason']}: planning (Job {first})"
        job, gave_up = _helper(r, rec, resources.ROLE_PLAN, build)
        if gave_up is not None:
            _fail(r, "PlanningFailed", f"{gave_up}; see `kubectl logs job/{rec['planJob']}`")
            return False
        if job is None:
            return False
        if not job.message:
            _fail(
                r,
                "PlanningFailed",
                f"planning Job {job.name} failed with exit code {job.exit_code} and reported nothing; "
                f"see `kubectl logs job/{job.name}`",
            )
            return False
        rec["plan"] = job.message
    name = rec.get("planJob") or resources.plan_job_name(r.ref.name, target)
    try:
        outcome = r.planner.interpret(rec["plan"])
    except ValueError as exc:
        _fail(r, "PlanningFailed", f"planning Job {name} reported an unreadable plan: {exc}")
        return False
    if outcome.action == "fail":
        _fail(
            r, outcome.reason or "NoUsableCheckpoint", outcome.message or "the plan found nothing to resume"
        )
        return False
    r.event("Normal", "Planned", outcome.message or f"plan: {outcome.action}")
    _enter_stage(r, STAGE_CONVERTING if outcome.action == "convert" else STARTING)
    return True


def _converting(r: _Round, rec: Recovery) -> bool:
    st = r.status
    target = int(rec["attempt"])
    outcome = _plan_outcome(r, rec)
    if outcome is None:  # a hand-edited status lost the plan: plan again
        rec["stage"] = PLANNING
        return True
    if not outcome.convert_command:
        _fail(r, "ConversionFailed", "the plan asks for a conversion but names no conversion command")
        return False
    command = outcome.convert_command

    def build(try_: int) -> dict[str, Any]:
        return resources.build_convert_job(
            r.ref, r.spec, target, command, avoid_nodes=_avoided_nodes(r), try_=try_
        )

    first = "convertJob" not in rec
    job, gave_up = _helper(r, rec, resources.ROLE_CONVERT, build)
    if gave_up is not None:
        _fail(r, "ConversionFailed", f"{gave_up}; see `kubectl logs job/{rec['convertJob']}`")
        return False
    if first and "convertJob" in rec:
        st["phase"] = CONVERTING
        st["message"] = f"converting the checkpoint of step {outcome.step} (Job {rec['convertJob']})"
        r.condition("Converting", True, "Converting", st["message"])
        r.event("Normal", "Converting", st["message"])
    if job is None:
        st["phase"] = CONVERTING
        return False
    name = job.name
    if job.succeeded:
        r.conversion_report = job.message
        if outcome.conversion_record:
            st["lastConversion"] = outcome.conversion_record
        r.condition("Converting", False, "Converted", f"Job {name} completed")
        r.event("Normal", "Converted", f"conversion Job {name} completed")
        st["phase"] = RECOVERING
        _enter_stage(r, STARTING)
        return True
    detail = job.message or "no message"
    _fail(
        r,
        "ConversionFailed",
        f"conversion Job {name} failed (exit code {job.exit_code}): {detail}; see `kubectl logs job/{name}`",
    )
    return False


def _starting(r: _Round, rec: Recovery) -> bool:
    st, spec = r.status, r.spec
    target = int(rec["attempt"])
    replicas = int(rec["replicas"])
    if int(st.get("attempt") or 0) != target:
        not_before = parse_time(rec.get("notBefore"))
        if not_before is not None and not_before > r.now:
            # A fixed time, not a countdown: the message must not change (and be rewritten) every round.
            restart = st.get("restarts")
            st["message"] = (
                f"{rec['reason']}: restarting at {iso(not_before)} (backoff before restart {restart})"
            )
            r.wake_in(not_before - r.now)
            return False
        outcome = _plan_outcome(r, rec)
        if outcome is None:
            rec["stage"] = PLANNING
            return True
        if spec.config is not None:
            if r.observed.config_error is not None or r.observed.config_text is None:
                st["message"] = f"waiting for the training config: {r.observed.config_error}"
                r.event("Warning", "ConfigUnavailable", st["message"])
                r.wake_in(POLL_SECONDS)
                return False
            try:
                text = r.planner.render(r.observed.config_text, outcome, spec)
            except ValueError as exc:
                _fail(
                    r, "ConfigRejected", f"the training config cannot be rendered for attempt {target}: {exc}"
                )
                return False
            r.actions.append(Create(resources.build_config_map(r.ref, target, text)))
        r.actions.append(Create(resources.build_service(r.ref)))
        avoid = _avoided_nodes(r)
        for index in range(replicas):
            r.actions.append(
                Create(resources.build_worker_pod(r.ref, spec, target, index, replicas, avoid_nodes=avoid))
            )
        if outcome.action == "resume" and outcome.conversion_record:
            # The plan resumes from a finished conversion (made ahead of need, or by an earlier
            # try): later plans need its record as much as after a conversion Job.
            st["lastConversion"] = outcome.conversion_record
        st["attempt"] = target
        st["workers"] = replicas
        st["replicasRequested"] = int(rec.get("requested") or spec.replicas)
        st["worldSize"] = replicas * spec.ranks_per_worker
        st["configHash"] = spec.restart_hash(r.observed.config_text)
        if outcome.step is not None:
            checkpoint: CheckpointRef = {"step": outcome.step}
            if outcome.epoch is not None:
                checkpoint["epoch"] = outcome.epoch
            if outcome.file is not None:
                checkpoint["file"] = outcome.file
            if outcome.ranks is not None:
                checkpoint["ranks"] = outcome.ranks
            if outcome.kind is not None:
                checkpoint["kind"] = outcome.kind
            st["checkpoint"] = checkpoint
        else:
            st.pop("checkpoint", None)
        st["message"] = f"{rec['reason']}: starting {replicas} workers (attempt {target})"
        r.event(
            "Normal",
            "Starting",
            f"starting attempt {target} with {replicas} workers; {outcome.message}".strip(),
        )
        r.wake_in(2.0)
        return False

    # The workers exist: wait until all run, or react to a failure among them.
    pods = _current_pods(r, target)
    failure, wake = detect_failure(pods, replicas, r.observed.nodes, spec, r.now)
    if wake is not None:
        r.wake_in(wake - r.now)
    if failure is not None:
        _on_failure(r, failure)
        return True  # a new recovery (if any) starts stopping in this same round
    running = sum(1 for p in pods if p.phase == "Running")
    succeeded = sum(1 for p in pods if p.phase == "Succeeded")
    st["readyWorkers"] = running
    shrink = _maybe_shrink(r, pods, replicas)
    if shrink is True:
        return True
    if running + succeeded == replicas:
        _complete_recovery(r, rec)
        if succeeded == replicas:  # finished before we ever saw it running
            _watch_running(r, target)
        return False
    r.past_deadline(rec, _why_not_running(r, rec, pods, replicas, shrink or ""))
    return False


def _why_not_running(
    r: _Round, rec: Recovery, pods: Sequence[PodView], replicas: int, shrink_note: str
) -> str:
    """What keeps workers from running, in the cluster's own words; reported at once when a
    worker will not start by itself (an image that cannot be pulled, a missing ConfigMap or
    Secret) or cannot be scheduled."""
    pending = sorted((p for p in pods if p.phase == "Pending"), key=lambda p: p.index)
    stuck = [p for p in pending if p.waiting_reason in NOT_STARTING_REASONS]
    if stuck:
        first = stuck[0]
        others = f" (and {len(stuck) - 1} more)" if len(stuck) > 1 else ""
        awaiting = (
            f"worker {first.name}{others} cannot start: {first.waiting_reason}: {first.waiting_message or ''}"
        ).rstrip(": ")
        r.notice(str(first.waiting_reason), f"{rec['reason']}: {awaiting}")
        return awaiting
    unschedulable = [p for p in pending if p.unschedulable_since is not None]
    if unschedulable:
        first = unschedulable[0]
        awaiting = (
            f"{len(unschedulable)} of {replicas} workers cannot be scheduled: "
            f"{first.unschedulable_message or 'no message from the scheduler'}"
        ) + (f"; {shrink_note}" if shrink_note else "")
        r.notice("WorkersUnschedulable", f"{rec['reason']}: {awaiting}")
        return awaiting
    return f"{len(pending)} of {replicas} workers are not running yet"


def _maybe_shrink(r: _Round, pods: Sequence[PodView], replicas: int) -> bool | str:
    """Elastic shrink: workers unschedulable for the grace period (capacity lost with a node)
    restart the job on the largest allowed size that the scheduled workers show fits. True when
    it shrinks; why not, when no allowed size fits; False otherwise."""
    spec = r.spec
    if spec.elastic is None:
        return False
    grace = float(spec.recovery.node_loss_grace_seconds)
    stuck = [p for p in pods if p.phase == "Pending" and p.unschedulable_since is not None]
    if not stuck:
        return False
    since = max(p.unschedulable_since or r.now for p in stuck)
    if r.now - since < grace:
        r.wake_in(since + grace - r.now)
        return False
    fits = replicas - len(stuck)
    sizes = spec.elastic.valid_sizes or tuple(range(spec.elastic.min_replicas, spec.replicas + 1))
    allowed = [
        s
        for s in sizes
        if spec.elastic.min_replicas <= s <= fits
        and s < replicas
        and r.planner.factorable(s * spec.ranks_per_worker, r.observed.config_text)
    ]
    if not allowed:
        r.wake_in(POLL_SECONDS)
        return (
            f"no allowed smaller size fits (at most {fits} workers; spec.elastic allows {list(sizes)}): "
            "waiting for capacity"
        )
    size = max(allowed)
    _record_resize(r, "Shrink", size, len(_schedulable_nodes(r)))
    _start_recovery(
        r,
        "Shrink",
        f"{len(stuck)} of {replicas} workers unschedulable for more than {grace:g}s; "
        f"shrinking to {size} workers (spec.elastic)",
        counted=False,
        replicas=size,
    )
    return True


def _schedulable_nodes(r: _Round, *, ready_for: float | None = None) -> list[str]:
    """Nodes a worker of this job may be placed on: Ready, not cordoned, neither lost,
    quarantined nor unhealthy; with ``ready_for``, only those Ready without a break for that
    long (Ready's lastTransitionTime: a node that flapped counts from its last return)."""
    nodes = r.observed.nodes
    if nodes is None:
        return []
    avoid = set(_avoided_nodes(r))
    out = []
    for name, node in nodes.items():
        if node.ready is not True or node.unschedulable or name in avoid:
            continue
        if ready_for is not None and (node.ready_since is None or node.ready_since > r.now - ready_for):
            continue
        out.append(name)
    return sorted(out)


def _record_resize(r: _Round, reason: str, size: int, schedulable_nodes: int) -> None:
    """Remember an elastic resize: when (grow-back waits a window after it) and how many nodes
    were schedulable then (grow-back needs more than that)."""
    r.status["lastResize"] = {
        "reason": reason,
        "at": iso_precise(r.now),
        "fromWorkers": int(r.status.get("workers") or r.spec.replicas),
        "toWorkers": size,
        "schedulableNodes": schedulable_nodes,
    }


def _maybe_grow_back(r: _Round, attempt: int, pods: Sequence[PodView], all_running: bool) -> bool:
    """Elastic grow-back: a gang running below spec.replicas after a shrink restarts at the
    largest allowed size that fits once more nodes than at the last resize have been Ready
    (and schedulable, neither lost nor avoided) for spec.elastic.growBackAfterSeconds, at most
    once per window, and not while a checkpoint save is in progress. True when it starts.

    Capacity is judged by node count: each node gained since the last resize is taken to hold
    as many workers as the running gang puts on one of its nodes. When the grown gang still
    cannot be scheduled, the elastic shrink brings it back after the grace period and records
    the nodes schedulable then, so the same nodes never trigger another grow-back: the job
    does not flap between sizes.
    """
    spec, st = r.spec, r.status
    elastic = spec.elastic
    workers = int(st.get("workers") or spec.replicas)
    if (
        elastic is None
        or elastic.grow_back_after_seconds == 0
        or workers >= spec.replicas
        or not all_running
        or st.get("phase") != RUNNING
        or r.observed.nodes is None
    ):
        return False
    window = float(elastic.grow_back_after_seconds)
    last = st.get("lastResize")
    since = parse_time(last.get("at")) if isinstance(last, dict) else None
    if not isinstance(last, dict) or since is None:
        # Shrunk before grow-back was known (or a hand-edited status): count from now.
        _record_resize(r, "Shrink", workers, len(_schedulable_nodes(r)))
        since = r.now
        last = st["lastResize"]
    if r.now < since + window:
        r.wake_in(since + window - r.now)
        _grow_back_note(r, attempt, None)
        return False
    baseline = int(last.get("schedulableNodes") or 0)
    stable = _schedulable_nodes(r, ready_for=window)
    gained = len(stable) - baseline
    if gained <= 0:
        # Wake when a node that is back now has been Ready for the whole window.
        nodes = r.observed.nodes
        settling = [nodes[n].ready_since or r.now for n in _schedulable_nodes(r) if n not in set(stable)]
        if settling:
            r.wake_in(min(settling) + window - r.now)
        _grow_back_note(r, attempt, None)
        return False
    used = {p.node for p in pods if p.node}
    per_node = -(-workers // max(1, len(used)))  # ceiling: workers the gang puts on one node
    fits = workers + gained * per_node
    sizes = elastic.valid_sizes or tuple(range(elastic.min_replicas, spec.replicas + 1))
    allowed = [
        s
        for s in sizes
        if workers < s <= min(fits, spec.replicas)
        and r.planner.factorable(s * spec.ranks_per_worker, r.observed.config_text)
    ]
    if not allowed:
        _grow_back_note(
            r,
            attempt,
            f"{gained} more schedulable nodes than at the last resize, room for at most {fits} workers, "
            f"but no allowed larger size fits (spec.elastic allows {list(sizes)}): no grow-back",
        )
        return False
    size = max(allowed)
    go, moment = _grow_back_moment(r, attempt)
    if not go:
        r.wake_in(GROW_BACK_POLL_SECONDS)
        _grow_back_note(r, attempt, f"grow-back to {size} workers is {moment}")
        return False
    pending = st.get("preconversion") or {}
    if pending.get("state") == "Running" and pending.get("targetWorkers") == size:
        # It is converting, for this very size, the newest checkpoint the grow-back would
        # convert on its path: wait for it rather than throw its work away. Once it finished,
        # the grow-back goes at the next moment that interrupts no save.
        r.wake_in(GROW_BACK_POLL_SECONDS)
        _grow_back_note(
            r,
            attempt,
            f"grow-back to {size} workers waits for the pre-conversion of the newest checkpoint "
            f"(Job {pending.get('job')})",
        )
        return False
    _record_resize(r, "GrowBack", size, len(stable))
    _start_recovery(
        r,
        "GrowBack",
        f"{len(stable)} schedulable nodes Ready for more than {window:g}s, {gained} more than at the last "
        f"resize; growing from {workers} to {size} workers (spec.elastic): {moment}",
        counted=False,
        replicas=size,
    )
    return True


#: While a grow-back waits for a checkpoint save to finish, look at the newest step this often
#: (step lines do not wake the loop).
GROW_BACK_POLL_SECONDS = 1.0


def _grow_back_moment(r: _Round, attempt: int) -> tuple[bool, str]:
    """Whether stopping the gang now interrupts no checkpoint save, and the words for it.

    With spec.progress and a known save interval, the gang is stopped after a step that
    follows a saving step, within the first half of the interval: the save finished (a later
    step was printed) and the next one is furthest away. Without them nobody can tell; the
    grow-back goes on and says so, because the plan only ever resumes from a step complete on
    every rank: an interrupted save costs that save, never a usable checkpoint.
    """
    view = r.observed.progress
    if r.spec.progress is None:
        return True, "without spec.progress relaunch cannot tell whether a checkpoint save is in progress"
    every = r.spec.progress.save_every_steps or _save_every_steps(r.observed.config_text)
    if every is None:
        return True, (
            "the save interval is unknown (neither spec.progress.saveEverySteps nor the config's "
            "save_checkpoint_steps), so relaunch cannot tell whether a checkpoint save is in progress"
        )
    if view is None or view.attempt != attempt:
        return False, "waiting for a training step line to tell whether a checkpoint save is in progress"
    if every == 1:
        return True, "every step saves a checkpoint, so one may be in progress"
    since_save = view.global_step % every
    if 1 <= since_save <= max(1, every // 2):
        return True, (
            f"step {view.global_step} follows the checkpoint save of step {view.global_step - since_save}"
        )
    return False, (
        f"waiting for the step after the next checkpoint save (every {every} steps), so that no save "
        "is interrupted"
    )


def _grow_back_note(r: _Round, attempt: int, note: str | None) -> None:
    """Say in the status message (and one Event per new note) what a pending grow-back waits
    for; the note goes when it no longer applies."""
    st = r.status
    running = int(st.get("readyWorkers") or 0)
    base = f"{running} workers running (attempt {attempt})"
    message = f"{base}; {note}" if note else base
    if st.get("message") == message:
        return
    if note is None and not str(st.get("message") or "").startswith(f"{base}; "):
        return  # someone else's words: leave them
    st["message"] = message
    r.condition("Ready", True, "AllWorkersRunning", message)
    if note:
        r.event("Normal", "GrowBackWaiting", note)


def _complete_recovery(r: _Round, rec: Recovery) -> None:
    st = r.status
    _enter_stage(r, "Running")
    seconds = dict(rec.get("seconds") or {})
    detected = parse_time(rec.get("detectedAt")) or r.now
    seconds["total"] = round(max(0.0, r.now - detected), 3)
    outcome = _plan_outcome(r, rec)
    entry: RecoveryRecord = {
        "attempt": int(rec["attempt"]),
        "reason": rec["reason"],
        "message": rec.get("message", ""),
        "detectedAt": rec.get("detectedAt"),
        "restartedAt": iso_precise(r.now),
        "converted": bool(outcome and outcome.action == "convert"),
        "counted": bool(rec.get("counted")),
        "seconds": seconds,
    }
    if outcome is not None and outcome.step is not None:
        entry["fromStep"] = outcome.step
        if outcome.epoch is not None:
            entry["fromEpoch"] = outcome.epoch
    if outcome is not None and preconvert.used_preconversion(
        outcome.conversion_record, st.get("preconverted") or []
    ):
        entry["preconverted"] = True  # resumed from a conversion made ahead of need
    st["recoveries"] = ([*list(st.get("recoveries") or []), entry])[-HISTORY_LIMIT:]
    st.pop("recovery", None)
    st["runningSince"] = iso_precise(r.now)
    st["phase"] = RUNNING
    workers = int(st.get("workers") or 0)
    st["message"] = f"{workers} workers running (attempt {rec['attempt']})"
    r.condition("Ready", True, "AllWorkersRunning", st["message"])
    r.condition("Recovering", False, "Recovered", f"{rec['reason']}: recovered in {seconds['total']:.1f}s")
    if rec["reason"] != "Created":
        r.event(
            "Normal",
            "Recovered",
            f"attempt {rec['attempt']}: {workers} workers running, {seconds['total']:.1f}s after "
            f"{rec['reason']}"
            + (f", resumed from step {entry['fromStep']}" if "fromStep" in entry else ", fresh start"),
        )
    else:
        r.event("Normal", "Running", st["message"])
    r.completed = entry
    if r.spec.config is not None and r.spec.config.config_map:
        r.wake_in(POLL_SECONDS)
    if r.spec.elastic is not None and r.spec.elastic.preconvert.enabled:
        r.wake_in(1.0)  # the new gang's first pre-conversion


# ----------------------------------------------------------------------------------------------
# Conversion ahead of need (spec.elastic.preconvert)

#: While a pre-conversion Job runs, look at it this often.
PRECONVERT_POLL_SECONDS = 5.0
#: A pre-conversion Job not listed this long after it was created is taken as gone.
PRECONVERT_MISSING_SECONDS = 30.0


def _preconvert(r: _Round, attempt: int, all_running: bool) -> None:
    """While the whole gang runs: collect a finished pre-conversion Job, and start the next one
    when one is due (:func:`relaunch.preconvert.due`), one at a time per job.

    ``status.preconversion`` says what the newest Job was asked and answered;
    ``status.preconverted`` lists the pre-conversions ready on disk (from the Job's report). A
    recovery needs none of this: its plan finds a finished destination by itself and resumes
    from it (the recovery's ``preconverted`` says so)."""
    spec, st = r.spec, r.status
    elastic = spec.elastic
    if elastic is None or not elastic.preconvert.enabled:
        _stop_preconversion(r, "spec.elastic.preconvert is off")
        return
    state = Preconversion(**(st.get("preconversion") or {}))
    if state.get("state") == "Running" and not _collect_preconversion(r, state):
        return
    if st.get("phase") != RUNNING or not all_running:
        return
    settings = elastic.preconvert
    workers = int(st.get("workers") or spec.replicas)
    target = preconvert.target_workers(
        spec, workers, lambda world: r.planner.factorable(world, r.observed.config_text)
    )
    if target is None:
        return
    view = r.observed.progress
    global_step = view.global_step if view is not None and view.attempt == attempt else None
    every = None
    if spec.progress is not None:
        every = spec.progress.save_every_steps or _save_every_steps(r.observed.config_text)
    decision = preconvert.due(
        state,
        attempt=attempt,
        target=target,
        global_step=global_step,
        save_every=every,
        now=r.now,
        finished_at=parse_time(state.get("finishedAt")),
        interval=float(settings.interval_seconds),
    )
    if not decision.start:
        r.wake_in((decision.wake_at or r.now + settings.interval_seconds) - r.now)
        return
    run = int(state.get("run") or 0) + 1
    name = resources.preconvert_job_name(r.ref.name, run)
    command = preconvert.command(
        spec,
        world_size=workers * spec.ranks_per_worker,
        target_world_size=target * spec.ranks_per_worker,
        last_conversion=st.get("lastConversion"),
        termination_log=resources.TERMINATION_LOG,
    )
    r.actions.append(
        Create(
            resources.build_preconvert_job(r.ref, spec, run, attempt, command, avoid_nodes=_avoided_nodes(r))
        )
    )
    previous = state.get("job")
    if previous and previous in r.observed.jobs:
        r.actions.append(DeleteJob(str(previous)))  # finished: its report is in the status
    saved = decision.saved_step
    if saved is None and state.get("attempt") == attempt:
        saved = state.get("savedStep")
    new: Preconversion = {
        "run": run,
        "job": name,
        "attempt": attempt,
        "targetWorkers": target,
        "state": "Running",
        "startedAt": iso_precise(r.now),
        "message": f"converting the newest complete checkpoint for {target} workers ahead of need "
        f"(Job {name}, after {decision.why})",
    }
    if saved is not None:
        new["savedStep"] = int(saved)
    st["preconversion"] = new
    r.wake_in(PRECONVERT_POLL_SECONDS)


def _collect_preconversion(r: _Round, state: Preconversion) -> bool:
    """Read the running pre-conversion Job's outcome into the status once it finished (True),
    else wait for it (False)."""
    st = r.status
    name = str(state.get("job"))
    job = r.observed.jobs.get(name)
    if job is None:
        started = parse_time(state.get("startedAt")) or r.now
        if r.now - started < PRECONVERT_MISSING_SECONDS:
            r.wake_in(PRECONVERT_POLL_SECONDS)
            return False
        outcome, message = "Failed", f"pre-conversion Job {name} is gone before it reported"
    elif job.succeeded or job.failed:
        report: preconvert.Report | None = None
        if job.message:
            try:
                report = preconvert.Report.parse(job.message)
            except ValueError as exc:
                outcome, message = "Failed", f"pre-conversion Job {name} {exc}"
        if report is not None:
            outcome, message = report.state, report.message
            if job.failed and report.state != "Failed":
                outcome = "Failed"
            if report.state != "Failed":
                st["preconverted"] = [
                    cast(Preconverted, {**k.to_json(), "workers": k.world_size // r.spec.ranks_per_worker})
                    for k in report.kept
                ]
                if not st["preconverted"]:
                    st.pop("preconverted")
            if report.step is not None:
                state["step"] = report.step
            if report.epoch is not None:
                state["epoch"] = report.epoch
            if report.converted:
                r.event(
                    "Normal",
                    "Preconverted",
                    f"step {report.step} converted ahead of need for {state.get('targetWorkers')} workers "
                    f"into {report.destination} ({report.seconds}s, Job {name})",
                )
        elif job.message is None or not job.message:
            outcome = "Failed"
            message = f"pre-conversion Job {name} " + (
                job.failure_text("spec.recovery.deadlines.convertingSeconds")
                if job.failed
                else "reported nothing"
            )
    else:
        waiting = job.unschedulable_message or (
            f"{job.waiting_reason}: {job.waiting_message or ''}".rstrip(": ")
            if job.waiting_reason in NOT_STARTING_REASONS
            else None
        )
        if waiting:
            # Low priority: it waits for room without holding anything up; the status says why.
            state["message"] = f"pre-conversion Job {name} is waiting: {waiting}"
            st["preconversion"] = state
        r.wake_in(PRECONVERT_POLL_SECONDS)
        return False
    if outcome == "BudgetExceeded" and state.get("message") != message:
        r.event("Warning", "PreconversionSkipped", message)
    elif outcome == "Failed":
        r.event("Warning", "PreconversionFailed", f"{message}; a recovery converts on its own path")
    state["state"] = outcome
    state["message"] = message
    state["finishedAt"] = iso_precise(r.now)
    st["preconversion"] = state
    return True


def _stop_preconversion(r: _Round, why: str) -> None:
    """A recovery (or a suspend) needs the disk and the nodes: a pre-conversion still running is
    deleted. What it wrote is never used: only a published destination counts."""
    st = r.status
    state = st.get("preconversion")
    if not isinstance(state, dict) or state.get("state") != "Running":
        return
    name = str(state.get("job"))
    job = r.observed.jobs.get(name)
    if job is not None and not (job.succeeded or job.failed):
        r.actions.append(DeleteJob(name))
    st["preconversion"] = {
        **state,
        "state": "Interrupted",
        "message": f"pre-conversion Job {name} was stopped: {why}",
        "finishedAt": iso_precise(r.now),
    }
