"""The node agent: stands in for the kubelet of N nodes and runs their pods as local processes.

Started by ``python -m e2e.cluster up`` (``python -m e2e.nodeagent --help``). What it does:

* **Nodes**: registers each Node (capacity, addresses ``127.<b>.0.<i>``, a ``Ready`` condition),
  renews its ``Lease`` in ``kube-node-lease`` every 2 s and its status every 10 s, like a kubelet.
* **Pods** bound to its nodes (by the real scheduler) run as child processes: each container's
  ``command`` + ``args`` (images are ignored; the project's venv ``bin/`` is first on ``PATH``),
  with ``env``/``envFrom`` (downward-API ``fieldRef``, configMap/secret keys, ``$(VAR)``
  expansion), ``workingDir``, and the Kubernetes service environment
  (``KUBERNETES_SERVICE_HOST=127.0.0.1``, ``KUBERNETES_SERVICE_PORT=<secure port>``).
* **Volumes** become host folders under ``<state>/pods/<ns>/<pod>/<uid>/volumes/``: emptyDir
  (a folder), configMap/secret/downwardAPI/projected (materialised files, including the
  service-account token from the TokenRequest API, bound to the pod), hostPath (as is), and
  persistentVolumeClaim (the bound PV's hostPath; the agent provisions PVs for the default
  StorageClass ``testbed`` in ``<state>/pv/<ns>/<claim>-<uid8>/``, shared by every pod using the
  claim, like NFS). Each container runs in its own mount and UTS namespace
  (``unshare --mount --uts``) where every volume is bind-mounted at its ``mountPath`` and the
  termination-message file at ``terminationMessagePath``; its hostname is the pod's. The sources
  are staged first, so a mount at ``/tmp`` (or over the state dir) hides none of them
  (``mount_script``).
* **Networking**: each pod gets its own loopback address ``127.<b>.<x>.<y>`` as ``status.podIP``.
  Names are published in a managed block of ``/etc/hosts``: ``<hostname>.<subdomain>.<ns>.svc``
  (and ``.svc.cluster.local``) for pods whose ``subdomain`` names a headless Service, the
  headless Service's own name for the Running pods it selects, and the pod's bare hostname.
* **Status** is reported like a kubelet: Pending → Running (podIP, hostIP, containerStatuses
  with ``state.running.startedAt``, conditions) → Succeeded/Failed with exit code, reason and
  termination message; ``restartPolicy`` Never/OnFailure/Always; graceful deletion (SIGTERM,
  grace period, SIGKILL, then a terminal phase is reported -- also for a pod deleted before it
  ran, as a kubelet does -- and the pod is deleted with grace 0). Status goes out as a strategic
  merge patch of ``pods/status``: conditions merge by ``type``, so the ``DisruptionTarget`` that
  the Eviction API sets stays.
* **Controls** over HTTP on 127.0.0.1 (client: ``e2e.cluster.AgentControl``):
  ``POST /kill_pod/<ns>/<pod>`` (SIGKILL), ``POST /lose_node/<node>`` (heartbeats stop,
  processes are SIGKILLed, the node's pods freeze: a powered-off machine),
  ``POST /restore_node/<node>``, ``POST /pause_pod/<ns>/<pod>`` and ``/resume_pod/<ns>/<pod>``
  (SIGSTOP/SIGCONT to each container's process group: a hang the API still shows as Running),
  ``POST /hold_pods/<ns>?selector=k=v,...`` and ``/release_pods/<ns>?selector=...`` (matching
  pods that have not started stay Pending with containers waiting in ``ContainerCreating``, as on
  a kubelet slow to mount a volume, until released), ``GET /status``, ``GET /healthz``.

Pods share the host's network namespace: a pod listening on ``0.0.0.0:<port>`` takes that port
from every other pod (of every cluster on the machine); servers should bind ``$(POD_IP)``
(``status.podIP`` through a ``fieldRef``). Mount points created on the host for ``mountPath``s
(``/shared/output``, ``/dev/termination-log``, the staging folder ``/run/relaunch-testbed-stage``,
...) are left in place: removing one would detach that path's mounts in the pods of any other
cluster running at the time.

Probes: readiness and liveness (httpGet and tcpSocket against the pod IP, exec inside the
container's namespaces); a container without a readiness probe is Ready as soon as it runs.
Logs: each container's stdout and stderr go through one pipe (one stream, in order) to the plain
``<pod dir>/<container>.log`` (every run appended; ``Cluster.pod_log`` reads it) and to a CRI log
file per run, ``<pod dir>/containers/<container>/<restart>.log``, each line stamped with the time it
arrived. Each node serves the kubelet's ``GET /containerLogs/<ns>/<pod>/<container>`` over HTTPS on
its own address (port 10250, or one the kernel picks if that is taken anywhere, published in the
Node's ``status.daemonEndpoints``), with a serving certificate for that address signed by the
cluster CA, to clients with a certificate from the same CA (the API server's kubelet client): so
``pods/log`` and ``kubectl logs [-f]`` work through the API server. Honoured: ``follow`` (chunked,
each write flushed, until the run's output ends or the client leaves), ``tailLines`` (and the
older ``tail``), ``limitBytes``, ``sinceSeconds``/``sinceTime``, ``timestamps``, ``previous`` (the
run before the last). A lost node's endpoint refuses connections; a stream open when it was lost
stops and is reset when the node comes back.

Not done: startup and grpc probes (taken as passing; a startup probe also disables the
liveness probe, which would wait for it), resource limits, ClusterIP
Services (no kube-proxy: use headless Services and pod names), image entrypoints (a container
needs a ``command``), ``kubectl exec``/``attach``/``port-forward``, split ``stdout``/``stderr``
log streams (the alpha ``stream`` query), authorization of log requests beyond the client
certificate (a kubelet would ask the API server with a SubjectAccessReview).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import requests
import urllib3

from e2e.cluster.pki import ensure_leaf

LOG = logging.getLogger("nodeagent")
#: Host environment every pod process inherits (machine-level library settings, not the agent's).
MACHINE_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
HOSTS_FILE = Path(os.environ.get("RELAUNCH_HOSTS_FILE", "/etc/hosts"))
HOSTS_LOCK = Path("/tmp/relaunch-testbed-hosts.lock")
POD_MARKER_ENV = "RELAUNCH_TESTBED_CLUSTER"
STORAGE_CLASS = "testbed"
PROVISIONER = "relaunch.dev/testbed-hostpath"
KUBELET_VERSION = "v1.37.2"
LEASE_RENEW_S = 2.0
NODE_STATUS_S = 10.0
NODE_CPU = "32"
NODE_MEMORY = "128Gi"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


OCTET_LOCKS = Path("/tmp/relaunch-testbed-octets")


def claim_address_octet(state_dir: Path) -> tuple[int, Any]:
    """Second octet of this cluster's loopback addresses, unique among the agents running now.

    Each agent holds an flock on ``/tmp/relaunch-testbed-octets/<octet>`` for its lifetime (the
    kernel releases it when the agent dies), trying first the octet its state dir hashes to.
    Returns the octet and the open lock file (keep it open).
    """
    OCTET_LOCKS.mkdir(exist_ok=True)
    first = int(hashlib.sha256(str(state_dir).encode()).hexdigest(), 16) % 200
    for i in range(200):
        octet = 16 + (first + i) % 200
        handle = (OCTET_LOCKS / str(octet)).open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return octet, handle
    raise RuntimeError(f"all 200 address ranges in {OCTET_LOCKS} are held by running node agents")


# ----------------------------------------------------------------------------------------------
# /etc/hosts


def _hosts_markers(state_dir: Path) -> tuple[str, str]:
    return f"# BEGIN relaunch-testbed {state_dir}", f"# END relaunch-testbed {state_dir}"


def write_hosts_block(state_dir: Path, lines: list[str]) -> None:
    """Replace this cluster's block in /etc/hosts (other content and other clusters' blocks kept)."""
    begin, end = _hosts_markers(state_dir)
    with HOSTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = HOSTS_FILE.read_text()
        except FileNotFoundError:
            old = ""
        kept, inside = [], False
        for line in old.splitlines():
            if line == begin:
                inside = True
            elif line == end and inside:
                inside = False
            elif not inside:
                kept.append(line)
        new_lines = kept + ([begin, *lines, end] if lines else [])
        new = "\n".join(new_lines) + "\n"
        if new == old:
            return
        tmp = HOSTS_FILE.with_name(HOSTS_FILE.name + ".relaunch-tmp")
        try:  # atomic when /etc/hosts is a plain file
            tmp.write_text(new)
            tmp.chmod(HOSTS_FILE.stat().st_mode & 0o777 if HOSTS_FILE.exists() else 0o644)
            tmp.replace(HOSTS_FILE)
        except OSError:  # a bind-mounted /etc/hosts cannot be replaced: rewrite it in place
            tmp.unlink(missing_ok=True)
            with HOSTS_FILE.open("w") as out:
                out.write(new)


def remove_hosts_block(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        write_hosts_block(state_dir, [])


# ----------------------------------------------------------------------------------------------
# a small REST client (explicit content types; one requests session per thread)


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Kube:
    def __init__(self, server: str, ca: Path, cert: Path, key: Path) -> None:
        self.server = server
        self.ca, self.cert, self.key = str(ca), str(cert), str(key)
        self.local = threading.local()

    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self.local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # REQUESTS_CA_BUNDLE would silently replace our CA
            session.verify = self.ca
            session.cert = (self.cert, self.key)
            self.local.session = session
        return session

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        data = json.dumps(body) if body is not None else None
        response = self.session().request(
            method,
            self.server + path,
            data=data,
            params=params,
            timeout=timeout,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise KubeError(response.status_code, message)
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params or None)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, body)

    def patch(self, path: str, body: Any, strategic: bool = True) -> Any:
        kind = "strategic-merge-patch" if strategic else "merge-patch"
        return self.call("PATCH", path, body, content_type=f"application/{kind}+json")

    def delete(self, path: str, body: Any = None) -> Any:
        return self.call("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_s: int = 240) -> Any:
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        with self.session().get(self.server + path, params=params, stream=True, timeout=timeout_s + 30) as r:
            if r.status_code >= 400:
                raise KubeError(r.status_code, r.text)
            for line in r.iter_lines():
                if line:
                    yield json.loads(line)


def pod_path(ns: str, name: str) -> str:
    return f"/api/v1/namespaces/{ns}/pods/{name}"


def parse_selector(text: str) -> list[tuple[str, bool, str]]:
    """A label selector of equality terms (``k=v``, ``k==v``, ``k!=v``, joined by commas) as
    (key, equal, value) triples; raises ValueError on anything else (set-based terms included)."""
    terms = []
    for term in text.split(","):
        term = term.strip()
        match = re.fullmatch(r"([A-Za-z0-9._/-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)", term)
        if match is None:
            raise ValueError(
                f"label selector {text!r}: term {term!r} is not key=value, key==value or key!=value"
            )
        terms.append((match.group(1), match.group(2) != "!=", match.group(3)))
    return terms


def selector_matches(terms: list[tuple[str, bool, str]], labels: dict[str, str]) -> bool:
    """Kubernetes' meaning: ``k=v`` needs the label with that value, ``k!=v`` is true when it is absent."""
    return all((labels.get(key) == value) is equal for key, equal, value in terms)


