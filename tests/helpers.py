"""Helpers shared by the test files: random weights for oracle comparisons, and running the scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# The suite's tiny DeiT: 32 px images of 8-px patches (a 4 x 4 grid), 2 blocks 32 wide with 4 heads.
TINY_ARCH = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)


def tiny_config(**overrides):
    """The tiny DeiT's DeiTConfig (5 labels), with `overrides`."""
    from simmim.models import DeiTConfig

    return DeiTConfig(**{**TINY_ARCH, "encoder_stride": 8, "num_labels": 5, **overrides})


# ... as `model.key=value` overrides of scripts/pretrain.py and scripts/finetune.py.
TINY_MODEL = [f"model.{k}={v}" for k, v in TINY_ARCH.items()]


def tiny_data(synthetic_size: int = 128, batch_size: int = 16) -> list[str]:
    """`data.` overrides for the built-in synthetic images, read in the main process (no workers)."""
    return [
        "data.path=synthetic",
        f"data.synthetic_size={synthetic_size}",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
    ]


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random, tokens and position embeddings included (zeros would hide their misuse)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def max_diff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        return max(max_diff(x, y) for x, y in zip(a, b))
    return (a - b).abs().max().item()


def script_env() -> dict[str, str]:
    # One thread per run: the suite's subprocesses share a 2-core machine and stay deterministic.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def pinned_precision(script: str, args: list[str]) -> list[str]:
    """Training scripts run in fp32 unless a test asks for another precision: the suite's tolerances are
    fp32's, and the default (train.precision=auto) picks bf16 on some machines and fp32 on others."""
    training = script in ("pretrain.py", "finetune.py") and "--help" not in args
    if training and not any(a.startswith("train.precision=") for a in args):
        return [*args, "train.precision=fp32"]
    return args


def run_script(script: str, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `scripts/<script>` as a user would (in fp32, see `pinned_precision`); returns the completed
    process with its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *pinned_precision(script, args)],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
