"""FSDP2 (`train.fsdp=true`, or accelerate launch with recipes/accelerate/fsdp.yaml) over two CPU processes
(gloo): the same weights as DDP, the model and optimizer sharded in the checkpoints, an exact resume after
SIGKILL, and an export Transformers loads whole."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, TINY_MODEL, script_env, tiny_data
from safetensors.torch import load_file

PRETRAIN = [
    *tiny_data(batch_size=8),
    *TINY_MODEL,
    "mask.patch_size=16",
    "model.drop_path_rate=0.1",  # the same draws under both: each process seeds its own, as under DDP
    "optim.layer_decay=0.75",  # parameter groups with their own learning rates
    "optim.base_lr=1e-2",
    "optim.warmup_epochs=null",
    "optim.warmup_steps=2",
    "optim.grad_accum_steps=2",
    "train.precision=fp32",
    "train.log_every_steps=2",
    "train.save_every_steps=2",
    "train.eval_every_steps=6",
    "train.max_steps=12",
    "train.ema=0.9",  # an EMA that moves within 12 steps
]


FSDP_CONFIG = ["--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml")]


def launch(script: str, args: list[str], port: int, how: Sequence[str] = ("--multi_gpu",)) -> list[str]:
    """accelerate launch over 2 processes; `how`: --multi_gpu (DDP, or FSDP with train.fsdp=true) or
    FSDP_CONFIG with any --fsdp_* flags."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), str(ROOT / "scripts" / script), *args,
    ]  # fmt: skip


def run(
    script: str, args: list[str], port: int, how: Sequence[str] = ("--multi_gpu",)
) -> subprocess.CompletedProcess:
    command = launch(script, args, port, how)
    return subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=300)


def latest_step(run_dir: Path) -> int:
    try:
        index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
        return int(index["latest"].removeprefix("step_"))
    except (FileNotFoundError, json.JSONDecodeError, TypeError, AttributeError):
        return -1


def processes_with(argument: str) -> list[int]:
    """The processes whose command line holds `argument`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if argument.encode() in cmdline.read_bytes().split(b"\0"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # gone in between
            continue
    return pids


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 12 steps under DDP and under FSDP (launched with accelerate's FSDP config; the resume test
    launches train.fsdp=true with --multi_gpu and must reach the same bits)."""
    root = tmp_path_factory.mktemp("fsdp")
    for name, how, port in (("ddp", ["--multi_gpu"], 29561), ("fsdp", FSDP_CONFIG, 29562)):
        result = run("pretrain.py", [f"output_dir={root / name}", *PRETRAIN], port, how)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "train.fsdp=true: accelerate launch asked for FSDP" in result.stdout
    assert yaml.safe_load((root / "fsdp" / "config.yaml").read_text())["train"]["fsdp"] is True
    return root


def test_fsdp_trains_as_ddp_does(runs):
    ddp, fsdp = weights(runs / "ddp"), weights(runs / "fsdp")
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-4, msg=key)
    losses = {
        name: [json.loads(line) for line in (runs / name / "log.jsonl").read_text().splitlines()]
        for name in ("ddp", "fsdp")
    }
    for kind, value in (("train", "loss"), ("eval", "masked_l1"), ("eval", "ema_masked_l1")):
        a = [r[value] for r in losses["ddp"] if r["kind"] == kind]
        b = [r[value] for r in losses["fsdp"] if r["kind"] == kind]
        assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, value
    # the EMA lags the model: its evaluation differs from the model's
    last = [r for r in losses["fsdp"] if r["kind"] == "eval"][-1]
    assert last["ema_masked_l1"] != last["masked_l1"]


def test_fsdp_checkpoints_hold_each_process_shard(runs):
    step = runs / "fsdp" / "checkpoints" / "step_00000012"
    shards = [load_file(str(step / f"model_shard_{rank}.safetensors")) for rank in (0, 1)]
    # DDP's checkpoint holds the whole model under the same (simmim's own) names
    whole = load_file(str(runs / "ddp" / "checkpoints" / "step_00000012" / "model.safetensors"))
    assert set(shards[0]) == set(shards[1]) == set(whole)
    for key in whole:  # each process holds its rows (dim 0) of every parameter
        assert shards[0][key].shape[0] + shards[1][key].shape[0] == whole[key].shape[0], key
        joined = torch.cat([shards[0][key], shards[1][key]])
        torch.testing.assert_close(joined, whole[key], rtol=0, atol=1e-4, msg=key)
    ema = [load_file(str(step / f"ema_shard_{rank}.safetensors")) for rank in (0, 1)]
    assert all(ema[0][k].shape == shards[0][k].shape for k in whole)  # sharded as the model is
    optimizer = load_file(str(step / "optimizer_shard_0.safetensors"))
    assert any(k.endswith("/exp_avg_sq") for k in optimizer)
    groups = json.loads((step / "optimizer_groups_0.json").read_text())
    assert len({g["lr"] for g in groups}) > 1  # the layer-decay groups survive the sharding
    assert not (runs / "ddp" / "checkpoints" / "step_00000012" / "model_shard_0.safetensors").exists()


