"""Test helpers for conversion: synthetic models, an independent slicer, shard writers, readers.

The slicer here deliberately does not use ``relaunch.strategy.rank_slices``: it follows
MindSpore's own recipe (``np.split`` of the full tensor by the tensor strategy, the slice index
from the rank's device coordinates, then ``np.split`` of dimension 0 across the optimizer
group, whose members are found by brute force over all ranks) so that the converter is checked
against a second implementation, not against itself. For the same reason the converter's
outputs are read back with the ``safetensors`` library (:func:`read_tensors`), not with
``relaunch.safetensors_format``.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np
import safetensors

from relaunch.safetensors_format import SafetensorsWriter, plan_file
from relaunch.strategy import Layout, Strategy, write_strategy_file

DTYPES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1}


@dataclass
class Model:
    """Full tensors (raw unsigned views of their dtype) and their per-stage layouts."""

    tensors: dict[str, tuple[str, np.ndarray]]  # name -> (dtype, raw array)
    layouts: dict[str, dict[int, Layout]]  # name -> stage -> layout; absent = replicated
    stages: int
    stage_size: int


def raw(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    size = DTYPES[dtype]
    return rng.integers(0, 2 ** (8 * size), size=shape, dtype=np.dtype(f"<u{size}"), endpoint=False)


def reference_slice(full: np.ndarray, layout: Layout, rank: int) -> np.ndarray:
    dev = list(layout.dev_matrix)
    coords = list(np.unravel_index(rank, dev)) if dev else []
    part = full
    named = [[a for a in (e if isinstance(e, tuple) else (e,)) if a >= 0] for e in layout.tensor_map]
    for dim, axes in enumerate(named):
        for axis in axes:  # several axes: split by the first, that piece by the next, ...
            index = len(dev) - 1 - axis
            part = np.split(part, dev[index], axis=dim)[coords[index]]
    if layout.opt_shard_size == 0 or layout.opt_shard_step == 0 or full.ndim == 0:
        return part  # MindSpore shards the optimizer only when both size and step are set
    used = {len(dev) - 1 - a for axes in named for a in axes}
    repeated = [i for i, s in enumerate(dev) if i not in used and s > 1]
    want = layout.opt_shard_size if layout.opt_shard_size > 0 else math.prod(dev[i] for i in repeated)
    if want <= 1:
        return part
    # Build the (sub-)axes the optimizer group spans, innermost first, as MindSpore consumes them.
    subaxes: list[tuple[int, int]] = []
    left = want
    for i in reversed(repeated):
        take = min(dev[i], left)
        subaxes.append((i, take))
        left //= take
        if left == 1:
            break

    def key(r: int) -> tuple[int, ...]:
        c = np.unravel_index(r, dev)
        return tuple(int(c[i]) % t for i, t in reversed(subaxes))

    position = int(np.ravel_multi_index(key(rank), [t for _, t in reversed(subaxes)]))
    return np.split(part, want, axis=0)[position]


def write_shards(
    model: Model,
    root: str,
    *,
    prefix: str = "net",
    epoch: int = 1,
    step: int = 10,
    remove_redundancy: bool = False,
    extra: dict[str, tuple[str, np.ndarray]] | None = None,
    omit_from_strategy: frozenset[str] = frozenset(),
) -> dict[int, str]:
    """Write ``root/checkpoint/rank_<r>/<prefix>_rank_<r>-<epoch>_<step>.safetensors``, ``root/strategy``."""
    world = model.stages * model.stage_size
    files: dict[int, str] = {}
    owners = redundancy_owners(model) if remove_redundancy else {}
    for rank in range(world):
        stage, in_stage = divmod(rank, model.stage_size)
        entries: list[tuple[str, str, np.ndarray]] = []
        for name, (dtype, full) in model.tensors.items():
            layout = model.layouts.get(name, {}).get(stage) if name in model.layouts else None
            if name in model.layouts and layout is None:
                continue
            if remove_redundancy and owners.get((name, rank), rank) != rank:
                continue
            piece = full if layout is None else reference_slice(full, layout, in_stage)
            entries.append((name, dtype, np.ascontiguousarray(piece)))
        for name, (dtype, value) in (extra or {}).items():
            entries.append((name, dtype, value))
        directory = os.path.join(root, "checkpoint", f"rank_{rank}")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{prefix}_rank_{rank}-{epoch}_{step}.safetensors")
        write_file(path, entries, {"format": "ms", "remove_redundancy": str(remove_redundancy)})
        files[rank] = path
    write_strategy(model, os.path.join(root, "strategy"), omit=omit_from_strategy)
    return files


def redundancy_owners(model: Model) -> dict[tuple[str, int], int]:
    """For each (parameter, rank): the rank that saves that slice when redundancy is removed.

    Ranks holding the same elements form a group; the saving rank rotates with the parameter
    (MindSpore balances the saved bytes across a group the same way).
    """
    owners: dict[tuple[str, int], int] = {}
    for name, (_, full) in model.tensors.items():
        groups: dict[tuple[int, bytes], list[int]] = {}
        for rank in range(model.stages * model.stage_size):
            stage, in_stage = divmod(rank, model.stage_size)
            layout = model.layouts.get(name, {}).get(stage)
            if name in model.layouts and layout is None:
                continue
            index = np.arange(full.size, dtype=np.int64).reshape(full.shape)
            held = index if layout is None else reference_slice(index, layout, in_stage)
            groups.setdefault((stage if layout else -1, held.tobytes()), []).append(rank)
        for members in groups.values():
            chosen = members[zlib.crc32(name.encode()) % len(members)]
            for rank in members:
                owners[(name, rank)] = chosen
    return owners


def write_strategy(model: Model, directory: str, omit: frozenset[str] = frozenset()) -> None:
    os.makedirs(directory, exist_ok=True)
    for rank in range(model.stages * model.stage_size):
        stage = rank // model.stage_size
        layouts = {n: per[stage] for n, per in model.layouts.items() if stage in per and n not in omit}
        write_strategy_file(
            os.path.join(directory, f"ckpt_strategy_rank_{rank}.ckpt"), Strategy(stage, layouts)
        )


def write_file(path: str, entries: list[tuple[str, str, np.ndarray]], metadata: dict[str, str]) -> None:
    plan = plan_file([(n, d, tuple(a.shape)) for n, d, a in entries], metadata)
    with SafetensorsWriter(path, plan) as writer:
        for _, _, array in entries:
            writer.write(np.ascontiguousarray(array).tobytes())


def read_tensors(path: str) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of ``path`` as the ``safetensors`` library reads it: ``name -> (dtype, raw array)``.

    The library's own parser checks the header (offsets, sizes, no gaps or overlaps) on its own
    terms; the data comes back as raw bytes, so bf16 needs no framework dtype.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    out = {}
    for name, entry in safetensors.deserialize(data):
        size = DTYPES.get(entry["dtype"], 1)
        array = np.frombuffer(bytes(entry["data"]), dtype=np.dtype(f"<u{size}")).reshape(entry["shape"])
        out[name] = (entry["dtype"], array)
    return out


def read_unified(directory: str) -> dict[str, tuple[str, np.ndarray]]:
    with open(os.path.join(directory, "param_name_map.json")) as handle:
        weight_map = json.load(handle)["weight_map"]
    out: dict[str, tuple[str, np.ndarray]] = {}
    for part in sorted(set(weight_map.values())):
        out.update(read_tensors(os.path.join(directory, part)))
    assert set(out) == set(weight_map)
    return out


def snapshot(root: str) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``root``: (size, mtime_ns, content) — to prove a source was not touched."""
    result = {}
    for base, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            st = os.stat(path)
            with open(path, "rb") as handle:
                result[path] = (st.st_size, st.st_mtime_ns, handle.read())
    return result
