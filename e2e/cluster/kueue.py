"""Kueue on the local cluster: its manager as one more process next to the control plane.

Kueue is built from its Go module at a pinned version (``build-kueue.sh``, cached like the control
plane's binaries), and its CRDs and webhook manifests are read from that module's source in Go's
module cache, never copied into this repository.

How the API server reaches Kueue's admission (and CRD conversion) webhooks: Kueue's own manifests
name a Service, which needs endpoints, and the controller-manager refuses to publish EndpointSlices
for the testbed's loopback addresses. So the webhook configurations use
``clientConfig.url: https://127.0.0.1:<port>/<path>`` instead, with the testbed CA as ``caBundle``;
Kueue's internal certificate management is off and it serves a certificate for 127.0.0.1 signed by
that CA (``kueue-webhook.crt`` in the cluster's PKI). Only the webhooks of Kueue's own API group are
registered: the job frameworks Kueue integrates natively (batch Jobs, pods, ...) are not enabled here,
and their webhooks would put Kueue in the path of every pod the tests create.

With its internal certificate management off, Kueue also reads the serving certificate of its
metrics endpoint from a fixed path, ``/etc/kueue/metrics/certs`` (its Deployment mounts a Secret
there). Rather than write into the machine's ``/etc``, Kueue is started in a mount namespace of its
own (``unshare --mount``) where ``/etc`` is an overlay whose upper layer, in the cluster's state
directory, holds ``kueue/metrics/certs/tls.crt``/``tls.key`` (the same certificate); everything
else in ``/etc`` shows through unchanged.

Kueue runs with the admin's kubeconfig (it is test infrastructure, like the node agent), leader
election off, its visibility API server off, and ``TrainingJob.v1alpha1.relaunch.dev`` declared as an
external framework: relaunch's operator manages the TrainingJob's Workload itself.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.control import Cluster, ClusterError, _get, _spawn, free_ports, log, wait_for
from e2e.cluster.pki import ensure_leaf

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-kueue.sh"
EXTERNAL_FRAMEWORK = "TrainingJob.v1alpha1.relaunch.dev"
KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_NAMESPACE = "kueue-system"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


@dataclass(frozen=True)
class KueueBuild:
    binary: Path
    source: Path  # the module's directory in Go's module cache


def build() -> KueueBuild:
    """Build (or find in the cache) Kueue's manager; ``$RELAUNCH_KUEUE_BIN`` and ``$RELAUNCH_KUEUE_SRC``
    name a binary and a module source directory to use instead."""
    binary, source = os.environ.get("RELAUNCH_KUEUE_BIN"), os.environ.get("RELAUNCH_KUEUE_SRC")
    if binary and source:
        return KueueBuild(Path(binary), Path(source))
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise ClusterError(f"{BUILD_SCRIPT} failed (exit {done.returncode}); its progress log is above")
    lines = done.stdout.strip().splitlines()
    return KueueBuild(Path(lines[-2]) / "kueue", Path(lines[-1]))


@dataclass
class Kueue:
    """A running Kueue manager of the cluster."""

    pid: int
    webhook_port: int
    health_port: int
    version: str


def _crds(source: Path, webhook_url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's CRDs; those Kueue converts between API versions get the conversion webhook at
    ``webhook_url`` (the patches Kueue's own kustomization applies name which, with a Service we
    replace by a URL)."""
    crd_dir = source / "config" / "components" / "crd"
    bases = crd_dir / "bases"
    # the patches Kueue's kustomization applies (some in patches/ are left out: their kinds have no
    # conversion in this version)
    kustomization = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())
    converted = set()
    for entry in kustomization.get("patches") or []:
        if not str(entry.get("path", "")).startswith("patches/webhook_in_"):
            continue
        doc = yaml.safe_load((crd_dir / entry["path"]).read_text())
        if ((doc.get("spec") or {}).get("conversion") or {}).get("strategy") == "Webhook":
            converted.add(doc["metadata"]["name"])
    crds = []
    for path in sorted(bases.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["metadata"]["name"] in converted:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{webhook_url}/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"],
                },
            }
        crds.append(crd)
    return crds


