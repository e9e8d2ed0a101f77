"""Start, stop and describe the local cluster: etcd, the control plane and the node agent.

Owns the state directory (default ``~/.cache/relaunch/cluster``, or ``$RELAUNCH_CLUSTER_DIR``)::

    pki/                  certificates and keys (kept between runs, so warm starts are fast)
    kubeconfig            the admin's kubeconfig (O=system:masters)
    *.kubeconfig          the controller-manager's and the scheduler's identities
    state.json            pids, ports and nodes of the running cluster
    logs/<component>.log  each component's stdout and stderr (truncated by every `up`)
    etcd/                 etcd's data
    pods/<ns>/<pod>/<uid>/ the node agent's per-pod files: <container>.log, volumes, termination logs,
                          containers/<container>/<restart>.log (CRI format, served to `kubectl logs`)
    pv/<ns>/<claim>-<uid8>/ the folder behind each PersistentVolumeClaim (shared by the pods using it)
    (etcd/, pods/ and pv/ are wiped by every `up`; after `down` they stay for reading)

Every process is started in its own session and stopped by pid (checked against its command
line first, so that a recycled pid is never signalled), API server before etcd, SIGTERM then
SIGKILL after a deadline; `down` then checks that nothing listens on the cluster's ports.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from e2e.cluster.pki import Pki, ensure_pki

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = Path(__file__).resolve().parent / "build.sh"
DEFAULT_STATE_DIR = Path.home() / ".cache" / "relaunch" / "cluster"
# Pod processes carry this variable (value: the state directory) so that `down` can find any
# that outlived a crashed node agent without touching anything else on the machine.
POD_MARKER_ENV = "RELAUNCH_TESTBED_CLUSTER"
# Kept short for tests; the operator must never rely on it (a default cluster uses 50 s).
NODE_MONITOR_GRACE_PERIOD = "15s"
# kueue (e2e/cluster/kueue.py) runs only when a test asked for it
STOP_ORDER = ("kueue", "node-agent", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")

T = TypeVar("T")


class ClusterError(RuntimeError):
    """The cluster could not be started, reached or stopped; the message says what to do."""


class AlreadyRunning(ClusterError):
    """``up`` found this state directory's cluster running."""


def default_state_dir() -> Path:
    return Path(os.environ.get("RELAUNCH_CLUSTER_DIR") or DEFAULT_STATE_DIR)


