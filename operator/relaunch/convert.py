"""Checkpoint conversion: merge sharded safetensors into unified weights, or reshard them.

Owns ``unify`` and ``reshard`` (library calls behind ``relaunch convert``) and the completion
marker that tells a finished conversion from a half-written one (:func:`is_complete`).

How a conversion runs:

1. **Plan** (pure, headers only): every source tensor becomes a set of *pieces* — the region of
   the full tensor one source file holds (from the source strategy; replicated tensors are one
   whole piece). Every output tensor is a region of a full tensor at a known offset of a known
   output file, so each output file's header is computed before any data is read.
   With ``remove_redundancy`` checkpoints a slice may be held by any one of its replica ranks
   (MindSpore spreads them to balance the save); the planner takes whichever rank holds it and
   checks that the pieces cover the full tensor.
2. **Copy** (parallel, streaming): output files are created with their header and final size,
   then worker processes fill tensors at their offsets. When every source piece of an output
   tensor holds whole rows of it (the common case: splits along the first dimension only), the
   tensor is a few contiguous byte ranges of the sources: each is memory-mapped a window
   (``WINDOW_BYTES``) at a time straight from the page cache, hashed and written with ``pwrite``
   one ``CHUNK_BYTES`` chunk at a time while that chunk is still in the CPU cache (one copy per
   byte). Otherwise (column splits) the tensor is assembled one chunk of rows at a time in a
   reused buffer, numpy gathering each piece's part from its mapped rows on unsigned-integer
   views of the element size (bit-exact for bf16 and every dtype, never through float32).
   Checksums are XXH3-64 (the ``xxhash`` package). Every mapping is dropped
   once used, so peak memory is a few windows per worker, whatever the size of the checkpoint.
   The kernel is asked to start writing each ~``WINDOW_BYTES`` of output back as soon as it is
   written (``sync_file_range``), so that the disk works during the copy rather than in the
   final ``fsync``.
3. **Verify**: each output file is re-read through the page cache (memory-mapped, no copy): its
   header must equal the planned one, its size the planned size, and every tensor's checksum the
   one computed from the source bytes.
4. **Publish**: everything is written in ``<dst>.staging-<random>`` next to ``<dst>``; the marker
   ``relaunch-complete.json`` is written last (files fsynced first), then the staging directory is
   renamed to ``<dst>``. A re-run finds either a finished ``<dst>`` (done, idempotent) or leftover
   staging directories (removed, conversion redone). The source is only ever opened read-only.
   Conversions into one destination take turns (a ``flock`` beside it), so a second one waits and
   then finds the first one's result instead of removing its staging directory. ``durable=False``
   keeps the order but skips the fsyncs and the early writeback; such a result is trusted only on
   the machine that wrote it, until it reboots (the marker records the boot id).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import hashlib
import itertools
import json
import math
import mmap
import multiprocessing
import os
import re
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from relaunch import strategy as strategy_mod
from relaunch.marker import MARKER_FORMAT, MARKER_VERSION, _read_marker, _unsynced_elsewhere, boot_id
from relaunch.marker import MARKER_NAME as MARKER_NAME  # re-exported: the marker's readers live there
from relaunch.marker import is_complete as is_complete
from relaunch.safetensors_format import (
    DTYPE_SIZES,
    FilePlan,
    SafetensorsError,
    plan_file,
    read_header,
)
from relaunch.strategy import Layout, StrategySet

#: Bytes hashed and written at a time per worker (and the size of the strided path's assembly
#: buffer). Small enough to stay in the CPU cache between read, hash and write: on the benchmark
#: machine 1 MiB chunks wrote twice as fast as 16 MiB ones.
CHUNK_BYTES = 1024 * 1024
#: MindSpore's unified_safetensors groups parameters into parts of about this size.
DEFAULT_PART_BYTES = 3 * 1024**3
UNIFY_PARTS_PER_WORKER = 4
DEFAULT_NAME_PATTERN = "{prefix}_rank_{rank}-{epoch}_{step}.safetensors"
SHARD_NAME_RE = re.compile(
    r"^(?P<prefix>.+?)_rank_(?P<rank>\d+)(?P<suffix>[^-]*)-(?P<epoch>\d+)_(?P<step>\d+)\.safetensors$"
)

Region = tuple[tuple[int, int], ...]  # [start, stop) per dimension, in full-tensor coordinates
Progress = Callable[[dict[str, Any]], None]


class ConversionError(ValueError):
    """The inputs cannot be converted as asked; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Piece:
    """A region of a full tensor stored contiguously (C order) in a source file."""

    path: str
    begin: int  # absolute offset of the region's first byte
    region: Region


@dataclass
class SourceTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    layouts: dict[int, Layout] | None  # None: replicated (not in the strategy)
    pieces: dict[Region, Piece] = field(default_factory=dict)
    copies: dict[int, Piece] = field(default_factory=dict)  # replicated: each source rank's own copy


@dataclass(frozen=True)
class TensorTask:
    """Fill one output tensor: ``region`` of the full tensor, written at ``offset`` of ``path``."""

    path: str
    name: str
    offset: int
    itemsize: int
    region: Region
    pieces: tuple[Piece, ...]
    checksum: str = "xxh3-64"
    writeback: bool = True  # start writing the output back to disk as it is written (durable runs)

    @property
    def nbytes(self) -> int:
        return _volume(self.region) * self.itemsize


@dataclass(frozen=True)
class OutputFile:
    relpath: str
    plan: FilePlan
    tasks: tuple[TensorTask, ...]  # in file order


@dataclass(frozen=True)
class ConversionResult:
    dst_dir: str
    marker: dict[str, Any]
    reused: bool  # True when dst already held this finished conversion
    bytes_written: int
    seconds: float


def _volume(region: Region) -> int:
    return math.prod(stop - start for start, stop in region)


def _region(slices: Iterable[slice]) -> Region:
    return tuple((s.start, s.stop) for s in slices)


def _full_region(shape: tuple[int, ...]) -> Region:
    return tuple((0, size) for size in shape)


