"""The training YAML the demo trainer reads: MindFormers keys parsed into a checked, typed config.

Owns which keys the trainer honours and the validation that makes a bad config exit with
``EXIT_BAD_CONFIG`` (2, a "do not retry" code) instead of failing later on some rank. Unknown
keys are ignored, as MindFormers configs carry many the demo has no use for.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

#: The config cannot work as written (parallel sizes, batch sizes, formats): retrying cannot help.
EXIT_BAD_CONFIG = 2
#: The checkpoint the config names is missing, unreadable or corrupt.
EXIT_BAD_CHECKPOINT = 3
#: A peer died, a collective timed out, or an unexpected error happened: worth a retry.
EXIT_FAILURE = 1


class ConfigError(ValueError):
    """The training config is invalid; the message names the key, the value and what would work."""


@dataclass(frozen=True)
class CheckpointMonitor:
    prefix: str = "demo"
    save_checkpoint_steps: int = 1
    keep_checkpoint_max: int = 5
    checkpoint_format: str = "safetensors"


@dataclass(frozen=True)
class CheckpointSection:
    """MindFormers 2.1's ``checkpoint:`` section: when present, the job saves and loads Checkpoint 2.0.

    ``load_path`` replaces ``load_checkpoint``, ``no_load_optim`` the negation of
    ``resume_training``; ``save_path`` (default ``<output_dir>/checkpoint``), ``prefix``,
    ``save_max`` and ``save_interleaved_steps`` replace the CheckpointMonitor's ``directory``,
    ``prefix``, ``keep_checkpoint_max`` and ``save_checkpoint_steps`` (which fill in what the
    section leaves out).
    """

    save_path: str
    load_path: str
    no_load_optim: bool


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer uses from the YAML, with MindFormers' meaning."""

    path: str
    output_dir: str
    seed: int
    load_checkpoint: str
    resume_training: bool | str  # False, True (newest complete step) or one file name
    auto_trans_ckpt: bool
    src_strategy_path_or_dir: str
    load_ckpt_format: str
    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    parallel_optimizer: bool  # parallel.enable_parallel_optimizer: shard weights' optimizer step over dp
    epochs: int
    global_batch_size: int
    steps_per_epoch: int
    dataset_seed: int
    noise: float
    input_size: int
    hidden_size: int
    output_size: int
    learning_rate: float
    warmup_steps: int
    lr_total_steps: int  # -1: the run's own total steps
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    checkpoint: CheckpointMonitor = field(default_factory=CheckpointMonitor)
    #: The ``checkpoint:`` section; None: the legacy keys and Checkpoint 1.0 (the default).
    checkpoint2: CheckpointSection | None = None
    step_delay_seconds: float = 0.0
    #: Extra seconds every checkpoint save takes (slow shared storage, as a large model's save is).
    save_delay_seconds: float = 0.0
    comm_timeout_seconds: float = 60.0
    connect_timeout_seconds: float = 300.0
    # Demo-only fault injection: once every rank has finished (and checkpointed) this global step,
    # rank ``fail_rank`` exits 1 - only in a run that started from scratch, so a resumed run passes.
    fail_at_global_step: int = 0
    fail_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def checkpoint_root(self) -> str:
        if self.checkpoint2 is not None and self.checkpoint2.save_path:
            return self.checkpoint2.save_path
        return os.path.join(self.output_dir, "checkpoint")

    @property
    def strategy_dir(self) -> str:
        return os.path.join(self.output_dir, "strategy")


