"""Tests of the testbed itself: pods really run, report like a kubelet, and the control plane's real
controllers (Job, ReplicaSet, node lifecycle, garbage collector, RBAC) act on them."""

from __future__ import annotations

import datetime as dt
import json
import queue
import re
import shutil
import ssl
import subprocess
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import watch as k8s_watch

from e2e.cluster import AgentControl
from e2e.cluster.control import AlreadyRunning, binaries_dir, evict_pod, free_ports, up
from e2e.nodeagent import (
    STAGE_CANDIDATES,
    LogOptions,
    LogRenderer,
    choose_stage,
    cri_records,
    keep_image_visible,
    mount_script,
    parse_rfc3339,
    parse_selector,
    process_state,
    selector_matches,
    tail_start,
)

pytestmark = pytest.mark.e2e


def pod_manifest(name: str, script: str, **spec: Any) -> dict[str, Any]:
    """A pod whose single container runs ``python -c script`` (images are ignored by the testbed)."""
    container = {
        "name": "main",
        "image": "python:3.11",
        "command": ["python", "-c", textwrap.dedent(script)],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
    }
    container.update(spec.pop("container", {}))
    body: dict[str, Any] = {
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container]},
    }
    body["metadata"].update(spec.pop("metadata", {}))
    body["spec"].update(spec)
    return body


def phase_is(core: k8s.CoreV1Api, ns: str, name: str, *phases: str) -> Any:
    pod = core.read_namespaced_pod(name, ns)
    return pod if pod.status.phase in phases else None


def describe_pod(core: k8s.CoreV1Api, ns: str, name: str) -> Any:
    def describe() -> str:
        try:
            pod = core.read_namespaced_pod(name, ns)
        except k8s.ApiException as error:
            return f"pod {ns}/{name} ({error.status})"
        statuses = pod.status.container_statuses
        return f"pod {ns}/{name} on {pod.spec.node_name}: phase {pod.status.phase}, containers {statuses}"

    return describe


def test_pod_runs_with_env_volumes_and_reports_exit_code_and_message(kube, namespace, wait_for, cluster):
    core = k8s.CoreV1Api(kube)
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "train"}, "data": {"train.yaml": "seed: 7\n", "WORLD": "8"}}
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}}
    )
    script = """
        import os, socket, sys
        print("hostname", socket.gethostname(), "pod", os.environ["POD_NAME"], "ip", os.environ["POD_IP"])
        print("config", open("/etc/relaunch/train.yaml").read().strip())
        open("/scratch/x", "w").write("ok")
        print("world", os.environ["CFG_WORLD"], "token", os.environ["TOKEN"], "rank", os.environ["RANK_ENV"])
        print("labels", open("/etc/podinfo/labels").read().replace(chr(10), ","))
        print("secret", open("/etc/creds/token").read())
        try:
            open("/etc/creds/new", "w")
        except OSError as error:
            print("read-only", error.errno)
        open("/dev/termination-log", "w").write("checkpoint step 42 is corrupt on rank 3")
        sys.exit(3)
    """
    body = pod_manifest(
        "exits-three",
        script,
        container={
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "RANK_ENV", "value": "rank-of-$(POD_NAME)"},
            ],
            "envFrom": [{"configMapRef": {"name": "train"}, "prefix": "CFG_"}],
            "volumeMounts": [
                {"name": "podinfo", "mountPath": "/etc/podinfo"},
                {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
                {"name": "config", "mountPath": "/etc/relaunch/train.yaml", "subPath": "train.yaml"},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        },
        volumes=[
            {"name": "config", "configMap": {"name": "train"}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "creds", "secret": {"secretName": "creds"}},
            {
                "name": "podinfo",
                "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
            },
        ],
        metadata={"labels": {"rank": "3"}},
    )
    core.create_namespaced_pod(namespace, body)
    pod = wait_for(
        lambda: phase_is(core, namespace, "exits-three", "Succeeded", "Failed"),
        30,
        describe_pod(core, namespace, "exits-three"),
    )
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert terminated.message == "checkpoint step 42 is corrupt on rank 3"
    assert pod.status.pod_ip.startswith("127.") and pod.status.pod_ip != "127.0.0.1"
    assert pod.status.host_ip.startswith("127.")
    conditions = {c.type: c.status for c in pod.status.conditions}
    assert conditions["Ready"] == "False" and conditions["PodScheduled"] == "True"
    log = cluster.pod_log(namespace, "exits-three")
    assert f"hostname exits-three pod exits-three ip {pod.status.pod_ip}" in log
    assert "config seed: 7" in log
    assert "world 8 token s3cret rank rank-of-exits-three" in log
    assert 'labels rank="3"' in log
    assert "secret s3cret" in log
    assert "read-only 30" in log  # EROFS: the secret is mounted read-only


