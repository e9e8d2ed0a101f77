"""Checkpoint 1.0 files as MindFormers writes them, and loading exactly what the config names.

Owns, for one rank:

- the file prefix (``<prefix>_rank_<r>``, with MindSpore's ``_1``, ``_2``... suffix when files with
  that prefix already exist at start-up), the file name ``<prefix>-<epoch>_<step in epoch>``;
- saving: safetensors with metadata ``{"format": "ms", "remove_redundancy": "False"}``, written as
  ``<name>.tmp`` then renamed, mode 0400 in 0750 folders, then ``meta.json`` (temp +
  ``os.replace``), then ``keep_checkpoint_max`` pruning of this prefix's older files;
- the strategy file ``<output_dir>/strategy/ckpt_strategy_rank_<r>.ckpt``;
- resolving ``load_checkpoint`` / ``resume_training`` / ``auto_trans_ckpt`` /
  ``src_strategy_path_or_dir`` into the tensors this rank starts from: its own shard of a
  sharded checkpoint of the same world size; its slice of unified weights (``param_name_map.json``,
  ``part*.safetensors``, ``hyper_param.safetensors``) or of a single complete file; or, with
  ``auto_trans_ckpt``, its slice re-assembled from a sharded checkpoint of another world size
  using that checkpoint's strategy files (what MindFormers calls online transformation).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from examples.trainer.config import TrainConfig
from examples.trainer.model import OPTIMIZER_STATES, PARAM_NAMES, TENSOR_MAPS, Placement, full_shapes

if TYPE_CHECKING:
    from relaunch.strategy import Layout

CHECKPOINT_NAME_RE = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)\.safetensors$")
RANK_DIR_RE = re.compile(r"^rank_(\d+)$")
RANK_IN_NAME_RE = re.compile(r"_rank_\d+")
#: Scalars MindFormers stores next to the weights; all replicated, absent from the strategy.
COUNTERS = (
    "global_step",
    "epoch_num",
    "step_num",
    "loss_scale",
    "global_batch_size",
    "current_iterator_step",
)
UNIFIED_MARKERS = ("param_name_map.json", "hyper_param.safetensors")


class CheckpointLoadError(RuntimeError):
    """The checkpoint the config names cannot be used; the message says which file and why."""


class CheckpointConfigError(ValueError):
    """The config's checkpoint keys contradict each other or the files (retrying cannot help)."""


# --------------------------------------------------------------------------------------------
# Names


def rank_dir(config: TrainConfig, rank: int) -> str:
    return os.path.join(config.checkpoint_root, f"rank_{rank}")


def choose_prefix(directory: str, base: str) -> str:
    """MindSpore's rule: if files named ``<base>-…`` or ``<base>_<n>-…`` exist, use ``<base>_<max n + 1>``."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return base
    suffix = 0
    for name in names:
        if not name.endswith((".safetensors", ".ckpt")) or not name.startswith(base):
            continue
        rest = name[len(base) :]
        if rest.startswith("-"):
            suffix = max(suffix, 1)
            continue
        match = re.match(r"^_(\d+)-", rest)
        if match:
            suffix = max(suffix, int(match.group(1)) + 1)
    return f"{base}_{suffix}" if suffix else base


def checkpoint_name(prefix: str, epoch: int, step_in_epoch: int) -> str:
    return f"{prefix}-{epoch}_{step_in_epoch}.safetensors"


def substitute_rank(file_name: str, rank: int) -> str:
    """MindFormers' resume-by-name rule: the first ``_rank_<n>`` becomes this rank; add the extension."""
    if not file_name.endswith(".safetensors"):
        file_name += ".safetensors"
    return RANK_IN_NAME_RE.sub(f"_rank_{rank}", file_name, count=1)


# --------------------------------------------------------------------------------------------
# Saving


def _make_dir(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o750)


