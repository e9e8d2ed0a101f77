"""The image on the real node against the node agent's emulation: size, start-up, pod start latency.

    make image && bash scripts/netns.sh .venv/bin/python bench/realnode.py [--trials 10]

Runs inside the network namespace of ``scripts/netns.sh`` (the real node's address lives there).
Starts a cluster of one emulated node in a temporary directory, joins the real node
(e2e/cluster/realnode.py) with the image ``scripts/image.sh`` built, and measures, in one run:

* the image: its size, and the seconds ``ctr images import`` took to load it into the node;
* pod start latency: a bare pod created until it is Running, ``--trials`` times on the emulated
  node (a process of the checkout) and on the real node (a container of the image, with a pod
  sandbox and an address on the node's bridge): median, p95, and the ratio real / emulated;
* the operator's start-up: from its process starting until its liveness endpoint answers, as a
  container of the image on the real node (the chart's Deployment: its container's ``startedAt``
  to ``/healthz`` at the pod's address) and as ``relaunch operator`` from the checkout's virtual
  environment, ``--trials`` each, with the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recovery import baseline_pod_start, parse_time, percentile, wait
from e2e.cluster import down, realnode, up
from e2e.cluster.control import free_ports
from e2e.demo import install_chart
from e2e.test_recovery import install_crd
from relaunch.controller.kube import Kube, collection_path


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def pod_starts(api: Kube, namespace: str, trials: int, real: bool) -> list[float]:
    """Seconds from creating a bare pod to it Running, on the real node or the emulated one."""
    if not real:
        return baseline_pod_start(api, namespace, trials, prefix="emulated")
    return baseline_pod_start(
        api,
        namespace,
        trials,
        prefix="real",
        container={"image": realnode.PROJECT_IMAGE, "imagePullPolicy": "Never"},
        placement={
            "nodeSelector": {realnode.NODE_KEY: "true"},
            "tolerations": [{"key": realnode.NODE_KEY, "operator": "Exists"}],
        },
    )


def operator_in_container(cluster: Any, api: Kube, trials: int) -> list[float]:
    """The chart's operator on the real node: its container's start to its /healthz answering,
    ``trials`` times (each time its pod is deleted and the Deployment makes another)."""
    namespace = f"relaunch-{uuid.uuid4().hex[:5]}"
    values, strings = realnode.chart_values()
    install_chart(cluster, "bench", namespace, values, strings=strings)
    pods_path = collection_path("Pod", namespace)
    times = []
    seen: set[str] = set()
    for _ in range(trials):

        def started(known: set[str] = seen) -> dict[str, Any] | None:
            for pod in api.list(pods_path):
                name = pod["metadata"]["name"]
                statuses = pod.get("status", {}).get("containerStatuses") or []
                running = statuses and (statuses[0].get("state") or {}).get("running")
                if name not in known and running and pod["status"].get("podIP"):
                    return pod
            return None

        pod = wait(started, 120, "an operator pod running")
        url = f"http://{pod['status']['podIP']}:8081/healthz"
        wait(lambda u=url: healthy(u), 120, f"{url} answering")
        answered = time.time()
        began = parse_time(pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])
        times.append(answered - began)
        seen.add(pod["metadata"]["name"])
        api.delete(f"{pods_path}/{pod['metadata']['name']}", grace_seconds=0)
    helm = [str(cluster.bin_dir / "helm"), f"--kubeconfig={cluster.kubeconfig}"]
    subprocess.run([*helm, "uninstall", "bench", "-n", namespace], capture_output=True, check=False)
    return times


def operator_from_checkout(cluster: Any, trials: int) -> list[float]:
    """``relaunch operator`` from the virtual environment: its start to its /healthz answering."""
    times = []
    for _ in range(trials):
        (port,) = free_ports(1)
        url = f"http://127.0.0.1:{port}/healthz"
        env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), PYTHONWARNINGS="ignore")
        start = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "relaunch.cli", "operator", f"--liveness={url}", "--metrics-port=0"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait(lambda u=url: healthy(u), 120, f"{url} answering")
            times.append(time.monotonic() - start)
        finally:
            process.terminate()
            process.wait(30)
    return times


def line(label: str, values: list[float]) -> str:
    return (
        f"  {label:<34} median {statistics.median(values):6.2f} s  p95 {percentile(values, 0.95):6.2f} s"
        f"  ({len(values)} trials)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    realnode.network()  # fails early, saying how, outside the namespace of scripts/netns.sh
    inspect = ["podman", "image", "inspect", "--format", "{{.Size}}", realnode.PROJECT_IMAGE]
    size = subprocess.run(
        ["bash", str(realnode.IMAGE_SH), *inspect],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    own_dir = Path(tempfile.mkdtemp(prefix="relaunch-bench-realnode-"))
    print(f"starting a cluster in {own_dir} ...", flush=True)
    cluster = up(own_dir, nodes=1)
    try:
        api = Kube(cluster.api_client())
        install_crd(api)
        started = time.monotonic()
        node = realnode.start(cluster, api, images=())
        joined = time.monotonic() - started
        loaded = realnode.load_image(node, realnode.PROJECT_IMAGE)
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        api.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
        wait(lambda: api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default"), 30, "ServiceAccount")
        emulated = pod_starts(api, namespace, args.trials, real=False)
        real = pod_starts(api, namespace, args.trials, real=True)
        contained = operator_in_container(cluster, api, max(3, args.trials // 2))
        local = operator_from_checkout(cluster, max(3, args.trials // 2))
    finally:
        down(own_dir, quiet=True)
    megabytes = int(size) / 1e6
    print(f"\nimage {realnode.PROJECT_IMAGE}: {megabytes:.0f} MB; loaded into containerd in {loaded:.1f} s")
    print(f"real node joined (containerd up, pause image loaded, kubelet Ready) in {joined:.1f} s")
    print("\npod create -> Running")
    print(line("emulated node (a local process)", emulated))
    print(line("real node (a container of the image)", real))
    print(f"  ratio real / emulated (medians): {statistics.median(real) / statistics.median(emulated):.1f}x")
    print("\noperator start-up: process start -> /healthz answers")
    print(line("from the checkout's environment", local))
    print(line("in the image on the real node", contained))
    ratio = statistics.median(contained) / statistics.median(local)
    print(f"  ratio container / checkout (medians): {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
