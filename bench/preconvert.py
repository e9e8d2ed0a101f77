"""Shrink recovery with and without a ready pre-conversion, against a plain same-size restart.

    python bench/preconvert.py [--kubeconfig PATH] [--trials 3] [--grace 10] [--width 1024] [--hidden 4096]

Without ``--kubeconfig`` (or ``$RELAUNCH_TEST_KUBECONFIG``) a cluster is started in a temporary
directory and stopped at the end. One elastic TrainingJob of 3 demo-trainer workers, one per
node (minReplicas 2, grow-back after 3 s, spec.progress on), with a model made large enough
(``--width``, ``--hidden``) that its checkpoint is worth converting; the size is printed. In one run:

* baseline: a worker is killed (``kill_pod``), and the same-size restart is timed (the recovery's
  own ``seconds.total``: Stopping + Planning + Starting);
* with pre-conversion (spec.elastic.preconvert on): once a newest complete step that no earlier
  trial resumed from is pre-converted, a node is powered off (``lose_node``); the gang fails,
  cannot be placed on 3 nodes and shrinks to 2; the Shrink recovery's ``seconds.total`` is timed (it must say
  ``preconverted`` and run no conversion Job), and so is the whole way from the node loss to
  every worker running. The node comes back and the job grows back to 3 before the next trial;
* without: the same after ``spec.elastic.preconvert.enabled`` is set to false, each time from a
  step saved after the last trial (so that no earlier conversion matches): the Shrink recovery
  converts on its path.

Figures: medians, and the ratios of each shrink to the plain restart. Goal: a shrink with a
ready pre-conversion within 2x the plain restart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recovery import end_session, start_session, summarize, trial, wait
from e2e.test_grow_back import one_worker_per_node
from e2e.test_recovery import (
    Jobs,
    complete_steps,
    newest_global_step,
    trainer_config,
    trainingjob,
)

JOB = "bench"
SAVE_EVERY = 10  # steps between checkpoint saves
STEP_SECONDS = 0.3


def step_bytes(shared: Path, ranks: int) -> int:
    """Bytes of the newest complete step on disk, all ranks together."""
    epoch, step = complete_steps(shared, ranks)[-1]
    root = shared / "output" / "checkpoint"
    return sum(
        f.stat().st_size
        for r in range(ranks)
        for f in (root / f"rank_{r}").glob(f"*-{epoch}_{step}.safetensors")
    )


def between_saves(shared: Path) -> bool:
    """At least a few steps before the next save: a node lost now loses no newer checkpoint."""
    return 2 <= newest_global_step(shared) % SAVE_EVERY <= SAVE_EVERY - 5


def resumed_steps(jobs: Jobs) -> set[tuple[int, int]]:
    """(epoch, step) every recovery so far resumed from: each trial uses a step saved after them,
    so that no trial finds a conversion an earlier one made."""
    return {
        (r["fromEpoch"], r["fromStep"])
        for r in jobs.status(JOB).get("recoveries") or []
        if r.get("fromStep") is not None and r.get("fromEpoch") is not None
    }


def wait_ready_pre_conversion(jobs: Jobs, shared: Path) -> tuple[int, int]:
    used = resumed_steps(jobs)

    def ready() -> tuple[int, int] | None:
        state = jobs.status(JOB).get("preconversion") or {}
        steps = complete_steps(shared, 3)
        if not steps or steps[-1] in used or state.get("state") != "Ready":
            return None
        if (state.get("epoch"), state.get("step")) != steps[-1]:
            return None
        return steps[-1] if between_saves(shared) else None

    found: tuple[int, int] = wait(ready, 300, "a ready pre-conversion of a new newest step", 0.1)
    return found


def wait_unconverted_step(jobs: Jobs, shared: Path) -> tuple[int, int]:
    used = resumed_steps(jobs)

    def fresh() -> tuple[int, int] | None:
        steps = complete_steps(shared, 3)
        converted = {(p.get("epoch"), p.get("step")) for p in jobs.status(JOB).get("preconverted") or []}
        if not steps or steps[-1] in used | converted or not between_saves(shared):
            return None
        return steps[-1]

    found: tuple[int, int] = wait(fresh, 300, "a new newest step that is not pre-converted", 0.1)
    return found


def shrink_trial(jobs: Jobs, agent: Any, api: Any, grace: int, expect_preconverted: bool) -> dict[str, float]:
    status = jobs.status(JOB)
    attempt = status["attempt"]
    node = next(p for p in jobs.workers(JOB, attempt) if p["metadata"]["name"] == f"{JOB}-{attempt}-2")[
        "spec"
    ]["nodeName"]
    start = time.monotonic()
    agent.lose_node(node)
    wait(
        lambda: (
            jobs.all_running(JOB)
            and (s := jobs.status(JOB)).get("workers") == 2
            and s["recoveries"][-1]["reason"] == "Shrink"
        ),
        grace * 2 + 120,
        "the job shrunk to 2 running workers",
        0.05,
    )
    total = time.monotonic() - start
    entry = jobs.status(JOB)["recoveries"][-1]
    if bool(entry.get("preconverted")) != expect_preconverted or entry["converted"] == expect_preconverted:
        raise SystemExit(
            f"the shrink was not what this trial measures (preconverted {expect_preconverted}): {entry}"
        )
    row = {"shrink": float(entry["seconds"]["total"])}
    for stage in ("Stopping", "Planning", "Converting", "Starting"):
        if stage in entry["seconds"]:
            row[stage.lower()] = float(entry["seconds"][stage])
    row["loss->running"] = total
    agent.restore_node(node)
    wait(
        lambda: jobs.all_running(JOB) and jobs.status(JOB).get("workers") == 3,
        180,
        "the job grown back to 3 workers",
        0.2,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("RELAUNCH_TEST_KUBECONFIG"))
    parser.add_argument("--trials", type=int, default=3, help="trials of each kind")
    parser.add_argument(
        "--grace",
        type=int,
        default=10,
        help="spec.recovery.nodeLossGraceSeconds (long enough that a same-size restart on a loaded "
        "machine, whose new workers wait a few seconds for the scheduler, never turns into a shrink)",
    )
    parser.add_argument("--width", type=int, default=1024, help="the demo model's input and output size")
    parser.add_argument("--hidden", type=int, default=4096, help="the demo model's hidden size")
    args = parser.parse_args()

    _cluster, own_dir, agent, api, namespace, jobs, shared, operator = start_session(args.kubeconfig)
    try:
        config = trainer_config(
            data_parallel=3,
            batch_size=12,
            step_delay_seconds=STEP_SECONDS,
            epochs=100000,
            keep_checkpoint_max=2,
            save_checkpoint_steps=SAVE_EVERY,
            input_size=args.width,
            hidden_size=args.hidden,
            output_size=args.width,
            comm_timeout_seconds=30,
        )
        manifest = trainingjob(
            JOB,
            shared,
            config,
            replicas=3,
            elastic={
                "minReplicas": 2,
                "growBackAfterSeconds": 3,
                "preconvert": {"enabled": True, "intervalSeconds": 1},
            },
            # No quarantine: the trials fail the same nodes on purpose, again and again.
            recovery={
                "nodeLossGraceSeconds": args.grace,
                "maxRestarts": 1000,
                "quarantine": {"enabled": False},
            },
            progress={"startupSeconds": 300, "stallSeconds": 120, "checkpointSaveSeconds": 300},
        )
        one_worker_per_node(manifest, JOB)
        jobs.create(manifest)
        wait(lambda: jobs.all_running(JOB), 120, "the first gang running")
        wait(lambda: complete_steps(shared, 3), 180, "a first checkpoint")
        size = step_bytes(shared, 3)

        baseline = []
        for i in range(args.trials):
            wait(lambda: between_saves(shared), 60, "a moment between saves", 0.05)
            row = trial(jobs, lambda a: agent.kill_pod(namespace, f"{JOB}-{a}-0"), 120)
            baseline.append({"restart": float(jobs.status(JOB)["recoveries"][-1]["seconds"]["total"]), **row})
            print(f"plain restart {i + 1}/{args.trials}: {baseline[-1]['restart']:.2f}s", flush=True)
            wait(lambda: jobs.all_running(JOB), 60, "the gang running")

        with_pre = []
        for i in range(args.trials):
            epoch, step = wait_ready_pre_conversion(jobs, shared)
            with_pre.append(shrink_trial(jobs, agent, api, args.grace, True))
            print(
                f"shrink with a ready pre-conversion {i + 1}/{args.trials} (epoch {epoch} step {step}): "
                f"{with_pre[-1]['shrink']:.2f}s",
                flush=True,
            )

        jobs.merge_patch(JOB, {"spec": {"elastic": {"preconvert": {"enabled": False}}}})
        without = []
        for i in range(args.trials):
            epoch, step = wait_unconverted_step(jobs, shared)
            without.append(shrink_trial(jobs, agent, api, args.grace, False))
            print(
                f"shrink converting on the recovery path {i + 1}/{args.trials} (epoch {epoch} step {step}): "
                f"{without[-1]['shrink']:.2f}s",
                flush=True,
            )
    finally:
        end_session(operator, api, namespace, agent, own_dir)

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"checkpoint: {size / 1e6:.1f} MB per step on disk (3 ranks, data parallel: each holds the "
        f"weights and both Adam moments, {size / 3e6:.1f} MB); the conversion writes one copy"
    )
    summarize("plain same-size restart (a worker killed)", baseline)
    summarize("shrink 3 -> 2 with a ready pre-conversion", with_pre)
    summarize("shrink 3 -> 2 converting on the recovery path", without)
    floor = statistics.median(r["restart"] for r in baseline)
    ready = statistics.median(r["shrink"] for r in with_pre)
    slow = statistics.median(r["shrink"] for r in without)
    print(f"\nmedian plain restart {floor:.2f}s")
    print(f"shrink with a ready pre-conversion: {ready:.2f}s = {ready / floor:.2f}x the plain restart")
    print(
        f"shrink converting on its path: {slow:.2f}s = {slow / floor:.2f}x the plain restart "
        f"(+{slow - ready:.2f}s for the conversion Job)"
    )
    ok = ready <= 2 * floor
    print(f"goal shrink with a ready pre-conversion <= 2x the plain restart: {'MET' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