def process_state(pid: int) -> str | None:
    """The one-letter state in ``/proc/<pid>/stat`` (``T``: stopped by a signal), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


# ----------------------------------------------------------------------------------------------
# env and volumes


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, ``$$`` escapes, others stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, value)


def field_ref(pod: dict[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)(?:\['(.*)'\])?", path)
    if match:
        values = meta.get(match.group(1)) or {}
        if match.group(2) is not None:
            return str(values.get(match.group(2), ""))
        return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
    raise ValueError(f"unsupported fieldRef {path!r}")


class Conflict(Exception):
    """A control that cannot apply to the pod as it is now (HTTP 409)."""


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it, from each process's parent in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


class NotReadyYet(Exception):
    """Something the pod needs does not exist yet (a ConfigMap, a bound PVC): retry later."""


def _write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# a container's mounts

# Where a container's mount sources are staged, first one that no mountPath of the container covers.
# Each container mounts a private tmpfs there in its own mount namespace: the host keeps an empty folder.
STAGE_CANDIDATES = (
    Path("/run/relaunch-testbed-stage"),
    Path("/var/lib/relaunch-testbed-stage"),
    Path("/mnt/relaunch-testbed-stage"),
)


def _covers(target: PurePosixPath, path: PurePosixPath) -> bool:
    return path == target or target in path.parents


def choose_stage(targets: list[str], candidates: tuple[Path, ...]) -> Path:
    """The first candidate folder that no mount target hides (the sources are reached through it)."""
    normal = [PurePosixPath(os.path.normpath(t)) for t in targets]
    for candidate in candidates:
        if not any(_covers(t, PurePosixPath(candidate)) for t in normal):
            return candidate
    raise ValueError(
        f"every staging folder {[str(c) for c in candidates]} lies under one of the mountPaths {targets}; "
        "mount volumes elsewhere"
    )


def image_paths(path_prefix: Path) -> tuple[Path, ...]:
    """The host folders that stand in for a container image: the venv that ``path_prefix``
    (its ``bin/``) belongs to, and the source tree holding that venv (editable install)."""
    venv = path_prefix.resolve().parent
    return (venv.parent, venv) if (venv.parent / "pyproject.toml").exists() else (venv,)


def keep_image_visible(
    mounts: list[tuple[Path, str, bool]], images: tuple[Path, ...]
) -> list[tuple[Path, str, bool]]:
    """Re-bind every image folder that a volume's mountPath would hide (an emptyDir at ``/tmp``
    hides a checkout under ``/tmp``), as a real image's files stay visible under a volume
    mounted elsewhere. The last entry (the termination log) stays last."""
    targets = [PurePosixPath(os.path.normpath(target)) for _, target, _ in mounts]
    hidden = [
        image
        for image in images
        if any(_covers(target, PurePosixPath(image)) and target != PurePosixPath(image) for target in targets)
    ]
    if not hidden:
        return mounts
    return [*mounts[:-1], *((image, str(image), False) for image in hidden), *mounts[-1:]]


def mount_script(
    hostname: str,
    mounts: list[tuple[Path, str, bool]],
    workdir: str,
    stage: Path,
    is_dir: Callable[[Path], bool] = Path.is_dir,
) -> str:
    """The shell script that sets up one container's mount namespace, then ``exec "$@"``.

    ``mounts`` are (host source, mountPath, read-only). A bind made at ``/tmp`` hides every later
    source under ``/tmp`` -- the cluster's state folder may well lie there, with the emptyDirs,
    the service-account files and the termination-log file. So every source is first bound into
    ``stage`` (a private tmpfs) while the host's view is intact; then the targets are bound from
    there, shallowest mountPath first so that no later mount hides an earlier one (a volume at
    ``/dev`` lies below ``/dev/termination-log``; at equal depth the later mount wins, so callers
    put the termination log last); read-only remounts come last, so a mountPath inside a read-only
    volume can still be created; finally the stage is detached.
    """
    planned = [(source, os.path.normpath(target), ro, is_dir(source)) for source, target, ro in mounts]
    ordered = sorted(enumerate(planned), key=lambda item: (len(PurePosixPath(item[1][1]).parts), item[0]))
    q_stage = shlex.quote(str(stage))
    # the new UTS namespace's hostname (no dependency on a `hostname` binary)
    lines = ["set -e", f"printf %s {shlex.quote(hostname)} > /proc/sys/kernel/hostname"]
    if ordered:
        lines.append(f"mkdir -p {q_stage}; mount -t tmpfs -o size=1m,mode=0700 relaunch-stage {q_stage}")
    for index, (source, _, _, directory) in ordered:
        staged = shlex.quote(str(stage / str(index)))
        lines.append(f"mkdir {staged}" if directory else f": > {staged}")
        lines.append(f"mount --bind {shlex.quote(str(source))} {staged}")
    for index, (_, target, _, directory) in ordered:
        q_tgt = shlex.quote(target)
        if directory:
            lines.append(f"mkdir -p {q_tgt}")
        else:
            parent = shlex.quote(str(PurePosixPath(target).parent))
            lines.append(f"mkdir -p {parent}; [ -e {q_tgt} ] || : > {q_tgt}")
        lines.append(f"mount --bind {shlex.quote(str(stage / str(index)))} {q_tgt}")
    for _, (_, target, read_only, _) in ordered:
        if read_only:
            lines.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
    if ordered:
        lines.append(f"umount -l {q_stage}")
    lines.append(f"mkdir -p {shlex.quote(workdir)}; cd {shlex.quote(workdir)}")
    lines.append('exec "$@"')
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# container logs, as a container runtime keeps them and a kubelet serves them

#: A record of a CRI log file: ``<RFC3339 time, 9 fraction digits> <stream> <F|P> <content>\n``
#: (``P``: a partial line, continued by the next record).
_RECORD = re.compile(rb"(\S+) (stdout|stderr) ([FP]) (.*)", re.DOTALL)


def rfc3339_nano(ns: int) -> str:
    """A wall-clock time in nanoseconds as the runtime writes it (``2026-11-30T10:00:00.000000001Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def parse_rfc3339(text: str) -> int:
    """RFC 3339 (``Z`` or an offset, any fraction) to nanoseconds since the epoch; ValueError if not."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 time")
    seconds = int(
        dt.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC).timestamp()
    )
    zone = match.group(3)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    fraction = (match.group(2) or "").ljust(9, "0")
    return seconds * 10**9 + int(fraction)


def cri_records(data: bytes, stamp: str, partial_before: bool = False) -> bytes:
    """``data`` read from a container's output at ``stamp``, as CRI log records (one per line piece)."""
    pieces = data.split(b"\n")
    out = [stamp.encode() + b" stdout F " + piece + b"\n" for piece in pieces[:-1]]
    if pieces[-1]:
        out.append(stamp.encode() + b" stdout P " + pieces[-1] + b"\n")
    return b"".join(out)


class LogRun:
    """One run of a container: its output is read from a pipe and appended to the pod's plain
    ``<container>.log`` (all runs, as the testbed always kept it) and to this run's CRI log file
    ``containers/<container>/<restart>.log`` (each line with the time it arrived), which the
    kubelet log endpoint serves. ``changed`` is notified on every write and at the end."""

    def __init__(self, path: Path, plain: Path) -> None:
        self.path = path
        self.plain = plain
        self.changed = threading.Condition()
        self.ended = False  # the output is complete: the pipe closed, or the process exited
        self.thread: threading.Thread | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    def start(self, read_fd: int, name: str) -> None:
        self.thread = threading.Thread(target=self.copy, args=(read_fd,), name=f"log-{name}", daemon=True)
        self.thread.start()

    def copy(self, read_fd: int) -> None:
        try:
            with self.plain.open("ab") as plain, self.path.open("ab") as timed:
                while True:
                    try:
                        data = os.read(read_fd, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        break
                    stamp = rfc3339_nano(time.time_ns())
                    plain.write(data)
                    plain.flush()
                    timed.write(cri_records(data, stamp))
                    timed.flush()
                    with self.changed:
                        self.changed.notify_all()
        finally:
            os.close(read_fd)
            self.end()

    def end(self) -> None:
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def finish(self, timeout: float = 2.0) -> None:
        """The process exited: wait (bounded: a child may keep the pipe open) until its output is
        in the files, then mark the run complete."""
        if self.thread is not None:
            self.thread.join(timeout)
        self.end()


class LogOptions:
    """The kubelet's ``PodLogOptions`` query (``/containerLogs/...?follow=...``) as the agent honours it."""

    BOOLS = ("follow", "previous", "timestamps")

    def __init__(self, query: dict[str, list[str]]) -> None:
        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        def boolean(name: str) -> bool:
            value = one(name)
            if value is None or value == "":
                return False
            if value in ("1", "t", "T", "true", "TRUE", "True"):
                return True
            if value in ("0", "f", "F", "false", "FALSE", "False"):
                return False
            raise ValueError(f"{name}={value!r} is not a boolean")

        def integer(name: str) -> int | None:
            value = one(name)
            return None if value is None else int(value)

        self.follow, self.previous, self.timestamps = (boolean(n) for n in self.BOOLS)
        tail = one("tail")  # the kubelet's older spelling; "all" means no limit
        self.tail_lines = integer("tailLines") if tail is None else (None if tail == "all" else int(tail))
        self.limit_bytes = integer("limitBytes")
        since_seconds = integer("sinceSeconds")
        since_time = one("sinceTime")
        if since_seconds is not None and since_time is not None:
            raise ValueError("at most one of sinceTime and sinceSeconds may be given")
        if since_seconds is not None and since_seconds < 1:
            raise ValueError("sinceSeconds must be greater than 0")
        if self.tail_lines is not None and self.tail_lines < 0:
            raise ValueError("tailLines must be 0 or greater")
        if self.limit_bytes is not None and self.limit_bytes < 1:
            raise ValueError("limitBytes must be greater than 0")
        self.since_ns = (
            time.time_ns() - since_seconds * 10**9
            if since_seconds is not None
            else (parse_rfc3339(since_time) if since_time is not None else None)
        )
        stream = one("stream")
        if stream not in (None, "All"):  # the alpha PodLogsQuerySplitStreams gate is off
            raise ValueError(f"unable to return the given log stream: {stream!r}")


class LogRenderer:
    """Turns CRI records into what the kubelet writes for ``options``: since-filtered, optionally
    timestamped at each line's start, cut at ``limitBytes``."""

    def __init__(self, options: LogOptions) -> None:
        self.options = options
        self.remain = options.limit_bytes if options.limit_bytes is not None else -1
        self.line_start = True

    @property
    def full(self) -> bool:
        return self.remain == 0

    def render(self, records: list[bytes]) -> bytes:
        out = []
        for record in records:
            if self.full:
                break
            match = _RECORD.fullmatch(record.rstrip(b"\n"))
            if match is None:
                continue
            stamp, _, tag, content = match.groups()
            if tag == b"F":
                content += b"\n"
            at_start, self.line_start = self.line_start, tag == b"F"
            if self.options.since_ns is not None and parse_rfc3339(stamp.decode()) < self.options.since_ns:
                continue
            if self.options.timestamps and at_start:
                content = stamp + b" " + content
            if self.remain >= 0:
                content = content[: self.remain]
                self.remain -= len(content)
            out.append(content)
        return b"".join(out)


def tail_start(records: list[bytes], lines: int | None) -> int:
    """Index of the first record of the last ``lines`` lines (a line: partial records up to a full one)."""
    if lines is None:
        return 0
    starts = [0] + [i + 1 for i, record in enumerate(records) if record.split(b" ", 3)[2:3] == [b"F"]]
    if starts[-1] == len(records):
        starts.pop()  # no partial line at the end
    return starts[-lines] if 0 < lines <= len(starts) else (0 if lines > 0 else len(records))


# ----------------------------------------------------------------------------------------------
# pods


class Container:
    """One container's process and its reported state."""

    def __init__(self, spec: dict[str, Any], init: bool, waiting_reason: str = "ContainerCreating") -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at: str | None = None
        self.restart_count = 0
        self.state: dict[str, Any] = {"waiting": {"reason": waiting_reason}}
        self.last_state: dict[str, Any] = {}
        self.restart_at: float | None = None  # monotonic time of a pending restart (back-off)
        self.started_mono = 0.0
        # probe kind -> {"next": monotonic time, "failures": n, "successes": n}; reset at each start
        self.probes: dict[str, dict[str, float]] = {}
        self.probed_ready = "readinessProbe" not in spec  # no probe: Ready as soon as it runs
        self.runs: list[LogRun] = []  # one per start, oldest first (``previous`` is the one before last)

    @property
    def ready(self) -> bool:
        return self.running and not self.init and self.probed_ready

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def terminated(self) -> dict[str, Any] | None:
        return self.state.get("terminated")

    def status(self, pod_uid: str) -> dict[str, Any]:
        image = self.spec.get("image", "")
        status = {
            "name": self.name,
            "image": image,
            "imageID": f"testbed://{image}",
            "ready": self.ready,
            "started": self.running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.process is not None:
            status["containerID"] = f"testbed://{pod_uid}/{self.name}/{self.process.pid}"
        return status


class PodWorker(threading.Thread):
    """Runs one pod from preparation to removal, reporting its status like a kubelet."""

    def __init__(self, agent: Agent, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = meta["uid"]
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.node: str = pod["spec"]["nodeName"]
        self.dir = agent.state_dir / "pods" / self.ns / self.pod_name / self.uid
        self.restart_policy: str = pod["spec"].get("restartPolicy", "Always")
        # a kubelet's default waiting reason for every container of a pod that has init containers
        init_specs = pod["spec"].get("initContainers") or []
        self.default_waiting = "PodInitializing" if init_specs else "ContainerCreating"
        self.init_containers = [Container(c, True, self.default_waiting) for c in init_specs]
        self.containers = [Container(c, False, self.default_waiting) for c in pod["spec"]["containers"]]
        self.pod_ip = ""
        self.host_ip = agent.nodes[self.node].ip
        self.hostname = (pod["spec"].get("hostname") or self.pod_name)[:63]
        self.phase = "Pending"
        self.start_time = now()
        self.started = time.monotonic()  # for spec.activeDeadlineSeconds, counted from startTime
        self.reason: str | None = None  # status.reason / status.message of a pod the agent failed
        self.message: str | None = None
        self.conditions: dict[str, dict[str, Any]] = {}
        self.volumes: dict[str, Path] = {}
        self.gone = threading.Event()  # the Pod object no longer exists
        self.kill_requested = threading.Event()
        self.lock = threading.Lock()
        self.last_reported: Any = None
        self.initialized = not self.init_containers
        self.prepared = False
        self.finalized = False

    # -- events from the watcher and the controls
    def update(self, pod: dict[str, Any]) -> None:
        with self.lock:
            self.pod = pod

    @property
    def deletion_grace(self) -> int | None:
        meta = self.pod["metadata"]
        if not meta.get("deletionTimestamp"):
            return None
        return int(meta.get("deletionGracePeriodSeconds") or 0)

    def signal_all(self, sig: int) -> list[int]:
        """Send ``sig`` to every process of every running container; returns their main pids.

        Every process: the container's process group and any descendant that left it (a launcher
        such as msrun starting its workers in sessions of their own), as a kubelet reaches every
        process in the container's cgroup. The tree is read before any signal, so a child whose
        parent dies first is not lost. A stopped (paused) process keeps a SIGTERM pending without
        acting on it; SIGKILL ends it."""
        signalled = []
        for container in self.init_containers + self.containers:
            if container.running and container.process is not None:
                pid = container.process.pid
                tree = process_tree(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
                    signalled.append(pid)
                for other in tree:
                    if other != pid:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(other, sig)
        return signalled

    def paused_containers(self) -> list[str]:
        """Containers whose main process is stopped by a signal (state ``T``): ``pause_pod``'s doing."""
        return [
            c.name
            for c in self.init_containers + self.containers
            if c.running and c.process is not None and process_state(c.process.pid) == "T"
        ]

    def held(self) -> bool:
        """A hold matches this pod and none of its containers has started: it must not start yet."""
        started = any(c.process is not None for c in self.init_containers + self.containers)
        return not started and self.agent.hold_for(self.pod) is not None

    def lost(self) -> bool:
        return self.agent.nodes[self.node].lost

    # -- the pod's life
    def run(self) -> None:
        try:
            self.live()
        except Exception as error:  # a testbed bug: say so in the pod's status rather than hang
            LOG.exception("pod %s/%s: worker failed", self.ns, self.pod_name)
            self.signal_all(signal.SIGKILL)
            for container in self.init_containers + self.containers:
                if not container.terminated:
                    message = f"node agent error: {error!r}"
                    container.state = {
                        "terminated": {"exitCode": 128, "reason": "StartError", "message": message}
                    }
            self.phase = "Failed"
            with contextlib.suppress(Exception):
                self.report()
            self.gone.wait()  # keep the IP and files until the pod is deleted
        finally:
            self.signal_all(signal.SIGKILL)
            self.agent.forget(self)

    def live(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pod_ip = self.agent.allocate_ip()
        self.report()
        while not self.prepared:
            if self.gone.is_set():
                return
            if self.deletion_grace is not None and not self.lost():
                self.finish_deletion()
                return
            if not self.lost():
                if self.past_active_deadline():
                    self.fail_active_deadline()
                    while not self.gone.is_set():  # a failed pod is still deleted gracefully
                        if self.deletion_grace is not None and not self.lost():
                            self.finish_deletion()
                            return
                        time.sleep(0.1)
                    return
                self.set_pending_conditions()
                if self.held():
                    # as a kubelet slow to mount a volume or pull an image shows it: no sandbox, no IP
                    self.set_waiting(self.default_waiting, None)
                    self.report()
                    time.sleep(0.2)
                    continue
                try:
                    self.prepare()
                    self.prepared = True
                    break
                except NotReadyYet as why:
                    self.set_waiting("ContainerCreating", str(why))
                except Exception as error:  # a volume or env the testbed cannot provide
                    LOG.exception("pod %s/%s: preparation failed", self.ns, self.pod_name)
                    self.set_waiting("CreateContainerConfigError", str(error))
                self.report()
            time.sleep(1)
        self.set_condition("PodReadyToStartContainers", True)
        if self.initialized:
            self.set_condition("Initialized", True)
        was_lost = False
        while not self.gone.is_set():
            if self.lost():
                was_lost = True
                for container in self.init_containers + self.containers:
                    if container.process is not None:
                        container.process.poll()  # reap, but a powered-off node reports nothing
                time.sleep(0.1)
                continue
            if was_lost:
                was_lost = False
                self.after_power_on()
            if self.deletion_grace is not None:
                self.finish_deletion()
                return
            if self.kill_requested.is_set():
                self.kill_requested.clear()
                self.signal_all(signal.SIGKILL)
            if self.phase not in ("Succeeded", "Failed") and self.past_active_deadline():
                self.fail_active_deadline()
            self.step()
            self.report()
            time.sleep(0.1)

    def past_active_deadline(self) -> bool:
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        return deadline is not None and time.monotonic() - self.started >= int(deadline)

    def fail_active_deadline(self) -> None:
        """A pod active on the node past ``activeDeadlineSeconds`` (counted from its startTime,
        held or pending included): the kubelet kills it and fails it with reason DeadlineExceeded."""
        procs = [c for c in self.init_containers + self.containers if c.running]
        self.signal_all(signal.SIGKILL)
        for container in procs:
            if container.process is not None:
                code = container.process.wait()
                if "running" in container.state:
                    self.record_exit(container, code, allow_restart=False)
        self.settle_container_states()
        self.phase = "Failed"
        self.reason = "DeadlineExceeded"
        self.message = "Pod was active on the node longer than the specified deadline"
        self.set_terminal_conditions()
        self.report()
        LOG.info("pod %s/%s: active deadline exceeded, killed", self.ns, self.pod_name)

    def prepare(self) -> None:
        """Materialise every volume (raises NotReadyYet while a referenced object is missing)."""
        for volume in self.pod["spec"].get("volumes") or []:
            self.volumes[volume["name"]] = self.agent.materialise_volume(self, volume)

    def step(self) -> None:
        """Start, reap and restart processes; compute the phase."""
        if self.phase in ("Succeeded", "Failed"):
            return
        if not self.initialized:
            for container in self.init_containers:
                if self.advance(container):
                    failed = container.terminated is not None and container.terminated["exitCode"] != 0
                    if failed and self.restart_policy == "Never":
                        self.phase = "Failed"
                        for main in self.containers:
                            main.state = {"waiting": {"reason": "PodInitializing"}}
                        return
                    continue
                return  # this init container is still running or waiting to restart
            self.initialized = True
            self.set_condition("Initialized", True)
        for container in self.containers:
            self.advance(container)
            if container.running:
                self.probe(container)
        if all(c.terminated and c.restart_at is None for c in self.containers):
            failed = any(c.terminated and c.terminated["exitCode"] != 0 for c in self.containers)
            self.phase = "Failed" if failed else "Succeeded"
            self.set_terminal_conditions()
        else:
            # As the kubelet's getPhase: a pod none of whose containers has started yet (each still
            # waiting, e.g. CreateContainerConfigError) is Pending, not Running; a container that
            # ran before and waits to restart counts as having run.
            started = any(
                c.running or c.terminated or c.last_state.get("terminated") for c in self.containers
            )
            self.phase = "Running" if started else "Pending"
            unready = [c.name for c in self.containers if not c.ready]
            message = f"containers with unready status: [{' '.join(unready)}]" if unready else None
            for kind in ("Ready", "ContainersReady"):
                self.set_condition(kind, not unready, "ContainersNotReady" if unready else None, message)

    def advance(self, container: Container) -> bool:
        """Drive one container; True once it has terminated for good (no restart coming)."""
        if container.process is None:
            if container.terminated:
                return True  # it could not run at all
            if container.restart_at is None or time.monotonic() >= container.restart_at:
                container.restart_at = None
                self.launch(container)
            return False
        if container.running:
            code = container.process.poll()
            if code is None:
                return False
            self.record_exit(container, code)
        if container.restart_at is not None:
            if time.monotonic() >= container.restart_at:
                container.restart_at = None  # record_exit kept the last run in last_state
                container.restart_count += 1
                self.launch(container)
            return False
        return True

    def probe(self, container: Container) -> None:
        """Readiness and liveness probes (httpGet, tcpSocket, exec) as the kubelet runs them."""
        for kind in ("readinessProbe", "livenessProbe"):
            spec = container.spec.get(kind)
            if not spec or (kind == "livenessProbe" and "startupProbe" in container.spec):
                continue  # startup probes are not run, so liveness (which waits for them) is not either
            state = container.probes.setdefault(
                kind,
                {
                    "next": container.started_mono + spec.get("initialDelaySeconds", 0),
                    "failures": 0,
                    "successes": 0,
                },
            )
            if time.monotonic() < state["next"]:
                continue
            state["next"] = time.monotonic() + spec.get("periodSeconds", 10)
            ok = self.run_probe(container, spec)
            state["failures"] = 0 if ok else state["failures"] + 1
            state["successes"] = state["successes"] + 1 if ok else 0
            if kind == "readinessProbe":
                if ok and state["successes"] >= spec.get("successThreshold", 1):
                    container.probed_ready = True
                elif not ok and state["failures"] >= spec.get("failureThreshold", 3):
                    container.probed_ready = False
            elif not ok and state["failures"] >= spec.get("failureThreshold", 3) and container.process:
                LOG.info("pod %s/%s container %s failed its liveness probe: killed", self.ns, self.pod_name,
                         container.name)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(container.process.pid, signal.SIGKILL)

    def run_probe(self, container: Container, spec: dict[str, Any]) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))

        def port_number(port: Any) -> int:
            if isinstance(port, int) or str(port).isdigit():
                return int(port)
            for declared in container.spec.get("ports") or []:
                if declared.get("name") == port:
                    return int(declared["containerPort"])
            raise ValueError(f"no container port named {port!r}")

        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                scheme = get.get("scheme", "HTTP").lower()
                host, port = get.get("host") or self.pod_ip, port_number(get["port"])
                url = f"{scheme}://{host}:{port}{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                session = requests.Session()
                session.trust_env = False  # no proxies: the probe goes straight to the pod
                response = session.get(
                    url, headers=headers, timeout=timeout, verify=False, allow_redirects=False
                )
                return 200 <= response.status_code < 400
            if "tcpSocket" in spec:
                port = port_number(spec["tcpSocket"]["port"])
                with socket.create_connection(
                    (spec["tcpSocket"].get("host") or self.pod_ip, port), timeout=timeout
                ):
                    return True
            if "exec" in spec and container.process is not None:
                # inside the container's mount and UTS namespaces, with its environment
                argv = ["nsenter", "--target", str(container.process.pid), "--mount", "--uts", "--",
                        *spec["exec"]["command"]]  # fmt: skip
                env = self.agent.container_env(self, container.spec)
                done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, cwd="/")
                return done.returncode == 0
        except (OSError, ValueError, requests.RequestException, subprocess.TimeoutExpired, NotReadyYet):
            return False
        return True  # grpc and unknown probe kinds: not checked

    def record_exit(self, container: Container, code: int, allow_restart: bool = True) -> None:
        pid = container.process.pid if container.process else 0
        if container.runs:  # its output is in the log files before the exit is reported
            container.runs[-1].finish()
        exit_code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as a runtime reports
        term: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": container.started_at,
            "finishedAt": now(),
            "containerID": f"testbed://{self.uid}/{container.name}/{pid}",
        }
        if code < 0:
            term["signal"] = -code
        message = self.termination_message(container, exit_code)
        if message:
            term["message"] = message
        container.state = {"terminated": term}
        restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0)
        if container.init:
            restart = exit_code != 0 and self.restart_policy != "Never"
        if restart and allow_restart:
            backoff = min(10.0, 1.0 * 2**container.restart_count)
            container.restart_at = time.monotonic() + backoff
            container.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff" if exit_code else "Completed",
                    "message": f"back-off {backoff:g}s restarting {container.name}",
                }
            }
            container.last_state = {"terminated": term}
        LOG.info("pod %s/%s container %s exited %d", self.ns, self.pod_name, container.name, exit_code)

    def termination_message(self, container: Container, exit_code: int) -> str:
        path = self.dir / f"{container.name}.termination-log"
        try:
            message = path.read_bytes()[:4096].decode(errors="replace")
        except OSError:
            message = ""
        policy = container.spec.get("terminationMessagePolicy", "File")
        if not message and exit_code != 0 and policy == "FallbackToLogsOnError":
            try:
                lines = (self.dir / f"{container.name}.log").read_bytes()[-2048:].decode(errors="replace")
                message = "\n".join(lines.splitlines()[-80:])
            except OSError:
                pass
        return message

    def launch(self, container: Container) -> None:
        spec = container.spec
        command = list(spec.get("command") or []) + list(spec.get("args") or [])
        try:
            env = self.agent.container_env(self, spec)
        except NotReadyYet as why:
            container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(why)}}
            container.restart_at = time.monotonic() + 1
            container.process = None  # a retry of this start, not one more restart (restartCount)
            return
        command = [expand(part, env) for part in command]
        if not command:
            container.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "ContainerCannotRun",
                    "finishedAt": now(),
                    "message": "the testbed runs only containers with a command",
                }
            }
            container.process = None
            return
        termination_log = self.dir / f"{container.name}.termination-log"
        termination_log.write_bytes(b"")
        mounts: list[tuple[Path, str, bool]] = []
        for mount in spec.get("volumeMounts") or []:
            source = self.volumes.get(mount["name"])
            if source is None:
                container.state = {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "finishedAt": now(),
                        "message": f"volumeMount {mount['name']!r} names no volume",
                    }
                }
                return
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append((source, mount["mountPath"], bool(mount.get("readOnly"))))
        mounts.append((termination_log, spec.get("terminationMessagePath") or "/dev/termination-log", False))
        workdir = spec.get("workingDir") or "/"
        try:
            argv = self.agent.wrap(self, command, mounts, workdir)
        except ValueError as error:
            container.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "finishedAt": now(),
                    "message": str(error),
                }
            }
            return
        # stdout and stderr share one pipe (one stream, in order); the run's reader timestamps each line
        read_fd, write_fd = os.pipe()
        try:
            container.process = subprocess.Popen(
                argv,
                stdout=write_fd,
                stderr=write_fd,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                cwd="/",
            )
        except OSError as error:
            os.close(read_fd)
            container.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(error),
                    "finishedAt": now(),
                }
            }
            return
        finally:
            os.close(write_fd)
        run = LogRun(
            self.dir / "containers" / container.name / f"{container.restart_count}.log",
            self.dir / f"{container.name}.log",
        )
        run.start(read_fd, f"{self.ns}/{self.pod_name}/{container.name}")
        container.runs.append(run)
        container.started_at = now()
        container.started_mono = time.monotonic()
        container.probes = {}
        container.probed_ready = "readinessProbe" not in spec
        container.state = {"running": {"startedAt": container.started_at}}
        LOG.info(
            "pod %s/%s container %s started: pid %d",
            self.ns,
            self.pod_name,
            container.name,
            container.process.pid,
        )

    def after_power_on(self) -> None:
        """The node came back: what ran on it was killed when it lost power."""
        for container in self.init_containers + self.containers:
            if container.process is not None and "running" in container.state:
                code = container.process.poll()
                self.record_exit(container, code if code is not None else -signal.SIGKILL)

    def finish_deletion(self) -> None:
        """Graceful deletion: SIGTERM, wait the grace period, SIGKILL, report, delete with grace 0."""
        grace = self.deletion_grace or 0
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        procs = [c for c in self.init_containers + self.containers if c.running]
        while time.monotonic() < deadline and any(c.process and c.process.poll() is None for c in procs):
            if self.gone.is_set() or self.lost():
                break
            time.sleep(0.05)
        self.signal_all(signal.SIGKILL)
        for container in procs:
            if container.process is not None:
                code = container.process.wait()
                if "running" in container.state:
                    self.record_exit(container, code, allow_restart=False)
        if self.lost():
            return  # a node that lost power mid-deletion reports nothing; after restore the pod is re-handled
        self.settle_container_states()
        if self.phase not in ("Succeeded", "Failed"):
            # a kubelet gives every pod it terminates a terminal phase, also one whose containers never ran
            failed = any(c.terminated and c.terminated["exitCode"] != 0 for c in self.containers)
            self.phase = "Failed" if failed or not all(c.terminated for c in self.containers) else "Succeeded"
        self.set_terminal_conditions()
        self.report()
        self.agent.finalize_delete(self.ns, self.pod_name, self.uid)
        self.gone.wait(30)

    def settle_container_states(self) -> None:
        """The container states a kubelet reports for a pod it has terminated (its status manager's
        ``TerminatePod``): a container waiting to restart shows its last run; one that never ran shows
        ``ContainerStatusUnknown`` (exit 137) -- regular containers only once the pod has initialized,
        init containers up to the last one that was attempted (else the first)."""
        unknown = {
            "exitCode": 137,
            "reason": "ContainerStatusUnknown",
            "message": "The container could not be located when the pod was terminated",
        }

        def settle(container: Container) -> None:
            if container.terminated:
                return
            last = container.last_state.get("terminated")
            container.state = {"terminated": dict(last or unknown)}
            container.restart_at = None

        def attempted(container: Container) -> bool:
            return container.process is not None or bool(container.last_state)

        if not self.init_containers or self.initialized or any(attempted(c) for c in self.containers):
            for container in self.containers:
                settle(container)
        tried = [i for i, c in enumerate(self.init_containers) if attempted(c)]
        for container in self.init_containers[: (tried[-1] if tried else 0) + 1]:
            settle(container)

    def set_terminal_conditions(self) -> None:
        reason = "PodFailed" if self.phase == "Failed" else "PodCompleted"
        self.set_condition("Ready", False, reason)
        self.set_condition("ContainersReady", False, reason)

    # -- status
    def set_waiting(self, reason: str, message: str | None) -> None:
        for container in self.init_containers + self.containers:
            if container.process is None:
                waiting = {"reason": reason} if message is None else {"reason": reason, "message": message}
                container.state = {"waiting": waiting}

    def set_pending_conditions(self) -> None:
        """The kubelet's conditions for a pod whose containers have not started (no sandbox yet)."""
        self.set_condition("PodReadyToStartContainers", False)
        if self.init_containers:
            names = "[" + " ".join(c.name for c in self.init_containers) + "]"
            self.set_condition(
                "Initialized",
                False,
                "ContainersNotInitialized",
                f"containers with incomplete status: {names}",
            )
        else:
            self.set_condition("Initialized", True)
        names = "[" + " ".join(c.name for c in self.containers) + "]"
        for kind in ("Ready", "ContainersReady"):
            self.set_condition(kind, False, "ContainersNotReady", f"containers with unready status: {names}")

    def set_condition(
        self, kind: str, value: bool, reason: str | None = None, message: str | None = None
    ) -> None:
        status = "True" if value else "False"
        old = self.conditions.get(kind)
        wanted = (status, reason, message)
        if old is not None and (old["status"], old.get("reason"), old.get("message")) == wanted:
            return
        condition: dict[str, Any] = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            # as a kubelet: the transition time moves only when the status does
            "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == status else now(),
        }
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        self.conditions[kind] = condition

    def report(self) -> None:
        if self.lost() or self.gone.is_set():
            return
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "startTime": self.start_time,
            "conditions": list(self.conditions.values()),
            "containerStatuses": [c.status(self.uid) for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status(self.uid) for c in self.init_containers]
        if self.reason:
            status["reason"] = self.reason
            status["message"] = self.message
        if self.prepared:
            status["podIP"] = self.pod_ip
            status["podIPs"] = [{"ip": self.pod_ip}]
        if status == self.last_reported:
            return
        try:
            self.agent.kube.patch(pod_path(self.ns, self.pod_name) + "/status", {"status": status})
            self.last_reported = status
            self.agent.hosts_dirty.set()
        except KubeError as error:
            if error.status == 404:
                self.gone.set()
            else:
                LOG.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, error)
        except requests.RequestException as error:
            LOG.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, error)

    def describe(self) -> dict[str, Any]:
        return {
            "namespace": self.ns,
            "name": self.pod_name,
            "uid": self.uid,
            "node": self.node,
            "phase": self.phase,
            "podIP": self.pod_ip,
            "dir": str(self.dir),
            "pids": {c.name: c.process.pid for c in self.containers if c.running and c.process},
            "paused": self.paused_containers(),
            "held": self.held(),
        }


