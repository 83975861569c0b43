"""Probe an encoder: kNN and linear top-1/top-5 on frozen features of chosen blocks, and a partial
fine-tune of its last block, each against random init.

    python scripts/eval_probe.py --checkpoint runs/pt --data ../shared/data/imagenette --out runs/pt/probe
    python scripts/eval_probe.py --checkpoint deit_tiny.pth --data ../shared/data/cifar10 --layers 6 12 --pool cls \
        --out runs/timm_probe

--checkpoint: a SimMIM run or export, a fine-tuned classifier, a Transformers DeiT directory or a timm file.
The probes train on the train split's labels and report on the validation split (--holdout F: on a carve of
F of the train split instead, so that nothing reads the validation split). Features are average-pooled
patch tokens (no class token) of each block's output, the last block's after the final LayerNorm
(simmim/probe.py says why). The partial probe trains the last block, the final LayerNorm and a linear head
on cached tokens (MAE's partial fine-tuning with one block). Writes metrics.json (top-1/top-5 per probe and
layer, for the encoder and for a randomly initialised encoder of the same shape), probe.png (top-1 by layer)
and the cached features (features/), so a second run with other probe settings costs seconds.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from simmim.cli import run_main
from simmim.data import LabeledImageDataset, eval_transform, open_source
from simmim.data.sources import holdout_split, random_subset
from simmim.models import DeiTModel
from simmim.probe import (
    POOLS,
    PROBES,
    cached_features,
    default_layers,
    extract_features,
    load_encoder,
    partial_finetune_probe,
    plot_probe,
    probe_all,
)


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
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="extract features under bfloat16 autocast")
    parser.add_argument("--seed", type=int, default=0, help="subsets, the holdout carve and the random init")
    args = parser.parse_args()
    if args.holdout is not None and not 0 < args.holdout < 1:
        parser.error(f"--holdout {args.holdout}: expected a fraction in (0, 1)")
    for name in ("train_images", "val_images", "batch_size", "linear_epochs", "partial_epochs", "image_size",
                 "num_heads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: expected a positive integer")
    return run(args)


def run(args: argparse.Namespace) -> int:
    start = time.time()
    encoder = load_encoder(args.checkpoint, args.num_heads)
    config = encoder.model.config
    layers = args.layers or default_layers(config.num_hidden_layers)
    bad = [layer for layer in layers if not 1 <= layer <= config.num_hidden_layers]
    if bad:
        raise ValueError(f"--layers {bad}: the encoder has blocks 1..{config.num_hidden_layers}")
    image_size = args.image_size or config.image_hw[0]
    if image_size % config.patch_size:
        raise ValueError(
            f"--image-size {image_size}: must be divisible by the patch size {config.patch_size}"
        )

    if args.holdout is not None:
        full = open_source(args.data, "train", val_fraction=0.0)
        train_source = holdout_split(full, "train", args.holdout, args.seed)
        val_source = holdout_split(full, "validation", args.holdout, args.seed)
    else:
        train_source = open_source(args.data, "train", seed=args.seed)
        val_source = open_source(args.data, "validation", seed=args.seed)
    if not train_source.has_labels:
        raise ValueError(f"--data {args.data!r} has no labels: a probe needs class folders or a label column")
    num_classes = len(train_source.class_names)
    train_source = random_subset(train_source, args.train_images, args.seed)
    val_source = random_subset(val_source, args.val_images, args.seed + 1)
    transform = eval_transform(image_size, mean=encoder.mean, std=encoder.std)
    out = Path(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def features(model, name: str, source, split: str, layers=layers, pool=args.pool):
        key = {
            "model": name, "data": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
            "split": split, "holdout": args.holdout, "seed": args.seed, "mean": encoder.mean, "std": encoder.std,
            "count": len(source), "layers": sorted(layers), "pool": pool, "image_size": image_size,
            "bf16": args.bf16,
        }  # fmt: skip
        dataset = LabeledImageDataset(source, transform)
        if pool == "tokens":  # every token of every image (N x 65 x 192 floats at 64 px): not kept on disk
            return extract_features(
                model, dataset, layers, pool, args.batch_size, args.num_workers, args.bf16, device
            )
        return cached_features(
            out / "features",
            key,
            lambda: extract_features(
                model, dataset, layers, pool, args.batch_size, args.num_workers, args.bf16, device
            ),
        )

    checkpoint = Path(encoder.source)
    stamp = max(
        f.stat().st_mtime_ns for f in ([checkpoint] if checkpoint.is_file() else checkpoint.iterdir())
    )
    models = {
        "encoder": (encoder.model, f"{checkpoint.resolve()}@{stamp}:heads={config.num_attention_heads}")
    }
    if not args.no_random_init:
        torch.manual_seed(args.seed)
        models["random_init"] = (
            DeiTModel(config).eval(),
            "random_init:" + json.dumps(config.to_dict(), sort_keys=True) + f":{args.seed}",
        )
    metrics = {
        "checkpoint": args.checkpoint, "data": args.data, "pool": args.pool, "layers": sorted(layers),
        "image_size": image_size, "holdout": args.holdout, "seed": args.seed,
        "train_images": len(train_source), "val_images": len(val_source), "num_classes": num_classes,
        "knn": {"k": 20, "temperature": 0.07}, "linear": {"epochs": args.linear_epochs},
        "partial": {"epochs": args.partial_epochs, "block": config.num_hidden_layers},
    }  # fmt: skip
    for which, (model, name) in models.items():
        metrics[which] = {}
        if {"knn", "linear"} & set(args.probes):
            train = features(model, name, train_source, "train")
            val = features(model, name, val_source, "validation")
            metrics[which] = probe_all(train, val, num_classes, args.probes, args.linear_epochs)
        if "partial" in args.probes:
            # The tokens entering the last block (the output of the one before it), every token kept.
            before_last = [config.num_hidden_layers - 1]
            train_tokens, train_labels = features(model, name, train_source, "train", before_last, "tokens")
            val_tokens, val_labels = features(model, name, val_source, "validation", before_last, "tokens")
            last = before_last[0]
            metrics[which]["partial"] = {
                str(config.num_hidden_layers): partial_finetune_probe(
                    train_tokens[last], train_labels, val_tokens[last], val_labels, model, num_classes,
                    epochs=args.partial_epochs, seed=args.seed,
                )  # fmt: skip
            }
    metrics["seconds"] = round(time.time() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    try:
        plot_probe(metrics, out / "probe.png")
    except ImportError:
        print("probe.png not drawn: matplotlib is missing (pip install 'simmim[study]')")
    for which in models:
        for probe in args.probes:
            row = ", ".join(f"block {k} {v['top1']:.2f}" for k, v in metrics[which][probe].items())
            print(f"{which:12s} {probe:6s} top-1: {row}")
    print(f"{len(train_source)} train / {len(val_source)} eval images, {metrics['seconds']} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
