"""Reconstruction evaluation: metrics, per-image rows and a picture of what a SimMIM model reconstructs.

    python scripts/eval_reconstruction.py --checkpoint runs/smoke --data synthetic --out runs/smoke/eval
    accelerate launch scripts/eval_reconstruction.py --checkpoint runs/pt/export \
        --data ../shared/data/imagenette --num-images 8 --out runs/pt/eval

Writes metrics.json (masked/visible L1, MSE and PSNR, with the mean-colour and random-init baselines),
per_image.csv and reconstructions.png (original | masked | reconstruction | reconstruction pasted into the
visible pixels). Masks are drawn from --seed, so two runs give identical numbers.
"""

import argparse
import sys
from pathlib import Path

from simmim.cli import run_main
from simmim.data import MaskedImageDataset, eval_transform, open_source
from simmim.launch import make_accelerator
from simmim.reconstruction import (
    evaluate_reconstruction,
    load_masked_image_model,
    mask_generator_for,
    tensorboard_dir,
    write_outputs,
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="export/ dir, pretraining output_dir, or MIM checkpoint"
    )
    parser.add_argument("--data", required=True, help="image folder, flat folder, HF dataset, or 'synthetic'")
    parser.add_argument("--split", help="default: the source's validation split, else every image")
    parser.add_argument("--num-images", type=int, default=8, help="rows of reconstructions.png")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mask-ratio", type=float, help="default: the run's, else 0.6")
    parser.add_argument("--mask-patch-size", type=int, help="default: the run's, else 32")
    parser.add_argument("--image-size", type=int, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="run the models under bfloat16 autocast")
    parser.add_argument("--out", required=True, help="directory to write")
    args = parser.parse_args()
    if args.num_images < 0 or args.batch_size < 1:
        parser.error("--num-images must be >= 0 and --batch-size >= 1")

    ckpt = load_masked_image_model(args.checkpoint)  # NotMaskedImageModelError is a ValueError: exit 2
    run = ckpt.run_cfg
    config = ckpt.model.config
    image_size = args.image_size or config.image_hw[0]
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else (run.mask.ratio if run else 0.6)
    mask_patch = args.mask_patch_size or (run.mask.patch_size if run else 32)
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
    dataset = MaskedImageDataset(source, eval_transform(image_size, mean=ckpt.mean, std=ckpt.std), masks)

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
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(tb)) as writer:
                writer.add_image("eval_reconstruction/grid", grid, 0)
        base = summary["baselines"]
        print(
            f"{summary['num_images']} images: masked L1 {summary['masked_l1']:.4f} "
            f"(mean fill {base['mean_fill']['masked_l1']:.4f}, random init {base['random_init']['masked_l1']:.4f}), "
            f"masked PSNR {summary['masked_psnr']:.2f} dB (mean fill {base['mean_fill']['masked_psnr']:.2f}, "
            f"random init {base['random_init']['masked_psnr']:.2f}); wrote {out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
