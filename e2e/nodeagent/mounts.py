"""A container's mounts: the shell script that builds its mount namespace from the pod's volumes."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path, PurePosixPath

# a container's mounts

# Where a container's mount sources are staged, first one that no mountPath of the container covers.
# Each container mounts a private tmpfs there in its own mount namespace: the host keeps an empty folder.
STAGE_CANDIDATES = (
    Path("/run/relaunch-testbed-stage"),
    Path("/var/lib/relaunch-testbed-stage"),
    Path("/mnt/relaunch-testbed-stage"),
)


def _covers(target: PurePosixPath, path: PurePosixPath) -> bool:
    return path == target or target in path.parents


def choose_stage(targets: list[str], candidates: tuple[Path, ...]) -> Path:
    """The first candidate folder that no mount target hides (the sources are reached through it)."""
    normal = [PurePosixPath(os.path.normpath(t)) for t in targets]
    for candidate in candidates:
        if not any(_covers(t, PurePosixPath(candidate)) for t in normal):
            return candidate
    raise ValueError(
        f"every staging folder {[str(c) for c in candidates]} lies under one of the mountPaths {targets}; "
        "mount volumes elsewhere"
    )


def image_paths(path_prefix: Path) -> tuple[Path, ...]:
    """The host folders that stand in for a container image: the venv that ``path_prefix``
    (its ``bin/``) belongs to, and the source tree holding that venv (editable install)."""
    venv = path_prefix.resolve().parent
    return (venv.parent, venv) if (venv.parent / "pyproject.toml").exists() else (venv,)


def keep_image_visible(
    mounts: list[tuple[Path, str, bool]], images: tuple[Path, ...]
) -> list[tuple[Path, str, bool]]:
    """Re-bind every image folder that a volume's mountPath would hide (an emptyDir at ``/tmp``
    hides a checkout under ``/tmp``), as a real image's files stay visible under a volume
    mounted elsewhere. The last entry (the termination log) stays last."""
    targets = [PurePosixPath(os.path.normpath(target)) for _, target, _ in mounts]
    hidden = [
        image
        for image in images
        if any(_covers(target, PurePosixPath(image)) and target != PurePosixPath(image) for target in targets)
    ]
    if not hidden:
        return mounts
    return [*mounts[:-1], *((image, str(image), False) for image in hidden), *mounts[-1:]]


def mount_script(
    hostname: str,
    mounts: list[tuple[Path, str, bool]],
    workdir: str,
    stage: Path,
    is_dir: Callable[[Path], bool] = Path.is_dir,
) -> str:
    """The shell script that sets up one container's mount namespace, then ``exec "$@"``.

    ``mounts`` are (host source, mountPath, read-only). A bind made at ``/tmp`` hides every later
    source under ``/tmp`` -- the cluster's state folder may well lie there, with the emptyDirs,
    the service-account files and the termination-log file. So every source is first bound into
    ``stage`` (a private tmpfs) while the host's view is intact; then the targets are bound from
    there, shallowest mountPath first so that no later mount hides an earlier one (a volume at
    ``/dev`` lies below ``/dev/termination-log``; at equal depth the later mount wins, so callers
    put the termination log last); read-only remounts come last, so a mountPath inside a read-only
    volume can still be created; finally the stage is detached.
    """
    planned = [(source, os.path.normpath(target), ro, is_dir(source)) for source, target, ro in mounts]
    ordered = sorted(enumerate(planned), key=lambda item: (len(PurePosixPath(item[1][1]).parts), item[0]))
    q_stage = shlex.quote(str(stage))
    # the new UTS namespace's hostname (no dependency on a `hostname` binary)
    lines = ["set -e", f"printf %s {shlex.quote(hostname)} > /proc/sys/kernel/hostname"]
    if ordered:
        lines.append(f"mkdir -p {q_stage}; mount -t tmpfs -o size=1m,mode=0700 relaunch-stage {q_stage}")
    for index, (source, _, _, directory) in ordered:
        staged = shlex.quote(str(stage / str(index)))
        lines.append(f"mkdir {staged}" if directory else f": > {staged}")
        lines.append(f"mount --bind {shlex.quote(str(source))} {staged}")
    for index, (_, target, _, directory) in ordered:
        q_tgt = shlex.quote(target)
        if directory:
            lines.append(f"mkdir -p {q_tgt}")
        else:
            parent = shlex.quote(str(PurePosixPath(target).parent))
            lines.append(f"mkdir -p {parent}; [ -e {q_tgt} ] || : > {q_tgt}")
        lines.append(f"mount --bind {shlex.quote(str(stage / str(index)))} {q_tgt}")
    for _, (_, target, read_only, _) in ordered:
        if read_only:
            lines.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
    if ordered:
        lines.append(f"umount -l {q_stage}")
    lines.append(f"mkdir -p {shlex.quote(workdir)}; cd {shlex.quote(workdir)}")
    lines.append('exec "$@"')
    return "\n".join(lines)
