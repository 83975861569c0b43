"""Fine-tuning losses: classification (hard or MixUp/CutMix soft targets, or regression) and DeiT distillation.

Distillation follows DeiT (Touvron et al. 2021, facebookresearch/deit ``losses.DistillationLoss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Mean loss over the batch.

    Args:
        logits: (B, C) scores; C == 1 means regression.
        labels: (B,) integer classes -> cross-entropy (with ``label_smoothing``);
            (B, C) float targets, e.g. from MixUp/CutMix -> soft-target cross-entropy
            ``mean_b sum_c -t * log_softmax(logits)``; for C == 1, (B,) or (B, 1) values -> MSE.
    """
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
    teacher_logits = teacher_logits.detach()
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
