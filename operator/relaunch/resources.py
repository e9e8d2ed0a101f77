"""Manifests of everything the operator creates, as plain dicts (pure: no I/O).

Names are deterministic (``<job>-<attempt>-<index>``, ``<job>-config-<attempt>``,
``<job>-plan-<attempt>``, ``<job>-convert-<attempt>``, ``<job>-preconvert-<run>``), so a create
repeated after an operator restart meets "already exists" instead of making a duplicate. Every
object carries the job's labels and an owner reference, so deleting the TrainingJob
garbage-collects all of it.
"""

from __future__ import annotations

import copy
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relaunch.model import API_VERSION, KIND, TrainingJobSpec

LABEL_JOB = "relaunch.dev/job"
LABEL_ATTEMPT = "relaunch.dev/attempt"
LABEL_INDEX = "relaunch.dev/worker-index"
LABEL_ROLE = "relaunch.dev/role"
ROLE_WORKER = "worker"
ROLE_PLAN = "plan"
ROLE_CONVERT = "convert"
#: A conversion ahead of need (spec.elastic.preconvert) is a conversion Job (role convert) that
#: also carries this label.
LABEL_PURPOSE = "relaunch.dev/purpose"
PURPOSE_PRECONVERT = "preconvert"

#: Rendezvous ports (MindSpore's scheduler; torch-style master). Fixed, because every worker
#: must agree on them without talking to each other first.
MS_SCHED_PORT = 8118
MASTER_PORT = 29500

CONFIG_VOLUME = "relaunch-config"
CONFIG_KEY = "train.yaml"
TERMINATION_LOG = "/dev/termination-log"

#: Image for planning/conversion Jobs when neither spec.image nor RELAUNCH_IMAGE is set.
DEFAULT_IMAGE = "relaunch:latest"

#: Finished planning/conversion Jobs are kept this long for ``kubectl logs``, then collected.
HELPER_JOB_TTL_SECONDS = 3600


@dataclass(frozen=True)
class JobRef:
    """The identity of one TrainingJob: what every owned object points back to."""

    name: str
    namespace: str
    uid: str


def worker_pod_name(job: str, attempt: int, index: int) -> str:
    return f"{job}-{attempt}-{index}"


def service_name(job: str) -> str:
    return job


def config_map_name(job: str, attempt: int) -> str:
    return f"{job}-config-{attempt}"


def plan_job_name(job: str, attempt: int, try_: int = 1) -> str:
    return f"{job}-plan-{attempt}" + (f"-{try_}" if try_ > 1 else "")


def convert_job_name(job: str, attempt: int, try_: int = 1) -> str:
    return f"{job}-convert-{attempt}" + (f"-{try_}" if try_ > 1 else "")


def preconvert_job_name(job: str, run: int) -> str:
    return f"{job}-preconvert-{run}"


def job_labels(job: str) -> dict[str, str]:
    return {LABEL_JOB: job}


def owner_reference(ref: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(ref: JobRef, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": {**job_labels(ref.name), **labels},
        "ownerReferences": [owner_reference(ref)],
    }


def helper_image(spec: TrainingJobSpec, environ: Mapping[str, str] | None = None) -> str:
    """Image for the planning and conversion Jobs: spec.image, else RELAUNCH_IMAGE, else a default."""
    env = os.environ if environ is None else environ
    return spec.image or env.get("RELAUNCH_IMAGE") or DEFAULT_IMAGE


def build_service(ref: JobRef) -> dict[str, Any]:
    """Headless Service giving every worker a stable DNS name for rendezvous.

    ``publishNotReadyAddresses``: ranks look each other up before any of them is ready.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, service_name(ref.name), {}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**job_labels(ref.name), LABEL_ROLE: ROLE_WORKER},
            "ports": [
                {"name": "ms-sched", "port": MS_SCHED_PORT, "protocol": "TCP"},
                {"name": "master", "port": MASTER_PORT, "protocol": "TCP"},
            ],
        },
    }


def build_config_map(ref: JobRef, attempt: int, text: str) -> dict[str, Any]:
    """The rendered training YAML of one attempt (one ConfigMap per attempt: in-place updates
    of a mounted ConfigMap reach pods late)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ref, config_map_name(ref.name, attempt), {LABEL_ATTEMPT: str(attempt)}),
        "data": {CONFIG_KEY: text},
    }


