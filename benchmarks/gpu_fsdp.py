"""simmim's FSDP2 path (`simmim.sharding`) on one CUDA device, against the same model unsharded.

    python benchmarks/gpu_fsdp.py --out fsdp.json                 # on the GPU machine (NCCL, a mesh of one)
    python benchmarks/gpu_fsdp.py --device cpu --variant tiny --image-size 32 --out fsdp.json   # anywhere (gloo)

The test suite checks FSDP over two CPU processes (gloo). The GPU machine has one GPU, and NCCL will not put
two processes on one device, so this runs the sharded path in one process, over a mesh of one. That covers
what only CUDA exercises: DTensor parameters on the device under NCCL, fused AdamW over them, clipping,
the gathered copy (`Unsharded`), the sharded EMA, and a save and load of the shards. Clipping is torch's
`clip_grad_norm_` over the DTensor gradients, which is what the engine's `accelerator.clip_grad_norm_`
calls when accelerate has not wrapped the model.
- fp32 (TF32 off): `--steps` SimMIM steps (layer-decay groups, clipping) of the sharded model and of a
  plain replica from the same weights; the largest weight difference, after gathering, is reported;
- resume: the shards, optimizer and EMA are saved and loaded into a fresh sharded model (the loaded weights
  and EMA must be exactly the saved ones), and one more step of each must agree within 1e-6;
- bf16 autocast: `--steps` more steps, with a finite loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from simmim import sharding
from simmim.models import DeiTConfig, DeiTForMaskedImageModeling
from simmim.models.configuration import VARIANTS
from simmim.optim import param_groups


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", default="small", choices=sorted(VARIANTS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29581")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 compared as fp32
        torch.backends.cudnn.allow_tf32 = False

    torch.manual_seed(0)
    config = DeiTConfig(
        **VARIANTS[args.variant], image_size=args.image_size, patch_size=16, encoder_stride=16
    )
    model = DeiTForMaskedImageModeling(config).train()
    reference = copy.deepcopy(model).to(device)
    unsharded = sharding.Unsharded(model)
    sharded = sharding.shard(model.to(device), device, 1)

    def optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(m, 0.05, 0.75), lr=1e-3, fused=True if cuda else None)

    optimizers = {"reference": optimizer(reference), "sharded": optimizer(sharded)}
    ema = sharding.ShardedEma(0.9, sharded, unsharded)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    n = (args.image_size // 16) ** 2
    mask = (torch.rand(args.batch_size, n, generator=g) < 0.6).to(device)

    def step(m: torch.nn.Module, opt: torch.optim.Optimizer, bf16: bool = False) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = m(x, bool_masked_pos=mask).loss
        loss.backward()
        sharding.full(torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0))
        opt.step()
        return loss.item()

    for _ in range(args.steps):
        step(reference, optimizers["reference"])
        step(sharded, optimizers["sharded"])
        ema.update(sharded)
    gathered = {k: v.detach().clone() for k, v in unsharded(sharded, device).state_dict().items()}
    fp32_difference = max_difference(gathered, reference.state_dict())
    ema_weights = ema.gathered(device).state_dict()
    ema_moved = max_difference(ema_weights, gathered) > 0  # it lags the model

    with tempfile.TemporaryDirectory() as tmp:
        sharding.save(sharded, optimizers["sharded"], Path(tmp), 0, ema)
        torch.manual_seed(2)  # other initial weights: everything must come from the checkpoint
        fresh_model = DeiTForMaskedImageModeling(config).train()
        fresh_unsharded = sharding.Unsharded(fresh_model)
        fresh = sharding.shard(fresh_model.to(device), device, 1)
        fresh_optimizer = optimizer(fresh)
        fresh_ema = sharding.ShardedEma(0.9, fresh, fresh_unsharded)
        sharding.load(fresh, fresh_optimizer, Path(tmp), 0, fresh_ema)
    # What was loaded must be exactly what was saved; one more step of each then agrees to rounding (CUDA's
    # convolution and attention backward kernels need not be bitwise deterministic).
    load_difference = max_difference(
        {k: v.detach().clone() for k, v in unsharded(sharded, device).state_dict().items()},
        fresh_unsharded(fresh, device).state_dict(),
    )
    step(sharded, optimizers["sharded"])
    step(fresh, fresh_optimizer)
    resume_difference = max_difference(
        {k: v.detach().clone() for k, v in unsharded(sharded, device).state_dict().items()},
        fresh_unsharded(fresh, device).state_dict(),
    )
    ema_resume_difference = max_difference(fresh_ema.gathered(device).state_dict(), ema_weights)

    bf16_losses = [step(sharded, optimizers["sharded"], bf16=True) for _ in range(args.steps)]
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "model": f"DeiT-{args.variant}/16 at {args.image_size} px, batch {args.batch_size}",
        "fp32_max_weight_difference": fp32_difference,
        "load_max_weight_difference": load_difference,
        "resume_max_weight_difference": resume_difference,
        "ema_moved": ema_moved,
        "ema_resume_max_difference": ema_resume_difference,
        "bf16_losses": bf16_losses,
    }
    result["ok"] = bool(
        fp32_difference <= 1e-5
        and load_difference == 0
        and resume_difference <= 1e-6
        and ema_moved
        and ema_resume_difference == 0
        and all(math.isfinite(v) for v in bf16_losses)
    )
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
