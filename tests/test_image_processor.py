"""DeiTImageProcessor against Transformers' PIL processor (the reference pipeline: PIL bicubic resize, center
crop, rescale, normalise) and its torchvision one, plus a hand-worked example, the config file, and the
exported evaluation processor against the validation transform."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from simmim.data import eval_transform
from simmim.models import DeiTImageProcessor
from simmim.models.image_processor import eval_image_processor, eval_resize_size

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CUSTOM = dict(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, size=72, crop_size=64)
CUSTOM_HF = dict(
    image_mean=IMAGENET_MEAN,
    image_std=IMAGENET_STD,
    size={"height": 72, "width": 72},
    crop_size={"height": 64, "width": 64},
)


def random_rgb(height: int = 280, width: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(params=["default", "custom"])
def processors(request):
    """(ours, Transformers' PIL processor, Transformers' torchvision processor, std) with the same settings."""
    transformers = pytest.importorskip("transformers")
    ours_kw, hf_kw = ({}, {}) if request.param == "default" else (CUSTOM, CUSTOM_HF)
    std = min(DeiTImageProcessor(**ours_kw).image_std)
    return (
        DeiTImageProcessor(**ours_kw),
        transformers.DeiTImageProcessorPil(**hf_kw),
        transformers.DeiTImageProcessor(**hf_kw),
        std,
    )


def hf(processor, images) -> torch.Tensor:
    return processor(images, return_tensors="pt")["pixel_values"]


def test_pil_images_match_transformers_pil_processor(processors):
    ours, pil, _, _ = processors
    image = PIL.Image.fromarray(random_rgb())
    expected = hf(pil, image)
    assert expected.shape[-2:] == (ours.crop_size["height"], ours.crop_size["width"])
    assert max_diff(ours(image)["pixel_values"], expected) <= 1e-4
    batch = [image, PIL.Image.fromarray(random_rgb(301, 257, seed=1))]
    assert max_diff(ours(batch)["pixel_values"], hf(pil, batch)) <= 1e-4


def test_grayscale_image_becomes_three_equal_channels(processors):
    """Transformers' processors reject an L-mode image with 3-channel statistics; the oracle is the same
    image converted to RGB (gray replicated), which the PIL resize treats channel by channel."""
    ours, pil, _, _ = processors
    gray = PIL.Image.fromarray(random_rgb()[..., 0])
    assert gray.mode == "L"
    out = ours(gray)["pixel_values"]
    assert out.shape[1] == 3
    assert max_diff(out, hf(pil, gray.convert("RGB"))) <= 1e-4


def test_arrays_and_tensors_match_transformers(processors):
    """numpy HWC and torch CHW uint8 inputs are resized by torchvision's tensor bicubic (antialiased), as in
    Transformers' default (torchvision) processor: equal to it, and within two grey levels of the PIL
    pipeline (the two bicubic kernels round differently: |diff| <= 2/255/std after normalisation)."""
    ours, pil, torchvision_processor, std = processors
    array = random_rgb()
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (C, H, W)
    reference = hf(pil, PIL.Image.fromarray(array))
    for image in (array, tensor):
        out = ours(image)["pixel_values"]
        assert max_diff(out, hf(torchvision_processor, image)) <= 1e-4
        assert max_diff(out, reference) <= 2 / 255 / std + 1e-6
    batch = torch.stack([tensor, tensor.flip(-1)])  # (B, C, H, W)
    assert max_diff(ours(batch)["pixel_values"], hf(torchvision_processor, list(batch))) <= 1e-4


def test_hand_worked_example_without_resize():
    """A 4x6 image cropped to its central 2x2, rescaled and normalised by hand; as a (4, 6, 3) array (four
    rows, not four channels) and as a (3, 4, 6) tensor."""
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3  # values 0..213
    processor = DeiTImageProcessor(
        do_resize=False, crop_size=2, image_mean=[0.5, 0.4, 0.3], image_std=[0.5, 0.2, 0.1]
    )
    center = image[1:3, 2:4].astype(np.float64) / 255  # rows 1-2, columns 2-3: the central 2x2
    expected = ((center - [0.5, 0.4, 0.3]) / [0.5, 0.2, 0.1]).transpose(2, 0, 1)  # (C, 2, 2)
    for form in (image, torch.from_numpy(image).permute(2, 0, 1)):
        out = processor(form)["pixel_values"]
        assert out.shape == (1, 3, 2, 2)
        np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_call_overrides_and_bad_arguments():
    image = PIL.Image.fromarray(random_rgb())
    processor = DeiTImageProcessor(size=40, crop_size=32)
    assert processor(image, do_center_crop=False)["pixel_values"].shape == (1, 3, 40, 40)
    assert processor.size == {"height": 40, "width": 40}  # the override was for that call only
    with pytest.raises(ValueError, match="unknown"):
        processor(image, do_flip=True)
    with pytest.raises(ValueError, match="return_tensors"):
        processor(image, return_tensors="np")
    with pytest.raises(ValueError, match="resample"):
        DeiTImageProcessor(resample=9)
    with pytest.raises(ValueError, match="shortest_edge"):
        DeiTImageProcessor(crop_size={"shortest_edge": 256})  # a crop has both sides
    with pytest.raises(ValueError, match="longest_edge"):
        DeiTImageProcessor(size={"longest_edge": 256})


def test_config_round_trip_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = DeiTImageProcessor(**CUSTOM, resample=2)
    ours.save_pretrained(tmp_path / "ours")
    back = DeiTImageProcessor.from_pretrained(tmp_path / "ours")
    assert back.to_dict() == ours.to_dict()
    saved = json.loads((tmp_path / "ours" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "DeiTImageProcessor"

    theirs = transformers.DeiTImageProcessorPil.from_pretrained(tmp_path / "ours")
    for key in (
        "do_resize",
        "size",
        "resample",
        "do_center_crop",
        "crop_size",
        "rescale_factor",
        "do_normalize",
    ):
        assert theirs.to_dict()[key] == ours.to_dict()[key], key
    assert list(theirs.image_mean) == IMAGENET_MEAN and list(theirs.image_std) == IMAGENET_STD
    image = PIL.Image.fromarray(random_rgb())
    assert max_diff(back(image)["pixel_values"], hf(theirs, image)) <= 1e-4

    transformers.DeiTImageProcessorPil(**CUSTOM_HF, do_center_crop=False).save_pretrained(tmp_path / "theirs")
    ours = DeiTImageProcessor.from_pretrained(tmp_path / "theirs")
    assert ours.do_center_crop is False and ours.size == {"height": 72, "width": 72}
    assert ours.image_mean == IMAGENET_MEAN and ours.image_std == IMAGENET_STD


# ---------------------------------------------------------------------------------------------- evaluation
EVAL_SIZES = [32, 48, 64, 96, 160, 224, 384]


def test_eval_resize_size_is_timms_floor_rule():
    # floor(size / (224 / 256)) by hand: 36.57, 54.86, 73.14, 109.71, 182.86, 256, 438.86
    assert [eval_resize_size(s) for s in EVAL_SIZES] == [36, 54, 73, 109, 182, 256, 438]
    assert eval_resize_size(32, crop_pct=1.0) == 32
    assert eval_resize_size(14, crop_pct=0.28) == 50  # 14 / 0.28 is 49.99999999999999 in floating point


def test_shortest_edge_keeps_the_aspect_ratio():
    """{"shortest_edge": 40}: a 60x100 image becomes 40 x int(40 * 100 / 60) = 40x66, a 100x60 one 66x40."""
    processor = DeiTImageProcessor(size={"shortest_edge": 40}, do_center_crop=False)
    assert processor(PIL.Image.fromarray(random_rgb(60, 100)))["pixel_values"].shape == (1, 3, 40, 66)
    assert processor(torch.zeros(3, 100, 60, dtype=torch.uint8))["pixel_values"].shape == (1, 3, 66, 40)


@pytest.mark.parametrize("image_size", [*EVAL_SIZES, (48, 32)])
def test_exported_processor_gives_the_validation_pixels(image_size, tmp_path):
    """What predict.py sees is what validation saw: the saved and reloaded evaluation processor and
    `eval_transform` give identical float32 pixels on non-square images, landscape and portrait, reduced
    or enlarged, with odd sides."""
    eval_image_processor(image_size, IMAGENET_MEAN, IMAGENET_STD).save_pretrained(tmp_path)
    processor = DeiTImageProcessor.from_pretrained(tmp_path)
    transform = eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    crop = (image_size, image_size) if isinstance(image_size, int) else image_size
    for seed, (height, width) in enumerate([(280, 300), (517, 389), (crop[0] + 3, 2 * crop[1] + 1)]):
        image = PIL.Image.fromarray(random_rgb(height, width, seed))
        expected = transform(image)
        assert expected.shape == (3, *crop)
        assert torch.equal(processor(image)["pixel_values"][0], expected), (height, width)


@pytest.mark.parametrize("image_size", EVAL_SIZES)
def test_transformers_reads_the_exported_processor_as_validation_does(image_size, tmp_path):
    """Transformers (v5: `size={"shortest_edge": N}` is its DeiT processor's own format) loading our export
    gives the validation pixels on square images, but for its own rounding of the resized 8-bit image: at
    most two intensity levels, on under 2% of the values. (On non-square images its center crop can also sit one
    pixel off ours: it floors the offset, torchvision rounds half to even.)"""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("Transformers 4's DeiT processor resizes to an exact height and width only")
    eval_image_processor(image_size, IMAGENET_MEAN, IMAGENET_STD).save_pretrained(tmp_path)
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    transform = eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for seed, side in enumerate([300, 517, image_size + 1]):
        image = PIL.Image.fromarray(random_rgb(side, side, seed))
        pixels, expected = theirs(image, return_tensors="pt")["pixel_values"][0], transform(image)
        level = 1 / 255 / min(IMAGENET_STD)  # one 8-bit intensity level after normalisation
        torch.testing.assert_close(pixels, expected, rtol=0, atol=2.01 * level)
        assert ((pixels - expected).abs() > 1e-5).float().mean() < 0.02
