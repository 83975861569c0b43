"""Images of any channel count and bit depth: each reader against numpy on files made here, 16 bits kept
whole, the channel rules, the dataset statistics against numpy, and the bad inputs (one line before any
work, or skipped and counted)."""

from __future__ import annotations

import io
import json
import logging
import runpy
import struct
import tarfile
import zlib

import numpy as np
import pytest
import tifffile
import torch
from helpers import ROOT
from PIL import Image

from simmim.config import PretrainConfig, load_config
from simmim.data import decode_image, eval_transform, finetune_transform, pretrain_transform
from simmim.data.decoding import Pixels
from simmim.data.normalization import (
    DatasetStatistics,
    channel_statistics,
    check_channels,
    with_dataset_statistics,
)
from simmim.data.pixels import ChannelMismatch, NonFinitePixels, to_model_pixels
from simmim.data.sources import open_source
from simmim.evaluation.grids import display_bands, reconstruction_grid
from simmim.models.image_processor import eval_image_processor

RNG = np.random.default_rng(0)


def u16(*shape: int) -> np.ndarray:
    return RNG.integers(0, 65536, size=shape, dtype=np.uint16)


def as_chw(pixels) -> np.ndarray:
    """`to_model_pixels`' output as a float (C, H, W) array in [0, 1]."""
    if isinstance(pixels, Image.Image):
        array = np.asarray(pixels, dtype=np.float64) / 255
        return (array[:, :, None] if array.ndim == 2 else array).transpose(2, 0, 1)
    return pixels.numpy().astype(np.float64)


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def png16_rgb(hwc: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand from the format's definition (PIL writes no 16-bit colour):
    rows of big-endian samples, each behind filter byte 0, deflated into one IDAT chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    height, width, _ = hwc.shape
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in hwc)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- the readers
@pytest.mark.parametrize("channels", [1, 4, 6])
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_multiband_tiff_in_either_layout_reads_as_numpy(channels, layout, tmp_path):
    hwc = u16(5, 7, channels)
    stored = hwc if layout == "channels_last" else hwc.transpose(2, 0, 1)
    kwargs = {"photometric": "minisblack"}
    if layout == "channels_last" and channels > 1:
        kwargs["planarconfig"] = "contig"
    path = tmp_path / "bands.tif"
    path.write_bytes(tiff_bytes(stored if channels > 1 else hwc[:, :, 0], **kwargs))
    for data in (path, path.read_bytes()):  # a file, and a tar or parquet member's bytes
        decoded = decode_image(data, "bands.tif")
        assert isinstance(decoded, Pixels) and decoded.values.dtype == np.uint16
        np.testing.assert_array_equal(decoded.values, hwc)
        np.testing.assert_allclose(
            as_chw(to_model_pixels(decoded, channels)), hwc.transpose(2, 0, 1) / 65535, rtol=1e-6
        )


def test_16bit_png_grey_and_rgb_keep_every_bit(tmp_path):
    grey = np.array([[1000, 1001], [65535, 0]], dtype=np.uint16)  # 1000 and 1001 differ in the low 8 bits
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)
    pixels = to_model_pixels(decode_image(path, str(path)), 1)
    np.testing.assert_allclose(as_chw(pixels)[0], grey / 65535, rtol=1e-6)
    assert pixels[0, 0, 0] != pixels[0, 0, 1]  # what 8 bits would have merged (1000 // 257 == 1001 // 257)
    # 16-bit RGB, which PIL would read as 8 bits: torchvision's PNG decoder keeps 16 (written with it here)
    rgb = u16(3, 4, 6)
    decoded = decode_image(png16_rgb(rgb.transpose(1, 2, 0)), "rgb16.png")
    np.testing.assert_array_equal(decoded.values, rgb.transpose(1, 2, 0))
    np.testing.assert_allclose(as_chw(to_model_pixels(decoded, 3)), rgb / 65535, rtol=1e-6)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 2), (2, 5, 7)])
def test_npy_arrays_of_any_layout(shape, tmp_path):
    array = u16(*shape)
    hwc = array.transpose(1, 2, 0) if shape[0] == 2 else (array[:, :, None] if array.ndim == 2 else array)
    path = tmp_path / "a.npy"
    np.save(path, array)
    for data in (path, path.read_bytes()):
        np.testing.assert_array_equal(decode_image(data, "a.npy").values, hwc)
    floats = RNG.random((5, 7, 2), dtype=np.float32) * 3 - 1  # float pixels pass as they are, any range
    np.testing.assert_array_equal(
        as_chw(to_model_pixels(decode_image(npy_bytes(floats), "f"), 2)), floats.transpose(2, 0, 1)
    )


