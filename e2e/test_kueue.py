"""Admission by a real Kueue (built from its Go module, running next to the control plane).

Each test gets a ClusterQueue with quota for 4 workers (one CPU each) and a LocalQueue in its
namespace; TrainingJobs labelled ``kueue.x-k8s.io/queue-name`` get a Workload that Kueue admits,
preempts and requeues. Two 4-worker jobs: the second waits, in Kueue's words, and runs once the
first finished. A higher-priority job preempts a running one: the preempted gang stops gracefully
without a restart counted, gives its quota back, and once admitted again resumes from its newest
complete step and finishes with the loss curve of an uninterrupted run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.demo import CHART, helm, kubectl, set_flags
from e2e.test_chart import token_kubeconfig
from e2e.test_recovery import (  # the fixtures are shared with the recovery scenarios
    LOGS,
    Jobs,
    OperatorProcess,
    WaitFor,
    api,  # noqa: F401
    complete_steps,
    condition,
    events_with,
    free_port,
    jobs,  # noqa: F401
    loss_curve,
    operator,  # noqa: F401
    run_trainer_locally,
    trainer_config,
    trainingjob,
    wait_phase,
    wait_running,
)
from e2e.test_suspend import kubectl_get_tj
from relaunch.controller.kube import Kube, trainingjob_path

KUEUE = "/apis/kueue.x-k8s.io/v1beta2"
FLAVOR = "relaunch-e2e-cpu"
LOCAL_QUEUE = "training"
PRIORITIES = {"relaunch-e2e-low": 100, "relaunch-e2e-high": 1000}


def _create(api: Kube, path: str, body: dict[str, Any]) -> None:
    status, payload = api.request("POST", path, body={"apiVersion": "kueue.x-k8s.io/v1beta2", **body})
    assert status in (201, 409), (payload or {}).get("message", payload)


@pytest.fixture
def queue(kueue: Any, api: Kube, namespace: str) -> Iterator[str]:
    """A ClusterQueue (quota: 4 CPUs, lower priorities preempted) and the LocalQueue ``training``."""
    _create(api, f"{KUEUE}/resourceflavors", {"kind": "ResourceFlavor", "metadata": {"name": FLAVOR}})
    for name, value in PRIORITIES.items():
        _create(
            api,
            f"{KUEUE}/workloadpriorityclasses",
            {"kind": "WorkloadPriorityClass", "metadata": {"name": name}, "value": value},
        )
    cluster_queue = f"cq-{namespace}"
    _create(
        api,
        f"{KUEUE}/clusterqueues",
        {
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu"],
                        "flavors": [{"name": FLAVOR, "resources": [{"name": "cpu", "nominalQuota": "4"}]}],
                    }
                ],
                "preemption": {"withinClusterQueue": "LowerPriority"},
            },
        },
    )
    _create(
        api,
        f"{KUEUE}/namespaces/{namespace}/localqueues",
        {"kind": "LocalQueue", "metadata": {"name": LOCAL_QUEUE}, "spec": {"clusterQueue": cluster_queue}},
    )
    yield LOCAL_QUEUE
    api.delete(f"{KUEUE}/clusterqueues/{cluster_queue}")


@pytest.fixture(scope="module")
def reference_curve_4(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The loss curve of an uninterrupted 4-rank run of the preempted job's config (local processes)."""
    directory = tmp_path_factory.mktemp("reference4")
    run_trainer_locally(directory, trainer_config(data_parallel=4), world=4)
    return loss_curve(directory)