# ----------------------------------------------------------------------------------------------
# the agent


class NodeState:
    def __init__(self, name: str, ip: str) -> None:
        self.name = name
        self.ip = ip
        self.lost = False
        self.uid = ""
        self.ready_since = now()
        self.last_status = 0.0
        self.last_lease = 0.0


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

    def container_env(self, worker: PodWorker, spec: dict[str, Any]) -> dict[str, str]:
        port = str(self.api_port)
        env = {
            "PATH": f"{self.path_prefix}:{SYSTEM_PATH}",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "HOSTNAME": worker.hostname,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://127.0.0.1:{port}",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
            POD_MARKER_ENV: str(self.state_dir),
        }
        # The machine's own OpenBLAS settings (set on hosts whose CPU older OpenBLAS builds
        # misdetect) reach its processes as they reach the tests' local runs: without them the
        # kernels differ and numerics differ in the last bits from a reference run on the host.
        env.update({k: v for k, v in os.environ.items() if k in MACHINE_ENV})
        ns = worker.ns
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            ref = source.get("configMapRef") or source.get("secretRef")
            if ref is None:
                continue
            data = self.referenced_data(
                "configmaps" if "configMapRef" in source else "secrets",
                ns,
                ref["name"],
                bool(ref.get("optional")),
            )
            for key, value in data.items():
                env[prefix + key] = value.decode(errors="replace")
        for item in spec.get("env") or []:
            name = item["name"]
            if "value" in item or "valueFrom" not in item:
                env[name] = expand(item.get("value", ""), env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[name] = field_ref(
                    worker.pod, source["fieldRef"]["fieldPath"], worker.pod_ip, worker.host_ip
                )
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                kind, _, res = resource.partition(".")
                amount = ((spec.get("resources") or {}).get(kind) or {}).get(res)
                env[name] = (
                    str(amount)
                    if amount is not None
                    else {"cpu": NODE_CPU, "memory": NODE_MEMORY}.get(res, "0")
                )
            else:
                key_ref = source.get("configMapKeyRef") or source.get("secretKeyRef")
                if key_ref is None:
                    continue
                kind = "configmaps" if "configMapKeyRef" in source else "secrets"
                data = self.referenced_data(kind, ns, key_ref["name"], bool(key_ref.get("optional")))
                if key_ref["key"] in data:
                    env[name] = data[key_ref["key"]].decode(errors="replace")
                elif not key_ref.get("optional"):
                    raise NotReadyYet(f"{kind[:-1]} {ns}/{key_ref['name']} has no key {key_ref['key']!r}")
        return env

    def referenced_data(self, kind: str, ns: str, name: str, optional: bool) -> dict[str, bytes]:
        """The key → bytes content of a ConfigMap or Secret (empty if optional and missing)."""
        try:
            obj = self.kube.get(f"/api/v1/namespaces/{ns}/{kind}/{name}")
        except KubeError as error:
            if error.status == 404:
                if optional:
                    return {}
                raise NotReadyYet(f"{kind[:-1]} {ns}/{name} not found") from None
            raise
        result: dict[str, bytes] = {}
        if kind == "secrets":
            for key, value in (obj.get("data") or {}).items():
                result[key] = base64.b64decode(value)
        else:
            for key, value in (obj.get("data") or {}).items():
                result[key] = value.encode()
            for key, value in (obj.get("binaryData") or {}).items():
                result[key] = base64.b64decode(value)
        return result

    def write_items(
        self, target: Path, data: dict[str, bytes], items: list[dict[str, Any]] | None, default_mode: int
    ) -> None:
        if items:
            for item in items:
                if item["key"] in data:
                    _write_file(target / item["path"], data[item["key"]], item.get("mode", default_mode))
        else:
            for key, value in data.items():
                _write_file(target / key, value, default_mode)

    def materialise_volume(self, worker: PodWorker, volume: dict[str, Any]) -> Path:
        name = volume["name"]
        target = worker.dir / "volumes" / name
        ns = worker.ns
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            kind = volume["hostPath"].get("type", "")
            if kind == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate" and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            return path
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
            return target
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            try:
                pvc = self.kube.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
            except KubeError as error:
                if error.status == 404:
                    raise NotReadyYet(f"persistentvolumeclaim {ns}/{claim} not found") from None
                raise
            pv_name = pvc["spec"].get("volumeName")
            if not pv_name:
                raise NotReadyYet(f"persistentvolumeclaim {ns}/{claim} is not bound yet")
            pv = self.kube.get(f"/api/v1/persistentvolumes/{pv_name}")
            for kind in ("hostPath", "local"):
                if kind in pv["spec"]:
                    path = Path(pv["spec"][kind]["path"])
                    path.mkdir(parents=True, exist_ok=True)
                    return path
            raise ValueError(
                f"persistentvolume {pv_name} is neither hostPath nor local: the testbed cannot mount it"
            )
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume or "secret" in volume:
            kind = "configmaps" if "configMap" in volume else "secrets"
            source = volume.get("configMap") or volume["secret"]
            obj_name = source.get("name") or source.get("secretName")
            data = self.referenced_data(kind, ns, obj_name, bool(source.get("optional")))
            self.write_items(target, data, source.get("items"), source.get("defaultMode", 0o644))
            return target
        if "downwardAPI" in volume:
            self.write_downward(worker, target, volume["downwardAPI"].get("items") or [], 0o644)
            return target
        if "projected" in volume:
            mode = volume["projected"].get("defaultMode", 0o644)
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    token = self.request_token(worker, source["serviceAccountToken"])
                    _write_file(target / source["serviceAccountToken"]["path"], token.encode(), 0o600)
                elif "configMap" in source or "secret" in source:
                    kind = "configmaps" if "configMap" in source else "secrets"
                    ref = source.get("configMap") or source["secret"]
                    data = self.referenced_data(kind, ns, ref["name"], bool(ref.get("optional")))
                    self.write_items(target, data, ref.get("items"), mode)
                elif "downwardAPI" in source:
                    self.write_downward(worker, target, source["downwardAPI"].get("items") or [], mode)
            return target
        raise ValueError(
            f"volume {name!r}: type {sorted(set(volume) - {'name'})} is not supported by the testbed"
        )

    def write_downward(self, worker: PodWorker, target: Path, items: list[dict[str, Any]], mode: int) -> None:
        for item in items:
            if "fieldRef" in item:
                value = field_ref(worker.pod, item["fieldRef"]["fieldPath"], worker.pod_ip, worker.host_ip)
                _write_file(target / item["path"], value.encode(), item.get("mode", mode))

    def request_token(self, worker: PodWorker, source: dict[str, Any]) -> str:
        account = worker.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": worker.pod_name, "uid": worker.uid},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        try:
            result = self.kube.post(f"/api/v1/namespaces/{worker.ns}/serviceaccounts/{account}/token", body)
        except KubeError as error:
            if error.status == 404:
                raise NotReadyYet(f"serviceaccount {worker.ns}/{account} not found") from None
            raise
        return str(result["status"]["token"])

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
            self.node_status(node)
            self.renew_lease(node)

    def node_status(self, node: NodeState) -> None:
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
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
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
        self.kube.patch(f"/api/v1/nodes/{node.name}/status", {"status": status})
        node.last_status = time.monotonic()

    def renew_lease(self, node: NodeState) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node.name}"
        try:
            self.kube.patch(
                path, {"spec": {"holderIdentity": node.name, "renewTime": now_micro()}}, strategic=False
            )
        except KubeError as error:
            if error.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": node.name,
                    "ownerReferences": [
                        {"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid}
                    ],
                },
                "spec": {"holderIdentity": node.name, "leaseDurationSeconds": 40, "renewTime": now_micro()},
            }
            self.kube.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body)
        node.last_lease = time.monotonic()

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(0.5):
            for node in list(self.nodes.values()):
                if node.lost:
                    continue
                try:
                    if time.monotonic() - node.last_lease >= LEASE_RENEW_S:
                        self.renew_lease(node)
                    if time.monotonic() - node.last_status >= NODE_STATUS_S:
                        self.node_status(node)
                except (KubeError, requests.RequestException) as error:
                    LOG.warning("node %s: heartbeat failed: %s", node.name, error)

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
                    worker.gone.set()
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
                    worker.gone.set()
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
        hostnames = [w.hostname for w in workers]
        for worker in sorted(workers, key=lambda w: (w.ns, w.pod_name)):
            names = []
            subdomain = worker.pod["spec"].get("subdomain")
            if subdomain and (worker.ns, subdomain) in headless:
                base = f"{worker.hostname}.{subdomain}.{worker.ns}.svc"
                names += [f"{base}.cluster.local", base]
            if hostnames.count(worker.hostname) == 1:
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
        self.stop_kubelet(name)  # new connections are refused; open log streams freeze
        with self.lock:
            workers = [w for w in self.workers.values() if w.node == name]
        for worker in workers:
            worker.signal_all(signal.SIGKILL)
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
        self.node_status(node)
        self.renew_lease(node)
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


