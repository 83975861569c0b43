"""DeiTImageProcessor: resize, center crop, rescale and normalise images into `pixel_values`.

The parameters and `preprocessor_config.json` of Transformers' DeiTImageProcessor (resize to 256 bicubic,
center crop 224, rescale by 1/255, normalise), built on torchvision.transforms.v2; and the evaluation rule
(`eval_resize_size`, `eval_image_processor`) that `simmim.data.eval_transform` also follows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

PROCESSOR_NAME = "preprocessor_config.json"
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # Transformers' default for DeiTImageProcessor
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
# PIL resampling codes as stored in preprocessor_config.json.
_RESAMPLE = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}
# DeiT's and timm's evaluation: resize to 256, center crop 224.
DEFAULT_CROP_PCT = 224 / 256


def eval_resize_size(crop_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """The side to resize to before a center crop of `crop_size`: timm's floor(crop_size / crop_pct).

    224 -> 256 and 96 -> 109 at DeiT's crop_pct = 224/256 (rounding instead would give 110).
    """
    # + 1e-6: a quotient that is an integer on paper can land just below it (14 / 0.28 is 49.99999999999999)
    return math.floor(crop_size / crop_pct + 1e-6)


def eval_image_processor(
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = DEFAULT_CROP_PCT,
    max_value: float | None = None,
) -> DeiTImageProcessor:
    """The processor of `simmim.data.eval_transform(image_size, crop_pct=...)`, pixel for pixel: bicubic
    resize to `eval_resize_size` (an int `image_size`: of the shortest side, keeping the aspect ratio; a
    (height, width) pair: of each side), then center crop `image_size`."""
    if isinstance(image_size, int):
        size: dict[str, int] = {"shortest_edge": eval_resize_size(image_size, crop_pct)}
    else:
        height, width = image_size
        size = {"height": eval_resize_size(height, crop_pct), "width": eval_resize_size(width, crop_pct)}
    # integer pixels scale by 1/255 (8 bits), or by 1/max_value when the run set data.max_value
    rescale = 1 / 255 if max_value is None else 1 / max_value
    return DeiTImageProcessor(
        size=size, crop_size=image_size, image_mean=list(mean), image_std=list(std), rescale_factor=rescale
    )


def _size_dict(
    size: int | Sequence[int] | dict[str, int], name: str, shortest_edge: bool = False
) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"} and shortest_edge:
            return {"shortest_edge": int(size["shortest_edge"])}
        if set(size) != {"height", "width"}:
            supported = "{'height', 'width'} or {'shortest_edge'}" if shortest_edge else "{'height', 'width'}"
            raise ValueError(f"{name}={size}: only {supported} sizes are supported by DeiT")
        return {"height": int(size["height"]), "width": int(size["width"])}
    height, width = size
    return {"height": int(height), "width": int(width)}


class DeiTImageProcessor:
    """Preprocess images for DeiT.

    Args:
        do_resize: resize to `size` first.
        size: {"height", "width"} after resizing (default 256x256; an int is square), or {"shortest_edge"}:
            that length for the shorter side, the longer one int(shortest_edge * long / short), as
            Transformers 5 and torchvision resize.
        resample: PIL resampling code (3 = bicubic).
        do_center_crop: crop the center `crop_size` (default 224x224).
        crop_size: {"height", "width"} of the crop.
        rescale_factor: multiply integer values by this: 1/255 (8 bits), or 1/data.max_value in the export of
            a run that set it.
        do_rescale: apply `rescale_factor` (switch off for inputs already in [0, 1]).
        do_normalize: subtract `image_mean` and divide by `image_std` per channel.
        image_mean, image_std: normalisation, one value per channel (Transformers' default 0.5, 0.5 for
            RGB); a one-channel image is repeated to three for a model of three.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: int | Sequence[int] | dict[str, int] | None = None,
        resample: int = 3,
        do_center_crop: bool = True,
        crop_size: int | Sequence[int] | dict[str, int] | None = None,
        rescale_factor: float = 1 / 255,
        do_rescale: bool = True,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.do_resize = do_resize
        self.size = _size_dict(256 if size is None else size, "size", shortest_edge=True)
        if int(resample) not in _RESAMPLE:
            raise ValueError(f"resample={resample!r} is not a PIL resampling code {sorted(_RESAMPLE)}")
        self.resample = int(resample)
        self.do_center_crop = do_center_crop
        self.crop_size = _size_dict(224 if crop_size is None else crop_size, "crop_size")
        self.rescale_factor = rescale_factor
        self.do_rescale = do_rescale
        self.do_normalize = do_normalize
        self.image_mean = list(IMAGENET_STANDARD_MEAN if image_mean is None else _triple(image_mean))
        self.image_std = list(IMAGENET_STANDARD_STD if image_std is None else _triple(image_std))
        for key in ("image_processor_type", "feature_extractor_type", "processor_class", "_processor_class"):
            kwargs.pop(key, None)
        self.extra = kwargs  # other keys of a preprocessor_config.json, written back unchanged

    # ------------------------------------------------------------------ preprocessing
    def __call__(
        self, images: Any, return_tensors: str | None = "pt", **overrides: Any
    ) -> dict[str, torch.Tensor]:
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def preprocess(
        self, images: Any, return_tensors: str | None = "pt", **overrides: Any
    ) -> dict[str, torch.Tensor]:
        """One image or a batch (PIL images, HWC/CHW numpy arrays, CHW/BCHW tensors) -> {"pixel_values": (B, C, H, W)}.

        Keyword arguments override this processor's settings for the call (e.g. `do_resize=False`).
        """
        unknown = set(overrides) - set(self.to_dict())
        if unknown:
            raise ValueError(f"unknown preprocessing arguments {sorted(unknown)}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: simmim returns torch tensors ('pt')")
        p = self.copy(**overrides)
        batch = torch.stack([p._one(image) for image in _as_list(images)])
        return {"pixel_values": batch}

    def _one(self, image: Any) -> torch.Tensor:
        channels = len(self.image_mean)
        if isinstance(image, PIL.Image.Image):
            if channels == 3 and image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            if image.mode in ("RGBA", "LA"):
                # a model of as many channels takes alpha as a band: resized as a tensor, since PIL
                # premultiplies the other bands by alpha when it resizes, which wipes them where it is low
                x = TF.pil_to_tensor(image)
                if self.do_resize:
                    x = TF.resize(x, self._resize_to(), _RESAMPLE[self.resample], antialias=True)
            else:
                if self.do_resize:  # PIL's own resize, as Transformers does, for identical pixels
                    image = TF.resize(image, self._resize_to(), _RESAMPLE[self.resample])
                x = TF.pil_to_tensor(image)  # (C, H, W) uint8
        else:
            x = torch.as_tensor(np.asarray(image)) if isinstance(image, np.ndarray) else image
            if x.ndim == 2:
                x = x[None]
            elif x.ndim == 3 and x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3):
                # HWC -> CHW; a leading 1 or 3 reads as channels (as Transformers infers), so 4 rows stay rows
                x = x.permute(2, 0, 1)
            if x.ndim != 3:
                raise ValueError(
                    f"expected an image of shape (H, W), (H, W, C) or (C, H, W), got {tuple(x.shape)}"
                )
            if self.do_resize:
                x = TF.resize(x, self._resize_to(), _RESAMPLE[self.resample], antialias=True)
        if x.shape[0] == 1 and channels == 3:
            x = x.expand(3, -1, -1)  # grey as grey RGB
        if self.do_center_crop:
            x = TF.center_crop(x, [self.crop_size["height"], self.crop_size["width"]])
        x = x.to(torch.float32)
        if self.do_rescale:
            x = x * self.rescale_factor
        if self.do_normalize:
            x = TF.normalize(x, self.image_mean, self.image_std)
        return x

    def _resize_to(self) -> list[int]:
        # torchvision reads [n] as the shorter side, [height, width] as both
        if "shortest_edge" in self.size:
            return [self.size["shortest_edge"]]
        return [self.size["height"], self.size["width"]]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "image_processor_type": "DeiTImageProcessor",
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": dict(self.crop_size),
            "rescale_factor": self.rescale_factor,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    def copy(self, **overrides: Any) -> DeiTImageProcessor:
        return DeiTImageProcessor(**{**self.to_dict(), **overrides})

    def save_pretrained(self, save_directory: str | Path) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / PROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> DeiTImageProcessor:
        path = Path(path)
        file = path / PROCESSOR_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {PROCESSOR_NAME} in {path}")
        return cls(**{**json.loads(file.read_text()), **overrides})

    def __repr__(self) -> str:
        return f"DeiTImageProcessor({json.dumps(self.to_dict())})"


def _triple(value: float | Sequence[float]) -> tuple[float, ...]:
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def _as_list(images: Any) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images.unbind(0))
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]
