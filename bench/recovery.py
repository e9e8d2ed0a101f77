"""Recovery latency on the testbed: a worker's death, and a node's loss, to every worker Running again.

    python bench/recovery.py [--kubeconfig PATH] [--trials 10] [--node-trials 10] [--grace 5]

Without ``--kubeconfig`` (or ``$RELAUNCH_TEST_KUBECONFIG``) a cluster is started in a temporary
directory and stopped at the end. The benchmark runs ``relaunch operator`` against a
TrainingJob of 2 demo-trainer workers that trains for as long as the benchmark needs, then:

* pod-failure trials: SIGKILL a random worker (``kill_pod``) and time until every worker of the
  next attempt is Running; the operator's own per-stage seconds come from
  ``status.recoveries[-1].seconds`` and detection is the time from the kill to ``detectedAt``;
* node-loss trials: power off the node of a worker (``lose_node``) and time until the gang runs
  again elsewhere (the grace period ``--grace`` is part of it by design), then power it back on.

The baseline, measured in the same run, is the cluster's own floor: creating one bare pod and
waiting until it is Running. Figures: median and p95 per stage; goals: median <= 3 s for a pod
failure, node loss <= grace + 5 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e.cluster import Cluster, down, up
from e2e.test_recovery import (
    Jobs,
    OperatorProcess,
    complete_steps,
    install_crd,
    trainer_config,
    trainingjob,
)
from relaunch.controller.kube import Kube, collection_path

JOB = "bench"


def parse_time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def wait(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summarize(title: str, rows: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    print(f"\n{title} ({len(rows)} trials)")
    print(f"  {'stage':<14}{'median s':>10}{'p95 s':>10}{'max s':>10}")
    out = {}
    for key in keys:
        values = [row[key] for row in rows if key in row]
        med, p95 = statistics.median(values), percentile(values, 0.95)
        out[key] = (med, p95)
        print(f"  {key:<14}{med:>10.2f}{p95:>10.2f}{max(values):>10.2f}")
    return out


def bench_cluster(kubeconfig: str | None) -> tuple[Cluster, Path | None]:
    """The cluster of ``kubeconfig``, or one started in a temporary directory (returned, to stop)."""
    if kubeconfig:
        path = Path(kubeconfig).resolve()
        cluster = Cluster.load(path.parent) or Cluster(state_dir=path.parent, kubeconfig=path)
        cluster.kubeconfig = path
        return cluster, None
    own_dir = Path(tempfile.mkdtemp(prefix="relaunch-bench-"))
    print(f"starting a cluster in {own_dir} ...", flush=True)
    return up(own_dir, nodes=3), own_dir


class BenchSession(NamedTuple):
    """What every bench starts with: the cluster, a namespace of its own, and an operator in it."""

    cluster: Cluster
    own_dir: Path | None  # the cluster's folder when the bench started it (to stop), else None
    agent: Any
    api: Kube
    namespace: str
    jobs: Jobs
    shared: Path
    operator: OperatorProcess


def start_session(kubeconfig: str | None) -> BenchSession:
    """The cluster (:func:`bench_cluster`), a fresh namespace and the operator running in it."""
    cluster, own_dir = bench_cluster(kubeconfig)
    agent = cluster.agent()
    api, namespace = bench_namespace(cluster)
    shared = Path(tempfile.mkdtemp(prefix="relaunch-bench-shared-"))
    operator = OperatorProcess(cluster.kubeconfig, namespace, shared / "operator.log")
    operator.start()
    return BenchSession(cluster, own_dir, agent, api, namespace, Jobs(api, namespace), shared, operator)


def end_session(
    operator: OperatorProcess, api: Kube, namespace: str, agent: Any, own_dir: Path | None
) -> None:
    """Undo :func:`start_session`: the operator stopped, the namespace deleted, lost nodes
    restored, and the cluster stopped if the bench started it."""
    operator.stop()
    api.delete(f"/api/v1/namespaces/{namespace}")
    for node in agent.lost_nodes():
        agent.restore_node(node)
    if own_dir is not None:
        down(own_dir, quiet=True)


def bench_namespace(cluster: Cluster) -> tuple[Kube, str]:
    """The admin's client, with the CRD installed, and a fresh namespace ready for pods."""
    api = Kube(cluster.api_client())
    install_crd(api)
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    api.create("/api/v1/namespaces", {"metadata": {"name": namespace}})
    wait(
        lambda: api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
        30,
        "default ServiceAccount",
    )
    return api, namespace


