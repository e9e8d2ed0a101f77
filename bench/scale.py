"""The operator at scale on the testbed: many jobs, many light workers, each figure against one job.

    python bench/scale.py [--kubeconfig PATH] [--jobs 100] [--workers 8] [--big 512] [--window 60]
    python bench/scale.py --quick          # 10 jobs x 4 workers and one job of 32: about 3 minutes

Without ``--kubeconfig`` (or ``$RELAUNCH_TEST_KUBECONFIG``) a cluster is started in a temporary
directory with enough nodes for the largest phase (``--nodes`` to choose) and stopped at the end;
one ``relaunch operator`` runs throughout. Workers are light: a shell loop that prints a step line
every ``--step-seconds`` (no Python, no checkpoints), so the cost measured is the operator's and
the cluster's, not the trainer's.

Phases, in one run, each ending with its jobs deleted and their pods gone:

* **idle**: the operator with no job; the API server's traffic over ``--window`` s is the floor
  every later rate is measured above;
* **baseline**: 1 job of ``--workers`` workers; then **scale**: ``--jobs`` jobs of ``--workers``;
  then **big**: 1 job of ``--big`` workers (skipped with ``--big 0``).

For each phase: the seconds from the first create to every worker of every job Running (per job:
median and slowest), and how many restarts happened before that (the operator taking a node for
lost, say); operator RSS (``VmRSS``) and CPU seconds from ``/proc`` of the operator process, with
the CPU of the node agent, the API server, the scheduler, the controller-manager, etcd, the pods'
processes (the workers' shells, the planning Jobs' ``relaunch plan``) and the whole machine, over
the same interval; the longest any node's Lease went unrenewed (from a watch
of ``kube-node-lease``: a node agent too slow to renew makes live nodes look lost); which side
limits: a component near what it can use (one core for the Python ones), else the machine's CPU,
else none (waits); API requests per minute at steady state over ``--window`` s in which nothing
fails, from the API server's own metrics: ``apiserver_request_total`` by verb and resource (every
client, above the idle floor) and, for the operator alone, ``apiserver_flowcontrol_dispatched_
requests_total`` of a FlowSchema that matches only the operator's own user (it runs as
``relaunch-bench-operator``, bound to cluster-admin, exempt from queueing as the admin is), total
and per job; the Events posted or counted again meanwhile, by source and reason; and recovery:
``--recover-fraction`` (10 %) of the jobs, at least one, each lose one worker at once (SIGKILL
through the node agent's ``kill_pod``), timed from the kill to every worker of the job's next
attempt Running (median, p95; ``--baseline-trials`` rounds for the 1-job baseline).

Pods, TrainingJobs and node Leases are observed through one watch each (events timestamped on
arrival), so the benchmark adds no polling of its own to the counts. Goals (the exit status is 0
when all are met): operator RSS <= 250 MiB at ``--jobs`` x ``--workers``; the operator's
steady-state requests per job per minute near 0 (<= 1); recovery median at scale <= 2x the one-job
figure.

The testbed's pods have loopback addresses, which the EndpointSlice and Endpoints controllers
refuse to publish: they retry, and post ``FailedToUpdateEndpoint(Slices)`` Events, for every
headless Service (one per job) -- cluster traffic per job that a real cluster would not have; it is
listed apart (by source), not counted as the operator's.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recovery import parse_time, percentile, wait
from e2e.cluster import Cluster, down, up
from e2e.cluster.control import _kubeconfig as write_kubeconfig
from e2e.cluster.pki import Pki, ensure_leaf
from e2e.nodeagent.client import Kube as RawKube
from e2e.nodeagent.common import POD_MARKER_ENV
from e2e.nodeagent.pods import process_tree
from e2e.test_recovery import OperatorProcess, install_crd, trainer_config, trainingjob
from relaunch.controller.kube import Kube

GROUP_PATH = "/apis/relaunch.dev/v1alpha1"
MIB = 1024 * 1024
#: What a node of the testbed takes (its status reports ``pods: 110``), with room for helper pods.
PODS_PER_NODE = 90
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stepper(step_seconds: float) -> str:
    """A worker that only prints a step line every ``step_seconds`` (one ``sleep`` fork per step)."""
    return f'i=0; while true; do i=$((i+1)); echo "step:[$i/1000000] loss: 1.0"; sleep {step_seconds:g}; done'


# ----------------------------------------------------------------------------------------------
# what the API server shows: one watch per kind, events timestamped as they arrive


class Observed:
    """TrainingJobs and pods of one namespace, kept current from a watch each."""

    def __init__(self, raw: RawKube, namespace: str) -> None:
        self.raw = raw
        self.namespace = namespace
        self.lock = threading.Lock()
        self.pods: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        # node -> renewTime of its Lease as last seen, and the longest gap between two renewals
        self.leases: dict[str, dict[str, Any]] = {}
        self.renewed: dict[str, float] = {}
        self.longest_gap: dict[str, float] = {}
        self.stopping = threading.Event()
        self.ready = {
            "pods": threading.Event(),
            "trainingjobs": threading.Event(),
            "leases": threading.Event(),
        }
        paths = {
            "pods": f"/api/v1/namespaces/{namespace}/pods",
            "trainingjobs": f"{GROUP_PATH}/namespaces/{namespace}/trainingjobs",
            "leases": "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
        }
        for kind, path in paths.items():
            store = {"pods": self.pods, "trainingjobs": self.jobs, "leases": self.leases}[kind]
            threading.Thread(
                target=self._watch, args=(kind, path, store), name=f"watch-{kind}", daemon=True
            ).start()
        for event in self.ready.values():
            if not event.wait(60):
                raise SystemExit("the benchmark's watches did not start within 60 s")

    def _watch(self, kind: str, path: str, store: dict[str, dict[str, Any]]) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.raw.get(path)
                with self.lock:
                    store.clear()
                    for item in listing["items"]:
                        store[item["metadata"]["name"]] = self._slim(kind, item)
                self.ready[kind].set()
                for event in self.raw.watch(path, listing["metadata"]["resourceVersion"]):
                    if self.stopping.is_set():
                        return
                    if event["type"] == "ERROR":
                        break
                    if event["type"] == "BOOKMARK":
                        continue
                    obj = event["object"]
                    with self.lock:
                        if event["type"] == "DELETED":
                            store.pop(obj["metadata"]["name"], None)
                        else:
                            store[obj["metadata"]["name"]] = self._slim(kind, obj)
            except Exception as error:  # the watch ends with the benchmark's cluster; say why otherwise
                if not self.stopping.is_set():
                    print(f"  (watch of {kind} restarted: {error!r})", flush=True)
                    time.sleep(0.5)

    def _slim(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        if kind == "leases":
            node, renew = obj["metadata"]["name"], (obj.get("spec") or {}).get("renewTime")
            if renew:
                renewed = parse_time(renew)
                if node in self.renewed:
                    gap = renewed - self.renewed[node]
                    self.longest_gap[node] = max(self.longest_gap.get(node, 0.0), gap)
                self.renewed[node] = renewed
            return {}
        if kind == "trainingjobs":
            return {"status": obj.get("status") or {}}
        return {
            "labels": obj["metadata"].get("labels") or {},
            "phase": (obj.get("status") or {}).get("phase"),
            "deleting": bool(obj["metadata"].get("deletionTimestamp")),
        }

    def running(self) -> dict[str, int]:
        """Each job that runs with every worker of its attempt Running -> that attempt (one pass)."""
        with self.lock:
            counts: dict[tuple[str, str], int] = defaultdict(int)
            for pod in self.pods.values():
                labels = pod["labels"]
                if (
                    labels.get("relaunch.dev/role") == "worker"
                    and pod["phase"] == "Running"
                    and not pod["deleting"]
                ):
                    counts[(labels.get("relaunch.dev/job", ""), labels.get("relaunch.dev/attempt", ""))] += 1
            result = {}
            for job, value in self.jobs.items():
                status = value["status"]
                attempt = status.get("attempt")
                if (
                    status.get("phase") == "Running"
                    and attempt
                    and counts[(job, str(attempt))] == status.get("workers")
                ):
                    result[job] = int(attempt)
        return result

    def attempt(self, job: str) -> int:
        with self.lock:
            return int(((self.jobs.get(job) or {}).get("status") or {}).get("attempt") or 0)

    def failed(self, jobs: list[str]) -> list[str]:
        with self.lock:
            return [
                j for j in jobs if ((self.jobs.get(j) or {}).get("status") or {}).get("phase") == "Failed"
            ]

    def heartbeat_gap(self) -> tuple[float, str]:
        """The longest a node's Lease went without renewal since the last call (an ongoing gap
        included), and that node; then starts counting again."""
        with self.lock:
            now = time.time()
            gaps = {
                node: max(self.longest_gap.get(node, 0.0), now - renewed)
                for node, renewed in self.renewed.items()
            }
            self.longest_gap.clear()
        if not gaps:
            return 0.0, "-"
        node = max(gaps, key=lambda n: gaps[n])
        return gaps[node], node

    def pod_count(self) -> int:
        with self.lock:
            return len(self.pods)

    def stop(self) -> None:
        self.stopping.set()


# ----------------------------------------------------------------------------------------------
# what /proc and /metrics show


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (its threads included; 0 once it is gone)."""
    return _times(pid)[0]


