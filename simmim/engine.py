"""The one training loop, shared by SimMIM pretraining and fine-tuning: `train(task, cfg)`, where the `Task`
holds what differs between them (the model and data, the loss, the evaluation and the export).

Steps are optimizer steps. A step consumes `grad_accum_steps` micro-batches of `batch_size` images on each
process. Everything that decides the next step (data position, learning rate, RNG) is a function of the
step and the saved state, so a run killed at any point and restarted with the same command ends with the
same weights as an uninterrupted one (see `simmim.checkpoints` and `simmim.data.build_loader`).
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from simmim import sharding
from simmim.batches import TrainBatches, read_stream_position
from simmim.checkpoints import CheckpointManager
from simmim.compilation import choose_compile, keep_cache_with_run
from simmim.config import DataConfig, OptimConfig, TrainConfig
from simmim.data import BadImageError, check_bad_fraction
from simmim.errors import CheckpointWriteError, NonFiniteLossError
from simmim.launch import peers_must_answer
from simmim.meter import LossMeter
from simmim.optim import ModelEma, Schedule, param_groups, set_lr
from simmim.precision import choose_precision
from simmim.run_log import RunLog
from simmim.rundir import EMA_WEIGHTS, EXPORT_DIR, STREAM_POSITION, snapshot_dir

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class Task:
    """What a kind of run gives the loop: its parts, built before training starts, and four methods.
    `simmim.pretrain.PretrainTask` and `simmim.finetune.FinetuneTask` are the two kinds; the tests drive the
    loop with a toy one.

    Attributes a task sets: `accelerator` (from `simmim.launch.make_accelerator`), `model` (not yet
    prepared), `train_set` (a dataset over a `.source`) and `collate_fn`."""

    accelerator: Accelerator
    model: nn.Module
    train_set: Any
    collate_fn: Callable
    # Higher is better: output_dir/export then holds the best evaluated weights (EMA weights compete too);
    # None: it holds the final weights.
    select_metric: str | None = None
    # Evaluate every train.eval_every_epochs epochs (unless train.eval_every_steps is set), not every
    # 1000 steps.
    eval_each_epoch: bool = False
    # Whether `probe` runs, every train.probe_every_steps and at the end.
    has_probe: bool = False

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one micro-batch (on the device), under the loop's autocast; `model` is prepared."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, step: int, log: RunLog) -> dict[str, float]:
        """Metrics of the unwrapped (or gathered) model on the held-out split; every process calls it."""
        return {}

    def export(self, model: nn.Module, directory: Path) -> None:
        """Write `model` as others load it (`simmim.exports.export_model`); the main process calls it."""
        raise NotImplementedError

    def probe(self, model: nn.Module) -> dict[str, float]:
        """Pretraining's online probe, on the main process."""
        return {}


DEFAULT_EVAL_EVERY_STEPS = 1000  # train.eval_every_steps unset: pretraining, and fine-tuning on a stream


