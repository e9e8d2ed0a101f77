"""Admission by Kueue in the state machine (relaunch.controller.kueue and reconcile), through a
``Sim`` whose cluster also holds the job's Workload and plays Kueue's part on it.

A queued job runs nothing until its Workload is admitted; a recovery from a failure keeps the
Workload (and its quota); a preemption stops the gang like a suspend, counts nothing, and gives the
quota back only once every pod is gone; admitted again the job resumes; a finished job finishes
its Workload; spec.suspend deactivates it; a resize replaces it.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_reconcile import REF, Sim, condition_of, kinds, make_spec, plan
from test_suspend import set_suspend, stop_gracefully

from relaunch import resources
from relaunch.controller import kueue
from relaunch.controller.reconcile import Create, DeleteJob, DeletePod, Observed

QUEUE = "training"


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies a merge patch."""
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class KueueSim(Sim):
    """A Sim with the job's Workload, where the test plays Kueue (admit, evict)."""

    def __init__(
        self, spec: dict[str, Any] | None = None, *, priority: tuple[str, str, int] | None = None
    ) -> None:
        super().__init__(spec)
        self.workload: dict[str, Any] | None = None
        self.version = 0
        self.priority = priority  # (class, kind, value)
        self.workload_actions: list[Any] = []

    def queue_view(self) -> kueue.QueueView:
        name = kueue.workload_name(REF.name, REF.uid)
        cls, kind, value = self.priority or (None, None, None)
        view = kueue.workload_view(self.workload) if self.workload is not None else None
        return kueue.QueueView(QUEUE, name, view, cls, kind, value if view is None else None)

    def observed(self) -> Observed:
        import dataclasses

        return dataclasses.replace(super().observed(), queue=self.queue_view())

    def step(self, dt: float = 0.1) -> Any:
        result = super().step(dt)
        for action in result.actions:
            if isinstance(action, Create) and action.manifest["kind"] == "Workload":
                if self.workload is None:
                    self.workload = copy.deepcopy(action.manifest)
                    self.bump()
            elif isinstance(action, kueue.PatchWorkload | kueue.DeleteWorkload):
                self.workload_actions.append(action)
                if isinstance(action, kueue.DeleteWorkload):
                    self.workload = None
                elif self.workload is not None:
                    sent = action.patch.get("metadata", {}).get("resourceVersion")
                    assert sent == self.workload["metadata"]["resourceVersion"], "patched a stale Workload"
                    self.workload = merge(self.workload, dict(action.patch))
                    self.bump()
        return result

    # Kueue's part
    def bump(self) -> None:
        assert self.workload is not None
        self.version += 1
        self.workload["metadata"]["resourceVersion"] = str(self.version)

    def set_conditions(self, *conditions: dict[str, str]) -> None:
        assert self.workload is not None
        status = self.workload.setdefault("status", {})
        kept = [c for c in status.get("conditions") or [] if c["type"] not in {c["type"] for c in conditions}]
        status["conditions"] = kept + [dict(c, lastTransitionTime="2026-01-01T00:00:00Z") for c in conditions]
        self.bump()

    def pending(self, message: str) -> None:
        self.set_conditions(
            {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": message}
        )

    def admit(self) -> None:
        assert self.workload is not None
        self.workload.setdefault("status", {})["admission"] = {"clusterQueue": "cq", "podSetAssignments": []}
        self.set_conditions(
            {
                "type": "QuotaReserved",
                "status": "True",
                "reason": "QuotaReserved",
                "message": "Quota reserved",
            },
            {
                "type": "Admitted",
                "status": "True",
                "reason": "Admitted",
                "message": "The workload is admitted",
            },
        )

    def evict(self, reason: str = "Preempted", message: str = "Preempted to accommodate a workload") -> None:
        self.set_conditions({"type": "Evicted", "status": "True", "reason": reason, "message": message})

    def condition(self, type_: str) -> dict[str, Any]:
        assert self.workload is not None
        return next(c for c in self.workload["status"]["conditions"] if c["type"] == type_)

    def start_admitted(self) -> None:
        self.step()
        self.admit()
        self.step()
        self.finish_job("demo-plan-1", plan("fresh"))
        self.step()
        self.run_all()
        self.step()
        assert self.status["phase"] == "Running", self.status


# ----------------------------------------------------------------------------------------------
# pure parts


def test_workload_name_is_deterministic_and_differs_for_a_namesake() -> None:
    name = kueue.workload_name("demo", "uid-1")
    assert name == kueue.workload_name("demo", "uid-1")
    assert name != kueue.workload_name("demo", "uid-2")
    assert name.startswith("trainingjob-demo-") and len(name) == len("trainingjob-demo-") + 5
    assert len(kueue.workload_name("x" * 253, "u")) <= 253


def test_queue_and_priority_come_from_the_labels_then_the_template() -> None:
    template = {"spec": {"priorityClassName": "batch-high"}}
    assert kueue.queue_of({}, template) == ("", "batch-high", "PriorityClass")
    labels = {kueue.QUEUE_NAME_LABEL: "q"}
    assert kueue.queue_of(labels, None) == ("q", None, None)
    assert kueue.queue_of(labels, template) == ("q", "batch-high", "PriorityClass")
    labels[kueue.PRIORITY_CLASS_LABEL] = "high"
    assert kueue.queue_of(labels, template) == ("q", "high", "WorkloadPriorityClass")


def test_the_workload_has_one_pod_set_of_the_workers_owned_by_the_job() -> None:
    spec = make_spec(replicas=4)
    spec["template"]["metadata"] = {"labels": {"team": "a"}, "annotations": {"note": "x"}}
    spec["template"]["spec"]["containers"][0]["resources"] = {"requests": {"cpu": "2"}}
    queue = kueue.QueueView(QUEUE, "wl", None, "high", "WorkloadPriorityClass", 1000)
    manifest = kueue.build_workload(REF, spec["template"], 4, queue, active=True)
    assert manifest["apiVersion"] == "kueue.x-k8s.io/v1beta2" and manifest["kind"] == "Workload"
    meta = manifest["metadata"]
    assert meta["ownerReferences"] == [resources.owner_reference(REF)]
    assert meta["labels"][resources.LABEL_JOB] == REF.name
    assert meta["labels"][kueue.JOB_UID_LABEL] == REF.uid
    (pod_set,) = manifest["spec"]["podSets"]
    assert (pod_set["name"], pod_set["count"]) == ("workers", 4)
    assert pod_set["template"]["spec"]["containers"][0]["resources"] == {"requests": {"cpu": "2"}}
    assert pod_set["template"]["metadata"] == {"labels": {"team": "a"}, "annotations": {"note": "x"}}
    assert manifest["spec"]["queueName"] == QUEUE and manifest["spec"]["active"] is True
    assert manifest["spec"]["priorityClassRef"] == {
        "group": "kueue.x-k8s.io",
        "kind": "WorkloadPriorityClass",
        "name": "high",
    }
    assert manifest["spec"]["priority"] == 1000
    plain = kueue.build_workload(REF, spec["template"], 4, kueue.QueueView(QUEUE, "wl"), active=False)
    assert "priorityClassRef" not in plain["spec"] and plain["spec"]["active"] is False


def _view(*conditions: tuple[str, str, str, str], count: int = 2) -> kueue.WorkloadView:
    body = {
        "metadata": {"name": "wl", "resourceVersion": "7"},
        "spec": {"queueName": QUEUE, "podSets": [{"name": "workers", "count": count}]},
        "status": {
            "conditions": [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions]
        },
    }
    return kueue.workload_view(body)


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ((), ("WaitingForAdmission", "has no decision from Kueue yet")),
        (
            (("QuotaReserved", "False", "Pending", "couldn't assign flavors: insufficient quota"),),
            ("WaitingForAdmission", "couldn't assign flavors: insufficient quota"),
        ),
        ((("QuotaReserved", "True", "", ""), ("Admitted", "True", "Admitted", "")), None),
        (
            (
                ("Admitted", "True", "Admitted", ""),
                ("Evicted", "True", "Preempted", "Preempted to accommodate"),
            ),
            ("Preempted", "Preempted to accommodate"),
        ),
        (
            (("Admitted", "True", "Admitted", ""), ("Evicted", "True", "ClusterQueueStopped", "stopped")),
            ("Evicted", "stopped"),
        ),
    ],
)
def test_the_hold_says_what_kueue_decided_in_its_words(
    conditions: tuple[tuple[str, str, str, str], ...], expected: tuple[str, str] | None
) -> None:
    held = kueue.hold(kueue.QueueView(QUEUE, "wl", _view(*conditions)), 2, finished=False)
    if expected is None:
        assert held is None
    else:
        assert held is not None and held.reason == expected[0] and expected[1] in held.message


