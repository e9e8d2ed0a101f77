"""The shared varint decoder: values, positions, and the two ways bytes can be wrong."""

from __future__ import annotations

import pytest

from relaunch.protowire import WireError, read_varint


@pytest.mark.parametrize(
    ("raw", "value"),
    [(b"\x00", 0), (b"\x01", 1), (b"\x7f", 127), (b"\x80\x01", 128), (b"\xac\x02", 300)],
)
def test_reads_a_varint_and_returns_the_next_position(raw: bytes, value: int) -> None:
    assert read_varint(b"\xff" + raw + b"\x05", 1, len(raw) + 2) == (value, 1 + len(raw))


def test_largest_64_bit_value_fits_in_ten_bytes() -> None:
    raw = b"\xff" * 9 + b"\x01"
    assert read_varint(raw, 0, len(raw)) == ((1 << 64) - 1, 10)


def test_truncated_and_overlong_varints_are_refused() -> None:
    with pytest.raises(WireError, match="truncated varint"):
        read_varint(b"\x80\x80", 0, 2)
    with pytest.raises(WireError, match="truncated varint"):
        read_varint(b"\x80\x01", 0, 1)  # the caller's end cuts it, not the buffer
    with pytest.raises(WireError, match="longer than 10 bytes"):
        read_varint(b"\xff" * 11, 0, 11)
