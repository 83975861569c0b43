"""Reconstruction evaluation of a SimMIM model: per-image metrics on a split, baselines beside them, and a
grid of reconstructions. `scripts/eval_reconstruction.py` is the command line.

Baselines: (a) every masked pixel filled with its image's mean visible colour, (b) a randomly initialised
model of the same config, (c) for a normalised-target model, a prediction of zero in the target space: each
pixel's window mean, which the mapping back to pixels gives for free. All see the masks the model sees.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image
from tqdm.auto import tqdm

from simmim.config import MaskConfig, PretrainConfig
from simmim.data import MaskedImageDataset, build_loader, collate_pretrain, eval_transform, open_source
from simmim.evaluation.grids import display_bands, reconstruction_grid
from simmim.evaluation.metrics import mean_fill_baseline, reconstruction_metrics
from simmim.exports import open_model
from simmim.launch import make_accelerator
from simmim.masking import MaskGenerator
from simmim.models import DeiTForMaskedImageModeling
from simmim.models.losses import targets_to_pixels
from simmim.rundir import METRICS_FILE

METRICS = ("masked_l1", "masked_mse", "masked_psnr", "visible_l1", "visible_psnr")
BASELINE_METRICS = ("masked_l1", "masked_mse", "masked_psnr")


class NotMaskedImageModelError(ValueError):
    """The checkpoint holds another kind of model."""


class LoadedCheckpoint:
    def __init__(
        self, model, mean, std, run_cfg: PretrainConfig | None, run_dir: Path | None, max_value=None
    ) -> None:
        self.model, self.mean, self.std, self.run_cfg, self.run_dir = model, mean, std, run_cfg, run_dir
        self.max_value = max_value  # what integer pixels were divided by in training (None: their range)


def load_masked_image_model(path: str | Path) -> LoadedCheckpoint:
    """An export directory, a pretraining output_dir (its newest state), or any DeiT MIM checkpoint."""
    opened = open_model(path, what="--checkpoint", from_checkpoint=True)
    if not isinstance(opened.model, DeiTForMaskedImageModeling):
        held = type(opened.model).__name__
        if opened.run_dir is not None and opened.path.parent.parent == opened.run_dir:  # a run's checkpoint
            held = f"fine-tuning run ({opened.run_config.model.head} head)"
        raise NotMaskedImageModelError(
            f"{path} holds a {held}, not a masked-image model; expected a DeiTForMaskedImageModeling "
            "checkpoint (a SimMIM export/ or pretraining output_dir)"
        )
    run_cfg = opened.run_config if isinstance(opened.run_config, PretrainConfig) else None
    mean, std = tuple(opened.mean), tuple(opened.std)
    return LoadedCheckpoint(opened.model, mean, std, run_cfg, opened.run_dir, opened.max_value)


def grid_indices(num_images: int, count: int, seed: int):
    """Sorted indices of `count` images drawn with `seed` from a split of `num_images`: a sample spread over
    the split (its first images are often one class: Imagenette's first 8 are all tench)."""
    count = min(count, num_images)
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:count].sort().values


