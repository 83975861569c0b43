"""The losses the DeiT heads compute: SimMIM's masked-pixel L1 (Xie et al., 2022) and its normalised target,
classification (hard or MixUp/CutMix soft targets, or regression) and DeiT distillation (Touvron et al., 2021,
facebookresearch/deit ``losses.DistillationLoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_mask_to_pixels(bool_masked_pos: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """(B, N) patch mask, N = (H/p) * (W/p) in row-major order -> (B, 1, H, W) float pixel mask."""
    B = bool_masked_pos.shape[0]
    h, w = height // patch_size, width // patch_size
    if bool_masked_pos.shape[1] != h * w:
        raise ValueError(f"mask has {bool_masked_pos.shape[1]} patches, a {height}x{width} image {h}x{w}")
    mask = bool_masked_pos.reshape(B, h, w).float()
    # (B, h, w) -> (B, H, W), as Transformers' ViTForMaskedImageModeling
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return mask.unsqueeze(1)


def masked_l1(
    pixel_values: Tensor, reconstruction: Tensor, mask_pixels: Tensor, *, over_batch: bool = False
) -> Tensor:
    """SimMIM's loss: sum |x - r| over the pixels where ``mask_pixels`` (B, 1, H, W) is 1, divided by
    (their count + 1e-5) and by C, in float32, as microsoft/SimMIM and Transformers compute it.

    Returns:
        (B,), per image, so that an image without masked pixels gives 0; with ``over_batch``, one scalar
        with the sums taken over the whole batch (the training loss, not the mean of the per-image values).
    """
    C = pixel_values.shape[1]
    l1 = (pixel_values.float() - reconstruction.float()).abs() * mask_pixels  # (B, C, H, W)
    if over_batch:
        return l1.sum() / (mask_pixels.sum() + 1e-5) / C
    return l1.sum(dim=(1, 2, 3)) / (mask_pixels.sum(dim=(1, 2, 3)) + 1e-5) / C


NORM_TARGET_EPS = 1e-6  # added to the window's variance before its square root, as microsoft/SimMIM


def window_statistics(pixel_values: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """(mean, std) of each pixel's `window` x `window` neighbourhood, per channel, each (B, C, H, W).

    microsoft/SimMIM's ``norm_targets``: the window is centred on the pixel (so `window` is odd) and cut by
    the image border, where the mean is over the pixels inside (avg_pool2d with count_include_pad=False);
    the variance is the unbiased one over those n pixels, (E[x^2] - E[x]^2) * n / (n - 1), clamped at 0;
    std = sqrt(var + 1e-6). Computed in float32.
    """
    if window % 2 != 1 or window < 3:
        raise ValueError(f"window={window}: expected an odd number of pixels >= 3")
    x = pixel_values.float()
    r = window // 2
    # Window sums from running sums along each axis (in float64, so that the differences keep their
    # digits): linear in the pixels, where avg_pool2d's direct sum costs window^2 per pixel (about half
    # the study model's training step at window 15 on a CPU).
    count = _window_count(x.shape[-2], r, x.device) * _window_count(x.shape[-1], r, x.device).T  # (H, W)
    mean = (_window_sum(_window_sum(x.double(), r, -2), r, -1) / count).float()
    mean_of_squares = (_window_sum(_window_sum(x.double().square(), r, -2), r, -1) / count).float()
    var = ((mean_of_squares - mean * mean) * (count / (count - 1)).float()).clamp(min=0)
    return mean, (var + NORM_TARGET_EPS).sqrt()


def _window_bounds(n: int, r: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For each position i of an axis of n, the window [i - r, i + r] cut to [0, n): (start, end) indices."""
    i = torch.arange(n, device=device)
    return (i - r).clamp(min=0), (i + r + 1).clamp(max=n)


