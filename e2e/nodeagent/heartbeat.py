"""Node heartbeats: each node's Lease renewed every 2 s and its status every 10 s, like a kubelet's,
from a process of the agent's own (``Heartbeats``).

The pods' workers are threads of the agent's process; when hundreds of pods start at once they all
want its interpreter lock, and a renewal done there could wait past a controller's grace period (the
operator then took live nodes for lost). In a process apart, a node that is up looks up. The agent
still posts a node's status and Lease itself when it registers the node or brings it back, then
tells the heartbeat process (``lose``/``restore``), which answers once it acts on it: after
``lose`` returns, that node's Lease is not renewed again.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import requests

from e2e.nodeagent.client import Kube, KubeError
from e2e.nodeagent.common import (
    KUBELET_VERSION,
    LEASE_RENEW_S,
    LOG,
    LOG_FORMAT,
    NODE_CPU,
    NODE_MEMORY,
    NODE_STATUS_S,
    now,
    now_micro,
)

#: How often the heartbeat process looks at its nodes (and for the agent's messages).
TICK_S = 0.5
#: How long the agent waits for the heartbeat process to act on a message.
ANSWER_S = 10.0


class NodeState:
    """One node as its kubelet knows it: name, address, whether it is powered off, heartbeat times."""

    def __init__(self, name: str, ip: str) -> None:
        self.name = name
        self.ip = ip
        self.lost = False
        self.uid = ""
        self.ready_since = now()
        self.last_status = 0.0
        self.last_lease = 0.0


def post_node_status(kube: Kube, node: NodeState, kubelet_port: int) -> None:
    """Patch the Node's status as a kubelet posts it (every 10 s, and when a node comes back)."""
    stamp = now()
    # generous, so that resource requests never leave pods Pending on 3 nodes
    resources = {"cpu": NODE_CPU, "memory": NODE_MEMORY, "pods": "110", "ephemeral-storage": "1Ti"}

    def condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": node.ready_since,
        }

    status = {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "testbed node"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "testbed node"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "testbed node"),
            condition("Ready", "True", "KubeletReady", "node agent is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": node.ip},
            {"type": "Hostname", "address": node.name},
        ],
        # where the API server finds this node's kubelet (pods/log): the node's address, this port
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": node.uid.replace("-", ""),
            "systemUUID": node.uid,
            "bootID": node.ready_since,
            "kernelVersion": os.uname().release,
            "osImage": "relaunch testbed",
            "operatingSystem": "linux",
            "architecture": "amd64",
            "containerRuntimeVersion": "testbed://1",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
        },
    }
    kube.patch(f"/api/v1/nodes/{node.name}/status", {"status": status})
    node.last_status = time.monotonic()


def renew_lease(kube: Kube, node: NodeState) -> None:
    """Renew the node's Lease in ``kube-node-lease`` (created if missing). A kubelet renews every
    quarter of the Lease's duration (10 s of 40 by default); the agent every 2 s of 8, so that node
    loss shows within seconds in the tests."""
    path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node.name}"
    try:
        kube.patch(path, {"spec": {"holderIdentity": node.name, "renewTime": now_micro()}}, strategic=False)
    except KubeError as error:
        if error.status != 404:
            raise
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": node.name,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid}],
            },
            "spec": {
                "holderIdentity": node.name,
                "leaseDurationSeconds": round(4 * LEASE_RENEW_S),
                "renewTime": now_micro(),
            },
        }
        kube.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body)
    node.last_lease = time.monotonic()


class Heartbeats:
    """The agent's handle on its heartbeat process (started with ``spawn``: a fresh interpreter,
    not a fork of a process full of threads)."""

    def __init__(self, kube: Kube, nodes: dict[str, NodeState], kubelet_port: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        described = [(n.name, n.ip, n.uid, n.ready_since, n.lost) for n in nodes.values()]
        self.process = context.Process(
            target=beat,
            args=(child, (kube.server, kube.ca, kube.cert, kube.key), described, kubelet_port, os.getpid()),
            name="heartbeats",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.lock = threading.Lock()

    def tell(self, *message: Any) -> None:
        """Send ``message`` and wait until the heartbeat process has acted on it."""
        with self.lock:
            self.connection.send(message)
            if not self.connection.poll(ANSWER_S):
                raise RuntimeError(f"the heartbeat process did not act on {message!r} within {ANSWER_S:g} s")
            self.connection.recv()

    def lose(self, node: NodeState) -> None:
        self.tell("lose", node.name)

    def restore(self, node: NodeState) -> None:
        self.tell("restore", node.name, node.ready_since)

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(5)


def beat(
    connection: Connection,
    credentials: tuple[str, str, str, str],
    described: list[tuple[str, str, str, str, bool]],
    kubelet_port: int,
    agent_pid: int,
) -> None:
    """The heartbeat process: a thread per node renews what is due (as each node has a kubelet of
    its own, a slow answer for one node delays no other); this one acts on the agent's messages.
    It ends with the agent."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    server, ca, cert, key = credentials
    kube = Kube(server, Path(ca), Path(cert), Path(key))
    nodes: dict[str, NodeState] = {}
    for name, ip, uid, ready_since, lost in described:
        node = NodeState(name, ip)
        node.uid, node.ready_since, node.lost = uid, ready_since, lost
        node.last_status = node.last_lease = time.monotonic()  # the agent has just posted both
        nodes[name] = node
        threading.Thread(
            target=keep_alive, args=(kube, node, kubelet_port), name=f"heartbeat-{name}", daemon=True
        ).start()
    while os.getppid() == agent_pid:
        if not connection.poll(TICK_S):
            continue
        try:
            message = connection.recv()
        except EOFError:
            return  # the agent is gone
        node = nodes[message[1]]
        if message[0] == "lose":
            node.lost = True  # no renewal starts after this (one under way may still finish)
        elif message[0] == "restore":
            node.last_status = node.last_lease = time.monotonic()  # the agent has just posted both
            node.ready_since, node.lost = message[2], False
        connection.send("done")


def keep_alive(kube: Kube, node: NodeState, kubelet_port: int) -> None:
    """Renew one node's Lease every ``LEASE_RENEW_S`` and post its status every ``NODE_STATUS_S``
    while it is not lost."""
    while True:
        time.sleep(TICK_S)
        if node.lost:
            continue
        try:
            if time.monotonic() - node.last_lease >= LEASE_RENEW_S:
                renew_lease(kube, node)
            if not node.lost and time.monotonic() - node.last_status >= NODE_STATUS_S:
                post_node_status(kube, node, kubelet_port)
        except (KubeError, requests.RequestException) as error:
            LOG.warning("node %s: heartbeat failed: %s", node.name, error)
