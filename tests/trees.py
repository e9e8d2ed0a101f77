"""Build MindFormers checkpoint trees on disk for tests and benchmarks.

Real files: safetensors through ``safetensors.numpy.save_file`` (with the metadata MindSpore writes),
``.ckpt`` through a small protobuf encoder written from MindSpore's ``checkpoint.proto``. Damage
helpers model what a crash leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from safetensors.numpy import save_file

from relaunch.protowire import bytes_field, int_field

_NP_TO_MS = {
    np.dtype("float32"): "Float32",
    np.dtype("float16"): "Float16",
    np.dtype("int32"): "Int32",
    np.dtype("int64"): "Int64",
    np.dtype("bool"): "Bool",
}


def small_tensors(seed: int = 0, size: int = 4) -> dict[str, np.ndarray]:
    """A training checkpoint in miniature: a weight, its optimizer moments and the counters."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((size, 2)).astype(np.float32)
    return {
        "model.layer.weight": weight,
        "adam_m.model.layer.weight": np.zeros_like(weight),
        "adam_v.model.layer.weight": np.ones_like(weight),
        "global_step": np.array([seed], dtype=np.int32),
        "epoch_num": np.array([1], dtype=np.int32),
        "step_num": np.array([seed], dtype=np.int32),
    }


def crc_of(tensors: Mapping[str, np.ndarray]) -> int:
    """The CRC MindSpore records in safetensors metadata when ``crc_check`` is on."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(name.encode("utf-8"), crc)
        crc = zlib.crc32(np.ascontiguousarray(tensors[name]).tobytes(), crc)
    return crc


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray] | None = None,
    *,
    remove_redundancy: bool = False,
    crc: bool = False,
) -> str:
    tensors = dict(tensors if tensors is not None else small_tensors())
    metadata = {"format": "ms", "remove_redundancy": str(remove_redundancy)}
    if crc:
        metadata["crc_num"] = str(crc_of(tensors))
    save_file(tensors, os.fspath(path), metadata=metadata)
    return os.fspath(path)


# ---- .ckpt: protobuf by hand ---------------------------------------------------------------


def ms_dtype(array: np.ndarray) -> str:
    """MindSpore's name for an array's dtype, as ``.ckpt`` files record it."""
    return _NP_TO_MS[array.dtype]


def ckpt_message(tag: str, dims: Iterable[int], tensor_type: str, content: bytes) -> bytes:
    """One serialized ``Checkpoint`` holding one ``Value``."""
    tensor = b"".join(int_field(1, d) for d in dims)
    tensor += bytes_field(2, tensor_type.encode()) + bytes_field(3, content)
    value = bytes_field(1, tag.encode()) + bytes_field(2, tensor)
    return bytes_field(1, value)


def write_ckpt(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray] | None = None,
    *,
    crc: bool = False,
    slice_bytes: int | None = None,
) -> str:
    """Write a MindSpore ``.ckpt``; ``slice_bytes`` cuts parameters as MindSpore does above 512 MiB."""
    tensors = dict(tensors if tensors is not None else small_tensors())
    body = bytearray()
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        step = slice_bytes or max(len(data), 1)
        for start in range(0, max(len(data), 1), step):
            body += ckpt_message(name, array.shape, _NP_TO_MS[array.dtype], data[start : start + step])
    if crc:
        body += b"crc_num" + zlib.crc32(bytes(body)).to_bytes(10, "big")
    Path(path).write_bytes(bytes(body))
    return os.fspath(path)


def write_checkpoint(path: str | os.PathLike[str], seed: int = 0, **kwargs: object) -> str:
    """A small checkpoint file in the format its extension names."""
    if os.fspath(path).endswith(".ckpt"):
        return write_ckpt(path, small_tensors(seed), **kwargs)  # type: ignore[arg-type]
    return write_safetensors(path, small_tensors(seed), **kwargs)  # type: ignore[arg-type]


# ---- trees ---------------------------------------------------------------------------------


def write_meta(rank_dir: str | os.PathLike[str], epoch: int, step: int, last_file: str) -> None:
    Path(rank_dir, "meta.json").write_text(
        json.dumps({"last_epoch": epoch, "last_step": step, "last_ckpt_file": last_file})
    )


def file_name(prefix: str, rank: int, epoch: int, step: int, fmt: str = "safetensors", run: int = 0) -> str:
    """MindFormers' name for rank ``rank``: ``<prefix>_rank_<r>[_<run>]-<epoch>_<step>.<fmt>``."""
    suffix = f"_{run}" if run else ""
    return f"{prefix}_rank_{rank}{suffix}-{epoch}_{step}.{fmt}"


