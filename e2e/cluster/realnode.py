"""A real node in the local cluster: containerd, runc and a kubelet of the testbed's own release.

The node agent's emulated nodes run pods as processes from the checkout; this node runs them as
containers, from images, under a real kubelet, so the tests see what only a kubelet does: a
memory limit enforced by the kernel and reported as ``OOMKilled``, an image that is absent, a
read-only root filesystem and a numeric user really applied, graceful termination. It joins the
running cluster when a test first asks for it (the ``real_node`` fixture), as ``real-0``, labelled
and tainted ``relaunch.dev/real-node`` so that only pods that tolerate it land there.

What it is made of, and why (TESTBED.md, "A real kubelet node", has the measurements):

* **Network.** A kubelet refuses a loopback node address, and the tests may reach no address of the
  machine itself, so the node's address (198.18.0.2) lives in the network namespace the tests run
  in (``scripts/netns.sh``, which ``make e2e`` uses; the node refuses to start elsewhere). Pods get
  addresses on a bridge in that namespace (the standard ``bridge`` and ``host-local`` CNI plugins;
  no masquerading, no iptables rules). They reach the API server at the ``kubernetes`` Service's
  ClusterIP, 10.96.0.1:443, which ``e2e/cluster/svcproxy.py`` forwards as kube-proxy would.
* **Images without a registry.** The sandbox image is ``pause`` (e2e/cluster/pause, built by
  build.sh), put in an image by podman; the project's image is the one ``scripts/image.sh``
  builds. Both move from podman's storage to containerd's as OCI archives (``podman save``, ``ctr
  images import``; archives are cached by image ID). Pods use ``imagePullPolicy: Never``.
* **containerd** runs with a configuration of its own (runc v2 shim, cgroupfs, overlayfs, its
  root in the cluster's state directory, its socket under /run/relaunch-node/).
* **The kubelet** authenticates as ``system:node:real-0`` with a certificate signed by the cluster
  CA, serves its API (logs, exec) with another, and runs with what this machine kind needs:
  cgroup v1 allowed, cgroupfs, no swap check, no kernel-default protection, no node-allocatable
  enforcement, eviction thresholds low enough not to evict on a busy disk, no iptables chains.

Stopping (``stop``, also from ``down``) asks nothing of the kubelet: it kills every container of
this containerd (the shims' process trees), stops the kubelet and containerd, and unmounts what
they mounted under the state directory and the sandboxes' network namespaces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.control import (
    REPO_ROOT,
    Cluster,
    ClusterError,
    _kubeconfig,
    _spawn,
    free_ports,
    log,
    stop_pids,
    wait_for,
)
from e2e.cluster.pki import Pki, ensure_leaf
from e2e.nodeagent.pods import process_tree

NODE_NAME = "real-0"
#: Label and NoSchedule taint of the real node: pods that tolerate it (and select it) run there.
NODE_KEY = "relaunch.dev/real-node"
PAUSE_IMAGE = "localhost/relaunch-pause:1"
#: The operator's image as ``scripts/image.sh`` tags it.
PROJECT_IMAGE = os.environ.get("RELAUNCH_IMAGE") or "localhost/relaunch:dev"
POD_SUBNET = "10.88.0.0/24"
BRIDGE = "rlcni0"
CNI_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
IMAGE_CACHE = Path(os.environ.get("RELAUNCH_CACHE") or Path.home() / ".cache" / "relaunch") / "realnode"
IMAGE_SH = REPO_ROOT / "scripts" / "image.sh"
NETNS_SH = REPO_ROOT / "scripts" / "netns.sh"
#: Components in the order ``stop`` ends them (the kubelet first: it would start containers again).
COMPONENTS = ("kubelet", "service-proxy", "containerd")


class RealNodeUnavailable(ClusterError):
    """This process cannot host the real node (not in its network namespace, tools missing)."""


def network() -> tuple[str, str]:
    """(node address, ClusterIP of `kubernetes`) of the namespace ``scripts/netns.sh`` made and this
    process runs in; raises, saying how to get there, anywhere else."""
    name = os.environ.get("RELAUNCH_NETNS")
    node_ip, service_ip = os.environ.get("RELAUNCH_NODE_IP"), os.environ.get("RELAUNCH_SERVICE_IP")
    how = f"run the end-to-end tests with `make e2e` (or `bash {NETNS_SH.relative_to(REPO_ROOT)} pytest e2e`)"
    if not (name and node_ip and service_ip):
        raise RealNodeUnavailable(f"the real node needs the network namespace of scripts/netns.sh: {how}")
    try:
        inside = os.stat("/proc/self/ns/net").st_ino == os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        inside = False
    if not inside:
        raise RealNodeUnavailable(f"this process is not in the network namespace {name}: {how}")
    return node_ip, service_ip


def _tools() -> dict[str, str]:
    found: dict[str, str] = {}
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"):
        path = shutil.which(tool)
        if path:
            found[tool] = path
    plugins = ("bridge", "host-local", "loopback")
    cni = next((d for d in CNI_DIRS if all((d / p).exists() for p in plugins)), None)
    missing = [t for t in ("containerd", "ctr", "runc", "containerd-shim-runc-v2") if t not in found]
    if cni is None:
        missing.append("the bridge, host-local and loopback CNI plugins")
    if missing:
        raise RealNodeUnavailable(
            f"missing {', '.join(missing)}: `apt-get install containerd containernetworking-plugins` "
            "(`make binaries` does it)"
        )
    found["cni"] = str(cni)
    return found


def run_dir(state_dir: Path) -> Path:
    """Short per-cluster folder in /run for containerd's sockets (a socket path has 108 bytes)."""
    return Path("/run/relaunch-node") / hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]


