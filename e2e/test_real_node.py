"""The real image on a real node: the chart's operator as a container under a real kubelet.

The ``real_node`` fixture joins ``real-0`` to the session's cluster (containerd, runc, a kubelet of
the same release; e2e/cluster/realnode.py) with the image ``scripts/image.sh`` built. The chart is
installed with that image and runs there as its numeric user on a read-only root filesystem; the
planning and conversion Jobs run there from the same image; the demo trainer's workers run there
as containers of that image too (its code and ``safetensors``, which the image deliberately lacks,
mounted from the checkout and its environment). What only a kubelet does is then checked: a
worker killed in its container, a memory limit exceeded and reported ``OOMKilled``, an image that
is not there.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors

from e2e.cluster import control, realnode
from e2e.demo import helm, install_chart, kubectl
from e2e.test_recovery import (  # the fixtures are shared with the recovery scenarios
    Jobs,
    WaitFor,
    api,  # noqa: F401
    complete_steps,
    condition,
    jobs,  # noqa: F401
    trainer_config,
    trainingjob,
    wait_running,
)
from relaunch.controller.kube import Kube

pytestmark = pytest.mark.e2e

IMAGE = realnode.PROJECT_IMAGE
SOURCE = "/opt/relaunch-src"
DEPS = "/opt/trainer-deps"
ON_THE_REAL_NODE = {
    "nodeSelector": {realnode.NODE_KEY: "true"},
    "tolerations": [{"key": realnode.NODE_KEY, "operator": "Exists", "effect": "NoSchedule"}],
}


@pytest.fixture(scope="module")
def image_operator(cluster: control.Cluster, real_node: realnode.RealNode) -> Iterator[dict[str, Any]]:
    """The chart, installed with the built image, its operator pod on the real node, serving every
    namespace for this module's tests; uninstalled after them."""
    release, namespace = f"rn{uuid.uuid4().hex[:6]}", f"relaunch-real-{uuid.uuid4().hex[:5]}"
    values, strings = realnode.chart_values(IMAGE)
    install_chart(cluster, release, namespace, values, strings=strings)
    try:
        pods = control.wait_for(
            lambda: [
                p
                for p in json.loads(kubectl(cluster, "get", "pods", "-n", namespace, "-o", "json").stdout)[
                    "items"
                ]
                if p["status"].get("phase") == "Running"
            ],
            120,
            "the operator pod to run",
        )
        yield pods[0]
    finally:
        helm(cluster, "uninstall", release, "-n", namespace, "--wait", check=False)
        kubectl(cluster, "delete", "namespace", namespace, "--wait=false", check=False)


def real_node_job(name: str, shared: Path, config: str, *, replicas: int, **spec: Any) -> dict[str, Any]:
    """The demo trainer on the real node: containers of the image, on the node's network (rank 0's
    address is 127.0.0.1: there is no cluster DNS), as user 65532, on ``shared``."""
    manifest = trainingjob(name, shared, config, replicas=replicas, image=IMAGE, **spec)
    pod = manifest["spec"]["template"]["spec"]
    pod.update(ON_THE_REAL_NODE)
    pod["hostNetwork"] = True
    pod["securityContext"] = {"runAsUser": 65532, "runAsGroup": 65532}
    (container,) = pod["containers"]
    container.update(image=IMAGE, imagePullPolicy="Never", workingDir=SOURCE)
    container["env"] += [
        {"name": "MASTER_ADDR", "value": "127.0.0.1"},
        {"name": "MASTER_PORT", "value": str(control.free_ports(1)[0])},
        {"name": "PYTHONPATH", "value": DEPS},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]
    container["volumeMounts"] += [
        {"name": "source", "mountPath": SOURCE, "readOnly": True},
        {"name": "deps", "mountPath": f"{DEPS}/safetensors", "readOnly": True},
    ]
    pod["volumes"] += [
        {"name": "source", "hostPath": {"path": str(control.REPO_ROOT), "type": "Directory"}},
        {"name": "deps", "hostPath": {"path": os.path.dirname(safetensors.__file__), "type": "Directory"}},
    ]
    return manifest


