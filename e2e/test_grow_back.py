"""Elastic grow-back on the local cluster: a job that shrank after a node loss grows back to
``spec.replicas`` once the node has been Ready for ``spec.elastic.growBackAfterSeconds``; a node
that flaps inside that window causes no grow-back until it has been Ready for a whole window."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from e2e.test_recovery import (  # the fixtures are shared with the recovery scenarios
    Jobs,
    OperatorProcess,
    WaitFor,
    all_losses,
    api,  # noqa: F401
    complete_steps,
    jobs,  # noqa: F401
    operator,  # noqa: F401
    shared,  # noqa: F401
    trainer_config,
    trainingjob,
    wait_running,
)
from relaunch.controller.reconcile import CONTROLLED_REASONS, parse_time

WINDOW = 8  # spec.elastic.growBackAfterSeconds
GRACE = 4  # spec.recovery.nodeLossGraceSeconds
SAVE_EVERY = 5  # the demo config's save_checkpoint_steps
STEP_SECONDS = 0.4
#: Relative difference allowed between the loss of a step trained by the 2-worker gang and the
#: same step trained again by the grown 3-worker gang: the global batch is the same, only the
#: order of the reductions differs.
LOSS_TOLERANCE = 1e-3


def one_worker_per_node(manifest: dict[str, Any], name: str) -> None:
    manifest["spec"]["template"]["spec"]["affinity"] = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchLabels": {"relaunch.dev/job": name, "relaunch.dev/role": "worker"}
                    },
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    }


def grow_backs(status: dict[str, Any]) -> list[dict[str, Any]]:
    entries = [*(status.get("recoveries") or []), *([status["recovery"]] if status.get("recovery") else [])]
    return [e for e in entries if e.get("reason") == "GrowBack"]


def test_a_shrunk_job_grows_back_once_the_node_stays_ready_and_not_while_it_flaps(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """3 workers, one per node; a node is lost and the job shrinks to 2 (as in the elastic shrink
    scenario). The node comes back, is lost again 3 s later and back 2 s after that: no grow-back
    within a window of its first return. A window after its last return, at the step after a
    checkpoint save (spec.progress), the job grows back to 3 workers: a conversion, not counted,
    and the steps the grown gang trains again have the loss the 2-worker gang had (within
    LOSS_TOLERANCE, relative)."""
    name = "grow"
    config = trainer_config(data_parallel=3, batch_size=12, step_delay_seconds=STEP_SECONDS, epochs=40)
    manifest = trainingjob(
        name,
        shared,
        config,
        replicas=3,
        elastic={"minReplicas": 2, "growBackAfterSeconds": WINDOW},
        recovery={"nodeLossGraceSeconds": GRACE},
        progress={"startupSeconds": 120, "stallSeconds": 60, "checkpointSaveSeconds": 60},
    )
    one_worker_per_node(manifest, name)
    jobs.create(manifest)
    wait_running(jobs, wait_for, name, 1, 60)
    wait_for(lambda: complete_steps(shared, 3), 60, "a checkpoint on every rank")
    third = next(p for p in jobs.workers(name, 1) if p["metadata"]["name"] == f"{name}-1-2")
    node = third["spec"]["nodeName"]
    node_agent.lose_node(node)
    shrunk = wait_for(
        lambda: jobs.all_running(name) and (s := jobs.status(name)).get("workers") == 2 and s,
        GRACE * 2 + 60,
        lambda: f"the job shrunk to 2 running workers:\n{jobs.describe(name)}",
    )
    assert shrunk["recoveries"][-1]["reason"] == "Shrink" and shrunk["lastResize"]["reason"] == "Shrink"
    restarts = shrunk.get("restarts", 0)

    # The node returns, then flaps inside the window.
    node_agent.restore_node(node)
    first_return = time.time()
    time.sleep(3)
    node_agent.lose_node(node)
    time.sleep(2)
    node_agent.restore_node(node)
    last_return = time.time()
    # Past the window of the first return, short of the window of the last: no grow-back.
    time.sleep(max(0.0, first_return + WINDOW + 1 - time.time()))
    assert time.time() < last_return + WINDOW - 1
    status = jobs.status(name)
    assert not grow_backs(status), status
    assert status["workers"] == 2

    # A window after the last return plus a checkpoint interval, the grow-back starts.
    interval = SAVE_EVERY * STEP_SECONDS
    wait_for(
        lambda: grow_backs(jobs.status(name)),
        WINDOW + 2 * interval + 10,
        lambda: f"a GrowBack recovery:\n{jobs.describe(name)}",
    )
    status = wait_for(
        lambda: jobs.all_running(name) and (s := jobs.status(name)).get("workers") == 3 and s,
        90,
        lambda: f"the job grown back to 3 running workers:\n{jobs.describe(name)}",
    )
    (entry,) = grow_backs(status)
    detected = parse_time(entry["detectedAt"])
    assert detected is not None
    assert last_return + WINDOW - 1 <= detected <= last_return + WINDOW + 2 * interval + 5, entry
    assert entry["converted"] is True and entry["counted"] is False, entry
    assert "follows the checkpoint save of step" in entry["message"], entry
    assert "GrowBack" in CONTROLLED_REASONS
    assert status.get("restarts", 0) == restarts  # not a failure
    assert status["worldSize"] == 3 and status["replicasRequested"] == 3
    assert status["lastResize"]["reason"] == "GrowBack" and status["lastResize"]["toWorkers"] == 3
    assert {p["spec"]["nodeName"] for p in jobs.workers(name, status["attempt"])} >= {node}

    # Training continues from the checkpoint: the grown gang repeats the steps after it with the
    # same loss, then goes on.
    grown = status["attempt"]
    wait_for(
        lambda: sum(1 for e in all_losses(shared) if e["attempt"] == grown) >= SAVE_EVERY,
        60,
        "the grown gang training",
    )
    losses = all_losses(shared)
    before = {e["global_step"]: e["loss"] for e in losses if e["attempt"] < grown}
    after = {e["global_step"]: e["loss"] for e in losses if e["attempt"] == grown}
    assert all(e["world"] == 3 for e in losses if e["attempt"] == grown)
    first = min(after)
    assert (first - 1) % SAVE_EVERY == 0, f"the grown gang resumed after step {first - 1}, not a saved step"
    assert first - 1 in before, "it resumed from a step the 2-worker gang had reached"
    repeated = sorted(set(before) & set(after))
    assert repeated, f"no step trained by both gangs: before up to {max(before)}, after from {first}"
    for step in repeated:
        assert abs(after[step] - before[step]) <= LOSS_TOLERANCE * abs(before[step]), (
            step,
            before[step],
            after[step],
        )
