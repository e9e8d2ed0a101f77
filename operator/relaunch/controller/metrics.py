"""Prometheus metrics of the operator (served by :func:`serve` on the metrics port)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

RECOVERIES = Counter(
    "relaunch_recoveries_total", "Recoveries completed (the gang running again), by reason.", ["reason"]
)
RECOVERY_SECONDS = Histogram(
    "relaunch_recovery_seconds",
    "Seconds from detecting a failure (or a controlled restart) to every worker running, by stage "
    "(Stopping, Planning, Converting, Starting, total).",
    ["stage"],
    buckets=_STAGE_BUCKETS,
)
RESTARTS = Gauge("relaunch_restarts", "Restarts caused by failures.", ["namespace", "trainingjob"])
CHECKPOINT_STEP = Gauge(
    "relaunch_checkpoint_step",
    "Step of the checkpoint the current attempt resumed from (-1: fresh start).",
    ["namespace", "trainingjob"],
)
FAILED = Gauge(
    "relaunch_trainingjob_failed", "1 when the TrainingJob is Failed.", ["namespace", "trainingjob"]
)
API_ERRORS = Counter(
    "relaunch_api_errors_total",
    "API requests the server answered with an error (4xx, 5xx), by verb, resource and HTTP code.",
    ["verb", "resource", "code"],
)
RECONCILE_SECONDS = Histogram(
    "relaunch_reconcile_seconds",
    "Seconds one reconcile round of a TrainingJob took (observe, decide, act, write status).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CONVERSION_BYTES = Counter("relaunch_conversion_bytes_total", "Bytes written by conversion Jobs.")
CONVERSION_SECONDS = Histogram(
    "relaunch_conversion_seconds", "Seconds conversion Jobs took (as they report).", buckets=_STAGE_BUCKETS
)


def serve(port: int) -> None:
    start_http_server(port)


def record_round(
    namespace: str,
    name: str,
    status: Mapping[str, Any],
    completed: Mapping[str, Any] | None,
    conversion_report: str | None,
) -> None:
    RESTARTS.labels(namespace, name).set(int(status.get("restarts") or 0))
    step = (status.get("checkpoint") or {}).get("step")
    CHECKPOINT_STEP.labels(namespace, name).set(step if isinstance(step, int) else -1)
    FAILED.labels(namespace, name).set(1 if status.get("phase") == "Failed" else 0)
    if completed is not None:
        RECOVERIES.labels(str(completed.get("reason"))).inc()
        for stage, seconds in (completed.get("seconds") or {}).items():
            if isinstance(seconds, int | float):
                RECOVERY_SECONDS.labels(stage).observe(seconds)
    if conversion_report:
        try:
            report = json.loads(conversion_report)
        except ValueError:
            return
        if isinstance(report, dict):
            if isinstance(report.get("bytes"), int | float):
                CONVERSION_BYTES.inc(report["bytes"])
            if isinstance(report.get("seconds"), int | float):
                CONVERSION_SECONDS.observe(report["seconds"])


def api_error(verb: str, resource: str, code: int) -> None:
    API_ERRORS.labels(verb.lower(), resource, str(code)).inc()


def forget(namespace: str, name: str) -> None:
    """Drop the per-job series of a deleted TrainingJob."""
    for gauge in (RESTARTS, CHECKPOINT_STEP, FAILED):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
