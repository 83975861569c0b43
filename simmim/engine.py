"""The one training loop, shared by SimMIM pretraining and fine-tuning: they differ only in `loss_fn`.

Steps are optimizer steps. A step consumes `grad_accum_steps` micro-batches of `batch_size` images on each
process. Everything that decides the next step (data position, learning rate, RNG) is a function of the
step and the saved state, so a run killed at any point and restarted with the same command ends with the
same weights as an uninterrupted one (see `simmim.checkpoints` and `simmim.data.build_loader`).
"""

from __future__ import annotations

import json
import math
import os
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
from simmim.checkpoints import CheckpointManager, own_file_name
from simmim.compilation import choose_compile, keep_cache_with_run
from simmim.config import DataConfig, OptimConfig, TrainConfig
from simmim.data import BadImageError, build_loader, check_bad_fraction
from simmim.optim import ModelEma, lr_at, param_groups, scaled_lr, set_lr
from simmim.precision import choose_precision
from simmim.run_log import RunLog
from simmim.runs import EXPORT_DIR, SNAPSHOTS_DIR

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvaluateFn = Callable[[nn.Module, int, RunLog], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    pass


DEFAULT_WARMUP_EPOCHS = 10.0  # optim.warmup_epochs and optim.warmup_steps both unset, map-style data
DEFAULT_EVAL_EVERY_STEPS = 1000  # train.eval_every_steps unset: pretraining, and fine-tuning on a stream


@dataclass(frozen=True)
class Schedule:
    """Durations turned into optimizer steps once, from the data size and the global batch; a stream
    (`num_samples` None) has no epochs, and its durations are steps already (train.max_steps)."""

    micro_batches_per_epoch: int | None  # per process, = samples // (batch_size * world_size)
    steps_per_epoch: int | None  # None: a stream
    total_steps: int  # where training stops (max_steps cap applied)
    schedule_steps: int  # where the cosine ends (epochs * steps_per_epoch)
    warmup_steps: int
    global_batch: int  # images per optimizer step over all processes and accumulation
    peak_lr: float
    min_lr: float

    @classmethod
    def build(
        cls,
        num_samples: int | None,
        data: DataConfig,
        optim: OptimConfig,
        train: TrainConfig,
        world_size: int,
    ):
        global_batch = data.batch_size * world_size * optim.grad_accum_steps
        lrs = dict(
            peak_lr=scaled_lr(optim.base_lr, global_batch), min_lr=scaled_lr(optim.min_lr, global_batch)
        )
        if num_samples is None:
            if train.max_steps is None or optim.warmup_epochs is not None:
                raise ValueError(
                    "a stream's schedule needs train.max_steps, and warmup in optim.warmup_steps"
                )
            steps = train.max_steps
            return cls(None, None, steps, steps, optim.warmup_steps or 0, global_batch, **lrs)
        micro = num_samples // (data.batch_size * world_size)
        steps_per_epoch = micro // optim.grad_accum_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {num_samples} images, fewer than one optimizer step needs "
                f"(data.batch_size={data.batch_size} x {world_size} processes x optim.grad_accum_steps="
                f"{optim.grad_accum_steps}); lower the batch size or use more data"
            )
        schedule_steps = train.epochs * steps_per_epoch
        total = schedule_steps if train.max_steps is None else min(schedule_steps, train.max_steps)
        if optim.warmup_steps is not None:
            warmup = optim.warmup_steps
        else:
            warmup_epochs = DEFAULT_WARMUP_EPOCHS if optim.warmup_epochs is None else optim.warmup_epochs
            warmup = round(warmup_epochs * steps_per_epoch)
        return cls(micro, steps_per_epoch, total, schedule_steps, warmup, global_batch, **lrs)

    @property
    def is_stream(self) -> bool:
        return self.steps_per_epoch is None

    def epoch(self, step: int) -> float | None:
        """Epochs done after `step` steps (None on a stream)."""
        return None if self.is_stream else step / self.steps_per_epoch

    def lr(self, step: int) -> float:
        return lr_at(
            step,
            peak_lr=self.peak_lr,
            total_steps=self.schedule_steps,
            warmup_steps=self.warmup_steps,
            min_lr=self.min_lr,
        )


