"""``relaunch convert unify|reshard``: the command-line face of :mod:`relaunch.convert`.

Owns argument parsing, picking the source files of one step out of a checkpoint root
(``--name-pattern`` or ``--step``), and progress output: a bar on a terminal, JSON lines
(``{"event": "progress", ...}`` then one ``{"event": "done", ...}``) otherwise or with ``--json``;
``{"event": "waiting", "message": ...}`` first when another conversion into the same destination
is running (it waits for that one, then usually finds the result done).

The operator's conversion Job runs ``relaunch convert unify|reshard --conversion RECORD
--termination-log PATH``: ``RECORD`` is the JSON of a plan's ``conversion`` field (``source``
with ``dir``/``pattern``/``ranks`` or a unified ``dir``, ``strategy_dir``, ``destination``,
``world_size``, ``destination_pattern``, optionally ``parallel`` ``{"dp", "mp", "pp"}``; without
it, a reshard keeps the source's model parallel and stages and changes data parallel only). The
final ``done`` event (or ``{"event": "error", "message": ...}``) goes to the termination log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from relaunch import convert, strategy

RANK_DIR_RE = re.compile(r"^rank_(\d+)$")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "convert",
        help="merge a sharded checkpoint into unified weights, or reshard it for a new world size",
        description="Convert MindSpore safetensors checkpoints. The result is written to a staging "
        "directory, verified, and published atomically with relaunch-complete.json; re-running a "
        "finished conversion does nothing.",
    )
    operations = parser.add_subparsers(dest="operation", metavar="OPERATION", required=True)
    unify = operations.add_parser("unify", help="sharded -> unified (part*.safetensors, param_name_map.json)")
    _source_args(unify, allow_unified=False)
    reshard = operations.add_parser("reshard", help="sharded or unified -> rank_<r>/ files for a new layout")
    _source_args(reshard, allow_unified=True)
    target = reshard.add_mutually_exclusive_group()
    target.add_argument("--dst-strategy", metavar="DIR", help="the destination job's strategy files")
    target.add_argument(
        "--dst-parallel",
        metavar="dp=N,mp=N,pp=N",
        help="derive the destination from the source strategy ([dp, mp] device matrices only)",
    )
    reshard.add_argument(
        "--out-name-pattern",
        metavar="PATTERN",
        help="output file name, with {rank} and optionally {prefix} {epoch} {step} "
        "(default: the source name with its rank replaced)",
    )
    return parser


def _source_args(parser: argparse.ArgumentParser, *, allow_unified: bool) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--src", metavar="DIR", help="checkpoint root holding rank_<r>/ directories")
    if allow_unified:
        source.add_argument("--src-unified", metavar="DIR", help="a unified checkpoint directory")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument(
        "--name-pattern",
        metavar="PATTERN",
        help="file of each rank, e.g. 'net_rank_{rank}-2_100.safetensors'",
    )
    pick.add_argument("--step", type=int, help="the step to convert (the newest epoch holding it)")
    parser.add_argument("--src-strategy", metavar="DIR", help="the source job's strategy directory or file")
    parser.add_argument("--dst", metavar="DIR", help="output directory (must not exist yet)")
    parser.add_argument(
        "--conversion",
        metavar="JSON",
        help="a plan's conversion record; replaces the source/destination options",
    )
    parser.add_argument("--termination-log", metavar="PATH", help="also write the final JSON event here")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--json", action="store_true", help="JSON progress lines even on a terminal")
    parser.add_argument(
        "--no-fsync",
        dest="durable",
        action="store_false",
        help="do not flush the result to disk before publishing it (faster; for scratch destinations: "
        "the result is trusted only on this machine until it reboots)",
    )


#: Why a Checkpoint 2.0 source is refused: it needs no conversion.
CHECKPOINT_2_NEEDS_NO_CONVERSION = (
    "needs no conversion: its metadata.json records every tensor's global shape and chunks, so "
    "MindFormers loads it at any world size (set checkpoint.load_path to the iteration; `relaunch plan` "
    "does so on a resize)"
)


def _is_checkpoint_2(root: str) -> bool:
    """A Checkpoint 2.0 root (``iteration_<n>/``, the tracker file) or one of its iterations."""
    names = os.listdir(root)
    return (
        "latest_checkpointed_iteration.txt" in names
        or "common.json" in names
        or any(re.match(r"^iteration_\d+$", n) for n in names)
    )


def select_files(
    root: str, *, name_pattern: str | None, step: int | None, ranks: int | None = None
) -> dict[int, str]:
    """``rank -> file`` for one step of a ``rank_<r>/`` checkpoint root (``ranks``: how many, if known)."""
    if not os.path.isdir(root):
        raise convert.ConversionError(f"--src {root}: not a directory")
    if not any(RANK_DIR_RE.match(n) for n in os.listdir(root)) and _is_checkpoint_2(root):
        raise convert.ConversionError(
            f"--src {root}: a Checkpoint 2.0 checkpoint {CHECKPOINT_2_NEEDS_NO_CONVERSION}"
        )
    if ranks is not None:
        rank_list = list(range(ranks))
    else:
        rank_list = sorted(int(m.group(1)) for n in os.listdir(root) if (m := RANK_DIR_RE.match(n)))
    return _select(root, rank_list, name_pattern, step)


def _select(root: str, ranks: list[int], name_pattern: str | None, step: int | None) -> dict[int, str]:
    if not ranks:
        raise convert.ConversionError(f"--src {root}: no rank_<r> directories; expected a checkpoint root")
    if name_pattern is None:
        if step is None:
            raise convert.ConversionError("give --name-pattern or --step to choose the checkpoint to convert")
        candidates = []
        for name in os.listdir(os.path.join(root, f"rank_{ranks[0]}")):
            match = convert.SHARD_NAME_RE.match(name)
            if match and int(match["step"]) == step:
                candidates.append((int(match["epoch"]), name))
        if not candidates:
            raise convert.ConversionError(f"rank_{ranks[0]} holds no safetensors file of step {step}")
        names = {n for e, n in candidates if e == max(candidates)[0]}
        if len(names) > 1:
            raise convert.ConversionError(
                f"step {step} matches several files {sorted(names)}; use --name-pattern"
            )
        name_pattern = re.sub(r"_rank_\d+", "_rank_{rank}", names.pop(), count=1)
    files = {r: os.path.join(root, f"rank_{r}", name_pattern.format(rank=r)) for r in ranks}
    missing = [r for r, p in files.items() if not os.path.isfile(p)]
    if missing:
        raise convert.ConversionError(
            f"ranks {missing[:16]} lack {name_pattern!r}; expected every rank to hold the chosen step"
        )
    return files


class ProgressPrinter:
    """A bar on a terminal, JSON lines otherwise."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.started = time.monotonic()
        self._last = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(event), flush=True)
            return
        if event["event"] != "progress":
            sys.stderr.write(f"{event['message']}\n")
            return
        now = time.monotonic()
        if now - self._last < 0.1 and event["done"] < event["total"]:
            return
        self._last = now
        fraction = event["bytes"] / event["total_bytes"] if event["total_bytes"] else 1.0
        bar = "#" * int(fraction * 30)
        rate = event["bytes"] / max(now - self.started, 1e-6) / 1e9
        sys.stderr.write(
            f"\r{event['phase']:6} [{bar:<30}] {fraction * 100:5.1f}% "
            f"{event['done']}/{event['total']} {rate:.2f} GB/s"
        )
        if event["done"] >= event["total"]:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _from_record(args: argparse.Namespace) -> None:
    """Fill the source/destination options from ``--conversion``."""
    try:
        record = json.loads(args.conversion)
        mode = str(record["mode"]).lower()
        source = record["source"]
        kind = source["kind"]
        directory = source["dir"]
        args.dst = record["destination"]
        world_size = int(record["world_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise convert.ConversionError(
            f"--conversion: malformed record ({exc!r}); expected the JSON of a plan's conversion field"
        ) from None
    if mode != args.operation:
        raise convert.ConversionError(f"--conversion asks for {mode!r}, the command is {args.operation!r}")
    args.src_strategy = record.get("strategy_dir") or args.src_strategy
    if kind == "iteration":
        raise convert.ConversionError(
            f"--conversion: the Checkpoint 2.0 iteration {directory} {CHECKPOINT_2_NEEDS_NO_CONVERSION}"
        )
    if kind == "unified":
        args.src_unified = directory
    elif kind == "sharded" and source.get("pattern"):
        ranks = source.get("ranks")
        args.src_files = select_files(directory, name_pattern=source["pattern"], step=None, ranks=ranks)
    else:
        raise convert.ConversionError(
            f"--conversion: cannot convert a {kind!r} source without a name pattern"
        )
    if args.operation == "reshard":
        args.out_name_pattern = record.get("destination_pattern") or args.out_name_pattern
        parallel = record.get("parallel")
        if parallel:
            args.dst_parallel = ",".join(f"{k}={int(v)}" for k, v in parallel.items())
        else:
            if not args.src_strategy:
                raise convert.ConversionError("--conversion: a reshard needs the record's strategy_dir")
            derived = strategy.dst_parallel_for_world_size(
                strategy.read_strategy_dir(
                    args.src_strategy, ranks=len(args.src_files) if args.src_files else None
                ),
                world_size,
            )
            args.dst_parallel = ",".join(f"{k}={v}" for k, v in derived.items())
        args.dst_strategy = None


def run(args: argparse.Namespace) -> int:
    try:
        done = _run(args)
    except Exception as exc:
        if args.termination_log:
            _write_termination_log(args.termination_log, {"event": "error", "message": str(exc)})
        raise
    if args.termination_log:
        _write_termination_log(args.termination_log, done)
    return 0


def _write_termination_log(path: str, event: dict[str, Any]) -> None:
    # Kubernetes keeps at most 4 KiB of a termination message; ours is one short line.
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(event, separators=(",", ":"))[:4000])


