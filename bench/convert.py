"""Benchmark: unify and reshard (8 -> 4 ranks) a >= 2 GiB checkpoint, against ``cp`` of the same bytes.

Run from the repository root::

    .venv/bin/python bench/convert.py                 # ~2.2 GiB, 8 ranks (dp 4 x tp 2, optimizer sharding)
    .venv/bin/python bench/convert.py --gib 0.3       # a quick smoke run

It generates the checkpoint once in a temporary directory (removed at the end; needs about 4x
the checkpoint size free), then measures in the same run, each in a fresh child process so
that peak RSS (``VmHWM`` of the child's own address space after ``exec``, and ``ru_maxrss`` of
its worker processes) belongs to that step
alone:

- ``cp`` of the shard files, and ``cp`` followed by ``sync`` of the copies;
- ``unify`` 8 ranks -> unified parts, and ``reshard`` 8 ranks (dp 4 x tp 2) -> 4 ranks
  (dp 2 x tp 2), each twice: as the operator runs them (every output fsynced before the result
  is published), compared with ``cp+sync``; and with ``durable=False`` (``--no-fsync``: same
  staging, verification and atomic publish, nothing flushed), compared with ``cp``, which does
  not flush either. ``cp`` alone only fills the page cache: on a machine whose page cache is
  faster than its disk, no conversion that waits for the disk can reach it, so each conversion
  is held to the copy that does the same durability work;
- MindSpore's ``unified_safetensors`` / ``transform_checkpoints`` when the optional MindSpore
  environment exists: ``python3.11 -m venv ~/.cache/relaunch/mindspore-env &&
  ~/.cache/relaunch/mindspore-env/bin/pip install mindspore==2.10.0`` (CPU, ~3 GB);
  ``--mindspore-python`` names its interpreter (default: that path; skipped when absent).

Goals (issue 3): each conversion >= 70 % of copy throughput for the bytes it writes (like for
like, as above); peak RSS <= largest tensor + 256 MiB. The exit status is 1 when the memory goal
is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "operator"))

from relaunch.safetensors_format import SafetensorsWriter, plan_file
from relaunch.strategy import Layout, Strategy, default_opt_step, write_strategy_file

DP, TP = 4, 2
HIDDEN = 4096


def generate(root: str, gib: float) -> tuple[dict[int, str], int, int]:
    """Write the 8-rank checkpoint and strategy; return (files, total bytes, largest full tensor bytes)."""
    matrices = max(2, round(gib * 1024**3 / (HIDDEN * HIDDEN * 10)))  # bf16 weight + 2 fp32 moments
    layouts: dict[str, Layout] = {}
    dtypes: dict[str, str] = {}
    for i in range(matrices):
        tmap = (0, -1) if i % 2 == 0 else (-1, 0)  # column / row parallel
        # F16 rather than BF16 weights (same bytes for us): MindSpore's reader refuses BF16 unless
        # its numpy matches the one it was built with, which would rule out the comparison.
        for prefix, dtype in (("", "F16"), ("adam_m.", "F32"), ("adam_v.", "F32")):
            name = f"{prefix}model.layers.{i // 2}.w{i % 2}"
            layouts[name] = Layout((DP, TP), tmap, DP, TP)
            dtypes[name] = dtype
    layouts["model.norm"] = Layout((DP, TP), (-1,), DP, default_opt_step((DP, TP), (-1,), DP))
    dtypes["model.norm"] = "F16"
    block = np.random.default_rng(0).integers(0, 256, size=32 * 1024 * 1024, dtype=np.uint8).tobytes()
    files = {}
    total = 0
    os.makedirs(os.path.join(root, "strategy"))
    for rank in range(DP * TP):
        write_strategy_file(
            os.path.join(root, "strategy", f"ckpt_strategy_rank_{rank}.ckpt"), Strategy(0, layouts)
        )
        entries = []
        for name, layout in layouts.items():
            full = (HIDDEN, HIDDEN) if name != "model.norm" else (HIDDEN * 8,)
            local = [full[d] // (TP if axis >= 0 else 1) for d, axis in enumerate(layout.tensor_map)]
            local[0] //= DP
            entries.append((name, dtypes[name], tuple(local)))
        entries += [("global_step", "I32", (1,)), ("epoch_num", "I64", (1,)), ("loss_scale", "F32", ())]
        plan = plan_file(entries, {"format": "ms", "remove_redundancy": "False"})
        directory = os.path.join(root, "checkpoint", f"rank_{rank}")
        os.makedirs(directory)
        path = os.path.join(directory, f"bench_rank_{rank}-1_100.safetensors")
        with SafetensorsWriter(path, plan) as writer:
            remaining = plan.file_size - len(plan.header)
            offset = rank * 4096
            while remaining:
                n = min(remaining, len(block) - offset)
                writer.write(block[offset : offset + n])
                remaining -= n
                offset = (offset + 8191) % (len(block) // 2)
        files[rank] = path
        total += plan.file_size
    largest = HIDDEN * HIDDEN * 4
    return files, total, largest


# ru_maxrss of a child counts the parent's pages it had between fork and exec; VmHWM does not.
PEAK_RSS = """
def peak_rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""

