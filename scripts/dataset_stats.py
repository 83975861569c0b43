"""Per-channel statistics of a dataset's pixels, for data.normalize=dataset (data.stats=FILE).

    python scripts/dataset_stats.py ../shared/data/imagenette --out runs/imagenette_stats.json
    python scripts/dataset_stats.py my_tiffs/ --channels 6 --max-value 4095 --samples all --out stats.json

Reads a seeded sample of the train split (--samples, default 1000; "all" for every image) as the model
takes it (--channels; integers divided by their type's largest value or --max-value), and prints and
writes the mean and std (population) and the value range of each channel, of pixels scaled to [0, 1], at
the images' stored resolution. Images that cannot be read, or have another channel count, are skipped and
counted; a constant channel (std 0) is an error.
"""

import argparse
import sys
from pathlib import Path

from simmim.cli import run_main
from simmim.data.normalization import channel_statistics
from simmim.data.sources import open_source


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", help="an image folder, shards, a Hugging Face dataset, or 'synthetic'")
    parser.add_argument("--split", default="train")
    parser.add_argument("--channels", type=int, default=3, help="the model's num_channels (default 3)")
    parser.add_argument(
        "--max-value", type=float, help="divide integer pixels by this (default: their range)"
    )
    parser.add_argument("--samples", default="1000", help='images drawn with --seed, or "all"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--streaming", action="store_true", help="read the data as a stream (its first images)"
    )
    parser.add_argument("--out", help="JSON file to write (data.stats=FILE reads it)")
    args = parser.parse_args()
    samples = None if args.samples == "all" else int(args.samples) if args.samples.isdigit() else -1
    if samples is not None and samples < 1:
        parser.error(f"--samples {args.samples}: expected a positive integer or 'all'")
    if args.channels < 1 or (args.max_value is not None and args.max_value <= 0):
        parser.error("--channels must be >= 1 and --max-value > 0")
    source = open_source(args.data, args.split, streaming=args.streaming, val_fraction=0.0)
    stats = channel_statistics(
        source, args.channels, max_value=args.max_value, samples=samples, seed=args.seed, data=args.data
    )
    print(stats.to_json(), end="")
    print(f"{stats.images} images read, {stats.skipped} skipped", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(stats.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
