"""Speed of one SimMIM training step (forward + backward + AdamW) of simmim's DeiTForMaskedImageModeling
against Transformers' (default attention: sdpa), DeiT-Ti/16 at 224 px, timed in one process, interleaved;
then the CPU study's own model (6 blocks 192 wide, 64 px, patch 8, batch 64) in fp32 and bf16, eager and
compiled. For each, the step's matmul work (torch's FLOP counter: matmuls, attention and convolutions)
per second of the whole step, against this CPU's matmul ceiling (the step's largest matmul shape on its
own, in the step's precision); the CPU's model name and its AVX-512, bf16 and AMX flags are printed first.
Every step uses the fused AdamW update (simmim's engine and Transformers' Trainer both do); the study
model's section also times that update alone against torch's default one.

    python benchmarks/train_step.py                       # cuda if available, else cpu
    python benchmarks/train_step.py --device cpu --threads 2 --steps 20 --warmup 2
    python benchmarks/train_step.py --device cpu --threads 2 --steps 10 --study-model --compile
    python benchmarks/train_step.py --device cpu --threads 2 --steps 6 --study-model --compile --max-autotune \
        --skip-peer                                        # also inductor's max-autotune mode (slow to compile)
    python benchmarks/train_step.py --device cpu --threads 2 --steps 6 --study-model --compile --skip-peer \
        --norm-target 15                                   # the study's loss: SimMIM's normalised target

Both models start from the same weights (ours written with save_pretrained, read by Transformers) and see
the same images and the same mask (60% of the 14x14 patches of each image). Each round runs every variant
once (simmim fp32, Transformers fp32, simmim bf16, Transformers bf16; bf16 = torch.autocast), so drift in
the machine's speed hits all of them alike; the median over rounds is reported. On a CPU shared with other
jobs the threads stall (a median far above the minimum shows it): measure on an idle machine.

2-core AMD EPYC (avx512_bf16), torch 2.14, Transformers 5.23, about 2 minutes idle: simmim bf16 ~2.3x
Transformers fp32 and ~1.1-1.3x Transformers bf16; fp32 at parity (GEMMs and attention are the same kernels).
2026-12-04, the same kind of CPU, Transformers 5.25, two runs of `--device cpu --threads 2 --steps 10`:
simmim bf16 1.83x and 1.81x Transformers fp32 (target 2.5x: missed), 1.36x and 1.26x Transformers bf16
(target 1.3x: met once); fp32 1.00x. A third run, the next session: 1.88x, 1.32x, fp32 1.08x.
`benchmarks/profile_step.py` shows where the bf16 step's time goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from simmim.config import LossConfig
from simmim.models import DeiTConfig, DeiTForMaskedImageModeling
from simmim.precision import cpu_flags
from simmim.pretrain import simmim_loss

MATMUL_CEILING_TARGET = 0.85  # the step's matmul work rate as a share of the CPU's matmul ceiling

# (name, is ours, autocast dtype)
VARIANTS = [
    ("simmim fp32", True, None),
    ("transformers fp32", False, None),
    ("simmim bf16", True, torch.bfloat16),
    ("transformers bf16", False, torch.bfloat16),
]
# (label, numerator, denominator, target)
RATIOS = [
    ("fp32: simmim / transformers", "simmim fp32", "transformers fp32", 1.0),
    ("bf16: simmim / transformers", "simmim bf16", "transformers bf16", 1.3),
    ("simmim bf16 / transformers fp32", "simmim bf16", "transformers fp32", 2.5),
]


def deit_tiny(image_size: int) -> DeiTConfig:
    return DeiTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=image_size,
        patch_size=16,
        encoder_stride=16,
    )


def study_model() -> DeiTConfig:
    """recipes/study/imagenette_cpu_pretrain.yaml's model: DeiT-Tiny width, 6 blocks, 64 px, patch 8."""
    return DeiTConfig(
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=64,
        patch_size=8,
        encoder_stride=8,
    )


def describe_cpu() -> str:
    """The CPU's model name and the flags that decide its fast precisions."""
    name = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return f"{name}; flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, rounds: int = 30) -> float:
    """GFLOP/s of an (m, k) @ (k, n) matmul on its own, median of `rounds`."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


def step_flops(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> float:
    """FLOPs of one forward + backward as torch's FLOP counter counts them (matmuls, attention, convolutions:
    the operators with matmul work; elementwise operators count 0)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(pixel_values=x, bool_masked_pos=mask).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_ceiling(config: DeiTConfig, batch_size: int, dtype: torch.dtype | None) -> float:
    """This CPU's matmul ceiling for the step: the rate of its largest shape (tokens x D @ D x 4D) alone."""
    h, w = config.grid_size
    tokens, d = batch_size * (h * w + 1), config.hidden_size
    return matmul_rate(tokens, d, config.intermediate_size, dtype or torch.float32)


def fixed_mask(batch_size: int, num_patches: int, ratio: float, seed: int = 0) -> torch.Tensor:
    """(B, N) bool with round(ratio * N) True per row at random positions."""
    g = torch.Generator().manual_seed(seed)
    num_masked = round(ratio * num_patches)
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(num_patches, generator=g)[:num_masked]] = True
    return mask