def rank_environment(
    ref: JobRef, spec: TrainingJobSpec, attempt: int, index: int, replicas: int
) -> list[dict]:
    """The rank variables MindSpore (msrun / RANK_ID) and torch-style launchers read."""
    rpw = spec.ranks_per_worker
    world = replicas * rpw
    # Fully qualified up to ".svc": resolves through the usual search path in a real cluster and
    # needs no search path at all where names come from a hosts file.
    scheduler = f"{worker_pod_name(ref.name, attempt, 0)}.{service_name(ref.name)}.{ref.namespace}.svc"
    values = {
        "RANK_ID": index * rpw,
        "RANK": index * rpw,
        "RANK_SIZE": world,
        "WORLD_SIZE": world,
        "MS_WORKER_NUM": world,
        "MS_NODE_RANK": index,
        "MS_LOCAL_WORKER": rpw,
        "MS_SCHED_HOST": scheduler,
        "MS_SCHED_PORT": MS_SCHED_PORT,
        "MASTER_ADDR": scheduler,
        "MASTER_PORT": MASTER_PORT,
        "RELAUNCH_JOB": ref.name,
        "RELAUNCH_ATTEMPT": attempt,
        "RELAUNCH_WORKER_INDEX": index,
        "RELAUNCH_REPLICAS": replicas,
        "RELAUNCH_RANKS_PER_WORKER": rpw,
        "RELAUNCH_CONFIG": spec.config.mount_path if spec.config else "",
    }
    return [{"name": k, "value": str(v)} for k, v in values.items()]


