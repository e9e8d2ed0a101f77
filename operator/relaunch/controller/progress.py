"""Training progress read from the workers' own output, for the progress watchdog.

MindFormers prints one line per training step (its loss monitor), and ``msrun`` copies every
local rank's output to the pod's. A hung rank stops the others at the next collective, so the
log of one worker (worker 0) tells whether the gang advances. Per job, one follow request on
that pod's log (``GET pods/<name>/log?follow=true``, through the API server, like ``kubectl logs
-f``) streams the lines; each step line updates the job's :class:`ProgressView` in memory. The
reconcile round reads it from memory and decides (see ``_watch_progress``): at steady state
the watchdog costs one long-lived stream per job and no request per step.

The stream ends when the container exits, the pod goes, or the API server times it out; it is
opened again (from the last line's time) until the follower is stopped or the attempt changes.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from relaunch.controller.kube import collection_path
from relaunch.controller.reconcile import ProgressView

log = logging.getLogger(__name__)

#: Delay before a follow request ended by the server (or refused) is opened again.
REOPEN_SECONDS = 2.0
#: Longest line read whole; longer ones are cut (a step line is a few hundred bytes).
MAX_LINE = 64 * 1024

Key = tuple[str, str]


@dataclass(frozen=True)
class Target:
    """What one follower reads: a worker pod's container, for one attempt of a job."""

    namespace: str
    pod: str
    container: str | None
    attempt: int
    pattern: str


def parse_step(pattern: re.Pattern[str], line: str) -> tuple[int, int, int | None] | None:
    """(global step, step, epoch) of a step line, or None. With ``epoch`` and ``steps`` (steps
    per epoch) groups, the global step is ``(epoch - 1) x steps + step``."""
    match = pattern.search(line)
    if match is None:
        return None
    groups = match.groupdict()
    try:
        step = int(groups["step"])
        epoch = int(groups["epoch"]) if groups.get("epoch") else None
        per_epoch = int(groups["steps"]) if groups.get("steps") else None
    except (TypeError, ValueError):
        return None
    global_step = (epoch - 1) * per_epoch + step if epoch is not None and per_epoch else step
    return global_step, step, epoch


def split_timestamp(line: str) -> tuple[float | None, str]:
    """A ``timestamps=true`` log line's RFC 3339 time (nanoseconds cut to microseconds) and text."""
    stamp, _, text = line.partition(" ")
    value = stamp.rstrip("Z")
    if "." in value:
        whole, frac = value.split(".", 1)
        value = f"{whole}.{frac[:6]}"
    try:
        at = dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None, line
    return at, text


class Stream(Protocol):
    """An open log stream: iterate its lines (bytes); ``close`` ends it, also from another thread."""

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


#: Opens a follow stream: (REST path, query) -> the stream.
Opener = Callable[[str, Mapping[str, str]], Stream]


class Follower(threading.Thread):
    """Follows one worker's log and keeps the newest step it printed."""

    def __init__(self, target: Target, opener: Opener) -> None:
        super().__init__(name=f"relaunch-progress-{target.namespace}/{target.pod}", daemon=True)
        self.target = target
        self.opener = opener
        self.pattern = re.compile(target.pattern)
        self.view: ProgressView | None = None
        self.stopped = threading.Event()
        self._stream: Stream | None = None
        self._since: float | None = None
        self.opened = 0  # follow requests made (for the benchmark and the tests)

    def stop(self) -> None:
        self.stopped.set()
        stream = self._stream
        if stream is not None:
            stream.close()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self._follow()
            except Exception as exc:  # the API server restarting, the pod not ready yet, ...
                log.debug("following %s/%s: %s", self.target.namespace, self.target.pod, exc)
            self.stopped.wait(REOPEN_SECONDS)

    def _follow(self) -> None:
        query: dict[str, str] = {"follow": "true", "timestamps": "true"}
        if self.target.container:
            query["container"] = self.target.container
        if self._since is not None:
            query["sinceTime"] = dt.datetime.fromtimestamp(self._since, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        path = f"{collection_path('Pod', self.target.namespace)}/{quote(self.target.pod, safe='')}" + "/log"
        self._stream = self.opener(path, query)
        self.opened += 1
        try:
            for raw in self._stream:
                if self.stopped.is_set():
                    return
                self.feed(raw[:MAX_LINE].decode(errors="replace").rstrip("\r\n"))
        finally:
            self._stream.close()
            self._stream = None

    def feed(self, line: str) -> None:
        """One line of the log (with its kubelet timestamp)."""
        at, text = split_timestamp(line)
        if at is not None:
            self._since = at
        found = parse_step(self.pattern, text)
        if found is None:
            return
        global_step, step, epoch = found
        old = self.view
        if old is not None and global_step == old.global_step:
            return  # a line repeated by a reopened stream (sinceTime has whole seconds)
        self.view = ProgressView(
            attempt=self.target.attempt,
            global_step=global_step,
            step=step,
            epoch=epoch,
            at=at if at is not None else time.time(),
        )


class ProgressTracker:
    """One follower per job (of its current attempt's worker 0); thread-safe."""

    def __init__(self, opener: Opener) -> None:
        self.opener = opener
        self._followers: dict[Key, Follower] = {}
        self._lock = threading.Lock()

    def follow(self, key: Key, target: Target) -> None:
        """Make sure ``target`` is followed for the job (a new attempt replaces the old follower)."""
        with self._lock:
            current = self._followers.get(key)
            if current is not None and current.target == target and current.is_alive():
                return
            if current is not None:
                current.stop()
            follower = Follower(target, self.opener)
            self._followers[key] = follower
        follower.start()

    def view(self, key: Key) -> ProgressView | None:
        with self._lock:
            follower = self._followers.get(key)
        return follower.view if follower is not None else None

    def stop(self, key: Key) -> None:
        with self._lock:
            follower = self._followers.pop(key, None)
        if follower is not None:
            follower.stop()

    def stop_all(self) -> None:
        with self._lock:
            followers = list(self._followers.values())
            self._followers.clear()
        for follower in followers:
            follower.stop()

    def requests(self) -> int:
        with self._lock:
            return sum(f.opened for f in self._followers.values())
