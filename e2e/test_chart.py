"""The Helm chart on the testbed, as a user installs it with non-default values.

- The rendered manifests (CRD included) pass a server-side dry run with strict field validation.
- ``helm install`` runs the operator in a pod of the chart's Deployment, started by the node agent
  with the chart's ServiceAccount token (the only operator serving the namespace), and that
  operator recovers a TrainingJob whose worker is killed: the RBAC is enough.
- The ServiceAccount is refused what it must not do (Secrets; other namespaces in namespaced
  mode; writing Nodes; RBAC), both by ``kubectl auth can-i --as`` and by real requests made with
  a token of that ServiceAccount: the RBAC is not too much.
- ``helm upgrade`` with changed values reconfigures it without disturbing the running job;
  ``helm uninstall`` leaves no object of the release behind, while the TrainingJob and its
  checkpoints stay.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster import control
from e2e.demo import (
    CHART,
    apply,
    claim_folder,
    demo_manifests,
    get_json,
    helm,
    install_chart,
    kubectl,
    newest_saved_step,
    phase,
    set_flags,
)

pytestmark = pytest.mark.e2e

INSTANCE_LABEL = "app.kubernetes.io/instance"
#: Every kind the chart creates, namespaced or not; checked for leftovers after uninstall.
NAMESPACED_KINDS = "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings"
CLUSTER_KINDS = "clusterroles,clusterrolebindings"
#: A short run of the demo trainer: checkpoints every 5 steps, 0.3 s per step.
QUICK_TRAINING = {
    "runner_config": {"epochs": 1, "batch_size": 16, "steps_per_epoch": 60},
    "step_delay_seconds": 0.3,
}


def free_port_values() -> dict[str, str]:
    # Pods share the machine's network here: each operator needs ports nobody else holds.
    health, metrics = control.free_ports(2)
    return {"health.port": str(health), "metrics.port": str(metrics)}


def can_i(cluster: control.Cluster, account: str, verb: str, resource: str, *where: str) -> bool:
    result = kubectl(cluster, "auth", "can-i", verb, resource, *where, f"--as={account}", check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i: {result.stdout}{result.stderr}"
    return answer == "yes"


def token_kubeconfig(cluster: control.Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a fresh token of the ServiceAccount (TokenRequest API)."""
    token = kubectl(cluster, "create", "token", account, "-n", namespace, "--duration=10m").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "testbed", "user": account}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def as_token(cluster: control.Cluster, kubeconfig: Path, *args: str) -> tuple[int, str]:
    result = subprocess.run(
        [cluster.kubectl(), f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=60
    )
    return result.returncode, result.stdout + result.stderr


def server_version(cluster: control.Cluster) -> str:
    return str(json.loads(kubectl(cluster, "version", "-o", "json").stdout)["serverVersion"]["gitVersion"])


def dry_run_rendered(cluster: control.Cluster, release: str, namespace: str, values: dict[str, str]) -> None:
    """`helm template` (for the cluster's version), then the API server validates every object."""
    rendered = helm(
        cluster,
        "template",
        release,
        str(CHART),
        "-n",
        namespace,
        "--include-crds",
        f"--kube-version={server_version(cluster)}",
        *set_flags(values),
    )
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    checked = kubectl(
        cluster,
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        stdin=rendered.stdout,
        check=False,
    )
    assert checked.returncode == 0, f"the API server refused the rendered chart:\n{checked.stderr}"
    assert checked.stdout.count("(server dry run)") == len(docs), checked.stdout


def leftovers(cluster: control.Cluster, release: str, namespaces: list[str]) -> list[str]:
    found = []
    selector = f"{INSTANCE_LABEL}={release}"
    for ns in namespaces:
        listed = kubectl(cluster, "get", NAMESPACED_KINDS, "-n", ns, "-l", selector, "-o", "name")
        found += [f"{ns}/{line}" for line in listed.stdout.split()]
    listed = kubectl(cluster, "get", CLUSTER_KINDS, "-l", selector, "-o", "name")
    return found + listed.stdout.split()


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.strip().split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode(errors="replace")


def operator_pod(cluster: control.Cluster, namespace: str, release: str) -> dict[str, Any] | None:
    pods = get_json(cluster, "pods", "-n", namespace, "-l", f"{INSTANCE_LABEL}={release}") or {"items": []}
    running = [p for p in pods["items"] if (p.get("status") or {}).get("phase") == "Running"]
    return running[0] if len(running) == 1 else None


def operator_log(cluster: control.Cluster, namespace: str, release: str) -> str:
    pods = get_json(cluster, "pods", "-n", namespace, "-l", f"{INSTANCE_LABEL}={release}") or {"items": []}
    return "\n".join(cluster.pod_log(namespace, p["metadata"]["name"])[-4000:] for p in pods["items"])


@pytest.fixture
def extra_namespaces(cluster: control.Cluster, namespace: str) -> Iterator[tuple[str, str]]:
    """The release's own namespace and a namespace the release must not touch."""
    ops, other = f"{namespace}-ops", f"{namespace}-other"
    for ns in (ops, other):
        kubectl(cluster, "create", "namespace", ns)
    yield ops, other
    for ns in (ops, other):
        kubectl(cluster, "delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
def release(cluster: control.Cluster, extra_namespaces: tuple[str, str]) -> Iterator[str]:
    """A release name; uninstalled at teardown if a failed test left it (a cluster-wide operator
    left running would serve the TrainingJobs of the tests that follow)."""
    name = f"rl{uuid.uuid4().hex[:6]}"
    yield name
    helm(cluster, "uninstall", name, "-n", extra_namespaces[0], "--ignore-not-found", "--wait", check=False)


def test_namespaced_release_recovers_a_job_as_its_service_account_and_nothing_more(
    cluster: control.Cluster, namespace: str, extra_namespaces: tuple[str, str], release: str, tmp_path: Path
) -> None:
    ops, other = extra_namespaces
    account = f"{release}-guard"
    sa_user = f"system:serviceaccount:{ops}:{account}"
    values = {
        "watch.mode": "namespaces",
        "watch.namespaces": f"{{{namespace}}}",
        "serviceAccount.name": account,
        "image.repository": "registry.example.com/relaunch",
        "metrics.service.port": "8443",
        "resources.limits.memory": "384Mi",
        **free_port_values(),
    }

    dry_run_rendered(cluster, release, ops, values)
    notes = install_chart(cluster, release, ops, values)
    assert f"It serves TrainingJobs only in: {namespace}." in notes

    pod = control.wait_for(lambda: operator_pod(cluster, ops, release), 60, "the operator pod to run")
    assert pod["spec"]["serviceAccountName"] == account
    assert pod["spec"]["containers"][0]["command"] == ["relaunch", "operator"]
    # The only credential the operator has is the token of the chart's ServiceAccount, bound to its
    # pod (the API client prefers the in-cluster token to any kubeconfig).
    (token,) = cluster.pod_dirs(ops, pod["metadata"]["name"])[-1].glob("volumes/kube-api-access-*/token")
    claims = jwt_claims(token.read_text())
    assert claims["sub"] == sa_user
    assert claims["kubernetes.io"]["pod"]["name"] == pod["metadata"]["name"]
    health = f"http://127.0.0.1:{values['health.port']}/healthz"
    control.wait_for(lambda: http_get(health)[0] == 200, 60, f"the liveness endpoint {health}")

    # A job for the operator to keep alive.
    docs = demo_manifests(
        name="guarded", config_overrides=QUICK_TRAINING, master_port=control.free_ports(1)[0]
    )
    apply(cluster, namespace, docs)

    # While it starts: the ServiceAccount may do its job and nothing more (impersonated checks).
    for verb, resource, *where in [
        ("watch", "trainingjobs.relaunch.dev", "-n", namespace),
        ("patch", "trainingjobs.relaunch.dev", "--subresource=status", "-n", namespace),
        ("create", "pods", "-n", namespace),
        ("delete", "pods", "-n", namespace),
        ("create", "jobs.batch", "-n", namespace),
        ("list", "nodes"),
        ("list", "leases.coordination.k8s.io", "-n", "kube-node-lease"),
    ]:
        assert can_i(cluster, sa_user, verb, resource, *where), f"{sa_user} may not {verb} {resource} {where}"
    for verb, resource, *where in [
        ("get", "secrets", "-n", namespace),
        ("list", "secrets", "-n", ops),
        ("list", "trainingjobs.relaunch.dev", "-n", other),
        ("create", "pods", "-n", other),
        ("list", "pods", "--all-namespaces"),
        ("delete", "nodes"),
        ("patch", "nodes"),
        ("create", "clusterroles"),
        ("create", "rolebindings", "-n", namespace),
        ("update", "leases.coordination.k8s.io", "-n", "kube-node-lease"),
        ("create", "pods", "--subresource=exec", "-n", namespace),
    ]:
        assert not can_i(cluster, sa_user, verb, resource, *where), f"{sa_user} may {verb} {resource} {where}"

    # The same with real requests, authenticated by a token of that ServiceAccount.
    sa_config = token_kubeconfig(cluster, ops, account, tmp_path / "sa.kubeconfig")
    code, out = as_token(cluster, sa_config, "get", "trainingjobs", "-n", namespace, "-o", "name")
    assert code == 0 and "trainingjob.relaunch.dev/guarded" in out, out
    for args in (
        ("get", "secrets", "-n", namespace),
        ("get", "pods", "-n", other),
        ("get", "trainingjobs", "-n", other),
        ("delete", "node", cluster.nodes[0]),
    ):
        code, out = as_token(cluster, sa_config, *args)
        assert code != 0 and "forbidden" in out.lower() and sa_user in out, f"{args}: {out}"

    # The recovery, done by the operator running as that ServiceAccount.
    def job() -> dict[str, Any]:
        found = get_json(cluster, "trainingjob", "guarded", "-n", namespace)
        assert found is not None
        return found

    def describe() -> str:
        status = json.dumps(job().get("status"))
        return f"TrainingJob status: {status}\noperator log:\n{operator_log(cluster, ops, release)}"

    control.wait_for(lambda: phase(job()) == "Running", 120, describe)
    control.wait_for(lambda: newest_saved_step(cluster, namespace, "guarded-shared") >= 10, 120, describe)
    before = job()["status"]
    victim = f"guarded-{before.get('attempt', 1)}-1"
    restarts = int(before.get("restarts") or 0)
    cluster.agent().kill_pod(namespace, victim)

    def recovered_job() -> dict[str, Any] | None:
        found = job()
        status = found.get("status") or {}
        done = (
            phase(found) == "Running" and status.get("restarts") == restarts + 1 and status.get("checkpoint")
        )
        return found if done else None

    recovered = control.wait_for(recovered_job, 180, describe)["status"]
    assert recovered["lastFailure"]["pod"] == victim
    assert recovered["checkpoint"]["step"] >= 5, recovered["checkpoint"]  # a saved step, not a fresh start
    assert recovered["recoveries"][-1]["fromStep"] == recovered["checkpoint"]["step"]

    status, metrics = http_get(f"http://127.0.0.1:{values['metrics.port']}/metrics")
    assert status == 200 and "relaunch_recoveries_total" in metrics, metrics[:2000]

    # Nothing the operator tried (kopf's own calls included) was refused.
    log = cluster.pod_log(ops, pod["metadata"]["name"])
    assert log.strip(), "the operator's log is empty"
    # A 403 as a status of its own ("status=403", "403 Forbidden"), not three digits inside a port
    # number such as 127.0.0.1:40329 in a line about an unrelated retry.
    code_403 = re.compile(r"(?<![\w.:])403(?![\w.])")
    refused = [line for line in log.splitlines() if code_403.search(line) or "forbidden" in line.lower()]
    assert not refused, "\n".join(refused[:10])

    # helm upgrade: serve a second namespace, new limits; the running job is left alone.
    old_pod = pod["metadata"]["uid"]
    upgraded = {**values, "watch.namespaces": f"{{{namespace},{other}}}", "resources.limits.memory": "448Mi"}
    dry_run_rendered(cluster, release, ops, upgraded)
    helm(cluster, "upgrade", release, str(CHART), "-n", ops, "--wait", "--timeout=180s", *set_flags(upgraded))

    def replaced_pod() -> dict[str, Any] | None:
        found = operator_pod(cluster, ops, release)
        return found if found and found["metadata"]["uid"] != old_pod else None

    new = control.wait_for(replaced_pod, 90, "the upgraded operator pod (strategy Recreate)")
    assert new["spec"]["containers"][0]["resources"]["limits"]["memory"] == "448Mi"
    assert can_i(cluster, sa_user, "list", "trainingjobs.relaunch.dev", "-n", other)
    control.wait_for(lambda: http_get(health)[0] == 200, 60, "the upgraded operator's liveness endpoint")
    assert job()["status"]["restarts"] == restarts + 1, "the upgrade must not restart the training gang"

    # helm uninstall: nothing of the release is left; the job and its checkpoints are.
    helm(cluster, "uninstall", release, "-n", ops, "--wait", "--timeout=120s")
    namespaces = [ops, namespace, other, "kube-node-lease"]
    control.wait_for(
        lambda: not leftovers(cluster, release, namespaces),
        60,
        lambda: f"objects of release {release} left: {leftovers(cluster, release, namespaces)}",
    )
    remaining = job()
    assert remaining["status"]["restarts"] == restarts + 1
    folder = claim_folder(cluster, namespace, "guarded-shared")
    assert folder is not None
    assert list((folder / "output" / "checkpoint" / "rank_0").glob("*.safetensors")), (
        "checkpoints were removed"
    )
    assert get_json(cluster, "crd", "trainingjobs.relaunch.dev") is not None, (
        "the CRD must outlive the release"
    )


def test_cluster_release_serves_every_namespace_and_cannot_read_secrets(
    cluster: control.Cluster, namespace: str, extra_namespaces: tuple[str, str], release: str
) -> None:
    ops, _ = extra_namespaces
    sa_user = f"system:serviceaccount:{ops}:{release}-relaunch"
    values = {"metrics.serviceMonitor.enabled": "false", **free_port_values()}

    dry_run_rendered(cluster, release, ops, values)
    notes = install_chart(cluster, release, ops, values)
    assert "It serves TrainingJobs in every namespace." in notes
    control.wait_for(lambda: operator_pod(cluster, ops, release), 60, "the operator pod to run")

    assert can_i(cluster, sa_user, "watch", "trainingjobs.relaunch.dev", "--all-namespaces")
    assert can_i(cluster, sa_user, "create", "pods", "-n", namespace)
    assert not can_i(cluster, sa_user, "get", "secrets", "-n", namespace)
    assert not can_i(cluster, sa_user, "list", "secrets", "--all-namespaces")
    assert not can_i(cluster, sa_user, "delete", "nodes")
    assert not can_i(cluster, sa_user, "list", "leases.coordination.k8s.io", "-n", "kube-system")

    # Served without any per-namespace setup: the operator picks the job up and writes its status.
    port = control.free_ports(1)[0]
    apply(
        cluster, namespace, demo_manifests(name="anywhere", config_overrides=QUICK_TRAINING, master_port=port)
    )

    def job_phase() -> str:
        return phase(get_json(cluster, "trainingjob", "anywhere", "-n", namespace) or {})

    control.wait_for(
        lambda: job_phase() in ("Running", "Succeeded"),
        120,
        lambda: f"the job to run (phase {job_phase()!r})\n{operator_log(cluster, ops, release)}",
    )
    # Deleted while the operator runs: TrainingJobs carry no finalizer, nothing is left.
    kubectl(cluster, "delete", "trainingjob", "anywhere", "-n", namespace, "--timeout=60s")

    helm(cluster, "uninstall", release, "-n", ops, "--wait", "--timeout=120s")
    namespaces = [ops, namespace, "kube-node-lease"]
    control.wait_for(
        lambda: not leftovers(cluster, release, namespaces),
        60,
        lambda: f"objects of release {release} left: {leftovers(cluster, release, namespaces)}",
    )
