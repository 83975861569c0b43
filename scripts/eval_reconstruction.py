"""Reconstruction evaluation: metrics, per-image rows and a picture of what a SimMIM model reconstructs.

    python scripts/eval_reconstruction.py --checkpoint runs/smoke --data synthetic --out runs/smoke/eval
    accelerate launch scripts/eval_reconstruction.py --checkpoint runs/pt/export \
        --data ../shared/data/imagenette --num-images 8 --out runs/pt/eval

Writes metrics.json (masked/visible L1, MSE and PSNR, with the mean-colour and random-init baselines, and
for a normalised-target model the window mean that mapping its predictions back to pixels gives for free),
per_image.csv and reconstructions.png (original | masked | reconstruction | reconstruction pasted into the
visible pixels). Masks are drawn from --seed, so two runs give identical numbers.
"""

import argparse
import sys

from simmim.cli import run_main
from simmim.config import MaskConfig, default_num_workers
from simmim.evaluation.reconstruction import evaluate_checkpoint


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
    parser.add_argument("--mask-ratio", type=float, help=f"default: the run's, else {MaskConfig().ratio}")
    parser.add_argument(
        "--mask-patch-size", type=int, help=f"default: the run's, else {MaskConfig().patch_size}"
    )
    parser.add_argument("--image-size", type=int, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-workers", type=int, default=default_num_workers(),
        help="loader workers (default: as data.num_workers, from the CPUs this process may use, at most 4)",
    )
    parser.add_argument("--bf16", action="store_true", help="run the models under bfloat16 autocast")
    parser.add_argument(
        "--display-bands",
        type=lambda text: [int(b) for b in text.split(",")],
        help="channels shown as red,green,blue (e.g. 3,2,1), or one as grey; default: the run's "
        "data.display_bands, else the first three",
    )
    parser.add_argument("--out", required=True, help="directory to write")
    args = parser.parse_args()
    if args.num_images < 0 or args.batch_size < 1:
        parser.error("--num-images must be >= 0 and --batch-size >= 1")

    evaluate_checkpoint(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