@dataclass
class Counters:
    """Running totals kept in the trainer state (JSON) across resumes."""

    images_seen: int = 0
    images_skipped: int = 0
    best: dict[str, Any] = field(default_factory=dict)  # e.g. {"top1": 81.2, "step": 1200, "ema": False}
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records
    # Rollbacks after a non-finite loss or a spike: each one's record, and the optimizer steps' worth of
    # batches skipped so far (map-style data is read from step + data_offset on).
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    data_offset: int = 0
    loss_mean: float | None = None  # the running mean of the logged loss, that a spike is measured against


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the current step and exits."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def export_snapshot(export: Callable[[nn.Module, Path], None], model: nn.Module, directory: Path) -> None:
    """`export` into `directory` atomically: a run killed while writing leaves no half-written snapshot."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    export(model, tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


@dataclass
class TrainState:
    """The run's model, optimizer and schedule, and what a checkpoint restores beside the model, optimizer
    and RNG states that accelerate saves: the step, the counters and the EMA weights."""

    schedule: Schedule
    model: nn.Module  # prepared by accelerate
    optimizer: torch.optim.Optimizer
    ema: ModelEma | sharding.ShardedEma | None
    checkpoints: CheckpointManager
    step: int = 0
    counters: Counters = field(default_factory=Counters)
    stream_position: dict[str, Any] | None = None  # a stream: this process's loader state at `step`
    unsharded: sharding.Unsharded | None = None  # train.fsdp: the model is sharded, and this gathers it
    compiled: tuple[bool, str] = (False, "")  # whether the model was compiled, and why

    @classmethod
    def start(cls, cfg: Any, model: nn.Module, acc: Accelerator, num_samples: int | None) -> TrainState:
        """AdamW over the model's parameter groups, the EMA, and the newest checkpoint's state if any
        (`num_samples`: the training split's size, None for a stream)."""
        schedule = Schedule.build(num_samples, cfg.data, cfg.optim, cfg.train, acc.num_processes)
        if cfg.train.activation_checkpointing:
            model.gradient_checkpointing_enable()
        unsharded = None
        if cfg.train.fsdp:
            # The optimizer is built over the sharded parameters; accelerate wraps neither (simmim.sharding).
            unsharded = sharding.Unsharded(model)
            model = sharding.shard(
                model.to(acc.device), acc.device, acc.num_processes, cfg.train.fsdp_reshard_after_forward
            )
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        # Fused: one kernel for the whole update, as Transformers' Trainer by default. On a CPU it is about 4x
        # faster than torch's default there, a loop over the tensors (benchmarks/train_step.py
        # --study-model, its AdamW line); the sharded parameters of FSDP2 keep torch's default. A resumed
        # run keeps the update its checkpoint was saved with (the optimizer's state carries the choice).
        fused = acc.device.type in ("cuda", "cpu") and not cfg.train.fsdp
        optimizer = torch.optim.AdamW(
            groups, lr=schedule.peak_lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=fused or None
        )
        checkpoints = CheckpointManager(cfg.output_dir, acc, cfg.train.keep_last)
        latest = checkpoints.latest()
        first_choice = None if latest is None else checkpoints.trainer_state(latest).get("compiled")
        compiled = choose_compile(
            cfg.train.compile, acc.mixed_precision, acc.device.type, schedule.total_steps, first_choice
        )
        if compiled[0]:
            keep_cache_with_run(cfg.output_dir)  # a resume reuses the kernels compiled before
            model.compile()  # in place: parameter names (and so checkpoints) stay unchanged
        if unsharded is None:
            model, optimizer = acc.prepare(model, optimizer)
        ema = None
        if cfg.train.ema and unsharded is not None:
            ema = sharding.ShardedEma(cfg.train.ema, model, unsharded)
        elif cfg.train.ema:
            ema = ModelEma(cfg.train.ema, acc.unwrap_model(model))
        state = cls(schedule, model, optimizer, ema, checkpoints, unsharded=unsharded, compiled=compiled)
        if latest is not None:
            state.restore(latest, cfg, acc)
            acc.print(f"resuming from {latest} at step {state.step}/{schedule.total_steps}")
        size = (
            "a stream of training images"
            if schedule.is_stream
            else f"{num_samples} training images, {schedule.steps_per_epoch} steps/epoch"
        )
        acc.print(
            f"{size}, global batch {schedule.global_batch}, {schedule.total_steps} steps, "
            f"peak lr {schedule.peak_lr:.3g}"
        )
        return state

    def restore(self, path: Path, cfg: Any, acc: Accelerator) -> None:
        """The state of checkpoint `path`: model, optimizer and RNG (accelerate), shards, EMA, the step, the
        counters and a stream's position. At the start of a resumed run, and for a rollback."""
        saved, _ = self.checkpoints.load(path)
        self.step, self.counters = saved["step"], Counters(**saved["counters"])
        if self.unsharded is not None:
            sharding.load(self.model, self.optimizer, path, acc.process_index, self.ema)
        if self.schedule.is_stream:
            self.stream_position = read_stream_position(path, cfg.data.num_workers, acc)
        if isinstance(self.ema, ModelEma):
            self.ema.load_state_dict(self.checkpoints.load_tensors(path, EMA_WEIGHTS))

    def save(self, stream_position: dict[str, Any] | None = None) -> None:
        """A checkpoint at `self.step`; `stream_position`: this process's loader state, for a stream."""
        tensors = {EMA_WEIGHTS: self.ema.state_dict()} if isinstance(self.ema, ModelEma) else None
        own = {STREAM_POSITION: stream_position} if stream_position is not None else None
        shards = None
        if self.unsharded is not None:
            rank = self.checkpoints.accelerator.process_index
            shards = lambda d: sharding.save(self.model, self.optimizer, d, rank, self.ema)  # noqa: E731
        trainer_state = {"counters": self.counters.__dict__, "compiled": self.compiled[0]}
        self.checkpoints.save(self.step, trainer_state, tensors, own, shards)

    @contextmanager
    def full_model(self, acc: Accelerator) -> Iterator[nn.Module]:
        """The model as one module, for evaluation, probes and exports: the unwrapped model, or under
        train.fsdp an unsharded copy gathered from the shards (every process must enter this then), which
        goes back to the host on exit, so that between uses the device holds only shards."""
        if self.unsharded is None:
            yield acc.unwrap_model(self.model)
            return
        try:
            yield self.unsharded(self.model, acc.device)
        finally:
            self.unsharded.copy.cpu()

    @contextmanager
    def ema_model(self, acc: Accelerator) -> Iterator[nn.Module | None]:
        """The EMA weights as one module (under train.fsdp gathered from the shards, as `full_model`
        does), or None without an EMA."""
        if not isinstance(self.ema, sharding.ShardedEma):
            yield None if self.ema is None else self.ema.module
            return
        try:
            yield self.ema.gathered(acc.device)
        finally:
            self.ema.copy.cpu()

    def count(self, images: int, skipped: int, max_bad_fraction: float) -> None:
        """Add a flushed window's images; stop when too many could not be decoded."""
        c = self.counters
        c.images_seen += images
        c.images_skipped += skipped
        try:
            check_bad_fraction(c.images_skipped, c.images_seen + c.images_skipped, max_bad_fraction)
        except BadImageError as e:
            raise BadImageError(f"{e}; {self.checkpoints.intact()}") from e


def train_step(
    state: TrainState,
    batches: TrainBatches,
    loss_fn: LossFn,
    meter: LossMeter,
    acc: Accelerator,
    optim: OptimConfig,
) -> torch.Tensor:
    """One optimizer step over `optim.grad_accum_steps` micro-batches; returns the gradient norm (before
    clipping). `state.step` is the step being taken."""
    model, optimizer, accum = state.model, state.optimizer, optim.grad_accum_steps
    set_lr(optimizer, state.schedule.lr(state.step))
    for micro in range(accum):
        waited_from = time.perf_counter()
        batch, readable, skipped = batches.next()
        meter.data_wait += time.perf_counter() - waited_from
        weight = 1.0 / accum if readable else 0.0
        meter.skipped += skipped
        # Under DDP gradients are all-reduced only on the last micro-batch of the step; under train.fsdp
        # (no `no_sync`) each micro-batch's are reduce-scattered, so that they stay sharded.
        with nullcontext() if micro == accum - 1 else acc.no_sync(model), acc.autocast():
            loss = loss_fn(model, batch)
        acc.backward(loss * weight)
        if weight > 0:
            meter.add(loss.detach(), batch["pixel_values"].shape[0], state.step)
    # With no clipping, an infinite threshold still returns the norm for the log.
    grad_norm = sharding.full(acc.clip_grad_norm_(model.parameters(), optim.clip_grad or math.inf))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(acc.unwrap_model(model))
    return grad_norm


def evaluate_and_keep_best(
    state: TrainState,
    task: Task,
    log: RunLog,
    out: Path,
) -> None:
    """Evaluate the model (and its EMA); with the task's `select_metric`, export whichever is the best so far."""
    acc, evaluate, select_metric = task.accelerator, task.evaluate, task.select_metric
    # The unwrapped model (DDP's forward can sync buffers, and ranks may hold unequal shares of the split),
    # or under train.fsdp the gathered copy (a sharded forward would wait on every process).
    with state.full_model(acc) as unwrapped, state.ema_model(acc) as ema:
        step, counters = state.step, state.counters
        broadcast_buffers(unwrapped, acc)
        metrics = evaluate(unwrapped, step, log)
        if ema is not None:
            broadcast_buffers(ema, acc)  # each process averaged its own BatchNorm statistics
            metrics.update({f"ema_{k}": v for k, v in evaluate(ema, step, log).items()})
        log.write(step, metrics, kind="eval")
        counters.history.append({"step": step, "epoch": state.schedule.epoch(step), **metrics})
        if select_metric and metrics:
            candidates = [(metrics[select_metric], False)]
            if ema is not None:
                candidates.append((metrics[f"ema_{select_metric}"], True))
            value, is_ema = max(candidates, key=lambda c: c[0])
            if not counters.best or value > counters.best[select_metric]:
                counters.best = {select_metric: value, "step": step, "ema": is_ema}
                if acc.is_main_process:
                    task.export(ema if is_ema else unwrapped, out / EXPORT_DIR)
    acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def broadcast_buffers(model: nn.Module, acc: Accelerator) -> None:
    """Every process's buffers (BatchNorm's running statistics) set to the main process's, before an
    evaluation: DDP broadcasts them at the start of each forward, so after a step each process holds its
    own batch's update, and the ranks would evaluate different models. Rank 0's are the ones exported.
    (SyncBatchNorm would instead change training itself, to statistics over the global batch.)"""
    if acc.num_processes > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


@contextmanager
def evaluation_mode(model: nn.Module):
    model.eval()
    try:
        yield
    finally:
        model.train()


def train(task: Task, cfg: Any) -> dict[str, Any]:
    """Train `task.model` on `task.train_set` as `cfg` (a PretrainConfig or FinetuneConfig) says; returns the
    counters (also in the checkpoints' trainer_state.json).

    Every `evaluation_cadence` steps and at the end the task evaluates (and with its `select_metric` keeps
    the best export); every train.probe_every_steps it probes; the final weights are exported unless an
    evaluated best was."""
    acc, out, t, train_set = task.accelerator, Path(cfg.output_dir), cfg.train, task.train_set
    state = TrainState.start(cfg, task.model, acc, None if train_set.source.is_streaming else len(train_set))
    schedule, model = state.schedule, state.model
    log = RunLog(out, acc.is_main_process, resume_step=state.step, report_to=t.report_to, config=cfg)
    log_run_header(log, state, acc, t.precision)
    batches = TrainBatches.of_run(train_set, task.collate_fn, cfg, state, acc)
    meter = LossMeter(acc.device)
    eval_every = evaluation_cadence(t, schedule, task.eval_each_epoch)
    model.train()
    stopping = 0
    progress = dict(total=schedule.total_steps, initial=state.step, disable=not acc.is_main_process)
    # A lost peer process stops the run with one line (train.collective_timeout_s bounds a hung one's wait).
    peers = peers_must_answer(acc, lambda: state.step, state.checkpoints.intact)
    bugs = bugs_keep_their_traceback(state)
    with StopSignal() as stop, tqdm(**progress, dynamic_ncols=True) as bar, bugs, peers:
        while state.step < schedule.total_steps:
            try:
                grad_norm = train_step(state, batches, task.loss, meter, acc, cfg.optim)
                state.step += 1
                step, last = state.step, state.step == schedule.total_steps
                bar.update(1)
                if step % t.log_every_steps == 0 or last:
                    meter.check_finite(acc, state.checkpoints)
                    values = {**close_window(meter, state, acc, cfg.data), "grad_norm": float(grad_norm)}
                    check_spike(values["loss"], step, state, t)
                    log.write(step, values)
                    bar.set_postfix(
                        loss=f"{values['loss']:.4f}",
                        lr=f"{values['lr']:.2e}",
                        img_s=f"{values['img_per_s']:.0f}",
                    )
                if step % eval_every == 0 or last:
                    meter.check_finite(acc, state.checkpoints)
                    with evaluation_mode(model):
                        evaluate_and_keep_best(state, task, log, out)
                if task.has_probe and t.probe_every_steps and (step % t.probe_every_steps == 0 or last):
                    with evaluation_mode(model), state.full_model(acc) as full:
                        run_probe(task.probe, full, step, log, acc)
                epoch_done, in_epoch = divmod(
                    step, schedule.steps_per_epoch or step + 1
                )  # a stream: no epoch
                if in_epoch == 0 and epoch_done in t.snapshot_epochs:
                    # Before the save of this step: a run killed in between redoes the step and the snapshot.
                    with state.full_model(acc) as full:
                        if acc.is_main_process:
                            export_snapshot(task.export, full, snapshot_dir(out, epoch_done))
                stopping = _stop_requested(stop, acc)
                if step % t.save_every_steps == 0 or last or stopping:
                    meter.check_finite(acc, state.checkpoints)
                    # A save closes the logging window too: the checkpoint's counters hold every image so far.
                    close_window(meter, state, acc, cfg.data)
                    save_or_warn(state, batches, log, final=last or bool(stopping))
                if stopping:
                    break
            except NonFiniteLossError as failure:
                if not may_roll_back(t, schedule, state):
                    raise
                batches, meter = roll_back(state, failure, task, cfg, log)
                bar.n = state.step
                bar.refresh()
    log.close()
    if stopping:  # after the progress bar has closed, so that this is the last line printed
        acc.print(f"signal {stopping}: saved step {state.step}; run the same command again to resume")
        raise SystemExit(128 + stopping)
    if not task.select_metric or not state.counters.best:
        with state.full_model(acc) as full:
            if acc.is_main_process:
                task.export(full, out / EXPORT_DIR)
    acc.wait_for_everyone()
    return {"step": state.step, **state.counters.__dict__}


ROLLBACK_MIN_STEPS = 1000  # train.on_nonfinite=auto rolls back runs of at least this many steps


def may_roll_back(t: TrainConfig, schedule: Schedule, state: TrainState) -> bool:
    """Whether a non-finite loss or a spike rolls the run back (else it stops, naming the intact checkpoint):
    train.on_nonfinite=rollback, or auto on a run of ROLLBACK_MIN_STEPS steps or more (a short run is
    quicker to rerun with other settings); at most train.max_rollbacks times; never before a checkpoint."""
    wanted = t.on_nonfinite == "rollback" or (
        t.on_nonfinite == "auto" and schedule.total_steps >= ROLLBACK_MIN_STEPS
    )
    return (
        wanted and len(state.counters.rollbacks) < t.max_rollbacks and state.checkpoints.latest() is not None
    )


def roll_back(
    state: TrainState, failure: NonFiniteLossError, task: Task, cfg: Any, log: RunLog
) -> tuple[TrainBatches, LossMeter]:
    """Back to the last good checkpoint, past the batches that led to the failure (PaLM's remedy: restart
    before the spike and skip a few hundred batches), and on. The skipped window runs from the checkpoint's
    step to the failed step, and at least train.rollback_skip_batches optimizer steps; it is kept in the
    counters (data_offset: map-style data is read from step + data_offset; a stream is read past the
    skipped batches and its position saved), so that a resume from a later checkpoint skips the same
    batches, and a resume from an earlier one repeats the same rollbacks. Returns the new batches and a
    new loss meter."""
    acc, t = task.accelerator, cfg.train
    # What happened since the checkpoint is kept across the restore: the rollbacks made and the batches
    # skipped, so that a second failure before the next save skips further instead of repeating.
    rollbacks, offset = state.counters.rollbacks, state.counters.data_offset
    latest = state.checkpoints.latest()
    state.restore(latest, cfg, acc)
    skip = max(t.rollback_skip_batches, failure.step + 1 - state.step)
    record = {
        "seen": failure.seen,
        "at_step": failure.step,
        "restored_step": state.step,
        "skipped_steps": skip,
        "from_data_step": state.step + offset,
    }
    restored_offset = state.counters.data_offset
    state.counters.rollbacks = [*rollbacks, record]
    state.counters.data_offset = offset + skip
    batches = TrainBatches.of_run(task.train_set, task.collate_fn, cfg, state, acc)
    if state.schedule.is_stream:  # read past the skipped batches; the next checkpoint saves the position
        for _ in range((state.counters.data_offset - restored_offset) * cfg.optim.grad_accum_steps):
            batches.next()
    log.write(failure.step, record, kind="rollback")
    acc.print(
        f"warning: {failure.seen} at step {failure.step}: rolled back to {latest} (step {state.step}) and "
        f"skipped {skip} steps of batches (rollback {len(state.counters.rollbacks)} of {t.max_rollbacks})"
    )
    return batches, LossMeter(acc.device)


def check_spike(loss: float, step: int, state: TrainState, t: TrainConfig) -> None:
    """With train.spike_factor, a logged loss above that many times the running mean of the logged losses
    is a failure as a non-finite one is; otherwise it joins the mean (an average over about 10 windows)."""
    mean = state.counters.loss_mean
    if t.spike_factor is not None and mean is not None and loss > t.spike_factor * mean:
        raise NonFiniteLossError(
            f"the loss spiked to {loss:.4g} at step {step}, above train.spike_factor={t.spike_factor} times its "
            f"running mean {mean:.4g}; {state.checkpoints.intact()}",
            step=step - 1,
            seen=f"a loss spike ({loss:.4g}, {loss / mean:.1f}x its running mean)",
        )
    state.counters.loss_mean = loss if mean is None else 0.9 * mean + 0.1 * loss


def save_or_warn(state: TrainState, batches: TrainBatches, log: RunLog, final: bool) -> None:
    """Save a checkpoint. A periodic save that fails (a full disk, say) warns and training goes on: the
    previous checkpoint is intact, the work since it is what a kill would lose, and the next save may
    find room again. The last save of a run (or of a stop signal) that fails stops it with one line
    naming the intact checkpoint: ending without it would lose the run's end silently."""
    try:
        state.save(batches.stream_position())
    except CheckpointWriteError as e:
        # With several processes the failure may be one process's alone, which the others cannot know:
        # stopping is the only safe choice there.
        if final or state.checkpoints.accelerator.num_processes > 1:
            raise
        log.write(state.step, {"error": str(e)}, kind="save_failed")
        state.checkpoints.accelerator.print(f"warning: {e}; training goes on, the next save tries again")


def evaluation_cadence(t: TrainConfig, schedule: Schedule, by_epoch: bool) -> int:
    """Steps between evaluations: train.eval_every_steps when set; else (`by_epoch`, fine-tuning on
    map-style data) every train.eval_every_epochs epochs, or 1000 steps."""
    if t.eval_every_steps is not None:
        return t.eval_every_steps
    if by_epoch and not schedule.is_stream:
        return schedule.steps_per_epoch * (t.eval_every_epochs or 1)
    return DEFAULT_EVAL_EVERY_STEPS


def log_run_header(log: RunLog, state: TrainState, acc: Accelerator, precision: str) -> None:
    """The schedule and the autocast precision (with the reason it was chosen) as the run's first records."""
    log.write(state.step, {**state.schedule.__dict__, "num_processes": acc.num_processes}, kind="schedule")
    why = choose_precision(precision)[1]
    log.write(state.step, {"mixed_precision": acc.mixed_precision, "why": why}, kind="precision")
    acc.print(f"autocast: {'fp32 (none)' if acc.mixed_precision == 'no' else acc.mixed_precision}, as {why}")
    compiled, why = state.compiled
    log.write(state.step, {"compiled": compiled, "why": why}, kind="compile")
    acc.print(f"torch.compile: {'on' if compiled else 'off'}, as {why}")


@contextmanager
def bugs_keep_their_traceback(state: TrainState):
    """Inside the loop, a ValueError or OSError is no mistake of the user's (those are refused before the
    loop starts) but a bug or a machine failure: re-raised as a RuntimeError, which the command line shows
    with its traceback (simmim.cli reports ValueError and OSError in one line)."""
    try:
        yield
    except (ValueError, OSError) as e:
        raise RuntimeError(f"training stopped at step {state.step} by {type(e).__name__}: {e}") from e


def close_window(meter: LossMeter, state: TrainState, acc: Accelerator, data: DataConfig) -> dict[str, float]:
    """Fold the logging window into the counters (every process); returns the values of its log line."""
    images, skipped, mean_loss, seconds, wait = meter.close_window(acc)
    state.count(images, skipped, data.max_bad_fraction)
    schedule = state.schedule
    return {
        "loss": mean_loss,
        "lr": schedule.lr(state.step - 1),
        "img_per_s": images / seconds,
        # The share of the window's wall time the loop waited for the next batch: above a few percent,
        # the loader (data.num_workers, decoding) limits the run, not the model.
        "data_wait_s": wait,
        "data_wait_fraction": wait / seconds,
        **({} if schedule.is_stream else {"epoch": schedule.epoch(state.step)}),
        "images_skipped": state.counters.images_skipped,
    }


def run_probe(
    probe: Callable[[nn.Module], dict[str, float]], model: nn.Module, step: int, log: RunLog, acc: Accelerator
) -> None:
    """The online probe, on the main process only (its subsets are small, and it logs from there)."""
    if acc.is_main_process:
        values = probe(model)
        log.write(step, values, kind="probe")
        acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))


def _stop_requested(stop: StopSignal, acc: Accelerator) -> int:
    """The signal number if any process received SIGTERM/SIGINT (agreed across processes), else 0."""
    received = stop.received or 0
    if acc.num_processes > 1:
        received = int(acc.reduce(torch.tensor(received, device=acc.device), "max").item())
    return received
