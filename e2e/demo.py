"""``python -m e2e.demo`` (what ``make demo`` runs): relaunch recovering a training job, live.

On the local cluster (started here unless one is already running): install the Helm chart, apply
``examples/demo.yaml`` (the numpy demo trainer on 4 workers), wait for a checkpoint, kill one
worker, and print the TrainingJob as ``kubectl get tj -w`` would while relaunch stops the gang,
plans and restarts it from the newest complete step; then a summary of what happened. The cluster
is stopped at the end unless ``--keep`` is given (or it was already running).

The helpers here (chart install, the demo's manifests, the watch lines) are shared with
``e2e/test_chart.py``, so what the demo shows is what the tests prove.
"""

from __future__ import annotations

import argparse
import calendar
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import control

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "charts" / "relaunch"
DEMO_YAML = REPO_ROOT / "examples" / "demo.yaml"
#: The placeholder in examples/demo.yaml for the folder the trainer's code is mounted from.
SOURCE_PLACEHOLDER = "/path/to/relaunch"

COLUMNS = ("NAME", "PHASE", "WORKERS", "RESTARTS", "STEP", "AGE")


# ----------------------------------------------------------------------------------------------
# small wrappers around the cluster's own kubectl and helm


def run_tool(
    argv: Sequence[str], *, stdin: str | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed (exit {result.returncode}):\n{result.stderr}")
    return result


def kubectl(cluster: control.Cluster, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_tool([cluster.kubectl(), f"--kubeconfig={cluster.kubeconfig}", *args], **kwargs)


def helm(cluster: control.Cluster, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    assert cluster.bin_dir is not None, "the cluster records where its binaries are"
    return run_tool([str(cluster.bin_dir / "helm"), f"--kubeconfig={cluster.kubeconfig}", *args], **kwargs)


def set_flags(values: Mapping[str, str]) -> list[str]:
    return [flag for key, value in values.items() for flag in ("--set", f"{key}={value}")]


def install_chart(
    cluster: control.Cluster,
    release: str,
    namespace: str,
    values: Mapping[str, str],
    *,
    strings: Mapping[str, str] | None = None,
    timeout_s: int = 180,
) -> str:
    """``helm upgrade --install --wait`` of charts/relaunch; returns Helm's output (with NOTES.txt).
    ``strings``: values given with ``--set-string`` (kept strings even when they read as booleans)."""
    result = helm(
        cluster,
        "upgrade",
        "--install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--create-namespace",
        "--wait",
        f"--timeout={timeout_s}s",
        *set_flags(values),
        *(flag for key, value in (strings or {}).items() for flag in ("--set-string", f"{key}={value}")),
        timeout=timeout_s + 30,
    )
    return result.stdout


def get_json(cluster: control.Cluster, *args: str) -> Any:
    result = kubectl(cluster, "get", *args, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------
# the demo's TrainingJob


def demo_manifests(
    *, name: str = "demo", config_overrides: Mapping[str, Any] | None = None, master_port: int | None = None
) -> list[dict[str, Any]]:
    """examples/demo.yaml with the trainer's source folder filled in (and config keys overridden).

    ``master_port``: the rendezvous port of rank 0. The local cluster's pods share this machine's
    network, so a job started while another one runs (another cluster, say) needs its own port;
    a variable set in the template wins over the one relaunch sets.
    """
    text = DEMO_YAML.read_text().replace(SOURCE_PLACEHOLDER, str(REPO_ROOT))
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        if doc["kind"] == "TrainingJob":
            doc["metadata"]["name"] = name
            doc["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = (
                f"{name}-shared"
            )
            if master_port is not None:
                container = doc["spec"]["template"]["spec"]["containers"][0]
                container["env"] = [{"name": "MASTER_PORT", "value": str(master_port)}]
            if config_overrides:
                config = yaml.safe_load(doc["spec"]["config"]["text"])
                config.update(config_overrides)
                doc["spec"]["config"]["text"] = yaml.safe_dump(config, sort_keys=False)
        else:
            doc["metadata"]["name"] = f"{name}-shared"
    return docs


def apply(cluster: control.Cluster, namespace: str, docs: Iterable[Mapping[str, Any]]) -> None:
    kubectl(cluster, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(list(docs)))


def claim_folder(cluster: control.Cluster, namespace: str, claim: str) -> Path | None:
    """The host folder the node agent provisioned for a PersistentVolumeClaim."""
    root = cluster.state_dir / "pv" / namespace
    found = sorted(root.glob(f"{claim}-*")) if root.is_dir() else []
    return found[0] if found else None


def newest_saved_step(cluster: control.Cluster, namespace: str, claim: str) -> int:
    """Global step of the newest checkpoint rank 0 recorded in meta.json (0: none yet)."""
    folder = claim_folder(cluster, namespace, claim)
    if folder is None:
        return 0
    try:
        meta = json.loads((folder / "output" / "checkpoint" / "rank_0" / "meta.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(meta.get("last_step") or 0)


def loss_by_step(cluster: control.Cluster, namespace: str, claim: str) -> dict[int, list[tuple[str, float]]]:
    """Every loss rank 0 logged, by global step, as (exact hex, value): a resumed run logs the steps
    after its checkpoint again."""
    folder = claim_folder(cluster, namespace, claim)
    losses: dict[int, list[tuple[str, float]]] = {}
    if folder is None:
        return losses
    path = folder / "output" / "loss.jsonl"
    if not path.is_file():
        return losses
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        value = float(entry["loss"])
        losses.setdefault(int(entry["global_step"]), []).append((str(entry.get("loss_hex") or value), value))
    return losses


# ----------------------------------------------------------------------------------------------
# watching


def age(created: str | None, now: float) -> str:
    if not created:
        return "?"
    start = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    seconds = max(0, int(now - start))
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m{seconds % 60}s"


def row(tj: Mapping[str, Any], now: float) -> tuple[str, ...]:
    status = tj.get("status") or {}
    step = (status.get("checkpoint") or {}).get("step")
    return (
        tj["metadata"]["name"],
        str(status.get("phase") or ""),
        str(status.get("workers") if status.get("workers") is not None else ""),
        str(status.get("restarts") or 0),
        "" if step is None else str(step),
        age(tj["metadata"].get("creationTimestamp"), now),
    )


def format_row(cells: Sequence[str]) -> str:
    widths = (12, 12, 9, 10, 6, 6)
    return "".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


class Watcher:
    """Prints a ``kubectl get tj -w`` line whenever a column other than AGE changes."""

    def __init__(
        self, cluster: control.Cluster, namespace: str, name: str, out: Callable[[str], None]
    ) -> None:
        self.cluster, self.namespace, self.name, self.out = cluster, namespace, name, out
        self.last: tuple[str, ...] | None = None
        self.tj: dict[str, Any] | None = None
        out(format_row(COLUMNS))

    def poll(self) -> dict[str, Any] | None:
        self.tj = get_json(self.cluster, "trainingjob", self.name, "-n", self.namespace)
        if self.tj is not None:
            cells = row(self.tj, time.time())
            if self.last is None or cells[:-1] != self.last[:-1]:
                self.out(format_row(cells))
                self.last = cells
        return self.tj

    def until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tj = self.poll()
            if tj is not None and predicate(tj):
                return tj
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}; last seen: {self.last}")


def phase(tj: Mapping[str, Any]) -> str:
    return str((tj.get("status") or {}).get("phase") or "")


def summary(tj: Mapping[str, Any], losses: Mapping[int, list[tuple[str, float]]]) -> list[str]:
    status = tj.get("status") or {}
    lines = [
        f"phase {status.get('phase')}, restarts {status.get('restarts', 0)}, attempt {status.get('attempt')}"
    ]
    failure = status.get("lastFailure") or {}
    if failure:
        lines.append(
            f"failure: {failure.get('reason')} on pod {failure.get('pod')}"
            + (f" (exit code {failure['exitCode']})" if failure.get("exitCode") is not None else "")
            + (f": {failure['message']}" if failure.get("message") else "")
        )
    for entry in status.get("recoveries") or []:
        seconds = entry.get("seconds") or {}
        order = ["Stopping", "Planning", "Converting", "Starting", "total"]
        stages = ", ".join(
            f"{k} {seconds[k]:.1f} s"
            for k in sorted(seconds, key=lambda k: order.index(k) if k in order else 9)
        )
        origin = (
            f"resumed from step {entry['fromStep']}" if entry.get("fromStep") is not None else "from scratch"
        )
        what = "first start" if entry.get("reason") == "Created" else f"recovery after {entry.get('reason')}"
        lines.append(
            f"{what}: {origin}"
            + (" (converted)" if entry.get("converted") else "")
            + (f"; {stages}" if stages else "")
        )
    repeated = {step: values for step, values in losses.items() if len(values) > 1}
    if repeated:
        same = all(len({exact for exact, _ in values}) == 1 for values in repeated.values())
        lines.append(
            f"steps {min(repeated)}..{max(repeated)} were trained twice (before the failure and after the "
            f"resume): the losses are {'bit-identical' if same else 'DIFFERENT'}"
        )
    if losses:
        last = max(losses)
        lines.append(f"last global step {last}, loss {losses[last][-1][1]:.6f}")
    return lines


# ----------------------------------------------------------------------------------------------
# the demo


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def failed(cluster: control.Cluster, namespace: str, watcher: Watcher) -> int:
    banner("the job failed before the demo could show a recovery")
    for line in summary(watcher.tj or {}, {}):
        print(f"  {line}")
    print(f"  worker logs: {cluster.state_dir}/pods/{namespace}/<pod>/<uid>/trainer.log")
    return 1


def run_demo(cluster: control.Cluster) -> int:
    namespace, release, name = "relaunch-demo", "relaunch", "demo"
    health_port, metrics_port, master_port = control.free_ports(3)

    banner("installing the chart (helm install relaunch charts/relaunch -n relaunch-system)")
    notes = install_chart(
        cluster,
        release,
        "relaunch-system",
        {"health.port": str(health_port), "metrics.port": str(metrics_port)},
    )
    print(notes.split("NOTES:", 1)[-1].strip()[:1200])

    banner(f"applying examples/demo.yaml in namespace {namespace}: 4 workers of the numpy demo trainer")
    if get_json(cluster, "namespace", namespace) is not None:  # left by an earlier `--keep` run
        kubectl(cluster, "delete", "namespace", namespace, "--wait=true", "--timeout=120s")
    kubectl(cluster, "create", "namespace", namespace)
    apply(cluster, namespace, demo_manifests(name=name, master_port=master_port))

    banner("kubectl get trainingjobs --watch")
    watcher = Watcher(cluster, namespace, name, lambda line: print(line, flush=True))
    watcher.until(lambda tj: phase(tj) == "Running", 180, "the job to run")
    deadline = time.monotonic() + 180
    while newest_saved_step(cluster, namespace, f"{name}-shared") < 10:
        if time.monotonic() > deadline:
            raise TimeoutError("no checkpoint at step >= 10 within 180 s")
        if phase(watcher.poll() or {}) == "Failed":
            return failed(cluster, namespace, watcher)
        time.sleep(0.5)
    saved = newest_saved_step(cluster, namespace, f"{name}-shared")
    # A few steps past the checkpoint, so the resumed run retrains them and the losses can be compared.
    while max(loss_by_step(cluster, namespace, f"{name}-shared"), default=0) < saved + 3:
        if time.monotonic() > deadline:
            raise TimeoutError(f"training did not get past step {saved + 3} within 180 s")
        watcher.poll()
        time.sleep(0.2)
    victim = f"{name}-{(watcher.tj or {}).get('status', {}).get('attempt', 1)}-1"
    print(
        f"-- checkpoint of step {saved} is on disk, training is past it: killing worker {victim}", flush=True
    )
    cluster.agent().kill_pod(namespace, victim)
    watcher.until(lambda tj: int((tj.get("status") or {}).get("restarts") or 0) >= 1, 120, "the failure")
    watcher.until(lambda tj: phase(tj) == "Running", 180, "the gang to run again")
    final = watcher.until(lambda tj: phase(tj) in ("Succeeded", "Failed"), 300, "the training to finish")

    banner("what happened")
    for line in summary(final, loss_by_step(cluster, namespace, f"{name}-shared")):
        print(f"  {line}")
    return 0 if phase(final) == "Succeeded" else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    args = parser.parse_args(argv)
    state_dir = control.default_state_dir()
    existing = control.Cluster.load(state_dir)
    started = not (existing is not None and all(existing.running().values()))
    banner(
        "starting the local cluster (python -m e2e.cluster up)" if started else "using the running cluster"
    )
    cluster = control.up(state_dir) if started else existing
    assert cluster is not None
    try:
        return run_demo(cluster)
    finally:
        if started and not args.keep:
            banner("stopping the local cluster (keep it with: python -m e2e.demo --keep)")
            control.down(state_dir)
        else:
            print(
                f"\nthe cluster is running: export KUBECONFIG={cluster.kubeconfig}\n"
                "  kubectl describe trainingjob demo -n relaunch-demo   # conditions, recoveries, events\n"
                "stop it with `make cluster-down`"
            )


if __name__ == "__main__":
    sys.exit(main())
