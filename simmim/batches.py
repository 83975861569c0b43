"""The loop's batches: each process's share of the training data from a given step on, placed exactly
(map-style data by epoch and batch, a stream by its loader's saved state), on the device, with unreadable
micro-batches replaced; and the held-out loaders of the evaluations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from simmim.data import BadImageError, build_loader
from simmim.optim import Schedule
from simmim.rundir import STREAM_POSITION, own_file_name


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
    def of_run(cls, train_set, collate_fn: Callable, cfg: Any, state: Any, acc: Accelerator):
        fallback = lambda: fallback_batch(train_set, cfg, collate_fn, acc.device)  # noqa: E731
        if not state.schedule.is_stream:
            # After a rollback the data runs ahead of the step by the batches it skipped (engine.roll_back).
            data_step = state.step + state.counters.data_offset
            batches = micro_batches(train_set, collate_fn, cfg, state.schedule, data_step, acc)
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
