"""Kubernetes I/O of the controller: observe a TrainingJob's world, apply actions, write status.

Everything here talks JSON dicts over the official client's authenticated REST layer (not its
generated models): manifests from :mod:`relaunch.resources` go out exactly as built, and reads
come back with the API's own camelCase field names. Creates treat 409 (already exists) and
deletes treat 404 (already gone) as success, so every action can be repeated safely.

:class:`NodeTracker` keeps the health of every node (Ready condition and Lease heartbeat) in
memory, polled by one background thread for all TrainingJobs: node loss is judged from the
heartbeat the operator sees, not from the node controller's (slow, tunable) NotReady taint.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from relaunch import resources
from relaunch.controller.reconcile import (
    Action,
    Create,
    DeletePod,
    HelperJobView,
    NodeView,
    Observed,
    PodView,
)
from relaunch.model import GROUP, PLURAL, VERSION, TrainingJobSpec

log = logging.getLogger(__name__)

NODE_LEASE_NAMESPACE = "kube-node-lease"
#: Parallel requests when a gang is created or deleted (1,024 workers must not take minutes).
API_CONCURRENCY = 16
REQUEST_TIMEOUT = 30


class KubeError(RuntimeError):
    """An API call failed for a reason other than "already exists"/"already gone"."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        try:
            message = json.loads(body).get("message", body)
        except ValueError:
            message = body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


def load_client_config() -> None:
    """In a pod: the service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()


def parse_k8s_time(value: Any) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Kube:
    """A thin JSON-over-REST client with "already done" semantics for create and delete."""

    def __init__(self, api_client: k8s.ApiClient | None = None) -> None:
        self.api = api_client or k8s.ApiClient()
        self.pool = ThreadPoolExecutor(max_workers=API_CONCURRENCY, thread_name_prefix="relaunch-api")

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        params = [(k, str(v).lower() if isinstance(v, bool) else v) for k, v in (query or {}).items()]
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        m, url, hdrs, data, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=params,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(m, url, header_params=hdrs, body=data, _request_timeout=REQUEST_TIMEOUT)
        response.read()
        raw = response.data or b""
        payload: Any = None
        if raw:
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
        return response.status, payload

    def _ok(self, method: str, path: str, status: int, payload: Any, *, tolerate: Iterable[int] = ()) -> Any:
        if 200 <= status < 300 or status in tolerate:
            return payload
        raise KubeError(
            status, method, path, json.dumps(payload) if not isinstance(payload, str) else payload
        )

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        status, payload = self.request("GET", path, query=query)
        if status == 404:
            return None
        return self._ok("GET", path, status, payload)

    def list(self, path: str, selector: str | None = None) -> list[dict[str, Any]]:
        payload = self.get(path, {"labelSelector": selector} if selector else None)
        return list((payload or {}).get("items") or [])

    def create(self, path: str, manifest: Mapping[str, Any]) -> bool:
        """Create; False when it already existed (409): deterministic names make that "done"."""
        status, payload = self.request("POST", path, body=manifest)
        self._ok("POST", path, status, payload, tolerate=(409,))
        return status != 409

    def delete(self, path: str, *, grace_seconds: int | None = None) -> None:
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        status, payload = self.request("DELETE", path, body=body)
        self._ok("DELETE", path, status, payload, tolerate=(404, 409))

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        status, payload = self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        return self._ok("PATCH", path, status, payload)


# ----------------------------------------------------------------------------------------------
# Paths


def _ns(namespace: str) -> str:
    return quote(namespace, safe="")


def trainingjob_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{_ns(namespace)}/{PLURAL}"
    return f"{base}/{quote(name, safe='')}" if name else base


_COLLECTIONS = {
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Service": "/api/v1/namespaces/{ns}/services",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Event": "/api/v1/namespaces/{ns}/events",
}


def collection_path(kind: str, namespace: str) -> str:
    return _COLLECTIONS[kind].format(ns=_ns(namespace))


# ----------------------------------------------------------------------------------------------
# Views of what the API returns


def pod_view(pod: Mapping[str, Any]) -> PodView | None:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        attempt = int(labels[resources.LABEL_ATTEMPT])
        index = int(labels.get(resources.LABEL_INDEX, -1))
    except (KeyError, ValueError):
        return None
    status = pod.get("status") or {}
    exit_code: int | None = None
    reason: str | None = status.get("reason")
    message: str | None = status.get("message")
    finished: float | None = None
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if not term:
            continue
        code = term.get("exitCode")
        # The container that failed explains the pod; a clean exit explains nothing.
        if exit_code is None or (code and not exit_code):
            exit_code = code
            reason = status.get("reason") or term.get("reason")
            message = status.get("message") or term.get("message")
            finished = parse_k8s_time(term.get("finishedAt"))
    unschedulable: float | None = None
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            unschedulable = parse_k8s_time(cond.get("lastTransitionTime")) or time.time()
    return PodView(
        name=meta.get("name", ""),
        attempt=attempt,
        index=index,
        phase=status.get("phase") or "Pending",
        node=(pod.get("spec") or {}).get("nodeName"),
        deleting=bool(meta.get("deletionTimestamp")),
        exit_code=exit_code,
        reason=reason,
        message=message,
        finished_at=finished,
        unschedulable_since=unschedulable,
    )


def helper_job_view(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> HelperJobView:
    """A planning/conversion Job with its pod's termination message (the plan travels there)."""
    name = (job.get("metadata") or {}).get("name", "")
    conditions = {c.get("type"): c.get("status") for c in (job.get("status") or {}).get("conditions") or []}
    succeeded = (
        conditions.get("Complete") == "True" or int((job.get("status") or {}).get("succeeded") or 0) > 0
    )
    failed = conditions.get("Failed") == "True"
    message: str | None = None
    exit_code: int | None = None
    pod_failed = False
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get("batch.kubernetes.io/job-name", labels.get("job-name")) != name:
            continue
        status = pod.get("status") or {}
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if term:
                exit_code = term.get("exitCode")
                message = (term.get("message") or "").strip() or message
        if status.get("phase") == "Failed":
            pod_failed = True
        elif status.get("phase") == "Succeeded":
            succeeded = True
    return HelperJobView(
        name=name, succeeded=succeeded, failed=failed or pod_failed, message=message, exit_code=exit_code
    )