def _window_sum(x: Tensor, r: int, dim: int) -> Tensor:
    """Sums of x over windows of 2r + 1 along `dim`, cut by the border (x's shape)."""
    n = x.shape[dim]
    running = x.cumsum(dim)  # running[j] = x[0] + ... + x[j]
    # S[k] = x[0] + ... + x[k - r - 1] for k in [0, n + 2r]: 0 before the axis, the total after it. Window i,
    # [i - r, i + r] cut to [0, n), sums to S[i + 2r + 1] - S[i]: two slices, where gathering the bounds
    # with index_select made the whole normalised target about 2x slower, for the same result to the bit.
    side = list(running.shape)
    side[dim] = r + 1
    before = running.new_zeros(side)
    side[dim] = r
    after = running.narrow(dim, n - 1, 1).expand(side)
    S = torch.cat((before, running, after), dim=dim)  # n + 2r + 1 along dim
    return S.narrow(dim, 2 * r + 1, n) - S.narrow(dim, 0, n)


def _window_count(n: int, r: int, device: torch.device) -> Tensor:
    """(n, 1) float64: how many positions of an axis of n each window holds."""
    start, end = _window_bounds(n, r, device)
    return (end - start).double()[:, None]


def norm_targets(pixel_values: Tensor, window: int) -> Tensor:
    """SimMIM's normalised target (microsoft/SimMIM ``NORM_TARGET``): each pixel minus its window's mean,
    divided by its window's std (`window_statistics`). (B, C, H, W) -> (B, C, H, W), float32."""
    mean, std = window_statistics(pixel_values, window)
    return (pixel_values.float() - mean) / std


def targets_to_pixels(prediction: Tensor, pixel_values: Tensor, window: int) -> Tensor:
    """The inverse of `norm_targets` for a prediction of the normalised target: prediction * std + mean, with
    the window statistics of `pixel_values` (the whole image, masked pixels included), to show and score a
    normalised-target model in the pixel space. (B, C, H, W), float32."""
    mean, std = window_statistics(pixel_values, window)
    return prediction.float() * std + mean


def classification_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Mean loss over the batch.

    Args:
        logits: (B, C) scores; C == 1 means regression.
        labels: (B,) integer classes -> cross-entropy (with ``label_smoothing``);
            (B, C) float targets, e.g. from MixUp/CutMix -> soft-target cross-entropy
            ``mean_b sum_c -t * log_softmax(logits)``; for C == 1, (B,) or (B, 1) values -> MSE.
    """
    logits = logits.float()  # the loss in float32 under bf16/fp16 autocast (a no-op in fp32)
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.reshape(-1), labels.reshape(-1).to(logits.dtype))
    if labels.is_floating_point():
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def distillation_loss(
    cls_logits: Tensor,
    distillation_logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "hard",
    alpha: float = 0.5,
    tau: float = 1.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DeiT's loss: ``(1 - alpha) * classification_loss(cls_logits, labels) + alpha * D``.

    Args:
        cls_logits, distillation_logits: (B, C) from the class and distillation tokens.
        labels: (B,) classes or (B, C) soft targets (MixUp/CutMix), as in ``classification_loss``.
        teacher_logits: (B, C) from the frozen teacher (gradients are not taken through it).
        kind: "hard": D = cross_entropy(distillation_logits, teacher_logits.argmax(-1)).
            "soft": D = tau**2 * KL(softmax(teacher / tau) || softmax(student / tau)), the Hinton direction,
            summed over batch and classes and divided by B * C (``numel``), exactly as DeiT's code does
            (i.e. KL "batchmean" / C, not the per-sample KL).
        alpha: weight of the distillation term; 0 = plain classification, 1 = distillation only.
        tau: soft distillation temperature.
    """
    base = classification_loss(cls_logits, labels, label_smoothing=label_smoothing)
    # float32 under autocast, as the classification term (a no-op in fp32)
    distillation_logits, teacher_logits = distillation_logits.float(), teacher_logits.detach().float()
    if kind == "hard":
        distill = F.cross_entropy(distillation_logits, teacher_logits.argmax(dim=-1))
    elif kind == "soft":
        distill = (
            F.kl_div(
                F.log_softmax(distillation_logits / tau, dim=-1),
                F.log_softmax(teacher_logits / tau, dim=-1),
                reduction="sum",
                log_target=True,
            )
            * (tau * tau)
            / distillation_logits.numel()
        )
    else:
        raise ValueError(f'kind={kind!r}: expected "hard" or "soft"')
    return (1 - alpha) * base + alpha * distill
