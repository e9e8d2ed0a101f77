"""Manifests the operator creates (relaunch.resources): names, labels, owners, env, mounts."""

from __future__ import annotations

from typing import Any

from relaunch import resources
from relaunch.model import parse_spec

REF = resources.JobRef("qwen", "team-a", "uid-9")


def spec_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "replicas": 4,
        "ranksPerWorker": 2,
        "image": "registry/relaunch:1",
        "template": {
            "metadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}},
            "spec": {
                "nodeSelector": {"pool": "gpu"},
                "containers": [
                    {
                        "name": "trainer",
                        "image": "trainer:1",
                        "env": [
                            {"name": "MASTER_ADDR", "value": "127.0.0.1"},
                            {"name": "EXTRA", "value": "1"},
                        ],
                        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
                    },
                    {"name": "sidecar", "image": "side:1"},
                ],
                "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": "ckpt"}}],
            },
        },
        "checkpoint": {"dir": "/shared/output/checkpoint"},
        "config": {"text": "a: 1\n", "mountPath": "/etc/train/job.yaml"},
    }
    body.update(overrides)
    return body


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_worker_pod_identity_labels_and_owner() -> None:
    pod = resources.build_worker_pod(REF, parse_spec(spec_body()), attempt=3, index=1, replicas=4)
    meta = pod["metadata"]
    assert meta["name"] == "qwen-3-1"
    assert meta["namespace"] == "team-a"
    assert meta["labels"] == {
        "team": "a",
        "relaunch.dev/job": "qwen",
        "relaunch.dev/role": "worker",
        "relaunch.dev/attempt": "3",
        "relaunch.dev/worker-index": "1",
    }
    assert meta["annotations"] == {"note": "x"}
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "relaunch.dev/v1alpha1",
        "kind": "TrainingJob",
        "name": "qwen",
        "uid": "uid-9",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["hostname"] == "qwen-3-1" and spec["subdomain"] == "qwen"
    assert spec["nodeSelector"] == {"pool": "gpu"}


def test_rank_environment_and_user_overrides() -> None:
    pod = resources.build_worker_pod(REF, parse_spec(spec_body()), attempt=3, index=1, replicas=4)
    env = env_of(pod["spec"]["containers"][0])
    assert env["RANK_ID"] == "2" and env["RANK"] == "2"  # first rank of worker 1 with 2 ranks/worker
    assert env["RANK_SIZE"] == env["WORLD_SIZE"] == env["MS_WORKER_NUM"] == "8"
    assert env["MS_NODE_RANK"] == "1"
    assert env["RELAUNCH_RANKS_PER_WORKER"] == "2" and env["RELAUNCH_ATTEMPT"] == "3"
    assert env["MS_SCHED_HOST"] == "qwen-3-0.qwen.team-a.svc"
    assert env["MASTER_ADDR"] == "127.0.0.1"  # the template's own value wins
    assert env["MASTER_PORT"] == "29500" and env["EXTRA"] == "1"
    assert env["RELAUNCH_CONFIG"] == "/etc/train/job.yaml"
    names = [e["name"] for e in pod["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names))


def test_config_is_mounted_from_the_attempts_configmap() -> None:
    pod = resources.build_worker_pod(REF, parse_spec(spec_body()), attempt=3, index=0, replicas=4)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["relaunch-config"]["configMap"] == {
        "name": "qwen-config-3",
        "items": [{"key": "train.yaml", "path": "job.yaml"}],
    }
    for container in pod["spec"]["containers"]:
        assert {"name": "relaunch-config", "mountPath": "/etc/train"} in container["volumeMounts"]
    cm = resources.build_config_map(REF, 3, "x: 1\n")
    assert cm["metadata"]["name"] == "qwen-config-3" and cm["data"] == {"train.yaml": "x: 1\n"}


def test_building_does_not_modify_the_template() -> None:
    body = spec_body()
    spec = parse_spec(body)
    resources.build_worker_pod(REF, spec, attempt=1, index=0, replicas=4)
    assert "hostname" not in body["template"]["spec"]
    assert len(body["template"]["spec"]["containers"][0]["env"]) == 2


def test_headless_service_selects_workers() -> None:
    svc = resources.build_service(REF)
    assert svc["metadata"]["name"] == "qwen"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"relaunch.dev/job": "qwen", "relaunch.dev/role": "worker"}


def test_plan_job_mounts_the_jobs_volumes_and_reports_through_termination_log() -> None:
    job = resources.build_plan_job(REF, parse_spec(spec_body()), 5, ["relaunch", "plan", "/x"])
    assert job["metadata"]["name"] == "qwen-plan-5"
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "ckpt"}}]
    (container,) = pod["containers"]
    assert container["image"] == "registry/relaunch:1"
    assert container["command"] == ["relaunch", "plan", "/x"]
    assert container["volumeMounts"] == [{"name": "shared", "mountPath": "/shared"}]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert pod["nodeSelector"] == {"pool": "gpu"}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["relaunch.dev/job"] == "qwen" and labels["relaunch.dev/role"] == "plan"


def test_helper_image_falls_back_to_the_operator_setting() -> None:
    spec = parse_spec(spec_body(image=None))
    assert resources.helper_image(spec, {"RELAUNCH_IMAGE": "op/relaunch:2"}) == "op/relaunch:2"
    assert resources.helper_image(spec, {}) == resources.DEFAULT_IMAGE
    convert = resources.build_convert_job(REF, parse_spec(spec_body()), 2, ["relaunch", "convert"])
    assert convert["metadata"]["name"] == "qwen-convert-2"
    assert convert["metadata"]["labels"]["relaunch.dev/role"] == "convert"


def test_no_config_means_no_config_volume() -> None:
    body = spec_body()
    del body["config"]
    pod = resources.build_worker_pod(REF, parse_spec(body), attempt=1, index=0, replicas=4)
    assert all(v["name"] != "relaunch-config" for v in pod["spec"]["volumes"])


def test_lost_nodes_are_excluded_in_every_selector_term() -> None:
    body = spec_body()
    body["template"]["spec"]["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    pod = resources.build_worker_pod(REF, parse_spec(body), 2, 0, 4, avoid_nodes=["n2", "n1"])
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {
            "matchExpressions": [
                {"key": "pool", "operator": "In", "values": ["a"]},
                {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["n1", "n2"]},
            ]
        }
    ]
    plain = resources.build_worker_pod(REF, parse_spec(spec_body()), 2, 0, 4)
    assert "affinity" not in plain["spec"]
