"""Strategy files round-trip through the protobuf wire format; layouts say which slice each rank holds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conv_helpers import reference_slice
from hypothesis import given, settings
from hypothesis import strategies as st

from relaunch.strategy import (
    Layout,
    Strategy,
    StrategyError,
    check_layout,
    decode_strategy,
    default_opt_step,
    dst_parallel_for_world_size,
    encode_strategy,
    full_shape,
    local_shape,
    merge_strategies,
    parse_parallel,
    rank_slices,
    read_strategy_dir,
    read_strategy_file,
    rescale_strategy,
    write_strategy_file,
)


def _sample() -> Strategy:
    return Strategy(
        stage=1,
        layouts={
            "model.w": Layout((4, 2), (0, -1), 4, 2),
            "model.b": Layout((4, 2), (-1,)),
            "adam_m.model.w": Layout((4, 2), (0, -1), -1, 2),
            "no_step": Layout((4, 2), (0, -1), 4, 0),
            "scalar": Layout((4, 2), ()),
        },
        items={"Default/MatMul-op0": (1, ((4, 1), (1, 2))), "Default/Add-op1": (1, ())},
    )


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    path = tmp_path / "ckpt_strategy_rank_0.ckpt"
    write_strategy_file(path, _sample())

    assert read_strategy_file(path) == _sample()


def test_wire_bytes_of_a_minimal_message_are_standard_protobuf() -> None:
    # current_stage = 0 -> key 0x08 value 0x00; one layout item with a -1 tensor-map entry, which
    # proto2 encodes as a ten-byte sign-extended varint.
    strategy = Strategy(stage=0, layouts={"p": Layout((2,), (-1,))})
    minus_one = b"\xff" * 9 + b"\x01"
    dev = b"\x0a\x02" + b"\x08\x02"  # dev_matrix { dim: 2 }
    tmap = b"\x12\x0b" + b"\x08" + minus_one  # tensor_map { dim: -1 }
    empty_split_and_offset = b"\x1a\x00" + b"\x22\x00"  # MindSpore's reader needs param_split_shape[0]
    layouts = dev + tmap + empty_split_and_offset + b"\x28\x00" + b"\x30\x00" + b"\x38\x00"
    item = b"\x0a\x01p" + b"\x12" + bytes([len(layouts)]) + layouts
    # the synthetic operator strategy MindSpore's pipeline tools need: node "relaunch:p",
    # parallel_strategys { stage: 0, parallel_strategy { dim: 1 } }
    strategys = b"\x08\x00" + b"\x12\x02" + b"\x08\x01"
    operator = b"\x0a\x0arelaunch:p" + b"\x12" + bytes([len(strategys)]) + strategys
    expected = b"\x08\x00" + b"\x12" + bytes([len(operator)]) + operator + b"\x1a" + bytes([len(item)]) + item

    assert encode_strategy(strategy) == expected
    assert decode_strategy(expected) == strategy  # the synthetic item is not kept


def test_the_stage_comes_from_the_operator_strategies_not_current_stage(tmp_path: Path) -> None:
    """MindSpore's files say current_stage 1 (a save counter) on every rank; the stage is in the items."""
    layouts = {"w": Layout((2, 2), (0, -1))}
    for rank in range(8):
        stage = rank // 4
        data = encode_strategy(
            Strategy(stage=1, layouts=layouts, items={"Default/MatMul-op3": (stage, ((2, 2),))})
        )
        assert decode_strategy(data).stage == stage
        (tmp_path / f"ckpt_strategy_rank_{rank}.ckpt").write_bytes(data)
    merged = read_strategy_dir(tmp_path)
    assert (merged.stages, merged.stage_size, merged.layouts["w"].keys()) == (2, 4, {0, 1})
    # a file without operator strategies (as this project wrote them before): current_stage is the stage
    assert decode_strategy(b"\x08\x01").stage == 1
    # an empty stage keeps its number through a synthetic item
    assert decode_strategy(encode_strategy(Strategy(stage=3, layouts={}))) == Strategy(stage=3, layouts={})


def test_packed_repeated_fields_and_unknown_fields_are_accepted() -> None:
    packed_dev = b"\x0a\x04" + b"\x0a\x02\x04\x02"  # dev_matrix { dim: [4, 2] packed }
    tmap = b"\x12\x04" + b"\x08\x00\x08\x01"
    layouts = packed_dev + tmap + b"\x28\x00\x30\x02\x38\x04"
    item = b"\x0a\x01w\x12" + bytes([len(layouts)]) + layouts
    unknown = b"\xa0\x06\x07"  # field 100, varint 7
    data = b"\x08\x03" + unknown + b"\x1a" + bytes([len(item)]) + item

    decoded = decode_strategy(data)

    assert decoded.stage == 3
    assert decoded.layouts == {"w": Layout((4, 2), (0, 1), 4, 2)}