def test_the_fsdp_export_loads_whole_in_transformers(runs):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.DeiTForMaskedImageModeling.from_pretrained(
        runs / "fsdp" / "export", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = weights(runs / "fsdp")
    theirs = model.state_dict()
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in theirs.values())
    common = ours.keys() & theirs.keys()  # the export's names, where Transformers' version shares them
    assert common and all(torch.equal(ours[k], theirs[k]) for k in common)


def test_fsdp_resumes_exactly_after_sigkill(tmp_path, runs):
    out = tmp_path / "killed"
    args = [f"output_dir={out}", *PRETRAIN, "train.fsdp=true"]
    proc = subprocess.Popen(
        launch("pretrain.py", args, 29563), env=script_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while latest_step(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # The launcher and both processes at once (torchrun starts its workers in sessions of their own).
    for pid in processes_with(f"output_dir={out}"):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(out)
    assert 2 <= killed_at < 12, f"the run was not killed mid-run (latest checkpoint {killed_at})"
    result = run("pretrain.py", args, 29564)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {out}/checkpoints/step_{killed_at:08d}" in result.stdout
    mine, reference = weights(out), weights(runs / "fsdp")
    for key in reference:
        assert torch.equal(mine[key], reference[key]), key
    # the EMA resumed too: the final evaluation of its weights is the uninterrupted run's
    evals = [
        [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines() if '"eval"' in line][-1]
        for d in (out, runs / "fsdp")
    ]
    assert evals[0]["step"] == 12 and evals[0]["ema_masked_l1"] == evals[1]["ema_masked_l1"]


def test_fsdp_fine_tuning_trains_as_ddp_does(tmp_path):
    common = [
        *tiny_data(batch_size=8), *TINY_MODEL, "model.head=cls", "train.precision=fp32", "train.max_steps=4",
        "train.eval_every_steps=2", "optim.warmup_epochs=null", "optim.warmup_steps=1", "optim.layer_decay=0.75",
        "aug.rand_augment=false",
    ]  # fmt: skip
    outputs = {}
    # The settings of accelerate's FSDP config that simmim follows: blocks kept gathered from forward to
    # backward, and activation checkpointing, which recomputes each block: the same weights.
    sharded = [
        *FSDP_CONFIG,
        "--fsdp_reshard_after_forward",
        "false",
        "--fsdp_activation_checkpointing",
        "true",
    ]
    for name, how, port in (("ddp", ["--multi_gpu"], 29565), ("fsdp", sharded, 29566)):
        outputs[name] = tmp_path / name
        result = run("finetune.py", [f"output_dir={outputs[name]}", *common], port, how)
        assert result.returncode == 0, result.stderr[-3000:]
    train = yaml.safe_load((outputs["fsdp"] / "config.yaml").read_text())["train"]
    assert train["fsdp"] and train["activation_checkpointing"] and not train["fsdp_reshard_after_forward"]
    ddp, fsdp = weights(outputs["ddp"]), weights(outputs["fsdp"])
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-4, msg=key)
    metrics = [json.loads((outputs[n] / "metrics.json").read_text())["best"] for n in ("ddp", "fsdp")]
    assert abs(metrics[0]["top1"] - metrics[1]["top1"]) < 1e-6


def test_fsdp_needs_several_processes_and_no_fp16(tmp_path):
    from helpers import run_script

    one = run_script("pretrain.py", [f"output_dir={tmp_path / 'one'}", *PRETRAIN, "train.fsdp=true"])
    assert one.returncode == 2 and "error: train.fsdp=true shards the model across processes" in one.stderr
    fp16 = run_script(
        "pretrain.py",
        [f"output_dir={tmp_path / 'fp16'}", *PRETRAIN, "train.fsdp=true", "train.precision=fp16"],
    )
    assert (
        fp16.returncode == 2
        and "train.precision='fp16': must not be used with train.fsdp=true" in fp16.stderr
    )
    assert not any((tmp_path / name).exists() for name in ("one", "fp16"))


def test_an_fsdp_checkpoint_exports_with_its_shards_joined(runs, tmp_path):
    from simmim.exports import export_run

    export_run(runs / "fsdp", tmp_path / "export")  # scripts/export.py, from the step-12 checkpoint
    joined, final = load_file(str(tmp_path / "export" / "model.safetensors")), weights(runs / "fsdp")
    assert joined.keys() == final.keys()
    for key in final:
        assert torch.equal(joined[key], final[key]), key


ACCELERATE_FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}


