"""``relaunch preconvert``: convert the newest complete checkpoint ahead of need, at low priority.

Usage::

    relaunch preconvert DIR --world-size N --target-world-size M --strategy-dir S
                        [--conversion Unify|Reshard] [--keep 1|2] [--budget-bytes B]
                        [--max-write-bytes-per-second R] [--last-conversion JSON]
                        [--output-dir O] [--workers W] [--termination-log PATH] [--json]

The operator's pre-conversion Job runs it while the job trains (``spec.elastic.preconvert``).
It lowers its own CPU and I/O priority (``nice`` 19, the idle I/O class) and, with
``--max-write-bytes-per-second``, bounds its write rate, so that training is not slowed.

It makes the plan a recovery to ``M`` ranks would make right now (:func:`relaunch.commands.plan.make_plan`:
the same scan, the same completeness rules, the same destination), and when that plan converts,
runs the conversion into that destination (staging directory, verification, completion marker
written last, atomic rename: a pre-conversion killed halfway is never published and never
loaded). A recovery that later chooses the same step finds the destination finished and skips
its conversion Job.

The pre-conversions it wrote are listed in ``<conversion dir>/preconverted.json``; only those
are ever removed: the oldest first, so that at most ``--keep`` stay and they fit in
``--budget-bytes`` (never the one ``--last-conversion`` names, which the running gang loaded).
A pre-conversion that the budget cannot hold is not written (state ``BudgetExceeded``).
Staging directories left by killed conversions are removed when no conversion holds their lock.

The report (:class:`relaunch.preconvert.Report`) goes to stdout and to ``--termination-log``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import platform
import secrets
import shutil
import sys
import time
from typing import Any

from relaunch import convert as convert_lib
from relaunch import preconvert
from relaunch.commands import convert as convert_cmd
from relaunch.commands import plan as plan_cmd
from relaunch.plan import CONVERSION_MODES, Plan

#: ioprio_set(2): its syscall number per machine, the idle class and "this process".
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_WHO_PROCESS = 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "preconvert",
        help="convert the newest complete checkpoint for the next resize, ahead of need",
        description=(
            "Plan as a recovery to --target-world-size ranks would, and convert the chosen step into "
            "that plan's destination at low CPU and I/O priority; keep at most --keep such conversions "
            "within --budget-bytes."
        ),
    )
    parser.add_argument("directory", metavar="DIR", help="the job's checkpoint directory (rank_<r>/...)")
    parser.add_argument(
        "--world-size", type=plan_cmd._positive, required=True, metavar="N", help="ranks of the running gang"
    )
    parser.add_argument(
        "--target-world-size",
        type=plan_cmd._positive,
        required=True,
        metavar="M",
        help="ranks to convert for",
    )
    parser.add_argument("--strategy-dir", metavar="S", required=True, help="the source strategy files")
    parser.add_argument(
        "--conversion", type=plan_cmd._choice(CONVERSION_MODES), default="Unify", metavar="Unify|Reshard"
    )
    parser.add_argument("--keep", type=int, choices=(1, 2), default=1, help="pre-conversions kept (newest)")
    parser.add_argument(
        "--budget-bytes", type=plan_cmd._positive, metavar="B", help="disk budget of those kept"
    )
    parser.add_argument(
        "--max-write-bytes-per-second", type=plan_cmd._positive, metavar="R", help="bound on the write rate"
    )
    parser.add_argument("--last-conversion", metavar="JSON", help="the conversion the running gang loaded")
    parser.add_argument("--output-dir", metavar="O", help="where conversions go (default: parent of DIR)")
    parser.add_argument("--workers", type=plan_cmd._positive, default=1, help="conversion worker processes")
    parser.add_argument("--termination-log", metavar="PATH", help="also write the report JSON to PATH")
    parser.add_argument(
        "--priority",
        choices=("low", "normal"),
        default="low",
        help="low (default): nice 19 and the idle I/O class; normal: leave them (tests, benchmarks)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def lower_priority() -> str:
    """Lower this process's CPU (nice 19) and I/O (idle class) priority; say what was done."""
    done = []
    with contextlib.suppress(OSError):
        os.nice(19 - os.nice(0))
        done.append("nice 19")
    number = _IOPRIO_SET.get(platform.machine())
    if number is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            value = _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT
            if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, value) == 0:
                done.append("idle I/O class")
    return ", ".join(done) or "priority unchanged"