@dataclass
class RealNode:
    name: str
    address: str
    root: Path  # <state>/realnode
    socket: Path

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this node's containerd, in the Kubernetes namespace of its images."""
        return subprocess.run(
            ["ctr", f"--address={self.socket}", "--namespace=k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def kill_container(self, container_id: str, sig: str = "SIGKILL") -> None:
        """Signal a container's main process as the kernel or a user would (``containerd://ID``)."""
        done = self.ctr("tasks", "kill", "--signal", sig, container_id.removeprefix("containerd://"))
        if done.returncode != 0:
            raise ClusterError(f"ctr tasks kill {container_id}: {done.stderr.strip()}")


def chart_values(image: str = PROJECT_IMAGE) -> tuple[dict[str, str], dict[str, str]]:
    """Helm values that run the chart's operator from ``image`` on the real node: those for
    ``--set``, and those for ``--set-string`` (the label value "true" must stay a string)."""
    repository, tag = image.rsplit(":", 1)
    values = {
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",
        "tolerations[0].key": NODE_KEY,
        "tolerations[0].operator": "Exists",
        "tolerations[0].effect": "NoSchedule",
    }
    return values, {f"nodeSelector.{NODE_KEY.replace('.', chr(92) + '.')}": "true"}


def _podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(IMAGE_SH), "podman", *args], capture_output=True, text=True, timeout=timeout
    )


def _pause_image(bin_dir: Path) -> None:
    """``PAUSE_IMAGE`` in podman's storage: the pause binary alone, as its entrypoint."""
    binary = bin_dir / "pause"
    if not binary.exists():
        raise ClusterError(f"{binary} is missing; run `bash e2e/cluster/build.sh`")
    digest = hashlib.sha256(binary.read_bytes()).hexdigest()[:16]
    label = _podman("image", "inspect", "--format", '{{index .Labels "relaunch.pause"}}', PAUSE_IMAGE)
    if label.returncode == 0 and label.stdout.strip() == digest:
        return
    context = IMAGE_CACHE / "pause-context"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    shutil.copy2(binary, context / "pause")
    (context / "Containerfile").write_text(
        f'FROM scratch\nCOPY pause /pause\nLABEL relaunch.pause="{digest}"\nUSER 65535:65535\n'
        'ENTRYPOINT ["/pause"]\n'
    )
    built = _podman("build", "--quiet", "--network", "none", "--tag", PAUSE_IMAGE, str(context))
    if built.returncode != 0:
        raise ClusterError(f"building {PAUSE_IMAGE} failed:\n{built.stderr[-2000:]}")


def _archive(image: str) -> Path:
    """An OCI archive of ``image`` from podman's storage, cached by image ID."""
    inspected = _podman("image", "inspect", "--format", "{{.Id}}", image)
    if inspected.returncode != 0:
        raise ClusterError(f"{image} is not in podman's storage (`make image` builds it): {inspected.stderr}")
    image_id = inspected.stdout.strip()[:16]
    safe = image.replace("/", "_").replace(":", "_")
    path = IMAGE_CACHE / "archives" / f"{safe}-{image_id}.tar"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f"{safe}-*.tar"):
        old.unlink()
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    saved = _podman("save", "--format", "oci-archive", "--output", str(partial), image)
    if saved.returncode != 0:
        raise ClusterError(f"podman save {image} failed:\n{saved.stderr[-2000:]}")
    partial.replace(path)
    return path


