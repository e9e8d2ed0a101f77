"""The recovery scenarios end to end: a real operator, real TrainingJobs, the demo trainer.

Each test runs ``relaunch operator`` (as a subprocess, with the admin kubeconfig, watching only
the test's namespace) against the testbed, creates a TrainingJob whose workers run
``python -m examples.trainer`` on a hostPath "shared volume" in the test's tmp dir, injures it
the way the scenario says, and checks what the operator did (status, Events, pods) and what the
trainer did (its checkpoints and loss curve).

The helpers at the top (``OperatorProcess``, ``trainer_config``, ``trainingjob``, ...) are also
used by ``e2e/test_crd.py`` and ``bench/recovery.py``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relaunch.controller.kube import Kube, collection_path, trainingjob_path
from relaunch.controller.reconcile import CONTROLLED_REASONS

REPO_ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = REPO_ROOT / "crds" / "trainingjob.yaml"
TRAINER_CONFIG = REPO_ROOT / "examples" / "trainer" / "train.yaml"
LOGS = REPO_ROOT / ".e2e-logs"

# ----------------------------------------------------------------------------------------------
# Helpers (shared with e2e/test_crd.py and bench/recovery.py)


def install_crd(kube: Kube) -> None:
    """Create or update the CRD from crds/, then wait until the API serves it."""
    crd = yaml.safe_load(CRD_PATH.read_text())
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    if not kube.create(path, crd):
        current = kube.get(f"{path}/{crd['metadata']['name']}")
        crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        status, payload = kube.request("PUT", f"{path}/{crd['metadata']['name']}", body=crd)
        assert status == 200, payload
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = kube.get(f"{path}/{crd['metadata']['name']}") or {}
        conditions = {c["type"]: c["status"] for c in (current.get("status") or {}).get("conditions") or []}
        if conditions.get("Established") == "True":
            # Discovery may lag the condition by a moment.
            status, _ = kube.request("GET", "/apis/relaunch.dev/v1alpha1/trainingjobs")
            if status == 200:
                return
        time.sleep(0.2)
    raise AssertionError("the TrainingJob CRD did not become Established within 30 s")


class OperatorProcess:
    """``relaunch operator`` in a subprocess, restricted to one namespace, logging to a file."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log_path: Path,
        metrics_port: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.kubeconfig = kubeconfig
        self.extra_args = extra_args
        self.metrics_port = metrics_port
        self.namespace = namespace
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONWARNINGS": "ignore",
            "RELAUNCH_IMAGE": "relaunch:e2e",
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        log.write(f"--- operator start {self.starts + 1} at {time.strftime('%H:%M:%S')} ---\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relaunch.cli",
                "operator",
                "--namespace",
                self.namespace,
                "--metrics-port",
                str(self.metrics_port),
                *self.extra_args,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        log.close()
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to clean up, as in a node crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no operator log)"


def _set_scalar(text: str, key: str, value: Any) -> str:
    """Set ``key: value`` on the first line holding that key, keeping an anchor and the comment."""
    rendered = json.dumps(value) if not isinstance(value, str) else f"'{value}'"
    pattern = re.compile(rf"^(\s*{re.escape(key)}:\s*(?:&\w+\s+)?)([^#\n]*?)(\s*#.*)?$", re.MULTILINE)
    new, count = pattern.subn(lambda m: f"{m.group(1)}{rendered}{m.group(3) or ''}", text, count=1)
    if count == 0:
        new = text.rstrip("\n") + f"\n{key}: {rendered}\n"
    return new


def trainer_config(**changes: Any) -> str:
    """The demo trainer's sample config, writing to /shared/output, with ``changes`` applied."""
    text = TRAINER_CONFIG.read_text()
    defaults: dict[str, Any] = {
        "output_dir": "/shared/output",
        "step_delay_seconds": 0.3,
        "data_parallel": 2,
        "model_parallel": 1,
        "connect_timeout_seconds": 60,
        "comm_timeout_seconds": 20,
    }
    for key, value in {**defaults, **changes}.items():
        text = _set_scalar(text, key, value)
    return text


def trainingjob(name: str, shared: Path, config: str, *, replicas: int = 2, **spec: Any) -> dict[str, Any]:
    """A TrainingJob running the demo trainer on the hostPath folder ``shared`` (mounted at /shared)."""
    body: dict[str, Any] = {
        "replicas": replicas,
        "template": {
            "spec": {
                "terminationGracePeriodSeconds": 5,
                "containers": [
                    {
                        "name": "trainer",
                        "image": "relaunch-demo-trainer",
                        "workingDir": str(REPO_ROOT),
                        "command": ["python", "-m", "examples.trainer"],
                        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
                        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                    }
                ],
                "volumes": [
                    {"name": "shared", "hostPath": {"path": str(shared), "type": "DirectoryOrCreate"}}
                ],
            }
        },
        "checkpoint": {"dir": "/shared/output/checkpoint", "strategyDir": "/shared/output/strategy"},
        "config": {"text": config},
        "recovery": {"backoff": {"initialSeconds": 0}, "nodeLossGraceSeconds": 10},
    }
    for key, value in spec.items():
        body[key] = (
            {**body[key], **value} if isinstance(body.get(key), dict) and isinstance(value, dict) else value
        )
    return {
        "apiVersion": "relaunch.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": body,
    }


