"""Probe an encoder: kNN and linear top-1/top-5 on frozen features of chosen blocks, and a partial
fine-tune of its last block, each against random init.

    python scripts/eval_probe.py --checkpoint runs/pt --data ../shared/data/imagenette --out runs/pt/probe
    python scripts/eval_probe.py --checkpoint deit_tiny.pth --data ../shared/data/cifar10 --layers 6 12 --pool cls \
        --out runs/timm_probe

--checkpoint: a SimMIM run or export, a fine-tuned classifier, a Transformers DeiT directory or a timm file.
The probes train on the train split's labels and report on the validation split (--holdout F: on a carve of
F of the train split instead, so that nothing reads the validation split). Features are average-pooled
patch tokens (no class token) of each block's output, the last block's after the final LayerNorm
(simmim/evaluation/probe.py says why). The partial probe trains the last block, the final LayerNorm and a linear head
on cached tokens (MAE's partial fine-tuning with one block). Writes metrics.json (top-1/top-5 per probe and
layer, for the encoder and for a randomly initialised encoder of the same shape), probe.png (top-1 by layer)
and the cached features (features/), so a second run with other probe settings costs seconds.
"""

import argparse
import sys

from simmim.cli import run_main
from simmim.config import default_num_workers
from simmim.evaluation.probe import POOLS, PROBES, probe_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="run dir, export, Transformers dir or timm file")
    parser.add_argument("--data", required=True, help="a labelled image folder, HF dataset, or 'synthetic'")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--layers", type=int, nargs="+", help="blocks to probe (1-based); default: 4 evenly spaced"
    )
    parser.add_argument(
        "--pool", choices=POOLS, default="avg", help="average-pooled patch tokens or the class token"
    )
    parser.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES))
    parser.add_argument("--image-size", type=int, help="default: the encoder's")
    parser.add_argument("--num-heads", type=int, help="a timm file's attention heads (default: width / 64)")
    parser.add_argument(
        "--holdout", type=float, help="evaluate on this fraction of train, not the validation split"
    )
    parser.add_argument(
        "--train-images", type=int, help="probe with a seeded subset of this many training images"
    )
    parser.add_argument("--val-images", type=int, help="report on a seeded subset of this many images")
    parser.add_argument("--linear-epochs", type=int, default=100)
    parser.add_argument(
        "--partial-epochs", type=int, default=5, help="passes of the partial fine-tuning probe"
    )
    parser.add_argument("--no-random-init", action="store_true", help="skip the random-init baseline")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--num-workers", type=int, default=default_num_workers(),
        help="loader workers (default: as data.num_workers, from the CPUs this process may use, at most 4)",
    )
    parser.add_argument("--bf16", action="store_true", help="extract features under bfloat16 autocast")
    parser.add_argument("--seed", type=int, default=0, help="subsets, the holdout carve and the random init")
    args = parser.parse_args()
    if args.holdout is not None and not 0 < args.holdout < 1:
        parser.error(f"--holdout {args.holdout}: expected a fraction in (0, 1)")
    for name in (
        "train_images",
        "val_images",
        "batch_size",
        "linear_epochs",
        "partial_epochs",
        "image_size",
        "num_heads",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    probe_checkpoint(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
