"""A small REST client of the API server (explicit content types; one requests session per thread)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import requests


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Kube:
    def __init__(self, server: str, ca: Path, cert: Path, key: Path) -> None:
        self.server = server
        self.ca, self.cert, self.key = str(ca), str(cert), str(key)
        self.local = threading.local()

    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self.local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # REQUESTS_CA_BUNDLE would silently replace our CA
            session.verify = self.ca
            session.cert = (self.cert, self.key)
            self.local.session = session
        return session

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        data = json.dumps(body) if body is not None else None
        response = self.session().request(
            method,
            self.server + path,
            data=data,
            params=params,
            timeout=timeout,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise KubeError(response.status_code, message)
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params or None)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, body)

    def patch(self, path: str, body: Any, strategic: bool = True) -> Any:
        kind = "strategic-merge-patch" if strategic else "merge-patch"
        return self.call("PATCH", path, body, content_type=f"application/{kind}+json")

    def delete(self, path: str, body: Any = None) -> Any:
        return self.call("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_s: int = 240) -> Any:
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        with self.session().get(self.server + path, params=params, stream=True, timeout=timeout_s + 30) as r:
            if r.status_code >= 400:
                raise KubeError(r.status_code, r.text)
            for line in r.iter_lines():
                if line:
                    yield json.loads(line)


def pod_path(ns: str, name: str) -> str:
    return f"/api/v1/namespaces/{ns}/pods/{name}"
