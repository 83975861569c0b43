"""End-to-end tests of scripts/pretrain.py as a user runs it: the smoke recipe, exact resume after SIGKILL
and SIGTERM, and two processes equal to one with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_MODEL, script_env, tiny_data
from helpers import run_script as run
from safetensors.torch import load_file

PRETRAIN = ROOT / "scripts" / "pretrain.py"
# A tiny run: 256 synthetic images, batch 16 -> 16 steps per epoch, 2 epochs.
TINY = [
    *tiny_data(synthetic_size=256),
    *TINY_MODEL,
    "model.drop_path_rate=0.1",  # exercises the RNG state across a resume
    "train.precision=fp32",  # the processes started here directly are not pinned by helpers.run_script
    "mask.patch_size=16",
    "optim.base_lr=1e-2",
    "optim.warmup_epochs=0.5",
    "train.epochs=2",
    "train.save_every_steps=4",
    "train.log_every_steps=4",
    "train.eval_every_steps=16",
    "train.eval_batches=1",
]


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    return run("pretrain.py", args)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
    return load_file(str(run_dir / "checkpoints" / index["latest"] / "model.safetensors"))


def latest_step(run_dir: Path) -> int:
    index = run_dir / "checkpoints" / "index.json"
    if not index.is_file():
        return -1
    try:
        latest = json.loads(index.read_text())["latest"]
        return json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())["step"]
    except (json.JSONDecodeError, FileNotFoundError):
        return -1  # being replaced right now


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference")
    result = run_script([f"output_dir={out}", *TINY])
    assert result.returncode == 0, result.stderr[-3000:]
    assert latest_step(out) == 32
    return final_weights(out)


def test_smoke_recipe_end_to_end(tmp_path):
    """The README's main job (recipes/smoke/pretrain_synthetic.yaml) for a quarter of its 512 steps: it
    trains, exports for Transformers, and its held-out reconstruction already beats filling each masked
    pixel with the image's mean visible colour (the full job reaches 0.72x, see the README)."""
    out = tmp_path / "smoke"
    result = run_script(
        [
            "--recipe",
            str(ROOT / "recipes/smoke/pretrain_synthetic.yaml"),
            f"output_dir={out}",
            "train.epochs=2",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = run(
        "eval_reconstruction.py",
        ["--checkpoint", str(out), "--data", "synthetic", "--out", str(out / "eval")],
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    fill = metrics["baselines"]["mean_fill"]["masked_l1"]
    assert metrics["num_images"] == 256
    assert metrics["masked_l1"] <= 0.9 * fill, (metrics["masked_l1"], fill)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8  # every 16 of the 128 steps
    # Loss goes down: the last quarter of the run is clearly below the first log window.
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses
    assert any(r["kind"] == "eval" and "masked_l1" in r for r in records)
    assert (out / "config.yaml").is_file()
    assert list((out / "tb").glob("events.out.tfevents*"))
    assert latest_step(out) == 128
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "simmim_config.yaml"):
        assert (out / "export" / name).is_file(), name

    from simmim.models import DeiTForMaskedImageModeling

    model, info = DeiTForMaskedImageModeling.from_pretrained(out / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    transformers = pytest.importorskip("transformers")
    theirs, info = transformers.DeiTForMaskedImageModeling.from_pretrained(
        out / "export", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 64) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x, bool_masked_pos=mask).reconstruction,
            theirs.eval()(x, bool_masked_pos=mask).reconstruction,
            atol=1e-4,
            rtol=0,
        )


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "killed"
    env = script_env()
    proc = subprocess.Popen(
        [sys.executable, str(PRETRAIN), f"output_dir={out}", *TINY],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    # Kill after the checkpoint of step 20 (mid-epoch: epoch 1 has 16 steps), wherever the run then is.
    while latest_step(out) < 20 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(out)
    assert 20 <= killed_at < 32, f"the run was not killed mid-run (latest checkpoint {killed_at})"

    result = run_script([f"output_dir={out}", *TINY])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr
    assert latest_step(out) == 32
    assert_same_weights(final_weights(out), reference)
    # The log reads as one run: no step is logged twice.
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert len(train_steps) == len(set(train_steps)) == 8


def test_sigterm_saves_then_resumes_exactly(tmp_path, reference):
    out = tmp_path / "terminated"
    env = script_env()
    # One loader worker, and the signal goes to the whole process group, as a scheduler sends it: the worker
    # must survive until the checkpoint is written. (Results do not depend on the number of workers.)
    args = [f"output_dir={out}", *TINY, "train.save_every_steps=1000", "data.num_workers=1"]
    proc = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    log = out / "log.jsonl"
    while (
        not (log.is_file() and '"train"' in log.read_text())
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped_at = latest_step(out)
    assert 4 <= stopped_at < 32, output[-3000:]  # saved by the signal, not by the schedule (every 1000 steps)

    result = run_script(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_weights(out), reference)


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    pytest.importorskip("accelerate")
    # No drop path: each process draws its own stochastic-depth masks, one process draws them for all.
    common = [*TINY, "model.drop_path_rate=0.0", "train.max_steps=3", "train.save_every_steps=3"]
    one = tmp_path / "one"
    result = run_script([f"output_dir={one}", *common, "data.batch_size=16"])
    assert result.returncode == 0, result.stderr[-3000:]

    two = tmp_path / "two"
    env = script_env()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
    ]
    result = subprocess.run(
        [*launch, str(PRETRAIN), f"output_dir={two}", *common, "data.batch_size=8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    schedule = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()][0]
    assert (
        schedule["kind"] == "schedule" and schedule["num_processes"] == 2 and schedule["global_batch"] == 16
    )
    assert_same_weights(final_weights(two), final_weights(one), atol=1e-5)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    common = [*TINY, "model.drop_path_rate=0.0", "train.max_steps=3", "train.save_every_steps=3"]
    big = tmp_path / "big"
    assert run_script([f"output_dir={big}", *common, "data.batch_size=16"]).returncode == 0
    accumulated = tmp_path / "accumulated"
    result = run_script(
        [f"output_dir={accumulated}", *common, "data.batch_size=8", "optim.grad_accum_steps=2"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(final_weights(accumulated), final_weights(big), atol=1e-5)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "diverged"
    # An absurd learning rate: the weights blow up within a few steps and the loss becomes inf/nan.
    args = [f"output_dir={out}", *TINY, "optim.base_lr=1e12", "optim.warmup_epochs=0", "optim.clip_grad=null"]
    result = run_script([*args, "train.save_every_steps=1", "train.log_every_steps=1"])
    assert result.returncode == 1
    assert "non-finite at step" in result.stderr
    # One line saying what happened and which checkpoint is intact, no traceback.
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss became non-finite") and "is intact" in last
    bad_step = int(result.stderr.split("non-finite at step ")[1].split(";")[0])
    # The newest checkpoint predates the bad step and holds finite weights.
    assert latest_step(out) <= bad_step
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())


def test_export_command_and_keep_last(tmp_path, reference):
    out = tmp_path / "run"
    assert run_script([f"output_dir={out}", *TINY, "train.keep_last=3"]).returncode == 0
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert len(index["checkpoints"]) == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == index["checkpoints"]

    env = script_env()
    oldest = out / "checkpoints" / index["checkpoints"][0]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "export.py"),
            str(out),
            "--out",
            str(tmp_path / "e"),
            "--checkpoint",
            str(oldest),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from simmim.models import DeiTForMaskedImageModeling

    exported = DeiTForMaskedImageModeling.from_pretrained(tmp_path / "e").state_dict()
    assert_same_weights(exported, load_file(str(oldest / "model.safetensors")))
    assert (tmp_path / "e" / "preprocessor_config.json").is_file()