def _intersect(a: Region, b: Region) -> Region | None:
    out = []
    for (a0, a1), (b0, b1) in zip(a, b, strict=True):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def load_sharded_source(src_files: Mapping[int, str], strategy: StrategySet) -> dict[str, SourceTensor]:
    """Read every source header and place each tensor's pieces in its full tensor.

    Checks that the ranks are exactly ``0..world-1`` of the strategy, that every rank agrees on a
    tensor's dtype and full shape, and that the pieces cover each tensor.
    """
    world = strategy.world_size
    ranks = sorted(src_files)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        extra = sorted(set(ranks) - set(range(world)))
        raise ConversionError(
            f"the source strategy describes {world} ranks "
            f"({strategy.stages} stage(s) of {strategy.stage_size}); "
            f"checkpoint files are missing for ranks {missing[:16]}"
            + (f" and present for unknown ranks {extra[:16]}" if extra else "")
        )
    tensors: dict[str, SourceTensor] = {}
    per_stage: dict[str, dict[int, dict[Region, Piece]]] = {}
    for rank in ranks:
        path = os.path.abspath(src_files[rank])
        header = read_header(path)
        stage, rank_in_stage = strategy.stage_of(rank)
        for info in header.tensors.values():
            layouts = strategy.layout_for(info.name)
            if layouts is None:
                shape, region = info.shape, _full_region(info.shape)
            else:
                layout = layouts.get(stage)
                if layout is None:
                    raise ConversionError(
                        f"parameter {info.name!r}: rank {rank} (pipeline stage {stage}) holds it, but the "
                        f"strategy places it in stage(s) {sorted(layouts)}; is this the job's strategy?"
                    )
                shape = strategy_mod.full_shape(info.name, layout, info.shape)
                strategy_mod.check_layout(info.name, layout, shape)
                region = _region(strategy_mod.rank_slices(layout, shape, rank_in_stage))
                held = tuple(stop - start for start, stop in region)
                if held != info.shape:
                    raise ConversionError(
                        f"parameter {info.name!r}: rank {rank} holds shape {list(info.shape)}, the strategy "
                        f"implies {list(held)}"
                    )
            tensor = tensors.get(info.name)
            if tensor is None:
                tensor = tensors[info.name] = SourceTensor(info.name, info.dtype, shape, layouts)
            elif tensor.dtype != info.dtype or tensor.shape != shape:
                raise ConversionError(
                    f"parameter {info.name!r}: rank {rank} implies {info.dtype}{list(shape)}, "
                    f"an earlier rank "
                    f"{tensor.dtype}{list(tensor.shape)}; the checkpoint contradicts the strategy"
                )
            piece = Piece(path, info.begin, region)
            if layouts is None:
                tensor.copies[rank] = piece
            key = -1 if layouts is None else stage
            per_stage.setdefault(info.name, {}).setdefault(key, {}).setdefault(region, piece)
    for tensor in tensors.values():
        # A parameter shared by several stages (tied embeddings) has a full copy in each; any one
        # stage whose pieces cover the tensor will do.
        total = math.prod(tensor.shape)
        candidates = per_stage[tensor.name]
        for stage_pieces in candidates.values():
            if sum(_volume(region) for region in stage_pieces) == total:
                tensor.pieces = stage_pieces
                break
        else:
            stage_pieces = max(candidates.values(), key=lambda found: sum(_volume(r) for r in found))
            covered = sum(_volume(region) for region in stage_pieces)
            raise ConversionError(
                f"parameter {tensor.name!r}: the source ranks hold {len(stage_pieces)} distinct slice(s) "
                f"covering {covered} of {total} elements; a rank's file lacks it "
                "(incomplete remove_redundancy checkpoint, or the wrong strategy)"
            )
    return tensors


