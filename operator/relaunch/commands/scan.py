"""``relaunch scan DIR``: which checkpoint to resume from, and why newer ones are not usable.

Usage::

    relaunch scan DIR [--format safetensors|ckpt] [--ranks N] [--verify header|deep]
                      [--resume NAME] [--json]

``DIR`` is a MindFormers checkpoint directory: Checkpoint 1.0 (``rank_<r>/``), Checkpoint 2.0
(``iteration_<n>/``) or unified weights (``param_name_map.json`` / ``hyper_param.safetensors``).
``--resume NAME`` pins one step by file name (MindFormers' ``resume_training: <name>``, rank
substituted per rank; for 2.0 ``iteration_<n>``); ``--verify deep`` reads every byte and checks CRCs.

Exit codes
----------
- ``0``: a checkpoint to resume from was found (``choice`` is not null);
- ``3``: the tree is valid but holds no complete, intact step (also: an empty directory);
- ``2``: bad input, with one line on stderr: the directory does not exist or is not a checkpoint
  tree, a file cannot be read (permissions), the arguments are wrong, or the pinned file
  (``--resume``) is missing or corrupt on some rank (the JSON is still printed with ``--json``).

JSON contract (``--json``; stable, consumed by the planning Job)
----------------------------------------------------------------
One object::

    {
      "root": "/abs/path",                 # the scanned directory
      "layout": "v1" | "v2" | "unified" | "empty",
      "format": "safetensors" | "ckpt" | null,
      "ranks": 8,                          # world size used (given, or inferred from rank_<r>/)
      "choice": null | {
        "kind": "sharded" | "iteration" | "unified",
        "epoch": 2 | null,                 # null for v2 and unified
        "step": 100 | null,                # v2: the iteration; null for unified
        "directory": "/abs/path",          # v1: the root; v2: the iteration dir; unified: the dir
        "prefix": "qwen3_rank_{rank}" | null,
        "name_pattern": "qwen3_rank_{rank}-2_100.safetensors" | null,   # str.format(rank=r)
        "format": "safetensors" | "ckpt",
        "remove_redundancy": false,
        "files": {"0": "/abs/path/rank_0/qwen3_rank_0-2_100.safetensors", ...},  # rank -> file
        "parts": ["/abs/...", ...]         # v2: every shard; unified: every part; v1: []
      },
      "rejected": [                        # every candidate newer than the choice, newest first
        {"epoch": 2, "step": 110, "prefix": "qwen3_rank_{rank}",
         "reason": "missing on rank 3", "ranks": [3]}
      ],
      "complete": [{"epoch": 2, "step": 100, "prefix": "qwen3_rank_{rank}"}, ...],
                                           # present on every rank, newest first (older than the
                                           # choice: not verified)
      "pinned": "qwen3_rank_0-2_50.safetensors" | null,
      "pinned_error": "resume file ...: missing on rank 3" | null,
      "notes": ["meta.json: behind the chosen step on ranks 0-7 (stale)", ...]
    }

Fields may be added; none will be renamed or change meaning.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from relaunch.checkpoints import Candidate, ScanResult, scan

EXIT_CHOSEN = 0
EXIT_BAD_INPUT = 2
EXIT_NOTHING_COMPLETE = 3

#: Up to this many ranks the table shows one mark per rank; above, a summary.
_MARKS_UP_TO = 32
#: Older steps shown below the chosen one.
_OLDER_ROWS = 5
_LEGEND = "marks: # verified  + present (not verified)  X corrupt  . missing  t only a .tmp"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "scan",
        help="find the newest checkpoint complete and intact on every rank",
        description=(
            "Scan a MindFormers checkpoint directory and report the step to resume from, verifying "
            "every file of it, and why each newer step was rejected. Exit 0: found; 3: nothing "
            "complete; 2: bad input."
        ),
    )
    parser.add_argument("directory", metavar="DIR", help="the checkpoint directory (holding rank_<r>/ ...)")
    parser.add_argument("--format", choices=("safetensors", "ckpt"), help="only consider this format")
    parser.add_argument("--ranks", type=int, metavar="N", help="world size (default: from rank_<r>/)")
    parser.add_argument(
        "--verify", choices=("header", "deep"), default="header", help="deep: read every byte, check CRCs"
    )
    parser.add_argument("--resume", metavar="NAME", help="pin a step by file name (resume_training: NAME)")
    parser.add_argument("--json", action="store_true", help="print the JSON document (see the contract)")
    return parser


def run(args: argparse.Namespace) -> int:
    result = scan(args.directory, fmt=args.format, ranks=args.ranks, verify=args.verify, resume=args.resume)
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(result, args.verify))
    if result.pinned_error is not None:
        print(f"relaunch scan: {result.pinned_error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_CHOSEN if result.choice is not None else EXIT_NOTHING_COMPLETE


# ---- the human-readable report ----------------------------------------------------------------

_LAYOUTS = {"v1": "Checkpoint 1.0", "v2": "Checkpoint 2.0", "unified": "unified weights", "empty": "empty"}


def render(result: ScanResult, verify: str = "header") -> str:
    lines = [
        f"{result.root}: {_LAYOUTS[result.layout]}"
        + (f", {result.format}" if result.format else "")
        + (f", {result.ranks} ranks" if result.ranks else "")
    ]
    lines.append(_choice_line(result, verify))
    if result.pinned_error:
        lines.append(f"pinned file unusable: {result.pinned_error}")
    if result.candidates:
        lines.append("")
        lines.extend(_table(result))
    elif result.rejected:
        lines.append("")
        lines.append("rejected:")
        for rejection in result.rejected:
            what = f"iteration {rejection.step}" if rejection.step is not None else "weights"
            lines.append(f"  {what}: {rejection.reason}")
    if result.notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(f"  - {note}" for note in result.notes)
    return "\n".join(lines) + "\n"


def _choice_line(result: ScanResult, verify: str) -> str:
    choice = result.choice
    if choice is None:
        if result.layout == "empty":
            return "resume from: nothing (empty directory: training starts from scratch)"
        return "resume from: nothing complete and intact"
    count = len(choice.parts) or len(choice.files)
    checked = f"{verify} verification of {count} file{'s' if count != 1 else ''} passed"
    if choice.kind == "unified":
        return f"resume from: unified weights in {choice.directory} ({checked})"
    if choice.kind == "iteration":
        return f"resume from: iteration {choice.step} in {choice.directory} ({checked})"
    redundancy = ", remove_redundancy" if choice.remove_redundancy else ""
    step = f"epoch {choice.epoch} step {choice.step}"
    return f"resume from: {step}  {choice.name_pattern}  ({checked}{redundancy})"


def _marks(candidate: Candidate, world: int) -> str:
    missing, corrupt, tmp = set(candidate.missing), set(candidate.corrupt), set(candidate.tmp)
    verified = candidate.status == "chosen" or (candidate.status == "rejected" and bool(corrupt))
    if world <= _MARKS_UP_TO:
        out = []
        for rank in range(world):
            if rank in corrupt:
                out.append("X")
            elif rank in tmp:
                out.append("t")
            elif rank in missing:
                out.append(".")
            else:
                out.append("#" if verified else "+")
        return "".join(out)
    parts = [f"{world - len(missing)}/{world}"]
    if missing:
        parts.append(f"missing {_short(missing)}")
    if corrupt:
        parts.append(f"corrupt {_short(corrupt)}")
    return " ".join(parts)


def _short(ranks: set[int], limit: int = 4) -> str:
    ordered = sorted(ranks)
    text = ",".join(str(r) for r in ordered[:limit])
    return text + (f",+{len(ordered) - limit}" if len(ordered) > limit else "")


def _table(result: ScanResult) -> list[str]:
    rows: list[tuple[str, ...]] = []
    reasons = {(r.epoch, r.step, r.prefix): r.reason for r in result.rejected}
    older = 0
    hidden = 0
    for candidate in result.candidates:
        if candidate.status in ("complete", "incomplete"):
            older += 1
            if older > _OLDER_ROWS:
                hidden += 1
                continue
        if candidate.status == "rejected":
            status = "rejected: " + reasons.get((candidate.epoch, candidate.step, candidate.prefix), "")
        elif candidate.status == "chosen":
            status = "CHOSEN"
        elif candidate.status == "complete":
            status = "complete (not verified)"
        else:
            status = "incomplete"
        rows.append(
            (
                str(candidate.epoch),
                str(candidate.step),
                candidate.prefix,
                _marks(candidate, result.ranks),
                status,
            )
        )
    header = (
        "EPOCH",
        "STEP",
        "PREFIX",
        f"RANKS 0-{result.ranks - 1}" if result.ranks > 1 else "RANK 0",
        "STATUS",
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in [header, *rows]
    ]
    if hidden:
        lines.append(f"... {hidden} older steps not shown")
    lines.append(_LEGEND)
    return lines