def save_checkpoint(
    directory: str,
    name: str,
    tensors: dict[str, np.ndarray],
    *,
    epoch: int,
    step_in_epoch: int,
) -> str:
    """Write one rank's checkpoint file and then its ``meta.json``; returns the file's path."""
    _make_dir(os.path.dirname(directory))
    _make_dir(directory)
    path = os.path.join(directory, name)
    tmp = f"{path}.tmp"
    data = safetensors_bytes(tensors, metadata={"format": "ms", "remove_redundancy": "False"})
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o400)
    os.replace(tmp, path)
    write_meta(directory, epoch=epoch, step_in_epoch=step_in_epoch, file_name=name)
    return path


def write_meta(directory: str, *, epoch: int, step_in_epoch: int, file_name: str) -> None:
    meta_path = os.path.join(directory, "meta.json")
    tmp = f"{meta_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"last_epoch": epoch, "last_step": step_in_epoch, "last_ckpt_file": file_name}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o640)
    os.replace(tmp, meta_path)


def prune(directory: str, prefix: str, keep: int) -> list[str]:
    """Delete this prefix's oldest files beyond ``keep`` (other prefixes are other runs: left alone)."""
    mine: list[tuple[int, int, str]] = []
    for name in os.listdir(directory):
        match = CHECKPOINT_NAME_RE.match(name)
        if match and match.group("prefix") == prefix:
            mine.append((int(match.group("epoch")), int(match.group("step")), name))
    mine.sort()
    removed = []
    for _, _, name in mine[: max(0, len(mine) - keep)]:
        os.remove(os.path.join(directory, name))
        removed.append(name)
    return removed


def base_name(name: str) -> str:
    """``adam_m.fc1.weight`` -> ``fc1.weight``: a moment has its weight's shape and layout."""
    return name.split(".", 1)[1] if name.startswith(OPTIMIZER_STATES) else name


def param_layout(config: TrainConfig, name: str, *, optimizer_shard: bool = True) -> Layout:
    """The layout of weight or moment ``name``: device matrix [dp, mp], split over mp as ``TENSOR_MAPS``.

    With ``parallel.enable_parallel_optimizer``, each weight's optimizer step (and so its saved
    slice and its moments) is further split along dimension 0 over *all* the ranks that hold the
    same model-parallel slice, as MindSpore's optimizer parallelism does by default
    (``optimizer_weight_shard_size: -1``): dp ways for a weight split over mp, dp x mp ways for a
    replicated one. The strategy file records the resulting size and the rank stride of the
    group. A weight whose slice's dimension 0 does not divide stays unsharded (MindSpore skips
    those too). ``optimizer_shard=False`` gives the model-parallel layout alone.
    """
    from relaunch.strategy import Layout, StrategyError, check_layout

    base = base_name(name)
    dev_matrix = (config.data_parallel, config.model_parallel)
    plain = Layout(dev_matrix=dev_matrix, tensor_map=TENSOR_MAPS[base])
    if not (optimizer_shard and config.parallel_optimizer):
        return plain
    # The groups first (a provisional step: a layout shards only with both fields set), then the
    # real step: the rank stride between shard-group members, that of its innermost axis.
    probe = Layout(dev_matrix, TENSOR_MAPS[base], opt_shard_size=-1, opt_shard_step=1)
    try:
        groups = probe.opt_groups()
    except StrategyError:
        return plain
    if not groups:
        return plain
    size = probe.opt_size()
    step = math.prod(dev_matrix[groups[-1][0] + 1 :])
    sharded = Layout(dev_matrix, TENSOR_MAPS[base], opt_shard_size=size, opt_shard_step=step)
    try:
        check_layout(name, sharded, full_shapes(config)[base])
    except StrategyError:
        return plain  # dimension 0 does not divide: MindSpore leaves such a weight unsharded too
    return sharded


def rank_block(
    config: TrainConfig, placement: Placement, name: str, *, optimizer_shard: bool
) -> tuple[slice, ...]:
    """The block of the full tensor ``name`` this rank holds (optimizer shard included or not)."""
    from relaunch.strategy import rank_slices

    layout = param_layout(config, name, optimizer_shard=optimizer_shard)
    return rank_slices(layout, full_shapes(config)[base_name(name)], placement.rank)


def optimizer_chunk(config: TrainConfig, placement: Placement, name: str) -> slice:
    """Rows of this rank's model-parallel slice that its optimizer updates (all rows if unsharded)."""
    whole = rank_block(config, placement, name, optimizer_shard=False)[0]
    mine = rank_block(config, placement, name, optimizer_shard=True)[0]
    return slice(mine.start - whole.start, mine.stop - whole.start)


def write_strategy(config: TrainConfig, rank: int) -> str:
    """This rank's strategy file: device matrix [dp, mp]; Adam moments laid out like their weights."""
    from relaunch.strategy import Strategy, write_strategy_file

    layouts: dict[str, Layout] = {}
    for name in PARAM_NAMES:
        layout = param_layout(config, name)
        layouts[name] = layout
        for state in OPTIMIZER_STATES:
            layouts[f"{state}.{name}"] = layout
    _make_dir(config.output_dir)
    _make_dir(config.strategy_dir)
    path = os.path.join(config.strategy_dir, f"ckpt_strategy_rank_{rank}.ckpt")
    write_strategy_file(path, Strategy(stage=0, layouts=layouts))
    return path


# --------------------------------------------------------------------------------------------
# Choosing a step in a sharded checkpoint root


@dataclass(frozen=True)
class ShardedStep:
    epoch: int
    step: int
    files: dict[int, str]  # source rank -> absolute path


def source_ranks(root: str) -> list[int]:
    ranks = sorted(int(m.group(1)) for n in os.listdir(root) if (m := RANK_DIR_RE.match(n)))
    return ranks


def newest_complete_step(root: str, ranks: int) -> ShardedStep:
    """The newest step complete and intact on every rank, as ``relaunch.checkpoints.scan`` judges it."""
    from relaunch.checkpoints import CheckpointError, scan

    try:
        result = scan(root, fmt="safetensors", ranks=ranks)
    except (CheckpointError, OSError) as exc:
        raise CheckpointLoadError(f"{root}: {exc}") from None
    if result.choice is None:
        reasons = "; ".join(r.reason for r in result.rejected) or "no checkpoint files"
        raise CheckpointLoadError(f"{root}: no step is complete on all {ranks} ranks ({reasons})")
    choice = result.choice
    return ShardedStep(choice.epoch or 0, choice.step or 0, dict(choice.files))


def ranks_holding(root: str, file_name: str) -> int:
    """How many ranks, counting from 0 without a gap, hold ``file_name`` (rank substituted)."""
    count = 0
    while os.path.isfile(os.path.join(root, f"rank_{count}", substitute_rank(file_name, count))):
        count += 1
    return count


def named_step(root: str, ranks: int, file_name: str) -> ShardedStep:
    """``resume_training: <file name>``: that step's file on every rank, the rank substituted per rank."""
    match = CHECKPOINT_NAME_RE.match(substitute_rank(os.path.basename(file_name), 0))
    if not match or "/" in file_name:
        raise CheckpointConfigError(
            f"resume_training {file_name!r} does not look like <prefix>-<epoch>_<step>.safetensors"
        )
    files = {
        rank: os.path.join(root, f"rank_{rank}", substitute_rank(file_name, rank)) for rank in range(ranks)
    }
    missing = [f"rank {r}: {p}" for r, p in files.items() if not os.path.isfile(p)]
    if missing:
        raise CheckpointLoadError(
            f"resume_training names {file_name!r}, which is missing on " + "; ".join(missing)
        )
    return ShardedStep(int(match["epoch"]), int(match["step"]), files)


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedState:
    """What this rank starts from: its tensors (params, maybe moments and counters) and a description."""

    tensors: dict[str, np.ndarray]
    source: str
    restore_training_state: bool  # resume (optimizer + counters) rather than only load weights


def wanted_names() -> list[str]:
    return [*PARAM_NAMES, *(f"{state}.{name}" for state in OPTIMIZER_STATES for name in PARAM_NAMES)]


