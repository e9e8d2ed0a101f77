"""The kubelet's log endpoint: one HTTPS listener per node address, serving ``/containerLogs``."""

from __future__ import annotations

import contextlib
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from e2e.nodeagent.common import LOG
from e2e.nodeagent.logs import LogOptions, LogRenderer, LogRun, tail_start

if TYPE_CHECKING:
    from e2e.nodeagent.agent import Agent
    from e2e.nodeagent.heartbeat import NodeState

HANDSHAKE_TIMEOUT_S = 10.0
#: How often a follow stream with nothing new checks that its client and its node are still there.
FOLLOW_CHECK_S = 1.0


class LogRequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class KubeletServer(ThreadingHTTPServer):
    """``GET /containerLogs/<ns>/<pod>/<container>`` (and ``/healthz``) for one node, on the node's own
    address, as its kubelet serves them to the API server: TLS with the node's serving certificate,
    and a client certificate signed by the cluster CA required (no authorization beyond that)."""

    daemon_threads = True

    def __init__(self, agent: Agent, node: NodeState, port: int, context: ssl.SSLContext) -> None:
        self.agent = agent
        self.node = node
        self.context = context
        self.connections: dict[ssl.SSLSocket, bool] = {}  # open connection -> streaming a log now
        self.connections_lock = threading.Lock()
        super().__init__((node.ip, port), KubeletHandler)

    def drop_idle_connections(self) -> None:
        """Close every connection not streaming a log (kept-alive ones included), so that the API
        server's next request dials again (and finds nothing listening)."""
        with self.connections_lock:
            idle = [connection for connection, streaming in self.connections.items() if not streaming]
        for connection in idle:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def set_streaming(self, connection: ssl.SSLSocket, streaming: bool) -> None:
        with self.connections_lock:
            if connection in self.connections:
                self.connections[connection] = streaming

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would look the address up in DNS
        self.server_name, self.server_port = self.node.name, self.server_address[1]

    def finish_request(self, request: Any, client_address: Any) -> None:
        # the TLS handshake runs here, in the connection's own thread, so a slow client blocks no other
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            connection = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            LOG.info("node %s: TLS handshake with %s refused: %s", self.node.name, client_address, error)
            return
        with self.connections_lock:
            self.connections[connection] = False
        try:
            connection.settimeout(None)
            self.RequestHandlerClass(connection, client_address, self)
        finally:
            with self.connections_lock:
                self.connections.pop(connection, None)
            with contextlib.suppress(OSError):
                connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOG.warning("node %s: request from %s failed", self.node.name, client_address, exc_info=True)


class ConnectionLost(Exception):
    """The node lost power while answering: the connection is dropped without a proper end."""


class KubeletHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: KubeletServer

    def log_message(self, format: str, *args: Any) -> None:
        LOG.info("kubelet %s: " + format, self.server.node.name, *args)

    def plain(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
        if parts == ["healthz"]:
            self.plain(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self.plain(404, f"404 page not found: {url.path}")
            return
        try:
            options = LogOptions(urllib.parse.parse_qs(url.query, keep_blank_values=True))
        except ValueError as error:
            self.plain(400, f"Invalid request: {error}")
            return
        try:
            run = self.server.agent.log_run(
                self.server.node.name, parts[1], parts[2], parts[3], options.previous
            )
        except LogRequestError as error:
            self.plain(error.status, str(error))
            return
        if self.server.node.lost:  # the request raced the power-off: no answer
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.server.set_streaming(self.connection, True)
        try:
            self.stream(run, options)
        except ConnectionLost:
            # a powered-off machine sends no end: reset the connection once it is back (or at shutdown)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True  # the client went away
            return
        finally:
            self.server.set_streaming(self.connection, False)
        self.wfile.write(b"0\r\n\r\n")

    def client_gone(self) -> bool:
        """The client closed the connection (or sent something, which a log stream's client never does)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def stream(self, run: LogRun, options: LogOptions) -> None:
        renderer = LogRenderer(options)
        node = self.server.node
        with run.path.open("rb") as log:
            pending = b""
            first = True
            while True:
                with run.changed:
                    ended = run.ended  # read before the file, so nothing written before the end is missed
                data = pending + log.read()
                cut = data.rfind(b"\n") + 1
                records, pending = data[:cut].splitlines(keepends=True), data[cut:]
                if first:
                    first = False
                    start = tail_start(records, options.tail_lines)
                    if options.tail_lines is not None and not options.follow:
                        records = records[start:]  # only those lines, even if more arrive meanwhile
                        self.chunk(renderer.render(records))
                        return
                    records = records[start:]
                self.chunk(renderer.render(records))
                if renderer.full or not options.follow:
                    return
                if node.lost:
                    self.wait_for_power()
                if ended:
                    return
                with run.changed:
                    if not run.ended and log.tell() >= run.path.stat().st_size:
                        run.changed.wait(FOLLOW_CHECK_S)
                if self.client_gone():
                    raise ConnectionAbortedError("the client closed the log stream")

    def wait_for_power(self) -> None:
        while self.server.node.lost and not self.server.agent.stopping.is_set():
            time.sleep(FOLLOW_CHECK_S)
        raise ConnectionLost
