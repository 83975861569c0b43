"""The interface every image source implements, and the reproducible train/validation carve."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

Sample = tuple[Image.Image | None, int, str]


class ImageSource:
    """The interface every source implements. Map-style sources have `__len__` and `__getitem__`;
    streaming sources have neither and are iterated with `stream()`.

    Attributes:
        split: the split asked for ("train", "validation", ...).
        class_names: names of the classes in label order, or None when unknown or unlabelled.
        has_labels: whether labels are real class indices (False: every label is -1).
        is_streaming: whether the source can only be iterated.
    """

    split: str
    class_names: list[str] | None = None
    has_labels: bool = True
    is_streaming: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int, decode_size: int | None = None) -> Sample:
        """Sample `index`; `decode_size` lets JPEGs decode at a reduced size (see `decode_image`)."""
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """(N,) int64 class index of every sample (-1 when unlabelled), read without decoding any image."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a source of {len(self)} images")
        return self.load(index % len(self))

    def __repr__(self) -> str:
        size = "streaming" if self.is_streaming else f"{len(self)} images"
        classes = "unlabelled" if not self.has_labels else f"{len(self.class_names or [])} classes"
        return f"{type(self).__name__}(split={self.split!r}, {size}, {classes})"


def carve_split(num_items: int, part: str, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the `part` ("train" or "validation") of a reproducible random train/val split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} is outside (0, 1)")
    num_val = min(max(1, round(val_fraction * num_items)), num_items - 1)
    permutation = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).numpy()
    chosen = permutation[:num_val] if part == "validation" else permutation[num_val:]
    return np.sort(chosen)