def full_shape_of(config: TrainConfig, name: str) -> tuple[int, ...]:
    return full_shapes(config)[base_name(name)]


def _read_file(path: str) -> dict[str, np.ndarray]:
    try:
        with safe_open(path, framework="numpy") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointLoadError(f"cannot read checkpoint file {path}: {exc}") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
        raise CheckpointLoadError(f"cannot read checkpoint file {path}: {exc}") from None


def load_for_rank(config: TrainConfig, placement: Placement, world_size: int) -> LoadedState | None:
    """Resolve the config's checkpoint keys for this rank; ``None`` = start from scratch.

    An existing but empty ``load_checkpoint`` folder also means "from scratch" (a job configured
    to always resume from its own output starts that way); a missing path is an error.
    """
    source = config.load_checkpoint
    if not source:
        return None
    resume = config.resume_training is not False
    if os.path.isfile(source):
        tensors = _read_file(source)
        return LoadedState(_slice_full(config, placement, tensors.get), f"complete weights {source}", resume)
    if not os.path.isdir(source):
        raise CheckpointLoadError(f"load_checkpoint {source!r} is neither a file nor a directory")
    if any(os.path.exists(os.path.join(source, marker)) for marker in UNIFIED_MARKERS):
        return LoadedState(_load_unified(config, placement, source), f"unified weights {source}", resume)

    ranks = source_ranks(source)
    if not ranks and not os.listdir(source):
        # Automatic recovery's first start: the checkpoint folder exists but nothing was saved yet.
        return None
    if not ranks:
        raise CheckpointLoadError(
            f"load_checkpoint {source!r} holds neither rank_<r> folders nor unified weights "
            "(param_name_map.json / hyper_param.safetensors)"
        )
    if ranks != list(range(len(ranks))):
        raise CheckpointLoadError(f"{source}: rank folders {ranks} are not 0..{len(ranks) - 1}")
    saved_world = len(ranks)
    if isinstance(config.resume_training, str):
        # As MindFormers does, the named file decides, not the folder count: after a shrink the
        # folders of the old, larger world stay behind next to the new run's steps.
        saved_world = ranks_holding(source, config.resume_training) or saved_world
        chosen = named_step(source, saved_world, config.resume_training)
    else:
        chosen = newest_complete_step(source, saved_world)
    if saved_world == world_size:
        path = chosen.files[placement.rank]
        tensors = _read_file(path)
        _check_local_shapes(config, placement, tensors, path)
        return LoadedState(tensors, path, resume)
    if not config.auto_trans_ckpt:
        raise CheckpointConfigError(
            f"load_checkpoint {source!r} was saved by {saved_world} ranks, "
            f"but the world size is {world_size}; "
            "set auto_trans_ckpt: True (with src_strategy_path_or_dir) "
            "or point load_checkpoint at converted weights"
        )
    return LoadedState(
        _load_resharded_online(config, placement, chosen),
        f"{saved_world}-rank step {chosen.epoch}_{chosen.step} in {source}, transformed online",
        resume,
    )


def _check_local_shapes(
    config: TrainConfig, placement: Placement, tensors: dict[str, np.ndarray], path: str
) -> None:
    for name in PARAM_NAMES:
        if name not in tensors:
            raise CheckpointLoadError(f"{path}: parameter {name!r} is missing")
        accepted = {
            tuple(s.stop - s.start for s in rank_block(config, placement, name, optimizer_shard=shard))
            for shard in (False, True)
        }
        if tuple(tensors[name].shape) not in accepted:
            raise CheckpointConfigError(
                f"{path}: parameter {name!r} has shape {list(tensors[name].shape)}, this rank's layout "
                f"(dp={config.data_parallel}, mp={config.model_parallel}) needs one of {sorted(accepted)}; "
                "the checkpoint was saved with another parallel_config: "
                "set auto_trans_ckpt: True, or convert it"
            )