class Jobs:
    """TrainingJobs, pods and Events of one namespace, through the admin's REST client."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace

    def create(self, manifest: dict[str, Any]) -> None:
        status, payload = self.kube.request("POST", trainingjob_path(self.namespace), body=manifest)
        assert status == 201, payload

    def get(self, name: str) -> dict[str, Any]:
        return self.kube.get(trainingjob_path(self.namespace, name)) or {}

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def merge_patch(self, name: str, patch: dict[str, Any]) -> None:
        self.kube.merge_patch(trainingjob_path(self.namespace, name), patch)

    def pods(self, name: str) -> list[dict[str, Any]]:
        return self.kube.list(collection_path("Pod", self.namespace), f"relaunch.dev/job={name}")

    def workers(self, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
        selector = f"relaunch.dev/job={name},relaunch.dev/role=worker"
        if attempt is not None:
            selector += f",relaunch.dev/attempt={attempt}"
        return self.kube.list(collection_path("Pod", self.namespace), selector)

    def jobs(self, name: str) -> list[dict[str, Any]]:
        return self.kube.list(collection_path("Job", self.namespace), f"relaunch.dev/job={name}")

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.kube.list(collection_path("Event", self.namespace))
        mine = [
            e
            for e in items
            if (e.get("involvedObject") or {}).get("kind") == "TrainingJob"
            and (e.get("involvedObject") or {}).get("name") == name
        ]
        return sorted(mine, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def describe(self, name: str) -> str:
        status = self.status(name)
        pods = [
            f"{p['metadata']['name']}={p.get('status', {}).get('phase')}"
            + ("(deleting)" if p["metadata"].get("deletionTimestamp") else "")
            for p in self.pods(name)
        ]
        events = [f"{e.get('reason')}: {e.get('message')}" for e in self.events(name)]
        return json.dumps({"status": status, "pods": pods, "events": events[-12:]}, indent=1, default=str)

    def all_running(self, name: str) -> bool:
        status = self.status(name)
        attempt = status.get("attempt")
        if status.get("phase") != "Running" or not attempt:
            return False
        pods = self.workers(name, attempt)
        return len(pods) == status.get("workers") and all(p["status"].get("phase") == "Running" for p in pods)


def loss_curve(shared: Path) -> dict[int, dict[str, Any]]:
    """The trainer's loss per global step, the last line winning (a resumed run repeats steps)."""
    curve: dict[int, dict[str, Any]] = {}
    path = shared / "output" / "loss.jsonl"
    if not path.exists():
        return curve
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            curve[int(entry["global_step"])] = entry
    return curve


def newest_global_step(shared: Path) -> int:
    curve = loss_curve(shared)
    return max(curve) if curve else 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_trainer_locally(directory: Path, config: str, world: int, timeout: float = 120) -> None:
    """Run the demo trainer with ``world`` ranks as local processes (the reference run)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = _set_scalar(config, "output_dir", str(directory / "output"))
    config = _set_scalar(config, "step_delay_seconds", 0)
    config_path = directory / "train.yaml"
    config_path.write_text(config)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK_ID": str(rank),
            "RANK_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RELAUNCH_CONFIG": str(config_path),
        }
        log = (directory / f"rank{rank}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "examples.trainer"],
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    codes = [p.wait(timeout) for p in procs]
    assert codes == [0] * world, f"reference run failed: {codes}; logs in {directory}"


def complete_steps(shared: Path, ranks: int) -> list[tuple[int, int]]:
    """(epoch, step) of the checkpoint files present on every rank (by name only)."""
    per_rank = []
    for rank in range(ranks):
        folder = shared / "output" / "checkpoint" / f"rank_{rank}"
        names = {
            (int(m.group(1)), int(m.group(2)))
            for f in (folder.iterdir() if folder.is_dir() else [])
            if (m := re.search(r"-(\d+)_(\d+)\.safetensors$", f.name))
        }
        per_rank.append(names)
    return sorted(set.intersection(*per_rank)) if per_rank else []


def events_with(jobs: Jobs, wait_for: Any, name: str, *reasons: str) -> list[dict[str, Any]]:
    """The job's Events once every one of ``reasons`` is among them (Events are posted
    asynchronously, after the status write they describe)."""
    return wait_for(
        lambda: (events := jobs.events(name)) and set(reasons) <= {e["reason"] for e in events} and events,
        30,
        lambda: f"Events {reasons} of {name}:\n{jobs.describe(name)}",
    )


def scrape(port: int) -> dict[str, float]:
    """The operator's Prometheus metrics as {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def api(kube: Any) -> Kube:
    client = Kube(kube)
    install_crd(client)
    return client


@pytest.fixture
def jobs(api: Kube, namespace: str) -> Jobs:
    return Jobs(api, namespace)


