"""Machine-wide state shared by the node agents running on this host: the loopback address range
each agent claims, and each cluster's block of names in ``/etc/hosts``."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any

HOSTS_FILE = Path(os.environ.get("RELAUNCH_HOSTS_FILE", "/etc/hosts"))
HOSTS_LOCK = Path("/tmp/relaunch-testbed-hosts.lock")


OCTET_LOCKS = Path("/tmp/relaunch-testbed-octets")


def claim_address_octet(state_dir: Path) -> tuple[int, Any]:
    """Second octet of this cluster's loopback addresses, unique among the agents running now.

    Each agent holds an flock on ``/tmp/relaunch-testbed-octets/<octet>`` for its lifetime (the
    kernel releases it when the agent dies), trying first the octet its state dir hashes to.
    Returns the octet and the open lock file (keep it open).
    """
    OCTET_LOCKS.mkdir(exist_ok=True)
    first = int(hashlib.sha256(str(state_dir).encode()).hexdigest(), 16) % 200
    for i in range(200):
        octet = 16 + (first + i) % 200
        handle = (OCTET_LOCKS / str(octet)).open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return octet, handle
    raise RuntimeError(f"all 200 address ranges in {OCTET_LOCKS} are held by running node agents")


# ----------------------------------------------------------------------------------------------
# /etc/hosts


def _hosts_markers(state_dir: Path) -> tuple[str, str]:
    return f"# BEGIN relaunch-testbed {state_dir}", f"# END relaunch-testbed {state_dir}"


def write_hosts_block(state_dir: Path, lines: list[str]) -> None:
    """Replace this cluster's block in /etc/hosts (other content and other clusters' blocks kept)."""
    begin, end = _hosts_markers(state_dir)
    with HOSTS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = HOSTS_FILE.read_text()
        except FileNotFoundError:
            old = ""
        kept, inside = [], False
        for line in old.splitlines():
            if line == begin:
                inside = True
            elif line == end and inside:
                inside = False
            elif not inside:
                kept.append(line)
        new_lines = kept + ([begin, *lines, end] if lines else [])
        new = "\n".join(new_lines) + "\n"
        if new == old:
            return
        tmp = HOSTS_FILE.with_name(HOSTS_FILE.name + ".relaunch-tmp")
        try:  # atomic when /etc/hosts is a plain file
            tmp.write_text(new)
            tmp.chmod(HOSTS_FILE.stat().st_mode & 0o777 if HOSTS_FILE.exists() else 0o644)
            tmp.replace(HOSTS_FILE)
        except OSError:  # a bind-mounted /etc/hosts cannot be replaced: rewrite it in place
            tmp.unlink(missing_ok=True)
            with HOSTS_FILE.open("w") as out:
                out.write(new)


def remove_hosts_block(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        write_hosts_block(state_dir, [])
