"""Checkpoint discovery: the newest step complete and intact on every rank, and why newer ones are not.

Trees are real files on disk (``trees``); MindFormers' own choice comes from ``mindformers_oracle``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import trees
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mindformers_oracle import MindFormersRefuses, pinned_files, resume_files

from relaunch import checkpoints
from relaunch.checkpoints import (
    CheckpointError,
    CkptFormatError,
    parse_checkpoint_name,
    rank_file_name,
    scan,
    verify_ckpt,
    verify_safetensors,
)
from relaunch.safetensors_format import SafetensorsError

# ---- names --------------------------------------------------------------------------------


def test_checkpoint_names_split_at_the_last_dash() -> None:
    assert parse_checkpoint_name("qwen3-8b_rank_3_1-2_100.safetensors") == (
        "qwen3-8b_rank_3_1",
        2,
        100,
        "safetensors",
    )
    assert parse_checkpoint_name("x_rank_0-1_2.ckpt") == ("x_rank_0", 1, 2, "ckpt")
    for name in ("x_rank_0-1_2.tmp", "x_rank_0-1.safetensors", "meta.json", "x_rank_0-1_2.safetensors.tmp"):
        assert parse_checkpoint_name(name) is None


def test_rank_substitution_replaces_every_occurrence_of_the_first_rank_like_mindformers() -> None:
    assert rank_file_name("llama_rank_0-3_2.ckpt", 5) == "llama_rank_5-3_2.ckpt"
    assert rank_file_name("llama_rank_12_1-3_2.ckpt", 0) == "llama_rank_0_1-3_2.ckpt"
    # MindFormers replaces the text "_rank_1" everywhere, even inside a longer number.
    assert rank_file_name("a_rank_1_rank_12-1_1.ckpt", 3) == "a_rank_3_rank_32-1_1.ckpt"
    assert rank_file_name("a_rank_1-1_1.ckpt", 3) == pinned_files("a_rank_1-1_1", "ckpt", 4)[3]
    with pytest.raises(CheckpointError, match="_rank_"):
        rank_file_name("model-1_1.ckpt", 0)


# ---- file verification --------------------------------------------------------------------


def test_every_truncation_of_a_safetensors_file_is_caught(tmp_path: Path) -> None:
    path = trees.write_safetensors(tmp_path / "a.safetensors")
    data = Path(path).read_bytes()
    verify_safetensors(path)
    cut = tmp_path / "cut.safetensors"
    for keep in range(len(data)):
        cut.write_bytes(data[:keep])
        with pytest.raises(SafetensorsError):
            verify_safetensors(str(cut))


def _message_boundaries(data: bytes) -> set[int]:
    """Offsets at which a ``.ckpt`` stream ends exactly after a whole ``Value``."""
    bounds = set()
    pos = 0
    while pos < len(data) and data[pos] == 0x0A:
        length, shift, pos = 0, 0, pos + 1
        while True:
            byte = data[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        pos += length
        bounds.add(pos)
    return bounds


@pytest.mark.parametrize("slice_bytes", [None, 8])
def test_ckpt_truncation_is_caught_unless_it_falls_between_whole_parameters(
    tmp_path: Path, slice_bytes: int | None
) -> None:
    tensors = trees.small_tensors(3)
    path = trees.write_ckpt(tmp_path / "a.ckpt", tensors, slice_bytes=slice_bytes)
    data = Path(path).read_bytes()
    assert verify_ckpt(path).tensors == len(tensors)
    # A parameter cut into slices is only whole after its last slice.
    whole = set()
    pos = 0
    for name, array in tensors.items():
        raw = array.tobytes()
        step = slice_bytes or len(raw)
        for start in range(0, len(raw), step):
            pos += len(
                trees.ckpt_message(name, array.shape, trees.ms_dtype(array), raw[start : start + step])
            )
        whole.add(pos)
    assert whole <= _message_boundaries(data)
    cut = tmp_path / "cut.ckpt"
    for keep in range(len(data)):
        cut.write_bytes(data[:keep])
        if keep in whole:
            verify_ckpt(str(cut))  # indistinguishable from a checkpoint holding fewer parameters
        else:
            with pytest.raises(CkptFormatError):
                verify_ckpt(str(cut))


def test_ckpt_with_wrong_byte_count_or_garbage_is_rejected(tmp_path: Path) -> None:
    short = tmp_path / "short.ckpt"
    short.write_bytes(trees.ckpt_message("w", [2, 2], "Float32", b"\0" * 12))
    with pytest.raises(CkptFormatError, match="holds 12 bytes"):
        verify_ckpt(str(short))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 not a checkpoint at all")
    with pytest.raises(CkptFormatError):
        verify_ckpt(str(garbage))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CkptFormatError, match="empty"):
        verify_ckpt(str(empty))


def test_ckpt_string_values_and_unknown_types_are_not_size_checked(tmp_path: Path) -> None:
    path = tmp_path / "s.ckpt"
    path.write_bytes(
        trees.ckpt_message("note", [0], "str", "hello".encode("utf-32-le"))
        + trees.ckpt_message("q", [4], "QInt4x2", b"\x12\x34")
        + trees.ckpt_message("bf", [2], "BFloat16", b"\0" * 4)
    )
    assert verify_ckpt(str(path)).tensors == 3


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_deep_verification_checks_the_crc_that_header_verification_cannot_see(
    tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / f"a.{fmt}"
    trees.write_checkpoint(path, seed=4, crc=True)
    checkpoints.verify_file(str(path), deep=True)
    # The last data byte of either format (the ckpt trailer is 17 bytes long).
    trees.flip_byte(path, 18 if fmt == "ckpt" else 1)
    checkpoints.verify_file(str(path))  # the structure is still fine
    with pytest.raises(ValueError, match="CRC"):
        checkpoints.verify_file(str(path), deep=True)


def test_deep_verification_without_a_crc_reads_everything_and_accepts(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    trees.write_checkpoint(path)
    trees.flip_byte(path)
    assert checkpoints.verify_file(str(path), deep=True).tensors == 6


def test_ckpt_crc_trailer_matches_mindspores_definition(tmp_path: Path) -> None:
    path = Path(trees.write_ckpt(tmp_path / "a.ckpt", crc=True))
    data = path.read_bytes()
    assert data[-17:-10] == b"crc_num"
    import zlib

    assert int.from_bytes(data[-10:], "big") == zlib.crc32(data[:-17])
    verify_ckpt(str(path), deep=True)


# ---- Checkpoint 1.0 ------------------------------------------------------------------------


def test_intact_tree_resumes_from_the_newest_step(tmp_path: Path) -> None:
    written = trees.build_v1(tmp_path, 4, [(1, 10), (1, 20), (2, 5)])
    result = scan(tmp_path)
    assert result.layout == "v1" and result.format == "safetensors" and result.ranks == 4
    assert result.choice is not None
    assert (result.choice.epoch, result.choice.step) == (2, 5)  # (epoch, step) order, not step alone
    assert result.choice.files == written[(2, 5)]
    assert result.choice.name_pattern == "llama_rank_{rank}-2_5.safetensors"
    assert all(
        result.choice.name_pattern.format(rank=r) == Path(p).name for r, p in result.choice.files.items()
    )
    assert result.rejected == ()
    assert [(e, s) for e, s, _ in result.complete] == [(2, 5), (1, 20), (1, 10)]
    assert resume_files(str(tmp_path), "safetensors") == {r: Path(p).name for r, p in written[(2, 5)].items()}


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: trees.truncate(p), "truncated"),
        (lambda p: trees.truncate(p, 0), "0 bytes"),
        (lambda p: os.remove(p), "missing on rank 2"),
        (lambda p: trees.leave_tmp(p), "only an unfinished .tmp on 2"),
        (lambda p: Path(p).write_bytes(b"\xff" * 64), "does not fit"),
    ],
    ids=["truncated", "empty", "deleted", "tmp", "garbage"],
)
def test_a_damaged_shard_on_one_rank_rejects_its_step_and_says_why(
    tmp_path: Path, damage, words: str
) -> None:
    written = trees.build_v1(tmp_path, 4, [(1, 10), (1, 20)])
    damage(written[(1, 20)][2])
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 10
    assert len(result.rejected) == 1
    rejection = result.rejected[0]
    assert (rejection.epoch, rejection.step, rejection.ranks) == (1, 20, (2,))
    assert words in rejection.reason
    assert "meta.json: ahead of the chosen step on ranks 0-3" in result.notes


def test_many_corrupt_ranks_are_summarised(tmp_path: Path) -> None:
    written = trees.build_v1(tmp_path, 8, [(1, 10), (1, 20)], meta=False)
    for rank in (1, 2, 3, 6, 7):
        trees.truncate(written[(1, 20)][rank])
    (rejection,) = scan(tmp_path).rejected
    assert rejection.ranks == (1, 2, 3, 6, 7)
    assert rejection.reason.startswith("corrupt on 5 of 8 ranks (1-3, 6-7): rank 1:")
    assert "and 2 more" in rejection.reason


def test_only_the_needed_steps_are_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = trees.build_v1(tmp_path, 4, [(1, s) for s in range(10, 60, 10)])
    trees.truncate(written[(1, 50)][3])
    opened: list[str] = []
    real = checkpoints.verify_file

    def spy(path: str, *, deep: bool = False) -> checkpoints.FileCheck:
        opened.append(path)
        return real(path, deep=deep)

    monkeypatch.setattr(checkpoints, "verify_file", spy)
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 40
    assert sorted(opened) == sorted(list(written[(1, 50)].values()) + list(written[(1, 40)].values()))


@pytest.mark.parametrize(
    "meta",
    [
        None,
        "{not json",
        "",
        "[]",
        json.dumps({"last_epoch": "1", "last_step": 10, "last_ckpt_file": "x"}),
        json.dumps({"last_epoch": 1, "last_step": 5, "last_ckpt_file": "llama_rank_0-1_5.safetensors"}),
        json.dumps({"last_epoch": 9, "last_step": 90, "last_ckpt_file": "llama_rank_0-9_90.safetensors"}),
    ],
    ids=["missing", "malformed", "empty", "list", "wrong-type", "stale", "ahead-dangling"],
)
def test_meta_json_never_decides(tmp_path: Path, meta: str | None) -> None:
    written = trees.build_v1(tmp_path, 2, [(1, 10), (1, 20)])
    for rank in range(2):
        meta_path = tmp_path / f"rank_{rank}" / "meta.json"
        if meta is None:
            meta_path.unlink()
        else:
            meta_path.write_text(meta.replace("rank_0", f"rank_{rank}"))
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.files == written[(1, 20)]
    assert any(note.startswith("meta.json") for note in result.notes)


def test_every_prefix_counts_and_a_broken_newer_run_falls_back_to_the_older_one(tmp_path: Path) -> None:
    first = trees.build_v1(tmp_path, 2, [(1, 10), (1, 20)])
    second = trees.build_v1(tmp_path, 2, [(1, 30), (1, 40)], run=1)
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.files == second[(1, 40)]
    assert result.choice.prefix == "llama_rank_{rank}_1"
    for path in second[(1, 30)].values():
        trees.truncate(path)
    os.remove(second[(1, 40)][0])
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.files == first[(1, 20)]
    assert [(r.step, r.prefix) for r in result.rejected] == [
        (40, "llama_rank_{rank}_1"),
        (30, "llama_rank_{rank}_1"),
    ]
    # MindFormers only looks at the prefix meta.json names and resumes from a truncated file.
    assert resume_files(str(tmp_path), "safetensors")[1] == Path(second[(1, 30)][1]).name


def test_same_step_in_two_runs_prefers_the_later_run(tmp_path: Path) -> None:
    trees.build_v1(tmp_path, 2, [(1, 10)])
    second = trees.build_v1(tmp_path, 2, [(1, 10)], run=2)
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.files == second[(1, 10)]


def test_explicit_ranks_ignore_extra_directories_and_require_missing_ones(tmp_path: Path) -> None:
    written = trees.build_v1(tmp_path, 4, [(1, 10)])
    assert scan(tmp_path, ranks=2).choice.files == {r: written[(1, 10)][r] for r in range(2)}  # type: ignore[union-attr]
    assert "rank directories beyond world size 2 ignored: rank_2-3" in scan(tmp_path, ranks=2).notes
    shutil.rmtree(tmp_path / "rank_3")
    inferred = scan(tmp_path)
    assert inferred.ranks == 3 and inferred.choice is not None
    stated = scan(tmp_path, ranks=4)
    assert stated.choice is None and stated.rejected[0].ranks == (3,)
    assert "rank directories missing: 3" in stated.notes


def test_a_gap_in_rank_directories_means_no_complete_step(tmp_path: Path) -> None:
    trees.build_v1(tmp_path, 4, [(1, 10)])
    shutil.rmtree(tmp_path / "rank_1")
    result = scan(tmp_path)
    assert result.ranks == 4 and result.choice is None
    assert result.rejected[0].reason == "missing on rank 1"


def test_files_misplaced_in_another_ranks_directory_do_not_count(tmp_path: Path) -> None:
    written = trees.build_v1(tmp_path, 2, [(1, 10)])
    trees.build_v1(tmp_path / "elsewhere", 2, [(1, 20)])
    shutil.copy(tmp_path / "elsewhere/rank_0/llama_rank_0-1_20.safetensors", tmp_path / "rank_0")
    shutil.copy(tmp_path / "elsewhere/rank_0/llama_rank_0-1_20.safetensors", tmp_path / "rank_1")
    shutil.rmtree(tmp_path / "elsewhere")
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.files == written[(1, 10)]
    assert any("not named for that rank" in note for note in result.notes)


def test_formats_are_kept_apart(tmp_path: Path) -> None:
    trees.build_v1(tmp_path, 2, [(1, 10)], fmt="ckpt")
    trees.build_v1(tmp_path, 2, [(1, 20)], fmt="safetensors", meta=False)
    assert scan(tmp_path).choice.format == "safetensors"  # type: ignore[union-attr]
    only_ckpt = scan(tmp_path, fmt="ckpt")
    assert only_ckpt.format == "ckpt" and only_ckpt.choice is not None and only_ckpt.choice.step == 10


def test_ckpt_tree_with_a_truncated_shard(tmp_path: Path) -> None:
    written = trees.build_v1(tmp_path, 3, [(1, 10), (1, 20)], fmt="ckpt")
    trees.truncate(written[(1, 20)][1], 100)
    result = scan(tmp_path, fmt="ckpt")
    assert result.choice is not None and result.choice.step == 10 and result.choice.format == "ckpt"
    assert "truncated" in result.rejected[0].reason


def test_remove_redundancy_is_read_from_the_shards(tmp_path: Path) -> None:
    root = tmp_path
    for rank in range(2):
        (root / f"rank_{rank}").mkdir()
        trees.write_safetensors(
            root / f"rank_{rank}" / trees.file_name("m", rank, 1, 1), remove_redundancy=rank == 0
        )
    assert scan(root).choice.remove_redundancy is True  # type: ignore[union-attr]


def test_no_complete_step_is_a_valid_answer(tmp_path: Path) -> None:
    written = trees.build_v1(tmp_path, 2, [(1, 10)])
    os.remove(written[(1, 10)][0])
    result = scan(tmp_path)
    assert result.choice is None and result.layout == "v1" and len(result.rejected) == 1
    os.remove(written[(1, 10)][1])
    result = scan(tmp_path)
    assert result.choice is None and result.layout == "v1" and result.rejected == ()


def test_rank_directories_never_saved_into_count_as_empty(tmp_path: Path) -> None:
    for rank in range(3):
        (tmp_path / f"rank_{rank}").mkdir()
    result = scan(tmp_path)
    assert result.layout == "empty" and result.choice is None and result.ranks == 3
    assert scan(tmp_path, resume="m_rank_0-1_1.ckpt").pinned_error is not None
    trees.write_meta(tmp_path / "rank_0", 1, 1, "m_rank_0-1_1.ckpt")  # something was saved, then lost
    assert scan(tmp_path).layout == "v1"


def test_empty_and_bad_roots(tmp_path: Path) -> None:
    assert scan(tmp_path).layout == "empty"
    with pytest.raises(CheckpointError, match="no such directory"):
        scan(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        scan(tmp_path / "file")
    (tmp_path / "logs").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint tree"):
        scan(tmp_path)
    with pytest.raises(CheckpointError, match="format"):
        scan(tmp_path, fmt="pt")
    with pytest.raises(CheckpointError, match="ranks"):
        scan(tmp_path, ranks=0)


def test_a_scanner_that_cannot_read_the_shards_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trees.build_v1(tmp_path, 2, [(1, 10)])

    def denied(path: str, *, deep: bool = False) -> checkpoints.FileCheck:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(checkpoints, "verify_file", denied)
    with pytest.raises(CheckpointError, match=r"cannot read .* Permission denied"):
        scan(tmp_path)


# ---- pinned file (resume_training: <name>) --------------------------------------------------


def test_pinned_name_resolves_per_rank_like_mindformers(tmp_path: Path) -> None:
    written = trees.build_v1(tmp_path, 4, [(1, 10), (1, 20)])
    for name in ("llama_rank_2-1_10.safetensors", "llama_rank_0-1_10", "/some/path/llama_rank_3-1_10"):
        result = scan(tmp_path, resume=name)
        assert result.pinned == name and result.pinned_error is None
        assert result.choice is not None and result.choice.files == written[(1, 10)]
        expected = pinned_files(os.path.basename(name), "safetensors", 4)
        assert {r: Path(p).name for r, p in result.choice.files.items()} == expected
    assert scan(tmp_path, resume="Latest").choice.step == 20  # type: ignore[union-attr]


def test_pinned_file_missing_or_corrupt_names_each_rank(tmp_path: Path) -> None:
    written = trees.build_v1(tmp_path, 4, [(1, 10), (1, 20)])
    os.remove(written[(1, 10)][1])
    trees.truncate(written[(1, 10)][3])
    result = scan(tmp_path, resume="llama_rank_0-1_10.safetensors")
    assert result.choice is None
    assert result.pinned_error is not None
    assert "missing on rank 1" in result.pinned_error
    assert "corrupt on rank 3" in result.pinned_error


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=trees.tree_specs(), pick=st.integers(0, 1000))
def test_random_pinned_step_is_used_only_when_intact_everywhere(
    tmp_path_factory: pytest.TempPathFactory, spec: dict, pick: int
) -> None:
    root = tmp_path_factory.mktemp("tree")
    intact = trees.materialise(root, spec)
    world, fmt = spec["world"], spec["fmt"]
    keys = sorted(intact)
    run, epoch, step = keys[pick % len(keys)]
    name = trees.file_name("m", pick % world, epoch, step, fmt, run)
    result = scan(root, ranks=world, resume=name)
    bad = set(range(world)) - intact[(run, epoch, step)]
    if bad:
        assert result.choice is None and result.pinned_error is not None
        assert set(result.rejected[0].ranks) == bad
    else:
        assert result.pinned_error is None and result.choice is not None
        assert result.choice.files == {
            r: str(root / f"rank_{r}" / trees.file_name("m", r, epoch, step, fmt, run)) for r in range(world)
        }


_VALID_CKPT = b"".join(
    trees.ckpt_message(name, array.shape, trees.ms_dtype(array), array.tobytes())
    for name, array in trees.small_tensors(1).items()
)


@settings(max_examples=100, deadline=None)
@given(
    keep=st.integers(0, len(_VALID_CKPT)),
    edits=st.lists(st.tuples(st.integers(0, len(_VALID_CKPT) - 1), st.integers(0, 255)), max_size=4),
)
def test_ckpt_parser_fails_only_with_its_own_error_on_damaged_streams(
    tmp_path_factory: pytest.TempPathFactory, keep: int, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(_VALID_CKPT)
    for offset, value in edits:
        data[offset] = value
    path = tmp_path_factory.mktemp("fuzz") / "x.ckpt"
    path.write_bytes(bytes(data[:keep]))
    try:
        checked = verify_ckpt(str(path), deep=True)
    except CkptFormatError:
        return
    assert checked.tensors >= 1  # a stream it accepts holds at least one whole parameter


def test_pinned_name_must_look_like_a_checkpoint(tmp_path: Path) -> None:
    trees.build_v1(tmp_path, 2, [(1, 10)])
    with pytest.raises(CheckpointError, match="<prefix>-<epoch>_<step>"):
        scan(tmp_path, resume="llama_rank_0.safetensors")
    with pytest.raises(CheckpointError, match="_rank_"):
        scan(tmp_path, resume="llama-1_10.safetensors")


# ---- Checkpoint 2.0 and unified weights ------------------------------------------------------


def test_v2_newest_intact_iteration(tmp_path: Path) -> None:
    written = trees.build_v2(tmp_path, 2, [100, 200, 300])
    result = scan(tmp_path)
    assert result.layout == "v2" and result.choice is not None
    assert result.choice.kind == "iteration" and result.choice.step == 300 and result.choice.epoch is None
    assert sorted(result.choice.parts) == sorted(written[300])
    assert result.choice.name_pattern is not None
    assert result.choice.name_pattern.format(rank=1) == "qwen-model-0000001-0000002.safetensors"
    assert result.ranks == 2
    trees.truncate(written[300][3])
    os.remove(written[200][0])
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 100
    assert [r.step for r in result.rejected] == [300, 200]
    assert "corrupt" in result.rejected[0].reason
    assert "model shards missing on rank 0 (metadata.json names them" in result.rejected[1].reason


def test_v2_metadata_and_tracker_problems(tmp_path: Path) -> None:
    trees.build_v2(tmp_path, 2, [100, 200])
    (tmp_path / "iteration_00000200" / "metadata.json").write_text("{oops")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("300")
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 100
    assert "not valid JSON" in result.rejected[0].reason
    assert any("names iteration 300" in note for note in result.notes)
    assert scan(tmp_path, resume="iteration_00000200").pinned_error is not None
    assert scan(tmp_path, resume="100").choice.step == 100  # type: ignore[union-attr]


def test_v2_common_json_missing_malformed_or_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trees.build_v2(tmp_path, 2, [100, 200, 300])
    (tmp_path / "iteration_00000300" / "common.json").unlink()
    (tmp_path / "iteration_00000200" / "common.json").write_text("[1, 2]")
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 100
    reasons = {r.step: r.reason for r in result.rejected}
    assert "common.json missing" in reasons[300]
    assert "common.json is not a JSON object" in reasons[200]
    (tmp_path / "iteration_00000200" / "common.json").write_text("{oops")
    assert "common.json not valid JSON" in {r.step: r.reason for r in scan(tmp_path).rejected}[200]

    def refuse(path: str) -> object:  # as a 0400 file owned by another user (root reads anything)
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(checkpoints, "_read_json", refuse)
    with pytest.raises(CheckpointError, match=r"common.json: permission denied"):
        scan(tmp_path)


def test_v2_without_metadata_needs_every_ranks_shards(tmp_path: Path) -> None:
    written = trees.build_v2(tmp_path, 2, [100], with_metadata=False)
    assert scan(tmp_path).choice.step == 100  # type: ignore[union-attr]
    os.remove(written[100][2])  # rank 1's model shard
    assert "model shards missing on rank 1 (no metadata.json names them)" in scan(tmp_path).rejected[0].reason


def test_v2_iteration_whose_optimizer_write_did_not_finish_is_incomplete(tmp_path: Path) -> None:
    """MindFormers 2.1 with async_save died after common.json and metadata.json, while the optimizer
    shards were still being written: metadata.json names them, so the iteration is incomplete."""
    trees.build_v2(tmp_path, 2, [100, 200])
    trees.unfinished_v2_save(tmp_path, 2, 300, on_disk=("model",))
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 200
    assert [r.step for r in result.rejected] == [300]
    reason = result.rejected[0].reason
    assert reason.startswith("optimizer shards missing on every rank (metadata.json names them, e.g. ")
    assert "qwen-opt-0000000-0000002.safetensors" in reason
    assert "the save did not finish; resuming here would drop the optimizer state" in reason


@pytest.mark.parametrize(
    ("world", "with_metadata"),
    [(1, False), (2, False)],
    ids=["one-rank job (no metadata.json)", "died before metadata.json"],
)
def test_v2_iteration_lacking_the_optimizer_shards_earlier_iterations_have_is_incomplete(
    tmp_path: Path, world: int, with_metadata: bool
) -> None:
    """Without a metadata.json naming the shards, the earlier iterations say what the job saves."""
    trees.build_v2(tmp_path, world, [100, 200], with_metadata=with_metadata)
    trees.unfinished_v2_save(tmp_path, world, 300, on_disk=("model",), with_metadata=with_metadata)
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 200
    assert [r.step for r in result.rejected] == [300]
    assert result.rejected[0].reason == (
        "optimizer shards missing on every rank (earlier iterations have them): the save did not finish; "
        "resuming here would drop the optimizer state"
    )
    # Pinned, it is refused for the same reason.
    pinned = scan(tmp_path, resume="iteration_00000300")
    assert pinned.choice is None and pinned.pinned_error is not None
    assert "optimizer shards missing" in pinned.pinned_error


def test_v2_iteration_without_the_metadata_json_earlier_iterations_have_is_incomplete(tmp_path: Path) -> None:
    trees.build_v2(tmp_path, 2, [100])
    # Every shard is on disk, but the process died between common.json and metadata.json.
    trees.unfinished_v2_save(tmp_path, 2, 200, on_disk=("model", "opt"), with_metadata=False)
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 100
    assert result.rejected[0].reason.startswith("metadata.json missing, though earlier iterations")
    # Died earlier still: the optimizer shards unfinished too. The optimizer is what is named.
    trees.unfinished_v2_save(tmp_path, 2, 300, on_disk=("model",), with_metadata=False)
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 100
    assert result.rejected[0].reason.startswith("optimizer shards missing on every rank (earlier iterations")


def test_v2_iteration_saved_again_by_another_world_size_is_what_its_metadata_names(tmp_path: Path) -> None:
    """A 4-rank job saved iteration 200 and died; resized to 2 ranks it resumed from 100 and saved
    200 again into the same directory (MindFormers keeps the directory): the 4-rank files left there
    are not part of it."""
    trees.build_v2(tmp_path, 4, [100, 200])
    for path in (tmp_path / "iteration_00000200").glob("*.json"):
        path.unlink()
    trees.build_v2(tmp_path, 2, [200])
    result = scan(tmp_path)
    assert result.choice is not None and result.choice.step == 200 and result.ranks == 2
    assert len(result.choice.parts) == 4 and all("-0000002.safetensors" in p for p in result.choice.parts)


def test_v2_kinds_the_job_never_saved_are_not_required(tmp_path: Path) -> None:
    # A job that does not save its optimizer (no_save_optim): model shards only, every iteration.
    trees.build_v2(tmp_path / "no-optim", 2, [100, 200], kinds=("model",))
    assert scan(tmp_path / "no-optim").choice.step == 200  # type: ignore[union-attr]
    # Resized to one rank: MindFormers writes no metadata.json for it; the 2-rank iterations'
    # metadata.json does not make the 1-rank ones incomplete.
    resized = tmp_path / "resized"
    trees.build_v2(resized, 2, [100, 200])
    trees.build_v2(resized, 1, [300], with_metadata=False)
    result = scan(resized)
    assert result.choice is not None and result.choice.step == 300 and result.ranks == 1
    # The first iteration of a tree has no earlier one: only metadata.json can tell.
    first = tmp_path / "first"
    trees.unfinished_v2_save(first, 2, 100, on_disk=("model",))
    assert "optimizer shards missing" in scan(first).rejected[0].reason


def test_unified_weights(tmp_path: Path) -> None:
    files = trees.build_unified(tmp_path)
    result = scan(tmp_path)
    assert result.layout == "unified" and result.choice is not None and result.choice.kind == "unified"
    assert sorted(result.choice.parts) == sorted(files)
    trees.truncate(tmp_path / "hyper_param.safetensors")
    result = scan(tmp_path)
    assert result.choice is None and "hyper_param.safetensors" in result.rejected[0].reason
    os.remove(tmp_path / "part1.safetensors")
    assert "missing part" in scan(tmp_path).rejected[0].reason


def test_json_contract(tmp_path: Path) -> None:
    trees.build_v1(tmp_path, 2, [(1, 10), (1, 20)])
    os.remove(tmp_path / "rank_1" / "llama_rank_1-1_20.safetensors")
    document = json.loads(json.dumps(scan(tmp_path).to_json()))
    assert document["format"] == "safetensors" and document["ranks"] == 2
    assert document["choice"]["epoch"] == 1 and document["choice"]["step"] == 10
    assert document["choice"]["files"] == {
        "0": str(tmp_path / "rank_0" / "llama_rank_0-1_10.safetensors"),
        "1": str(tmp_path / "rank_1" / "llama_rank_1-1_10.safetensors"),
    }
    assert document["rejected"] == [
        {"epoch": 1, "step": 20, "prefix": "llama_rank_{rank}", "reason": "missing on rank 1", "ranks": [1]}
    ]


# ---- agreement with MindFormers, on random damaged trees -----------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=trees.tree_specs())
def test_random_damaged_trees_choice_is_intact_newest_and_agrees_with_sound_mindformers(
    tmp_path_factory: pytest.TempPathFactory, spec: dict
) -> None:
    root = tmp_path_factory.mktemp("tree")
    intact = trees.materialise(root, spec)
    world, fmt = spec["world"], spec["fmt"]
    ranks = None if spec["rank_dirs"] == "as-is" else world
    result = scan(root, fmt=fmt, ranks=ranks)

    everywhere = {key for key, good in intact.items() if good == set(range(world))}
    newest = max(everywhere, key=lambda k: (k[1], k[2], k[0]), default=None)

    # 1. The choice, if any, is complete and intact on every rank; 2. it is the newest such step,
    # and none newer exists.
    if newest is None:
        assert result.choice is None
    else:
        assert result.choice is not None
        assert set(result.choice.files) == set(range(world))
        run = int(result.choice.prefix.endswith("}_1")) if result.choice.prefix else 0  # type: ignore[union-attr]
        key = (run, result.choice.epoch, result.choice.step)
        assert key in everywhere
        assert (key[1], key[2]) == (newest[1], newest[2])
        for rank, path in result.choice.files.items():
            assert Path(path).name == trees.file_name("m", rank, key[1], key[2], fmt, run)
            checkpoints.verify_file(path)
    # Every newer candidate is explained.
    if result.choice is not None:
        assert all((r.epoch, r.step) >= (result.choice.epoch, result.choice.step) for r in result.rejected)

    # 3. Against MindFormers: where its choice is sound we agree; where it is not, ours is intact.
    try:
        theirs = resume_files(str(root), fmt)
    except MindFormersRefuses:
        return
    keys = set()
    for rank in range(world):
        name = theirs.get(rank)
        parsed = parse_checkpoint_name(name) if name else None
        if parsed is None:
            keys.add(None)
            continue
        prefix, epoch, step, _ = parsed
        keys.add((int(prefix.endswith("_1")), epoch, step))
    sound = len(keys) == 1 and None not in keys and next(iter(keys)) in everywhere
    if sound:
        (their_key,) = keys
        assert result.choice is not None
        assert (result.choice.epoch, result.choice.step) >= (their_key[1], their_key[2])
        if (their_key[1], their_key[2]) == (newest[1], newest[2]):  # type: ignore[index]
            same_step = [k for k in everywhere if (k[1], k[2]) == (their_key[1], their_key[2])]
            if len(same_step) == 1:
                assert {r: Path(p).name for r, p in result.choice.files.items()} == {
                    r: theirs[r] for r in range(world)
                }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=trees.tree_specs(damaged=False))
def test_random_intact_trees_same_choice_as_mindformers(
    tmp_path_factory: pytest.TempPathFactory, spec: dict
) -> None:
    root = tmp_path_factory.mktemp("tree")
    trees.materialise(root, spec)
    result = scan(root, fmt=spec["fmt"])
    theirs = resume_files(str(root), spec["fmt"])
    assert result.choice is not None
    assert {r: Path(p).name for r, p in result.choice.files.items()} == theirs


def test_mindformers_agreement_on_a_sound_tree_and_safety_on_unsound_ones(tmp_path: Path) -> None:
    written = trees.build_v1(tmp_path, 4, [(1, 10), (1, 20), (1, 30)])
    ours = scan(tmp_path).choice
    assert ours is not None
    assert {r: Path(p).name for r, p in ours.files.items()} == resume_files(str(tmp_path), "safetensors")
    # A truncated newest shard: MindFormers trusts the name.
    trees.truncate(written[(1, 30)][2])
    assert resume_files(str(tmp_path), "safetensors")[2] == Path(written[(1, 30)][2]).name
    assert scan(tmp_path).choice.step == 20  # type: ignore[union-attr]
    # meta.json ahead of the files (rank 3 lost step 30 entirely): both fall back, and agree.
    os.remove(written[(1, 30)][3])
    assert resume_files(str(tmp_path), "safetensors")[0] == Path(written[(1, 20)][0]).name
    assert scan(tmp_path).choice.step == 20  # type: ignore[union-attr]
    # One stale meta.json drags MindFormers back to step 10; relaunch keeps the newest intact step.
    trees.write_meta(tmp_path / "rank_1", 1, 10, "llama_rank_1-1_10.safetensors")
    assert resume_files(str(tmp_path), "safetensors")[0] == Path(written[(1, 10)][0]).name
    assert scan(tmp_path).choice.step == 20  # type: ignore[union-attr]


def test_large_tensor_ckpt_with_many_slices(tmp_path: Path) -> None:
    tensors = {"big": np.arange(1000, dtype=np.float32)}
    path = trees.write_ckpt(tmp_path / "big.ckpt", tensors, slice_bytes=512, crc=True)
    assert verify_ckpt(path, deep=True).tensors == 1