@torch.no_grad()
def evaluate_reconstruction(
    model: DeiTForMaskedImageModeling,
    dataset: MaskedImageDataset,
    *,
    accelerator: Accelerator,
    mean,
    std,
    batch_size: int,
    seed: int,
    num_grid_images: int,
    bf16: bool = False,
    num_workers: int = 0,
    norm_target_window: int | None = None,
    bands: Sequence[int] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], torch.Tensor | None]:
    """Returns (summary metrics with baselines, one row per image, grid or None). The grid shows
    `num_grid_images` images drawn with `seed` from the whole split (`grid_indices`), in split order.

    `norm_target_window`: the model (a run with loss.norm_target) predicts SimMIM's normalised target; its
    reconstructions, and the random-init model's, are mapped back to pixels with each image's window
    statistics (`losses.targets_to_pixels`) before they are scored and shown, so that every metric stays in
    the pixel space of the baselines."""
    device = accelerator.device
    model = model.to(device).eval()
    torch.manual_seed(seed)
    random_model = DeiTForMaskedImageModeling(model.config).to(device).eval()
    image_size = model.config.image_hw
    p = model.config.patch_size
    loader = build_loader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        seed=seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        collate_fn=collate_pretrain,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    rows: list[dict[str, Any]] = []
    chosen = set(grid_indices(len(dataset), num_grid_images, seed).tolist())
    grid_parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (index, x, recon, mask)
    skipped = 0
    for batch in tqdm(loader, desc="reconstruction", disable=not accelerator.is_main_process):
        skipped += batch["num_skipped"]
        if len(batch["index"]) == 0:
            continue  # every image of this batch was unreadable (or this rank's share of the tail is empty)
        x, m = batch["pixel_values"].to(device), batch["bool_masked_pos"].to(device)
        resize = tuple(x.shape[-2:]) != image_size
        with autocast:
            recon = model(x, bool_masked_pos=m, interpolate_pos_encoding=resize).reconstruction.float()
            random_recon = random_model(
                x, bool_masked_pos=m, interpolate_pos_encoding=resize
            ).reconstruction.float()
        if norm_target_window is not None:
            recon = targets_to_pixels(recon, x, norm_target_window)
            random_recon = targets_to_pixels(random_recon, x, norm_target_window)
        baselines = {"mean_fill": mean_fill_baseline(x, m, p), "random_init": random_recon}
        if norm_target_window is not None:
            # the mapping back alone: each pixel's window mean, whose window holds the masked pixels themselves
            baselines["window_mean"] = targets_to_pixels(torch.zeros_like(recon), x, norm_target_window)
        ours = reconstruction_metrics(x, recon, m, patch_size=p, mean=mean, std=std)
        scored = {
            name: reconstruction_metrics(x, guess, m, patch_size=p, mean=mean, std=std)
            for name, guess in baselines.items()
        }
        for i, (index, name) in enumerate(zip(batch["index"].tolist(), batch["name"])):
            row = {"index": index, "image": name}
            row.update({k: ours[k][i].item() for k in METRICS})
            for baseline, metrics in scored.items():
                row.update({f"{baseline}_{k}": metrics[k][i].item() for k in BASELINE_METRICS})
            rows.append(row)
        for i, index in enumerate(batch["index"].tolist()):
            if index in chosen:
                grid_parts.append((index, x[i].cpu(), recon[i].cpu(), m[i].cpu()))

    rows = sorted(gather_object(rows), key=lambda r: r["index"]) if accelerator.num_processes > 1 else rows
    skipped = sum(gather_object([skipped])) if accelerator.num_processes > 1 else skipped
    if accelerator.num_processes > 1:
        grid_parts = gather_object(grid_parts)
    grid_parts.sort(key=lambda part: part[0])

    def mean_of(key: str) -> float:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        return sum(values) / len(values) if values else math.nan

    summary: dict[str, Any] = {k: mean_of(k) for k in METRICS}
    summary["num_images"] = len(rows)
    summary["reconstruction_space"] = (
        "pixels"
        if norm_target_window is None
        else f"pixels (normalised-target predictions mapped back with each image's {norm_target_window}-px "
        "window statistics, masked pixels included: not comparable with a raw-target model's L1; the "
        "window_mean baseline is what the mapping back gives for free)"
    )
    summary["num_skipped"] = skipped
    names = ("mean_fill", "random_init") + (("window_mean",) if norm_target_window is not None else ())
    summary["baselines"] = {name: {k: mean_of(f"{name}_{k}") for k in BASELINE_METRICS} for name in names}
    grid = None
    if grid_parts and num_grid_images > 0:
        x, recon, m = (torch.stack(t) for t in list(zip(*grid_parts))[1:])
        grid = reconstruction_grid(x, recon, m, patch_size=p, mean=mean, std=std, bands=bands)
    return summary, rows, grid


BASELINE_NAMES = {"mean_fill": "mean-colour fill", "random_init": "random init", "window_mean": "window mean"}


def baselines_text(summary: dict[str, Any], metric: str) -> str:
    """The baselines of a summary (metrics.json) in words, e.g. "mean-colour fill 0.8592, random init 0.4622".
    Summaries written before the window-mean baseline have the other two."""
    fmt = "{:.2f}" if metric.endswith("psnr") else "{:.4f}"
    base = summary["baselines"]
    return ", ".join(
        f"{words} {fmt.format(base[name][metric])}"
        for name, words in BASELINE_NAMES.items()
        if name in base
    )


