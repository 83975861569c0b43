"""Which autocast precision a run uses (`train.precision`), and why.

"auto", the default, is the fastest correct choice for the machine: bf16 autocast where the hardware does
bf16 well (a CUDA device with bf16; a CPU with AMX or avx512_bf16, where oneDNN runs bf16 matmuls about twice
as fast as fp32), fp32 elsewhere (emulated bf16 is slower than fp32). `accelerate launch --mixed_precision
bf16|fp16` is followed. "fp32", "bf16" and "fp16" force it (fp16 with accelerate's gradient scaler on CUDA);
"launcher" takes accelerate launch's --mixed_precision as it is (fp32 without). Losses are computed in
float32 whatever the choice (`simmim.models.losses`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def bf16_hardware() -> tuple[bool, str]:
    """(whether this machine's device runs bf16 fast, the reason in words)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return True, f"CUDA device {name} supports bf16"
        return False, f"CUDA device {name} has no bf16"
    found = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, "the CPU has neither AMX nor avx512_bf16 (bf16 would be emulated, slower than fp32)"


def choose_precision(precision: str) -> tuple[str, str]:
    """`train.precision` -> (accelerate's mixed_precision: "no", "bf16" or "fp16"; why)."""
    if precision in ("fp32", "bf16", "fp16"):
        return ("no" if precision == "fp32" else precision), f"train.precision={precision}"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision == "launcher":
        return (launcher or "no"), f"accelerate launch --mixed_precision {launcher or 'no'}"
    if precision != "auto":
        raise ValueError(
            f'train.precision={precision!r}: expected "auto", "launcher", "fp32", "bf16" or "fp16"'
        )
    if launcher in ("bf16", "fp16"):
        return launcher, f"train.precision=auto, and accelerate launch asked for --mixed_precision {launcher}"
    fast, why = bf16_hardware()
    return ("bf16" if fast else "no"), f"train.precision=auto: {why}"
