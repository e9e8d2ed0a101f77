"""The per-TrainingJob reconcile loops, owned by the operator process.

One asyncio task per TrainingJob runs that job's loop (see :mod:`relaunch.controller.handlers`).
The loops live in this registry rather than in kopf daemons because kopf marks every object that
has a daemon with a finalizer, and a finalizer outlives the operator: after an uninstall, deleting
a TrainingJob would hang until someone removed it by hand. Nothing of a job needs cleaning up by
the operator (pods, Services, ConfigMaps and Jobs go with it through owner references), so the
registry keeps all its state in this process and none on the objects.

The registry starts a loop when it first hears of a job, wakes it on every event, stops it when
the job is deleted (or its deletion begins), and restarts a loop whose task died unexpectedly,
at the next wake-up or at the periodic :meth:`JobLoops.resync`. Level-triggered loops make all
of this safe: a loop started twice, woken late or restarted simply looks again.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from relaunch.controller.cache import newer

log = logging.getLogger(__name__)

#: (namespace, name) of a TrainingJob.
Key = tuple[str, str]


class JobLoop:
    """One TrainingJob's loop: the job it serves, its wake-up and stop signals, and its task.

    ``body`` is the newest TrainingJob the loop knows: from the watch's events, or from the
    loop's own status write when that is newer (:meth:`update`). Each round reads it.
    """

    def __init__(self, key: Key, uid: str, body: Mapping[str, Any], context: contextvars.Context) -> None:
        self.key = key
        self.uid = uid
        self.body = body
        self.wake = asyncio.Event()
        self.stopped = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.starts = 0
        # The context of the handler that first saw the job (kopf's Event posting reads its
        # context variables); every start of the loop runs in a fresh copy of it.
        self.context = context

    def update(self, body: Mapping[str, Any]) -> None:
        """Take ``body`` unless the loop already knows a newer version of the job."""
        if newer(body, self.body):
            self.body = body

    @property
    def generation(self) -> int | None:
        """The job's metadata.generation as the newest event showed it."""
        value = (self.body.get("metadata") or {}).get("generation")
        return value if isinstance(value, int) else None

    @property
    def namespace(self) -> str:
        return self.key[0]

    @property
    def name(self) -> str:
        return self.key[1]


LoopFn = Callable[[JobLoop], Coroutine[Any, Any, None]]


class JobLoops:
    """The registry: at most one running loop per (namespace, name), for the uid last seen.

    ``run(loop)`` is the loop itself: it returns when the job is gone (then the registry forgets
    it) and must end soon after ``loop.stopped`` is set (it is cancelled after
    ``cancellation_timeout`` seconds otherwise). Call the methods from the event loop's thread.
    """

    def __init__(self, run: LoopFn, *, cancellation_timeout: float = 10.0, active: bool = True) -> None:
        self._run = run
        self._loops: dict[Key, JobLoop] = {}
        self.cancellation_timeout = cancellation_timeout
        # Whether this replica acts: a standby (leader election) knows its jobs but runs no loop.
        self.active = active

    def get(self, namespace: str, name: str) -> JobLoop | None:
        return self._loops.get((namespace, name))

    def keys(self) -> list[Key]:
        return list(self._loops)

    def ensure(self, namespace: str, name: str, uid: str, body: Mapping[str, Any]) -> JobLoop:
        """Start the job's loop if it has none (or its task died), else wake it."""
        key = (namespace, name)
        loop = self._loops.get(key)
        if loop is not None and loop.uid != uid:
            # A namesake replaced the job: the old loop ends, the new job gets its own.
            self.stop(namespace, name)
            loop = None
        if loop is None:
            loop = JobLoop(key, uid, body, contextvars.copy_context())
            self._loops[key] = loop
            self._start(loop)
            return loop
        loop.update(body)
        if loop.task is None or loop.task.done():
            self._start(loop)
        loop.wake.set()
        return loop

    def wake(self, namespace: str, name: str) -> None:
        """Wake the job's loop (a pod, Job or node changed), restarting it if its task died."""
        loop = self._loops.get((namespace, name))
        if loop is None:
            return
        if loop.task is None or loop.task.done():
            self._start(loop)
        loop.wake.set()

    def wake_all(self) -> None:
        for namespace, name in list(self._loops):
            self.wake(namespace, name)

    def wake_namespace(self, namespace: str) -> None:
        for ns, name in list(self._loops):
            if ns == namespace:
                self.wake(ns, name)

    def activate(self) -> None:
        """Start acting (this replica became the leader): start every known job's loop."""
        self.active = True
        self.resync()

    def stop(self, namespace: str, name: str, uid: str | None = None) -> None:
        """Stop the job's loop (of that uid, if given): ask it to end, cancel it if it lingers."""
        key = (namespace, name)
        loop = self._loops.get(key)
        if loop is None or (uid is not None and loop.uid != uid):
            return
        del self._loops[key]
        loop.stopped.set()
        loop.wake.set()
        task = loop.task
        if task is not None and not task.done():
            asyncio.get_running_loop().call_later(self.cancellation_timeout, task.cancel)

    def resync(self) -> int:
        """Restart every loop whose task ended while its job is still known; how many were."""
        if not self.active:
            return 0
        restarted = 0
        for loop in list(self._loops.values()):
            if loop.task is None or loop.task.done():
                self._start(loop)
                restarted += 1
        return restarted

    async def resync_forever(self, interval: float) -> None:
        """:meth:`resync` every ``interval`` seconds, until cancelled (the operator's cleanup)."""
        while True:
            await asyncio.sleep(interval)
            self.resync()

    async def shutdown(self) -> None:
        """Stop every loop; wait for them to end, cancel those that do not in time."""
        loops = list(self._loops.values())
        for loop in loops:
            self.stop(loop.namespace, loop.name)
        tasks = [loop.task for loop in loops if loop.task is not None and not loop.task.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.cancellation_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _start(self, loop: JobLoop) -> None:
        if not self.active:
            return
        if loop.starts:
            log.warning(
                "the loop of TrainingJob %s/%s had ended while the job is still known: restarting it",
                loop.namespace,
                loop.name,
            )
        loop.starts += 1
        loop.wake.clear()
        task = asyncio.get_running_loop().create_task(
            self._run(loop), name=f"relaunch-{loop.namespace}/{loop.name}", context=loop.context.copy()
        )
        loop.task = task
        task.add_done_callback(lambda done: self._ended(loop, done))

    def _ended(self, loop: JobLoop, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            if not loop.stopped.is_set():
                log.warning("the loop of TrainingJob %s/%s was cancelled", loop.namespace, loop.name)
            return
        error = task.exception()
        if error is not None:
            log.error(
                "the loop of TrainingJob %s/%s died; it restarts at the next wake-up or resync",
                loop.namespace,
                loop.name,
                exc_info=error,
            )
            return
        # Returned: the job is gone (or replaced by a namesake, which brings its own event).
        if self._loops.get(loop.key) is loop and loop.task is task:
            del self._loops[loop.key]
