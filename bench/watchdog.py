"""The progress watchdog on the testbed: how soon a hang is detected, and what watching costs.

    python bench/watchdog.py [--kubeconfig PATH] [--trials 10] [--stall 4] [--jobs 5] [--window 60]

Without ``--kubeconfig`` (or ``$RELAUNCH_TEST_KUBECONFIG``) a cluster is started in a temporary
directory and stopped at the end. Workers are light: a shell loop printing MindFormers' step
line twice a second, with the time it printed it.

* Detection: a job with ``progress.stallSeconds`` = ``--stall``; each trial stops worker 0's
  processes (SIGSTOP, a real hang: nothing exits) and measures, from the operator's own
  ``detectedAt``, how long after the allowance ran out (the last step line's time + the
  allowance) the NoProgress recovery began. Median and p95 over ``--trials``; goal p95 <= 5 s.
* Cost: API requests at steady state (nothing failing), from the API server's own
  ``apiserver_request_total``, over ``--window`` seconds: with no job (the cluster's own traffic,
  subtracted), with ``--jobs`` jobs without the watchdog, and with as many jobs with it; figures
  per job per minute, the watchdog against its absence in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recovery import end_session, parse_time, percentile, start_session, wait
from e2e.cluster import Cluster
from e2e.test_recovery import trainer_config, trainingjob
from relaunch.controller.kube import Kube

#: A worker that prints MindFormers' step line every half second, with the time it printed it.
STEPPER = (
    "i=0; while true; do i=$((i+1)); "
    'echo "{ Epoch:[  1/  1], step:[$i/1000000], loss: 1.0, per_step_time: 500ms, t: $(date +%s.%N)"; '
    "sleep 0.5; done"
)


def job(name: str, shared: Path, progress: dict[str, Any] | None) -> dict[str, Any]:
    manifest = trainingjob(name, shared, trainer_config(), recovery={"maxRestarts": 1000})
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["sh", "-c", STEPPER]
    if progress is not None:
        manifest["spec"]["progress"] = progress
    return manifest


def api_requests(api: Kube) -> float:
    """Requests the API server has answered so far (its own counter, every verb and resource)."""
    status, text = api.request("GET", "/metrics")
    assert status == 200, text
    total = 0.0
    for line in str(text).splitlines():
        if line.startswith("apiserver_request_total{"):
            total += float(line.rpartition(" ")[2])
    return total


def steady_rate(api: Kube, window: float) -> float:
    """API requests per minute over ``window`` seconds."""
    before = api_requests(api)
    time.sleep(window)
    return (api_requests(api) - before) * 60.0 / window


def last_step_time(cluster: Cluster, namespace: str, pod: str) -> float:
    times = re.findall(r"t: (\d+\.\d+)", cluster.pod_log(namespace, pod))
    if not times:
        raise SystemExit(f"no step line in the log of {pod}")
    return float(times[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("RELAUNCH_TEST_KUBECONFIG"))
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--stall", type=int, default=4, help="spec.progress.stallSeconds")
    parser.add_argument("--jobs", type=int, default=5, help="jobs in each cost phase")
    parser.add_argument("--window", type=float, default=60.0, help="seconds of each cost phase")
    args = parser.parse_args()

    cluster, own_dir, agent, api, namespace, jobs, shared, operator = start_session(args.kubeconfig)
    progress = {"startupSeconds": 60, "stallSeconds": args.stall, "checkpointSaveSeconds": args.stall}
    latencies: list[float] = []
    try:
        jobs.create(job("hang", shared, progress))
        for i in range(args.trials):
            wait(lambda: jobs.all_running("hang"), 90, "the gang running")
            attempt = jobs.status("hang")["attempt"]
            pod = f"hang-{attempt}-0"
            wait(lambda p=pod: "step:[3/" in cluster.pod_log(namespace, p), 30, f"steps in {pod}'s log")
            agent.pause_pod(namespace, pod)
            status = wait(
                lambda a=attempt: (s := jobs.status("hang")).get("lastPlannedAttempt", 0) > a and s,
                args.stall + 60,
                "the NoProgress recovery",
            )
            entry = status.get("recovery") or status["recoveries"][-1]
            detected = parse_time(entry["detectedAt"])
            assert status["lastFailure"]["reason"] == "NoProgress", status["lastFailure"]
            latency = detected - (last_step_time(cluster, namespace, pod) + args.stall)
            latencies.append(latency)
            print(f"hang {i + 1}/{args.trials}: detected {latency:.2f}s after the {args.stall}s allowance")
        api.delete(f"/apis/relaunch.dev/v1alpha1/namespaces/{namespace}/trainingjobs/hang")
        wait(lambda: not jobs.pods("hang"), 60, "the hang job's pods gone")

        idle = steady_rate(api, args.window)
        print(f"cluster alone: {idle:.0f} requests/min")
        rates = {}
        for label, watched in (("watchdog off", None), ("watchdog on", progress | {"stallSeconds": 300})):
            names = [f"{'on' if watched else 'off'}-{n}" for n in range(args.jobs)]
            for name in names:
                jobs.create(job(name, shared, watched))
            for name in names:
                wait(lambda n=name: jobs.all_running(n), 120, f"{name} running")
            time.sleep(5)  # settle: the last starts' status writes
            rates[label] = (steady_rate(api, args.window) - idle) / args.jobs
            print(f"{label}: {rates[label]:.1f} requests per job per minute above the cluster's own")
            for name in names:
                api.delete(f"/apis/relaunch.dev/v1alpha1/namespaces/{namespace}/trainingjobs/{name}")
            wait(lambda: not api.list(f"/api/v1/namespaces/{namespace}/pods"), 120, "the jobs' pods gone")
    finally:
        end_session(operator, api, namespace, agent, own_dir)

    med, p95 = statistics.median(latencies), percentile(latencies, 0.95)
    print(f"\ndetection past the allowance ({len(latencies)} hangs): median {med:.2f}s, p95 {p95:.2f}s")
    print(
        f"steady-state API cost per job per minute: watchdog on {rates['watchdog on']:.1f}, "
        f"off {rates['watchdog off']:.1f} (difference {rates['watchdog on'] - rates['watchdog off']:+.1f})"
    )
    ok = p95 <= 5.0
    print(f"goal p95 <= 5 s: {p95:.2f}s {'MET' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
