"""The TrainingJob state machine (relaunch.controller.reconcile), scenario by scenario, with no cluster.

Each test drives :func:`reconcile` with a status and a hand-built view of the cluster and checks
the actions, the new status and the Events; ``Sim`` applies the actions to a fake cluster so a
whole life cycle (start, failure, recovery, conversion) can be followed round by round.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest

from relaunch import resources
from relaunch.controller.planning import RelaunchPlanner
from relaunch.controller.reconcile import (
    Create,
    DeleteJob,
    DeletePod,
    ForeignObject,
    HelperJobView,
    NodeView,
    Observed,
    PlanOutcome,
    PodView,
    node_lost_at,
    reconcile,
    set_condition,
)
from relaunch.model import SpecError, parse_spec

REF = resources.JobRef("demo", "ns", "uid-1")
T0 = 1_800_000_000.0
CONFIG = "output_dir: /shared/output\nload_checkpoint: ''\nresume_training: False\n"


def make_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "replicas": 2,
        "template": {"spec": {"containers": [{"name": "trainer", "image": "demo", "command": ["train"]}]}},
        "checkpoint": {"dir": "/shared/output/checkpoint", "strategyDir": "/shared/output/strategy"},
        "config": {"text": CONFIG},
        "recovery": {"maxRestarts": 3, "backoff": {"initialSeconds": 0}, "nodeLossGraceSeconds": 30},
    }
    spec.update(overrides)
    return spec


class FakePlanner:
    """Plans are JSON dicts with the PlanOutcome fields; rendering appends a marker line."""

    def __init__(self) -> None:
        self.commands: list[dict[str, Any]] = []

    def plan_command(self, spec: Any, **kwargs: Any) -> list[str]:
        self.commands.append(kwargs)
        return ["relaunch", "plan", json.dumps(kwargs, sort_keys=True)]

    def interpret(self, message: str) -> PlanOutcome:
        data = json.loads(message)
        if "convert_command" in data:
            data["convert_command"] = tuple(data["convert_command"])
        return PlanOutcome(**data)

    def render(self, text: str, outcome: PlanOutcome, spec: Any) -> str:
        return text + f"# {outcome.action} {outcome.step}\n"

    def factorable(self, world_size: int, config_text: str | None) -> bool:
        return world_size != 3  # as if a layout could not take 3 ranks


def plan(action: str, **fields: Any) -> str:
    return json.dumps({"action": action, "message": f"{action} plan", **fields})


class Sim:
    """A fake cluster that applies the state machine's actions, for multi-round scenarios."""

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        self.spec_body = spec or make_spec()
        self.status: dict[str, Any] = {}
        self.pods: dict[str, PodView] = {}
        self.jobs: dict[str, HelperJobView] = {}
        self.nodes: dict[str, NodeView] = {
            "n1": NodeView("n1", True, None, T0),
            "n2": NodeView("n2", True, None, T0),
        }
        self.created: list[dict[str, Any]] = []
        self.deleted: list[DeletePod] = []
        self.deleted_jobs: list[str] = []
        self.foreign: list[ForeignObject] = []
        self.progress: Any = None  # a ProgressView the watchdog reads
        self.events: list[Any] = []
        self.now = T0
        self.planner = FakePlanner()
        self.generation = 1
        self.config_text: str | None = None
        self.frozen: set[str] = set()  # nodes whose heartbeat a test controls; the others stay live

    def observed(self) -> Observed:
        nodes = {
            name: node if name in self.frozen else dataclasses.replace(node, last_heartbeat=self.now)
            for name, node in self.nodes.items()
        }
        return Observed(
            pods=tuple(self.pods.values()),
            jobs=dict(self.jobs),
            nodes=nodes,
            config_text=self.config_text if self.config_text is not None else CONFIG,
            foreign=tuple(self.foreign),
            progress=self.progress,
        )

    def step(self, dt: float = 0.1) -> Any:
        self.now += dt
        result = reconcile(
            REF,
            parse_spec(self.spec_body),
            self.generation,
            self.status,
            self.observed(),
            self.now,
            self.planner,
        )
        for action in result.actions:
            if isinstance(action, Create):
                manifest = action.manifest
                self.created.append(manifest)
                meta = manifest["metadata"]
                if manifest["kind"] == "Pod" and meta["name"] not in self.pods:
                    labels = meta["labels"]
                    self.pods[meta["name"]] = PodView(
                        meta["name"],
                        int(labels[resources.LABEL_ATTEMPT]),
                        int(labels[resources.LABEL_INDEX]),
                        "Pending",
                    )
                elif manifest["kind"] == "Job" and meta["name"] not in self.jobs:
                    self.jobs[meta["name"]] = HelperJobView(meta["name"])
            elif isinstance(action, DeletePod):
                self.deleted.append(action)
                pod = self.pods.get(action.name)
                if pod is not None:
                    self.pods[action.name] = PodView(**{**pod.__dict__, "deleting": True})
            elif isinstance(action, DeleteJob):
                self.deleted_jobs.append(action.name)
                self.jobs.pop(action.name, None)
        self.status = result.status
        self.events.extend(result.events)
        return result

    # cluster-side changes
    def run_all(self, node: str = "n1") -> None:
        for name, pod in self.pods.items():
            if not pod.deleting and pod.phase == "Pending":
                self.pods[name] = PodView(**{**pod.__dict__, "phase": "Running", "node": node})

    def finish_deletions(self) -> None:
        self.pods = {n: p for n, p in self.pods.items() if not p.deleting}

    def finish_job(self, name: str, message: str, *, ok: bool = True) -> None:
        self.jobs[name] = HelperJobView(
            name, succeeded=ok, failed=not ok, message=message, exit_code=0 if ok else 1
        )

    def fail_pod(self, name: str, code: int = 1, reason: str = "Error", at: float | None = None) -> None:
        pod = self.pods[name]
        self.pods[name] = PodView(
            **{**pod.__dict__, "phase": "Failed", "exit_code": code, "reason": reason, "finished_at": at}
        )

    def start_running(self, fresh_plan: str | None = None) -> None:
        """Drive a new job to Running (attempt 1)."""
        self.step()
        self.finish_job("demo-plan-1", fresh_plan or plan("fresh"))
        self.step()
        self.run_all()
        self.step()
        assert self.status["phase"] == "Running", self.status