def log(message: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    describe: str | Callable[[], str],
    interval: float = 0.25,
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail after ``timeout`` s.

    Exceptions raised by the predicate count as "not yet" and the last one is shown on failure,
    with ``describe`` (a string, or a function called at failure time to describe the state).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    last_error: BaseException | None = None
    while True:
        try:
            last = predicate()
            last_error = None
            if last:
                return last
        except ClusterError:
            raise  # a component died: waiting longer cannot help
        except Exception as error:  # the predicate may fail while things settle
            last_error = error
        if time.monotonic() >= deadline:
            what = describe() if callable(describe) else describe
            detail = f"; last error: {last_error!r}" if last_error is not None else f"; last value: {last!r}"
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


def binaries_dir() -> Path:
    """The directory holding the testbed's binaries (``$RELAUNCH_TESTBED_BIN``, else build.sh builds or
    finds them; a cached build takes milliseconds)."""
    override = os.environ.get("RELAUNCH_TESTBED_BIN")
    if override:
        return Path(override)
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise ClusterError(f"{BUILD_SCRIPT} failed (exit {done.returncode}); its progress log is above")
    return Path(done.stdout.strip().splitlines()[-1])


def venv_bin() -> Path:
    """The project's virtual environment's bin/ (first on PATH inside pods)."""
    candidate = REPO_ROOT / ".venv" / "bin"
    return candidate if (candidate / "python").exists() else Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (all held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ----------------------------------------------------------------------------------------------
# processes


def _proc_cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child of ours is reaped and counts as gone)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Processes this Python process started: their liveness comes from Popen (right after exec the
# kernel may not show the new command line yet, so /proc cannot be trusted for them).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _owned_pid(pid: int, state_dir: Path) -> bool:
    """The pid still runs one of this cluster's processes (its command line names the state dir)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    cmdline = _proc_cmdline(pid)
    return cmdline is not None and str(state_dir) in cmdline and pid_alive(pid)


def stop_pids(pids: dict[str, int], state_dir: Path, deadline_s: float) -> list[str]:
    """SIGTERM the processes' groups, wait up to ``deadline_s``, SIGKILL what is left; returns notes."""
    notes = []
    live = {name: pid for name, pid in pids.items() if _owned_pid(pid, state_dir)}
    for pid in live.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and any(pid_alive(pid) for pid in live.values()):
        time.sleep(0.05)
    for name, pid in live.items():
        if pid_alive(pid):
            notes.append(f"{name} (pid {pid}) ignored SIGTERM for {deadline_s:g} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    end = time.monotonic() + 5
    while time.monotonic() < end and any(pid_alive(pid) for pid in live.values()):
        time.sleep(0.05)
    return notes


def marked_pod_pids(state_dir: Path) -> list[int]:
    """Processes started by this cluster's node agent (their environment carries the marker)."""
    marker = f"{POD_MARKER_ENV}={state_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            found.append(int(entry.name))
    return found


# ----------------------------------------------------------------------------------------------
# the cluster handle


@dataclass
class Cluster:
    """A running cluster as seen by its users: kubeconfig, state, logs, node-agent controls."""

    state_dir: Path
    kubeconfig: Path
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    bin_dir: Path | None = None
    started_at: float = 0.0
    owner_pid: int | None = None  # a process that uses the cluster for its lifetime (a pytest session)

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def agent_url(self) -> str | None:
        port = self.ports.get("agent")
        return f"http://127.0.0.1:{port}" if port else None

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def kubectl(self) -> str:
        return str(self.bin_dir / "kubectl") if self.bin_dir else "kubectl"

    def api_client(self) -> Any:
        from kubernetes import config  # imported late: `status`/`down` work without it

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def log_tail(self, component: str, lines: int = 40) -> str:
        path = self.logs_dir / f"{component}.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return f"(no log at {path})"
        return "\n".join(text.splitlines()[-lines:])

    def pod_dirs(self, namespace: str, name: str) -> list[Path]:
        """Per-pod folders of the node agent for this pod name, oldest first (one per pod uid)."""
        root = self.state_dir / "pods" / namespace / name
        if not root.is_dir():
            return []
        return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """stdout+stderr of the newest pod with this name (one container, or all, headed by name)."""
        dirs = self.pod_dirs(namespace, name)
        if not dirs:
            return ""
        logs = sorted(dirs[-1].glob("*.log"))
        if container is not None:
            path = dirs[-1] / f"{container}.log"
            return path.read_text(errors="replace") if path.exists() else ""
        if len(logs) == 1:
            return logs[0].read_text(errors="replace")
        return "".join(f"==> {p.stem} <==\n{p.read_text(errors='replace')}" for p in logs)

    def save(self) -> None:
        data = {
            "kubeconfig": str(self.kubeconfig),
            "ports": self.ports,
            "pids": self.pids,
            "nodes": self.nodes,
            "bin_dir": str(self.bin_dir) if self.bin_dir else None,
            "started_at": self.started_at,
            "owner_pid": self.owner_pid,
        }
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_dir / "state.json")

    @classmethod
    def load(cls, state_dir: Path) -> Cluster | None:
        try:
            data = json.loads((state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(
            state_dir=state_dir,
            kubeconfig=Path(data["kubeconfig"]),
            ports={k: int(v) for k, v in data.get("ports", {}).items()},
            pids={k: int(v) for k, v in data.get("pids", {}).items()},
            nodes=list(data.get("nodes", [])),
            bin_dir=Path(data["bin_dir"]) if data.get("bin_dir") else None,
            started_at=float(data.get("started_at", 0.0)),
            owner_pid=data.get("owner_pid"),
        )

    def running(self) -> dict[str, bool]:
        return {name: _owned_pid(pid, self.state_dir) for name, pid in self.pids.items()}

    def agent(self) -> AgentControl:
        if self.agent_url is None:
            raise ClusterError(f"no node agent is recorded in {self.state_dir}/state.json")
        return AgentControl(self.agent_url, self)


class AgentControl:
    """Client of the node agent's control API (``POST /lose_node/<name>`` and friends).

    Each control acts as the machine under a kubelet would: processes are signalled, the API server
    learns only what the agent reports, and the real controllers react to that. A pod or node the
    agent does not run raises ``ClusterError`` (404)."""

    def __init__(self, url: str, cluster: Cluster | None = None) -> None:
        self.url = url
        self.cluster = cluster

    def _call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            raise ClusterError(f"node agent {method} {path} answered {error.code}: {body}") from None
        except urllib.error.URLError as error:
            raise ClusterError(
                f"node agent at {self.url} unreachable ({error.reason}); is the cluster up?"
            ) from None

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/status")
        return result

    def kill_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """SIGKILL every process of the pod (its containers then report exit code 137)."""
        result: dict[str, Any] = self._call("POST", f"/kill_pod/{namespace}/{name}")
        return result

    def lose_node(self, name: str) -> dict[str, Any]:
        """Power the node off: its heartbeats stop, its processes are SIGKILLed, its pods freeze."""
        result: dict[str, Any] = self._call("POST", f"/lose_node/{name}")
        return result

    def restore_node(self, name: str) -> dict[str, Any]:
        """Power the node on again: heartbeats resume; its old pods report their containers as killed."""
        result: dict[str, Any] = self._call("POST", f"/restore_node/{name}")
        return result

    def pause_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """SIGSTOP every process of the pod's containers (each container's process group), a hang.

        Returns once the processes are stopped (``/proc/<pid>/stat`` state ``T``; ``pids`` in the
        answer). The pod stays Running in the API; no probe, timer or signal handler of its own runs.
        Deleting it still works: the SIGTERM stays pending, so it dies by SIGKILL at the end of its
        grace period, as on a kubelet. ``ClusterError`` (409) if no process of the pod runs."""
        result: dict[str, Any] = self._call("POST", f"/pause_pod/{_segment(namespace)}/{_segment(name)}")
        return result

    def resume_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """SIGCONT what ``pause_pod`` stopped; returns once the processes run again."""
        result: dict[str, Any] = self._call("POST", f"/resume_pod/{_segment(namespace)}/{_segment(name)}")
        return result

    def hold_pods(self, namespace: str, selector: str) -> dict[str, Any]:
        """Do not start pods of ``namespace`` matching the label ``selector`` (``k=v``, ``k!=v``,
        joined by commas) until ``release_pods`` with the same selector.

        Held pods are bound (PodScheduled True) but stay Pending: containers waiting with reason
        ``ContainerCreating``, no pod IP, ``PodReadyToStartContainers`` False -- a kubelet slow to
        mount a volume or pull an image. Pods already started are not affected; a held pod that is
        deleted terminates at once and reports phase Failed, as a kubelet does. Answers the names of
        the pods held right now (``held``)."""
        query = urllib.parse.urlencode({"selector": selector})
        result: dict[str, Any] = self._call("POST", f"/hold_pods/{_segment(namespace)}?{query}")
        return result

    def release_pods(self, namespace: str, selector: str) -> dict[str, Any]:
        """Drop the hold placed with this exact ``selector``: its pods start (``released``: their names)."""
        query = urllib.parse.urlencode({"selector": selector})
        result: dict[str, Any] = self._call("POST", f"/release_pods/{_segment(namespace)}?{query}")
        return result

    def holds(self) -> list[dict[str, Any]]:
        """The holds in force: ``{"namespace", "selector", "held": [pod names]}`` each."""
        result: list[dict[str, Any]] = self.status()["holds"]
        return result

    def paused_pods(self) -> list[tuple[str, str]]:
        """(namespace, name) of every pod with a container stopped by ``pause_pod``."""
        return [(p["namespace"], p["name"]) for p in self.status()["pods"] if p.get("paused")]

    def lost_nodes(self) -> list[str]:
        return [n for n, info in self.status()["nodes"].items() if info["lost"]]

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        if self.cluster is None:
            raise ClusterError("pod logs need the cluster's state directory")
        return self.cluster.pod_log(namespace, name, container)


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def evict_pod(api_client: Any, namespace: str, name: str, grace_period_seconds: int | None = None) -> None:
    """Evict a pod through the API server's Eviction subresource (``policy/v1``), as ``kubectl drain``
    does: the API server checks PodDisruptionBudgets, sets the pod's ``DisruptionTarget`` condition
    (reason ``EvictionByEvictionAPI``) and deletes it gracefully (its own grace period unless
    ``grace_period_seconds`` is given). The node agent then terminates it like any deleted pod.

    ``api_client``: a ``kubernetes.client.ApiClient`` (the ``kube`` fixture, the admin). A budget
    that forbids the eviction raises ``kubernetes.client.ApiException`` with status 429."""
    from kubernetes import client as k8s  # imported late: `status`/`down` work without it

    body: dict[str, Any] = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": name, "namespace": namespace},
    }
    if grace_period_seconds is not None:
        body["deleteOptions"] = {"gracePeriodSeconds": grace_period_seconds}
    k8s.CoreV1Api(api_client).create_namespaced_pod_eviction(name, namespace, body)


# ----------------------------------------------------------------------------------------------
# up / down / status


def _kubeconfig(path: Path, api_url: str, pki: Pki, user: str) -> None:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "relaunch",
                "cluster": {"server": api_url, "certificate-authority-data": b64(pki.ca_crt)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(pki.crt(user)),
                    "client-key-data": b64(pki.key(user)),
                },
            }
        ],
        "contexts": [{"name": "relaunch", "context": {"cluster": "relaunch", "user": user}}],
        "current-context": "relaunch",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


def _get(url: str, pki: Pki | None = None, timeout: float = 2.0) -> str:
    context = ssl.create_default_context()
    if pki is not None:
        context.load_verify_locations(str(pki.ca_crt))
        context.load_cert_chain(str(pki.crt("admin")), str(pki.key("admin")))
    else:  # the controller-manager's and scheduler's serving certificates are self-signed
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
        return str(response.read().decode())


def _spawn(name: str, argv: list[str], logs: Path, env: dict[str, str] | None = None) -> int:
    out = (logs / f"{name}.log").open("ab")
    process = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        cwd=REPO_ROOT, env=env,
    )  # fmt: skip
    out.close()
    _CHILDREN[process.pid] = process
    return process.pid