def build_v1(
    root: str | os.PathLike[str],
    world: int,
    steps: Iterable[tuple[int, int]],
    *,
    prefix: str = "llama",
    fmt: str = "safetensors",
    run: int = 0,
    meta: bool = True,
    mtime_base: float = 1_700_000_000.0,
) -> dict[tuple[int, int], dict[int, str]]:
    """Write a complete, intact Checkpoint 1.0 tree; returns {(epoch, step): {rank: path}}.

    Files get increasing mtimes in step order (MindFormers' fallback orders by mtime).
    """
    written: dict[tuple[int, int], dict[int, str]] = {}
    ordered = sorted(steps)
    for rank in range(world):
        rank_dir = Path(root, f"rank_{rank}")
        rank_dir.mkdir(parents=True, exist_ok=True)
        for index, (epoch, step) in enumerate(ordered):
            path = rank_dir / file_name(prefix, rank, epoch, step, fmt, run)
            write_checkpoint(path, seed=step)
            stamp = mtime_base + run * 10_000 + index
            os.utime(path, (stamp, stamp))
            written.setdefault((epoch, step), {})[rank] = str(path)
        if meta and ordered:
            epoch, step = ordered[-1]
            write_meta(rank_dir, epoch, step, file_name(prefix, rank, epoch, step, fmt, run))
    return written


