"""Where the time of one SimMIM training step goes on this machine: a torch.profiler breakdown by kind of
operator, the matmuls' achieved FLOP rate against this CPU's own matmul ceiling, and what a step would
take if everything but the matmuls were free (the bound on what fusing the rest could win).

    python benchmarks/profile_step.py                          # DeiT-Ti/16, 224 px, batch 16, bf16 autocast
    python benchmarks/profile_step.py --dtype fp32 --compile   # fp32; also time torch.compile against eager

The model, batch and mask are `benchmarks/train_step.py`'s, so its ratios against Transformers can be read
beside this. The ceiling is the median rate of the step's largest matmul shape (tokens x D @ D x 4D) run on
its own, in the step's precision and in fp32.

2026-12-04, 2-core AMD EPYC (avx512_bf16, no AMX), torch 2.14.1, DeiT-Ti/16 224 px, batch 16, bf16 autocast,
two runs of `python benchmarks/profile_step.py --compile` (the host is shared: the step took 0.67-0.72 s
in them, 0.55-0.62 s in train_step.py's runs of the same day):
- matmuls (mm, addmm, bmm: 118 GFLOP a step) take 57-58% of the step, at 263-304 GFLOP/s; the same CPU
  runs the step's largest matmul on its own at 355-371 GFLOP/s in bf16 and 128-161 in fp32 (2.2-2.8x);
- the rest: casts and copies 11% (autocast's weight casts and their gradients' casts back, the fp32
  LayerNorm's input casts, attention's transposes), GELU 5%, softmax 5%, the patch-embedding and decoder
  convolutions 2%, LayerNorm 2%, other elementwise ops and AdamW 17-18%;
- if all of that were free, the step would take 0.38-0.42 s: 2.4-2.9x Transformers' fp32 step (1.01-1.12 s
  in train_step.py). So the 2.5x target of the speed issue is at the bound of what removing every
  non-matmul operator could give on this CPU, not within reach of fusing a few of them;
- torch.compile (inductor fuses the casts, GELU and LayerNorm into their neighbours) ran the step 1.17x and
  1.20x faster than eager in the two runs; compiling took 58 s with a cold cache (the other run found it
  cached): it pays off after a few hundred steps of this model. (The CPU study's smaller model gains
  1.01-1.08x, so `train.compile=auto`, the default, compiles bf16 CPU runs from 3,000 steps:
  simmim/compilation.py.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import deit_tiny, fixed_mask, matmul_rate

from simmim.models import DeiTForMaskedImageModeling

# operator name -> kind; anything else is "other elementwise and bookkeeping"
KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::empty_strided"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution"),
    "LayerNorm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
}
KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=12, help="encoder blocks (DeiT-Ti has 12)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile against eager")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    dtype = torch.bfloat16 if args.dtype == "bf16" else None

    config = deit_tiny(args.image_size)
    config.num_hidden_layers = args.depth
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    h, w = config.grid_size
    mask = fixed_mask(args.batch_size, h * w, 0.6)

    def make_step(compiled: bool):
        torch.manual_seed(0)
        model = DeiTForMaskedImageModeling(config).train()
        if compiled:
            model.compile()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

        def step() -> float:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext():
                loss = model(pixel_values=x, bool_masked_pos=mask).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        return step

    eager = make_step(False)
    for _ in range(2):
        eager()
    # the step's time without the profiler (whose overhead is not the step's); the shares with it
    step_s = statistics.median(eager() for _ in range(max(args.steps, 5)))
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(args.steps):
            eager()

    seconds: dict[str, float] = defaultdict(float)
    matmul_flops = 0
    for event in prof.key_averages():
        kind = KIND_OF.get(event.key, "other elementwise and bookkeeping")
        seconds[kind] += event.self_cpu_time_total / 1e6 / args.steps
        if kind == "matmul":
            matmul_flops += event.flops / args.steps
    total = sum(seconds.values())
    tokens, d = args.batch_size * (h * w + 1), config.hidden_size
    ceiling = matmul_rate(tokens, d, 4 * d, dtype or torch.float32)
    fp32_ceiling = matmul_rate(tokens, d, 4 * d, torch.float32) if dtype is not None else ceiling

    print(
        f"SimMIM train step, {args.depth}-block DeiT-Ti/16 {args.image_size}px, batch {args.batch_size}, "
        f"{args.dtype}; cpu, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"step {step_s:.3f} s (median of {max(args.steps, 5)} steps without the profiler)\n")
    print(f"{'kind of operator':<36}{'s/step':>9}{'share':>8}")
    for kind, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<36}{value:>9.3f}{value / total:>8.1%}")
    achieved = matmul_flops / seconds["matmul"] / 1e9 if seconds["matmul"] else float("nan")
    print(
        f"\nmatmuls: {matmul_flops / 1e9:.4g} GFLOP/step at {achieved:.0f} GFLOP/s; isolated "
        f"{tokens}x{d} @ {d}x{4 * d}: {ceiling:.0f} GFLOP/s {args.dtype}, {fp32_ceiling:.0f} fp32 "
        f"({ceiling / fp32_ceiling:.2f}x)"
    )
    # the profiler's self times add up to more than the wall time (its own overhead): shares, not seconds
    bound = step_s * seconds["matmul"] / total
    print(f"the step if everything but the matmuls were free: {bound:.3f} s ({step_s / bound:.2f}x faster)")

    if args.compile:
        compiled = make_step(True)
        start = time.perf_counter()
        compiled()
        print(f"\ntorch.compile: {time.perf_counter() - start:.0f} s to compile")
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(max(args.steps, 5)):  # interleaved, so that both see the same machine load
            times["eager"].append(eager())
            times["compiled"].append(compiled())
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"eager {e:.3f} s/step, compiled {c:.3f} s/step ({e / c:.2f}x)")


if __name__ == "__main__":
    main()
