"""Reconstruction grids: original | masked input | reconstruction | reconstruction pasted into the visible pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import make_grid

from simmim.models.losses import patch_mask_to_pixels

GREY = 0.5  # colour of masked patches in the "masked input" column


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) normalised -> [0, 1] real colours."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() * std_t + mean_t).clamp(0, 1)


def reconstruction_grid(
    pixel_values: torch.Tensor,
    reconstruction: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    *,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    padding: int = 2,
) -> torch.Tensor:
    """One row per image, four columns; returns a (3, H', W') float image in [0, 1]."""
    _, _, H, W = pixel_values.shape
    mask = patch_mask_to_pixels(bool_masked_pos, patch_size, H, W).to(pixel_values.device)  # (B, 1, H, W)
    original = denormalize(pixel_values, mean, std)
    recon = denormalize(reconstruction, mean, std)
    masked_input = original * (1 - mask) + GREY * mask
    pasted = original * (1 - mask) + recon * mask
    rows = torch.stack((original, masked_input, recon, pasted), dim=1).flatten(0, 1)  # (B*4, C, H, W)
    return make_grid(rows.cpu(), nrow=4, padding=padding, pad_value=1.0)
