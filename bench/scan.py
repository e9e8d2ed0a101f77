"""Benchmark: ``relaunch scan`` against MindFormers' own resume choice on a 1,024-rank tree.

Builds (once, cached) a Checkpoint 1.0 tree of 1,024 ranks x 50 steps of real safetensors files
(small tensors, real headers) with a ``meta.json`` per rank, then times, with a warm page cache
and best of several runs:

- **relaunch**: ``relaunch.checkpoints.scan(tree, ranks=1024)``: lists every rank directory,
  orders every step, and verifies the header of every file of the chosen step (1,024 files);
- **MindFormers**: ``mindformers.tools.resume_ckpt.get_resume_checkpoint_by_meta(tree,
  "safetensors")`` when MindFormers is importable: reads every meta.json and lists every rank
  directory; it checks names only, never file contents;
- otherwise, and always labelled as such, **the test oracle**: ``tests/mindformers_oracle.py``,
  relaunch's independent re-implementation of MindFormers' algorithm (same reads, same listings),
  measured in the same run as a stand-in baseline.

It prints the times and the ratios (relaunch / baseline; below 1 means relaunch is faster).

Run::

    .venv/bin/python bench/scan.py              # builds the tree on first use (a few seconds)
    .venv/bin/python bench/scan.py --runs 7 --dir /tmp/scan-bench

The tree lives in ``$XDG_CACHE_HOME/relaunch/bench/scan-1024x50`` (default ``~/.cache``), about
51,000 small files; ``--dir`` puts it elsewhere. Delete the directory to rebuild it.

Optional MindFormers environment (about 3 GB; not needed by CI). MindFormers 2.1.0 declares
``mindspore~=2.11`` and more, but its resume code imports and runs with these::

    python3.11 -m venv /tmp/mfvenv
    /tmp/mfvenv/bin/pip install mindspore==2.10.0
    /tmp/mfvenv/bin/pip install --no-deps mindformers==2.1.0
    /tmp/mfvenv/bin/pip install pyyaml deprecated regex requests jieba rouge_chinese datasets \
        tokenizers sentencepiece tiktoken mindpet tensorboardX safetensors hypothesis
    /tmp/mfvenv/bin/python bench/scan.py --oracle-check 200

``--oracle-check N`` (MindFormers installed) also builds N random damaged trees
(``tests/trees.py``) and checks that the test oracle chooses exactly what MindFormers chooses
(or refuses where it refuses). MindFormers is called as rank 0 of a one-process job
(``RANK_ID=0``, ``RANK_SIZE=1``); its logs and ``resume_record`` go to a temporary directory.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "operator"))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from safetensors.numpy import save  # noqa: E402

from relaunch.checkpoints import scan  # noqa: E402

RANKS = 1024
STEPS = 50
PREFIX = "llama"


def default_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "relaunch" / "bench" / f"scan-{RANKS}x{STEPS}"


def build_tree(root: Path) -> None:
    """Write the tree unless a finished one is already there (marker written last)."""
    marker = root / ".bench-complete.json"
    spec = {"ranks": RANKS, "steps": STEPS, "prefix": PREFIX, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return
    print(f"building {RANKS} ranks x {STEPS} steps in {root} ...", flush=True)
    started = time.perf_counter()
    steps = [(1 + i // 25, (i % 25 + 1) * 10) for i in range(STEPS)]
    # One real safetensors file per step (shared by every rank: the bytes do not matter, the headers do).
    payloads = {}
    for epoch, step in steps:
        weight = np.full((4, 4), step, dtype=np.float32)
        tensors = {
            "model.layers.0.attention.wq.weight": weight,
            "adam_m.model.layers.0.attention.wq.weight": np.zeros_like(weight),
            "adam_v.model.layers.0.attention.wq.weight": np.zeros_like(weight),
            "global_step": np.array([step], dtype=np.int32),
            "epoch_num": np.array([epoch], dtype=np.int32),
            "step_num": np.array([step], dtype=np.int32),
        }
        payloads[(epoch, step)] = save(tensors, metadata={"format": "ms", "remove_redundancy": "False"})
    for rank in range(RANKS):
        directory = root / f"rank_{rank}"
        directory.mkdir(parents=True, exist_ok=True)
        for epoch, step in steps:
            (directory / f"{PREFIX}_rank_{rank}-{epoch}_{step}.safetensors").write_bytes(
                payloads[(epoch, step)]
            )
        epoch, step = steps[-1]
        (directory / "meta.json").write_text(
            json.dumps(
                {
                    "last_epoch": epoch,
                    "last_step": step,
                    "last_ckpt_file": f"{PREFIX}_rank_{rank}-{epoch}_{step}.safetensors",
                }
            )
        )
    marker.write_text(json.dumps(spec))
    print(f"built in {time.perf_counter() - started:.1f} s", flush=True)


def best_of(runs: int, call: Callable[[], Any]) -> tuple[float, float, Any]:
    """(best, median) seconds after one warm-up call, and the last result."""
    result = call()  # warm the page cache and the interpreter
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times), result


def mindformers_call(root: Path) -> Callable[[], Any] | None:
    """MindFormers' own function, if it can be imported here."""
    os.environ.setdefault("RANK_ID", "0")
    os.environ.setdefault("RANK_SIZE", "1")
    if "LOCAL_DEFAULT_PATH" not in os.environ:
        output = tempfile.mkdtemp(prefix="mf-output-")
        atexit.register(shutil.rmtree, output, True)
        os.environ["LOCAL_DEFAULT_PATH"] = output
    try:
        from mindformers.tools.resume_ckpt import get_resume_checkpoint_by_meta
    except Exception as exc:  # ImportError, or MindSpore failing to initialise
        print(f"MindFormers not importable ({type(exc).__name__}: {str(exc)[:80]})")
        return None
    return lambda: get_resume_checkpoint_by_meta(str(root), "safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=default_dir(), help="where the tree is (built once)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender (best is reported)")
    parser.add_argument(
        "--oracle-check",
        type=int,
        default=0,
        metavar="N",
        help="with MindFormers installed: also compare the test oracle with it on N random damaged trees",
    )
    args = parser.parse_args(argv)
    root: Path = args.dir
    build_tree(root)
    from mindformers_oracle import resume_files

    ours_best, ours_median, result = best_of(args.runs, lambda: scan(root, ranks=RANKS))
    assert result.choice is not None and (result.choice.epoch, result.choice.step) == (2, 250), result.choice
    assert len(result.choice.files) == RANKS
    oracle_best, oracle_median, oracle_choice = best_of(
        args.runs, lambda: resume_files(str(root), "safetensors")
    )
    assert oracle_choice[0] == "llama_rank_0-2_250.safetensors", oracle_choice[0]
    mindformers = mindformers_call(root)
    if mindformers is not None:
        mf_best, mf_median, mf_choice = best_of(args.runs, mindformers)
        assert mf_choice == "llama_rank_0-2_250.safetensors", mf_choice

    print(f"tree: {root} ({RANKS} ranks x {STEPS} steps, safetensors, warm cache, best of {args.runs})")
    print(f"  relaunch scan (lists all, verifies {RANKS} headers): {_ms(ours_best, ours_median)}")
    oracle = "test oracle (relaunch's model of MindFormers' algorithm, names only)"
    print(f"  {oracle}: {_ms(oracle_best, oracle_median)}")
    if mindformers is not None:
        print(f"  MindFormers get_resume_checkpoint_by_meta (names only): {_ms(mf_best, mf_median)}")
        print(f"ratio relaunch / MindFormers: {ours_best / mf_best:.2f}")
    else:
        print("  MindFormers: not installed (see this file's docstring); the oracle stands in as baseline")
    print(f"ratio relaunch / test oracle: {ours_best / oracle_best:.2f}")
    if args.oracle_check:
        if mindformers is None:
            print("--oracle-check needs MindFormers installed")
            return 1
        return check_oracle(args.oracle_check)
    return 0


def _ms(best: float, median: float) -> str:
    return f"best {best * 1000:.0f} ms, median {median * 1000:.0f} ms"


def check_oracle(examples: int) -> int:
    """Compare the oracle with MindFormers itself on random damaged trees (tests/trees.py)."""
    import trees
    from hypothesis import HealthCheck, given, settings
    from mindformers.tools.resume_ckpt import get_resume_checkpoint_by_meta
    from mindformers_oracle import MindFormersRefuses, resume_files

    tally: dict[str, int] = {}

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(spec=trees.tree_specs())
    def agree(spec: dict[str, Any]) -> None:
        root = Path(tempfile.mkdtemp(prefix="oracle-check-"))
        try:
            trees.materialise(root, spec)
            try:
                ours: Any = resume_files(str(root), spec["fmt"])
            except MindFormersRefuses:
                ours = None
            try:
                theirs: Any = get_resume_checkpoint_by_meta(str(root), spec["fmt"])
            except Exception:
                theirs = None
            if ours is None or theirs is None:
                assert ours is None and theirs is None, (spec, ours, theirs)
                outcome = "both refuse"
            elif theirs is True:  # no meta.json: every rank loads its newest file; the oracle lists them
                outcome = "both: newest file per rank"
            else:
                assert ours[0] == theirs, (spec, ours, theirs)
                outcome = "same file"
            tally[outcome] = tally.get(outcome, 0) + 1
        finally:
            shutil.rmtree(root)

    agree()
    print(f"oracle == MindFormers on {examples} random damaged trees: {tally}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
