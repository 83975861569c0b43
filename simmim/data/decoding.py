"""Robust image decoding: any file or byte string in, an RGB PIL image or None (with a warning) out.

A broken file must never stop a run or shift labels: the decoder returns None and names the file, the
dataset wrappers turn that into a skipped sample, and `check_bad_fraction` stops the run with a clear
error only when too many samples are broken.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger("simmim.data")

# the union of what torchvision's ImageFolder and Hugging Face's imagefolder accept
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class BadImageError(RuntimeError):
    """Too large a fraction of the samples seen so far could not be decoded."""


def check_bad_fraction(num_bad: int, num_seen: int, max_fraction: float, *, min_seen: int = 1000) -> None:
    """Raise `BadImageError` when more than `max_fraction` of the samples seen were skipped.

    The tolerance is computed over at least `min_seen` samples so that one broken file in the first batch
    does not stop a run, while a dataset that is broken throughout stops after `max_fraction * min_seen`.

    Args:
        num_bad: running total of skipped samples (the sum of the batches' `num_skipped`).
        num_seen: running total of samples requested, skipped ones included.
        max_fraction: the largest tolerated fraction of skipped samples, in [0, 1].
        min_seen: the smallest denominator for the fraction.
    """
    if num_bad > max_fraction * max(num_seen, min_seen):
        raise BadImageError(
            f"{num_bad} of {num_seen} images could not be decoded ({num_bad / max(num_seen, 1):.2%}), "
            f"above the limit of {max_fraction:.2%}; see the 'simmim.data' warnings for the files"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB, keeping the intent of the mode rather than clipping or dropping data."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        # PIL's convert() clips 16-bit and float pixels to [0, 255], which turns most of them white
        pixels = np.asarray(image, dtype=np.float32)
        if mode == "F":
            pixels = pixels * 255.0 if pixels.max(initial=0.0) <= 1.0 else pixels
        elif mode.startswith("I;16") or pixels.max(initial=0.0) > 255:
            pixels = pixels / 257.0  # 65535 -> 255
        gray = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        # transparent pixels have arbitrary (often black) colour underneath: composite them onto white
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


class DecompressionBomb(ValueError):
    """An image with more pixels than PIL's limit (Image.MAX_IMAGE_PIXELS)."""


def check_pixel_limit(image: Image.Image) -> None:
    """Refuse an image past PIL's pixel limit before it is decoded. PIL itself only warns between the limit
    and twice it (and refuses above), but a few such images decoded at once by the loader's workers can
    take the machine's memory: every one is skipped and counted instead."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise DecompressionBomb(
            f"{width}x{height} pixels, past PIL's limit of {limit} (Image.MAX_IMAGE_PIXELS)"
        )


def decode_image(
    data: bytes | str | os.PathLike | dict | Image.Image | None,
    name: str,
    decode_size: int | None = None,
) -> Image.Image | None:
    """Decode an image to RGB with its EXIF orientation applied; None (and a warning naming it) if it fails.

    Args:
        data: a path, encoded bytes, a Hugging Face image dict `{"bytes", "path"}`, or an already
            decoded PIL image.
        name: what the warning calls the sample (a file path or `dataset[i]`).
        decode_size: the shortest side the transform needs; JPEGs are decoded at the largest 1/2, 1/4 or
            1/8 scale that keeps both sides at least this large (PIL's `draft`), which is much faster.
    """
    try:
        if isinstance(data, dict):  # Hugging Face Image(decode=False): bytes if embedded, else a path
            data = data.get("bytes") or data.get("path")
        if data is None:
            raise ValueError("no image data")
        if isinstance(data, Image.Image):
            image = data.copy()  # exif_transpose below works in place
        else:
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            if decode_size is not None and image.format == "JPEG":
                image.draft(image.mode, (decode_size, decode_size))
            check_pixel_limit(image)  # before decoding (after a JPEG's draft: its reduced size is decoded)
            image.load()  # decode now so that truncated files fail here, not inside a transform
        ImageOps.exif_transpose(image, in_place=True)  # in place: otherwise it copies every upright image
        return _to_rgb(image)
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this sample"
        logger.warning("skipping %s: cannot decode image (%s: %s)", name, type(error).__name__, error)
        return None
