"""The protobuf wire format's varint and fields, shared by the hand-written codecs: MindSpore
``.ckpt`` streams (``checkpoints``, read only) and strategy files (``strategy``, read and written)."""

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


def encode_varint(value: int) -> bytes:
    """``value`` as a varint; negative (int32/int64) values are sign-extended to 10 bytes."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def int_field(number: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return encode_varint(number << 3) + encode_varint(value)


def bytes_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): a string, bytes or a nested message."""
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload
