"""How a run is launched: the Accelerator (its processes, device, autocast and collective timeout) and what
`accelerate launch` asked for (an FSDP config read as train.fsdp=true; DeepSpeed refused), each read once,
before any work; and how a lost peer process stops a run (`peers_must_answer`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from simmim.config import config_from_dict, config_to_dict
from simmim.errors import PeerLostError
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


def make_accelerator(
    precision: str = "launcher", fsdp: bool = False, collective_timeout_s: float | None = None
) -> Accelerator:
    """The run's Accelerator, with autocast as `train.precision` asks (see `simmim.precision`); `fsdp`
    (train.fsdp) needs several processes to shard over; `collective_timeout_s` (train.collective_timeout_s;
    None: torch's default, 30 min for gloo, 10 for NCCL) bounds every wait for another process.

    Under gloo the timeout ends the waiting collective with an error, which `peers_must_answer` turns into
    one line. Under NCCL, torch's watchdog ends the process after it (TORCH_NCCL_ASYNC_ERROR_HANDLING,
    3 by default since torch 2.2: tear the process down), with torch's message rather than ours: the
    collectives run on the GPU, and the loop's thread learns of a timeout only from a blocking wait
    (TORCH_NCCL_BLOCKING_WAIT=1), which would block the host on every collective.

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
    handlers = []
    if collective_timeout_s is not None:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s)))
    cpu = multi_process and not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=handlers)


# What gloo's transport says of a peer that is gone (killed, crashed) and of one that did not answer in time.
_CLOSED = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Socket closed|Connection refused")
_TIMED_OUT = re.compile(r"Timed out waiting (\d+)ms")


def peer_failure(error: BaseException) -> str | None:
    """What a collective's error says happened to another process, in words, or None for any other error."""
    message = str(error)
    if match := _TIMED_OUT.search(message):
        return f"a peer process did not answer within {int(match[1]) / 1000:g} s (train.collective_timeout_s)"
    if _CLOSED.search(message):
        return "a peer process's connection closed (it exited or was killed)"
    return None


@contextmanager
def peers_must_answer(
    accelerator: Accelerator, step: Callable[[], int], intact: Callable[[], str]
) -> Iterator[None]:
    """Turn a collective that failed because another process died or hung into `PeerLostError`: one line
    saying what happened, at which `step()`, and `intact()` (which checkpoint to resume from). The same
    command then resumes exactly, as after SIGKILL. A single process lets every error through."""
    try:
        yield
    except RuntimeError as e:
        what = peer_failure(e) if accelerator.num_processes > 1 else None
        if what is None:
            raise
        raise PeerLostError(f"{what} at step {step()}; {intact()}") from e
