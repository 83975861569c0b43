"""The run directory: every name a pretraining or fine-tuning run writes under `output_dir`, and reading it
back. Nothing else in simmim spells these names.

    output_dir/
        config.yaml           the resolved run config (RUN_CONFIG); a resumed run is compared against it
        run.json              the kind of run and what its export needs without the data or the init
                              checkpoint (RUN_INFO): the model's DeiTConfig or CNN arch, and the labels
        checkpoints/          training states (CHECKPOINTS_DIR, see simmim.checkpoints):
            index.json            {"latest": "step_00000100", "checkpoints": [... oldest first]}
            step_00000100/        accelerate's state (model.safetensors, optimizer.bin, random_states_*.pkl),
                                  trainer_state.json, ema.safetensors, stream_position_<rank>.json, and
                                  under train.fsdp each process's model/optimizer/EMA shards
        log.jsonl, tb/        the run log and TensorBoard's events (simmim.run_log); with train.report_to,
                              mlruns/ (MLflow), wandb/ (W&B) and trackers.json (their runs, to continue)
        export/               the model: a Transformers-format directory (config.json, model.safetensors)
                              or a CNN export, with preprocessor_config.json and the run config (EXPORT_CONFIG)
        snapshots/epoch_N/    exports along the way (train.snapshot_epochs)
        metrics.json          fine-tuning: every evaluation and the best
        compile_cache/        inductor's compiled kernels, when the run compiles (simmim.compilation)
        dataset_stats.json    data.normalize=dataset: the statistics computed at the run's start (DATASET_STATS)
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors import safe_open
from torch import nn

from simmim.bounded_yaml import read_yaml
from simmim.config import (
    FinetuneConfig,
    PretrainConfig,
    config_from_dict,
    config_to_dict,
    deit_config,
    save_config,
)
from simmim.models import MODEL_FOR_HEAD, DeiTConfig
from simmim.models.cnn import build_cnn

logger = logging.getLogger("simmim")

RUN_CONFIG = "config.yaml"
RUN_INFO = "run.json"
LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tb"
MLFLOW_DIR = "mlruns"  # train.report_to=mlflow's file store, unless MLFLOW_TRACKING_URI says otherwise
# The tracker runs a resumed run continues: {"mlflow": {"id": ..., "store": tracking URI}, "wandb": {"id": ...}}.
TRACKER_RUNS = "trackers.json"
EXPORT_DIR = "export"
SNAPSHOTS_DIR = "snapshots"
METRICS_FILE = "metrics.json"  # fine-tuning's evaluations; also what every evaluation script writes
COMPILE_CACHE_DIR = "compile_cache"
DATASET_STATS = "dataset_stats.json"  # data.normalize=dataset: the statistics the run computed at its start
EXPORT_CONFIG = "simmim_config.yaml"  # the resolved run config, embedded in every export
# Inside checkpoints/:
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_INDEX = "index.json"
TRAINER_STATE = "trainer_state.json"  # the step, the counters and the compile choice
ACCELERATE_WEIGHTS = "model.safetensors"  # the model in accelerate's save_state
EMA_WEIGHTS = "ema.safetensors"
STREAM_POSITION = "stream_position.json"  # per process: stream_position_<rank>.json
MODEL_SHARD = "model_shard_{rank}.safetensors"  # train.fsdp: each process's shard
OPTIMIZER_SHARD = "optimizer_shard_{rank}.safetensors"
OPTIMIZER_GROUPS = "optimizer_groups_{rank}.json"
EMA_SHARD = "ema_shard_{rank}.safetensors"


def snapshot_dir(output_dir: str | Path, epoch: int) -> Path:
    return Path(output_dir) / SNAPSHOTS_DIR / f"epoch_{epoch}"


CHECKPOINT_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def own_file_name(name: str, process_index: int) -> str:
    """A process's own file in a checkpoint: "stream_position.json" -> "stream_position_1.json"."""
    stem, suffix = os.path.splitext(name)
    return f"{stem}_{process_index}{suffix}"


def read_index(output_dir: str | Path) -> dict[str, Any]:
    """The checkpoint index of a run directory (empty before the first save)."""
    index_file = Path(output_dir) / CHECKPOINTS_DIR / CHECKPOINT_INDEX
    if not index_file.is_file():
        return {"latest": None, "checkpoints": []}
    return json.loads(index_file.read_text())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run directory, or None before the first save.

    The index lists the checkpoints oldest first; the newest that is missing or damaged on disk
    (`checkpoint_problem`) is passed over with a warning naming it, for the one before it, and then for any
    other checkpoint directory on disk (an unreadable index: those alone), newest first. When checkpoints exist and none is intact, `DamagedCheckpointError`:
    a run must never start again from random weights by mistake."""
    directory = Path(output_dir) / CHECKPOINTS_DIR
    try:
        index = read_index(output_dir)
        names = list(index["checkpoints"]) or ([index["latest"]] if index["latest"] else [])
        if index["latest"] and index["latest"] not in names:
            names.append(index["latest"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s is unreadable (%s): looking at the checkpoint directories themselves",
                       directory / CHECKPOINT_INDEX, e)  # fmt: skip
        names = []
    on_disk = sorted(p.name for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    names = [n for n in on_disk if n not in names] + names  # the index's own order wins, newest last
    problems = []
    for name in reversed(names):  # newest first
        problem = checkpoint_problem(directory / name)
        if problem is None:
            if problems:
                logger.warning("passing over %s; using %s", "; ".join(problems), directory / name)
            return directory / name
        problems.append(f"{directory / name}: {problem}")
    if problems:
        raise DamagedCheckpointError(
            f"no intact checkpoint in {directory} ({'; '.join(problems)}): move the directory away to start "
            "the run again from the beginning"
        )
    return None


class DamagedCheckpointError(ValueError):
    """Every checkpoint a run directory names is missing or damaged."""


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a training checkpoint on disk, or None when it looks intact: the directory
    missing, its trainer state unreadable, a safetensors file truncated or corrupt (its header must cover
    the file exactly), or a torch file (the optimizer, the RNG states) whose zip archive has lost its end.
    Only headers are read, so that a resume of a large model does not read its checkpoint twice."""
    if not checkpoint.is_dir():
        return "it does not exist"
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, ValueError) as e:
        return f"{TRAINER_STATE} is unreadable ({type(e).__name__})"
    for file in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for any damage
            return f"{file.name} is damaged ({' '.join(str(e).split())})"
    for file in sorted([*checkpoint.glob("*.bin"), *checkpoint.glob("*.pkl")]):
        try:  # the zip's directory sits at its end: a truncated file has none (CRCs would read it whole)
            with zipfile.ZipFile(file):
                pass
        except (OSError, zipfile.BadZipFile) as e:
            return f"{file.name} is damaged ({e})"
    return None


