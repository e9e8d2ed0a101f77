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
import time
from typing import Any, cast

import kopf

from relaunch import resources
from relaunch.controller import metrics
from relaunch.controller.kube import JobIO, Kube, KubeError, NodeTracker, load_client_config
from relaunch.controller.loops import JobLoop, JobLoops
from relaunch.controller.planning import RelaunchPlanner
from relaunch.controller.reconcile import Create, DeletePod, Result, reconcile
from relaunch.model import GROUP, PLURAL, VERSION, SpecError, parse_spec

log = logging.getLogger(__name__)

#: Pause after a wake-up before looking, so a burst of pod events becomes one round.
COALESCE_SECONDS = 0.05
#: Retry delay after an unexpected error in a round (the API server restarting, ...).
ERROR_RETRY_SECONDS = 3.0
#: How long a stopped loop may finish its round before it is cancelled.
CANCELLATION_SECONDS = 10.0
#: How often loops whose task ended unexpectedly are restarted (a safety net: any event about
#: the job, its pods or Jobs, or a node restarts one at once).
RESYNC_SECONDS = 30.0


async def job_loop(loop: JobLoop) -> None:
    """One TrainingJob's observe -> reconcile -> apply -> wait loop, until stopped or the job is gone."""
    assert RUNTIME.kube is not None, "the startup handler creates the API client"
    io = JobIO(RUNTIME.kube, loop.namespace, loop.name)
    body = kopf.Body(cast(kopf.RawBody, dict(loop.body)))
    # Warnings and errors reach the TrainingJob's Events too (settings.posting.level).
    logger: logging.Logger | kopf.ObjectLogger = (
        kopf.ObjectLogger(body=body, settings=RUNTIME.settings) if RUNTIME.settings is not None else log
    )
    while not loop.stopped.is_set():
        loop.wake.clear()
        delay = ERROR_RETRY_SECONDS
        try:
            result = await asyncio.to_thread(run_round, io, loop.uid)
            if result is None:
                return
            for event in result.events:
                kopf.event(body, type=event.type, reason=event.reason, message=event.message)
                log.info("%s/%s %s: %s", loop.namespace, loop.name, event.reason, event.message)
            delay = result.requeue_after
        except KubeError as exc:
            logger.warning(f"API call failed, retrying in {delay:g}s: {exc}")
        except Exception:
            logger.exception(f"reconcile round failed, retrying in {delay:g}s")
        await _sleep(loop, delay)
        await asyncio.sleep(COALESCE_SECONDS)


class _Runtime:
    """Process-wide state shared by the handlers: the API client, node health, the job loops."""

    def __init__(self) -> None:
        self.kube: Kube | None = None
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
    # Events: the job loops post their own (kopf.event), one per step; kopf's own per-handler
    # messages reach the TrainingJob's Events only when they are warnings or errors.
    settings.posting.level = logging.WARNING

    load_client_config()
    RUNTIME.settings = settings
    RUNTIME.loop = asyncio.get_running_loop()
    RUNTIME.kube = Kube()
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
    """What a loop keeps of the body: enough to post Events about the job."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid")},
    }


def run_round(io: JobIO, uid: str) -> Result | None:
    """One observe -> decide -> act -> record round (blocking I/O; runs in a worker thread)."""
    body = io.get_trainingjob()
    if body is None or (body.get("metadata") or {}).get("uid") != uid:
        return None  # deleted (or replaced by a namesake, whose own loop the watch starts)
    meta = body.get("metadata") or {}
    try:
        spec: Any = parse_spec(body.get("spec") or {})
    except SpecError as exc:
        spec = exc
    status = body.get("status") or {}
    nodes = RUNTIME.nodes.snapshot() if RUNTIME.nodes is not None else None
    observed = io.observe(spec if not isinstance(spec, SpecError) else None, nodes)
    ref = resources.JobRef(io.name, io.namespace, uid)
    result = reconcile(ref, spec, meta.get("generation"), status, observed, time.time(), RUNTIME.planner)
    # Creates before the status write (it records what now exists: a crash in between repeats
    # them, and 409 means done); deletions after it (the status first records why: a crash in
    # between must not leave workers deleted with no trace of the failure that caused it).
    io.apply([a for a in result.actions if isinstance(a, Create)])
    io.patch_status(status, result.status)
    io.apply([a for a in result.actions if isinstance(a, DeletePod)])
    metrics.record_round(
        io.namespace, io.name, result.status, result.completed_recovery, result.conversion_report
    )
    return result


async def _sleep(loop: JobLoop, delay: float) -> None:
    """Until a watch event wakes the loop, the timer runs out, or the loop is stopped."""
    waiters = {asyncio.ensure_future(loop.wake.wait()), asyncio.ensure_future(loop.stopped.wait())}
    try:
        await asyncio.wait(waiters, timeout=max(0.05, delay), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
