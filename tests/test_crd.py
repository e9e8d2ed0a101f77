"""The CRD (crds/trainingjob.yaml) agrees with the code: every status field the controller writes
is declared (the API server silently drops undeclared ones), defaults match the model's, and the
cross-field rules exist. The API server's own verdict on bad objects is tested in e2e/test_crd.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from relaunch.model import RecoverySpec, SpecError, parse_spec

CRD_PATH = Path(__file__).resolve().parents[1] / "crds" / "trainingjob.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def undeclared(value: Any, node: dict[str, Any], path: str) -> list[str]:
    """Paths in ``value`` that the structural schema ``node`` does not declare."""
    if isinstance(value, dict):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        missing = []
        for key, sub in value.items():
            if key in props:
                missing += undeclared(sub, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                missing += undeclared(sub, extra, f"{path}.{key}")
            else:
                missing.append(f"{path}.{key}")
        return missing
    if isinstance(value, list):
        return [
            m
            for i, item in enumerate(value)
            for m in undeclared(item, node.get("items") or {}, f"{path}[{i}]")
        ]
    return []


def test_identity(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "trainingjobs.relaunch.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("TrainingJob", "trainingjobs", ["tj"])
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Workers", "Restarts", "Step", "Progress", "Age"]


def test_every_status_field_the_controller_writes_is_declared(crd: dict[str, Any]) -> None:
    from test_reconcile import Sim, make_spec, plan

    status_schema = schema(crd)["properties"]["status"]
    seen: list[dict[str, Any]] = []
    sim = Sim(make_spec(replicas=2))
    sim.start_running()
    seen.append(sim.status)
    sim.fail_pod("demo-1-0")
    sim.step()
    seen.append(sim.status)
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("resume", step=5, epoch=1, file="f", ranks=2, kind="sharded"))
    sim.step()
    seen.append(sim.status)
    sim.run_all()
    sim.step()
    seen.append(sim.status)
    sim.spec_body = make_spec(replicas=1)
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-3", plan("convert", step=5, convert_command=["c"], conversion_record="{}"))
    sim.step()
    seen.append(sim.status)
    sim.finish_job("demo-convert-3", "{}")
    sim.step()
    seen.append(sim.status)
    sim.fail_pod("demo-3-0", code=2)
    sim.step()
    seen.append(sim.status)
    assert sim.status["phase"] == "Failed"
    # Suspended in the middle of a conversion, then resumed.
    sim = Sim(make_spec(replicas=2))
    sim.start_running()
    sim.spec_body = make_spec(replicas=1)
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("convert", step=5, convert_command=["c"], conversion_record="{}"))
    sim.step()
    sim.spec_body = make_spec(replicas=1, suspend=True)
    sim.step()
    seen.append(sim.status)
    assert sim.status["phase"] == "Suspended"
    sim.spec_body = make_spec(replicas=1, suspend=False)
    sim.step()
    seen.append(sim.status)
    for status in seen:
        assert undeclared(status, status_schema, "status") == []


def test_phase_enum_matches_the_state_machine(crd: dict[str, Any]) -> None:
    from relaunch.controller import reconcile

    phases = schema(crd)["properties"]["status"]["properties"]["phase"]["enum"]
    assert set(phases) == {
        reconcile.PENDING,
        reconcile.RUNNING,
        reconcile.RECOVERING,
        reconcile.CONVERTING,
        reconcile.SUSPENDED,
        reconcile.QUEUED,
        reconcile.SUCCEEDED,
        reconcile.FAILED,
    }


def test_defaults_match_the_model(crd: dict[str, Any]) -> None:
    spec = schema(crd)["properties"]["spec"]["properties"]
    recovery = spec["recovery"]["properties"]
    model = RecoverySpec()
    assert recovery["maxRestarts"]["default"] == model.max_restarts
    assert recovery["nodeLossGraceSeconds"]["default"] == model.node_loss_grace_seconds
    assert recovery["backoff"]["properties"]["initialSeconds"]["default"] == model.backoff_initial_seconds
    assert recovery["backoff"]["properties"]["maxSeconds"]["default"] == model.backoff_max_seconds
    assert set(recovery["permanentExitCodes"]["default"]) == set(model.permanent_exit_codes)
    assert spec["ranksPerWorker"]["default"] == 1
    assert (
        spec["suspend"]["default"]
        is parse_spec(
            {
                "replicas": 1,
                "template": {"spec": {"containers": [{"name": "t"}]}},
                "checkpoint": {"dir": "/c"},
            }
        ).suspend
    )
    assert spec["checkpoint"]["properties"]["resume"]["default"] == "Latest"
    assert spec["config"]["properties"]["mountPath"]["default"] == "/etc/relaunch/train.yaml"


def test_cross_field_rules_exist(crd: dict[str, Any]) -> None:
    rules = " ".join(r["rule"] for r in schema(crd)["properties"]["spec"]["x-kubernetes-validations"])
    assert "self.elastic.minReplicas <= self.replicas" in rules
    assert "unifiedDir" in rules
    assert "validSizes" in rules


def test_every_property_is_documented(crd: dict[str, Any]) -> None:
    undocumented = []

    def walk(node: dict[str, Any], path: str) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if path.startswith("status") or key in ("apiVersion", "kind", "metadata"):
                pass
            elif "description" not in sub:
                undocumented.append(f"{path}.{key}")
            walk(sub, f"{path}.{key}")

    walk(schema(crd)["properties"]["spec"], "spec")
    assert undocumented == []


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"replicas": 0}, "spec.replicas"),
        ({"elastic": {"minReplicas": 5}}, "spec.elastic.minReplicas"),
        ({"checkpoint": {"dir": "/c", "resume": "Unified"}}, "spec.checkpoint.unifiedDir"),
        ({"template": {"spec": {"containers": []}}}, "spec.template.spec.containers"),
        ({"config": {"text": "a: 1", "inline": {"a": 1}}}, "spec.config"),
        ({"suspend": "yes"}, "spec.suspend"),
    ],
)
def test_model_names_the_bad_field(patch: dict[str, Any], field: str) -> None:
    body = {
        "replicas": 2,
        "template": {"spec": {"containers": [{"name": "t"}]}},
        "checkpoint": {"dir": "/c"},
        **patch,
    }
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(body)