def truncate(path: str | os.PathLike[str], keep: int | None = None) -> None:
    """Cut a file short (by default to half its size)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2 if keep is None else keep)


def flip_byte(path: str | os.PathLike[str], offset_from_end: int = 1) -> None:
    """Corrupt one data byte without changing the size (only a CRC can notice)."""
    with open(path, "r+b") as handle:
        handle.seek(-offset_from_end, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-offset_from_end, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))


def leave_tmp(path: str | os.PathLike[str]) -> str:
    """Turn a finished file back into the ``<stem>.tmp`` MindSpore writes before renaming."""
    stem, _ = os.path.splitext(os.fspath(path))
    os.replace(path, stem + ".tmp")
    return stem + ".tmp"


def build_v2(
    root: str | os.PathLike[str],
    world: int,
    iterations: Iterable[int],
    *,
    prefix: str = "qwen",
    tracker: bool = True,
    with_metadata: bool = True,
    kinds: tuple[str, ...] = ("model", "opt"),
) -> dict[int, list[str]]:
    """A Checkpoint 2.0 tree: ``iteration_<n>/`` with model and optimizer shards per rank.

    ``kinds=("model",)`` is a job that does not save its optimizer (``no_save_optim``). MindFormers
    writes ``metadata.json`` only for a distributed job (``with_metadata=False`` for one rank).
    """
    written: dict[int, list[str]] = {}
    last = None
    for iteration in sorted(iterations):
        directory = Path(root, f"iteration_{iteration:08d}")
        directory.mkdir(parents=True, exist_ok=True)
        storage: dict[str, list[dict[str, object]]] = {}
        files = []
        for rank in range(world):
            for kind in kinds:
                name = f"{prefix}-{kind}-{rank:07d}-{world:07d}.safetensors"
                tensors = small_tensors(iteration + rank)
                if kind == "opt":
                    tensors = {k: v for k, v in tensors.items() if k.startswith("adam_")}
                else:
                    tensors = {k: v for k, v in tensors.items() if not k.startswith("adam_")}
                write_safetensors(directory / name, tensors)
                files.append(str(directory / name))
                for key in tensors:
                    storage.setdefault(str((key, (rank,))), []).append(
                        {"file_name": name, "storage_rank": rank, "rank_group": [rank]}
                    )
        Path(directory, "common.json").write_text(json.dumps({"global_step": iteration, "epoch_num": 1}))
        if with_metadata:
            Path(directory, "metadata.json").write_text(
                json.dumps({"state_dict_metadata": {}, "storage_data": storage})
            )
        written[iteration] = files
        last = iteration
    if tracker and last is not None:
        Path(root, "latest_checkpointed_iteration.txt").write_text(str(last))
    return written


def unfinished_v2_save(
    root: str | os.PathLike[str],
    world: int,
    iteration: int,
    *,
    prefix: str = "qwen",
    on_disk: tuple[str, ...] = ("model",),
    with_metadata: bool = True,
) -> Path:
    """An iteration as MindFormers 2.1's ``save_checkpoint`` leaves it when the job dies during an
    asynchronous save.

    Its order: rank 0 creates ``iteration_<n>/``; every rank *starts* writing its model shard, then
    its optimizer shard, in a background thread; rank 0 writes ``common.json`` right away, then
    (distributed jobs) ``metadata.json``, naming every shard; only once every rank's writes have
    finished does rank 0 write ``latest_checkpointed_iteration.txt``, which therefore still names
    the previous iteration. ``on_disk``: the kinds of shard that were finished when it died
    (the model is written first); ``with_metadata=False``: a one-rank job, or a crash before
    ``metadata.json``.
    """
    build_v2(root, world, [iteration], prefix=prefix, tracker=False, with_metadata=with_metadata)
    directory = Path(root, f"iteration_{iteration:08d}")
    for path in directory.glob("*.safetensors"):
        kind = path.name.split("-")[-3]
        if kind not in on_disk:
            path.unlink()
    return directory


def build_unified(root: str | os.PathLike[str], parts: int = 2) -> list[str]:
    """Unified weights: ``part<i>.safetensors``, ``param_name_map.json``, ``hyper_param.safetensors``."""
    Path(root).mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    files = []
    for index in range(parts):
        name = f"part{index}.safetensors"
        tensors = {f"layer{index}.weight": np.full((2, 2), index, dtype=np.float32)}
        write_safetensors(Path(root, name), tensors)
        weight_map.update(dict.fromkeys(tensors, name))
        files.append(str(Path(root, name)))
    write_safetensors(Path(root, "hyper_param.safetensors"), {"global_step": np.array([7], dtype=np.int32)})
    files.append(str(Path(root, "hyper_param.safetensors")))
    Path(root, "param_name_map.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return files


# ---- random damaged trees (hypothesis) ---------------------------------------------------------

DAMAGE = ("missing", "truncated", "empty", "tmp", "garbage")
FATES = ("ok",) * 12 + DAMAGE
METAS = ("latest",) * 6 + ("missing", "malformed", "stale", "ahead", "wrong-type", "empty")


@st.composite
def tree_specs(draw: st.DrawFn, damaged: bool = True) -> dict:
    world = draw(st.integers(1, 4))
    fmt = draw(st.sampled_from(["safetensors", "ckpt"]))
    runs = draw(st.integers(1, 2))
    steps = {
        run: sorted(
            draw(
                st.lists(
                    st.tuples(st.integers(1, 2), st.sampled_from([2, 4, 6, 8])),
                    min_size=1,
                    max_size=4,
                    unique=True,
                )
            )
        )
        for run in range(runs)
    }
    if not damaged:
        # A restarted run (suffix _1) continues where the previous one stopped, in a later epoch.
        steps = {
            run: [(epoch + 2 * run, step) for epoch, step in run_steps] for run, run_steps in steps.items()
        }
    fates = {
        (run, epoch, step, rank): draw(st.sampled_from(FATES)) if damaged else "ok"
        for run, run_steps in steps.items()
        for epoch, step in run_steps
        for rank in range(world)
    }
    metas = [draw(st.sampled_from(METAS if damaged else ("latest",))) for _ in range(world)]
    rank_dirs = draw(st.sampled_from(["as-is", "as-is", "extra", "lost"] if damaged else ["as-is"]))
    return {
        "world": world,
        "fmt": fmt,
        "steps": steps,
        "fates": fates,
        "metas": metas,
        "rank_dirs": rank_dirs,
    }


def materialise(root: Path, spec: dict) -> dict[tuple[int, int, int], set[int]]:
    """Write the tree; returns {(run, epoch, step): ranks whose file is intact}."""
    world, fmt = spec["world"], spec["fmt"]
    intact: dict[tuple[int, int, int], set[int]] = {}
    stamp = 1_700_000_000.0
    for rank in range(world + (spec["rank_dirs"] == "extra")):
        (root / f"rank_{rank}").mkdir(parents=True, exist_ok=True)
    for run, run_steps in spec["steps"].items():
        for epoch, step in run_steps:
            intact[(run, epoch, step)] = set()
            for rank in range(world):
                path = root / f"rank_{rank}" / file_name("m", rank, epoch, step, fmt, run)
                write_checkpoint(path, seed=step)
                stamp += 1
                os.utime(path, (stamp, stamp))
                fate = spec["fates"][(run, epoch, step, rank)]
                if fate == "ok":
                    intact[(run, epoch, step)].add(rank)
                elif fate == "missing":
                    path.unlink()
                elif fate == "truncated":
                    truncate(path)
                elif fate == "empty":
                    truncate(path, 0)
                elif fate == "tmp":
                    leave_tmp(path)
                else:
                    path.write_bytes(b"\x07garbage that is not a checkpoint")
    last_run = max(spec["steps"])
    for rank, kind in enumerate(spec["metas"]):
        history = [(e, s) for e, s in spec["steps"][last_run]]
        if kind == "missing" or not history:
            continue
        epoch, step = history[-1] if kind != "stale" else history[0]
        if kind == "ahead":
            epoch, step = epoch + 1, step
        name = file_name("m", rank, epoch, step, fmt, last_run)
        meta = root / f"rank_{rank}" / "meta.json"
        if kind == "malformed":
            meta.write_text("{")
        elif kind == "wrong-type":
            meta.write_text(json.dumps({"last_epoch": epoch, "last_step": str(step), "last_ckpt_file": name}))
        elif kind == "empty":
            meta.write_text("{}")
        else:
            write_meta(meta.parent, epoch, step, name)
    if spec["rank_dirs"] == "extra":
        write_checkpoint(root / f"rank_{world}" / file_name("m", world, 1, 2, fmt))
    if spec["rank_dirs"] == "lost" and world > 1:
        shutil.rmtree(root / f"rank_{world - 1}")
        for ranks in intact.values():
            ranks.discard(world - 1)
    return intact
