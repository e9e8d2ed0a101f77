"""What the state machine sees of the API's objects: a worker pod, a helper Job and its pod."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from relaunch import resources
from relaunch.controller.kube import parse_k8s_time
from relaunch.controller.reconcile import HelperJobView, PodView


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        attempt = int(labels[resources.LABEL_ATTEMPT])
        index = int(labels.get(resources.LABEL_INDEX, -1))
    except (KeyError, ValueError):
        return None
    status = pod.get("status") or {}
    exit_code: int | None = None
    reason: str | None = status.get("reason")
    message: str | None = status.get("message")
    finished: float | None = None
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if not term:
            continue
        code = term.get("exitCode")
        # The container that failed explains the pod; a clean exit explains nothing.
        if exit_code is None or (code and not exit_code):
            exit_code = code
            reason = status.get("reason") or term.get("reason")
            message = status.get("message") or term.get("message")
            finished = parse_k8s_time(term.get("finishedAt"))
    unschedulable, unschedulable_message = _unschedulable(status)
    waiting_reason, waiting_message = _waiting(status)
    disruption = next(
        (
            str(c.get("reason") or "DisruptionTarget")
            for c in status.get("conditions") or []
            if c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        ),
        None,
    )
    return PodView(
        name=meta.get("name", ""),
        attempt=attempt,
        index=index,
        phase=status.get("phase") or "Pending",
        node=(pod.get("spec") or {}).get("nodeName"),
        deleting=bool(meta.get("deletionTimestamp")),
        exit_code=exit_code,
        reason=reason,
        message=message,
        finished_at=finished,
        unschedulable_since=unschedulable,
        unschedulable_message=unschedulable_message,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        disruption=disruption,
    )


def _unschedulable(status: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """Since when the scheduler cannot place the pod, and its words why (PodScheduled=False)."""
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            since = parse_k8s_time(cond.get("lastTransitionTime")) or time.time()
            return since, (cond.get("message") or "").strip() or None
    return None, None


def _waiting(status: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The first container that waits for a reason other than being created, with the kubelet's words."""
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in ("ContainerCreating", "PodInitializing"):
            return str(reason), (waiting.get("message") or "").strip() or None
    return None, None


def helper_job_view(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> HelperJobView:
    """A planning/conversion Job with what its pod shows (the plan travels in its termination
    message). A Job may have had several pods (the Job controller replaces a disrupted one): the
    one that explains it is a succeeded pod, else a live one, else the newest."""
    name = (job.get("metadata") or {}).get("name", "")
    job_status = job.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in job_status.get("conditions") or []}
    succeeded = conditions.get("Complete") == "True" or int(job_status.get("succeeded") or 0) > 0
    failed = conditions.get("Failed") == "True" or conditions.get("FailureTarget") == "True"
    own = [
        pod
        for pod in pods
        if ((pod.get("metadata") or {}).get("labels") or {}).get(
            "batch.kubernetes.io/job-name", ((pod.get("metadata") or {}).get("labels") or {}).get("job-name")
        )
        == name
    ]

    def rank(pod: Mapping[str, Any]) -> tuple[int, str]:
        phase = (pod.get("status") or {}).get("phase")
        order = 2 if phase == "Succeeded" else 1 if phase in ("Pending", "Running") else 0
        return order, str((pod.get("metadata") or {}).get("creationTimestamp") or "")

    if not own:
        return HelperJobView(name=name, succeeded=succeeded, failed=failed)
    pod = max(own, key=rank)
    status = pod.get("status") or {}
    message: str | None = None
    exit_code: int | None = None
    term_reason: str | None = None
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            exit_code = term.get("exitCode")
            term_reason = term.get("reason")
            message = (term.get("message") or "").strip() or message
    if status.get("phase") == "Succeeded":
        succeeded = True
    _, unschedulable_message = _unschedulable(status)
    waiting_reason, waiting_message = _waiting(status)
    telling = term_reason if term_reason not in (None, "Error", "Completed") else None
    reason = status.get("reason") or telling
    return HelperJobView(
        name=name,
        succeeded=succeeded,
        failed=failed and not succeeded,
        message=message,
        exit_code=exit_code,
        pod=(pod.get("metadata") or {}).get("name"),
        node=(pod.get("spec") or {}).get("nodeName"),
        pod_reason=reason,
        unschedulable_message=unschedulable_message,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
    )
