"""The SimMIM training step on one GPU, simmim against Transformers at equal batch: img/s, peak memory, MFU,
with torch.compile off and on; and a check that simmim's own step (`simmim.engine.train_step`) makes no
host sync (`torch.cuda.set_sync_debug_mode`).

    python benchmarks/gpu_step.py --out runs/gpu/step.json     # DeiT-B/16 and DeiT-S/16, 224 px, bf16
    python benchmarks/gpu_step.py --tiny --out /tmp/step.json  # CPU: a tiny model, to check that it runs

Both libraries get the same weights (ours written with save_pretrained, read by Transformers with SDPA
attention), the same images and masks (60% of the patches), AdamW (fused on CUDA for both) and bf16
autocast. MFU = img/s x training FLOPs per image / peak: FLOPs counted as 3x the forward's matmul FLOPs
(`train_flops_per_image`: 106.6 GFLOP for DeiT-B/16 at 224 px, of which 105.9 the encoder's), peak 790 TFLOP/s (dense bf16 measured on
an H200; 989 on paper for an H100).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from train_step import fixed_mask

from simmim.models import DeiTConfig, DeiTForMaskedImageModeling
from simmim.models.configuration import VARIANTS

PEAK_TFLOPS = 790.0  # dense bf16 measured on an H200 (about 989 on paper for the H100)
# (variant, batch per step): the batch is the same for both libraries
SIZES = {"base": 128, "small": 256}


def bench_config(variant: str, tiny: bool) -> DeiTConfig:
    """DeiT-<variant>/16 at 224 px; with `tiny`, a 2-block 64-wide model at 64 px (the CPU check)."""
    if tiny:
        arch = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        return DeiTConfig(**arch, image_size=64, patch_size=16, encoder_stride=16)
    return DeiTConfig(**VARIANTS[variant], image_size=224, patch_size=16, encoder_stride=16)


def train_flops_per_image(config: DeiTConfig) -> float:
    """3 x the forward's matmul FLOPs (backward = 2 x forward): patch embedding, per block the qkv,
    output and MLP projections (24 D^2 per token) and attention (4 T^2 D), and the 1x1-conv decoder."""
    d, n = config.hidden_size, config.grid_size[0] * config.grid_size[1]
    tokens, patch_pixels = n + 2, config.patch_size**2 * config.num_channels  # [CLS] and [DIST]
    per_block = 24 * tokens * d * d + 4 * tokens * tokens * d
    embed = 2 * n * patch_pixels * d
    decoder = 2 * n * d * config.encoder_stride**2 * config.num_channels
    return 3.0 * (config.num_hidden_layers * per_block + embed + decoder)


def time_steps(model, x, mask, steps: int, warmup: int, device: str) -> tuple[float, float]:
    """(median seconds per step, peak memory in MiB) of forward + backward + AdamW under bf16 autocast."""
    cuda = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if cuda else None)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(pixel_values=x, bool_masked_pos=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return statistics.median(times), peak


def sync_check(config: DeiTConfig, batch: int, device: str) -> dict:
    """simmim's own training step (engine.train_step) under set_sync_debug_mode("warn"): the host syncs
    it makes, after two warm-up steps (which allocate the optimizer state)."""
    from accelerate import Accelerator

    from simmim.batches import TrainBatches
    from simmim.checkpoints import CheckpointManager
    from simmim.config import DataConfig, OptimConfig, TrainConfig
    from simmim.engine import TrainState, train_step
    from simmim.meter import LossMeter
    from simmim.optim import Schedule, param_groups

    acc = Accelerator(mixed_precision="bf16", cpu=device != "cuda")
    optim = OptimConfig(warmup_epochs=0)
    schedule = Schedule.build(batch * 10, DataConfig(batch_size=batch), optim, TrainConfig(epochs=1), 1)
    model = DeiTForMaskedImageModeling(config)
    opt = torch.optim.AdamW(param_groups(model, 0.05, 1.0), lr=1e-4, fused=True if device == "cuda" else None)
    model, opt = acc.prepare(model, opt)
    with tempfile.TemporaryDirectory() as tmp:
        state = TrainState(schedule, model, opt, None, CheckpointManager(tmp, acc))
    h, w = config.grid_size
    item = {
        "pixel_values": torch.randn(batch, 3, *config.image_hw),
        "bool_masked_pos": fixed_mask(batch, h * w, 0.6),
        "index": torch.arange(batch),
        "num_skipped": 0,
    }
    batches = TrainBatches(iter([dict(item) for _ in range(5)]), acc.device, fallback=lambda: item)

    def loss_fn(m, b):
        return m(pixel_values=b["pixel_values"], bool_masked_pos=b["bool_masked_pos"]).loss

    meter = LossMeter(acc.device)
    for _ in range(2):
        train_step(state, batches, loss_fn, meter, acc, optim)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            train_step(state, batches, loss_fn, meter, acc, optim)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"steps": 3, "sync_warnings": len(syncs), "kinds": sorted(set(syncs))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="a JSON file to write")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny model on CPU, compile off: checks the script"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compiled: the compile itself)")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    import transformers  # a peer for this benchmark, not a dependency of simmim

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (use --tiny to check the script on CPU)")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sizes = {"tiny": 4} if args.tiny else SIZES
    compile_modes = [False] if args.tiny or args.no_compile else [False, True]
    rows: list[dict] = []
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (tiny check)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peak_tflops": PEAK_TFLOPS,
        "rows": rows,
        "sync_check": None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a run stopped at its time limit keeps what it measured
        out.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        inputs = {}
        for variant, batch in sizes.items():
            config = bench_config(variant, args.tiny)
            torch.manual_seed(0)
            DeiTForMaskedImageModeling(config).save_pretrained(f"{tmp}/{variant}")
            x = torch.randn(batch, 3, *config.image_hw, device=device)
            h, w = config.grid_size
            inputs[variant] = (config, batch, x, fixed_mask(batch, h * w, 0.6).to(device))
        # Every eager row, then the sync check, then the compiled rows (each compile takes a while).
        for compiled in compile_modes:
            for variant, (config, batch, x, mask) in inputs.items():
                flops = train_flops_per_image(config)
                for library in ("simmim", "transformers"):
                    if library == "simmim":
                        model = DeiTForMaskedImageModeling.from_pretrained(f"{tmp}/{variant}")
                    else:
                        model = transformers.DeiTForMaskedImageModeling.from_pretrained(
                            f"{tmp}/{variant}", attn_implementation="sdpa"
                        )
                    model.to(device).train()
                    step_model = torch.compile(model) if compiled else model
                    started = time.perf_counter()
                    seconds, peak = time_steps(step_model, x, mask, args.steps, args.warmup, device)
                    img_s = batch / seconds
                    rows.append({
                        "model": f"DeiT-{variant}/16", "gflop_per_image": flops / 1e9, "library": library, "compile": compiled, "batch": batch,
                        "img_per_s": img_s, "peak_mib": peak, "tflops": img_s * flops / 1e12,
                        "mfu": img_s * flops / 1e12 / PEAK_TFLOPS, "wall_s": time.perf_counter() - started,
                    })  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
                    save()
                    del model, step_model
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
            if not compiled:
                result["sync_check"] = sync_check(
                    bench_config("small", args.tiny), 4 if args.tiny else 64, device
                )
                print(json.dumps({"sync_check": result["sync_check"]}), flush=True)
                save()


if __name__ == "__main__":
    main()
