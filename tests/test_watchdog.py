"""Faults that do not crash: failure rules, the restart window, bad-node quarantine, unhealthy
nodes and the progress watchdog, through the pure state machine; and the log follower's parsing."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from test_reconcile import T0, Sim, make_spec, plan

from relaunch.controller.progress import Follower, ProgressTracker, Target, parse_step, split_timestamp
from relaunch.controller.reconcile import NodeView, PodView, ProgressView
from relaunch.model import MINDFORMERS_STEP_PATTERN, SpecError, parse_spec

LINE = (
    "2026-11-30 10:00:00,000 - mindformers - INFO - { Epoch:[  2/  3], step:[    4/   10], loss: 2.5, "
    "per_step_time: 512ms, lr: 1e-05, overflow cond: False, loss_scale: 1.0"
)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def recovery(**fields: Any) -> dict[str, Any]:
    return {"maxRestarts": 3, "backoff": {"initialSeconds": 0}, **fields}


def restart_after_failure(sim: Sim, pod: str, **fail: Any) -> None:
    sim.fail_pod(pod, **fail)
    sim.step()
    sim.finish_deletions()
    sim.step()
    attempt = sim.status["recovery"]["attempt"]
    sim.finish_job(f"demo-plan-{attempt}", plan("fresh"))
    sim.step()
    sim.run_all(node="n2")
    sim.step()
    assert sim.status["phase"] == "Running", sim.status


# ----------------------------------------------------------------------------------------------
# Failure rules


def test_rules_are_validated_naming_the_field() -> None:
    for rules, words in (
        ([{"action": "Retry", "exitCodes": [1]}], r"rules\[0\]\.action must be one of"),
        ([{"action": "Fail", "reasons": ["Gone"]}], r"rules\[0\]\.reasons has \['Gone'\]"),
        ([{"action": "Fail"}], r"rules\[0\] matches every failure"),
        ([{"action": "Fail", "logPattern": "("}], r"rules\[0\]\.logPattern is not a regular expression"),
    ):
        with pytest.raises(SpecError, match=words):
            parse_spec(make_spec(recovery=recovery(rules=rules)))


def test_the_first_matching_rule_decides_then_permanent_codes_then_the_defaults() -> None:
    spec = parse_spec(
        make_spec(
            recovery=recovery(
                rules=[
                    {"action": "RestartNotCounted", "exitCodes": [2], "logPattern": "NCCL timeout"},
                    {"action": "Fail", "reasons": ["OOMKilled"]},
                ]
            )
        )
    )
    rules = spec.recovery
    assert rules.action_for("WorkerFailed", 2, "x\nNCCL timeout\n") == (
        "RestartNotCounted",
        "spec.recovery.rules[0]",
    )
    assert rules.action_for("WorkerFailed", 2, "bad config")[0] == "Fail"  # permanentExitCodes
    assert rules.action_for("OOMKilled", 137, None) == ("Fail", "spec.recovery.rules[1]")
    assert rules.action_for("Preempted", None, None)[0] == "RestartNotCounted"
    assert rules.action_for("Evicted", None, None)[0] == "RestartNotCounted"
    assert rules.action_for("NodeLost", None, None)[0] == "Restart"


def test_an_exit_code_rule_fails_the_job_at_once() -> None:
    sim = Sim(make_spec(recovery=recovery(rules=[{"action": "Fail", "exitCodes": [42]}])))
    sim.start_running()
    sim.fail_pod("demo-1-1", code=42)
    sim.step()
    assert sim.status["phase"] == "Failed"
    failed = condition(sim.status, "Failed")
    assert failed["reason"] == "PermanentFailure" and "spec.recovery.rules[0]" in failed["message"]
    assert sim.status.get("restarts", 0) == 0


def test_a_log_pattern_rule_reads_the_failed_containers_termination_message() -> None:
    sim = Sim(
        make_spec(recovery=recovery(rules=[{"action": "RestartNotCounted", "logPattern": "HCCL.*timeout"}]))
    )
    sim.start_running()
    pod = sim.pods["demo-1-0"]
    message = "step 12\nRuntimeError: HCCL allreduce timeout after 1800s"
    sim.pods["demo-1-0"] = PodView(
        **{**pod.__dict__, "phase": "Failed", "exit_code": 1, "reason": "Error", "message": message}
    )
    sim.step()
    assert sim.status["recovery"]["counted"] is False
    assert sim.status.get("restarts", 0) == 0
    assert "not counted" in sim.status["lastFailure"]["message"]


def test_a_preempted_worker_restarts_the_gang_without_counting() -> None:
    sim = Sim()
    sim.start_running()
    pod = sim.pods["demo-1-0"]
    sim.pods["demo-1-0"] = PodView(
        **{**pod.__dict__, "deleting": True, "disruption": "PreemptionByScheduler"}
    )
    sim.step()
    assert sim.status["lastFailure"]["reason"] == "Preempted"
    assert sim.status["recovery"]["counted"] is False and sim.status.get("restarts", 0) == 0


def test_the_restart_budget_can_be_a_window() -> None:
    sim = Sim(
        make_spec(recovery=recovery(maxRestarts=2, restartWindowSeconds=3600, quarantine={"enabled": False}))
    )
    sim.start_running()
    restart_after_failure(sim, "demo-1-0")
    restart_after_failure(sim, "demo-2-0")
    assert sim.status["restarts"] == 2 and len(sim.status["restartTimes"]) == 2
    sim.now += 3700  # both restarts leave the window
    restart_after_failure(sim, "demo-3-0")
    assert sim.status["restarts"] == 3  # the total still shows every restart
    sim.now += 10
    restart_after_failure(sim, "demo-4-0")
    sim.fail_pod("demo-5-0")
    sim.step()
    failed = condition(sim.status, "Failed")
    assert failed["reason"] == "MaxRestartsExceeded" and "in the last 3600s" in failed["message"]


# ----------------------------------------------------------------------------------------------
# Bad nodes


def test_two_failures_on_one_node_quarantine_it_for_the_cool_down() -> None:
    sim = Sim(make_spec(replicas=2, recovery=recovery(quarantine={"failures": 2, "cooldownSeconds": 600})))
    sim.nodes["n3"] = NodeView("n3", True, None, T0)
    sim.start_running()  # workers on n1
    sim.fail_pod("demo-1-0")
    sim.step()
    assert "quarantinedNodes" not in sim.status
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("fresh"))
    sim.step()
    sim.run_all(node="n1")
    sim.step()
    sim.fail_pod("demo-2-1")
    result = sim.step()
    quarantined = sim.status["quarantinedNodes"]
    assert [q["node"] for q in quarantined] == ["n1"] and "2 failures" in quarantined[0]["reason"]
    assert any(e.reason == "NodeQuarantined" for e in result.events)
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-3", plan("fresh"))
    sim.step()
    worker = next(m for m in sim.created if m["metadata"]["name"] == "demo-3-0")
    terms = worker["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]} in terms[
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    sim.run_all(node="n2")
    sim.step()
    sim.step(dt=601)
    assert "quarantinedNodes" not in sim.status
    assert any(e.reason == "NodeReleased" for e in sim.events)


def test_a_node_marked_unhealthy_moves_the_gang_off_it_without_counting() -> None:
    sim = Sim(make_spec(nodeHealth={"taints": ["example.com/gpu-unhealthy"]}, recovery=recovery()))
    sim.start_running()  # on n1
    sim.nodes["n1"] = NodeView("n1", True, None, T0, taints=frozenset({"example.com/gpu-unhealthy"}))
    sim.step()
    assert sim.status["lastFailure"]["reason"] == "NodeUnhealthy"
    assert "taint example.com/gpu-unhealthy" in sim.status["lastFailure"]["message"]
    assert sim.status["recovery"]["counted"] is False
    assert [q["node"] for q in sim.status["quarantinedNodes"]] == ["n1"]


# ----------------------------------------------------------------------------------------------
# The progress watchdog


def watched(**progress: Any) -> Sim:
    spec = make_spec(
        progress={"startupSeconds": 60, "stallSeconds": 20, "checkpointSaveSeconds": 90, **progress},
        recovery=recovery(),
    )
    callbacks = "callbacks:\n  - type: CheckpointMonitor\n    save_checkpoint_steps: 5\n"
    spec["config"] = {"text": "output_dir: /shared/output\n" + callbacks}
    sim = Sim(spec)
    sim.config_text = spec["config"]["text"]
    sim.start_running()
    return sim


def test_no_step_within_the_startup_allowance_is_a_startup_timeout() -> None:
    sim = watched()
    result = sim.step(dt=30)
    assert sim.status["phase"] == "Running" and result.requeue_after <= 30.1
    sim.step(dt=31)
    assert sim.status["lastFailure"]["reason"] == "StartupTimeout"
    assert "within 60s" in sim.status["lastFailure"]["message"]
    assert sim.status["recovery"]["counted"] is True


def test_a_stall_between_steps_is_no_progress_and_the_live_step_is_in_the_status() -> None:
    sim = watched()
    sim.progress = ProgressView(attempt=1, global_step=12, step=2, epoch=2, at=sim.now)
    result = sim.step(dt=1)
    assert sim.status["progress"] == {
        "attempt": 1,
        "step": 2,
        "epoch": 2,
        "globalStep": 12,
        "at": sim.status["progress"]["at"],
    }
    assert result.requeue_after == pytest.approx(19, abs=0.2)  # wakes at the stall deadline, no polling
    sim.step(dt=18)
    assert sim.status["phase"] == "Running"
    sim.step(dt=2)
    last = sim.status["lastFailure"]
    assert last["reason"] == "NoProgress" and "after step 12" in last["message"] and last["pod"] == "demo-1-0"


def test_a_slow_save_within_the_save_allowance_is_not_a_stall() -> None:
    sim = watched()
    sim.progress = ProgressView(attempt=1, global_step=15, step=5, epoch=2, at=sim.now)  # 15 % 5: a save
    sim.step(dt=60)
    assert sim.status["phase"] == "Running"
    sim.step(dt=31)
    assert (
        sim.status["lastFailure"]["reason"] == "NoProgress"
        and "checkpointSaveSeconds" in (sim.status["lastFailure"]["message"])
    )


def test_a_step_of_an_older_attempt_does_not_count() -> None:
    sim = watched()
    sim.progress = ProgressView(attempt=0, global_step=30, step=10, epoch=3, at=sim.now)
    sim.step(dt=61)
    assert sim.status["lastFailure"]["reason"] == "StartupTimeout"


# ----------------------------------------------------------------------------------------------
# Reading steps from a log


def test_the_mindformers_step_line_gives_the_global_step() -> None:
    assert parse_step(re.compile(MINDFORMERS_STEP_PATTERN), LINE) == (14, 4, 2)
    assert parse_step(re.compile(MINDFORMERS_STEP_PATTERN), "loading checkpoint") is None
    assert parse_step(re.compile(r"iter (?P<step>\d+)"), "iter 77 loss 1") == (77, 77, None)


def test_kubelet_timestamps_are_split_off() -> None:
    at, text = split_timestamp("2026-11-30T10:00:01.123456789Z hello world")
    expected = dt.datetime(2026, 11, 30, 10, 0, 1, 123456, tzinfo=dt.UTC).timestamp()
    assert text == "hello world" and at == pytest.approx(expected)
    assert split_timestamp("no stamp here") == (None, "no stamp here")


class FakeStream:
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.closed = False

    def __iter__(self) -> Any:
        return iter(self.lines)

    def close(self) -> None:
        self.closed = True


def test_a_follower_keeps_the_newest_step_and_reopens_from_the_last_line() -> None:
    opened: list[tuple[str, dict[str, str]]] = []
    streams = [
        FakeStream(
            [
                f"2026-11-30T10:00:0{i}.5Z {LINE.replace('step:[    4/', f'step:[    {i}/')}".encode()
                for i in (1, 2)
            ]
        ),
        FakeStream([b"2026-11-30T10:00:09.0Z done"]),
    ]

    def opener(path: str, query: Any) -> FakeStream:
        opened.append((path, dict(query)))
        return streams[len(opened) - 1]

    follower = Follower(Target("ns", "job-1-0", "trainer", 1, MINDFORMERS_STEP_PATTERN), opener)
    follower._follow()
    assert follower.view is not None and (follower.view.global_step, follower.view.attempt) == (12, 1)
    assert streams[0].closed
    follower._follow()
    path, query = opened[1]
    assert path == "/api/v1/namespaces/ns/pods/job-1-0/log"
    assert query["follow"] == "true" and query["container"] == "trainer"
    assert query["sinceTime"] == "2026-11-30T10:00:02Z"
    assert follower.view.global_step == 12  # a line without a step changes nothing


def test_the_tracker_replaces_the_follower_of_an_older_attempt() -> None:
    tracker = ProgressTracker(lambda path, query: FakeStream([]))
    key = ("ns", "job")
    tracker.follow(key, Target("ns", "job-1-0", None, 1, MINDFORMERS_STEP_PATTERN))
    first = tracker._followers[key]
    tracker.follow(key, Target("ns", "job-1-0", None, 1, MINDFORMERS_STEP_PATTERN))
    assert tracker._followers[key] is first
    tracker.follow(key, Target("ns", "job-2-0", None, 2, MINDFORMERS_STEP_PATTERN))
    assert tracker._followers[key] is not first and first.stopped.is_set()
    tracker.stop_all()
    assert tracker.view(key) is None


def test_the_live_step_is_rewritten_at_most_every_30_s_of_training() -> None:
    sim = watched(stallSeconds=600)
    sim.progress = ProgressView(attempt=1, global_step=3, step=3, epoch=1, at=sim.now)
    sim.step(dt=1)
    assert sim.status["progress"]["globalStep"] == 3
    sim.progress = ProgressView(attempt=1, global_step=20, step=10, epoch=2, at=sim.now + 20)
    sim.step(dt=21)
    assert sim.status["progress"]["globalStep"] == 3  # 20 s of training later: not yet
    sim.progress = ProgressView(attempt=1, global_step=31, step=1, epoch=4, at=sim.now + 11)
    sim.step(dt=12)
    assert sim.status["progress"]["globalStep"] == 31