def test_max_value_scales_a_12_bit_sensor():
    values = np.array([[0, 4095], [2048, 100]], dtype=np.uint16)[:, :, None]
    pixels = to_model_pixels(Pixels(values), 1, max_value=4095)
    np.testing.assert_allclose(as_chw(pixels)[0], values[:, :, 0] / 4095, rtol=1e-6)


def test_tar_and_parquet_members_are_read_with_their_values(tmp_path):
    """`{key}.tif` and `{key}.npy` in webdataset tar shards, TIFF bytes in a parquet image column."""
    import datasets

    images = [u16(6, 8, 3) for _ in range(3)]
    for suffix, encode in (("tif", lambda a: tiff_bytes(a, photometric="minisblack", planarconfig="contig")),
                           ("npy", npy_bytes)):  # fmt: skip
        shard = tmp_path / f"{suffix}-000.tar"
        with tarfile.open(shard, "w") as tar:
            for i, image in enumerate(images):
                for name, data in ((f"k{i}.{suffix}", encode(image)), (f"k{i}.cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        source = open_source(str(tmp_path / f"{suffix}-*.tar"), "train", val_fraction=0.0)
        for i, image in enumerate(images):
            decoded, label, _ = source.load(i)
            np.testing.assert_array_equal(decoded.values, image)
            assert decoded.values.dtype == np.uint16 and label == i % 2
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": [{"bytes": tiff_bytes(a, photometric="minisblack", planarconfig="contig"), "path": None}
                      for a in images], "label": [0, 1, 0]}  # fmt: skip
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "part-0.parquet"))
    source = open_source(str(tmp_path / "*.parquet"), "train", val_fraction=0.0)
    np.testing.assert_array_equal(source.load(1)[0].values, images[1])


