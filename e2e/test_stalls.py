"""No silent stalls, on the local cluster: what a shared production cluster does to a recovery.

Each test injures a TrainingJob the way a real cluster does (a ResourceQuota refusing pods,
cordoned nodes, workers that cannot be placed, processes that ignore SIGTERM, a job deleted and
created again under the same name, a helper pod evicted, held past its deadline or stranded on a
lost node) and checks that the job says what it waits for, in the cluster's own words, and goes
on by itself once it can, counting exactly one restart per real failure.

Most workers here are a shell loop (they need no checkpoint: every plan is a fresh start), so
the tests exercise the operator, not the trainer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from e2e.cluster.control import evict_pod
from e2e.test_recovery import (  # the fixtures are shared with the recovery scenarios
    Jobs,
    OperatorProcess,
    WaitFor,
    api,  # noqa: F401
    condition,
    jobs,  # noqa: F401
    operator,  # noqa: F401
    scrape,
    shared,  # noqa: F401
    trainer_config,
    trainingjob,
    wait_running,
)
from relaunch.controller.kube import Kube, collection_path

#: A worker that trains nothing and ignores SIGTERM (as a process stuck in I/O would): only the
#: SIGKILL at the end of its grace period (or a force-delete) stops it.
STUBBORN = ["sh", "-c", "trap '' TERM; while true; do sleep 1; done"]
#: A worker that runs until told to stop.
SLEEPER = ["sh", "-c", "exec sleep 100000"]


def sleeper_job(name: str, shared: Path, *, command: list[str] = SLEEPER, **spec: Any) -> dict[str, Any]:
    manifest = trainingjob(name, shared, trainer_config(), **spec)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["command"] = command
    return manifest


def events_of(jobs: Jobs, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in jobs.events(name) if e.get("reason") == reason]


def set_cordoned(api: Kube, cordoned: bool) -> None:
    for node in api.list("/api/v1/nodes"):
        api.merge_patch(f"/api/v1/nodes/{node['metadata']['name']}", {"spec": {"unschedulable": cordoned}})


def test_a_create_refused_by_a_quota_is_reported_retried_with_backoff_and_then_succeeds(
    api: Kube, jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    """A ResourceQuota that lets one pod in: the planning pod runs (and ends, freeing the quota),
    one worker is created and the second is refused with HTTP 403. The refusal is the job's
    status (Ready=False, CreateRefused, the server's words) and one counted Event, retried with
    backoff rather than in a loop; lifting the quota lets the job run, with no restart counted."""
    ns = jobs.namespace
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "one-pod"}}
    quota["spec"] = {"hard": {"pods": "1"}}
    api.create(f"/api/v1/namespaces/{ns}/resourcequotas", quota)
    path = f"/api/v1/namespaces/{ns}/resourcequotas/one-pod"
    wait_for(
        lambda: ((api.get(path) or {}).get("status") or {}).get("hard"),
        30,
        "the quota controller to count the namespace",
    )
    jobs.create(sleeper_job("quota", shared))
    status = wait_for(
        lambda: condition(s := jobs.status("quota"), "Ready").get("reason") == "CreateRefused" and s,
        60,
        lambda: f"CreateRefused:\n{jobs.describe('quota')}",
    )
    ready = condition(status, "Ready")
    assert "create Pod quota-1-" in ready["message"] and "HTTP 403" in ready["message"], ready
    assert "exceeded quota: one-pod" in ready["message"], ready
    assert status.get("restarts", 0) == 0

    time.sleep(12)  # let the operator retry a few times
    # One Event per refused object (either worker may lose the race for the quota), counted on
    # every retry instead of posted again.
    refused = events_of(jobs, "quota", "CreateRefused")
    assert 1 <= len(refused) <= 2, refused
    assert all("exceeded quota: one-pod" in e["message"] for e in refused), refused
    tries = sum(int(e.get("count") or 1) for e in refused)
    errors = scrape(operator.metrics_port).get(
        'relaunch_api_errors_total{code="403",resource="pods",verb="post"}', 0.0
    )
    # Backoff 1, 2, 4, 8 s (with jitter): a handful of rounds in ~15 s, each trying the two
    # worker pods (both are refused while the quota still counts the finished planning pod),
    # not a loop (a loop makes hundreds).
    assert 2 <= errors <= 12, errors
    assert tries >= 2, refused

    api.delete(f"/api/v1/namespaces/{ns}/resourcequotas/one-pod")
    status = wait_running(jobs, wait_for, "quota", 1, 90)
    assert status.get("restarts", 0) == 0
    assert condition(status, "Ready")["reason"] == "AllWorkersRunning"


def test_an_unschedulable_planning_pod_is_reported_with_the_schedulers_words_and_then_runs(
    api: Kube, jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """Every node cordoned, then a worker killed: the planning pod cannot be scheduled. The job
    says so with the scheduler's message, and continues by itself once a node is uncordoned."""
    jobs.create(sleeper_job("cord", shared))
    wait_running(jobs, wait_for, "cord", 1, 60)
    set_cordoned(api, True)
    try:
        node_agent.kill_pod(jobs.namespace, "cord-1-0")
        status = wait_for(
            lambda: "nodes are available" in (s := jobs.status("cord")).get("message", "") and s,
            60,
            lambda: f"the scheduler's words in the status:\n{jobs.describe('cord')}",
        )
        assert "cannot be scheduled" in status["message"] and "unschedulable" in status["message"], status
        assert condition(status, "Ready")["reason"] == "HelperUnschedulable"
        assert events_of(jobs, "cord", "HelperUnschedulable")
    finally:
        set_cordoned(api, False)
    status = wait_running(jobs, wait_for, "cord", 2, 90)
    assert status["restarts"] == 1


def test_workers_that_fit_nowhere_stall_past_the_starting_deadline_saying_why(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    """Workers request more CPU than any node has: the status says so at once in the scheduler's
    words, and once startingSeconds pass the Stalled condition and an Event say it too."""
    manifest = sleeper_job("huge", shared, recovery={"deadlines": {"startingSeconds": 5}})
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["resources"] = {"requests": {"cpu": "640"}}
    jobs.create(manifest)
    status = wait_for(
        lambda: condition(s := jobs.status("huge"), "Stalled").get("status") == "True" and s,
        60,
        lambda: f"Stalled:\n{jobs.describe('huge')}",
    )
    stalled = condition(status, "Stalled")
    assert stalled["reason"] == "StartingDeadlineExceeded", stalled
    assert "2 of 2 workers cannot be scheduled" in stalled["message"], stalled
    assert "Insufficient cpu" in stalled["message"], stalled
    assert condition(status, "Ready")["reason"] == "WorkersUnschedulable"
    assert status["phase"] == "Pending"
    assert len(events_of(jobs, "huge", "StartingDeadlineExceeded")) == 1


def test_workers_ignoring_sigterm_are_force_deleted_past_the_stopping_deadline(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """Workers that ignore SIGTERM with a 300 s grace period would hold a recovery for five
    minutes; past stoppingSeconds they are force-deleted, the Stalled condition says so, and
    the gang runs again with one restart counted."""
    manifest = sleeper_job("stub", shared, command=STUBBORN, recovery={"deadlines": {"stoppingSeconds": 4}})
    manifest["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 300
    jobs.create(manifest)
    wait_running(jobs, wait_for, "stub", 1, 60)
    node_agent.kill_pod(jobs.namespace, "stub-1-0")
    started = time.monotonic()
    status = wait_running(jobs, wait_for, "stub", 2, 60)
    assert time.monotonic() - started < 40
    assert status["restarts"] == 1
    stopped = events_of(jobs, "stub", "StoppingDeadlineExceeded")
    assert stopped and "stub-1-1" in stopped[0]["message"], stopped
    assert condition(status, "Stalled")["status"] == "False"


def test_a_namesakes_terminating_pods_are_never_adopted(
    api: Kube, jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    """A job deleted and created again under the same name while its old pods still terminate
    (they ignore SIGTERM for 15 s): the new job waits for them, saying so, and its own pods (the
    same names, new owners) run after they are gone."""
    manifest = sleeper_job("again", shared, command=STUBBORN)
    manifest["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 15
    jobs.create(manifest)
    wait_running(jobs, wait_for, "again", 1, 60)
    old_uid = jobs.get("again")["metadata"]["uid"]
    old_pods = {p["metadata"]["name"]: p["metadata"]["uid"] for p in jobs.workers("again")}
    api.delete(f"/apis/relaunch.dev/v1alpha1/namespaces/{jobs.namespace}/trainingjobs/again")
    wait_for(lambda: not jobs.get("again"), 30, "the old job to go")
    wait_for(
        lambda: all(p["metadata"].get("deletionTimestamp") for p in jobs.workers("again")),
        30,
        "the garbage collector to delete the old pods",
    )
    jobs.create(manifest)
    new_uid = jobs.get("again")["metadata"]["uid"]
    assert new_uid != old_uid
    status = wait_for(
        lambda: condition(s := jobs.status("again"), "Ready").get("reason") == "WaitingForPredecessor" and s,
        30,
        lambda: f"WaitingForPredecessor:\n{jobs.describe('again')}",
    )
    assert "earlier TrainingJob named again" in status["message"], status
    status = wait_running(jobs, wait_for, "again", 1, 90)
    pods = jobs.workers("again")
    assert {p["metadata"]["name"] for p in pods} == set(old_pods)
    for pod in pods:
        assert pod["metadata"]["uid"] != old_pods[pod["metadata"]["name"]]
        assert pod["metadata"]["ownerReferences"][0]["uid"] == new_uid
    service = api.get(f"{collection_path('Service', jobs.namespace)}/again")
    assert service["metadata"]["ownerReferences"][0]["uid"] == new_uid
    assert status.get("restarts", 0) == 0


PLAN_PODS = "relaunch.dev/role=plan"


def plan_pods(jobs: Jobs, name: str, attempt: int) -> list[dict[str, Any]]:
    """The live planning pods of one attempt (the first attempt's finished one is kept an hour)."""
    return [
        p
        for p in jobs.pods(name)
        if p["metadata"]["labels"].get("relaunch.dev/role") == "plan"
        and p["metadata"]["labels"].get("relaunch.dev/attempt") == str(attempt)
        and not p["metadata"].get("deletionTimestamp")
        and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
    ]


def held_planning_pod(jobs: Jobs, wait_for: WaitFor, name: str) -> dict[str, Any]:
    """The second attempt's planning pod, once scheduled (its node holds it before it starts)."""
    return wait_for(
        lambda: [p for p in plan_pods(jobs, name, 2) if p["spec"].get("nodeName")],
        30,
        lambda: f"a scheduled planning pod:\n{jobs.describe(name)}",
    )[0]


def test_an_evicted_planning_pod_is_replaced_and_the_recovery_goes_on(
    kube: Any, jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """The planning pod is evicted (the real Eviction API) while its node holds it before it
    starts: the Job controller replaces it (the pod failure policy ignores disruptions), the
    operator does not count a helper try, and the recovery completes with one restart."""
    ns = jobs.namespace
    jobs.create(sleeper_job("evict", shared))
    wait_running(jobs, wait_for, "evict", 1, 60)
    node_agent.hold_pods(ns, PLAN_PODS)
    try:
        node_agent.kill_pod(ns, "evict-1-0")
        first = held_planning_pod(jobs, wait_for, "evict")["metadata"]["name"]
        evict_pod(kube, ns, first)
        wait_for(
            lambda: [p for p in plan_pods(jobs, "evict", 2) if p["metadata"]["name"] != first],
            60,
            lambda: f"the Job controller's replacement of {first}:\n{jobs.describe('evict')}",
        )
    finally:
        node_agent.release_pods(ns, PLAN_PODS)
    status = wait_running(jobs, wait_for, "evict", 2, 60)
    assert status["restarts"] == 1
    assert not events_of(jobs, "evict", "HelperRetried")
    assert [j["metadata"]["name"] for j in jobs.jobs("evict") if "plan-2" in j["metadata"]["name"]] == [
        "evict-plan-2"
    ]


def test_a_planning_pod_past_its_deadline_is_tried_again(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """The planning pod never gets going (its node holds it) and its kubelet kills it at
    planningSeconds (activeDeadlineSeconds): the operator says so, tries again, and the
    recovery completes once the node lets pods start."""
    ns = jobs.namespace
    jobs.create(sleeper_job("slow", shared, recovery={"deadlines": {"planningSeconds": 3}}))
    wait_running(jobs, wait_for, "slow", 1, 60)
    node_agent.hold_pods(ns, PLAN_PODS)
    try:
        node_agent.kill_pod(ns, "slow-1-1")
        retried = wait_for(
            lambda: events_of(jobs, "slow", "HelperRetried"),
            60,
            lambda: f"HelperRetried:\n{jobs.describe('slow')}",
        )
        assert "planning Job slow-plan-2 ran past its deadline" in retried[0]["message"], retried
        assert "try 2 of 3" in retried[0]["message"], retried
    finally:
        node_agent.release_pods(ns, PLAN_PODS)
    status = wait_running(jobs, wait_for, "slow", 2, 60)
    assert status["restarts"] == 1
    assert status["recoveries"][-1]["reason"] == "WorkerFailed"
    assert "slow-plan-2-2" in {j["metadata"]["name"] for j in jobs.jobs("slow")}


def test_a_planning_pod_on_a_lost_node_is_replaced_elsewhere(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """The node holding the planning pod powers off: after nodeLossGraceSeconds the operator
    force-deletes the pod and tries the planning Job again on another node."""
    ns = jobs.namespace
    jobs.create(sleeper_job("strand", shared, recovery={"nodeLossGraceSeconds": 4}))
    wait_running(jobs, wait_for, "strand", 1, 60)
    node_agent.hold_pods(ns, PLAN_PODS)
    try:
        node_agent.kill_pod(ns, "strand-1-0")
        node = held_planning_pod(jobs, wait_for, "strand")["spec"]["nodeName"]
        node_agent.lose_node(node)
        retried = wait_for(
            lambda: events_of(jobs, "strand", "HelperRetried"),
            30,
            lambda: f"HelperRetried:\n{jobs.describe('strand')}",
        )
        assert f"lost its node {node}" in retried[0]["message"], retried
    finally:
        node_agent.release_pods(ns, PLAN_PODS)
    status = wait_running(jobs, wait_for, "strand", 2, 60)
    assert status["restarts"] == 1
    retry = next(j for j in jobs.jobs("strand") if j["metadata"]["name"] == "strand-plan-2-2")
    terms = retry["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert node in terms[0]["matchExpressions"][-1]["values"]
    assert all(p["spec"]["nodeName"] != node for p in jobs.workers("strand", 2))


def test_a_worker_that_cannot_start_is_reported_at_once_with_the_kubelets_reason(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    """A worker's environment names a Secret that does not exist: the kubelet's reason
    (CreateContainerConfigError) and words are the job's status within seconds, not after a
    deadline; creating the Secret lets the job run."""
    manifest = sleeper_job("nosecret", shared)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    ref = {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    container["env"].append({"name": "HF_TOKEN", "valueFrom": ref})
    jobs.create(manifest)
    status = wait_for(
        lambda: (
            condition(s := jobs.status("nosecret"), "Ready").get("reason") == "CreateContainerConfigError"
            and s
        ),
        30,
        lambda: f"CreateContainerConfigError:\n{jobs.describe('nosecret')}",
    )
    assert "cannot start: CreateContainerConfigError" in status["message"], status["message"]
    assert "hf-token" in status["message"], status["message"]
    assert "Stalled" not in {c["type"] for c in status.get("conditions") or []}  # at once, no deadline
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf-token"},
        "stringData": {"token": "x"},
    }
    jobs.kube.create(f"/api/v1/namespaces/{jobs.namespace}/secrets", secret)
    status = wait_running(jobs, wait_for, "nosecret", 1, 60)
    assert status.get("restarts", 0) == 0
