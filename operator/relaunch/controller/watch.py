"""List, then watch, one collection of the API: the operator's view of nodes, node leases and
the ConfigMaps that TrainingJobs name, kept current by the API server's own change stream.

An :class:`Informer` lists the collection once (``on_list`` gets every object), then follows the
watch from that list's resourceVersion (``on_event`` gets each ADDED/MODIFIED/DELETED object).
A watch the server ends (its timeout) resumes from the last resourceVersion seen, with bookmarks
keeping it fresh; a resourceVersion the server no longer has (410 Gone) or an error makes it list
again, after a backoff when the API server failed. Nothing else is requested: at steady state an
informer costs one open watch and a new one every few minutes.

The TrainingJobs themselves and the pods and Jobs they own come from kopf's watches instead
(:mod:`relaunch.controller.cache`): those are scoped to the namespaces the operator serves, while
nodes and node leases are the cluster's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import urllib3

from relaunch.controller.kube import Kube, KubeError, LineStream

log = logging.getLogger(__name__)

#: The server ends each watch after this long (the informer resumes it at once).
WATCH_SECONDS = 240
#: Backoff between failed lists or watches.
RETRY_INITIAL_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0

OnList = Callable[[list[dict[str, Any]]], None]
OnEvent = Callable[[str, dict[str, Any]], None]


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class Informer:
    """One collection listed then watched by a background thread (see the module's doc).

    ``read_timeout`` bounds how long the watch may stay silent before it is reopened: a stream
    that stopped without the connection being closed would otherwise go unnoticed. ``last_seen``
    is when the informer last heard from the server (a list, an event or a bookmark).
    """

    def __init__(
        self,
        kube: Kube,
        path: str,
        *,
        on_list: OnList,
        on_event: OnEvent,
        name: str,
        query: Mapping[str, str] | None = None,
        read_timeout: float = WATCH_SECONDS + 60,
    ) -> None:
        self.kube = kube
        self.path = path
        self.on_list = on_list
        self.on_event = on_event
        self.name = name
        self.query = dict(query or {})
        self.read_timeout = read_timeout
        self.synced = False
        self.last_seen: float | None = None
        self.lists = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._stream: LineStream | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"relaunch-watch-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.close()

    def list_once(self) -> str:
        """List the collection and hand it to ``on_list``; the list's resourceVersion."""
        payload = self.kube.get(self.path, self.query or None) or {}
        self.lists += 1
        self.on_list(list(payload.get("items") or []))
        self.synced = True
        self.error = None
        self.last_seen = time.monotonic()
        return str((payload.get("metadata") or {}).get("resourceVersion") or "")

    def _run(self) -> None:
        delay = RETRY_INITIAL_SECONDS
        while not self._stop.is_set():
            try:
                version = self.list_once()
                delay = RETRY_INITIAL_SECONDS
                while not self._stop.is_set():
                    version = self._watch(version)
            except _Expired:
                continue  # list again at once
            except Exception as exc:  # the API server restarting, a dropped connection, ...
                if self._stop.is_set():
                    return
                self.error = str(exc)
                log.warning("watching %s failed, listing again in %.1fs: %s", self.name, delay, exc)
                self._stop.wait(delay)
                delay = min(RETRY_MAX_SECONDS, delay * 2)

    def _watch(self, version: str) -> str:
        """Follow one watch from ``version`` until the server ends it; the last version seen."""
        query = {
            **self.query,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        stream = self.kube.stream(self.path, query, read_timeout=self.read_timeout)
        self._stream = stream
        try:
            for line in stream:
                if self._stop.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Expired()
                    raise KubeError(int(obj.get("code") or 500), "WATCH", self.path, json.dumps(obj))
                self.last_seen = time.monotonic()
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(kind, obj)
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError) as exc:
            # Silent for read_timeout, or cut: reopen from the same version (a 410 relists).
            if isinstance(exc, urllib3.exceptions.ProtocolError) and not self._stop.is_set():
                log.debug("watch of %s was cut: %s", self.name, exc)
        finally:
            self._stream = None
            stream.close()
        return version
