"""Fine-tuning: a classification head (`model.head=cls`), DeiT's distillation head with a frozen teacher
(`distill`), or a torchvision CNN to serve as that teacher (`cnn`), on `simmim.engine.train`.

The three differ only in the model built and the loss function passed to the loop. Weights come from a
SimMIM export or run directory, a Transformers-format DeiT directory, a timm DeiT file, or nothing.
`scripts/finetune.py` is the command line; `scripts/predict.py` uses `open_classifier`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from simmim.batches import evaluation_loader
from simmim.config import FinetuneConfig
from simmim.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LabeledImageDataset,
    MixUpCutMix,
    collate_classification,
    eval_transform,
    finetune_transform,
)
from simmim.data.class_names import check_labels, named_classes
from simmim.data.normalization import check_channels, pixel_args, with_dataset_statistics
from simmim.data.sources import SubsetSource, balanced_subset, open_split
from simmim.data.transforms import rand_augment_applies
from simmim.engine import Task, train
from simmim.exports import export_model, logits_of, new_deit, open_classifier, open_init
from simmim.launch import follow_launcher, make_accelerator
from simmim.models import MODEL_FOR_HEAD
from simmim.models.checkpoint import read_state_dict
from simmim.models.cnn import CNN_CONFIG, build_cnn, read_cnn_config
from simmim.models.losses import classification_loss
from simmim.run_log import RunLog
from simmim.rundir import DATASET_STATS, METRICS_FILE, prepare_output_dir

logger = logging.getLogger("simmim.finetune")

HEAD_KEYS = {
    "cls": {"classifier.weight", "classifier.bias"},
    "distill": {
        "cls_classifier.weight",
        "cls_classifier.bias",
        "distillation_classifier.weight",
        "distillation_classifier.bias",
    },
}
# What a SimMIM or classifier checkpoint may hold that a fine-tuned student does not use.
DROPPABLE = {"decoder.0.weight", "decoder.0.bias", "deit.embeddings.mask_token", "deit.pooler.dense.weight"}
DROPPABLE |= {"deit.pooler.dense.bias"} | HEAD_KEYS["cls"] | HEAD_KEYS["distill"]


# ---------------------------------------------------------------------------------------------- models
def build_student(cfg: FinetuneConfig, id2label: dict[int, str]) -> tuple[nn.Module, dict[str, list[str]]]:
    """The DeiT student for `cls` or `distill`, initialised from `model.init`; returns (model, loading info)."""
    cls = MODEL_FOR_HEAD[cfg.model.head]
    labels = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if cfg.model.init == "scratch":
        return new_deit(cls, cfg.model, **labels), {}
    opened = open_init(cfg.model, cls, labels)
    check_loading_info(opened.info, cfg.model.head, opened.path)
    return opened.model, opened.info


def check_loading_info(info: dict[str, list[str]], head: str, path: Path) -> None:
    """Only the new head (and a created distillation token) may be missing; only SimMIM/head parts unused."""
    may_miss = HEAD_KEYS[head] | {"deit.embeddings.distillation_token"}
    missing = set(info["missing_keys"]) | set(info.get("mismatched_keys", []))
    wrong_missing = sorted(missing - may_miss)
    wrong_unused = sorted(set(info["unexpected_keys"]) - DROPPABLE)
    if wrong_missing or wrong_unused:
        raise ValueError(
            f"{path} does not fit a DeiT encoder of this config: missing {wrong_missing}, unused {wrong_unused}"
        )
    logger.info("loaded %s: new %s, unused %s", path, sorted(missing), info["unexpected_keys"])


class Teacher(nn.Module):
    """A frozen classifier in eval mode, fed with its own input normalisation."""

    def __init__(self, model: nn.Module, mean, std, student_mean, student_std) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        # x_teacher = (x_student * s_std + s_mean - t_mean) / t_std, folded into one scale and shift.
        scale = torch.tensor(student_std) / torch.tensor(std)
        shift = (torch.tensor(student_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always eval: BatchNorm statistics and dropout stay fixed

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values * self.scale + self.shift)
        return out.logits if hasattr(out, "logits") else out


def load_teacher(cfg: FinetuneConfig, num_classes: int) -> Teacher:
    arch, path = cfg.teacher.arch, Path(cfg.teacher.path)
    if arch != "deit" and not path.is_dir():  # a bare state dict, trained on ImageNet-normalised inputs
        model, mean, std = build_cnn(arch, num_classes), IMAGENET_MEAN, IMAGENET_STD
        model.load_state_dict(read_state_dict(path))
    else:
        opened = open_classifier(path, what="teacher.path")
        model, mean, std = opened.model, opened.mean, opened.std
        held = read_cnn_config(opened.path)["arch"] if (opened.path / CNN_CONFIG).is_file() else "deit"
        if held != arch:
            raise ValueError(f"teacher.path {path} holds a {held}, teacher.arch is {arch}")
    logits_dim = getattr(getattr(model, "config", None), "num_labels", None) or _out_features(model)
    if logits_dim != num_classes:
        raise ValueError(f"the teacher predicts {logits_dim} classes, the dataset has {num_classes}")
    return Teacher(model, mean, std, cfg.data.mean, cfg.data.std)


def _out_features(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


# ---------------------------------------------------------------------------------------------- the run
@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, accelerator, num_classes: int) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over every process's share of a validation split."""
    k = min(5, num_classes)
    totals = torch.zeros(4, device=accelerator.device)  # (loss sum, top-1 hits, top-k hits, images)
    for batch in loader:
        if len(batch["index"]) == 0:
            continue  # unreadable images, or this rank's empty share of the last batch
        x, y = batch["pixel_values"].to(accelerator.device), batch["labels"].to(accelerator.device)
        with accelerator.autocast():
            logits = logits_of(model(x)).float()
        topk = logits.topk(k, dim=-1).indices  # (B, k)
        totals += torch.stack(
            (
                F.cross_entropy(logits, y, reduction="sum"),
                (topk[:, 0] == y).sum().float(),
                (topk == y[:, None]).any(-1).sum().float(),
                torch.tensor(float(len(y)), device=y.device),
            )
        )
    totals = accelerator.reduce(totals, "sum")
    n = totals[3].clamp(min=1)
    return {
        "loss": (totals[0] / n).item(),
        "top1": (100 * totals[1] / n).item(),
        f"top{k}": (100 * totals[2] / n).item(),
    }


