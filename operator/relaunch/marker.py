"""The completion marker of a finished conversion: reading it needs no conversion code.

``relaunch plan`` asks only whether a destination holds a finished conversion; it runs in a Job's
pod at every recovery, so it reads the marker from here (the standard library alone) instead of
importing ``relaunch.convert`` and NumPy with it, about 0.1 CPU seconds per planning pod.
``relaunch.convert`` writes the marker and re-exports these names.
"""

from __future__ import annotations

import json
import os
from typing import Any

MARKER_NAME = "relaunch-complete.json"
MARKER_FORMAT = "relaunch-conversion"
MARKER_VERSION = 1


def _read_marker(dst_dir: str) -> dict[str, Any] | None:
    """``dst_dir``'s marker when it parses and has our format and version."""
    try:
        with open(os.path.join(dst_dir, MARKER_NAME), encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None
    if (
        not isinstance(marker, dict)
        or marker.get("format") != MARKER_FORMAT
        or marker.get("version") != MARKER_VERSION
    ):
        return None
    return marker


def boot_id() -> str | None:
    """This machine's boot id (Linux), which changes on every boot; ``None`` where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _unsynced_elsewhere(marker: dict[str, Any]) -> bool:
    """A result published without fsync, by another boot or another machine than this one.

    Its files may never have reached the disk (a crash after the rename keeps the names and sizes
    but not necessarily the data), so it is trusted only where it was written, until a reboot.
    """
    if marker.get("durable", True) is not False:
        return False
    here = boot_id()
    return here is None or marker.get("boot_id") != here


def is_complete(dst_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The completion marker of a finished conversion in ``dst_dir``, or ``None``.

    Finished means: the marker parses, has our format and version, and every file it lists
    exists with the recorded size (a cheap check; checksums were verified before publishing).
    A result published without fsync (``durable: false``) counts only on the machine and boot
    that wrote it.
    """
    dst_dir = os.fspath(dst_dir)
    marker = _read_marker(dst_dir)
    if marker is None or _unsynced_elsewhere(marker):
        return None
    files = marker.get("files")
    if not isinstance(files, dict):
        return None
    for relpath, entry in files.items():
        try:
            if os.stat(os.path.join(dst_dir, relpath)).st_size != entry["size"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return marker
