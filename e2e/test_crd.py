"""The CRD on a real API server: malformed TrainingJobs are rejected naming the field, defaults
are filled in, and the printer columns are what ``kubectl get trainingjobs`` shows."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from e2e.test_recovery import install_crd
from relaunch.controller.kube import Kube, trainingjob_path


def body(name: str = "tj", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "replicas": 2,
        "template": {"spec": {"containers": [{"name": "t", "image": "x", "command": ["true"]}]}},
        "checkpoint": {"dir": "/shared/checkpoint"},
    }
    base.update(spec)
    return {
        "apiVersion": "relaunch.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": base,
    }


@pytest.fixture
def api(kube: Any) -> Kube:
    client = Kube(kube)
    install_crd(client)
    return client


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"replicas": 0}, "spec.replicas", "greater than or equal to 1"),
        ({"elastic": {"minReplicas": 3}}, "spec.elastic.minReplicas", "must be <= spec.replicas"),
        ({"elastic": {"minReplicas": 1, "validSizes": [1, 4]}}, "spec.elastic.validSizes", "between"),
        (
            {"checkpoint": {"dir": "/c", "resume": "Unified"}},
            "spec.checkpoint.unifiedDir",
            "required when spec.checkpoint.resume is Unified",
        ),
        ({"checkpoint": {"dir": "/c", "resume": "../etc/passwd"}}, "spec.checkpoint.resume", "should match"),
        ({"checkpoint": {"dir": "/c", "format": "npz"}}, "spec.checkpoint.format", "Unsupported value"),
        ({"checkpoint": {"dir": "relative/path"}}, "spec.checkpoint.dir", "should match"),
        ({"config": {"text": "a: 1", "inline": {"a": 1}}}, "spec.config", "exactly one of"),
        ({"recovery": {"maxRestarts": -1}}, "spec.recovery.maxRestarts", "greater than or equal to 0"),
        ({"recovery": {"permanentExitCodes": [0]}}, "spec.recovery.permanentExitCodes[0]", "greater than"),
        ({"template": {"spec": {"containers": []}}}, "spec.template.spec.containers", "at least 1"),
        (
            {"recovery": {"backoff": {"initialSeconds": 600}}},
            "spec.recovery.backoff",
            "initialSeconds must be <= spec.recovery.backoff.maxSeconds",
        ),
        (
            {"recovery": {"deadlines": {"startingSeconds": 0}}},
            "spec.recovery.deadlines.startingSeconds",
            "greater than or equal to 1",
        ),
    ],
)
def test_malformed_trainingjob_is_rejected_naming_the_field(
    api: Kube, namespace: str, spec: dict[str, Any], field: str, words: str
) -> None:
    status, payload = api.request(
        "POST", trainingjob_path(namespace), query={"dryRun": "All"}, body=body(**spec)
    )
    assert status == 422, payload
    message = payload["message"]
    assert field in message and words in message, message


def test_long_name_is_rejected(api: Kube, namespace: str) -> None:
    status, payload = api.request(
        "POST", trainingjob_path(namespace), query={"dryRun": "All"}, body=body("x" * 41)
    )
    assert status == 422 and "at most 40 characters" in payload["message"], payload


@pytest.mark.parametrize("name", ["job.v2", "2nd-run"])
def test_a_name_that_cannot_name_a_service_and_hostnames_is_rejected(
    api: Kube, namespace: str, name: str
) -> None:
    status, payload = api.request(
        "POST", trainingjob_path(namespace), query={"dryRun": "All"}, body=body(name)
    )
    assert status == 422, payload
    assert "must be a DNS-1035 label" in payload["message"] and "no dots" in payload["message"], payload


def test_defaults_are_filled_in(api: Kube, namespace: str) -> None:
    status, payload = api.request("POST", trainingjob_path(namespace), query={"dryRun": "All"}, body=body())
    assert status == 201, payload
    spec = payload["spec"]
    assert spec["ranksPerWorker"] == 1
    assert spec["checkpoint"] == {
        "dir": "/shared/checkpoint",
        "format": "safetensors",
        "resume": "Latest",
        "conversion": "Unify",
    }
    assert spec["recovery"] == {
        "maxRestarts": 10,
        "backoff": {"initialSeconds": 10, "maxSeconds": 300},
        "nodeLossGraceSeconds": 30,
        "permanentExitCodes": [2],
        "deadlines": {
            "stoppingSeconds": 300,
            "planningSeconds": 600,
            "convertingSeconds": 3600,
            "startingSeconds": 600,
        },
        "quarantine": {"enabled": True, "failures": 2, "windowSeconds": 3600, "cooldownSeconds": 1800},
    }


def test_printer_columns_and_explain(api: Kube, namespace: str, cluster: Any) -> None:
    status, payload = api.request("POST", trainingjob_path(namespace), body=body())
    assert status == 201, payload
    kubectl = [cluster.kubectl(), "--kubeconfig", str(Path(cluster.kubeconfig))]
    out = subprocess.run([*kubectl, "get", "tj", "-n", namespace], capture_output=True, text=True, check=True)
    header = out.stdout.split("\n")[0].split()
    assert header == ["NAME", "PHASE", "WORKERS", "RESTARTS", "STEP", "PROGRESS", "AGE"]
    explain = subprocess.run(
        [*kubectl, "explain", "trainingjob.spec.recovery.nodeLossGraceSeconds"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "unreachable" in explain.stdout or "heartbeating" in explain.stdout, explain.stdout