def load_unified_source(src_dir: str) -> tuple[dict[str, SourceTensor], dict[str, SourceTensor]]:
    """Read a unified directory: ``(parameters, hyper parameters)``, each tensor one whole piece."""
    src_dir = os.path.abspath(src_dir)
    map_path = os.path.join(src_dir, "param_name_map.json")
    if os.path.exists(map_path):
        with open(map_path, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(
            n for n in os.listdir(src_dir) if n.endswith(".safetensors") and n != "hyper_param.safetensors"
        )
    if not files:
        raise ConversionError(
            f"{src_dir}: no unified safetensors parts (param_name_map.json or part*.safetensors)"
        )
    params: dict[str, SourceTensor] = {}
    for name in files:
        header = read_header(os.path.join(src_dir, name))
        for info in header.tensors.values():
            region = _full_region(info.shape)
            params[info.name] = SourceTensor(
                info.name, info.dtype, info.shape, None, {region: Piece(header.path, info.begin, region)}
            )
    hyper: dict[str, SourceTensor] = {}
    hyper_path = os.path.join(src_dir, "hyper_param.safetensors")
    if os.path.exists(hyper_path):
        header = read_header(hyper_path)
        for info in header.tensors.values():
            region = _full_region(info.shape)
            hyper[info.name] = SourceTensor(
                info.name, info.dtype, info.shape, None, {region: Piece(header.path, info.begin, region)}
            )
    return params, hyper


def _task(path: str, tensor: SourceTensor, info_begin: int, region: Region) -> TensorTask:
    pieces = tuple(p for p in tensor.pieces.values() if _intersect(p.region, region) is not None)
    return TensorTask(path, tensor.name, info_begin, DTYPE_SIZES[tensor.dtype], region, pieces)


def _output_file(
    relpath: str, staging: str, entries: list[tuple[SourceTensor, Region]], metadata: dict[str, str]
) -> OutputFile:
    plan = plan_file(
        [(t.name, t.dtype, tuple(stop - start for start, stop in region)) for t, region in entries], metadata
    )
    path = os.path.join(staging, relpath)
    tasks = tuple(_task(path, t, plan.tensors[t.name].begin, region) for t, region in entries)
    return OutputFile(relpath, plan, tasks)


def _replicated_copy(
    tensor: SourceTensor, stage: int, rank_in_stage: int, source: StrategySet | None
) -> SourceTensor:
    """``tensor`` read from the source rank whose copy the destination rank gets (see plan_reshard)."""
    if source is None:
        return tensor
    source_stage = min(stage, source.stages - 1)
    piece = tensor.copies.get(source_stage * source.stage_size + rank_in_stage % source.stage_size)
    if piece is None:  # that rank does not hold it (remove_redundancy): any copy will do
        return tensor
    return dataclasses.replace(tensor, pieces={piece.region: piece})


def _output_metadata(source_metadata: dict[str, str]) -> dict[str, str]:
    # Outputs hold every slice on every rank that needs it, whatever the source did.
    metadata = dict(source_metadata)
    metadata.setdefault("format", "ms")
    if "remove_redundancy" in metadata:
        metadata["remove_redundancy"] = "False"
    return metadata


def plan_unify(
    params: dict[str, SourceTensor],
    hyper: dict[str, SourceTensor],
    staging: str,
    metadata: dict[str, str],
    part_bytes: int,
) -> tuple[list[OutputFile], dict[str, Any]]:
    """Parts of about ``part_bytes`` in source order, ``hyper_param.safetensors``, and the name map."""
    parts: list[list[tuple[SourceTensor, Region]]] = [[]]
    size = 0
    for tensor in params.values():
        nbytes = math.prod(tensor.shape) * DTYPE_SIZES[tensor.dtype]
        if parts[-1] and size + nbytes > part_bytes:
            parts.append([])
            size = 0
        parts[-1].append((tensor, _full_region(tensor.shape)))
        size += nbytes
    outputs = [
        _output_file(f"part{i}.safetensors", staging, entries, {"format": "ms"})
        for i, entries in enumerate(parts)
        if entries
    ]
    if hyper:
        entries = [(t, _full_region(t.shape)) for t in hyper.values()]
        outputs.append(_output_file("hyper_param.safetensors", staging, entries, _output_metadata(metadata)))
    weight_map = {
        t.name: out.relpath for out in outputs if out.relpath != "hyper_param.safetensors" for t in out.tasks
    }
    total = sum(
        out.plan.file_size - len(out.plan.header)
        for out in outputs
        if out.relpath != "hyper_param.safetensors"
    )
    name_map = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return outputs, name_map


def plan_reshard(
    params: dict[str, SourceTensor],
    replicated: dict[str, SourceTensor],
    dst: StrategySet,
    staging: str,
    names: Callable[[int], str],
    metadata: dict[str, str],
    source: StrategySet | None = None,
) -> list[OutputFile]:
    """One ``rank_<r>/<name>`` per destination rank: its slice of every parameter of its stage.

    Replicated tensors (``global_step``, ``loss_scale``, …) are copied whole. With the sharded
    ``source`` strategy, destination rank ``i`` of a stage takes the copy of source rank
    ``i mod (source stage size)`` of the same stage, as MindSpore's ``transform_checkpoints`` does
    (the copies are equal in a healthy checkpoint; this keeps the choice the same when they are not).
    """
    outputs = []
    for rank in range(dst.world_size):
        stage, rank_in_stage = dst.stage_of(rank)
        entries: list[tuple[SourceTensor, Region]] = []
        for tensor in params.values():
            layouts = dst.layout_for(tensor.name)
            if layouts is None:
                raise ConversionError(
                    f"parameter {tensor.name!r} has a source layout but none in the destination strategy; "
                    "expected both strategies to describe the same model"
                )
            layout = layouts.get(stage)
            if layout is None:
                continue
            strategy_mod.check_layout(tensor.name, layout, tensor.shape)
            entries.append((tensor, _region(strategy_mod.rank_slices(layout, tensor.shape, rank_in_stage))))
        entries.extend(
            (_replicated_copy(t, stage, rank_in_stage, source), _full_region(t.shape))
            for t in replicated.values()
        )
        outputs.append(
            _output_file(f"rank_{rank}/{names(rank)}", staging, entries, _output_metadata(metadata))
        )
    return outputs


# --------------------------------------------------------------------------------------------
# Checksums: XXH3-64 (~3x faster than zlib's CRC-32, which matters because every byte is hashed
# twice: when assembled from the source slices and when read back), from the maintained `xxhash`
# package (the reference C implementation; a binary wheel, so every machine computes the same
# digests). Every result is written with it. Earlier versions fell back to CRC-32 where the
# system's libxxhash was missing; "crc32" stays readable so that what they published still verifies.

#: The checksum every conversion writes (recorded in the marker as ``checksum``).
CHECKSUM = "xxh3-64"
#: Checksums a marker may name: :data:`CHECKSUM`, and CRC-32 from earlier versions.
READABLE_CHECKSUMS = (CHECKSUM, "crc32")


class Hasher:
    """A streaming checksum over byte buffers, read-only ones (a memory-mapped page cache) included."""

    def __init__(self, algorithm: str = CHECKSUM) -> None:
        if algorithm not in READABLE_CHECKSUMS:
            raise ConversionError(
                f"unknown checksum {algorithm!r}; expected one of {', '.join(READABLE_CHECKSUMS)}"
            )
        self.algorithm = algorithm
        self._xxh = xxhash.xxh3_64() if algorithm == "xxh3-64" else None
        self._crc = 0

    def update(self, view: memoryview) -> None:
        if self._xxh is not None:
            self._xxh.update(view)
        else:
            self._crc = zlib.crc32(view, self._crc)

    def hexdigest(self) -> str:
        """16 hex digits for XXH3-64 (its canonical big-endian form), 8 for CRC-32."""
        if self._xxh is not None:
            return self._xxh.hexdigest()
        return f"{self._crc:08x}"


# --------------------------------------------------------------------------------------------
# Copy (runs in worker processes)

_fds: dict[tuple[str, int], int] = {}


def _worker_init(parent: int | None = None) -> None:
    _fds.clear()
    # Die with the parent: a killed conversion must not leave workers writing into staging.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    # The signal is armed only from here on: a parent killed between the fork and the line above
    # has already left this worker orphaned (with tasks it may have been sent), so stop now.
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _fd(path: str, flags: int) -> int:
    key = (path, flags)
    fd = _fds.get(key)
    if fd is None:
        fd = _fds[key] = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    return fd


def _close_fds() -> None:
    for fd in _fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _fds.clear()


_buffers: dict[str, bytearray] = {}


def _buffer(key: str, nbytes: int) -> memoryview:
    """A per-process buffer reused across chunks: no page faults or zeroing per chunk."""
    buffer = _buffers.get(key)
    if buffer is None or len(buffer) < nbytes:
        buffer = _buffers[key] = bytearray(nbytes)
    return memoryview(buffer)[:nbytes]


def _array(key: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    return np.frombuffer(_buffer(key, math.prod(shape) * dtype.itemsize), dtype=dtype).reshape(shape)


def _bytes(array: np.ndarray) -> memoryview:
    return memoryview(array.data).cast("B")


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)


def _uint(itemsize: int) -> np.dtype[Any]:
    return np.dtype(f"<u{itemsize}")


def _gather(dst: np.ndarray, dst_region: Region, sources: list[tuple[Region, int, np.ndarray]]) -> None:
    """Fill ``dst`` (holding ``dst_region``) from mapped piece rows.

    Each source is ``(piece region, full-tensor row of its first mapped row, mapped rows)``; numpy
    copies each intersection straight from the page cache into place (one copy, bit-exact on
    unsigned-integer views).
    """
    for piece_region, first_row, rows in sources:
        inter = _intersect(dst_region, piece_region)
        if inter is None:
            continue
        target = tuple(slice(a - d0, b - d0) for (a, b), (d0, _) in zip(inter, dst_region, strict=True))
        source = (
            slice(inter[0][0] - first_row, inter[0][1] - first_row),
            *(slice(a - p0, b - p0) for (a, b), (p0, _) in zip(inter[1:], piece_region[1:], strict=True)),
        )
        dst[target] = rows[source]


#: Source bytes mapped at a time by the contiguous path (its chunks of ``CHUNK_BYTES`` are hashed
#: and written while still in the CPU cache); also the amount of written data after which the
#: kernel is asked to start writing it back.
WINDOW_BYTES = 8 * 1024 * 1024

_libc: Any = None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + nbytes)`` back to disk, without waiting.

    Writeback then overlaps with the copy instead of all happening in the final ``fsync``
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)`` commits no journal, so it does not stall the other
    writers as an early ``fsync`` would). Durability still comes from the ``fsync`` before publishing.
    """
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    if _libc and nbytes > 0:
        _libc.sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure only loses speed


class _Writeback:
    """Batch the ascending writes of one task into ``_start_writeback`` calls of ~``WINDOW_BYTES``.

    With ``fd`` -1 (a run without fsync) nothing is started: the kernel writes back when it likes.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.start = self.end = -1

    def wrote(self, offset: int, nbytes: int) -> None:
        if offset != self.end:
            self.flush()
            self.start = offset
        self.end = offset + nbytes
        if self.end - self.start >= WINDOW_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.fd >= 0 and self.end > self.start >= 0:
            _start_writeback(self.fd, self.start, self.end - self.start)
        self.start = self.end  # a following contiguous write starts the next batch here


