"""Tests for the SimMIM block-wise mask generator."""

import math

import numpy as np
import pytest
import torch

from simmim.masking import MaskGenerator


def _blocks_of(mask: torch.Tensor, gen: MaskGenerator) -> np.ndarray:
    """The (gh, gw) block mask that a patch mask is made of, read from each block's top-left patch."""
    grid = mask.reshape(gen.patch_grid).numpy()
    return grid[:: gen.scale, :: gen.scale]


def test_defaults_match_run_mim():
    gen = MaskGenerator()
    mask = gen()
    # 192 px, 4 px patches: a 48 x 48 grid; 32 px blocks: 6 x 6 = 36, ceil(0.6 * 36) = 22 masked
    assert mask.shape == (48 * 48,)
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == 22 * (32 // 4) ** 2


@pytest.mark.parametrize(
    "input_size, mask_patch, model_patch, ratio, masked_blocks",
    [
        (192, 32, 4, 0.6, 22),  # 36 blocks, 21.6 -> 22
        ((192, 128), 32, 4, 0.6, 15),  # 6 x 4 = 24 blocks, 14.4 -> 15
        (224, 32, 16, 0.75, 37),  # 7 x 7 = 49 blocks, 36.75 -> 37
        (320, 32, 16, 0.7, 70),  # 100 blocks, 0.7 * 100 is 70.00000000000001 in floating point
        (8, 4, 2, 0.5, 2),  # 2 x 2 blocks
    ],
)
def test_block_structure_and_count(input_size, mask_patch, model_patch, ratio, masked_blocks):
    gen = MaskGenerator(input_size, mask_patch, model_patch, ratio)
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    mask = gen(generator=0)
    assert mask.shape == ((height // model_patch) * (width // model_patch),)
    blocks = _blocks_of(mask, gen)
    assert blocks.shape == (height // mask_patch, width // mask_patch)
    assert blocks.sum() == masked_blocks
    # every block is wholly masked or wholly visible: the mask is the block mask scaled up
    scale = mask_patch // model_patch
    expected = np.kron(blocks, np.ones((scale, scale), dtype=bool))
    np.testing.assert_array_equal(mask.reshape(gen.patch_grid).numpy(), expected)


def test_each_block_is_masked_at_the_ratio():
    gen = MaskGenerator(192, 32, 4, 0.6)
    masks = gen.sample(4000, generator=torch.Generator().manual_seed(0))
    frequency = masks.reshape(4000, *gen.patch_grid)[:, ::8, ::8].float().mean(0)  # (6, 6) per block
    assert torch.allclose(frequency, torch.full_like(frequency, 22 / 36), atol=0.04)


def test_reproducible_from_generator_or_seed():
    gen = MaskGenerator(96, 32, 8, 0.5)
    a = gen(torch.Generator().manual_seed(123))
    b = gen(torch.Generator().manual_seed(123))
    c = gen(123)
    assert torch.equal(a, b) and torch.equal(a, c)
    different = [gen(seed) for seed in range(10)]
    assert any(not torch.equal(a, d) for d in different)


def test_global_rng_used_without_generator():
    gen = MaskGenerator(96, 32, 8, 0.5)
    torch.manual_seed(5)
    a = gen()
    torch.manual_seed(5)
    assert torch.equal(a, gen())


def test_batched_sample():
    gen = MaskGenerator(128, 32, 8, 0.4)
    masks = gen.sample(16, generator=7)
    assert masks.shape == (16, gen.num_patches) and masks.dtype == torch.bool
    per_row = masks.sum(1)
    assert torch.all(per_row == math.ceil(0.4 * 16) * 16)
    assert len({tuple(row.tolist()) for row in masks}) > 1  # rows are independent draws
    for row in masks:
        blocks = _blocks_of(row, gen)
        np.testing.assert_array_equal(
            row.reshape(gen.patch_grid).numpy(), np.kron(blocks, np.ones((4, 4), bool))
        )
    assert torch.equal(masks, gen.sample(16, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(gen.sample(1, generator=3)[0], gen(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_sample_on_cuda():
    gen = MaskGenerator()
    masks = gen.sample(8, device="cuda")
    assert masks.device.type == "cuda" and masks.shape == (8, gen.num_patches)
    assert torch.all(masks.sum(1) == 22 * 64)
    seeded = gen.sample(8, generator=torch.Generator().manual_seed(0), device="cuda")
    assert torch.equal(seeded.cpu(), gen.sample(8, generator=0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_size=200, mask_patch_size=32), "200"),
        (dict(input_size=(192, 100), mask_patch_size=32), "100"),
        (dict(mask_patch_size=32, model_patch_size=6), "32 is not a multiple of model_patch_size 6"),
        (dict(mask_ratio=0.0), "mask_ratio 0.0"),
        (dict(mask_ratio=1.0), "mask_ratio 1.0"),
        (dict(mask_ratio=-0.5), "mask_ratio -0.5"),
        (dict(model_patch_size=0), "model_patch_size"),
    ],
)
def test_invalid_combinations_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MaskGenerator(**kwargs)