def kinds(result: Any) -> list[str]:
    return [a.manifest["kind"] for a in result.actions if isinstance(a, Create)]


# ----------------------------------------------------------------------------------------------


def test_new_job_plans_first_then_starts_the_gang() -> None:
    sim = Sim()
    result = sim.step()
    assert sim.status["phase"] == "Pending"
    assert sim.status["recovery"]["stage"] == "Planning"  # nothing to stop: straight to planning
    assert kinds(result) == ["Job"]
    assert result.actions[0].manifest["metadata"]["name"] == "demo-plan-1"
    assert sim.planner.commands[0]["reason"] == "Created"
    assert sim.planner.commands[0]["previous_world_size"] is None
    assert sim.status.get("restarts", 0) == 0

    sim.step()  # the plan Job still runs: nothing new
    assert [m["metadata"]["name"] for m in sim.created] == ["demo-plan-1"]

    sim.finish_job("demo-plan-1", plan("fresh"))
    result = sim.step()
    assert kinds(result) == ["ConfigMap", "Service", "Pod", "Pod"]
    cm = result.actions[0].manifest
    assert cm["metadata"]["name"] == "demo-config-1"
    assert cm["data"]["train.yaml"].endswith("# fresh None\n")
    assert sim.status["attempt"] == 1 and sim.status["workers"] == 2
    assert "checkpoint" not in sim.status

    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running"
    assert "recovery" not in sim.status
    assert sim.status["recoveries"][-1]["reason"] == "Created"
    ready = next(c for c in sim.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1


def test_worker_failure_stops_gang_plans_and_restarts_from_the_planned_step() -> None:
    sim = Sim()
    sim.start_running()
    sim.fail_pod("demo-1-1", code=1)
    result = sim.step()
    assert sim.status["phase"] == "Recovering"
    assert sim.status["restarts"] == 1
    assert sim.status["lastFailure"]["reason"] == "WorkerFailed"
    assert sim.status["lastFailure"]["pod"] == "demo-1-1"
    assert sim.status["recovery"]["stage"] == "Stopping"
    assert {a.name for a in result.actions if isinstance(a, DeletePod)} == {"demo-1-0", "demo-1-1"}
    assert any(e.reason == "RecoveryStarted" for e in result.events)

    # Still stopping while pods exist: no plan Job yet, and the restart is not counted twice.
    result = sim.step()
    assert sim.status["restarts"] == 1
    assert "Job" not in kinds(result)

    sim.finish_deletions()
    result = sim.step()
    assert kinds(result) == ["Job"]
    assert sim.planner.commands[-1]["previous_world_size"] == 2
    assert sim.planner.commands[-1]["reason"] == "WorkerFailed"

    sim.finish_job(
        "demo-plan-2", plan("resume", step=10, epoch=1, file="demo_rank_0-1_10.safetensors", ranks=2)
    )
    result = sim.step()
    assert [m["metadata"]["name"] for m in (a.manifest for a in result.actions if isinstance(a, Create))] == [
        "demo-config-2",
        "demo",
        "demo-2-0",
        "demo-2-1",
    ]
    assert sim.status["checkpoint"] == {
        "step": 10,
        "epoch": 1,
        "file": "demo_rank_0-1_10.safetensors",
        "ranks": 2,
    }
    sim.run_all(node="n2")
    result = sim.step()
    assert sim.status["phase"] == "Running"
    entry = sim.status["recoveries"][-1]
    assert entry["reason"] == "WorkerFailed" and entry["fromStep"] == 10 and entry["counted"] is True
    assert set(entry["seconds"]) >= {"Stopping", "Planning", "Starting", "total"}
    assert result.completed_recovery == entry
    assert any(e.reason == "Recovered" for e in result.events)


def test_repeating_a_round_after_a_crash_creates_the_same_objects() -> None:
    """The operator dies after creating the workers but before writing status: the next round
    repeats the same creates (409 = done), with the same names, and counts nothing twice."""
    sim = Sim()
    sim.step()
    sim.finish_job("demo-plan-1", plan("fresh"))
    before = dict(sim.status)
    first = sim.step()
    sim.status = before  # the status write was lost
    second = sim.step()
    names = lambda r: [a.manifest["metadata"]["name"] for a in r.actions if isinstance(a, Create)]  # noqa: E731
    assert names(first) == names(second)
    assert sim.status["attempt"] == 1


def test_permanent_exit_code_fails_at_once_and_stops_the_others() -> None:
    sim = Sim()
    sim.start_running()
    sim.fail_pod("demo-1-0", code=2)
    result = sim.step()
    assert sim.status["phase"] == "Failed"
    failed = next(c for c in sim.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentFailure" and "exited with code 2" in failed["message"]
    assert [a.name for a in result.actions if isinstance(a, DeletePod)] == ["demo-1-1"]
    assert sim.status.get("restarts", 0) == 0


def test_permanent_code_wins_over_the_ranks_that_failed_because_of_it() -> None:
    sim = Sim()
    sim.start_running()
    sim.fail_pod("demo-1-0", code=1, at=T0 + 5)
    sim.fail_pod("demo-1-1", code=2, at=T0 + 6)
    sim.step()
    assert sim.status["phase"] == "Failed"
    assert sim.status["lastFailure"]["pod"] == "demo-1-1"


def test_first_failed_worker_is_reported() -> None:
    sim = Sim()
    sim.start_running()
    sim.fail_pod("demo-1-0", code=1, at=T0 + 9)
    sim.fail_pod("demo-1-1", code=137, reason="OOMKilled", at=T0 + 3)
    sim.step()
    assert sim.status["lastFailure"]["reason"] == "OOMKilled"
    assert sim.status["lastFailure"]["pod"] == "demo-1-1"


def test_in_the_same_second_the_killed_worker_is_reported_not_the_peer_that_reacted() -> None:
    sim = Sim()
    sim.start_running()
    sim.fail_pod("demo-1-0", code=1, at=T0 + 5)  # exited because its peer vanished
    sim.fail_pod("demo-1-1", code=137, at=T0 + 5)  # SIGKILLed: the cause
    sim.step()
    assert sim.status["lastFailure"]["pod"] == "demo-1-1"
    assert sim.status["lastFailure"]["exitCode"] == 137


def test_an_earlier_error_exit_still_wins_over_a_later_kill() -> None:
    sim = Sim()
    sim.start_running()
    sim.fail_pod("demo-1-0", code=137, at=T0 + 6)
    sim.fail_pod("demo-1-1", code=1, at=T0 + 5)
    sim.step()
    assert sim.status["lastFailure"]["pod"] == "demo-1-1"


def test_max_restarts_exhausted_fails_with_reason() -> None:
    sim = Sim(make_spec(recovery={"maxRestarts": 1, "backoff": {"initialSeconds": 0}}))
    sim.start_running()
    sim.fail_pod("demo-1-0")
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("fresh"))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["restarts"] == 1
    sim.fail_pod("demo-2-1")
    sim.step()
    assert sim.status["phase"] == "Failed"
    failed = next(c for c in sim.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "MaxRestartsExceeded"
    assert "maxRestarts is 1" in failed["message"]
    assert sim.status["restarts"] == 1


def test_backoff_delays_the_new_attempt() -> None:
    sim = Sim(make_spec(recovery={"backoff": {"initialSeconds": 10, "maxSeconds": 15}}))
    sim.start_running()
    sim.fail_pod("demo-1-0")
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("fresh"))
    result = sim.step()
    assert "Pod" not in kinds(result)
    assert "backoff" in sim.status["message"]
    assert 9 < result.requeue_after <= 10
    result = sim.step(dt=10)
    assert kinds(result).count("Pod") == 2


def test_backoff_doubles_and_is_capped() -> None:
    rec = parse_spec(make_spec(recovery={"backoff": {"initialSeconds": 10, "maxSeconds": 35}})).recovery
    assert [rec.backoff_seconds(n) for n in (1, 2, 3, 4, 50)] == [10, 20, 35, 35, 35]


def test_lost_node_is_detected_after_the_grace_period_and_its_pods_force_deleted() -> None:
    sim = Sim()
    sim.start_running(fresh_plan=plan("fresh"))
    sim.now = T0 + 20
    sim.frozen.add("n1")
    sim.nodes["n1"] = NodeView("n1", True, None, T0 + 19)  # heartbeat 1 s ago
    result = sim.step(dt=0)
    assert sim.status["phase"] == "Running"
    assert 28 < result.requeue_after <= 30  # wakes up when the grace period would end
    # The node stops heartbeating at T0+19 and does not come back.
    sim.now = T0 + 19 + 30 + 0.5
    result = sim.step(dt=0)
    assert sim.status["lastFailure"]["reason"] == "NodeLost"
    assert sim.status["lastFailure"]["node"] == "n1"
    assert all(a.force for a in result.actions if isinstance(a, DeletePod))
    # Pods stuck terminating on the dead node keep being force-deleted.
    result = sim.step()
    assert all(a.force for a in result.actions if isinstance(a, DeletePod)) and result.actions
    assert sim.status["lastFailure"]["reason"] == "NodeLost"
    # The new gang and its planning Job keep off the lost node.
    sim.finish_deletions()
    result = sim.step()
    plan_job = result.actions[0].manifest
    exclusion = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1"]}
    terms = plan_job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    assert terms["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"
    ] == [exclusion]
    sim.finish_job("demo-plan-2", plan("fresh"))
    result = sim.step()
    pods = [a.manifest for a in result.actions if isinstance(a, Create) and a.manifest["kind"] == "Pod"]
    assert len(pods) == 2
    for pod in pods:
        affinity = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert affinity["nodeSelectorTerms"][0]["matchExpressions"] == [exclusion]


def test_not_ready_node_counts_from_the_transition_and_deleted_node_at_once() -> None:
    sim = Sim()
    sim.start_running()
    sim.nodes["n1"] = NodeView("n1", False, sim.now - 10, None)
    sim.step()
    assert sim.status["phase"] == "Running"
    del sim.nodes["n1"]
    sim.step()
    assert sim.status["lastFailure"]["reason"] == "NodeLost"
    assert "deleted" in sim.status["lastFailure"]["message"]


def test_unsynced_node_view_never_declares_loss() -> None:
    sim = Sim()
    sim.start_running()
    result = reconcile(
        REF,
        parse_spec(sim.spec_body),
        1,
        sim.status,
        Observed(pods=tuple(sim.pods.values()), nodes=None, config_text=CONFIG),
        sim.now + 1000,
        sim.planner,
    )
    assert result.status["phase"] == "Running"


def test_deleted_or_missing_worker_is_a_failure() -> None:
    sim = Sim()
    sim.start_running()
    del sim.pods["demo-1-1"]
    sim.step()
    assert sim.status["lastFailure"]["reason"] == "PodDeleted"
    assert sim.status["restarts"] == 1


def test_replicas_edit_converts_without_counting_a_restart() -> None:
    sim = Sim()
    sim.start_running()
    sim.spec_body = make_spec(replicas=1)
    sim.generation = 2
    sim.step()
    assert sim.status["recovery"]["reason"] == "ReplicasChanged"
    assert sim.status["recovery"]["fromWorldSize"] == 2
    assert sim.status.get("restarts", 0) == 0
    sim.finish_deletions()
    sim.step()
    assert sim.planner.commands[-1] == {
        "reason": "ReplicasChanged",
        "world_size": 1,
        "previous_world_size": 2,
        "last_conversion": None,
        "config_text": CONFIG,
    }
    convert = ["relaunch", "convert", "unify", "--conversion", "{}"]
    sim.finish_job(
        "demo-plan-2",
        plan(
            "convert",
            step=10,
            epoch=1,
            ranks=2,
            convert_command=convert,
            conversion_record='{"mode":"Unify"}',
        ),
    )
    result = sim.step()
    assert sim.status["phase"] == "Converting"
    job = result.actions[0].manifest
    assert job["metadata"]["name"] == "demo-convert-2"
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == convert
    converting = next(c for c in sim.status["conditions"] if c["type"] == "Converting")
    assert converting["status"] == "True"

    sim.step()  # conversion still running: no second conversion Job
    assert sum(1 for m in sim.created if m["metadata"]["name"] == "demo-convert-2") == 1

    sim.finish_job("demo-convert-2", '{"bytes": 100, "seconds": 1.5}')
    result = sim.step()
    assert result.conversion_report == '{"bytes": 100, "seconds": 1.5}'
    assert kinds(result).count("Pod") == 1
    assert sim.status["workers"] == 1 and sim.status["lastConversion"] == '{"mode":"Unify"}'
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running"
    assert sim.status["recoveries"][-1]["converted"] is True
    assert sim.status.get("restarts", 0) == 0


def test_config_edit_is_a_controlled_restart() -> None:
    sim = Sim()
    sim.start_running()
    sim.config_text = CONFIG + "train_dataset: {seed: 2}\n"
    sim.step()
    assert sim.status["recovery"]["reason"] == "ConfigChanged"
    assert sim.status.get("restarts", 0) == 0
    assert sim.status["recovery"]["counted"] is False


def test_failed_plan_gives_a_clear_failed_reason() -> None:
    sim = Sim()
    sim.step()
    msg = plan("fail", reason="PinnedCheckpointUnavailable")
    sim.finish_job("demo-plan-1", msg)
    result = sim.step()
    assert sim.status["phase"] == "Failed"
    failed = next(c for c in sim.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PinnedCheckpointUnavailable"
    assert "Pod" not in kinds(result)


def test_plan_job_that_crashes_without_a_message_fails_the_job() -> None:
    sim = Sim()
    sim.step()
    sim.jobs["demo-plan-1"] = HelperJobView("demo-plan-1", failed=True, exit_code=2)
    sim.step()
    failed = next(c for c in sim.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PlanningFailed" and "kubectl logs job/demo-plan-1" in failed["message"]


def test_all_workers_succeeded() -> None:
    sim = Sim()
    sim.start_running()
    for name in list(sim.pods):
        pod = sim.pods[name]
        sim.pods[name] = PodView(**{**pod.__dict__, "phase": "Succeeded", "exit_code": 0})
    result = sim.step()
    assert sim.status["phase"] == "Succeeded"
    assert any(e.reason == "Succeeded" for e in result.events)
    sim.step()
    assert sim.status["phase"] == "Succeeded"


def test_stale_pods_of_old_attempts_are_removed() -> None:
    sim = Sim()
    sim.start_running()
    sim.pods["demo-0-0"] = PodView("demo-0-0", 0, 0, "Running", node="n1")
    result = sim.step()
    assert [a.name for a in result.actions if isinstance(a, DeletePod)] == ["demo-0-0"]
    assert sim.status["phase"] == "Running"


def test_invalid_spec_becomes_a_failed_condition() -> None:
    result = reconcile(
        REF, SpecError("spec.replicas must be >= 1, found 0"), 1, {}, Observed(), T0, FakePlanner()
    )
    assert result.status["phase"] == "Failed"
    assert result.events[0].reason == "InvalidSpec"


def test_condition_keeps_transition_time_when_unchanged() -> None:
    status: dict[str, Any] = {}
    set_condition(status, "Ready", True, "A", "", T0, 1)
    set_condition(status, "Ready", True, "B", "", T0 + 60, 2)
    (cond,) = status["conditions"]
    assert cond["reason"] == "B" and cond["lastTransitionTime"] == "2027-01-15T08:00:00Z"
    set_condition(status, "Ready", False, "C", "", T0 + 120, 2)
    assert status["conditions"][0]["lastTransitionTime"] == "2027-01-15T08:02:00Z"


def test_history_is_bounded() -> None:
    sim = Sim(make_spec(recovery={"maxRestarts": 100, "backoff": {"initialSeconds": 0}}))
    sim.start_running()
    for attempt in range(1, 26):
        sim.fail_pod(f"demo-{attempt}-0")
        sim.step()
        sim.finish_deletions()
        sim.step()
        sim.finish_job(f"demo-plan-{attempt + 1}", plan("fresh"))
        sim.step()
        sim.run_all()
        sim.step()
        assert sim.status["phase"] == "Running"
    assert len(sim.status["recoveries"]) == 20
    assert sim.status["recoveries"][-1]["attempt"] == 26


# ----------------------------------------------------------------------------------------------
# The real planner bridge


def test_real_planner_reads_plan_json_and_renders_the_config() -> None:
    from relaunch.plan import Plan, Source

    planner = RelaunchPlanner()
    spec = parse_spec(make_spec())
    command = planner.plan_command(
        spec,
        reason="WorkerFailed",
        world_size=2,
        previous_world_size=2,
        last_conversion=None,
        config_text=CONFIG,
    )
    assert command[:3] == ["relaunch", "plan", "/shared/output/checkpoint"]
    assert command[-2:] == ["--termination-log", "/dev/termination-log"]
    assert command[command.index("--reason") + 1] == "Failure"

    source = Source(
        kind="sharded",
        directory="/shared/output/checkpoint",
        epoch=1,
        step=10,
        name_pattern="demo_rank_{rank}-1_10.safetensors",
        ranks=2,
    )
    real = Plan(
        action="resume",
        reason="Failure",
        world_size=2,
        previous_world_size=2,
        checkpoint_dir="/shared/output/checkpoint",
        layout="v1",
        message="resume epoch 1 step 10",
        source=source,
        config={
            "load_checkpoint": "/shared/output/checkpoint",
            "resume_training": "demo_rank_0-1_10.safetensors",
        },
    )
    outcome = planner.interpret(real.dumps())
    assert (outcome.action, outcome.step, outcome.epoch, outcome.ranks) == ("resume", 10, 1, 2)
    assert outcome.file == "demo_rank_0-1_10.safetensors"
    rendered = planner.render(CONFIG, outcome, spec)
    assert (
        "load_checkpoint: '/shared/output/checkpoint'" in rendered or "/shared/output/checkpoint" in rendered
    )
    assert "demo_rank_0-1_10.safetensors" in rendered


def test_real_planner_passes_the_sizes_that_stay_and_renders_the_plans_parallel_layout() -> None:
    from relaunch.plan import Plan

    planner = RelaunchPlanner()
    spec = parse_spec(make_spec())
    config = CONFIG + "parallel_config:\n  data_parallel: 4\n  model_parallel: 2\n  pipeline_stage: 1\n"
    kwargs: dict[str, Any] = {"reason": "Resize", "previous_world_size": 8, "last_conversion": None}
    command = planner.plan_command(spec, world_size=4, config_text=config, **kwargs)
    assert command[command.index("--model-parallel") + 1] == "2"
    assert command[command.index("--pipeline-stage") + 1] == "1"
    assert "--model-parallel" not in planner.plan_command(spec, world_size=4, config_text=None, **kwargs)
    assert planner.factorable(4, config) and not planner.factorable(3, config)
    plan = Plan(
        action="fresh",
        reason="Resize",
        world_size=4,
        previous_world_size=8,
        checkpoint_dir="/shared/output/checkpoint",
        layout="empty",
        message="fresh",
        parallel={"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 1},
    )
    rendered = planner.render(config, planner.interpret(plan.dumps()), spec)
    assert "  data_parallel: 2\n" in rendered and "  model_parallel: 2\n" in rendered


def test_real_planner_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        RelaunchPlanner().interpret("not json")


def elastic_job_with_room_for_two_of_four() -> Sim:
    """An elastic 4-worker job whose second attempt (after a failure) finds room for 2 workers
    only: two run, two stay unschedulable (the next step decides about a shrink)."""
    sim = Sim(
        make_spec(
            replicas=4,
            elastic={"minReplicas": 1},
            recovery={"nodeLossGraceSeconds": 10, "backoff": {"initialSeconds": 0}},
        )
    )
    sim.start_running()
    sim.fail_pod("demo-1-3")
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("resume", step=5, epoch=1, ranks=4))
    sim.step()
    for name in ("demo-2-0", "demo-2-1"):
        sim.pods[name] = PodView(**{**sim.pods[name].__dict__, "phase": "Running", "node": "n2"})
    for name in ("demo-2-2", "demo-2-3"):
        sim.pods[name] = PodView(**{**sim.pods[name].__dict__, "unschedulable_since": sim.now})
    return sim


def test_elastic_shrink_when_workers_stay_unschedulable() -> None:
    sim = elastic_job_with_room_for_two_of_four()
    result = sim.step(dt=5)
    assert sim.status["recovery"]["attempt"] == 2  # still within the grace period
    assert 4 < result.requeue_after <= 5
    sim.step(dt=5)
    rec = sim.status["recovery"]
    assert rec["reason"] == "Shrink" and rec["replicas"] == 2 and rec["attempt"] == 3
    assert sim.status["restarts"] == 1  # the failure counted once; the shrink does not count
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-3", plan("resume", step=5, epoch=1, ranks=4))
    result = sim.step()
    assert kinds(result).count("Pod") == 2
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running"
    assert sim.status["workers"] == 2 and sim.status["replicasRequested"] == 4
    # The failure's recovery never ran its workers: it stays in the history, superseded.
    history = [(e["reason"], e.get("supersededBy"), e["counted"]) for e in sim.status["recoveries"]]
    assert history == [("Created", None, False), ("WorkerFailed", "Shrink", True), ("Shrink", None, False)]
    assert "restartedAt" not in sim.status["recoveries"][1]
    sim.step()  # a shrunk gang is not mistaken for a replicas edit
    assert "recovery" not in sim.status


def test_a_failure_during_starting_keeps_the_superseded_recovery_in_the_history() -> None:
    sim = Sim(make_spec(recovery={"backoff": {"initialSeconds": 0}}))
    sim.start_running()
    sim.fail_pod("demo-1-0")
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("resume", step=5, epoch=1, ranks=2))
    sim.step()
    sim.fail_pod("demo-2-1")  # the new attempt fails before all its workers ran
    sim.step()
    assert sim.status["restarts"] == 2
    assert sim.status["recovery"]["attempt"] == 3
    entry = sim.status["recoveries"][-1]
    assert (entry["attempt"], entry["reason"], entry["supersededBy"], entry["counted"]) == (
        2,
        "WorkerFailed",
        "WorkerFailed",
        True,
    )
    counted = [e for e in sim.status["recoveries"] if e["counted"]] + [sim.status["recovery"]]
    assert len(counted) == sim.status["restarts"]


def test_elastic_shrink_never_picks_a_size_the_layout_cannot_take() -> None:
    sim = Sim(
        make_spec(
            replicas=4,
            elastic={"minReplicas": 3},
            recovery={"nodeLossGraceSeconds": 1, "backoff": {"initialSeconds": 0}},
        )
    )
    sim.start_running()
    sim.fail_pod("demo-1-0")
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("fresh"))
    sim.step()
    for name in ("demo-2-0", "demo-2-1", "demo-2-2"):
        sim.pods[name] = PodView(**{**sim.pods[name].__dict__, "phase": "Running", "node": "n2"})
    sim.pods["demo-2-3"] = PodView(**{**sim.pods["demo-2-3"].__dict__, "unschedulable_since": sim.now})
    sim.step(dt=2)
    assert sim.status["recovery"]["attempt"] == 2  # 3 fits but is not factorable: keep waiting
    assert "waiting" in sim.status["message"]


# ----------------------------------------------------------------------------------------------
# Reading the cluster (relaunch.controller.kube: pure parts)


def test_pod_view_reads_exit_code_reason_and_node() -> None:
    from relaunch.controller.views import pod_view

    pod = {
        "metadata": {
            "name": "demo-3-1",
            "labels": {"relaunch.dev/attempt": "3", "relaunch.dev/worker-index": "1"},
            "deletionTimestamp": "2027-01-15T08:00:00Z",
        },
        "spec": {"nodeName": "n2"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"state": {"terminated": {"exitCode": 0, "finishedAt": "2027-01-15T08:00:09Z"}}},
                {
                    "state": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "OOMKilled",
                            "finishedAt": "2027-01-15T08:00:05Z",
                        }
                    }
                },
            ],
        },
    }
    view = pod_view(pod)
    assert view is not None
    assert (view.name, view.attempt, view.index, view.node, view.deleting) == ("demo-3-1", 3, 1, "n2", True)
    assert (view.exit_code, view.reason, view.finished_at) == (137, "OOMKilled", T0 + 5)
    evicted = pod_view(
        {
            "metadata": {
                "name": "x",
                "labels": {"relaunch.dev/attempt": "1", "relaunch.dev/worker-index": "0"},
            },
            "status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"},
        }
    )
    assert evicted is not None and (evicted.reason, evicted.message) == ("Evicted", "low on memory")
    assert pod_view({"metadata": {"name": "stranger", "labels": {}}}) is None


