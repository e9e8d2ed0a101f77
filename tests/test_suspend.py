"""spec.suspend in the state machine (relaunch.controller.reconcile), through ``Sim``.

A suspend (by the user, or by a queue such as Kueue admitting and preempting) is obeyed in the
round that sees it whatever the job is doing, counts nothing and keeps no backoff; clearing it
resumes from the newest complete checkpoint, converting when spec.replicas changed meanwhile.
"""

from __future__ import annotations

from typing import Any

from test_reconcile import Sim, condition_of, elastic_job_with_room_for_two_of_four, kinds, make_spec, plan

from relaunch.controller.reconcile import Create, DeleteJob, DeletePod, PodView

CONVERT = ["relaunch", "convert", "unify"]


def set_suspend(sim: Sim, suspend: bool, **spec: Any) -> None:
    """What a merge patch of spec.suspend (and maybe other fields) does: a new generation."""
    sim.spec_body = make_spec(**{**sim.spec_body, **spec, "suspend": suspend})
    sim.generation += 1


def stop_gracefully(sim: Sim) -> None:
    """The kubelet's part of a graceful deletion: SIGTERM ends each worker (exit 143), then it goes."""
    for name, pod in list(sim.pods.items()):
        if pod.deleting:
            sim.pods[name] = PodView(**{**pod.__dict__, "phase": "Failed", "exit_code": 143})
    sim.step()
    sim.finish_deletions()


def test_a_job_created_suspended_creates_nothing_until_it_is_cleared() -> None:
    sim = Sim(make_spec(suspend=True))
    for _ in range(3):
        result = sim.step(5.0)
        assert result.actions == []
    assert sim.created == [] and sim.planner.commands == []
    assert sim.status["phase"] == "Suspended"
    assert "recovery" not in sim.status and sim.status.get("attempt", 0) == 0
    suspended = condition_of(sim.status, "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", "Suspended")
    assert condition_of(sim.status, "Ready")["reason"] == "Suspended"
    assert [e.reason for e in sim.events] == ["Suspended"]  # said once, not every round

    set_suspend(sim, False)
    result = sim.step()
    assert kinds(result) == ["Job"] and result.actions[0].manifest["metadata"]["name"] == "demo-plan-1"
    assert sim.status["phase"] == "Pending" and sim.status["recovery"]["reason"] == "Created"
    resumed = condition_of(sim.status, "Suspended")
    assert (resumed["status"], resumed["reason"]) == ("False", "Resumed")
    sim.finish_job("demo-plan-1", plan("fresh"))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["attempt"] == 1
    assert sim.status.get("restarts", 0) == 0


def test_suspending_a_running_job_stops_the_gang_gracefully_and_counts_nothing() -> None:
    sim = Sim()
    sim.start_running()
    set_suspend(sim, True)
    result = sim.step()
    deletions = [a for a in result.actions if isinstance(a, DeletePod)]
    assert sorted(a.name for a in deletions) == ["demo-1-0", "demo-1-1"]
    assert not any(a.force for a in deletions)  # SIGTERM and the pods' grace period
    assert not [a for a in result.actions if isinstance(a, Create)]
    assert sim.status["phase"] == "Suspended" and sim.status["readyWorkers"] == 0
    assert "recovery" not in sim.status
    assert "stopping 2 workers gracefully" in sim.status["message"]
    assert [e.reason for e in result.events] == ["Suspended"]
    assert condition_of(sim.status, "Ready")["reason"] == "Suspended"

    # The workers end on SIGTERM (exit 143) and disappear: neither is a failure.
    stop_gracefully(sim)
    result = sim.step()
    assert result.actions == [] and result.events == []
    assert sim.status["phase"] == "Suspended"
    assert sim.status.get("restarts", 0) == 0 and "lastFailure" not in sim.status
    assert "no worker runs" in sim.status["message"]
    assert sim.status["attempt"] == 1 and sim.status["workers"] == 2  # kept for resuming

    set_suspend(sim, False)
    sim.step()
    rec = sim.status["recovery"]
    assert (rec["reason"], rec["counted"], rec["attempt"], rec["fromWorldSize"]) == ("Resumed", False, 2, 2)
    assert "notBefore" not in rec
    assert sim.planner.commands[-1]["reason"] == "Resumed"
    assert sim.planner.commands[-1]["world_size"] == sim.planner.commands[-1]["previous_world_size"] == 2
    sim.finish_job("demo-plan-2", plan("resume", step=10, epoch=1, ranks=2))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["attempt"] == 2
    assert sim.status["checkpoint"]["step"] == 10
    assert sim.status.get("restarts", 0) == 0
    entry = sim.status["recoveries"][-1]
    assert (entry["reason"], entry["counted"], entry["fromStep"]) == ("Resumed", False, 10)
    assert condition_of(sim.status, "Suspended")["status"] == "False"