def holds_shards(checkpoint: Path) -> bool:
    """Whether a training checkpoint was saved by a train.fsdp run (its model as per-process shards)."""
    return (checkpoint / MODEL_SHARD.format(rank=0)).is_file()


def run_kind(raw_config: dict[str, Any]) -> str:
    """ "pretrain" or "finetune", from a run config as written (only fine-tuning configs have `distill`)."""
    return "finetune" if "distill" in raw_config else "pretrain"


@dataclass(frozen=True)
class Run:
    """A run directory as written: its kind, its config and `run.json` (empty for runs written before it)."""

    directory: Path
    kind: str  # "pretrain" or "finetune"
    config: PretrainConfig | FinetuneConfig
    info: dict[str, Any]

    def new_model(self) -> nn.Module:
        """The run's model with fresh weights, to load a checkpoint of the run into."""
        cfg, info = self.config, self.info
        if cfg.model.head == "cnn":
            return build_cnn(cfg.model.arch, len(info["id2label"]))
        cls = MODEL_FOR_HEAD["mim" if self.kind == "pretrain" else cfg.model.head]
        if "model_config" in info:
            return cls(DeiTConfig.from_dict(info["model_config"]))
        return cls(deit_config(cfg.model))  # a pretraining run written before run.json

    @property
    def id2label(self) -> dict[int, str] | None:
        labels = self.info.get("id2label")
        return None if labels is None else {int(k): v for k, v in labels.items()}


def read_run(directory: str | Path) -> Run:
    """The run written to `directory` by scripts/pretrain.py or scripts/finetune.py."""
    directory = Path(directory)
    config_file = directory / RUN_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} is not a run directory: it holds no {RUN_CONFIG}")
    raw = read_yaml(config_file.read_text(), str(config_file)) or {}
    info_file = directory / RUN_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    kind = info.get("kind") or run_kind(raw)
    config = config_from_dict(FinetuneConfig if kind == "finetune" else PretrainConfig, raw)
    return Run(directory, kind, config, info)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        flat.update(
            _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        )
    return flat


ABSENT = object()  # a key one of two configs lacks (written by another version of simmim)


def config_changes(directory: Path, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """The settings in which `cfg` differs from the config a run in `directory` was started with: flattened
    key -> (saved value, this value); a key one side lacks has `ABSENT` there. Empty without a saved one."""
    path = Path(directory) / RUN_CONFIG
    if not path.is_file():
        return {}
    previous = _flatten(read_yaml(path.read_text(), str(path)) or {})
    current = _flatten(config_to_dict(cfg))
    return {
        k: (previous.get(k, ABSENT), current.get(k, ABSENT))
        for k in sorted(previous.keys() | current.keys())
        if previous.get(k, ABSENT) != current.get(k, ABSENT)
    }


def prepare_output_dir(
    cfg: Any, accelerator: Accelerator, model: nn.Module, id2label: dict[int, str] | None = None
) -> None:
    """Write the resolved config and `run.json` (main process); a resumed run must not silently change
    its config, so the keys that differ from the saved one are printed."""
    out = Path(cfg.output_dir)
    path = out / RUN_CONFIG
    latest = latest_checkpoint(out)
    if latest is not None:
        sharded = holds_shards(latest)
        if cfg.train.fsdp != sharded:  # a resume launched otherwise than the run
            saved_by = "a train.fsdp=true run (FSDP shards)" if sharded else "a run without train.fsdp"
            raise ValueError(
                f"{latest} was saved by {saved_by}, and this run has train.fsdp={str(cfg.train.fsdp).lower()}: "
                "resume it as it was launched (FSDP: accelerate launch --config_file "
                "recipes/accelerate/fsdp.yaml, or train.fsdp=true)"
            )
    if accelerator.is_main_process:
        if latest is not None:
            changed = config_changes(out, cfg)
            if changed:
                print(f"warning: resuming {out} with a changed config: {', '.join(changed)}")
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path)
        info: dict[str, Any] = {"kind": "finetune" if isinstance(cfg, FinetuneConfig) else "pretrain"}
        if isinstance(getattr(model, "config", None), DeiTConfig):
            info["model_config"] = model.config.to_dict()
        if id2label is not None:
            info["id2label"] = {str(k): v for k, v in id2label.items()}
        d = cfg.data  # what the run's pixels were normalised with, and how its integers were scaled
        info["normalization"] = {"mode": d.normalize, "mean": d.mean, "std": d.std, "max_value": d.max_value}
        (out / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    accelerator.wait_for_everyone()
