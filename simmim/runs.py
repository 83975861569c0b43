"""The run directory: what a pretraining or fine-tuning run writes to `output_dir`, and reading it back.

    output_dir/
        config.yaml           the resolved run config (RUN_CONFIG); a resumed run is compared against it
        run.json              the kind of run and what its export needs without the data or the init
                              checkpoint (RUN_INFO): the model's DeiTConfig or CNN arch, and the labels
        checkpoints/          training states and index.json (simmim.checkpoints)
        log.jsonl, tb/        the run log (simmim.run_log)
        export/               the model: a Transformers-format directory (config.json, model.safetensors)
                              or a CNN export, with preprocessor_config.json and the run config (EXPORT_CONFIG)
        snapshots/epoch_N/    exports along the way (train.snapshot_epochs)
        metrics.json          fine-tuning: every evaluation and the best

`export_model` writes every export; `export_run` writes one from any checkpoint of a run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from torch import nn

from simmim.checkpoints import latest_checkpoint
from simmim.config import (
    FinetuneConfig,
    PretrainConfig,
    config_from_dict,
    config_to_dict,
    deit_config,
    save_config,
)
from simmim.models import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTForMaskedImageModeling,
)
from simmim.models.checkpoint import read_state_dict
from simmim.models.cnn import build_cnn, save_cnn
from simmim.models.image_processor import eval_image_processor

RUN_CONFIG = "config.yaml"
RUN_INFO = "run.json"
EXPORT_DIR = "export"
SNAPSHOTS_DIR = "snapshots"
COMPILE_CACHE_DIR = "compile_cache"  # inductor's cache, when the run compiles (simmim.compilation)
METRICS_FILE = "metrics.json"
EXPORT_CONFIG = "simmim_config.yaml"  # the resolved run config, embedded in every export
# The fine-tuning head -> the DeiT class that carries it (model.head=cnn is a torchvision model).
STUDENTS = {"cls": DeiTForImageClassification, "distill": DeiTForImageClassificationWithTeacher}


def export_dir_of(path: Path) -> Path:
    """A run directory -> its export/; an export, a Transformers directory or a weights file as it is."""
    path = Path(path)
    if (
        path.is_dir()
        and not (path / "config.json").is_file()
        and (path / EXPORT_DIR / "config.json").is_file()
    ):
        return path / EXPORT_DIR
    return path


def read_export_config(directory: Path) -> dict[str, Any] | None:
    """The run config embedded in an export (as written), or None for exports made elsewhere."""
    file = Path(directory) / EXPORT_CONFIG
    return yaml.safe_load(file.read_text()) if file.is_file() else None


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
        cls = DeiTForMaskedImageModeling if self.kind == "pretrain" else STUDENTS[cfg.model.head]
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
    raw = yaml.safe_load(config_file.read_text()) or {}
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


def prepare_output_dir(
    cfg: Any, accelerator: Accelerator, model: nn.Module, id2label: dict[int, str] | None = None
) -> None:
    """Write the resolved config and `run.json` (main process); a resumed run must not silently change
    its config, so the keys that differ from the saved one are printed."""
    out = Path(cfg.output_dir)
    path = out / RUN_CONFIG
    latest = latest_checkpoint(out)
    if latest is not None:
        from simmim.sharding import holds_shards  # torch's FSDP, imported only where a run resumes

        sharded = holds_shards(latest)
        if cfg.train.fsdp != sharded:  # a resume launched otherwise than the run
            saved_by = "a train.fsdp=true run (FSDP shards)" if sharded else "a run without train.fsdp"
            raise ValueError(
                f"{latest} was saved by {saved_by}, and this run has train.fsdp={str(cfg.train.fsdp).lower()}: "
                "resume it as it was launched (FSDP: accelerate launch --config_file "
                "recipes/accelerate/fsdp.yaml, or train.fsdp=true)"
            )
    if accelerator.is_main_process:
        if path.is_file() and latest is not None:
            previous = _flatten(yaml.safe_load(path.read_text()) or {})
            current = _flatten(config_to_dict(cfg))
            changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
            if changed:
                print(f"warning: resuming {out} with a changed config: {', '.join(changed)}")
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path)
        info: dict[str, Any] = {"kind": "finetune" if isinstance(cfg, FinetuneConfig) else "pretrain"}
        if isinstance(getattr(model, "config", None), DeiTConfig):
            info["model_config"] = model.config.to_dict()
        if id2label is not None:
            info["id2label"] = {str(k): v for k, v in id2label.items()}
        (out / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    accelerator.wait_for_everyone()


def export_model(model: nn.Module, directory: Path, cfg: Any, id2label: dict[int, str] | None = None) -> None:
    """The model as others load it: a Transformers-format DeiT directory (config.json, model.safetensors),
    or for `model.head=cnn` a CNN export; with preprocessor_config.json and the run config."""
    directory = Path(directory)
    if getattr(cfg.model, "head", None) == "cnn":
        meta = {"arch": cfg.model.arch, "id2label": {str(k): v for k, v in id2label.items()}}
        meta |= {"mean": list(cfg.data.mean), "std": list(cfg.data.std), "image_size": cfg.model.image_size}
        save_cnn(model, directory, meta)
    else:
        model.save_pretrained(directory)
    eval_image_processor(cfg.model.image_size, cfg.data.mean, cfg.data.std).save_pretrained(directory)
    save_config(cfg, directory / EXPORT_CONFIG)


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's weights in a training checkpoint: accelerate's `model.safetensors`, or a train.fsdp
    run's shards joined (`simmim.sharding.join_shards`)."""
    from simmim.sharding import join_shards

    joined = join_shards(checkpoint)
    return joined if joined is not None else read_state_dict(checkpoint / "model.safetensors")


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Export the newest (or a given) training checkpoint of a pretraining or fine-tuning run directory."""
    run = read_run(run_dir)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run.directory)
    if ckpt is None:
        raise FileNotFoundError(f"{run.directory} holds no checkpoint (checkpoints/index.json)")
    if run.kind == "finetune" and "id2label" not in run.info:
        model, id2label = _rebuild_legacy_student(run)
    else:
        model, id2label = run.new_model(), run.id2label
    model.load_state_dict(checkpoint_weights(ckpt))
    export_model(model, Path(out), run.config, id2label)
    return Path(out)


def _rebuild_legacy_student(run: Run) -> tuple[nn.Module, dict[int, str]]:
    """A fine-tuning run written before run.json: its labels come from the dataset and its architecture
    from the init checkpoint, both of which must still exist."""
    from simmim.data.sources import open_split
    from simmim.finetune import build_student  # here: simmim.finetune imports this module

    cfg = run.config
    id2label = dict(enumerate(open_split(cfg, cfg.data.train_split).class_names))
    if cfg.model.head == "cnn":
        return build_cnn(cfg.model.arch, len(id2label)), id2label
    return build_student(cfg, id2label)[0], id2label