def _check_alive(cluster: Cluster) -> bool:
    """True if every process started so far runs; raises (with their log tails) otherwise."""
    dead = [name for name, alive in cluster.running().items() if not alive]
    if dead:
        tails = "\n".join(f"--- {n} log (tail) ---\n{cluster.log_tail(n, 25)}" for n in dead)
        raise ClusterError(f"{', '.join(dead)} exited during start-up:\n{tails}")
    return True


def up(
    state_dir: Path | None = None, nodes: int = 3, bin_dir: Path | None = None, owner_pid: int | None = None
) -> Cluster:
    """Start etcd, the control plane and the node agent; return once every node is Ready.

    ``owner_pid`` records the process the cluster belongs to (see ``owned_by_another_process``)."""
    state_dir = (state_dir or default_state_dir()).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    existing = Cluster.load(state_dir)
    if existing is not None:
        alive = [n for n, a in existing.running().items() if a]
        if alive:
            raise AlreadyRunning(
                f"a cluster is already running from {state_dir} ({', '.join(alive)}); "
                f"use it (KUBECONFIG={existing.kubeconfig}) or stop it with `python -m e2e.cluster down`"
            )
        down(state_dir, quiet=True)  # leftovers of a crashed run: pod processes, hosts entries
    start = time.monotonic()
    bin_dir = bin_dir or binaries_dir()
    for tool in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"):
        if not (bin_dir / tool).exists():
            raise ClusterError(f"{bin_dir / tool} is missing; run `bash {BUILD_SCRIPT}`")
    pki = ensure_pki(state_dir / "pki")
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    for old in logs.glob("*.log"):
        old.write_bytes(b"")
    etcd_data = state_dir / "etcd"
    # every run starts from an empty cluster; the previous run's pod files and volumes go with it
    for stale in (etcd_data, state_dir / "pods", state_dir / "pv"):
        if stale.exists():
            subprocess.run(["rm", "-rf", str(stale)], check=True)
    names = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "agent")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    kubeconfig = state_dir / "kubeconfig"
    cluster = Cluster(
        state_dir=state_dir, kubeconfig=kubeconfig, ports=ports, bin_dir=bin_dir, started_at=time.time(),
        nodes=[f"node-{i}" for i in range(nodes)], owner_pid=owner_pid,
    )  # fmt: skip

    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    cluster.pids["etcd"] = _spawn("etcd", [
        str(bin_dir / "etcd"), "--name=testbed", f"--data-dir={etcd_data}",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=testbed={peer_url}", "--unsafe-no-fsync", "--log-level=warn",
    ], logs)  # fmt: skip
    cluster.save()
    wait_for(lambda: _check_alive(cluster) and '"health":"true"' in _get(etcd_url + "/health"), 30, "etcd")
    log(f"etcd ready on {etcd_url} ({time.monotonic() - start:.1f} s)")

    api_url = cluster.api_url
    cluster.pids["kube-apiserver"] = _spawn("kube-apiserver", [
        str(bin_dir / "kube-apiserver"), f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
        # the loopback advertise address is refused by the default endpoint reconciler
        "--endpoint-reconciler-type=none",
        f"--tls-cert-file={pki.crt('apiserver')}", f"--tls-private-key-file={pki.key('apiserver')}",
        f"--client-ca-file={pki.ca_crt}", f"--cert-dir={state_dir / 'pki'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
        "--authorization-mode=Node,RBAC", "--service-cluster-ip-range=10.96.0.0/16",
        "--allow-privileged=true", "--profiling=false",
        # pods/log (kubectl logs) reaches the node agent's kubelet endpoint at the node's InternalIP
        # and daemonEndpoints port, over TLS verified against the cluster CA, with this identity
        f"--kubelet-client-certificate={pki.crt('apiserver-kubelet-client')}",
        f"--kubelet-client-key={pki.key('apiserver-kubelet-client')}",
        f"--kubelet-certificate-authority={pki.ca_crt}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
    ], logs)  # fmt: skip
    cluster.save()
    wait_for(
        lambda: _check_alive(cluster) and _get(api_url + "/readyz", pki) == "ok",
        60,
        "kube-apiserver /readyz",
    )
    log(f"kube-apiserver ready on {api_url} ({time.monotonic() - start:.1f} s)")

    _kubeconfig(kubeconfig, api_url, pki, "admin")
    for user in ("controller-manager", "scheduler"):
        _kubeconfig(state_dir / f"{user}.kubeconfig", api_url, pki, user)
    cm_kc = state_dir / "controller-manager.kubeconfig"
    cluster.pids["kube-controller-manager"] = _spawn("kube-controller-manager", [
        str(bin_dir / "kube-controller-manager"), f"--kubeconfig={cm_kc}",
        f"--authentication-kubeconfig={cm_kc}", f"--authorization-kubeconfig={cm_kc}",
        "--bind-address=127.0.0.1", f"--secure-port={ports['controller-manager']}",
        f"--cert-dir={state_dir / 'pki' / 'controller-manager-serving'}",
        "--leader-elect=false", "--use-service-account-credentials",
        f"--root-ca-file={pki.ca_crt}", f"--service-account-private-key-file={pki.sa_key}",
        f"--cluster-signing-cert-file={pki.ca_crt}", f"--cluster-signing-key-file={pki.ca_key}",
        f"--node-monitor-grace-period={NODE_MONITOR_GRACE_PERIOD}", "--node-monitor-period=2s",
        "--profiling=false",
    ], logs)  # fmt: skip
    sched_kc = state_dir / "scheduler.kubeconfig"
    cluster.pids["kube-scheduler"] = _spawn("kube-scheduler", [
        str(bin_dir / "kube-scheduler"), f"--kubeconfig={sched_kc}",
        f"--authentication-kubeconfig={sched_kc}", f"--authorization-kubeconfig={sched_kc}",
        "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}",
        f"--cert-dir={state_dir / 'pki' / 'scheduler-serving'}", "--leader-elect=false", "--profiling=false",
    ], logs)  # fmt: skip
    agent_env = dict(os.environ, PYTHONUNBUFFERED="1")
    cluster.pids["node-agent"] = _spawn("node-agent", [
        sys.executable, "-m", "e2e.nodeagent", f"--state-dir={state_dir}", f"--kubeconfig={kubeconfig}",
        f"--port={ports['agent']}", f"--nodes={','.join(cluster.nodes)}", f"--path-prefix={venv_bin()}",
        f"--api-port={ports['apiserver']}", f"--ca-file={pki.ca_crt}",
    ], logs, env=agent_env)  # fmt: skip
    cluster.save()

    def components_healthy() -> bool:
        _check_alive(cluster)
        for name in ("controller-manager", "scheduler"):
            if _get(f"https://127.0.0.1:{ports[name]}/healthz") != "ok":
                return False
        return _get(f"{cluster.agent_url}/healthz") == "ok"

    wait_for(components_healthy, 60, "controller-manager, scheduler and node agent /healthz")
    log(f"controller-manager, scheduler and node agent healthy ({time.monotonic() - start:.1f} s)")
    client = cluster.api_client()
    from kubernetes import client as k8s

    core = k8s.CoreV1Api(client)

    def nodes_ready() -> bool:
        _check_alive(cluster)
        ready = set()
        for node in core.list_node().items:
            conditions = (node.status.conditions if node.status else None) or []
            if any(c.type == "Ready" and c.status == "True" for c in conditions) and node.metadata:
                ready.add(node.metadata.name)
        # the service-account controller must have run before pods can be created
        core.read_namespaced_service_account("default", "default")
        return ready >= set(cluster.nodes)

    wait_for(nodes_ready, 60, f"nodes {cluster.nodes} Ready and the default ServiceAccount")
    client.close()
    log(f"cluster up in {time.monotonic() - start:.1f} s: {len(cluster.nodes)} nodes Ready")
    return cluster


