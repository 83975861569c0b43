"""Image transforms built from torchvision.transforms.v2: SimMIM pretraining, evaluation (DeiT's resize and
center crop) and DeiT fine-tuning (RandAugment m9-mstd0.5, random erasing, MixUp/CutMix, label smoothing).

Each transform starts with `ModelPixels`: the model's channel count and [0, 1] value scale (see
`simmim.data.pixels`). 8-bit images stay uint8 (PIL or tensor) through every geometric and colour op and
become float32 once, at the end, before Normalize; 16-bit, float and multi-band images are float32
throughout. Each transform also says the smallest image it needs (`decode_size`), so that large JPEGs can be
decoded at a reduced size (see `decode_image`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from simmim.data.pixels import ModelPixels
from simmim.models.image_processor import DEFAULT_CROP_PCT, eval_resize_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's RandAugment fills pixels moved in from outside with the ImageNet mean colour, in uint8
_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class ImageTransform(v2.Compose):
    """A `v2.Compose` from a decoded image to a normalised float32 tensor (C, H, W), plus `decode_size`: the
    shortest image side (pixels) that still gives full resolution to the output, or None for any."""

    def __init__(self, transforms: list, decode_size: int | None) -> None:
        super().__init__(transforms)
        self.decode_size = decode_size


def _to_normalized_float(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _crop_decode_size(image_size: int | Sequence[int], min_scale: float) -> int:
    # the smallest crop covers min_scale of the area, so sqrt(min_scale) of the side, and must cover the output
    return math.ceil(max(_pair(image_size)) / math.sqrt(min_scale))


def pretrain_transform(
    image_size: int | Sequence[int],
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.67, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    num_channels: int = 3,
    max_value: float | None = None,
) -> ImageTransform:
    """SimMIM's pretraining augmentation: random resized crop (bilinear), horizontal flip, normalise."""
    return ImageTransform(
        [
            ModelPixels(num_channels, max_value),
            v2.PILToTensor(),  # (C, h, w) uint8; resizing uint8 tensors is faster than resizing PIL images
            v2.RandomResizedCrop(_pair(image_size), scale=scale, ratio=ratio, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_normalized_float(mean, std),
        ],
        decode_size=_crop_decode_size(image_size, scale[0]),
    )


def eval_transform(
    image_size: int | Sequence[int],
    *,
    crop_pct: float = DEFAULT_CROP_PCT,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    num_channels: int = 3,
    max_value: float | None = None,
) -> ImageTransform:
    """Resize (bicubic) to `eval_resize_size(image_size, crop_pct)` then center crop: 256 -> 224 as DeiT and
    timm evaluate. `simmim.models.image_processor.eval_image_processor` gives the same pixels.

    An int `image_size` resizes the shortest side (keeping the aspect ratio); a (height, width) pair resizes
    both sides.
    """
    height, width = _pair(image_size)
    resize = [eval_resize_size(side, crop_pct) for side in (height, width)]
    return ImageTransform(
        [
            ModelPixels(num_channels, max_value),
            v2.Resize(resize[0] if isinstance(image_size, int) else resize, v2.InterpolationMode.BICUBIC),
            v2.CenterCrop((height, width)),
            v2.PILToTensor(),
            *_to_normalized_float(mean, std),
        ],
        decode_size=max(resize),
    )


class NoisyRandAugment(v2.RandAugment):
    """RandAugment with a magnitude drawn per op from N(magnitude, magnitude_std), clipped to
    [0, magnitude_max], as timm's `rand-m9-mstd0.5-inc1` used by DeiT; torchvision has no magnitude noise.

    Magnitudes are on timm's 0..10 scale (m9 = 90% of each op's range) at 0.1 resolution, and torchvision's
    ops and ranges are used. Remaining differences from timm: torchvision always applies the two chosen ops
    (one of them may be Identity) where timm applies each with probability 0.5; its op set lacks Invert and
    SolarizeAdd; Posterize at m9 keeps 4 bits where timm's increasing variant keeps 1.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        magnitude_max: int = 10,
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
        fill: Sequence[int] = _FILL,
    ) -> None:
        self.steps_per_unit = 10  # magnitude resolution 0.1
        super().__init__(
            num_ops=1,  # forward() runs one op at a time, each with its own magnitude
            magnitude=round(magnitude * self.steps_per_unit),
            num_magnitude_bins=magnitude_max * self.steps_per_unit + 1,
            interpolation=interpolation,
            fill=list(fill),
        )
        self.num_layers = num_ops
        # the fill in the scale of what comes in: uint8 images take timm's 8-bit colour, float ones (16-bit
        # and float RGB, in [0, 1]) the same colour / 255
        self._uint8_fill = self._fill
        self._float_fill = v2.RandAugment(fill=[f / 255 for f in fill])._fill
        self.mean_magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max

    def forward(self, *inputs: Any) -> Any:
        outputs = inputs if len(inputs) > 1 else inputs[0]
        image = inputs[0]
        floats = isinstance(image, torch.Tensor) and image.is_floating_point()
        self._fill = self._float_fill if floats else self._uint8_fill
        for _ in range(self.num_layers):
            magnitude = self.mean_magnitude + self.magnitude_std * torch.randn(()).item()
            magnitude = min(max(magnitude, 0.0), self.magnitude_max)
            # the parent reads the magnitude as an index into its bins (0.1 apart)
            self.magnitude = round(magnitude * self.steps_per_unit)
            outputs = super().forward(outputs)
        return outputs


def finetune_transform(
    image_size: int | Sequence[int],
    *,
    rand_augment: bool = True,
    random_erasing: float = 0.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.08, 1.0),
    num_channels: int = 3,
    max_value: float | None = None,
) -> ImageTransform:
    """DeiT's training augmentation: random resized crop (bicubic), flip, RandAugment, normalise, and
    random erasing with per-pixel normal noise (timm's `re_mode="pixel"`); MixUp/CutMix is per batch.

    RandAugment's colour operations are defined for RGB: pass `rand_augment=False` for other channel
    counts (`rand_augment_applies` says whether it does)."""
    if rand_augment and not rand_augment_applies(num_channels):
        raise ValueError(f"RandAugment is defined for RGB images, not num_channels={num_channels}")
    transforms = [
        ModelPixels(num_channels, max_value),
        v2.PILToTensor(),
        v2.RandomResizedCrop(_pair(image_size), scale=scale, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(),
    ]
    if rand_augment:
        transforms.append(NoisyRandAugment())
    transforms += _to_normalized_float(mean, std)
    if random_erasing > 0:
        transforms.append(v2.RandomErasing(p=random_erasing, value="random"))
    return ImageTransform(transforms, decode_size=_crop_decode_size(image_size, scale[0]))


def rand_augment_applies(num_channels: int) -> bool:
    """RandAugment's colour operations (colour, contrast, brightness, posterize, solarize, equalize,
    autocontrast) are defined for RGB images only."""
    return num_channels == 3


class MixUpCutMix:
    """Per-batch MixUp or CutMix (chosen with equal probability) and label smoothing, as DeiT trains.

    Smoothing is applied to the mixed targets: it is linear, so this equals mixing smoothed one-hot targets
    as timm does. An alpha of 0 disables that mix; with both 0 only label smoothing remains.

    Args:
        num_classes: K.
        mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameters of the mixing coefficient.
        label_smoothing: epsilon; targets are (1 - epsilon) * mixed + epsilon / K.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        label_smoothing: float = 0.1,
    ) -> None:
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixes) if len(mixes) == 2 else (mixes[0] if mixes else None)

    def __call__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images and (B,) int64 labels -> mixed images and (B, K) float soft targets."""
        if self.mix is None or len(labels) == 0:
            targets = F.one_hot(labels, self.num_classes).to(torch.float32)
        else:
            pixel_values, targets = self.mix(pixel_values, labels)
        targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return pixel_values, targets
