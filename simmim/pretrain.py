"""SimMIM pretraining (Xie et al., 2022) of a DeiT encoder: the data, model, loss and evaluation that
`simmim.engine.train` runs. `scripts/pretrain.py` is the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from accelerate.utils import set_seed

from simmim import sharding
from simmim.config import LossConfig, PretrainConfig
from simmim.data import (
    LabeledImageDataset,
    MaskedImageDataset,
    collate_pretrain,
    eval_transform,
    pretrain_transform,
)
from simmim.data.sources import open_split, random_subset
from simmim.engine import evaluation_loader, make_accelerator, train
from simmim.exports import export_model, new_deit
from simmim.masking import MaskGenerator
from simmim.models import DeiTForMaskedImageModeling
from simmim.models.losses import masked_l1, norm_targets, patch_mask_to_pixels, targets_to_pixels
from simmim.probe import OnlineProbe
from simmim.run_log import RunLog
from simmim.rundir import prepare_output_dir
from simmim.visualize import reconstruction_grid

GRID_IMAGES = 8


def build_model(cfg: PretrainConfig) -> DeiTForMaskedImageModeling:
    return new_deit(DeiTForMaskedImageModeling, cfg.model)


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


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain; writes checkpoints, logs and `output_dir/export`. Returns the engine's summary."""
    cfg = sharding.follow_launcher(cfg)  # accelerate launch with an FSDP config: train.fsdp=true
    accelerator = make_accelerator(cfg.train.precision, fsdp=cfg.train.fsdp)
    set_seed(cfg.seed)
    d = cfg.data
    # The data first: a wrong path is reported before the run directory is written.
    train_source, val_source = open_split(cfg, d.train_split), open_split(cfg, d.val_split)
    model = build_model(cfg)
    prepare_output_dir(cfg, accelerator, model)
    masks = mask_generator(cfg)
    train_set = MaskedImageDataset(
        train_source, pretrain_transform(cfg.model.image_size, mean=d.mean, std=d.std), masks
    )
    if cfg.train.eval_batches is not None and not val_source.is_streaming:
        # The periodic evaluation reads train.eval_batches batches: a seeded sample in random order, so that
        # they (and the TensorBoard grid of the first batch) cover the split, not its first class folder.
        val_source = random_subset(
            val_source, cfg.train.eval_batches * d.batch_size, cfg.seed, keep_order=False
        )
    val_set = MaskedImageDataset(
        val_source, eval_transform(cfg.model.image_size, mean=d.mean, std=d.std), masks
    )

    probe = online_probe(cfg) if cfg.train.probe_every_steps else None
    p = cfg.model.patch_size

    def loss_fn(model, batch):
        x, m = batch["pixel_values"], batch["bool_masked_pos"]
        out = model(pixel_values=x, bool_masked_pos=m)
        # The model's own loss is Transformers' (raw pixels); the normalised target is computed here.
        return simmim_loss(cfg.loss, x, out.reconstruction, m, p) if cfg.loss.norm_target else out.loss

    @torch.no_grad()
    def evaluate(model, step: int, log: RunLog) -> dict[str, float]:
        """Masked L1 on (up to `train.eval_batches` batches of) the held-out split, and a grid of them. With
        loss.norm_target, masked_l1 is still in pixels (comparable with raw-target runs) and
        masked_l1_target is the training loss's."""
        loader = evaluation_loader(val_set, cfg, accelerator, collate_pretrain)
        # (sum of per-batch pixel loss * images, images, sum of per-batch target loss * images)
        total = torch.zeros(3, device=accelerator.device)
        for i, batch in enumerate(loader):
            if cfg.train.eval_batches is not None and i == cfg.train.eval_batches:
                break
            if len(batch["index"]) == 0:
                continue
            x, m = (
                batch["pixel_values"].to(accelerator.device),
                batch["bool_masked_pos"].to(accelerator.device),
            )
            with accelerator.autocast():
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
            if i == 0 and accelerator.is_main_process:
                n = min(GRID_IMAGES, x.shape[0])
                grid = reconstruction_grid(
                    x[:n],
                    pixels[:n],
                    m[:n],
                    patch_size=cfg.model.patch_size,
                    mean=d.mean,
                    std=d.std,
                )
                log.image("eval/reconstructions", grid, step)
        total = accelerator.reduce(total, "sum")
        images = total[1].clamp(min=1)
        metrics = {"masked_l1": (total[0] / images).item()}
        if cfg.loss.norm_target:
            metrics["masked_l1_target"] = (total[2] / images).item()
        return metrics

    return train(
        cfg,
        accelerator=accelerator,
        model=model,
        train_set=train_set,
        collate_fn=collate_pretrain,
        loss_fn=loss_fn,
        evaluate=evaluate,
        export=lambda m, directory: export_model(m, directory, cfg),
        probe=(lambda m: probe(m.deit, bf16=accelerator.mixed_precision == "bf16")) if probe else None,
    )


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
    transform = eval_transform(cfg.model.image_size, mean=d.mean, std=d.std)

    return OnlineProbe(
        LabeledImageDataset(random_subset(bank, p.bank_images, cfg.seed), transform),
        LabeledImageDataset(random_subset(queries, p.query_images, cfg.seed + 1), transform),
        num_classes=len(bank.class_names),
        layer=p.layer,
        batch_size=d.batch_size,
    )
