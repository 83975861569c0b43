"""FSDP2 (`train.fsdp=true`): parameters, gradients and AdamW's state sharded across the processes, one
unit per encoder block, with torch's `fully_shard` over the processes that `accelerate launch` starts (NCCL
on GPUs, gloo on CPUs).

`accelerate launch --config_file recipes/accelerate/fsdp.yaml` (an FSDP config) is read as train.fsdp=true
(`follow_launcher`), but accelerate's own FSDP wrapping is not used: it runs only on GPUs (on a CPU it falls
back to replicated DDP without a word, so a CPU test could not cover it), and its sharded `save_state`
pickles its metadata. Here:
- a checkpoint holds each process's shard as safetensors (`model_shard_<rank>.safetensors`, the optimizer's
  `optimizer_shard_<rank>.safetensors` and its groups as JSON), so a resume needs the same processes;
- evaluation, the online probe, snapshots and exports see an unsharded copy of the weights (`Unsharded`),
  gathered tensor by tensor on every process: they run unchanged, and no process waits on another inside them;
- the EMA (`ShardedEma`) is sharded as the model is: each process averages its own shard, and it is
  gathered, as the model is, to be evaluated.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from simmim.models.deit import DeiTLayer
from simmim.rundir import EMA_SHARD, MODEL_SHARD, OPTIMIZER_GROUPS, OPTIMIZER_SHARD


def shard(
    model: nn.Module, device: torch.device, world_size: int, reshard_after_forward: bool = True
) -> nn.Module:
    """Shard `model` in place over all processes: each DeiT block is a unit (gathered for its forward and
    backward, freed after its forward too when `reshard_after_forward`), and the root holds the rest
    (embeddings, head, decoder)."""
    mesh = init_device_mesh(device.type, (world_size,))
    for module in model.modules():
        if isinstance(module, DeiTLayer):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (the tensor itself if it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor, on every process (collective)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class Unsharded:
    """An unsharded copy of a sharded model, for what runs outside the training step. `__call__` refreshes
    it from the shards (every process must call it: it gathers) and returns it on the training device."""

    def __init__(self, model: nn.Module) -> None:
        """`model`: the model before `shard`, copied to the CPU as the copy's structure."""
        self.copy = copy.deepcopy(model).cpu()

    def __call__(self, sharded: nn.Module, device: torch.device) -> nn.Module:
        self.copy.to(device).train(sharded.training)
        targets = self.copy.state_dict()  # views of the copy's tensors
        with torch.no_grad():
            for name, tensor in sharded.state_dict().items():  # one tensor gathered at a time
                targets[name].copy_(full(tensor))
        return self.copy


class ShardedEma:
    """The exponential moving average of a sharded model's weights, as `simmim.optim.ModelEma` keeps it
    (fp32, ema = decay * ema + (1 - decay) * w, non-float buffers copied), but sharded: each process
    averages its own shard of every tensor, so the EMA costs 4 bytes per parameter / N on each process and
    no communication per step. `gathered()` (every process must call it) gives it as one module."""

    def __init__(self, decay: float, model: nn.Module, unsharded: Unsharded) -> None:
        self.decay = decay
        self.like = dict(model.state_dict())  # the sharded tensors: their mesh, placements and shapes
        self.shards = {name: local(t).detach().clone() for name, t in self.like.items()}
        self.shards = {k: v.float() if v.is_floating_point() else v for k, v in self.shards.items()}
        self.copy = copy.deepcopy(unsharded.copy)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, tensor in model.state_dict().items():
            ema, w = self.shards[name], local(tensor)
            if ema.is_floating_point():
                ema.lerp_(w.to(ema.dtype), 1.0 - self.decay)
            else:
                ema.copy_(w)

    def gathered(self, device: torch.device) -> nn.Module:
        self.copy.to(device).eval().requires_grad_(False)
        targets = self.copy.state_dict()
        with torch.no_grad():
            for name, like in self.like.items():  # one tensor gathered at a time
                shard = self.shards[name]
                if isinstance(like, DTensor):
                    shard = DTensor.from_local(
                        shard.to(like.device), like.device_mesh, like.placements, shape=like.shape,
                        stride=like.stride(), run_check=False,
                    ).full_tensor()  # fmt: skip
                targets[name].copy_(shard)
        return self.copy


def save(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    rank: int,
    ema: ShardedEma | None = None,
) -> None:
    """This process's shards of the model, the optimizer's state and the EMA into a checkpoint directory."""
    if ema is not None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in ema.shards.items()}
        save_file(tensors, str(directory / EMA_SHARD.format(rank=rank)))
    state = model.state_dict()
    sharded = [name for name, t in state.items() if isinstance(t, DTensor)]  # the rest: whole on each
    save_file(
        {name: local(t).detach().cpu().contiguous() for name, t in state.items()},
        str(directory / MODEL_SHARD.format(rank=rank)),
        metadata={"sharded": json.dumps(sharded)},
    )
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # by parameter name: step, exp_avg, ...
    tensors = {
        f"{name}/{key}": local(value).detach().cpu().contiguous()
        for name, values in optimizer_state["state"].items()
        for key, value in values.items()
    }
    save_file(tensors, str(directory / OPTIMIZER_SHARD.format(rank=rank)))
    groups = json.dumps(optimizer_state["param_groups"])  # hyperparameters and parameter names
    (directory / OPTIMIZER_GROUPS.format(rank=rank)).write_text(groups + "\n")


def load(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    rank: int,
    ema: ShardedEma | None = None,
) -> None:
    """Restore what `save` wrote, into a model sharded over the same number of processes."""
    names = (MODEL_SHARD, OPTIMIZER_SHARD, OPTIMIZER_GROUPS, *((EMA_SHARD,) if ema is not None else ()))
    files = [directory / name.format(rank=rank) for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(
            f"{directory} lacks {', '.join(missing)}: it was not saved with train.fsdp=true by this many "
            "processes; resume it as it was run"
        )
    shards = load_file(str(files[0]))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            target = local(tensor)
            if shards[name].shape != target.shape:
                raise ValueError(
                    f"{directory}: {name} has a shard of shape {tuple(shards[name].shape)}, this process holds "
                    f"{tuple(target.shape)}: resume with the number of processes the run was saved with"
                )
            target.copy_(shards[name])
    parameters = dict(model.named_parameters())
    state: dict[str, dict[str, Any]] = {}
    for key, value in load_file(str(files[1])).items():
        name, field = key.rsplit("/", 1)
        p = parameters[name]
        if isinstance(p, DTensor) and field != "step":
            value = DTensor.from_local(
                value.to(p.device),
                p.device_mesh,
                p.placements,
                shape=p.shape,
                stride=p.stride(),
                run_check=False,
            )
        state.setdefault(name, {})[field] = value
    groups = json.loads(files[2].read_text())
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})
    if ema is not None:
        for name, tensor in load_file(str(files[3])).items():
            ema.shards[name].copy_(tensor)
