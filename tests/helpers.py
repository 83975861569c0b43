"""Helpers shared by the test files: random weights for oracle comparisons, and running the scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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


def run_script(script: str, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `scripts/<script>` as a user would; returns the completed process with its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