def test_no_hold_without_a_queue_or_for_a_finished_job_and_a_resized_job_waits() -> None:
    admitted = _view(("QuotaReserved", "True", "", ""), ("Admitted", "True", "Admitted", ""))
    assert kueue.hold(None, 2, finished=False) is None
    assert kueue.hold(kueue.QueueView(QUEUE, "wl", _view()), 2, finished=True) is None
    held = kueue.hold(kueue.QueueView(QUEUE, "wl", admitted), 4, finished=False)
    assert held is not None and "asks for 2 workers" in held.message
    missing = kueue.QueueView(QUEUE, "wl", None, "high", "WorkloadPriorityClass", priority_error="nope")
    held = kueue.hold(missing, 2, finished=False)
    assert held is not None and "nope" in held.message


def test_release_gives_the_quota_back_and_marks_a_preemption_requeued() -> None:
    wl = _view(
        ("QuotaReserved", "True", "QuotaReserved", ""),
        ("Admitted", "True", "Admitted", ""),
        ("Evicted", "True", "Preempted", "to accommodate"),
    )
    patch = kueue.release_patch(wl, 0.0)
    assert patch["metadata"] == {"resourceVersion": "7"}
    assert patch["status"]["admission"] is None
    by_type = {c["type"]: c for c in patch["status"]["conditions"]}
    assert (by_type["QuotaReserved"]["status"], by_type["QuotaReserved"]["reason"]) == ("False", "Pending")
    assert by_type["Admitted"]["status"] == "False"
    assert (by_type["Requeued"]["status"], by_type["Requeued"]["reason"]) == ("True", "Preempted")
    assert by_type["Evicted"]["status"] == "True"  # Kueue's own condition is left as it wrote it
    deactivated = _view(("QuotaReserved", "True", "", ""), ("Evicted", "True", "Deactivated", "inactive"))
    requeued = {c["type"]: c for c in kueue.release_patch(deactivated, 0.0)["status"]["conditions"]}[
        "Requeued"
    ]
    assert requeued["status"] == "False"