def test_unschedulable_pod_view() -> None:
    from relaunch.controller.views import pod_view

    view = pod_view(
        {
            "metadata": {
                "name": "x",
                "labels": {"relaunch.dev/attempt": "1", "relaunch.dev/worker-index": "0"},
            },
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "lastTransitionTime": "2027-01-15T08:00:00Z",
                    }
                ],
            },
        }
    )
    assert view is not None and view.unschedulable_since == T0


def test_helper_job_view_takes_the_termination_message_of_its_pod() -> None:
    from relaunch.controller.views import helper_job_view

    job = {
        "metadata": {"name": "demo-plan-2"},
        "status": {"conditions": [{"type": "Complete", "status": "True"}]},
    }
    pods = [
        {
            "metadata": {"labels": {"batch.kubernetes.io/job-name": "demo-plan-2"}},
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 0, "message": '{"action":"fresh"}\n'}}}
                ],
            },
        },
        {"metadata": {"labels": {"batch.kubernetes.io/job-name": "other"}}, "status": {"phase": "Failed"}},
    ]
    view = helper_job_view(job, pods)
    assert view == HelperJobView(
        "demo-plan-2", succeeded=True, failed=False, message='{"action":"fresh"}', exit_code=0
    )
    # A failed pod alone does not fail the Job: the Job controller replaces a disrupted one
    # (pod failure policy); the Job's own Failed (or FailureTarget) condition decides.
    replaced = helper_job_view({"metadata": {"name": "other"}, "status": {}}, pods)
    assert not replaced.failed and not replaced.succeeded and replaced.message is None
    for condition in ("Failed", "FailureTarget"):
        failed = helper_job_view(
            {
                "metadata": {"name": "other"},
                "status": {"conditions": [{"type": condition, "status": "True"}]},
            },
            pods,
        )
        assert failed.failed and not failed.succeeded and failed.message is None