def test_batch_job_completes_through_the_job_controller(kube, namespace, wait_for):
    batch, core = k8s.BatchV1Api(kube), k8s.CoreV1Api(kube)
    # fails once, then succeeds: restartPolicy OnFailure restarts the container in place (same emptyDir)
    script = """
        import os, sys, numpy, relaunch
        if not os.path.exists("/scratch/tried"):
            open("/scratch/tried", "w").close(); sys.exit(1)
        print("numpy", numpy.__version__)
    """
    template = pod_manifest(
        "unused",
        script,
        restartPolicy="OnFailure",
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    job = {
        "metadata": {"name": "two-pods"},
        "spec": {
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 4,
            "template": {"spec": template["spec"]},
        },
    }
    batch.create_namespaced_job(namespace, job)

    def complete() -> Any:
        status = batch.read_namespaced_job("two-pods", namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in status.conditions or []) and status

    status = wait_for(
        complete,
        40,
        lambda: f"Job two-pods Complete: {batch.read_namespaced_job('two-pods', namespace).status}",
    )
    assert status.succeeded == 2
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=two-pods").items
    assert [p.status.container_statuses[0].restart_count for p in pods] == [1, 1]
    assert {p.status.container_statuses[0].last_state.terminated.exit_code for p in pods} == {1}


def test_a_second_up_refuses_while_the_cluster_runs(cluster):
    with pytest.raises(AlreadyRunning, match="already running"):
        up(cluster.state_dir)


def test_pods_share_a_claim_and_find_each_other_by_headless_service_name(kube, namespace, wait_for, cluster):
    core = k8s.CoreV1Api(kube)
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "shared"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    # Pods share the host's network namespace (other clusters may run beside this one): the server
    # listens on its pod's own IP, on a port that is free right now.
    port = free_ports(1)[0]
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "rdv"},
            "spec": {"clusterIP": "None", "selector": {"job": "rdv"}, "ports": [{"port": port}]},
        },
    )
    server = """
        import os, socket
        s = socket.create_server((os.environ["POD_IP"], int(os.environ["PORT"]))); s.settimeout(60)
        conn, peer = s.accept()
        open("/shared/output/server.txt", "w").write(conn.recv(100).decode())
    """
    client = """
        import os, socket, time
        master = os.environ["MASTER_ADDR"]
        for _ in range(300):
            try:
                conn = socket.create_connection((master, int(os.environ["PORT"])), timeout=1); break
            except OSError:
                time.sleep(0.1)
        conn.sendall(("hello from " + os.environ["HOSTNAME"]).encode())
        open("/shared/output/client.txt", "w").write(socket.gethostbyname(master))
    """
    common = {
        "metadata": {"labels": {"job": "rdv"}},
        "subdomain": "rdv",
        "volumes": [{"name": "out", "persistentVolumeClaim": {"claimName": "shared"}}],
    }
    mounts = [{"name": "out", "mountPath": "/shared/output"}]
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "PORT", "value": str(port)},
        {"name": "MASTER_ADDR", "value": f"worker-0.rdv.{namespace}.svc.cluster.local"},
    ]
    core.create_namespaced_pod(
        namespace,
        pod_manifest(
            "worker-0", server, hostname="worker-0", container={"volumeMounts": mounts, "env": env}, **common
        ),
    )
    core.create_namespaced_pod(
        namespace,
        pod_manifest(
            "worker-1", client, hostname="worker-1", container={"volumeMounts": mounts, "env": env}, **common
        ),
    )
    for name in ("worker-0", "worker-1"):
        pod = wait_for(
            lambda n=name: phase_is(core, namespace, n, "Succeeded", "Failed"),
            60,
            describe_pod(core, namespace, name),
        )
        assert pod.status.phase == "Succeeded", cluster.pod_log(namespace, name)
    pvc = core.read_namespaced_persistent_volume_claim("shared", namespace)
    folder = Path(core.read_persistent_volume(pvc.spec.volume_name).spec.host_path.path)
    assert (folder / "server.txt").read_text() == "hello from worker-1"
    assert (folder / "client.txt").read_text() == core.read_namespaced_pod(
        "worker-0", namespace
    ).status.pod_ip


def test_kill_pod_reports_137_and_deletion_is_graceful(
    kube, namespace, wait_for, node_agent: AgentControl, cluster
):
    core = k8s.CoreV1Api(kube)
    sleeper = "import time; time.sleep(600)"
    graceful = """
        import signal, sys, time
        def stop(*_):
            print("got SIGTERM, saving"); sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("running"); time.sleep(600)
    """
    core.create_namespaced_pod(namespace, pod_manifest("victim", sleeper))
    core.create_namespaced_pod(namespace, pod_manifest("graceful", graceful))
    for name in ("victim", "graceful"):
        wait_for(
            lambda n=name: phase_is(core, namespace, n, "Running"), 30, describe_pod(core, namespace, name)
        )
    node_agent.kill_pod(namespace, "victim")
    pod = wait_for(
        lambda: phase_is(core, namespace, "victim", "Failed"), 20, describe_pod(core, namespace, "victim")
    )
    assert pod.status.container_statuses[0].state.terminated.exit_code == 137
    wait_for(
        lambda: "running" in cluster.pod_log(namespace, "graceful"), 20, "the graceful pod to print 'running'"
    )
    core.delete_namespaced_pod("graceful", namespace, grace_period_seconds=20)
    started = time.monotonic()

    def gone() -> bool:
        try:
            core.read_namespaced_pod("graceful", namespace)
        except k8s.ApiException as error:
            return error.status == 404
        return False

    wait_for(gone, 20, describe_pod(core, namespace, "graceful"))
    assert time.monotonic() - started < 15, "a pod that exits on SIGTERM must not wait out its grace period"
    assert "got SIGTERM, saving" in cluster.pod_log(namespace, "graceful")


def watch_until_deleted(core: k8s.CoreV1Api, ns: str, name: str, since: str, timeout: int = 60) -> list[Any]:
    """Every version of the pod from resourceVersion ``since`` until it is deleted (the last one is
    the object as the API server removed it); fails if it is not deleted within ``timeout`` s."""
    seen = []
    stream = k8s_watch.Watch().stream(
        core.list_namespaced_pod,
        ns,
        field_selector=f"metadata.name={name}",
        resource_version=since,
        timeout_seconds=timeout,
    )
    for event in stream:
        seen.append(event["object"])
        if event["type"] == "DELETED":
            return seen
    phases = [p.status.phase for p in seen]
    raise AssertionError(f"pod {ns}/{name} not deleted within {timeout} s; phases seen: {phases}")


def conditions_of(pod: Any) -> dict[str, Any]:
    return {c.type: c for c in pod.status.conditions or []}