def _webhook_configurations(source: Path, webhook_url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's admission webhook configurations, only the webhooks for Kueue's own API group, each
    reached by URL."""
    manifests = source / "config" / "components" / "webhook" / "manifests.yaml"
    out = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc:
            continue
        hooks = []
        for hook in doc.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if groups != {KUEUE_GROUP}:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{webhook_url}{path}", "caBundle": ca_bundle}
            hooks.append(hook)
        doc["metadata"] = {"name": f"kueue-{doc['metadata']['name']}"}
        doc["webhooks"] = hooks
        out.append(doc)
    return out


def _put(kube: Any, collection: str, manifest: dict[str, Any]) -> None:
    """Create, or replace what is there (a previous session on the same cluster)."""
    name = manifest["metadata"]["name"]
    if kube.create(collection, manifest):
        return
    current = kube.get(f"{collection}/{name}")
    manifest = {**manifest, "metadata": {**manifest["metadata"]}}
    manifest["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    status, payload = kube.request("PUT", f"{collection}/{name}", body=manifest)
    if status != 200:
        raise ClusterError(f"replacing {collection}/{name} failed: HTTP {status}: {payload}")


def start(cluster: Cluster, kube: Any) -> Kueue:
    """Install Kueue's CRDs and webhooks into ``cluster`` and start its manager; return once its
    webhooks answer through the API server. ``kube``: a ``relaunch.controller.kube.Kube`` (admin)."""
    started = time.monotonic()
    built = build()
    if not built.binary.exists():
        raise ClusterError(f"{built.binary} is missing; run `bash {BUILD_SCRIPT}`")
    state = cluster.state_dir / "kueue"
    certs = state / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    pki = ensure_leaf(
        cluster.state_dir / "pki", "kueue-webhook", "/CN=kueue-webhook", "serverAuth", ("IP:127.0.0.1",)
    )
    # controller-runtime's webhook server reads tls.crt/tls.key from its certDir; the metrics
    # server from /etc/kueue/metrics/certs, which the overlay's upper layer provides
    etc_upper, etc_work = state / "etc-upper", state / "etc-work"
    subprocess.run(["rm", "-rf", str(etc_work)], check=True)
    etc_work.mkdir(parents=True)
    metrics_certs = etc_upper / "kueue" / "metrics" / "certs"
    metrics_certs.mkdir(parents=True, exist_ok=True)
    for folder in (certs, metrics_certs):
        (folder / "tls.crt").write_bytes(pki.crt("kueue-webhook").read_bytes())
        (folder / "tls.key").write_bytes(pki.key("kueue-webhook").read_bytes())
        (folder / "tls.key").chmod(0o600)
    ca_bundle = base64.b64encode(pki.ca_crt.read_bytes()).decode()
    webhook_port, health_port = free_ports(2)
    webhook_url = f"https://127.0.0.1:{webhook_port}"

    crds = _crds(built.source, webhook_url, ca_bundle)
    for crd in crds:
        _put(kube, CRD_PATH, crd)

    def established() -> bool:
        for crd in crds:
            current = kube.get(f"{CRD_PATH}/{crd['metadata']['name']}") or {}
            conditions = {
                c["type"]: c["status"] for c in (current.get("status") or {}).get("conditions") or []
            }
            if conditions.get("Established") != "True":
                return False
        served = kube.get(f"/apis/{KUEUE_GROUP}/v1beta2") or {}  # discovery lags the condition a moment
        return {"workloads", "clusterqueues", "localqueues"} <= {
            r["name"] for r in served.get("resources") or []
        }

    wait_for(established, 30, "Kueue's CRDs Established and served")
    kube.create("/api/v1/namespaces", {"metadata": {"name": KUEUE_NAMESPACE}})
    config = {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(certs)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": [], "externalFrameworks": [EXTERNAL_FRAMEWORK]},
    }
    config_path = state / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    logs = cluster.logs_dir
    (logs / "kueue.log").write_bytes(b"")
    env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig))
    mount = f"mount -t overlay overlay -o lowerdir=/etc,upperdir={etc_upper},workdir={etc_work} /etc"
    command = (
        f"{mount} || {{ echo 'cannot mount an overlay on /etc in a mount namespace of its own' >&2; "
        'exit 1; }; exec "$@"'
    )
    pid = _spawn(
        "kueue",
        [
            "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", command, "kueue",
            str(built.binary), f"--config={config_path}", "--feature-gates=VisibilityOnDemand=false",
        ],
        logs,
        env=env,
    )  # fmt: skip
    cluster.pids["kueue"] = pid
    cluster.ports["kueue-webhook"] = webhook_port
    cluster.ports["kueue-health"] = health_port
    cluster.save()

    def alive() -> bool:
        if not cluster.running().get("kueue"):
            raise ClusterError(f"kueue exited during start-up:\n{cluster.log_tail('kueue', 40)}")
        return True

    wait_for(
        lambda: alive() and _get(f"http://127.0.0.1:{health_port}/readyz") == "ok",
        120,
        lambda: f"kueue /readyz; log tail:\n{cluster.log_tail('kueue', 30)}",
    )
    for configuration in _webhook_configurations(built.source, webhook_url, ca_bundle):
        kind = configuration["kind"]
        plural = (
            "mutatingwebhookconfigurations"
            if kind.startswith("Mutating")
            else "validatingwebhookconfigurations"
        )
        _put(kube, f"/apis/admissionregistration.k8s.io/v1/{plural}", configuration)

    # The webhooks answer through the API server: a dry-run ResourceFlavor passes both of them.
    def webhooks_answer() -> bool:
        alive()
        status, payload = kube.request(
            "POST",
            f"/apis/{KUEUE_GROUP}/v1beta2/resourceflavors",
            query={"dryRun": "All"},
            body={
                "apiVersion": f"{KUEUE_GROUP}/v1beta2",
                "kind": "ResourceFlavor",
                "metadata": {"name": "probe"},
            },
        )
        if status not in (200, 201):
            raise AssertionError(f"HTTP {status}: {payload}")
        return True

    wait_for(webhooks_answer, 60, lambda: f"Kueue's webhooks; log tail:\n{cluster.log_tail('kueue', 30)}")
    version = built.binary.parent.name.removeprefix("kueue-")
    log(f"kueue {version} ready, webhooks at {webhook_url} ({time.monotonic() - started:.1f} s)")
    return Kueue(pid=pid, webhook_port=webhook_port, health_port=health_port, version=version)
