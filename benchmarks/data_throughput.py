"""Images per second per loader worker: simmim's decode + SimMIM pretraining transform + mask + collate,
against a plain PIL + torchvision-v1 pipeline (RandomResizedCrop, flip, ToTensor, Normalize) on the same files.

    python benchmarks/data_throughput.py                      # ../shared/data/imagenette, 224 px
    python benchmarks/data_throughput.py --num-images 512 --rounds 5

The same images are also read as streams (`data.streaming=true`) from webdataset tar shards and from
parquet shards written to a temporary folder: a stream should reach >= 90% of the folder's rate per
worker, decoding being the cost, not the container. And as the images users bring beside RGB: a folder of
16-bit grey TIFFs (1 band) and one of 6-band 16-bit TIFFs (uncompressed, made from the same images), read
with model.num_channels=1 and 6: they decode with tifffile and are transformed as float32.

One process with one torch thread and num_workers=0, as inside one DataLoader worker; the pipelines run
alternately, batch by batch, so that all see the same machine load and a warm page cache. Target: >= 800 img/s.

Measured 2026-12-04 on the 2-core AMD EPYC (avx512_bf16), `--num-images 1024 --rounds 5`, img/s per worker:
folder 842, tar shards 799 (0.95x the folder), parquet shards 839 (1.00x), reference 690 (simmim 1.22x).
A shorter run (`--num-images 512 --rounds 3`) gave 818 / 776 (0.95x) / 741 (0.91x) / 647.
"""

import argparse
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from simmim.data import MaskedImageDataset, build_loader, collate_pretrain, open_source, pretrain_transform
from simmim.masking import MaskGenerator

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette"


class ReferenceImages(Dataset):
    """The usual hand-rolled pipeline: PIL open + convert, then torchvision v1 transforms."""

    def __init__(self, paths: list[str], image_size: int) -> None:
        self.paths = paths
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def interleaved_rates(loaders: dict[str, DataLoader], num_images: int) -> dict[str, tuple[float, float]]:
    """One epoch of each loader, alternating batch by batch so that both see the same machine load.

    Returns name -> (images per second of wall time, images per second of this process's CPU time); the
    second leaves out the time other processes on a shared machine take from this one.
    """
    wall, cpu = dict.fromkeys(loaders, 0.0), dict.fromkeys(loaders, 0.0)
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    while iterators:
        for name in list(iterators):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            try:
                next(iterators[name])
            except StopIteration:
                del iterators[name]
            wall[name] += time.perf_counter() - start_wall
            cpu[name] += time.process_time() - start_cpu
    return {name: (num_images / wall[name], num_images / cpu[name]) for name in loaders}