def test_a_paused_pod_stays_running_resumes_and_dies_by_sigkill_when_deleted(
    kube, namespace, wait_for, node_agent: AgentControl, cluster
):
    core = k8s.CoreV1Api(kube)
    # ticks every 0.1 s; on SIGTERM it says so and exits 0
    script = """
        import signal, sys, time
        def stop(*_):
            print("got SIGTERM", flush=True); sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        while True:
            print("tick", flush=True); time.sleep(0.1)
    """
    core.create_namespaced_pod(namespace, pod_manifest("hang", script))
    wait_for(lambda: phase_is(core, namespace, "hang", "Running"), 30, describe_pod(core, namespace, "hang"))

    def ticks() -> int:
        return cluster.pod_log(namespace, "hang").count("tick")

    wait_for(lambda: ticks() >= 3, 20, "pod 'hang' to tick")
    paused = node_agent.pause_pod(namespace, "hang")
    (pid,) = paused["pids"]
    assert process_state(pid) == "T"
    before = ticks()
    time.sleep(1.5)
    assert ticks() == before, "a stopped process must not make progress"
    pod = core.read_namespaced_pod("hang", namespace)
    status = pod.status.container_statuses[0]
    assert (pod.status.phase, bool(status.state.running), status.ready) == ("Running", True, True)
    agent_view = [p for p in node_agent.status()["pods"] if p["namespace"] == namespace]
    assert [(p["name"], p["paused"]) for p in agent_view] == [("hang", ["main"])]

    node_agent.resume_pod(namespace, "hang")
    assert process_state(pid) not in ("T", None)
    wait_for(lambda: ticks() > before + 3, 10, "pod 'hang' to tick again after resume_pod")

    node_agent.pause_pod(namespace, "hang")
    since = core.read_namespaced_pod("hang", namespace).metadata.resource_version
    started = time.monotonic()
    core.delete_namespaced_pod("hang", namespace, grace_period_seconds=3)
    seen = watch_until_deleted(core, namespace, "hang", since, timeout=30)
    elapsed = time.monotonic() - started
    # SIGTERM stays pending on a stopped process: it is SIGKILLed when the grace period ends
    assert 3 <= elapsed < 15, f"deleted after {elapsed:.1f} s; grace period 3 s"
    assert "got SIGTERM" not in cluster.pod_log(namespace, "hang")
    last = seen[-1]
    terminated = last.status.container_statuses[0].state.terminated
    assert (last.status.phase, terminated.exit_code) == ("Failed", 137)
    assert process_state(pid) is None


def test_a_held_pod_stays_pending_until_released_and_a_deleted_one_fails_at_once(
    kube, namespace, wait_for, node_agent: AgentControl, cluster
):
    core = k8s.CoreV1Api(kube)
    selector = "relaunch.dev/role=plan"
    held = node_agent.hold_pods(namespace, selector)
    assert held == {"namespace": namespace, "selector": selector, "held": []}
    plan = {"labels": {"relaunch.dev/role": "plan"}}
    core.create_namespaced_pod(namespace, pod_manifest("planner", "print('planned')", metadata=plan))
    core.create_namespaced_pod(namespace, pod_manifest("doomed", "print('ran')", metadata=plan))
    core.create_namespaced_pod(
        namespace,
        pod_manifest("other", "print('not held')", metadata={"labels": {"relaunch.dev/role": "train"}}),
    )
    # the hold is selective: a pod it does not match runs meanwhile
    pod = wait_for(
        lambda: phase_is(core, namespace, "other", "Succeeded"), 30, describe_pod(core, namespace, "other")
    )

    def held_like_a_slow_kubelet(name: str) -> Any:
        pod = core.read_namespaced_pod(name, namespace)
        conditions = conditions_of(pod)
        statuses = pod.status.container_statuses or []
        waiting = statuses and statuses[0].state.waiting
        return (
            pod.spec.node_name
            and pod.status.phase == "Pending"
            and conditions.get("PodScheduled") is not None
            and conditions["PodScheduled"].status == "True"
            and waiting
            and waiting.reason == "ContainerCreating"
            and pod
        )

    for name in ("planner", "doomed"):
        wait_for(lambda n=name: held_like_a_slow_kubelet(n), 30, describe_pod(core, namespace, name))
    time.sleep(2)  # held, not merely slow: nothing changes while the hold stays
    pod = held_like_a_slow_kubelet("planner")
    assert pod, describe_pod(core, namespace, "planner")()
    assert pod.status.pod_ip is None and pod.status.container_statuses[0].state.running is None
    conditions = conditions_of(pod)
    assert (conditions["PodReadyToStartContainers"].status, conditions["Ready"].status) == ("False", "False")
    assert cluster.pod_log(namespace, "planner") == ""
    holds = [h for h in node_agent.holds() if h["namespace"] == namespace]
    assert holds == [{"namespace": namespace, "selector": selector, "held": ["doomed", "planner"]}]

    # deleted while held: terminated at once (its 30 s grace period is not waited out), phase Failed
    since = core.read_namespaced_pod("doomed", namespace).metadata.resource_version
    started = time.monotonic()
    core.delete_namespaced_pod("doomed", namespace)
    last = watch_until_deleted(core, namespace, "doomed", since, timeout=30)[-1]
    assert time.monotonic() - started < 10
    terminated = last.status.container_statuses[0].state.terminated
    assert last.status.phase == "Failed"
    assert (terminated.reason, terminated.exit_code) == ("ContainerStatusUnknown", 137)
    assert cluster.pod_log(namespace, "doomed") == ""

    released = node_agent.release_pods(namespace, selector)
    assert released == {"namespace": namespace, "selector": selector, "released": ["planner"]}
    pod = wait_for(
        lambda: phase_is(core, namespace, "planner", "Succeeded", "Failed"),
        30,
        describe_pod(core, namespace, "planner"),
    )
    assert pod.status.phase == "Succeeded"
    assert "planned" in cluster.pod_log(namespace, "planner")
    assert [h for h in node_agent.holds() if h["namespace"] == namespace] == []


def test_an_evicted_running_pod_ends_failed_with_disruption_target_then_disappears(
    kube, namespace, wait_for, cluster
):
    core = k8s.CoreV1Api(kube)
    core.create_namespaced_pod(
        namespace,
        pod_manifest("evictee", "print('up', flush=True); import time; time.sleep(600)"),
    )
    wait_for(
        lambda: phase_is(core, namespace, "evictee", "Running"), 30, describe_pod(core, namespace, "evictee")
    )
    wait_for(lambda: "up" in cluster.pod_log(namespace, "evictee"), 20, "pod 'evictee' to print 'up'")
    since = core.read_namespaced_pod("evictee", namespace).metadata.resource_version
    evict_pod(kube, namespace, "evictee", grace_period_seconds=5)
    seen = watch_until_deleted(core, namespace, "evictee", since, timeout=30)
    last = seen[-1]
    # what a kubelet reports: the container ended by the SIGTERM (128 + 15), phase Failed
    terminated = last.status.container_statuses[0].state.terminated
    assert (last.status.phase, terminated.exit_code, terminated.reason) == ("Failed", 143, "Error")
    # the API server's condition survived the agent's status patches (they merge conditions by type)
    disruption = conditions_of(last).get("DisruptionTarget")
    assert disruption is not None, conditions_of(last)
    assert (disruption.status, disruption.reason) == ("True", "EvictionByEvictionAPI")
    assert conditions_of(last)["Ready"].status == "False"
    # the phase was Failed before the object went away, not only in the deletion event
    assert any(p.status.phase == "Failed" for p in seen[:-1]), [p.status.phase for p in seen]


