"""How a run's pixels reach its model: the first image checked against `model.num_channels`, and the
per-channel statistics that normalise them (`data.normalize=dataset`: a file of `scripts/dataset_stats.py`,
or computed from a seeded sample of the train split when the run starts and kept beside the run).

The statistics are those of the pixels as the model takes them (`to_model_pixels`: the model's channels,
values scaled to [0, 1]) at their stored resolution, before any crop: the same convention as ImageNet's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from simmim.data.pixels import ChannelMismatch, NonFinitePixels, to_model_pixels
from simmim.data.source_base import ImageSource

logger = logging.getLogger("simmim.data")


@dataclass(frozen=True)
class DatasetStatistics:
    """Per-channel statistics of pixels scaled to [0, 1]: mean, std (population), min and max; over
    `images` images (`skipped` more could not be read or had another channel count)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    min: tuple[float, ...]
    max: tuple[float, ...]
    images: int
    skipped: int
    pixels: int  # per channel
    data: str = ""
    split: str = ""
    seed: int = 0
    samples: int | None = None  # None: every image of the split
    max_value: float | None = None  # what integer pixels were divided by (None: their type's range)

    @property
    def num_channels(self) -> int:
        return len(self.mean)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "num_channels": self.num_channels}, indent=2) + "\n"

    @classmethod
    def read(cls, path: str | Path) -> DatasetStatistics:
        """A file written by `scripts/dataset_stats.py` (or kept by a run); a one-line error otherwise."""
        try:
            content = json.loads(Path(path).read_text())
            names = {f.name for f in dataclasses.fields(cls)}
            stats = cls(
                **{k: (tuple(v) if isinstance(v, list) else v) for k, v in content.items() if k in names}
            )
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(
                f"data.stats={str(path)!r} is not a statistics file of scripts/dataset_stats.py ({error})"
            ) from None
        if not (len(stats.mean) == len(stats.std) > 0 and all(s > 0 for s in stats.std)):
            raise ValueError(
                f"data.stats={str(path)!r}: its mean and std must have one value per channel, std > 0"
            )
        return stats


def _as_array(pixels: Image.Image | torch.Tensor) -> np.ndarray:
    """`to_model_pixels`' output (a PIL image, a uint8 or a float tensor) as float64 (C, H * W) in [0, 1]."""
    if isinstance(pixels, Image.Image):
        values = np.asarray(pixels, dtype=np.float64) / 255.0
        values = values[:, :, None] if values.ndim == 2 else values
        return values.reshape(-1, values.shape[-1]).T
    values = pixels.reshape(pixels.shape[0], -1).double()
    return (values / 255.0 if pixels.dtype == torch.uint8 else values).numpy()  # 8-bit RGBA/LA bands as uint8


def channel_statistics(
    source: ImageSource,
    num_channels: int,
    *,
    max_value: float | None = None,
    samples: int | None = 1000,
    seed: int = 0,
    progress: bool = True,
    data: str = "",
) -> DatasetStatistics:
    """Per-channel mean, std, min and max over `samples` images drawn with `seed` (all of them when None
    or at least the source's size; a stream's first `samples` in a seeded shuffle). Images that cannot be read, or have
    another channel count, are skipped and counted. Means and variances are merged image by image
    (Chan et al.'s pairwise update), which stays exact in float64 over millions of pixels."""
    if source.is_streaming:
        if samples is None:
            raise ValueError("a stream has no end to read to: give a number of samples")
        # shuffled within each reader's buffer, shards dealt in a seeded order: not only the first shard's
        # images, which a folder turned into shards holds one class at a time
        raw = source.stream(shuffle=True, seed=seed)
        items = (source.decode(example) for _, example in zip(range(samples), raw))
        total = samples
    else:
        count = len(source)
        if samples is None or samples >= count:
            indices = np.arange(count)
        else:
            indices = np.sort(np.random.default_rng(seed).choice(count, samples, replace=False))
        items = (source.load(int(i)) for i in indices)
        total = len(indices)
    n = 0  # pixels per channel so far
    mean = np.zeros(num_channels)
    m2 = np.zeros(num_channels)  # sum of squared deviations from the mean
    low, high = np.full(num_channels, np.inf), np.full(num_channels, -np.inf)
    images = skipped = 0
    for image, _, name in tqdm(items, total=total, desc="dataset statistics", disable=not progress):
        if image is None:
            skipped += 1
            continue
        try:
            values = _as_array(to_model_pixels(image, num_channels, max_value, name))  # (C, P)
        except (ChannelMismatch, NonFinitePixels) as error:
            logger.warning("skipping %s: %s", name, error)
            skipped += 1
            continue
        k = values.shape[1]
        batch_mean = values.mean(axis=1)
        batch_m2 = ((values - batch_mean[:, None]) ** 2).sum(axis=1)
        delta = batch_mean - mean
        mean = mean + delta * k / (n + k)
        m2 = m2 + batch_m2 + delta**2 * n * k / (n + k)
        n += k
        low, high = np.minimum(low, values.min(axis=1)), np.maximum(high, values.max(axis=1))
        images += 1
    if images == 0:
        raise ValueError(
            f"{data or source}: none of the {total} images drawn could be read with {num_channels} channels"
        )
    std = np.sqrt(m2 / n)
    constant = [c for c in range(num_channels) if not std[c] > 0]
    if constant:
        raise ValueError(
            f"{data or source}: channel(s) {constant} are constant (std 0) over the {images} images read: "
            "normalising by them would divide by zero; drop the channel or give data.mean and data.std"
        )
    return DatasetStatistics(
        tuple(mean.tolist()), tuple(std.tolist()), tuple(low.tolist()), tuple(high.tolist()),
        images, skipped, n, data, source.split, seed, samples, max_value,
    )  # fmt: skip