def _times(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of ``pid``: utime+stime, cutime+cstime."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, (
        int(fields[13]) + int(fields[14])
    ) / CLOCK_TICKS


def agent_and_pods_cpu(agent: int) -> tuple[float, float]:
    """CPU seconds of the node agent (with its own helper processes) and of every pod's processes,
    live or exited: a pod's process carries the testbed's marker in its environment; an exited one
    is in its parent's reaped children's time (the agent's, for a container's main process)."""
    own, pods = _times(agent)
    for pid in process_tree(agent)[1:]:
        try:
            is_pod = POD_MARKER_ENV.encode() + b"=" in Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        mine, theirs = _times(pid)
        if is_pod:
            pods += mine + theirs
        else:
            own += mine + theirs
    return own, pods


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core, from ``/proc/stat``."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


class Cpu:
    """CPU seconds of the components, and of the whole machine, between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.wall = 0.0
        self.machine_before = (0.0, 0.0)
        self.machine = 0.0  # the machine's busy share of all its cores (1.0: every core busy)

    def read(self) -> dict[str, float]:
        seconds = {}
        for name, pid in self.pids.items():
            if name == "node-agent":
                seconds[name], seconds["pods"] = agent_and_pods_cpu(pid)
            else:
                seconds[name] = cpu_seconds(pid)
        return seconds

    def start(self) -> Cpu:
        self.before = self.read()
        self.machine_before = machine_busy()
        self.wall = time.monotonic()
        return self

    def stop(self) -> Cpu:
        self.used = {name: value - self.before.get(name, 0.0) for name, value in self.read().items()}
        busy, total = machine_busy()
        spent = total - self.machine_before[1]
        self.machine = (busy - self.machine_before[0]) / spent if spent > 0 else 0.0
        self.wall = time.monotonic() - self.wall
        return self

    def share(self, name: str) -> float:
        """Cores used on average (1.0: one core busy the whole interval)."""
        return self.used[name] / self.wall if self.wall > 0 else 0.0


_SAMPLE = re.compile(
    r"^(apiserver_request_total|apiserver_flowcontrol_dispatched_requests_total)\{(.*)\} (\S+)$"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
#: The operator's own identity and the API server's FlowSchema that classifies its requests:
#: ``apiserver_flowcontrol_dispatched_requests_total`` counts them apart from every other client.
OPERATOR_USER = "relaunch-bench-operator"
OPERATOR = "operator"


def request_counts(api: Kube) -> dict[str, float]:
    """``apiserver_request_total`` so far, summed by ``VERB resource[/subresource] (scope)``, and
    under ``OPERATOR`` the requests the operator's FlowSchema dispatched."""
    status, text = api.request("GET", "/metrics")
    if status != 200:
        raise SystemExit(f"GET /metrics answered {status}: {str(text)[:200]}")
    counts: dict[str, float] = defaultdict(float)
    for line in str(text).splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match.group(2)))
        if match.group(1) == "apiserver_flowcontrol_dispatched_requests_total":
            if labels.get("flow_schema") == OPERATOR_USER:
                counts[OPERATOR] += float(match.group(3))
            continue
        resource = labels.get("resource") or "(non-resource)"
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        key = f"{labels.get('verb', '?')} {resource} ({labels.get('scope') or '-'})"
        counts[key] += float(match.group(3))
    return counts


