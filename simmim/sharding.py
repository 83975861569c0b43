"""FSDP2 (`train.fsdp=true`): parameters, gradients and AdamW's state sharded across the processes, one
unit per encoder block, with torch's `fully_shard` over the processes that `accelerate launch --multi_gpu`
starts (NCCL on GPUs, gloo on CPUs).

accelerate's own FSDP is not used: it runs only on GPUs (on a CPU it falls back to replicated DDP without a
word, so a CPU test could not cover it), and its sharded `save_state` pickles its metadata. Here:
- a checkpoint holds each process's shard as safetensors (`model_shard_<rank>.safetensors`, the optimizer's
  `optimizer_shard_<rank>.safetensors` and its groups as JSON), so a resume needs the same processes;
- evaluation, the online probe, snapshots and exports see an unsharded copy of the weights (`Unsharded`),
  gathered on every process: they run unchanged, and no process waits on another inside them;
- the EMA is not supported yet (refused by the config).
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
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from simmim.models.deit import DeiTLayer

MODEL_SHARD = "model_shard_{rank}.safetensors"
OPTIMIZER_SHARD = "optimizer_shard_{rank}.safetensors"
OPTIMIZER_GROUPS = "optimizer_groups_{rank}.json"


def shard(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard `model` in place over all processes: each DeiT block is a unit (gathered for its forward and
    backward, freed after), and the root holds the rest (embeddings, head, decoder)."""
    mesh = init_device_mesh(device.type, (world_size,))
    for module in model.modules():
        if isinstance(module, DeiTLayer):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
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
        state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
        self.copy.load_state_dict(state)
        self.copy.train(sharded.training)
        return self.copy.to(device)


def save(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, rank: int) -> None:
    """This process's shards of the model and the optimizer's state into a checkpoint directory."""
    save_file(
        {name: local(t).detach().cpu().contiguous() for name, t in model.state_dict().items()},
        str(directory / MODEL_SHARD.format(rank=rank)),
    )
    state = get_optimizer_state_dict(model, optimizer)
    tensors = {
        f"{name}/{key}": local(value).detach().cpu().contiguous()
        for name, values in state["state"].items()
        for key, value in values.items()
    }
    save_file(tensors, str(directory / OPTIMIZER_SHARD.format(rank=rank)))
    (directory / OPTIMIZER_GROUPS.format(rank=rank)).write_text(json.dumps(state["param_groups"]) + "\n")


def load(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, rank: int) -> None:
    """Restore what `save` wrote, into a model sharded over the same number of processes."""
    files = [directory / name.format(rank=rank) for name in (MODEL_SHARD, OPTIMIZER_SHARD, OPTIMIZER_GROUPS)]
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