def write_outputs(
    out: Path, summary: dict[str, Any], rows: list[dict[str, Any]], grid: torch.Tensor | None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if rows:
        with (out / "per_image.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if grid is not None:
        save_image(grid, out / "reconstructions.png")


def tensorboard_dir(*candidates: Path | None) -> Path | None:
    """The first directory (searched recursively) that already holds TensorBoard event files."""
    for directory in candidates:
        if directory is not None and directory.is_dir():
            for events in sorted(directory.rglob("events.out.tfevents*")):
                return events.parent
    return None


def mask_generator_for(
    image_size: int, patch_size: int, mask_patch_size: int, mask_ratio: float
) -> MaskGenerator:
    return MaskGenerator(
        input_size=image_size,
        mask_patch_size=mask_patch_size,
        model_patch_size=patch_size,
        mask_ratio=mask_ratio,
    )


def evaluate_checkpoint(args: Any) -> dict[str, Any]:
    """scripts/eval_reconstruction.py's run: `args` are its parsed arguments; writes `args.out` and returns
    the summary. Mask settings default to the run's (its config), else to `MaskConfig`'s."""
    ckpt = load_masked_image_model(args.checkpoint)  # NotMaskedImageModelError is a ValueError: exit 2
    run = ckpt.run_cfg
    config = ckpt.model.config
    image_size = args.image_size or config.image_hw[0]
    mask_ratio = (
        args.mask_ratio if args.mask_ratio is not None else (run.mask.ratio if run else MaskConfig().ratio)
    )
    mask_patch = args.mask_patch_size or (run.mask.patch_size if run else MaskConfig().patch_size)
    # Raises a ValueError naming the values when the sizes do not fit together.
    masks = mask_generator_for(image_size, config.patch_size, mask_patch, mask_ratio)

    # Without --split: the validation split, or every image when the source has none (val_fraction 0).
    synthetic_size = run.data.synthetic_size if run else 1024  # the run's held-out synthetic images
    # A split carved from a one-split source uses the run's seed and fraction, so it is the run's held-out part.
    carve_seed, carve_fraction = (run.seed, run.data.val_fraction) if run else (0, 0.05)
    source = open_source(
        args.data,
        args.split or "validation",
        val_fraction=carve_fraction if args.split else 0.0,
        seed=carve_seed,
        synthetic_size=synthetic_size,
        synthetic_image_size=image_size,
    )
    channels = config.num_channels
    transform = eval_transform(
        image_size, mean=ckpt.mean, std=ckpt.std, num_channels=channels, max_value=ckpt.max_value
    )
    dataset = MaskedImageDataset(source, transform, masks)
    # the bands shown: --display-bands, else the run's data.display_bands; checked before any work
    bands = args.display_bands or (run.data.display_bands if run else None)
    display_bands(channels, bands)

    accelerator = make_accelerator()
    summary, rows, grid = evaluate_reconstruction(
        ckpt.model,
        dataset,
        accelerator=accelerator,
        mean=ckpt.mean,
        std=ckpt.std,
        batch_size=args.batch_size,
        seed=args.seed,
        num_grid_images=args.num_images,
        bf16=args.bf16,
        num_workers=args.num_workers,
        norm_target_window=run.loss.norm_target_window if run and run.loss.norm_target else None,
        bands=bands,
    )
    summary.update(
        checkpoint=str(args.checkpoint),
        data=args.data,
        split=source.split,
        image_size=image_size,
        mask_ratio=mask_ratio,
        mask_patch_size=mask_patch,
        seed=args.seed,
    )
    if accelerator.is_main_process:
        out = Path(args.out)
        write_outputs(out, summary, rows, grid)
        tb = tensorboard_dir(out, ckpt.run_dir)
        if tb is not None and grid is not None:
            with SummaryWriter(str(tb)) as writer:
                writer.add_image("eval_reconstruction/grid", grid, 0)
        print(
            f"{summary['num_images']} images: masked L1 {summary['masked_l1']:.4f} "
            f"({baselines_text(summary, 'masked_l1')}), masked PSNR {summary['masked_psnr']:.2f} dB "
            f"({baselines_text(summary, 'masked_psnr')}); in {summary['reconstruction_space']}; wrote {out}"
        )
    return summary
