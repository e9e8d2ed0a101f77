"""One rank's life: connect, load what the config names, train, save, say goodbye.

Owns the training loop and its side effects: progress lines on stdout, ``loss.jsonl`` (rank 0),
checkpoints at ``save_checkpoint_steps`` and at the last step (Checkpoint 1.0, or 2.0 iterations
when the config has a ``checkpoint:`` section), and the exit code (see
``examples.trainer.config``: 0 done, 1 failure worth a retry, 2 bad config, 3 unusable checkpoint).

Global step ``g`` runs from 1 to ``epochs * steps_per_epoch``; its epoch is ``(g - 1) //
steps_per_epoch + 1`` and its step within the epoch ``(g - 1) % steps_per_epoch + 1`` (the numbers
in the file name). A checkpoint saved after step ``g`` records ``step_num = global_step = g``;
resuming continues at ``g + 1``, rescaled by ``old / new`` global batch size when that changed (as
MindFormers does).

Determinism: the batch of step ``g`` depends on (dataset seed, ``g``) only, initial weights on the
model seed only, and every sum over ranks runs in rank order, so a run interrupted and resumed at
the same world size repeats an uninterrupted run's losses bit for bit (optimizer parallelism on or
off gives the same bits too). After a change of world size the weights and optimizer state carry
over exactly, only float32 sums run in another order. **Tolerance**: measured over 30 steps after
4 ranks (dp=2, mp=2) -> 2 ranks (dp=1, mp=2 or dp=2, mp=1) or 1 rank, global batch unchanged, the
loss differs from the uninterrupted 4-rank run's by at most 1.8e-7 relative (40-67% of the steps
are bit-identical); tests/test_trainer.py asserts 1e-5.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

from examples.trainer import checkpoint as ckpt
from examples.trainer import checkpoint2 as ckpt2
from examples.trainer import model
from examples.trainer.comm import Collective, CollectiveServer, CommError
from examples.trainer.config import EXIT_BAD_CHECKPOINT, EXIT_BAD_CONFIG, EXIT_FAILURE, TrainConfig


class AgreedExit(Exception):
    """Every rank knows the job must stop with ``code``: leave in order, without aborting the others."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def log(rank: int, message: str) -> None:
    print(f"[rank {rank}] {message}", flush=True)


def run_rank(
    config: TrainConfig,
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    attempt: int | str | None,
) -> int:
    """Train as ``rank``; returns the process exit code."""
    server: CollectiveServer | None = None
    comm: Collective | None = None
    try:
        if rank == 0:
            server = CollectiveServer(
                master_port, world_size, bind_timeout=min(30.0, config.connect_timeout_seconds)
            )
            server.start()
        # Rank 0 reaches its own service over loopback: its pod's DNS name may not be published yet.
        comm = Collective.connect(
            "127.0.0.1" if rank == 0 else master_addr,
            master_port,
            rank,
            world_size,
            timeout=config.comm_timeout_seconds,
            connect_timeout=config.connect_timeout_seconds,
        )
        Trainer(config, rank, world_size, comm, attempt).run()
        comm.close()
        comm = None
        if server is not None and not server.wait_finished(config.comm_timeout_seconds):
            log(rank, "not every rank said goodbye; exiting anyway")
        log(rank, "training finished")
        return 0
    except AgreedExit as exc:
        log(rank, str(exc))
        assert comm is not None
        comm.close()
        comm = None
        if server is not None:
            server.wait_finished(config.comm_timeout_seconds)
        return exc.code
    except CommError as exc:
        log(rank, f"FAILED: {exc}")
        return EXIT_FAILURE
    except ckpt.CheckpointConfigError as exc:
        log(rank, f"FAILED (bad config): {exc}")
        return EXIT_BAD_CONFIG
    except ckpt.CheckpointLoadError as exc:
        log(rank, f"FAILED (checkpoint): {exc}")
        return EXIT_BAD_CHECKPOINT
    except OSError as exc:
        log(rank, f"FAILED (I/O): {exc}")
        return EXIT_FAILURE
    finally:
        failed = comm is not None
        if comm is not None:
            comm.abandon()  # the service then aborts the job for every other rank
        if server is not None:
            if failed:
                server.abort("rank 0 failed")
            server.close()


