"""Run MindSpore's own converters; executed by the optional MindSpore environment's interpreter.

Usage (from ``tests/test_convert.py``, never imported by the project's interpreter)::

    <mindspore-env>/bin/python tests/conv_mindspore.py unify SRC_DIR STRATEGY_FILE DST_DIR
    <mindspore-env>/bin/python tests/conv_mindspore.py transform SRC_DIR SRC_STRATEGY DST_STRATEGY DST_DIR \
        PREFIX
    <mindspore-env>/bin/python tests/conv_mindspore.py transform-ckpt SRC_DIR SRC_STRATEGY DST_STRATEGY \
        WORK_DIR
    <mindspore-env>/bin/python tests/conv_mindspore.py merge STRATEGY_DIR MERGED_FILE
    <mindspore-env>/bin/python tests/conv_mindspore.py parse STRATEGY_FILE
    <mindspore-env>/bin/python tests/conv_mindspore.py slice UNIFIED_DIR STRATEGY_FILE RANKS OUT_DIR

Create that environment with::

    python3.11 -m venv ~/.cache/relaunch/mindspore-env
    ~/.cache/relaunch/mindspore-env/bin/pip install mindspore==2.10.0     # CPU build, ~3 GB
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    import mindspore as ms

    if argv[0] == "unify":
        src_dir, strategy_file, dst_dir = argv[1:4]
        ms.unified_safetensors(src_dir, strategy_file, dst_dir)
    elif argv[0] == "parse":
        # Parse a strategy file with MindSpore's generated protobuf classes; print what they see.
        import json

        from mindspore.train import node_strategy_pb2

        message = node_strategy_pb2.ParallelStrategyMap()
        with open(argv[1], "rb") as handle:
            message.ParseFromString(handle.read())
        layouts = {
            item.param_name: {
                "dev_matrix": list(item.parallel_layouts.dev_matrix[0].dim),
                # MindSpore's own reading (_convert_to_list): per-dimension lists when there are
                # several TensorMaps (the Layout API), empty ones skipped.
                "tensor_map": (
                    [list(m.dim) for m in item.parallel_layouts.tensor_map if list(m.dim)]
                    if len(item.parallel_layouts.tensor_map) > 1
                    else list(item.parallel_layouts.tensor_map[0].dim)
                ),
                "param_split_shape": list(item.parallel_layouts.param_split_shape[0].dim),
                "opt_shard_size": item.parallel_layouts.opt_weight_shard_size,
                "opt_shard_step": item.parallel_layouts.opt_weight_shard_step,
            }
            for item in message.parallel_layout_item
        }
        # MindSpore takes a file's pipeline stage from its operator strategies
        # (merge_pipeline_strategys, _transform_checkpoint_by_stage).
        stages = sorted({item.parallel_strategys.stage for item in message.parallel_strategy_item})
        print(json.dumps({"stages": stages, "layouts": layouts}))
    elif argv[0] == "slice":
        # What a rank of the destination job loads from unified weights, by MindSpore's own loader
        # arithmetic (_load_tensor, with its optimizer-shard layout expansion): the arbiter when
        # converters disagree.
        import json

        import numpy as np
        from mindspore import Tensor
        from mindspore.parallel._parallel_serialization import _convert_to_list
        from mindspore.parallel._tensor import _construct_tensor_layout_for_opt_shard, _load_tensor
        from mindspore.train import node_strategy_pb2

        unified_dir, strategy_file, ranks, out_dir = argv[1], argv[2], int(argv[3]), argv[4]
        message = node_strategy_pb2.ParallelStrategyMap()
        with open(strategy_file, "rb") as handle:
            message.ParseFromString(handle.read())
        layouts = _convert_to_list({i.param_name: i.parallel_layouts for i in message.parallel_layout_item})
        with open(os.path.join(unified_dir, "param_name_map.json")) as handle:
            weight_map = json.load(handle)["weight_map"]
        for name, part in weight_map.items():
            with open(os.path.join(unified_dir, part), "rb") as handle:
                data = handle.read()
            size = int.from_bytes(data[:8], "little")
            info = json.loads(data[8 : 8 + size])[name]
            begin, end = (8 + size + o for o in info["data_offsets"])
            itemsize = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8}[info["dtype"]]
            full = (
                np.frombuffer(data[begin:end], dtype=f"<u{itemsize}").reshape(info["shape"]).astype(np.int64)
            )
            dev, tmap, _split, _field, step, opt = layouts[name][:6]
            new_dev, new_map, new_shape = _construct_tensor_layout_for_opt_shard(
                dev, tmap, step, opt, list(full.shape)
            )
            for rank in range(ranks):
                piece = np.asarray(
                    _load_tensor(Tensor(full.reshape(new_shape)), new_dev, new_map, new_shape, rank)
                )
                os.makedirs(os.path.join(out_dir, str(rank)), exist_ok=True)
                np.save(
                    os.path.join(out_dir, str(rank), name + ".npy"), piece.reshape(-1).astype(f"<u{itemsize}")
                )
    elif argv[0] == "transform":
        src_dir, src_strategy, dst_strategy, dst_dir, prefix = argv[1:6]
        ms.transform_checkpoints(
            src_dir, dst_dir, prefix, src_strategy, dst_strategy, output_format="safetensors"
        )
    elif argv[0] == "merge":
        # MindSpore's merge of a pipeline job's per-rank strategy files into one file.
        ms.merge_pipeline_strategys(argv[1], argv[2])
    elif argv[0] == "transform-ckpt":
        # The same transformation through MindSpore's .ckpt path: the sharded safetensors are
        # re-saved as .ckpt by MindSpore itself, transformed, and every output rank's tensors are
        # written to WORK_DIR/rank_<r>.npz.
        import glob

        import numpy as np

        src_dir, src_strategy, dst_strategy, work = argv[1:5]
        ckpt_src = os.path.join(work, "src_ckpt")
        for rank_dir in sorted(glob.glob(os.path.join(src_dir, "rank_*"))):
            (path,) = glob.glob(os.path.join(rank_dir, "*.safetensors"))
            params = ms.load_checkpoint(path, format="safetensors")
            out = os.path.join(ckpt_src, os.path.basename(rank_dir))
            os.makedirs(out, exist_ok=True)
            ms.save_checkpoint(
                [{"name": k, "data": v} for k, v in params.items()], os.path.join(out, "src.ckpt")
            )
        ms.transform_checkpoints(ckpt_src, os.path.join(work, "dst_ckpt"), "dst_", src_strategy, dst_strategy)
        for rank_dir in sorted(glob.glob(os.path.join(work, "dst_ckpt", "rank_*"))):
            (path,) = glob.glob(os.path.join(rank_dir, "*.ckpt"))
            arrays = {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items()}
            np.savez(os.path.join(work, os.path.basename(rank_dir) + ".npz"), **arrays)  # type: ignore[arg-type]
    else:
        raise SystemExit(f"unknown operation {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
