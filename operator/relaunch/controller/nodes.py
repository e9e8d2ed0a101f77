"""Health of every node, for all TrainingJobs at once, from watches of Nodes and node Leases.

Node loss is judged from the heartbeat the operator sees (the kubelet renews its Lease in
``kube-node-lease`` every 10 s by default), not from the node controller's slow, tunable
NotReady taint. Both collections come from :class:`relaunch.controller.watch.Informer`: the
tracker holds each node's state in memory, the job loops read it (no request per round), and a
change that matters to them (Ready flipped, Ready since a new time, cordoned, a node gone) wakes
them; heartbeat deadlines are timers each loop sets for itself.

A heartbeat is only as fresh as the lease watch. When that watch has been silent for longer
than the kubelets' renew interval allows (:data:`LEASE_SILENCE_SECONDS`), or cannot be read at
all, the snapshot reports no heartbeats, so node loss is judged from the Ready condition alone:
a stalled watch must not look like every node going quiet at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from relaunch.controller.kube import Kube, parse_k8s_time
from relaunch.controller.reconcile import NodeView
from relaunch.controller.watch import Informer

log = logging.getLogger(__name__)

NODE_LEASE_NAMESPACE = "kube-node-lease"
#: A lease watch silent this long (kubelets renew every 10 s) is not trusted for heartbeats.
LEASE_SILENCE_SECONDS = 30.0


@dataclass(frozen=True)
class _NodeState:
    ready: bool | None
    not_ready_since: float | None
    taints: frozenset[str] = frozenset()
    labels: Mapping[str, str] | None = None
    true_conditions: frozenset[str] = frozenset()
    ready_since: float | None = None
    unschedulable: bool = False

    @property
    def wakes(self) -> tuple[Any, ...]:
        """What a change of wakes the loops: Ready, Ready since when (a flap shorter than the
        watch's delivery), cordoned."""
        return (self.ready, self.ready_since, self.unschedulable)


def node_state(node: Mapping[str, Any]) -> _NodeState:
    ready: bool | None = None
    since: float | None = None
    true_conditions = set()
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            ready = {"True": True, "False": False}.get(cond.get("status"))
            since = parse_k8s_time(cond.get("lastTransitionTime"))
        elif cond.get("status") == "True":
            true_conditions.add(str(cond.get("type")))
    spec = node.get("spec") or {}
    return _NodeState(
        ready,
        None if ready is True else since,
        taints=frozenset(str(t.get("key")) for t in spec.get("taints") or []),
        labels=dict((node.get("metadata") or {}).get("labels") or {}),
        true_conditions=frozenset(true_conditions),
        ready_since=since if ready is True else None,
        unschedulable=bool(spec.get("unschedulable")),
    )


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


class NodeTracker:
    """Every node's Ready condition, taints, labels and Lease heartbeat, from two informers.

    ``on_change`` fires (from an informer's thread) when a node appears, disappears or changes in
    a way that matters to the loops (:attr:`_NodeState.wakes`). The ``*_listed``/``*_event``
    methods are the informers' callbacks (public for tests, which feed them directly).
    """

    def __init__(
        self,
        kube: Kube,
        *,
        on_change: Callable[[], None] | None = None,
        lease_silence_seconds: float = LEASE_SILENCE_SECONDS,
    ) -> None:
        self.on_change = on_change
        self.lease_silence_seconds = lease_silence_seconds
        self._lock = threading.Lock()
        self._nodes: dict[str, _NodeState] | None = None
        self._heartbeats: dict[str, float] = {}
        self._intervals: dict[str, float] = {}  # between a Lease's last two renewals seen
        self._durations: dict[str, float] = {}  # a Lease's leaseDurationSeconds
        self._silent_reported = False
        self.nodes = Informer(
            kube, "/api/v1/nodes", on_list=self.nodes_listed, on_event=self.node_event, name="nodes"
        )
        self.leases = Informer(
            kube,
            f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases",
            on_list=self.leases_listed,
            on_event=self.lease_event,
            name="node leases",
            # Renewals arrive every few seconds on a cluster with nodes: silence means trouble.
            read_timeout=lease_silence_seconds,
        )

    def start(self) -> None:
        self.nodes.start()
        self.leases.start()

    def stop(self) -> None:
        self.nodes.stop()
        self.leases.stop()

    @property
    def lease_error(self) -> str | None:
        return self.leases.error

    def heartbeats_trusted(self) -> bool:
        """Whether the lease watch is current (see the module's doc)."""
        seen = self.leases.last_seen
        if not self.leases.synced or seen is None:
            return False
        if time.monotonic() - seen <= self.lease_silence_seconds:
            return True
        with self._lock:
            return not self._heartbeats  # no leases at all: nothing renews, nothing to hear

    def snapshot(self) -> dict[str, NodeView] | None:
        """Every node as the loops see it; None until the nodes were first listed."""
        trusted = self.heartbeats_trusted()
        if not trusted and not self._silent_reported and self.leases.synced:
            log.warning(
                "the node lease watch has been silent for over %.0fs: judging node loss from the "
                "Ready condition only until it is heard again",
                self.lease_silence_seconds,
            )
        self._silent_reported = not trusted and self.leases.synced
        with self._lock:
            if self._nodes is None:
                return None
            return {
                name: NodeView(
                    name,
                    st.ready,
                    st.not_ready_since,
                    self._heartbeats.get(name) if trusted else None,
                    heartbeat_interval=self._renew_interval(name),
                    taints=st.taints,
                    labels=st.labels or {},
                    true_conditions=st.true_conditions,
                    ready_since=st.ready_since,
                    unschedulable=st.unschedulable,
                )
                for name, st in self._nodes.items()
            }

    # The informers' callbacks.

    def nodes_listed(self, items: list[dict[str, Any]]) -> None:
        nodes = {_name(node): node_state(node) for node in items}
        with self._lock:
            old = self._nodes
            self._nodes = nodes
        if old is None or {n: s.wakes for n, s in old.items()} != {n: s.wakes for n, s in nodes.items()}:
            self._changed()

    def node_event(self, kind: str, node: dict[str, Any]) -> None:
        name = _name(node)
        with self._lock:
            nodes = dict(self._nodes or {})
            before = nodes.get(name)
            if kind == "DELETED":
                nodes.pop(name, None)
                after = None
            else:
                after = nodes[name] = node_state(node)
            self._nodes = nodes
        if (before.wakes if before else None) != (after.wakes if after else None):
            self._changed()

    def _renew_interval(self, name: str) -> float | None:
        """How often the node renews its Lease: as seen between its last two renewals, or before
        two were seen, a quarter of the Lease's duration (a kubelet's ratio: 10 s of 40)."""
        seen = self._intervals.get(name)
        if seen is not None:
            return seen
        duration = self._durations.get(name)
        return duration / 4 if duration else None

    def leases_listed(self, items: list[dict[str, Any]]) -> None:
        heartbeats, durations = {}, {}
        for lease in items:
            spec = lease.get("spec") or {}
            renewed = parse_k8s_time(spec.get("renewTime"))
            if renewed is not None:
                heartbeats[_name(lease)] = renewed
            if isinstance(spec.get("leaseDurationSeconds"), (int, float)):
                durations[_name(lease)] = float(spec["leaseDurationSeconds"])
        with self._lock:
            self._heartbeats = heartbeats
            self._durations = durations

    def lease_event(self, kind: str, lease: dict[str, Any]) -> None:
        name = _name(lease)
        renewed = parse_k8s_time((lease.get("spec") or {}).get("renewTime"))
        with self._lock:
            if kind == "DELETED" or renewed is None:
                self._heartbeats.pop(name, None)
                self._intervals.pop(name, None)
                self._durations.pop(name, None)
            else:
                duration = (lease.get("spec") or {}).get("leaseDurationSeconds")
                if isinstance(duration, (int, float)):
                    self._durations[name] = float(duration)
                previous = self._heartbeats.get(name)
                if previous is not None and renewed > previous:
                    self._intervals[name] = renewed - previous
                self._heartbeats[name] = renewed

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