def load_image(node: RealNode, image: str) -> float:
    """Put ``image`` (from podman's storage) into the node's containerd; returns the seconds taken."""
    started = time.monotonic()
    archive = _archive(image)
    done = node.ctr("images", "import", f"--index-name={image}", str(archive), timeout=600)
    if done.returncode != 0:
        raise ClusterError(f"ctr images import {archive.name} failed:\n{done.stderr[-2000:]}")
    return time.monotonic() - started


def _containerd_config(root: Path, run: Path, cni_bin: str, cni_conf: Path) -> str:
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    return f"""version = 2
root = "{root / "containerd"}"
state = "{run / "state"}"

[grpc]
  address = "{run / "containerd.sock"}"

[ttrpc]
  address = "{run / "containerd.sock.ttrpc"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"

{cri}
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_unprivileged_ports = false

{cri[:-1]}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{cri[:-1]}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{cri[:-1]}.containerd.runtimes.runc.options]
  SystemdCgroup = false

{cri[:-1]}.cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{cni_conf}"
"""


def _cni_config(root: Path) -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": "relaunch-real-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "isDefaultGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "dataDir": str(root / "cni-ipam"),
                },
            },
        ],
    }


def _kubelet_config(
    root: Path, pki_root: Path, address: str, ports: dict[str, int], socket: Path
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet-healthz"],
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(pki_root / "ca.crt")},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "tlsCertFile": str(pki_root / f"kubelet-{NODE_NAME}-serving.crt"),
        "tlsPrivateKeyFile": str(pki_root / f"kubelet-{NODE_NAME}-serving.key"),
        "containerRuntimeEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "oomScoreAdj": 0,
        "protectKernelDefaults": False,
        "enforceNodeAllocatable": [],
        "makeIPTablesUtilChains": False,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "podLogsDir": str(root / "pod-logs"),
        "resolvConf": str(root / "resolv.conf"),
        "registerWithTaints": [{"key": NODE_KEY, "value": "true", "effect": "NoSchedule"}],
        "staticPodPath": "",
        "maxPods": 30,
    }