def test_merge_patch_removes_nested_keys_and_replaces_lists() -> None:
    from relaunch.controller.kube import merge_patch

    old = {"phase": "Recovering", "recovery": {"stage": "Planning", "notBefore": "t"}, "conditions": [1, 2]}
    new = {"phase": "Recovering", "recovery": {"stage": "Starting"}, "conditions": [1], "attempt": 2}
    assert merge_patch(old, new) == {
        "recovery": {"stage": "Starting", "notBefore": None},
        "conditions": [1],
        "attempt": 2,
    }
    assert merge_patch({"recovery": {"a": 1}}, {}) == {"recovery": None}
    assert merge_patch(new, new) == {}


def test_node_tracker_combines_ready_condition_and_lease() -> None:
    from relaunch.controller.nodes import NodeTracker

    nodes = [
        {
            "metadata": {"name": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
        {
            "metadata": {"name": "n2"},
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "Unknown",
                        "lastTransitionTime": "2027-01-15T08:00:00Z",
                    }
                ]
            },
        },
    ]
    leases = [
        {
            "metadata": {"name": "n1"},
            "spec": {"renewTime": "2027-01-15T08:00:01.500000Z", "leaseDurationSeconds": 40},
        }
    ]

    class FakeKube:  # what the informers list; their watches are not started here
        def get(self, path: str, query: Any = None) -> dict[str, Any]:
            items = nodes if path == "/api/v1/nodes" else leases
            return {"metadata": {"resourceVersion": "7"}, "items": items}

    changes = []
    tracker = NodeTracker(FakeKube(), on_change=lambda: changes.append(1))  # type: ignore[arg-type]
    assert tracker.snapshot() is None  # not listed yet: node loss is not judged
    assert tracker.nodes.list_once() == "7"
    assert tracker.snapshot()["n1"].last_heartbeat is None  # type: ignore[index]  # leases not heard yet
    tracker.leases.list_once()
    snap = tracker.snapshot()
    assert snap is not None
    assert snap["n1"].ready is True and snap["n1"].last_heartbeat == T0 + 1.5
    assert snap["n1"].heartbeat_interval == 10.0  # one renewal seen: a kubelet's quarter of 40 s
    assert (
        snap["n2"].ready is None
        and snap["n2"].not_ready_since is not None
        and snap["n2"].last_heartbeat is None
    )
    assert changes == [1]
    tracker.nodes.list_once()  # a new list (after a watch expired) that shows nothing new
    tracker.node_event("MODIFIED", nodes[0])
    tracker.lease_event(
        "MODIFIED", {"metadata": {"name": "n1"}, "spec": {"renewTime": "2027-01-15T08:00:03Z"}}
    )
    assert changes == [1]  # nothing flipped: no wake-up
    assert tracker.snapshot()["n1"].last_heartbeat == T0 + 3  # type: ignore[index]
    assert tracker.snapshot()["n1"].heartbeat_interval == 1.5  # type: ignore[index]
    tracker.node_event("DELETED", nodes[1])
    assert changes == [1, 1] and "n2" not in tracker.snapshot()  # type: ignore[operator]
    # A lease watch silent for longer than kubelets allow is not trusted with heartbeats.
    tracker.leases.last_seen = time.monotonic() - tracker.lease_silence_seconds - 1
    assert tracker.snapshot()["n1"].last_heartbeat is None  # type: ignore[index]