def test_suspend_during_planning_deletes_the_plan_job_and_drops_the_recovery_and_its_backoff() -> None:
    sim = Sim(make_spec(recovery={"maxRestarts": 3, "backoff": {"initialSeconds": 60}}))
    sim.start_running()
    sim.fail_pod("demo-1-1")
    sim.step()
    assert sim.status["restarts"] == 1  # the failure counts, once
    sim.finish_deletions()
    sim.step()
    assert sim.status["recovery"]["stage"] == "Planning" and "demo-plan-2" in sim.jobs

    set_suspend(sim, True)
    result = sim.step()
    assert [a.name for a in result.actions if isinstance(a, DeleteJob)] == ["demo-plan-2"]
    assert "demo-plan-2" not in sim.jobs
    assert sim.status["phase"] == "Suspended" and "recovery" not in sim.status
    assert sim.status["restarts"] == 1  # the suspend is not counted
    entry = sim.status["recoveries"][-1]
    assert (entry["attempt"], entry["reason"], entry["supersededBy"]) == (2, "WorkerFailed", "Suspended")
    assert "interrupted in its Planning stage" in result.events[-1].message
    assert condition_of(sim.status, "Recovering")["status"] == "False"

    # Resumed: a new attempt number (the deleted Job's name is never reused), no backoff.
    set_suspend(sim, False)
    result = sim.step()
    rec = sim.status["recovery"]
    assert (rec["reason"], rec["attempt"], rec["counted"], rec["stage"]) == ("Resumed", 3, False, "Planning")
    assert "notBefore" not in rec
    created = [a.manifest["metadata"]["name"] for a in result.actions if isinstance(a, Create)]
    assert created == ["demo-plan-3"]
    sim.finish_job("demo-plan-3", plan("resume", step=5, epoch=1, ranks=2))
    result = sim.step(0.5)  # well inside the 60 s backoff the failure had asked for
    assert kinds(result).count("Pod") == 2
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["restarts"] == 1


def test_suspend_during_a_backoff_before_starting_drops_it() -> None:
    sim = Sim(make_spec(recovery={"maxRestarts": 3, "backoff": {"initialSeconds": 300, "maxSeconds": 300}}))
    sim.start_running()
    sim.fail_pod("demo-1-0")
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("resume", step=5, epoch=1, ranks=2))
    sim.step()
    assert sim.status["recovery"]["stage"] == "Starting" and "notBefore" in sim.status["recovery"]
    set_suspend(sim, True)
    result = sim.step()
    assert result.actions == [] and sim.status["phase"] == "Suspended"
    assert sim.status["recoveries"][-1]["supersededBy"] == "Suspended"
    set_suspend(sim, False)
    sim.step()
    sim.finish_job("demo-plan-3", plan("resume", step=5, epoch=1, ranks=2))
    result = sim.step()
    assert kinds(result).count("Pod") == 2  # at once, not at the end of the backoff
    assert sim.status["restarts"] == 1


def test_suspend_during_a_conversion_deletes_its_job_and_resuming_converts_again() -> None:
    sim = Sim()
    sim.start_running()
    sim.spec_body = make_spec(replicas=1)
    sim.generation += 1
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("convert", step=10, epoch=1, ranks=2, convert_command=CONVERT))
    sim.step()
    assert sim.status["phase"] == "Converting" and "demo-convert-2" in sim.jobs

    set_suspend(sim, True)
    result = sim.step()
    assert [a.name for a in result.actions if isinstance(a, DeleteJob)] == ["demo-convert-2"]
    assert sim.status["phase"] == "Suspended"
    assert condition_of(sim.status, "Converting")["status"] == "False"
    entry = sim.status["recoveries"][-1]
    assert (entry["reason"], entry["supersededBy"], entry["converted"]) == (
        "ReplicasChanged",
        "Suspended",
        False,
    )
    assert "lastConversion" not in sim.status  # the interrupted conversion is never trusted
    assert sim.status.get("restarts", 0) == 0

    set_suspend(sim, False)
    sim.step()
    # The last gang had 2 workers: the newest checkpoint is converted to 1 again, from scratch.
    assert sim.planner.commands[-1]["reason"] == "Resumed"
    assert (sim.planner.commands[-1]["world_size"], sim.planner.commands[-1]["previous_world_size"]) == (1, 2)
    sim.finish_job("demo-plan-3", plan("convert", step=10, epoch=1, ranks=2, convert_command=CONVERT))
    sim.step()
    assert "demo-convert-3" in sim.jobs and sim.status["phase"] == "Converting"
    sim.finish_job("demo-convert-3", "{}")
    result = sim.step()
    assert kinds(result).count("Pod") == 1
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["workers"] == 1
    assert sim.status["recoveries"][-1]["converted"] is True
    assert sim.status.get("restarts", 0) == 0


