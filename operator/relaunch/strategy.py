"""MindSpore parallel strategy files and the tensor layouts they describe.

Owns three things:

1. **The file format** of ``ckpt_strategy_rank_<r>.ckpt``: a serialized proto2 message
   ``mindspore.straspb.ParallelStrategyMap`` (schema in FORMATS.md). We decode and encode the
   protobuf wire format by hand. The schema is nine tiny messages made of varints,
   length-delimited strings and nested messages, and a hand-written codec of ~100 lines has no
   generated code to keep in sync, no ``protoc`` step in the build and no dependency whose
   runtime version must match generated stubs. The decoder accepts packed and unpacked repeated
   scalars and skips unknown fields (as protobuf does); the encoder writes repeated scalars
   unpacked, which is what proto2 (MindSpore's ``syntax``) writes by default.

2. **Layout arithmetic**: which slice of the full tensor one rank of a pipeline stage holds
   (:func:`rank_slices`). Conventions, as MindSpore implements them
   (``mindspore/parallel/_tensor.py``):

   - the device matrix is row-major over the ranks of one stage (the last axis varies fastest);
   - ``tensor_map[i]`` names the device-matrix axis that splits tensor dimension ``i``, counted
     from the right (0 = last axis), ``-1`` = not split; the slice index along dimension ``i`` is
     the rank's coordinate on that axis;
   - **optimizer sharding** (``opt_shard_size > 0``, or ``-1`` = "all repeated ranks") splits
     dimension 0 of the model-parallel slice further. The group is formed from the *repeated*
     axes (device-matrix axes of size > 1 that no tensor dimension uses). Axes are consumed from
     the right (innermost first) until their product reaches ``opt_shard_size``; when an axis is
     larger than what remains, only its inner factor is used (coordinate ``% remaining``). The
     rank's position in the group is the row-major index of its coordinates on those consumed
     (sub-)axes, leftmost most significant, and the rank holds chunk number ``position`` of
     ``opt_shard_size`` equal chunks of dimension 0. This is MindSpore's
     ``_construct_tensor_layout_for_opt_shard`` (and its helper for several repeated axes). For
     the common layout ``[dp, mp]`` with the weight split by ``mp``, it reduces to: the group of
     rank ``r`` is ``{r % mp + k * mp}`` and the position is ``(r // mp) % opt_shard_size``,
     i.e. ``(r // opt_shard_step) % opt_shard_size``. ``opt_shard_step`` (the stride between group
     members) is therefore implied by the device matrix; we record it but do not rely on it;
   - ``field`` (wide-and-deep embedding fields) and uneven splits (``param_split_shape``,
     ``indices_offset``) are rejected: training checkpoints of transformer models never use them.

3. **Strategy sets**: a directory of per-rank strategy files, grouped by pipeline stage and
   merged into one view (:class:`StrategySet`), checked against a checkpoint's tensor shapes
   (:func:`full_shape`) with errors that name the parameter.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from relaunch.protowire import WireError, read_varint
from relaunch.protowire import bytes_field as _bytes_field
from relaunch.protowire import int_field as _int_field

STRATEGY_FILE_RE = re.compile(r"^ckpt_strategy_rank_(\d+)\.ckpt$")


class StrategyError(ValueError):
    """A strategy file is malformed, or a layout contradicts a checkpoint; the message says which."""


#: One tensor dimension's entry of a tensor map: a device axis (counted from the right), ``-1``
#: (not split), or several axes (MindSpore's ``Layout`` API, e.g. ``("dp", "mp")``), outermost first.
TensorMapEntry = int | tuple[int, ...]


def _entry_tuple(entry: TensorMapEntry) -> tuple[int, ...]:
    """Every value one tensor dimension's entry names, ``-1`` included, as a tuple."""
    return entry if isinstance(entry, tuple) else (entry,)


def _entry_axes(entry: TensorMapEntry) -> tuple[int, ...]:
    """The device axes (counted from the right) that split one tensor dimension."""
    return tuple(axis for axis in _entry_tuple(entry) if axis >= 0)


@dataclass(frozen=True)
class Layout:
    """One parameter's layout in one pipeline stage."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[TensorMapEntry, ...]
    opt_shard_size: int = 0
    opt_shard_step: int = 0
    field: int = 0

    @property
    def device_count(self) -> int:
        return math.prod(self.dev_matrix)

    def dim_axes(self) -> tuple[tuple[int, ...], ...]:
        """Per tensor dimension, the device-matrix indices that split it, most significant first.

        A dimension split by several axes is cut into the product of their sizes, and a rank's
        piece is the row-major index of its coordinates on those axes (as MindSpore slices).
        """
        last = len(self.dev_matrix) - 1
        return tuple(tuple(last - axis for axis in _entry_axes(entry)) for entry in self.tensor_map)

    def splits(self) -> tuple[int, ...]:
        """How many model-parallel pieces each tensor dimension is cut into."""
        return tuple(math.prod(self.dev_matrix[i] for i in axes) for axes in self.dim_axes())

    def opt_groups(self) -> tuple[tuple[int, int], ...]:
        """The optimizer-shard (sub-)axes: ``(device-matrix index, factor)`` pairs, outermost first.

        Empty when optimizer sharding is off or nothing is repeated.
        """
        if self.opt_shard_size == 0 or self.opt_shard_step == 0:
            return ()  # MindSpore shards only when both are set
        used = {index for axes in self.dim_axes() for index in axes}
        repeated = [i for i, size in enumerate(self.dev_matrix) if i not in used and size > 1]
        remaining = (
            self.opt_shard_size
            if self.opt_shard_size > 0
            else math.prod(self.dev_matrix[i] for i in repeated)
        )
        if remaining == 1:
            return ()
        groups: list[tuple[int, int]] = []
        for index in reversed(repeated):
            size = self.dev_matrix[index]
            factor = size if remaining >= size else remaining
            if size % factor or remaining % factor:
                raise StrategyError(
                    f"optimizer shard size {self.opt_shard_size} does not fit device matrix "
                    f"{list(self.dev_matrix)} with tensor map {list(self.tensor_map)}"
                )
            groups.insert(0, (index, factor))
            remaining //= factor
            if remaining == 1:
                return tuple(groups)
        raise StrategyError(
            f"optimizer shard size {self.opt_shard_size} exceeds the repeated devices of device matrix "
            f"{list(self.dev_matrix)} with tensor map {list(self.tensor_map)}"
        )

    def opt_size(self) -> int:
        return math.prod(factor for _, factor in self.opt_groups())

    def repeated_size(self) -> int:
        """How many ranks of the stage hold the same model-parallel slice."""
        return self.device_count // math.prod(self.splits())


def default_opt_step(
    dev_matrix: tuple[int, ...], tensor_map: tuple[TensorMapEntry, ...], opt_shard_size: int
) -> int:
    """The ``opt_shard_step`` MindSpore records: the rank stride inside an optimizer-shard group.

    That is the product of the device-matrix axes right of the innermost axis the group spans
    (0 when ``opt_shard_size`` shards nothing).
    """
    if opt_shard_size == 0:
        return 0
    groups = Layout(dev_matrix, tensor_map, opt_shard_size, 1).opt_groups()
    return math.prod(dev_matrix[groups[-1][0] + 1 :]) if groups else 0


@dataclass
class Strategy:
    """The content of one ``ckpt_strategy_rank_<r>.ckpt``.

    ``stage`` is the pipeline stage. In a file it is the ``stage`` of the operator strategies
    (``ParallelStrategyItem``), where MindSpore reads it; the top-level ``current_stage`` is a
    save counter in MindSpore's files (1 after the first save), so it is only a fallback for
    files without operator strategies. ``items`` keeps MindSpore's operator strategies (node name
    -> (stage, per-input split lists)) so that a file read and written again is unchanged;
    conversion never needs them. A strategy without them is written with one synthetic item per
    parameter (:data:`SYNTHETIC_ITEM_PREFIX`), because MindSpore's pipeline tools
    (``merge_pipeline_strategys``, ``transform_checkpoints``) refuse files without any, and take
    the stage from them; the reader drops those items again.
    """

    stage: int
    layouts: dict[str, Layout]
    items: dict[str, tuple[int, tuple[tuple[int, ...], ...]]] = field(default_factory=dict)


#: Node-name prefix of the operator strategies written for a strategy that has none of its own.
SYNTHETIC_ITEM_PREFIX = "relaunch:"


def _operator_items(strategy: Strategy) -> dict[str, tuple[int, tuple[tuple[int, ...], ...]]]:
    """``strategy.items``, or synthetic ones: per parameter, the split of each tensor dimension."""
    if strategy.items:
        return strategy.items
    if not strategy.layouts:
        return {SYNTHETIC_ITEM_PREFIX + "stage": (strategy.stage, ())}
    return {
        SYNTHETIC_ITEM_PREFIX + name: (strategy.stage, (layout.splits(),))
        for name, layout in strategy.layouts.items()
    }


# --------------------------------------------------------------------------------------------
# Protobuf wire format (proto2): varint = 0, 64-bit = 1, length-delimited = 2, 32-bit = 5.


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_varint(data, pos, len(data))
    except WireError as exc:
        raise StrategyError(str(exc)) from None


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field number, wire type, value)``; length-delimited values are bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if pos + length > len(data):
                raise StrategyError(f"field {number}: {length} bytes announced, {len(data) - pos} left")
            value = data[pos : pos + length]
            pos += length
        elif wire == 1:
            value = int.from_bytes(data[pos : pos + 8], "little")
            pos += 8
        elif wire == 5:
            value = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        else:
            raise StrategyError(f"field {number}: unsupported wire type {wire}")
        if pos > len(data):
            raise StrategyError(f"field {number}: truncated")
        yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _repeated_ints(data: bytes, number: int) -> tuple[int, ...]:
    """Field ``number`` of message ``data`` as signed ints, packed or not."""
    out: list[int] = []
    for num, wire, value in _fields(data):
        if num != number:
            continue
        if wire == 0:
            assert isinstance(value, int)
            out.append(_signed(value))
        elif wire == 2:
            assert isinstance(value, bytes)
            pos = 0
            while pos < len(value):
                item, pos = _read_varint(value, pos)
                out.append(_signed(item))
    return tuple(out)


def _dims(values: Iterable[int]) -> bytes:
    """A ``{ repeated <int> dim = 1; }`` message, unpacked."""
    return b"".join(_int_field(1, v) for v in values)


def encode_strategy(strategy: Strategy) -> bytes:
    """Serialize ``strategy`` as a ``ParallelStrategyMap`` message."""
    out = [_int_field(1, strategy.stage)]
    for node, (stage, splits) in _operator_items(strategy).items():
        strategys = _int_field(1, stage) + b"".join(_bytes_field(2, _dims(s)) for s in splits)
        out.append(_bytes_field(2, _bytes_field(1, node.encode()) + _bytes_field(2, strategys)))
    for name, layout in strategy.layouts.items():
        # MindSpore's reader indexes param_split_shape[0] unconditionally; its own writer always
        # emits one (empty for even splits), and one indices_offset, so we do the same.
        if any(isinstance(entry, tuple) for entry in layout.tensor_map):
            # MindSpore's Layout API form: one TensorMap per tensor dimension. Readers (MindSpore's
            # and ours) take a single TensorMap as the flat form and skip empty ones, so a 1-D
            # tensor gets an empty second one to stay per-dimension.
            tensor_maps = b"".join(
                _bytes_field(2, _dims(_entry_tuple(entry))) for entry in layout.tensor_map
            ) + (_bytes_field(2, b"") if len(layout.tensor_map) == 1 else b"")
        else:
            tensor_maps = _bytes_field(2, _dims(e for e in layout.tensor_map if isinstance(e, int)))
        layouts = (
            _bytes_field(1, _dims(layout.dev_matrix))
            + tensor_maps
            + _bytes_field(3, b"")
            + _bytes_field(4, b"")
            + _int_field(5, layout.field)
            + _int_field(6, layout.opt_shard_step)
            + _int_field(7, layout.opt_shard_size)
        )
        out.append(_bytes_field(3, _bytes_field(1, name.encode()) + _bytes_field(2, layouts)))
    return b"".join(out)


def decode_strategy(data: bytes, *, source: str = "strategy") -> Strategy:
    """Parse a ``ParallelStrategyMap`` message; ``source`` names it in errors."""
    try:
        return _decode_strategy(data)
    except StrategyError as exc:
        raise StrategyError(f"{source}: not a MindSpore strategy file ({exc})") from None
    except UnicodeDecodeError as exc:
        raise StrategyError(f"{source}: not a MindSpore strategy file (bad name: {exc})") from None


def _decode_strategy(data: bytes) -> Strategy:
    stage: int | None = None
    layouts: dict[str, Layout] = {}
    items: dict[str, tuple[int, tuple[tuple[int, ...], ...]]] = {}
    for number, wire, value in _fields(data):
        if number == 1 and wire == 0:
            assert isinstance(value, int)
            stage = value
        elif number == 2 and wire == 2:
            assert isinstance(value, bytes)
            node, node_stage, splits = "", 0, []
            for num, w, val in _fields(value):
                if num == 1 and w == 2:
                    assert isinstance(val, bytes)
                    node = val.decode()
                elif num == 2 and w == 2:
                    assert isinstance(val, bytes)
                    for n3, w3, v3 in _fields(val):
                        if n3 == 1 and w3 == 0:
                            assert isinstance(v3, int)
                            node_stage = v3
                        elif n3 == 2 and w3 == 2:
                            assert isinstance(v3, bytes)
                            splits.append(_repeated_ints(v3, 1))
            items[node] = (node_stage, tuple(splits))
        elif number == 3 and wire == 2:
            assert isinstance(value, bytes)
            name, layout = _decode_layout_item(value)
            layouts[name] = layout
    if stage is None:
        raise StrategyError("required field current_stage is missing")
    if items:
        stage = next(iter(items.values()))[0]  # as MindSpore: the stage of the first operator strategy
    own = {node: item for node, item in items.items() if not node.startswith(SYNTHETIC_ITEM_PREFIX)}
    return Strategy(stage=stage, layouts=layouts, items=own)


def _decode_layout_item(data: bytes) -> tuple[str, Layout]:
    name: str | None = None
    body: bytes | None = None
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:
            assert isinstance(value, bytes)
            name = value.decode()
        elif number == 2 and wire == 2:
            assert isinstance(value, bytes)
            body = value
    if name is None or body is None:
        raise StrategyError("a parallel_layout_item lacks param_name or parallel_layouts")
    dev_matrices: list[tuple[int, ...]] = []
    tensor_maps: list[tuple[int, ...]] = []
    scalars = {5: 0, 6: 0, 7: 0}
    for number, wire, value in _fields(body):
        if number == 1 and wire == 2:
            assert isinstance(value, bytes)
            dev_matrices.append(_repeated_ints(value, 1))
        elif number == 2 and wire == 2:
            assert isinstance(value, bytes)
            tensor_maps.append(_repeated_ints(value, 1))
        elif number in (3, 4) and wire == 2:
            assert isinstance(value, bytes)
            if _repeated_ints(value, 1):
                raise StrategyError(f"parameter {name!r}: uneven splits (param_split_shape/indices_offset)")
        elif number in scalars and wire == 0:
            assert isinstance(value, int)
            scalars[number] = _signed(value)
    if not dev_matrices or not tensor_maps:
        raise StrategyError(f"parameter {name!r}: layout without dev_matrix or tensor_map")
    tensor_map: tuple[TensorMapEntry, ...] = tensor_maps[0]
    if len(tensor_maps) > 1:
        # The Layout API writes one TensorMap per tensor dimension (empty ones are dropped, as
        # MindSpore does); a dimension split by several device axes lists them, outermost first.
        tensor_map = tuple(m[0] if len(m) == 1 else m for m in tensor_maps if m)
    # MindSpore reads only the first device matrix as well.
    return name, Layout(
        dev_matrix=dev_matrices[0],
        tensor_map=tensor_map,
        opt_shard_size=scalars[7],
        opt_shard_step=scalars[6],
        field=scalars[5],
    )


def write_strategy_file(path: str | os.PathLike[str], strategy: Strategy) -> None:
    """Write ``strategy`` to ``path`` (temp file + rename, so a reader never sees half a file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(encode_strategy(strategy))
    os.replace(tmp, path)


def read_strategy_file(path: str | os.PathLike[str]) -> Strategy:
    path = os.fspath(path)
    with open(path, "rb") as handle:
        return decode_strategy(handle.read(), source=path)


# --------------------------------------------------------------------------------------------
# Layout arithmetic


def _coordinates(rank: int, dev_matrix: tuple[int, ...]) -> list[int]:
    coords = [0] * len(dev_matrix)
    for i in range(len(dev_matrix) - 1, -1, -1):
        coords[i] = rank % dev_matrix[i]
        rank //= dev_matrix[i]
    return coords


def check_layout(name: str, layout: Layout, shape: tuple[int, ...]) -> None:
    """Raise ``StrategyError`` naming ``name`` unless ``layout`` can cut a tensor of ``shape``."""
    if layout.field:
        raise StrategyError(
            f"parameter {name!r}: field-split layouts (field={layout.field}) are not supported"
        )
    if any(d <= 0 for d in layout.dev_matrix):
        raise StrategyError(f"parameter {name!r}: device matrix {list(layout.dev_matrix)} has a zero axis")
    if len(layout.tensor_map) != len(shape):
        raise StrategyError(
            f"parameter {name!r}: tensor map {list(layout.tensor_map)} has {len(layout.tensor_map)} dims, "
            f"the tensor {list(shape)} has {len(shape)}"
        )
    axes = [axis for entry in layout.tensor_map for axis in _entry_tuple(entry)]
    if any(axis >= len(layout.dev_matrix) or axis < -1 for axis in axes):
        raise StrategyError(
            f"parameter {name!r}: tensor map {list(layout.tensor_map)} names an axis outside device "
            f"matrix {list(layout.dev_matrix)}"
        )
    used = [axis for axis in axes if axis >= 0]
    if len(used) != len(set(used)):
        raise StrategyError(
            f"parameter {name!r}: tensor map {list(layout.tensor_map)} uses a device axis twice"
        )
    for dim, (size, split) in enumerate(zip(shape, layout.splits(), strict=True)):
        if size % split:
            raise StrategyError(
                f"parameter {name!r}: dimension {dim} of shape {list(shape)} is not divisible by its "
                f"{split}-way split (device matrix {list(layout.dev_matrix)}, "
                f"tensor map {list(layout.tensor_map)})"
            )
    try:
        opt = layout.opt_size()
    except StrategyError as exc:
        raise StrategyError(f"parameter {name!r}: {exc}") from None
    if opt > 1:
        expected_step = default_opt_step(layout.dev_matrix, layout.tensor_map, layout.opt_shard_size)
        if layout.opt_shard_step != expected_step:
            # MindSpore refuses such layouts as well ("optimizer sharding step ... is not equal").
            raise StrategyError(
                f"parameter {name!r}: optimizer shard step {layout.opt_shard_step} does not match device "
                f"matrix {list(layout.dev_matrix)} with tensor map {list(layout.tensor_map)} "
                f"(expected {expected_step})"
            )
        rows = shape[0] // layout.splits()[0] if shape else 0
        if not shape or rows % opt:
            raise StrategyError(
                f"parameter {name!r}: optimizer shard size {opt} does not divide dimension 0 ({rows}) of "
                f"its slice of shape {list(shape)}"
            )


def rank_slices(layout: Layout, full_shape: Iterable[int], rank_in_stage: int) -> tuple[slice, ...]:
    """The slice of the full tensor that rank ``rank_in_stage`` of its stage holds (with optimizer shard)."""
    shape = tuple(full_shape)
    if not 0 <= rank_in_stage < layout.device_count:
        raise StrategyError(f"rank {rank_in_stage} is outside device matrix {list(layout.dev_matrix)}")
    coords = _coordinates(rank_in_stage, layout.dev_matrix)
    out: list[slice] = []
    for size, axes in zip(shape, layout.dim_axes(), strict=True):
        piece, count = 0, 1
        for index in axes:  # row-major over the axes, the first one most significant
            piece = piece * layout.dev_matrix[index] + coords[index]
            count *= layout.dev_matrix[index]
        step = size // count
        out.append(slice(piece * step, (piece + 1) * step))
    groups = layout.opt_groups()
    if groups and out:
        position = 0
        count = 1
        for index, factor in groups:
            position = position * factor + coords[index] % factor
            count *= factor
        first = out[0]
        rows = (first.stop - first.start) // count
        out[0] = slice(first.start + position * rows, first.start + (position + 1) * rows)
    return tuple(out)


def local_shape(layout: Layout, full_shape: Iterable[int]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in rank_slices(layout, full_shape, 0))


def full_shape(name: str, layout: Layout, local: Iterable[int]) -> tuple[int, ...]:
    """The full tensor's shape given one rank's slice shape (layouts carry no shapes)."""
    local = tuple(local)
    if len(layout.tensor_map) != len(local):
        raise StrategyError(
            f"parameter {name!r}: tensor map {list(layout.tensor_map)} has {len(layout.tensor_map)} dims, "
            f"the checkpoint's slice {list(local)} has {len(local)}"
        )
    shape = [size * split for size, split in zip(local, layout.splits(), strict=True)]
    try:
        opt = layout.opt_size()
    except StrategyError as exc:
        raise StrategyError(f"parameter {name!r}: {exc}") from None
    if shape and opt > 1:
        shape[0] *= opt
    return tuple(shape)


# --------------------------------------------------------------------------------------------
# Strategy sets (a directory of per-rank files; pipeline stages merged)


@dataclass(frozen=True)
class StrategySet:
    """The merged strategy of a whole job: every parameter's layout in every stage holding it."""

    stages: int
    stage_size: int  # ranks per pipeline stage = product of the device matrix
    layouts: Mapping[str, Mapping[int, Layout]]  # name -> stage -> layout
    digest: str  # blake2b of the files read, for the completion marker

    @property
    def world_size(self) -> int:
        return self.stages * self.stage_size

    def stage_of(self, rank: int) -> tuple[int, int]:
        """``(stage, rank within the stage)`` of a global rank."""
        return rank // self.stage_size, rank % self.stage_size

    def layout_for(self, name: str) -> dict[int, Layout] | None:
        """A parameter's layouts; optimizer moments fall back to their parameter's layout."""
        found = self.layouts.get(name)
        if found is None:
            for prefix in ("adam_m.", "adam_v.", "accu_grads.", "moments."):
                if name.startswith(prefix) and name[len(prefix) :] in self.layouts:
                    found = self.layouts[name[len(prefix) :]]
                    break
        return dict(found) if found is not None else None


_MERGED_NAME_RE = re.compile(r"^(\d+)-(.+)$")


def _split_merged(strategies: Iterable[Strategy]) -> Iterator[Strategy]:
    """Expand a file merged by MindSpore (names ``<stage>-<name>``) into one strategy per stage."""
    for strategy in strategies:
        matches = {name: _MERGED_NAME_RE.match(name) for name in strategy.layouts}
        if not strategy.layouts or not all(matches.values()):
            yield strategy
            continue
        stages: dict[int, dict[str, Layout]] = {}
        for name, layout in strategy.layouts.items():
            match = matches[name]
            assert match is not None
            stages.setdefault(int(match.group(1)), {})[match.group(2)] = layout
        for stage, layouts in sorted(stages.items()):
            yield Strategy(stage=stage, layouts=layouts)


def merge_strategies(strategies: Iterable[Strategy], *, digest: str = "") -> StrategySet:
    """Merge per-rank (or per-stage) strategies of one job into a :class:`StrategySet`.

    Files of the same stage must agree; all layouts must have the same device count (the
    ranks of one stage). MindSpore's own merged file renames parameters ``<stage>-<name>``; we
    keep the names and record the stage instead.
    """
    by_stage: dict[int, Strategy] = {}
    for strategy in _split_merged(strategies):
        seen = by_stage.setdefault(strategy.stage, strategy)
        if seen is not strategy and seen.layouts != strategy.layouts:
            differing = sorted(
                n
                for n in set(seen.layouts) | set(strategy.layouts)
                if seen.layouts.get(n) != strategy.layouts.get(n)
            )
            raise StrategyError(
                f"two strategy files of pipeline stage {strategy.stage} disagree on {differing[:5]}; "
                "expected identical layouts within a stage"
            )
    if not by_stage:
        raise StrategyError("no strategy files found")
    stages = max(by_stage) + 1
    missing = sorted(set(range(stages)) - set(by_stage))
    if missing:
        raise StrategyError(f"no strategy file for pipeline stage(s) {missing} of {stages}")
    sizes = {layout.device_count for s in by_stage.values() for layout in s.layouts.values()}
    if len(sizes) > 1:
        raise StrategyError(f"layouts span different device counts {sorted(sizes)}; expected one per stage")
    stage_size = sizes.pop() if sizes else 1
    merged: dict[str, dict[int, Layout]] = {}
    for stage in sorted(by_stage):
        for name, layout in by_stage[stage].layouts.items():
            merged.setdefault(name, {})[stage] = layout
    return StrategySet(stages=stages, stage_size=stage_size, layouts=merged, digest=digest)


def read_strategy_dir(path: str | os.PathLike[str], *, ranks: int | None = None) -> StrategySet:
    """Read a strategy directory (``ckpt_strategy_rank_<r>.ckpt`` files) or one strategy file.

    ``ranks``: the world size of the checkpoint the strategy describes; files of higher ranks
    are ignored. A job that ran larger before (an elastic shrink, a lowered ``replicas``) leaves
    its extra ranks' files behind in the shared directory, and the ranks it still has rewrote
    theirs with the smaller layout.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        numbered = [
            (int(m.group(1)), os.path.join(path, n))
            for n in os.listdir(path)
            if (m := STRATEGY_FILE_RE.match(n))
        ]
        files = [f for r, f in sorted(numbered) if ranks is None or r < ranks]
        if not files:
            raise StrategyError(
                f"{path}: no ckpt_strategy_rank_<r>.ckpt files; expected a strategy directory"
            )
    else:
        raise StrategyError(f"{path}: no such strategy file or directory")
    hasher = hashlib.blake2b(digest_size=16)
    strategies = []
    for file in files:
        with open(file, "rb") as handle:
            data = handle.read()
        hasher.update(os.path.basename(file).encode() + b"\0" + data)
        strategies.append(decode_strategy(data, source=file))
    try:
        return merge_strategies(strategies, digest=hasher.hexdigest())
    except StrategyError as exc:
        raise StrategyError(f"{path}: {exc}") from None


def write_strategy_set(path: str | os.PathLike[str], strategy_set: StrategySet) -> list[str]:
    """Write one ``ckpt_strategy_rank_<r>.ckpt`` per rank of ``strategy_set`` into directory ``path``."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    written = []
    for stage in range(strategy_set.stages):
        layouts = {n: per[stage] for n, per in strategy_set.layouts.items() if stage in per}
        for rank in range(stage * strategy_set.stage_size, (stage + 1) * strategy_set.stage_size):
            file = os.path.join(path, f"ckpt_strategy_rank_{rank}.ckpt")
            write_strategy_file(file, Strategy(stage=stage, layouts=layouts))
            written.append(file)
    return written


def parse_parallel(text: str) -> dict[str, int]:
    """Parse ``dp=2,mp=2,pp=1`` into ``{"dp": 2, "mp": 2, "pp": 1}`` (missing keys default to 1)."""
    out = {"dp": 1, "mp": 1, "pp": 1}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in out or not value.isdigit() or int(value) < 1:
            raise StrategyError(
                f"parallel description {text!r}: expected e.g. 'dp=2,mp=2,pp=1', got {part!r}"
            )
        out[key] = int(value)
    return out


def rescale_strategy(source: StrategySet, dp: int, mp: int, pp: int) -> StrategySet:
    """A destination strategy for a ``[dp, mp]`` device matrix, derived from ``source``.

    Supported: every source layout has a two-axis device matrix ``[dp_src, mp_src]`` (the demo
    trainer's, and MindFormers' for data x model parallel); the pipeline stage count stays the
    same. Each layout keeps its tensor map; optimizer sharding that covered all repeated ranks
    keeps covering all of them, a partial one keeps its size. Anything else is refused.
    """
    if pp != source.stages:
        raise StrategyError(
            f"changing pipeline stages ({source.stages} -> {pp}) would move parameters between stages; "
            "give --dst-strategy with the destination job's strategy files instead"
        )
    new: dict[str, dict[int, Layout]] = {}
    for name, per_stage in source.layouts.items():
        new[name] = {}
        for stage, layout in per_stage.items():
            if len(layout.dev_matrix) != 2:
                raise StrategyError(
                    f"parameter {name!r}: device matrix {list(layout.dev_matrix)} is not [dp, mp]; "
                    "--dst-parallel only rescales two-axis device matrices; give --dst-strategy instead"
                )
            opt_size = 0
            if layout.opt_size() > 1:
                old_full = Layout(layout.dev_matrix, layout.tensor_map, -1, 1).opt_size()
                new_full = Layout((dp, mp), layout.tensor_map, -1, 1).opt_size()
                if layout.opt_shard_size == -1 or layout.opt_size() == old_full:
                    opt_size = new_full if new_full > 1 else 0
                else:
                    opt_size = layout.opt_shard_size
                    if new_full % opt_size:
                        raise StrategyError(
                            f"parameter {name!r}: optimizer shard size {opt_size} does not divide the "
                            f"{new_full} repeated ranks of device matrix [{dp}, {mp}]"
                        )
            step = default_opt_step((dp, mp), layout.tensor_map, opt_size)
            new[name][stage] = Layout((dp, mp), layout.tensor_map, opt_size, step, layout.field)
    return StrategySet(
        stages=pp, stage_size=dp * mp, layouts=new, digest=f"derived:dp={dp},mp={mp},pp={pp}:{source.digest}"
    )


def dst_parallel_for_world_size(source: StrategySet, world_size: int) -> dict[str, int]:
    """``{"dp", "mp", "pp"}`` for ``world_size`` ranks keeping the source's model parallel and stages.

    Only data parallelism changes with the world size (as the training config is rewritten);
    the source's device matrices must be ``[dp, mp]`` with one ``mp`` throughout.
    """
    mps = {layout.dev_matrix[-1] for per in source.layouts.values() for layout in per.values()}
    shapes = {len(layout.dev_matrix) for per in source.layouts.values() for layout in per.values()}
    if shapes - {2} or len(mps) > 1:
        raise StrategyError(
            f"cannot derive a layout for {world_size} ranks: the source device matrices are not all "
            f"[dp, mp] with one mp (found {len(mps)} mp value(s), axis counts {sorted(shapes)}); "
            "give the destination strategy instead"
        )
    mp = mps.pop() if mps else 1
    per_replica = mp * source.stages
    if world_size < 1 or world_size % per_replica:
        raise StrategyError(
            f"{world_size} ranks cannot hold model parallel {mp} x {source.stages} pipeline stage(s); "
            f"expected a multiple of {per_replica}"
        )
    return {"dp": world_size // per_replica, "mp": mp, "pp": source.stages}
