"""Per-image reconstruction metrics for SimMIM: the masked L1 of the training loss (`masked_l1`, shared with
the model), and MSE / PSNR in [0, 1] pixel space, on the masked and on the visible patches, plus a mean-colour
baseline to compare against.

Tensors are (B, C, H, W) in the normalised space ((x - mean) / std), masks (B, N) over the model's patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from simmim.models.losses import masked_l1, patch_mask_to_pixels

__all__ = ["PSNR_CAP", "masked_l1", "mean_fill_baseline", "patch_mask_to_pixels", "reconstruction_metrics"]

# PSNR of a perfect reconstruction (mse == 0), where 10 * log10(1 / mse) is infinite.
PSNR_CAP = 100.0


def _masked_mse(a: Tensor, b: Tensor, mask_pixels: Tensor) -> Tensor:
    # (B,) mean squared error over the masked pixels and all channels; NaN where nothing is masked.
    count = mask_pixels.sum(dim=(1, 2, 3)) * a.shape[1]
    return ((a - b).square() * mask_pixels).sum(dim=(1, 2, 3)) / count


def _psnr(mse: Tensor) -> Tensor:
    # Images in [0, 1] have a peak of 1; NaN stays NaN.
    return torch.where(mse == 0, torch.full_like(mse, PSNR_CAP), 10 * torch.log10(1 / mse))


def reconstruction_metrics(
    pixel_values: Tensor,
    reconstruction: Tensor,
    bool_masked_pos: Tensor,
    *,
    patch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Tensor]:
    """Per-image metrics, each (B,).

    Returns:
        masked_l1, visible_l1: mean |x - r| in the normalised space (masked_l1 is the training loss).
        masked_mse, masked_psnr, visible_psnr: after un-normalising with ``mean``/``std`` and clamping both
        images to [0, 1]; PSNR = 10 * log10(1 / mse) dB, PSNR_CAP where mse == 0.
        A metric over an empty region (no masked, or no visible, pixel) is NaN.
    """
    x, r = pixel_values.float(), reconstruction.float()
    B, C, H, W = x.shape
    masked = patch_mask_to_pixels(bool_masked_pos, patch_size, H, W).to(x.device)  # (B, 1, H, W)
    visible = 1 - masked
    has_masked, has_visible = masked.sum(dim=(1, 2, 3)) > 0, visible.sum(dim=(1, 2, 3)) > 0
    nan = torch.tensor(float("nan"), device=x.device)

    mean_ = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, C, 1, 1)
    std_ = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, C, 1, 1)
    x01, r01 = (x * std_ + mean_).clamp(0, 1), (r * std_ + mean_).clamp(0, 1)
    masked_mse = _masked_mse(x01, r01, masked)
    return {
        "masked_l1": torch.where(has_masked, masked_l1(x, r, masked), nan),
        "masked_mse": masked_mse,
        "masked_psnr": _psnr(masked_mse),
        "visible_l1": torch.where(has_visible, masked_l1(x, r, visible), nan),
        "visible_psnr": _psnr(_masked_mse(x01, r01, visible)),
    }


def mean_fill_baseline(pixel_values: Tensor, bool_masked_pos: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) copy of ``pixel_values`` whose masked pixels hold the image's mean visible colour.

    The mean is per image and channel, in the normalised space; an image with nothing visible is filled
    with 0, the dataset mean.
    """
    B, C, H, W = pixel_values.shape
    masked = patch_mask_to_pixels(bool_masked_pos, patch_size, H, W).to(pixel_values.device)
    visible = 1 - masked
    count = visible.sum(dim=(2, 3))  # (B, 1)
    colour = (pixel_values * visible).sum(dim=(2, 3)) / count.clamp(min=1)  # (B, C)
    return torch.where(masked.bool(), colour.view(B, C, 1, 1).to(pixel_values.dtype), pixel_values)