def event_counts(api: Kube, namespace: str) -> dict[str, int]:
    """Events of ``namespace`` so far by source and reason (an Event's ``count`` included)."""
    counts: dict[str, int] = defaultdict(int)
    for event in api.list(f"/api/v1/namespaces/{namespace}/events"):
        source = event.get("reportingComponent") or (event.get("source") or {}).get("component") or "?"
        kind = (event.get("involvedObject") or {}).get("kind", "?")
        counts[f"{source}: {kind} {event.get('reason')}"] += int(event.get("count") or 1)
    return counts


class Window:
    """What the API server served in ``seconds`` of steady state, per minute: every request by verb
    and resource, the operator's own, and the Events of the namespace that were posted or counted."""

    def __init__(self, api: Kube, namespace: str, seconds: float) -> None:
        events_before = event_counts(api, namespace)
        before = request_counts(api)
        time.sleep(seconds)
        after = request_counts(api)
        events_after = event_counts(api, namespace)
        per_min = 60.0 / seconds
        changed = {k: (v - before.get(k, 0.0)) * per_min for k, v in after.items()}
        self.operator = changed.pop(OPERATOR, 0.0)
        self.rates = {k: v for k, v in changed.items() if v > 0}
        self.total = sum(self.rates.values())
        self.events = {
            k: (v - events_before.get(k, 0)) * per_min
            for k, v in events_after.items()
            if v > events_before.get(k, 0)
        }