# ------------------------------------------------------------------------------------ the channel rules
def test_transforms_take_any_channel_count_and_rgb_stays_on_its_fast_path():
    six = Pixels(u16(40, 48, 6))
    mean, std = [0.5] * 6, [0.25] * 6
    for transform in (
        pretrain_transform(32, mean=mean, std=std, num_channels=6),
        eval_transform(32, mean=mean, std=std, num_channels=6),
    ):
        out = transform(six)
        assert out.shape == (6, 32, 32) and out.dtype == torch.float32
    # eval: the center crop of a resize of what the model takes, normalised per channel
    assert torch.allclose(eval_transform(40, mean=mean, std=std, num_channels=6, crop_pct=1.0)(six)[:, :, 4:44].mean(),
                          torch.tensor(0.0), atol=0.1)  # fmt: skip
    rgb = Image.fromarray(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    assert to_model_pixels(rgb, 3) is rgb  # 8-bit RGB is passed on untouched, as before
    assert to_model_pixels(Pixels(np.asarray(rgb)), 3).mode == "RGB"  # an 8-bit RGB array joins it


def test_channel_rules():
    grey16 = Pixels(u16(4, 4, 1))
    assert to_model_pixels(grey16, 3).shape == (3, 4, 4)  # grey as grey RGB for an RGB model
    with pytest.raises(ChannelMismatch, match="has 6 channel.*model.num_channels=3"):
        to_model_pixels(Pixels(u16(4, 4, 6)), 3, name="x.tif")
    with pytest.raises(ChannelMismatch, match="has 3 channel"):
        to_model_pixels(Image.new("RGB", (4, 4)), 1)
    # a 16-bit RGBA PNG is composited onto white for an RGB model, as 8-bit RGBA is
    rgba = np.zeros((2, 2, 4), np.uint16)  # transparent black
    assert torch.allclose(to_model_pixels(Pixels(rgba, alpha=True), 3), torch.ones(3, 2, 2))
    nan = np.ones((2, 2, 1), np.float32)
    nan[0, 0] = np.nan
    with pytest.raises(NonFinitePixels, match="x.npy has NaN"):
        to_model_pixels(Pixels(nan), 1, name="x.npy")


def test_display_bands_choose_what_shows_as_rgb():
    assert (
        display_bands(1) == [0, 0, 0]
        and display_bands(6) == [0, 1, 2]
        and display_bands(6, [3, 2, 1]) == [3, 2, 1]
    )
    with pytest.raises(
        ValueError, match=r"display bands \[6, 2, 1\]: expected 1 or 3 channel indices in \[0, 5\]"
    ):
        display_bands(6, [6, 2, 1])
    x = torch.zeros(1, 6, 16, 16)
    x[:, 3] = 1.0  # band 3 bright: shown as red with bands 3,2,1
    grid = reconstruction_grid(x, x, torch.zeros(1, 4, dtype=torch.bool), patch_size=8, mean=[0.5] * 6,
                               std=[0.5] * 6, bands=[3, 2, 1], padding=0)  # fmt: skip
    assert grid.shape == (3, 16, 64) and grid[0].min() == 1.0 and grid[1].max() == 0.5


# ------------------------------------------------------------------------ statistics and bad input
def write_folder(root, arrays, suffix=".tif"):
    """Arrays as an ImageFolder of two classes; TIFF via tifffile, PNG via PIL (16-bit grey)."""
    for i, array in enumerate(arrays):
        path = root / ("a" if i % 2 else "b") / f"{i}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".tif":
            path.write_bytes(tiff_bytes(array, photometric="minisblack", planarconfig="contig"))
        else:
            Image.fromarray(array[:, :, 0]).save(path)
    return root


def test_dataset_statistics_equal_numpy_over_the_whole_set(tmp_path, capsys, monkeypatch):
    arrays = [u16(6 + i, 9, 4) for i in range(5)]  # images of different sizes: a pixel-weighted mean
    root = write_folder(tmp_path / "data", arrays)
    (root / "a" / "broken.tif").write_bytes(b"II*\x00 not a tiff")  # skipped and counted
    stats = channel_statistics(
        open_source(str(root), "train", val_fraction=0.0), 4, samples=None, progress=False
    )
    every = np.concatenate([a.reshape(-1, 4) for a in arrays]).astype(np.float64) / 65535
    np.testing.assert_allclose(
        stats.mean, every.mean(0), rtol=1e-6
    )  # float32 pixels, as the model takes them
    np.testing.assert_allclose(stats.std, every.std(0), rtol=1e-6)
    np.testing.assert_allclose(stats.min, every.min(0), rtol=1e-6)
    np.testing.assert_allclose(stats.max, every.max(0), rtol=1e-6)
    assert (stats.images, stats.skipped, stats.pixels) == (5, 1, len(every))
    # the script prints and writes the same, and data.stats reads it back
    out = tmp_path / "stats.json"
    argv = ["dataset_stats.py", str(root), "--channels", "4", "--samples", "all", "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_code:
        runpy.run_path(str(ROOT / "scripts" / "dataset_stats.py"), run_name="__main__")
    assert exit_code.value.code == 0
    assert json.loads(capsys.readouterr().out)["mean"] == list(stats.mean)
    assert DatasetStatistics.read(out).std == stats.std


def test_bad_input_is_refused_in_one_line_or_skipped_and_counted(tmp_path, caplog):
    root = write_folder(tmp_path / "six", [u16(8, 8, 6) for _ in range(2)])
    source = open_source(str(root), "train", val_fraction=0.0)
    with pytest.raises(
        ValueError, match=r"data.path='.*six'.*has 6 channel\(s\) and model.num_channels=3"
    ) as error:
        check_channels(source, 3, None, str(root))
    assert "\n" not in str(error.value)
    check_channels(source, 6, None, str(root))
    constant = write_folder(tmp_path / "flat", [np.full((4, 4, 2), 7, np.uint16) for _ in range(2)])
    with pytest.raises(ValueError, match=r"channel\(s\) \[0, 1\] are constant \(std 0\)"):
        channel_statistics(open_source(str(constant), "train", val_fraction=0.0), 2, progress=False)
    with caplog.at_level(logging.WARNING, logger="simmim.data"):
        assert decode_image(b"II*\x00garbage", "shard-3:k7.tif") is None
    assert "shard-3:k7.tif" in caplog.text
    with pytest.raises(
        ValueError, match=r"data.normalize='imagenet': must be dataset or explicit for model.num_channels=6"
    ):
        load_config(
            PretrainConfig, overrides=["output_dir=x", "model.num_channels=6", "data.normalize=imagenet"]
        )
    cfg = load_config(PretrainConfig, overrides=["output_dir=x", "model.num_channels=6"])
    assert cfg.data.normalize == "dataset" and cfg.data.mean is None  # no ImageNet default for 6 bands


def test_make_shards_keeps_bands_and_bits(tmp_path, monkeypatch, capsys):
    """A folder of 6-band 16-bit TIFFs becomes shards of those files; a mixed folder (a TIFF and a 16-bit
    PNG) is re-encoded as TIFF, every value kept."""
    arrays = [u16(8, 8, 6) for _ in range(3)]
    same = write_folder(tmp_path / "same", arrays)
    mixed = write_folder(tmp_path / "mixed", [u16(8, 8, 1) for _ in range(2)], suffix=".png")
    (mixed / "a" / "extra.tif").write_bytes(tiff_bytes(u16(8, 8, 1)[:, :, 0], photometric="minisblack"))
    for folder in (same, mixed):
        out = tmp_path / f"{folder.name}_shards"
        monkeypatch.setattr("sys.argv", ["make_shards.py", str(folder), str(out), "--val-fraction", "0"])
        with pytest.raises(SystemExit) as exit_code:
            runpy.run_path(str(ROOT / "scripts" / "make_shards.py"), run_name="__main__")
        assert exit_code.value.code == 0, capsys.readouterr().err
        shards = open_source(str(out / "train-*.tar"), "train", val_fraction=0.0)
        originals = open_source(str(folder), "train", val_fraction=0.0)
        for i in range(len(originals)):
            np.testing.assert_array_equal(
                shards.load(i)[0].values, decode_image(originals.load(i)[2], "x").values
            )


def test_a_mixed_channel_dataset_skips_and_counts_the_odd_images(tmp_path, caplog):
    from simmim.data import LabeledImageDataset

    root = write_folder(tmp_path / "mixed", [u16(8, 8, 6), u16(8, 8, 3), u16(8, 8, 6)])
    dataset = LabeledImageDataset(
        open_source(str(root), "train", val_fraction=0.0),
        eval_transform(8, mean=[0.5] * 6, std=[0.2] * 6, num_channels=6),
    )
    with caplog.at_level(logging.WARNING, logger="simmim.data"):
        items = [dataset[i] for i in range(len(dataset))]
    assert (
        sum(item is None for item in items) == 1
        and "has 3 channel(s) and model.num_channels=6" in caplog.text
    )


def test_colour_spaces_and_alpha_in_any_bit_depth():
    """A palette's colours (not its indices), YCbCr converted, 16-bit grey with alpha composited as 8-bit is."""
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50])
    for max_value in (None, 255):  # max_value takes the array path: the colours must be the same
        rgb = as_chw(to_model_pixels(palette, 3, max_value))
        np.testing.assert_allclose(rgb[:, 0, 0], np.array([200, 100, 50]) / 255, rtol=1e-6)
    with pytest.raises(ChannelMismatch):  # a palette holds colours: a grey model does not take its indices
        to_model_pixels(palette, 1, 255)
    ycbcr = Image.new("RGB", (2, 2), (10, 200, 30)).convert("YCbCr")
    np.testing.assert_allclose(
        as_chw(to_model_pixels(ycbcr, 3, 255))[:, 0, 0], np.array([10, 200, 30]) / 255, atol=0.02
    )
    la16 = np.zeros((2, 2, 2), np.uint16)
    la16[..., 0], la16[..., 1] = 65535, 32768  # white at half opacity over white
    pixels = to_model_pixels(Pixels(la16, alpha=True), 3, max_value=4095)  # alpha keeps its own 16-bit range
    expected = 65535 / 4095 * (32768 / 65535) + (1 - 32768 / 65535)
    assert pixels.shape == (3, 2, 2) and torch.allclose(pixels, torch.full((3, 2, 2), expected))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_taken_as_a_band_keeps_the_other_bands_through_every_resize(mode, tmp_path):
    """A 4-band (2-band) model reads RGBA (LA) as data: resizing must not multiply the other bands by the
    last, as PIL's resize does. One colour everywhere under a random last band: the colour stays exact."""
    bands = len(mode)
    values = np.empty((6, 10, bands), np.uint8)
    values[..., :-1] = np.array([200, 100, 50][: bands - 1], np.uint8)
    values[..., -1] = RNG.integers(0, 4, (6, 10), dtype=np.uint8)  # near-transparent, zeros included
    image = Image.fromarray(values, mode)
    mean, std = [0.0] * bands, [1.0] * bands
    colour = torch.tensor([200, 100, 50][: bands - 1], dtype=torch.float32)[:, None, None] / 255
    outputs = [
        transform(image)
        for transform in (
            pretrain_transform(16, mean=mean, std=std, num_channels=bands),
            eval_transform(16, mean=mean, std=std, num_channels=bands),
            finetune_transform(16, rand_augment=False, random_erasing=0, mean=mean, std=std, num_channels=bands),
        )
    ]
    processor = eval_image_processor(16, mean, std)
    outputs.append(processor(image)["pixel_values"][0])
    for out in outputs:
        assert out.shape == (bands, 16, 16)
        torch.testing.assert_close(out[:-1], colour.expand(bands - 1, 16, 16), atol=1e-6, rtol=0)
        assert out[-1].max() <= 3 / 255 + 1e-6  # the last band is resized as the others, not composited
    # the evaluation transform and the image processor still give the same pixels
    torch.testing.assert_close(outputs[1], outputs[3], atol=1e-6, rtol=0)
    # the dataset's statistics see the bands in [0, 1], as the model does
    for i in range(2):
        path = tmp_path / "data" / "ab"[i] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    stats = channel_statistics(open_source(str(tmp_path / "data"), "train", val_fraction=0.0), bands,
                               samples=None, progress=False)  # fmt: skip
    every = values.reshape(-1, bands).astype(np.float64) / 255
    np.testing.assert_allclose(stats.mean, every.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.std, every.std(0), rtol=1e-6, atol=1e-9)