@dataclass
class Counters:
    """Running totals kept in the trainer state (JSON) across resumes."""

    images_seen: int = 0
    images_skipped: int = 0
    best: dict[str, Any] = field(default_factory=dict)  # e.g. {"top1": 81.2, "step": 1200, "ema": False}
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records


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


def make_accelerator(precision: str = "launcher", fsdp: bool = False) -> Accelerator:
    """The run's Accelerator, with autocast as `train.precision` asks (see `simmim.precision`); `fsdp`
    (train.fsdp) needs several processes to shard over.

    `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA would otherwise start N
    unrelated single-process runs: there, the processes join over gloo on CPU.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # ZeRO would shard the model its own way, behind the loop's back (simmim.sharding says more).
        raise ValueError(
            "ACCELERATE_USE_DEEPSPEED=true (accelerate launch with DeepSpeed): simmim shards with FSDP2; "
            "launch with --config_file recipes/accelerate/fsdp.yaml"
        )
    # An FSDP launch: training has read it as train.fsdp=true (sharding.follow_launcher); anything else (an
    # evaluation) runs replicated. accelerate must not wrap the model with its own FSDP either way.
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if fsdp and not multi_process:
        raise ValueError(
            "train.fsdp=true shards the model across processes, and this is one: launch with accelerate "
            "launch --config_file recipes/accelerate/fsdp.yaml --num_processes N (N >= 2)"
        )
    mixed, _ = choose_precision(precision)
    if fsdp and mixed == "fp16":  # accelerate launch --mixed_precision fp16 with train.precision=launcher
        raise ValueError("fp16 autocast with train.fsdp=true: its gradient scaler does not reach the sharded "
                         "optimizer; launch with --mixed_precision bf16")  # fmt: skip
    return Accelerator(cpu=multi_process and not torch.cuda.is_available(), mixed_precision=mixed)


def export_snapshot(export: Callable[[nn.Module, Path], None], model: nn.Module, directory: Path) -> None:
    """`export` into `directory` atomically: a run killed while writing leaves no half-written snapshot."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    export(model, tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def loader_options(cfg: Any, acc: Accelerator, collate_fn: Callable) -> dict[str, Any]:
    """`build_loader`'s arguments for this process's share of the training data."""
    return dict(
        batch_size=cfg.data.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        pin_memory=cfg.data.pin_memory and acc.device.type == "cuda",
        collate_fn=collate_fn,
    )


def micro_batches(
    train_set, collate_fn, cfg, schedule: Schedule, step: int, acc: Accelerator
) -> Iterator[dict]:
    """Micro-batches of map-style data from optimizer step `step` onwards, epoch after epoch, with the
    loader placed exactly."""
    accum, options = cfg.optim.grad_accum_steps, loader_options(cfg, acc, collate_fn)
    epoch, step_in_epoch = divmod(step, schedule.steps_per_epoch)
    while True:
        loader = build_loader(train_set, epoch=epoch, start_batch=step_in_epoch * accum, **options)
        # Micro-batches past the last whole optimizer step of the epoch are not used.
        remaining = (schedule.steps_per_epoch - step_in_epoch) * accum
        for i, batch in enumerate(loader):
            if i == remaining:
                break
            yield batch
        epoch, step_in_epoch = epoch + 1, 0


def evaluation_loader(dataset, cfg: Any, acc: Accelerator, collate_fn: Callable):
    """This process's share of a held-out split, in order, every image once."""
    options = loader_options(cfg, acc, collate_fn)
    return build_loader(dataset, **{**options, "shuffle": False, "drop_last": False, "pin_memory": False})