def test_a_job_replaces_an_evicted_pod_when_its_failure_policy_ignores_disruptions(
    kube, namespace, wait_for, tmp_path
):
    batch, core = k8s.BatchV1Api(kube), k8s.CoreV1Api(kube)
    # the first pod marks the shared host folder and runs until evicted; a replacement finds the mark
    script = """
        import os, time
        if os.path.exists("/marks/first"):
            print("replacement done"); raise SystemExit(0)
        open("/marks/first", "w").close()
        time.sleep(600)
    """
    template = pod_manifest(
        "unused",
        script,
        container={"volumeMounts": [{"name": "marks", "mountPath": "/marks"}]},
        volumes=[{"name": "marks", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
        terminationGracePeriodSeconds=5,
    )
    job = {
        "metadata": {"name": "evicted"},
        "spec": {
            "backoffLimit": 0,
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
            },
            "template": {"spec": template["spec"]},
        },
    }
    batch.create_namespaced_job(namespace, job)

    def job_pods() -> list[Any]:
        return core.list_namespaced_pod(namespace, label_selector="job-name=evicted").items

    first = wait_for(
        lambda: [p for p in job_pods() if p.status.phase == "Running"],
        30,
        lambda: f"the Job's pod Running: {[(p.metadata.name, p.status.phase) for p in job_pods()]}",
    )[0]
    wait_for(lambda: (tmp_path / "first").exists(), 20, "the first pod to leave its mark")
    evict_pod(kube, namespace, first.metadata.name)
    # The Ignore rule keeps the failure out of backoffLimit (and status.failed), but the replacement
    # still waits out the Job controller's pod-failure back-off (10 s after the container finished,
    # doubling with each consecutive failure): it is not immediate.

    def complete() -> Any:
        status = batch.read_namespaced_job("evicted", namespace).status
        done = {c.type: c.status for c in status.conditions or []}
        return (done.get("Complete") == "True" or done.get("Failed") == "True") and status

    status = wait_for(
        complete,
        60,
        lambda: f"Job evicted to finish: {batch.read_namespaced_job('evicted', namespace).status}",
    )
    conditions = {c.type: (c.status, c.reason) for c in status.conditions}
    assert conditions.get("Complete", ("", ""))[0] == "True", conditions
    assert (status.succeeded, status.failed or 0) == (1, 0), status
    # the evicted pod is removed once the Job controller has accounted for it (its finalizer)
    pods = wait_for(
        lambda: (pods := job_pods()) and first.metadata.uid not in {p.metadata.uid for p in pods} and pods,
        20,
        lambda: f"the evicted pod gone: {[(p.metadata.name, p.status.phase) for p in job_pods()]}",
    )
    assert [p.status.phase for p in pods] == ["Succeeded"]


def test_deployment_pod_is_rescheduled_after_lose_node(kube, namespace, wait_for, node_agent: AgentControl):
    core, apps = k8s.CoreV1Api(kube), k8s.AppsV1Api(kube)
    template = pod_manifest("unused", "import time; time.sleep(600)")
    template["spec"]["restartPolicy"] = "Always"
    # Without these a default cluster waits 300 s before evicting pods from an unreachable node.
    template["spec"]["tolerations"] = [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 1}
        for key in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")
    ]
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": template["spec"]},
            },
        },
    )

    def running_pods() -> list[Any]:
        pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
        return [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]

    first = wait_for(running_pods, 30, "the Deployment's pod Running")[0]
    lost = first.spec.node_name
    node_agent.lose_node(lost)

    def node_not_ready() -> bool:
        node = core.read_node(lost)
        return any(c.type == "Ready" and c.status != "True" for c in node.status.conditions)

    wait_for(node_not_ready, 40, f"node {lost} marked not Ready by the node lifecycle controller")
    replacement = wait_for(
        lambda: [p for p in running_pods() if p.metadata.uid != first.metadata.uid],
        40,
        "a replacement pod Running on another node",
    )[0]
    assert replacement.spec.node_name != lost
    # the evicted pod stays Terminating: its node is powered off, nobody confirms the deletion
    old = core.read_namespaced_pod(first.metadata.name, namespace)
    assert old.metadata.deletion_timestamp is not None
    node_agent.restore_node(lost)

    def old_pod_removed() -> bool:
        try:
            core.read_namespaced_pod(first.metadata.name, namespace)
        except k8s.ApiException as error:
            return error.status == 404
        return False

    wait_for(old_pod_removed, 30, f"node {lost}, back on, to finish deleting {first.metadata.name}")


def test_deleting_an_owner_garbage_collects_its_dependents(kube, namespace, wait_for):
    core = k8s.CoreV1Api(kube)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}, "data": {}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "dependent", "ownerReferences": [reference]}}
    )
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except k8s.ApiException as error:
            return error.status == 404
        return False

    wait_for(dependent_gone, 30, "the garbage collector to delete ConfigMap 'dependent'")