def test_editing_a_failed_job_retries_it() -> None:
    sim = Sim()
    sim.step()
    sim.finish_job("demo-plan-1", plan("fail", reason="PinnedCheckpointUnavailable"))
    sim.step()
    assert sim.status["phase"] == "Failed" and sim.status["finishedGeneration"] == 1
    sim.step()
    assert sim.status["phase"] == "Failed"  # unchanged spec: stays failed
    sim.generation = 2  # the user fixed spec.checkpoint.resume
    result = sim.step()
    assert sim.status["phase"] == "Recovering"
    assert sim.status["recovery"]["reason"] == "SpecChanged" and sim.status["restarts"] == 0
    assert condition_of(sim.status, "Failed")["status"] == "False"
    assert [a.manifest["metadata"]["name"] for a in result.actions if isinstance(a, Create)] == [
        "demo-plan-2"
    ]
    sim.finish_job("demo-plan-2", plan("fresh"))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running"


def condition_of(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_a_1024_worker_gang_recovers_in_few_rounds() -> None:
    """Scale: every round stays linear in the number of workers (no quadratic scans)."""
    import time as _time

    sim = Sim(make_spec(replicas=1024))
    started = _time.perf_counter()
    sim.start_running()
    sim.fail_pod("demo-1-517")
    result = sim.step()
    assert sum(1 for a in result.actions if isinstance(a, DeletePod)) == 1024
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("resume", step=5, epoch=1, ranks=1024))
    result = sim.step()
    assert kinds(result).count("Pod") == 1024
    assert len({a.manifest["metadata"]["name"] for a in result.actions if isinstance(a, Create)}) == 1026
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["workers"] == 1024
    assert _time.perf_counter() - started < 5


