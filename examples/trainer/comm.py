"""Collective communication over TCP: a tiny service hosted by rank 0 and a client in every rank.

Owns the wire protocol, deterministic all-reduce and failure propagation. Every rank (rank 0
included) connects to the service at ``MASTER_ADDR:MASTER_PORT``; an all-reduce sends this rank's
array, the service sums the group's contributions **in group order** (so the result is bitwise
the same on every rank and in every run) and sends the sum back to each member.

Failure behaves as in real jobs, only faster: when a rank's connection closes without a goodbye
(the process died), the service tells every other rank and closes their connections, so they
raise ``CommError`` within moments; a rank that hangs is caught by the per-call timeout.
Connecting retries until ``connect_timeout`` because rank 0's pod may start later than the others
and its name may not resolve at first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import struct
import threading
import time
from typing import Any

import numpy as np

_FRAME = struct.Struct("!IQ")  # header length, payload length


class CommError(RuntimeError):
    """A collective failed: a peer died, the service went away, or a call timed out."""


def _send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    sock.sendall(_FRAME.pack(len(raw), len(payload)) + raw + payload)


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = sock.recv(min(count - len(chunks), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        chunks += chunk
    return bytes(chunks)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    header_len, payload_len = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    header = json.loads(_recv_exact(sock, header_len))
    payload = _recv_exact(sock, payload_len) if payload_len else b""
    return header, payload


class CollectiveServer:
    """The service rank 0 hosts; threads only, one per connected rank."""

    def __init__(
        self, port: int, world_size: int, *, host: str = "0.0.0.0", bind_timeout: float = 0.0
    ) -> None:
        self.world_size = world_size
        self._lock = threading.Lock()
        self._conns: dict[int, socket.socket] = {}
        self._send_locks: dict[int, threading.Lock] = {}
        self._finished: set[int] = set()
        self._pending: dict[tuple[tuple[int, ...], int], dict[int, np.ndarray]] = {}
        self._aborted: str | None = None
        self._listener = _listen(host, port, backlog=max(16, world_size), wait=bind_timeout)
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, name="collective-accept", daemon=True)

    def start(self) -> None:
        self._accept_thread.start()

    def wait_finished(self, timeout: float) -> bool:
        """Wait until every rank said goodbye (or the job aborted); True if all finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._finished) == self.world_size or self._aborted:
                    return not self._aborted
            time.sleep(0.02)
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            _shutdown(conn)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        rank: int | None = None
        try:
            header, _ = _recv(conn)
            rank = self._register(conn, header)
            if rank is None:
                return
            while True:
                header, payload = _recv(conn)
                op = header.get("op")
                if op == "bye":
                    with self._lock:
                        self._finished.add(rank)
                    _send(conn, {"op": "bye"})
                    return
                if op == "allreduce":
                    self._contribute(rank, header, payload)
                else:
                    self.abort(f"rank {rank} sent an unknown operation {op!r}")
                    return
        except (OSError, ValueError, KeyError, TypeError, struct.error):  # dead peer or garbled message
            if rank is not None:
                with self._lock:
                    finished = rank in self._finished
                if not finished:
                    self.abort(f"rank {rank} disconnected before finishing (process died or was killed)")

    def _register(self, conn: socket.socket, header: dict[str, Any]) -> int | None:
        rank = header.get("rank")
        world = header.get("world")
        problem = None
        if header.get("op") != "hello" or not isinstance(rank, int):
            problem = "expected a hello with a rank"
        elif world != self.world_size:
            problem = f"rank {rank} believes the world size is {world}, the service serves {self.world_size}"
        elif not 0 <= rank < self.world_size:
            problem = f"rank {rank} is outside the world of {self.world_size}"
        with self._lock:
            if problem is None and rank in self._conns:
                problem = f"rank {rank} connected twice"
            if problem is None and self._aborted:
                problem = self._aborted
            if problem is None:
                assert isinstance(rank, int)
                self._conns[rank] = conn
                self._send_locks[rank] = threading.Lock()
        if problem is not None:
            try:
                _send(conn, {"op": "error", "reason": problem})
            finally:
                _shutdown(conn)
            return None
        _send(conn, {"op": "welcome"})
        return rank

    def _contribute(self, rank: int, header: dict[str, Any], payload: bytes) -> None:
        group = tuple(int(r) for r in header["group"])
        key = (group, int(header["seq"]))
        array = np.frombuffer(payload, dtype=np.dtype(header["dtype"])).reshape(header["shape"])
        with self._lock:
            contributions = self._pending.setdefault(key, {})
            contributions[rank] = array
            if len(contributions) < len(group):
                return
            del self._pending[key]
        # Sum in group order, never in arrival order: the result must not depend on timing.
        total = contributions[group[0]].copy()
        for member in group[1:]:
            total += contributions[member]
        reply = {"op": "result", "seq": key[1], "dtype": header["dtype"], "shape": header["shape"]}
        raw = total.tobytes()
        for member in group:
            with self._lock:
                conn = self._conns.get(member)
                send_lock = self._send_locks.get(member)
            if conn is None or send_lock is None:
                continue
            try:
                with send_lock:
                    _send(conn, reply, raw)
            except OSError:
                self.abort(f"rank {member} stopped listening")

    def abort(self, reason: str) -> None:
        """Tell every rank the job failed and close all connections."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = reason
            members = list(self._conns.items())
        for member, conn in members:
            send_lock = self._send_locks[member]
            if send_lock.acquire(timeout=1.0):
                try:
                    conn.settimeout(1.0)
                    _send(conn, {"op": "abort", "reason": reason})
                except OSError:
                    pass
                finally:
                    send_lock.release()
            _shutdown(conn)


def _listen(host: str, port: int, *, backlog: int, wait: float) -> socket.socket:
    """Bind the service's port, waiting up to ``wait`` s while a previous attempt's rank 0 still holds it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return socket.create_server((host, port), backlog=backlog)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise OSError(
                    exc.errno,
                    f"rank 0 cannot listen on {host}:{port} for the collective service: {exc.strerror}",
                ) from None
        time.sleep(0.2)


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        conn.close()


