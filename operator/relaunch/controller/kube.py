"""The controller's Kubernetes API client: JSON over the official client's authenticated REST layer.

Everything here talks JSON dicts over the official client's authenticated REST layer (not its
generated models): manifests from :mod:`relaunch.resources` go out exactly as built, and reads
come back with the API's own camelCase field names. Creates treat 409 (already exists) and
deletes treat 404 (already gone) as success, so every action can be repeated safely.

The rest of the controller's I/O lives next to it: :mod:`relaunch.controller.views` (what the
state machine sees of pods and Jobs), :mod:`relaunch.controller.watch` (list-then-watch of a
collection), :mod:`relaunch.controller.nodes` (node health from watches) and
:mod:`relaunch.controller.jobio` (one TrainingJob's reads and writes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from relaunch.controller import kueue, metrics
from relaunch.model import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

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

    def stream(self, path: str, query: Mapping[str, str], *, read_timeout: float | None = None) -> LineStream:
        """A GET whose answer is read line by line as it arrives (a followed log, a watch); by
        default with no read timeout."""
        m, url, hdrs, _, _ = self.api.param_serialize(
            method="GET",
            resource_path=path,
            query_params=list(query.items()),
            header_params={"Accept": "*/*"},
            auth_settings=["BearerToken"],
        )
        timeout = (REQUEST_TIMEOUT, read_timeout)
        response = self.api.call_api(m, url, header_params=hdrs, _request_timeout=timeout)
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
        return self.create_object(path, manifest) is not None

    def create_object(self, path: str, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
        """:meth:`create`, returning the object as the server created it (None: it existed)."""
        status, payload = self.request("POST", path, body=manifest)
        self._ok("POST", path, status, payload, tolerate=(409,))
        if status != 409:
            return payload if isinstance(payload, dict) else dict(manifest)
        owners = {o.get("uid") for o in (manifest.get("metadata") or {}).get("ownerReferences") or []}
        if owners:
            name = (manifest.get("metadata") or {}).get("name", "")
            existing = self.get(f"{path}/{quote(name, safe='')}")
            if existing is not None and owner_uid(existing) not in owners:
                raise ForeignObjectError(path, name, existing)
        return None

    def delete(self, path: str, *, grace_seconds: int | None = None) -> None:
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        status, payload = self.request("DELETE", path, body=body)
        self._ok("DELETE", path, status, payload, tolerate=(404, 409))

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        status, payload = self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        return self._ok("PATCH", path, status, payload)

    def merge_patch_if_unchanged(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        """A merge patch that carries the ``metadata.resourceVersion`` it was computed from; the
        object as patched, or None when it changed meanwhile (409) or is gone (404), and the
        caller decides again."""
        status, payload = self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        self._ok("PATCH", path, status, payload, tolerate=(404, 409))
        return payload if 200 <= status < 300 and isinstance(payload, dict) else None

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
    "Workload": f"/apis/{kueue.GROUP}/{kueue.VERSION}/namespaces/{{ns}}/workloads",
}


def collection_path(kind: str, namespace: str) -> str:
    return _COLLECTIONS[kind].format(ns=_ns(namespace))


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