def test_editing_a_succeeded_job_continues_training() -> None:
    sim = Sim()
    sim.start_running()
    for name in list(sim.pods):
        sim.pods[name] = PodView(**{**sim.pods[name].__dict__, "phase": "Succeeded", "exit_code": 0})
    sim.step()
    assert sim.status["phase"] == "Succeeded"
    sim.config_text = CONFIG + "runner_config: {epochs: 6}\n"  # more epochs: incremental training
    sim.step()
    assert sim.status["phase"] == "Succeeded"  # a config edit alone does not bump the generation
    sim.generation = 2
    sim.step()
    assert sim.status["recovery"]["reason"] == "SpecChanged" and sim.status.get("restarts", 0) == 0
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("resume", step=30, epoch=3, ranks=2))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["checkpoint"]["step"] == 30


def test_unfactorable_replicas_edit_is_refused_before_anything_stops() -> None:
    sim = Sim(make_spec(replicas=4))
    sim.start_running()
    sim.spec_body = make_spec(replicas=3)  # the (fake) layout cannot take 3 ranks
    sim.generation = 2
    result = sim.step()
    assert "recovery" not in sim.status
    assert not [a for a in result.actions if isinstance(a, DeletePod)]
    assert [e.reason for e in result.events] == ["ReplicasRejected"]
    assert "cannot be factored" in sim.status["message"]
    assert sim.step().events == []  # said once, not every round
    sim.spec_body = make_spec(replicas=2)
    sim.generation = 3
    sim.step()
    assert sim.status["recovery"]["reason"] == "ReplicasChanged"