@pytest.fixture
def open_shared(tmp_path: Path) -> Path:
    """A folder the containers' user may write (pytest's own folders are private to root)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    return folder


def on_real_node(pods: list[dict[str, Any]]) -> bool:
    return bool(pods) and all(p["spec"].get("nodeName") == realnode.NODE_NAME for p in pods)


def test_the_image_operator_on_a_real_node_recovers_a_killed_worker_and_a_resize(
    cluster: control.Cluster,
    real_node: realnode.RealNode,
    image_operator: dict[str, Any],
    jobs: Jobs,
    wait_for: WaitFor,
    open_shared: Path,
) -> None:
    """The chart's operator runs from the image on the real node as user 65532 with a read-only
    root; a worker SIGKILLed in its container makes it restart the gang from the newest complete
    step, and an edit of ``replicas`` 2 -> 1 converts that checkpoint, the planning and conversion
    Jobs running from the same image there."""
    pod = image_operator
    assert pod["spec"]["nodeName"] == realnode.NODE_NAME
    (status,) = pod["status"]["containerStatuses"]
    assert status["image"].endswith(IMAGE.split("/", 1)[1]) and status["imageID"].startswith(
        ("sha256:", "localhost/")
    ), status
    probe = "import os; print(os.getuid(), os.getgid()); open('/probe', 'w')"
    execed = kubectl(
        cluster, "exec", "-n", pod["metadata"]["namespace"], pod["metadata"]["name"], "--",
        "python", "-c", probe, check=False,
    )  # fmt: skip
    assert execed.stdout.split() == ["65532", "65532"], execed.stdout + execed.stderr
    assert "Read-only file system" in execed.stderr, execed.stderr

    config = trainer_config(data_parallel=2, step_delay_seconds=0.3)
    jobs.create(real_node_job("real", open_shared, config, replicas=2))
    wait_running(jobs, wait_for, "real", 1, 120)
    assert on_real_node(jobs.workers("real", 1))
    wait_for(lambda: (1, 5) in complete_steps(open_shared, 2), 90, "step 5 saved on both ranks")

    victim = next(p for p in jobs.workers("real", 1) if p["metadata"]["name"] == "real-1-1")
    real_node.kill_container(victim["status"]["containerStatuses"][0]["containerID"])
    status = wait_running(jobs, wait_for, "real", 2, 120)
    assert status["restarts"] == 1
    failure = status["lastFailure"]
    assert failure["pod"] == "real-1-1" and failure["reason"] == "WorkerFailed", failure
    assert failure.get("exitCode") == 137, failure  # SIGKILL, as the kubelet reports it
    assert status["checkpoint"]["step"] >= 5, status["checkpoint"]
    assert on_real_node(jobs.workers("real", 2))

    jobs.merge_patch("real", {"spec": {"replicas": 1}})
    status = wait_running(jobs, wait_for, "real", 3, 180)
    assert status["workers"] == 1 and status.get("restarts") == 1
    entry = status["recoveries"][-1]
    assert entry["reason"] == "ReplicasChanged" and entry["converted"] is True, entry
    helpers = [p for p in jobs.pods("real") if p["metadata"]["labels"].get("relaunch.dev/role") != "worker"]
    roles = {p["metadata"]["labels"]["relaunch.dev/role"] for p in helpers}
    assert roles == {"plan", "convert"}, roles
    assert on_real_node(helpers)
    for helper in helpers:
        (container,) = helper["status"]["containerStatuses"]
        assert container["image"].endswith(IMAGE.split("/", 1)[1]), container
        assert container["state"]["terminated"]["exitCode"] == 0, container


def test_a_worker_over_its_memory_limit_is_oomkilled_by_the_kubelet_and_recovered(
    image_operator: dict[str, Any], jobs: Jobs, wait_for: WaitFor, open_shared: Path
) -> None:
    """A worker of the first attempt allocates past its 64 MiB limit: the kernel kills it, the
    kubelet says ``OOMKilled``, and the operator restarts the gang with that reason."""
    hungry = (
        'if [ "$RELAUNCH_ATTEMPT" = 1 ]; then exec python -c "import time; b = b\'x\' * (256 << 20); '
        'time.sleep(60)"; fi; exec sleep 100000'
    )
    manifest = real_node_job("hungry", open_shared, trainer_config(), replicas=1)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    container["command"] = ["sh", "-c", hungry]
    container["resources"] = {"limits": {"memory": "64Mi"}, "requests": {"memory": "64Mi"}}
    jobs.create(manifest)
    status = wait_running(jobs, wait_for, "hungry", 2, 120)
    failure = status["lastFailure"]
    assert failure["reason"] == "OOMKilled" and failure["pod"] == "hungry-1-0", failure
    assert status["restarts"] == 1
    assert status["recoveries"][-1]["reason"] == "OOMKilled", status["recoveries"][-1]


def test_a_worker_whose_image_is_absent_is_reported_with_the_kubelets_reason(
    image_operator: dict[str, Any], api: Kube, jobs: Jobs, wait_for: WaitFor, open_shared: Path
) -> None:
    """A worker image that is not on the node (pull policy Never): the kubelet's reason,
    ``ErrImageNeverPull``, and its words are the job's status at once, not after a deadline."""
    absent = "localhost/relaunch-absent:none"
    manifest = real_node_job("absent", open_shared, trainer_config(), replicas=1)
    manifest["spec"]["template"]["spec"]["containers"][0]["image"] = absent
    jobs.create(manifest)
    status = wait_for(
        lambda: condition(s := jobs.status("absent"), "Ready").get("reason") == "ErrImageNeverPull" and s,
        90,
        lambda: f"ErrImageNeverPull:\n{jobs.describe('absent')}",
    )
    assert "cannot start: ErrImageNeverPull" in status["message"], status["message"]
    assert absent in status["message"] and "Never" in status["message"], status["message"]
    assert "Stalled" not in {c["type"] for c in status.get("conditions") or []}
    assert status.get("restarts", 0) == 0
