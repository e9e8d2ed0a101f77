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

import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from relaunch import resources
from relaunch.controller import metrics
from relaunch.controller.reconcile import (
    Action,
    ApiProblem,
    Create,
    DeleteJob,
    DeletePod,
    ForeignObject,
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
    """An API call failed for a reason other than "already exists"/"already gone".

    ``message`` is the server's own words (the Status object's message), ``retry_after`` the
    delay it asked for (the Retry-After header, or the Status details' retryAfterSeconds).
    """

    def __init__(
        self, status: int, method: str, path: str, body: str, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.method = method
        self.path = path
        self.causes: list[str] = []
        details: Mapping[str, Any] = {}
        try:
            parsed = json.loads(body)
            message = str(parsed.get("message", body))
            details = parsed.get("details") or {}
            self.causes = [str(c.get("reason") or c.get("type") or "") for c in details.get("causes") or []]
        except (ValueError, AttributeError):
            message = body
        if retry_after is None and isinstance(details.get("retryAfterSeconds"), int | float):
            retry_after = float(details["retryAfterSeconds"])
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"{method} {path}: HTTP {status}: {message}")

    @property
    def namespace_terminating(self) -> bool:
        """A create refused because the namespace is being deleted: nothing to retry."""
        return self.status == 403 and (
            "NamespaceTerminating" in self.causes or "because it is being terminated" in self.message
        )


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare from the API server; our own backoff applies


class LineStream:
    """The lines of a streamed HTTP answer (urllib3's response read without preloading)."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def __iter__(self) -> Iterator[bytes]:
        pending = b""
        for chunk in self.response.stream(64 * 1024, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from lines
        if pending:
            yield pending

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.response.close()
        with contextlib.suppress(Exception):
            self.response.release_conn()


class ForeignObjectError(KubeError):
    """A create met an object of the same name that another owner holds (409 that is not "done")."""

    def __init__(self, path: str, name: str, existing: Mapping[str, Any]) -> None:
        meta = existing.get("metadata") or {}
        self.name = name
        self.deleting = bool(meta.get("deletionTimestamp"))
        owner = owner_uid(existing)
        state = "being deleted" if self.deleting else "still there"
        body = json.dumps({"message": f"{name} is owned by {owner or 'nobody'} and {state}"})
        super().__init__(409, "POST", f"{path}/{name}", body)


class ActionFailed(Exception):
    """An action the API server did not carry out, as the :class:`ApiProblem` the status shows."""

    def __init__(self, action: Action, error: KubeError) -> None:
        self.action = action
        self.error = error
        if isinstance(action, Create):
            verb, kind, name = "create", action.manifest["kind"], action.manifest["metadata"]["name"]
        else:
            verb, kind, name = "delete", "Pod" if isinstance(action, DeletePod) else "Job", action.name
        self.problem = ApiProblem(verb, kind, name, error.status, error.message, error.retry_after)
        super().__init__(str(error))


def owner_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controlling owner (the TrainingJob that made it), if any."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    for ref in refs:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return str(refs[0].get("uid")) if refs else None


def resource_of(path: str) -> str:
    """The resource a REST path names (``pods``, ``jobs``, ``trainingjobs/status``, ...), for metrics."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if "namespaces" in parts:
        i = parts.index("namespaces")
        rest = parts[i + 2 :]
        if not rest:  # a namespace itself
            return "namespaces"
        parts = rest
    else:
        parts = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if not parts:
        return "unknown"
    return parts[0] + (f"/{parts[2]}" if len(parts) > 2 else "")


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
        self._local = threading.local()  # the Retry-After of this thread's last error response

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
        if response.status >= 400:
            metrics.api_error(method, resource_of(path), response.status)
            self._local.retry_after = _retry_after(response.getheader("Retry-After"))
        return response.status, payload

    def stream(self, path: str, query: Mapping[str, str]) -> LineStream:
        """A GET whose answer is read line by line as it arrives (a followed log); no read timeout."""
        m, url, hdrs, _, _ = self.api.param_serialize(
            method="GET",
            resource_path=path,
            query_params=list(query.items()),
            header_params={"Accept": "*/*"},
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(m, url, header_params=hdrs, _request_timeout=(REQUEST_TIMEOUT, None))
        if response.status >= 400:
            response.read()
            raw = response.data or b""
            metrics.api_error("GET", resource_of(path), response.status)
            raise KubeError(response.status, "GET", path, raw.decode(errors="replace"))
        return LineStream(response.response)

    def _ok(self, method: str, path: str, status: int, payload: Any, *, tolerate: Iterable[int] = ()) -> Any:
        if 200 <= status < 300 or status in tolerate:
            return payload
        raise KubeError(
            status,
            method,
            path,
            json.dumps(payload) if not isinstance(payload, str) else payload,
            retry_after=getattr(self._local, "retry_after", None) if status == 429 or status >= 500 else None,
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
        """Create; False when it already existed (409) and is ours: deterministic names make that
        "done". An object of that name owned by someone else (a namesake's leftover) is not ours:
        :class:`ForeignObjectError`."""
        status, payload = self.request("POST", path, body=manifest)
        self._ok("POST", path, status, payload, tolerate=(409,))
        if status != 409:
            return True
        owners = {o.get("uid") for o in (manifest.get("metadata") or {}).get("ownerReferences") or []}
        if owners:
            name = (manifest.get("metadata") or {}).get("name", "")
            existing = self.get(f"{path}/{quote(name, safe='')}")
            if existing is not None and owner_uid(existing) not in owners:
                raise ForeignObjectError(path, name, existing)
        return False

    def delete(self, path: str, *, grace_seconds: int | None = None) -> None:
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        status, payload = self.request("DELETE", path, body=body)
        self._ok("DELETE", path, status, payload, tolerate=(404, 409))

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        status, payload = self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        return self._ok("PATCH", path, status, payload)

    def merge_patch_or_none(self, path: str, patch: Mapping[str, Any]) -> Any:
        """A merge patch; None when the object is gone (404)."""
        status, payload = self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        return None if status == 404 else self._ok("PATCH", path, status, payload)


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
    unschedulable, unschedulable_message = _unschedulable(status)
    waiting_reason, waiting_message = _waiting(status)
    disruption = next(
        (
            str(c.get("reason") or "DisruptionTarget")
            for c in status.get("conditions") or []
            if c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        ),
        None,
    )
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
        unschedulable_message=unschedulable_message,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        disruption=disruption,
    )


def _unschedulable(status: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """Since when the scheduler cannot place the pod, and its words why (PodScheduled=False)."""
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            since = parse_k8s_time(cond.get("lastTransitionTime")) or time.time()
            return since, (cond.get("message") or "").strip() or None
    return None, None


def _waiting(status: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The first container that waits for a reason other than being created, with the kubelet's words."""
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in ("ContainerCreating", "PodInitializing"):
            return str(reason), (waiting.get("message") or "").strip() or None
    return None, None


def helper_job_view(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> HelperJobView:
    """A planning/conversion Job with what its pod shows (the plan travels in its termination
    message). A Job may have had several pods (the Job controller replaces a disrupted one): the
    one that explains it is a succeeded pod, else a live one, else the newest."""
    name = (job.get("metadata") or {}).get("name", "")
    job_status = job.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in job_status.get("conditions") or []}
    succeeded = conditions.get("Complete") == "True" or int(job_status.get("succeeded") or 0) > 0
    failed = conditions.get("Failed") == "True" or conditions.get("FailureTarget") == "True"
    own = [
        pod
        for pod in pods
        if ((pod.get("metadata") or {}).get("labels") or {}).get(
            "batch.kubernetes.io/job-name", ((pod.get("metadata") or {}).get("labels") or {}).get("job-name")
        )
        == name
    ]

    def rank(pod: Mapping[str, Any]) -> tuple[int, str]:
        phase = (pod.get("status") or {}).get("phase")
        order = 2 if phase == "Succeeded" else 1 if phase in ("Pending", "Running") else 0
        return order, str((pod.get("metadata") or {}).get("creationTimestamp") or "")

    if not own:
        return HelperJobView(name=name, succeeded=succeeded, failed=failed)
    pod = max(own, key=rank)
    status = pod.get("status") or {}
    message: str | None = None
    exit_code: int | None = None
    term_reason: str | None = None
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            exit_code = term.get("exitCode")
            term_reason = term.get("reason")
            message = (term.get("message") or "").strip() or message
    if status.get("phase") == "Succeeded":
        succeeded = True
    _, unschedulable_message = _unschedulable(status)
    waiting_reason, waiting_message = _waiting(status)
    telling = term_reason if term_reason not in (None, "Error", "Completed") else None
    reason = status.get("reason") or telling
    return HelperJobView(
        name=name,
        succeeded=succeeded,
        failed=failed and not succeeded,
        message=message,
        exit_code=exit_code,
        pod=(pod.get("metadata") or {}).get("name"),
        node=(pod.get("spec") or {}).get("nodeName"),
        pod_reason=reason,
        unschedulable_message=unschedulable_message,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
    )


# ----------------------------------------------------------------------------------------------
# Node health


@dataclass
class _NodeState:
    ready: bool | None
    not_ready_since: float | None
    taints: frozenset[str] = frozenset()
    labels: Mapping[str, str] | None = None
    true_conditions: frozenset[str] = frozenset()
    ready_since: float | None = None
    unschedulable: bool = False


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
                name: NodeView(
                    name,
                    st.ready,
                    st.not_ready_since,
                    self._heartbeats.get(name),
                    taints=st.taints,
                    labels=st.labels or {},
                    true_conditions=st.true_conditions,
                    ready_since=st.ready_since,
                    unschedulable=st.unschedulable,
                )
                for name, st in self._nodes.items()
            }

    def refresh(self) -> None:
        nodes: dict[str, _NodeState] = {}
        for node in self.kube.list("/api/v1/nodes"):
            name = (node.get("metadata") or {}).get("name", "")
            ready: bool | None = None
            since: float | None = None
            true_conditions = set()
            for cond in (node.get("status") or {}).get("conditions") or []:
                if cond.get("type") == "Ready":
                    ready = {"True": True, "False": False}.get(cond.get("status"))
                    since = parse_k8s_time(cond.get("lastTransitionTime"))
                elif cond.get("status") == "True":
                    true_conditions.add(str(cond.get("type")))
            nodes[name] = _NodeState(
                ready,
                None if ready is True else since,
                taints=frozenset(str(t.get("key")) for t in (node.get("spec") or {}).get("taints") or []),
                labels=dict((node.get("metadata") or {}).get("labels") or {}),
                true_conditions=frozenset(true_conditions),
                ready_since=since if ready is True else None,
                unschedulable=bool((node.get("spec") or {}).get("unschedulable")),
            )
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
            # A node Ready again since a new time (a flap shorter than one poll) or cordoned
            # changes what an elastic grow-back may count on: wake the daemons for it too.
            changed = old is None or {
                n: (s.ready, s.ready_since, s.unschedulable) for n, s in old.items()
            } != {n: (s.ready, s.ready_since, s.unschedulable) for n, s in nodes.items()}
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
    """Reads and writes for one TrainingJob: found by namespace and name, its objects told
    apart by their owner's uid (a namesake's leftovers carry the same name label)."""

    def __init__(self, kube: Kube, namespace: str, name: str, uid: str = "") -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.uid = uid

    def get_trainingjob(self) -> dict[str, Any] | None:
        return self.kube.get(trainingjob_path(self.namespace, self.name))

    def observe(self, spec: TrainingJobSpec | None, nodes: Mapping[str, NodeView] | None) -> Observed:
        selector = f"{resources.LABEL_JOB}={self.name}"
        pods = self.kube.list(collection_path("Pod", self.namespace), selector)
        workers = []
        helpers = []
        foreign: list[ForeignObject] = []
        for pod in pods:
            meta = pod.get("metadata") or {}
            if self.uid and owner_uid(pod) != self.uid and not _job_pod(pod):
                foreign.append(_foreign("Pod", meta))
                continue
            role = (meta.get("labels") or {}).get(resources.LABEL_ROLE)
            if role == resources.ROLE_WORKER:
                worker = pod_view(pod)
                if worker is not None:
                    workers.append(worker)
            elif role in (resources.ROLE_PLAN, resources.ROLE_CONVERT):
                helpers.append(pod)
        jobs = {}
        for job in self.kube.list(collection_path("Job", self.namespace), selector):
            meta = job.get("metadata") or {}
            if self.uid and owner_uid(job) != self.uid:
                foreign.append(_foreign("Job", meta))
                continue
            view = helper_job_view(job, helpers)
            jobs[view.name] = view
        config_text, config_error = self._config_text(spec)
        return Observed(
            pods=tuple(workers),
            jobs=jobs,
            nodes=nodes,
            config_text=config_text,
            config_error=config_error,
            foreign=tuple(foreign),
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

    def delete(self, kind: str, name: str) -> None:
        self.kube.delete(f"{collection_path(kind, self.namespace)}/{quote(name, safe='')}")

    def _apply_one(self, action: Action) -> None:
        try:
            self._apply(action)
        except KubeError as error:
            raise ActionFailed(action, error) from error

    def _apply(self, action: Action) -> None:
        if isinstance(action, Create):
            kind = action.manifest["kind"]
            created = self.kube.create(collection_path(kind, self.namespace), action.manifest)
            log.debug(
                "%s %s/%s", "created" if created else "exists:", kind, action.manifest["metadata"]["name"]
            )
        elif isinstance(action, DeletePod):
            path = f"{collection_path('Pod', self.namespace)}/{quote(action.name, safe='')}"
            self.kube.delete(path, grace_seconds=0 if action.force else None)
        elif isinstance(action, DeleteJob):
            self.kube.delete(f"{collection_path('Job', self.namespace)}/{quote(action.name, safe='')}")

    def patch_status(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        patch = merge_patch(old, new)
        if patch:
            self.kube.merge_patch(trainingjob_path(self.namespace, self.name) + "/status", {"status": patch})


def _foreign(kind: str, meta: Mapping[str, Any]) -> ForeignObject:
    return ForeignObject(kind, meta.get("name", ""), bool(meta.get("deletionTimestamp")))


def _job_pod(pod: Mapping[str, Any]) -> bool:
    """A helper Job's pod: owned by its Job, not by the TrainingJob (the Job is checked instead)."""
    return any(ref.get("kind") == "Job" for ref in (pod.get("metadata") or {}).get("ownerReferences") or [])


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
