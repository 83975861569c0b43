"""scripts/study.py end to end on tiny synthetic runs: every stage, the report's numbers against the runs'
own metrics, skipping finished stages, resuming one, and spec errors raised before any work."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, script_env
from helpers import run_script as run

from simmim.study import load_spec, plan, run_study

ARCH = {"variant": "tiny", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
ARCH |= {"intermediate_size": 64, "image_size": 32, "patch_size": 8}
DATA = {"path": "synthetic", "synthetic_size": 64, "batch_size": 16, "num_workers": 0}
OPTIM = {"base_lr": 1.6e-2, "min_lr": 1.6e-4, "warmup_epochs": 0.5, "weight_decay": 0.05}
LIGHT_AUG = {
    "rand_augment": False,
    "random_erasing": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "crop_scale": [0.35, 1.0],
}
RECIPES = {
    "pretrain": {
        "data": DATA,
        "model": ARCH,
        "mask": {"patch_size": 16, "ratio": 0.6},
        "optim": OPTIM,
        "train": {"epochs": 1, "save_every_steps": 2, "log_every_steps": 2, "eval_every_steps": 4, "eval_batches": 1},
    },
    "teacher": {
        "data": DATA,
        "model": {"head": "cnn", "arch": "resnet18", "image_size": 32, "patch_size": 8},
        "optim": OPTIM,
        "train": {"epochs": 2, "save_every_steps": 4, "log_every_steps": 2},
        "aug": LIGHT_AUG,
    },
    "student": {
        "data": DATA,
        "model": {"head": "cls", **ARCH},
        "optim": {**OPTIM, "layer_decay": 0.75},
        "train": {"epochs": 2, "save_every_steps": 4, "log_every_steps": 2},
        "aug": LIGHT_AUG,
        "distill": {"kind": "hard"},
        "teacher": {"arch": "resnet18"},
    },
}  # fmt: skip
ARMS = [
    {"name": "scratch_cls", "label": "Scratch -> cls", "head": "cls", "init": "scratch", "seeds": [0, 1],
     "overrides": ["optim.layer_decay=1.0"]},
    {"name": "simmim_cls", "head": "cls", "init": "simmim", "seeds": [0, 1]},
    {"name": "simmim_distill", "head": "distill", "init": "simmim", "seeds": [3]},
]  # fmt: skip


def write_spec(directory: Path, **changes) -> Path:
    for name, recipe in RECIPES.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    spec = {
        "output_dir": str(directory / "study"),
        "data": "synthetic",
        **{name: str(directory / f"{name}.yaml") for name in RECIPES},
        "arms": ARMS,
        "comparisons": [["simmim_cls", "scratch_cls", 5.0], ["simmim_distill", "simmim_cls", 0.0]],
        "reconstruction_images": 4,
        **changes,
    }
    path = directory / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("study")
    spec = write_spec(directory)
    result = run("study.py", [str(spec)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return spec, directory / "study"


def test_every_stage_runs_once_in_order(study):
    spec, out = study
    names = [s.name for s in plan(load_spec(spec))]
    assert names == [
        "pretrain", "reconstruction", "teacher", "teacher_final", "scratch_cls_s0", "simmim_cls_s0",
        "simmim_distill_s3", "scratch_cls_s1", "simmim_cls_s1",
    ]  # fmt: skip
    for name in names:
        record = json.loads(
            (out / name.replace("teacher_final", "teacher/final") / "study_stage.json").read_text()
        )
        assert record["done"] and record["seconds"] > 0
    # The teacher the students saw is the teacher run's last checkpoint, not its best-on-validation export.
    assert (out / "teacher" / "final" / "cnn_config.json").is_file()
    distill = yaml.safe_load((out / "simmim_distill_s3" / "config.yaml").read_text())
    assert distill["teacher"]["path"] == str(out / "teacher" / "final")
    assert distill["model"]["init"] == str(out / "pretrain") and distill["seed"] == 3
    scratch = yaml.safe_load((out / "scratch_cls_s1" / "config.yaml").read_text())
    assert scratch["optim"]["layer_decay"] == 1.0 and scratch["model"]["init"] == "scratch"


def test_report_numbers_are_the_runs_own(study):
    _, out = study
    r = json.loads((out / "study.json").read_text())

    def final_top1(run: str) -> float:
        return json.loads((out / run / "metrics.json").read_text())["epochs"][-1]["top1"]

    scratch = [final_top1("scratch_cls_s0"), final_top1("scratch_cls_s1")]
    simmim = [final_top1("simmim_cls_s0"), final_top1("simmim_cls_s1")]
    assert r["arms"]["scratch_cls"]["top1"] == scratch
    # Sample standard deviation of two values: |a - b| / sqrt(2).
    mean, std = r["arms"]["scratch_cls"]["top1_mean_std"]
    assert mean == pytest.approx(sum(scratch) / 2) and std == pytest.approx(
        abs(scratch[0] - scratch[1]) / 2**0.5
    )
    assert math.isnan(r["arms"]["simmim_distill"]["top1_mean_std"][1])  # one seed: no spread
    gap = r["comparisons"][0]
    assert gap["gap"] == pytest.approx(sum(simmim) / 2 - sum(scratch) / 2)
    assert gap["met"] == (gap["gap"] >= 5.0 and gap["gap"] > gap["spread"])
    assert r["teacher"]["top1"] == final_top1("teacher")
    recon = json.loads((out / "reconstruction" / "metrics.json").read_text())
    assert r["reconstruction"]["masked_l1"] == recon["masked_l1"]

    table = (out / "results.md").read_text()
    assert f"| Scratch -> cls | scratch | cls | 2 | {mean:.2f} ± {std:.2f} |" in table
    assert "| simmim_distill | simmim | distill | 1 |" in table  # label defaults to the name
    assert f"{gap['gap']:+.2f}" in table and "| **total** |" in table
    for png in ("accuracy.png", "pretraining.png", "reconstruction/reconstructions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_stages_and_resumes_an_unfinished_one(study):
    spec, out = study
    before = json.loads((out / "study.json").read_text())
    # As if the study had been killed during simmim_cls_s1: its checkpoints are there, its record not done.
    record_file = out / "simmim_cls_s1" / "study_stage.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "done": False}))
    result = run("study.py", [str(spec)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("skipped") == 8
    assert "== simmim_cls_s1:" in result.stdout
    after = json.loads((out / "study.json").read_text())
    # Resumed from its final checkpoint: the same metrics, and its time accumulates.
    assert after["arms"]["simmim_cls"]["top1"] == before["arms"]["simmim_cls"]["top1"]
    assert after["stage_seconds"]["simmim_cls_s1"] > before["stage_seconds"]["simmim_cls_s1"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"arms": [{**ARMS[0], "head": "mim"}, *ARMS[1:]]}, "head='mim'"),
        ({"arms": [{**ARMS[0], "seeds": []}, *ARMS[1:]]}, "seeds=[]"),
        ({"arms": [{**ARMS[0], "seeds": [1, 1]}, *ARMS[1:]]}, "repeats a seed"),
        ({"arms": [ARMS[0], *ARMS]}, "must be unique"),
        ({"arms": [{**ARMS[0], "overrides": ["optim.no_such_key=1"]}, *ARMS[1:]]}, "no_such_key"),
        ({"student_overrides": ["train.epochs=0"]}, "train.epochs=0"),
        ({"comparisons": [["simmim_cls", "nobody", 5]]}, "nobody"),
        ({"batch": 3}, "unknown keys ['batch']"),
        ({"arms": []}, "expected a non-empty list of arms"),
        ({"data": "/no/such/data"}, "/no/such/data"),
    ],
)
def test_bad_spec_is_refused_before_any_stage(tmp_path, changes, message):
    spec = write_spec(tmp_path, **changes)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        load_spec(spec)
    assert message in str(info.value)
    assert not (tmp_path / "study").exists()


def test_a_finished_stage_made_otherwise_is_not_reused(study, tmp_path):
    spec, out = study
    changed = write_spec(tmp_path, output_dir=str(out), student_overrides=["train.epochs=3"])
    with pytest.raises(ValueError, match="was made by .* use another output directory"):
        run_study(load_spec(changed))


def test_a_failing_stage_stops_the_study_with_the_resume_hint(tmp_path):
    spec = write_spec(tmp_path, teacher_overrides=["model.arch=no_such_net"])
    result = run("study.py", [str(spec)])
    assert result.returncode == 1
    assert "stage teacher failed" in result.stderr and "run the same command to resume" in result.stderr
    assert json.loads((tmp_path / "study" / "pretrain" / "study_stage.json").read_text())["done"]
    assert not (tmp_path / "study" / "scratch_cls_s0").exists()  # nothing after the failure ran


def test_sigterm_stops_the_running_stage_which_saves_and_resumes_later(tmp_path):
    spec = write_spec(
        tmp_path, pretrain_overrides=["data.synthetic_size=4096", "train.save_every_steps=1000"]
    )
    out = tmp_path / "study" / "pretrain"
    study = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "study.py"), str(spec)],
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "log.jsonl").is_file() or "train" not in (out / "log.jsonl").read_text():
        assert study.poll() is None and time.time() < deadline, "pretraining never started"
        time.sleep(0.2)
    study.send_signal(signal.SIGTERM)  # to the study alone, as a scheduler would
    stdout, stderr = study.communicate(timeout=120)
    assert study.returncode == 130, stderr[-2000:]
    assert "run the same command again to resume" in stderr
    record = json.loads((out / "study_stage.json").read_text())
    assert not record["done"] and record["seconds"] > 0
    # The pretraining run got the signal, saved mid-epoch (not at a save_every_steps multiple) and exited.
    assert "saved step" in stdout + stderr
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert (out / "checkpoints" / index["latest"] / "model.safetensors").is_file()  # one to resume from