@pytest.fixture
def chart_operator(cluster: Any, namespace: str, api: Kube, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator as the chart's ServiceAccount, with exactly the RBAC the chart grants for this
    namespace (``watch.mode=namespaces``): what it needs of Workloads is granted, nothing more."""
    release = f"rl{uuid.uuid4().hex[:6]}"
    values = {
        "watch.mode": "namespaces",
        "watch.namespaces": f"{{{namespace}}}",
        "leaderElection.enabled": "false",
    }
    rendered = helm(cluster, "template", release, str(CHART), "-n", namespace, *set_flags(values)).stdout
    kinds = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] in kinds]
    manifest = yaml.safe_dump_all(docs)
    kubectl(cluster, "apply", "-f", "-", stdin=manifest)  # each object names its namespace
    account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
    kubeconfig = token_kubeconfig(cluster, namespace, account, tmp_path / "sa.kubeconfig")
    proc = OperatorProcess(kubeconfig, namespace, LOGS / "operator" / f"{namespace}.log")
    proc.start()
    yield proc
    for job in api.list(trainingjob_path(namespace)):
        api.delete(trainingjob_path(namespace, job["metadata"]["name"]))
    proc.stop()
    kubectl(cluster, "delete", "--ignore-not-found", "-f", "-", stdin=manifest, check=False)
    print(f"--- operator log ({proc.log_path}) ---\n{proc.log_tail()}")


def queued_job(name: str, shared: Path, config: str, priority: str | None = None) -> dict[str, Any]:
    """A 4-worker TrainingJob in the LocalQueue, each worker asking for one CPU."""
    manifest = trainingjob(name, shared, config, replicas=4)
    manifest["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": LOCAL_QUEUE}
    if priority:
        manifest["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] = priority
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["resources"] = {"requests": {"cpu": "1"}}
    # pods run as processes of this machine: a rendezvous port of its own, not the default 29500
    # another test session's job may hold
    container["env"].append({"name": "MASTER_PORT", "value": str(free_port())})
    return manifest


def workload(api: Kube, namespace: str, job: str) -> dict[str, Any]:
    items = api.list(f"{KUEUE}/namespaces/{namespace}/workloads", f"relaunch.dev/job={job}")
    assert len(items) <= 1, [w["metadata"]["name"] for w in items]
    return items[0] if items else {}


def workload_condition(wl: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (wl.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


def folder(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def test_a_second_job_waits_for_the_quota_and_runs_when_the_first_finishes(
    cluster: Any,
    queue: str,
    jobs: Jobs,
    api: Kube,
    operator: OperatorProcess,
    node_agent: Any,
    wait_for: WaitFor,
    tmp_path: Path,
) -> None:
    """...and the first, when a worker dies, recovers within its quota: the second waits on."""
    config = trainer_config(data_parallel=4, step_delay_seconds=0.3)
    first_dir = folder(tmp_path, "first")
    jobs.create(queued_job("first", first_dir, config))
    wait_running(jobs, wait_for, "first", 1, 90)
    status = jobs.status("first")
    assert condition(status, "Admitted")["status"] == "True", status
    wl = workload(api, jobs.namespace, "first")
    assert wl["spec"]["podSets"][0]["count"] == 4
    assert wl["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"

    jobs.create(queued_job("second", folder(tmp_path, "second"), config))
    status = wait_for(
        lambda: (
            (s := jobs.status("second")).get("phase") == "Queued"
            and "insufficient" in s.get("message", "")
            and s
        ),
        30,
        lambda: f"second queued for lack of quota:\n{jobs.describe('second')}",
    )
    admitted = condition(status, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "WaitingForAdmission"), admitted
    assert jobs.pods("second") == [] and jobs.jobs("second") == []
    assert "Queued" in kubectl_get_tj(cluster, jobs.namespace, "second")

    # A worker of the first dies: it recovers with the quota it holds, the second keeps waiting.
    reserved = workload_condition(workload(api, jobs.namespace, "first"), "QuotaReserved")
    wait_for(lambda: (1, 5) in complete_steps(first_dir, 4), 60, "step 5 saved on all 4 ranks")
    node_agent.kill_pod(jobs.namespace, "first-1-1")
    status = wait_running(jobs, wait_for, "first", 2, 90)
    assert status["restarts"] == 1 and status["recoveries"][-1]["reason"] == "WorkerFailed"
    assert workload_condition(workload(api, jobs.namespace, "first"), "QuotaReserved") == reserved
    assert jobs.status("second")["phase"] == "Queued" and jobs.pods("second") == []

    wait_phase(jobs, wait_for, "first", "Succeeded", 180)
    # The round that writes Succeeded finishes the Workload right after that status write.
    finished = wait_for(
        lambda: workload_condition(workload(api, jobs.namespace, "first"), "Finished"),
        10,
        lambda: f"the first job's Workload Finished:\n{workload(api, jobs.namespace, 'first').get('status')}",
    )
    assert finished["status"] == "True" and finished["reason"] == "Succeeded", finished

    status = wait_running(jobs, wait_for, "second", 1, 90)
    assert condition(status, "Admitted")["status"] == "True"
    status = wait_phase(jobs, wait_for, "second", "Succeeded", 120)
    assert status.get("restarts", 0) == 0
    assert sorted(loss_curve(tmp_path / "second")) == list(range(1, 31))


def test_a_preempted_job_resumes_from_its_newest_complete_step_with_no_restart_counted(
    queue: str,
    jobs: Jobs,
    api: Kube,
    operator: OperatorProcess,
    wait_for: WaitFor,
    tmp_path: Path,
    reference_curve_4: dict[int, dict[str, Any]],
) -> None:
    low_dir, high_dir = folder(tmp_path, "low"), folder(tmp_path, "high")
    jobs.create(
        queued_job(
            "low", low_dir, trainer_config(data_parallel=4, step_delay_seconds=0.4), "relaunch-e2e-low"
        )
    )
    wait_running(jobs, wait_for, "low", 1, 90)
    wait_for(lambda: (1, 10) in complete_steps(low_dir, 4), 60, "step 10 saved on all 4 ranks")

    jobs.create(
        queued_job(
            "high", high_dir, trainer_config(data_parallel=4, step_delay_seconds=0.1), "relaunch-e2e-high"
        )
    )
    preempted_at = time.monotonic()
    status = wait_for(
        lambda: (s := jobs.status("low")).get("phase") == "Queued" and not jobs.workers("low") and s,
        60,
        lambda: f"low preempted and stopped:\n{jobs.describe('low')}",
    )
    admitted = condition(status, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "Preempted"), admitted
    assert status.get("restarts", 0) == 0 and "lastFailure" not in status, status
    events_with(jobs, wait_for, "low", "Preempted", "QuotaReleased")
    epoch, step = complete_steps(low_dir, 4)[-1]
    newest = (epoch - 1) * 10 + step

    high = wait_running(jobs, wait_for, "high", 1, 60)
    print(f"low preempted, high running {time.monotonic() - preempted_at:.1f} s after high was created")
    assert condition(high, "Admitted")["status"] == "True"
    low_wl = workload(api, jobs.namespace, "low")
    assert workload_condition(low_wl, "Requeued")["status"] == "True", low_wl.get("status")
    assert workload_condition(low_wl, "QuotaReserved")["status"] == "False", low_wl.get("status")
    assert jobs.workers("low") == []

    wait_phase(jobs, wait_for, "high", "Succeeded", 120)
    status = wait_running(jobs, wait_for, "low", 2, 90)
    assert status.get("restarts", 0) == 0
    entry = status["recoveries"][-1]
    assert (entry["reason"], entry["counted"]) == ("Resumed", False), entry
    resumed = (status["checkpoint"]["epoch"] - 1) * 10 + status["checkpoint"]["step"]
    # The newest step every rank has by name; the one before when the SIGTERM cut a save short.
    assert resumed in (newest, newest - 5), (resumed, newest)

    status = wait_phase(jobs, wait_for, "low", "Succeeded", 120)
    assert status.get("restarts", 0) == 0
    curve = loss_curve(low_dir)
    assert sorted(curve) == sorted(reference_curve_4) == list(range(1, 31))
    # the preempted job trained exactly what an uninterrupted one does
    assert {g: e["loss_hex"] for g, e in curve.items()} == {
        g: e["loss_hex"] for g, e in reference_curve_4.items()
    }
    assert min(g for g, e in curve.items() if e["attempt"] == 2) == resumed + 1


def test_a_preemption_during_planning_interrupts_it_and_the_job_starts_later(
    queue: str,
    jobs: Jobs,
    api: Kube,
    chart_operator: OperatorProcess,
    node_agent: Any,
    wait_for: WaitFor,
    tmp_path: Path,
) -> None:
    """Kueue preempts at a moment of its own choosing: here the low job's planning pod is held (a
    slow volume mount) when the high job arrives. The planning Job goes, the interrupted start is in
    the history, nothing is counted; the quota goes to the high job, and the low one starts later.
    The operator runs as the chart's ServiceAccount: its RBAC is enough for all of it."""
    selector = "relaunch.dev/job=low,relaunch.dev/role=plan"
    node_agent.hold_pods(jobs.namespace, selector)
    fast = trainer_config(data_parallel=4, step_delay_seconds=0.05)
    jobs.create(queued_job("low", folder(tmp_path, "low"), fast, "relaunch-e2e-low"))
    wait_for(
        lambda: (jobs.status("low").get("recovery") or {}).get("stage") == "Planning" and jobs.jobs("low"),
        60,
        lambda: f"low admitted and planning:\n{jobs.describe('low')}",
    )
    jobs.create(queued_job("high", folder(tmp_path, "high"), fast, "relaunch-e2e-high"))
    status = wait_for(
        lambda: (s := jobs.status("low")).get("phase") == "Queued" and not jobs.jobs("low") and s,
        30,
        lambda: f"low preempted during planning, its Job deleted:\n{jobs.describe('low')}",
    )
    assert condition(status, "Admitted")["reason"] == "Preempted"
    entry = status["recoveries"][-1]
    assert (entry["reason"], entry["supersededBy"]) == ("Created", "Preempted"), entry
    assert status.get("restarts", 0) == 0 and "recovery" not in status

    node_agent.release_pods(jobs.namespace, selector)
    wait_phase(jobs, wait_for, "high", "Succeeded", 120)
    status = wait_phase(jobs, wait_for, "low", "Succeeded", 150)
    assert status.get("restarts", 0) == 0
    assert [e["reason"] for e in status["recoveries"]] == ["Created", "Created"]
    assert sorted(loss_curve(tmp_path / "low")) == list(range(1, 31))
