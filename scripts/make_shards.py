"""Turn any source simmim reads (an image folder, a Hugging Face dataset, `synthetic`) into webdataset tar
shards, keeping the labels: the layout timm, the Hub and `datasets`' webdataset builder read.

    python scripts/make_shards.py ../shared/data/imagenette runs/shards/imagenette --shard-size 1000 \
        --split train --split validation

Each split becomes `OUT/<split>-00000.tar, ...`; a shard holds `<key>.<ext>` (the image: a folder's file as
it is when all its files share one format, else the image as lossless PNG) and, for labelled sources, `<key>.cls` (the class index as
text). Shards are written to a temporary name and renamed when complete, so an interrupted run leaves no
half shard; `OUT/index.json` lists every split's shards with their example counts, the class names and the
images skipped because they could not be decoded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from tqdm.auto import tqdm

from simmim.cli import run_main
from simmim.data import open_source
from simmim.data.decoding import Pixels, decode_image
from simmim.data.pixels import decoded_colours
from simmim.data.sources import SHARD_INDEX, FolderSource


def _member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def _extension(name: str) -> str:
    return Path(name).suffix.lower().lstrip(".").replace("jpeg", "jpg")


def copies_files(source) -> bool:
    """Whether the split's files can go into the shards as they are: a folder whose images all share one
    format (webdataset readers, `datasets`' among them, want one image key per example set)."""
    return isinstance(source, FolderSource) and len({_extension(os.fsdecode(f)) for f in source.files}) == 1


def encoded_image(source, index: int, copy: bool, tiff: bool) -> tuple[bytes, str] | None:
    """(the image's bytes, their extension), or None when it cannot be decoded: the file as it is (`copy`),
    else the decoded image losslessly: as PNG, or as TIFF (`tiff`: a split whose images PNG cannot hold,
    any band count, 16-bit colour or floats, keeps every image's values and channels as they are)."""
    if copy:
        path = os.path.join(source.root, os.fsdecode(source.files[index]))
        if decode_image(path, path) is None:
            return None
        return Path(path).read_bytes(), _extension(path)
    image = source.load(index)[0]
    if image is None:
        return None
    buffer = io.BytesIO()
    if isinstance(image, Image.Image):
        image = decoded_colours(image)  # a palette's or CMYK's colours, not its stored values
    if tiff:
        if isinstance(image, Pixels):
            values, alpha = image.values, image.alpha
        else:
            values, alpha = np.asarray(image), image.mode in ("RGBA", "LA")
        values = values[:, :, 0] if values.ndim == 3 and values.shape[2] == 1 else values  # (H, W) grey
        channels = values.shape[2] if values.ndim == 3 else 1
        rgb = channels - alpha == 3
        # the samples past the photometric ones are extra samples; an alpha one is read back as
        # transparency, not as one more band
        extra = ["unspecified"] * (channels - (3 if rgb else 1) - alpha) + ["unassalpha"] * alpha
        tifffile.imwrite(
            buffer, values, photometric="rgb" if rgb else "minisblack",
            planarconfig="contig" if channels > 1 else None, extrasamples=extra or None,
        )  # fmt: skip
        return buffer.getvalue(), "tif"
    if isinstance(image, Pixels):
        name = source.load(index)[2]
        raise ValueError(
            f"{name}: {image.channels} channel(s) of {image.values.dtype}, which PNG cannot keep, in a split "
            "whose first image was written as PNG: convert the split's images to one format (TIFF keeps any)"
        )
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def needs_tiff(source) -> bool:
    """Whether a split that is re-encoded goes to TIFF: its first readable image is one PIL cannot hold
    (the format of a split's members must be one for webdataset readers, `datasets`' among them)."""
    for index in range(min(len(source), 16)):
        image = source.load(index)[0]
        if image is not None:
            return isinstance(image, Pixels)
    return False


def write_split(source, out: Path, split: str, shard_size: int) -> dict:
    """Write one split's shards; returns its index entry."""
    shards, skipped, count, tar, tmp = [], 0, 0, None, None
    mtime = time.time()

    def close() -> None:
        tar.close()
        final = out / f"{split}-{len(shards):05d}.tar"
        os.replace(tmp, final)
        shards.append({"name": final.name, "count": count})

    labels = source.labels() if source.has_labels else None  # read once: no image is decoded for it
    copy = copies_files(source)
    tiff = not copy and needs_tiff(source)
    if isinstance(source, FolderSource) and not copy:
        print(f"{split}: the folder mixes image formats; every image is written as {'TIFF' if tiff else 'PNG'}",
              file=sys.stderr)  # fmt: skip
    for index in tqdm(range(len(source)), desc=split, unit="img", dynamic_ncols=True):
        encoded = encoded_image(source, index, copy, tiff)
        if encoded is None:
            skipped += 1
            continue
        if tar is None:
            tmp = out / f"{split}-{len(shards):05d}.tar.tmp"
            tar, count = tarfile.open(tmp, "w"), 0
        data, ext = encoded
        key = f"{index:08d}"
        _member(tar, f"{key}.{ext}", data, mtime)
        if labels is not None:
            _member(tar, f"{key}.cls", str(int(labels[index])).encode(), mtime)
        count += 1
        if count == shard_size:
            close()
            tar = None
    if tar is not None:
        close()
    return {"shards": shards, "examples": sum(s["count"] for s in shards), "skipped": skipped}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="an image folder, a Hugging Face dataset (name or saved), or 'synthetic'")
    parser.add_argument("out", type=Path, help="the directory to write the shards and index.json to")
    parser.add_argument("--shard-size", type=int, default=1000, help="examples per shard")
    parser.add_argument("--split", action="append", help="a split to convert (repeatable; default: train)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="for a source without a validation split, the fraction of train carved out as "
                        "'validation' (default 0.05 when --split validation is asked for, else 0: all of train)")  # fmt: skip
    args = parser.parse_args()
    if args.shard_size < 1:
        parser.error(f"--shard-size {args.shard_size}: expected a positive number of examples")
    splits = args.split or ["train"]
    if args.val_fraction is None:
        args.val_fraction = 0.05 if "validation" in splits else 0.0
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction {args.val_fraction}: expected a fraction in [0, 1)")
    # Every split is opened before any is written: a missing split or path fails before any work.
    sources = {s: open_source(args.src, s, val_fraction=args.val_fraction) for s in splits}
    args.out.mkdir(parents=True, exist_ok=True)
    index = {"format": "webdataset", "source": args.src, "splits": {}}
    for split, source in sources.items():
        entry = write_split(source, args.out, split, args.shard_size)
        index["splits"][split] = entry
        index["classes"] = source.class_names
        print(f"{split}: {entry['examples']} examples in {len(entry['shards'])} shards, {entry['skipped']} unreadable "
              "images skipped", file=sys.stderr)  # fmt: skip
    tmp = args.out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, args.out / SHARD_INDEX)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
