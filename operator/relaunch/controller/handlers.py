"""kopf wiring: settings, the watches, and the per-TrainingJob loops they start and wake.

Handlers are thin. Each TrainingJob gets a loop (an asyncio task of this process, registered in
:class:`relaunch.controller.loops.JobLoops`) that repeats: read the job, observe its pods, Jobs
and the nodes, call the pure :func:`relaunch.controller.reconcile.reconcile`, apply the actions,
write the status, post the Events, then sleep until a watch event about one of its objects (or a
node) wakes it, or until the timer the state machine asked for (backoff, node-loss grace,
polling) runs out. Being level-triggered, a missed event only costs latency, never correctness,
and an operator restart simply continues from ``status``.

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
from relaunch.controller import metrics
from relaunch.controller.events import EventRecorder
from relaunch.controller.kube import (
    ActionFailed,
    ForeignObjectError,
    JobIO,
    Kube,
    KubeError,
    NodeTracker,
    load_client_config,
)
from relaunch.controller.loops import JobLoop, JobLoops
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
    io = JobIO(RUNTIME.kube, loop.namespace, loop.name, loop.uid)
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
            outcome = await asyncio.to_thread(run_round, io, loop.uid, RUNTIME.events)
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
        self.events: EventRecorder | None = None
        self.progress: ProgressTracker | None = None
        self.nodes: NodeTracker | None = None
        self.settings: kopf.OperatorSettings | None = None
        self.planner = RelaunchPlanner()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loops = JobLoops(job_loop, cancellation_timeout=CANCELLATION_SECONDS)
        self.resync: asyncio.Task[None] | None = None
        self.metrics_port: int | None = None
        self.node_poll_seconds = 1.0

    def wake_all_threadsafe(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loops.wake_all)


RUNTIME = _Runtime()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
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
    # No CRD/namespace scanning: it would need cluster-wide read access to CRDs and namespaces.
    settings.scanning.disabled = True
    # Events: the job loops post their own (counted, see events.py), one per step; kopf's own per-handler
    # messages reach the TrainingJob's Events only when they are warnings or errors.
    settings.posting.level = logging.WARNING

    load_client_config()
    RUNTIME.settings = settings
    RUNTIME.loop = asyncio.get_running_loop()
    RUNTIME.kube = Kube()
    RUNTIME.events = EventRecorder(RUNTIME.kube)
    RUNTIME.progress = ProgressTracker(RUNTIME.kube.stream)
    RUNTIME.nodes = NodeTracker(
        RUNTIME.kube, interval=RUNTIME.node_poll_seconds, on_change=RUNTIME.wake_all_threadsafe
    )
    await asyncio.to_thread(_first_node_refresh, RUNTIME.nodes)
    RUNTIME.nodes.start()
    RUNTIME.resync = asyncio.create_task(RUNTIME.loops.resync_forever(RESYNC_SECONDS), name="relaunch-resync")
    if RUNTIME.metrics_port:
        metrics.serve(RUNTIME.metrics_port)


def _first_node_refresh(tracker: NodeTracker) -> None:
    try:
        tracker.refresh()
    except Exception as exc:  # the polling thread keeps trying
        log.warning("first node refresh failed: %s", exc)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if RUNTIME.resync is not None:
        RUNTIME.resync.cancel()
    await RUNTIME.loops.shutdown()
    if RUNTIME.progress is not None:
        RUNTIME.progress.stop_all()
    if RUNTIME.nodes is not None:
        RUNTIME.nodes.stop()


@kopf.on.event("pods", labels={resources.LABEL_JOB: kopf.PRESENT})
@kopf.on.event("batch", "v1", "jobs", labels={resources.LABEL_JOB: kopf.PRESENT})
async def owned_object_changed(namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
    RUNTIME.loops.wake(namespace or "", labels.get(resources.LABEL_JOB) or "")


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
        RUNTIME.loops.ensure(*key, uid=uid, body=_identity(body))


def _identity(body: kopf.Body) -> dict[str, Any]:
    """What a loop keeps of the body: enough to post Events about the job, and its generation."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "generation": meta.get("generation"),
        },
    }


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
    """What a round did: the reconcile result it applied, or the API problem that stopped it."""

    result: Result | None
    problem: ApiProblem | None = None

    @property
    def requeue_after(self) -> float:
        return self.result.requeue_after if self.result is not None else ERROR_RETRY_SECONDS


def run_round(io: JobIO, uid: str, events: EventRecorder) -> RoundOutcome | None:
    """One observe -> decide -> act -> record round (blocking I/O; runs in a worker thread).

    None when the job is gone (deleted, replaced by a namesake, or its namespace is being
    deleted): the loop ends.
    """
    body = io.get_trainingjob()
    if body is None or (body.get("metadata") or {}).get("uid") != uid:
        return None  # deleted (or replaced by a namesake, whose own loop the watch starts)
    meta = body.get("metadata") or {}
    try:
        check_name(meta.get("name", ""))
        spec: Any = parse_spec(body.get("spec") or {})
    except SpecError as exc:
        spec = exc
    status = body.get("status") or {}
    nodes = RUNTIME.nodes.snapshot() if RUNTIME.nodes is not None else None
    observed = io.observe(spec if not isinstance(spec, SpecError) else None, nodes)
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
    io.patch_status(status, result.status)
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
        return _report_problem(io, ref, events, result.status, meta.get("generation"), failed)
    return RoundOutcome(result)


def _report_problem(
    io: JobIO,
    ref: resources.JobRef,
    events: EventRecorder,
    status: dict[str, Any],
    generation: int | None,
    failed: ActionFailed,
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
    io.patch_status(status, new)
    events.post(ref, "Warning", problem.reason, problem.describe)
    return RoundOutcome(None, problem)


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
