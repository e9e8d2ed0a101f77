"""The demo model, its data, its parallel layout and its optimizer, as pure numpy functions.

Owns the maths: a two-layer MLP ``y = relu(x @ W1 + b1) @ W2 + b2`` regressing a fixed random
"teacher" function, split Megatron-style over ``model_parallel`` ranks (W1 and b1 by columns,
W2 by rows, b2 replicated) and over ``data_parallel`` ranks by batch rows; AdamW; a warm-up +
cosine learning-rate schedule. Everything is float32 and a function of the seeds and the global
step only, so the same world size always produces the same bits. The rank layout is the
MindSpore one: device matrix ``[dp, mp]`` laid out row-major, ``rank = dp_index * mp + mp_index``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from examples.trainer.config import TrainConfig

PARAM_NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
#: MindSpore tensor maps for device matrix (dp, mp): axis numbers count from the right, so the
#: mp axis is 0 and the dp axis is 1; -1 means "not split".
TENSOR_MAPS: dict[str, tuple[int, ...]] = {
    "fc1.weight": (-1, 0),
    "fc1.bias": (0,),
    "fc2.weight": (0, -1),
    "fc2.bias": (-1,),
}
OPTIMIZER_STATES = ("adam_m", "adam_v")

F32 = np.float32


@dataclass(frozen=True)
class Placement:
    """Where one rank sits in the (dp, mp) grid and who it talks to."""

    rank: int
    data_parallel: int
    model_parallel: int

    @property
    def dp_index(self) -> int:
        return self.rank // self.model_parallel

    @property
    def mp_index(self) -> int:
        return self.rank % self.model_parallel

    @property
    def tp_group(self) -> tuple[int, ...]:
        base = self.dp_index * self.model_parallel
        return tuple(range(base, base + self.model_parallel))

    @property
    def dp_group(self) -> tuple[int, ...]:
        return tuple(d * self.model_parallel + self.mp_index for d in range(self.data_parallel))


def full_shapes(config: TrainConfig) -> dict[str, tuple[int, ...]]:
    d_in, hidden, d_out = config.input_size, config.hidden_size, config.output_size
    return {
        "fc1.weight": (d_in, hidden),
        "fc1.bias": (hidden,),
        "fc2.weight": (hidden, d_out),
        "fc2.bias": (d_out,),
    }


def local_slices(name: str, full_shape: tuple[int, ...], placement: Placement) -> tuple[slice, ...]:
    """This rank's block of parameter ``name`` (the same answer ``relaunch.strategy.rank_slices`` gives)."""
    slices = []
    for dim, axis in zip(full_shape, TENSOR_MAPS[name], strict=True):
        if axis == -1:
            slices.append(slice(0, dim))
        else:  # axis 0 is mp (the only split axis this model uses)
            size = dim // placement.model_parallel
            slices.append(slice(placement.mp_index * size, (placement.mp_index + 1) * size))
    return tuple(slices)


def init_full_params(config: TrainConfig) -> dict[str, np.ndarray]:
    """Full (unsplit) initial parameters: the same on every world size, so shards always agree."""
    rng = np.random.default_rng([config.seed, 7])
    shapes = full_shapes(config)
    d_in, hidden = config.input_size, config.hidden_size
    return {
        "fc1.weight": (rng.standard_normal(shapes["fc1.weight"]) * math.sqrt(2.0 / d_in)).astype(F32),
        "fc1.bias": np.zeros(shapes["fc1.bias"], dtype=F32),
        "fc2.weight": (rng.standard_normal(shapes["fc2.weight"]) * math.sqrt(1.0 / hidden)).astype(F32),
        "fc2.bias": np.zeros(shapes["fc2.bias"], dtype=F32),
    }


def global_batch(config: TrainConfig, global_step: int) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of step ``global_step`` (1-based): a function of (dataset seed, step) only."""
    teacher = np.random.default_rng([config.dataset_seed])
    mix = teacher.standard_normal((config.input_size, config.input_size))
    head = teacher.standard_normal((config.input_size, config.output_size)) / math.sqrt(config.input_size)
    rng = np.random.default_rng([config.dataset_seed, global_step])
    inputs = rng.standard_normal((config.global_batch_size, config.input_size))
    targets = np.tanh(inputs @ mix) @ head + config.noise * rng.standard_normal(
        (config.global_batch_size, config.output_size)
    )
    return inputs.astype(F32), targets.astype(F32)


def learning_rate(config: TrainConfig, global_step: int) -> float:
    """Linear warm-up, then cosine decay to 10% at ``lr_schedule.total_steps`` (or the run's total)."""
    total = config.lr_total_steps if config.lr_total_steps > 0 else config.total_steps
    base = config.learning_rate
    if config.warmup_steps and global_step <= config.warmup_steps:
        return base * global_step / config.warmup_steps
    progress = min(1.0, (global_step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def local_forward_backward(
    params: dict[str, np.ndarray],
    inputs: np.ndarray,
    targets: np.ndarray,
    global_batch_size: int,
    reduce_tp: Callable[[np.ndarray], np.ndarray],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Gradients of this rank's shard and its share of the loss (both still to be summed over dp).

    ``reduce_tp(array) -> array`` sums the partial outputs over the tensor-parallel group. The loss
    is ``sum((y - t)^2) / (global_batch * d_out)``; each rank returns its rows' part of that sum.
    """
    pre = inputs @ params["fc1.weight"] + params["fc1.bias"]
    hidden = np.maximum(pre, F32(0))
    partial = hidden @ params["fc2.weight"]
    outputs = reduce_tp(partial) + params["fc2.bias"]
    diff = outputs - targets
    scale = F32(1.0 / (global_batch_size * targets.shape[1]))
    loss_part = np.array([np.sum(diff * diff, dtype=F32) * scale], dtype=F32)
    d_out = (F32(2) * scale) * diff
    grads = {
        "fc2.weight": hidden.T @ d_out,
        "fc2.bias": d_out.sum(axis=0, dtype=F32),
    }
    d_hidden = d_out @ params["fc2.weight"].T
    d_hidden[pre <= 0] = 0
    grads["fc1.weight"] = inputs.T @ d_hidden
    grads["fc1.bias"] = d_hidden.sum(axis=0, dtype=F32)
    return grads, loss_part


def pack(grads: dict[str, np.ndarray], loss_part: np.ndarray) -> np.ndarray:
    return np.concatenate([grads[name].ravel() for name in PARAM_NAMES] + [loss_part]).astype(F32)


def unpack(flat: np.ndarray, like: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    grads: dict[str, np.ndarray] = {}
    offset = 0
    for name in PARAM_NAMES:
        size = like[name].size
        grads[name] = flat[offset : offset + size].reshape(like[name].shape)
        offset += size
    return grads, float(flat[offset])


def adamw_update(
    params: dict[str, np.ndarray],
    moments: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place; elementwise, so a shard updates exactly as its block of the full tensor."""
    beta1, beta2 = F32(betas[0]), F32(betas[1])
    correction1 = F32(1.0 - betas[0] ** step)
    correction2 = F32(1.0 - betas[1] ** step)
    for name in PARAM_NAMES:
        grad = grads[name]
        m = moments[f"adam_m.{name}"]
        v = moments[f"adam_v.{name}"]
        m *= beta1
        m += (F32(1) - beta1) * grad
        v *= beta2
        v += (F32(1) - beta2) * grad * grad
        update = (m / correction1) / (np.sqrt(v / correction2) + F32(eps))
        if weight_decay:
            update = update + F32(weight_decay) * params[name]
        params[name] -= F32(lr) * update
