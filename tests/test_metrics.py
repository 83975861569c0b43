"""Reconstruction metrics on 4x4 images with patch 2, against values worked out by hand."""

import math

import pytest
import torch

from simmim.evaluation.metrics import (
    PSNR_CAP,
    masked_l1,
    mean_fill_baseline,
    patch_mask_to_pixels,
    reconstruction_metrics,
)

# 2x2 patch grid, row-major: top-left and bottom-right patches masked.
DIAGONAL = torch.tensor([[True, False, False, True]])


def blocks(tl, tr, bl, br):
    """(1, 1, 4, 4) image made of four constant 2x2 blocks."""
    top = torch.tensor([[tl, tl, tr, tr]] * 2, dtype=torch.float32)
    bottom = torch.tensor([[bl, bl, br, br]] * 2, dtype=torch.float32)
    return torch.cat([top, bottom]).view(1, 1, 4, 4)


def test_patch_mask_to_pixels_is_row_major():
    assert torch.equal(patch_mask_to_pixels(DIAGONAL, 2, 4, 4), blocks(1, 0, 0, 1))
    assert torch.equal(
        patch_mask_to_pixels(torch.tensor([[True, True, False, False]]), 2, 4, 4), blocks(1, 1, 0, 0)
    )
    # 4x6 image: a 2x3 grid; patch 2 is row 0, column 2
    mask = patch_mask_to_pixels(torch.tensor([[False, False, True, False, False, False]]), 2, 4, 6)
    expected = torch.zeros(1, 1, 4, 6)
    expected[..., 0:2, 4:6] = 1
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError):
        patch_mask_to_pixels(DIAGONAL, 2, 8, 8)


def test_masked_l1_per_image():
    x = torch.zeros(2, 1, 4, 4)
    r = torch.cat([blocks(1, 5, 5, 3), blocks(2, 0, 0, 0)])
    mask = patch_mask_to_pixels(DIAGONAL.repeat(2, 1), 2, 4, 4)
    # image 0: (4 * 1 + 4 * 3) / 8 = 2; image 1: 4 * 2 / 8 = 1 (the eps 1e-5 in the count aside)
    assert masked_l1(x, r, mask).tolist() == pytest.approx([16 / (8 + 1e-5), 8 / (8 + 1e-5)])


def test_reconstruction_metrics_by_hand():
    # One channel, mean 0.5, std 0.25: normalised 0 is pixel 0.5, and a normalised error d is 0.25 * d.
    x = torch.zeros(1, 1, 4, 4)
    r = blocks(1.0, 0.4, 0.0, -4.0)  # masked: top-left, bottom-right; visible: top-right, bottom-left
    m = reconstruction_metrics(x, r, DIAGONAL, patch_size=2, mean=[0.5], std=[0.25])
    # normalised space: masked |d| = 1 and 4 on 4 pixels each; visible 0.4 and 0
    assert m["masked_l1"].item() == pytest.approx(20 / 8, rel=1e-5)
    assert m["visible_l1"].item() == pytest.approx(1.6 / 8, rel=1e-5)
    # pixel space: top-left 0.5 vs 0.75; bottom-right 0.5 vs -0.5, clamped to 0
    mse = (4 * 0.25**2 + 4 * 0.5**2) / 8
    assert m["masked_mse"].item() == pytest.approx(mse)
    assert m["masked_psnr"].item() == pytest.approx(10 * math.log10(1 / mse))  # 8.06 dB
    # visible: top-right 0.5 vs 0.6, bottom-left exact -> mse 0.005, 23.01 dB
    assert m["visible_psnr"].item() == pytest.approx(10 * math.log10(1 / 0.005), rel=1e-5)
    assert all(v.shape == (1,) for v in m.values())


def test_per_channel_unnormalisation():
    # three channels with std 0.1, 0.2, 0.5: a normalised error of 1 on the masked patches is 0.1, 0.2, 0.5
    x = torch.zeros(1, 3, 4, 4)
    r = blocks(1.0, 0.0, 0.0, 1.0).repeat(1, 3, 1, 1)
    m = reconstruction_metrics(x, r, DIAGONAL, patch_size=2, mean=[0.5, 0.5, 0.5], std=[0.1, 0.2, 0.5])
    assert m["masked_l1"].item() == pytest.approx(1.0, rel=1e-5)
    assert m["masked_mse"].item() == pytest.approx((0.01 + 0.04 + 0.25) / 3)  # 0.1 -> PSNR 10 dB
    assert m["masked_psnr"].item() == pytest.approx(10.0, rel=1e-5)
    assert m["visible_l1"].item() == 0.0
    assert m["visible_psnr"].item() == PSNR_CAP


def test_perfect_reconstruction_and_empty_regions():
    x = torch.randn(3, 3, 4, 4)
    masks = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])
    m = reconstruction_metrics(x, x.clone(), masks, patch_size=2, mean=[0.4] * 3, std=[0.2] * 3)
    assert m["masked_l1"][0].item() == 0.0 and m["masked_psnr"][0].item() == PSNR_CAP
    assert m["masked_mse"][0].item() == 0.0 and m["visible_psnr"][0].item() == PSNR_CAP
    # image 1 has nothing masked, image 2 nothing visible
    for key in ("masked_l1", "masked_mse", "masked_psnr"):
        assert math.isnan(m[key][1].item()) and not math.isnan(m[key][2].item()), key
    for key in ("visible_l1", "visible_psnr"):
        assert math.isnan(m[key][2].item()) and not math.isnan(m[key][1].item()), key


def test_mean_fill_baseline_by_hand():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    x = torch.cat([x, -x], dim=1)  # (1, 2, 4, 4)
    filled = mean_fill_baseline(x, DIAGONAL, 2)
    # visible: top-right 2, 3, 6, 7 and bottom-left 8, 9, 12, 13 -> mean 60 / 8 = 7.5
    expected = x.clone()
    for c, colour in enumerate([7.5, -7.5]):
        expected[0, c, 0:2, 0:2] = colour
        expected[0, c, 2:4, 2:4] = colour
    assert torch.equal(filled, expected)
    # nothing visible: the dataset mean, 0 in the normalised space
    assert torch.equal(mean_fill_baseline(x, torch.ones(1, 4, dtype=torch.bool), 2), torch.zeros_like(x))