def test_replicas_changed_while_suspended_resumes_converted_to_the_new_size() -> None:
    sim = Sim(make_spec(replicas=2))
    sim.start_running()
    set_suspend(sim, True)
    sim.step()
    stop_gracefully(sim)
    set_suspend(sim, True, replicas=1)  # edited while suspended: nothing starts
    result = sim.step()
    assert result.actions == [] and sim.status["phase"] == "Suspended"

    set_suspend(sim, False, replicas=1)
    result = sim.step()
    rec = sim.status["recovery"]
    assert (rec["reason"], rec["replicas"], rec["fromWorldSize"]) == ("Resumed", 1, 2)
    assert "spec.replicas changed from 2" in rec["message"]
    assert any(e.reason == "Resumed" and "changed from 2" in e.message for e in result.events)
    assert (sim.planner.commands[-1]["world_size"], sim.planner.commands[-1]["previous_world_size"]) == (1, 2)
    sim.finish_job("demo-plan-2", plan("convert", step=10, epoch=1, ranks=2, convert_command=CONVERT))
    sim.step()
    sim.finish_job("demo-convert-2", "{}")
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["workers"] == 1
    assert sim.status["recoveries"][-1]["converted"] is True and sim.status.get("restarts", 0) == 0
    sim.step()  # the resumed size is not mistaken for a replicas edit
    assert "recovery" not in sim.status


def test_resuming_before_the_workers_are_gone_waits_for_them() -> None:
    sim = Sim()
    sim.start_running()
    set_suspend(sim, True)
    sim.step()
    set_suspend(sim, False)  # the queue admits the job again at once
    result = sim.step()
    assert sim.status["recovery"]["stage"] == "Stopping"
    assert not [a for a in result.actions if isinstance(a, Create)]
    sim.finish_deletions()
    result = sim.step()
    assert kinds(result) == ["Job"]


def test_suspend_during_stopping_keeps_the_failure_counted_once() -> None:
    sim = Sim()
    sim.start_running()
    sim.fail_pod("demo-1-0")
    sim.step()
    assert sim.status["recovery"]["stage"] == "Stopping" and sim.status["restarts"] == 1
    set_suspend(sim, True)
    result = sim.step()
    assert sim.status["phase"] == "Suspended" and sim.status["restarts"] == 1
    assert sim.status["recoveries"][-1]["supersededBy"] == "Suspended"
    assert not [a for a in result.actions if isinstance(a, Create)]
    # A counted restart stays in the history, so counted entries still match restarts.
    counted = [e for e in sim.status["recoveries"] if e["counted"]]
    assert len(counted) == sim.status["restarts"]


def test_a_worker_failing_while_the_gang_is_suspended_is_not_a_failure() -> None:
    sim = Sim()
    sim.start_running()
    set_suspend(sim, True)
    sim.step()
    sim.fail_pod("demo-1-1", code=1)  # it crashed while stopping
    sim.step()
    assert sim.status["phase"] == "Suspended"
    assert sim.status.get("restarts", 0) == 0 and "lastFailure" not in sim.status


def test_a_finished_job_stays_finished_while_suspended() -> None:
    sim = Sim()
    sim.start_running()
    for name in list(sim.pods):
        sim.pods[name] = PodView(**{**sim.pods[name].__dict__, "phase": "Succeeded", "exit_code": 0})
    sim.step()
    assert sim.status["phase"] == "Succeeded"
    set_suspend(sim, True)
    result = sim.step()
    assert sim.status["phase"] == "Succeeded" and result.actions == []


def test_resuming_a_shrunk_job_grows_it_back_to_spec_replicas() -> None:
    sim = elastic_job_with_room_for_two_of_four()
    sim.step(dt=11)
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-3", plan("resume", step=5, epoch=1, ranks=4))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["workers"] == 2 and sim.status["replicasRequested"] == 4

    set_suspend(sim, True)
    sim.step()
    stop_gracefully(sim)
    set_suspend(sim, False)
    result = sim.step()
    rec = sim.status["recovery"]
    assert (rec["reason"], rec["replicas"], rec["fromWorldSize"]) == ("Resumed", 4, 2)
    assert any(e.reason == "Resumed" and "elastic shrink" in e.message for e in result.events)
    assert (sim.planner.commands[-1]["world_size"], sim.planner.commands[-1]["previous_world_size"]) == (4, 2)
    assert sim.status["restarts"] == 1  # the failure before the shrink, and nothing since


def test_suspend_while_the_new_workers_are_starting_stops_them_and_drops_the_recovery() -> None:
    sim = Sim()
    sim.start_running()
    sim.fail_pod("demo-1-0")
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("resume", step=5, epoch=1, ranks=2))
    sim.step()
    assert sim.status["recovery"]["stage"] == "Starting" and sim.status["attempt"] == 2
    assert sorted(sim.pods) == ["demo-2-0", "demo-2-1"]  # created, still Pending

    set_suspend(sim, True)
    result = sim.step()
    assert sorted(a.name for a in result.actions if isinstance(a, DeletePod)) == ["demo-2-0", "demo-2-1"]
    assert sim.status["phase"] == "Suspended" and "recovery" not in sim.status
    entry = sim.status["recoveries"][-1]
    assert (entry["attempt"], entry["supersededBy"]) == (2, "Suspended") and "restartedAt" not in entry
    stop_gracefully(sim)
    set_suspend(sim, False)
    sim.step()
    rec = sim.status["recovery"]
    assert (rec["reason"], rec["attempt"], rec["fromWorldSize"]) == ("Resumed", 3, 2)
    assert sim.status["restarts"] == 1
