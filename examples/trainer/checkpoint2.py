"""Checkpoint 2.0 as MindFormers 2.1 writes it, and loading an iteration at any world size.

Used when the training config has a ``checkpoint:`` section (``TrainConfig.checkpoint2``).
Owns, for one rank:

- the layout: ``<save_path>/iteration_<global step, 8 digits>/`` holding
  ``<prefix>-model-<rank:07d>-<world:07d>.safetensors`` (this rank's weights),
  ``<prefix>-opt-<rank:07d>-<world:07d>.safetensors`` (its Adam moments),
  ``common.json`` (the step counters) and, for a distributed job, ``metadata.json`` (every
  tensor's global shape and the chunk each file holds), and ``<save_path>/latest_checkpointed_iteration.txt``;
- saving in MindFormers' order: rank 0 creates the iteration directory and removes the oldest
  ones beyond ``save_max``; every rank writes its model then its optimizer shard (``.tmp`` then
  renamed, mode 0400); rank 0 writes ``common.json`` and ``metadata.json``; once every rank is
  done, rank 0 writes the tracker file, last;
- loading ``checkpoint.load_path`` (an iteration directory, or the checkpoint root, resolved
  through its tracker file): each tensor is re-assembled from the chunks ``metadata.json`` lists,
  so an iteration saved by any number of ranks loads at any other (MindFormers reshards online
  the same way); without ``metadata.json`` (a one-rank job) every file holds whole tensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from examples.trainer.checkpoint import (
    COUNTERS,
    CheckpointLoadError,
    LoadedState,
    _make_dir,
    _slice_full,
    base_name,
    full_shape_of,
    rank_block,
    wanted_names,
)
from examples.trainer.config import TrainConfig
from examples.trainer.model import Placement

TRACKER_FILE = "latest_checkpointed_iteration.txt"
COMMON_FILE = "common.json"
METADATA_FILE = "metadata.json"
ITERATION_RE = re.compile(r"^iteration_(\d+)$")
SHARD_RE = re.compile(r"^(?:.+-)?(?:model|opt)-\d{7}-\d{7}\.safetensors$")


def iteration_dir(config: TrainConfig, iteration: int) -> str:
    return os.path.join(config.checkpoint_root, f"iteration_{iteration:08d}")


def shard_name(prefix: str, kind: str, rank: int, world: int) -> str:
    """MindFormers' ``get_checkpoint_name``: ``<prefix>-<model|opt>-<rank:07d>-<world:07d>``."""
    lead = f"{prefix}-" if prefix else ""
    return f"{lead}{kind}-{rank:07d}-{world:07d}.safetensors"


# --------------------------------------------------------------------------------------------
# Saving (the caller provides the barrier between the phases)


def prepare_iteration(config: TrainConfig, iteration: int) -> list[str]:
    """Rank 0, before anyone writes: create the iteration directory, then remove the oldest
    iterations beyond ``save_max`` (the new one counts). Returns the removed directory names."""
    root = config.checkpoint_root
    _make_dir(os.path.dirname(root))
    _make_dir(root)
    _make_dir(iteration_dir(config, iteration))
    existing = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := ITERATION_RE.match(name)))
    removed = []
    for _, name in existing[: max(0, len(existing) - config.checkpoint.keep_checkpoint_max)]:
        _remove_tree(os.path.join(root, name))
        removed.append(name)
    return removed


def _remove_tree(path: str) -> None:
    # Shards are read-only (0400) in 0750 folders: the owner may delete them.
    shutil.rmtree(path)


