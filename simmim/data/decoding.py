"""Robust image decoding: any file or byte string in, its pixels as they are stored (or None, with a warning) out.

A broken file must never stop a run or shift labels: the decoder returns None and names the file, the
dataset wrappers turn that into a skipped sample, and `check_bad_fraction` stops the run with a clear
error only when too many samples are broken.

What comes out keeps the stored precision and channels; `simmim.data.pixels` turns it into what the model
takes (its channel count, values scaled to [0, 1]):
- a PIL image for what PIL reads losslessly (JPEG, 8-bit PNG, 8/16-bit grey, BMP, GIF, WebP), with its
  EXIF orientation applied; 8-bit RGB stays on this path, as fast as before;
- `Pixels` (an (H, W, C) numpy array) for TIFF (tifffile: any band count, 8/16/32-bit, float, either
  layout), 16-bit colour PNG (torchvision's decoder; PIL would cut it to 8 bits) and `.npy` arrays.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_png

logger = logging.getLogger("simmim.data")

# the union of what torchvision's ImageFolder and Hugging Face's imagefolder accept, and numpy arrays
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy",
)  # fmt: skip

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


@dataclass(frozen=True)
class Pixels:
    """Decoded pixels PIL cannot hold: `values` (H, W, C) in their stored dtype; `alpha`: the last channel
    is transparency (a 16-bit RGBA PNG, a TIFF with an alpha extra sample), composited away for a model
    that takes one channel fewer."""

    values: np.ndarray
    alpha: bool = False

    @property
    def channels(self) -> int:
        return self.values.shape[-1]


class DecompressionBomb(ValueError):
    """An image with more pixels than PIL's limit (Image.MAX_IMAGE_PIXELS)."""


