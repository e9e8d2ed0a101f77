"""No silent stalls: helper retries, stage deadlines, the cluster's own words, API problems,
and a namesake's leftovers, driven through the pure state machine and the I/O layer's parsers.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_reconcile import REF, T0, Sim, make_spec, plan

from relaunch import resources
from relaunch.controller import handlers
from relaunch.controller.events import event_name
from relaunch.controller.kube import KubeError, owner_uid, resource_of
from relaunch.controller.reconcile import (
    HELPER_MAX_TRIES,
    ApiProblem,
    DeleteJob,
    DeletePod,
    ForeignObject,
    HelperJobView,
    PodView,
    api_problem_status,
)
from relaunch.controller.views import helper_job_view, pod_view
from relaunch.model import SpecError, check_name, parse_spec


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def fail_worker_and_reach_planning(sim: Sim) -> None:
    sim.start_running()
    sim.fail_pod("demo-1-0", code=1)
    sim.step()
    sim.finish_deletions()
    sim.step()
    assert sim.status["recovery"]["stage"] == "Planning"
    assert "demo-plan-2" in sim.jobs


# ----------------------------------------------------------------------------------------------
# Spec checks the CRD makes too (for jobs created under an older CRD)


def test_names_that_cannot_be_a_service_and_hostname_are_refused() -> None:
    check_name("qwen3-8b")
    for bad in ("job.v2", "Job", "9lives", "trailing-", "a" * 41):
        with pytest.raises(SpecError, match=r"metadata\.name"):
            check_name(bad)


def test_backoff_initial_above_max_is_refused_naming_both_fields() -> None:
    with pytest.raises(SpecError, match=r"initialSeconds \(600\) must be <= .*maxSeconds \(300\)"):
        parse_spec(make_spec(recovery={"backoff": {"initialSeconds": 600}}))


def test_deadlines_and_helper_resources_have_defaults_and_can_be_set() -> None:
    spec = parse_spec(make_spec())
    assert spec.recovery.deadlines.for_stage("Planning") == 600
    assert spec.helpers.planning_resources["limits"] == {"memory": "1Gi"}
    custom = parse_spec(
        make_spec(
            recovery={"deadlines": {"startingSeconds": 7}},
            helpers={"conversion": {"resources": {"requests": {"cpu": "4"}}}},
        )
    )
    assert custom.recovery.deadlines.starting_seconds == 7
    assert custom.recovery.deadlines.stopping_seconds == 300
    assert custom.helpers.conversion_resources == {"requests": {"cpu": "4"}}
    with pytest.raises(SpecError, match=r"spec\.recovery\.deadlines\.planningSeconds must be >= 1"):
        parse_spec(make_spec(recovery={"deadlines": {"planningSeconds": 0}}))


def test_helper_jobs_carry_resources_a_deadline_and_a_disruption_policy() -> None:
    spec = parse_spec(make_spec(recovery={"deadlines": {"planningSeconds": 42}}))
    job = resources.build_plan_job(REF, spec, 3, ["relaunch", "plan"], try_=2)
    assert job["metadata"]["name"] == "demo-plan-3-2"
    assert job["spec"]["backoffLimit"] == 0
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]
    pod = job["spec"]["template"]["spec"]
    assert pod["activeDeadlineSeconds"] == 42  # counts from the pod's start, not while unschedulable
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert resources.build_plan_job(REF, spec, 3, ["x"])["metadata"]["name"] == "demo-plan-3"
    convert = resources.build_convert_job(REF, spec, 3, ["x"])
    assert convert["spec"]["template"]["spec"]["activeDeadlineSeconds"] == 3600
    assert "limits" not in convert["spec"]["template"]["spec"]["containers"][0]["resources"]


# ----------------------------------------------------------------------------------------------
# Helper Jobs survive the cluster


def test_a_killed_planning_pod_is_retried_with_backoff_not_the_end_of_the_job() -> None:
    sim = Sim()
    fail_worker_and_reach_planning(sim)
    sim.jobs["demo-plan-2"] = HelperJobView("demo-plan-2", failed=True, exit_code=137, pod="demo-plan-2-x")
    sim.step()
    assert sim.status["phase"] == "Recovering", sim.status["message"]
    assert sim.deleted_jobs == ["demo-plan-2"]
    assert sim.status["recovery"]["helperTries"] == 2
    assert any(e.reason == "HelperRetried" and "signal 9" in e.message for e in sim.events)
    sim.step(dt=1)  # inside the backoff: no new Job yet
    assert "demo-plan-2-2" not in sim.jobs
    sim.step(dt=5)
    assert "demo-plan-2-2" in sim.jobs
    sim.finish_job("demo-plan-2-2", plan("fresh"))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running"
    assert sim.status["restarts"] == 1  # the helper's retry is not a restart
    assert "helperTries" not in (sim.status.get("recovery") or {})


def test_a_planning_pod_killed_every_time_fails_the_job_after_the_last_try() -> None:
    sim = Sim()
    fail_worker_and_reach_planning(sim)
    for try_ in range(1, HELPER_MAX_TRIES + 1):
        name = resources.plan_job_name("demo", 2, try_)
        sim.step(dt=30)
        assert name in sim.jobs, (name, sim.status)
        sim.jobs[name] = HelperJobView(name, failed=True, pod_reason="DeadlineExceeded", exit_code=137)
        sim.step()
    assert sim.status["phase"] == "Failed"
    failed = condition(sim.status, "Failed")
    assert failed["reason"] == "PlanningFailed"
    assert "ran past its deadline" in failed["message"] and "gave up after 3 tries" in failed["message"]


def test_a_planning_failure_with_a_report_is_not_retried() -> None:
    sim = Sim()
    fail_worker_and_reach_planning(sim)
    sim.jobs["demo-plan-2"] = HelperJobView(
        "demo-plan-2", failed=True, exit_code=2, message=plan("fail", reason="NoCompleteCheckpoint")
    )
    sim.step()
    assert sim.status["phase"] == "Failed"
    assert sim.deleted_jobs == []


def test_a_helper_pod_on_a_lost_node_is_force_deleted_and_tried_again_elsewhere() -> None:
    sim = Sim(make_spec(recovery={"nodeLossGraceSeconds": 5, "backoff": {"initialSeconds": 0}}))
    fail_worker_and_reach_planning(sim)
    sim.jobs["demo-plan-2"] = HelperJobView("demo-plan-2", pod="demo-plan-2-abc", node="n2")
    sim.frozen.add("n2")
    sim.step(dt=2)  # within the grace: keep waiting
    assert sim.deleted_jobs == []
    sim.step(dt=5)
    assert DeletePod("demo-plan-2-abc", force=True) in sim.deleted
    assert sim.deleted_jobs == ["demo-plan-2"]
    sim.step(dt=6)
    retry = next(m for m in sim.created if m["metadata"]["name"] == "demo-plan-2-2")
    terms = retry["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n2"]} in terms[0][
        "matchExpressions"
    ]


def test_an_unschedulable_helper_says_why_in_the_schedulers_words_and_then_continues() -> None:
    sim = Sim(make_spec(recovery={"deadlines": {"planningSeconds": 60}, "backoff": {"initialSeconds": 0}}))
    fail_worker_and_reach_planning(sim)
    words = "0/3 nodes are available: 3 node(s) were unschedulable."
    sim.jobs["demo-plan-2"] = HelperJobView("demo-plan-2", pod="demo-plan-2-x", unschedulable_message=words)
    sim.step()
    assert words in sim.status["message"]
    assert condition(sim.status, "Ready")["reason"] == "HelperUnschedulable"
    sim.step()
    sim.step()
    assert sum(1 for e in sim.events if e.reason == "HelperUnschedulable") == 1  # one Event, not one a round
    sim.step(dt=61)
    stalled = condition(sim.status, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "PlanningDeadlineExceeded"
    assert words in stalled["message"]
    assert sim.status["phase"] == "Recovering"  # still waiting, never failed for it
    sim.finish_job("demo-plan-2", plan("fresh"))
    sim.step()
    assert condition(sim.status, "Stalled")["status"] == "False"
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running"


# ----------------------------------------------------------------------------------------------
# Stage deadlines, and the cluster's words while starting


def test_workers_still_terminating_past_the_stopping_deadline_are_force_deleted() -> None:
    sim = Sim(make_spec(recovery={"deadlines": {"stoppingSeconds": 20}, "backoff": {"initialSeconds": 0}}))
    sim.start_running()
    sim.fail_pod("demo-1-0")
    sim.step()
    assert DeletePod("demo-1-1") in sim.deleted
    sim.step(dt=10)
    assert not any(d.force for d in sim.deleted)
    sim.step(dt=11)
    assert DeletePod("demo-1-1", force=True) in sim.deleted
    stalled = condition(sim.status, "Stalled")
    assert stalled["reason"] == "StoppingDeadlineExceeded" and "demo-1-1" in stalled["message"]
    sim.finish_deletions()
    sim.step()
    assert sim.status["recovery"]["stage"] == "Planning"
    assert condition(sim.status, "Stalled")["status"] == "False"


def test_a_worker_whose_image_cannot_be_pulled_is_reported_at_once_with_the_kubelets_reason() -> None:
    sim = Sim()
    sim.step()
    sim.finish_job("demo-plan-1", plan("fresh"))
    sim.step()
    pod = sim.pods["demo-1-1"]
    sim.pods["demo-1-1"] = PodView(
        **{
            **pod.__dict__,
            "node": "n1",
            "waiting_reason": "ImagePullBackOff",
            "waiting_message": 'Back-off pulling image "nope:1"',
        }
    )
    sim.step()
    assert condition(sim.status, "Ready")["reason"] == "ImagePullBackOff"
    assert (
        'worker demo-1-1 cannot start: ImagePullBackOff: Back-off pulling image "nope:1"'
        in (sim.status["message"])
    )
    assert [e.reason for e in sim.events].count("ImagePullBackOff") == 1


def test_unschedulable_workers_past_the_starting_deadline_stall_with_the_schedulers_words() -> None:
    sim = Sim(make_spec(recovery={"deadlines": {"startingSeconds": 30}, "backoff": {"initialSeconds": 0}}))
    sim.step()
    sim.finish_job("demo-plan-1", plan("fresh"))
    sim.step()
    words = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    for name, pod in list(sim.pods.items()):
        sim.pods[name] = PodView(
            **{**pod.__dict__, "unschedulable_since": sim.now, "unschedulable_message": words}
        )
    sim.step()
    assert words in sim.status["message"] and "2 of 2 workers cannot be scheduled" in sim.status["message"]
    assert "Stalled" not in {c["type"] for c in sim.status["conditions"]}
    result = sim.step(dt=31)
    assert condition(sim.status, "Stalled")["reason"] == "StartingDeadlineExceeded"
    assert any(e.reason == "StartingDeadlineExceeded" for e in result.events)
    assert sim.status["phase"] == "Pending"


# ----------------------------------------------------------------------------------------------
# Identity by uid


def test_a_namesakes_leftovers_are_deleted_and_waited_for_never_adopted() -> None:
    sim = Sim()
    sim.foreign = [ForeignObject("Pod", "demo-1-0", deleting=True), ForeignObject("Job", "demo-plan-1")]
    result = sim.step()
    assert not [a for a in result.actions if hasattr(a, "manifest")]  # nothing created meanwhile
    assert DeleteJob("demo-plan-1") in result.actions
    assert not any(isinstance(a, DeletePod) for a in result.actions)  # already terminating
    assert condition(sim.status, "Ready")["reason"] == "WaitingForPredecessor"
    assert "earlier TrainingJob named demo" in sim.status["message"]
    sim.foreign = []
    result = sim.step()
    assert [a.manifest["metadata"]["name"] for a in result.actions if hasattr(a, "manifest")] == [
        "demo-plan-1"
    ]


def test_owner_uid_reads_the_controlling_owner() -> None:
    obj = {"metadata": {"ownerReferences": [{"uid": "a"}, {"uid": "b", "controller": True}]}}
    assert owner_uid(obj) == "b"
    assert owner_uid({"metadata": {}}) is None


# ----------------------------------------------------------------------------------------------
# API problems


def test_a_refused_create_becomes_status_and_the_next_round_clears_it() -> None:
    sim = Sim()
    sim.step()
    sim.finish_job("demo-plan-1", plan("fresh"))
    before = json.loads(json.dumps(sim.status))
    problem = ApiProblem(
        "create", "Pod", "demo-1-0", 403, 'pods "demo-1-0" is forbidden: exceeded quota: no-pods'
    )
    refused = api_problem_status(before, problem, T0 + 5, 1)
    assert refused["recovery"] == before["recovery"]  # nothing it would have recorded happened
    ready = condition(refused, "Ready")
    assert ready["reason"] == "CreateRefused"
    assert "create Pod demo-1-0" in ready["message"] and "HTTP 403" in ready["message"]
    assert "exceeded quota: no-pods" in refused["message"]
    sim.status = refused
    sim.step()
    assert condition(sim.status, "Ready")["reason"] != "CreateRefused"
    assert sim.status["attempt"] == 1


def test_api_problem_reasons() -> None:
    assert ApiProblem("create", "Pod", "p", 422, "m").reason == "CreateRefused"
    assert ApiProblem("delete", "Pod", "p", 403, "m").reason == "DeleteRefused"
    assert ApiProblem("create", "Pod", "p", 429, "m").reason == "Throttled"
    assert ApiProblem("create", "Pod", "p", 503, "m").reason == "Throttled"
    assert ApiProblem("create", "Service", "s", 409, "m").reason == "WaitingForPredecessor"


def test_kube_error_keeps_the_servers_words_and_retry_after() -> None:
    body = json.dumps({"message": "too many requests", "details": {"retryAfterSeconds": 7}})
    error = KubeError(429, "POST", "/api/v1/namespaces/a/pods", body)
    assert error.message == "too many requests" and error.retry_after == 7
    assert KubeError(503, "POST", "/p", "{}", retry_after=3).retry_after == 3
    terminating = json.dumps(
        {
            "message": 'pods "x" is forbidden: unable to create new content in namespace a because it is '
            "being terminated",
            "details": {"causes": [{"reason": "NamespaceTerminating"}]},
        }
    )
    assert KubeError(403, "POST", "/p", terminating).namespace_terminating
    assert not KubeError(403, "POST", "/p", json.dumps({"message": "exceeded quota"})).namespace_terminating


def test_resource_of_names_the_resource_for_metrics() -> None:
    assert resource_of("/api/v1/namespaces/a/pods/x") == "pods"
    assert resource_of("/apis/batch/v1/namespaces/a/jobs") == "jobs"
    assert (
        resource_of("/apis/relaunch.dev/v1alpha1/namespaces/a/trainingjobs/j/status") == "trainingjobs/status"
    )
    assert resource_of("/api/v1/nodes") == "nodes"
    assert resource_of("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases") == "leases"


def test_retry_delay_backs_off_with_jitter_honours_retry_after_and_is_capped() -> None:
    for failures in range(1, 12):
        delay = handlers.retry_delay(failures, None)
        base = min(handlers.API_RETRY_MAX_SECONDS, 2 ** (failures - 1))
        assert base / 2 <= delay <= base
    assert len({handlers.retry_delay(4, None) for _ in range(20)}) > 1  # jittered
    assert handlers.retry_delay(1, 9.0) == 9.0
    assert handlers.retry_delay(30, None, short=True) <= 10.0


# ----------------------------------------------------------------------------------------------
# What the views read from the API


def test_pod_view_reads_the_schedulers_and_the_kubelets_words() -> None:
    pod = {
        "metadata": {
            "name": "demo-1-0",
            "labels": {resources.LABEL_ATTEMPT: "1", resources.LABEL_INDEX: "0"},
        },
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 node(s) were unschedulable.",
                    "lastTransitionTime": "2027-01-15T08:00:00Z",
                }
            ],
            "containerStatuses": [
                {
                    "state": {
                        "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}
                    }
                }
            ],
        },
    }
    view = pod_view(pod)
    assert view is not None
    assert view.unschedulable_message == "0/3 nodes are available: 3 node(s) were unschedulable."
    assert (view.waiting_reason, view.waiting_message) == (
        "CreateContainerConfigError",
        'secret "s" not found',
    )


def test_helper_job_view_prefers_the_live_replacement_of_a_disrupted_pod() -> None:
    job = {"metadata": {"name": "demo-plan-2"}, "status": {}}

    def pod(name: str, phase: str, created: str, **status: Any) -> dict[str, Any]:
        return {
            "metadata": {
                "name": name,
                "creationTimestamp": created,
                "labels": {"batch.kubernetes.io/job-name": "demo-plan-2"},
            },
            "spec": {"nodeName": "n1"},
            "status": {"phase": phase, **status},
        }

    evicted = pod("a", "Failed", "2027-01-15T08:00:00Z", reason="Evicted")
    replacement = pod("b", "Running", "2027-01-15T08:00:05Z")
    view = helper_job_view(job, [evicted, replacement])
    assert view.pod == "b" and not view.failed and view.node == "n1"
    killed = pod(
        "c",
        "Failed",
        "2027-01-15T08:00:00Z",
        containerStatuses=[{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}],
    )
    view = helper_job_view(
        {**job, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}, [killed]
    )
    assert view.failed and view.pod_reason == "OOMKilled" and view.killed


def test_event_names_are_stable_per_job_and_text() -> None:
    one = event_name(REF, "Warning", "CreateRefused", "m")
    assert one == event_name(REF, "Warning", "CreateRefused", "m")
    assert one != event_name(REF, "Warning", "CreateRefused", "other")
    assert one.startswith("demo.")
    assert HelperJobView("x", exit_code=1, message="boom").killed is False


# ----------------------------------------------------------------------------------------------
# The reason a plan is asked for


def test_a_spec_edit_that_leaves_config_and_template_alone_is_a_plain_restart() -> None:
    from relaunch.controller.planning import RelaunchPlanner

    sim = Sim()
    sim.start_running()
    for name in list(sim.pods):
        sim.pods[name] = PodView(**{**sim.pods[name].__dict__, "phase": "Failed", "exit_code": 2})
    sim.step()
    assert sim.status["phase"] == "Failed"
    sim.spec_body = make_spec(recovery={"maxRestarts": 9, "backoff": {"initialSeconds": 0}})
    sim.generation = 2
    sim.step()
    sim.finish_deletions()
    sim.step()
    assert sim.planner.commands[-1]["reason"] == "SpecChanged"
    command = RelaunchPlanner().plan_command(parse_spec(sim.spec_body), **sim.planner.commands[-1])
    assert command[command.index("--reason") + 1] == "Start"  # not "incremental training"

    sim.finish_job("demo-plan-2", plan("fresh"))
    sim.step()
    sim.run_all()
    sim.step()
    for name in [n for n in sim.pods if n.startswith("demo-2-")]:
        sim.pods[name] = PodView(**{**sim.pods[name].__dict__, "phase": "Succeeded", "exit_code": 0})
    sim.step()
    sim.config_text = "output_dir: /shared/output\nrunner_config: {epochs: 6}\n"
    sim.generation = 3
    sim.step()
    sim.finish_deletions()
    sim.step()
    assert sim.planner.commands[-1]["reason"] == "ConfigChanged"


def test_a_conversion_pod_killed_is_tried_again_then_gives_up_naming_the_cause() -> None:
    sim = Sim()
    sim.start_running()
    sim.spec_body = make_spec(replicas=4, recovery={"backoff": {"initialSeconds": 0}})
    sim.step()
    sim.finish_deletions()
    sim.step()
    convert = {"convert_command": ["relaunch", "convert", "unify"], "step": 5, "epoch": 1, "ranks": 2}
    sim.finish_job("demo-plan-2", plan("convert", **convert))
    sim.step()
    assert sim.status["phase"] == "Converting"
    for try_ in range(1, HELPER_MAX_TRIES + 1):
        name = resources.convert_job_name("demo", 2, try_)
        sim.step(dt=30)
        assert name in sim.jobs, (name, sim.status["message"])
        sim.jobs[name] = HelperJobView(name, failed=True, exit_code=137, pod_reason="OOMKilled")
        sim.step()
    failed = condition(sim.status, "Failed")
    assert failed["reason"] == "ConversionFailed"
    assert "memory limit" in failed["message"] and "gave up after 3 tries" in failed["message"]