class Throttle:
    """A conversion progress callback that sleeps so that bytes written stay within ``rate`` per
    second on average (the conversion runs in this process with one worker: a sleep here pauses it)."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.started = time.monotonic()

    def __call__(self, event: dict[str, Any]) -> None:
        if self.rate is None or event.get("event") != "progress" or event.get("phase") != "copy":
            return
        ahead = float(event.get("bytes") or 0) / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)


def _read_manifest(root: str) -> list[preconvert.Kept]:
    try:
        with open(os.path.join(root, preconvert.MANIFEST_NAME), encoding="utf-8") as handle:
            data = json.load(handle)
        return [preconvert.Kept.from_json(e) for e in data.get("entries") or []]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(
            f"relaunch preconvert: note: {preconvert.MANIFEST_NAME} unreadable ({exc}); starting a new one",
            file=sys.stderr,
        )
        return []


def _write_manifest(root: str, kept: list[preconvert.Kept]) -> None:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, preconvert.MANIFEST_NAME)
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    payload = {"version": preconvert.MANIFEST_VERSION, "entries": [k.to_json() for k in kept]}
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _remove(directory: str) -> None:
    """Remove a published conversion: renamed first (atomically, so it is never seen half
    removed and complete-looking), then deleted."""
    if not os.path.isdir(directory):
        return
    doomed = f"{directory}.deleting-{secrets.token_hex(4)}"
    os.rename(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_abandoned(root: str) -> list[str]:
    """Staging directories of killed conversions, and half-removed ones, whose destination no
    conversion holds the lock of (see :func:`relaunch.convert._exclusive`): never trusted,
    removed."""
    removed: list[str] = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        path = os.path.join(root, name)
        if ".deleting-" in name:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            continue
        if ".staging-" not in name:
            continue
        target = name.split(".staging-", 1)[0]
        lock = os.path.join(root, f".{target}.relaunch-lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a conversion into it runs now
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                with contextlib.suppress(OSError):
                    os.unlink(lock)
        finally:
            os.close(fd)
    return removed


def _source_bytes(plan: Plan) -> int:
    """About how many bytes the conversion writes: the size of the step converted (an upper
    bound for Unify, whose output holds each replicated slice once)."""
    conversion = plan.conversion
    assert conversion is not None
    source = conversion.source
    if source.kind == "unified":
        return sum(
            os.path.getsize(os.path.join(source.directory, n))
            for n in os.listdir(source.directory)
            if n.endswith(".safetensors")
        )
    assert source.name_pattern is not None and source.ranks is not None
    return sum(
        os.path.getsize(os.path.join(source.directory, f"rank_{r}", source.name_pattern.format(rank=r)))
        for r in range(source.ranks)
    )


def _marker_bytes(directory: str) -> int:
    marker = convert_lib.is_complete(directory) or {}
    return sum(int(e.get("size") or 0) for e in (marker.get("files") or {}).values())


def make_report(args: argparse.Namespace) -> preconvert.Report:
    started = time.monotonic()
    priority = lower_priority() if args.priority == "low" else "normal priority"
    plan_args = argparse.Namespace(
        checkpoint_dir=args.directory,
        directory=None,
        strategy_dir=args.strategy_dir,
        format="safetensors",
        resume=plan_cmd.RESUME_LATEST,
        unified_dir=None,
        conversion=args.conversion,
        output_dir=args.output_dir,
        last_conversion=args.last_conversion,
        config=None,
        workdir=None,
        # The conversion's destination does not depend on the parallel layout (a recovery's
        # plan decides it when it resumes), so none is given here.
        model_parallel=None,
        pipeline_stage=None,
        world_size=args.target_world_size,
        previous_world_size=args.world_size,
        verify="header",
        reason="Resize",
    )
    plan, _ = plan_cmd.make_plan(plan_args)
    conversion = plan.conversion
    world = args.target_world_size
    settings_root = _conversion_root(plan, args)
    abandoned = _remove_abandoned(settings_root)
    protected = []
    if args.last_conversion:
        with contextlib.suppress(ValueError):
            protected.append(json.loads(args.last_conversion).get("destination"))
    kept = []
    for entry in _read_manifest(settings_root):
        if convert_lib.is_complete(entry.destination) is not None:
            kept.append(entry)
        elif entry.destination not in protected and os.path.isdir(entry.destination):
            # One of ours that is no longer whole (a file lost or cut short): never loaded
            # (the plan checks the same), so its space is freed.
            _remove(entry.destination)
            abandoned.append(entry.destination)

    def finish(state: str, message: str, removed: list[str], **fields: Any) -> preconvert.Report:
        _write_manifest(settings_root, kept)
        return preconvert.Report(
            state=state,
            message=message,
            world_size=world,
            kept=tuple(sorted(kept, key=lambda k: k.order, reverse=True)),
            removed=tuple(removed + abandoned),
            seconds=round(time.monotonic() - started, 3),
            **fields,
        )

    def prune(retention: preconvert.Retention) -> list[str]:
        gone = []
        for entry in retention.remove:
            _remove(entry.destination)
            kept[:] = [k for k in kept if k.destination != entry.destination]
            gone.append(entry.destination)
        return gone

    if plan.action == "fail" or conversion is None or plan.action not in ("convert", "resume"):
        what = plan.message if plan.action == "fail" else f"the plan for {world} ranks needs no conversion"
        removed = prune(
            preconvert.retain(kept, keep=args.keep, budget=args.budget_bytes, protected=protected)
        )
        return finish(
            "Nothing", f"{what} ({plan.action}: {plan.message})" if plan.action != "fail" else what, removed
        )
    where = {
        "step": conversion.source.step,
        "epoch": conversion.source.epoch,
        "destination": conversion.destination,
    }
    if plan.action == "resume":  # converted already (a pre-conversion, or the last recovery's)
        if (
            not any(k.destination == conversion.destination for k in kept)
            and conversion.destination not in protected
        ):
            kept.append(_kept(conversion, world, _marker_bytes(conversion.destination)))
        retention = preconvert.retain(
            kept,
            keep=args.keep,
            budget=args.budget_bytes,
            new_destination=conversion.destination,
            new_bytes=_marker_bytes(conversion.destination),
            protected=protected,
        )
        removed = prune(retention)
        return finish(
            "Ready", f"step {conversion.source.step} is converted for {world} ranks already", removed, **where
        )
    estimate = _source_bytes(plan)
    retention = preconvert.retain(
        kept,
        keep=args.keep,
        budget=args.budget_bytes,
        new_destination=conversion.destination,
        new_bytes=estimate,
        protected=protected,
    )
    removed = prune(retention)
    if not retention.fits:
        return finish(
            "BudgetExceeded",
            f"step {conversion.source.step} is not pre-converted: {retention.why}; a recovery converts it",
            removed,
            step=conversion.source.step,
            epoch=conversion.source.epoch,
        )
    print(
        f"relaunch preconvert: {priority}; converting step {conversion.source.step} for {world} ranks "
        f"into {conversion.destination}",
        file=sys.stderr,
        flush=True,
    )
    throttle = Throttle(args.max_write_bytes_per_second)
    convert_args = argparse.Namespace(
        operation=conversion.mode.lower(),
        conversion=json.dumps(conversion.to_json()),  # every path in full
        src=None,
        src_unified=None,
        name_pattern=None,
        step=None,
        src_strategy=None,
        dst=None,
        dst_strategy=None,
        dst_parallel=None,
        out_name_pattern=None,
        termination_log=None,
        workers=args.workers,
        json=True,
        durable=True,
    )
    done = convert_cmd._run(convert_args, observe=throttle)
    size = _marker_bytes(conversion.destination)
    kept.append(_kept(conversion, world, size))
    # The real size is known now: the budget is checked again with it.
    removed += prune(
        preconvert.retain(
            kept,
            keep=args.keep,
            budget=args.budget_bytes,
            new_destination=conversion.destination,
            new_bytes=size,
            protected=protected,
        )
    )
    verb = "was ready already" if done.get("reused") else f"converted in {done.get('seconds')}s"
    return finish(
        "Ready",
        f"step {conversion.source.step} for {world} ranks {verb} ({priority})",
        removed,
        converted=not done.get("reused"),
        **where,
    )


def _kept(conversion: Any, world: int, size: int) -> preconvert.Kept:
    return preconvert.Kept(
        conversion.destination, conversion.source.step, conversion.source.epoch, world, size
    )


def _conversion_root(plan: Plan, args: argparse.Namespace) -> str:
    from relaunch.plan import JobSettings

    settings = JobSettings(
        checkpoint_dir=plan.checkpoint_dir,
        output_dir=args.output_dir and os.path.abspath(args.output_dir),
    )
    return settings.conversion_root


def run(args: argparse.Namespace) -> int:
    try:
        report = make_report(args)
    except (ValueError, OSError, convert_lib.ConversionError) as exc:
        report = preconvert.Report("Failed", str(exc))
        _write(args.termination_log, report)
        raise ValueError(str(exc)) from exc
    _write(args.termination_log, report)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"{report.state}: {report.message}")
    return 0


def _write(path: str | None, report: preconvert.Report) -> None:
    if path:
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as handle:
            handle.write(report.dumps()[:4000])
