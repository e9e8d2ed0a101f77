"""The agent's control API on 127.0.0.1 (``kill_pod``, ``lose_node``, ``hold_pods``, ...) and the
label selectors its holds use."""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from e2e.nodeagent.common import LOG, Conflict

if TYPE_CHECKING:
    from e2e.nodeagent.agent import Agent


def parse_selector(text: str) -> list[tuple[str, bool, str]]:
    """A label selector of equality terms (``k=v``, ``k==v``, ``k!=v``, joined by commas) as
    (key, equal, value) triples; raises ValueError on anything else (set-based terms included)."""
    terms = []
    for term in text.split(","):
        term = term.strip()
        match = re.fullmatch(r"([A-Za-z0-9._/-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)", term)
        if match is None:
            raise ValueError(
                f"label selector {text!r}: term {term!r} is not key=value, key==value or key!=value"
            )
        terms.append((match.group(1), match.group(2) != "!=", match.group(3)))
    return terms


def selector_matches(terms: list[tuple[str, bool, str]], labels: dict[str, str]) -> bool:
    """Kubernetes' meaning: ``k=v`` needs the label with that value, ``k!=v`` is true when it is absent."""
    return all((labels.get(key) == value) is equal for key, equal, value in terms)


def serve_controls(agent: Agent, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            LOG.info("control: " + format, *args)

        def answer(self, code: int, body: Any) -> None:
            data = (json.dumps(body) if not isinstance(body, str) else body).encode()
            self.send_response(code)
            self.send_header(
                "Content-Type", "application/json" if not isinstance(body, str) else "text/plain"
            )
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self.answer(200, "ok")
            elif self.path == "/status":
                self.answer(200, agent.status())
            else:
                self.answer(404, {"error": f"no such resource {self.path}"})

        def do_POST(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
            query = urllib.parse.parse_qs(url.query)
            try:
                if len(parts) == 2 and parts[0] in ("lose_node", "restore_node"):
                    if parts[1] not in agent.nodes:
                        self.answer(404, {"error": f"no node {parts[1]!r}; nodes: {sorted(agent.nodes)}"})
                        return
                    result = (
                        agent.lose_node(parts[1]) if parts[0] == "lose_node" else agent.restore_node(parts[1])
                    )
                    self.answer(200, result)
                elif len(parts) == 3 and parts[0] in ("kill_pod", "pause_pod", "resume_pod"):
                    control = {
                        "kill_pod": agent.kill_pod,
                        "pause_pod": agent.pause_pod,
                        "resume_pod": agent.resume_pod,
                    }[parts[0]]
                    result = control(parts[1], parts[2])
                    if result is None:
                        self.answer(
                            404, {"error": f"pod {parts[1]}/{parts[2]} does not run on this agent's nodes"}
                        )
                    else:
                        self.answer(200, result)
                elif len(parts) == 2 and parts[0] in ("hold_pods", "release_pods"):
                    selector = (query.get("selector") or [""])[0]
                    if parts[0] == "hold_pods":
                        self.answer(200, agent.hold_pods(parts[1], selector))
                        return
                    released = agent.release_pods(parts[1], selector)
                    if released is None:
                        holds = [f"{ns}: {sel}" for ns, sel in agent.holds]
                        self.answer(404, {"error": f"no hold {selector!r} in {parts[1]}; holds: {holds}"})
                    else:
                        self.answer(200, released)
                else:
                    self.answer(404, {"error": f"unknown control {self.path}"})
            except ValueError as error:  # a malformed selector
                self.answer(400, {"error": str(error)})
            except Conflict as error:
                self.answer(409, {"error": str(error)})
            except Exception as error:
                LOG.exception("control %s failed", self.path)
                self.answer(500, {"error": repr(error)})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="controls", daemon=True).start()
    return server
