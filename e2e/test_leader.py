"""One active replica, really: two ``relaunch operator --leader-election`` processes share one
Lease; only its holder acts on TrainingJobs, and when it dies the standby takes over and
finishes what the dead one left (a killed worker's recovery)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.test_recovery import (  # the fixtures are shared with the recovery scenarios
    LOGS,
    Jobs,
    OperatorProcess,
    WaitFor,
    api,  # noqa: F401
    complete_steps,
    free_port,
    jobs,  # noqa: F401
    shared,  # noqa: F401
    trainer_config,
    trainingjob,
    wait_running,
)
from relaunch.controller.kube import Kube
from relaunch.controller.leader import LEASE_SECONDS, RETRY_SECONDS

LEASE = "relaunch-e2e-leader"


@pytest.fixture
def replicas(cluster: Any, namespace: str, api: Kube) -> Iterator[dict[str, OperatorProcess]]:
    procs = {
        name: OperatorProcess(
            Path(cluster.kubeconfig),
            namespace,
            LOGS / "operator" / f"{namespace}-{name}.log",
            metrics_port=free_port(),
            extra_args=(
                "--leader-election",
                "--leader-election-namespace",
                namespace,
                "--leader-election-name",
                LEASE,
            ),
        )
        for name in ("a", "b")
    }
    yield procs
    for proc in procs.values():
        proc.stop()
        print(f"--- operator log ({proc.log_path}) ---\n{proc.log_tail()}")


def holder(api: Kube, namespace: str) -> str | None:
    lease = api.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{LEASE}") or {}
    return (lease.get("spec") or {}).get("holderIdentity")


def identity(proc: OperatorProcess) -> str | None:
    """The identity the replica campaigns as (from its log)."""
    found = re.findall(r"waiting for the leader lease \S+ as (\S+)", proc.log_tail(400))
    return found[-1] if found else None


def acted(proc: OperatorProcess, name: str) -> bool:
    """Whether the replica's log shows a round acting on the job (its steps are logged)."""
    return f"{proc.namespace}/{name} " in proc.log_tail(2000)


def test_only_the_lease_holder_acts_and_the_standby_takes_over_when_it_dies(
    jobs: Jobs,
    replicas: dict[str, OperatorProcess],
    node_agent: Any,
    wait_for: WaitFor,
    shared: Path,
    api: Kube,
) -> None:
    a, b = replicas["a"], replicas["b"]
    a.start()
    wait_for(lambda: identity(a) and holder(api, jobs.namespace) == identity(a), 30, "replica a to lead")
    b.start()
    wait_for(lambda: identity(b), 30, "replica b to campaign")
    jobs.create(trainingjob("ha", shared, trainer_config(step_delay_seconds=0.3)))
    wait_running(jobs, wait_for, "ha", 1, 60)
    wait_for(lambda: complete_steps(shared, 2), 60, "a checkpoint on every rank")
    assert acted(a, "ha") and not acted(b, "ha"), "the standby acted while the leader held the Lease"
    assert holder(api, jobs.namespace) == identity(a)

    # The leader dies without a word, and a worker fails while nobody leads.
    a.kill()
    killed = time.monotonic()
    node_agent.kill_pod(jobs.namespace, "ha-1-0")
    wait_for(
        lambda: holder(api, jobs.namespace) == identity(b),
        LEASE_SECONDS + 3 * RETRY_SECONDS + 5,
        lambda: f"replica b to take the Lease over:\n{b.log_tail()}",
    )
    takeover = time.monotonic() - killed
    print(f"standby took over {takeover:.1f}s after the leader was killed (Lease {LEASE_SECONDS}s)")
    assert takeover <= LEASE_SECONDS + 2 * RETRY_SECONDS + 2
    status = wait_running(jobs, wait_for, "ha", 2, 60)
    assert status["restarts"] == 1
    assert [r["reason"] for r in status["recoveries"]] == ["Created", "WorkerFailed"]
    assert acted(b, "ha")

    # A leader that stops cleanly hands over at once: the Lease is released, not left to expire.
    a.start()
    wait_for(lambda: identity(a) and identity(a) != holder(api, jobs.namespace), 30, "replica a to stand by")
    time.sleep(2 * RETRY_SECONDS)
    assert holder(api, jobs.namespace) == identity(b)
    b.stop()
    stopped = time.monotonic()
    wait_for(
        lambda: holder(api, jobs.namespace) == identity(a), 3 * RETRY_SECONDS + 5, "replica a to lead again"
    )
    print(f"after a clean stop the standby led {time.monotonic() - stopped:.1f}s later")
    assert time.monotonic() - stopped < LEASE_SECONDS
    assert jobs.status("ha")["restarts"] == 1
