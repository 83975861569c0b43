"""SimMIM pretraining (Xie et al., 2022) of a DeiT encoder: the task (data, model, loss and evaluation) that
`simmim.engine.train` runs. `scripts/pretrain.py` is the command line.

With `model.init`, continued pretraining: SimMIM starts from an existing model (`continue_from`), as
domain-adaptive pretraining does, at step 0 with a new optimizer and schedule.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from simmim.batches import evaluation_loader
from simmim.config import LossConfig, ModelConfig, PretrainConfig
from simmim.data import (
    LabeledImageDataset,
    MaskedImageDataset,
    collate_pretrain,
    eval_transform,
    pretrain_transform,
)
from simmim.data.normalization import check_channels, pixel_args, with_dataset_statistics
from simmim.data.sources import open_split, random_subset
from simmim.engine import Task, train
from simmim.evaluation.grids import reconstruction_grid
from simmim.evaluation.probe import OnlineProbe
from simmim.exports import OpenedModel, export_model, new_deit, open_init
from simmim.launch import follow_launcher, make_accelerator
from simmim.masking import MaskGenerator
from simmim.models import DeiTForMaskedImageModeling
from simmim.models.losses import masked_l1, norm_targets, patch_mask_to_pixels, targets_to_pixels
from simmim.run_log import RunLog
from simmim.rundir import DATASET_STATS, latest_checkpoint, prepare_output_dir, read_run

GRID_IMAGES = 8


# What a SimMIM model may find missing in model.init and start new: its SimMIM parts, and the
# distillation token of a checkpoint without one (a ViT), which starts as a copy of the class token.
MAY_START_NEW = ("decoder.", "deit.embeddings.mask_token", "deit.embeddings.distillation_token")
# The parts that continued pretraining keeps when the checkpoint has them, by name for the report.
SIMMIM_PARTS = {
    "decoder": ("decoder.0.weight", "decoder.0.bias"),
    "mask token": ("deit.embeddings.mask_token",),
}
# Architecture fields that model.init's checkpoint decides: set ones that disagree are reported as ignored.
CHECKPOINT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
)


def build_model(cfg: PretrainConfig) -> tuple[DeiTForMaskedImageModeling, str | None]:
    """A new model, or with model.init the checkpoint to continue from and the report of what was kept. A
    resumed run is rebuilt from its run.json: the loop loads its own checkpoint, and model.init is not read."""
    if cfg.model.init == "scratch":
        return new_deit(DeiTForMaskedImageModeling, cfg.model), None
    if latest_checkpoint(cfg.output_dir) is not None:
        note = f"resuming {cfg.output_dir}: its own checkpoint, not model.init={cfg.model.init!r}"
        return read_run(cfg.output_dir).new_model(), note
    return continue_from(cfg.model)


def continue_from(model: ModelConfig) -> tuple[DeiTForMaskedImageModeling, str]:
    """SimMIM's model from `model.init` (`simmim.exports.open_init`): the checkpoint's encoder and
    architecture, its decoder and mask token where it has them; and the report of what is kept and new."""
    opened = open_init(model, DeiTForMaskedImageModeling)
    new = set(opened.info["missing_keys"]) | set(opened.info["mismatched_keys"])
    lacking = sorted(k for k in new if not k.startswith(MAY_START_NEW))
    if lacking:
        raise ValueError(
            f"model.init={model.init!r} holds no complete DeiT/ViT encoder (it lacks {len(lacking)} tensors, "
            f"{', '.join(lacking[:3])}, ...): expected a SimMIM model, a DeiT or ViT encoder, or a classifier "
            "built on one"
        )
    return opened.model, init_report(opened, model)


def init_report(opened: OpenedModel, model: ModelConfig) -> str:
    """One block: what continued pretraining keeps from `opened`, what it adapts and what starts new."""
    info, config = opened.info, opened.model.config
    new, mismatched = set(info["missing_keys"]), set(info["mismatched_keys"])
    arch = (
        f"width {config.hidden_size}, {config.num_hidden_layers} blocks, {config.num_attention_heads} heads, "
        f"MLP {config.intermediate_size}, patch {config.patch_size}"
    )
    read = f" ({opened.path})" if str(opened.path) != model.init else ""  # a run directory: its export
    lines = [f"continued pretraining from model.init={model.init!r}{read}:"]
    lines.append(f"  kept:    the encoder ({arch})")
    for name, keys in SIMMIM_PARTS.items():
        if mismatched & set(keys):
            lines.append(f"  new:     the {name} (the checkpoint's is for other channels)")
        elif new & set(keys):
            lines.append(f"  new:     the {name} (the checkpoint has none)")
        else:
            lines.append(f"  kept:    the {name}")
    if "deit.embeddings.distillation_token" in new:
        lines.append("  new:     the distillation token, a copy of the class token (the checkpoint has none)")
    if info["resized_keys"]:
        grid = "x".join(map(str, config.grid_size))
        lines.append(f"  resized: the position embeddings, to the {grid} patch grid of {model.image_size} px")
    if info["adapted_keys"]:
        lines.append(
            f"  adapted: the patch embedding, from 3 channels to {config.num_channels} (timm's adapt_input_conv)"
        )
    if info["unexpected_keys"]:
        lines.append(f"  unused:  {', '.join(info['unexpected_keys'])}")
    ignored = [
        f"model.{f}={getattr(model, f)}"
        for f in CHECKPOINT_FIELDS
        if getattr(model, f) is not None and getattr(model, f) != getattr(config, f)
    ]
    if ignored:
        lines.append(f"  ignored: {', '.join(ignored)} (the architecture is the checkpoint's)")
    lines.append(
        "  from 0:  the step, the optimizer and the schedule (to resume, run the same command again)"
    )
    return "\n".join(lines)


def mask_generator(cfg: PretrainConfig, mask_ratio: float | None = None) -> MaskGenerator:
    return MaskGenerator(
        input_size=cfg.model.image_size,
        mask_patch_size=cfg.mask.patch_size,
        model_patch_size=cfg.model.patch_size,
        mask_ratio=cfg.mask.ratio if mask_ratio is None else mask_ratio,
    )


def simmim_loss(
    loss: LossConfig,
    pixel_values: torch.Tensor,
    reconstruction: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """The training loss: the masked L1 of the reconstruction against the pixels, or with loss.norm_target
    against SimMIM's normalised target (`losses.norm_targets`). A scalar, summed over the batch's masked
    pixels; `bool_masked_pos` is (B, N) over the model's patches of `patch_size` pixels."""
    _, _, H, W = pixel_values.shape
    mask = patch_mask_to_pixels(bool_masked_pos, patch_size, H, W)
    target = norm_targets(pixel_values, loss.norm_target_window) if loss.norm_target else pixel_values
    return masked_l1(target, reconstruction, mask, over_batch=True)