@contextlib.contextmanager
def _mapped(fd: int, offset: int, nbytes: int) -> Iterator[memoryview]:
    """A read-only view of ``nbytes`` of ``fd`` at ``offset``, mapped from the page cache.

    The mapping lives only inside the ``with`` block, so its pages stop counting in this process's
    resident memory when it ends. Callers must drop every array made from the view before leaving.
    """
    if os.fstat(fd).st_size < offset + nbytes:
        raise SafetensorsError(f"unexpected end of file before offset {offset + nbytes} (source changed?)")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    if nbytes == 0:
        yield memoryview(b"")
        return
    mapping = mmap.mmap(
        fd,
        offset + nbytes - start,
        flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),  # one fault-in call, not one per page
        prot=mmap.PROT_READ,
        offset=start,
    )
    view = memoryview(mapping)[offset - start :]
    try:
        yield view
    finally:
        # A view still exported (an exception's traceback holding an array) leaves the unmapping to
        # the garbage collector rather than raising over the original error.
        with contextlib.suppress(BufferError):
            view.release()
            mapping.close()


def _copy_range(
    src_fd: int,
    src_offset: int,
    out_fd: int,
    out_offset: int,
    nbytes: int,
    hasher: Hasher,
    writeback: _Writeback,
) -> None:
    """Copy a contiguous byte range from a source into an output, hashing it on the way."""
    done = 0
    while done < nbytes:
        window = min(WINDOW_BYTES, nbytes - done)
        with _mapped(src_fd, src_offset + done, window) as view:
            step = max(1, CHUNK_BYTES)
            for first in range(0, window, step):
                part = view[first : first + step]
                hasher.update(part)  # hash, then write, while the chunk is still in the CPU cache
                _pwrite_all(out_fd, part, out_offset + done + first)
                writeback.wrote(out_offset + done + first, part.nbytes)
                part.release()
        done += window


