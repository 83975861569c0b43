"""The automatic precision choice (train.precision=auto) with the hardware check mocked, the overrides, and
the record a run writes of what ran and why."""

from __future__ import annotations

import json

import pytest
import torch

from simmim import precision
from simmim.config import PretrainConfig, load_config
from simmim.launch import make_accelerator
from simmim.precision import choose_precision


@pytest.fixture
def machine(monkeypatch):
    """Set the mocked machine: CPU flags, and a CUDA device with or without bf16 (None: no CUDA)."""

    def set_machine(flags=(), cuda_bf16=None, launcher=None):
        monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_bf16 is not None)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bool(cuda_bf16))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "H200")
        if launcher is None:
            monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
        else:
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)

    return set_machine


@pytest.mark.parametrize(
    "flags, cuda_bf16, expected, why",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, None, "bf16", "the CPU has avx512_bf16"),
        ({"amx_bf16", "amx_tile", "avx512_bf16"}, None, "bf16", "the CPU has amx_bf16 and avx512_bf16"),
        ({"avx2", "avx512f"}, None, "no", "neither AMX nor avx512_bf16"),
        (set(), None, "no", "neither AMX nor avx512_bf16"),  # flags unreadable (not Linux)
        (set(), True, "bf16", "CUDA device H200 supports bf16"),
        ({"avx512_bf16"}, False, "no", "CUDA device H200 has no bf16"),  # the GPU decides, not the CPU
    ],
)
def test_auto_picks_bf16_where_the_hardware_does_it_fast(machine, flags, cuda_bf16, expected, why):
    machine(flags, cuda_bf16)
    mixed, reason = choose_precision("auto")
    assert mixed == expected and why in reason and reason.startswith("train.precision=auto")


def test_auto_follows_accelerate_launch_mixed_precision(machine):
    machine(flags=(), launcher="bf16")
    assert choose_precision("auto")[0] == "bf16"
    machine(flags={"avx512_bf16"}, launcher="fp16")
    assert choose_precision("auto") == (
        "fp16",
        "train.precision=auto, and accelerate launch asked for --mixed_precision fp16",
    )
    machine(flags={"avx512_bf16"}, launcher="no")  # what accelerate launch sets without --mixed_precision
    assert choose_precision("auto")[0] == "bf16"


def test_the_config_overrides_the_hardware(machine):
    machine(flags={"amx_bf16"}, launcher="bf16")
    assert choose_precision("fp32") == ("no", "train.precision=fp32")
    assert choose_precision("fp16") == ("fp16", "train.precision=fp16")
    machine(flags=())
    assert choose_precision("bf16") == ("bf16", "train.precision=bf16")
    assert choose_precision("launcher")[0] == "no"
    machine(flags=(), launcher="bf16")
    assert choose_precision("launcher")[0] == "bf16"
    cfg = load_config(PretrainConfig, overrides=["output_dir=x"])
    assert cfg.train.precision == "auto"  # the default
    assert (
        load_config(PretrainConfig, overrides=["output_dir=x", "train.precision=fp32"]).train.precision
        == "fp32"
    )
    with pytest.raises(ValueError, match="train.precision='fast'"):
        load_config(PretrainConfig, overrides=["output_dir=x", "train.precision=fast"])


def fresh_accelerator(precision_setting: str):
    # accelerate keeps one state per process: reset it so that each call chooses anew.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return make_accelerator(precision_setting)


def test_make_accelerator_applies_the_choice(machine):
    machine(flags=())
    try:
        assert fresh_accelerator("auto").mixed_precision == "no"
        assert fresh_accelerator("bf16").mixed_precision == "bf16"
        machine(flags={"avx512_bf16"})
        assert fresh_accelerator("auto").mixed_precision == "bf16"
    finally:
        fresh_accelerator("fp32")  # leave the process's state as the other tests expect


def test_a_run_logs_which_precision_ran_and_why(tmp_path):
    from helpers import TINY_MODEL, tiny_data
    from helpers import run_script as run

    args = [f"output_dir={tmp_path}", *tiny_data(), *TINY_MODEL, "mask.patch_size=16", "train.max_steps=1"]
    result = run("pretrain.py", [*args, "train.precision=bf16", "train.eval_every_steps=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    chosen = [r for r in records if r["kind"] == "precision"]
    assert (
        len(chosen) == 1
        and chosen[0]["mixed_precision"] == "bf16"
        and chosen[0]["why"] == "train.precision=bf16"
    )
    assert "autocast: bf16, as train.precision=bf16" in result.stdout
    # The masked L1 stays in float32 under bf16 autocast.
    assert all(isinstance(r["masked_l1"], float) for r in records if r["kind"] == "eval")


def test_a_deepspeed_launch_is_refused_before_any_work(tmp_path, monkeypatch):
    """accelerate launch --use_deepspeed sets it: ZeRO would shard a model the loop and checkpoints assume
    replicated (FSDP launches are followed, see test_fsdp.py)."""
    from helpers import TINY_MODEL, tiny_data
    from helpers import run_script as run

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    out = tmp_path / "run"
    result = run("pretrain.py", [f"output_dir={out}", *tiny_data(), *TINY_MODEL, "mask.patch_size=16"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ACCELERATE_USE_DEEPSPEED=true")
    assert "launch with --config_file recipes/accelerate/fsdp.yaml" in result.stderr and not out.exists()
