"""Procedural images for running every script with no data: a smoothly varying background and one
class-defining shape or texture, deterministic from (seed, index), about 0.1 ms per 64 px image with numpy.

The class decides the kind of object (five symmetric shapes, five periodic textures), so a classifier can
learn it; colours, position, size, rotation and frequency are random. What a masked block hides can be
inferred from its context: the background is a bilinear blend of four corner colours, shapes are large
and symmetric (their edges continue under the mask), textures repeat with periods of a third to a half of
the image, and the object is lit by a gentle gradient. Filling a masked block with the image's mean colour
(the trivial baseline of `scripts/eval_reconstruction.py`) ignores all of that.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from simmim.data.source_base import ImageSource, Sample

SYNTHETIC_CLASSES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "horizontal_stripes",
    "vertical_stripes",
    "checkerboard",
    "dots",
    "concentric_rings",
)


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (u, v), each (size, size) float32, u along width."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(centres, centres, indexing="xy")


def _object_mask(label: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where the class's object is: a float32 coverage map in [0, 1] of shape (size, size)."""
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    radius = rng.uniform(0.24, 0.36)
    angle = rng.uniform(0, 2 * math.pi)
    frequency = rng.uniform(2.0, 3.5)  # texture periods per image side: one period spans 9-16 px at 32 px
    phase = rng.uniform(0, 1)
    dx, dy = u - cx, v - cy
    # object coordinates, rotated by `angle`
    x = dx * math.cos(angle) + dy * math.sin(angle)
    y = -dx * math.sin(angle) + dy * math.cos(angle)
    dist = np.sqrt(dx * dx + dy * dy)
    name = SYNTHETIC_CLASSES[label]
    if name == "disc":
        mask = dist < radius
    elif name == "square":
        mask = np.maximum(np.abs(x), np.abs(y)) < 0.8 * radius
    elif name == "triangle":
        # equilateral with circumradius `radius`: inside all three edges, each at the inradius radius / 2
        mask = np.ones_like(u, dtype=bool)
        for k in range(3):
            theta = 2 * math.pi * k / 3
            mask &= x * math.cos(theta) + y * math.sin(theta) < radius / 2
    elif name == "ring":
        mask = (dist < radius) & (dist > 0.55 * radius)
    elif name == "cross":
        arm = 0.3 * radius
        mask = ((np.abs(x) < arm) & (np.abs(y) < radius)) | ((np.abs(y) < arm) & (np.abs(x) < radius))
    elif name == "horizontal_stripes":
        mask = np.sin(2 * math.pi * (frequency * v + phase)) > 0
    elif name == "vertical_stripes":
        mask = np.sin(2 * math.pi * (frequency * u + phase)) > 0
    elif name == "checkerboard":
        mask = (np.floor(frequency * u + phase) + np.floor(frequency * v + phase)) % 2 == 0
    elif name == "dots":
        fu, fv = (frequency * u + phase) % 1 - 0.5, (frequency * v + phase) % 1 - 0.5
        mask = fu * fu + fv * fv < 0.09
    else:  # concentric_rings
        mask = np.sin(2 * math.pi * frequency * dist) > 0
    return mask.astype(np.float32)


def render_synthetic_image(
    label: int, rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """One image of class `label`: uint8 array of shape (size, size, 3).

    Args:
        label: index into `SYNTHETIC_CLASSES`.
        rng: the sample's own generator, e.g. `np.random.default_rng((seed, stream, index))`.
        grid: `pixel_grid(size)`, computed once per size.
    """
    u, v = grid
    # Background: a bilinear blend of four corner colours. It varies smoothly across the whole image, so
    # a masked block is predictable from its surroundings but not from the image's mean colour.
    corners = rng.uniform(0, 1, size=(4, 3)).astype(
        np.float32
    )  # top-left, top-right, bottom-left, bottom-right
    corners[3], corners[2] = (
        1.0 - corners[0],
        1.0 - corners[1],
    )  # opposite corners complementary: strong contrast
    top = corners[0] * (1 - u[..., None]) + corners[1] * u[..., None]  # (S, S, 3)
    bottom = corners[2] * (1 - u[..., None]) + corners[3] * u[..., None]
    background = top * (1 - v[..., None]) + bottom * v[..., None]
    # Foreground: a colour far enough from the background's mean to be visible, with its own gentle shading.
    # The background's mean is mid-grey (complementary corners), so the object's colour is drawn away from it.
    foreground = rng.uniform(0, 1, size=3).astype(np.float32)
    while np.abs(foreground - background.mean((0, 1))).sum() < 0.6:
        foreground = rng.uniform(0, 1, size=3).astype(np.float32)
    shade = 1.0 + 0.25 * (u[..., None] - 0.5) * rng.choice([-1.0, 1.0])  # (S, S, 1) left-right lighting
    coverage = _object_mask(label, u, v, rng)[..., None]  # (S, S, 1)
    image = background * (1.0 - coverage) + np.clip(foreground * shade, 0, 1) * coverage
    return (image * 255.0 + 0.5).astype(np.uint8)


class SyntheticSource(ImageSource):
    """`render_synthetic_image` for `num_images` indices; train and validation use different seed streams."""

    def __init__(self, num_images: int, image_size: int, seed: int, split: str) -> None:
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.stream_id = 0 if split == "train" else 1
        self.class_names = list(SYNTHETIC_CLASSES)
        self.grid = pixel_grid(image_size)

    def __len__(self) -> int:
        return self.num_images

    def labels(self) -> np.ndarray:
        return np.arange(self.num_images, dtype=np.int64) % len(SYNTHETIC_CLASSES)

    def load(self, index: int, decode_size: int | None = None) -> Sample:
        label = index % len(SYNTHETIC_CLASSES)  # balanced classes, also in small validation sets
        rng = np.random.default_rng((self.seed, self.stream_id, index))
        pixels = render_synthetic_image(label, rng, self.grid)  # (S, S, 3) uint8
        return Image.fromarray(pixels, mode="RGB"), label, f"synthetic:{self.split}[{index}]"
