"""The one training loop, shared by SimMIM pretraining and fine-tuning: they differ only in `loss_fn`.

Steps are optimizer steps. A step consumes `grad_accum_steps` micro-batches of `batch_size` images on each
process. Everything that decides the next step (data position, learning rate, RNG) is a function of the
step and the saved state, so a run killed at any point and restarted with the same command ends with the
same weights as an uninterrupted one (see `simmim.checkpoints` and `simmim.data.build_loader`).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from simmim.checkpoints import CheckpointManager
from simmim.config import DataConfig, OptimConfig, TrainConfig
from simmim.data import BadImageError, build_loader, check_bad_fraction
from simmim.optim import ModelEma, lr_at, param_groups, scaled_lr, set_lr
from simmim.run_log import RunLog

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
EvaluateFn = Callable[[nn.Module, int, RunLog], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class Schedule:
    """Durations turned into optimizer steps once, from the data size and the global batch."""

    micro_batches_per_epoch: int  # per process, = samples // (batch_size * world_size)
    steps_per_epoch: int
    total_steps: int  # where training stops (max_steps cap applied)
    schedule_steps: int  # where the cosine ends (epochs * steps_per_epoch)
    warmup_steps: int
    global_batch: int  # images per optimizer step over all processes and accumulation
    peak_lr: float
    min_lr: float

    @classmethod
    def build(
        cls, num_samples: int, data: DataConfig, optim: OptimConfig, train: TrainConfig, world_size: int
    ):
        micro = num_samples // (data.batch_size * world_size)
        steps_per_epoch = micro // optim.grad_accum_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {num_samples} images, fewer than one optimizer step needs "
                f"(data.batch_size={data.batch_size} x {world_size} processes x optim.grad_accum_steps="
                f"{optim.grad_accum_steps}); lower the batch size or use more data"
            )
        global_batch = data.batch_size * world_size * optim.grad_accum_steps
        schedule_steps = train.epochs * steps_per_epoch
        total = schedule_steps if train.max_steps is None else min(schedule_steps, train.max_steps)
        return cls(
            micro_batches_per_epoch=micro,
            steps_per_epoch=steps_per_epoch,
            total_steps=total,
            schedule_steps=schedule_steps,
            warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
            global_batch=global_batch,
            peak_lr=scaled_lr(optim.base_lr, global_batch),
            min_lr=scaled_lr(optim.min_lr, global_batch),
        )

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


def make_accelerator(precision: str = "launcher") -> Accelerator:
    """The run's Accelerator. `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA
    would otherwise start N unrelated single-process runs: there, the processes join over gloo on CPU.

    Args:
        precision: `train.precision`; "launcher" keeps accelerate's own choice (`--mixed_precision`, or the
            ACCELERATE_MIXED_PRECISION variable it sets), "fp32" turns autocast off, "bf16"/"fp16" turn it on.
    """
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    mixed = {"launcher": None, "fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
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


def micro_batches(
    train_set, collate_fn, cfg, schedule: Schedule, step: int, acc: Accelerator
) -> Iterator[dict]:
    """Micro-batches from optimizer step `step` onwards, epoch after epoch, with the loader placed exactly."""
    accum = cfg.optim.grad_accum_steps
    epoch, step_in_epoch = divmod(step, schedule.steps_per_epoch)
    while True:
        loader = build_loader(
            train_set,
            batch_size=cfg.data.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            seed=cfg.seed,
            epoch=epoch,
            start_batch=step_in_epoch * accum,
            rank=acc.process_index,
            world_size=acc.num_processes,
            pin_memory=cfg.data.pin_memory and acc.device.type == "cuda",
            collate_fn=collate_fn,
        )
        # Micro-batches past the last whole optimizer step of the epoch are not used.
        remaining = (schedule.steps_per_epoch - step_in_epoch) * accum
        for i, batch in enumerate(loader):
            if i == remaining:
                break
            yield batch
        epoch, step_in_epoch = epoch + 1, 0


def evaluation_loader(dataset, cfg: Any, acc: Accelerator, collate_fn: Callable):
    """This process's share of a held-out split, in order, every image once."""
    return build_loader(
        dataset,
        batch_size=cfg.data.batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        rank=acc.process_index,
        world_size=acc.num_processes,
        collate_fn=collate_fn,
    )


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
    """Train `model` on `train_set` with `loss_fn(prepared_model, batch) -> loss`.

    Args:
        cfg: a PretrainConfig or FinetuneConfig (uses output_dir, seed, data, optim, train).
        evaluate: `evaluate(prepared_model, step, log) -> {name: value}`, called every
            `train.eval_every_steps` (or every `train.eval_every_epochs` epochs with `eval_each_epoch`) and at the end; it may
            add images to `log`.
        export: writes a Transformers-format directory from an unwrapped model.
        select_metric: with a metric name (e.g. "top1", higher is better), `output_dir/export` holds the
            best evaluated weights (EMA weights compete too); without, the final weights.
        probe: `probe(unwrapped_model) -> {name: value}`, run on the main process every
            `train.probe_every_steps` and at the end, logged as kind "probe" (pretraining's online probe).
    Returns:
        The counters and final metrics as a dict (also in `output_dir/checkpoints/.../trainer_state.json`).
    """
    acc = accelerator
    out = Path(cfg.output_dir)
    schedule = Schedule.build(len(train_set), cfg.data, cfg.optim, cfg.train, acc.num_processes)
    checkpoints = CheckpointManager(out, acc, cfg.train.keep_last)

    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=schedule.peak_lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    if cfg.train.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay unchanged
    model, optimizer = acc.prepare(model, optimizer)
    ema = ModelEma(cfg.train.ema, acc.unwrap_model(model)) if cfg.train.ema else None

    step, counters = 0, Counters()
    latest = checkpoints.latest()
    if latest is not None:
        state, path = checkpoints.load(latest)
        step = state["step"]
        counters = Counters(**state["counters"])
        if ema is not None:
            ema.load_state_dict(checkpoints.load_tensors(path, "ema.safetensors"))
        acc.print(f"resuming from {path} at step {step}/{schedule.total_steps}")
    log = RunLog(out, acc.is_main_process, resume_step=step)
    log.write(step, {**schedule.__dict__, "num_processes": acc.num_processes}, kind="schedule")
    acc.print(
        f"{len(train_set)} training images, global batch {schedule.global_batch}, "
        f"{schedule.steps_per_epoch} steps/epoch, {schedule.total_steps} steps, peak lr {schedule.peak_lr:.3g}"
    )

    def save() -> None:
        tensors = {"ema.safetensors": ema.state_dict()} if ema is not None else None
        checkpoints.save(step, {"counters": counters.__dict__}, tensors)

    def run_evaluation() -> None:
        # The unwrapped model: DDP's forward can sync buffers, and ranks may hold unequal shares of the split.
        metrics = evaluate(acc.unwrap_model(model), step, log) if evaluate else {}
        if ema is not None and evaluate:
            metrics.update({f"ema_{k}": v for k, v in evaluate(ema.module, step, log).items()})
        log.write(step, metrics, kind="eval")
        counters.history.append({"step": step, "epoch": step / schedule.steps_per_epoch, **metrics})
        if select_metric and metrics:
            candidates = [(metrics[select_metric], False)]
            if ema is not None:
                candidates.append((metrics[f"ema_{select_metric}"], True))
            value, is_ema = max(candidates, key=lambda c: c[0])
            if not counters.best or value > counters.best[select_metric]:
                counters.best = {select_metric: value, "step": step, "ema": is_ema}
                if acc.is_main_process:
                    export(ema.module if is_ema else acc.unwrap_model(model), out / "export")
        acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

    batches = micro_batches(train_set, collate_fn, cfg, schedule, step, acc)
    accum = cfg.optim.grad_accum_steps
    bar = tqdm(total=schedule.total_steps, initial=step, disable=not acc.is_main_process, dynamic_ncols=True)
    # Device-side accumulators: read back (.item()) only when logging.
    loss_sum = torch.zeros((), device=acc.device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=acc.device)
    window = {"micro_batches": 0, "images": 0, "skipped": 0, "start": time.perf_counter()}
    last_batch: dict[str, Any] | None = None

    def check_finite() -> None:
        bad = (
            int(acc.reduce(first_bad_step.clone(), "max").item())
            if acc.num_processes > 1
            else first_bad_step.item()
        )
        if bad >= 0:
            raise NonFiniteLossError(
                f"the loss became non-finite at step {bad}; the last good checkpoint "
                f"({checkpoints.latest()}) is intact. Lower optim.base_lr or enable optim.clip_grad."
            )

    def flush_window() -> dict[str, float]:
        """Fold the images seen since the last flush into the counters (all processes); returns log values."""
        seen = acc.reduce(torch.tensor([window["images"], window["skipped"]], device=acc.device), "sum")
        mean_loss = acc.reduce(loss_sum, "mean").item() / max(window["micro_batches"], 1)
        counters.images_seen += int(seen[0])
        counters.images_skipped += int(seen[1])
        check_bad_fraction(
            counters.images_skipped, counters.images_seen + counters.images_skipped, cfg.data.max_bad_fraction
        )
        values = {
            "loss": mean_loss,
            "lr": schedule.lr(step - 1),
            "img_per_s": int(seen[0]) / (time.perf_counter() - window["start"]),
            "epoch": step / schedule.steps_per_epoch,
            "images_skipped": counters.images_skipped,
        }
        loss_sum.zero_()
        window.update(micro_batches=0, images=0, skipped=0, start=time.perf_counter())
        return values

    def fallback_batch() -> dict[str, Any]:
        """Any readable training batch (built only if a process's first micro-batch was all unreadable)."""
        loader = build_loader(
            train_set, batch_size=cfg.data.batch_size, shuffle=False, drop_last=False, num_workers=0,
            seed=cfg.seed, collate_fn=collate_fn,
        )  # fmt: skip
        for batch in loader:
            if len(batch["index"]):
                return move_to(batch, acc.device)
        raise BadImageError(f"no image of the training split {cfg.data.path} could be decoded")

    model.train()
    with StopSignal() as stop:
        while step < schedule.total_steps:
            set_lr(optimizer, schedule.lr(step))
            for micro in range(accum):
                batch = next(batches)
                window["skipped"] += batch["num_skipped"]
                weight = 1.0 / accum
                if len(batch["index"]) == 0:
                    # Every image of this micro-batch was unreadable. Every process must still run a forward and
                    # backward (DDP all-reduces), so a readable batch goes through with weight 0.
                    batch, weight = last_batch if last_batch is not None else fallback_batch(), 0.0
                else:
                    batch = last_batch = move_to(batch, acc.device)
                    window["images"] += batch["pixel_values"].shape[0]
                    window["micro_batches"] += 1
                # Gradients are all-reduced only on the last micro-batch of the step.
                sync = micro == accum - 1
                with nullcontext() if sync else acc.no_sync(model), acc.autocast():
                    loss = loss_fn(model, batch)
                acc.backward(loss * weight)
                if weight > 0:
                    loss = loss.detach()
                    loss_sum += loss
                    first_bad_step = torch.where(
                        (first_bad_step < 0) & ~torch.isfinite(loss),
                        torch.full_like(first_bad_step, step),
                        first_bad_step,
                    )
            # With no clipping, an infinite threshold still returns the norm for the log.
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(acc.unwrap_model(model))
            step += 1
            bar.update(1)

            last_step = step == schedule.total_steps
            if step % cfg.train.log_every_steps == 0 or last_step:
                check_finite()
                values = {**flush_window(), "grad_norm": float(grad_norm)}
                log.write(step, values)
                bar.set_postfix(
                    loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{values['img_per_s']:.0f}"
                )

            cadence = (
                step % (schedule.steps_per_epoch * cfg.train.eval_every_epochs)
                if eval_each_epoch
                else step % cfg.train.eval_every_steps
            )
            if evaluate is not None and (cadence == 0 or last_step):
                check_finite()
                model.eval()
                run_evaluation()
                model.train()

            every = cfg.train.probe_every_steps
            if probe is not None and every and (step % every == 0 or last_step) and acc.is_main_process:
                model.eval()
                values = probe(acc.unwrap_model(model))
                log.write(step, values, kind="probe")
                acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
                model.train()

            epoch_done, in_epoch = divmod(step, schedule.steps_per_epoch)
            if in_epoch == 0 and epoch_done in cfg.train.snapshot_epochs and acc.is_main_process:
                # Before the save of this step: a run killed in between redoes the step and the snapshot.
                export_snapshot(export, acc.unwrap_model(model), out / "snapshots" / f"epoch_{epoch_done}")

            stopping = _stop_requested(stop, acc)
            if step % cfg.train.save_every_steps == 0 or last_step or stopping:
                check_finite()
                flush_window()  # the counters in the checkpoint include every image trained on so far
                save()
            if stopping:
                bar.close()
                log.close()
                acc.print(f"signal {stopping}: saved step {step}; run the same command again to resume")
                raise SystemExit(128 + stopping)
    bar.close()

    if not select_metric or not counters.best:
        if acc.is_main_process:
            export(acc.unwrap_model(model), out / "export")
    acc.wait_for_everyone()
    log.close()
    return {"step": step, **counters.__dict__}


def _stop_requested(stop: StopSignal, acc: Accelerator) -> int:
    """The signal number if any process received SIGTERM/SIGINT (agreed across processes), else 0."""
    received = stop.received or 0
    if acc.num_processes > 1:
        received = int(acc.reduce(torch.tensor(received, device=acc.device), "max").item())
    return received
