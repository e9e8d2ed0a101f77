"""The operator's calls into kubernetes, kopf and prometheus-client work with the installed versions.

These run without a cluster: the API client talks HTTP to a stub server on the loopback
interface, the startup handler configures a fresh kopf settings object, the metrics are
rendered by the library's own exposition code. They are what the lowest-versions run
(`make unit-min`) relies on to fail when a lower bound in pyproject.toml is too low.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kopf
import prometheus_client
import pytest
from kubernetes import client as k8s

from relaunch import resources
from relaunch.controller import handlers, metrics
from relaunch.controller.kube import Kube, KubeError


@dataclass
class StubApiServer:
    """Answers every request from ``replies`` (default: 200 with an empty list) and records it."""

    url: str
    replies: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def api_server() -> Iterator[StubApiServer]:
    stub = StubApiServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            stub.seen.append(
                {
                    "method": self.command,
                    "path": parts.path,
                    "query": parse_qs(parts.query),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(body) if body else None,
                }
            )
            status, payload = stub.replies.get((self.command, parts.path), (200, {"items": []}))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _answer

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()


def _configuration(url: str) -> k8s.Configuration:
    configuration = k8s.Configuration(host=url)
    configuration.api_key = {"authorization": "sekret"}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    return configuration


def test_kube_requests_go_out_through_the_official_client(api_server: StubApiServer) -> None:
    kube = Kube(k8s.ApiClient(_configuration(api_server.url)))
    path = "/api/v1/namespaces/team-a/configmaps"
    api_server.replies[("POST", path)] = (201, {"metadata": {"name": "cm"}})
    assert kube.create(path, {"metadata": {"name": "cm"}, "data": {"k": "v"}}) is True
    api_server.replies[("POST", path)] = (409, {"message": "already exists"})
    assert kube.create(path, {"metadata": {"name": "cm"}}) is False  # already there: done

    assert kube.list(path, selector="relaunch.dev/job=demo") == []
    assert kube.get(f"{path}/missing") is not None  # the stub answers 200 for it
    api_server.replies[("GET", f"{path}/gone")] = (404, {"message": "not found"})
    assert kube.get(f"{path}/gone") is None
    api_server.replies[("PATCH", f"{path}/cm")] = (422, {"message": "bad patch"})
    with pytest.raises(KubeError, match=r"PATCH .*/cm: HTTP 422: bad patch"):
        kube.merge_patch(f"{path}/cm", {"data": {"k": "w"}})
    kube.delete(f"{path}/gone", grace_seconds=0)

    create, _, listed, _, _, patch, delete = api_server.seen
    assert create["method"] == "POST" and create["path"] == path
    assert create["body"] == {"metadata": {"name": "cm"}, "data": {"k": "v"}}
    assert create["headers"]["content-type"] == "application/json"
    assert create["headers"]["authorization"] == "Bearer sekret"
    assert listed["query"] == {"labelSelector": ["relaunch.dev/job=demo"]}
    assert patch["headers"]["content-type"] == "application/merge-patch+json"
    assert delete["method"] == "DELETE"
    assert delete["body"] == {"propagationPolicy": "Background", "gracePeriodSeconds": 0}


def test_startup_configures_kopf_and_filters_watches_on_the_server(
    api_server: StubApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers, "RUNTIME", handlers._Runtime())
    monkeypatch.setattr(
        handlers, "load_client_config", lambda: k8s.Configuration.set_default(_configuration(api_server.url))
    )
    settings = kopf.OperatorSettings()

    async def start_and_stop() -> None:
        # kopf hands the startup handler its indices (the pods and Jobs of every job) by name.
        await handlers.configure(settings=settings, relaunch_pods={}, relaunch_jobs={}, relaunch_workloads={})
        assert handlers.RUNTIME.owned.ready
        deadline = time.monotonic() + 10
        while not any(seen["path"] == "/api/v1/nodes" for seen in api_server.seen):
            assert time.monotonic() < deadline, "the node informer never listed the nodes"
            await asyncio.sleep(0.05)
        await handlers.cleanup()

    try:
        asyncio.run(start_and_stop())
    finally:
        k8s.Configuration.set_default(None)
    assert settings.persistence.finalizer == "relaunch.dev/finalizer"
    assert settings.watching.label_selectors["pods"] == resources.LABEL_JOB
    assert settings.watching.label_selectors["batch", "jobs"] == resources.LABEL_JOB
    assert settings.watching.server_timeout == 240
    assert settings.scanning.disabled is True
    # The node informer's list went to the API server through the same client.
    assert any(seen["path"] == "/api/v1/nodes" and not seen["query"] for seen in api_server.seen)


def test_metrics_render_in_the_prometheus_text_format() -> None:
    status = {"restarts": 2, "checkpoint": {"step": 40}, "phase": "Running"}
    completed = {"reason": "WorkerFailed", "seconds": {"total": 1.5}}
    report = json.dumps({"bytes": 4096, "seconds": 3.0})
    metrics.record_round("team-a", "libs", status, completed, report)
    text = prometheus_client.generate_latest().decode()
    assert 'relaunch_restarts{namespace="team-a",trainingjob="libs"} 2.0' in text
    assert 'relaunch_checkpoint_step{namespace="team-a",trainingjob="libs"} 40.0' in text
    assert 'relaunch_recoveries_total{reason="WorkerFailed"}' in text
    assert 'relaunch_recovery_seconds_bucket{le="2.0",stage="total"}' in text
    metrics.forget("team-a", "libs")
    assert 'trainingjob="libs"' not in prometheus_client.generate_latest().decode()


def test_metrics_are_served_over_http() -> None:
    with socket.socket() as probe:  # a free port (the operator is given one by its flags)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(port)
    metrics.record_round("team-a", "served", {"restarts": 1}, None, None)
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert 'relaunch_restarts{namespace="team-a",trainingjob="served"} 1.0' in text
    metrics.forget("team-a", "served")
