"""An independent model of how MindFormers picks the checkpoint to resume from.

Models ``mindformers.tools.resume_ckpt.get_resume_checkpoint_by_meta`` (and the name handling of
``get_resume_checkpoint`` for a pinned file), written from a reading of its behaviour, so that tests
can compare relaunch's choice with MindFormers' on the same tree. ``resume_files`` answers which
file every rank would load, or raises ``MindFormersRefuses`` where MindFormers stops with an error.

The behaviour, step by step:

1. The world is the number of entries in the checkpoint directory whose name starts with ``rank_``.
2. Each ``rank_<i>/meta.json`` (i below that number) is read; missing files, files that do not parse
   and empty documents are skipped; a document that is not an object makes MindFormers fail; entries
   whose ``last_epoch``/``last_step`` are not ints, whose ``last_ckpt_file`` is not a string, or whose
   name does not match ``^[^/]+-\\d+_\\d+\\.<fmt>$`` are skipped. The smallest ``(epoch, step)``
   wins (the first rank on ties).
3. Without any usable meta.json, every rank loads its own newest file by modification time, after a
   check that those names agree once the rank is substituted. That check looks for ``.ckpt`` files
   whatever the format, so with safetensors it fails whenever rank 0's newest file is well named.
4. Otherwise the name ``<prefix of the winning file>-<its epoch>_<its step>.<fmt>`` is the ceiling.
   For every rank directory, the files that start with that prefix (rank substituted, ``-``
   included) and end in ``.<fmt>`` and are not newer than the ceiling are grouped by
   ``"<epoch>_<step>"``; a group counts when the ranks named in its file names are exactly
   ``0..world-1``; the newest counting group is the choice. Only names are checked, never contents.
5. Rank ``r`` loads its own directory's file named like rank 0's with ``_rank_<n>`` (the first
   number after ``_rank_``) replaced by ``_rank_<r>`` everywhere.
"""

from __future__ import annotations

import json
import os
import re


class MindFormersRefuses(Exception):
    """MindFormers would stop with an error on this tree."""


_RANK = re.compile(r"_rank_(\d+)")


def named_rank(name: str) -> int:
    found = _RANK.search(os.path.basename(name))
    if found is None:
        raise MindFormersRefuses(f"no rank in {name!r}")
    return int(found.group(1))


def for_rank(name: str, rank: int) -> str:
    base = os.path.basename(name)
    return base.replace(f"_rank_{named_rank(base)}", f"_rank_{rank}")


def _well_named(name: str, fmt: str) -> bool:
    return re.match(r"^[^/]+-\d+_\d+\." + fmt + r"$", os.path.split(name)[1]) is not None


def _epoch_step(name: str, fmt: str) -> tuple[int, int]:
    found = re.search(r"-(\d+)_(\d+)\." + fmt, os.path.basename(name))
    if found is None:
        raise MindFormersRefuses(f"no epoch/step in {name!r}")
    return int(found.group(1)), int(found.group(2))


def _newest_by_mtime(directory: str, fmt: str) -> str | None:
    if not os.path.isdir(directory):
        raise MindFormersRefuses(f"{directory} is not a directory")
    names = [n for n in os.listdir(directory) if n.endswith(f".{fmt}")]
    if not names:
        return None
    return max(names, key=lambda n: os.path.getmtime(os.path.join(directory, n)))


def _smallest_meta(root: str, world: int, fmt: str) -> tuple[int, int, str] | None:
    best: tuple[int, int, str] | None = None
    for rank in range(world):
        path = os.path.join(root, f"rank_{rank}", "meta.json")
        if not os.path.exists(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
        except Exception:
            continue
        if not document:
            continue
        if not isinstance(document, dict):
            raise MindFormersRefuses(f"{path} is not an object")
        epoch, step, name = (
            document.get("last_epoch"),
            document.get("last_step"),
            document.get("last_ckpt_file"),
        )
        if not isinstance(epoch, int) or not isinstance(step, int) or not isinstance(name, str):
            continue
        if not _well_named(name, fmt):
            continue
        if best is None or (epoch, step) < (best[0], best[1]):
            best = (epoch, step, name)
    return best


def _without_meta(root: str, world: int, fmt: str) -> dict[int, str]:
    reference: str | None = None
    for rank in range(world):
        newest = _newest_by_mtime(os.path.join(root, f"rank_{rank}"), fmt)
        if newest is None:
            raise MindFormersRefuses(f"rank {rank} has no .{fmt} file")
        if _well_named(newest, fmt):
            reference = for_rank(newest, 0)
            break
    if reference is not None:
        odd = False
        for rank in range(world):
            newest = _newest_by_mtime(os.path.join(root, f"rank_{rank}"), "ckpt")  # format not passed on
            if newest is None:
                raise MindFormersRefuses("name check found no file (TypeError in MindFormers)")
            if not _well_named(newest, fmt):
                odd = True
                continue
            if for_rank(newest, 0) != reference:
                raise MindFormersRefuses("newest files disagree across ranks")
        if odd:
            raise MindFormersRefuses("some newest files are not named <prefix>-<epoch>_<step>")
    chosen = {}
    for rank in range(world):
        newest = _newest_by_mtime(os.path.join(root, f"rank_{rank}"), fmt)
        if newest is None:
            raise MindFormersRefuses(f"rank {rank} has no .{fmt} file")
        chosen[rank] = newest
    return chosen


def resume_files(root: str, fmt: str) -> dict[int, str]:
    """{rank: basename in rank_<rank>/} that MindFormers would load, for every rank of its world."""
    world = sum(1 for name in os.listdir(root) if name.startswith("rank_"))
    best = _smallest_meta(root, world, fmt)
    if best is None:
        return _without_meta(root, world, fmt)
    epoch, step, named = best
    ceiling_name = f"{named[: named.rfind('-')]}-{epoch}_{step}.{fmt}"
    head = ceiling_name[: ceiling_name.rfind("-") + 1]
    ceiling = _epoch_step(ceiling_name, fmt)
    origin = named_rank(ceiling_name)
    groups: dict[str, list[str]] = {}
    for rank in range(world):
        rank_head = head.replace(f"rank_{origin}", f"rank_{rank}")
        directory = os.path.join(root, f"rank_{rank}")
        if not os.path.exists(directory):
            raise MindFormersRefuses(f"{directory} is not found")
        for name in os.listdir(directory):
            if name.startswith(rank_head) and name.endswith(f".{fmt}"):
                found = _epoch_step(name, fmt)
                if found <= ceiling:
                    groups.setdefault(f"{found[0]}_{found[1]}", []).append(name)
    usable = []
    for names in groups.values():
        ranks = {named_rank(n) for n in names}
        if len(ranks) == world and max(ranks) == world - 1:
            first = for_rank(min(names, key=named_rank), 0)
            if not os.path.exists(os.path.join(root, "rank_0", first)):
                raise MindFormersRefuses(f"{first} is not found")
            usable.append(first)
    if not usable:
        raise MindFormersRefuses("No checkpoint could be resumed.")
    chosen = max(usable, key=lambda n: _epoch_step(n, fmt))
    return {rank: for_rank(chosen, rank) for rank in range(world)}


def pinned_files(name: str, fmt: str, world: int) -> dict[int, str]:
    """The file each rank opens for ``resume_training: <name>``."""
    if not name.endswith(f".{fmt}"):
        name = f"{name}.{fmt}"
    return {rank: for_rank(name, rank) for rank in range(world)}
