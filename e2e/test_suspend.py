"""spec.suspend on the local cluster, driven the way a queue that drives jobs through it would: a
merge patch of ``spec.suspend`` to admit a job and to preempt it, at any moment (Kueue itself goes
through the job's Workload instead: e2e/test_kueue.py).

A job created suspended creates no pod until it is admitted; a running job that is suspended
stops its workers gracefully (SIGTERM, the pods' grace period), shows Suspended and counts no
restart, and once admitted again resumes from its newest complete step and finishes with the
loss curve of an uninterrupted run; a suspend in the middle of planning is obeyed at once; a
job resized while suspended (a queue admitting it with less quota) resumes converted.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from e2e.test_recovery import (  # the fixtures are shared with the recovery scenarios
    Jobs,
    OperatorProcess,
    WaitFor,
    api,  # noqa: F401
    complete_steps,
    condition,
    events_with,
    jobs,  # noqa: F401
    loss_curve,
    newest_global_step,
    operator,  # noqa: F401
    reference_curve,  # noqa: F401
    shared,  # noqa: F401
    trainer_config,
    trainingjob,
    wait_phase,
    wait_running,
)

#: The demo trainer behind a shell that notes the SIGTERM it gets and then, once the trainer has
#: stopped, that it stopped. A graceful deletion lets it write both lines; a force-delete
#: (grace 0) SIGKILLs the shell right after the SIGTERM, before the second.
NOTING_SIGTERM = (
    "python -m examples.trainer & child=$!; "
    "trap 'echo SIGTERM >> /shared/stop-rank$RANK_ID.log; kill -TERM $child 2>/dev/null; wait $child; "
    "echo stopped >> /shared/stop-rank$RANK_ID.log; exit 143' TERM; "
    "wait $child"
)


def suspend(jobs: Jobs, name: str, value: bool) -> None:
    """What Kueue does to preempt (True) or admit (False) a job: a merge patch of spec.suspend."""
    jobs.merge_patch(name, {"spec": {"suspend": value}})


def kubectl_get_tj(cluster: Any, namespace: str, name: str) -> str:
    result = subprocess.run(
        [cluster.kubectl(), f"--kubeconfig={cluster.kubeconfig}", "get", "tj", "-n", namespace, name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_suspended(jobs: Jobs, wait_for: WaitFor, name: str, timeout: float) -> dict[str, Any]:
    """Phase Suspended, no worker left, and no helper pod that has not finished."""
    return wait_for(
        lambda: (
            (s := jobs.status(name)).get("phase") == "Suspended"
            and not jobs.workers(name)
            and not running_pods(jobs, name)
            and s
        ),
        timeout,
        lambda: f"TrainingJob {name} suspended with no pod running:\n{jobs.describe(name)}",
    )


def running_pods(jobs: Jobs, name: str) -> list[str]:
    """Pods of the job that are neither Succeeded nor Failed (terminating ones included)."""
    return [
        p["metadata"]["name"]
        for p in jobs.pods(name)
        if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]


def test_a_job_created_suspended_has_no_pods_until_it_is_admitted(
    cluster: Any, jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    jobs.create(trainingjob("queued", shared, trainer_config(), suspend=True))
    status = wait_phase(jobs, wait_for, "queued", "Suspended", 30)
    suspended = condition(status, "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", "Suspended"), suspended
    assert condition(status, "Ready")["reason"] == "Suspended"
    time.sleep(5)  # a queue may hold a job for hours: nothing is created meanwhile
    assert jobs.pods("queued") == [] and jobs.jobs("queued") == []
    assert jobs.status("queued")["phase"] == "Suspended"
    assert "Suspended" in kubectl_get_tj(cluster, jobs.namespace, "queued")

    suspend(jobs, "queued", False)  # admitted
    status = wait_running(jobs, wait_for, "queued", 1, 60)
    assert status.get("restarts", 0) == 0
    assert condition(status, "Suspended")["reason"] == "Resumed"
    assert jobs.get("queued")["spec"]["suspend"] is False


def test_a_suspended_job_stops_gracefully_and_resumes_from_its_newest_complete_step(
    cluster: Any,
    jobs: Jobs,
    operator: OperatorProcess,
    wait_for: WaitFor,
    shared: Path,
    reference_curve: dict[int, dict[str, Any]],
) -> None:
    manifest = trainingjob("preempt", shared, trainer_config(step_delay_seconds=0.5))
    manifest["spec"]["template"]["spec"]["containers"][0]["command"] = ["sh", "-c", NOTING_SIGTERM]
    jobs.create(manifest)
    wait_running(jobs, wait_for, "preempt", 1, 60)
    wait_for(
        lambda: complete_steps(shared, 2) and newest_global_step(shared) >= 12,
        60,
        "a checkpoint on every rank",
    )

    suspend(jobs, "preempt", True)  # preempted
    status = wait_suspended(jobs, wait_for, "preempt", 30)
    for rank in (0, 1):
        note = shared / f"stop-rank{rank}.log"
        assert note.exists() and note.read_text().split() == ["SIGTERM", "stopped"], (
            f"rank {rank} was not stopped gracefully: {note.read_text() if note.exists() else 'no SIGTERM'}"
        )
    assert status.get("restarts", 0) == 0 and "lastFailure" not in status, status
    suspended = condition(status, "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", "Suspended"), suspended
    assert "recovery" not in status
    events_with(jobs, wait_for, "preempt", "Suspended")
    assert "Suspended" in kubectl_get_tj(cluster, jobs.namespace, "preempt")

    time.sleep(4)  # suspended stays suspended: nothing starts, and spec.suspend is left as set
    assert running_pods(jobs, "preempt") == [] and jobs.workers("preempt") == []
    assert jobs.status("preempt")["phase"] == "Suspended"
    assert jobs.get("preempt")["spec"]["suspend"] is True
    epoch, step = complete_steps(shared, 2)[-1]
    newest = (epoch - 1) * 10 + step

    suspend(jobs, "preempt", False)  # admitted again
    status = wait_running(jobs, wait_for, "preempt", 2, 60)
    assert status.get("restarts", 0) == 0
    entry = status["recoveries"][-1]
    assert (entry["reason"], entry["counted"]) == ("Resumed", False), entry
    resumed = (status["checkpoint"]["epoch"] - 1) * 10 + status["checkpoint"]["step"]
    planned = [
        e["message"] for e in events_with(jobs, wait_for, "preempt", "Planned") if e["reason"] == "Planned"
    ]
    # The newest step every rank has by name; the one before only when the plan rejected it (a
    # save the SIGTERM cut short) and says so.
    assert resumed == newest or (resumed == newest - 5 and "rejected" in planned[-1]), (
        resumed,
        newest,
        planned,
    )

    status = wait_phase(jobs, wait_for, "preempt", "Succeeded", 90)
    assert status.get("restarts", 0) == 0
    curve = loss_curve(shared)
    assert sorted(curve) == sorted(reference_curve) == list(range(1, 31))
    assert {g: curve[g]["loss_hex"] for g in curve} == {
        g: reference_curve[g]["loss_hex"] for g in reference_curve
    }
    assert min(g for g, e in curve.items() if e["attempt"] == 2) == resumed + 1


def test_a_suspend_during_planning_is_obeyed_at_once(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """The planning pod is held (a slow volume mount): the job sits in Planning when it is
    suspended. The planning Job goes at once, the interrupted start is in the history, nothing
    is counted; admitted again, the job plans anew (a new attempt number) and runs."""
    selector = "relaunch.dev/role=plan"
    node_agent.hold_pods(jobs.namespace, selector)
    jobs.create(trainingjob("midplan", shared, trainer_config()))
    wait_for(
        lambda: (
            (jobs.status("midplan").get("recovery") or {}).get("stage") == "Planning" and jobs.jobs("midplan")
        ),
        30,
        lambda: f"midplan in Planning with its Job:\n{jobs.describe('midplan')}",
    )
    suspend(jobs, "midplan", True)
    suspended_at = time.monotonic()
    status = wait_for(
        lambda: (s := jobs.status("midplan")).get("phase") == "Suspended" and not jobs.jobs("midplan") and s,
        15,
        lambda: f"midplan suspended, its planning Job deleted:\n{jobs.describe('midplan')}",
    )
    assert time.monotonic() - suspended_at < 10
    entry = status["recoveries"][-1]
    assert (entry["reason"], entry["supersededBy"]) == ("Created", "Suspended"), entry
    assert status.get("restarts", 0) == 0 and "recovery" not in status
    wait_suspended(jobs, wait_for, "midplan", 30)  # the held planning pod goes with its Job

    node_agent.release_pods(jobs.namespace, selector)
    suspend(jobs, "midplan", False)
    status = wait_running(jobs, wait_for, "midplan", 2, 60)
    assert status.get("restarts", 0) == 0
    assert [e["reason"] for e in status["recoveries"]] == ["Created", "Created"]


def test_a_job_resized_while_suspended_resumes_converted_on_the_new_size(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    """A queue that admits the job again with less quota: spec.replicas 4 -> 2 while suspended.
    Nothing starts while suspended; admitted, the newest checkpoint is converted to 2 ranks and
    training goes on from it, with no restart counted."""
    config = trainer_config(data_parallel=4, step_delay_seconds=0.4)
    jobs.create(trainingjob("shrunk", shared, config, replicas=4))
    wait_running(jobs, wait_for, "shrunk", 1, 60)
    wait_for(lambda: (1, 10) in complete_steps(shared, 4), 60, "step 10 saved on all 4 ranks")
    suspend(jobs, "shrunk", True)
    wait_suspended(jobs, wait_for, "shrunk", 30)
    jobs.merge_patch("shrunk", {"spec": {"replicas": 2}})
    time.sleep(3)
    assert jobs.workers("shrunk") == [] and jobs.status("shrunk")["phase"] == "Suspended"

    suspend(jobs, "shrunk", False)
    status = wait_running(jobs, wait_for, "shrunk", 2, 90)
    assert status["workers"] == 2 and status["worldSize"] == 2
    assert status.get("restarts", 0) == 0
    entry = status["recoveries"][-1]
    assert (entry["reason"], entry["converted"], entry["counted"]) == ("Resumed", True, False), entry
    assert json.loads(status["lastConversion"])["world_size"] == 2

    wait_phase(jobs, wait_for, "shrunk", "Succeeded", 120)
    curve = loss_curve(shared)
    assert sorted(curve) == list(range(1, 31))
    resumed = [e for e in curve.values() if e["attempt"] == 2]
    assert resumed and all(e["world"] == 2 for e in resumed)
    assert min(e["global_step"] for e in resumed) == (entry["fromEpoch"] - 1) * 10 + entry["fromStep"] + 1