def baseline_pod_start(
    api: Kube,
    namespace: str,
    trials: int,
    *,
    prefix: str = "baseline",
    container: dict[str, Any] | None = None,
    placement: dict[str, Any] | None = None,
) -> list[float]:
    """Seconds from creating a bare pod to it Running: the floor any restart pays. ``container``:
    fields for its one container (an image, say); ``placement``: pod-spec fields (a nodeSelector)."""
    times = []
    for i in range(trials):
        name = f"{prefix}-{i}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "c", "image": "x", "command": ["sleep", "30"], **(container or {})}],
                **(placement or {}),
            },
        }
        start = time.monotonic()
        api.create(collection_path("Pod", namespace), pod)
        path = f"{collection_path('Pod', namespace)}/{name}"
        wait(lambda p=path: (api.get(p) or {}).get("status", {}).get("phase") == "Running", 60, f"pod {name}")
        times.append(time.monotonic() - start)
        api.delete(path, grace_seconds=0)
    return times


def trial(jobs: Jobs, injure: Any, timeout: float) -> dict[str, float]:
    status = jobs.status(JOB)
    attempt = status["attempt"]
    wall0 = time.time()
    start = time.monotonic()
    injure(attempt)
    wait(
        lambda: jobs.status(JOB).get("attempt") == attempt + 1 and jobs.all_running(JOB),
        timeout,
        f"attempt {attempt + 1} running",
    )
    total = time.monotonic() - start
    entry = jobs.status(JOB)["recoveries"][-1]
    row = {"detect": parse_time(entry["detectedAt"]) - wall0}
    for stage in ("Stopping", "Planning", "Converting", "Starting"):
        if stage in entry["seconds"]:
            row[stage.lower()] = entry["seconds"][stage]
    row["total"] = total
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("RELAUNCH_TEST_KUBECONFIG"))
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--node-trials", type=int, default=10)
    parser.add_argument("--grace", type=int, default=5, help="spec.recovery.nodeLossGraceSeconds")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    _cluster, own_dir, agent, api, namespace, jobs, shared, operator = start_session(args.kubeconfig)
    try:
        baseline = baseline_pod_start(api, namespace, 5)
        config = trainer_config(step_delay_seconds=0.2, epochs=100000, keep_checkpoint_max=2)
        jobs.create(
            trainingjob(
                JOB, shared, config, recovery={"nodeLossGraceSeconds": args.grace, "maxRestarts": 1000}
            )
        )
        wait(lambda: jobs.all_running(JOB), 60, "the first gang running")
        wait(lambda: complete_steps(shared, 2), 60, "a first checkpoint")

        pod_rows = []
        for i in range(args.trials):
            victim = rng.randrange(2)
            row = trial(jobs, lambda a, v=victim: agent.kill_pod(namespace, f"{JOB}-{a}-{v}"), 60)
            pod_rows.append(row)
            took = row["total"]
            print(f"pod failure {i + 1}/{args.trials}: worker {victim} killed, all running after {took:.2f}s")
            time.sleep(1.0)

        node_rows = []
        for i in range(args.node_trials):
            victim_pod = jobs.workers(JOB, jobs.status(JOB)["attempt"])[rng.randrange(2)]
            node = victim_pod["spec"]["nodeName"]
            row = trial(jobs, lambda _a, n=node: agent.lose_node(n), args.grace + 60)
            node_rows.append(row)
            print(f"node loss {i + 1}/{args.node_trials}: {node} lost, all running after {row['total']:.2f}s")
            agent.restore_node(node)
            wait(
                lambda n=node: any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (api.get(f"/api/v1/nodes/{n}") or {}).get("status", {}).get("conditions", [])
                ),
                60,
                f"node {node} Ready again",
            )
            time.sleep(1.0)
    finally:
        end_session(operator, api, namespace, agent, own_dir)

    floor = statistics.median(baseline)
    print(f"\nbaseline: one bare pod created -> Running, median {floor:.2f}s over {len(baseline)} pods")
    pods = summarize("pod failure -> every worker Running again", pod_rows)
    nodes = summarize(f"node loss (grace {args.grace}s) -> every worker Running again", node_rows)
    pod_median = pods["total"][0]
    node_median, node_p95 = nodes["total"] if node_rows else (float("nan"), float("nan"))
    print(f"\nratio pod-failure recovery / bare pod start: {pod_median / floor:.1f}x (median)")
    ok_pod = pod_median <= 3.0
    ok_node = not node_rows or node_p95 <= args.grace + 5
    print(f"goal pod failure median <= 3 s: {pod_median:.2f}s {'MET' if ok_pod else 'MISSED'}")
    if node_rows:
        print(
            f"goal node loss <= grace + 5 s ({args.grace + 5}s): median {node_median:.2f}s, "
            f"p95 {node_p95:.2f}s {'MET' if ok_node else 'MISSED'}"
        )
    return 0 if ok_pod and ok_node else 1


if __name__ == "__main__":
    sys.exit(main())
