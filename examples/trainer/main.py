"""Command line of the demo trainer: read the rank environment, then train one rank or launch several.

Owns the process model. A worker pod gets the environment the operator sets:

- ``RANK_SIZE`` (or ``WORLD_SIZE``): the world size; default 1;
- ``RANK_ID`` (or ``RANK``): this worker's first rank; default 0;
- ``RELAUNCH_RANKS_PER_WORKER``: ranks this worker runs (default 1). Like ``msrun``, a worker with
  k > 1 starts k rank processes (``RANK_ID .. RANK_ID + k - 1``), stops the others as soon as one
  fails and exits with the first failure's code;
- ``MASTER_ADDR`` / ``MASTER_PORT`` (fallback ``MS_SCHED_HOST`` / ``MS_SCHED_PORT``): where rank 0
  hosts the collective service; defaults 127.0.0.1 and 29500;
- ``RELAUNCH_CONFIG``: the config path when ``--config`` is not given (default
  ``/etc/relaunch/train.yaml``); ``RELAUNCH_ATTEMPT``: recorded in ``loss.jsonl``.

Exit codes: 0 all epochs done; 1 failure worth a retry (a peer died, a collective timed out);
2 bad config or environment (do not retry: list it in ``permanentExitCodes``); 3 the checkpoint
the config names is missing or unreadable.

Runs as ``python -m examples.trainer`` (repository root as working directory or on
``PYTHONPATH``) or as ``python examples/trainer/main.py``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from types import FrameType

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = "/etc/relaunch/train.yaml"
EXIT_BAD_CONFIG = 2  # the same value as examples.trainer.config.EXIT_BAD_CONFIG (imported lazily)


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                return int(raw)
            except ValueError:
                raise SystemExit(_usage(f"{name}={raw!r} is not an integer")) from None
    return default


def _usage(message: str) -> int:
    print(f"trainer: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_CONFIG


def _attempt() -> int | str | None:
    raw = os.environ.get("RELAUNCH_ATTEMPT")
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trainer", description="numpy demo trainer with MindFormers-style checkpoints"
    )
    parser.add_argument("--config", default=os.environ.get("RELAUNCH_CONFIG") or DEFAULT_CONFIG)
    args = parser.parse_args(argv)

    # One BLAS thread per rank: the ranks share few cores, and a fixed thread count keeps sums bitwise stable.
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    # Run as a script, this folder heads sys.path, and its config.py, model.py, ... would shadow
    # any top-level module of those names: import the package from the repository root instead.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != here]
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from examples.trainer.config import ConfigError, check_world_size, load_config

    world_size = _env_int(("RANK_SIZE", "WORLD_SIZE"), 1)
    first_rank = _env_int(("RANK_ID", "RANK"), 0)
    per_worker = _env_int(("RELAUNCH_RANKS_PER_WORKER",), 1)
    master_port = _env_int(("MASTER_PORT", "MS_SCHED_PORT"), 29500)
    master_addr = os.environ.get("MASTER_ADDR") or os.environ.get("MS_SCHED_HOST") or "127.0.0.1"
    if per_worker < 1 or not first_rank >= 0 or first_rank + per_worker > world_size:
        return _usage(
            f"ranks {first_rank}..{first_rank + per_worker - 1} (RANK_ID, RELAUNCH_RANKS_PER_WORKER) "
            "do not fit "
            f"a world of {world_size} (RANK_SIZE)"
        )
    try:
        config = load_config(args.config)
        check_world_size(config, world_size)
    except ConfigError as exc:
        return _usage(str(exc))

    if per_worker > 1:
        return launch_ranks(args.config, first_rank, per_worker)
    from examples.trainer.train import run_rank

    return run_rank(config, first_rank, world_size, master_addr, master_port, _attempt())


def launch_ranks(config_path: str, first_rank: int, count: int) -> int:
    """Run ``count`` rank processes like ``msrun``; the first failure stops the rest and is our exit code."""
    children: list[subprocess.Popen[bytes]] = []
    python_path = os.environ.get("PYTHONPATH", "")
    for rank in range(first_rank, first_rank + count):
        env = dict(os.environ)
        env.update(
            RANK_ID=str(rank),
            RANK=str(rank),
            RELAUNCH_RANKS_PER_WORKER="1",
            PYTHONPATH=REPO_ROOT + (os.pathsep + python_path if python_path else ""),
        )
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "examples.trainer", "--config", config_path],
                env=env,
                preexec_fn=_die_with_parent,  # safe: this process has started no threads
            )
        )

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)
        _reap(children)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        codes = [child.poll() for child in children]
        failed = [
            (rank, code)
            for rank, code in zip(range(first_rank, first_rank + count), codes, strict=True)
            if code
        ]
        if failed:
            # Name every rank found dead: the one that failed first is among them, and the
            # others may be ranks that only reacted to it before this poll saw either.
            for rank, code in failed:
                print(
                    f"trainer: rank {rank} exited with code {code}; stopping this worker's other ranks",
                    flush=True,
                )
            rank, code = failed[0]
            for child in children:
                if child.poll() is None:
                    child.terminate()
            _reap(children)
            assert code is not None
            return code if code > 0 else 128 - code  # killed by a signal: report it as 128 + signal
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.05)


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank if the worker process dies, so no rank outlives a killed worker."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker's own signal handling still stops its ranks


def _reap(children: list[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


if __name__ == "__main__":
    raise SystemExit(main())
