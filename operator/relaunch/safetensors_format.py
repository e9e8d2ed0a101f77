"""The safetensors container: parse and check a file's header without reading its tensors.

Owns the byte-level facts shared by checkpoint scanning (``checkpoints``) and conversion
(``convert``): an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the header)
plus an optional ``__metadata__`` string map, then the tensor bytes.

Why not the ``safetensors`` library here: its readers hand out whole tensors (``get_tensor``,
``get_slice`` through a framework), and its writers (``save_file``, ``serialize_file``) take
every tensor in memory at once and write the file in place. Scanning must check a file's
header without reading its tensors; conversion must copy byte ranges of memory-mapped sources
straight into output files created at their final size (bounded memory whatever the size of a
checkpoint, bf16 and fp8 copied as raw bytes with no framework dtype), hashing each chunk as it
passes, and publish them only after reading them back. So this module keeps the container's
byte layout, and the tests check its files with the ``safetensors`` library as an independent
reader and writer (``tests/conv_helpers.py``, ``tests/trees.py``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from itertools import pairwise

#: Bytes per element of every dtype a MindSpore checkpoint can hold.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

#: A header larger than this is not a real checkpoint header (the reference reader uses 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file is not a well-formed safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed and checked header."""

    path: str
    file_size: int
    data_start: int
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse ``path``'s header and check that every tensor fits inside the file.

    Checks: the length prefix fits the file; the header is a JSON object; every tensor has a
    known dtype, a shape of non-negative ints and offsets whose byte count equals
    ``prod(shape) * itemsize``; every tensor ends inside the file; tensors do not overlap.
    Raises ``SafetensorsError`` naming the first problem, ``OSError`` if the file is unreadable.
    """
    path = os.fspath(path)
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: {file_size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise SafetensorsError(
                f"{path}: header length {header_len} does not fit a file of {file_size} bytes "
                "(truncated or not safetensors)"
            )
        raw = handle.read(header_len)
    return parse_header(path, raw, file_size)


def parse_header(path: str, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Check an already-read header (``raw`` = the JSON bytes) against the file's size."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise SafetensorsError(f"{path}: header is {type(document).__name__}, expected a JSON object")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata_raw = document.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in document.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, end_a, name_a), (begin_b, _, name_b) in pairwise(spans):
        if begin_b < end_a:
            raise SafetensorsError(f"{path}: tensors {name_a!r} and {name_b!r} overlap")
    return SafetensorsHeader(path, file_size, data_start, dict(metadata_raw), tensors)


def _tensor_info(path: str, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{path}: tensor {name!r}: entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise SafetensorsError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SafetensorsError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsError(f"{path}: tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise SafetensorsError(
            f"{path}: tensor {name!r}: {end - begin} bytes for {dtype}{shape}, expected {expected}"
        )
    if end > data_size:
        raise SafetensorsError(
            f"{path}: tensor {name!r} ends at byte {data_start + end} of a {data_start + data_size}-byte "
            "file (truncated)"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


# --------------------------------------------------------------------------------------------
# Streaming writer: the header is computed from the shapes alone, so a file can be written
# front to back (or by several processes at known offsets) without holding any tensor in memory.


@dataclass(frozen=True)
class FilePlan:
    """A safetensors file decided before any tensor byte exists."""

    header: bytes  # the 8-byte length prefix plus the padded JSON header
    tensors: dict[str, TensorInfo]  # absolute offsets, in file order
    file_size: int


def plan_file(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> FilePlan:
    """Lay out tensors ``(name, dtype, shape)`` in the given order after a header.

    The JSON header is padded with spaces to a multiple of 8 bytes, as the reference writer
    does, so that every tensor starts 8-byte aligned relative to the data section.
    """
    document: dict[str, object] = {}
    if metadata:
        document["__metadata__"] = dict(metadata)
    offset = 0
    relative: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for name, dtype, shape in entries:
        if dtype not in DTYPE_SIZES:
            raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if name in document or name == "__metadata__":
            raise SafetensorsError(f"tensor {name!r} appears twice")
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        document[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        relative.append((name, dtype, tuple(shape), offset, offset + size))
        offset += size
    raw = json.dumps(document, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    tensors = {
        name: TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        for name, dtype, shape, begin, end in relative
    }
    return FilePlan(struct.pack("<Q", len(raw)) + raw, tensors, data_start + offset)


class SafetensorsWriter:
    """Write a planned file front to back: the header first, then each tensor's bytes in order.

    ``write(chunk)`` may be called any number of times per tensor; the writer checks that the
    bytes arrive in plan order and that nothing is missing at ``close()``.
    """

    def __init__(self, path: str | os.PathLike[str], plan: FilePlan) -> None:
        self.path = os.fspath(path)
        self.plan = plan
        self._handle = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(plan.header)
        self._position = len(plan.header)

    def write(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        if self._position + view.nbytes > self.plan.file_size:
            raise SafetensorsError(f"{self.path}: more bytes than planned ({self.plan.file_size})")
        self._handle.write(view)
        self._position += view.nbytes

    def close(self, *, fsync: bool = True) -> None:
        try:
            if self._position != self.plan.file_size:
                raise SafetensorsError(
                    f"{self.path}: {self._position} bytes written, planned {self.plan.file_size}"
                )
            self._handle.flush()
            if fsync:
                os.fsync(self._handle.fileno())
        finally:
            self._handle.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._handle.close()
