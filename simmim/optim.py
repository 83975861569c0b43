"""AdamW parameter groups with layer-wise lr decay, the lr schedule as a pure function of the step, and EMA.

Layer-wise decay follows BEiT / SimMIM fine-tuning (Bao et al. 2021, Xie et al. 2022); the schedule is
nanoGPT's linear warmup then cosine decay.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from simmim.config import DataConfig, OptimConfig, TrainConfig

# Tokens and position tables take no weight decay (DeiT, BEiT, timm's no_weight_decay()).
NO_DECAY_NAMES = (
    "cls_token",
    "distillation_token",
    "mask_token",
    "position_embeddings",
    "pos_embed",
    "dist_token",
)

# Encoder block i: ours are "deit.layers.{i}.", Transformers' "encoder.layer.{i}.", timm's "blocks.{i}.".
_BLOCK = re.compile(r"(?:^|\.)(?:layers|encoder\.layer|blocks)\.(\d+)\.")
# Layer 0, below the first block: Transformers' "embeddings." and timm's top-level tokens and patch embedding.
_EMBEDDING = re.compile(
    r"(?:^|\.)(?:embeddings|patch_embed)\.|^(?:cls_token|dist_token|pos_embed|mask_token)$"
)


def _layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for encoder block i, num_layers + 1 for the rest (final norm, heads)."""
    if _EMBEDDING.search(name):
        return 0
    block = _BLOCK.search(name)
    return int(block.group(1)) + 1 if block else num_layers + 1


def _decays(name: str, param: nn.Parameter) -> bool:
    # 1-D covers biases and norm weights.
    return param.ndim > 1 and not name.endswith(".bias") and not any(n in name for n in NO_DECAY_NAMES)


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0, num_layers: int | None = None
) -> list[dict]:
    """AdamW parameter groups of the trainable parameters, split by weight decay and (optionally) layer.

    Args:
        model: the (unwrapped) model; frozen parameters are left out.
        weight_decay: for weight matrices; biases, norms, tokens and position embeddings get 0.
        layer_decay: lr of layer id l is scaled by layer_decay ** (num_layers + 1 - l); 1.0 = no decay.
        num_layers: encoder depth; None = the largest block index found + 1.

    Returns:
        dicts with "params", "weight_decay", "lr_scale" and "name"; two groups when layer_decay == 1.0.
        ``set_lr`` multiplies the scheduled lr by each group's "lr_scale".
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if num_layers is None:
        blocks = [int(m.group(1)) for n, _ in named if (m := _BLOCK.search(n))]
        num_layers = max(blocks) + 1 if blocks else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named:
        decay = _decays(name, param)
        layer = _layer_id(name, num_layers) if layer_decay != 1.0 else num_layers + 1
        key = (layer, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers + 1 - layer),
                "name": ("decay" if decay else "no_decay")
                + (f"_layer_{layer}" if layer_decay != 1.0 else ""),
            }
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017) from the reference global batch of 512 (SimMIM, DeiT)."""
    return base_lr * global_batch / 512


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``.

    Warmup is ``peak_lr * (step + 1) / warmup_steps`` (as nanoGPT), so the first step already moves the
    weights and step ``warmup_steps - 1`` reaches the peak. The cosine runs from ``peak_lr`` at
    ``warmup_steps`` to ``min_lr`` at ``total_steps``; later steps stay at ``min_lr``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its layer-decay "lr_scale"."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    # parameters() and buffers() visit tied weights once, where state_dict() would list them twice.
    return [t.detach() for t in (*model.parameters(), *model.buffers())]


class ModelEma:
    """Exponential moving average of a model's weights, kept in fp32: ema = decay * ema + (1 - decay) * w.

    Non-float buffers (counters) are copied. ``module`` is the averaged model, for evaluation and export.
    """

    def __init__(self, decay: float, model: nn.Module):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._tensors = _tensors(self.module)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (the unwrapped model that was copied at construction)."""
        current = _tensors(model)
        if len(current) != len(self._tensors):
            raise ValueError(f"model has {len(current)} tensors, the EMA {len(self._tensors)}")
        for ema, w in zip(self._tensors, current):
            if ema.is_floating_point():
                ema.lerp_(w.to(ema.dtype), 1.0 - self.decay)
            else:
                ema.copy_(w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state_dict)


DEFAULT_WARMUP_EPOCHS = 10.0  # optim.warmup_epochs and optim.warmup_steps both unset, map-style data


@dataclass(frozen=True)
class Schedule:
    """Durations turned into optimizer steps once, from the data size and the global batch; a stream
    (`num_samples` None) has no epochs, and its durations are steps already (train.max_steps)."""

    micro_batches_per_epoch: int | None  # per process, = samples // (batch_size * world_size)
    steps_per_epoch: int | None  # None: a stream
    total_steps: int  # where training stops (max_steps cap applied)
    schedule_steps: int  # where the cosine ends (epochs * steps_per_epoch)
    warmup_steps: int
    global_batch: int  # images per optimizer step over all processes and accumulation
    peak_lr: float
    min_lr: float

    @classmethod
    def build(
        cls,
        num_samples: int | None,
        data: DataConfig,
        optim: OptimConfig,
        train: TrainConfig,
        world_size: int,
    ):
        global_batch = data.batch_size * world_size * optim.grad_accum_steps
        lrs = dict(
            peak_lr=scaled_lr(optim.base_lr, global_batch), min_lr=scaled_lr(optim.min_lr, global_batch)
        )
        if num_samples is None:
            if train.max_steps is None or optim.warmup_epochs is not None:
                raise ValueError(
                    "a stream's schedule needs train.max_steps, and warmup in optim.warmup_steps"
                )
            steps = train.max_steps
            return cls(None, None, steps, steps, optim.warmup_steps or 0, global_batch, **lrs)
        micro = num_samples // (data.batch_size * world_size)
        steps_per_epoch = micro // optim.grad_accum_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {num_samples} images, fewer than one optimizer step needs "
                f"(data.batch_size={data.batch_size} x {world_size} processes x optim.grad_accum_steps="
                f"{optim.grad_accum_steps}); lower the batch size or use more data"
            )
        schedule_steps = train.epochs * steps_per_epoch
        total = schedule_steps if train.max_steps is None else min(schedule_steps, train.max_steps)
        if optim.warmup_steps is not None:
            warmup = optim.warmup_steps
        else:
            warmup_epochs = DEFAULT_WARMUP_EPOCHS if optim.warmup_epochs is None else optim.warmup_epochs
            warmup = round(warmup_epochs * steps_per_epoch)
        return cls(micro, steps_per_epoch, total, schedule_steps, warmup, global_batch, **lrs)

    @property
    def is_stream(self) -> bool:
        return self.steps_per_epoch is None

    def epoch(self, step: int) -> float | None:
        """Epochs done after `step` steps (None on a stream)."""
        return None if self.is_stream else step / self.steps_per_epoch

    def lr(self, step: int) -> float:
        return lr_at(
            step,
            peak_lr=self.peak_lr,
            total_steps=self.schedule_steps,
            warmup_steps=self.warmup_steps,
            min_lr=self.min_lr,
        )