@pytest.mark.parametrize("data", [b"\x08", b"\x1a\x05ab", b"\x0f", b"\x1a\x02\x0a\x00"])
def test_malformed_files_are_rejected_with_the_file_named(data: bytes) -> None:
    with pytest.raises(StrategyError, match=r"strat\.ckpt"):
        decode_strategy(data, source="strat.ckpt")


def test_uneven_split_is_rejected_naming_the_parameter() -> None:
    layouts = b"\x0a\x02\x08\x02" + b"\x12\x02\x08\x00" + b"\x1a\x02\x08\x03" + b"\x28\x00\x30\x00\x38\x00"
    item = b"\x0a\x03odd\x12" + bytes([len(layouts)]) + layouts
    with pytest.raises(StrategyError, match=r"'odd'.*uneven"):
        decode_strategy(b"\x08\x00\x1a" + bytes([len(item)]) + item)


def test_formats_md_example_rank_holds_rows_by_last_axis() -> None:
    layout = Layout((2, 2), (0, -1))
    for rank in range(4):
        rows, cols = rank_slices(layout, (8, 4), rank)
        assert (rows.start, rows.stop) == ((rank % 2) * 4, (rank % 2 + 1) * 4)
        assert (cols.start, cols.stop) == (0, 4)


def test_optimizer_shard_splits_rows_across_the_data_parallel_group() -> None:
    # dp 4 x mp 2, weight split by mp on dim 0 and optimizer-sharded across all 4 dp ranks:
    # the group of rank r is {r % 2 + 2k}, its position (r // 2) % 4 (= (r // step) % size).
    layout = Layout((4, 2), (0, -1), 4, 2)
    for rank in range(8):
        rows, _ = rank_slices(layout, (16, 4), rank)
        mp_start = (rank % 2) * 8
        position = rank // 2
        assert (rows.start, rows.stop) == (mp_start + position * 2, mp_start + position * 2 + 2)


def test_partial_optimizer_shard_uses_the_inner_factor_of_the_data_parallel_axis() -> None:
    layout = Layout((4, 2), (-1, 0), 2, 2)
    held = [rank_slices(layout, (8, 4), rank)[0] for rank in range(8)]
    assert [(s.start, s.stop) for s in held] == [(0, 4), (0, 4), (4, 8), (4, 8)] * 2


def test_all_repeated_axes_form_the_group_when_size_is_minus_one() -> None:
    layout = Layout((2, 2), (-1,), -1, 1)
    assert [rank_slices(layout, (8,), r)[0].start for r in range(4)] == [0, 2, 4, 6]


@st.composite
def layouts_and_shapes(draw: st.DrawFn) -> tuple[Layout, tuple[int, ...]]:
    dev = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=3)))
    ndim = draw(st.integers(1, 3))
    axes = draw(st.permutations(list(range(len(dev)))))
    tmap = tuple(axes[i] if i < len(axes) and draw(st.booleans()) else -1 for i in range(ndim))
    repeated = Layout(dev, tmap).repeated_size()
    opt = 0
    if repeated > 1 and draw(st.booleans()):
        opt = draw(st.sampled_from([-1] + [d for d in range(2, repeated + 1) if repeated % d == 0]))
        try:
            Layout(dev, tmap, opt, 1).opt_groups()
        except StrategyError:
            opt = -1
    layout = Layout(dev, tmap, opt, default_opt_step(dev, tmap, opt))
    local = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    shape = list(full_shape("p", Layout(dev, tmap), local))
    shape[0] *= max(1, layout.opt_size())
    return layout, tuple(shape)


@settings(max_examples=60, deadline=None)
@given(layouts_and_shapes())
def test_rank_slices_match_mindsporestyle_np_split(case: tuple[Layout, tuple[int, ...]]) -> None:
    layout, shape = case
    check_layout("p", layout, shape)
    full = np.arange(math.prod(shape)).reshape(shape)
    for rank in range(layout.device_count):
        expected = reference_slice(full, layout, rank)
        assert np.array_equal(full[rank_slices(layout, shape, rank)], expected)
        assert full_shape("p", layout, expected.shape) == shape
    assert local_shape(layout, shape) == reference_slice(full, layout, 0).shape


def test_every_element_is_held_by_the_expected_number_of_ranks() -> None:
    layout = Layout((2, 2, 2), (2, -1), 2, 1)
    counts = np.zeros((8, 6), dtype=int)
    for rank in range(8):
        counts[rank_slices(layout, (8, 6), rank)] += 1
    assert (counts == 2).all()  # 8 ranks, 2-way split by axis 2, 2-way optimizer shard -> 2 copies