def owned_by_another_process(state_dir: Path) -> int | None:
    """The pid of another live process (e.g. a concurrent pytest session) that runs the cluster in
    ``state_dir``, or None when it is free to take over or to clean up."""
    cluster = Cluster.load(state_dir)
    if cluster is None or not cluster.owner_pid or cluster.owner_pid == os.getpid():
        return None
    if not pid_alive(cluster.owner_pid) or not any(cluster.running().values()):
        return None
    return cluster.owner_pid


def down(state_dir: Path | None = None, quiet: bool = False) -> list[str]:
    """Stop everything the cluster in ``state_dir`` started; returns problems (empty: all clean)."""
    state_dir = (state_dir or default_state_dir()).resolve()
    cluster = Cluster.load(state_dir)
    problems: list[str] = []
    if cluster is None:
        if not quiet:
            log(f"no cluster recorded in {state_dir}")
        return problems
    if any(name in cluster.pids for name in ("kubelet", "containerd")):
        from e2e.cluster import realnode

        problems += realnode.stop(state_dir, quiet=quiet)
        cluster = Cluster.load(state_dir) or cluster
    deadlines = {"node-agent": 20.0, "kube-apiserver": 10.0}
    for name in STOP_ORDER:
        if name in cluster.pids:
            problems_here = stop_pids({name: cluster.pids[name]}, state_dir, deadlines.get(name, 5.0))
            if not quiet:
                for note in problems_here:
                    log(note)
    # pod processes that outlived the node agent (e.g. it was SIGKILLed)
    leftovers = marked_pod_pids(state_dir)
    if leftovers:
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not quiet:
            log(f"killed {len(leftovers)} leftover pod processes")
    from e2e.nodeagent import remove_hosts_block

    remove_hosts_block(state_dir)
    for name, pid in cluster.pids.items():
        if pid_alive(pid) and _owned_pid(pid, state_dir):
            problems.append(f"{name} (pid {pid}) is still running")
    for name, port in cluster.ports.items():
        if is_listening(port):
            problems.append(f"port {port} ({name}) still accepts connections")
    if not problems:
        (state_dir / "state.json").unlink(missing_ok=True)
    if not quiet:
        log("cluster stopped, nothing left listening" if not problems else "; ".join(problems))
    return problems


