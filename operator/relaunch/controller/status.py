"""The TrainingJob's status as typed values: every field the state machine reads or writes,
declared once, with its type.

The status travels as JSON (the API server stores it, the loops read it back after a restart), so
these are ``TypedDict`` s: plain dicts at run time, checked by mypy wherever the state machine
touches them, so a misspelt field or a value of the wrong type is an error before it is a bug.
``tests/test_status.py`` holds them equal to the CRD's status schema, field for field, so the
type, the schema the API server enforces and the README's status table cannot drift apart.
All fields are optional (``total=False``): a new job has an empty status, and fields come and go
as the job moves through its phases.
"""

from __future__ import annotations

from typing import Any, TypedDict


class Condition(TypedDict, total=False):
    type: str
    status: str
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: int | None


class CheckpointRef(TypedDict, total=False):
    """The checkpoint the current attempt resumed from."""

    step: int
    epoch: int | None
    file: str
    ranks: int
    kind: str


class LastFailure(TypedDict, total=False):
    reason: str
    message: str
    pod: str | None
    node: str | None
    exitCode: int | None
    at: str


class Progress(TypedDict, total=False):
    """The newest training step worker 0 printed (spec.progress)."""

    attempt: int
    step: int
    epoch: int | None
    globalStep: int | None
    at: str


class LastResize(TypedDict, total=False):
    reason: str
    at: str
    fromWorkers: int
    toWorkers: int
    schedulableNodes: int


class QuarantinedNode(TypedDict, total=False):
    node: str
    until: str
    reason: str


class NodeFailure(TypedDict, total=False):
    node: str
    at: str


class Recovery(TypedDict, total=False):
    """The recovery in progress."""

    attempt: int
    reason: str
    message: str
    stage: str
    counted: bool
    detectedAt: str | None
    stageStartedAt: str
    notBefore: str | None
    replicas: int
    requested: int
    fromWorldSize: int
    planJob: str
    helperTries: int
    helperRetryAt: str | None
    convertJob: str
    plan: str
    seconds: dict[str, float]


class RecoveryRecord(TypedDict, total=False):
    """One finished (or superseded) recovery, newest last in ``status.recoveries``."""

    attempt: int
    reason: str
    message: str
    detectedAt: str | None
    restartedAt: str
    supersededBy: str
    fromStep: int
    fromEpoch: int | None
    converted: bool
    preconverted: bool
    counted: bool
    seconds: dict[str, float]


class Preconversion(TypedDict, total=False):
    """The newest conversion ahead of need (spec.elastic.preconvert) and its state."""

    run: int
    job: str
    attempt: int
    targetWorkers: int
    state: str
    step: int | None
    epoch: int | None
    savedStep: int | None
    message: str
    startedAt: str
    finishedAt: str | None


class Preconverted(TypedDict, total=False):
    """A conversion made ahead of need that is ready on disk."""

    step: int
    epoch: int | None
    workers: int
    worldSize: int
    destination: str
    bytes: int


class JobStatus(TypedDict, total=False):
    phase: str
    message: str
    workers: int
    replicasRequested: int
    worldSize: int
    readyWorkers: int
    restarts: int
    attempt: int
    observedGeneration: int
    lastPlannedAttempt: int
    finishedGeneration: int | None
    configHash: str
    lastConversion: str
    checkpoint: CheckpointRef | None
    lastFailure: LastFailure
    progress: Progress
    lastResize: LastResize
    quarantinedNodes: list[QuarantinedNode]
    nodeFailures: list[NodeFailure]
    restartTimes: list[str]
    runningSince: str | None
    recovery: Recovery | None
    recoveries: list[RecoveryRecord]
    conditions: list[Condition]
    preconversion: Preconversion
    preconverted: list[Preconverted]


def as_status(value: Any) -> JobStatus:
    """A status read from the API (a JSON object) as the type the state machine works on."""
    return JobStatus(**dict(value or {}))