# ----------------------------------------------------------------------------------------------
# The per-job loop registry (relaunch.controller.loops) and the kopf wiring's finalizer contract


def _loops_scenario(body: Any) -> Any:
    """Run ``body(loops, runs)`` on a fresh event loop; ``runs`` logs (event, key, uid) of a fake
    job loop that waits for wake-ups, returns when told the job is gone, dies when told to."""
    import asyncio

    from relaunch.controller.loops import JobLoop, JobLoops

    runs: list[tuple[str, tuple[str, str], str]] = []
    behaviour: dict[tuple[str, str], str] = {}

    async def fake_loop(loop: JobLoop) -> None:
        runs.append(("start", loop.key, loop.uid))
        while not loop.stopped.is_set():
            await loop.wake.wait()
            loop.wake.clear()
            action = behaviour.pop(loop.key, "")
            if action == "gone":
                runs.append(("gone", loop.key, loop.uid))
                return
            if action == "die":
                raise RuntimeError("a bug")
            if action == "linger":
                await asyncio.sleep(3600)  # ignores stopped: must be cancelled
            runs.append(("woke", loop.key, loop.uid))
        runs.append(("stopped", loop.key, loop.uid))

    async def main() -> Any:
        loops = JobLoops(fake_loop, cancellation_timeout=0.05)
        return await body(loops, runs, behaviour)

    return asyncio.run(main())