class LossMeter:
    """The loss and image counts of the current logging window, kept on the device: the step never waits
    for a read-back, which happens only when the window is closed (`.item()`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), device=self.device)
        # The first step whose loss was not finite, -1 while none was: checked at each log, eval and save.
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.micro_batches = self.images = self.skipped = 0
        self.data_wait = 0.0  # seconds the loop waited for the loader in this window
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, images: int, step: int) -> None:
        """One readable micro-batch of `images` images and its (detached) loss."""
        self.loss_sum += loss
        self.first_bad_step = torch.where(
            (self.first_bad_step < 0) & ~torch.isfinite(loss),
            torch.full_like(self.first_bad_step, step),
            self.first_bad_step,
        )
        self.micro_batches += 1
        self.images += images

    def check_finite(self, acc: Accelerator, checkpoints: CheckpointManager) -> None:
        """Stop (every process) if any process saw a non-finite loss, naming the last good checkpoint."""
        bad = self.first_bad_step.clone()
        bad = int(acc.reduce(bad, "max").item()) if acc.num_processes > 1 else int(bad.item())
        if bad >= 0:
            raise NonFiniteLossError(
                f"the loss became non-finite at step {bad}; {intact(checkpoints)}. "
                "Lower optim.base_lr or enable optim.clip_grad."
            )

    def close_window(self, acc: Accelerator) -> tuple[int, int, float, float, float]:
        """(images, skipped images, mean loss, seconds, seconds waiting for the loader) of the window over all
        processes (the wait: the slowest process's); starts a new one."""
        seen = acc.reduce(torch.tensor([self.images, self.skipped], device=self.device), "sum")
        mean_loss = acc.reduce(self.loss_sum, "mean").item() / max(self.micro_batches, 1)
        wait = self.data_wait
        if acc.num_processes > 1:
            wait = acc.reduce(torch.tensor(wait, device=self.device), "max").item()
        seconds = time.perf_counter() - self.start
        self.loss_sum.zero_()
        self.micro_batches = self.images = self.skipped = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()
        return int(seen[0]), int(seen[1]), mean_loss, seconds, wait


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
        # Fused on CUDA: one kernel for the whole update instead of a few per tensor group.
        optimizer = torch.optim.AdamW(
            groups,
            lr=schedule.peak_lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            fused=True if acc.device.type == "cuda" else None,
        )
        compiled = choose_compile(
            cfg.train.compile, acc.mixed_precision, acc.device.type, schedule.total_steps
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
        checkpoints = CheckpointManager(cfg.output_dir, acc, cfg.train.keep_last)
        state = cls(schedule, model, optimizer, ema, checkpoints, unsharded=unsharded, compiled=compiled)
        latest = state.checkpoints.latest()
        if latest is not None:
            saved, path = state.checkpoints.load(latest)
            state.step, state.counters = saved["step"], Counters(**saved["counters"])
            if unsharded is not None:
                sharding.load(model, optimizer, path, acc.process_index, ema)
            if schedule.is_stream:
                state.stream_position = read_stream_position(path, cfg.data.num_workers, acc)
            if isinstance(ema, ModelEma):
                ema.load_state_dict(state.checkpoints.load_tensors(path, "ema.safetensors"))
            acc.print(f"resuming from {path} at step {state.step}/{schedule.total_steps}")
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

    def save(self, stream_position: dict[str, Any] | None = None) -> None:
        """A checkpoint at `self.step`; `stream_position`: this process's loader state, for a stream."""
        tensors = {"ema.safetensors": self.ema.state_dict()} if isinstance(self.ema, ModelEma) else None
        own = {STREAM_POSITION: stream_position} if stream_position is not None else None
        shards = None
        if self.unsharded is not None:
            rank = self.checkpoints.accelerator.process_index
            shards = lambda d: sharding.save(self.model, self.optimizer, d, rank, self.ema)  # noqa: E731
        self.checkpoints.save(self.step, {"counters": self.counters.__dict__}, tensors, own, shards)

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
            raise BadImageError(f"{e}; {intact(self.checkpoints)}") from e


def intact(checkpoints: CheckpointManager) -> str:
    """What an error that stops a run says of its checkpoints."""
    latest = checkpoints.latest()
    if latest is None:
        return "no checkpoint had been saved yet"
    return f"the last good checkpoint ({latest}) is intact: run the same command again to resume from it"


STREAM_POSITION = "stream_position.json"  # per process: stream_position_<rank>.json


def read_stream_position(path: Path, num_workers: int, acc: Accelerator) -> dict[str, Any]:
    """This process's stream loader state in checkpoint `path`, checked against the run's loader workers:
    the state holds one position per worker, so a resumed stream needs the same number."""
    file = path / own_file_name(STREAM_POSITION, acc.process_index)
    if not file.is_file():
        raise ValueError(
            f"{path} holds no {file.name}: it was not saved by a streaming run (data.streaming=true), or by "
            "fewer processes; resume it as it was run"
        )
    position = json.loads(file.read_text())
    if position["num_processes"] != acc.num_processes:
        raise ValueError(
            f"{path} was saved by a stream read by {position['num_processes']} processes, and this run has "
            f"{acc.num_processes}: the shards are dealt to processes x workers, so resume with as many processes"
        )
    if position["num_workers"] != num_workers:
        raise ValueError(
            f"data.num_workers={num_workers}, but {path} was saved by a stream read with "
            f"data.num_workers={position['num_workers']}: each worker's position is saved, so resume with "
            f"data.num_workers={position['num_workers']}"
        )
    return position


class TrainBatches:
    """The loop's micro-batches on the device from the state's step on, each with its loss weight.

    A micro-batch whose every image was unreadable still has to go through a forward and backward on every
    process (DDP all-reduces), so the last readable batch goes through again with weight 0; a process whose
    first micro-batch was unreadable reads one from the start of the split (`fallback_batch`)."""

    def __init__(
        self,
        batches: Iterator[dict],
        device: torch.device,
        fallback: Callable[[], dict],
        stream_loader: Any = None,
        num_processes: int = 1,
    ) -> None:
        self.batches, self.device, self.fallback = batches, device, fallback
        self.stream_loader = stream_loader  # a stream's StatefulDataLoader, whose state a checkpoint keeps
        self.num_processes = num_processes
        self.last: dict[str, Any] | None = None

    @classmethod
    def of_run(cls, train_set, collate_fn: Callable, cfg: Any, state: TrainState, acc: Accelerator):
        fallback = lambda: fallback_batch(train_set, cfg, collate_fn, acc.device)  # noqa: E731
        if not state.schedule.is_stream:
            batches = micro_batches(train_set, collate_fn, cfg, state.schedule, state.step, acc)
            return cls(batches, acc.device, fallback)
        # One loader for the whole run, each of its workers reading pass after pass, placed where the
        # checkpoint's loader state says (simmim.data.loader._StreamedItems).
        loader = build_loader(
            train_set,
            repeat=True,
            shuffle_buffer=cfg.data.shuffle_buffer,
            stream_state=state.stream_position and state.stream_position["loader"],
            **loader_options(cfg, acc, collate_fn),
        )
        return cls(iter(loader), acc.device, fallback, stream_loader=loader, num_processes=acc.num_processes)

    def stream_position(self) -> dict[str, Any] | None:
        """The stream loader's state after the micro-batches taken so far (None for map-style data)."""
        if self.stream_loader is None:
            return None
        loader = self.stream_loader
        return {
            "num_processes": self.num_processes,
            "num_workers": loader.num_workers,
            "loader": loader.state_dict(),
        }

    def next(self) -> tuple[dict[str, Any], bool, int]:
        """(batch, whether it is this micro-batch's own, images skipped while reading it)."""
        batch = next(self.batches)
        skipped = batch["num_skipped"]
        if len(batch["index"]) == 0:
            return (self.last if self.last is not None else self.fallback()), False, skipped
        self.last = move_to(batch, self.device)
        return self.last, True, skipped


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
    evaluate: EvaluateFn,
    log: RunLog,
    acc: Accelerator,
    select_metric: str | None,
    export: Callable[[nn.Module, Path], None],
    out: Path,
) -> None:
    """Evaluate the model (and its EMA); with `select_metric`, export whichever is the best so far."""
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
                    export(ema if is_ema else unwrapped, out / EXPORT_DIR)
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


def fallback_batch(train_set, cfg: Any, collate_fn: Callable, device: torch.device) -> dict[str, Any]:
    """Any readable training batch (built only if a process's first micro-batch was all unreadable)."""
    loader = build_loader(
        train_set, batch_size=cfg.data.batch_size, shuffle=False, drop_last=False, num_workers=0,
        seed=cfg.seed, collate_fn=collate_fn,
    )  # fmt: skip
    for batch in loader:
        if len(batch["index"]):
            return move_to(batch, device)
    raise BadImageError(f"no image of the training split {cfg.data.path} could be decoded")


def train(
    cfg: Any,
    *,
    accelerator: Accelerator,
    model: nn.Module,
    train_set: Any,
    collate_fn: Callable,
    loss_fn: LossFn,
    evaluate: EvaluateFn | None,
    export: Callable[[nn.Module, Path], None],
    select_metric: str | None = None,
    eval_each_epoch: bool = False,
    probe: Callable[[nn.Module], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Train `model` on `train_set` with `loss_fn(prepared_model, batch) -> loss`; returns the counters
    (also in the checkpoints' trainer_state.json). `cfg` is a PretrainConfig or FinetuneConfig.

    `evaluate(unwrapped_model, step, log) -> {name: value}` runs every `evaluation_cadence` steps
    (`eval_each_epoch`: by epochs unless train.eval_every_steps is set) and at the end. `export(model, directory)`
    writes an export; with `select_metric` (higher is better, EMA weights compete too) `output_dir/export`
    holds the best evaluated weights, without it the final ones. `probe(unwrapped_model)` runs on the main
    process every `train.probe_every_steps` and at the end (pretraining's online probe)."""
    acc, out, t = accelerator, Path(cfg.output_dir), cfg.train
    state = TrainState.start(cfg, model, acc, None if train_set.source.is_streaming else len(train_set))
    schedule, model = state.schedule, state.model
    log = RunLog(out, acc.is_main_process, resume_step=state.step, report_to=t.report_to, config=cfg)
    log_run_header(log, state, acc, t.precision)
    batches = TrainBatches.of_run(train_set, collate_fn, cfg, state, acc)
    meter = LossMeter(acc.device)
    eval_every = evaluation_cadence(t, schedule, eval_each_epoch)
    model.train()
    stopping = 0
    progress = dict(total=schedule.total_steps, initial=state.step, disable=not acc.is_main_process)
    with StopSignal() as stop, tqdm(**progress, dynamic_ncols=True) as bar, bugs_keep_their_traceback(state):
        while state.step < schedule.total_steps:
            grad_norm = train_step(state, batches, loss_fn, meter, acc, cfg.optim)
            state.step += 1
            step, last = state.step, state.step == schedule.total_steps
            bar.update(1)
            if step % t.log_every_steps == 0 or last:
                meter.check_finite(acc, state.checkpoints)
                values = {**close_window(meter, state, acc, cfg.data), "grad_norm": float(grad_norm)}
                log.write(step, values)
                bar.set_postfix(
                    loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{values['img_per_s']:.0f}"
                )
            if evaluate is not None and (step % eval_every == 0 or last):
                meter.check_finite(acc, state.checkpoints)
                with evaluation_mode(model):
                    evaluate_and_keep_best(state, evaluate, log, acc, select_metric, export, out)
            if probe is not None and t.probe_every_steps and (step % t.probe_every_steps == 0 or last):
                with evaluation_mode(model), state.full_model(acc) as full:
                    run_probe(probe, full, step, log, acc)
            epoch_done, in_epoch = divmod(step, schedule.steps_per_epoch or step + 1)  # a stream: no epoch
            if in_epoch == 0 and epoch_done in t.snapshot_epochs:
                # Before the save of this step: a run killed in between redoes the step and the snapshot.
                with state.full_model(acc) as full:
                    if acc.is_main_process:
                        export_snapshot(export, full, out / SNAPSHOTS_DIR / f"epoch_{epoch_done}")
            stopping = _stop_requested(stop, acc)
            if step % t.save_every_steps == 0 or last or stopping:
                meter.check_finite(acc, state.checkpoints)
                # A save closes the logging window too: the checkpoint's counters hold every image so far.
                close_window(meter, state, acc, cfg.data)
                state.save(batches.stream_position())
            if stopping:
                break
    log.close()
    if stopping:  # after the progress bar has closed, so that this is the last line printed
        acc.print(f"signal {stopping}: saved step {state.step}; run the same command again to resume")
        raise SystemExit(128 + stopping)
    if not select_metric or not state.counters.best:
        with state.full_model(acc) as full:
            if acc.is_main_process:
                export(full, out / EXPORT_DIR)
    acc.wait_for_everyone()
    return {"step": state.step, **state.counters.__dict__}


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
