"""Position embeddings: the prefix tokens' count and resizing the patch grid's table (at run time, for another
image size, and when a checkpoint of another resolution is loaded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_PREFIX_TOKENS = 2  # DeiT's class token and distillation token, before the patch tokens


def resize_position_embeddings(
    pos: torch.Tensor, num_prefix_tokens: int, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """(1, prefix + gh*gw, D) -> (1, prefix + h*w, D): bicubic on the patch grid (in float32, as timm's
    `resample_abs_pos_embed`), prefix tokens kept. Used at run time and when loading checkpoints."""
    prefix, patch = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    gh, gw = src_grid
    patch = patch.reshape(1, gh, gw, -1).permute(0, 3, 1, 2).float()  # (1, D, gh, gw)
    patch = F.interpolate(patch, size=dst_grid, mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], -1).to(pos.dtype)  # (1, h*w, D)
    return torch.cat((prefix, patch), dim=1)