def test_service_account_with_a_narrow_role_is_refused_the_rest(kube, namespace, wait_for, cluster):
    core, rbac = k8s.CoreV1Api(kube), k8s.RbacAuthorizationV1Api(kube)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "read-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    script = """
        import json
        from kubernetes import client, config
        config.load_incluster_config()  # token, ca.crt and namespace from /var/run/secrets/..., host from env
        ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
        core = client.CoreV1Api()
        result = {"configmaps": len(core.list_namespaced_config_map(ns).items)}
        attempts = {
            "list_secrets": lambda: core.list_namespaced_secret(ns),
            "create_configmap": lambda: core.create_namespaced_config_map(ns, {"metadata": {"name": "x"}}),
            "list_pods": lambda: core.list_namespaced_pod(ns),
        }
        for what, call in attempts.items():
            try:
                call(); result[what] = 200
            except client.ApiException as error:
                result[what] = error.status
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        who = client.AuthenticationV1Api().create_self_subject_review(review)
        result["user"] = who.status.user_info.username
        open("/dev/termination-log", "w").write(json.dumps(result))
    """
    core.create_namespaced_pod(namespace, pod_manifest("probe", script, serviceAccountName="reader"))
    pod = wait_for(
        lambda: phase_is(core, namespace, "probe", "Succeeded", "Failed"),
        30,
        describe_pod(core, namespace, "probe"),
    )
    assert pod.status.phase == "Succeeded", cluster.pod_log(namespace, "probe")
    result = json.loads(pod.status.container_statuses[0].state.terminated.message)
    assert result["configmaps"] >= 1  # kube-root-ca.crt
    assert (result["list_secrets"], result["create_configmap"], result["list_pods"]) == (403, 403, 403)
    assert result["user"] == f"system:serviceaccount:{namespace}:reader"


def test_probes_gate_readiness_and_liveness_restarts(kube, namespace, wait_for):
    core = k8s.CoreV1Api(kube)
    served_port, deaf_port = free_ports(2)
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    served = pod_manifest(
        "served",
        "unused",
        restartPolicy="Always",
        container={
            # $(VAR) references in the command are expanded from the container's env, as in Kubernetes
            "command": ["python", "-m", "http.server", "--bind", "$(POD_IP)", "$(PORT)"],
            "env": [pod_ip, {"name": "PORT", "value": str(served_port)}],
            "readinessProbe": {"httpGet": {"path": "/", "port": served_port}, "periodSeconds": 1},
        },
    )
    deaf = pod_manifest(
        "deaf",
        "import time; time.sleep(600)",
        restartPolicy="Always",
        container={
            "readinessProbe": {"tcpSocket": {"port": deaf_port}, "periodSeconds": 1},
            "livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2},
        },
    )
    core.create_namespaced_pod(namespace, served)
    core.create_namespaced_pod(namespace, deaf)

    def condition(name: str, kind: str) -> str | None:
        pod = core.read_namespaced_pod(name, namespace)
        return next((c.status for c in pod.status.conditions or [] if c.type == kind), None)

    wait_for(
        lambda: condition("served", "Ready") == "True", 30, "pod 'served' Ready through its httpGet probe"
    )

    def restarted() -> Any:
        statuses = core.read_namespaced_pod("deaf", namespace).status.container_statuses or []
        return statuses and statuses[0].restart_count >= 1 and statuses[0]

    status = wait_for(restarted, 30, "pod 'deaf' restarted by its failing liveness probe")
    assert status.last_state.terminated.exit_code == 137
    assert condition("deaf", "Ready") == "False"


def test_keep_image_visible_rebinds_only_hidden_image_folders() -> None:
    log = (Path("/state/log"), "/dev/termination-log", False)
    scratch = (Path("/state/scratch"), "/tmp", False)
    images = (Path("/tmp/checkout"), Path("/tmp/checkout/.venv"), Path("/opt/venv"))
    mounts = keep_image_visible([scratch, log], images)
    assert mounts == [
        scratch,
        (Path("/tmp/checkout"), "/tmp/checkout", False),
        (Path("/tmp/checkout/.venv"), "/tmp/checkout/.venv", False),
        log,
    ]
    unrelated = [(Path("/state/shared"), "/shared", False), log]
    assert keep_image_visible(unrelated, images) == unrelated


def test_a_checkout_under_tmp_stays_visible_under_an_emptydir_at_tmp() -> None:
    # CI may clone the repository under /tmp; the chart's pod mounts an emptyDir at /tmp. The venv
    # (the stand-in for the container image) must still be there, as an image's files would be.
    if subprocess.run(["unshare", "--mount", "--uts", "--", "true"], capture_output=True).returncode:
        pytest.skip("needs mount namespaces (unshare as root), as the node agent does")
    checkout = Path(tempfile.mkdtemp(prefix="relaunch-checkout-", dir="/tmp"))
    try:
        (checkout / "bin").mkdir()
        (checkout / "bin" / "tool").write_text("#!/bin/sh\necho image-tool\n")
        (checkout / "bin" / "tool").chmod(0o755)
        scratch = checkout.parent / f"{checkout.name}-scratch"
        scratch.mkdir()
        log = checkout.parent / f"{checkout.name}-log"
        log.write_bytes(b"")
        mounts = [(scratch, "/tmp", False), (log, "/dev/termination-log", False)]
        for plan, expect_ok in ((mounts, False), (keep_image_visible(mounts, (checkout,)), True)):
            stage = choose_stage([target for _, target, _ in plan], STAGE_CANDIDATES)
            script = mount_script("image-test", plan, "/", stage)
            done = subprocess.run(
                ["unshare", "--mount", "--uts", "--propagation", "private", "--", "/bin/sh", "-c", script,
                 "pod-init", str(checkout / "bin" / "tool")],
                capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
            )  # fmt: skip
            assert (done.returncode == 0 and done.stdout == "image-tool\n") is expect_ok, done.stderr
    finally:
        shutil.rmtree(checkout)
        shutil.rmtree(checkout.parent / f"{checkout.name}-scratch", ignore_errors=True)
        (checkout.parent / f"{checkout.name}-log").unlink(missing_ok=True)


def test_no_mount_hides_another_mounts_source_when_the_state_dir_is_under_tmp():
    # The exact case of a chart's pod (read-only root fs, emptyDir at /tmp) on a cluster whose state
    # dir lies under /tmp: the /tmp bind must not hide the termination log's or the token's source.
    if subprocess.run(["unshare", "--mount", "--uts", "--", "true"], capture_output=True).returncode:
        pytest.skip("needs mount namespaces (unshare as root), as the node agent does")
    state = Path(tempfile.mkdtemp(prefix="relaunch-mounts-", dir="/tmp"))
    try:
        pod = state / "pods" / "ns" / "p" / "uid"
        scratch, token, config = pod / "volumes" / "scratch", pod / "volumes" / "sa", pod / "volumes" / "cfg"
        for folder in (scratch, token, config):
            folder.mkdir(parents=True)
        (token / "token").write_text("the-token")
        (config / "train.yaml").write_text("seed: 7")
        log = pod / "main.termination-log"
        log.write_bytes(b"")
        mounts = [
            (token, "/var/run/secrets/kubernetes.io/serviceaccount", True),
            (config, "/tmp/cfg", True),  # read-only, and a later mount point lies inside it
            (scratch, "/tmp/", False),
            (scratch, "/tmp/cfg/inner", False),
            (log, "/dev/termination-log", False),
        ]
        stage = choose_stage([target for _, target, _ in mounts], STAGE_CANDIDATES)
        script = mount_script("mounts-test", mounts, "/tmp", stage)
        inside = """
            set -e
            token=$(cat /var/run/secrets/kubernetes.io/serviceaccount/token)
            printf "%s %s %s" "$token" "$(hostname)" "$(cat /tmp/cfg/train.yaml)" > /dev/termination-log
            echo here > written-in-tmp
            if touch /var/run/secrets/kubernetes.io/serviceaccount/new 2>/dev/null; then echo token-rw; fi
            if touch /tmp/cfg/new 2>/dev/null; then echo cfg-rw; fi
            ls /tmp/cfg/inner
        """
        done = subprocess.run(
            ["unshare", "--mount", "--uts", "--propagation", "private", "--", "/bin/sh", "-c", script,
             "pod-init", "/bin/sh", "-c", textwrap.dedent(inside)],
            capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}\nscript:\n{script}"
        assert log.read_text() == "the-token mounts-test seed: 7"
        assert (scratch / "written-in-tmp").read_text() == "here\n"  # the emptyDir holds what /tmp got
        # both volumes read-only; /tmp/cfg/inner is the emptyDir again (holding the mount point /tmp/cfg)
        assert done.stdout.split() == ["cfg", "written-in-tmp"]
        assert not list(stage.iterdir()), "the staging tmpfs must stay private to the container"
    finally:
        shutil.rmtree(state)


def test_choose_stage_avoids_folders_a_mount_covers():
    candidates = (Path("/run/a-stage"), Path("/var/lib/a-stage"))
    assert choose_stage(["/tmp", "/dev/termination-log"], candidates) == Path("/run/a-stage")
    assert choose_stage(["/run/", "/data"], candidates) == Path("/var/lib/a-stage")
    with pytest.raises(ValueError, match="lies under one of the mountPaths"):
        choose_stage(["/run", "/var/lib/a-stage"], candidates)


def test_hold_selectors_are_kubernetes_equality_terms():
    terms = parse_selector("relaunch.dev/role=plan, tier!=cpu")
    assert selector_matches(terms, {"relaunch.dev/role": "plan"})
    assert selector_matches(terms, {"relaunch.dev/role": "plan", "tier": "gpu"})
    assert not selector_matches(terms, {"relaunch.dev/role": "plan", "tier": "cpu"})
    assert not selector_matches(terms, {"relaunch.dev/role": "train"})
    assert selector_matches(parse_selector("a==b"), {"a": "b"})
    for unsupported in ("", "role in (plan)", "!role", "role"):  # set-based terms: refused, not ignored
        with pytest.raises(ValueError, match="is not key=value"):
            parse_selector(unsupported)


def test_a_read_only_pod_with_tmp_and_state_dir_covered_reports_its_termination_message(
    kube, namespace, wait_for, cluster
):
    # An emptyDir over the cluster's own state dir (wherever it is: CI may put it under /tmp) hides
    # the sources of the termination-log file and of the service-account files on the host.
    core = k8s.CoreV1Api(kube)
    script = """
        import json, os
        from kubernetes import client, config
        config.load_incluster_config()
        ns = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        user = client.AuthenticationV1Api().create_self_subject_review(review).status.user_info.username
        open("/tmp/scratch", "w").write("x")
        cover = os.listdir(os.environ["STATE_DIR"])
        open("/dev/termination-log", "w").write(json.dumps({"ns": ns, "user": user, "cover": cover}))
    """
    body = pod_manifest(
        "read-only",
        script,
        serviceAccountName="default",
        container={
            "securityContext": {"readOnlyRootFilesystem": True},
            "env": [{"name": "STATE_DIR", "value": str(cluster.state_dir)}],
            "volumeMounts": [
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "cover", "mountPath": str(cluster.state_dir)},
            ],
        },
        volumes=[{"name": "tmp", "emptyDir": {}}, {"name": "cover", "emptyDir": {}}],
    )
    core.create_namespaced_pod(namespace, body)
    pod = wait_for(
        lambda: phase_is(core, namespace, "read-only", "Succeeded", "Failed"),
        30,
        describe_pod(core, namespace, "read-only"),
    )
    assert pod.status.phase == "Succeeded", cluster.pod_log(namespace, "read-only")
    message = json.loads(pod.status.container_statuses[0].state.terminated.message)
    assert message == {"ns": namespace, "user": f"system:serviceaccount:{namespace}:default", "cover": []}


def test_an_always_restarting_container_is_restarted_with_its_last_state(
    kube, namespace, wait_for, node_agent: AgentControl
):
    core, apps = k8s.CoreV1Api(kube), k8s.AppsV1Api(kube)
    # exits 0, then 3 (with a termination message), then stays up: restarted in place both times
    script = """
        import os, sys, time
        runs = len(open("/scratch/runs").read()) if os.path.exists("/scratch/runs") else 0
        open("/scratch/runs", "a").write("x")
        if runs == 1:
            open("/dev/termination-log", "w").write("second run failed")
            sys.exit(3)
        if runs == 0:
            sys.exit(0)
        time.sleep(600)
    """
    template = pod_manifest(
        "unused",
        script,
        restartPolicy="Always",
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "flaky"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "flaky"}},
                "template": {"metadata": {"labels": {"app": "flaky"}}, "spec": template["spec"]},
            },
        },
    )

    def restarted_twice_and_running() -> Any:
        for pod in core.list_namespaced_pod(namespace, label_selector="app=flaky").items:
            status = (pod.status.container_statuses or [None])[0]
            if status and status.restart_count == 2 and status.state.running:
                return pod if pod.status.phase == "Running" else None
        return None

    pod = wait_for(
        restarted_twice_and_running,
        30,
        lambda: f"pods {[p.status for p in core.list_namespaced_pod(namespace).items]}",
    )
    last = pod.status.container_statuses[0].last_state.terminated
    assert (last.exit_code, last.reason, last.message) == (3, "Error", "second run failed")
    assert pod.status.container_statuses[0].ready
    # the agent's worker for the pod is alive and still tracks the running process
    pods = [p for p in node_agent.status()["pods"] if p["namespace"] == namespace]
    expected = [(pod.metadata.name, "Running", ["main"])]
    assert [(p["name"], p["phase"], list(p["pids"])) for p in pods] == expected


def test_helm_assumes_the_testbeds_kubernetes_version(tmp_path):
    # Built with helm's release stamps: `helm template` without --kube-version renders for v1.37
    # (an unstamped helm assumes v1.20 and refuses charts with kubeVersion: ">=1.29-0").
    chart = tmp_path / "caps"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: caps\nversion: 0.1.0\nkubeVersion: '>=1.29.0-0'\n"
    )
    (chart / "templates" / "caps.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: caps}\n"
        "data: {kube: {{ .Capabilities.KubeVersion.Version | quote }}}\n"
    )
    helm = binaries_dir() / "helm"
    rendered = subprocess.run([helm, "template", "x", chart], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    assert 'kube: "v1.37.0"' in rendered.stdout
    version = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("v3.22.0"), version.stdout


def test_a_pod_past_its_active_deadline_is_killed_with_reason_deadline_exceeded(
    kube, namespace, wait_for, node_agent: AgentControl
):
    """spec.activeDeadlineSeconds counts from the pod's start on the node, as the kubelet counts
    it: a running pod and one held before its containers start both end Failed, DeadlineExceeded."""
    core = k8s.CoreV1Api(kube)
    selector = "relaunch.dev/role=slow"
    node_agent.hold_pods(namespace, selector)
    try:
        core.create_namespaced_pod(
            namespace, pod_manifest("runs", "import time; time.sleep(600)", activeDeadlineSeconds=2)
        )
        held = pod_manifest(
            "held",
            "print('never')",
            activeDeadlineSeconds=2,
            metadata={"labels": {"relaunch.dev/role": "slow"}},
        )
        core.create_namespaced_pod(namespace, held)
        core.create_namespaced_pod(
            namespace, pod_manifest("quick", "print('done')", activeDeadlineSeconds=30)
        )
        for name in ("runs", "held"):
            pod = wait_for(
                lambda n=name: phase_is(core, namespace, n, "Failed"), 30, describe_pod(core, namespace, name)
            )
            assert pod.status.reason == "DeadlineExceeded", pod.status
            assert "longer than the specified deadline" in pod.status.message
            terminated = pod.status.container_statuses[0].state.terminated
            assert terminated is not None and terminated.exit_code == 137, pod.status
        wait_for(
            lambda: phase_is(core, namespace, "quick", "Succeeded"),
            30,
            describe_pod(core, namespace, "quick"),
        )
        # a failed pod is still deleted like any other
        core.delete_namespaced_pod("held", namespace)
        wait_for(
            lambda: not [p for p in core.list_namespaced_pod(namespace).items if p.metadata.name == "held"],
            30,
            "held deleted",
        )
    finally:
        node_agent.release_pods(namespace, selector)


# ----------------------------------------------------------------------------------------------
# pods/log: the node agent's kubelet log endpoint, reached through the API server


def api_get(cluster: Any, path: str, timeout: float = 30) -> str:
    """GET ``path`` from the API server as the admin (raw REST: every query parameter as given)."""
    pki = cluster.state_dir / "pki"
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(cluster.api_url + path, context=context, timeout=timeout) as answer:
        return str(answer.read().decode())


def finished_pod(core: k8s.CoreV1Api, ns: str, name: str, script: str, wait_for: Any, **spec: Any) -> Any:
    core.create_namespaced_pod(ns, pod_manifest(name, script, **spec))
    return wait_for(lambda: phase_is(core, ns, name, "Succeeded", "Failed"), 30, describe_pod(core, ns, name))


def test_kubectl_logs_of_a_finished_pod_returns_its_output(kube, namespace, wait_for, cluster):
    core = k8s.CoreV1Api(kube)
    script = """
        import sys
        for i in range(3):
            print("step", i)
        print("to stderr", file=sys.stderr)
        sys.stdout.write("no newline at the end")
    """
    finished_pod(core, namespace, "done", script, wait_for)
    kubectl = [cluster.kubectl(), f"--kubeconfig={cluster.kubeconfig}", "-n", namespace, "logs"]
    done = subprocess.run([*kubectl, "done"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "step 0\nstep 1\nstep 2\nto stderr\nno newline at the end"
    assert done.stdout == cluster.pod_log(namespace, "done")  # the same bytes the agent kept
    missing = subprocess.run([*kubectl, "done", "-c", "other"], capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "other" in missing.stderr


def test_follow_through_the_api_streams_new_lines_and_ends_when_the_container_exits(
    kube, namespace, wait_for, tmp_path
):
    core = k8s.CoreV1Api(kube)
    # each line after the first waits for a file the test creates only once it has read the line before:
    # the stream must deliver every line as it is printed, not when the container ends
    script = """
        import os, time
        print("waiting", flush=True)
        for i in range(3):
            while not os.path.exists(f"/signal/go-{i}"):
                time.sleep(0.05)
            print("after", i, flush=True)
        time.sleep(1)
    """
    tmp_path.chmod(0o777)
    body = pod_manifest(
        "talker",
        script,
        container={"volumeMounts": [{"name": "signal", "mountPath": "/signal"}]},
        volumes=[{"name": "signal", "hostPath": {"path": str(tmp_path), "type": "Directory"}}],
    )
    core.create_namespaced_pod(namespace, body)
    wait_for(
        lambda: "waiting" in core.read_namespaced_pod_log("talker", namespace),
        30,
        describe_pod(core, namespace, "talker"),
    )
    response = core.read_namespaced_pod_log(
        "talker", namespace, container="main", follow=True, _preload_content=False, _request_timeout=60
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        try:
            for line in response:
                lines.put(line.decode())
        finally:
            lines.put(None)  # the stream ended

    threading.Thread(target=read, daemon=True).start()
    assert lines.get(timeout=20) == "waiting\n"
    for i in range(3):
        (tmp_path / f"go-{i}").touch()
        assert lines.get(timeout=20) == f"after {i}\n", f"line {i} printed after the request started"
    assert lines.get(timeout=20) is None, "the stream ends when the container exits"
    pod = wait_for(
        lambda: phase_is(core, namespace, "talker", "Succeeded"), 20, describe_pod(core, namespace, "talker")
    )
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0
    response.release_conn()


def test_pod_log_tail_lines_timestamps_limit_bytes_and_since(kube, namespace, wait_for, cluster):
    core = k8s.CoreV1Api(kube)
    script = """
        import time
        for i in range(5):
            print("line", i, flush=True)
            time.sleep(0.2)
        time.sleep(2.5)
        print("late", flush=True)
    """
    before = dt.datetime.now(dt.UTC)
    pod = finished_pod(core, namespace, "counter", script, wait_for)
    after = dt.datetime.now(dt.UTC)
    assert core.read_namespaced_pod_log("counter", namespace, tail_lines=2) == "line 4\nlate\n"
    assert core.read_namespaced_pod_log("counter", namespace, tail_lines=0) == ""
    stamped = core.read_namespaced_pod_log("counter", namespace, timestamps=True).splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == [*(f"line {i}" for i in range(5)), "late"]
    times = []
    for line in stamped:
        stamp = line.split(" ", 1)[0]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", stamp), stamp
        times.append(dt.datetime.strptime(stamp[:26] + "Z", "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC))
    assert times == sorted(times) and before - dt.timedelta(seconds=1) < times[0] and times[-1] < after
    assert (times[-1] - times[-2]).total_seconds() > 2, "each line carries the time it was printed"
    assert core.read_namespaced_pod_log("counter", namespace, limit_bytes=10) == "line 0\nlin"
    # sinceTime goes on to the node in whole seconds: the next one after line 4 comes before "late"
    since = times[-2].replace(microsecond=0) + dt.timedelta(seconds=1)
    query = urllib.parse.urlencode({"sinceTime": since.strftime("%Y-%m-%dT%H:%M:%SZ")})
    assert api_get(cluster, f"/api/v1/namespaces/{namespace}/pods/counter/log?{query}") == "late\n"
    assert core.read_namespaced_pod_log("counter", namespace, since_seconds=3600).count("\n") == 6
    assert pod.status.phase == "Succeeded"


def test_previous_returns_the_log_of_the_run_before_a_restart(kube, namespace, wait_for, cluster):
    core = k8s.CoreV1Api(kube)
    script = """
        import os, sys, time
        first = not os.path.exists("/scratch/ran")
        open("/scratch/ran", "a").close()
        print("first run" if first else "second run", flush=True)
        if first:
            sys.exit(1)
        time.sleep(600)
    """
    body = pod_manifest(
        "restarts",
        script,
        restartPolicy="OnFailure",
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    core.create_namespaced_pod(namespace, body)

    def restarted_and_running() -> bool:
        pod = core.read_namespaced_pod("restarts", namespace)
        statuses = pod.status.container_statuses or []
        return bool(statuses) and statuses[0].restart_count == 1 and statuses[0].state.running is not None

    wait_for(restarted_and_running, 30, describe_pod(core, namespace, "restarts"))
    wait_for(
        lambda: core.read_namespaced_pod_log("restarts", namespace) == "second run\n", 10, "second run's log"
    )
    assert core.read_namespaced_pod_log("restarts", namespace, previous=True) == "first run\n"
    assert cluster.pod_log(namespace, "restarts") == "first run\nsecond run\n"  # the plain file keeps both


def test_the_log_endpoint_serves_tls_for_the_node_address_and_wants_a_cluster_client_cert(kube, cluster):
    node = k8s.CoreV1Api(kube).read_node(cluster.nodes[0])
    address = next(a.address for a in node.status.addresses if a.type == "InternalIP")
    port = node.status.daemon_endpoints.kubelet_endpoint.port
    pki = cluster.state_dir / "pki"
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))  # verifies the certificate's IP
    context.load_cert_chain(
        str(pki / "apiserver-kubelet-client.crt"), str(pki / "apiserver-kubelet-client.key")
    )
    with urllib.request.urlopen(f"https://{address}:{port}/healthz", context=context, timeout=10) as answer:
        assert answer.read() == b"ok"
    anonymous = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"https://{address}:{port}/healthz", context=anonymous, timeout=10).read()


def test_a_lost_nodes_pod_log_fails_instead_of_hanging(kube, namespace, wait_for, node_agent: AgentControl):
    core = k8s.CoreV1Api(kube)
    body = pod_manifest("stranded", 'import time\nprint("alive", flush=True)\ntime.sleep(600)')
    core.create_namespaced_pod(namespace, body)
    pod = wait_for(
        lambda: phase_is(core, namespace, "stranded", "Running"),
        30,
        describe_pod(core, namespace, "stranded"),
    )
    wait_for(
        lambda: core.read_namespaced_pod_log("stranded", namespace, _request_timeout=10) == "alive\n",
        20,
        "the pod's log through the API before its node is lost",
    )
    node_agent.lose_node(pod.spec.node_name)
    started = time.monotonic()
    with pytest.raises(k8s.ApiException) as refused:
        core.read_namespaced_pod_log("stranded", namespace, _request_timeout=20)
    assert time.monotonic() - started < 15
    assert refused.value.status >= 500 and "connection refused" in (refused.value.body or "")


def test_log_records_keep_partial_lines_and_render_as_the_kubelet_writes_them():
    stamp1, stamp2 = "2026-11-30T10:00:00.000000001Z", "2026-11-30T10:00:05.000000000Z"
    records = (cri_records(b"one\ntw", stamp1) + cri_records(b"o\nthree\n", stamp2)).splitlines(keepends=True)
    assert records[1] == stamp1.encode() + b" stdout P tw\n"

    def render(**query: str) -> bytes:
        options = LogOptions({k: [v] for k, v in query.items()})
        return LogRenderer(options).render(records[tail_start(records, options.tail_lines) :])

    assert render() == b"one\ntwo\nthree\n"
    assert render(tailLines="2") == b"two\nthree\n"  # a line split over two records counts once
    assert render(tailLines="0") == b""
    assert render(timestamps="true") == f"{stamp1} one\n{stamp1} two\n{stamp2} three\n".encode()
    assert render(limitBytes="6") == b"one\ntw"
    assert render(sinceTime="2026-11-30T10:00:01Z") == b"o\nthree\n"  # as the kubelet: by record time
    assert parse_rfc3339("2026-11-30T11:00:00+01:00") == parse_rfc3339(stamp1) - 1
    with pytest.raises(ValueError):
        LogOptions({"sinceSeconds": ["5"], "sinceTime": ["2026-11-30T10:00:01Z"]})
    with pytest.raises(ValueError):
        LogOptions({"stream": ["Stderr"]})