def _slice_full(
    config: TrainConfig, placement: Placement, get_full: Callable[[str], np.ndarray | None]
) -> dict[str, np.ndarray]:
    """This rank's slice of every full tensor ``get_full`` supplies, plus the replicated counters."""
    tensors: dict[str, np.ndarray] = {}
    for name in wanted_names():
        full = get_full(name)
        if full is None:
            continue
        shape = full_shape_of(config, name)
        if tuple(full.shape) != shape:
            raise CheckpointConfigError(
                f"full tensor {name!r} has shape {list(full.shape)}, the model config needs {list(shape)}"
            )
        # The whole model-parallel slice: the trainer cuts its optimizer chunk itself.
        tensors[name] = np.ascontiguousarray(full[rank_block(config, placement, name, optimizer_shard=False)])
    for name in COUNTERS:
        value = get_full(name)
        if value is not None:
            tensors[name] = value
    missing = [name for name in PARAM_NAMES if name not in tensors]
    if missing:
        raise CheckpointLoadError(f"the weights lack parameters {missing}")
    return tensors


def _load_unified(config: TrainConfig, placement: Placement, directory: str) -> dict[str, np.ndarray]:
    map_path = os.path.join(directory, "param_name_map.json")
    weight_map: dict[str, str] = {}
    if os.path.exists(map_path):
        try:
            with open(map_path, encoding="utf-8") as handle:
                document = json.load(handle)
            weight_map = dict(document.get("weight_map", document))
        except (OSError, ValueError, AttributeError) as exc:
            raise CheckpointLoadError(f"{map_path}: unreadable parameter map ({exc})") from None
    else:
        for name in sorted(os.listdir(directory)):
            if name.endswith(".safetensors") and name != "hyper_param.safetensors":
                with safe_open(os.path.join(directory, name), framework="numpy") as handle:
                    weight_map.update({key: name for key in handle.keys()})  # noqa: SIM118
    hyper_path = os.path.join(directory, "hyper_param.safetensors")
    hyper = _read_file(hyper_path) if os.path.exists(hyper_path) else {}
    cache: dict[str, dict[str, np.ndarray]] = {}

    def get_full(name: str) -> np.ndarray | None:
        part = weight_map.get(name)
        if part is None:
            return hyper.get(name)
        if part not in cache:
            cache[part] = _read_file(os.path.join(directory, part))
        return cache[part].get(name)

    return _slice_full(config, placement, get_full)


def _load_resharded_online(
    config: TrainConfig, placement: Placement, chosen: ShardedStep
) -> dict[str, np.ndarray]:
    """Rebuild each full tensor from every source rank (layouts from src_strategy_path_or_dir), then slice."""
    from relaunch.strategy import StrategyError, rank_slices, read_strategy_dir

    if not config.src_strategy_path_or_dir:
        raise CheckpointConfigError(
            "auto_trans_ckpt needs src_strategy_path_or_dir (the strategy files of the checkpoint's run) "
            "to transform a checkpoint saved with another world size"
        )
    try:
        strategies = read_strategy_dir(config.src_strategy_path_or_dir)
    except (StrategyError, OSError) as exc:
        raise CheckpointLoadError(f"src_strategy_path_or_dir: {exc}") from None
    if strategies.stages != 1:
        raise CheckpointConfigError(
            f"source strategy has {strategies.stages} pipeline stages; the demo supports 1"
        )
    sources = {rank: _read_file(path) for rank, path in chosen.files.items()}

    def get_full(name: str) -> np.ndarray | None:
        if name not in sources[0]:
            return None
        layouts = strategies.layouts.get(name)
        if not layouts:
            return sources[0][name]  # replicated
        layout = layouts[0]
        shape = full_shape_of(config, name) if name not in COUNTERS else tuple(sources[0][name].shape)
        full = np.zeros(shape, dtype=sources[0][name].dtype)
        for rank, tensors in sources.items():
            full[rank_slices(layout, shape, rank)] = tensors[name]
        return full

    return _slice_full(config, placement, get_full)