def _run(args: argparse.Namespace, observe: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the conversion ``args`` ask for; ``observe`` also sees every progress event (a
    pre-conversion bounds its write rate through it)."""
    as_json = args.json or not sys.stderr.isatty()
    shown = ProgressPrinter(as_json)

    def printer(event: dict[str, Any]) -> None:
        shown(event)
        if observe is not None:
            observe(event)

    if args.workers < 1:
        raise convert.ConversionError("--workers must be at least 1")
    args.src_files = None
    if args.conversion:
        _from_record(args)
    src_unified = getattr(args, "src_unified", None)
    if not args.dst:
        raise convert.ConversionError("give --dst (or --conversion)")
    if args.src_files is None and not src_unified:
        if not args.src:
            raise convert.ConversionError(
                "give --src" + (" or --src-unified" if args.operation == "reshard" else "")
            )
        args.src_files = select_files(args.src, name_pattern=args.name_pattern, step=args.step)
    if args.operation == "unify":
        if not args.src_strategy:
            raise convert.ConversionError("unify needs the source strategy (--src-strategy)")
        result = convert.unify(
            args.src_files,
            args.src_strategy,
            args.dst,
            workers=args.workers,
            progress=printer,
            durable=args.durable,
        )
    else:
        if not args.dst_strategy and not args.dst_parallel:
            raise convert.ConversionError("reshard needs --dst-strategy or --dst-parallel")
        source: dict[int, str] | str = src_unified if src_unified else args.src_files
        result = convert.reshard(
            source,
            args.src_strategy,
            args.dst,
            dst_strategy_dir=args.dst_strategy,
            dst_parallel=args.dst_parallel,
            name_pattern=args.out_name_pattern,
            workers=args.workers,
            progress=printer,
            durable=args.durable,
        )
    done = {
        "event": "done",
        "operation": args.operation,
        "dst": result.dst_dir,
        "reused": result.reused,
        "bytes": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "files": len(result.marker.get("files", {})),
    }
    if as_json:
        print(json.dumps(done), flush=True)
    else:
        verb = "already complete" if result.reused else f"written in {result.seconds:.1f} s"
        print(f"{result.dst_dir}: {args.operation} {verb} ({result.bytes_written} bytes)")
    return done