class Collective:
    """One rank's connection to the service."""

    def __init__(self, sock: socket.socket, rank: int, world_size: int, timeout: float) -> None:
        self._sock = sock
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self._seq: dict[tuple[int, ...], int] = {}

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        *,
        timeout: float,
        connect_timeout: float,
    ) -> Collective:
        """Connect and say hello, retrying until ``connect_timeout``.

        Retried: the name does not resolve yet, the port refuses, and handshakes that fail or get
        no answer (a previous attempt's rank 0 may still hold the port for a moment) or are
        refused (that old service knows another world size or already has this rank).
        """
        deadline = time.monotonic() + connect_timeout
        delay = 0.05
        while True:
            try:
                return cls._try_connect(host, port, rank, world_size, timeout, deadline)
            except (OSError, ValueError, struct.error, CommError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + delay > deadline:
                raise CommError(
                    f"rank {rank}: could not join the collective service at {host}:{port} within "
                    f"{connect_timeout:.0f} s ({last_error}); "
                    "is rank 0 running, and are MASTER_ADDR/MASTER_PORT right?"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    @classmethod
    def _try_connect(
        cls, host: str, port: int, rank: int, world_size: int, timeout: float, deadline: float
    ) -> Collective:
        attempt_timeout = max(0.1, min(5.0, deadline - time.monotonic()))
        sock = socket.create_connection((host, port), timeout=attempt_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _send(sock, {"op": "hello", "rank": rank, "world": world_size})
            header, _ = _recv(sock)
            if header.get("op") != "welcome":
                raise CommError(f"the service refused rank {rank}: {header.get('reason')}")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout)
        return cls(sock, rank, world_size, timeout)

    def all_reduce(
        self, array: np.ndarray, group: tuple[int, ...], *, timeout: float | None = None
    ) -> np.ndarray:
        """Sum ``array`` over ``group`` in ascending rank order; every member gets the same bits."""
        if self.rank not in group:
            raise ValueError(f"rank {self.rank} is not in group {group}")
        array = np.ascontiguousarray(array)
        if len(group) == 1:
            return array.copy()
        seq = self._seq.get(group, 0)
        self._seq[group] = seq + 1
        header = {
            "op": "allreduce",
            "group": list(group),
            "seq": seq,
            "dtype": array.dtype.str,
            "shape": list(array.shape),
        }
        self._sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            _send(self._sock, header, array.tobytes())
            reply, payload = _recv(self._sock)
        except TimeoutError:
            raise CommError(
                f"rank {self.rank}: all-reduce over ranks {list(group)} got no answer within "
                f"{self._sock.gettimeout():.0f} s (a peer hangs or the network is down)"
            ) from None
        except (OSError, ValueError, struct.error) as exc:
            raise CommError(
                f"rank {self.rank}: lost the collective service during an all-reduce ({exc})"
            ) from None
        finally:
            self._sock.settimeout(self.timeout)
        if reply.get("op") == "abort":
            raise CommError(f"rank {self.rank}: job aborted: {reply.get('reason')}")
        if reply.get("op") != "result" or reply.get("seq") != seq:
            raise CommError(f"rank {self.rank}: unexpected reply {reply!r} to all-reduce #{seq}")
        return np.frombuffer(payload, dtype=array.dtype).reshape(array.shape).copy()

    def barrier(self, *, timeout: float | None = None) -> None:
        self.all_reduce(np.zeros(1, dtype=np.float32), tuple(range(self.world_size)), timeout=timeout)

    def close(self) -> None:
        """Say goodbye (so the service does not treat the exit as a failure) and disconnect."""
        try:
            _send(self._sock, {"op": "bye"})
            _recv(self._sock)
        except (OSError, ValueError, struct.error):
            pass
        finally:
            _shutdown(self._sock)

    def abandon(self) -> None:
        """Disconnect without goodbye: the service then aborts the job for everyone."""
        _shutdown(self._sock)