def _merge_env(ours: list[dict], theirs: Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """Our rank variables, then the container's own; a name the user set explicitly wins."""
    theirs = list(theirs or [])
    taken = {e.get("name") for e in theirs}
    return [e for e in ours if e["name"] not in taken] + [dict(e) for e in theirs]


def _avoid_nodes(pod_spec: dict[str, Any], nodes: Sequence[str]) -> None:
    """Keep the pod off ``nodes`` (lost ones the node controller may not have tainted yet).

    Node selector terms are ORed and their expressions ANDed, so the exclusion joins every term.
    """
    exclusion = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": sorted(nodes)}
    affinity = pod_spec.setdefault("affinity", {})
    node_affinity = affinity.setdefault("nodeAffinity", {})
    required = node_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.get("nodeSelectorTerms") or [{}]
    required["nodeSelectorTerms"] = [
        {**term, "matchExpressions": [*(term.get("matchExpressions") or []), exclusion]} for term in terms
    ]


def build_worker_pod(
    ref: JobRef,
    spec: TrainingJobSpec,
    attempt: int,
    index: int,
    replicas: int,
    *,
    avoid_nodes: Sequence[str] = (),
) -> dict[str, Any]:
    """Worker ``index`` of ``attempt``: the template plus identity, rank env and the config."""
    template = copy.deepcopy(dict(spec.template))
    meta = template.get("metadata") or {}
    pod_spec: dict[str, Any] = template.get("spec") or {}
    name = worker_pod_name(ref.name, attempt, index)
    labels = {
        **(meta.get("labels") or {}),
        **job_labels(ref.name),
        LABEL_ROLE: ROLE_WORKER,
        LABEL_ATTEMPT: str(attempt),
        LABEL_INDEX: str(index),
    }
    metadata = {
        "name": name,
        "namespace": ref.namespace,
        "labels": labels,
        "annotations": dict(meta.get("annotations") or {}),
        "ownerReferences": [owner_reference(ref)],
    }
    pod_spec["restartPolicy"] = "Never"
    if avoid_nodes:
        _avoid_nodes(pod_spec, avoid_nodes)
    pod_spec["hostname"] = name
    pod_spec["subdomain"] = service_name(ref.name)
    env = rank_environment(ref, spec, attempt, index, replicas)
    containers = []
    for container in pod_spec.get("containers") or []:
        container = dict(container)
        container["env"] = _merge_env(env, container.get("env"))
        # A worker that exits non-zero without writing a termination message leaves the end of its
        # log there instead: failure rules' logPattern and lastFailure read it.
        container.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
        if spec.config is not None:
            mounts = list(container.get("volumeMounts") or [])
            mounts.append({"name": CONFIG_VOLUME, "mountPath": posixpath.dirname(spec.config.mount_path)})
            container["volumeMounts"] = mounts
        containers.append(container)
    pod_spec["containers"] = containers
    if spec.config is not None:
        volumes = list(pod_spec.get("volumes") or [])
        volumes.append(
            {
                "name": CONFIG_VOLUME,
                "configMap": {
                    "name": config_map_name(ref.name, attempt),
                    "items": [{"key": CONFIG_KEY, "path": posixpath.basename(spec.config.mount_path)}],
                },
            }
        )
        pod_spec["volumes"] = volumes
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


#: Pod-spec fields a helper Job copies from the worker template, so it lands where the
#: job's volumes can be mounted and runs with the same identity.
_HELPER_POD_FIELDS = (
    "nodeSelector",
    "tolerations",
    "affinity",
    "imagePullSecrets",
    "securityContext",
    "serviceAccountName",
    "priorityClassName",
)


#: A helper pod that the cluster disrupts (an eviction, a preemption, a node drained or lost:
#: the pod gets the DisruptionTarget condition) is replaced by the Job controller without
#: failing the Job; any other failure fails the Job at once (backoffLimit 0), and the operator
#: decides whether another try can help (see reconcile's helper stages).
HELPER_POD_FAILURE_POLICY = {
    "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
}


def _helper_job(
    ref: JobRef,
    spec: TrainingJobSpec,
    name: str,
    role: str,
    attempt: int,
    command: Sequence[str],
    avoid_nodes: Sequence[str],
    resources: Mapping[str, Any],
    deadline_seconds: int,
    extra_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A planning or conversion Job. Its deadline is the pod's ``activeDeadlineSeconds``, which
    counts from the pod's start on a node: a pod that waits to be scheduled is not killed for it
    (the operator reports why it waits instead), one that hangs while running is."""
    tpl_spec: Mapping[str, Any] = spec.template.get("spec") or {}
    first = (tpl_spec.get("containers") or [{}])[0]
    labels = {LABEL_ROLE: role, LABEL_ATTEMPT: str(attempt), **(extra_labels or {})}
    pod_spec: dict[str, Any] = {k: copy.deepcopy(tpl_spec[k]) for k in _HELPER_POD_FIELDS if k in tpl_spec}
    pod_spec.update(
        {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": role,
                    "image": helper_image(spec),
                    "command": list(command),
                    "env": [dict(e) for e in first.get("env") or [] if "value" in e],
                    "volumeMounts": copy.deepcopy(first.get("volumeMounts") or []),
                    "terminationMessagePath": TERMINATION_LOG,
                    "terminationMessagePolicy": "File",
                    "resources": copy.deepcopy(dict(resources)),
                }
            ],
            "volumes": copy.deepcopy(tpl_spec.get("volumes") or []),
            "activeDeadlineSeconds": deadline_seconds,
        }
    )
    if avoid_nodes:
        _avoid_nodes(pod_spec, avoid_nodes)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(ref, name, labels),
        "spec": {
            "backoffLimit": 0,
            "podFailurePolicy": copy.deepcopy(HELPER_POD_FAILURE_POLICY),
            "ttlSecondsAfterFinished": HELPER_JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": {**job_labels(ref.name), **labels}}, "spec": pod_spec},
        },
    }


def build_plan_job(
    ref: JobRef,
    spec: TrainingJobSpec,
    attempt: int,
    command: Sequence[str],
    *,
    avoid_nodes: Sequence[str] = (),
    try_: int = 1,
) -> dict[str, Any]:
    """The planning Job of ``attempt`` (its ``try_``-th): scans the checkpoint on the job's own volumes."""
    name = plan_job_name(ref.name, attempt, try_)
    return _helper_job(
        ref,
        spec,
        name,
        ROLE_PLAN,
        attempt,
        command,
        avoid_nodes,
        spec.helpers.planning_resources,
        spec.recovery.deadlines.planning_seconds,
    )


def build_convert_job(
    ref: JobRef,
    spec: TrainingJobSpec,
    attempt: int,
    command: Sequence[str],
    *,
    avoid_nodes: Sequence[str] = (),
    try_: int = 1,
) -> dict[str, Any]:
    """The conversion Job of ``attempt`` (its ``try_``-th): converts the checkpoint for the new world size."""
    name = convert_job_name(ref.name, attempt, try_)
    return _helper_job(
        ref,
        spec,
        name,
        ROLE_CONVERT,
        attempt,
        command,
        avoid_nodes,
        spec.helpers.conversion_resources,
        spec.recovery.deadlines.converting_seconds,
    )


def build_preconvert_job(
    ref: JobRef,
    spec: TrainingJobSpec,
    run: int,
    attempt: int,
    command: Sequence[str],
    *,
    avoid_nodes: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``run``-th pre-conversion Job, started while ``attempt`` trains: ``relaunch
    preconvert`` (which lowers its own CPU and I/O priority) on the job's own volumes, with the
    conversion's resources and deadline.

    It runs beside the gang, so the template's pod (anti-)affinity, which places workers
    relative to each other (one per node, say), is left out: it would keep the helper off every
    node the gang uses, and so is its priority class. Node selection (nodeSelector, node
    affinity, tolerations) stays, so it lands where the job's volumes can be mounted."""
    job = _helper_job(
        ref,
        spec,
        preconvert_job_name(ref.name, run),
        ROLE_CONVERT,
        attempt,
        command,
        avoid_nodes,
        spec.helpers.conversion_resources,
        spec.recovery.deadlines.converting_seconds,
        extra_labels={LABEL_PURPOSE: PURPOSE_PRECONVERT},
    )
    pod_spec = job["spec"]["template"]["spec"]
    # Nor the workers' priority class: a helper that is never needed at once must not preempt
    # anyone's pods to run; it waits for room at the namespace's default priority.
    pod_spec.pop("priorityClassName", None)
    affinity = {k: v for k, v in (pod_spec.get("affinity") or {}).items() if k == "nodeAffinity"}
    if affinity:
        pod_spec["affinity"] = affinity
    else:
        pod_spec.pop("affinity", None)
    return job