def test_rand_augment_fills_float_images_in_their_scale():
    transform = finetune_transform(32, random_erasing=0, mean=[0, 0, 0], std=[1, 1, 1], scale=(1.0, 1.0))
    peak = 0.0
    for seed in range(40):
        torch.manual_seed(seed)
        peak = max(peak, transform(Pixels(u16(32, 32, 3))).max().item())
    assert (
        peak < 1.5
    )  # bicubic overshoot at most, never the 8-bit fill colour (124) pasted into [0, 1] pixels


def test_statistics_kept_by_a_run_are_reused_only_for_its_settings(tmp_path):
    first = write_folder(tmp_path / "a", [u16(6, 6, 2) for _ in range(3)])
    other = open_source(
        str(write_folder(tmp_path / "b", [u16(6, 6, 2) for _ in range(3)])), "train", val_fraction=0.0
    )
    kept = tmp_path / "run" / "dataset_stats.json"

    def cfg(seed: int = 0):
        overrides = ["output_dir=x", "model.num_channels=2", f"data.path={first}", f"seed={seed}"]
        return load_config(PretrainConfig, overrides=overrides)

    computed, _ = with_dataset_statistics(
        cfg(), open_source(str(first), "train", val_fraction=0.0), kept, write=True
    )
    resumed, line = with_dataset_statistics(cfg(), other, kept, write=True)  # a restart reads the kept file
    assert resumed.data.mean == computed.data.mean and str(kept) in line
    reseeded, _ = with_dataset_statistics(cfg(seed=1), other, kept, write=False)  # another run's settings
    assert reseeded.data.mean != computed.data.mean
    with pytest.raises(
        ValueError, match=r"data.display_bands=\(6,\): must be 1 or 3 channel indices in \[0, 1\]"
    ):
        load_config(
            PretrainConfig, overrides=["output_dir=x", "model.num_channels=2", "data.display_bands=[6]"]
        )


def test_make_shards_converts_colour_spaces_and_refuses_what_png_cannot_keep(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mixed" / "a"
    folder.mkdir(parents=True)
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(folder / "0.jpg")  # white, stored as inks
    Image.new("RGB", (8, 8), (5, 6, 7)).save(folder / "1.png")
    out = tmp_path / "shards"

    def make_shards(src) -> int:
        monkeypatch.setattr("sys.argv", ["make_shards.py", str(src), str(out), "--val-fraction", "0"])
        with pytest.raises(SystemExit) as exit_code:
            runpy.run_path(str(ROOT / "scripts" / "make_shards.py"), run_name="__main__")
        return exit_code.value.code

    assert make_shards(folder.parent) == 0
    assert open_source(str(out / "train-*.tar"), "train", val_fraction=0.0).load(0)[0].getpixel((0, 0)) == (
        255,
        255,
        255,
    )
    (folder / "2.tif").write_bytes(tiff_bytes(u16(8, 8, 6), photometric="minisblack", planarconfig="contig"))
    assert make_shards(folder.parent) == 2
    assert "2.tif: 6 channel(s) of uint16, which PNG cannot keep" in capsys.readouterr().err
