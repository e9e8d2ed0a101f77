"""What the job loops read instead of the API: the pods and helper Jobs of every TrainingJob and
the ConfigMaps they name, kept current by watches, with the operator's own writes laid over them.

Pods, Jobs and Kueue Workloads come from kopf's watches, through kopf indices keyed by (namespace, job name)
(:mod:`relaunch.controller.handlers` declares them). kopf lists every indexed resource before any
other handler runs, so no loop starts on a half-listed world after an operator restart. The
indices are mutated on the event loop's thread: :meth:`Owned.of` reads them there, and the round
(which runs in a worker thread) gets copies.

A watch event comes some milliseconds after the write that caused it, and a loop woken by its
own status write must not act on the world from before its own creates and deletes (it would
create again, delete again, or count a failure twice). So each write is recorded here at once:
an object the operator created is seen until the watch delivers it (or a newer version of it),
one it deleted is seen as being deleted until the watch says so. ConfigMaps named by
``spec.config.configMapRef`` are watched per namespace (:class:`ConfigMaps`), and a change wakes
the loops of that namespace.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from relaunch import resources
from relaunch.controller.kube import Kube, collection_path
from relaunch.controller.watch import Informer

log = logging.getLogger(__name__)

#: How long an own write stands in for the watch at most (the watch delivers in milliseconds;
#: past this the watch's view wins even if it never showed the write).
OVERLAY_SECONDS = 60.0

Key = tuple[str, str]
#: What the indices hold for each job: its pods, its helper Jobs, its Kueue Workload.
KINDS = ("Pod", "Job", "Workload")


def index_key(namespace: str | None, labels: Mapping[str, str]) -> Key:
    """The key of a pod or Job in the indices: its namespace and the TrainingJob it belongs to."""
    return (namespace or "", labels.get(resources.LABEL_JOB) or "")


def _version(obj: Mapping[str, Any]) -> int | None:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or "")
    except ValueError:
        return None


def newer(candidate: Mapping[str, Any], than: Mapping[str, Any] | None) -> bool:
    """Whether ``candidate`` is at least as new as ``than``. Kubernetes calls resourceVersions
    opaque; etcd-backed servers hand out increasing integers, which this compares, and an
    unreadable one counts as newer (the watch's view wins)."""
    if than is None:
        return True
    mine, theirs = _version(candidate), _version(than)
    return mine is None or theirs is None or mine >= theirs


class Owned:
    """Pods and Jobs of every TrainingJob: kopf's indices plus this process's own writes."""

    def __init__(self) -> None:
        self.indices: dict[str, Any] = {}  # kind -> kopf.Index, set by the startup handler
        self._lock = threading.Lock()
        # (kind, namespace, name) -> (object as our create returned it, or None once deleted; when)
        self._created: dict[tuple[str, str, str], tuple[dict[str, Any], float]] = {}
        self._deleted: dict[tuple[str, str, str], float] = {}

    @property
    def ready(self) -> bool:
        return set(KINDS) <= set(self.indices)

    def of(self, namespace: str, job: str) -> dict[str, list[dict[str, Any]]]:
        """The job's pods, Jobs and Kueue Workloads as the operator knows them now, by kind.
        Call on the event loop's thread."""
        return {kind: self._kind(kind, namespace, job) for kind in KINDS}

    def _kind(self, kind: str, namespace: str, job: str) -> list[dict[str, Any]]:
        watched: dict[str, dict[str, Any]] = {}
        for obj in self.indices[kind].get((namespace, job), ()):
            watched[(obj.get("metadata") or {}).get("name", "")] = obj
        now = time.monotonic()
        with self._lock:
            for key, (obj, when) in list(self._created.items()):
                k, ns, name = key
                if now - when > OVERLAY_SECONDS:
                    del self._created[key]
                elif (k, ns) != (kind, namespace) or _job_of(obj) != job:
                    continue
                elif name in watched and newer(watched[name], obj):
                    del self._created[key]  # the watch caught up
                else:
                    watched[name] = obj
            for key, when in list(self._deleted.items()):
                k, ns, name = key
                if now - when > OVERLAY_SECONDS:
                    del self._deleted[key]
                    continue
                if (k, ns) != (kind, namespace) or name not in watched:
                    continue
                seen = watched[name]
                meta = seen.get("metadata") or {}
                if meta.get("deletionTimestamp"):
                    del self._deleted[key]  # the watch caught up
                else:
                    watched[name] = {**seen, "metadata": {**meta, "deletionTimestamp": "deleting"}}
        return list(watched.values())

    def created(self, kind: str, namespace: str, obj: Mapping[str, Any] | None) -> None:
        """Record what a create (or a patch) returned (any thread)."""
        if not obj or kind not in KINDS:
            return
        name = (obj.get("metadata") or {}).get("name", "")
        with self._lock:
            self._created[(kind, namespace, name)] = (dict(obj), time.monotonic())
            self._deleted.pop((kind, namespace, name), None)

    def deleted(self, kind: str, namespace: str, name: str) -> None:
        """Record a delete the API server accepted (any thread)."""
        if kind not in KINDS:
            return
        with self._lock:
            self._created.pop((kind, namespace, name), None)
            self._deleted[(kind, namespace, name)] = time.monotonic()


def _job_of(obj: Mapping[str, Any]) -> str:
    return str(((obj.get("metadata") or {}).get("labels") or {}).get(resources.LABEL_JOB) or "")


class ConfigMaps:
    """The ConfigMaps that TrainingJobs name, watched per namespace (one watch per namespace
    that has such a job; only the named ones are kept). ``on_change(namespace)`` fires when one
    of them appears, changes or goes."""

    def __init__(self, kube: Kube, on_change: Callable[[str], None] | None = None) -> None:
        self.kube = kube
        self.on_change = on_change
        self._lock = threading.Lock()
        self._informers: dict[str, Informer] = {}
        self._wanted: dict[str, set[str]] = {}
        self._data: dict[tuple[str, str], dict[str, Any]] = {}

    def get(self, namespace: str, name: str) -> tuple[bool, dict[str, Any] | None]:
        """(known, the ConfigMap or None if it does not exist). Not known until the namespace's
        watch has listed once: the caller reads it directly then."""
        with self._lock:
            self._wanted.setdefault(namespace, set()).add(name)
            informer = self._informers.get(namespace)
            if informer is None:
                informer = self._informers[namespace] = Informer(
                    self.kube,
                    collection_path("ConfigMap", namespace),
                    on_list=functools.partial(self._listed, namespace),
                    on_event=functools.partial(self._event, namespace),
                    name=f"configmaps in {namespace}",
                )
                informer.start()
            if not informer.synced:
                return False, None
            return True, self._data.get((namespace, name))

    def stop(self) -> None:
        with self._lock:
            informers = list(self._informers.values())
        for informer in informers:
            informer.stop()

    def _listed(self, namespace: str, items: Iterable[Mapping[str, Any]]) -> None:
        with self._lock:
            wanted = self._wanted.get(namespace, set())
            for key in [k for k in self._data if k[0] == namespace]:
                del self._data[key]
            for obj in items:
                name = (obj.get("metadata") or {}).get("name", "")
                if name in wanted:
                    self._data[(namespace, name)] = dict(obj)
        if self.on_change is not None:
            self.on_change(namespace)

    def _event(self, namespace: str, kind: str, obj: Mapping[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        with self._lock:
            if name not in self._wanted.get(namespace, set()):
                return
            if kind == "DELETED":
                self._data.pop((namespace, name), None)
            else:
                self._data[(namespace, name)] = dict(obj)
        if self.on_change is not None:
            self.on_change(namespace)
