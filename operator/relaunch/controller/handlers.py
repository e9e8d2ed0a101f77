"""kopf wiring: settings, one daemon per TrainingJob, and the watches that wake it.

Handlers are thin. Each TrainingJob gets a daemon that loops: read the job, observe its pods,
Jobs and the nodes, call the pure :func:`relaunch.controller.reconcile.reconcile`, apply the
actions, write the status, post the Events, then sleep until a watch event about one of its
objects (or a node) wakes it, or until the timer the state machine asked for (backoff, node-loss
grace, polling) runs out. Being level-triggered, a missed event only costs latency, never
correctness, and an operator restart simply continues from ``status``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from relaunch import resources
from relaunch.controller import metrics
from relaunch.controller.kube import JobIO, Kube, KubeError, NodeTracker, load_client_config
from relaunch.controller.planning import RelaunchPlanner
from relaunch.controller.reconcile import Create, DeletePod, Result, reconcile
from relaunch.model import GROUP, PLURAL, VERSION, SpecError, parse_spec

log = logging.getLogger(__name__)

#: Pause after a wake-up before looking, so a burst of pod events becomes one round.
COALESCE_SECONDS = 0.05
#: Retry delay after an unexpected error in a round (the API server restarting, ...).
ERROR_RETRY_SECONDS = 3.0


class _Runtime:
    """Process-wide state shared by the handlers: the API client, node health, wake-ups."""

    def __init__(self) -> None:
        self.kube: Kube | None = None
        self.nodes: NodeTracker | None = None
        self.planner = RelaunchPlanner()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wakers: dict[tuple[str, str], asyncio.Event] = {}
        self.metrics_port: int | None = None
        self.node_poll_seconds = 1.0

    def wake(self, namespace: str | None, name: str | None) -> None:
        event = self.wakers.get((namespace or "", name or ""))
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        for event in list(self.wakers.values()):
            event.set()

    def wake_all_threadsafe(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.wake_all)


RUNTIME = _Runtime()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own names for what kopf stores on objects, not kopf's defaults.
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
    # Events: the daemon posts its own (kopf.event), one per step; kopf's own per-handler
    # messages reach the TrainingJob's Events only when they are warnings or errors.
    settings.posting.level = logging.WARNING

    load_client_config()
    RUNTIME.loop = asyncio.get_running_loop()
    RUNTIME.kube = Kube()
    RUNTIME.nodes = NodeTracker(
        RUNTIME.kube, interval=RUNTIME.node_poll_seconds, on_change=RUNTIME.wake_all_threadsafe
    )
    await asyncio.to_thread(_first_node_refresh, RUNTIME.nodes)
    RUNTIME.nodes.start()
    if RUNTIME.metrics_port:
        metrics.serve(RUNTIME.metrics_port)


def _first_node_refresh(tracker: NodeTracker) -> None:
    try:
        tracker.refresh()
    except Exception as exc:  # the polling thread keeps trying
        log.warning("first node refresh failed: %s", exc)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if RUNTIME.nodes is not None:
        RUNTIME.nodes.stop()


@kopf.on.event("pods", labels={resources.LABEL_JOB: kopf.PRESENT})
@kopf.on.event("batch", "v1", "jobs", labels={resources.LABEL_JOB: kopf.PRESENT})
async def owned_object_changed(namespace: str | None, labels: kopf.Labels, **_: Any) -> None:
    RUNTIME.wake(namespace, labels.get(resources.LABEL_JOB))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def trainingjob_changed(namespace: str | None, name: str | None, **_: Any) -> None:
    RUNTIME.wake(namespace, name)


def run_round(io: JobIO, uid: str) -> Result | None:
    """One observe -> decide -> act -> record round (blocking I/O; runs in a worker thread)."""
    body = io.get_trainingjob()
    if body is None or (body.get("metadata") or {}).get("uid") != uid:
        return None  # deleted (or replaced by a namesake): this daemon is about to be stopped
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


async def _sleep(wake: asyncio.Event, stopped: kopf.DaemonStopped, delay: float) -> None:
    """Until a watch event wakes us, the timer runs out, or kopf stops the daemon."""

    async def until_stopped() -> None:
        await stopped.wait()

    waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(until_stopped())}
    try:
        await asyncio.wait(waiters, timeout=max(0.05, delay), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def trainingjob_daemon(
    namespace: str | None,
    name: str,
    uid: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    logger: Any,
    **_: Any,
) -> None:
    assert RUNTIME.kube is not None, "the startup handler creates the API client"
    key = (namespace or "", name)
    wake = asyncio.Event()
    RUNTIME.wakers[key] = wake
    io = JobIO(RUNTIME.kube, namespace or "", name)
    try:
        while not stopped:
            wake.clear()
            delay = ERROR_RETRY_SECONDS
            try:
                result = await asyncio.to_thread(run_round, io, uid)
                if result is None:
                    return
                for event in result.events:
                    kopf.event(body, type=event.type, reason=event.reason, message=event.message)
                    log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
                delay = result.requeue_after
            except KubeError as exc:
                logger.warning(f"API call failed, retrying in {delay:g}s: {exc}")
            except Exception:
                logger.exception(f"reconcile round failed, retrying in {delay:g}s")
            await _sleep(wake, stopped, delay)
            await asyncio.sleep(COALESCE_SECONDS)
    finally:
        if RUNTIME.wakers.get(key) is wake:
            del RUNTIME.wakers[key]


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
async def trainingjob_deleted(namespace: str | None, name: str, **_: Any) -> None:
    metrics.forget(namespace or "", name)
