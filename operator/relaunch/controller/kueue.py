"""Admission by Kueue: the Workload of a queued TrainingJob, and what its state means (pure).

A TrainingJob labelled ``kueue.x-k8s.io/queue-name`` is a job of an *external framework* for Kueue
(as AppWrapper is): the operator creates one ``Workload`` for it (``kueue.x-k8s.io/v1beta2``, owned
by the TrainingJob, one pod set ``workers`` of ``spec.replicas`` pods from the worker template), and
Kueue admits, preempts and evicts that Workload. The TrainingJob itself is never rewritten: Kueue's
decisions reach the state machine as a *hold* (:func:`hold`), which :mod:`reconcile` obeys as it
obeys ``spec.suspend``: nothing starts while the Workload is not admitted, and an eviction stops
the gang gracefully without counting a restart. Once admitted again the job resumes from its newest
complete checkpoint.

What Kueue expects of a job integration after it decided (:func:`workload_actions`):

* **Evicted** (``Evicted=True``: preempted, deactivated, its queue stopped, ...): stop every pod,
  then give the quota back by clearing ``status.admission`` and setting ``QuotaReserved=False``
  (reason ``Pending``), ``Admitted=False`` and ``Requeued`` (True after a preemption or node
  failures), so that Kueue queues the Workload again. While pods still run, the quota stays
  reserved: Kueue counts it until the job says it stopped.
* **Finished job**: ``Finished=True`` with reason ``Succeeded`` or ``Failed``; Kueue releases the
  quota and the next Workload in the queue is admitted.
* **spec.suspend** of a queued job: ``spec.active: false`` on the Workload (Kueue evicts it and
  releases the quota: a suspended job holds nothing); cleared, ``active: true`` queues it again.
* **spec.replicas changed**: a Workload's pod sets cannot change while it holds quota, so the old
  Workload is deleted and a new one for the new size is queued (the job stops meanwhile).
* **A finished job edited to continue**: a finished Workload is never admitted again; it is
  replaced by a new one.

A recovery from a failure keeps the Workload as it is: the job keeps its quota while it restarts.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from relaunch import resources
from relaunch.model import GROUP as RELAUNCH_GROUP

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
QUEUE_NAME_LABEL = f"{GROUP}/queue-name"
#: A Kueue WorkloadPriorityClass (Kueue's own priorities, which do not touch pod scheduling).
PRIORITY_CLASS_LABEL = f"{GROUP}/priority-class"
JOB_UID_LABEL = f"{GROUP}/job-uid"
POD_SET = "workers"

#: Eviction reasons after which Kueue's job integrations mark the Workload ``Requeued=True``.
REQUEUED_EVICTIONS = frozenset({"Preempted", "NodeFailures"})

#: Hold reasons (the Admitted condition's reason and the Ready condition's while held).
WAITING, PREEMPTED, EVICTED = "WaitingForAdmission", "Preempted", "Evicted"


@dataclass(frozen=True)
class Condition:
    status: str
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class WorkloadView:
    """What the operator needs of its Workload."""

    name: str
    resource_version: str = ""
    queue_name: str = ""
    active: bool = True
    pod_count: int | None = None
    cluster_queue: str | None = None  # status.admission.clusterQueue
    conditions: Mapping[str, Condition] = field(default_factory=dict)
    raw_conditions: tuple[Mapping[str, Any], ...] = ()

    def condition(self, type_: str) -> Condition | None:
        return self.conditions.get(type_)

    def is_true(self, type_: str) -> bool:
        cond = self.conditions.get(type_)
        return cond is not None and cond.status == "True"

    @property
    def admitted(self) -> bool:
        return self.is_true("Admitted")

    @property
    def quota_reserved(self) -> bool:
        return self.is_true("QuotaReserved")

    @property
    def finished(self) -> bool:
        return self.is_true("Finished")

    @property
    def evicted(self) -> Condition | None:
        cond = self.conditions.get("Evicted")
        return cond if cond is not None and cond.status == "True" else None


@dataclass(frozen=True)
class QueueView:
    """A TrainingJob's queue: its labels, its Workload's name and the Workload (None: not created)."""

    queue_name: str
    workload_name: str
    workload: WorkloadView | None = None
    priority_class: str | None = None  # a WorkloadPriorityClass (label), else the template's PriorityClass
    priority_class_kind: str | None = None  # WorkloadPriorityClass | PriorityClass
    priority: int | None = None  # the class's value, read when the Workload is to be created
    priority_error: str | None = None  # why the class could not be read


@dataclass(frozen=True)
class Hold:
    """Kueue keeps the job from running: ``reason`` (WaitingForAdmission, Preempted, Evicted) and
    ``message`` (Kueue's words)."""

    reason: str
    message: str


@dataclass(frozen=True)
class PatchWorkload:
    """A JSON merge patch of the Workload (``status``: of its status subresource). It carries the
    resourceVersion it was computed from: a Workload Kueue changed meanwhile is not overwritten
    (409), and the next round decides again from what Kueue wrote."""

    name: str
    patch: Mapping[str, Any]
    status: bool = False
    why: str = ""


@dataclass(frozen=True)
class DeleteWorkload:
    name: str
    why: str = ""


def workload_name(job: str, uid: str) -> str:
    """``trainingjob-<job>-<hash>``: deterministic, and different for a namesake (another uid)."""
    digest = hashlib.sha256(f"TrainingJob\n{RELAUNCH_GROUP}\n{job}\n{uid}".encode()).hexdigest()[:5]
    prefix = f"trainingjob-{job}"[: 253 - 6]
    return f"{prefix}-{digest}"


def queue_of(
    labels: Mapping[str, str] | None, template: Mapping[str, Any] | None
) -> tuple[str, str | None, str | None]:
    """(queue name, priority class, its kind) from the TrainingJob's labels and worker template;
    the queue name is "" when the job is not queued. A WorkloadPriorityClass label wins over the
    template's priorityClassName, as in Kueue's own integrations."""
    labels = labels or {}
    queue = str(labels.get(QUEUE_NAME_LABEL) or "")
    wpc = labels.get(PRIORITY_CLASS_LABEL)
    if wpc:
        return queue, str(wpc), "WorkloadPriorityClass"
    pcn = ((template or {}).get("spec") or {}).get("priorityClassName")
    if pcn:
        return queue, str(pcn), "PriorityClass"
    return queue, None, None


def workload_view(obj: Mapping[str, Any]) -> WorkloadView:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    raw = tuple(dict(c) for c in status.get("conditions") or [])
    conditions = {
        str(c.get("type")): Condition(
            str(c.get("status")), str(c.get("reason") or ""), str(c.get("message") or "")
        )
        for c in raw
    }
    pod_sets = spec.get("podSets") or []
    pod_count = sum(int(p.get("count") or 0) for p in pod_sets) if pod_sets else None
    admission = status.get("admission") or {}
    return WorkloadView(
        name=str(meta.get("name") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        queue_name=str(spec.get("queueName") or ""),
        active=spec.get("active") is not False,
        pod_count=pod_count,
        cluster_queue=admission.get("clusterQueue"),
        conditions=conditions,
        raw_conditions=raw,
    )


def build_workload(
    ref: resources.JobRef, template: Mapping[str, Any], replicas: int, queue: QueueView, *, active: bool
) -> dict[str, Any]:
    """The Workload of a TrainingJob: one pod set of ``replicas`` worker pods (the worker template:
    Kueue counts its containers' requests), in the job's LocalQueue, with its priority."""
    tpl = copy.deepcopy(dict(template))
    tpl_meta = tpl.get("metadata") or {}
    pod_template: dict[str, Any] = {"spec": tpl.get("spec") or {}}
    meta_out = {k: tpl_meta[k] for k in ("labels", "annotations") if tpl_meta.get(k)}
    if meta_out:
        pod_template["metadata"] = meta_out
    spec: dict[str, Any] = {
        "queueName": queue.queue_name,
        "podSets": [{"name": POD_SET, "count": replicas, "template": pod_template}],
        "active": active,
    }
    if queue.priority_class and queue.priority is not None:
        group = GROUP if queue.priority_class_kind == "WorkloadPriorityClass" else "scheduling.k8s.io"
        spec["priorityClassRef"] = {
            "group": group,
            "kind": queue.priority_class_kind,
            "name": queue.priority_class,
        }
        spec["priority"] = queue.priority
    return {
        "apiVersion": API_VERSION,
        "kind": "Workload",
        "metadata": {
            "name": queue.workload_name,
            "namespace": ref.namespace,
            # the job's uid under Kueue's own label key: Kueue names the job by it in its messages
            "labels": {
                **resources.job_labels(ref.name),
                QUEUE_NAME_LABEL: queue.queue_name,
                JOB_UID_LABEL: ref.uid,
            },
            "ownerReferences": [resources.owner_reference(ref)],
        },
        "spec": spec,
    }


def _stale(queue: QueueView, replicas: int) -> str | None:
    """Why the Workload cannot serve the job as it is now (it must be replaced), or None."""
    wl = queue.workload
    if wl is None:
        return None
    if wl.pod_count is not None and wl.pod_count != replicas:
        return f"spec.replicas is {replicas} but Workload {wl.name} asks for {wl.pod_count} workers"
    return None


def hold(queue: QueueView | None, replicas: int, finished: bool) -> Hold | None:
    """Whether Kueue keeps the job from running now, and Kueue's words why (None: admitted, or not
    queued). ``finished``: the job is Succeeded or Failed (its Workload no longer matters)."""
    if queue is None or finished:
        return None
    wl = queue.workload
    where = f"LocalQueue {queue.queue_name}"
    if queue.priority_error and wl is None:
        return Hold(WAITING, f"waiting for admission by Kueue in {where}: {queue.priority_error}")
    if wl is None:
        return Hold(
            WAITING, f"waiting for admission by Kueue in {where}: creating Workload {queue.workload_name}"
        )
    if wl.finished:
        return Hold(
            WAITING,
            f"waiting for admission by Kueue in {where}: Workload {wl.name} finished; queueing a new one",
        )
    stale = _stale(queue, replicas)
    if stale:
        return Hold(WAITING, f"waiting for admission by Kueue in {where}: {stale}; queueing a new Workload")
    evicted = wl.evicted
    if evicted is not None:
        reason = PREEMPTED if evicted.reason == "Preempted" else EVICTED
        return Hold(
            reason, f"{reason.lower()} by Kueue ({evicted.reason}): {evicted.message or 'no message'}"
        )
    if wl.admitted:
        return None
    return Hold(WAITING, f"waiting for admission by Kueue in {where}: {_pending_words(wl)}")


def _pending_words(wl: WorkloadView) -> str:
    """Kueue's own explanation of a Workload that is not admitted."""
    for type_ in ("QuotaReserved", "Admitted"):
        cond = wl.condition(type_)
        if cond is not None and cond.status != "True" and cond.message:
            return cond.message
    if not wl.active:
        return f"Workload {wl.name} is deactivated"
    return f"Workload {wl.name} has no decision from Kueue yet"


def admitted_words(queue: QueueView) -> str:
    wl = queue.workload
    where = (
        f"ClusterQueue {wl.cluster_queue}"
        if wl is not None and wl.cluster_queue
        else f"LocalQueue {queue.queue_name}"
    )
    return f"admitted by Kueue ({where})"


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _conditions_with(
    raw: Sequence[Mapping[str, Any]], updates: Sequence[Mapping[str, Any]], now: float
) -> list[dict[str, Any]]:
    """``raw`` with each update set by type, keeping lastTransitionTime when the status did not change."""
    out = [dict(c) for c in raw]
    for update in updates:
        old = next((c for c in out if c.get("type") == update["type"]), None)
        new = dict(update)
        same = old is not None and old.get("status") == new["status"] and old.get("lastTransitionTime")
        new["lastTransitionTime"] = old["lastTransitionTime"] if same and old else _iso(now)
        if old is not None and old.get("observedGeneration") is not None:
            new.setdefault("observedGeneration", old["observedGeneration"])
        out = [c for c in out if c.get("type") != update["type"]] + [new]
    return out


def finish_patch(wl: WorkloadView, succeeded: bool, message: str, now: float) -> dict[str, Any]:
    reason = "Succeeded" if succeeded else "Failed"
    conditions = _conditions_with(
        wl.raw_conditions,
        [{"type": "Finished", "status": "True", "reason": reason, "message": message[:32768]}],
        now,
    )
    return {"metadata": {"resourceVersion": wl.resource_version}, "status": {"conditions": conditions}}


def release_patch(wl: WorkloadView, now: float) -> dict[str, Any]:
    """Give the quota of an evicted Workload back once the job stopped (what Kueue's job
    integrations do): no admission, QuotaReserved and Admitted False, Requeued."""
    evicted = wl.evicted or Condition("True", "Evicted", "")
    updates = [
        {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": evicted.message},
        {
            "type": "Admitted",
            "status": "False",
            "reason": "NoReservation",
            "message": "The workload has no reservation",
        },
        {
            "type": "Requeued",
            "status": "True" if evicted.reason in REQUEUED_EVICTIONS else "False",
            "reason": evicted.reason,
            "message": evicted.message,
        },
    ]
    return {
        "metadata": {"resourceVersion": wl.resource_version},
        "status": {"admission": None, "conditions": _conditions_with(wl.raw_conditions, updates, now)},
    }


def workload_actions(
    ref: resources.JobRef,
    template: Mapping[str, Any],
    replicas: int,
    suspended: bool,
    queue: QueueView | None,
    *,
    phase: str | None,
    stopped: bool,
    finish_message: str,
    now: float,
) -> list[dict[str, Any] | PatchWorkload | DeleteWorkload]:
    """What to do to the Workload, given the job as this round leaves it (a manifest: create it).

    ``phase``: the job's phase after this round; ``stopped``: no pod of the job is left (workers
    or helpers), so an evicted Workload's quota can be given back; ``suspended``: spec.suspend."""
    if queue is None:
        return []
    wl = queue.workload
    finished = phase in ("Succeeded", "Failed")
    if wl is None:
        if finished or queue.priority_error:
            return []
        return [build_workload(ref, template, replicas, queue, active=not suspended)]
    if finished:
        if wl.finished:
            return []
        return [
            PatchWorkload(
                wl.name,
                finish_patch(wl, phase == "Succeeded", finish_message, now),
                status=True,
                why="job finished",
            )
        ]
    if wl.finished:
        return [DeleteWorkload(wl.name, "the job continues after it finished: a new Workload queues it")]
    stale = _stale(queue, replicas)
    if stale:
        if wl.quota_reserved and not stopped:
            return []  # the gang stops first (the job is held): Kueue counts the quota until then
        return [DeleteWorkload(wl.name, stale)]
    actions: list[dict[str, Any] | PatchWorkload | DeleteWorkload] = []
    if wl.active == suspended:
        actions.append(
            PatchWorkload(
                wl.name,
                {"metadata": {"resourceVersion": wl.resource_version}, "spec": {"active": not suspended}},
                why="spec.suspend " + ("set" if suspended else "cleared"),
            )
        )
        return actions
    if wl.evicted is not None and wl.quota_reserved and stopped:
        actions.append(PatchWorkload(wl.name, release_patch(wl, now), status=True, why="evicted and stopped"))
    return actions
