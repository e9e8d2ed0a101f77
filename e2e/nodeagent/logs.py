"""Container logs, as a container runtime keeps them (CRI log files) and a kubelet renders them."""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
from pathlib import Path

# container logs, as a container runtime keeps them and a kubelet serves them

#: A record of a CRI log file: ``<RFC3339 time, 9 fraction digits> <stream> <F|P> <content>\n``
#: (``P``: a partial line, continued by the next record).
_RECORD = re.compile(rb"(\S+) (stdout|stderr) ([FP]) (.*)", re.DOTALL)


def rfc3339_nano(ns: int) -> str:
    """A wall-clock time in nanoseconds as the runtime writes it (``2026-11-30T10:00:00.000000001Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def parse_rfc3339(text: str) -> int:
    """RFC 3339 (``Z`` or an offset, any fraction) to nanoseconds since the epoch; ValueError if not."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 time")
    seconds = int(
        dt.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC).timestamp()
    )
    zone = match.group(3)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    fraction = (match.group(2) or "").ljust(9, "0")
    return seconds * 10**9 + int(fraction)


def cri_records(data: bytes, stamp: str, partial_before: bool = False) -> bytes:
    """``data`` read from a container's output at ``stamp``, as CRI log records (one per line piece)."""
    pieces = data.split(b"\n")
    out = [stamp.encode() + b" stdout F " + piece + b"\n" for piece in pieces[:-1]]
    if pieces[-1]:
        out.append(stamp.encode() + b" stdout P " + pieces[-1] + b"\n")
    return b"".join(out)


class LogRun:
    """One run of a container: its output is read from a pipe and appended to the pod's plain
    ``<container>.log`` (all runs, as the testbed always kept it) and to this run's CRI log file
    ``containers/<container>/<restart>.log`` (each line with the time it arrived), which the
    kubelet log endpoint serves. ``changed`` is notified on every write and at the end."""

    def __init__(self, path: Path, plain: Path) -> None:
        self.path = path
        self.plain = plain
        self.changed = threading.Condition()
        self.ended = False  # the output is complete: the pipe closed, or the process exited
        self.thread: threading.Thread | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    def start(self, read_fd: int, name: str) -> None:
        self.thread = threading.Thread(target=self.copy, args=(read_fd,), name=f"log-{name}", daemon=True)
        self.thread.start()

    def copy(self, read_fd: int) -> None:
        try:
            with self.plain.open("ab") as plain, self.path.open("ab") as timed:
                while True:
                    try:
                        data = os.read(read_fd, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        break
                    stamp = rfc3339_nano(time.time_ns())
                    plain.write(data)
                    plain.flush()
                    timed.write(cri_records(data, stamp))
                    timed.flush()
                    with self.changed:
                        self.changed.notify_all()
        finally:
            os.close(read_fd)
            self.end()

    def end(self) -> None:
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def finish(self, timeout: float = 2.0) -> None:
        """The process exited: wait (bounded: a child may keep the pipe open) until its output is
        in the files, then mark the run complete."""
        if self.thread is not None:
            self.thread.join(timeout)
        self.end()


class LogOptions:
    """The kubelet's ``PodLogOptions`` query (``/containerLogs/...?follow=...``) as the agent honours it."""

    BOOLS = ("follow", "previous", "timestamps")

    def __init__(self, query: dict[str, list[str]]) -> None:
        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        def boolean(name: str) -> bool:
            value = one(name)
            if value is None or value == "":
                return False
            if value in ("1", "t", "T", "true", "TRUE", "True"):
                return True
            if value in ("0", "f", "F", "false", "FALSE", "False"):
                return False
            raise ValueError(f"{name}={value!r} is not a boolean")

        def integer(name: str) -> int | None:
            value = one(name)
            return None if value is None else int(value)

        self.follow, self.previous, self.timestamps = (boolean(n) for n in self.BOOLS)
        tail = one("tail")  # the kubelet's older spelling; "all" means no limit
        self.tail_lines = integer("tailLines") if tail is None else (None if tail == "all" else int(tail))
        self.limit_bytes = integer("limitBytes")
        since_seconds = integer("sinceSeconds")
        since_time = one("sinceTime")
        if since_seconds is not None and since_time is not None:
            raise ValueError("at most one of sinceTime and sinceSeconds may be given")
        if since_seconds is not None and since_seconds < 1:
            raise ValueError("sinceSeconds must be greater than 0")
        if self.tail_lines is not None and self.tail_lines < 0:
            raise ValueError("tailLines must be 0 or greater")
        if self.limit_bytes is not None and self.limit_bytes < 1:
            raise ValueError("limitBytes must be greater than 0")
        self.since_ns = (
            time.time_ns() - since_seconds * 10**9
            if since_seconds is not None
            else (parse_rfc3339(since_time) if since_time is not None else None)
        )
        stream = one("stream")
        if stream not in (None, "All"):  # the alpha PodLogsQuerySplitStreams gate is off
            raise ValueError(f"unable to return the given log stream: {stream!r}")


class LogRenderer:
    """Turns CRI records into what the kubelet writes for ``options``: since-filtered, optionally
    timestamped at each line's start, cut at ``limitBytes``."""

    def __init__(self, options: LogOptions) -> None:
        self.options = options
        self.remain = options.limit_bytes if options.limit_bytes is not None else -1
        self.line_start = True

    @property
    def full(self) -> bool:
        return self.remain == 0

    def render(self, records: list[bytes]) -> bytes:
        out = []
        for record in records:
            if self.full:
                break
            match = _RECORD.fullmatch(record.rstrip(b"\n"))
            if match is None:
                continue
            stamp, _, tag, content = match.groups()
            if tag == b"F":
                content += b"\n"
            at_start, self.line_start = self.line_start, tag == b"F"
            if self.options.since_ns is not None and parse_rfc3339(stamp.decode()) < self.options.since_ns:
                continue
            if self.options.timestamps and at_start:
                content = stamp + b" " + content
            if self.remain >= 0:
                content = content[: self.remain]
                self.remain -= len(content)
            out.append(content)
        return b"".join(out)


def tail_start(records: list[bytes], lines: int | None) -> int:
    """Index of the first record of the last ``lines`` lines (a line: partial records up to a full one)."""
    if lines is None:
        return 0
    starts = [0] + [i + 1 for i, record in enumerate(records) if record.split(b" ", 3)[2:3] == [b"F"]]
    if starts[-1] == len(records):
        starts.pop()  # no partial line at the end
    return starts[-lines] if 0 < lines <= len(starts) else (0 if lines > 0 else len(records))