def status(state_dir: Path | None = None) -> dict[str, Any]:
    state_dir = (state_dir or default_state_dir()).resolve()
    cluster = Cluster.load(state_dir)
    if cluster is None:
        return {"state_dir": str(state_dir), "running": False}
    running = cluster.running()
    result: dict[str, Any] = {
        "state_dir": str(state_dir),
        "running": all(running.values()) and bool(running),
        "components": {n: {"pid": cluster.pids[n], "alive": a} for n, a in running.items()},
        "ports": cluster.ports,
        "kubeconfig": str(cluster.kubeconfig),
        "uptime_s": round(time.time() - cluster.started_at, 1),
    }
    if running.get("node-agent"):
        with contextlib.suppress(ClusterError):
            result["agent"] = cluster.agent().status()
    return result


def usage_text(cluster: Cluster) -> str:
    kubectl_dir = cluster.bin_dir or Path("<bin>")
    return (
        f"kubeconfig: {cluster.kubeconfig}\n"
        f"  export KUBECONFIG={cluster.kubeconfig}\n"
        f"  export PATH={kubectl_dir}:$PATH   # this kubectl (and helm) match the server, v1.37\n"
        f"  kubectl get nodes\n"
        f"node agent controls: curl -X POST {cluster.agent_url}/lose_node/node-1   "
        f"(also /restore_node/<node>, /kill_pod/<ns>/<pod>, GET /status)\n"
        f"logs: {cluster.logs_dir}/<component>.log; pod output: {cluster.state_dir}/pods/<ns>/<pod>/<uid>/\n"
        f"stop: python -m e2e.cluster down"
    )
