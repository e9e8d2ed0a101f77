"""The ``relaunch`` command: ``scan``, ``plan``, ``convert``, ``preconvert`` and ``operator``.

Each sub-command lives in ``relaunch.commands.<name>`` and exposes ``add_parser(subparsers)``
and ``run(args) -> int``. Bad input ends with exit code 2 and one line on stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from relaunch import __version__

#: Sub-commands in the order ``--help`` lists them.
COMMANDS = ("scan", "plan", "convert", "preconvert", "operator")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Input the user can fix; printed as one line, exit code 2."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only`` one command's part of it.

    Each command's module is imported to add its arguments; ``relaunch plan`` runs in a pod at every
    recovery, and importing the others (NumPy with ``convert``, asyncio and the Kubernetes client
    with ``operator``) would double its start-up CPU, so ``main`` imports only the command it runs."""
    parser = argparse.ArgumentParser(
        prog="relaunch",
        description="Resume distributed training from the newest intact checkpoint.",
    )
    parser.add_argument("--version", action="version", version=f"relaunch {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in (only,) if only in COMMANDS else COMMANDS:
        module = importlib.import_module(f"relaunch.commands.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(run=module.run)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs, when its first argument names one (no option before it)."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, ValueError, OSError) as exc:
        print(f"relaunch {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