def check_channels(source: ImageSource, num_channels: int, max_value: float | None, data: str) -> None:
    """Read the source's first image that decodes and check it against `num_channels`: a one-line error
    before any work, rather than a run that skips every image. A stream is not read ahead."""
    if source.is_streaming:
        return
    for index in range(min(len(source), 8)):
        image, _, name = source.load(index)
        if image is None:
            continue
        try:
            to_model_pixels(image, num_channels, max_value, name)
        except (ChannelMismatch, NonFinitePixels) as error:
            raise ValueError(f"data.path={data!r}: {error}") from None
        return


def with_dataset_statistics(cfg: Any, source: ImageSource, kept: Path, *, write: bool) -> tuple[Any, str]:
    """The run config with data.mean and data.std filled in for data.normalize=dataset: from data.stats,
    else from `kept` (what an earlier start of this run computed), else computed now from
    data.stats_samples images of `source` (drawn with the run's seed) and written to `kept` when `write`
    (the main process); and one line that says what normalises the run's pixels."""
    d, channels = cfg.data, cfg.model.num_channels
    if d.normalize != "dataset" or d.mean is not None:
        whose = {
            "imagenet": "ImageNet's statistics",
            "explicit": "data.mean and data.std",
            "dataset": "the dataset's statistics, as saved in the run's config",
        }[d.normalize]
        return cfg, (
            f"pixels normalised with {whose} (data.normalize={d.normalize}): "
            f"mean {_rounded(d.mean)}, std {_rounded(d.std)}"
        )
    # what the statistics must have been computed with to be this run's
    wanted = {"data": d.path, "seed": cfg.seed, "samples": d.stats_samples, "max_value": d.max_value}
    earlier = DatasetStatistics.read(kept) if d.stats is None and kept.is_file() else None
    if d.stats is not None:
        stats, origin = DatasetStatistics.read(d.stats), d.stats
        if stats.max_value != d.max_value:
            raise ValueError(
                f"data.stats={d.stats!r} was computed with max_value={stats.max_value} and this run has "
                f"data.max_value={d.max_value}: its statistics are of other pixel values"
            )
    elif earlier is not None and {k: getattr(earlier, k) for k in wanted} == wanted:
        stats, origin = earlier, str(kept)  # this run's, from an earlier start
    else:
        stats = channel_statistics(
            source, channels, max_value=d.max_value, samples=d.stats_samples, seed=cfg.seed, data=d.path,
            progress=write,
        )  # fmt: skip
        origin = f"{stats.images} images of {d.path} (seed {cfg.seed})"
        if write:  # atomically: another process may read it as it starts
            kept.parent.mkdir(parents=True, exist_ok=True)
            partial = kept.with_suffix(".tmp")
            partial.write_text(stats.to_json())
            os.replace(partial, kept)
    if stats.num_channels != channels:
        raise ValueError(
            f"data.stats={origin!r} has {stats.num_channels} channels and model.num_channels={channels}"
        )
    data = dataclasses.replace(d, mean=stats.mean, std=stats.std)
    line = (
        f"pixels normalised with the dataset's statistics (data.normalize=dataset) of {origin}: "
        f"mean {_rounded(stats.mean)}, std {_rounded(stats.std)}"
    )
    return dataclasses.replace(cfg, data=data), line


def _rounded(values: Any) -> list[float]:
    return [round(v, 4) if math.isfinite(v) else v for v in values]


def pixel_args(cfg: Any) -> dict[str, Any]:
    """The transforms' pixel arguments from a run config: its statistics, channels and integer scale."""
    d = cfg.data
    return {"mean": d.mean, "std": d.std, "num_channels": cfg.model.num_channels, "max_value": d.max_value}
