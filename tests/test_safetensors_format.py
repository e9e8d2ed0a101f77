"""The safetensors header reader accepts real files and names what is wrong with damaged ones."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from relaunch.safetensors_format import SafetensorsError, read_header


def _write(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_real_file_parses_with_absolute_offsets(tmp_path: Path) -> None:
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.int64)}
    path = tmp_path / "x.safetensors"
    save_file(arrays, str(path), metadata={"format": "ms"})

    header = read_header(path)

    assert header.metadata == {"format": "ms"}
    assert set(header.tensors) == {"w", "b"}
    w = header.tensors["w"]
    assert (w.dtype, w.shape, w.nbytes) == ("F32", (3, 4), 48)
    with open(path, "rb") as handle:
        handle.seek(w.begin)
        assert np.frombuffer(handle.read(w.nbytes), dtype=np.float32).tolist() == list(range(12))


def test_truncated_file_is_rejected_naming_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"w": np.zeros((64, 64), dtype=np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(SafetensorsError, match=r"'w'.*truncated"):
        read_header(path)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "expected 8"),
        ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ],
)
def test_malformed_headers_are_rejected(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = _write(tmp_path / "x.safetensors", header, data)
    with pytest.raises(SafetensorsError, match=message):
        read_header(path)


def test_empty_and_garbage_files_are_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(SafetensorsError, match="too short"):
        read_header(empty)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        read_header(garbage)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(SafetensorsError, match="does not fit"):
        read_header(huge)