def run_task(task: TensorTask) -> tuple[str, str, str, int]:
    """Write one output tensor; return ``(path, name, checksum, bytes)`` of what was written."""
    out_fd = _fd(task.path, os.O_WRONLY)
    region = task.region or ((0, 1),)  # a 0-d tensor behaves as one element
    pieces = task.pieces if task.region else tuple(Piece(p.path, p.begin, ((0, 1),)) for p in task.pieces)
    shape = tuple(stop - start for start, stop in region)
    hasher = Hasher(task.checksum)
    if 0 in shape:
        return task.path, task.name, hasher.hexdigest(), 0
    row_bytes = math.prod(shape[1:]) * task.itemsize
    writeback = _Writeback(out_fd if task.writeback else -1)
    if all(p.region[1:] == region[1:] for p in pieces):
        # Contiguous path: every piece holds whole rows of the output region, so the output tensor
        # is the pieces' row ranges one after the other, each one contiguous byte range in its
        # source file and in the output (no gathering, no intermediate buffer).
        for piece in sorted(pieces, key=lambda p: p.region[0][0]):
            inter = _intersect(region, piece.region)
            if inter is None:
                continue
            _copy_range(
                _fd(piece.path, os.O_RDONLY),
                piece.begin + (inter[0][0] - piece.region[0][0]) * row_bytes,
                out_fd,
                task.offset + (inter[0][0] - region[0][0]) * row_bytes,
                (inter[0][1] - inter[0][0]) * row_bytes,
                hasher,
                writeback,
            )
        writeback.flush()
        return task.path, task.name, hasher.hexdigest(), task.nbytes
    # Strided path: assemble the output one chunk of rows at a time from every piece it overlaps,
    # gathering from the pieces' rows mapped a window (~WINDOW_BYTES of output) at a time.
    widest = max([math.prod(shape[1:])] + [math.prod(b - a for a, b in p.region[1:]) for p in pieces])
    chunk_rows = max(1, CHUNK_BYTES // max(1, widest * task.itemsize))
    window_rows = chunk_rows * max(1, WINDOW_BYTES // max(1, chunk_rows * widest * task.itemsize))
    dtype = _uint(task.itemsize)
    for window_first in range(region[0][0], region[0][1], window_rows):
        window_region = ((window_first, min(window_first + window_rows, region[0][1])), *region[1:])
        with contextlib.ExitStack() as stack:
            sources: list[tuple[Region, int, np.ndarray]] = []
            try:
                for piece in pieces:
                    inter = _intersect(window_region, piece.region)
                    if inter is None:
                        continue
                    piece_shape = tuple(stop - start for start, stop in piece.region)
                    piece_row = math.prod(piece_shape[1:]) * task.itemsize
                    m0, m1 = (row - piece.region[0][0] for row in inter[0])
                    mapped = stack.enter_context(
                        _mapped(
                            _fd(piece.path, os.O_RDONLY), piece.begin + m0 * piece_row, (m1 - m0) * piece_row
                        )
                    )
                    rows = np.frombuffer(mapped, dtype=dtype).reshape((m1 - m0, *piece_shape[1:]))
                    sources.append((piece.region, inter[0][0], rows))
                    del rows
                for first in range(window_region[0][0], window_region[0][1], chunk_rows):
                    last = min(first + chunk_rows, window_region[0][1])
                    chunk = _array("chunk", (last - first, *shape[1:]), dtype)
                    _gather(chunk, ((first, last), *region[1:]), sources)
                    view = _bytes(chunk)
                    hasher.update(view)
                    offset = task.offset + (first - region[0][0]) * row_bytes
                    _pwrite_all(out_fd, view, offset)
                    writeback.wrote(offset, view.nbytes)
            finally:
                sources.clear()  # no array may outlive its mapping
    writeback.flush()
    return task.path, task.name, hasher.hexdigest(), task.nbytes


def verify_file(path: str, plan: FilePlan, expected: dict[str, str], algorithm: str) -> tuple[str, int, str]:
    """Re-read ``path``: header, size and every tensor's checksum must match the source slices'.

    The tensors are hashed from the page cache through a memory map (no copy into this process).
    Returns ``(path, size, file checksum)``; the file checksum is taken over the header bytes and
    the tensors' checksums (so the data is hashed once, not twice).
    """
    header = read_header(path)
    if header.file_size != plan.file_size:
        raise ConversionError(f"{path}: {header.file_size} bytes, planned {plan.file_size}")
    if header.tensors != plan.tensors:
        raise ConversionError(f"{path}: header differs from the planned one")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        file_hasher = Hasher(algorithm)
        head = bytearray(os.pread(fd, len(plan.header), 0))
        if head != plan.header:
            raise ConversionError(f"{path}: header bytes differ from the planned ones")
        file_hasher.update(memoryview(head))
        for info in plan.tensors.values():
            hasher = Hasher(algorithm)
            position = info.begin
            while position < info.end:
                window = min(WINDOW_BYTES, info.end - position)
                try:
                    with _mapped(fd, position, window) as view:
                        hasher.update(view)
                except SafetensorsError:
                    raise ConversionError(f"{path}: ends inside tensor {info.name!r}") from None
                position += window
            digest = hasher.hexdigest()
            if digest != expected[info.name]:
                raise ConversionError(
                    f"{path}: tensor {info.name!r} reads back with {algorithm} {digest}, the source slices "
                    f"gave {expected[info.name]}"
                )
            file_hasher.update(memoryview(bytearray(f"{info.name}\0{digest}\0".encode())))
    finally:
        os.close(fd)
    return path, plan.file_size, file_hasher.hexdigest()


def _verify_job(job: tuple[str, FilePlan, dict[str, str], str]) -> tuple[str, int, str]:
    return verify_file(*job)


# --------------------------------------------------------------------------------------------
# Orchestration: staging, parallel execution, marker, publish


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _request_digest(operation: str, sources: Iterable[str], extra: dict[str, Any]) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(operation.encode())
    for path in sorted(sources):
        st = os.stat(path)
        hasher.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    hasher.update(json.dumps(extra, sort_keys=True).encode())
    return hasher.hexdigest()


def _prepare_dst(dst_dir: str, request: str) -> dict[str, Any] | None:
    """Return the marker if ``dst_dir`` already holds this conversion; clean up leftovers otherwise."""
    marker = is_complete(dst_dir)
    if marker is not None:
        if marker.get("request") != request:
            raise ConversionError(
                f"{dst_dir} holds a finished conversion of other inputs ({marker.get('operation')} of "
                f"{marker.get('source', {}).get('directory')}); choose another destination or remove it"
            )
        return marker
    stale = _read_marker(dst_dir)
    if stale is not None and stale.get("request") == request and _unsynced_elsewhere(stale):
        # This very conversion, published without fsync before a reboot (or on another machine):
        # its data cannot be trusted, so it is redone.
        shutil.rmtree(dst_dir)
    if os.path.lexists(dst_dir):
        if os.path.isdir(dst_dir) and not os.listdir(dst_dir):
            os.rmdir(dst_dir)
        else:
            raise ConversionError(
                f"{dst_dir} exists and is not a finished conversion (no valid {MARKER_NAME}); expected a "
                "new or empty destination — remove it or choose another"
            )
    parent = os.path.dirname(dst_dir) or "."  # created by _exclusive
    prefix = os.path.basename(dst_dir) + ".staging-"
    for name in os.listdir(parent):
        if name.startswith(prefix):  # left behind by a killed run: never trust, always redo
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return None


@contextlib.contextmanager
def _exclusive(dst_dir: str, progress: Progress | None = None) -> Iterator[None]:
    """Hold an exclusive lock on converting into ``dst_dir``: a ``flock`` on a file beside it.

    A second conversion into the same destination waits, then finds the first one's result; it
    never removes a staging directory that is still being written. The lock goes with the process
    (and its workers), so a killed conversion never leaves it held. The holder removes the lock
    file when done; a waiter that then holds the lock on a removed file tries again. A wait is
    announced once through ``progress`` (``{"event": "waiting", "message": ...}``).
    """
    parent = os.path.dirname(dst_dir) or "."
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{os.path.basename(dst_dir)}.relaunch-lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress is not None:
                    progress(
                        {
                            "event": "waiting",
                            "message": f"another conversion into {dst_dir} is running (lock {path}); waiting",
                        }
                    )
                    progress = None
                fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            current = os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _run_jobs(
    workers: int,
    copy_jobs: dict[str, list[TensorTask]],
    verify_job: Callable[[str], tuple[str, FilePlan, dict[str, str], str]],
) -> Iterator[tuple[str, Any]]:
    """Run every file's copy tasks, then that file's verification as soon as its copies are done.

    Yields ``("copy", run_task result)`` and ``("verify", verify_file result)`` as they finish.
    Verifying (and fsyncing) a finished file overlaps with copying the next ones.
    """
    if workers <= 1:
        _worker_init()
        try:
            for path, tasks in copy_jobs.items():
                for task in tasks:
                    yield "copy", run_task(task)
                yield "verify", _verify_job(verify_job(path))
        finally:
            _close_fds()
        return
    # Files in groups of ``workers``, round-robin inside a group: workers mostly write different
    # files (buffered writes to one file serialize on its inode lock), and the files of a group
    # finish, get verified and flushed while the next group is copied.
    paths = list(copy_jobs)
    order: list[TensorTask] = []
    for first in range(0, len(paths), workers):
        group = [copy_jobs[path] for path in paths[first : first + workers]]
        order += [task for round_ in itertools.zip_longest(*group) for task in round_ if task is not None]
    ordered = iter(order)
    remaining = {path: len(tasks) for path, tasks in copy_jobs.items()}
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),)
    ) as pool:
        kinds: dict[concurrent.futures.Future[Any], str] = {}
        for path, count in remaining.items():
            if count == 0:
                kinds[pool.submit(_verify_job, verify_job(path))] = "verify"

        def refill() -> None:
            # A short queue of copies, so that a finished file's verification starts promptly.
            while sum(1 for kind in kinds.values() if kind == "copy") < 2 * workers:
                task = next(ordered, None)
                if task is None:
                    return
                kinds[pool.submit(run_task, task)] = "copy"

        refill()
        while kinds:
            done, _ = concurrent.futures.wait(kinds, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                kind = kinds.pop(future)
                result = future.result()
                yield kind, result
                if kind == "copy":
                    remaining[result[0]] -= 1
                    if remaining[result[0]] == 0:
                        kinds[pool.submit(_verify_job, verify_job(result[0]))] = "verify"
            refill()


def execute(
    outputs: list[OutputFile],
    staging: str,
    *,
    workers: int,
    progress: Progress | None,
    durable: bool = True,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Create, fill and verify every output file in ``staging``; return ``(files, bytes)`` for the marker."""
    for out in outputs:
        path = os.path.join(staging, out.relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(out.plan.header)
            handle.truncate(out.plan.file_size)
    algorithm = CHECKSUM
    # Per file, largest tensors first; _run_jobs decides how files interleave.
    copy_jobs = {
        os.path.join(staging, out.relpath): [
            dataclasses.replace(task, checksum=algorithm, writeback=durable)
            for task in sorted(out.tasks, key=lambda t: -t.nbytes)
        ]
        for out in outputs
    }
    plans = {os.path.join(staging, out.relpath): out.plan for out in outputs}
    total_bytes = sum(out.plan.file_size for out in outputs)
    expected: dict[str, dict[str, str]] = {path: {} for path in plans}
    done_bytes = sum(len(out.plan.header) for out in outputs)
    total_steps = sum(len(tasks) for tasks in copy_jobs.values()) + len(outputs)
    steps = 0
    files: dict[str, dict[str, Any]] = {}

    def report(phase: str) -> None:
        if progress is not None:
            progress(
                {
                    "event": "progress",
                    "phase": phase,
                    "done": steps,
                    "total": total_steps,
                    "bytes": done_bytes,
                    "total_bytes": total_bytes,
                }
            )

    def verify_job(path: str) -> tuple[str, FilePlan, dict[str, str], str]:
        return path, plans[path], expected[path], algorithm

    report("copy")
    for kind, result in _run_jobs(workers, copy_jobs, verify_job):
        steps += 1
        if kind == "copy":
            path, name, digest, nbytes = result
            expected[path][name] = digest
            done_bytes += nbytes
        else:
            path, size, digest = result
            files[os.path.relpath(path, staging)] = {"size": size, "checksum": digest}
        report(kind)
    return dict(sorted(files.items())), total_bytes


def _publish(staging: str, dst_dir: str, marker: dict[str, Any], *, durable: bool) -> None:
    """Write the marker last and rename ``staging`` to ``dst_dir``; with ``durable``, fsync first.

    Without ``durable`` the order is the same (a killed process never leaves a result that looks
    finished), but nothing is flushed, so only a crash of the whole machine can lose the data; the
    marker then says ``durable: false`` with the boot id (see :func:`_convert`), and
    :func:`is_complete` trusts it on this machine until it reboots.
    """
    if durable:
        # Flush every file once, at the end: an fsync while other files are still being written
        # makes ext4 (data=ordered) commit their data too and stalls the writers.
        for root, _dirs, names in os.walk(staging):
            for name in names:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(root)
    tmp = os.path.join(staging, MARKER_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    os.replace(tmp, os.path.join(staging, MARKER_NAME))
    if durable:
        _fsync_dir(staging)
    os.rename(staging, dst_dir)
    if durable:
        _fsync_dir(os.path.dirname(dst_dir) or ".")


def _small_file_entry(data: bytes) -> dict[str, Any]:
    hasher = Hasher(CHECKSUM)
    hasher.update(memoryview(bytearray(data)))
    return {"size": len(data), "checksum": hasher.hexdigest()}


def _convert(
    operation: str,
    dst_dir: str,
    request: str,
    build: Callable[[str], tuple[list[OutputFile], dict[str, Any], dict[str, str]]],
    *,
    workers: int,
    progress: Progress | None,
    durable: bool,
) -> ConversionResult:
    started = time.monotonic()
    dst_dir = os.path.abspath(dst_dir)
    with _exclusive(dst_dir, progress):
        marker = _prepare_dst(dst_dir, request)
        if marker is not None:
            return ConversionResult(dst_dir, marker, True, 0, time.monotonic() - started)
        staging = f"{dst_dir}.staging-{secrets.token_hex(4)}"
        os.makedirs(staging)
        try:
            outputs, marker_extra, extra_files = build(staging)
            files, nbytes = execute(outputs, staging, workers=workers, progress=progress, durable=durable)
            for relpath, content in extra_files.items():
                path = os.path.join(staging, relpath)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(content)
                files[relpath] = _small_file_entry(content.encode())
            strategy_dir = os.path.join(staging, "strategy")
            for relpath in os.listdir(strategy_dir) if os.path.isdir(strategy_dir) else []:
                with open(os.path.join(strategy_dir, relpath), "rb") as handle:
                    files[f"strategy/{relpath}"] = _small_file_entry(handle.read())
            seconds = time.monotonic() - started
            marker = {
                "format": MARKER_FORMAT,
                "version": MARKER_VERSION,
                "operation": operation,
                "request": request,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "seconds": round(seconds, 3),
                "bytes": nbytes,
                "checksum": CHECKSUM,
                "files": dict(sorted(files.items())),
                **marker_extra,
                **({} if durable else {"durable": False, "boot_id": boot_id()}),
            }
            _publish(staging, dst_dir, marker, durable=durable)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ConversionResult(dst_dir, marker, False, nbytes, time.monotonic() - started)


def _source_description(src_files: Mapping[int, str], strategy: StrategySet | None) -> dict[str, Any]:
    first = os.path.abspath(src_files[min(src_files)])
    match = SHARD_NAME_RE.match(os.path.basename(first))
    directory = (
        os.path.dirname(os.path.dirname(first))
        if os.path.basename(os.path.dirname(first)).startswith("rank_")
        else os.path.dirname(first)
    )
    return {
        "kind": "sharded",
        "directory": directory,
        "ranks": len(src_files),
        "files": {
            str(r): os.path.relpath(os.path.abspath(p), directory) for r, p in sorted(src_files.items())
        },
        "epoch": int(match["epoch"]) if match else None,
        "step": int(match["step"]) if match else None,
        "strategy_digest": strategy.digest if strategy else None,
    }


def _source_metadata(paths: Iterable[str]) -> dict[str, str]:
    for path in paths:
        return dict(read_header(path).metadata)
    return {}


def unify(
    src_files: Mapping[int, str],
    src_strategy_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    workers: int = 2,
    part_bytes: int = DEFAULT_PART_BYTES,
    progress: Progress | None = None,
    durable: bool = True,
) -> ConversionResult:
    """Merge sharded safetensors (rank -> file) into MindSpore's unified format in ``dst_dir``.

    Parameters with a layout (optimizer moments included) go to ``part<i>.safetensors``; tensors
    absent from the strategy (``global_step``, ``epoch_num``, ``loss_scale``, …) go to
    ``hyper_param.safetensors`` with the source's metadata; ``param_name_map.json`` maps names
    to parts.

    ``durable=False`` skips every fsync (see :func:`_publish`): for scratch destinations whose
    loss in a machine crash costs only a re-run. The operator's conversion Jobs are durable.
    """
    strategy = strategy_mod.read_strategy_dir(src_strategy_dir, ranks=max(src_files, default=-1) + 1)
    src = {r: os.path.abspath(p) for r, p in src_files.items()}
    request = _request_digest("unify", src.values(), {"strategy": strategy.digest, "part_bytes": part_bytes})

    def build(staging: str) -> tuple[list[OutputFile], dict[str, Any], dict[str, str]]:
        tensors = load_sharded_source(src, strategy)
        params = {n: t for n, t in tensors.items() if t.layouts is not None}
        hyper = {n: t for n, t in tensors.items() if t.layouts is None}
        # Up to UNIFY_PARTS_PER_WORKER parts per worker (parts of >= 256 MiB): workers write
        # different files, and the parts finished first are verified while later ones are copied
        # instead of every part being verified at the end with no write going on.
        total = sum(math.prod(t.shape) * DTYPE_SIZES[t.dtype] for t in params.values())
        parts = max(1, workers) * UNIFY_PARTS_PER_WORKER
        size = min(part_bytes, max(256 * 1024**2, -(-total // parts)))
        metadata = _source_metadata(src[r] for r in sorted(src))
        outputs, name_map = plan_unify(params, hyper, staging, metadata, size)
        extra = {"source": _source_description(src, strategy), "destination": {"kind": "unified"}}
        return outputs, extra, {"param_name_map.json": json.dumps(name_map, indent=1) + "\n"}

    return _convert(
        "unify", os.fspath(dst_dir), request, build, workers=workers, progress=progress, durable=durable
    )


def reshard(
    src_files: Mapping[int, str] | str | os.PathLike[str],
    src_strategy_dir: str | os.PathLike[str] | None,
    dst_dir: str | os.PathLike[str],
    *,
    dst_strategy_dir: str | os.PathLike[str] | None = None,
    dst_parallel: str | Mapping[str, int] | None = None,
    name_pattern: str | None = None,
    workers: int = 2,
    progress: Progress | None = None,
    durable: bool = True,
) -> ConversionResult:
    """Reshard sharded safetensors (rank -> file) or a unified directory for a new layout.

    Writes ``<dst>/rank_<r>/<name>`` for every destination rank, ``<dst>/rank_<r>/meta.json`` when
    the source names an epoch and step, and the destination strategy in ``<dst>/strategy/``.
    ``name_pattern`` is formatted with ``prefix``, ``rank``, ``epoch`` and ``step``; by default the
    source's own file name with the rank replaced (MindFormers' naming, so ``resume_training``
    with a file name keeps working). The destination layout is ``dst_strategy_dir`` or, for
    ``[dp, mp]`` device matrices, ``dst_parallel`` (``"dp=2,mp=2,pp=1"``) rescaled from the
    source strategy (see :func:`relaunch.strategy.rescale_strategy`). ``durable`` as for
    :func:`unify`.
    """
    if (dst_strategy_dir is None) == (dst_parallel is None):
        raise ConversionError(
            "give exactly one of a destination strategy directory or a destination parallel layout"
        )
    source_ranks = max(src_files, default=-1) + 1 if isinstance(src_files, Mapping) else None
    source_strategy = (
        strategy_mod.read_strategy_dir(src_strategy_dir, ranks=source_ranks)
        if src_strategy_dir is not None
        else None
    )
    if dst_strategy_dir is not None:
        dst = strategy_mod.read_strategy_dir(dst_strategy_dir)
    else:
        if source_strategy is None:
            raise ConversionError(
                "a destination parallel layout is derived from the source strategy; give it too"
            )
        assert dst_parallel is not None
        parallel = (
            strategy_mod.parse_parallel(dst_parallel) if isinstance(dst_parallel, str) else dict(dst_parallel)
        )
        dst = strategy_mod.rescale_strategy(
            source_strategy, parallel.get("dp", 1), parallel.get("mp", 1), parallel.get("pp", 1)
        )

    unified = isinstance(src_files, (str, os.PathLike))
    if unified:
        src_dir = os.path.abspath(os.fspath(src_files))  # type: ignore[arg-type]
        sources = [
            os.path.join(src_dir, n) for n in sorted(os.listdir(src_dir)) if n.endswith(".safetensors")
        ]
        epoch = step = None
        fields = {"prefix": "checkpoint", "epoch": 1, "step": 1}
        pattern = name_pattern or DEFAULT_NAME_PATTERN
        src_map: dict[int, str] = {}
    else:
        assert isinstance(src_files, Mapping)
        if source_strategy is None:
            raise ConversionError("sharded sources need their strategy (--src-strategy)")
        src_map = {r: os.path.abspath(p) for r, p in src_files.items()}
        sources = list(src_map.values())
        first = os.path.basename(src_map[min(src_map)])
        match = SHARD_NAME_RE.match(first)
        epoch = int(match["epoch"]) if match else None
        step = int(match["step"]) if match else None
        fields = {"prefix": match["prefix"], "epoch": epoch, "step": step} if match else {}
        if name_pattern is None:
            if not re.search(r"_rank_\d+", first):
                raise ConversionError(
                    f"source file {first!r} has no _rank_<n> to substitute; give a name pattern"
                )
            pattern = re.sub(
                r"_rank_\d+", "_rank_{rank}", first.replace("{", "{{").replace("}", "}}"), count=1
            )
        else:
            pattern = name_pattern

    def names(rank: int) -> str:
        try:
            return pattern.format(rank=rank, **fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConversionError(f"name pattern {pattern!r}: cannot fill {exc} for this source") from None

    names(0)
    request = _request_digest(
        "reshard",
        sources,
        {
            "src_strategy": source_strategy.digest if source_strategy else None,
            "dst_strategy": dst.digest,
            "pattern": pattern,
        },
    )

    def build(staging: str) -> tuple[list[OutputFile], dict[str, Any], dict[str, str]]:
        if unified:
            params, replicated = load_unified_source(src_dir)
            metadata = _source_metadata(p for p in sources if p.endswith("hyper_param.safetensors"))
            source_desc: dict[str, Any] = {"kind": "unified", "directory": src_dir, "strategy_digest": None}
        else:
            assert source_strategy is not None
            tensors = load_sharded_source(src_map, source_strategy)
            params = {n: t for n, t in tensors.items() if t.layouts is not None}
            replicated = {n: t for n, t in tensors.items() if t.layouts is None}
            metadata = _source_metadata(src_map[r] for r in sorted(src_map))
            source_desc = _source_description(src_map, source_strategy)
        outputs = plan_reshard(params, replicated, dst, staging, names, metadata, source_strategy)
        strategy_mod.write_strategy_set(os.path.join(staging, "strategy"), dst)
        extra_files = {}
        if epoch is not None and step is not None:
            for rank in range(dst.world_size):
                meta = {"last_epoch": epoch, "last_step": step, "last_ckpt_file": names(rank)}
                extra_files[f"rank_{rank}/meta.json"] = json.dumps(meta) + "\n"
        extra = {
            "source": source_desc,
            "destination": {
                "kind": "sharded",
                "ranks": dst.world_size,
                "stages": dst.stages,
                "name_pattern": pattern.format(rank="{rank}", **fields),
                "strategy_digest": dst.digest,
            },
        }
        return outputs, extra, extra_files

    return _convert(
        "reshard", os.fspath(dst_dir), request, build, workers=workers, progress=progress, durable=durable
    )
