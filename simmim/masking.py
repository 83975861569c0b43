"""Block-wise random masking for SimMIM (Xie et al., 2022, https://arxiv.org/abs/2111.09886).

The image is cut into mask blocks of `mask_patch_size` pixels; a fixed number of blocks is masked and each
masked block covers `(mask_patch_size / model_patch_size)**2` model patches. Same defaults and semantics as
SimMIM's `MaskGenerator` and Transformers' `run_mim.py`, but batched and driven by a `torch.Generator`.
"""

from __future__ import annotations

import math

import torch


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class MaskGenerator:
    """Draws SimMIM block-wise masks over the model's patch grid.

    Args:
        input_size: image size in pixels, an int or `(height, width)`.
        mask_patch_size: side of a mask block in pixels.
        model_patch_size: side of a model patch in pixels (the ViT's patch size).
        mask_ratio: fraction of mask blocks to mask, in (0, 1); exactly `ceil(mask_ratio * num_blocks)` are.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        height, width = _pair(input_size)
        if mask_patch_size <= 0 or model_patch_size <= 0:
            raise ValueError(
                f"mask_patch_size ({mask_patch_size}) and model_patch_size ({model_patch_size}) must be positive"
            )
        if height % mask_patch_size or width % mask_patch_size:
            raise ValueError(
                f"input size {(height, width)} is not divisible by mask_patch_size {mask_patch_size}"
            )
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size {mask_patch_size} is not a multiple of model_patch_size {model_patch_size}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {mask_ratio} is outside (0, 1)")
        self.input_size = (height, width)
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio

        self.block_grid = (height // mask_patch_size, width // mask_patch_size)  # (gh, gw) mask blocks
        self.scale = mask_patch_size // model_patch_size  # model patches per block side
        self.num_blocks = self.block_grid[0] * self.block_grid[1]
        # round() first so that e.g. 0.7 * 10 = 7.000000000000001 masks 7 blocks, not 8
        self.num_masked_blocks = math.ceil(round(mask_ratio * self.num_blocks, 9))
        self.patch_grid = (height // model_patch_size, width // model_patch_size)
        self.num_patches = self.patch_grid[0] * self.patch_grid[1]

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )

    def __call__(self, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """One mask: a bool tensor of shape (num_patches,), True = masked, patches in row-major order."""
        return self.sample(1, generator)[0]

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A batch of independent masks, shape (B, num_patches) bool, drawn without a loop over samples.

        Args:
            batch_size: B.
            generator: a `torch.Generator` or an int seed; None uses the global RNG of `device`.
            device: where the result lives; with a generator, the noise is drawn on the generator's device
                (so results do not depend on `device`) and moved.
        """
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        noise_device = generator.device if generator is not None else device
        gh, gw = self.block_grid
        noise = torch.rand(
            batch_size, self.num_blocks, generator=generator, device=noise_device
        )  # (B, gh*gw)
        # the k blocks with the smallest noise are masked: a uniformly random k-subset per row
        masked = noise.argsort(dim=1)[:, : self.num_masked_blocks]  # (B, k)
        blocks = torch.zeros_like(noise, dtype=torch.bool).scatter_(1, masked, True)  # (B, gh*gw)
        patches = (
            blocks.view(batch_size, gh, gw)
            .repeat_interleave(self.scale, dim=1)
            .repeat_interleave(self.scale, dim=2)
        )  # (B, H/p, W/p)
        return patches.flatten(1).to(device)  # (B, N)
