"""``relaunch plan``: scan the checkpoint tree, decide what the next attempt loads, print the plan.

Usage::

    relaunch plan --checkpoint-dir D --world-size N [--previous-world-size M] [--strategy-dir S]
                  [--format safetensors|ckpt] [--resume Latest|Unified|NAME] [--unified-dir U]
                  [--conversion Unify|Reshard] [--reason Failure|Resize|ConfigChange|Start]
                  [--last-conversion JSON] [--config FILE [--workdir W] [--rendered-config OUT]]
                  [--model-parallel MP --pipeline-stage PP]
                  [--verify header|deep] [--termination-log PATH] [--json]

The planning Job of the operator runs it with ``--termination-log /dev/termination-log``: the
compact plan JSON (well under 1 KiB even for 1,024 ranks) comes back as the Pod's termination
message. ``D`` may also be given as the positional argument and ``--ranks`` is an alias of
``--previous-world-size`` (the rank count of the tree as it was saved; default: ``N``).

Exit codes: 0 when a plan was produced, including a ``fail`` plan (the operator reads its
``message``); 2 on bad input (bad arguments, unreadable tree or config), with one line on stderr
and, when ``--termination-log`` is given, ``{"version": 1, "error": "<that line>"}`` in the file.

The plan JSON (``--json``, ``--termination-log``; a key whose value would be null is left out)::

    {
      "version": 1,
      "action": "convert",             # fresh | resume | convert | fail
      "reason": "Resize",              # Failure | Resize | ConfigChange | Start
      "counts_as_failure": false,      # true only for Failure
      "world_size": 2, "previous_world_size": 4,
      "checkpoint_dir": "/shared/output/checkpoint",
      "layout": "v1",                  # the scanned tree: v1 | v2 | unified | empty
      "source": {...},                 # what is loaded; left out when "conversion" is present
                                       # (then it is conversion.source for convert plans and the
                                       # conversion's output otherwise)
      "conversion": {                  # convert plans, and plans that load a conversion's output
        "mode": "Unify",               # Unify | Reshard
        "source": {                    # the step converted; for resume plans without conversion
          "kind": "sharded",           # the top-level "source" has the same shape:
          "epoch": 2, "step": 100,     #   kind sharded | unified | iteration,
          "pattern": "qwen3_rank_{rank}-2_100.safetensors",   # str.format(rank=r): rank r's file
          "ranks": 4                   #   dir (left out when it is checkpoint_dir), format (left
        },                             #   out when safetensors), remove_redundancy (when true)
        "strategy_dir": "/shared/output/strategy",
        "destination": "/shared/output/relaunch/unified-qwen3-e2-s100",
        "world_size": 2,
        "fence": [2, 110],             # newest (epoch, step) on disk when it was planned
        "destination_pattern": "...",  # Reshard only: the output's name pattern
        "reused": true                 # the destination was already complete: nothing to run
      },
      "parallel": {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1},   # with --config
      "config": {                      # resume keys to set in the training YAML (legacy names;
        "load_checkpoint": "/shared/output/relaunch/unified-qwen3-e2-s100",  # empty for fresh
        "load_ckpt_format": "safetensors",                                   # and fail plans)
        "src_strategy_path_or_dir": "",
        "auto_trans_ckpt": true, "resume_training": true, "remove_redundancy": false
      },
      "rejected": 1,                   # how many newer candidates the scan rejected
      "message": "why, in one sentence (at most 480 characters)"
    }

Destinations are ``<output_dir>/relaunch/unified-<prefix>-e<E>-s<S>`` and
``<output_dir>/relaunch/resharded-<prefix>-e<E>-s<S>-w<N>`` (``--output-dir``, default the
checkpoint directory's parent). :meth:`relaunch.plan.Plan.from_json` reads this document back.

After a conversion succeeds, the operator keeps the plan's ``conversion`` object and passes it
back with ``--last-conversion`` on every later plan (a ``source`` without ``dir`` is in the
checkpoint directory): it protects the next recovery from the old
world size's shards that remain in the rank directories (see ``relaunch.plan``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Literal

from relaunch import config as config_module
from relaunch.marker import is_complete
from relaunch.plan import (
    CONVERSION_MODES,
    REASONS,
    RESUME_LATEST,
    RESUME_UNIFIED,
    Conversion,
    JobSettings,
    Plan,
    decide,
)


def _choice(options: tuple[str, ...]) -> Any:
    """An argparse type accepting ``options`` in any letter case, returning the canonical spelling."""
    by_lower = {option.lower(): option for option in options}

    def parse(text: str) -> str:
        try:
            return by_lower[text.lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(options)}, got {text!r}") from None

    return parse


def _resume(text: str) -> str:
    lowered = text.lower()
    if lowered == RESUME_LATEST.lower():
        return RESUME_LATEST
    if lowered == RESUME_UNIFIED.lower():
        return RESUME_UNIFIED
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "plan",
        help="decide what the next attempt resumes from (and rewrite its config)",
        description=(
            "Scan the checkpoint directory, decide whether the next attempt starts fresh, resumes a "
            "step as is, converts it first (world size changed) or cannot start, and print that plan."
        ),
    )
    parser.add_argument("directory", nargs="?", metavar="DIR", help="same as --checkpoint-dir")
    parser.add_argument("--checkpoint-dir", metavar="D", help="the job's checkpoint directory (rank_<r>/...)")
    parser.add_argument("--strategy-dir", metavar="S", help="directory of ckpt_strategy_rank_<r>.ckpt files")
    parser.add_argument("--format", choices=("safetensors", "ckpt"), default="safetensors")
    parser.add_argument(
        "--resume",
        type=_resume,
        default=RESUME_LATEST,
        metavar="Latest|Unified|NAME",
        help="which weights: newest complete step, the unified weights in --unified-dir, or one file name",
    )
    parser.add_argument("--unified-dir", metavar="U", help="already-merged weights (for --resume Unified)")
    parser.add_argument(
        "--conversion", type=_choice(CONVERSION_MODES), default="Unify", metavar="Unify|Reshard"
    )
    parser.add_argument(
        "--world-size", type=_positive, required=True, metavar="N", help="ranks of the next attempt"
    )
    parser.add_argument(
        "--previous-world-size",
        "--ranks",
        dest="previous_world_size",
        type=_positive,
        metavar="M",
        help="ranks that saved the checkpoints (default: N)",
    )
    parser.add_argument("--reason", type=_choice(REASONS), default="Failure", metavar="|".join(REASONS))
    parser.add_argument(
        "--last-conversion", metavar="JSON", help="the 'conversion' object of the last plan run"
    )
    parser.add_argument("--output-dir", metavar="O", help="where conversions go (default: parent of D)")
    parser.add_argument("--config", metavar="FILE", help="training YAML to rewrite for the plan")
    parser.add_argument(
        "--workdir", metavar="W", help="trainer's working directory (resolves relative paths)"
    )
    parser.add_argument("--rendered-config", metavar="OUT", help="write the rewritten config to OUT")
    parser.add_argument(
        "--model-parallel",
        type=_positive,
        metavar="MP",
        help="the config's model_parallel, when --config is not given (the plan then sets data_parallel)",
    )
    parser.add_argument(
        "--pipeline-stage",
        type=_positive,
        metavar="PP",
        help="the config's pipeline_stage, when --config is not given",
    )
    parser.add_argument("--verify", choices=("header", "deep"), default="header")
    parser.add_argument("--termination-log", metavar="PATH", help="also write the compact plan JSON to PATH")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _conversion_complete(directory: str) -> bool:
    return is_complete(directory) is not None


def _scan(settings: JobSettings, ranks: int, verify: Literal["header", "deep"]) -> Any:
    from relaunch.checkpoints import ScanResult, scan

    if settings.resume == RESUME_UNIFIED:
        assert settings.unified_dir is not None
        return scan(settings.unified_dir, fmt="safetensors", verify=verify)
    if not os.path.exists(settings.checkpoint_dir):
        # A job's first start: the trainer creates the directory when it first saves.
        return ScanResult(
            root=settings.checkpoint_dir,
            layout="empty",
            format=None,
            ranks=ranks,
            choice=None,
            rejected=(),
            complete=(),
            pinned=settings.pinned,
            pinned_error=None,
        )
    return scan(
        settings.checkpoint_dir,
        fmt=settings.format,
        ranks=ranks,
        verify=verify,
        resume=settings.pinned,
    )


def _saved_by(choice: Any, ranks: int) -> int:
    """How many ranks wrote the chosen v1 step: ``ranks``, or more when ``rank_<ranks>`` has it too.

    A tree saved by 4 ranks looks complete to a scan at 2 ranks; resuming it as is would load
    the wrong layout. One ``stat`` per extra rank settles it.
    """
    if choice is None or choice.kind != "sharded" or not choice.name_pattern:
        return ranks
    count = ranks
    while os.path.exists(
        os.path.join(choice.directory, f"rank_{count}", choice.name_pattern.format(rank=count))
    ):
        count += 1
    return count


def _write_termination_log(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, separators=(",", ":"), ensure_ascii=False))


def make_plan(args: argparse.Namespace) -> tuple[Plan, str | None]:
    """The plan (and the rewritten config text, if ``--config``) for parsed arguments."""
    checkpoint_dir = args.checkpoint_dir or args.directory
    if not checkpoint_dir:
        raise ValueError("give the checkpoint directory (--checkpoint-dir D or as the argument)")
    if args.checkpoint_dir and args.directory and args.checkpoint_dir != args.directory:
        raise ValueError(f"two checkpoint directories given: {args.directory!r} and {args.checkpoint_dir!r}")
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    settings = JobSettings(
        checkpoint_dir=checkpoint_dir,
        strategy_dir=args.strategy_dir and os.path.abspath(args.strategy_dir),
        format=args.format,
        resume=args.resume,
        unified_dir=args.unified_dir and os.path.abspath(args.unified_dir),
        conversion=args.conversion,
        output_dir=args.output_dir and os.path.abspath(args.output_dir),
    )
    # A plan's JSON leaves out source paths equal to the checkpoint dir; the record is that JSON.
    last = Conversion.from_json(args.last_conversion, checkpoint_dir) if args.last_conversion else None
    text = config_module.load_text(args.config) if args.config else None
    model_parallel, pipeline_stage = args.model_parallel, args.pipeline_stage
    config_problem: str | None = None
    if text is not None:
        try:
            read = config_module.read_settings(text)
            model_parallel, pipeline_stage = read["model_parallel"], read["pipeline_stage"]
            config_module.check_checkpoint_dir(text, checkpoint_dir, workdir=args.workdir)
        except config_module.RelativePathError as exc:
            # Without the trainer's working directory a relative output_dir cannot be checked.
            print(f"relaunch plan: note: checkpoint location not checked: {exc}", file=sys.stderr)
        except config_module.ConfigError as exc:
            config_problem = str(exc)
    previous = args.previous_world_size or args.world_size
    result = _scan(settings, previous, args.verify)
    if settings.resume != RESUME_UNIFIED:
        saved_by = _saved_by(result.choice, previous)
        if saved_by != previous:
            # The step was saved by a larger world: scan again at that size so the plan converts
            # it (or rejects it) instead of loading a fraction of its shards.
            previous = saved_by
            result = _scan(settings, previous, args.verify)
    plan = decide(
        settings,
        result,
        world_size=args.world_size,
        previous_world_size=previous,
        reason=args.reason,
        last_conversion=last,
        model_parallel=model_parallel,
        pipeline_stage=pipeline_stage,
        conversion_complete=_conversion_complete,
    )
    if config_problem is not None and plan.action != "fail":
        # A config the job cannot run with fails the job with a reason, like any other plan.
        return _failed(plan, f"the training config cannot be used: {config_problem}"), None
    rendered = None
    if text is not None and plan.action != "fail":
        try:
            rendered = config_module.rewrite(text, plan, workdir=args.workdir)
        except config_module.ConfigError as exc:
            return _failed(plan, f"the training config cannot be rewritten: {exc}"), None
    return plan, rendered


def _failed(plan: Plan, message: str) -> Plan:
    from dataclasses import replace

    return replace(plan, action="fail", message=message, source=None, conversion=None, config={})


def run(args: argparse.Namespace) -> int:
    try:
        plan, rendered = make_plan(args)
    except (ValueError, OSError) as exc:
        # Bad input: the cli prints the one line and exits 2; the planning Job's caller still
        # gets the reason through the termination message.
        with contextlib.suppress(OSError):
            _write_termination_log(args.termination_log, {"version": 1, "error": str(exc)})
        raise
    payload = plan.to_json()
    _write_termination_log(args.termination_log, payload)
    if args.rendered_config and rendered is not None:
        with open(args.rendered_config, "w", encoding="utf-8") as handle:
            handle.write(rendered)
    if args.json:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(plan.describe())
        if rendered is not None and not args.rendered_config:
            print("--- rewritten config ---")
            sys.stdout.write(rendered)
    return 0