def load_config(path: str) -> TrainConfig:
    """Read and check the YAML at ``path`` (anchors and aliases allowed)."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read the training config {path!r}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of MindFormers keys, found {type(document).__name__}")
    return parse_config(document, path)


def parse_config(document: dict[str, Any], path: str = "<config>") -> TrainConfig:
    """Turn a loaded YAML mapping into a ``TrainConfig``; raises ``ConfigError`` naming the key."""
    reader = _Reader(document, path)
    parallel = reader.section("parallel_config")
    runner = reader.section("runner_config")
    dataset = reader.section("train_dataset")
    lr = reader.section("lr_schedule")
    model_section = reader.section("model")
    model = model_section.get("model_config", model_section)
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: model.model_config must be a mapping")
    optimizer = reader.section("optimizer")

    resume = document.get("resume_training", False)
    if resume is None:
        resume = False
    if not isinstance(resume, bool | str):
        raise ConfigError(
            f"{path}: resume_training must be true, false or a checkpoint file name, found {resume!r}"
        )
    if isinstance(resume, str) and resume.strip().lower() in ("", "false"):
        resume = False
    elif isinstance(resume, str) and resume.strip().lower() == "true":
        resume = True

    monitor = _checkpoint_monitor(document.get("callbacks"), path)
    section = _checkpoint_section(document, monitor, path)
    load_checkpoint = str(document.get("load_checkpoint") or "")
    checkpoint2: CheckpointSection | None = None
    if section is not None:
        if isinstance(resume, str):
            raise ConfigError(
                f"{path}: resume_training is {resume!r}, but with a `checkpoint:` section (Checkpoint 2.0) "
                "it must be true or false; pin an iteration with checkpoint.load_path instead"
            )
        monitor, checkpoint2 = section
        load_checkpoint = checkpoint2.load_path
        resume = not checkpoint2.no_load_optim
    betas = optimizer.get("betas", [0.9, 0.999])
    if not (isinstance(betas, list) and len(betas) == 2):
        raise ConfigError(f"{path}: optimizer.betas must be a list of two numbers, found {betas!r}")

    config = TrainConfig(
        path=path,
        output_dir=str(document.get("output_dir") or "./output"),
        seed=reader.integer(document, "seed", 0),
        load_checkpoint=load_checkpoint,
        resume_training=resume,
        auto_trans_ckpt=bool(document.get("auto_trans_ckpt") or False),
        src_strategy_path_or_dir=str(document.get("src_strategy_path_or_dir") or ""),
        load_ckpt_format=str(document.get("load_ckpt_format") or "safetensors"),
        data_parallel=reader.integer(parallel, "parallel_config.data_parallel", 1, minimum=1),
        model_parallel=reader.integer(parallel, "parallel_config.model_parallel", 1, minimum=1),
        pipeline_stage=reader.integer(parallel, "parallel_config.pipeline_stage", 1, minimum=1),
        parallel_optimizer=bool(reader.section("parallel").get("enable_parallel_optimizer") or False),
        epochs=reader.integer(runner, "runner_config.epochs", 1, minimum=1),
        global_batch_size=reader.integer(runner, "runner_config.batch_size", 8, minimum=1),
        steps_per_epoch=reader.integer(runner, "runner_config.steps_per_epoch", 10, minimum=1),
        dataset_seed=reader.integer(dataset, "train_dataset.seed", 1234),
        noise=reader.number(dataset, "train_dataset.noise", 0.01),
        input_size=reader.integer(model, "model.input_size", 8, minimum=1),
        hidden_size=reader.integer(model, "model.hidden_size", 32, minimum=1),
        output_size=reader.integer(model, "model.output_size", 4, minimum=1),
        learning_rate=reader.number(lr, "lr_schedule.learning_rate", 1e-2),
        warmup_steps=reader.integer(lr, "lr_schedule.warmup_steps", 0, minimum=0),
        lr_total_steps=reader.integer(lr, "lr_schedule.total_steps", -1),
        betas=(float(betas[0]), float(betas[1])),
        eps=reader.number(optimizer, "optimizer.eps", 1e-8),
        weight_decay=reader.number(optimizer, "optimizer.weight_decay", 0.0),
        checkpoint=monitor,
        checkpoint2=checkpoint2,
        step_delay_seconds=reader.number(document, "step_delay_seconds", 0.0),
        save_delay_seconds=reader.number(document, "save_delay_seconds", 0.0),
        comm_timeout_seconds=reader.number(document, "comm_timeout_seconds", 60.0),
        connect_timeout_seconds=reader.number(document, "connect_timeout_seconds", 300.0),
        fail_at_global_step=reader.integer(document, "fail_at_global_step", 0, minimum=0),
        fail_rank=reader.integer(document, "fail_rank", 0, minimum=0),
    )
    _check(config)
    return config


def check_world_size(config: TrainConfig, world_size: int) -> None:
    """The parallel config must factor the world size the job was started with."""
    if config.world_size != world_size:
        raise ConfigError(
            f"{config.path}: parallel_config data_parallel ({config.data_parallel}) x model_parallel "
            f"({config.model_parallel}) x pipeline_stage ({config.pipeline_stage}) = {config.world_size}, "
            f"but the world size (RANK_SIZE/WORLD_SIZE) is {world_size}; "
            "change parallel_config so the product equals the world size"
        )


def _check(config: TrainConfig) -> None:
    path = config.path
    if config.pipeline_stage != 1:
        raise ConfigError(
            f"{path}: parallel_config.pipeline_stage is {config.pipeline_stage}; the demo supports 1 only"
        )
    if config.global_batch_size % config.data_parallel:
        raise ConfigError(
            f"{path}: runner_config.batch_size (global, {config.global_batch_size}) is not divisible by "
            f"data_parallel ({config.data_parallel}); use a multiple of {config.data_parallel}"
        )
    if config.hidden_size % config.model_parallel:
        raise ConfigError(
            f"{path}: model.hidden_size ({config.hidden_size}) is not divisible by model_parallel "
            f"({config.model_parallel}); use a multiple of {config.model_parallel}"
        )
    for key, fmt in (
        ("load_ckpt_format", config.load_ckpt_format),
        ("CheckpointMonitor.checkpoint_format", config.checkpoint.checkpoint_format),
    ):
        if fmt != "safetensors":
            raise ConfigError(
                f"{path}: {key} is {fmt!r}; the demo trainer reads and writes 'safetensors' only"
            )
    if config.comm_timeout_seconds <= config.step_delay_seconds:
        raise ConfigError(
            f"{path}: comm_timeout_seconds ({config.comm_timeout_seconds}) must exceed step_delay_seconds "
            f"({config.step_delay_seconds}), or every collective times out"
        )


def _checkpoint_monitor(callbacks: object, path: str) -> CheckpointMonitor:
    if callbacks is None:
        return CheckpointMonitor()
    if not isinstance(callbacks, list):
        raise ConfigError(f"{path}: callbacks must be a list, found {type(callbacks).__name__}")
    for item in callbacks:
        if isinstance(item, dict) and item.get("type") == "CheckpointMonitor":
            reader = _Reader(item, path)
            return CheckpointMonitor(
                prefix=str(item.get("prefix") or "demo"),
                save_checkpoint_steps=reader.integer(
                    item, "CheckpointMonitor.save_checkpoint_steps", 1, minimum=1
                ),
                keep_checkpoint_max=reader.integer(
                    item, "CheckpointMonitor.keep_checkpoint_max", 5, minimum=1
                ),
                checkpoint_format=str(item.get("checkpoint_format") or "safetensors"),
            )
    return CheckpointMonitor()


def _checkpoint_section(
    document: dict[str, Any], monitor: CheckpointMonitor, path: str
) -> tuple[CheckpointMonitor, CheckpointSection] | None:
    """The ``checkpoint:`` section and the CheckpointMonitor settings it overrides; None if absent."""
    if "checkpoint" not in document:
        return None
    section = document["checkpoint"] or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: checkpoint must be a mapping, found {type(section).__name__}")
    reader = _Reader(section, path)
    no_load_optim = section.get("no_load_optim", False)
    if not isinstance(no_load_optim, bool):
        raise ConfigError(f"{path}: checkpoint.no_load_optim must be true or false, found {no_load_optim!r}")
    merged = CheckpointMonitor(
        prefix=str(section.get("prefix") or monitor.prefix),
        save_checkpoint_steps=reader.integer(
            section, "checkpoint.save_interleaved_steps", monitor.save_checkpoint_steps, minimum=1
        ),
        keep_checkpoint_max=reader.integer(
            section, "checkpoint.save_max", monitor.keep_checkpoint_max, minimum=1
        ),
        checkpoint_format=monitor.checkpoint_format,
    )
    return merged, CheckpointSection(
        save_path=str(section.get("save_path") or ""),
        load_path=str(section.get("load_path") or ""),
        no_load_optim=no_load_optim,
    )


class _Reader:
    def __init__(self, document: dict[str, Any], path: str) -> None:
        self.document = document
        self.path = path

    def section(self, key: str) -> dict[str, Any]:
        value = self.document.get(key) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.path}: {key} must be a mapping, found {type(value).__name__}")
        return value

    def integer(
        self, section: dict[str, Any], dotted: str, default: int, *, minimum: int | None = None
    ) -> int:
        value = section.get(dotted.rsplit(".", 1)[-1], default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path}: {dotted} must be an integer, found {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.path}: {dotted} must be at least {minimum}, found {value}")
        return value

    def number(self, section: dict[str, Any], dotted: str, default: float) -> float:
        value = section.get(dotted.rsplit(".", 1)[-1], default)
        if value is None:
            value = default
        if isinstance(value, str):
            # PyYAML reads "1e-2" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.path}: {dotted} must be a number, found {value!r}")
        return float(value)