CHILD = (
    r"""
import json, resource, sys, time
"""
    + PEAK_RSS.replace("{", "{{").replace("}", "}}")
    + r"""
sys.path.insert(0, {operator!r})
from relaunch import convert
args = json.loads(sys.argv[1])
def cpu():
    usages = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)
cpu0 = cpu()
start = time.perf_counter()
if args["op"] == "unify":
    files = {{int(k): v for k, v in args["files"].items()}}
    result = convert.unify(files, args["strategy"], args["dst"], workers=args["workers"],
                           durable=args["durable"])
else:
    result = convert.reshard({{int(k): v for k, v in args["files"].items()}}, args["strategy"], args["dst"],
                             dst_parallel=args["parallel"], workers=args["workers"], durable=args["durable"])
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "bytes": result.bytes_written, "cpu": cpu() - cpu0,
                  "rss_main": peak_rss(),
                  "rss_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}}))
"""
)


MINDSPORE_CHILD = (
    r"""
import json, resource, sys, time
"""
    + PEAK_RSS
    + r"""
import mindspore as ms
args = json.loads(sys.argv[1])
start = time.perf_counter()
if args["op"] == "unify":
    ms.unified_safetensors(args["src"], args["strategy"], args["dst"])
else:
    ms.transform_checkpoints(args["src"], args["dst"], "ms_rank_", args["strategy"], args["dst_strategy"],
                             process_num=args["workers"], output_format="safetensors")
print(json.dumps({"seconds": time.perf_counter() - start,
                  "rss_main": peak_rss(),
                  "rss_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""
)


def run_mindspore(python: str, payload: dict[str, object]) -> dict[str, float]:
    done = subprocess.run(
        [python, "-c", MINDSPORE_CHILD, json.dumps(payload)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(
    op: str, files: dict[int, str], strategy: str, dst: str, workers: int, parallel: str, durable: bool
) -> dict:
    code = CHILD.format(operator=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "operator"))
    payload = json.dumps(
        {
            "op": op,
            "files": files,
            "strategy": strategy,
            "dst": dst,
            "workers": workers,
            "parallel": parallel,
            "durable": durable,
        }
    )
    out = subprocess.run(
        [sys.executable, "-c", code, payload], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def warm(paths: list[str]) -> None:
    """Read the source files, so that every measured step starts with them in the page cache.

    Some machines reclaim cold page cache in the background (e.g. DAMON-based reclaim in VMs),
    which would otherwise make a step read part of its input from the disk, and at random.
    """
    buffer = bytearray(8 * 1024**2)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def timed_cp(src: str, dst: str, *, sync: bool) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", "-r", src, dst], check=True)
    if sync:
        copies = [os.path.join(base, n) for base, _, names in os.walk(dst) for n in names]
        subprocess.run(["sync", *copies], check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.2, help="checkpoint size in GiB (default 2.2)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeat", type=int, default=7, help="rounds of measurements (medians reported)")
    parser.add_argument(
        "--mindspore-python",
        default=os.path.expanduser("~/.cache/relaunch/mindspore-env/bin/python"),
        help="interpreter of the optional MindSpore environment (skipped when absent)",
    )
    parser.add_argument("--dir", default=None, help="where to put the temporary directory (default: $TMPDIR)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="relaunch-bench-", dir=args.dir)
    free = shutil.disk_usage(tmp).free
    if free < 4.5 * args.gib * 1024**3:
        shutil.rmtree(tmp)
        print(f"need ~{4.5 * args.gib:.1f} GiB free in {tmp}, have {free / 1024**3:.1f} GiB", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        files, total, largest = generate(tmp, args.gib)
        print(
            f"checkpoint: {total / 1024**3:.2f} GiB over 8 ranks (dp 4 x tp 2, optimizer sharding 4), "
            f"largest tensor {largest / 1024**2:.0f} MiB, generated in {time.perf_counter() - t0:.1f} s, "
            f"workers={args.workers}, cpus={os.cpu_count()}"
        )
        src = os.path.join(tmp, "checkpoint")
        strategy = os.path.join(tmp, "strategy")
        budget = largest + 256 * 1024**2
        # Rounds interleave the baselines and the conversions, in a new random order each round,
        # so that a noisy machine (shared disk or CPUs, a neighbour's periodic load) hits them
        # alike rather than always the same step; medians are reported. Each conversion is held to
        # the copy doing the same durability work (see the docstring).
        conversions = {  # label: (operation, destination parallel layout, durable, baseline)
            "unify": ("unify", "", True, "cp+sync"),
            "reshard": ("reshard", f"dp={DP // 2},mp={TP},pp=1", True, "cp+sync"),
            "unify --no-fsync": ("unify", "", False, "cp"),
            "reshard --no-fsync": ("reshard", f"dp={DP // 2},mp={TP},pp=1", False, "cp"),
        }
        seconds: dict[str, list[float]] = {"cp": [], "cp+sync": [], **{label: [] for label in conversions}}
        cpu: dict[str, list[float]] = {label: [] for label in conversions}
        written: dict[str, int] = {"cp": total, "cp+sync": total}
        peaks: dict[str, tuple[int, int]] = {}
        order = list(seconds)
        shuffle = random.Random(0).shuffle
        for _ in range(args.repeat):
            shuffle(order)
            for label in order:
                warm(list(files.values()))
                subprocess.run(["sync"], check=True)
                if label in ("cp", "cp+sync"):
                    seconds[label].append(timed_cp(src, os.path.join(tmp, "cp"), sync=label == "cp+sync"))
                    shutil.rmtree(os.path.join(tmp, "cp"))
                    continue
                op, parallel, durable, _baseline = conversions[label]
                dst = os.path.join(tmp, op)
                result = run_child(op, files, strategy, dst, args.workers, parallel, durable)
                seconds[label].append(result["seconds"])
                cpu[label].append(result["cpu"])
                written[label] = result["bytes"]
                old = peaks.get(label, (0, 0))
                peaks[label] = (max(old[0], result["rss_main"]), max(old[1], result["rss_workers"]))
                shutil.rmtree(dst)
        rate = {k: written[k] / statistics.median(v) for k, v in seconds.items()}
        ok = True
        for label in seconds:
            line = (
                f"{label:18} {written[label] / 1e9:5.2f} GB written  "
                f"median {statistics.median(seconds[label]):5.2f} s "
                f"{rate[label] / 1e9:5.2f} GB/s  (runs: {', '.join(f'{s:.2f}' for s in seconds[label])} s)"
            )
            if label in peaks:
                main_rss, worker_rss = peaks[label]
                baseline = conversions[label][3]
                other = "cp" if baseline == "cp+sync" else "cp+sync"
                line += (
                    f"\n{'':18} {rate[label] / rate[baseline] * 100:4.0f} % of {baseline} (goal >= 70 %; "
                    f"{rate[label] / rate[other] * 100:.0f} % of {other}); peak RSS main "
                    f"{main_rss / 2**20:.0f} MiB, worker {worker_rss / 2**20:.0f} MiB "
                    f"(budget {budget / 2**20:.0f} MiB)\n{'':18} CPU time (user + system, all processes) "
                    f"median {statistics.median(cpu[label]):.2f} s"
                )
                ok &= max(peaks[label]) <= budget
            print(line)
        if os.path.exists(args.mindspore_python):
            from relaunch.strategy import read_strategy_dir, rescale_strategy, write_strategy_set

            dst_strategy = os.path.join(tmp, "dst_strategy")
            write_strategy_set(dst_strategy, rescale_strategy(read_strategy_dir(strategy), DP // 2, TP, 1))
            rank0 = os.path.join(strategy, "ckpt_strategy_rank_0.ckpt")
            for op, ours in (("unify", "unify"), ("transform", "reshard")):
                warm(list(files.values()))
                subprocess.run(["sync"], check=True)
                dst = os.path.join(tmp, "ms-" + op)
                payload = {
                    "op": op,
                    "src": src,
                    "dst": dst,
                    "strategy": rank0,
                    "dst_strategy": os.path.join(dst_strategy, "ckpt_strategy_rank_0.ckpt"),
                    "workers": args.workers,
                }
                try:
                    result = run_mindspore(args.mindspore_python, payload)
                except RuntimeError as exc:
                    print(f"MindSpore {op}: failed: {exc}")
                    continue
                finally:
                    shutil.rmtree(dst, ignore_errors=True)
                peak = max(result["rss_main"], result["rss_workers"])
                # MindSpore does not fsync what it writes: like for like is our --no-fsync run.
                unsynced = statistics.median(seconds[ours + " --no-fsync"])
                print(
                    f"MindSpore {op:9} {result['seconds']:6.2f} s, peak RSS {peak / 2**20:.0f} MiB; relaunch "
                    f"{ours} --no-fsync is {result['seconds'] / unsynced:.1f}x faster, with fsync "
                    f"{result['seconds'] / statistics.median(seconds[ours]):.1f}x (one MindSpore run)"
                )
        else:
            print(f"MindSpore: {args.mindspore_python} absent; no comparison (see the module docstring)")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
