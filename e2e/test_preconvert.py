"""Conversion ahead of need on the local cluster (spec.elastic.preconvert): a shrink after a node
loss resumes from the step converted while the job trained, with no conversion Job in that
recovery; a pre-conversion killed halfway is never used (the shrink converts on its own path)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from e2e.test_grow_back import one_worker_per_node
from e2e.test_recovery import (  # the fixtures are shared with the recovery scenarios
    Jobs,
    OperatorProcess,
    WaitFor,
    all_losses,
    api,  # noqa: F401
    complete_steps,
    jobs,  # noqa: F401
    newest_global_step,
    operator,  # noqa: F401
    shared,  # noqa: F401
    trainer_config,
    trainingjob,
    wait_running,
)
from relaunch.convert import is_complete

GRACE = 4  # spec.recovery.nodeLossGraceSeconds
STEP_SECONDS = 0.5
SAVE_EVERY = 20  # save_checkpoint_steps: a save every 10 s, room to lose a node between two


def elastic_job(jobs: Jobs, wait_for: WaitFor, shared: Path, name: str, **preconvert: Any) -> None:
    """3 workers, one per node, elastic down to 2, pre-conversion on (spec.progress tells it
    when a save finished)."""
    config = trainer_config(
        data_parallel=3,
        batch_size=12,
        step_delay_seconds=STEP_SECONDS,
        epochs=40,
        save_checkpoint_steps=SAVE_EVERY,
    )
    manifest = trainingjob(
        name,
        shared,
        config,
        replicas=3,
        elastic={"minReplicas": 2, "preconvert": {"enabled": True, "intervalSeconds": 1, **preconvert}},
        recovery={"nodeLossGraceSeconds": GRACE},
        progress={"startupSeconds": 120, "stallSeconds": 60, "checkpointSaveSeconds": 60},
    )
    one_worker_per_node(manifest, name)
    jobs.create(manifest)
    wait_running(jobs, wait_for, name, 1, 60)


def lose_third_workers_node(jobs: Jobs, node_agent: Any, name: str) -> str:
    third = next(p for p in jobs.workers(name, 1) if p["metadata"]["name"] == f"{name}-1-2")
    node: str = third["spec"]["nodeName"]
    node_agent.lose_node(node)
    return node


def wait_shrunk(jobs: Jobs, wait_for: WaitFor, name: str) -> dict[str, Any]:
    status: dict[str, Any] = wait_for(
        lambda: jobs.all_running(name) and (s := jobs.status(name)).get("workers") == 2 and s,
        GRACE * 2 + 90,
        lambda: f"the job shrunk to 2 running workers:\n{jobs.describe(name)}",
    )
    assert status["recoveries"][-1]["reason"] == "Shrink", status["recoveries"]
    return status


def conversion_jobs(jobs: Jobs, name: str, attempt: int) -> list[str]:
    return [
        j["metadata"]["name"]
        for j in jobs.jobs(name)
        if re.fullmatch(rf"{name}-convert-{attempt}(-\d+)?", j["metadata"]["name"])
    ]


def test_a_shrink_resumes_from_the_pre_converted_step_without_a_conversion_job(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    name = "preconv"
    elastic_job(jobs, wait_for, shared, name)

    # The newest complete step is pre-converted and the next save is a few steps away: lose a node.
    def ready_between_saves() -> tuple[int, int] | None:
        state = jobs.status(name).get("preconversion") or {}
        steps = complete_steps(shared, 3)
        if state.get("state") != "Ready" or not steps or (state.get("epoch"), state.get("step")) != steps[-1]:
            return None
        if newest_global_step(shared) % SAVE_EVERY > SAVE_EVERY - 8:
            return None  # too close to the next save
        return steps[-1]

    epoch, step = wait_for(ready_between_saves, 90, lambda: f"a ready pre-conversion:\n{jobs.describe(name)}")
    lose_third_workers_node(jobs, node_agent, name)
    preconverted = jobs.status(name)["preconverted"]
    assert (preconverted[0]["step"], preconverted[0]["epoch"], preconverted[0]["workers"]) == (step, epoch, 2)
    destination = preconverted[0]["destination"]

    status = wait_shrunk(jobs, wait_for, name)
    entry = status["recoveries"][-1]
    assert entry["fromStep"] == step and entry["fromEpoch"] == epoch, (entry, step)
    assert entry["preconverted"] is True and entry["converted"] is False, entry
    assert entry["seconds"].get("Converting") is None, entry
    assert conversion_jobs(jobs, name, entry["attempt"]) == []
    assert destination in status["lastConversion"]
    # The shrunk gang trains on from there.
    attempt = status["attempt"]
    wait_for(
        lambda: sum(1 for e in all_losses(shared) if e["attempt"] == attempt) >= 3,
        60,
        "the shrunk gang training",
    )
    assert all(e["world"] == 2 for e in all_losses(shared) if e["attempt"] == attempt)


def test_a_pre_conversion_killed_halfway_is_never_used(
    jobs: Jobs,
    operator: OperatorProcess,
    node_agent: Any,
    wait_for: WaitFor,
    shared: Path,
    namespace: str,
) -> None:
    name = "prekill"
    # A bounded write rate makes the tiny checkpoint's conversion take several seconds.
    elastic_job(jobs, wait_for, shared, name, maxWriteBytesPerSecond=300)
    root = shared / "output" / "relaunch"

    def staging() -> Path | None:
        found = sorted(root.glob("unified-*.staging-*")) if root.is_dir() else []
        return found[0] if found else None

    half = wait_for(staging, 90, lambda: f"a pre-conversion writing:\n{jobs.describe(name)}")
    match = re.search(r"-e(\d+)-s(\d+)\.staging-", half.name)
    assert match, half
    epoch, step = int(match.group(1)), int(match.group(2))
    destination = root / half.name.split(".staging-")[0]
    pod = next(
        p["metadata"]["name"]
        for p in jobs.pods(name)
        if (p["metadata"].get("labels") or {}).get("relaunch.dev/purpose") == "preconvert"
        and p["status"].get("phase") == "Running"
    )
    node_agent.kill_pod(namespace, pod)
    assert not destination.exists() and is_complete(destination) is None
    lose_third_workers_node(jobs, node_agent, name)
    started = time.time()

    status = wait_shrunk(jobs, wait_for, name)
    entry = status["recoveries"][-1]
    assert (entry["fromEpoch"], entry["fromStep"]) == (epoch, step), (entry, half)
    assert entry["converted"] is True and "preconverted" not in entry, entry
    assert conversion_jobs(jobs, name, entry["attempt"]), jobs.describe(name)
    assert is_complete(destination) is not None  # converted on the recovery path, published whole
    assert not list(root.glob(f"{destination.name}.staging-*"))  # the killed one's leftovers went
    assert all((p.get("epoch"), p.get("step")) != (epoch, step) for p in status.get("preconverted") or [])
    assert time.time() - started < GRACE * 2 + 90
