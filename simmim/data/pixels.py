"""What the model takes from a decoded image: `num_channels` channels, values scaled to [0, 1] (floats as they
are), nothing passed through 8 bits on the way.

An 8-bit image whose channels already match stays a PIL image (RGB for 3 channels, L for 1), so that the
common path keeps its speed: the transforms resize it as uint8 and scale it by 1/255 once. 8-bit RGBA for 4
channels and LA for 2 become uint8 tensors, resized as such: PIL would premultiply the bands by the fourth.
Every other image becomes a float32 tensor (C, H, W): integers divided by their type's largest value (65535
for 16 bits), or by `max_value` when a sensor stores fewer bits (4095 for 12 bits in 16).

Channel rules, the same for every reader: a 3-channel model takes grey images as grey RGB and composites
transparent ones onto white (torchvision's and timm's convention for ImageNet's grey and RGBA files); any
other count must match the model's, or the sample is skipped and counted (`ChannelMismatch`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from simmim.data.decoding import Pixels

# PIL modes by channel count that a model of that count takes as they are (8 bits per channel)
_PIL_AS_IS = {1: ("L",), 3: ("RGB",), 4: ("RGBA",), 2: ("LA",)}
_PIL_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_PIL_WIDE = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16/32-bit integer and float grey
# colour spaces whose stored values are not the colours: PIL converts them (a palette's indices, CMYK, ...)
_PIL_COLOUR_SPACES = ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La", "1")


class ChannelMismatch(ValueError):
    """An image whose channel count the model does not take."""


class NonFinitePixels(ValueError):
    """A float image with NaN or infinite values."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit PIL image of any mode to RGB, keeping the intent of the mode rather than clipping data."""
    if image.mode in _PIL_ALPHA or (image.mode == "P" and "transparency" in image.info):
        # transparent pixels have arbitrary (often black) colour underneath: composite them onto white
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def _pil_pixels(image: Image.Image) -> Pixels:
    """A PIL image as an (H, W, C) array in its stored type; 32-bit integer grey that fits 16 bits (PIL
    reads 16-bit PGM and some PNGs as mode I) as uint16, so that it scales by 16 bits' range."""
    values = np.asarray(image)
    if image.mode == "I" and values.size and 0 <= values.min() and values.max() <= 65535:
        values = values.astype(np.uint16)
    if values.ndim == 2:
        values = values[:, :, None]
    return Pixels(values, alpha=image.mode in _PIL_ALPHA)


def decoded_colours(image: Image.Image) -> Image.Image:
    """A PIL image in a mode whose values are its colours: palette, CMYK, YCbCr, ... converted (to RGBA
    where they carry transparency, L for bilevel), so that no later step reads indices or inks as pixels."""
    if image.mode not in _PIL_COLOUR_SPACES:
        return image
    if image.mode == "1":
        return image.convert("L")
    transparent = image.mode in ("PA", "RGBa", "La") or "transparency" in image.info
    if image.mode == "La":
        return image.convert("LA")
    return image.convert("RGBA" if transparent else "RGB")


def _scaled(values: np.ndarray, max_value: float | None, name: str) -> np.ndarray:
    """Integers to float32 divided by `max_value` or their type's largest value; floats as they are."""
    if values.dtype.kind == "b":
        return values.astype(np.float32)
    if values.dtype.kind in "iu":
        top = max_value if max_value is not None else np.iinfo(values.dtype).max
        return values.astype(np.float32) / np.float32(top)
    values = values.astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        raise NonFinitePixels(f"{name} has NaN or infinite pixel values")
    return values


def to_model_pixels(
    image: Image.Image | Pixels, num_channels: int, max_value: float | None = None, name: str = "image"
) -> Image.Image | torch.Tensor:
    """A decoded image as the model takes it: an 8-bit PIL image of `num_channels` channels, or a float32
    tensor (num_channels, H, W). Raises `ChannelMismatch` or `NonFinitePixels` (the caller skips the
    sample and counts it)."""
    if isinstance(image, Image.Image):
        integer_8bit = image.mode not in _PIL_WIDE
        if integer_8bit and max_value is None:
            if image.mode in _PIL_AS_IS.get(num_channels, ()):
                if image.mode in _PIL_ALPHA:
                    # the model takes alpha as a band: a tensor, since PIL multiplies the colour bands by
                    # alpha when it resizes (and divides after), which wipes them where the band is low
                    return tv_tensors.Image(torch.from_numpy(np.array(image).transpose(2, 0, 1).copy()))
                return image
            if num_channels == 3:
                return _to_rgb(image)
            if num_channels == 1 and image.mode == "1":
                return image.convert("L")
        image = _pil_pixels(decoded_colours(image))
    elif image.values.dtype == np.uint8 and max_value is None and not image.alpha:
        # 8-bit grey or RGB from a TIFF or an array: PIL's fast path, as for a JPEG or PNG
        if image.channels == 1 and num_channels in (1, 3):
            return to_model_pixels(Image.fromarray(image.values[:, :, 0], "L"), num_channels, None, name)
        if image.channels == 3 == num_channels:
            return Image.fromarray(np.ascontiguousarray(image.values), "RGB")
    values, channels = image.values, image.channels
    if image.alpha and num_channels != channels:  # a model of as many channels takes alpha as a band
        # composite onto white, as 8-bit images are: colour * alpha + (1 - alpha); alpha in its type's
        # range (data.max_value scales a sensor's values, not transparency)
        alpha = _scaled(values[:, :, -1:], None, name)
        pixels = _scaled(values[:, :, :-1], max_value, name) * alpha + (1.0 - alpha)
    else:
        pixels = _scaled(values, max_value, name)
    if pixels.shape[2] == 1 and num_channels == 3:
        pixels = np.repeat(pixels, 3, axis=2)  # grey as grey RGB
    if pixels.shape[2] != num_channels:
        raise ChannelMismatch(
            f"{name} has {channels} channel(s) and model.num_channels={num_channels}: set "
            f"model.num_channels={channels} if all images have {channels}, or convert the odd ones"
        )
    # (H, W, C) -> (C, H, W), a writable copy; tv_tensors.Image so that every v2 transform takes it as the image
    return tv_tensors.Image(torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C")))


class ModelPixels:
    """The transforms' first step: `to_model_pixels` with the run's channel count and value scale."""

    def __init__(self, num_channels: int = 3, max_value: float | None = None) -> None:
        self.num_channels = num_channels
        self.max_value = max_value

    def __call__(self, image: Image.Image | Pixels) -> Image.Image | torch.Tensor:
        return to_model_pixels(image, self.num_channels, self.max_value)

    def __repr__(self) -> str:
        return f"ModelPixels(num_channels={self.num_channels}, max_value={self.max_value})"