def pretrain_config(*overrides: str):
    from simmim.config import PretrainConfig, load_config

    return load_config(PretrainConfig, None, ["output_dir=runs/x", *overrides])


def test_an_accelerate_fsdp_launch_is_read_as_train_fsdp():
    from simmim.launch import follow_launcher

    plain = pretrain_config()
    assert follow_launcher(plain, {}) is plain  # any other launch: unchanged
    env = {**ACCELERATE_FSDP, "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    train = follow_launcher(plain, env).train
    assert train.fsdp and not train.fsdp_reshard_after_forward and train.activation_checkpointing
    assert "ACCELERATE_USE_FSDP" not in env  # accelerate must not wrap the model itself
    # A setting away from its default wins, from either side.
    cfg = pretrain_config("train.activation_checkpointing=true", "train.fsdp_reshard_after_forward=false")
    followed = follow_launcher(cfg, dict(ACCELERATE_FSDP))
    train = followed.train
    assert train.fsdp and not train.fsdp_reshard_after_forward and train.activation_checkpointing
    assert followed.model == cfg.model  # the rest unchanged


@pytest.mark.parametrize(
    "setting, overrides, message",
    [
        (
            {"FSDP_VERSION": "1"},
            [],
            "FSDP_VERSION=1 (accelerate launch with fsdp_version 1): simmim shards with FSDP2",
        ),
        (
            {"FSDP_OFFLOAD_PARAMS": "true"},
            [],
            "FSDP_OFFLOAD_PARAMS=true (accelerate launch with fsdp_offload_params",
        ),
        ({"FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "true"}, [], "simmim does not offload to the CPU"),
        (
            {"FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"},
            [],
            "=SHARD_GRAD_OP (accelerate launch with fsdp_resh",
        ),
        ({}, ["train.precision=fp16"], "train.precision='fp16': must not be used with train.fsdp=true"),
    ],
)
def test_fsdp_launch_settings_simmim_cannot_follow_are_refused(setting, overrides, message):
    from simmim.launch import follow_launcher

    env = {**ACCELERATE_FSDP, **setting}
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        follow_launcher(pretrain_config(*overrides), env)
    assert "\n" not in str(raised.value) and "ACCELERATE_USE_FSDP" in env  # one line; nothing changed
    if overrides:  # says where train.fsdp=true came from
        assert str(raised.value).endswith("(train.fsdp=true comes from accelerate launch's FSDP config)")


def test_a_run_resumed_without_its_fsdp_launch_is_refused_before_any_work(runs, tmp_path):
    from helpers import run_script

    copy = tmp_path / "fsdp"
    shutil.copytree(runs / "fsdp", copy)
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    result = run_script("pretrain.py", [f"output_dir={copy}", *PRETRAIN])  # plain python: no FSDP
    assert result.returncode == 2
    assert f"error: {copy}/checkpoints/step_00000012 was saved by a train.fsdp=true run" in result.stderr
    assert "resume it as it was launched" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == before  # nothing rewritten


def test_reshard_after_forward_false_keeps_blocks_gathered_after_forward():
    """train.fsdp_reshard_after_forward reaches fully_shard: with false, a block's parameters stay
    unsharded from its forward to its backward (one process, gloo)."""
    code = """
import os, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from simmim import sharding
from simmim.models import DeiTConfig, DeiTForMaskedImageModeling
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29568")
dist.init_process_group("gloo", rank=0, world_size=1)
config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, encoder_stride=8)
for reshard in (True, False):
    model = sharding.shard(DeiTForMaskedImageModeling(config), torch.device("cpu"), 1, reshard)
    model(torch.randn(2, 3, 32, 32))
    block = model.deit.layers[0]
    print(reshard, all(isinstance(p, DTensor) for p in block.parameters()))
"""
    result = subprocess.run([sys.executable, "-c", code], env=script_env(), capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True", "False", "False"]


def test_accelerate_launch_use_fsdp_without_version_2_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    how = ["--use_fsdp"]  # accelerate's default fsdp_version is 1
    result = run("pretrain.py", [f"output_dir={out}", *PRETRAIN], 29567, how)
    assert result.returncode != 0 and "error: FSDP_VERSION=1" in result.stderr and not out.exists()
