"""The protobuf wire format's varint, shared by the two hand-written decoders: MindSpore
``.ckpt`` streams (``checkpoints``) and strategy files (``strategy``)."""

from __future__ import annotations

from typing import Protocol


class WireError(ValueError):
    """Bytes that are not a valid varint; callers re-raise it as their own error type."""


class ByteSource(Protocol):
    """Anything indexable by position giving a byte: ``bytes``, ``memoryview``, a windowed reader."""

    def __getitem__(self, index: int, /) -> int: ...


def read_varint(data: ByteSource, pos: int, end: int) -> tuple[int, int]:
    """The varint starting at ``pos`` (which must end before ``end``) and the position after it."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError(f"truncated varint (the data ends at byte {end})")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError(f"malformed varint at byte {pos} (longer than 10 bytes)")