def _check_pixel_count(width: int, height: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise DecompressionBomb(
            f"{width}x{height} pixels, past PIL's limit of {limit} (Image.MAX_IMAGE_PIXELS)"
        )


def check_pixel_limit(image: Image.Image) -> None:
    """Refuse an image past PIL's pixel limit before it is decoded. PIL itself only warns between the limit
    and twice it (and refuses above), but a few such images decoded at once by the loader's workers can
    take the machine's memory: every one is skipped and counted instead. TIFFs and arrays are held to the
    same limit."""
    _check_pixel_count(*image.size)


def _channels_last(array: np.ndarray, axes: str | None) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (H, W, C). `axes` (tifffile's, e.g. "YXS", "CYX", "QYX") names
    the layout; without it, the smaller of the first and last axes holds the channels."""
    if array.ndim > 3:  # (1, C, H, W) and the like
        array = array.reshape([n for n in array.shape if n != 1] or [1])
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"an array of shape {array.shape}: expected (H, W), (H, W, C) or (C, H, W)")
    if axes is not None and len(axes) == 3 and "Y" in axes and "X" in axes:
        channel_axis = next(i for i, a in enumerate(axes) if a not in "YX")
    else:
        channel_axis = 0 if array.shape[0] < array.shape[-1] else 2
    return np.moveaxis(array, channel_axis, -1)


class _ColourSpace(Exception):
    """A TIFF in a colour space (palette, CMYK, YCbCr, white-is-zero) that PIL converts and tifffile
    returns raw."""


def _read_tiff(data: bytes | str | os.PathLike) -> Pixels:
    """A TIFF of any band count and sample type, with tifffile; its first image series."""
    with tifffile.TiffFile(io.BytesIO(data) if isinstance(data, bytes) else data) as tif:
        series = tif.series[0]
        page = tif.pages[0]
        if page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
            raise _ColourSpace(page.photometric.name)
        axes = series.axes
        shape = dict(zip(axes, series.shape))
        _check_pixel_count(shape.get("X", 1), shape.get("Y", 1))
        # drop the layout's axes of size 1 other than Y and X (a stack "QYX" of one page is "YX")
        kept = [(a, n) for a, n in zip(axes, series.shape) if n != 1 or a in "YX"]
        values = series.asarray().reshape([n for _, n in kept])
        alpha_codes = (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
        alpha = bool(page.extrasamples) and page.extrasamples[-1] in alpha_codes
    return Pixels(_channels_last(values, "".join(a for a, _ in kept)), alpha)


def _read_npy(data: bytes | str | os.PathLike) -> Pixels:
    array = np.load(io.BytesIO(data) if isinstance(data, bytes) else data, allow_pickle=False)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"a .npy array of dtype {array.dtype}: expected booleans, integers or floats")
    values = _channels_last(array, None)
    _check_pixel_count(values.shape[1], values.shape[0])
    return Pixels(values)


def _png_bit_depth(head: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR chunk, which follows the 8-byte signature."""
    return head[24], head[25]


def _read_png16(data: bytes) -> Pixels:
    """A 16-bit PNG, which PIL reads only as grey: torchvision decodes every colour type, unchanged."""
    values = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)
    _, colour_type = _png_bit_depth(data[:26])
    # (C, H, W) torch.uint16 -> (H, W, C) numpy uint16; colour types 4 and 6 carry alpha
    return Pixels(values.permute(1, 2, 0).numpy(), alpha=colour_type in (4, 6))


def _read_pil(data: bytes | str | os.PathLike, decode_size: int | None) -> Image.Image:
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    if decode_size is not None and image.format == "JPEG":
        image.draft(image.mode, (decode_size, decode_size))
    check_pixel_limit(image)  # before decoding (after a JPEG's draft: its reduced size is decoded)
    image.load()  # decode now so that truncated files fail here, not inside a transform
    ImageOps.exif_transpose(image, in_place=True)  # in place: otherwise it copies every upright image
    return image


def _read_tiff_or_pil(data: bytes | str | os.PathLike, decode_size: int | None) -> Pixels | Image.Image:
    """tifffile first; PIL where tifffile lacks the codec (LZW or JPEG without imagecodecs installed) and
    the TIFF is one PIL reads (1, 3 or 4 bands of 8 bits, or 16-bit grey)."""
    try:
        return _read_tiff(data)
    except DecompressionBomb:
        raise
    except _ColourSpace:
        return _read_pil(data, decode_size)
    except Exception as tiff_error:  # noqa: BLE001 - PIL may read what tifffile's codecs cannot
        try:
            return _read_pil(data, decode_size)
        except Exception:  # noqa: BLE001
            raise tiff_error from None


def decode_image(
    data: bytes | str | os.PathLike | dict | Image.Image | np.ndarray | None,
    name: str,
    decode_size: int | None = None,
) -> Image.Image | Pixels | None:
    """Decode an image as stored; None (and a warning naming it) if it cannot be.

    Args:
        data: a path, encoded bytes (JPEG, PNG, TIFF, .npy, ...), a Hugging Face image dict
            `{"bytes", "path"}`, a decoded PIL image, or an array ((H, W), (H, W, C) or (C, H, W)).
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
            image = data.copy()  # exif_transpose works in place
            ImageOps.exif_transpose(image, in_place=True)
            return image
        if isinstance(data, (np.ndarray, list)):  # an array column (webdataset's `.npy`, a parquet list)
            return Pixels(_channels_last(np.asarray(data), None))
        if isinstance(data, bytes):
            head = data[:32]
        else:  # a path: the suffix says what it holds, so the common JPEG needs no extra read
            suffix = os.path.splitext(os.fspath(data))[1].lower()
            head = b""
            if suffix in (".tif", ".tiff", ".npy", ".png"):
                with open(data, "rb") as file:
                    head = file.read(32)
        if head.startswith(_TIFF_MAGIC):
            return _read_tiff_or_pil(data, decode_size)
        if head.startswith(_NPY_MAGIC):
            return _read_npy(data)
        if head.startswith(_PNG_MAGIC) and len(head) >= 26 and _png_bit_depth(head)[0] == 16:
            return _read_png16(data if isinstance(data, bytes) else Path(data).read_bytes())
        return _read_pil(data, decode_size)
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this sample"
        logger.warning("skipping %s: cannot decode image (%s: %s)", name, type(error).__name__, error)
        return None
