"""Reconstruction grids: original | masked input | reconstruction | reconstruction pasted into the visible pixels.

Images of any channel count are shown as RGB: one channel as grey, three or more through a choice of bands
(`display_bands`, default the first three), each band back in its pixel scale through the run's statistics
(`denormalize`), so that a reconstruction looks like its input."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import make_grid

from simmim.models.losses import patch_mask_to_pixels

GREY = 0.5  # colour of masked patches in the "masked input" column


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) normalised -> [0, 1] pixel values."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() * std_t + mean_t).clamp(0, 1)


def display_bands(num_channels: int, bands: Sequence[int] | None = None) -> list[int]:
    """Which channels show as red, green and blue: `bands` (three, or one shown as grey), else the first
    three, or the one channel as grey. A one-line error names a band the image lacks."""
    if bands is None:
        bands = [0] if num_channels < 3 else [0, 1, 2]
    bands = list(bands)
    if len(bands) not in (1, 3) or not all(0 <= b < num_channels for b in bands):
        raise ValueError(
            f"display bands {bands}: expected 1 or 3 channel indices in [0, {num_channels - 1}]"
        )
    return bands * 3 if len(bands) == 1 else bands


def to_display(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], bands: Sequence[int] | None = None
) -> torch.Tensor:
    """(B, C, H, W) normalised -> (B, 3, H, W) in [0, 1]: the chosen bands, denormalised."""
    return denormalize(x, mean, std)[:, display_bands(x.shape[1], bands)]


def reconstruction_grid(
    pixel_values: torch.Tensor,
    reconstruction: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    *,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    bands: Sequence[int] | None = None,
    padding: int = 2,
) -> torch.Tensor:
    """One row per image, four columns; returns a (3, H', W') float image in [0, 1]. `bands`: see
    `display_bands`."""
    _, _, H, W = pixel_values.shape
    mask = patch_mask_to_pixels(bool_masked_pos, patch_size, H, W).to(pixel_values.device)  # (B, 1, H, W)
    original = to_display(pixel_values, mean, std, bands)
    recon = to_display(reconstruction, mean, std, bands)
    masked_input = original * (1 - mask) + GREY * mask
    pasted = original * (1 - mask) + recon * mask
    rows = torch.stack((original, masked_input, recon, pasted), dim=1).flatten(0, 1)  # (B*4, C, H, W)
    return make_grid(rows.cpu(), nrow=4, padding=padding, pad_value=1.0)