def operator_identity(cluster: Cluster, api: Kube, directory: Path) -> Path:
    """A kubeconfig for the operator as its own user (bound to cluster-admin, as the admin the e2e
    tests use), and a FlowSchema that matches only that user, so that the API server counts the
    operator's requests apart (exempt from queueing, as the admin's requests are)."""
    pki_dir = cluster.state_dir / "pki"
    ensure_leaf(pki_dir, OPERATOR_USER, f"/CN={OPERATOR_USER}", "clientAuth", ())
    kubeconfig = directory / "operator.kubeconfig"
    write_kubeconfig(kubeconfig, cluster.api_url, Pki(pki_dir), OPERATOR_USER)
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": OPERATOR_USER},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}],
    }
    api.create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", binding)
    everything = {
        "verbs": ["*"],
        "apiGroups": ["*"],
        "resources": ["*"],
        "clusterScope": True,
        "namespaces": ["*"],
    }
    schema = {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": OPERATOR_USER},
        "spec": {
            "priorityLevelConfiguration": {"name": "exempt"},
            "matchingPrecedence": 2,
            "rules": [
                {
                    "subjects": [{"kind": "User", "user": {"name": OPERATOR_USER}}],
                    "resourceRules": [everything],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                }
            ],
        },
    }
    api.create("/apis/flowcontrol.apiserver.k8s.io/v1/flowschemas", schema)
    return kubeconfig


# ----------------------------------------------------------------------------------------------
# the phases