async def _settle() -> None:
    import asyncio

    for _ in range(5):
        await asyncio.sleep(0)


def test_job_loops_start_once_wake_on_events_and_forget_a_gone_job() -> None:
    async def scenario(loops: Any, runs: list[Any], behaviour: dict[Any, str]) -> None:
        loops.ensure("ns", "a", "uid-1", {})
        await _settle()
        loops.ensure("ns", "a", "uid-1", {})  # a later event: a wake-up, not a second loop
        await _settle()
        loops.wake("ns", "a")  # a pod event
        await _settle()
        loops.wake("ns", "unknown")  # a pod of a job never seen: nothing to wake
        a = ("ns", "a")
        assert runs == [("start", a, "uid-1"), ("woke", a, "uid-1"), ("woke", a, "uid-1")]
        behaviour[("ns", "a")] = "gone"
        loops.wake("ns", "a")
        await _settle()
        assert runs[-1] == ("gone", ("ns", "a"), "uid-1")
        assert loops.keys() == []  # the job is gone: the registry forgot it
        assert loops.resync() == 0

    _loops_scenario(scenario)


def test_job_loops_replace_a_namesake_and_stop_on_deletion() -> None:
    async def scenario(loops: Any, runs: list[Any], behaviour: dict[Any, str]) -> None:
        loops.ensure("ns", "a", "uid-1", {})
        loops.ensure("ns", "b", "uid-2", {})
        await _settle()
        loops.ensure("ns", "a", "uid-3", {})  # deleted and recreated under the same name
        await _settle()
        assert ("stopped", ("ns", "a"), "uid-1") in runs and ("start", ("ns", "a"), "uid-3") in runs
        assert loops.get("ns", "a").uid == "uid-3"
        loops.stop("ns", "a", uid="uid-1")  # a late DELETED event of the old one: no effect
        assert loops.get("ns", "a") is not None
        loops.stop("ns", "a", uid="uid-3")
        await _settle()
        assert runs[-1] == ("stopped", ("ns", "a"), "uid-3") and loops.keys() == [("ns", "b")]

    _loops_scenario(scenario)


def test_job_loops_restart_a_dead_loop_at_the_next_wake_up_or_resync() -> None:
    async def scenario(loops: Any, runs: list[Any], behaviour: dict[Any, str]) -> None:
        loops.ensure("ns", "a", "uid-1", {})
        loops.ensure("ns", "b", "uid-2", {})
        await _settle()
        behaviour[("ns", "a")] = "die"
        behaviour[("ns", "b")] = "die"
        loops.wake_all()
        await _settle()
        assert loops.get("ns", "a").task.done() and loops.get("ns", "b").task.done()
        loops.wake("ns", "a")  # a pod event restarts it at once
        await _settle()
        assert runs.count(("start", ("ns", "a"), "uid-1")) == 2
        assert loops.resync() == 1  # b, whose job is still known
        await _settle()
        assert runs.count(("start", ("ns", "b"), "uid-2")) == 2
        assert loops.resync() == 0

    _loops_scenario(scenario)


def test_job_loops_cancel_a_loop_that_ignores_its_stop_and_shut_down_cleanly() -> None:
    import asyncio

    async def scenario(loops: Any, runs: list[Any], behaviour: dict[Any, str]) -> None:
        loops.ensure("ns", "a", "uid-1", {})
        loops.ensure("ns", "b", "uid-2", {})
        await _settle()
        behaviour[("ns", "a")] = "linger"
        loops.wake("ns", "a")
        await _settle()
        task = loops.get("ns", "a").task
        loops.stop("ns", "a")
        await asyncio.sleep(0.2)
        assert task.cancelled()
        behaviour[("ns", "b")] = "linger"
        loops.wake("ns", "b")
        await _settle()
        task = loops.get("ns", "b").task
        await loops.shutdown()
        assert task.cancelled() and loops.keys() == []

    _loops_scenario(scenario)


def test_no_operator_handler_requires_a_finalizer() -> None:
    """kopf adds a finalizer to every object for which a daemon, a timer or a non-optional delete
    handler exists; the operator must need none (a TrainingJob's deletion never waits for it)."""
    import kopf

    import relaunch.controller.handlers  # registers the handlers

    registry = kopf.get_default_registry()
    handlers = [
        handler
        for part in vars(registry).values()
        if hasattr(part, "get_all_handlers")
        for handler in part.get_all_handlers()
    ]
    assert any(getattr(h, "fn", None) is relaunch.controller.handlers.trainingjob_changed for h in handlers)
    assert [h.id for h in handlers if getattr(h, "requires_finalizer", False)] == []
    assert list(registry._spawning.get_all_handlers()) == []  # no daemons, no timers


def test_a_grace_shorter_than_the_nodes_renew_interval_waits_for_a_missed_heartbeat() -> None:
    """A kubelet renews its Lease every 10 s: with a 4 s grace, a healthy node's heartbeat is up to
    10 s old between renewals, so silence counts from 1.5 renew intervals; a node that renews more
    often than the grace keeps the grace."""
    kubelet = NodeView("real", last_heartbeat=T0, heartbeat_interval=10.0)
    assert node_lost_at(kubelet, 4.0) == T0 + 15.0
    assert node_lost_at(kubelet, 30.0) == T0 + 30.0
    fast = NodeView("agent", last_heartbeat=T0, heartbeat_interval=2.0)
    assert node_lost_at(fast, 4.0) == T0 + 4.0
    unknown = NodeView("new", last_heartbeat=T0)  # one renewal seen: its interval is not known yet
    assert node_lost_at(unknown, 4.0) == T0 + 4.0
