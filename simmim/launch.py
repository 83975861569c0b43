"""How a run is launched: the Accelerator (its processes, device and autocast) and what `accelerate launch`
asked for (an FSDP config read as train.fsdp=true; DeepSpeed refused), each read once, before any work.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch
from accelerate import Accelerator

from simmim.config import config_from_dict, config_to_dict
from simmim.precision import choose_precision

C = TypeVar("C")  # a PretrainConfig or FinetuneConfig


def follow_launcher(cfg: C, environ: dict[str, str] | None = None) -> C:
    """`cfg` as `accelerate launch` with an FSDP config asks (`--config_file recipes/accelerate/fsdp.yaml`,
    or `--use_fsdp --fsdp_version 2`): train.fsdp=true. Unchanged under any other launch.

    Of the launch config, fsdp_version must be 2, and parameter and activation offload are refused. Its
    fsdp_reshard_after_forward and fsdp_activation_checkpointing combine with train.fsdp_reshard_after_forward
    and train.activation_checkpointing: a setting away from its default in either wins (false for the
    first, true for the second). The wrapping policy and state-dict type do not apply: simmim wraps each
    encoder block and saves per-process safetensors shards. ACCELERATE_USE_FSDP is then removed from this
    process's environment, so that accelerate neither wraps the model itself nor clips through its wrapper.
    """
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return cfg
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"FSDP_VERSION={version} (accelerate launch with fsdp_version {version}): simmim shards with "
            "FSDP2; set fsdp_version: 2 (as recipes/accelerate/fsdp.yaml does) or --fsdp_version 2"
        )
    for variable, what in (
        ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
        ("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "fsdp_activation_checkpointing_offload"),
    ):
        if env.get(variable, "false").lower() == "true":
            raise ValueError(
                f"{variable}=true (accelerate launch with {what}: true): simmim does not offload to the CPU; "
                f"set {what}: false"
            )
    given = env.get("FSDP_RESHARD_AFTER_FORWARD", "true")
    if given.lower() not in ("true", "false"):
        raise ValueError(
            f"FSDP_RESHARD_AFTER_FORWARD={given} (accelerate launch with fsdp_reshard_after_forward): "
            "expected true or false under FSDP2"
        )
    train = cfg.train
    reshard = train.fsdp_reshard_after_forward and given.lower() == "true"
    checkpointing = (
        train.activation_checkpointing or env.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true"
    )
    tree = config_to_dict(cfg)
    tree["train"] |= {
        "fsdp": True,
        "fsdp_reshard_after_forward": reshard,
        "activation_checkpointing": checkpointing,
    }
    try:
        followed = config_from_dict(type(cfg), tree)
    except ValueError as e:  # e.g. train.precision=fp16, which FSDP cannot take
        raise ValueError(f"{e} (train.fsdp=true comes from accelerate launch's FSDP config)") from None
    env.pop("ACCELERATE_USE_FSDP")
    if int(env.get("RANK", "0")) == 0:
        print(
            f"train.fsdp=true: accelerate launch asked for FSDP; simmim shards each encoder block with its own "
            f"FSDP2 (reshard_after_forward {str(reshard).lower()}, activation checkpointing "
            f"{'on' if checkpointing else 'off'})"
        )
    return followed


def make_accelerator(precision: str = "launcher", fsdp: bool = False) -> Accelerator:
    """The run's Accelerator, with autocast as `train.precision` asks (see `simmim.precision`); `fsdp`
    (train.fsdp) needs several processes to shard over.

    `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA would otherwise start N
    unrelated single-process runs: there, the processes join over gloo on CPU.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # ZeRO would shard the model its own way, behind the loop's back (simmim.sharding says more).
        raise ValueError(
            "ACCELERATE_USE_DEEPSPEED=true (accelerate launch with DeepSpeed): simmim shards with FSDP2; "
            "launch with --config_file recipes/accelerate/fsdp.yaml"
        )
    # An FSDP launch: training has read it as train.fsdp=true (launch.follow_launcher); anything else (an
    # evaluation) runs replicated. accelerate must not wrap the model with its own FSDP either way.
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if fsdp and not multi_process:
        raise ValueError(
            "train.fsdp=true shards the model across processes, and this is one: launch with accelerate "
            "launch --config_file recipes/accelerate/fsdp.yaml --num_processes N (N >= 2)"
        )
    mixed, _ = choose_precision(precision)
    if fsdp and mixed == "fp16":  # accelerate launch --mixed_precision fp16 with train.precision=launcher
        raise ValueError("fp16 autocast with train.fsdp=true: its gradient scaler does not reach the sharded "
                         "optimizer; launch with --mixed_precision bf16")  # fmt: skip
    return Accelerator(cpu=multi_process and not torch.cuda.is_available(), mixed_precision=mixed)