class Bench:
    def __init__(self, args: argparse.Namespace, cluster: Cluster) -> None:
        self.args = args
        self.cluster = cluster
        self.api = Kube(cluster.api_client())
        install_crd(self.api)
        self.namespace = f"scale-{os.getpid()}"
        self.api.create("/api/v1/namespaces", {"metadata": {"name": self.namespace}})
        wait(
            lambda: self.api.get(f"/api/v1/namespaces/{self.namespace}/serviceaccounts/default"),
            30,
            "default ServiceAccount",
        )
        pki = cluster.state_dir / "pki"
        self.raw = RawKube(cluster.api_url, pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        self.observed = Observed(self.raw, self.namespace)
        self.agent = cluster.agent()
        self.shared = Path(tempfile.mkdtemp(prefix="relaunch-scale-"))
        kubeconfig = operator_identity(cluster, self.api, self.shared)
        self.operator = OperatorProcess(kubeconfig, self.namespace, self.shared / "operator.log")
        self.rng = random.Random(args.seed)
        self.idle: Window | None = None

    def components(self) -> dict[str, int]:
        assert self.operator.proc is not None
        pids = {"operator": self.operator.proc.pid}
        for name in ("node-agent", "kube-apiserver", "kube-scheduler", "kube-controller-manager", "etcd"):
            if name in self.cluster.pids:
                pids[name] = self.cluster.pids[name]
        return pids

    def operator_rss(self) -> int:
        assert self.operator.proc is not None
        return sum(rss_bytes(pid) for pid in process_tree(self.operator.proc.pid))

    def manifest(self, name: str, workers: int) -> dict[str, Any]:
        shared = self.shared / name
        shared.mkdir(exist_ok=True)
        config = trainer_config(data_parallel=workers, model_parallel=1)
        body = trainingjob(name, shared, config, replicas=workers, recovery={"maxRestarts": 1000})
        pod_spec = body["spec"]["template"]["spec"]
        pod_spec["terminationGracePeriodSeconds"] = 1
        container = pod_spec["containers"][0]
        container["command"] = ["sh", "-c", stepper(self.args.step_seconds)]
        container.pop("env", None)
        return body

    def create_all(self, names: list[str], workers: int) -> None:
        """Create the jobs from a few threads, as ``kubectl apply`` of many files would."""
        queue = list(names)
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    name = queue.pop()
                status, payload = self.api.request(
                    "POST",
                    f"{GROUP_PATH}/namespaces/{self.namespace}/trainingjobs",
                    body=self.manifest(name, workers),
                )
                if status != 201:
                    raise SystemExit(f"creating TrainingJob {name} answered {status}: {payload}")

        threads = [threading.Thread(target=worker) for _ in range(min(8, len(names)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def until_all_running(self, names: list[str], timeout: float, start: float) -> dict[str, float]:
        """Seconds from ``start`` until each job first ran with every worker Running."""
        done: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(done) < len(names):
            running = self.observed.running()
            for name in names:
                if name not in done and name in running:
                    done[name] = time.monotonic() - start
            failed = self.observed.failed(names)
            if failed:
                raise SystemExit(f"jobs failed while starting: {failed[:5]}; see {self.operator.log_path}")
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in done]
                raise SystemExit(
                    f"{len(missing)} of {len(names)} jobs not all Running after {timeout:g} s "
                    f"(e.g. {missing[:3]}); pods seen {self.observed.pod_count()}; "
                    f"see {self.operator.log_path}"
                )
            time.sleep(0.1)
        return done

    def delete_all(self, names: list[str]) -> None:
        for name in names:
            self.api.delete(f"{GROUP_PATH}/namespaces/{self.namespace}/trainingjobs/{name}")
        wait(
            lambda: self.observed.pod_count() == 0 and not self.observed.jobs,
            300,
            "the jobs and their pods gone",
            interval=0.5,
        )

    def recover(self, names: list[str], timeout: float) -> list[float]:
        """Kill one worker of each of ``names`` at once; seconds until each runs its next attempt."""
        attempts = {name: self.observed.attempt(name) for name in names}
        victims = {
            name: f"{name}-{attempts[name]}-{self.rng.randrange(self.workers_of[name])}" for name in names
        }
        errors: list[str] = []

        def kill(pod: str) -> None:
            try:
                self.agent.kill_pod(self.namespace, pod)
            except Exception as error:
                errors.append(f"{pod}: {error}")

        threads = [threading.Thread(target=kill, args=(pod,)) for pod in victims.values()]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise SystemExit(f"kill_pod failed: {errors[:3]}")
        took: dict[str, float] = {}
        deadline = start + timeout
        while len(took) < len(names):
            running = self.observed.running()
            for name in names:
                if name not in took and running.get(name, 0) > attempts[name]:
                    took[name] = time.monotonic() - start
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in took]
                raise SystemExit(f"{len(missing)} jobs did not recover within {timeout:g} s: {missing[:5]}")
            time.sleep(0.02)
        return [took[name] for name in names]

    def phase(self, label: str, jobs: int, workers: int, trials: int = 1) -> dict[str, Any]:
        names = [f"{label}-{i}" for i in range(jobs)] if jobs > 1 else [label]
        self.workers_of = dict.fromkeys(names, workers)
        print(f"\n== {label}: {jobs} job(s) x {workers} workers ({jobs * workers} pods)", flush=True)
        result: dict[str, Any] = {"label": label, "jobs": jobs, "workers": workers}
        rss_before = self.operator_rss()
        self.observed.heartbeat_gap()
        cpu = Cpu(self.components()).start()
        start = time.monotonic()
        self.create_all(names, workers)
        created = time.monotonic() - start
        per_job = self.until_all_running(names, self.args.start_timeout, start)
        cpu.stop()
        result["start_s"] = max(per_job.values())
        result["start_median_s"] = statistics.median(per_job.values())
        result["start_cpu"] = cpu
        print(
            f"  created in {created:.1f} s; all Running after {result['start_s']:.1f} s "
            f"(per job median {result['start_median_s']:.1f} s)",
            flush=True,
        )
        print("  CPU while starting: " + cpu_line(cpu), flush=True)
        gap, node = result["heartbeat_gap"] = self.observed.heartbeat_gap()
        restarted = {n: self.observed.attempt(n) - 1 for n in names if self.observed.attempt(n) > 1}
        result["restarts_while_starting"] = sum(restarted.values())
        print(
            f"  longest a node's Lease went unrenewed while starting: {gap:.1f} s ({node}; the agent "
            f"renews every 2 s); restarts before all ran: {result['restarts_while_starting']} "
            f"in {len(restarted)} job(s)",
            flush=True,
        )
        time.sleep(self.args.settle)
        result["rss_before"], result["rss"] = rss_before, self.operator_rss()
        attempts = {n: self.observed.attempt(n) for n in names}
        self.observed.heartbeat_gap()
        steady = Cpu(self.components()).start()
        window = Window(self.api, self.namespace, self.args.window)
        steady.stop()
        gap, node = self.observed.heartbeat_gap()
        restarts = sum(self.observed.attempt(n) - attempts[n] for n in names)
        print(
            f"  during the steady window: {restarts} restart(s) nobody asked for; longest a node's Lease "
            f"went unrenewed: {gap:.1f} s ({node})",
            flush=True,
        )
        if restarts:
            print("  WARNING: something failed during the steady window: its figures count that too")
        assert self.idle is not None
        result["steady_cpu"] = steady
        result["window"] = window
        result["above"] = {k: v - self.idle.rates.get(k, 0.0) for k, v in window.rates.items()}
        result["operator_per_job"] = (window.operator - self.idle.operator) / jobs
        result["all_per_job"] = (window.total - self.idle.total) / jobs
        print(
            f"  operator RSS {rss_before / MIB:.0f} -> {result['rss'] / MIB:.0f} MiB; steady state: "
            f"{window.total:.0f} req/min in all, the operator's {window.operator:.0f}; above idle per job "
            f"per minute: operator {result['operator_per_job']:.1f}, all clients {result['all_per_job']:.1f}",
            flush=True,
        )
        print("  CPU at steady state: " + cpu_line(steady), flush=True)
        count = max(1, round(jobs * self.args.recover_fraction))
        times: list[float] = []
        recovering = Cpu(self.components()).start()
        for trial in range(trials):
            victims = self.rng.sample(names, count)
            times += self.recover(victims, self.args.recover_timeout)
            if trial + 1 < trials:
                time.sleep(1.0)
        recovering.stop()
        result["recovery"] = times
        result["recovery_cpu"] = recovering
        print(
            f"  recovery ({count} job(s) lose a worker at once, {trials} trial(s)): median "
            f"{statistics.median(times):.2f} s, p95 {percentile(times, 0.95):.2f} s, max {max(times):.2f} s",
            flush=True,
        )
        print("  CPU while recovering: " + cpu_line(recovering), flush=True)
        self.delete_all(names)
        return result

    def measure_idle(self) -> None:
        print(f"\n== idle: the operator with no job, {self.args.window:g} s", flush=True)
        time.sleep(self.args.settle)
        steady = Cpu(self.components()).start()
        self.idle = Window(self.api, self.namespace, self.args.window)
        steady.stop()
        print(
            f"  {self.idle.total:.0f} req/min in all, the operator's {self.idle.operator:.0f}; "
            f"operator RSS {self.operator_rss() / MIB:.0f} MiB; CPU: " + cpu_line(steady),
            flush=True,
        )
        for key, value in sorted(self.idle.rates.items(), key=lambda kv: -kv[1])[:10]:
            print(f"    {value:8.1f}/min  {key}")


def cpu_line(cpu: Cpu) -> str:
    short = {"node-agent": "agent", "kube-apiserver": "apiserver", "kube-scheduler": "scheduler",
             "kube-controller-manager": "ctrl-mgr"}  # fmt: skip
    parts = ", ".join(f"{short.get(name, name)} {cpu.share(name):.2f}" for name in cpu.used)
    cores = os.cpu_count() or 1
    others = cpu.machine * cores - sum(cpu.share(name) for name in cpu.used)
    return f"{parts} cores; machine {cpu.machine:.0%} busy of {cores} cores (all else: {others:.2f})"


def limiting_side(cpu: Cpu) -> str:
    """What bounds a phase, from CPU alone: a component near what it can use (a Python process,
    the operator or the node agent, one core; the API server every core), else the machine's CPU
    if it was nearly all busy, else nothing CPU-bound (latency: waits and serial steps)."""
    cores = os.cpu_count() or 1
    load = {
        "operator": cpu.share("operator"),
        "node agent": cpu.share("node-agent"),
        "API server": cpu.share("kube-apiserver") / cores,
    }
    busiest = max(load, key=lambda k: load[k])
    ranked = ", ".join(f"{name} {value:.0%}" for name, value in sorted(load.items(), key=lambda kv: -kv[1]))
    if load[busiest] >= 0.8:
        return f"the {busiest} ({ranked} of what each can use)"
    if cpu.machine >= 0.9:
        users = dict(cpu.used)
        users["all else"] = cpu.machine * cores * cpu.wall - sum(cpu.used.values())
        top = ", ".join(
            f"{n} {v / cpu.wall:.2f}" for n, v in sorted(users.items(), key=lambda kv: -kv[1])[:4]
        )
        return f"the machine's CPU ({cpu.machine:.0%} busy; cores used: {top}; {ranked} of what each can use)"
    return f"no component's CPU ({ranked} of what each can use; machine {cpu.machine:.0%} busy): waits"


def report(results: list[dict[str, Any]]) -> bool:
    base = results[0]
    print("\n== summary (ratios against the 1-job baseline of this run)")
    print(f"  {'phase':<8}{'pods':>6}{'all Running s':>15}{'x':>6}{'RSS MiB':>9}{'op CPU s':>10}"
          f"{'op req/job/min':>16}{'all req/job/min':>17}"
          f"{'recovery med s':>16}{'p95 s':>8}{'x':>6}")  # fmt: skip
    base_rec = statistics.median(base["recovery"])
    for r in results:
        rec = statistics.median(r["recovery"])
        print(
            f"  {r['label']:<8}{r['jobs'] * r['workers']:>6}{r['start_s']:>15.1f}"
            f"{r['start_s'] / base['start_s']:>6.1f}{r['rss'] / MIB:>9.0f}"
            f"{r['start_cpu'].used['operator']:>10.1f}"
            f"{r['operator_per_job']:>16.1f}{r['all_per_job']:>17.1f}"
            f"{rec:>16.2f}{percentile(r['recovery'], 0.95):>8.2f}{rec / base_rec:>6.1f}"
        )
    for r in results:
        print(f"\n  {r['label']}: while starting, the limiting side is {limiting_side(r['start_cpu'])}")
        print(f"  {r['label']}: while recovering, the limiting side is {limiting_side(r['recovery_cpu'])}")
        print(
            f"  {r['label']}: steady-state requests per minute above idle, all clients, by verb and resource:"
        )
        for key, value in sorted(r["above"].items(), key=lambda kv: -kv[1])[:12]:
            if abs(value) >= 0.5:
                print(f"    {value:8.1f}/min ({value / r['jobs']:6.2f} per job)  {key}")
        if r["window"].events:
            print(f"  {r['label']}: Events posted or counted again at steady state, per minute:")
            for key, value in sorted(r["window"].events.items(), key=lambda kv: -kv[1])[:8]:
                print(f"    {value:8.1f}/min  {key}")
    scale = results[1]
    ok_rss = scale["rss"] <= 250 * MIB
    ok_req = scale["operator_per_job"] <= 1.0
    ok_rec = statistics.median(scale["recovery"]) <= 2 * base_rec
    label = f"{scale['jobs']} x {scale['workers']}"
    print(
        f"\ngoal operator RSS <= 250 MiB at {label}: "
        f"{scale['rss'] / MIB:.0f} MiB {'MET' if ok_rss else 'MISSED'}"
    )
    print(
        f"goal the operator's steady-state requests per job per minute near 0 (<= 1) at {label}: "
        f"{scale['operator_per_job']:.1f} {'MET' if ok_req else 'MISSED'}"
    )
    print(
        f"goal recovery median at {label} <= 2x one job ({2 * base_rec:.2f} s): "
        f"{statistics.median(scale['recovery']):.2f} s {'MET' if ok_rec else 'MISSED'}"
    )
    return ok_rss and ok_req and ok_rec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("RELAUNCH_TEST_KUBECONFIG"))
    parser.add_argument("--jobs", type=int, help="jobs of the scale phase (100; quick: 10)")
    parser.add_argument("--workers", type=int, help="workers per job, baseline and scale (8; quick: 4)")
    parser.add_argument("--big", type=int, help="workers of the single big job, 0 to skip (512; quick: 32)")
    parser.add_argument("--window", type=float, help="seconds of each steady-state window (60; quick: 20)")
    parser.add_argument("--settle", type=float, help="seconds before each window (10; quick: 5)")
    parser.add_argument("--step-seconds", type=float, default=5.0, help="a worker's seconds per step")
    parser.add_argument("--recover-fraction", type=float, default=0.1)
    parser.add_argument("--baseline-trials", type=int, help="recoveries of the 1-job baseline (3; quick: 2)")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--recover-timeout", type=float, default=300.0)
    parser.add_argument("--nodes", type=int, default=0, help="nodes of a cluster started here (0: enough)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smaller defaults: a few minutes in all")
    parser.add_argument(
        "--keep", action="store_true", help="keep the state folder of a cluster started here (logs, pods)"
    )
    args = parser.parse_args()
    defaults = {"jobs": (100, 10), "workers": (8, 4), "big": (512, 32), "window": (60.0, 20.0),
                "settle": (10.0, 5.0), "baseline_trials": (3, 2)}  # fmt: skip
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

    own_dir = None
    if args.kubeconfig:
        path = Path(args.kubeconfig).resolve()
        cluster = Cluster.load(path.parent) or Cluster(state_dir=path.parent, kubeconfig=path)
        cluster.kubeconfig = path
    else:
        largest = max(args.jobs * args.workers, args.big)
        nodes = args.nodes or max(3, math.ceil(largest / PODS_PER_NODE) + 1)
        own_dir = Path(tempfile.mkdtemp(prefix="relaunch-bench-"))
        print(f"starting a cluster of {nodes} nodes in {own_dir} ...", flush=True)
        cluster = up(own_dir, nodes=nodes)
    bench = Bench(args, cluster)
    bench.operator.start()
    results = []
    try:
        wait(lambda: bench.operator_rss() > 0, 30, "the operator process")
        time.sleep(3)  # the operator's start-up: its first lists and watches
        bench.measure_idle()
        results.append(bench.phase("base", 1, args.workers, args.baseline_trials))
        results.append(bench.phase("scale", args.jobs, args.workers))
        if args.big:
            results.append(bench.phase("big", 1, args.big))
    finally:
        bench.observed.stop()
        bench.operator.stop()
        bench.api.delete(f"/api/v1/namespaces/{bench.namespace}")
        if own_dir is not None:
            down(own_dir, quiet=True)
            if not args.keep:  # hundreds of MB at full size (etcd's data, every pod's folder)
                shutil.rmtree(own_dir, ignore_errors=True)
    print(f"\noperator log: {bench.operator.log_path}")
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
