"""A real MindSpore data-parallel loop on CPU, for the watchdog's end-to-end test.

Every step all-reduces each rank's gradient (``rank + step`` in every element) with MindSpore's
``AllReduce`` over its TCP collectives, applies it, and prints MindFormers' step line (as its
loss monitor does) with the reduced value, so the test can check that the collective really
summed over every rank. A rank that stops leaves the others blocked inside ``AllReduce``.
"""

from __future__ import annotations

import os
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.communication import get_group_size, get_rank, init


def main() -> None:
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    init()
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return  # the scheduler's process only serves the cluster until the workers leave
    rank, size = get_rank(), get_group_size()
    steps = int(os.environ.get("DP_STEPS", "100000"))
    allreduce = ops.AllReduce()
    weights = np.zeros(4, dtype=np.float32)
    for step in range(1, steps + 1):
        started = time.monotonic()
        grad = np.full(4, rank + step, dtype=np.float32)
        total = allreduce(Tensor(grad)).asnumpy()
        weights -= 0.01 * total / size
        print(
            f"[rank {rank}] {{ Epoch:[  1/  1], step:[{step:5d}/{steps:5d}], "
            f"loss: {float(weights.sum()):.6f}, "
            f"per_step_time: {(time.monotonic() - started) * 1000:.0f}ms, allreduce: {float(total[0]):g}",
            flush=True,
        )
        time.sleep(float(os.environ.get("DP_STEP_DELAY", "0.3")))


if __name__ == "__main__":
    main()
