"""Whether a run compiles its model (`train.compile`), and why; inductor's cache kept with the run.

"auto", the default, compiles only where torch.compile was measured to win and the run is long enough to
repay the compile (docs/performance.md):
- a CPU under bf16 autocast (avx512_bf16 or AMX): 1.17x and 1.20x the eager step (DeiT-Ti/16 on an AMD EPYC
  with avx512_bf16), where non-matmul operators, which inductor fuses, were about 40% of the step; the cold
  compile took 58 s. The CPU study's model (6 blocks, 64 px, batch 64) gains less: 1.03-1.08x on a bf16
  step of about 0.31 s in three runs, 0.009-0.023 s a step, for a cold compile of 15-60 s. That repays
  itself after 650 to 6,400 steps, about 2,700 at the middle figures (1.05x, 40 s), hence
  COMPILE_MIN_STEPS = 3,000. A fourth run (a faster host, 0.26 s a step) gave only 1.01x: there a cold
  compile would take about 20,000 steps to repay. Either way the stake is under a minute or a few percent
  of a run. The kernels are kept with the run, so a resume does not pay the compile again. (AMX was not
  measured: its faster matmuls leave the fused operators a larger share, so it follows the same rule.)
- not in fp32 on a CPU: 0.97x (default mode) and 1.00x (max-autotune) on an AVX2-only AMD EPYC, for a compile
  of about two minutes.
- not on CUDA yet: benchmarks/gpu.sh measures it and has not run on a GPU; train.compile=true compiles there.
"""

from __future__ import annotations

import os
from pathlib import Path

import simmim
from simmim.precision import bf16_hardware
from simmim.rundir import COMPILE_CACHE_DIR

COMPILE_MIN_STEPS = 3000
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def choose_compile(
    setting: bool | str,
    mixed_precision: str,
    device_type: str,
    total_steps: int,
    first_choice: bool | None = None,
) -> tuple[bool, str]:
    """`train.compile` -> (whether to compile, why), for a run of `total_steps` optimizer steps under
    accelerate's `mixed_precision` ("no", "bf16", "fp16") on a `device_type` device. `first_choice`: what
    "auto" chose when the run first started (its checkpoint says), which a resume keeps."""
    if isinstance(setting, bool):
        return setting, f"train.compile={str(setting).lower()}"
    if setting != "auto":
        raise ValueError(f'train.compile={setting!r}: expected true, false or "auto"')
    if first_choice is not None:
        # Compiled and eager steps differ in the last bits: a resume on another CPU, or under a rule changed
        # since, keeps the first start's choice so that it ends with the weights of an uninterrupted run.
        return first_choice, (
            f"train.compile=auto: {'compiled' if first_choice else 'eager'} as the run's first start chose "
            "(its checkpoint says), so that the resume is exact"
        )
    if device_type != "cpu":
        return False, (
            f"train.compile=auto: not yet measured on {device_type} (benchmarks/gpu.sh measures it); "
            "train.compile=true compiles"
        )
    if mixed_precision != "bf16":
        return False, "train.compile=auto: fp32 on a CPU, where compiling was measured at 0.97-1.00x"
    if not bf16_hardware()[0]:
        return False, "train.compile=auto: bf16 emulated on this CPU (no avx512_bf16 or AMX), not measured"
    if total_steps < COMPILE_MIN_STEPS:
        return False, (
            f"train.compile=auto: {total_steps} steps, fewer than the {COMPILE_MIN_STEPS} that repay a "
            "compile (15-60 s cold) at the 1.01-1.20x it gives in bf16 on a CPU"
        )
    # The run's total, not the steps left: a resume on the same machine makes the same choice as its run.
    return True, f"train.compile=auto: bf16 on a CPU, measured 1.01-1.20x, over {total_steps} steps"


def keep_cache_with_run(output_dir: str | Path) -> Path:
    """Point inductor's cache (compiled kernels, FX graphs) at `output_dir/compile_cache` unless the user
    chose one, so that a resumed run finds the kernels its first attempt compiled, on this machine or on
    another that the run folder moved to. Returns the directory."""
    if simmim.INDUCTOR_CACHE_CHOSEN is None:
        os.environ[CACHE_ENV] = str(Path(output_dir).resolve() / COMPILE_CACHE_DIR)
    return Path(os.environ[CACHE_ENV])
