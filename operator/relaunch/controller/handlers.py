"""kopf wiring: settings, the watches, and the per-TrainingJob loops they start and wake.

Handlers are thin. Each TrainingJob gets a loop (an asyncio task of this process, registered in
:class:`relaunch.controller.loops.JobLoops`) that repeats: take the job as its newest event
showed it, its pods and Jobs from kopf's indices and the nodes from the node watches (memory, no
request: :mod:`relaunch.controller.cache`), call the pure
:func:`relaunch.controller.reconcile.reconcile`, apply the actions, write the status, post the
Events, then sleep until a watch event about one of its objects (or a node) wakes it, or until
the timer the state machine asked for (backoff, node-loss grace) runs out. Being
level-triggered, a missed event only costs latency, never correctness, and an operator restart
simply continues from ``status``. With ``--leader-election`` only the replica holding the lease
runs loops (:mod:`relaunch.controller.leader`); the others keep their watches warm.

No handler requires a finalizer (kopf daemons and timers would), so a TrainingJob carries none
and its deletion never waits for the operator: everything it owns goes with it through owner
references. Jobs still carrying the finalizer of an older operator version lose it at the first
event kopf handles for them (kopf removes its own finalizer when no handler requires it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import kopf

from relaunch import resources
from relaunch.controller import kueue, metrics
from relaunch.controller.cache import ConfigMaps, Owned, index_key
from relaunch.controller.events import EventRecorder
from relaunch.controller.jobio import ActionFailed, JobIO
from relaunch.controller.kube import ForeignObjectError, Kube, KubeError, load_client_config
from relaunch.controller.leader import LeaderElection, exit_now
from relaunch.controller.loops import JobLoop, JobLoops
from relaunch.controller.nodes import NodeTracker
from relaunch.controller.planning import RelaunchPlanner
from relaunch.controller.progress import ProgressTracker, Target
from relaunch.controller.reconcile import (
    ApiProblem,
    Create,
    Observed,
    ProgressView,
    Result,
    api_problem_status,
    reconcile,
)
from relaunch.model import GROUP, PLURAL, VERSION, SpecError, TrainingJobSpec, check_name, parse_spec

log = logging.getLogger(__name__)

#: Pause after a wake-up before looking, so a burst of pod events becomes one round.
COALESCE_SECONDS = 0.05
#: Retry delay after an unexpected error in a round (the API server restarting, ...).
ERROR_RETRY_SECONDS = 3.0
#: Backoff of rounds whose actions the API server did not carry out (see :func:`retry_delay`).
API_RETRY_INITIAL_SECONDS = 1.0
API_RETRY_MAX_SECONDS = 60.0
#: How long a stopped loop may finish its round before it is cancelled.
CANCELLATION_SECONDS = 10.0
#: How often loops whose task ended unexpectedly are restarted (a safety net: any event about
#: the job, its pods or Jobs, or a node restarts one at once).
RESYNC_SECONDS = 30.0


async def job_loop(loop: JobLoop) -> None:
    """One TrainingJob's observe -> reconcile -> apply -> wait loop, until stopped or the job is gone.

    When the API server does not carry out a round's actions (refused, throttled, a namesake's
    leftover in the way), the round writes that into the status and the loop retries with
    exponential backoff and jitter (or after the Retry-After the server asked for); the loop's
    own status write wakes it, so during a backoff only a new generation of the job (the user
    changed it) cuts the wait short.
    """
    assert RUNTIME.kube is not None, "the startup handler creates the API client"
    assert RUNTIME.events is not None, "the startup handler creates the Event recorder"
    io = JobIO(
        RUNTIME.kube, loop.namespace, loop.name, loop.uid, owned=RUNTIME.owned, configmaps=RUNTIME.configmaps
    )
    body = kopf.Body(cast(kopf.RawBody, dict(loop.body)))
    # Warnings and errors reach the TrainingJob's Events too (settings.posting.level).
    logger: logging.Logger | kopf.ObjectLogger = (
        kopf.ObjectLogger(body=body, settings=RUNTIME.settings) if RUNTIME.settings is not None else log
    )
    failures = 0
    while not loop.stopped.is_set():
        loop.wake.clear()
        delay = ERROR_RETRY_SECONDS
        started = time.monotonic()
        generation = loop.generation
        try:
            # Read on this thread: kopf mutates its indices here.
            owned = RUNTIME.owned.of(loop.namespace, loop.name)
            outcome = await asyncio.to_thread(run_round, io, loop.uid, RUNTIME.events, loop.body, owned)
            if outcome is not None and outcome.body is not None:
                loop.update(outcome.body)
            if outcome is None:
                if RUNTIME.progress is not None:
                    RUNTIME.progress.stop(loop.key)
                return
            if outcome.problem is None:
                failures = 0
                delay = outcome.requeue_after
            else:
                failures += 1
                delay = retry_delay(failures, outcome.problem.retry_after, outcome.problem.code == 409)
                log.info(
                    "%s/%s: %s; retrying in %.1fs", loop.namespace, loop.name, outcome.problem.describe, delay
                )
                metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
                await _sleep(loop, delay, unless_generation=generation)
                continue
        except KubeError as exc:
            failures += 1
            delay = retry_delay(failures, exc.retry_after)
            logger.warning(f"API call failed, retrying in {delay:.1f}s: {exc}")
        except Exception:
            failures += 1
            delay = retry_delay(failures, None)
            logger.exception(f"reconcile round failed, retrying in {delay:.1f}s")
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        await _sleep(loop, delay)
        await asyncio.sleep(COALESCE_SECONDS)
    if RUNTIME.progress is not None:  # stopped: the job was deleted (or this replica stops)
        RUNTIME.progress.stop(loop.key)


def retry_delay(failures: int, retry_after: float | None, short: bool = False) -> float:
    """Exponential backoff with full jitter in its upper half: 1, 2, 4, ... s, capped (at 10 s
    while waiting for a namesake's leftovers to go, else at a minute); the server's Retry-After
    when it gave one."""
    if retry_after is not None:
        return max(retry_after, API_RETRY_INITIAL_SECONDS)
    cap = 10.0 if short else API_RETRY_MAX_SECONDS
    base = min(cap, API_RETRY_INITIAL_SECONDS * 2 ** min(failures - 1, 16))
    return base * random.uniform(0.5, 1.0)


class _Runtime:
    """Process-wide state shared by the handlers: the API client, node health, the job loops."""

    def __init__(self) -> None:
        self.kube: Kube | None = None
        self.owned = Owned()
        self.configmaps: ConfigMaps | None = None
        self.events: EventRecorder | None = None
        self.progress: ProgressTracker | None = None
        self.nodes: NodeTracker | None = None
        self.settings: kopf.OperatorSettings | None = None
        self.planner = RelaunchPlanner()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loops = JobLoops(job_loop, cancellation_timeout=CANCELLATION_SECONDS)
        self.resync: asyncio.Task[None] | None = None
        self.metrics_port: int | None = None
        self.leader_lease: tuple[str, str] | None = None  # (namespace, name) with --leader-election
        self.leader: LeaderElection | None = None
        self.campaign: asyncio.Task[None] | None = None

    def wake_all_threadsafe(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loops.wake_all)

    def wake_namespace_threadsafe(self, namespace: str) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loops.wake_namespace, namespace)


RUNTIME = _Runtime()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    # Our own names for what kopf stores on objects, not kopf's defaults. No handler requires
    # a finalizer, so kopf never adds this one; naming it lets kopf remove it from TrainingJobs
    # that an older operator version (with a kopf daemon per job) marked with it.
    settings.persistence.finalizer = "relaunch.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="relaunch.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="relaunch.dev", key="last-handled-configuration"
    )
    # Watches end server-side before typical load balancers/proxies cut idle connections
    # (often 5-10 min), so reconnects are orderly; the client timeout is a safety net above it.
    settings.watching.server_timeout = 240
    settings.watching.client_timeout = 270
    settings.watching.connect_timeout = 15
    # Filter pods and Jobs on the server: only ours reach the operator, not every pod of the cluster.
    settings.watching.label_selectors["pods"] = resources.LABEL_JOB
    settings.watching.label_selectors["batch", "jobs"] = resources.LABEL_JOB
    settings.watching.label_selectors[kueue.GROUP, "workloads"] = resources.LABEL_JOB
    # No CRD/namespace scanning: it would need cluster-wide read access to CRDs and namespaces.
    settings.scanning.disabled = True
    # Events: the job loops post their own (counted, see events.py), one per step; kopf's own per-handler
    # messages reach the TrainingJob's Events only when they are warnings or errors.
    settings.posting.level = logging.WARNING

    load_client_config()
    RUNTIME.settings = settings
    RUNTIME.loop = asyncio.get_running_loop()
    RUNTIME.kube = Kube()
    RUNTIME.owned.indices = {
        "Pod": kwargs["relaunch_pods"],
        "Job": kwargs["relaunch_jobs"],
        "Workload": kwargs["relaunch_workloads"],
    }
    RUNTIME.configmaps = ConfigMaps(RUNTIME.kube, on_change=RUNTIME.wake_namespace_threadsafe)
    RUNTIME.events = EventRecorder(RUNTIME.kube)
    RUNTIME.progress = ProgressTracker(RUNTIME.kube.stream)
    RUNTIME.nodes = NodeTracker(RUNTIME.kube, on_change=RUNTIME.wake_all_threadsafe)
    RUNTIME.nodes.start()
    RUNTIME.resync = asyncio.create_task(RUNTIME.loops.resync_forever(RESYNC_SECONDS), name="relaunch-resync")
    if RUNTIME.leader_lease is not None:
        RUNTIME.leader = LeaderElection(RUNTIME.kube, *RUNTIME.leader_lease)
        RUNTIME.loops.active = False
        RUNTIME.campaign = asyncio.create_task(
            RUNTIME.leader.campaign(RUNTIME.loops.activate, _lost_leadership), name="relaunch-leader"
        )
    if RUNTIME.metrics_port:
        metrics.serve(RUNTIME.metrics_port)


def _lost_leadership() -> None:
    RUNTIME.loops.active = False
    exit_now()


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if RUNTIME.campaign is not None:
        RUNTIME.campaign.cancel()
    if RUNTIME.resync is not None:
        RUNTIME.resync.cancel()
    await RUNTIME.loops.shutdown()
    if RUNTIME.leader is not None and RUNTIME.leader.leading:
        try:
            await asyncio.to_thread(RUNTIME.leader.release)
        except Exception as exc:  # the standby then waits for the Lease to expire
            log.warning("could not release the leader lease: %s", exc)
    if RUNTIME.progress is not None:
        RUNTIME.progress.stop_all()
    if RUNTIME.nodes is not None:
        RUNTIME.nodes.stop()
    if RUNTIME.configmaps is not None:
        RUNTIME.configmaps.stop()


# The pods and Jobs of every TrainingJob, by (namespace, job): what the loops read. kopf lists
# indexed resources before any other handler runs, so loops never start on a half-listed world.
@kopf.index("pods", labels={resources.LABEL_JOB: kopf.PRESENT})
def relaunch_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return {index_key(namespace, labels): _raw(body)}


@kopf.index("batch", "v1", "jobs", labels={resources.LABEL_JOB: kopf.PRESENT})
def relaunch_jobs(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return {index_key(namespace, labels): _raw(body)}


def _raw(body: kopf.Body) -> dict[str, Any]:
    """The object as the API sent it (a plain dict the rounds may read from any thread)."""
    return {key: body.get(key) for key in body}


@kopf.on.event("pods", labels={resources.LABEL_JOB: kopf.PRESENT})
@kopf.on.event("batch", "v1", "jobs", labels={resources.LABEL_JOB: kopf.PRESENT})
async def owned_object_changed(namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
    RUNTIME.loops.wake(namespace or "", labels.get(resources.LABEL_JOB) or "")


# Kueue's decisions about a queued job (admitted, evicted) arrive as changes of its Workload: kept
# in an index like the pods and Jobs, and waking the job's loop. Without Kueue's CRDs kopf only
# warns that the resource cannot be served, and the index stays empty.
@kopf.on.event(kueue.GROUP, kueue.VERSION, "workloads", labels={resources.LABEL_JOB: kopf.PRESENT})
async def workload_changed(namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
    RUNTIME.loops.wake(namespace or "", labels.get(resources.LABEL_JOB) or "")


@kopf.index(kueue.GROUP, kueue.VERSION, "workloads", labels={resources.LABEL_JOB: kopf.PRESENT})
def relaunch_workloads(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return {index_key(namespace, labels): _raw(body)}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def trainingjob_changed(
    type: str | None, namespace: str | None, name: str | None, uid: str | None, body: kopf.Body, **_: Any
) -> None:
    key = (namespace or "", name or "")
    if type == "DELETED":
        RUNTIME.loops.stop(*key, uid=uid)
        metrics.forget(*key)
    elif body.get("metadata", {}).get("deletionTimestamp"):
        # Being deleted (another finalizer, or foreground deletion, holds it): act no more.
        RUNTIME.loops.stop(*key, uid=uid)
    elif uid:
        RUNTIME.loops.ensure(*key, uid=uid, body=_raw(body))


def follow_progress(
    tracker: ProgressTracker,
    io: JobIO,
    spec: TrainingJobSpec | SpecError,
    status: Mapping[str, Any],
    observed: Observed,
) -> ProgressView | None:
    """Follow the log of the current attempt's worker 0 while it runs (spec.progress); the
    newest step it printed, if any."""
    key = (io.namespace, io.name)
    if isinstance(spec, SpecError) or spec.progress is None or status.get("phase") in ("Succeeded", "Failed"):
        tracker.stop(key)
        return None
    attempt = int(status.get("attempt") or 0)
    first = next((p for p in observed.pods if p.attempt == attempt and p.index == 0), None)
    if first is not None and first.phase == "Running":
        containers = (spec.template.get("spec") or {}).get("containers") or [{}]
        container = spec.progress.container or containers[0].get("name")
        tracker.follow(key, Target(io.namespace, first.name, container, attempt, spec.progress.pattern))
    view = tracker.view(key)
    return view if view is not None and view.attempt == attempt else None


@dataclass
class RoundOutcome:
    """What a round did: the reconcile result it applied, or the API problem that stopped it,
    and the TrainingJob as its status write returned it (None: no write)."""

    result: Result | None
    problem: ApiProblem | None = None
    body: dict[str, Any] | None = None

    @property
    def requeue_after(self) -> float:
        return self.result.requeue_after if self.result is not None else ERROR_RETRY_SECONDS


def run_round(
    io: JobIO,
    uid: str,
    events: EventRecorder,
    body: Mapping[str, Any],
    owned: Mapping[str, list[dict[str, Any]]],
) -> RoundOutcome | None:
    """One decide -> act -> record round over what the watches show (``body``, and ``owned``:
    the job's pods, Jobs and Workloads by kind); blocking I/O for the actions, so it runs in a
    worker thread.

    None when the job is gone (deleted, replaced by a namesake, or its namespace is being
    deleted): the loop ends.
    """
    if (body.get("metadata") or {}).get("uid") != uid:
        return None  # replaced by a namesake, whose own loop the watch starts
    meta = body.get("metadata") or {}
    try:
        check_name(meta.get("name", ""))
        spec: Any = parse_spec(body.get("spec") or {})
    except SpecError as exc:
        spec = exc
    status = body.get("status") or {}
    nodes = RUNTIME.nodes.snapshot() if RUNTIME.nodes is not None else None
    observed = io.observe(spec if not isinstance(spec, SpecError) else None, nodes, owned, meta.get("labels"))
    if RUNTIME.progress is not None:
        observed = replace(observed, progress=follow_progress(RUNTIME.progress, io, spec, status, observed))
    ref = resources.JobRef(io.name, io.namespace, uid)
    result = reconcile(ref, spec, meta.get("generation"), status, observed, time.time(), RUNTIME.planner)
    # Creates before the status write (it records what now exists: a crash in between repeats
    # them, and 409 means done); deletions after it (the status first records why: a crash in
    # between must not leave workers deleted with no trace of the failure that caused it).
    try:
        io.apply([a for a in result.actions if isinstance(a, Create)])
    except ActionFailed as failed:
        if failed.error.namespace_terminating:
            return None
        return _report_problem(io, ref, events, status, meta.get("generation"), failed)
    try:
        written = io.patch_status(status, result.status)
    except KubeError as exc:
        if exc.status == 404:
            return None  # deleted meanwhile: its DELETED event stops the loop too
        raise
    for event in result.events:
        events.post(ref, event.type, event.reason, event.message)
        log.info("%s/%s %s: %s", io.namespace, io.name, event.reason, event.message)
    metrics.record_round(
        io.namespace, io.name, result.status, result.completed_recovery, result.conversion_report
    )
    try:
        io.apply([a for a in result.actions if not isinstance(a, Create)])
    except ActionFailed as failed:
        if failed.error.namespace_terminating:
            return None
        return _report_problem(io, ref, events, result.status, meta.get("generation"), failed, written)
    return RoundOutcome(result, body=written)


def _report_problem(
    io: JobIO,
    ref: resources.JobRef,
    events: EventRecorder,
    status: Mapping[str, Any],
    generation: int | None,
    failed: ActionFailed,
    written: dict[str, Any] | None = None,
) -> RoundOutcome:
    """Record an action the API server did not carry out in the status and one (counted) Event;
    a namesake's leftover in the way is deleted so that the retry can succeed."""
    problem = failed.problem
    if isinstance(failed.error, ForeignObjectError) and not failed.error.deleting:
        try:
            io.delete(problem.kind, problem.name)
        except KubeError as exc:
            log.warning(
                "%s/%s: could not delete %s %s: %s", io.namespace, io.name, problem.kind, problem.name, exc
            )
    new = api_problem_status(status, problem, time.time(), generation)
    written = io.patch_status(status, new) or written
    events.post(ref, "Warning", problem.reason, problem.describe)
    return RoundOutcome(None, problem, written)


async def _sleep(loop: JobLoop, delay: float, unless_generation: int | object | None = None) -> None:
    """Until a watch event wakes the loop, the timer runs out, or the loop is stopped. With
    ``unless_generation``, wake-ups end the sleep only once the job has a newer generation."""
    deadline = time.monotonic() + max(0.05, delay)
    while True:
        waiters = {asyncio.ensure_future(loop.wake.wait()), asyncio.ensure_future(loop.stopped.wait())}
        try:
            await asyncio.wait(
                waiters, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        if (
            unless_generation is None
            or loop.stopped.is_set()
            or time.monotonic() >= deadline
            or loop.generation != unless_generation
        ):
            return
        loop.wake.clear()