# ----------------------------------------------------------------------------------------------
# the state machine with Kueue


def test_a_queued_job_creates_its_workload_and_nothing_else_until_admitted() -> None:
    sim = KueueSim(priority=("high", "WorkloadPriorityClass", 1000))
    result = sim.step()
    assert kinds(result) == ["Workload"]
    assert sim.workload is not None and sim.workload["spec"]["priority"] == 1000
    assert sim.status["phase"] == "Queued"
    admitted = condition_of(sim.status, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "WaitingForAdmission")
    assert [e.reason for e in result.events] == ["WaitingForAdmission", "WorkloadCreated"]

    sim.pending("couldn't assign flavors to pod set workers: insufficient unused quota for cpu")
    for _ in range(3):
        result = sim.step(5.0)
        assert result.actions == []
    assert sim.pods == {} and sim.jobs == {} and sim.planner.commands == []
    assert "insufficient unused quota" in sim.status["message"]
    assert "insufficient unused quota" in condition_of(sim.status, "Admitted")["message"]
    assert condition_of(sim.status, "Ready")["reason"] == "WaitingForAdmission"

    sim.admit()
    result = sim.step()
    assert kinds(result) == ["Job"]  # planning starts: the job runs as a new one
    assert sim.status["recovery"]["reason"] == "Created"
    admitted = condition_of(sim.status, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("True", "Admitted")
    assert "ClusterQueue cq" in admitted["message"]
    sim.finish_job("demo-plan-1", plan("fresh"))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running"


def test_a_failure_while_admitted_recovers_within_the_quota() -> None:
    sim = KueueSim()
    sim.start_admitted()
    sim.fail_pod("demo-1-1")
    sim.step()
    assert sim.status["restarts"] == 1 and sim.status["phase"] == "Recovering"
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("resume", step=5, epoch=1, ranks=2))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status["attempt"] == 2
    assert sim.workload_actions == []  # the Workload, and its quota, never changed
    assert condition_of(sim.status, "Admitted")["status"] == "True"