def test_contradictions_name_the_parameter() -> None:
    with pytest.raises(StrategyError, match=r"'layers.0.w'.*dimension 1"):
        check_layout("layers.0.w", Layout((2, 3), (-1, 0)), (4, 4))
    with pytest.raises(StrategyError, match=r"'b'.*2 dims"):
        check_layout("b", Layout((2,), (0, -1)), (4,))
    with pytest.raises(StrategyError, match=r"'c'.*optimizer shard size 4"):
        check_layout("c", Layout((4, 2), (0, -1), 4, 2), (4, 2))
    with pytest.raises(StrategyError, match=r"'d'.*exceeds"):
        full_shape("d", Layout((2, 2), (0, 1), 2, 1), (2, 2))


def test_pipeline_stages_merge_and_disagreement_is_rejected() -> None:
    stage0 = Strategy(0, {"embed": Layout((2, 2), (0, -1)), "l0": Layout((2, 2), (-1, 0))})
    stage1 = Strategy(1, {"l1": Layout((2, 2), (-1, 0)), "embed": Layout((2, 2), (0, -1))})
    merged = merge_strategies([stage0, stage0, stage1, stage1])
    assert (merged.stages, merged.stage_size, merged.world_size) == (2, 4, 8)
    assert sorted(merged.layouts["embed"]) == [0, 1]
    assert merged.stage_of(5) == (1, 1)
    assert merged.layout_for("adam_v.l1") == {1: Layout((2, 2), (-1, 0))}
    with pytest.raises(StrategyError, match=r"stage 0 disagree.*'l0'"):
        merge_strategies(
            [stage0, Strategy(0, {"embed": Layout((2, 2), (0, -1)), "l0": Layout((2, 2), (0, -1))})]
        )
    with pytest.raises(StrategyError, match=r"stage\(s\) \[0\]"):
        merge_strategies([stage1])


def test_strategy_directory_is_read_in_rank_order(tmp_path: Path) -> None:
    for rank in range(4):
        write_strategy_file(
            tmp_path / f"ckpt_strategy_rank_{rank}.ckpt", Strategy(rank // 2, {"w": Layout((2,), (0,))})
        )
    merged = read_strategy_dir(tmp_path)
    assert merged.world_size == 4 and len(merged.digest) == 32
    with pytest.raises(StrategyError, match="no such strategy"):
        read_strategy_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StrategyError, match="no ckpt_strategy_rank"):
        read_strategy_dir(tmp_path / "empty")


def test_rescale_keeps_tensor_maps_and_full_optimizer_sharding() -> None:
    source = merge_strategies(
        [
            Strategy(
                0,
                {
                    "w": Layout((4, 2), (0, -1), 4, 2),
                    "b": Layout((4, 2), (-1,), 8, 1),
                    "n": Layout((4, 2), (-1,)),
                },
            )
        ]
    )
    dst = rescale_strategy(source, **parse_parallel("dp=1,mp=4"))
    assert dst.layouts["w"][0] == Layout((1, 4), (0, -1), 0, 0)
    assert dst.layouts["b"][0] == Layout((1, 4), (-1,), 4, 1)
    assert dst.layouts["n"][0] == Layout((1, 4), (-1,))
    dst = rescale_strategy(source, dp=2, mp=1, pp=1)
    assert dst.layouts["w"][0] == Layout((2, 1), (0, -1), 2, 1)
    with pytest.raises(StrategyError, match="pipeline stages"):
        rescale_strategy(source, dp=2, mp=2, pp=2)
    three_axes = merge_strategies([Strategy(0, {"x": Layout((2, 2, 2), (0,))})])
    with pytest.raises(StrategyError, match=r"'x'.*not \[dp, mp\]"):
        rescale_strategy(three_axes, dp=2, mp=2, pp=1)


@pytest.mark.parametrize("text", ["dp=0", "tp=2", "dp2", "dp=x"])
def test_bad_parallel_descriptions_are_refused(text: str) -> None:
    with pytest.raises(StrategyError, match="dp=2,mp=2"):
        parse_parallel(text)


def test_per_dimension_tensor_maps_and_merged_pipeline_names_are_understood() -> None:
    # The Layout API writes one TensorMap per dimension; merged files name params "<stage>-<name>".
    per_dim = b"\x12\x02\x08\x01" + b"\x12\x00" + b"\x12\x0b\x08" + b"\xff" * 9 + b"\x01"
    layouts = b"\x0a\x04\x08\x02\x08\x02" + per_dim + b"\x28\x00\x30\x00\x38\x00"
    item = b"\x0a\x03\x31-w\x12" + bytes([len(layouts)]) + layouts
    decoded = decode_strategy(b"\x08\x00\x1a" + bytes([len(item)]) + item)
    assert decoded.layouts == {"1-w": Layout((2, 2), (1, -1))}
    merged = merge_strategies([decoded, Strategy(0, {"0-e": Layout((2, 2), (0,))})])
    assert merged.stages == 2 and merged.layouts == {
        "w": {1: Layout((2, 2), (1, -1))},
        "e": {0: Layout((2, 2), (0,))},
    }


