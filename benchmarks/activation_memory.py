"""Memory saved by activation checkpointing (`train.activation_checkpointing=true`) in a SimMIM training step:
peak RSS growth on CPU, `torch.cuda.max_memory_allocated` on CUDA, with the step time beside it.

    python benchmarks/activation_memory.py                          # DeiT-S/16 at 224 px, batch 16
    python benchmarks/activation_memory.py --variant base --batch-size 64 --device cuda

Each setting runs in a fresh subprocess (a CPU process's peak RSS never goes down), from the same weights,
images and masks: gradients and AdamW state allocated first, then `--steps` timed steps (forward + backward + AdamW). On CPU the figure
is the growth of the peak RSS over the process's size after building the model and optimizer (weights,
gradients and AdamW state are the same with and without checkpointing; activations are what differs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from simmim.models import DeiTConfig, DeiTForMaskedImageModeling
from simmim.models.configuration import VARIANTS


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(args: argparse.Namespace, checkpointing: bool) -> dict[str, float]:
    """One setting, in this process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = DeiTConfig(
        **VARIANTS[args.variant], image_size=args.image_size, patch_size=16, encoder_stride=16
    )
    model = DeiTForMaskedImageModeling(config).to(device).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    n = (args.image_size // 16) ** 2
    mask = (torch.rand(args.batch_size, n, generator=g) < 0.6).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step() -> None:
        with autocast:
            loss = model(x, bool_masked_pos=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: the baseline includes them

    # Gradients and AdamW state allocated before any forward, so that the baseline holds them and the
    # high-water mark of the steps adds only the activations (CPU peak RSS never comes down).
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = peak_rss_mib()
    step()  # a warm-up step (allocator, kernels), within the peak: the timed steps are the same shape
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib()
    seconds = (time.perf_counter() - start) / args.steps
    return {"activation_mib": peak - base, "peak_mib": peak, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="small", choices=sorted(VARIANTS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args, args.one == "on")))
        return

    rows = {}
    for setting in ("off", "on"):
        child = [sys.executable, __file__, *sys.argv[1:], "--one", setting]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        rows[setting] = json.loads(out.strip().splitlines()[-1])
    what = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"{args.variant} at {args.image_size} px, batch {args.batch_size}, {args.device}, "
          f"{'bf16' if args.bf16 else 'fp32'}, torch {torch.__version__}")  # fmt: skip
    print(f"| activation checkpointing | activations ({what}), MiB | peak, MiB | step, s |")
    print("|---|---|---|---|")
    for setting, r in rows.items():
        print(f"| {setting} | {r['activation_mib']:.0f} | {r['peak_mib']:.0f} | {r['step_s']:.2f} |")
    off, on = rows["off"], rows["on"]
    print(f"saving: {1 - on['activation_mib'] / max(off['activation_mib'], 1e-9):.0%} of the activation memory, "
          f"for {on['step_s'] / off['step_s']:.2f}x the step time")  # fmt: skip


if __name__ == "__main__":
    main()