# ----------------------------------------------------------------------------------------------
# the kubelet's log endpoint, one HTTPS listener per node address

HANDSHAKE_TIMEOUT_S = 10.0
#: How often a follow stream with nothing new checks that its client and its node are still there.
FOLLOW_CHECK_S = 1.0


class LogRequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class KubeletServer(ThreadingHTTPServer):
    """``GET /containerLogs/<ns>/<pod>/<container>`` (and ``/healthz``) for one node, on the node's own
    address, as its kubelet serves them to the API server: TLS with the node's serving certificate,
    and a client certificate signed by the cluster CA required (no authorization beyond that)."""

    daemon_threads = True

    def __init__(self, agent: Agent, node: NodeState, port: int, context: ssl.SSLContext) -> None:
        self.agent = agent
        self.node = node
        self.context = context
        self.connections: dict[ssl.SSLSocket, bool] = {}  # open connection -> streaming a log now
        self.connections_lock = threading.Lock()
        super().__init__((node.ip, port), KubeletHandler)

    def drop_idle_connections(self) -> None:
        """Close every connection not streaming a log (kept-alive ones included), so that the API
        server's next request dials again (and finds nothing listening)."""
        with self.connections_lock:
            idle = [connection for connection, streaming in self.connections.items() if not streaming]
        for connection in idle:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def set_streaming(self, connection: ssl.SSLSocket, streaming: bool) -> None:
        with self.connections_lock:
            if connection in self.connections:
                self.connections[connection] = streaming

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would look the address up in DNS
        self.server_name, self.server_port = self.node.name, self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        # the TLS handshake runs here, in the connection's own thread, so a slow client blocks no other
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            connection = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            LOG.info("node %s: TLS handshake with %s refused: %s", self.node.name, client_address, error)
            return
        with self.connections_lock:
            self.connections[connection] = False
        try:
            connection.settimeout(None)
            self.RequestHandlerClass(connection, client_address, self)
        finally:
            with self.connections_lock:
                self.connections.pop(connection, None)
            with contextlib.suppress(OSError):
                connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOG.warning("node %s: request from %s failed", self.node.name, client_address, exc_info=True)