class Trainer:
    def __init__(
        self, config: TrainConfig, rank: int, world_size: int, comm: Collective, attempt: int | str | None
    ) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.comm = comm
        self.attempt = attempt
        self.placement = model.Placement(rank, config.data_parallel, config.model_parallel)
        self.params: dict[str, np.ndarray] = {}
        self.moments: dict[str, np.ndarray] = {}
        self.done_steps = 0  # global steps already trained
        self.from_scratch = True
        # Rows of each weight's model-parallel slice this rank's optimizer owns (all rows unless
        # parallel.enable_parallel_optimizer); moments are kept and saved for those rows only.
        self.chunks = {name: ckpt.optimizer_chunk(config, self.placement, name) for name in model.PARAM_NAMES}
        self.sharded_optimizer = any(
            self.chunks[name] != slice(0, self._slice_rows(name)) for name in model.PARAM_NAMES
        )
        self.weights_to_gather = False  # loaded weights are optimizer chunks: all-gather them
        self.gather_plan = self._plan_gather()

    def _plan_gather(self) -> dict[tuple[int, ...], list[tuple[str, bool]]]:
        """Replica group -> [(weight, whether this rank contributes its chunk)] for the weight all-gather.

        A weight's replica group is every rank holding the same model-parallel slice. Its optimizer
        chunks are spread over that group, possibly with several ranks holding (identical copies
        of) one chunk; only the lowest of those contributes, so the zero-padded sum is exact.
        """
        config = self.config
        placements = [
            model.Placement(r, config.data_parallel, config.model_parallel) for r in range(self.world_size)
        ]
        plan: dict[tuple[int, ...], list[tuple[str, bool]]] = {}
        for name in model.PARAM_NAMES:
            whole = [ckpt.rank_block(config, p, name, optimizer_shard=False) for p in placements]
            chunk = [ckpt.rank_block(config, p, name, optimizer_shard=True) for p in placements]
            group = tuple(r for r in range(self.world_size) if whole[r] == whole[self.rank])
            first_holder = min(r for r in group if chunk[r] == chunk[self.rank])
            plan.setdefault(group, []).append((name, first_holder == self.rank))
        return plan

    def _slice_rows(self, name: str) -> int:
        block = ckpt.rank_block(self.config, self.placement, name, optimizer_shard=False)
        return block[0].stop - block[0].start

    def run(self) -> None:
        config = self.config
        self._load_agreed()
        ckpt.write_strategy(config, self.rank)
        directory = ckpt.rank_dir(config, self.rank)
        if config.checkpoint2 is None:
            prefix = ckpt.choose_prefix(directory, f"{config.checkpoint.prefix}_rank_{self.rank}")
            saving = f"prefix {prefix}"
        else:
            prefix = config.checkpoint.prefix
            saving = f"Checkpoint 2.0 iterations in {config.checkpoint_root}"
        log(
            self.rank,
            f"world {self.world_size} (dp={config.data_parallel}, mp={config.model_parallel}), "
            f"starting at global step {self.done_steps + 1} of {config.total_steps}, {saving}",
        )
        local_batch = config.global_batch_size // config.data_parallel
        rows = slice(self.placement.dp_index * local_batch, (self.placement.dp_index + 1) * local_batch)
        for global_step in range(self.done_steps + 1, config.total_steps + 1):
            started = time.monotonic()
            epoch = (global_step - 1) // config.steps_per_epoch + 1
            step = (global_step - 1) % config.steps_per_epoch + 1
            inputs, targets = model.global_batch(config, global_step)
            grads, loss_part = model.local_forward_backward(
                self.params,
                inputs[rows],
                targets[rows],
                config.global_batch_size,
                lambda partial: self.comm.all_reduce(partial, self.placement.tp_group),
            )
            flat = self.comm.all_reduce(model.pack(grads, loss_part), self.placement.dp_group)
            grads, loss = model.unpack(flat, self.params)
            # Views into the weights: the update writes this rank's rows in place.
            owned = {name: self.params[name][self.chunks[name]] for name in model.PARAM_NAMES}
            model.adamw_update(
                owned,
                self.moments,
                {name: grads[name][self.chunks[name]] for name in model.PARAM_NAMES},
                step=global_step,
                lr=model.learning_rate(config, global_step),
                betas=config.betas,
                eps=config.eps,
                weight_decay=config.weight_decay,
            )
            if self.sharded_optimizer:
                self._gather_weights()
            self.done_steps = global_step
            # MindFormers' per-step line (its loss monitor's), as a real job's log shows it: the
            # operator's progress watchdog reads the step from it.
            log(
                self.rank,
                f"{{ Epoch:[{epoch:3d}/{config.epochs:3d}], step:[{step:5d}/{config.steps_per_epoch:5d}], "
                f"loss: {loss:.8f}, per_step_time: {(time.monotonic() - started) * 1000:.0f}ms, "
                f"lr: {model.learning_rate(config, global_step):.6g}, overflow cond: False, loss_scale: 1.0 "
                f"(global_step {global_step})",
            )
            if self.rank == 0:
                self._append_loss(epoch, step, global_step, loss)
            if (
                global_step % config.checkpoint.save_checkpoint_steps == 0
                or global_step == config.total_steps
            ):
                self._save(directory, prefix, epoch, step, global_step)
                if config.save_delay_seconds:
                    time.sleep(config.save_delay_seconds)
            if config.fail_at_global_step == global_step and self.from_scratch:
                # Every rank finishes (and checkpoints) this step first, so the fault is deterministic.
                self.comm.barrier()
                if self.rank == config.fail_rank:
                    log(
                        self.rank,
                        f"fail_at_global_step {global_step}: exiting with code 1 (demo fault injection)",
                    )
                    sys.stdout.flush()
                    os._exit(EXIT_FAILURE)
            if config.step_delay_seconds:
                time.sleep(config.step_delay_seconds)
        self.comm.barrier()

    def _load_agreed(self) -> None:
        """Load, then agree with every rank on the outcome, so all ranks exit with the same code.

        This collective is also the start barrier: every rank connected and loaded (ranks may
        start far apart, hence the connect timeout).
        """
        outcome = np.zeros(4, dtype=np.float32)  # [ok, bad config, bad checkpoint, weights to gather]
        error: Exception | None = None
        try:
            self._load()
            outcome[0] = 1
            outcome[3] = self.weights_to_gather
        except ckpt.CheckpointConfigError as exc:
            error, outcome[1] = exc, 1
        except ckpt.CheckpointLoadError as exc:
            error, outcome[2] = exc, 1
        everyone = self.comm.all_reduce(
            outcome, tuple(range(self.world_size)), timeout=self.config.connect_timeout_seconds
        )
        if everyone[1]:
            detail = (
                str(error)
                if error
                else f"{int(everyone[1])} other rank(s) found the checkpoint config unusable"
            )
            raise AgreedExit(EXIT_BAD_CONFIG, f"FAILED (bad config): {detail}")
        if everyone[2]:
            detail = (
                str(error) if error else f"{int(everyone[2])} other rank(s) could not load their checkpoint"
            )
            raise AgreedExit(EXIT_BAD_CHECKPOINT, f"FAILED (checkpoint): {detail}")
        if everyone[3] not in (0, self.world_size):
            raise AgreedExit(
                EXIT_BAD_CHECKPOINT,
                "FAILED (checkpoint): some ranks hold optimizer-sharded weights and others whole slices",
            )
        if everyone[3]:
            self._gather_weights()

    def _gather_weights(self) -> None:
        """All-gather the weights' optimizer chunks: a sum of zero-padded chunks, so exact."""
        for group, members in sorted(self.gather_plan.items()):
            padded = []
            for name, contributes in members:
                buffer = np.zeros_like(self.params[name])
                if contributes:
                    buffer[self.chunks[name]] = self.params[name][self.chunks[name]]
                padded.append(buffer.ravel())
            flat = self.comm.all_reduce(np.concatenate(padded), group)
            offset = 0
            for name, _ in members:
                size = self.params[name].size
                self.params[name] = flat[offset : offset + size].reshape(self.params[name].shape).copy()
                offset += size

    def _load(self) -> None:
        config = self.config
        full = model.init_full_params(config)
        shapes = model.full_shapes(config)
        for name in model.PARAM_NAMES:
            self.params[name] = np.ascontiguousarray(
                full[name][model.local_slices(name, shapes[name], self.placement)]
            )
        for state in model.OPTIMIZER_STATES:
            for name in model.PARAM_NAMES:
                self.moments[f"{state}.{name}"] = np.zeros_like(self.params[name][self.chunks[name]])
        if config.checkpoint2 is not None:
            loaded = ckpt2.load_iteration(config, self.placement)
        else:
            loaded = ckpt.load_for_rank(config, self.placement, self.world_size)
        if loaded is None:
            log(self.rank, f"load_checkpoint {config.load_checkpoint!r} holds nothing: starting from scratch")
            return
        tensors = loaded.tensors
        for name in model.PARAM_NAMES:
            chunk = self.chunks[name]
            if self.sharded_optimizer and tensors[name].shape == self.params[name][chunk].shape:
                self.params[name][chunk] = tensors[name]  # the other rows come from the dp peers
                self.weights_to_gather = True
            else:
                self.params[name] = _as_f32(tensors[name], self.params[name].shape, name, loaded.source)
        if not loaded.restore_training_state:
            log(
                self.rank,
                f"loaded weights from {loaded.source} (resume_training off: optimizer and step restart)",
            )
            return
        self.from_scratch = False
        missing = [n for n in self.moments if n not in tensors]
        if missing:
            log(self.rank, f"{loaded.source} has no optimizer state {missing}: moments start at zero")
        for name in self.moments:
            if name not in tensors:
                continue
            value = tensors[name]
            chunk = self.chunks[ckpt.base_name(name)]
            if (
                value.shape != self.moments[name].shape
                and value.shape == self.params[ckpt.base_name(name)].shape
            ):
                value = value[chunk]  # a whole model-parallel slice: keep this rank's rows
            self.moments[name] = _as_f32(value, self.moments[name].shape, name, loaded.source)
        if "step_num" not in tensors:
            raise ckpt.CheckpointLoadError(f"{loaded.source}: no step_num, cannot resume training from it")
        done = int(np.asarray(tensors["step_num"]).reshape(-1)[0])
        if "global_batch_size" in tensors:
            saved_batch = int(np.asarray(tensors["global_batch_size"]).reshape(-1)[0])
            if saved_batch and saved_batch != config.global_batch_size:
                rescaled = done * saved_batch // config.global_batch_size
                log(
                    self.rank,
                    f"global batch {saved_batch} -> {config.global_batch_size}: step {done} -> {rescaled}",
                )
                done = rescaled
        self.done_steps = min(done, config.total_steps)
        log(self.rank, f"resumed from {loaded.source}: {done} steps done")

    def _save(self, directory: str, prefix: str, epoch: int, step: int, global_step: int) -> None:
        config = self.config
        if config.checkpoint2 is not None:
            self._save_iteration(epoch, step, global_step)
            return
        tensors: dict[str, np.ndarray] = {
            name: np.ascontiguousarray(self.params[name][self.chunks[name]]) for name in model.PARAM_NAMES
        }
        tensors.update(self.moments)
        tensors.update(
            {
                "global_step": np.array([global_step], dtype=np.int32),
                "epoch_num": np.array([epoch], dtype=np.int32),
                "step_num": np.array([global_step], dtype=np.int32),
                "loss_scale": np.array([1.0], dtype=np.float32),
                "global_batch_size": np.array([config.global_batch_size], dtype=np.int32),
                "current_iterator_step": np.array([global_step], dtype=np.int32),
            }
        )
        name = ckpt.checkpoint_name(prefix, epoch, step)
        ckpt.save_checkpoint(directory, name, tensors, epoch=epoch, step_in_epoch=step)
        removed = ckpt.prune(directory, prefix, config.checkpoint.keep_checkpoint_max)
        log(self.rank, f"saved {name}" + (f", removed {', '.join(removed)}" if removed else ""))

    def _save_iteration(self, epoch: int, step: int, global_step: int) -> None:
        """Checkpoint 2.0, in MindFormers' order: directory (rank 0), every rank's model then optimizer
        shard, ``common.json`` and ``metadata.json`` (rank 0), and once all are done the tracker."""
        config = self.config
        removed: list[str] = []
        if self.rank == 0:
            removed = ckpt2.prepare_iteration(config, global_step)
        self.comm.barrier()
        weights = {
            name: np.ascontiguousarray(self.params[name][self.chunks[name]]) for name in model.PARAM_NAMES
        }
        ckpt2.write_shards(config, global_step, self.rank, self.world_size, weights, dict(self.moments))
        if self.rank == 0:
            counters = {
                "epoch_num": epoch,
                "step_num": step,
                "global_step": global_step,
                "loss_scale": 1.0,
                "global_batch_size": config.global_batch_size,
                "ckpt_status": 0,
            }
            ckpt2.write_common(config, global_step, counters)
            if self.world_size > 1:  # MindFormers writes no metadata.json for one rank
                ckpt2.write_metadata(config, global_step, self.world_size)
        self.comm.barrier()
        if self.rank == 0:
            ckpt2.write_tracker(config, global_step)
        name = f"iteration_{global_step:08d}"
        log(self.rank, f"saved {name}" + (f", removed {', '.join(removed)}" if removed else ""))

    def _append_loss(self, epoch: int, step: int, global_step: int, loss: float) -> None:
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "global_step": global_step,
            "loss": loss,
            "loss_hex": float.hex(loss),
            "world": self.world_size,
            "attempt": self.attempt,
        }
        os.makedirs(self.config.output_dir, exist_ok=True)
        with open(os.path.join(self.config.output_dir, "loss.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def _as_f32(value: np.ndarray, shape: tuple[int, ...], name: str, source: str) -> np.ndarray:
    if tuple(value.shape) != tuple(shape):
        raise ckpt.CheckpointConfigError(
            f"{source}: {name!r} has shape {list(value.shape)}, this rank needs {list(shape)} "
            "(saved with another parallel_config? set auto_trans_ckpt: True or convert the checkpoint)"
        )
    return np.array(value, dtype=np.float32, copy=True)