def _write_file(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_shards(
    config: TrainConfig,
    iteration: int,
    rank: int,
    world: int,
    weights: dict[str, np.ndarray],
    optimizer: dict[str, np.ndarray],
) -> list[str]:
    """This rank's model shard, then its optimizer shard; returns their paths."""
    directory = iteration_dir(config, iteration)
    paths = []
    for kind, tensors in (("model", weights), ("opt", optimizer)):
        path = os.path.join(directory, shard_name(config.checkpoint.prefix, kind, rank, world))
        data = safetensors_bytes(tensors, metadata={"format": "ms", "remove_redundancy": "False"})
        _write_file(path, data, 0o400)
        paths.append(path)
    return paths


def write_common(config: TrainConfig, iteration: int, counters: dict[str, Any]) -> None:
    """Rank 0: ``common.json`` with the step counters (MindFormers' ``CommonInfo``)."""
    path = os.path.join(iteration_dir(config, iteration), COMMON_FILE)
    _write_file(path, json.dumps(counters, indent=4).encode(), 0o640)


def write_metadata(config: TrainConfig, iteration: int, world: int) -> None:
    """Rank 0, distributed jobs only: what every rank's files hold, as MindFormers' ``metadata.json``.

    ``state_dict_metadata``: per tensor its dtype, global shape and the distinct chunks
    (``global_offset``, ``local_shape``); ``storage_data``: per chunk (``"('<name>', (<offsets>))"``)
    every file holding it, with the rank that wrote it.
    """
    from examples.trainer.model import PARAM_NAMES

    state: dict[str, dict[str, Any]] = {}
    storage: dict[str, list[dict[str, Any]]] = {}
    prefix = config.checkpoint.prefix
    names = [(name, "model") for name in PARAM_NAMES] + [
        (name, "opt") for name in wanted_names() if name not in PARAM_NAMES
    ]
    for rank in range(world):
        placement = Placement(rank, config.data_parallel, config.model_parallel)
        for name, kind in names:
            block = rank_block(config, placement, name, optimizer_shard=True)
            offset = [s.start for s in block]
            shape = [s.stop - s.start for s in block]
            full = list(full_shape_of(config, name))
            entry = state.setdefault(
                name,
                {
                    "properties": {"dtype": "Float32", "replica_id": 0},
                    "global_shape": full,
                    "axis_fragmentations": [f // s for f, s in zip(full, shape, strict=True)],
                    "layout": None,
                    "chunk": [],
                },
            )
            chunk = {"global_offset": offset, "local_shape": shape}
            if chunk not in entry["chunk"]:
                entry["chunk"].append(chunk)
            storage.setdefault(str((name, tuple(offset))), []).append(
                {
                    "file_name": shard_name(prefix, kind, rank, world),
                    "storage_rank": rank,
                    "rank_group": [rank],
                }
            )
    path = os.path.join(iteration_dir(config, iteration), METADATA_FILE)
    document = {"state_dict_metadata": state, "storage_data": storage}
    _write_file(path, json.dumps(document).encode(), 0o640)


def write_tracker(config: TrainConfig, iteration: int) -> None:
    """Rank 0, after every rank finished: the iteration becomes the one MindFormers resumes."""
    _write_file(os.path.join(config.checkpoint_root, TRACKER_FILE), str(iteration).encode(), 0o640)


# --------------------------------------------------------------------------------------------
# Loading


def resolve_iteration(load_path: str) -> str | None:
    """The iteration directory ``load_path`` names (itself, or the tracker's); None: nothing saved yet."""
    if not os.path.isdir(load_path):
        raise CheckpointLoadError(f"checkpoint.load_path {load_path!r} is not a directory")
    names = os.listdir(load_path)
    if TRACKER_FILE in names:
        tracker = os.path.join(load_path, TRACKER_FILE)
        try:
            with open(tracker, encoding="utf-8") as handle:
                iteration = int(handle.read().strip())
        except (OSError, ValueError) as exc:
            raise CheckpointLoadError(f"{tracker}: does not hold an iteration number ({exc})") from None
        directory = os.path.join(load_path, f"iteration_{iteration:08d}")
        if not os.path.isdir(directory):
            raise CheckpointLoadError(
                f"{tracker} names iteration {iteration}, but {directory} does not exist"
            )
        return directory
    if COMMON_FILE in names or any(SHARD_RE.match(n) for n in names):
        return load_path
    if not names:
        return None  # automatic recovery's first start: the folder exists, nothing saved yet
    iterations = sorted(n for n in names if ITERATION_RE.match(n))
    hint = (
        f" (it holds {', '.join(iterations[-2:])} but no {TRACKER_FILE}: point load_path at one of them)"
        if iterations
        else ""
    )
    raise CheckpointLoadError(
        f"checkpoint.load_path {load_path!r} is neither a Checkpoint 2.0 iteration (common.json, "
        f"<prefix>-model-*.safetensors) nor a checkpoint root with {TRACKER_FILE}{hint}"
    )


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointLoadError(f"cannot read {path}: {exc}") from None


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    try:
        with safe_open(path, framework="numpy") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
        raise CheckpointLoadError(f"cannot read checkpoint file {path}: {exc}") from None


def _full_tensor_reader(directory: str) -> Callable[[str], np.ndarray | None]:
    """``name`` -> the full tensor, assembled from the chunks the iteration's files hold."""
    files: dict[str, dict[str, np.ndarray]] = {}

    def read(file_name: str) -> dict[str, np.ndarray]:
        if file_name not in files:
            path = os.path.join(directory, file_name)
            if not os.path.isfile(path):
                raise CheckpointLoadError(f"{path}: missing (named by {METADATA_FILE})")
            files[file_name] = _read_tensors(path)
        return files[file_name]

    metadata_path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(metadata_path):
        # One rank saved this iteration: every file holds whole tensors.
        whole: dict[str, np.ndarray] = {}
        for file_name in sorted(n for n in os.listdir(directory) if SHARD_RE.match(n)):
            whole.update(read(file_name))
        return whole.get

    document = _read_json(metadata_path)
    try:
        state = document["state_dict_metadata"]
        storage = document["storage_data"]
    except (KeyError, TypeError):
        raise CheckpointLoadError(f"{metadata_path}: no state_dict_metadata/storage_data") from None

    def get_full(name: str) -> np.ndarray | None:
        meta = state.get(name)
        if meta is None:
            return None
        full: np.ndarray | None = None
        for chunk in meta["chunk"]:
            offset = tuple(int(o) for o in chunk["global_offset"])
            holders = storage.get(str((name, offset)))
            if not holders:
                raise CheckpointLoadError(f"{metadata_path}: no file holds chunk {offset} of {name!r}")
            piece = read(holders[0]["file_name"]).get(name)
            if piece is None:
                raise CheckpointLoadError(
                    f"{holders[0]['file_name']}: lacks {name!r} ({METADATA_FILE} says it holds it)"
                )
            if full is None:
                full = np.zeros(meta["global_shape"], dtype=piece.dtype)
            full[tuple(slice(o, o + n) for o, n in zip(offset, piece.shape, strict=True))] = piece
        return full

    return get_full


def load_iteration(config: TrainConfig, placement: Placement) -> LoadedState | None:
    """Resolve ``checkpoint.load_path`` for this rank; ``None`` = start from scratch."""
    assert config.checkpoint2 is not None
    load_path = config.checkpoint2.load_path
    if not load_path:
        return None
    directory = resolve_iteration(load_path)
    if directory is None:
        return None
    common = _read_json(os.path.join(directory, COMMON_FILE))
    if not isinstance(common, dict) or not isinstance(common.get("global_step"), int):
        raise CheckpointLoadError(f"{directory}/{COMMON_FILE}: no integer global_step")
    tensor_of = _full_tensor_reader(directory)
    counters = {
        "step_num": common["global_step"],
        "global_step": common["global_step"],
        "epoch_num": common.get("epoch_num"),
        "global_batch_size": common.get("global_batch_size"),
    }

    def get_full(name: str) -> np.ndarray | None:
        if name in COUNTERS:
            value = counters.get(name)
            return None if value is None else np.array([value], dtype=np.int32)
        return tensor_of(name)

    tensors = _slice_full(config, placement, get_full)
    restore = not config.checkpoint2.no_load_optim
    missing = [name for name in wanted_names() if name not in tensors and base_name(name) != name]
    if restore and missing:
        raise CheckpointLoadError(
            f"{directory}: no optimizer state {missing[:2]} although checkpoint.no_load_optim is false; "
            "the iteration is incomplete (relaunch scan says why), or set no_load_optim: true"
        )
    return LoadedState(tensors, f"iteration {common['global_step']} in {directory}", restore)
