"""The loss of the current logging window, kept on the device, and the watch for a non-finite loss."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator

from simmim.checkpoints import CheckpointManager
from simmim.errors import NonFiniteLossError


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
                f"the loss became non-finite at step {bad}; {checkpoints.intact()}. "
                "Lower optim.base_lr or enable optim.clip_grad.",
                step=bad,
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