class ConnectionLost(Exception):
    """The node lost power while answering: the connection is dropped without a proper end."""


class KubeletHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: KubeletServer

    def log_message(self, format: str, *args: Any) -> None:
        LOG.info("kubelet %s: " + format, self.server.node.name, *args)

    def plain(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        if parts == ["healthz"]:
            self.plain(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.plain(404, f"404 page not found: {url.path}")
            return
        try:
            options = LogOptions(urllib.parse.parse_qs(url.query, keep_blank_values=True))
        except ValueError as error:
            self.plain(400, f"Invalid request: {error}")
            return
        try:
            run = self.server.agent.log_run(
                self.server.node.name, parts[1], parts[2], parts[3], options.previous
            )
        except LogRequestError as error:
            self.plain(error.status, str(error))
            return
        if self.server.node.lost:  # the request raced the power-off: no answer
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.server.set_streaming(self.connection, True)
        try:
            self.stream(run, options)
        except ConnectionLost:
            # a powered-off machine sends no end: reset the connection once it is back (or at shutdown)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True  # the client went away
            return
        finally:
            self.server.set_streaming(self.connection, False)
        self.wfile.write(b"0\r\n\r\n")

    def client_gone(self) -> bool:
        """The client closed the connection (or sent something, which a log stream's client never does)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def stream(self, run: LogRun, options: LogOptions) -> None:
        renderer = LogRenderer(options)
        node = self.server.node
        with run.path.open("rb") as log:
            pending = b""
            first = True
            while True:
                with run.changed:
                    ended = run.ended  # read before the file, so nothing written before the end is missed
                data = pending + log.read()
                cut = data.rfind(b"\n") + 1
                records, pending = data[:cut].splitlines(keepends=True), data[cut:]
                if first:
                    first = False
                    start = tail_start(records, options.tail_lines)
                    if options.tail_lines is not None and not options.follow:
                        records = records[start:]  # only those lines, even if more arrive meanwhile
                        self.chunk(renderer.render(records))
                        return
                    records = records[start:]
                self.chunk(renderer.render(records))
                if renderer.full or not options.follow:
                    return
                if node.lost:
                    self.wait_for_power()
                if ended:
                    return
                with run.changed:
                    if not run.ended and log.tell() >= run.path.stat().st_size:
                        run.changed.wait(FOLLOW_CHECK_S)
                if self.client_gone():
                    raise ConnectionAbortedError("the client closed the log stream")

    def wait_for_power(self) -> None:
        while self.server.node.lost and not self.server.agent.stopping.is_set():
            time.sleep(FOLLOW_CHECK_S)
        raise ConnectionLost


def serve_controls(agent: Agent, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            LOG.info("control: " + format, *args)

        def answer(self, code: int, body: Any) -> None:
            data = (json.dumps(body) if not isinstance(body, str) else body).encode()
            self.send_response(code)
            self.send_header(
                "Content-Type", "application/json" if not isinstance(body, str) else "text/plain"
            )
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self.answer(200, "ok")
            elif self.path == "/status":
                self.answer(200, agent.status())
            else:
                self.answer(404, {"error": f"no such resource {self.path}"})

        def do_POST(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
            query = urllib.parse.parse_qs(url.query)
            try:
                if len(parts) == 2 and parts[0] in ("lose_node", "restore_node"):
                    if parts[1] not in agent.nodes:
                        self.answer(404, {"error": f"no node {parts[1]!r}; nodes: {sorted(agent.nodes)}"})
                        return
                    result = (
                        agent.lose_node(parts[1]) if parts[0] == "lose_node" else agent.restore_node(parts[1])
                    )
                    self.answer(200, result)
                elif len(parts) == 3 and parts[0] in ("kill_pod", "pause_pod", "resume_pod"):
                    control = {
                        "kill_pod": agent.kill_pod,
                        "pause_pod": agent.pause_pod,
                        "resume_pod": agent.resume_pod,
                    }[parts[0]]
                    result = control(parts[1], parts[2])
                    if result is None:
                        self.answer(
                            404, {"error": f"pod {parts[1]}/{parts[2]} does not run on this agent's nodes"}
                        )
                    else:
                        self.answer(200, result)
                elif len(parts) == 2 and parts[0] in ("hold_pods", "release_pods"):
                    selector = (query.get("selector") or [""])[0]
                    if parts[0] == "hold_pods":
                        self.answer(200, agent.hold_pods(parts[1], selector))
                        return
                    released = agent.release_pods(parts[1], selector)
                    if released is None:
                        holds = [f"{ns}: {sel}" for ns, sel in agent.holds]
                        self.answer(404, {"error": f"no hold {selector!r} in {parts[1]}; holds: {holds}"})
                    else:
                        self.answer(200, released)
                else:
                    self.answer(404, {"error": f"unknown control {self.path}"})
            except ValueError as error:  # a malformed selector
                self.answer(400, {"error": str(error)})
            except Conflict as error:
                self.answer(409, {"error": str(error)})
            except Exception as error:
                LOG.exception("control %s failed", self.path)
                self.answer(500, {"error": repr(error)})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="controls", daemon=True).start()
    return server


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    agent = Agent(args)
    agent.start_kubelet_servers(args.kubelet_port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    agent.register_nodes()
    agent.ensure_storage_class()
    for target in (agent.heartbeat_loop, agent.watch_loop, agent.housekeeping_loop):
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


if __name__ == "__main__":
    raise SystemExit(main())
