"""Subsets of a map-style source: a seeded sample, a class-balanced label fraction, a held-out carve."""

from __future__ import annotations

import numpy as np
import torch

from simmim.data.source_base import ImageSource, Sample, carve_split


class SubsetSource(ImageSource):
    """The samples `indices` of a map-style source, in that order."""

    def __init__(self, source: ImageSource, indices: np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.split = source.split
        self.class_names = source.class_names
        self.has_labels = source.has_labels

    def __len__(self) -> int:
        return len(self.indices)

    def labels(self) -> np.ndarray:
        return self.source.labels()[self.indices]

    def load(self, index: int, decode_size: int | None = None) -> Sample:
        return self.source.load(int(self.indices[index]), decode_size)


def random_subset(source: ImageSource, count: int | None, seed: int, keep_order: bool = True) -> ImageSource:
    """`count` samples of a map-style source drawn with `seed` (all when None or more than it has); in the
    source's order, or with `keep_order=False` in the drawn (random) order, the whole source shuffled too."""
    if keep_order and (count is None or count >= len(source)):
        return source
    chosen = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:count].numpy()
    return SubsetSource(source, np.sort(chosen) if keep_order else chosen)


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of `fraction` of each class's samples (at least one per class), drawn with `seed`.

    Every class keeps round(fraction * its count) samples, so the subset has the split's class balance,
    and a smaller fraction's subset is part of a larger one's for the same seed (the same permutation).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction {fraction} is outside (0, 1]")
    if (labels < 0).any():
        raise ValueError("a class-balanced subset needs labelled samples; this split has unlabelled ones")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep = min(len(members), max(1, round(fraction * len(members))))
        order = torch.randperm(len(members), generator=generator).numpy()
        chosen.append(members[order[:keep]])
    return np.sort(np.concatenate(chosen))


def holdout_split(source: ImageSource, part: str, fraction: float, seed: int) -> ImageSource:
    """`part` ("train" or "validation") of a map-style source with `fraction` of it held out by `seed`:
    the two parts are disjoint and together the whole source."""
    if source.is_streaming:
        raise ValueError("data.holdout_from_train=true needs a map-style source, not data.streaming=true")
    return SubsetSource(source, carve_split(len(source), part, fraction, seed))