# ----------------------------------------------------------------------------------------------
# Node health


@dataclass
class _NodeState:
    ready: bool | None
    not_ready_since: float | None


class NodeTracker:
    """Health of every node, refreshed by one polling thread; ``on_change`` fires when a node's
    Ready state flips or a node disappears (the daemons re-judge then; heartbeat deadlines are
    timers each daemon sets for itself)."""

    def __init__(
        self, kube: Kube, *, interval: float = 1.0, on_change: Callable[[], None] | None = None
    ) -> None:
        self.kube = kube
        self.interval = interval
        self.on_change = on_change
        self._lock = threading.Lock()
        self._nodes: dict[str, _NodeState] | None = None
        self._heartbeats: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lease_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="relaunch-nodes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict[str, NodeView] | None:
        with self._lock:
            if self._nodes is None:
                return None
            return {
                name: NodeView(name, st.ready, st.not_ready_since, self._heartbeats.get(name))
                for name, st in self._nodes.items()
            }

    def refresh(self) -> None:
        nodes: dict[str, _NodeState] = {}
        for node in self.kube.list("/api/v1/nodes"):
            name = (node.get("metadata") or {}).get("name", "")
            ready: bool | None = None
            since: float | None = None
            for cond in (node.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "Ready":
                    ready = {"True": True, "False": False}.get(cond.get("status"))
                    since = parse_k8s_time(cond.get("lastTransitionTime"))
            nodes[name] = _NodeState(ready, None if ready is True else since)
        heartbeats: dict[str, float] = {}
        try:
            for lease in self.kube.list(
                f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases"
            ):
                renewed = parse_k8s_time((lease.get("spec") or {}).get("renewTime"))
                if renewed is not None:
                    heartbeats[(lease.get("metadata") or {}).get("name", "")] = renewed
            self.lease_error = None
        except KubeError as exc:  # without lease access, node loss is judged from Ready alone
            if self.lease_error is None:
                log.warning(
                    "cannot read node leases (%s); judging node loss from the Ready condition only", exc
                )
            self.lease_error = str(exc)
        with self._lock:
            old = self._nodes
            changed = old is None or {n: s.ready for n, s in old.items()} != {
                n: s.ready for n, s in nodes.items()
            }
            self._nodes = nodes
            self._heartbeats = heartbeats
        if changed and self.on_change is not None:
            self.on_change()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # keep polling through API hiccups
                log.warning("node refresh failed: %s", exc)
            self._stop.wait(self.interval)


# ----------------------------------------------------------------------------------------------
# Observe and apply for one TrainingJob


class JobIO:
    """Reads and writes for one TrainingJob, by namespace and name."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name

    def get_trainingjob(self) -> dict[str, Any] | None:
        return self.kube.get(trainingjob_path(self.namespace, self.name))

    def observe(self, spec: TrainingJobSpec | None, nodes: Mapping[str, NodeView] | None) -> Observed:
        selector = f"{resources.LABEL_JOB}={self.name}"
        pods = self.kube.list(collection_path("Pod", self.namespace), selector)
        workers = []
        helpers = []
        for pod in pods:
            role = ((pod.get("metadata") or {}).get("labels") or {}).get(resources.LABEL_ROLE)
            if role == resources.ROLE_WORKER:
                worker = pod_view(pod)
                if worker is not None:
                    workers.append(worker)
            elif role in (resources.ROLE_PLAN, resources.ROLE_CONVERT):
                helpers.append(pod)
        jobs = {}
        for job in self.kube.list(collection_path("Job", self.namespace), selector):
            view = helper_job_view(job, helpers)
            jobs[view.name] = view
        config_text, config_error = self._config_text(spec)
        return Observed(
            pods=tuple(workers), jobs=jobs, nodes=nodes, config_text=config_text, config_error=config_error
        )

    def _config_text(self, spec: TrainingJobSpec | None) -> tuple[str | None, str | None]:
        if spec is None or spec.config is None:
            return None, None
        cfg = spec.config
        if cfg.text is not None:
            return cfg.text, None
        if cfg.inline is not None:
            import yaml

            return yaml.safe_dump(dict(cfg.inline), sort_keys=False), None
        assert cfg.config_map is not None
        cm = self.kube.get(f"{collection_path('ConfigMap', self.namespace)}/{quote(cfg.config_map, safe='')}")
        if cm is None:
            return None, f"ConfigMap {cfg.config_map} (spec.config.configMapRef) does not exist"
        data = cm.get("data") or {}
        if cfg.config_map_key not in data:
            return None, (
                f"ConfigMap {cfg.config_map} has no key {cfg.config_map_key!r} "
                f"(keys: {', '.join(sorted(data)) or 'none'}); set spec.config.configMapRef.key"
            )
        return str(data[cfg.config_map_key]), None

    def apply(self, actions: list[Action]) -> None:
        """Apply actions: the Service/ConfigMap first, then pods and Jobs in parallel."""

        def early(action: Action) -> bool:  # what the workers mount or resolve must exist first
            return isinstance(action, Create) and action.manifest["kind"] in ("ConfigMap", "Service")

        first = [a for a in actions if early(a)]
        rest = [a for a in actions if not early(a)]
        for action in first:
            self._apply_one(action)
        for future in [self.kube.pool.submit(self._apply_one, a) for a in rest]:
            future.result()

    def _apply_one(self, action: Action) -> None:
        if isinstance(action, Create):
            kind = action.manifest["kind"]
            created = self.kube.create(collection_path(kind, self.namespace), action.manifest)
            log.debug(
                "%s %s/%s", "created" if created else "exists:", kind, action.manifest["metadata"]["name"]
            )
        elif isinstance(action, DeletePod):
            path = f"{collection_path('Pod', self.namespace)}/{quote(action.name, safe='')}"
            self.kube.delete(path, grace_seconds=0 if action.force else None)

    def patch_status(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        patch = merge_patch(old, new)
        if patch:
            self.kube.merge_patch(trainingjob_path(self.namespace, self.name) + "/status", {"status": patch})


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new``: removed keys become null,
    nested objects are diffed, lists are replaced whole."""
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before or key not in old:
            patch[key] = value
    return patch


def now() -> float:
    return time.time()
