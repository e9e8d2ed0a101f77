"""Find the checkpoint to resume from: the newest step that is complete and intact on every rank.

Owns the reading of checkpoint trees (nothing here writes):

- **Checkpoint 1.0** (``v1``): ``<root>/rank_<r>/<prefix>-<epoch>_<step>.<safetensors|ckpt>`` plus a
  per-rank ``meta.json``. Every prefix in the tree is considered (the incremental ``_1``, ``_2``
  suffixes a restarted run adds), steps are ordered by ``(epoch, step)``, and ``meta.json`` is never
  trusted for the choice (it is read only to explain what it says).
- **Checkpoint 2.0** (``v2``): ``<root>/iteration_<8 digits>/`` with ``metadata.json`` (whose
  ``storage_data`` names every shard file), ``common.json`` and
  ``<prefix>-<model|opt>-<rank:07d>-<world:07d>.safetensors``; ``latest_checkpointed_iteration.txt``.
- **Unified** weights: a directory holding ``param_name_map.json`` and/or ``hyper_param.safetensors``.

The candidates are walked newest first and only their files are verified, so a scan of a large tree
opens the files of one step (plus those of any newer, broken step), never all of them. Verification
(``header``): a safetensors header that parses with every tensor inside the file; a ``.ckpt`` whose
protobuf stream parses to the end with each parameter's bytes matching its dims and dtype.
``deep`` also reads every byte and checks the CRC MindSpore writes when ``crc_check`` was on.

The ``.ckpt`` CRC: MindSpore appends ``b"crc_num"`` and the CRC-32 (zlib polynomial, initial value
0) of every byte before that trailer, as a 10-byte big-endian integer. Safetensors files saved with
``crc_check`` carry ``"crc_num"`` in ``__metadata__``: the CRC-32 chained over, for each tensor name
in sorted order, the UTF-8 name and then the tensor's bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from relaunch.protowire import WireError, read_varint
from relaunch.safetensors_format import SafetensorsError, read_header

Verify = Literal["header", "deep"]
Format = Literal["safetensors", "ckpt"]
FORMATS: tuple[Format, ...] = ("safetensors", "ckpt")

META_FILE = "meta.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
PARAM_NAME_MAP = "param_name_map.json"
HYPER_PARAM = "hyper_param.safetensors"

#: ``<prefix>-<epoch>_<step>.<fmt>``; the prefix is everything before the last such ``-``.
_NAME_RE = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)\.(?P<fmt>safetensors|ckpt)$")
#: The temporary name MindSpore writes first (``<stem>.tmp``; some writers keep the extension).
_TMP_RE = re.compile(r"^(?P<stem>.+-\d+_\d+)(?:\.(?:safetensors|ckpt))?\.tmp$")
_RANK_IN_NAME_RE = re.compile(r"_rank_(\d+)")
_RANK_DIR_RE = re.compile(r"^rank_(\d+)$")
_ITERATION_DIR_RE = re.compile(r"^iteration_(\d+)$")
_V2_FILE_RE = re.compile(
    r"^(?P<prefix>.*?)-?(?P<kind>model|opt)-(?P<rank>\d{7})-(?P<world>\d{7})\.safetensors$"
)
_RUN_SUFFIX_RE = re.compile(r"\{rank\}_(\d+)$")

#: Verification switches to threads when the first files take longer than this each: on network
#: storage most of the time is spent waiting for the server, and threads overlap those waits.
_PROBE_FILES = 16
_SLOW_FILE_SECONDS = 0.0005
_MAX_WORKERS = 16
#: Read size for deep verification.
_CHUNK = 16 * 1024 * 1024


class CheckpointError(ValueError):
    """Bad input: not a directory, not a checkpoint tree, unreadable, or a malformed request."""


class CkptFormatError(ValueError):
    """A ``.ckpt`` file is not a well-formed MindSpore checkpoint stream."""


@dataclass(frozen=True)
class Choice:
    """What to resume from."""

    kind: Literal["sharded", "unified", "iteration"]
    epoch: int | None  # None for unified and for v2
    step: int | None  # v2: the iteration
    directory: str  # the checkpoint root (v1), the unified dir, or the iteration dir (v2)
    #: v1: ``str.format(rank=r)`` gives rank r's basename (``qwen3_rank_{rank}-2_100.safetensors``);
    #: v2: the model shard (``p-model-{rank:07d}-0000008.safetensors``); None for unified.
    name_pattern: str | None
    files: dict[int, str]  # rank -> absolute path (v2: the model shard); empty for unified
    remove_redundancy: bool
    format: Format = "safetensors"
    #: v1: the prefix with the rank written ``{rank}``; v2: the user prefix; None for unified.
    prefix: str | None = None
    #: Every file the choice consists of (v2: model and optimizer shards; unified: the parts).
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejection:
    """A candidate newer than the choice, and why it was not taken."""

    epoch: int | None
    step: int | None
    prefix: str | None
    reason: str
    ranks: tuple[int, ...] = ()  # the ranks at fault (missing or corrupt)


@dataclass(frozen=True)
class Candidate:
    """One step of one prefix as found on disk (for display; ``ScanResult.candidates``)."""

    epoch: int | None
    step: int
    prefix: str
    format: Format
    name_pattern: str
    present: int  # ranks holding the file
    missing: tuple[int, ...]
    tmp: tuple[int, ...]  # ranks holding only an unfinished ``.tmp``
    #: chosen | rejected (missing files or corrupt) | complete (present everywhere, not verified)
    #: | incomplete (older than the choice, missing somewhere)
    status: Literal["chosen", "rejected", "complete", "incomplete"]
    corrupt: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScanResult:
    root: str
    layout: Literal["v1", "v2", "unified", "empty"]
    format: Format | None
    ranks: int
    choice: Choice | None
    rejected: tuple[Rejection, ...]
    #: (epoch, step, prefix) present on every rank, newest first, without those found corrupt (older
    #: than the choice: not verified). v2: epoch is None and step is the iteration.
    complete: tuple[tuple[Any, int, str], ...]
    pinned: str | None  # the file name asked for (``resume=``), as given
    pinned_error: str | None  # why the pinned file cannot be used: each rank lacking it / corrupt
    notes: tuple[str, ...] = ()  # what else a human should know (meta.json state, extra ranks…)
    candidates: tuple[Candidate, ...] = field(default=(), compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The ``relaunch scan --json`` document (contract: ``relaunch.commands.scan``)."""
        choice: dict[str, Any] | None = None
        if self.choice is not None:
            c = self.choice
            choice = {
                "kind": c.kind,
                "epoch": c.epoch,
                "step": c.step,
                "directory": c.directory,
                "prefix": c.prefix,
                "name_pattern": c.name_pattern,
                "format": c.format,
                "remove_redundancy": c.remove_redundancy,
                "files": {str(rank): path for rank, path in sorted(c.files.items())},
                "parts": list(c.parts),
            }
        return {
            "root": self.root,
            "layout": self.layout,
            "format": self.format,
            "ranks": self.ranks,
            "choice": choice,
            "rejected": [
                {
                    "epoch": r.epoch,
                    "step": r.step,
                    "prefix": r.prefix,
                    "reason": r.reason,
                    "ranks": list(r.ranks),
                }
                for r in self.rejected
            ],
            "complete": [{"epoch": e, "step": s, "prefix": p} for e, s, p in self.complete],
            "pinned": self.pinned,
            "pinned_error": self.pinned_error,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------
# Names


def parse_checkpoint_name(name: str) -> tuple[str, int, int, Format] | None:
    """``"q_rank_0-2_10.ckpt"`` -> ``("q_rank_0", 2, 10, "ckpt")``; None if not a checkpoint name."""
    match = _NAME_RE.match(name)
    if match is None:
        return None
    fmt: Format = "safetensors" if match["fmt"] == "safetensors" else "ckpt"
    return match["prefix"], int(match["epoch"]), int(match["step"]), fmt


def rank_of_name(name: str) -> int | None:
    """The rank a checkpoint name belongs to: the number after its first ``_rank_`` (None if none)."""
    match = _RANK_IN_NAME_RE.search(name)
    return int(match.group(1)) if match else None


def rank_file_name(name: str, rank: int) -> str:
    """Rank ``rank``'s version of ``name``, substituting exactly as MindFormers does.

    The number ``n`` after the first ``_rank_`` is the rank the name was written for; every
    ``_rank_<n>`` in the name then becomes ``_rank_<rank>``. Raises ``CheckpointError`` when the
    name holds no ``_rank_<n>``.
    """
    original = rank_of_name(name)
    if original is None:
        raise CheckpointError(f"{name!r} holds no _rank_<n>, so it cannot be mapped to each rank's file")
    return name.replace(f"_rank_{original}", f"_rank_{rank}")


def _template(name: str, rank: int | None) -> str:
    """``name`` as a ``str.format`` pattern with the rank written ``{rank}``."""
    escaped = name.replace("{", "{{").replace("}", "}}")
    if rank is None:
        return escaped
    return escaped.replace(f"_rank_{rank}", "_rank_{rank}")


def _run_number(prefix_template: str) -> int:
    """0 for ``q_rank_{rank}``, n for ``q_rank_{rank}_n`` (the run a restarted job writes)."""
    match = _RUN_SUFFIX_RE.search(prefix_template)
    return int(match.group(1)) if match else 0


def _ranges(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    spans: list[list[int]] = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _as_format(fmt: str | None) -> Format | None:
    return "safetensors" if fmt == "safetensors" else "ckpt" if fmt == "ckpt" else None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


# --------------------------------------------------------------------------------------------
# File verification


@dataclass(frozen=True)
class FileCheck:
    """A verified file."""

    path: str
    tensors: int
    remove_redundancy: bool = False


def verify_file(path: str, *, deep: bool = False) -> FileCheck:
    """Verify one checkpoint file by its extension; raises ``ValueError`` (or ``OSError``) naming the flaw."""
    if path.endswith(".ckpt"):
        return verify_ckpt(path, deep=deep)
    return verify_safetensors(path, deep=deep)


def verify_safetensors(path: str, *, deep: bool = False) -> FileCheck:
    header = read_header(path)
    if not header.tensors:
        raise SafetensorsError(f"{path}: holds no tensors")
    if deep:
        _deep_safetensors(path, header.tensors, header.metadata, header.file_size)
    redundancy = header.metadata.get("remove_redundancy", "False") == "True"
    return FileCheck(path, len(header.tensors), redundancy)


def _deep_safetensors(path: str, tensors: dict[str, Any], metadata: dict[str, str], size: int) -> None:
    expected_crc = metadata.get("crc_num")
    with open(path, "rb") as handle:
        if expected_crc is None:
            # No checksum to compare against: read everything so that I/O errors surface here.
            while handle.read(_CHUNK):
                pass
            return
        crc = 0
        for name in sorted(tensors):
            info = tensors[name]
            crc = zlib.crc32(name.encode("utf-8"), crc)
            handle.seek(info.begin)
            remaining = info.end - info.begin
            while remaining:
                chunk = handle.read(min(remaining, _CHUNK))
                if not chunk:
                    raise SafetensorsError(f"{path}: ends inside tensor {name!r}")
                crc = zlib.crc32(chunk, crc)
                remaining -= len(chunk)
    try:
        expected = int(expected_crc)
    except ValueError:
        raise SafetensorsError(f"{path}: metadata crc_num {expected_crc!r} is not a number") from None
    if crc != expected:
        raise SafetensorsError(f"{path}: CRC-32 {crc} differs from the recorded {expected} (data corrupted)")


#: Bytes per element of the dtypes a MindSpore ``.ckpt`` names (``str(mstype.float32)`` is
#: ``"Float32"``; map parameters use numpy's names). Compared lower-case. Others are not size-checked.
CKPT_DTYPE_SIZES: dict[str, int] = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}
_CRC_TRAILER = b"crc_num"
_TRAILER_LEN = len(_CRC_TRAILER) + 10


def verify_ckpt(path: str, *, deep: bool = False) -> FileCheck:
    """Walk a MindSpore ``.ckpt`` protobuf stream without decoding tensor bytes.

    Wire format (``checkpoint.proto``): the file is a concatenation of ``Checkpoint`` messages, which
    protobuf reads as one message whose field 1 (``Value``) repeats. ``Value``: ``tag`` = 1 (string),
    ``tensor`` = 2 (``TensorProto``: ``dims`` = 1 int64, ``tensor_type`` = 2 string,
    ``tensor_content`` = 3 bytes) or ``maptensor`` = 3 (``repeated TensorProto tensor = 1``). A
    parameter larger than 512 MiB is cut into several ``Value``s with the same tag and full dims;
    their contents add up to ``prod(dims) * itemsize``. Optional trailer: ``b"crc_num"`` + 10 bytes.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise CkptFormatError(f"{path}: empty file (0 bytes)")
        view = _Reader(path, handle.fileno())
        has_trailer = size >= _TRAILER_LEN and view[size - _TRAILER_LEN : size - 10] == _CRC_TRAILER
        limit = size - _TRAILER_LEN if has_trailer else size
        count = _walk_ckpt(path, view, limit)
        if deep:
            crc = 0
            for start in range(0, limit, _CHUNK):
                crc = zlib.crc32(view[start : min(limit, start + _CHUNK)], crc)
            if has_trailer:
                recorded = int.from_bytes(view[size - 10 : size], "big")
                if crc != recorded:
                    raise CkptFormatError(
                        f"{path}: CRC-32 {crc} differs from the recorded {recorded} (data corrupted)"
                    )
    return FileCheck(path, count)


class _Reader:
    """Random access to a file by ``pread``, through a small window.

    The parser touches only the few bytes that frame each tensor and skips the contents, so a
    header walk reads kilobytes of a multi-gigabyte file. (Not ``mmap``: a file that shrinks
    while mapped kills the process with SIGBUS; here it is a ``CkptFormatError``.)
    """

    __slots__ = ("data", "fd", "path", "start")
    WINDOW = 64 * 1024

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.start = 0
        self.data = b""

    @overload
    def __getitem__(self, key: int) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> bytes: ...
    def __getitem__(self, key: int | slice) -> int | bytes:
        if isinstance(key, slice):
            begin, end = key.start, key.stop
            if self.start <= begin and end <= self.start + len(self.data):
                return self.data[begin - self.start : end - self.start]
            chunk = os.pread(self.fd, end - begin, begin)
            if len(chunk) != end - begin:
                raise CkptFormatError(f"{self.path}: file shrank while being read")
            return chunk
        offset = key - self.start
        if not 0 <= offset < len(self.data):
            self.data = os.pread(self.fd, self.WINDOW, key)
            self.start = key
            offset = 0
            if not self.data:
                raise CkptFormatError(f"{self.path}: file shrank while being read")
        return self.data[offset]


def _varint(view: _Reader, pos: int, end: int, path: str) -> tuple[int, int]:
    try:
        return read_varint(view, pos, end)
    except WireError as exc:
        raise CkptFormatError(f"{path}: {exc}") from None


def _skip(view: _Reader, pos: int, end: int, wire: int, path: str) -> int:
    if wire == 0:
        return _varint(view, pos, end, path)[1]
    if wire == 1:
        pos += 8
    elif wire == 5:
        pos += 4
    elif wire == 2:
        length, pos = _varint(view, pos, end, path)
        pos += length
    else:
        raise CkptFormatError(f"{path}: unsupported wire type {wire} at byte {pos} (not a checkpoint)")
    if pos > end:
        raise CkptFormatError(f"{path}: truncated (a field ends at byte {pos}, past {end})")
    return pos


def _delimited(view: _Reader, pos: int, end: int, path: str) -> tuple[int, int]:
    """The (start, end) of a length-delimited field whose length varint starts at ``pos``."""
    length, pos = _varint(view, pos, end, path)
    if pos + length > end:
        raise CkptFormatError(
            f"{path}: truncated (a {length}-byte field at byte {pos} ends past byte {end} of the stream)"
        )
    return pos, pos + length


def _walk_ckpt(path: str, view: _Reader, limit: int) -> int:
    totals: dict[str, tuple[tuple[int, ...], str, int]] = {}
    pos = 0
    values = 0
    while pos < limit:
        key, pos = _varint(view, pos, limit, path)
        if key != (1 << 3 | 2):
            raise CkptFormatError(f"{path}: unexpected field {key >> 3} (wire {key & 7}) at byte {pos}")
        start, end = _delimited(view, pos, limit, path)
        _read_value(path, view, start, end, totals)
        values += 1
        pos = end
    if values == 0:
        raise CkptFormatError(f"{path}: holds no parameters")
    for tag, (dims, dtype, total) in totals.items():
        itemsize = CKPT_DTYPE_SIZES.get(dtype.lower())
        if itemsize is None:
            continue  # "str" and types whose packing we do not know: the stream parsed, that is all
        expected = math.prod(dims) * itemsize
        if total != expected:
            raise CkptFormatError(
                f"{path}: parameter {tag!r} holds {total} bytes, {dtype}{list(dims)} needs {expected} "
                "(truncated or corrupt)"
            )
    return len(totals)


def _read_value(
    path: str, view: _Reader, pos: int, end: int, totals: dict[str, tuple[tuple[int, ...], str, int]]
) -> None:
    tag: str | None = None
    tensor: tuple[tuple[int, ...], str, int] | None = None
    has_map = False
    while pos < end:
        key, pos = _varint(view, pos, end, path)
        number, wire = key >> 3, key & 7
        if number == 1 and wire == 2:
            start, pos = _delimited(view, pos, end, path)
            try:
                tag = bytes(view[start:pos]).decode("utf-8")
            except UnicodeDecodeError:
                raise CkptFormatError(f"{path}: parameter name at byte {start} is not UTF-8") from None
        elif number == 2 and wire == 2:
            start, pos = _delimited(view, pos, end, path)
            tensor = _read_tensor(path, view, start, pos)
        elif number == 3 and wire == 2:
            start, pos = _delimited(view, pos, end, path)
            has_map = True
            inner = start
            while inner < pos:  # MapTensorProto: repeated TensorProto tensor = 1
                key2, inner = _varint(view, inner, pos, path)
                if key2 >> 3 == 1 and key2 & 7 == 2:
                    t_start, inner = _delimited(view, inner, pos, path)
                    dims, dtype, length = _read_tensor(path, view, t_start, inner)
                    itemsize = CKPT_DTYPE_SIZES.get(dtype.lower())
                    if itemsize is not None and length != math.prod(dims) * itemsize:
                        raise CkptFormatError(f"{path}: map tensor at byte {t_start} has a wrong byte count")
                else:
                    inner = _skip(view, inner, pos, key2 & 7, path)
        else:
            pos = _skip(view, pos, end, wire, path)
    if tag is None:
        raise CkptFormatError(f"{path}: a parameter without a name ends at byte {end}")
    if tensor is None:
        if not has_map:
            raise CkptFormatError(f"{path}: parameter {tag!r} holds no tensor")
        return
    dims, dtype, length = tensor
    previous = totals.get(tag)
    if previous is None:
        totals[tag] = tensor
    elif previous[0] != dims or previous[1] != dtype:
        raise CkptFormatError(f"{path}: slices of parameter {tag!r} disagree on shape or dtype")
    else:
        totals[tag] = (dims, dtype, previous[2] + length)


def _read_tensor(path: str, view: _Reader, pos: int, end: int) -> tuple[tuple[int, ...], str, int]:
    dims: list[int] = []
    dtype: str | None = None
    content: int | None = None
    while pos < end:
        key, pos = _varint(view, pos, end, path)
        number, wire = key >> 3, key & 7
        if number == 1 and wire == 0:
            value, pos = _varint(view, pos, end, path)
            dims.append(value)
        elif number == 1 and wire == 2:  # packed dims
            start, pos = _delimited(view, pos, end, path)
            while start < pos:
                value, start = _varint(view, start, pos, path)
                dims.append(value)
        elif number == 2 and wire == 2:
            start, pos = _delimited(view, pos, end, path)
            dtype = bytes(view[start:pos]).decode("utf-8", "replace")
        elif number == 3 and wire == 2:
            start, pos = _delimited(view, pos, end, path)
            content = pos - start
        else:
            pos = _skip(view, pos, end, wire, path)
    if any(d >= 1 << 63 for d in dims):
        raise CkptFormatError(f"{path}: negative dimension in tensor at byte {end}")
    if dtype is None or content is None:
        raise CkptFormatError(f"{path}: tensor ending at byte {end} lacks its type or its content")
    return tuple(dims), dtype, content


def _verify_many(paths: Sequence[str], deep: bool) -> dict[str, FileCheck | str]:
    """Verify ``paths``; each maps to its ``FileCheck`` or to the reason it failed.

    A permission error is not a property of the checkpoint but of whoever scans it; it is raised
    (as ``CheckpointError``) rather than turned into "corrupt", so that a scanner lacking access
    never concludes that no checkpoint exists.
    """

    def one(path: str) -> FileCheck | str:
        try:
            return verify_file(path, deep=deep)
        except PermissionError as exc:
            raise CheckpointError(
                f"cannot read {path}: {exc.strerror}; run the scan as a user that can read the checkpoints"
            ) from None
        except FileNotFoundError:
            return "vanished while being verified"
        except (ValueError, OSError) as exc:
            text = str(exc)
            return text[len(path) + 2 :] if text.startswith(path + ": ") else text

    # Verify serially while files are quick to read (a warm local cache: threads would only add
    # overhead); once the first files show real latency (network storage, cold disks), overlap
    # the waits with threads.
    results: dict[str, FileCheck | str] = {}
    started = time.perf_counter()
    for index, path in enumerate(paths):
        results[path] = one(path)
        slow = (time.perf_counter() - started) / _PROBE_FILES > _SLOW_FILE_SECONDS
        if index + 1 == _PROBE_FILES and len(paths) > _PROBE_FILES and slow:
            rest = paths[index + 1 :]
            with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(rest))) as pool:
                results.update(zip(rest, pool.map(one, rest), strict=True))
            break
    return results


def _which(ranks: Sequence[int], total: int) -> str:
    """``"rank 3"`` or ``"3 of 8 ranks (1, 4-5)"``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return f"{len(ranks)} of {total} ranks ({_ranges(ranks)})"


def _corrupt_reason(bad: dict[int, str], total: int) -> str:
    shown = sorted(bad)[:3]
    details = "; ".join(f"rank {rank}: {bad[rank]}" for rank in shown)
    more = f"; and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
    if len(bad) == 1:
        return f"corrupt on {details}"
    return f"corrupt on {_which(sorted(bad), total)}: {details}{more}"


# --------------------------------------------------------------------------------------------
# Directory listing


def _list_dir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such directory") from None
    except NotADirectoryError:
        raise CheckpointError(f"{path}: not a directory") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied; run the scan as a user that can read it") from None


def _list_names(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such directory") from None
    except NotADirectoryError:
        raise CheckpointError(f"{path}: not a directory") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied; run the scan as a user that can read it") from None


_TAIL_RE = re.compile(r"^(\d+)_(\d+)\.(safetensors|ckpt)$")


def _parse_tail(tail: str) -> tuple[int, int, Format] | None:
    """``"2_100.ckpt"`` -> ``(2, 100, "ckpt")``: the part of a checkpoint name after its last ``-``."""
    match = _TAIL_RE.match(tail)
    if match is None:
        return None
    return (
        int(match.group(1)),
        int(match.group(2)),
        "safetensors" if match.group(3) == "safetensors" else "ckpt",
    )


def _prefix_template(head: str, rank: int) -> str | None:
    """The prefix with ``{rank}`` for rank ``rank``'s number; None if it names another rank."""
    named = rank_of_name(head)
    if named is None:
        return _template(head, None)
    if named != rank:
        return None
    return _template(head, rank)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


@dataclass
class _Group:
    """All files of one (prefix, epoch, step, format) across ranks."""

    pattern: str
    prefix: str
    epoch: int
    step: int
    fmt: Format
    ranks: list[int] = field(default_factory=list)
    tmp: list[int] = field(default_factory=list)

    def order(self) -> tuple[int, int, int, str]:
        return (self.epoch, self.step, _run_number(self.prefix), self.pattern)


@dataclass
class _V1Listing:
    world: int
    groups: dict[str, _Group]
    rank_dirs: dict[int, str]
    metas: set[int]
    stray: list[str]
    notes: list[str]


def _list_v1(root: str, rank_dirs: dict[int, str], ranks: int | None) -> _V1Listing:
    notes: list[str] = []
    if ranks is None:
        world = max(rank_dirs) + 1
        notes.append(f"world size {world} inferred from the rank directories (pass ranks= to state it)")
    else:
        world = ranks
        extra = sorted(r for r in rank_dirs if r >= world)
        if extra:
            notes.append(f"rank directories beyond world size {world} ignored: rank_{_ranges(extra)}")
    absent = [r for r in range(world) if r not in rank_dirs]
    if absent:
        notes.append(f"rank directories missing: {_ranges(absent)}")
    by_key: dict[tuple[str, str], _Group] = {}
    tmps: dict[str, list[int]] = {}
    metas: set[int] = set()
    stray: list[str] = []
    # Names repeat the same few prefixes and (epoch, step) tails across ranks: parse each distinct
    # part once. This keeps a listing of 1,024 directories x 50 files to a few tens of milliseconds.
    tails: dict[str, tuple[int, int, Format] | None] = {}
    for rank in range(world):
        directory = rank_dirs.get(rank)
        if directory is None:
            continue
        heads: dict[str, str | None] = {}
        for name in _list_names(directory):
            cut = name.rfind("-")
            if cut <= 0:
                if name == META_FILE:
                    metas.add(rank)
                continue
            tail = name[cut + 1 :]
            if tail in tails:
                parsed = tails[tail]
            else:
                parsed = tails[tail] = _parse_tail(tail)
            if parsed is None:
                if name.endswith(".tmp"):
                    tmp_match = _TMP_RE.match(name)
                    if tmp_match:
                        tmps.setdefault(_template(tmp_match["stem"], rank_of_name(name)), []).append(rank)
                continue
            head = name[:cut]
            if head in heads:
                prefix = heads[head]
            else:
                prefix = heads[head] = _prefix_template(head, rank)
            if prefix is None:
                stray.append(f"rank_{rank}/{name}")
                continue
            group = by_key.get((prefix, tail))
            if group is None:
                epoch, step, fmt = parsed
                group = by_key[(prefix, tail)] = _Group(f"{prefix}-{tail}", prefix, epoch, step, fmt)
            group.ranks.append(rank)
    groups = {group.pattern: group for group in by_key.values()}
    for pattern, tmp_ranks in tmps.items():
        for fmt_name in FORMATS:
            group = groups.get(f"{pattern}.{fmt_name}")
            if group is not None:
                group.tmp.extend(tmp_ranks)
                break
        else:
            # A step some rank only started writing still deserves a line in the explanation.
            # (Its format is unknown: "safetensors" is a placeholder; any format filter lets it through.)
            named = parse_checkpoint_name(f"{pattern}.safetensors")
            if named is not None:
                groups[f"{pattern}.tmp"] = _Group(
                    f"{pattern}.tmp", named[0], named[1], named[2], "safetensors", [], tmp_ranks
                )
    if stray:
        notes.append(
            f"{_plural(len(stray), 'file')} in a rank directory not named for that rank, ignored "
            f"(e.g. {stray[0]})"
        )
    return _V1Listing(world, groups, rank_dirs, metas, stray, notes)


# --------------------------------------------------------------------------------------------
# Scanning


def scan(
    root: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    ranks: int | None = None,
    verify: Verify = "header",
    resume: str | None = None,
) -> ScanResult:
    """Scan ``root`` and choose what to resume from.

    ``fmt``: only consider this format (default: both). ``ranks``: the world size (default: from
    the rank directories). ``verify``: ``"header"`` or ``"deep"``. ``resume``: None or ``"Latest"``
    for the newest complete step; a file name to pin that step (MindFormers' ``resume_training``
    name, rank substituted per rank; v2: ``iteration_<n>`` or the iteration number).
    Raises ``CheckpointError`` for bad input; a damaged checkpoint is never an exception but a
    ``Rejection`` (or ``pinned_error``).
    """
    root_path = os.path.abspath(os.fspath(root))
    if fmt is not None and fmt not in FORMATS:
        raise CheckpointError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if ranks is not None and ranks < 1:
        raise CheckpointError(f"ranks must be at least 1, got {ranks}")
    if verify not in ("header", "deep"):
        raise CheckpointError(f"verify must be 'header' or 'deep', got {verify!r}")
    if resume is not None and (resume.strip() == "" or resume.strip().lower() == "latest"):
        resume = None
    deep = verify == "deep"
    entries = _list_dir(root_path)
    names = {entry.name for entry in entries}
    rank_dirs: dict[int, str] = {}
    iteration_dirs: dict[int, str] = {}
    for entry in entries:
        rank_match = _RANK_DIR_RE.match(entry.name)
        if rank_match and _is_dir(entry):
            rank_dirs[int(rank_match.group(1))] = entry.path
            continue
        iteration_match = _ITERATION_DIR_RE.match(entry.name)
        if iteration_match and _is_dir(entry):
            iteration_dirs[int(iteration_match.group(1))] = entry.path

    if PARAM_NAME_MAP in names or HYPER_PARAM in names:
        if fmt == "ckpt":
            raise CheckpointError(f"{root_path}: holds unified safetensors weights, not the ckpt format")
        return _scan_unified(root_path, names, ranks, deep, resume)
    if iteration_dirs or TRACKER_FILE in names:
        if fmt == "ckpt":
            raise CheckpointError(f"{root_path}: a Checkpoint 2.0 tree holds safetensors only, not ckpt")
        return _scan_v2(root_path, iteration_dirs, names, ranks, deep, resume, bool(rank_dirs))
    if rank_dirs:
        return _scan_v1(root_path, rank_dirs, fmt, ranks, deep, resume)
    visible = sorted(n for n in names if not n.startswith("."))
    if not visible:
        return _empty(root_path, fmt, ranks, resume, ())
    hint = ""
    if "checkpoint" in names:
        hint = " (it holds checkpoint/: scan that)"
    elif any(parse_checkpoint_name(n) for n in visible):
        hint = " (it holds checkpoint files: is it one rank's directory? scan its parent)"
    raise CheckpointError(
        f"{root_path}: not a checkpoint tree{hint}: expected rank_<r>/ directories, iteration_<n>/ "
        f"directories or unified weights ({PARAM_NAME_MAP}/{HYPER_PARAM}), found {', '.join(visible[:5])}"
        + (" …" if len(visible) > 5 else "")
    )


def _empty(
    root: str, fmt: str | None, ranks: int | None, resume: str | None, notes: Sequence[str]
) -> ScanResult:
    """Nothing was ever saved here: a first run starts from scratch (unless a file was pinned)."""
    pinned_error = f"resume file {resume}: nothing has been saved in {root} yet" if resume else None
    return ScanResult(
        root, "empty", _as_format(fmt), ranks or 0, None, (), (), resume, pinned_error, tuple(notes)
    )


def _scan_v1(
    root: str, rank_dirs: dict[int, str], fmt: str | None, ranks: int | None, deep: bool, resume: str | None
) -> ScanResult:
    listing = _list_v1(root, rank_dirs, ranks)
    world = listing.world
    if not listing.groups and not listing.metas and not listing.stray:
        # Rank directories without a single checkpoint or meta.json: created, never saved into.
        return _empty(root, fmt, world, resume, [*listing.notes, "rank directories hold no checkpoint yet"])
    all_ranks = range(world)
    ordered = sorted(
        (g for g in listing.groups.values() if fmt is None or g.fmt == fmt or not g.ranks),
        key=_Group.order,
        reverse=True,
    )
    seen_formats = {g.fmt for g in ordered if g.ranks}
    if resume is not None:
        return _scan_pinned(root, listing, ordered, fmt, seen_formats, deep, resume)

    rejected: list[Rejection] = []
    complete: list[tuple[Any, int, str]] = []
    candidates: list[Candidate] = []
    choice: Choice | None = None
    for group in ordered:
        present = set(group.ranks)
        missing = tuple(r for r in all_ranks if r not in present) if len(present) < world else ()
        tmp = tuple(sorted(set(group.tmp) - present))
        if choice is not None:
            status: Literal["complete", "incomplete"] = "incomplete" if missing else "complete"
            if not missing:
                complete.append((group.epoch, group.step, group.prefix))
            candidates.append(_candidate(group, len(present), missing, tmp, status))
            continue
        if missing:
            reason = f"missing on {_which(missing, world)}"
            if tmp:
                reason += f"; only an unfinished .tmp on {_ranges(tmp)}"
            rejected.append(Rejection(group.epoch, group.step, group.prefix, reason, missing))
            candidates.append(_candidate(group, len(present), missing, tmp, "rejected"))
            continue
        files = {
            rank: os.path.join(listing.rank_dirs[rank], group.pattern.format(rank=rank)) for rank in all_ranks
        }
        checks = _verify_many(list(files.values()), deep)
        bad = {rank: result for rank, path in files.items() if isinstance(result := checks[path], str)}
        if bad:
            rejected.append(
                Rejection(
                    group.epoch, group.step, group.prefix, _corrupt_reason(bad, world), tuple(sorted(bad))
                )
            )
            candidates.append(_candidate(group, len(present), (), tmp, "rejected", tuple(sorted(bad))))
            continue
        redundancy = any(isinstance(c, FileCheck) and c.remove_redundancy for c in checks.values())
        choice = Choice(
            "sharded",
            group.epoch,
            group.step,
            root,
            group.pattern,
            files,
            redundancy,
            group.fmt,
            group.prefix,
        )
        complete.append((group.epoch, group.step, group.prefix))
        candidates.append(_candidate(group, world, (), tmp, "chosen"))

    notes = listing.notes + _meta_notes(listing, choice)
    result_format: Format | None = choice.format if choice else _as_format(fmt)
    if result_format is None and len(seen_formats) == 1:
        result_format = next(iter(seen_formats))
    return ScanResult(
        root,
        "v1",
        result_format,
        world,
        choice,
        tuple(rejected),
        tuple(complete),
        None,
        None,
        tuple(notes),
        tuple(candidates),
    )


def _candidate(
    group: _Group,
    present: int,
    missing: tuple[int, ...],
    tmp: tuple[int, ...],
    status: Literal["chosen", "rejected", "complete", "incomplete"],
    corrupt: tuple[int, ...] = (),
) -> Candidate:
    return Candidate(
        group.epoch,
        group.step,
        group.prefix,
        group.fmt,
        group.pattern,
        present,
        missing,
        tmp,
        status,
        corrupt,
    )


def _scan_pinned(
    root: str,
    listing: _V1Listing,
    ordered: list[_Group],
    fmt: str | None,
    seen_formats: set[Format],
    deep: bool,
    resume: str,
) -> ScanResult:
    """Resume from the step ``resume`` names, exactly as MindFormers resolves ``resume_training: <name>``."""
    world = listing.world
    name = os.path.basename(resume.strip())
    if fmt is None:
        named = [f for f in FORMATS if name.endswith(f".{f}")]
        if named:
            fmt = named[0]
        elif len(seen_formats) == 1:
            fmt = next(iter(seen_formats))
        else:
            raise CheckpointError(f"cannot tell the format of {resume!r}: give the format explicitly")
    if not name.endswith(f".{fmt}"):
        name = f"{name}.{fmt}"
    if not re.match(r"^[^/]+-\d+_\d+\." + fmt + r"$", name):
        raise CheckpointError(
            f"{resume!r} is not a checkpoint name of the form <prefix>-<epoch>_<step>.{fmt}"
        )
    parsed = parse_checkpoint_name(name)
    assert parsed is not None  # the pattern above is stricter than _NAME_RE
    _, epoch, step, file_format = parsed
    original_rank = rank_of_name(name)
    if original_rank is None:
        raise CheckpointError(f"{resume!r} holds no _rank_<n>, so it cannot be mapped to each rank's file")
    pattern = _template(name, original_rank)
    prefix = pattern[: pattern.rfind("-")]
    files: dict[int, str] = {}
    missing: list[int] = []
    for rank in range(world):
        rank_name = rank_file_name(name, rank)
        directory = listing.rank_dirs.get(rank)
        if directory is None or not os.path.isfile(os.path.join(directory, rank_name)):
            missing.append(rank)
        else:
            files[rank] = os.path.join(directory, rank_name)
    checks = _verify_many(list(files.values()), deep)
    bad = {rank: result for rank, path in files.items() if isinstance(result := checks[path], str)}
    problems = []
    if missing:
        problems.append(f"missing on {_which(missing, world)}")
    if bad:
        problems.append(_corrupt_reason(bad, world))
    complete = tuple(
        (g.epoch, g.step, g.prefix)
        for g in ordered
        if len(set(g.ranks)) == world and not g.pattern.endswith(".tmp")
    )
    choice: Choice | None = None
    pinned_error: str | None = None
    rejected: tuple[Rejection, ...] = ()
    if problems:
        rank0 = rank_file_name(name, 0)
        shown = name if rank0 == name else f"{name} (rank 0: {rank0})"
        pinned_error = f"resume file {shown}: " + "; ".join(problems)
        at_fault = tuple(sorted([*missing, *bad]))
        rejected = (Rejection(epoch, step, prefix, "; ".join(problems), at_fault),)
    else:
        redundancy = any(isinstance(c, FileCheck) and c.remove_redundancy for c in checks.values())
        choice = Choice("sharded", epoch, step, root, pattern, files, redundancy, file_format, prefix)
    return ScanResult(
        root, "v1", file_format, world, choice, rejected, complete, resume, pinned_error, tuple(listing.notes)
    )


def _read_json(path: str) -> Any:
    """Parsed JSON, or raises ``ValueError`` saying why not (``PermissionError`` passes through)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except PermissionError:
        raise
    except FileNotFoundError:
        raise ValueError("missing") from None
    except OSError as exc:
        raise ValueError(f"unreadable ({exc.strerror})") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


def _meta_notes(listing: _V1Listing, choice: Choice | None) -> list[str]:
    """What each rank's meta.json says, compared with what is on disk (never used to choose)."""
    world = listing.world
    missing = [r for r in range(world) if r not in listing.metas]
    malformed: list[int] = []
    dangling: list[int] = []
    ahead: list[int] = []
    behind: list[int] = []

    holders: dict[str, set[int]] = {}

    def exists(rank: int, name: str) -> bool:
        pattern = _template(name, rank_of_name(name))
        if pattern not in holders:
            group = listing.groups.get(pattern)
            holders[pattern] = set(group.ranks) if group else set()
        return rank in holders[pattern]

    for rank in sorted(listing.metas):
        try:
            meta = _read_json(os.path.join(listing.rank_dirs[rank], META_FILE))
        except PermissionError:
            raise CheckpointError(f"cannot read rank_{rank}/{META_FILE}: permission denied") from None
        except ValueError:
            malformed.append(rank)
            continue
        if not isinstance(meta, dict):
            malformed.append(rank)
            continue
        epoch, step, last = meta.get("last_epoch"), meta.get("last_step"), meta.get("last_ckpt_file")
        if not (isinstance(epoch, int) and isinstance(step, int) and isinstance(last, str)):
            malformed.append(rank)
            continue
        if not exists(rank, last):
            dangling.append(rank)
        if choice is not None and choice.epoch is not None and choice.step is not None:
            if (epoch, step) > (choice.epoch, choice.step):
                ahead.append(rank)
            elif (epoch, step) < (choice.epoch, choice.step):
                behind.append(rank)
    notes = []
    if missing and len(missing) == world:
        notes.append("meta.json: absent on every rank")
    elif missing:
        notes.append(f"meta.json: absent on ranks {_ranges(missing)}")
    if malformed:
        notes.append(f"meta.json: malformed on ranks {_ranges(malformed)}")
    if dangling:
        notes.append(f"meta.json: names a file that does not exist on ranks {_ranges(dangling)}")
    if ahead:
        notes.append(f"meta.json: ahead of the chosen step on ranks {_ranges(ahead)}")
    if behind:
        notes.append(f"meta.json: behind the chosen step on ranks {_ranges(behind)} (stale)")
    return notes


# --------------------------------------------------------------------------------------------
# Checkpoint 2.0


def _scan_v2(
    root: str,
    iteration_dirs: dict[int, str],
    names: set[str],
    ranks: int | None,
    deep: bool,
    resume: str | None,
    has_rank_dirs: bool,
) -> ScanResult:
    notes: list[str] = []
    if has_rank_dirs:
        notes.append("rank_<r>/ directories ignored: this is a Checkpoint 2.0 tree (iteration_<n>/)")
    tracked: int | None = None
    if TRACKER_FILE in names:
        try:
            with open(os.path.join(root, TRACKER_FILE), encoding="utf-8") as handle:
                tracked = int(handle.read().strip())
        except PermissionError:
            raise CheckpointError(
                f"cannot read {os.path.join(root, TRACKER_FILE)}: permission denied"
            ) from None
        except (OSError, ValueError, UnicodeDecodeError):
            notes.append(f"{TRACKER_FILE}: does not hold an iteration number")
        else:
            if tracked not in iteration_dirs:
                notes.append(f"{TRACKER_FILE}: names iteration {tracked}, whose directory does not exist")
    # What each iteration holds, listed once: an iteration is judged against the kinds of file
    # the earlier iterations of the same world size hold (what the job saves).
    listings = {iteration: _list_names(directory) for iteration, directory in iteration_dirs.items()}
    saved = {iteration: _saved_kinds(names) for iteration, names in listings.items()}
    order = sorted(iteration_dirs, reverse=True)
    if resume is not None:
        wanted = resume.strip()
        match = re.fullmatch(r"(?:iteration_)?(\d+)", wanted)
        if match is None:
            raise CheckpointError(f"{resume!r}: a Checkpoint 2.0 tree is pinned by iteration_<n> or <n>")
        order = [int(match.group(1))]
    rejected: list[Rejection] = []
    complete: list[tuple[Any, int, str]] = []
    choice: Choice | None = None
    world_seen = ranks or 0
    pinned_error: str | None = None
    for iteration in order:
        directory = iteration_dirs.get(iteration)
        if directory is None:
            pinned_error = f"iteration {iteration}: no directory iteration_{iteration:08d}"
            break
        world, _ = saved[iteration]
        earlier: set[str] = set()
        for other, (other_world, kinds) in saved.items():
            if other < iteration and other_world == world:
                earlier |= kinds
        outcome = _check_iteration(directory, set(listings[iteration]), ranks, deep, earlier)
        if isinstance(outcome, str):
            if resume is not None:
                pinned_error = f"iteration {iteration}: {outcome}"
            else:
                rejected.append(Rejection(None, iteration, None, outcome))
            continue
        choice, world_seen = outcome
        complete.append((None, iteration, choice.prefix or ""))
        break
    if choice is not None and tracked is not None and choice.step is not None and choice.step > tracked:
        notes.append(
            f"iteration {choice.step} is newer than {TRACKER_FILE} ({tracked}); all of its files verified"
        )
    return ScanResult(
        root,
        "v2",
        "safetensors",
        world_seen,
        choice,
        tuple(rejected),
        tuple(complete),
        resume,
        pinned_error,
        tuple(notes),
    )


@dataclass(frozen=True)
class _Problem:
    """Why a member file of an iteration cannot be used."""

    reason: str


def _read_iteration_json(directory: str, name: str) -> Any:
    """A JSON member of an iteration directory, or a ``_Problem`` saying why it is unusable.

    Permission errors are not a property of the checkpoint: they stop the scan
    (``CheckpointError``) instead of rejecting the iteration."""
    try:
        return _read_json(os.path.join(directory, name))
    except PermissionError:
        raise CheckpointError(f"cannot read {directory}/{name}: permission denied") from None
    except ValueError as exc:
        return _Problem(f"{name} {exc}")


#: The kinds of shard file an iteration holds, as its names spell them, and what they hold.
_SHARD_KINDS = {"model": "model shards", "opt": "optimizer shards"}
_METADATA = "metadata.json"


def _saved_kinds(names: Iterable[str]) -> tuple[int | None, frozenset[str]]:
    """An iteration's world size (from its shard names; None without any) and the kinds of file it
    holds: ``model``, ``opt`` (shards) and ``metadata.json``."""
    kinds: set[str] = set()
    worlds: set[int] = set()
    for name in names:
        if name == _METADATA:
            kinds.add(name)
            continue
        match = _V2_FILE_RE.match(name)
        if match:
            kinds.add(match["kind"])
            worlds.add(int(match["world"]))
    return (max(worlds) if worlds else None), frozenset(kinds)


def _unfinished(kind: str, ranks: Sequence[int], world: int, why: str) -> str:
    """Why an iteration lacking some shards of ``kind`` cannot be resumed, in one sentence."""
    where = "every rank" if len(ranks) == world else _which(ranks, world)
    consequence = "; resuming here would drop the optimizer state" if kind == "opt" else ""
    return f"{_SHARD_KINDS[kind]} missing on {where} ({why}): the save did not finish{consequence}"


def _check_iteration(
    directory: str, names: set[str], ranks: int | None, deep: bool, earlier: set[str]
) -> tuple[Choice, int] | str:
    """The iteration's ``Choice`` and world size, or why it cannot be resumed from.

    ``earlier``: the kinds of file (``_saved_kinds``) that earlier iterations of the same world size
    hold. MindFormers writes ``common.json`` (and ``metadata.json``) right after *starting* the
    model and optimizer writes, which run in the background with asynchronous saving, so an
    iteration can look finished while a kind of file the job saves is still missing: it is
    incomplete when ``metadata.json`` names a file that is absent, or when it lacks a kind of file
    the earlier iterations have.
    """
    if "common.json" not in names:
        return "common.json missing (the step counters would be lost)"
    common = _read_iteration_json(directory, "common.json")
    if isinstance(common, _Problem):
        return common.reason
    if not isinstance(common, dict):
        return "common.json is not a JSON object"
    files: set[str]  # what the iteration consists of: what metadata.json names, else every shard
    if _METADATA in names:
        metadata = _read_iteration_json(directory, _METADATA)
        if isinstance(metadata, _Problem):
            return metadata.reason
        storage = metadata.get("storage_data") if isinstance(metadata, dict) else None
        if not isinstance(storage, dict):
            return "metadata.json has no storage_data object"
        files = set()
        for entries in storage.values():
            for item in entries if isinstance(entries, list) else [entries]:
                file_name = item.get("file_name") if isinstance(item, dict) else None
                if not isinstance(file_name, str) or "/" in file_name or not file_name:
                    return "metadata.json storage_data holds an entry without a plain file_name"
                files.add(file_name)
    else:
        files = {n for n in names if n.endswith(".safetensors")}
        if not files:
            return "no metadata.json and no safetensors files"
    # Its shards by kind and rank. (Files metadata.json does not name, e.g. those of an earlier
    # save of this iteration by another world size, are not part of it.)
    present: dict[str, dict[int, str]] = {kind: {} for kind in _SHARD_KINDS}
    worlds: set[int] = set()
    prefixes: set[str] = set()
    for name in files:
        match = _V2_FILE_RE.match(name)
        if match:
            present[match["kind"]][int(match["rank"])] = name
            worlds.add(int(match["world"]))
            prefixes.add(match["prefix"])
    absent = sorted(f for f in files if f not in names)
    if absent:
        return _named_but_absent(absent, worlds)
    world = max(worlds) if worlds else (ranks or 1)
    if len(worlds) > 1:
        return f"shard names disagree on the world size: {sorted(worlds)}"
    # The optimizer first: a loader that finds the weights would silently start it from zero.
    for kind in sorted(_SHARD_KINDS, key=lambda k: k != "opt"):
        if kind in earlier and not present[kind]:
            return _unfinished(kind, range(world), world, "earlier iterations have them")
    if _METADATA in earlier and _METADATA not in names:
        return (
            "metadata.json missing, though earlier iterations of this world size have it: the save "
            "did not finish (MindFormers writes it after common.json)"
        )
    if _METADATA not in names and worlds:
        for kind, got in present.items():
            if got:
                absent_ranks = [r for r in range(world) if r not in got]
                if absent_ranks:
                    return _unfinished(kind, absent_ranks, world, "no metadata.json names them")
    paths = sorted(os.path.join(directory, f) for f in files)
    checks = _verify_many(paths, deep)
    bad = {path: reason for path, reason in checks.items() if isinstance(reason, str)}
    if bad:
        first = sorted(bad)[0]
        return f"{_plural(len(bad), 'corrupt file')}: {os.path.basename(first)}: {bad[first]}"
    prefix = next(iter(prefixes)) if len(prefixes) == 1 else None
    model = present["model"]
    pattern = None
    if model and prefix is not None:
        lead = f"{prefix}-" if prefix else ""
        pattern = _template(lead, None) + "model-{rank:07d}-" + f"{world:07d}.safetensors"
    redundancy = any(isinstance(c, FileCheck) and c.remove_redundancy for c in checks.values())
    iteration_match = _ITERATION_DIR_RE.match(os.path.basename(directory))
    assert iteration_match is not None
    choice = Choice(
        "iteration",
        None,
        int(iteration_match.group(1)),
        directory,
        pattern,
        {rank: os.path.join(directory, name) for rank, name in sorted(model.items())},
        redundancy,
        "safetensors",
        prefix,
        tuple(paths),
    )
    return choice, world


def _named_but_absent(absent: Sequence[str], worlds: set[int]) -> str:
    """The files ``metadata.json`` names that are missing, as shard kinds and ranks when they are shards."""
    by_kind: dict[str, dict[int, str]] = {}
    other: list[str] = []
    for name in absent:
        match = _V2_FILE_RE.match(name)
        if match:
            by_kind.setdefault(match["kind"], {})[int(match["rank"])] = name
        else:
            other.append(name)
    world = max(worlds) if worlds else 1
    # The optimizer first: a loader that finds the weights would silently start it from zero.
    reasons = [
        _unfinished(kind, sorted(ranks), world, f"metadata.json names them, e.g. {ranks[min(ranks)]}")
        for kind, ranks in sorted(by_kind.items(), key=lambda item: item[0] != "opt")
    ]
    if other:
        reasons.append(f"metadata.json names {_plural(len(other), 'missing file')}: {', '.join(other[:3])}")
    return "; ".join(reasons)


# --------------------------------------------------------------------------------------------
# Unified weights


def _scan_unified(
    root: str, names: set[str], ranks: int | None, deep: bool, resume: str | None
) -> ScanResult:
    problem: str | None = None
    parts: set[str] = set()
    if PARAM_NAME_MAP in names:
        try:
            mapping = _read_json(os.path.join(root, PARAM_NAME_MAP))
        except PermissionError:
            raise CheckpointError(
                f"cannot read {os.path.join(root, PARAM_NAME_MAP)}: permission denied"
            ) from None
        except ValueError as exc:
            problem = f"{PARAM_NAME_MAP} {exc}"
        else:
            weight_map = mapping.get("weight_map") if isinstance(mapping, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                problem = f"{PARAM_NAME_MAP} has no weight_map of parameter -> file"
            else:
                parts = set(weight_map.values())
                absent = sorted(p for p in parts if p not in names)
                if absent:
                    listed = ", ".join(absent[:3])
                    problem = f"{PARAM_NAME_MAP} names {_plural(len(absent), 'missing part')}: {listed}"
    else:
        parts = {n for n in names if n.endswith(".safetensors")}
    if HYPER_PARAM in names:
        parts.add(HYPER_PARAM)
    choice: Choice | None = None
    rejected: tuple[Rejection, ...] = ()
    paths = sorted(os.path.join(root, p) for p in parts)
    if problem is None:
        checks = _verify_many(paths, deep)
        bad = sorted(path for path, c in checks.items() if isinstance(c, str))
        if bad:
            problem = f"{_plural(len(bad), 'corrupt part')}: {os.path.basename(bad[0])}: {checks[bad[0]]}"
    if problem is None:
        choice = Choice("unified", None, None, root, None, {}, False, "safetensors", None, tuple(paths))
    else:
        rejected = (Rejection(None, None, None, problem),)
    return ScanResult(root, "unified", "safetensors", ranks or 0, choice, rejected, (), resume, None)