class FinetuneTask(Task):
    """Fine-tuning for the loop: the student (or CNN), the labelled data, the loss of its head with
    MixUp/CutMix, top-1 on the held-out split (the metric that picks the exported model)."""

    select_metric = "top1"
    eval_each_epoch = True

    def __init__(self, cfg: FinetuneConfig, accelerator: Accelerator) -> None:
        d, head = cfg.data, cfg.model.head
        train_source, val_source = open_split(cfg, d.train_split), open_split(cfg, d.val_split)
        check_channels(train_source, cfg.model.num_channels, d.max_value, d.path)
        self.id2label = dict(enumerate(named_classes(train_source, f"data.path={d.path!r}")))
        for source in (train_source, val_source):
            check_labels(source)  # a map-style source's labels, read up front (a stream's as they are read)
        # the cheap checks above first, then the data's statistics (up to data.stats_samples decodes)
        kept = Path(cfg.output_dir) / DATASET_STATS
        cfg, normalised = with_dataset_statistics(cfg, train_source, kept, write=accelerator.is_main_process)
        accelerator.print(normalised)
        self.cfg, self.accelerator, d = cfg, accelerator, cfg.data
        self.num_classes = num_classes = len(self.id2label)
        if d.label_fraction < 1.0:
            kept = balanced_subset(train_source.labels(), d.label_fraction, cfg.seed)
            accelerator.print(
                f"data.label_fraction={d.label_fraction}: {len(kept)} of {len(train_source)} labelled images "
                f"(class-balanced, drawn with seed {cfg.seed})"
            )
            train_source = SubsetSource(train_source, kept)
        if head == "cnn":
            self.model = build_cnn(cfg.model.arch, num_classes)
        else:
            self.model, _ = build_student(cfg, self.id2label)
        prepare_output_dir(cfg, accelerator, self.model, self.id2label)
        self.teacher = load_teacher(cfg, num_classes).to(accelerator.device) if head == "distill" else None
        a = cfg.aug
        rand_augment = a.rand_augment and rand_augment_applies(cfg.model.num_channels)
        if a.rand_augment and not rand_augment:
            accelerator.print(
                f"aug.rand_augment: left out, as its colour operations are defined for RGB and "
                f"model.num_channels={cfg.model.num_channels} (crops, flips, erasing and MixUp/CutMix stay)"
            )
        transform = finetune_transform(
            cfg.model.image_size,
            rand_augment=rand_augment,
            random_erasing=a.random_erasing,
            scale=a.crop_scale,
            **pixel_args(cfg),
        )
        self.train_set = LabeledImageDataset(train_source, transform)
        self.collate_fn = collate_classification
        self.val_set = LabeledImageDataset(val_source, eval_transform(cfg.model.image_size, **pixel_args(cfg)))
        self.mix = MixUpCutMix(
            num_classes, mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.label_smoothing
        )

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # MixUp/CutMix targets go to the class head; the teacher sees the same mixed images.
        x, targets = self.mix(batch["pixel_values"], batch["labels"])
        head = self.cfg.model.head
        if head == "cnn":
            return classification_loss(model(x), targets)
        if head == "cls":
            return model(pixel_values=x, labels=targets).loss
        d = self.cfg.distill
        return model(
            pixel_values=x,
            labels=targets,
            teacher_logits=self.teacher(x),
            distillation_type=d.kind,
            alpha=d.alpha,
            tau=d.tau,
        ).loss

    def evaluate(self, model: nn.Module, step: int, log: RunLog) -> dict[str, float]:
        loader = evaluation_loader(self.val_set, self.cfg, self.accelerator, collate_classification)
        return evaluate_classifier(model, loader, self.accelerator, self.num_classes)

    def export(self, model: nn.Module, directory: Path) -> None:
        export_model(model, directory, self.cfg, self.id2label)


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune; writes checkpoints, logs, `metrics.json` and the best model to `output_dir/export`."""
    cfg = follow_launcher(cfg)  # accelerate launch with an FSDP config: train.fsdp=true
    accelerator = make_accelerator(cfg.train.precision, cfg.train.fsdp, cfg.train.collective_timeout_s)
    set_seed(cfg.seed)
    task = FinetuneTask(cfg, accelerator)
    summary = train(task, task.cfg)  # the config with the data's statistics filled in
    if accelerator.is_main_process:
        metrics = {"epochs": summary["history"], "best": summary["best"]}
        (Path(cfg.output_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return summary