def reconstruction_pixels(loss: LossConfig, pixel_values: torch.Tensor, reconstruction: torch.Tensor):
    """The reconstruction in the (normalised) pixel space of `pixel_values`, to show and score: a
    normalised-target prediction is mapped back with each image's own window statistics."""
    if not loss.norm_target:
        return reconstruction
    return targets_to_pixels(reconstruction, pixel_values, loss.norm_target_window)


class PretrainTask(Task):
    """SimMIM pretraining for the loop: the masked-image model, its data, its loss and the held-out masked L1."""

    def __init__(self, cfg: PretrainConfig, accelerator: Accelerator) -> None:
        d = cfg.data
        # The data first: a wrong path or channel count is reported before the run directory is written.
        train_source, val_source = open_split(cfg, d.train_split), open_split(cfg, d.val_split)
        check_channels(train_source, cfg.model.num_channels, d.max_value, d.path)
        # The model next (a model.init that cannot be continued is one line), then the data's statistics.
        self.model, report = build_model(cfg)
        if report is not None:
            accelerator.print(report)
        depth, layer = self.model.config.num_hidden_layers, cfg.probe.layer
        if layer is not None and layer > depth:  # a model.init's depth is only known now
            raise ValueError(f"probe.layer={layer}: must be a block of the encoder (1..{depth})")
        kept = Path(cfg.output_dir) / DATASET_STATS
        cfg, normalised = with_dataset_statistics(cfg, train_source, kept, write=accelerator.is_main_process)
        accelerator.print(normalised)
        self.cfg, self.accelerator, d = cfg, accelerator, cfg.data
        prepare_output_dir(cfg, accelerator, self.model)
        masks = mask_generator(cfg)
        self.train_set = MaskedImageDataset(
            train_source, pretrain_transform(cfg.model.image_size, **pixel_args(cfg)), masks
        )
        self.collate_fn = collate_pretrain
        if cfg.train.eval_batches is not None and not val_source.is_streaming:
            # The periodic evaluation reads train.eval_batches batches: a seeded sample in random order, so
            # that they (and the TensorBoard grid of the first batch) cover the split, not its first class.
            val_source = random_subset(
                val_source, cfg.train.eval_batches * d.batch_size, cfg.seed, keep_order=False
            )
        self.val_set = MaskedImageDataset(
            val_source, eval_transform(cfg.model.image_size, **pixel_args(cfg)), masks
        )
        self.online_probe = online_probe(cfg) if cfg.train.probe_every_steps else None
        self.has_probe = self.online_probe is not None

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x, m = batch["pixel_values"], batch["bool_masked_pos"]
        out = model(pixel_values=x, bool_masked_pos=m)
        # The model's own loss is Transformers' (raw pixels); the normalised target is computed here.
        loss = self.cfg.loss
        return (
            simmim_loss(loss, x, out.reconstruction, m, self.cfg.model.patch_size)
            if loss.norm_target
            else out.loss
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int, log: RunLog) -> dict[str, float]:
        """Masked L1 on (up to `train.eval_batches` batches of) the held-out split, and a grid of them. With
        loss.norm_target, masked_l1 is in pixels, the predictions mapped back with each image's window
        statistics (masked pixels included, so not comparable with a raw-target run's), and masked_l1_target
        is the training loss's."""
        cfg, acc, p = self.cfg, self.accelerator, self.cfg.model.patch_size
        loader = evaluation_loader(self.val_set, cfg, acc, collate_pretrain)
        # (sum of per-batch pixel loss * images, images, sum of per-batch target loss * images)
        total = torch.zeros(3, device=acc.device)
        for i, batch in enumerate(loader):
            if cfg.train.eval_batches is not None and i == cfg.train.eval_batches:
                break
            if len(batch["index"]) == 0:
                continue
            x, m = batch["pixel_values"].to(acc.device), batch["bool_masked_pos"].to(acc.device)
            with acc.autocast():
                out = model(pixel_values=x, bool_masked_pos=m)
            pixels = reconstruction_pixels(cfg.loss, x, out.reconstruction)
            n = float(x.shape[0])
            total += torch.stack(
                (
                    simmim_loss(LossConfig(), x, pixels, m, p) * n,
                    torch.tensor(n, device=x.device),
                    simmim_loss(cfg.loss, x, out.reconstruction, m, p) * n,
                )
            )
            if i == 0 and acc.is_main_process:
                k = min(GRID_IMAGES, x.shape[0])
                grid = reconstruction_grid(
                    x[:k], pixels[:k], m[:k], patch_size=p, mean=cfg.data.mean, std=cfg.data.std,
                    bands=cfg.data.display_bands,
                )
                log.image("eval/reconstructions", grid, step)
        total = acc.reduce(total, "sum")
        images = total[1].clamp(min=1)
        metrics = {"masked_l1": (total[0] / images).item()}
        if cfg.loss.norm_target:
            metrics["masked_l1_target"] = (total[2] / images).item()
        return metrics

    def export(self, model: nn.Module, directory: Path) -> None:
        export_model(model, directory, self.cfg)

    def probe(self, model: nn.Module) -> dict[str, float]:
        return self.online_probe(model.deit, bf16=self.accelerator.mixed_precision == "bf16")


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain; writes checkpoints, logs and `output_dir/export`. Returns the engine's summary."""
    cfg = follow_launcher(cfg)  # accelerate launch with an FSDP config: train.fsdp=true
    accelerator = make_accelerator(cfg.train.precision, cfg.train.fsdp, cfg.train.collective_timeout_s)
    set_seed(cfg.seed)
    task = PretrainTask(cfg, accelerator)
    return train(task, task.cfg)  # the config with the data's statistics filled in


def online_probe(cfg: PretrainConfig) -> OnlineProbe:
    """The kNN probe of `train.probe_every_steps`: seeded subsets of a labelled dataset's two splits."""
    p, d = cfg.probe, cfg.data
    # The run's own splits (its columns, its train holdout) unless probe.data names another dataset.
    # probe.data is read map-style even when the run streams: the probe draws seeded subsets of it.
    probed = (
        cfg
        if p.data is None
        else dataclasses.replace(cfg, data=dataclasses.replace(d, path=p.data, streaming=False))
    )
    bank, queries = open_split(probed, d.train_split), open_split(probed, d.val_split)
    if not bank.has_labels:
        raise ValueError(
            f"probe.data={probed.data.path!r} has no labels: train.probe_every_steps needs a labelled dataset"
        )
    transform = eval_transform(cfg.model.image_size, **pixel_args(cfg))

    return OnlineProbe(
        LabeledImageDataset(random_subset(bank, p.bank_images, cfg.seed), transform),
        LabeledImageDataset(random_subset(queries, p.query_images, cfg.seed + 1), transform),
        num_classes=len(bank.class_names),
        layer=p.layer,
        batch_size=d.batch_size,
    )