def start(cluster: Cluster, kube: Any, images: tuple[str, ...] = ()) -> RealNode:
    """Join a real node to ``cluster`` and load ``images`` (names in podman's storage) into it.

    ``kube``: a ``relaunch.controller.kube.Kube`` (admin). Returns once the node is Ready."""
    started = time.monotonic()
    address, service_ip = network()
    tools = _tools()
    bin_dir = cluster.bin_dir
    if bin_dir is None or not (bin_dir / "kubelet").exists():
        raise ClusterError(f"the kubelet is missing from {bin_dir}; run `bash e2e/cluster/build.sh`")
    stop(cluster.state_dir, quiet=True)  # leftovers of an interrupted run
    root = cluster.state_dir / "realnode"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    run = run_dir(cluster.state_dir)
    for folder in (root / "cni", root / "pod-logs", root / "kubelet", run):
        folder.mkdir(parents=True, exist_ok=True)
    (root / "started").touch()
    (root / "resolv.conf").write_text("")  # no cluster DNS: names come from hostAliases or env
    (root / "cni" / "10-relaunch.conflist").write_text(json.dumps(_cni_config(root), indent=2))
    socket = run / "containerd.sock"
    (root / "containerd.toml").write_text(_containerd_config(root, run, tools["cni"], root / "cni"))
    node = RealNode(name=NODE_NAME, address=address, root=root, socket=socket)

    logs = cluster.logs_dir
    for component in COMPONENTS:
        (logs / f"{component}.log").write_bytes(b"")
    api_port = cluster.ports["apiserver"]
    cluster.pids["service-proxy"] = _spawn("service-proxy", [
        sys.executable, "-m", "e2e.cluster.svcproxy", f"--listen={service_ip}:443",
        f"--to=127.0.0.1:{api_port}", f"--state-dir={cluster.state_dir}",
    ], logs)  # fmt: skip
    env = dict(os.environ, PATH=f"{Path(tools['containerd']).parent}:{os.environ.get('PATH', '')}")
    cluster.pids["containerd"] = _spawn(
        "containerd", [tools["containerd"], f"--config={root / 'containerd.toml'}"], logs, env=env
    )
    cluster.save()

    def alive(component: str) -> bool:
        if not cluster.running().get(component):
            raise ClusterError(f"{component} exited during start-up:\n{cluster.log_tail(component, 40)}")
        return True

    wait_for(lambda: alive("containerd") and not node.ctr("version", timeout=10).returncode, 30, "containerd")
    log(f"containerd up on {socket} ({time.monotonic() - started:.1f} s)")
    _pause_image(bin_dir)
    for image in (PAUSE_IMAGE, *images):
        took = load_image(node, image)
        log(f"{image} loaded into the real node's containerd in {took:.1f} s")

    pki_root = cluster.state_dir / "pki"
    user = f"kubelet-{NODE_NAME}"
    ensure_leaf(pki_root, user, f"/O=system:nodes/CN=system:node:{NODE_NAME}", "clientAuth", ())
    ensure_leaf(
        pki_root, f"{user}-serving", f"/CN={NODE_NAME}", "serverAuth", (f"IP:{address}", f"DNS:{NODE_NAME}")
    )
    kubeconfig = root / "kubelet.kubeconfig"
    _kubeconfig(kubeconfig, cluster.api_url, Pki(pki_root), user)
    kubelet_port, healthz_port = free_ports(2)
    cluster.ports["kubelet-healthz"] = healthz_port
    config = _kubelet_config(
        root, pki_root, address, {"kubelet": kubelet_port, "kubelet-healthz": healthz_port}, socket
    )
    (root / "kubelet.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cluster.pids["kubelet"] = _spawn("kubelet", [
        str(bin_dir / "kubelet"), f"--config={root / 'kubelet.yaml'}", f"--kubeconfig={kubeconfig}",
        f"--root-dir={root / 'kubelet'}", f"--cert-dir={root / 'kubelet-pki'}",
        f"--hostname-override={NODE_NAME}", f"--node-ip={address}", f"--node-labels={NODE_KEY}=true",
        "--v=1",
    ], logs, env=env)  # fmt: skip
    cluster.save()

    def ready() -> bool:
        alive("kubelet")
        found = kube.get(f"/api/v1/nodes/{NODE_NAME}") or {}
        conditions = (found.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    wait_for(ready, 90, lambda: f"node {NODE_NAME} Ready; kubelet log:\n{cluster.log_tail('kubelet', 30)}")
    log(f"real node {NODE_NAME} Ready at {address} ({time.monotonic() - started:.1f} s)")
    return node


def _shims(socket: Path) -> list[int]:
    """containerd-shim processes of the containerd at ``socket`` (they outlive containerd)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and str(socket).encode() in argv:
            found.append(int(entry.name))
    return found


def _mounts_under(prefixes: tuple[str, ...]) -> list[str]:
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefixes):
                points.append(point)
    return sorted(set(points), key=len, reverse=True)


def _sandboxes_since(stamp: Path) -> list[str]:
    """Network namespaces containerd made for pod sandboxes (``/run/netns/cni-*``) since this
    node started: a sandbox killed without the kubelet's teardown leaves its namespace mounted."""
    try:
        since = stamp.stat().st_mtime
    except OSError:
        return []
    return [str(p) for p in Path("/run/netns").glob("cni-*") if p.lstat().st_mtime >= since]


def stop(state_dir: Path, quiet: bool = False) -> list[str]:
    """End the real node of the cluster in ``state_dir``, if any: its containers, the kubelet,
    containerd, their mounts. Returns problems (empty: nothing of it is left)."""
    cluster = Cluster.load(state_dir)
    run = run_dir(state_dir)
    socket = run / "containerd.sock"
    root = state_dir / "realnode"
    pids = {n: p for n, p in (cluster.pids.items() if cluster else ()) if n in COMPONENTS}
    if "kubelet" in pids:
        stop_pids({"kubelet": pids.pop("kubelet")}, state_dir, 10.0)
    # every container's processes, then their shims: nothing of a pod survives the node
    shims = _shims(socket)
    for pid in reversed([p for shim in shims for p in process_tree(shim)]):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    stop_pids(pids, state_dir, 10.0)
    problems = []
    owned_sandboxes = _sandboxes_since(root / "started")
    for point in _mounts_under((f"{root}/", f"{run}/", *owned_sandboxes)):
        done = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
        if done.returncode != 0 and not quiet:
            log(f"umount {point}: {done.stderr.strip()}")
    for sandbox in owned_sandboxes:
        with contextlib.suppress(OSError):
            os.unlink(sandbox)
    if not _mounts_under((f"{run}/",)):
        shutil.rmtree(run, ignore_errors=True)
    end = time.monotonic() + 5
    while time.monotonic() < end and _shims(socket):
        time.sleep(0.1)
    if _shims(socket):
        problems.append(f"containerd shims of {socket} are still running")
    if cluster is not None:
        for name in COMPONENTS:
            cluster.pids.pop(name, None)
        if (state_dir / "state.json").exists():
            cluster.save()
    return problems
