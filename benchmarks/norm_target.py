"""Speed of SimMIM's normalised target: simmim's window statistics (running sums) against microsoft/SimMIM's
`norm_targets` (three avg_pool2d with the window as the kernel), on the same batch, in one process.

    python benchmarks/norm_target.py                      # batch 64, 3 x 64 x 64, window 15 (the CPU study's)
    python benchmarks/norm_target.py --size 192 --window 47 --batch 32

Prints each one's median time per batch, their ratio, and their largest difference.

2026-12-06, 2-core AMD EPYC with avx512_bf16, `--threads 1 --rounds 5`, three runs: simmim 0.0165 and
0.0197 s, SimMIM's formula 0.285-0.286 s (14.5-17.2x); simmim's previous window sums (index_select of the
bounds, commit 6f37ecb) 0.0328 s in the same minutes. 2026-12-05 on an AVX2-only EPYC: 0.051 against 0.391 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from simmim.models.losses import norm_targets


def simmim_reference(targets: torch.Tensor, window: int) -> torch.Tensor:
    """microsoft/SimMIM models/simmim.py `norm_targets`, written as it is there."""
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    mean = F.avg_pool2d(targets, count_include_pad=False, **pool)
    square_mean = F.avg_pool2d(targets**2.0, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(targets), count_include_pad=True, **pool) * window**2
    var = ((square_mean - mean**2.0) * (count / (count - 1))).clamp(min=0.0)
    return (targets - mean) / (var + 1e-6) ** 0.5


def median_seconds(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--window", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    ours = median_seconds(lambda: norm_targets(x, args.window), args.rounds)
    theirs = median_seconds(lambda: simmim_reference(x, args.window), args.rounds)
    diff = (norm_targets(x, args.window) - simmim_reference(x, args.window)).abs().max().item()
    print(
        f"batch {args.batch} x 3 x {args.size} x {args.size}, window {args.window}, {torch.get_num_threads()} threads"
    )
    print(f"simmim (running sums)        {ours:.4f} s")
    print(f"SimMIM's avg_pool2d formula  {theirs:.4f} s")
    print(f"speed ratio {theirs / ours:.1f}x; largest difference {diff:.2e}")


if __name__ == "__main__":
    main()
