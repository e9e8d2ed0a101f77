"""Faults that do not crash, on the local cluster: hangs, jobs that never start, failure rules
and bad nodes.

A hang is real here: the node agent stops a worker's processes (SIGSTOP), so the other ranks
block inside the collective exactly as on a cluster, and only the progress watchdog (reading
MindFormers' step line from worker 0's log, through the API server) notices.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from e2e.test_recovery import (  # the fixtures are shared with the recovery scenarios
    Jobs,
    OperatorProcess,
    WaitFor,
    api,  # noqa: F401
    condition,
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
from relaunch.controller.kube import Kube


def sh_job(name: str, shared: Path, script: str, **spec: Any) -> dict[str, Any]:
    """A job whose workers run a shell script (with NODE_NAME from the downward API)."""
    manifest = trainingjob(name, shared, trainer_config(), **spec)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["sh", "-c", script]
    container["env"].append({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    return manifest


def events_of(jobs: Jobs, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in jobs.events(name) if e.get("reason") == reason]


WATCHDOG = {"startupSeconds": 60, "stallSeconds": 20, "checkpointSaveSeconds": 40}


def test_a_paused_worker_is_a_no_progress_recovery_and_the_loss_curve_stays_bit_identical(
    jobs: Jobs,
    operator: OperatorProcess,
    node_agent: Any,
    wait_for: WaitFor,
    shared: Path,
    reference_curve: dict,
) -> None:
    """Worker 1 stops (SIGSTOP) at step 12: worker 0 blocks in the next collective, no rank
    exits (the trainer's own timeout is longer), and the watchdog restarts the gang from the
    newest complete step within the stall allowance plus a few seconds."""
    config = trainer_config(comm_timeout_seconds=300)
    jobs.create(trainingjob("hang", shared, config, progress=WATCHDOG))
    wait_running(jobs, wait_for, "hang", 1, 60)
    wait_for(lambda: newest_global_step(shared) >= 12, 60, "step 12")
    node_agent.pause_pod(jobs.namespace, "hang-1-1")
    paused = time.monotonic()
    status = wait_for(
        lambda: (s := jobs.status("hang")).get("lastFailure", {}).get("reason") == "NoProgress" and s,
        60,
        lambda: f"NoProgress:\n{jobs.describe('hang')}",
    )
    detected = time.monotonic() - paused
    assert detected < 25, f"detected {detected:.1f}s after the pause"  # a 20 s allowance
    last = status["lastFailure"]
    assert "hang-1-0" in last["message"] and "spec.progress.stallSeconds" in last["message"], last
    stalled_at = status["progress"]["globalStep"]  # the live step, as the stall found it
    assert f"after step {stalled_at}" in last["message"] and 12 <= stalled_at <= 13, (
        status["progress"],
        last,
    )
    status = wait_running(jobs, wait_for, "hang", 2, 60)
    assert status["restarts"] == 1 and status["recoveries"][-1]["reason"] == "NoProgress"
    assert status["checkpoint"]["step"] > 0
    wait_phase(jobs, wait_for, "hang", "Succeeded", 120)
    curve = loss_curve(shared)
    assert {g: curve[g]["loss_hex"] for g in curve} == {
        g: reference_curve[g]["loss_hex"] for g in reference_curve
    }
    assert jobs.status("hang")["progress"]["globalStep"] == 30  # the last step, recorded at success


def test_a_save_slower_than_the_stall_allowance_but_within_the_save_allowance_is_no_stall(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    """Every save (each 5 steps) takes 8 s more, past the 5 s stall allowance but within the
    20 s save allowance: the job runs to the end with no recovery."""
    config = trainer_config(save_delay_seconds=8, step_delay_seconds=0.2)
    progress = {"startupSeconds": 60, "stallSeconds": 5, "checkpointSaveSeconds": 20}
    jobs.create(trainingjob("saves", shared, config, replicas=2, progress=progress))
    status = wait_phase(jobs, wait_for, "saves", "Succeeded", 180)
    assert status.get("restarts", 0) == 0, status
    assert [r["reason"] for r in status["recoveries"]] == ["Created"], status["recoveries"]


def test_a_worker_that_never_reaches_step_1_is_a_startup_timeout(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    jobs.create(sh_job("mute", shared, "exec sleep 100000", progress={"startupSeconds": 4}))
    wait_running(jobs, wait_for, "mute", 1, 60)
    started = time.monotonic()
    status = wait_for(
        lambda: (s := jobs.status("mute")).get("lastFailure", {}).get("reason") == "StartupTimeout" and s,
        30,
        lambda: f"StartupTimeout:\n{jobs.describe('mute')}",
    )
    assert time.monotonic() - started < 4 + 5
    assert "within 4s" in status["lastFailure"]["message"]
    assert status["restarts"] == 1


def test_an_exit_code_rule_fails_the_job_within_2_s(
    api: Kube, jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    rules = [{"action": "Fail", "exitCodes": [42]}]
    jobs.create(sh_job("code", shared, "sleep 3; exit 42", recovery={"rules": rules}))
    wait_running(jobs, wait_for, "code", 1, 60)
    wait_for(
        lambda: any(p["status"].get("phase") == "Failed" for p in jobs.workers("code")),
        30,
        lambda: f"a worker Failed:\n{jobs.describe('code')}",
    )
    seen = time.monotonic()
    status = wait_phase(jobs, wait_for, "code", "Failed", 10)
    assert time.monotonic() - seen < 2
    failed = condition(status, "Failed")
    assert failed["reason"] == "PermanentFailure" and "spec.recovery.rules[0]" in failed["message"], failed
    assert status.get("restarts", 0) == 0


def test_a_log_pattern_rule_restarts_without_counting(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    """The first attempt's worker dies printing an HCCL timeout: the rule restarts the gang
    without counting it (the container's log reaches the operator through its termination
    message, FallbackToLogsOnError)."""
    script = (
        'if [ "$RELAUNCH_ATTEMPT" = 1 ]; then echo "HCCL: allreduce timeout"; exit 1; fi; exec sleep 100000'
    )
    rules = [{"action": "RestartNotCounted", "logPattern": "HCCL.*timeout"}]
    jobs.create(sh_job("hccl", shared, script, recovery={"rules": rules, "backoff": {"initialSeconds": 5}}))
    status = wait_running(jobs, wait_for, "hccl", 2, 60)
    assert status.get("restarts", 0) == 0
    entry = status["recoveries"][-1]
    assert entry["reason"] == "WorkerFailed" and entry["counted"] is False, entry
    assert "not counted" in status["lastFailure"]["message"]


def test_a_bad_node_is_quarantined_after_two_failures_and_eligible_again_after_the_cool_down(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    """Every worker on node-1 fails after 2 s (a bad node), and the scheduler prefers node-1: two
    attempts fail there, then node-1 is quarantined, the third attempt runs on the other nodes,
    and node-1 becomes eligible again after the cool-down."""
    script = 'if [ "$NODE_NAME" = node-1 ]; then sleep 2; echo "ECC error"; exit 1; fi; exec sleep 100000'
    manifest = sh_job(
        "badnode", shared, script, recovery={"quarantine": {"failures": 2, "cooldownSeconds": 25}}
    )
    manifest["spec"]["template"]["spec"]["affinity"] = {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "preference": {
                        "matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-1"]}
                        ]
                    },
                }
            ]
        }
    }
    jobs.create(manifest)
    status = wait_for(
        lambda: (s := jobs.status("badnode")).get("quarantinedNodes") and s,
        90,
        lambda: f"node-1 quarantined:\n{jobs.describe('badnode')}",
    )
    assert [q["node"] for q in status["quarantinedNodes"]] == ["node-1"]
    assert "2 failures" in status["quarantinedNodes"][0]["reason"]
    attempt = status["recovery"]["attempt"] if status.get("recovery") else status["attempt"]
    status = wait_running(jobs, wait_for, "badnode", attempt, 60)
    assert all(p["spec"]["nodeName"] != "node-1" for p in jobs.workers("badnode", attempt))
    assert events_of(jobs, "badnode", "NodeQuarantined")
    wait_for(
        lambda: (
            "quarantinedNodes" not in jobs.status("badnode") and events_of(jobs, "badnode", "NodeReleased")
        ),
        60,
        lambda: f"node-1 released:\n{jobs.describe('badnode')}",
    )


def test_a_node_marked_unhealthy_moves_the_gang_off_it_before_it_crashes(
    api: Kube, jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    key = "example.com/accelerator-unhealthy"
    jobs.create(sh_job("sick", shared, "exec sleep 100000", nodeHealth={"taints": [key]}))
    wait_running(jobs, wait_for, "sick", 1, 60)
    node = jobs.workers("sick", 1)[0]["spec"]["nodeName"]
    taint = {"key": key, "value": "true", "effect": "PreferNoSchedule"}
    api.merge_patch(f"/api/v1/nodes/{node}", {"spec": {"taints": [taint]}})
    try:
        status = wait_running(jobs, wait_for, "sick", 2, 60)
        assert status["lastFailure"]["reason"] == "NodeUnhealthy" and key in status["lastFailure"]["message"]
        assert status.get("restarts", 0) == 0
        assert all(p["spec"]["nodeName"] != node for p in jobs.workers("sick", 2))
        assert [q["node"] for q in status["quarantinedNodes"]] == [node]
    finally:
        api.merge_patch(f"/api/v1/nodes/{node}", {"spec": {"taints": None}})


MINDSPORE_ENV = Path.home() / ".cache" / "relaunch" / "mindspore-env"
#: Each pod runs its rank with ``msrun``. msrun starts the cluster's scheduler on the node whose
#: own address is the master address; on the testbed every pod shares the host's network
#: namespace, where msrun's check (the interfaces' addresses, then the kernel's source address
#: for the master's, 127.0.0.1 on loopback) cannot tell, so pod 0 starts the scheduler itself,
#: with MindSpore's environment-variable launch (MS_ROLE=MS_SCHED), and every pod's msrun joins it.
MSRUN = f"""
export PATH={MINDSPORE_ENV}/bin:$PATH
until MASTER_IP=$(getent hosts "$MS_SCHED_HOST" | awk '{{print $1}}') && [ -n "$MASTER_IP" ]
do sleep 0.2; done
if [ "$MS_NODE_RANK" = 0 ]; then
  MS_ROLE=MS_SCHED MS_SCHED_HOST=$MASTER_IP python -m e2e.mindspore.dp_allreduce > /tmp/scheduler.log 2>&1 &
fi
exec msrun --worker_num=$MS_WORKER_NUM --local_worker_num=1 --node_rank=$MS_NODE_RANK \\
  --master_addr=$MASTER_IP --master_port=$MS_SCHED_PORT --join=True --log_dir=/tmp/msrun \\
  e2e/mindspore/dp_allreduce.py
"""


@pytest.mark.skipif(
    not (MINDSPORE_ENV / "bin" / "msrun").exists(),
    reason=f"optional MindSpore environment absent ({MINDSPORE_ENV}); see tests/conv_mindspore.py",
)
def test_a_real_mindspore_job_hung_in_allreduce_is_recovered_and_a_killed_worker_too(
    cluster: Any, jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """Two pods, each running one rank under msrun, all-reduce every step over MindSpore's own
    collectives. Worker 1 stopped (SIGSTOP) leaves rank 0 blocked inside AllReduce: the watchdog
    restarts the gang (NoProgress). Then worker 1 is killed: a real crash, recovered as one."""
    progress = {"startupSeconds": 120, "stallSeconds": 15}
    jobs.create(sh_job("ms", shared, MSRUN, progress=progress, recovery={"backoff": {"initialSeconds": 0}}))
    wait_running(jobs, wait_for, "ms", 1, 90)
    # The collective really sums over both ranks: rank r gives r + step, so step 3 reduces to 7.
    wait_for(
        lambda: (
            "step:[    3/" in (log := cluster.pod_log(jobs.namespace, "ms-1-0")) and "allreduce: 7" in log
        ),
        120,
        lambda: f"rank 0's third step:\n{cluster.pod_log(jobs.namespace, 'ms-1-0')[-2000:]}",
    )
    node_agent.pause_pod(jobs.namespace, "ms-1-1")
    status = wait_for(
        lambda: (s := jobs.status("ms")).get("lastFailure", {}).get("reason") == "NoProgress" and s,
        60,
        lambda: f"NoProgress:\n{jobs.describe('ms')}",
    )
    assert "spec.progress.stallSeconds" in status["lastFailure"]["message"]
    wait_running(jobs, wait_for, "ms", 2, 120)
    wait_for(
        lambda: "step:[    2/" in cluster.pod_log(jobs.namespace, "ms-2-0"),
        120,
        lambda: f"attempt 2 training:\n{cluster.pod_log(jobs.namespace, 'ms-2-0')[-2000:]}",
    )
    node_agent.kill_pod(jobs.namespace, "ms-2-1")
    status = wait_running(jobs, wait_for, "ms", 3, 120)
    assert status["lastFailure"]["reason"] == "WorkerFailed" and status["lastFailure"]["pod"] == "ms-2-1"
    assert [r["reason"] for r in status["recoveries"]] == ["Created", "NoProgress", "WorkerFailed"]
    assert status["restarts"] == 2