def write_shards(paths: list[str], labels: list[int], directory: Path, per_shard: int = 64) -> None:
    """The images as they are, in tar shards (`<key>.jpg` + `<key>.cls`) and in parquet shards (the Hub's
    layout, an Image column and a label column), 64 images a shard."""
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    for s, start in enumerate(range(0, len(paths), per_shard)):
        part = range(start, min(start + per_shard, len(paths)))
        with tarfile.open(directory / "tar" / f"train-{s:05d}.tar", "w") as tar:
            for i in part:
                for name, data in (
                    (f"{i:08d}.jpg", Path(paths[i]).read_bytes()),
                    (f"{i:08d}.cls", b"%d" % labels[i]),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        rows = {"image": [{"bytes": Path(paths[i]).read_bytes(), "path": None} for i in part]}
        rows["label"] = [labels[i] for i in part]
        parquet = directory / "parquet" / "data" / f"train-{s:05d}.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))


def write_tiffs(paths: list[str], directory: Path) -> tuple[Path, Path]:
    """The images as 16-bit grey TIFFs and as 6-band 16-bit TIFFs (R, G, B, grey, and two band ratios'
    stand-ins), in flat folders: what a microscope or a multispectral sensor writes."""
    grey_dir, bands_dir = directory / "grey16", directory / "bands6"
    grey_dir.mkdir()
    bands_dir.mkdir()
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint16) * 257  # 8 -> 16 bits, full range
        grey = rgb.mean(axis=2).astype(np.uint16)
        bands = np.dstack(
            [rgb, grey, 65535 - grey, np.abs(rgb[:, :, 0].astype(np.int32) - rgb[:, :, 1]).astype(np.uint16)]
        )
        tifffile.imwrite(grey_dir / f"{i:05d}.tif", grey, photometric="minisblack")
        tifffile.imwrite(bands_dir / f"{i:05d}.tif", bands, photometric="minisblack", planarconfig="contig")
    return grey_dir, bands_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--num-images", type=int, default=384)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker gets

    source = open_source(args.data, "train")
    # spread over all classes rather than the first folder
    source = source.subset(np.linspace(0, len(source) - 1, args.num_images).astype(np.int64))
    paths = [source[i][2] for i in range(len(source))]  # also warms the page cache for both pipelines
    shards = Path(tempfile.mkdtemp(prefix="simmim_shards_"))
    for sub in ("tar", "parquet/data"):
        (shards / sub).mkdir(parents=True)
    write_shards(paths, [int(v) for v in source.labels()], shards)
    grey_dir, bands_dir = write_tiffs(paths, shards)

    def loader(images, channels: int = 3) -> DataLoader:
        stats = {} if channels == 3 else {"mean": [0.5] * channels, "std": [0.25] * channels}
        transform = pretrain_transform(args.image_size, num_channels=channels, **stats)
        dataset = MaskedImageDataset(images, transform, MaskGenerator(args.image_size, 32, 16, 0.6))
        options = dict(batch_size=args.batch_size, shuffle=True, drop_last=False, num_workers=0, seed=0)
        return build_loader(dataset, collate_fn=collate_pretrain, **options)

    reference_loader = DataLoader(
        ReferenceImages(paths, args.image_size), batch_size=args.batch_size, shuffle=True, num_workers=0
    )
    # Two groups, each interleaved within itself: the TIFF pipelines' large float tensors would otherwise
    # change the allocator's state under the JPEG pipelines that follow them in the rotation.
    groups = [
        {
            "simmim": loader(source),
            "tar": loader(open_source(str(shards / "tar"), "train", streaming=True, val_fraction=0)),
            "parquet": loader(open_source(str(shards / "parquet"), "train", streaming=True, val_fraction=0)),
            "reference": reference_loader,
        },
        {
            "jpeg": loader(source),
            "grey16": loader(open_source(str(grey_dir), "train", val_fraction=0), channels=1),
            "bands6": loader(open_source(str(bands_dir), "train", val_fraction=0), channels=6),
        },
    ]
    rates = {}
    try:
        for loaders in groups:
            interleaved_rates(loaders, len(paths))  # warm-up round, not counted
            rounds = [interleaved_rates(loaders, len(paths)) for _ in range(args.rounds)]
            # (wall, cpu) img/s per pipeline, median over rounds
            rates |= {name: np.median([r[name] for r in rounds], axis=0) for name in loaders}
    finally:
        shutil.rmtree(shards)

    print(f"data: {args.data} ({len(paths)} images, {args.image_size} px, batch {args.batch_size}, 1 thread)")
    print("img/s per worker (median of rounds)     wall clock   CPU time")
    labels = {
        "simmim": "simmim (decode, v2 transform, mask)",
        "tar": "  same, streamed from tar shards",
        "parquet": "  same, streamed from parquet shards",
        "reference": "reference (PIL + v1 Compose)",
        "jpeg": "simmim, JPEG folder (second group)",
        "grey16": "16-bit grey TIFF folder (1 band)",
        "bands6": "6-band 16-bit TIFF folder",
    }
    for name, (wall, cpu) in rates.items():
        print(f"{labels[name]:<38} {wall:10.0f} {cpu:10.0f}")
    for name, peer in (
        ("simmim", "reference"), ("tar", "simmim"), ("parquet", "simmim"), ("grey16", "jpeg"), ("bands6", "jpeg")
    ):  # fmt: skip
        ratio = rates[name] / rates[peer]
        print(f"{f'ratio {name} / {peer}':<38} {ratio[0]:9.2f}x {ratio[1]:9.2f}x")
    print("targets: simmim >= 800 img/s; a stream >= 0.90x the folder (simmim)")


if __name__ == "__main__":
    main()