@pytest.fixture
def operator(cluster: Any, namespace: str, api: Kube) -> Iterator[OperatorProcess]:
    log = LOGS / "operator" / f"{namespace}.log"
    proc = OperatorProcess(Path(cluster.kubeconfig), namespace, log, metrics_port=free_port())
    proc.start()
    yield proc
    # Delete the TrainingJobs while the operator runs, so that none carrying a finalizer (as
    # test_no_finalizer_... makes on purpose) can hold the namespace in Terminating.
    if proc.proc is None or proc.proc.poll() is not None:
        proc.start()
    for job in api.list(trainingjob_path(namespace)):
        api.delete(trainingjob_path(namespace, job["metadata"]["name"]))
    deadline = time.monotonic() + 20
    while api.list(trainingjob_path(namespace)) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.stop()
    # Captured output is shown only when the test failed: then the operator's log tail helps.
    print(f"--- operator log ({proc.log_path}) ---\n{proc.log_tail()}")


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "shared"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The loss curve of an uninterrupted 2-rank run of the same config (local processes)."""
    directory = tmp_path_factory.mktemp("reference")
    run_trainer_locally(directory, trainer_config(), world=2)
    return loss_curve(directory)


WaitFor = Callable[..., Any]


def wait_phase(jobs: Jobs, wait_for: WaitFor, name: str, phase: str, timeout: float) -> dict[str, Any]:
    return wait_for(
        lambda: (s := jobs.status(name)).get("phase") == phase and s,
        timeout,
        lambda: f"TrainingJob {name} to reach {phase}:\n{jobs.describe(name)}",
    )


def wait_running(jobs: Jobs, wait_for: WaitFor, name: str, attempt: int, timeout: float) -> dict[str, Any]:
    return wait_for(
        lambda: jobs.all_running(name) and (s := jobs.status(name)).get("attempt") == attempt and s,
        timeout,
        lambda: f"TrainingJob {name} attempt {attempt} all running:\n{jobs.describe(name)}",
    )


# ----------------------------------------------------------------------------------------------
# Scenarios


def test_fresh_start_then_killed_worker_resumes_from_newest_complete_step(
    jobs: Jobs,
    operator: OperatorProcess,
    node_agent: Any,
    wait_for: WaitFor,
    shared: Path,
    reference_curve: dict,
) -> None:
    """(g) an empty checkpoint directory starts fresh; (a) a worker killed mid-run makes the whole
    gang restart from the newest step complete on every rank, and the loss curve is bit-identical
    to an uninterrupted run."""
    jobs.create(trainingjob("demo", shared, trainer_config()))
    status = wait_running(jobs, wait_for, "demo", 1, 60)
    assert "checkpoint" not in status  # fresh start: nothing to resume
    assert status["recoveries"][-1]["reason"] == "Created"
    planned = [
        e["message"] for e in events_with(jobs, wait_for, "demo", "Planned") if e["reason"] == "Planned"
    ]
    assert planned and "empty" in planned[0], planned

    wait_for(
        lambda: complete_steps(shared, 2) and newest_global_step(shared) >= 12,
        60,
        "a checkpoint on every rank",
    )
    killed_at_step = newest_global_step(shared)
    node_agent.kill_pod(jobs.namespace, "demo-1-1")
    killed = time.monotonic()

    status = wait_running(jobs, wait_for, "demo", 2, 60)
    recovered_in = time.monotonic() - killed
    assert status["restarts"] == 1
    assert status["lastFailure"]["pod"] == "demo-1-1" and status["lastFailure"]["reason"] == "WorkerFailed"
    entry = status["recoveries"][-1]
    assert entry["reason"] == "WorkerFailed" and entry["counted"] is True
    resumed = (status["checkpoint"]["epoch"] - 1) * 10 + status["checkpoint"]["step"]
    # The newest save at or before the kill (every 5 steps), or the one before it when the kill
    # interrupted that save on some rank.
    newest_save = (killed_at_step // 5) * 5
    assert resumed in (newest_save, newest_save - 5) and resumed > 0, (resumed, killed_at_step)
    assert recovered_in < 20, f"recovery took {recovered_in:.1f}s"
    assert all(p["metadata"]["name"].startswith("demo-2-") for p in jobs.workers("demo"))

    wait_phase(jobs, wait_for, "demo", "Succeeded", 90)
    curve = loss_curve(shared)
    assert sorted(curve) == sorted(reference_curve) == list(range(1, 31))
    assert {g: curve[g]["loss_hex"] for g in curve} == {
        g: reference_curve[g]["loss_hex"] for g in reference_curve
    }
    assert min(g for g, e in curve.items() if e["attempt"] == 2) == resumed + 1
    events_with(jobs, wait_for, "demo", "RecoveryStarted", "Planned", "Starting", "Recovered", "Succeeded")
    metrics = scrape(operator.metrics_port)
    labels = f'namespace="{jobs.namespace}",trainingjob="demo"'
    assert metrics['relaunch_recoveries_total{reason="WorkerFailed"}'] == 1.0
    assert metrics[f"relaunch_restarts{{{labels}}}"] == 1.0
    assert metrics[f"relaunch_checkpoint_step{{{labels}}}"] == float(status["checkpoint"]["step"])
    assert metrics['relaunch_recovery_seconds_count{stage="total"}'] == 2.0  # the start and the recovery


def test_truncated_newest_step_is_skipped_and_the_event_says_why(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """(c) the newest step is truncated on one rank: the gang resumes from the step before it."""
    jobs.create(trainingjob("trunc", shared, trainer_config(step_delay_seconds=0.5)))
    wait_running(jobs, wait_for, "trunc", 1, 60)

    def two_complete_steps() -> list[tuple[int, int]] | None:
        steps = complete_steps(shared, 2)
        return steps if len(steps) >= 2 else None

    complete = wait_for(two_complete_steps, 60, "two steps on every rank")
    # Truncate rank 1's file of the newest complete step (a crash mid-write on shared storage)
    # and kill a worker at once, before the trainer saves anything newer.
    (epoch, step), previous = complete[-1], complete[-2]
    victim = next((shared / "output" / "checkpoint" / "rank_1").glob(f"*-{epoch}_{step}.safetensors"))
    size = victim.stat().st_size
    os.chmod(victim, 0o600)
    with victim.open("r+b") as handle:
        handle.truncate(size // 2)
    node_agent.kill_pod(jobs.namespace, "trunc-1-0")

    status = wait_running(jobs, wait_for, "trunc", 2, 60)
    assert (status["checkpoint"]["epoch"], status["checkpoint"]["step"]) == previous
    events = wait_for(
        lambda: (
            (ev := [e["message"] for e in jobs.events("trunc") if e["reason"] == "Planned"])
            and len(ev) >= 2
            and ev
        ),
        30,
        lambda: f"two Planned events:\n{jobs.describe('trunc')}",
    )
    planned = events
    assert f"epoch {previous[0]} step {previous[1]}" in planned[-1], planned
    assert f"epoch {epoch} step {step}" in planned[-1], planned  # the rejected step, named
    assert "rank 1" in planned[-1] and "truncated" in planned[-1], planned


def test_lost_node_restarts_the_gang_elsewhere_within_grace(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """(b) a node powers off under a worker: within the grace period (not Kubernetes' 5 minutes)
    its pods are force-deleted and the gang restarts on the other nodes."""
    grace = 6
    config = trainer_config(step_delay_seconds=0.5, epochs=20)
    jobs.create(trainingjob("lost", shared, config, recovery={"nodeLossGraceSeconds": grace}))
    wait_running(jobs, wait_for, "lost", 1, 60)
    wait_for(lambda: complete_steps(shared, 2), 60, "a checkpoint on every rank")
    victim = next(p for p in jobs.workers("lost", 1) if p["metadata"]["name"] == "lost-1-0")
    node = victim["spec"]["nodeName"]
    node_agent.lose_node(node)
    lost = time.monotonic()

    status = wait_running(jobs, wait_for, "lost", 2, grace + 30)
    took = time.monotonic() - lost
    assert took <= grace + 8, f"restarted {took:.1f}s after the node loss (grace {grace}s)"
    assert status["lastFailure"]["reason"] == "NodeLost" and status["lastFailure"]["node"] == node
    assert all(p["spec"].get("nodeName") != node for p in jobs.workers("lost", 2))
    assert not jobs.workers("lost", 1), "pods of the lost node were not removed"
    assert status["checkpoint"]["step"] > 0


def test_max_restarts_exhausted_fails_with_reason(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path
) -> None:
    """(i) a job that keeps failing is restarted maxRestarts times, then Failed with the reason."""
    # Rank 1 fails at step 3 of every run; no checkpoint is saved before that, so every attempt
    # starts fresh and fails the same way.
    config = trainer_config(
        save_checkpoint_steps=100, step_delay_seconds=0.05, fail_at_global_step=3, fail_rank=1
    )
    jobs.create(trainingjob("doomed", shared, config, recovery={"maxRestarts": 2}))
    status = wait_phase(jobs, wait_for, "doomed", "Failed", 120)
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "MaxRestartsExceeded", failed
    assert "maxRestarts is 2" in failed["message"]
    assert status["restarts"] == 2 and status["attempt"] == 3
    assert [r["reason"] for r in status["recoveries"]] == ["Created", "WorkerFailed", "WorkerFailed"]
    # The surviving rank of the last attempt is stopped, not left hanging.
    wait_for(
        lambda: all(p["status"].get("phase") in ("Failed", "Succeeded") for p in jobs.workers("doomed", 3)),
        30,
        lambda: f"every worker of attempt 3 stopped:\n{jobs.describe('doomed')}",
    )
    events_with(jobs, wait_for, "doomed", "MaxRestartsExceeded")


def test_pinned_step_resumes_it_and_a_missing_rank_fails_clearly(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path, tmp_path: Path
) -> None:
    """(d) ``resume: <file name>`` pins a step; a rank that lacks the file gives a clear Failed reason."""
    # A checkpoint tree of 10 steps (saved at 5 and 10), made by the trainer itself.
    run_trainer_locally(tmp_path / "seed", trainer_config(epochs=1), world=2)
    shutil.copytree(tmp_path / "seed" / "output", shared / "output")
    pinned = "demo_rank_0-1_5.safetensors"
    jobs.create(
        trainingjob("pinned", shared, trainer_config(step_delay_seconds=0.5), checkpoint={"resume": pinned})
    )
    status = wait_running(jobs, wait_for, "pinned", 1, 60)
    assert (status["checkpoint"]["epoch"], status["checkpoint"]["step"]) == (1, 5)

    other = shared.parent / "broken"
    shutil.copytree(tmp_path / "seed" / "output", other / "output")
    missing = other / "output" / "checkpoint" / "rank_1" / "demo_rank_1-1_5.safetensors"
    os.chmod(missing, 0o600)
    missing.unlink()
    jobs.create(trainingjob("pinned-broken", other, trainer_config(), checkpoint={"resume": pinned}))
    status = wait_phase(jobs, wait_for, "pinned-broken", "Failed", 60)
    failed = condition(status, "Failed")
    assert failed["reason"] == "PinnedCheckpointUnavailable", failed
    assert "rank 1" in failed["message"] or "rank_1" in failed["message"], failed["message"]
    assert not jobs.workers("pinned-broken"), "no worker may start when the pinned step is unusable"

    # Pinning a step every rank has (a spec edit) retries the failed job.
    jobs.merge_patch("pinned-broken", {"spec": {"checkpoint": {"resume": "demo_rank_0-1_10.safetensors"}}})
    status = wait_for(
        lambda: (
            (s := jobs.status("pinned-broken")).get("attempt") == 2
            and s.get("phase") in ("Running", "Succeeded")
            and s
        ),
        60,
        lambda: f"the edited job to run:\n{jobs.describe('pinned-broken')}",
    )
    assert (status["checkpoint"]["epoch"], status["checkpoint"]["step"]) == (1, 10)
    assert status["recoveries"][-1]["reason"] == "SpecChanged"
    assert condition(status, "Failed")["status"] == "False"


def test_config_swap_restarts_incrementally_without_counting_a_restart(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path, api: Kube
) -> None:
    """(f) the user swaps the dataset in the config: a controlled restart from the latest
    checkpoint, not a failure; the learning-rate schedule is left alone."""
    config = trainer_config(step_delay_seconds=0.4)
    jobs.create(trainingjob("swap", shared, config))
    wait_running(jobs, wait_for, "swap", 1, 60)
    wait_for(lambda: complete_steps(shared, 2), 60, "a checkpoint on every rank")
    new_config = _set_scalar(config, "seed", 4321)  # the first `seed:` key is the top-level one
    new_config = new_config.replace("  seed: 1234", "  seed: 98765")  # train_dataset.seed
    jobs.merge_patch("swap", {"spec": {"config": {"text": new_config}}})

    status = wait_running(jobs, wait_for, "swap", 2, 60)
    assert status.get("restarts", 0) == 0
    entry = status["recoveries"][-1]
    assert entry["reason"] == "ConfigChanged" and entry["counted"] is False
    assert entry["fromStep"] > 0
    rendered = api.get(f"{collection_path('ConfigMap', jobs.namespace)}/swap-config-2")["data"]["train.yaml"]
    assert "seed: 98765" in rendered and "total_steps: -1" in rendered
    assert "resume_training: " in rendered and "/shared/output/checkpoint" in rendered


def test_operator_killed_during_a_recovery_completes_it_once(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """(h) the operator is SIGKILLed in the middle of a recovery and started again: the recovery
    completes exactly once (one restart counted, one planning Job, one new gang)."""
    jobs.create(trainingjob("crash", shared, trainer_config(step_delay_seconds=0.5)))
    wait_running(jobs, wait_for, "crash", 1, 60)
    wait_for(lambda: complete_steps(shared, 2), 60, "a checkpoint on every rank")
    node_agent.kill_pod(jobs.namespace, "crash-1-1")
    wait_for(
        lambda: jobs.status("crash").get("recovery"),
        30,
        lambda: f"a recovery in progress:\n{jobs.describe('crash')}",
        interval=0.01,
    )
    operator.kill()
    time.sleep(1.0)
    operator.start()

    status = wait_running(jobs, wait_for, "crash", 2, 60)
    assert status["restarts"] == 1
    assert [r["reason"] for r in status["recoveries"]] == ["Created", "WorkerFailed"]
    names = sorted(j["metadata"]["name"] for j in jobs.jobs("crash"))
    assert names == ["crash-plan-1", "crash-plan-2"]
    assert sorted(p["metadata"]["name"] for p in jobs.workers("crash")) == ["crash-2-0", "crash-2-1"]
    time.sleep(2)  # and nothing more happens afterwards
    assert jobs.status("crash")["attempt"] == 2


@pytest.mark.parametrize("conversion", ["Unify", "Reshard"])
def test_replicas_edit_converts_the_checkpoint_and_resumes_on_fewer_workers(
    jobs: Jobs, operator: OperatorProcess, wait_for: WaitFor, shared: Path, conversion: str
) -> None:
    """(e) ``spec.replicas`` 4 -> 2: the gang stops, a conversion Job merges (Unify) or reshards
    the newest step, the 2-worker gang loads it and trains on; not counted as a failure."""
    config = trainer_config(data_parallel=4, step_delay_seconds=0.4)
    jobs.create(trainingjob("resize", shared, config, replicas=4, checkpoint={"conversion": conversion}))
    wait_running(jobs, wait_for, "resize", 1, 60)
    wait_for(lambda: (1, 10) in complete_steps(shared, 4), 60, "step 10 saved on all 4 ranks")
    jobs.merge_patch("resize", {"spec": {"replicas": 2}})
    if conversion == "Unify":
        # (h) again, at the costliest moment: the operator dies while the conversion Job runs.
        wait_for(
            lambda: (jobs.status("resize").get("recovery") or {}).get("stage") == "Converting",
            60,
            lambda: f"the conversion stage:\n{jobs.describe('resize')}",
            interval=0.02,
        )
        operator.kill()
        time.sleep(2)
        operator.start()

    status = wait_running(jobs, wait_for, "resize", 2, 90)
    assert status["workers"] == 2 and status["worldSize"] == 2
    assert status.get("restarts", 0) == 0
    entry = status["recoveries"][-1]
    assert entry["reason"] == "ReplicasChanged" and entry["converted"] is True and entry["counted"] is False
    assert "Converting" in entry["seconds"]
    record = json.loads(status["lastConversion"])
    assert record["world_size"] == 2 and record["mode"] == conversion
    assert [j["metadata"]["name"] for j in jobs.jobs("resize") if "convert" in j["metadata"]["name"]] == [
        "resize-convert-2"
    ]
    if conversion != "Unify":  # Events of a killed operator's last moments may be lost: by design
        events_with(jobs, wait_for, "resize", "Converting", "Converted")
    converters = [
        p for p in jobs.pods("resize") if p["metadata"]["labels"].get("relaunch.dev/role") == "convert"
    ]
    assert len(converters) == 1, "the checkpoint was converted more than once"

    wait_phase(jobs, wait_for, "resize", "Succeeded", 120)
    curve = loss_curve(shared)
    assert sorted(curve) == list(range(1, 31))
    resumed = [e for e in curve.values() if e["attempt"] == 2]
    assert resumed and all(e["world"] == 2 for e in resumed)
    assert min(e["global_step"] for e in resumed) == (entry["fromEpoch"] - 1) * 10 + entry["fromStep"] + 1


def test_operator_killed_at_random_moments_counts_every_failure_once(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """(h, randomized) worker failures, each followed by a SIGKILL of the operator at a random
    moment of the recovery: every failure is counted once, with one planning Job and one gang."""
    rng = random.Random(20261127)
    config = trainer_config(step_delay_seconds=0.3, epochs=1000)
    jobs.create(trainingjob("chaos", shared, config, recovery={"maxRestarts": 100}))
    wait_running(jobs, wait_for, "chaos", 1, 60)
    wait_for(lambda: complete_steps(shared, 2), 60, "a checkpoint on every rank")
    for kills in range(1, 5):
        attempt = jobs.status("chaos")["attempt"]
        node_agent.kill_pod(jobs.namespace, f"chaos-{attempt}-{rng.randrange(2)}")
        time.sleep(rng.uniform(0.0, 1.5))
        operator.kill()
        time.sleep(rng.uniform(0.0, 1.0))
        operator.start()
        status = wait_running(jobs, wait_for, "chaos", attempt + 1, 60)
        assert status["restarts"] == kills
        names = [j["metadata"]["name"] for j in jobs.jobs("chaos")]
        assert sorted(names) == sorted({f"chaos-plan-{a}" for a in range(1, kills + 2)}), names
        assert len(jobs.workers("chaos")) == 2
    assert [r["reason"] for r in jobs.status("chaos")["recoveries"]] == ["Created"] + ["WorkerFailed"] * 4


def test_elastic_shrink_after_node_loss_when_capacity_stays_short(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path
) -> None:
    """Elastic shrink: one worker per node (anti-affinity), 3 workers on 3 nodes; a node is lost,
    so only 2 of the new gang can be scheduled; after the grace period relaunch shrinks the job to
    2 workers, converting the checkpoint, instead of waiting for capacity."""
    grace = 4
    config = trainer_config(data_parallel=3, batch_size=12, step_delay_seconds=0.4, epochs=20)
    manifest = trainingjob(
        "shrink",
        shared,
        config,
        replicas=3,
        elastic={"minReplicas": 2},
        recovery={"nodeLossGraceSeconds": grace},
    )
    manifest["spec"]["template"]["spec"]["affinity"] = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchLabels": {"relaunch.dev/job": "shrink", "relaunch.dev/role": "worker"}
                    },
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    }
    jobs.create(manifest)
    wait_running(jobs, wait_for, "shrink", 1, 60)
    wait_for(lambda: complete_steps(shared, 3), 60, "a checkpoint on every rank")
    node = next(p for p in jobs.workers("shrink", 1) if p["metadata"]["name"] == "shrink-1-2")["spec"][
        "nodeName"
    ]
    node_agent.lose_node(node)

    status = wait_for(
        # all_running first: the status returned must be read after it saw the job Running.
        lambda: jobs.all_running("shrink") and (s := jobs.status("shrink")).get("workers") == 2 and s,
        grace * 2 + 60,
        lambda: f"the job shrunk to 2 running workers:\n{jobs.describe('shrink')}",
    )
    reasons = [r["reason"] for r in status["recoveries"]]
    assert reasons[-1] == "Shrink", reasons
    assert status["recoveries"][-1]["converted"] is True
    # The shrink itself is not a failure: every counted restart is a failure recovery in the
    # history (superseded ones included). The node loss is usually first seen as a peer's exit
    # (WorkerFailed) before the grace ends, and a resumed attempt may fail again while the third
    # worker cannot be placed; both count.
    assert status["recoveries"][-1]["counted"] is False
    failures = [r["reason"] for r in status["recoveries"] if r["counted"]]
    assert failures and not set(failures) & CONTROLLED_REASONS, reasons
    assert status["restarts"] == len(failures), status["recoveries"]
    assert status["replicasRequested"] == 3 and status["worldSize"] == 2
    assert all(p["spec"].get("nodeName") != node for p in jobs.workers("shrink", status["attempt"]))


FINALIZER = "relaunch.dev/finalizer"


def test_no_finalizer_so_deleting_a_job_needs_no_operator(
    jobs: Jobs, operator: OperatorProcess, api: Kube, namespace: str, wait_for: WaitFor, shared: Path
) -> None:
    """A TrainingJob never gets a finalizer: with the operator stopped (as after ``helm
    uninstall``), deleting one completes at once, and what it owns (pods, ConfigMaps) goes with it
    through owner references. A job still carrying the finalizer of an older operator version
    loses it as soon as the operator runs again, even one whose deletion already began."""
    name = "nofin"
    jobs.create(trainingjob(name, shared, trainer_config(epochs=50)))
    wait_running(jobs, wait_for, name, 1, 60)
    assert (jobs.get(name)["metadata"].get("finalizers") or []) == []

    def owned() -> list[str]:
        pods = [f"pod/{p['metadata']['name']}" for p in jobs.pods(name)]
        maps = api.list(collection_path("ConfigMap", namespace), f"relaunch.dev/job={name}")
        return pods + [f"configmap/{m['metadata']['name']}" for m in maps]

    assert any(o.startswith("pod/") for o in owned()) and any(o.startswith("configmap/") for o in owned())
    operator.stop()
    assert operator.proc is not None and operator.proc.returncode == 0, "the operator stopped cleanly"

    api.delete(trainingjob_path(namespace, name))
    wait_for(lambda: not jobs.get(name), 5, f"TrainingJob {name} deleted at once, with no operator")
    wait_for(lambda: not owned(), 120, lambda: f"the garbage collector removing {owned()}")

    # TrainingJobs marked by an older operator: one deleted while no operator runs waits for it...
    for legacy in ("legacy-deleted", "legacy-running"):
        manifest = trainingjob(legacy, shared / legacy, trainer_config(epochs=50))
        manifest["metadata"]["finalizers"] = [FINALIZER]
        jobs.create(manifest)
    api.delete(trainingjob_path(namespace, "legacy-deleted"))
    time.sleep(1)
    assert jobs.get("legacy-deleted")["metadata"].get("deletionTimestamp")
    # ... and goes once the operator runs; the other one loses the finalizer and is served.
    operator.start()
    wait_for(lambda: not jobs.get("legacy-deleted"), 30, "the restarted operator releasing legacy-deleted")
    wait_for(
        lambda: (
            not jobs.get("legacy-running")["metadata"].get("finalizers")
            and jobs.status("legacy-running").get("phase")
        ),
        30,
        lambda: f"legacy-running without finalizer and served:\n{jobs.describe('legacy-running')}",
    )


CHECKPOINT_2_SECTION = """
checkpoint:  # Checkpoint 2.0 (MindFormers 2.1): iteration_<n>/ directories
  load_path: ''
  no_load_optim: False
  save_max: 4
  save_interleaved_steps: 5
"""


def tracked_iteration(shared: Path) -> int:
    """The iteration ``latest_checkpointed_iteration.txt`` names (0 before the first save)."""
    try:
        return int((shared / "output" / "checkpoint" / "latest_checkpointed_iteration.txt").read_text())
    except (OSError, ValueError):
        return 0


def all_losses(shared: Path) -> list[dict[str, Any]]:
    """Every line of the trainer's loss log, repeated steps included."""
    path = shared / "output" / "loss.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_checkpoint_2_job_resumes_a_killed_worker_then_resizes_without_conversion(
    jobs: Jobs, operator: OperatorProcess, node_agent: Any, wait_for: WaitFor, shared: Path, api: Kube
) -> None:
    """A job saving Checkpoint 2.0: (a) a worker is killed while the newest iteration's optimizer
    shards are missing (an unfinished save): the gang resumes from the iteration before it, and the
    Planned Event says why; (e) then spec.replicas 4 -> 2: the gang restarts on 2 workers from the
    newest iteration, which it loads at the new world size from its metadata.json, as MindFormers
    does (no conversion Job); not counted as a failure."""
    config = trainer_config(data_parallel=4, step_delay_seconds=0.4) + CHECKPOINT_2_SECTION
    jobs.create(trainingjob("ckpt2", shared, config, replicas=4))
    wait_running(jobs, wait_for, "ckpt2", 1, 60)
    root = shared / "output" / "checkpoint"

    # Right after iteration 10 (or 15) is tracked, well before the next save: remove its
    # optimizer shards and metadata.json, as a job that died during an asynchronous save leaves it
    # (common.json and the model shards written, the rest not yet), and kill a worker. Trusting
    # common.json, the gang would resume without optimizer state, or fail to load the shards.
    newest = wait_for(
        lambda: (
            10 <= (t := tracked_iteration(shared)) <= 15
            and newest_global_step(shared) in (t + 1, t + 2)
            and t
        ),
        90,
        "iteration 10 or 15 tracked, the training 1-2 steps past it",
        interval=0.05,
    )
    for unfinished in (root / f"iteration_{newest:08d}").glob("*-opt-*.safetensors"):
        unfinished.unlink()
    (root / f"iteration_{newest:08d}" / "metadata.json").unlink()
    node_agent.kill_pod(jobs.namespace, "ckpt2-1-1")

    status = wait_running(jobs, wait_for, "ckpt2", 2, 60)
    assert status["restarts"] == 1 and status["lastFailure"]["reason"] == "WorkerFailed"
    assert status["checkpoint"]["kind"] == "iteration" and status["checkpoint"]["step"] == newest - 5
    planned = wait_for(
        lambda: (
            (ev := [e["message"] for e in jobs.events("ckpt2") if e["reason"] == "Planned"])
            and len(ev) >= 2
            and ev[-1]
        ),
        30,
        lambda: f"two Planned events:\n{jobs.describe('ckpt2')}",
    )
    assert f"iteration {newest - 5}" in planned, planned
    assert f"iteration {newest}: optimizer shards missing on every rank" in planned, planned
    rendered = api.get(f"{collection_path('ConfigMap', jobs.namespace)}/ckpt2-config-2")["data"]["train.yaml"]
    resumed_config = yaml.safe_load(rendered)["checkpoint"]
    assert resumed_config["load_path"] == f"/shared/output/checkpoint/iteration_{newest - 5:08d}"
    assert resumed_config["no_load_optim"] is False

    # Attempt 2 saves a newer iteration at 4 ranks; then the job is resized to 2 workers.
    wait_for(lambda: tracked_iteration(shared) > newest, 60, f"an iteration newer than {newest} tracked")
    jobs.merge_patch("ckpt2", {"spec": {"replicas": 2}})
    status = wait_for(
        lambda: jobs.all_running("ckpt2") and (s := jobs.status("ckpt2")).get("workers") == 2 and s,
        90,
        lambda: f"the job resized to 2 running workers:\n{jobs.describe('ckpt2')}",
    )
    assert status["worldSize"] == 2 and status["restarts"] == 1
    entry = status["recoveries"][-1]
    assert entry["reason"] == "ReplicasChanged" and entry["counted"] is False
    assert entry["converted"] is False and "Converting" not in entry["seconds"]
    assert not [j for j in jobs.jobs("ckpt2") if "convert" in j["metadata"]["name"]]
    resized_from = status["checkpoint"]["step"]
    assert resized_from > newest and (root / f"iteration_{resized_from:08d}" / "metadata.json").exists()
    rendered = api.get(f"{collection_path('ConfigMap', jobs.namespace)}/ckpt2-config-{status['attempt']}")
    document = yaml.safe_load(rendered["data"]["train.yaml"])
    assert document["checkpoint"]["load_path"] == f"/shared/output/checkpoint/iteration_{resized_from:08d}"
    assert document["parallel_config"]["data_parallel"] == 2

    wait_phase(jobs, wait_for, "ckpt2", "Succeeded", 120)
    losses = all_losses(shared)
    curve = loss_curve(shared)
    assert sorted(curve) == list(range(1, 31))
    # Attempt 2 repeated the steps after iteration newest - 5 at the same world size: bit for bit.
    first = {e["global_step"]: e["loss_hex"] for e in losses if e["attempt"] == 1}
    again = {e["global_step"]: e["loss_hex"] for e in losses if e["attempt"] == 2}
    assert min(again) == newest - 5 + 1
    repeated = sorted(set(first) & set(again))
    assert repeated and all(first[g] == again[g] for g in repeated), repeated
    after_resize = [e for e in losses if e["attempt"] == status["attempt"]]
    assert after_resize and all(e["world"] == 2 for e in after_resize)
    assert min(e["global_step"] for e in after_resize) == resized_from + 1
    # The 2-rank run saved 2-rank iterations next to the 4-rank ones.
    assert (root / "iteration_00000030" / "demo-model-0000001-0000002.safetensors").exists()
