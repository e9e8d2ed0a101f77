"""Events about TrainingJobs, counted the way the kubelet's recorder counts them.

The same type, reason and message about the same job is one Event object whose ``count`` and
``lastTimestamp`` grow with every repeat, so a wait or a refusal that recurs for an hour shows
as one line with a count in ``kubectl describe``, not as a flood of copies. The Event's name is
derived from the job's uid and the text, so an operator restart finds the same Event again.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import logging
import os
import threading

from relaunch.controller.kube import Kube, KubeError, collection_path
from relaunch.model import API_VERSION, KIND
from relaunch.resources import JobRef

log = logging.getLogger(__name__)

#: Events the recorder remembers the count of (older ones are read back from the API server).
REMEMBERED = 4096
#: The API server refuses longer messages.
MAX_MESSAGE = 1024
COMPONENT = "relaunch"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def event_name(ref: JobRef, type_: str, reason: str, message: str) -> str:
    digest = hashlib.sha256(f"{ref.uid}\0{type_}\0{reason}\0{message}".encode()).hexdigest()[:16]
    return f"{ref.name}.{digest}"


class EventRecorder:
    """Posts core/v1 Events on TrainingJobs; repeats bump ``count`` (thread-safe)."""

    def __init__(self, kube: Kube, instance: str | None = None) -> None:
        self.kube = kube
        self.instance = instance or os.environ.get("HOSTNAME") or "relaunch"
        self._counts: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def post(self, ref: JobRef, type_: str, reason: str, message: str) -> None:
        """Post (or count again) one Event; a failure is logged, never raised: an Event is news,
        and losing one must not stop a recovery."""
        message = message[:MAX_MESSAGE]
        name = event_name(ref, type_, reason, message)
        path = collection_path("Event", ref.namespace)
        try:
            with self._lock:
                known = self._counts.get(name)
            if known is None:
                if self.kube.create(path, self._body(ref, name, type_, reason, message)):
                    self._remember(name, 1)
                    return
                existing = self.kube.get(f"{path}/{name}") or {}
                known = int(existing.get("count") or 1)
            now = _now()
            patched = self.kube.merge_patch_or_none(
                f"{path}/{name}", {"count": known + 1, "lastTimestamp": now}
            )
            if patched is None:  # expired (the API server keeps Events for an hour): post it anew
                self.kube.create(path, self._body(ref, name, type_, reason, message))
                self._remember(name, 1)
            else:
                self._remember(name, known + 1)
        except KubeError as exc:
            log.warning(
                "could not post Event %s on TrainingJob %s/%s: %s", reason, ref.namespace, ref.name, exc
            )

    def _remember(self, name: str, count: int) -> None:
        with self._lock:
            self._counts[name] = count
            self._counts.move_to_end(name)
            while len(self._counts) > REMEMBERED:
                self._counts.popitem(last=False)

    def _body(self, ref: JobRef, name: str, type_: str, reason: str, message: str) -> dict[str, object]:
        now = _now()
        return {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": COMPONENT},
            "reportingComponent": f"{COMPONENT}.dev/operator",
            "reportingInstance": self.instance,
        }
