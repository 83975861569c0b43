"""Training-state checkpoints: accelerate's `save_state` written atomically, the last N kept, resume from the newest.

Layout of `output_dir/checkpoints/` (the names: `simmim.rundir`):
    index.json            {"latest": "step_00000100", "checkpoints": [... oldest first]}, replaced atomically
    step_00000100/        accelerate's state (model.safetensors, optimizer.bin, random_states_*.pkl, ...)
                          + trainer_state.json (step, counters, compiled) + extra safetensors files (EMA weights)
                          + each process's own JSON files, e.g. stream_position_<rank>.json (a stream's
                            loader state)
A checkpoint is first written to `.tmp-step_...` and renamed once complete, and the index changes only
after that, so a kill during a save leaves the previous checkpoint loadable. Resume reads the index, never
directory names. Nothing here is unpickled: accelerate loads its files with weights_only=True.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from simmim.errors import CheckpointWriteError
from simmim.models.checkpoint import read_state_dict
from simmim.rundir import (
    ACCELERATE_WEIGHTS,
    CHECKPOINT_INDEX,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    MODEL_SHARD,
    TRAINER_STATE,
    checkpoint_name,
    latest_checkpoint,
    own_file_name,
    read_index,
)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, output_dir: str | Path, accelerator: Accelerator, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {keep_last}")
        self.dir = Path(output_dir) / CHECKPOINTS_DIR
        self.accelerator = accelerator
        self.keep_last = keep_last

    @property
    def index_file(self) -> Path:
        return self.dir / CHECKPOINT_INDEX

    def index(self) -> dict[str, Any]:
        return read_index(self.dir.parent)

    def _writing(self, name: str) -> Path:
        """Where checkpoint `name` is written before it is renamed into place."""
        return self.dir / f".tmp-{name}"

    def latest(self) -> Path | None:
        return latest_checkpoint(self.dir.parent)

    def intact(self) -> str:
        """What an error that stops a run says of its checkpoints."""
        latest = self.latest()
        if latest is None:
            return "no checkpoint had been saved yet"
        return f"the last good checkpoint ({latest}) is intact: run the same command again to resume from it"

    def save(
        self,
        step: int,
        trainer_state: dict[str, Any],
        tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        own: dict[str, Any] | None = None,
        write_shards: Callable[[Path], None] | None = None,
    ) -> Path:
        """Save the full training state at `step` (every process must call this). `own`: this process's
        JSON files, by name (saved as `own_file_name(name, process_index)`); `write_shards(directory)`
        writes this process's shards of a sharded model and optimizer (`simmim.sharding.save`).

        A write that fails (a full disk, a permission, an I/O error) raises `CheckpointWriteError` naming the
        checkpoint that is still intact: everything goes to `.tmp-step_N` first and is renamed once
        complete, and the index changes last, atomically, so the previous checkpoint and index stay as they
        were. (With several processes, a failure on one of them alone is not agreed on: the others wait in
        the next collective.)"""
        try:
            return self._write(step, trainer_state, tensors, own, write_shards)
        except (OSError, SafetensorError, RuntimeError) as e:
            # safetensors raises its own error on a failed write, torch.save a RuntimeError from its writer;
            # any other RuntimeError is a bug, not the disk.
            if isinstance(e, RuntimeError) and "PytorchStreamWriter" not in str(e):
                raise
            shutil.rmtree(self._writing(checkpoint_name(step)), ignore_errors=True)
            try:
                intact = latest_checkpoint(self.dir.parent)
            except ValueError:
                intact = None
            kept = f"{intact} is intact" if intact is not None else "no earlier checkpoint exists"
            reason = f"{e.strerror}: {e.filename}" if getattr(e, "strerror", None) and e.filename else str(e)
            raise CheckpointWriteError(f"saving step {step} failed ({reason}); {kept}") from e

    def _write(self, step, trainer_state, tensors, own, write_shards) -> Path:  # noqa: ANN001 - as `save`
        """`save`'s work, which may raise on a failed write."""
        acc = self.accelerator
        name = checkpoint_name(step)
        final, tmp = self.dir / name, self._writing(name)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        for file, content in (own or {}).items():
            _write_json_atomic(tmp / own_file_name(file, acc.process_index), content)
        if write_shards is not None:
            write_shards(tmp)
        acc.wait_for_everyone()  # every process's RNG and own files are in tmp before it is renamed
        if acc.is_main_process:
            for file, tensor_dict in (tensors or {}).items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensor_dict.items()}, str(tmp / file))
            _write_json_atomic(tmp / TRAINER_STATE, {"step": step, **trainer_state})
            old = self.dir / f".old-{name}"
            if (
                final.exists()
            ):  # a re-save of the same step: the index may name it, so swap, never delete first
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            try:
                previous = self.index()["checkpoints"]
            except (OSError, ValueError, KeyError):  # a damaged index: the checkpoints on disk, by step
                previous = sorted(p.name for p in self.dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
            # A name whose directory is gone is dropped, so that keep_last never prunes an intact one for it.
            names = [n for n in previous if n != name and (self.dir / n).is_dir()] + [name]
            stale, names = names[: -self.keep_last], names[-self.keep_last :]
            _write_json_atomic(self.index_file, {"latest": name, "checkpoints": names})
            for old in stale:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> tuple[dict[str, Any], Path]:
        """Restore model, optimizer, scaler and RNG states; returns (trainer_state, checkpoint dir)."""
        # accelerate only logs a failure to restore RNG states; an inexact resume must not pass silently.
        rng = path / f"random_states_{self.accelerator.process_index}.pkl"
        if not rng.is_file():
            raise FileNotFoundError(
                f"{path} lacks {rng.name}: it was saved by fewer processes ({self.accelerator.num_processes} now); "
                "resume with the same number of processes"
            )
        self.accelerator.load_state(str(path))
        return self.trainer_state(path), path

    @staticmethod
    def trainer_state(path: Path) -> dict[str, Any]:
        """Checkpoint `path`'s trainer_state.json alone (the step, the counters, the compile choice), read
        before the model is built."""
        return json.loads((path / TRAINER_STATE).read_text())

    @staticmethod
    def load_tensors(path: Path, file: str) -> dict[str, torch.Tensor]:
        return load_file(str(path / file))


def join_shards(directory: Path) -> dict[str, torch.Tensor] | None:
    """The whole model of a checkpoint that `save` wrote (its shards joined along dim 0, in rank order,
    as FSDP2 splits them), or None if `directory` holds no shards: what `scripts/export.py` and the
    reconstruction evaluation read from a checkpoint of a train.fsdp run, in one process."""
    files = sorted(directory.glob(MODEL_SHARD.format(rank="*")), key=lambda f: int(f.stem.rsplit("_", 1)[1]))
    if not files:
        return None
    with safe_open(str(files[0]), "pt") as f:
        sharded = set(json.loads((f.metadata() or {}).get("sharded", "[]")))
    shards = [load_file(str(f)) for f in files]
    return {
        name: torch.cat([s[name] for s in shards]) if name in sharded else t for name, t in shards[0].items()
    }


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's weights in a training checkpoint: accelerate's `model.safetensors`, or a train.fsdp
    run's shards joined (`join_shards`)."""
    joined = join_shards(checkpoint)
    return joined if joined is not None else read_state_dict(checkpoint / ACCELERATE_WEIGHTS)
