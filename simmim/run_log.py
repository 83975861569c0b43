"""What a run writes for people to read: a JSON-lines log, TensorBoard scalars and images (rank 0 only)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from simmim.rundir import LOG_FILE, TENSORBOARD_DIR


class RunLog:
    """`log.jsonl` + TensorBoard event files under `output_dir/tb`, written by the main process only.

    On resume at `step`, records after that step (written by a killed run) are dropped from the JSON log
    and TensorBoard is told to purge them, so the logs read as one uninterrupted run.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / LOG_FILE
        self.writer = None
        if not enabled:
            return
        if self.path.is_file():  # a previous attempt: keep what the resumed state has seen
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        # Events logged after the checkpoint (by a killed run) are replaced by the resumed run's.
        self.writer = SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def write(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """image: (3, H, W) float in [0, 1]."""
        if self.enabled:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
