"""The agent: its nodes (registration, leases, status), the pod watch that starts pod workers,
storage provisioning, names in ``/etc/hosts``, the controls' actions, and ``main``."""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import shutil
import signal
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import requests
import urllib3

from e2e.cluster.pki import ensure_leaf
from e2e.nodeagent.client import Kube, KubeError, pod_path
from e2e.nodeagent.common import (
    LOG,
    LOG_FORMAT,
    PROVISIONER,
    STORAGE_CLASS,
    Conflict,
    now,
)
from e2e.nodeagent.controls import parse_selector, selector_matches, serve_controls
from e2e.nodeagent.heartbeat import Heartbeats, NodeState, post_node_status, renew_lease
from e2e.nodeagent.hosts import claim_address_octet, remove_hosts_block, write_hosts_block
from e2e.nodeagent.kubelet import KubeletServer, LogRequestError
from e2e.nodeagent.logs import LogRun
from e2e.nodeagent.mounts import STAGE_CANDIDATES, choose_stage, image_paths, keep_image_visible, mount_script
from e2e.nodeagent.podenv import PodInputs
from e2e.nodeagent.pods import ExitWatcher, PodWorker, process_state


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.state_dir: Path = Path(args.state_dir).resolve()
        pki = self.state_dir / "pki"
        self.api_port: int = args.api_port
        self.kube = Kube(
            f"https://127.0.0.1:{args.api_port}", Path(args.ca_file), pki / "admin.crt", pki / "admin.key"
        )
        self.ca_file = Path(args.ca_file)
        self.path_prefix: str = args.path_prefix
        # What a real container would have in its image: the project's venv (and, through its
        # editable install, the source tree around it).
        self.image_paths = image_paths(Path(args.path_prefix))
        self.octet, self.octet_lock = claim_address_octet(self.state_dir)
        names = [n for n in args.nodes.split(",") if n]
        self.nodes = {name: NodeState(name, f"127.{self.octet}.0.{i + 1}") for i, name in enumerate(names)}
        # each node's kubelet serving certificate, for its address and name, signed by the cluster CA
        self.kubelet_tls = {name: self.kubelet_context(node) for name, node in self.nodes.items()}
        self.kubelet_port = 0  # the log endpoints' port on every node address (start_kubelet_servers)
        self.kubelet_servers: dict[str, KubeletServer] = {}
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.RLock()
        self.next_ip = 0
        self.stopping = threading.Event()
        self.relist = threading.Event()
        self.hosts_dirty = threading.Event()
        # (namespace, selector as given) -> its parsed terms: matching pods are not started (hold_pods)
        self.holds: dict[tuple[str, str], list[tuple[str, bool, str]]] = {}
        self.namespaces_ok = self.probe_namespaces()
        self.inputs = PodInputs(self.kube, self.state_dir, self.api_port, self.path_prefix)
        self.exits = ExitWatcher()
        self.heartbeats: Heartbeats | None = None  # started once the nodes are registered

    # -- helpers used by pods
    def allocate_ip(self) -> str:
        with self.lock:
            n = self.next_ip
            self.next_ip += 1
        return f"127.{self.octet}.{1 + n // 250}.{1 + n % 250}"

    def kubelet_context(self, node: NodeState) -> ssl.SSLContext:
        pki_dir = self.state_dir / "pki"
        name = f"kubelet-{node.name}"
        ensure_leaf(pki_dir, name, f"/O=system:nodes/CN=system:node:{node.name}", "serverAuth",
                    (f"IP:{node.ip}", f"DNS:{node.name}"))  # fmt: skip
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki_dir / f"{name}.crt"), str(pki_dir / f"{name}.key"))
        context.verify_mode = ssl.CERT_REQUIRED  # the API server's kubelet client certificate
        context.load_verify_locations(str(self.ca_file))
        return context

    def start_kubelet_servers(self, port: int) -> None:
        """Listen on ``port`` at every node address (the kubelet's 10250 by default); if it is taken
        anywhere, on one port the kernel picks, the same on every address."""
        candidates = [port] + [0] * 5
        for candidate in candidates:
            servers: dict[str, KubeletServer] = {}
            try:
                for name, node in self.nodes.items():
                    servers[name] = KubeletServer(self, node, candidate, self.kubelet_tls[name])
                    candidate = servers[name].server_address[1]
            except OSError as error:
                LOG.info("kubelet port %s unavailable on a node address (%s)", candidate or "(any)", error)
                for server in servers.values():
                    server.server_close()
                continue
            self.kubelet_port = candidate
            for name, server in servers.items():
                self.serve_kubelet(name, server)
            return
        raise RuntimeError(f"no port free on every node address {[n.ip for n in self.nodes.values()]}")

    def serve_kubelet(self, name: str, server: KubeletServer) -> None:
        self.kubelet_servers[name] = server
        threading.Thread(target=server.serve_forever, name=f"kubelet-{name}", daemon=True).start()

    def stop_kubelet(self, name: str) -> None:
        server = self.kubelet_servers.pop(name, None)
        if server is not None:
            server.shutdown()
            server.server_close()
            server.drop_idle_connections()

    def log_run(self, node: str, ns: str, name: str, container_name: str, previous: bool) -> LogRun:
        """The run of a container whose log ``/containerLogs`` serves, as the kubelet picks it."""
        with self.lock:
            workers = [w for w in self.workers.values() if (w.node, w.ns, w.pod_name) == (node, ns, name)]
        if not workers:
            raise LogRequestError(404, f'pod "{name}" does not exist')
        worker = workers[-1]
        container = next(
            (c for c in worker.init_containers + worker.containers if c.name == container_name), None
        )
        if container is None:
            raise LogRequestError(404, f'container "{container_name}" not found in pod "{name}"')
        runs = list(container.runs)
        if previous:
            if len(runs) < 2:
                raise LogRequestError(
                    400, f'previous terminated container "{container_name}" in pod "{name}" not found'
                )
            return runs[-2]
        if not runs:
            reason = (container.state.get("waiting") or {}).get("reason", "ContainerCreating")
            raise LogRequestError(
                400, f'container "{container_name}" in pod "{name}" is waiting to start: {reason}'
            )
        return runs[-1]

    def probe_namespaces(self) -> bool:
        try:
            done = subprocess.run(
                ["unshare", "--mount", "--uts", "--propagation", "private", "--", "true"], capture_output=True
            )
        except OSError:
            return False
        if done.returncode != 0:
            LOG.warning(
                "mount namespaces unavailable (%s): volumes are NOT mounted at their mountPath; "
                "pods see them only at their host folders",
                done.stderr.decode(errors="replace").strip(),
            )
        return done.returncode == 0

    def wrap(
        self, worker: PodWorker, command: list[str], mounts: list[tuple[Path, str, bool]], workdir: str
    ) -> list[str]:
        """The argv that runs ``command`` with every mount bind-mounted at its path, in new namespaces."""
        if not self.namespaces_ok:
            return command
        mounts = keep_image_visible(mounts, self.image_paths)
        stage = choose_stage([target for _, target, _ in mounts], STAGE_CANDIDATES)
        script = mount_script(worker.hostname, mounts, workdir, stage)
        return [
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            script,
            "pod-init",
            *command,
        ]

    def finalize_delete(self, ns: str, name: str, uid: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid},
        }
        try:
            self.kube.delete(pod_path(ns, name), body)
        except KubeError as error:
            if error.status not in (404, 409):
                LOG.warning("pod %s/%s: final delete failed: %s", ns, name, error)

    def forget(self, worker: PodWorker) -> None:
        with self.lock:
            if self.workers.get(worker.uid) is worker:
                del self.workers[worker.uid]
        self.hosts_dirty.set()
        # emptyDir and materialised volumes go with the pod; logs stay for the tests to read
        shutil.rmtree(worker.dir / "volumes", ignore_errors=True)

    # -- nodes
    def register_nodes(self) -> None:
        for node in self.nodes.values():
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": node.name,
                    "labels": {
                        "kubernetes.io/hostname": node.name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "node.kubernetes.io/instance-type": "testbed",
                    },
                },
            }
            try:
                created = self.kube.post("/api/v1/nodes", body)
            except KubeError as error:
                if error.status != 409:
                    raise
                created = self.kube.get(f"/api/v1/nodes/{node.name}")
            node.uid = created["metadata"]["uid"]
            post_node_status(self.kube, node, self.kubelet_port)
            renew_lease(self.kube, node)

    def start_heartbeats(self) -> None:
        """Hand the registered nodes' heartbeats to a process of their own (see ``heartbeat``)."""
        self.heartbeats = Heartbeats(self.kube, self.nodes, self.kubelet_port)

    # -- pods
    def on_pod(self, pod: dict[str, Any], deleted: bool = False) -> None:
        node = pod["spec"].get("nodeName")
        if node not in self.nodes:
            return
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if deleted:
                if worker is not None:
                    worker.remove()
                return
            if worker is not None:
                worker.update(pod)
                return
            if self.nodes[node].lost:
                return  # a powered-off node sees nothing; restore_node re-lists
            phase = (pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                if pod["metadata"].get("deletionTimestamp"):
                    self.finalize_delete(pod["metadata"]["namespace"], pod["metadata"]["name"], uid)
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.start()

    def watch_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.kube.get("/api/v1/pods")
                self.relist.clear()
                seen = set()
                for pod in listing["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self.on_pod(pod)
                with self.lock:
                    vanished = [w for uid, w in self.workers.items() if uid not in seen]
                for worker in vanished:
                    worker.remove()
                version = listing["metadata"]["resourceVersion"]
                for event in self.kube.watch("/api/v1/pods", version):
                    if self.stopping.is_set() or self.relist.is_set():
                        break
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        LOG.info("pod watch: %s; re-listing", obj.get("message"))
                        break
                    if kind == "BOOKMARK":
                        continue
                    self.on_pod(obj, deleted=kind == "DELETED")
            except Exception as error:  # keep watching whatever happens; the log says what
                if self.stopping.is_set():
                    return
                LOG.warning(
                    "pod watch failed: %r; retrying", error, exc_info=not isinstance(error, KubeError)
                )
                time.sleep(1)

    # -- storage and names
    def ensure_storage_class(self) -> None:
        body = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }
        with contextlib.suppress(KubeError):
            self.kube.post("/apis/storage.k8s.io/v1/storageclasses", body)

    def provision(self) -> None:
        """Act as the external provisioner of the ``testbed`` StorageClass: one host folder per claim."""
        for pvc in self.kube.get("/api/v1/persistentvolumeclaims")["items"]:
            meta, spec = pvc["metadata"], pvc["spec"]
            annotations = meta.get("annotations") or {}
            ours = annotations.get("volume.kubernetes.io/storage-provisioner") == PROVISIONER or (
                spec.get("storageClassName") == STORAGE_CLASS
            )
            if not ours or spec.get("volumeName") or meta.get("deletionTimestamp"):
                continue
            folder = self.state_dir / "pv" / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
            folder.mkdir(parents=True, exist_ok=True)
            size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
            body = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {
                    "name": f"pvc-{meta['uid']}",
                    "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
                },
                "spec": {
                    "capacity": {"storage": size},
                    "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": spec.get("storageClassName") or STORAGE_CLASS,
                    "volumeMode": spec.get("volumeMode", "Filesystem"),
                    "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                    "claimRef": {
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "namespace": meta["namespace"],
                        "name": meta["name"],
                        "uid": meta["uid"],
                    },
                },
            }
            try:
                self.kube.post("/api/v1/persistentvolumes", body)
                LOG.info("provisioned %s for claim %s/%s", folder, meta["namespace"], meta["name"])
            except KubeError as error:
                if error.status != 409:
                    LOG.warning("provisioning %s/%s failed: %s", meta["namespace"], meta["name"], error)
        for pv in self.kube.get("/api/v1/persistentvolumes")["items"]:
            annotations = pv["metadata"].get("annotations") or {}
            if annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            if (pv.get("status") or {}).get("phase") == "Released" and pv["spec"].get(
                "persistentVolumeReclaimPolicy"
            ) == "Delete":
                path = Path(pv["spec"]["hostPath"]["path"])
                if self.state_dir in path.parents:
                    shutil.rmtree(path, ignore_errors=True)
                with contextlib.suppress(KubeError):
                    self.kube.delete(f"/api/v1/persistentvolumes/{pv['metadata']['name']}")

    def hosts_lines(self) -> list[str]:
        with self.lock:
            workers = [
                w for w in self.workers.values() if w.prepared and w.phase == "Running" and not w.lost()
            ]
        if not workers:
            return []
        services = self.kube.get("/api/v1/services")["items"]
        headless = {
            (s["metadata"]["namespace"], s["metadata"]["name"]): s
            for s in services
            if s["spec"].get("clusterIP") == "None"
        }
        lines = []
        hostnames = collections.Counter(w.hostname for w in workers)
        for worker in sorted(workers, key=lambda w: (w.ns, w.pod_name)):
            names = []
            subdomain = worker.pod["spec"].get("subdomain")
            if subdomain and (worker.ns, subdomain) in headless:
                base = f"{worker.hostname}.{subdomain}.{worker.ns}.svc"
                names += [f"{base}.cluster.local", base]
            if hostnames[worker.hostname] == 1:
                names.append(worker.hostname)
            labels = worker.pod["metadata"].get("labels") or {}
            for (ns, name), svc in sorted(headless.items()):
                selector = svc["spec"].get("selector") or {}
                if ns == worker.ns and selector and all(labels.get(k) == v for k, v in selector.items()):
                    names += [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc"]
            if names:
                lines.append(f"{worker.pod_ip}\t{' '.join(names)}")
        return lines

    def housekeeping_loop(self) -> None:
        last_hosts = 0.0
        while not self.stopping.wait(0.5):
            try:
                self.provision()
                if self.hosts_dirty.is_set() or time.monotonic() - last_hosts > 2:
                    self.hosts_dirty.clear()
                    write_hosts_block(self.state_dir, self.hosts_lines())
                    last_hosts = time.monotonic()
            except (KubeError, requests.RequestException, OSError) as error:
                LOG.warning("housekeeping failed: %s", error)

    # -- controls
    def lose_node(self, name: str) -> dict[str, Any]:
        node = self.nodes[name]
        node.lost = True
        if self.heartbeats is not None:
            self.heartbeats.lose(node)
        self.stop_kubelet(name)  # new connections are refused; open log streams freeze
        with self.lock:
            workers = [w for w in self.workers.values() if w.node == name]
        for worker in workers:
            worker.signal_all(signal.SIGKILL)
            worker.wake.set()
        self.hosts_dirty.set()
        LOG.info("node %s lost: %d pods' processes killed, heartbeats stopped", name, len(workers))
        return {"node": name, "lost": True, "killed_pods": [f"{w.ns}/{w.pod_name}" for w in workers]}

    def restore_node(self, name: str) -> dict[str, Any]:
        node = self.nodes[name]
        node.ready_since = now()
        node.lost = False
        try:
            server = KubeletServer(self, node, self.kubelet_port, self.kubelet_tls[name])
        except OSError as error:
            LOG.warning("node %s: kubelet port %d cannot be opened again: %s", name, self.kubelet_port, error)
        else:
            self.serve_kubelet(name, server)
        post_node_status(self.kube, node, self.kubelet_port)
        renew_lease(self.kube, node)
        if self.heartbeats is not None:
            self.heartbeats.restore(node)
        with self.lock:
            for worker in self.workers.values():
                if worker.node == name:
                    worker.wake.set()
        self.relist.set()
        LOG.info("node %s restored", name)
        return {"node": name, "lost": False}

    def kill_pod(self, ns: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            workers = [w for w in self.workers.values() if w.ns == ns and w.pod_name == name]
        if not workers:
            return None
        for worker in workers:
            worker.signal_all(signal.SIGKILL)
        return {"pod": f"{ns}/{name}", "killed": True, "node": workers[0].node}

    def pod_workers(self, ns: str, name: str) -> list[PodWorker]:
        with self.lock:
            return [w for w in self.workers.values() if w.ns == ns and w.pod_name == name]

    def pause_pod(self, ns: str, name: str) -> dict[str, Any] | None:
        """SIGSTOP every container's process group and wait until the main processes are stopped."""
        return self._stop_or_continue(ns, name, pause=True)

    def resume_pod(self, ns: str, name: str) -> dict[str, Any] | None:
        """SIGCONT every container's process group and wait until the main processes run again."""
        return self._stop_or_continue(ns, name, pause=False)

    def _stop_or_continue(self, ns: str, name: str, pause: bool) -> dict[str, Any] | None:
        workers = self.pod_workers(ns, name)
        if not workers:
            return None
        if any(w.lost() for w in workers):
            raise Conflict(f"pod {ns}/{name} is on node {workers[0].node}, which is lost (powered off)")
        sig = signal.SIGSTOP if pause else signal.SIGCONT
        pids = [pid for worker in workers for pid in worker.signal_all(sig)]
        if not pids:
            raise Conflict(f"pod {ns}/{name} has no running process to {'pause' if pause else 'resume'}")
        deadline = time.monotonic() + 5
        while any((process_state(pid) == "T") is not pause for pid in pids if process_state(pid)):
            if time.monotonic() > deadline:
                states = {pid: process_state(pid) for pid in pids}
                raise RuntimeError(
                    f"pod {ns}/{name}: processes {states} did not {'stop' if pause else 'continue'}"
                )
            time.sleep(0.01)
        LOG.info("pod %s/%s %s: pids %s", ns, name, "paused" if pause else "resumed", pids)
        return {"pod": f"{ns}/{name}", "node": workers[0].node, "paused": pause, "pids": pids}

    def hold_for(self, pod: dict[str, Any]) -> str | None:
        """The selector of a hold that matches ``pod`` (None: the pod may start)."""
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        with self.lock:
            holds = list(self.holds.items())
        for (ns, selector), terms in holds:
            if ns == meta["namespace"] and selector_matches(terms, labels):
                return selector
        return None

    def held_pods(self, ns: str, selector: str) -> list[str]:
        with self.lock:
            workers = list(self.workers.values())
        # A pod deleted while held is no longer held, even while its worker winds down.
        return sorted(
            w.pod_name
            for w in workers
            if w.ns == ns
            and w.held()
            and w.deletion_grace is None
            and not w.gone.is_set()
            and self.hold_for(w.pod) == selector
        )

    def hold_pods(self, ns: str, selector: str) -> dict[str, Any]:
        """Keep matching pods of ``ns`` on this agent's nodes from starting (Pending, ContainerCreating)."""
        terms = parse_selector(selector)
        with self.lock:
            self.holds[(ns, selector)] = terms
        LOG.info("holding pods %s in %s", selector, ns)
        return {"namespace": ns, "selector": selector, "held": self.held_pods(ns, selector)}

    def release_pods(self, ns: str, selector: str) -> dict[str, Any] | None:
        """Drop the hold ``hold_pods(ns, selector)`` placed (None if there is none); the pods start."""
        held = self.held_pods(ns, selector)
        with self.lock:
            if self.holds.pop((ns, selector), None) is None:
                return None
        LOG.info("released pods %s in %s: %s", selector, ns, held)
        return {"namespace": ns, "selector": selector, "released": held}

    def status(self) -> dict[str, Any]:
        with self.lock:
            workers = list(self.workers.values())
            holds = list(self.holds)
        return {
            "nodes": {
                n.name: {
                    "ip": n.ip,
                    "lost": n.lost,
                    "pods": [f"{w.ns}/{w.pod_name}" for w in workers if w.node == n.name],
                }
                for n in self.nodes.values()
            },
            "pods": [w.describe() for w in workers],
            "holds": [
                {"namespace": ns, "selector": selector, "held": self.held_pods(ns, selector)}
                for ns, selector in holds
            ],
            "mount_namespaces": self.namespaces_ok,
        }

    def shutdown(self) -> None:
        """Stop every pod process (SIGTERM, 3 s, SIGKILL) and remove what the agent put on the host."""
        self.stopping.set()
        if self.heartbeats is not None:
            self.heartbeats.stop()
        for name in list(self.kubelet_servers):
            self.stop_kubelet(name)
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + 3
        for worker in workers:
            for container in worker.init_containers + worker.containers:
                if container.process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        container.process.wait(max(0.0, deadline - time.monotonic()))
            worker.signal_all(signal.SIGKILL)
        remove_hosts_block(self.state_dir)
        # Mount points created on the host (/shared/output, /dev/termination-log, ...) stay: removing
        # one would detach the same path's mounts in the pods of any other cluster running now.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.nodeagent", description="the testbed's node agent")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--kubeconfig", required=True, help="admin kubeconfig (for reference; pki/ is used)")
    parser.add_argument("--nodes", required=True, help="comma-separated node names")
    parser.add_argument("--port", type=int, required=True, help="control API port on 127.0.0.1")
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument(
        "--kubelet-port",
        type=int,
        default=10250,
        help="log endpoint port on each node address (else any free)",
    )
    parser.add_argument(
        "--path-prefix", required=True, help="prepended to PATH inside pods (the venv's bin/)"
    )
    args = parser.parse_args(argv)
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # HTTPS probes, like the kubelet's
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    agent = Agent(args)
    agent.start_kubelet_servers(args.kubelet_port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    agent.register_nodes()
    agent.start_heartbeats()
    agent.ensure_storage_class()
    for target in (agent.watch_loop, agent.housekeeping_loop):
        threading.Thread(target=target, name=target.__name__, daemon=True).start()
    server = serve_controls(agent, args.port)
    LOG.info(
        "node agent ready: nodes %s, controls on 127.0.0.1:%d, kubelet endpoints on port %d, "
        "mount namespaces %s",
        sorted(agent.nodes),
        args.port,
        agent.kubelet_port,
        "on" if agent.namespaces_ok else "OFF",
    )
    done.wait()
    LOG.info("stopping")
    server.shutdown()
    agent.shutdown()
    return 0
