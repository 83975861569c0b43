"""Can the loader feed a GPU? JPEGs of 224-500 px, simmim's pretraining pipeline (decode, random resized crop
to 224, flip, normalise, mask, collate) over N loader workers into pinned memory, against JPEG decoding on
the GPU (`torchvision.io.decode_jpeg(..., device="cuda")`).

    python benchmarks/gpu_loader.py --make /tmp/jpegs --images 3000       # write the JPEGs first
    python benchmarks/gpu_loader.py --data /tmp/jpegs --workers 14 --out runs/gpu/loader.json
    python benchmarks/gpu_loader.py --make /tmp/j --images 64 --data /tmp/j --workers 2 --batches 4 --out x.json

The images are drawn here (smooth colour fields with shapes and noise, so that they compress as photos
do, not as flat colour), in two class folders; their sides are drawn uniformly from 224 to 500 px.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simmim.data import MaskedImageDataset, build_loader, collate_pretrain, open_source, pretrain_transform
from simmim.masking import MaskGenerator


def make_jpegs(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(224, 501, size=2)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        colour = rng.random((3, 3))
        field = colour[:, 0, None, None] + colour[:, 1, None, None] * xx + colour[:, 2, None, None] * yy
        image = (np.moveaxis(field, 0, -1) * 160 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(20, 120)
        image[(yy * max(h, w) - cy) ** 2 + (xx * max(h, w) - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=90)


def loader_rate(data: Path, workers: int, batch: int, batches: int, pin: bool) -> float:
    """Images per second out of the DataLoader (pinned host batches), epoch after epoch, timed over
    `batches` batches once the workers' prefetched batches (2 each) have been taken."""
    dataset = MaskedImageDataset(open_source(str(data), "train", val_fraction=0.0), pretrain_transform(224),
                                 MaskGenerator(224, mask_patch_size=32, model_patch_size=16))  # fmt: skip
    skip = 2 * max(workers, 1) + 2
    seen, start, i = 0, time.perf_counter(), 0
    for epoch in itertools.count():
        loader = build_loader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                              seed=0, epoch=epoch, pin_memory=pin, collate_fn=collate_pretrain)  # fmt: skip
        for b in loader:
            if i == skip:
                seen, start = 0, time.perf_counter()
            seen += b["pixel_values"].shape[0]
            i += 1
            if i == skip + batches:
                return seen / (time.perf_counter() - start)
    raise AssertionError("unreachable")


def gpu_decode_rate(data: Path, count: int) -> float | None:
    """JPEG bytes -> decoded on the GPU -> resized crop 224, batched; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    files = sorted(data.rglob("*.jpg"))[:count]
    raw = [read_file(str(f)) for f in files]
    for _ in range(2):  # warm-up (nvjpeg's handles)
        decode_jpeg(raw[:32], device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(raw), 128):
        images = decode_jpeg(raw[i : i + 128], device="cuda")
        _ = torch.stack(
            [F.resized_crop(im, 0, 0, min(im.shape[1:]), min(im.shape[1:]), [224, 224]) for im in images]
        )
    torch.cuda.synchronize()
    return len(raw) / (time.perf_counter() - start)


def cpu_decode_rate(data: Path, count: int) -> float:
    """One worker's rate for the decode + transform alone (no mask, no collate), in this process."""
    dataset = MaskedImageDataset(open_source(str(data), "train", val_fraction=0.0), pretrain_transform(224),
                                 MaskGenerator(224, mask_patch_size=32, model_patch_size=16))  # fmt: skip
    torch.set_num_threads(1)
    start = time.perf_counter()
    for i in range(count):
        dataset[i]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--make", type=Path, help="write --images JPEGs here first")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.make:
        start = time.perf_counter()
        make_jpegs(args.make, args.images)
        print(f"wrote {args.images} JPEGs to {args.make} in {time.perf_counter() - start:.0f} s", flush=True)
    if args.data is None:
        return
    cuda = torch.cuda.is_available()
    result = {
        "workers": args.workers,
        "batch_size": args.batch_size,
        "loader_img_per_s": loader_rate(args.data, args.workers, args.batch_size, args.batches, pin=cuda),
        "cpu_decode_img_per_s_per_worker": cpu_decode_rate(args.data, min(200, args.images)),
        "gpu_decode_img_per_s": gpu_decode_rate(args.data, min(2048, args.images)),
    }
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