def make_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    dtype: torch.dtype | None,
    device: str,
    loss: LossConfig | None = None,
) -> Callable[[], float]:
    """A closure running one optimisation step and returning its wall time in seconds. With `loss`, the loss
    is simmim's training loss of that config, computed outside the model as the engine does (so outside a
    compiled graph; the engine computes it under autocast, but the window statistics are float32/float64
    either way); without, the model's own."""
    # Fused, as simmim's engine builds it and as Transformers' Trainer does by default (optim=
    # "adamw_torch_fused" with torch >= 2.8): the two steps differ in the model alone.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> float:
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext():
            out = model(pixel_values=x, bool_masked_pos=mask)
        p = model.config.patch_size
        value = out.loss if loss is None else simmim_loss(loss, x, out.reconstruction, mask, p)
        value.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    return step


def interleaved_times(
    steps_of: dict[str, Callable[[], float]], warmup: int, steps: int
) -> dict[str, list[float]]:
    """Each variant's step time over `steps` rounds after `warmup`, every round running every variant once,
    so that drift in the machine's speed hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    for round_index in range(warmup + steps):
        for name, step in steps_of.items():
            seconds = step()
            if round_index >= warmup:
                times[name].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--steps", type=int, default=None, help="timed rounds (default: 20 on cpu, 50 on cuda)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds (default: 2 on cpu, 5 on cuda)"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument(
        "--study-model", action="store_true", help="also time the CPU study's model (eager; --compile too)"
    )
    parser.add_argument("--study-batch-size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="with --study-model: compiled rows as well")
    parser.add_argument(
        "--max-autotune",
        action="store_true",
        help="with --study-model --compile: rows compiled with mode=max-autotune too (inductor's GEMM templates)",
    )
    parser.add_argument("--skip-peer", action="store_true", help="only the study model (no Transformers)")
    parser.add_argument(
        "--norm-target",
        type=int,
        metavar="WINDOW",
        help="with --study-model: train it on SimMIM's normalised target with this window, as the study does",
    )
    args = parser.parse_args()
    if args.max_autotune and not (args.study_model and args.compile):
        parser.error("--max-autotune: expected with --study-model --compile")
    if args.norm_target is not None and not args.study_model:
        parser.error("--norm-target: expected with --study-model")
    loss = None if args.norm_target is None else LossConfig(norm_target=True, norm_target_window=args.norm_target)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.device == "cpu":
        print(describe_cpu())
    if not args.skip_peer:
        compare_with_transformers(args)
    if args.study_model:
        time_study_model(args, loss)


def compare_with_transformers(args: argparse.Namespace) -> None:
    """DeiT-Ti/16: simmim against Transformers, fp32 and bf16, interleaved."""
    import transformers  # a peer for this benchmark, not a dependency of simmim

    cpu = args.device == "cpu"
    steps = args.steps if args.steps is not None else (20 if cpu else 50)
    warmup = args.warmup if args.warmup is not None else (2 if cpu else 5)
    torch.manual_seed(0)

    config = deit_tiny(args.image_size)
    ours = DeiTForMaskedImageModeling(config)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = transformers.DeiTForMaskedImageModeling.from_pretrained(tmp)
    ours.to(args.device).train()
    theirs.to(args.device).train()

    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    h, w = config.grid_size
    mask = fixed_mask(args.batch_size, h * w, 0.6).to(args.device)
    with torch.no_grad():  # same weights, same inputs: the same loss
        a = ours(x, bool_masked_pos=mask).loss.item()
        b = theirs(pixel_values=x, bool_masked_pos=mask).loss.item()

    variants = VARIANTS
    if cpu and not {"avx512_bf16", "amx_bf16"} & cpu_flags():  # bf16 emulated: minutes a step, no use
        variants = [v for v in VARIANTS if v[2] is None]
        print("no bf16 rows: this CPU has neither avx512_bf16 nor AMX (bf16 is emulated)")
    steps_of = {
        name: make_step(ours if is_ours else theirs, x, mask, dtype, args.device)
        for name, is_ours, dtype in variants
    }
    times = interleaved_times(steps_of, warmup, steps)

    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    print(
        f"SimMIM train step, DeiT-Ti/16 {args.image_size}px, batch {args.batch_size}, 60% masked, AdamW; {device_name}"
    )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__} "
        f"(attn_implementation={theirs.config._attn_implementation}); {warmup} warm-up + {steps} timed rounds"
    )
    print(f"initial loss: simmim {a:.6f}, transformers {b:.6f}")
    print()
    print(f"{'variant':<20}{'median s/step':>15}{'min s/step':>12}{'img/s':>10}")
    img_per_s = {}
    busy = False
    for name, values in times.items():
        median = statistics.median(values)
        img_per_s[name] = args.batch_size / median
        busy |= median > 1.2 * min(values)
        print(f"{name:<20}{median:>15.4f}{min(values):>12.4f}{img_per_s[name]:>10.1f}")
    if busy:
        print("warning: a median is more than 20% above its minimum: the machine was busy, ratios are noisy")
    print()
    print(f"{'speed ratio':<34}{'ratio':>8}{'target':>8}")
    for label, num, den, target in RATIOS:
        if num not in img_per_s or den not in img_per_s:
            continue
        ratio = img_per_s[num] / img_per_s[den]
        verdict = "ok" if ratio >= target else "MISSED"
        print(f"{label:<34}{ratio:>8.2f}{f'>= {target:.1f}':>8}  {verdict}")
    if cpu:
        flops = step_flops(ours, x, mask)
        print()
        for name, is_ours, dtype in variants:
            if is_ours:
                rate = flops / statistics.median(times[name]) / 1e9
                print_matmul_share(name, rate, matmul_ceiling(config, args.batch_size, dtype))


def print_matmul_share(name: str, rate: float, ceiling: float) -> None:
    share = rate / ceiling
    verdict = "ok" if share >= MATMUL_CEILING_TARGET else "MISSED"
    print(
        f"{name}: matmul work {rate:.0f} GFLOP/s over the whole step, ceiling {ceiling:.0f} GFLOP/s: "
        f"{share:.0%} (target >= {MATMUL_CEILING_TARGET:.0%}: {verdict})"
    )


def time_study_model(args: argparse.Namespace, loss: LossConfig | None = None) -> None:
    """The CPU study's model, simmim only: fp32 and bf16, eager and (with --compile) compiled, interleaved;
    trained on `loss` (simmim's training loss of that config) if given, else on the model's own loss."""
    steps = args.steps if args.steps is not None else 20
    warmup = args.warmup if args.warmup is not None else 2
    config, batch = study_model(), args.study_batch_size
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 64, 64, device=args.device)
    h, w = config.grid_size
    mask = fixed_mask(batch, h * w, 0.6).to(args.device)
    flops = step_flops(DeiTForMaskedImageModeling(config).to(args.device), x, mask)
    steps_of, compile_seconds = {}, {}
    precisions = [("fp32", None), ("bf16", torch.bfloat16)]
    if args.device == "cpu" and not {"avx512_bf16", "amx_bf16"} & cpu_flags():
        precisions = precisions[:1]
        print(
            "\nno bf16 rows for the study's model: this CPU has neither avx512_bf16 nor AMX (bf16 is emulated)"
        )
    modes = [None]  # eager
    if args.compile:
        modes += ["default", "max-autotune"] if args.max_autotune else ["default"]
    for mode in modes:
        compiled = mode is not None
        for label, dtype in precisions:
            torch.manual_seed(0)
            model = DeiTForMaskedImageModeling(config).to(args.device).train()
            if compiled:
                model.compile(mode=mode)
            name = label + {None: "", "default": " compiled", "max-autotune": " max-autotune"}[mode]
            steps_of[name] = make_step(model, x, mask, dtype, args.device, loss)
            if compiled:  # the first step compiles: timed on its own
                compile_seconds[name] = steps_of[name]()
    times = interleaved_times(steps_of, warmup, steps)
    target = "raw pixels" if loss is None else f"the normalised target, window {loss.norm_target_window} px"
    print(
        f"\nThe CPU study's model (6 blocks, 192 wide, 64 px, patch 8), batch {batch}, loss on {target}: "
        f"{flops / batch / 1e9:.3f} GFLOP per image; {warmup} warm-up + {steps} timed rounds"
    )
    print(f"{'variant':<20}{'median s/step':>15}{'min s/step':>12}{'img/s':>9}{'vs eager':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        eager = statistics.median(times[name.split()[0]])
        print(f"{name:<20}{median:>15.4f}{min(values):>12.4f}{batch / median:>9.1f}{eager / median:>9.2f}x")
    for name, seconds in compile_seconds.items():
        print(f"{name}: the first step (compiling) took {seconds:.0f} s")
    for name, values in times.items():
        dtype = torch.bfloat16 if name.startswith("bf16") else None
        rate = flops / statistics.median(values) / 1e9
        print_matmul_share(name, rate, matmul_ceiling(config, batch, dtype))
    print_adamw_update(DeiTForMaskedImageModeling(config).to(args.device), args.device)


def print_adamw_update(model: torch.nn.Module, device: str, rounds: int = 20) -> None:
    """The AdamW update alone, torch's default for the device (a loop over the tensors on a CPU, for-each on
    CUDA) against fused (simmim's): median ms."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    medians = {}
    for name, kwargs in (("default", {}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kwargs)
        for _ in range(3):
            optimizer.step()
        times = []
        for _ in range(rounds):
            sync()
            start = time.perf_counter()
            optimizer.step()
            sync()
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
    print(
        f"AdamW update of the study model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters): "
        f"torch's default {medians['default'] * 1e3:.2f} ms, fused {medians['fused'] * 1e3:.2f} ms "
        f"({medians['default'] / medians['fused']:.1f}x)"
    )


if __name__ == "__main__":
    main()