def test_a_dimension_split_by_several_axes_is_sliced_row_major_and_round_trips() -> None:
    # MindSpore's Layout(("dp", "mp"), "None") on device matrix [dp=2, mp=4]: dimension 0 is cut
    # into 8 pieces, rank (dp, mp) holding piece dp * 4 + mp (checked against MindSpore's
    # unified_safetensors); a later mp-split of dimension 1 is then impossible (axis used twice).
    layout = Layout((2, 4), ((1, 0), -1), 0, 0)
    assert layout.splits() == (8, 1) and layout.repeated_size() == 1
    assert [rank_slices(layout, (16, 3), r)[0] for r in (0, 1, 4, 7)] == [
        slice(0, 2),
        slice(2, 4),
        slice(8, 10),
        slice(14, 16),
    ]
    swapped = Layout((2, 4), ((0, 1), -1))
    assert rank_slices(swapped, (16, 3), 1)[0] == slice(4, 6)  # mp 1, dp 0: piece 1 * 2 + 0
    # optimizer sharding over the axis a nested entry leaves free
    partial = Layout((2, 4, 2), (-1, (2, 0)), -1, 4)
    assert partial.opt_groups() == ((1, 4),) and rank_slices(partial, (8, 4), 6) == (slice(6, 8), slice(0, 1))
    strategy = Strategy(
        0, {"w": layout, "v": partial, "plain": Layout((2, 4), (0, -1)), "1-d": Layout((2, 4), ((0, 1),))}
    )
    assert decode_strategy(encode_strategy(strategy)) == strategy
    with pytest.raises(StrategyError, match=r"'w'.*uses a device axis twice"):
        check_layout("w", Layout((2, 4), ((1, 0), 0)), (16, 8))
    with pytest.raises(StrategyError, match=r"'w'.*not divisible by its 8-way split"):
        check_layout("w", layout, (12, 3))


def test_optimizer_sharding_needs_both_size_and_step_like_mindspore() -> None:
    assert rank_slices(Layout((4, 2), (0, -1), 4, 0), (16, 4), 7) == (slice(8, 16), slice(0, 4))
    assert default_opt_step((4, 2), (0, -1), 4) == 2
    assert default_opt_step((4, 2), (-1,), 8) == 1
    assert default_opt_step((2, 4, 2), (1,), 2) == 1
    assert default_opt_step((4, 2), (0, -1), 0) == 0
    with pytest.raises(StrategyError, match=r"'p'.*step 1 does not match.*expected 2"):
        check_layout("p", Layout((4, 2), (0, -1), 4, 1), (16, 4))


def test_destination_for_a_world_size_keeps_model_parallel_and_stages() -> None:
    stage = {"w": Layout((4, 2), (0, -1), 4, 2)}
    source = merge_strategies([Strategy(0, stage), Strategy(1, stage)])
    assert dst_parallel_for_world_size(source, 8) == {"dp": 2, "mp": 2, "pp": 2}
    with pytest.raises(StrategyError, match="multiple of 4"):
        dst_parallel_for_world_size(source, 6)
    mixed = merge_strategies([Strategy(0, {"a": Layout((4, 2), (0,)), "b": Layout((2, 4), (0,))})])
    with pytest.raises(StrategyError, match="one mp"):
        dst_parallel_for_world_size(mixed, 4)


def test_files_of_ranks_beyond_the_source_world_are_ignored_when_it_is_given(tmp_path: Path) -> None:
    """A job that ran on 3 ranks, then on 2 (an elastic shrink): ranks 0 and 1 rewrote their
    files with the 2-rank layout, rank 2's 3-rank file stayed. Converting the 2-rank checkpoint
    (to grow back) reads the files of its own 2 ranks."""
    for rank in range(3):
        write_strategy_file(
            tmp_path / f"ckpt_strategy_rank_{rank}.ckpt", Strategy(0, {"w": Layout((3,), (0,))})
        )
    for rank in range(2):
        write_strategy_file(
            tmp_path / f"ckpt_strategy_rank_{rank}.ckpt", Strategy(0, {"w": Layout((2,), (0,))})
        )
    with pytest.raises(StrategyError, match="disagree"):
        read_strategy_dir(tmp_path)
    merged = read_strategy_dir(tmp_path, ranks=2)
    assert merged.stage_size == 2 and merged.layouts["w"][0] == Layout((2,), (0,))
    with pytest.raises(StrategyError, match="disagree"):  # asked for 3 ranks: the stale file counts
        read_strategy_dir(tmp_path, ranks=3)