def test_a_preemption_stops_the_gang_gracefully_counts_nothing_and_resumes_when_admitted_again() -> None:
    sim = KueueSim()
    sim.start_admitted()
    sim.evict("Preempted", "Preempted to accommodate a workload due to prioritization in the ClusterQueue")
    result = sim.step()
    deletions = [a for a in result.actions if isinstance(a, DeletePod)]
    assert sorted(a.name for a in deletions) == ["demo-1-0", "demo-1-1"] and not any(
        a.force for a in deletions
    )
    assert not [a for a in result.actions if isinstance(a, kueue.PatchWorkload)]  # pods still run: quota kept
    assert sim.status["phase"] == "Queued"
    admitted = condition_of(sim.status, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "Preempted")
    assert "prioritization" in admitted["message"]
    assert [e.reason for e in result.events] == ["Preempted"]
    assert "not counted" in result.events[0].message

    stop_gracefully(sim)  # exit 143 on SIGTERM, then gone: not a failure
    result = sim.step()
    (release,) = [a for a in sim.workload_actions if isinstance(a, kueue.PatchWorkload)]
    assert release.status and sim.workload is not None and "admission" not in sim.workload["status"]
    assert sim.condition("QuotaReserved")["status"] == "False"
    assert sim.condition("Requeued")["status"] == "True"
    assert sim.status.get("restarts", 0) == 0 and "lastFailure" not in sim.status
    assert "QuotaReleased" in [e.reason for e in sim.events]
    sim.step(5.0)
    assert len(sim.workload_actions) == 1  # released once

    # Kueue queues it again (Evicted clears when it is admitted again)
    sim.set_conditions({"type": "Evicted", "status": "False", "reason": "QuotaReserved", "message": ""})
    sim.admit()
    sim.step()
    rec = sim.status["recovery"]
    assert (rec["reason"], rec["counted"], rec["attempt"]) == ("Resumed", False, 2)
    assert "notBefore" not in rec
    sim.finish_job("demo-plan-2", plan("resume", step=10, epoch=1, ranks=2))
    sim.step()
    sim.run_all()
    sim.step()
    assert sim.status["phase"] == "Running" and sim.status.get("restarts", 0) == 0
    assert sim.status["recoveries"][-1]["fromStep"] == 10


@pytest.mark.parametrize("stage", ["Planning", "Converting"])
def test_a_preemption_during_a_recovery_interrupts_it_without_counting(stage: str) -> None:
    sim = KueueSim()
    sim.start_admitted()
    sim.fail_pod("demo-1-0")
    sim.step()
    sim.finish_deletions()
    sim.step()
    if stage == "Converting":
        sim.finish_job(
            "demo-plan-2", plan("convert", step=5, epoch=1, ranks=2, convert_command=["relaunch", "convert"])
        )
        sim.step()
        assert "demo-convert-2" in sim.jobs
    assert sim.status["recovery"]["stage"] == stage
    sim.evict()
    result = sim.step()
    helper = "demo-plan-2" if stage == "Planning" else "demo-convert-2"
    assert [a.name for a in result.actions if isinstance(a, DeleteJob)] == [helper]
    assert sim.status["phase"] == "Queued" and "recovery" not in sim.status
    assert sim.status["restarts"] == 1  # the failure counted once, the preemption not at all
    entry = sim.status["recoveries"][-1]
    assert entry["supersededBy"] == "Preempted"
    sim.step()  # nothing runs any more: the quota goes back
    assert [a.why for a in sim.workload_actions] == ["evicted and stopped"]


def test_a_finished_job_finishes_its_workload() -> None:
    sim = KueueSim()
    sim.start_admitted()
    for name, pod in list(sim.pods.items()):
        sim.pods[name] = type(pod)(**{**pod.__dict__, "phase": "Succeeded", "exit_code": 0})
    sim.step()
    assert sim.status["phase"] == "Succeeded"
    finished = sim.condition("Finished")
    assert (finished["status"], finished["reason"]) == ("True", "Succeeded")
    sim.step(5.0)
    assert len(sim.workload_actions) == 1


def test_suspending_a_queued_job_deactivates_its_workload_and_clearing_it_queues_it_again() -> None:
    sim = KueueSim()
    sim.start_admitted()
    set_suspend(sim, True)
    sim.step()
    assert sim.status["phase"] == "Suspended"
    assert sim.workload is not None and sim.workload["spec"]["active"] is False
    sim.evict("Deactivated", "The workload is deactivated")  # Kueue's answer
    stop_gracefully(sim)
    sim.step()
    assert sim.condition("QuotaReserved")["status"] == "False"
    assert sim.condition("Requeued")["status"] == "False"

    set_suspend(sim, False)
    sim.step()
    assert sim.workload["spec"]["active"] is True
    assert sim.status["phase"] == "Queued"
    assert condition_of(sim.status, "Suspended")["status"] == "False"


def test_a_resized_job_stops_then_replaces_its_workload() -> None:
    sim = KueueSim()
    sim.start_admitted()
    sim.spec_body = make_spec(replicas=4)
    sim.generation += 1
    result = sim.step()
    assert (
        sim.status["phase"] == "Queued" and len([a for a in result.actions if isinstance(a, DeletePod)]) == 2
    )
    assert sim.workload_actions == []  # the gang stops first; Kueue counts the quota until then
    stop_gracefully(sim)
    sim.step()
    assert isinstance(sim.workload_actions[-1], kueue.DeleteWorkload) and sim.workload is None
    sim.step()
    assert sim.workload is not None and sim.workload["spec"]["podSets"][0]["count"] == 4
