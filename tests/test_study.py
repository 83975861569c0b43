"""scripts/study.py end to end on tiny synthetic runs: every stage (probes, sweep, label fractions,
snapshots), the report's numbers against the runs' own metrics, the refusal of an unfair comparison,
skipping finished stages, resuming one, and spec errors raised before any work."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY_ARCH, script_env
from helpers import run_script as run

from simmim.study import describe_comparisons, load_spec, plan, run_study

ARCH = {"variant": "tiny", **TINY_ARCH}
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
        "train": {"precision": "fp32", "epochs": 2, "save_every_steps": 2, "log_every_steps": 2, "eval_every_steps": 4, "eval_batches": 1,
                  "snapshot_epochs": [1]},
    },
    "teacher": {
        "data": DATA,
        "model": {"head": "cnn", "arch": "resnet18", "image_size": 32, "patch_size": 8},
        "optim": OPTIM,
        "train": {"precision": "fp32", "epochs": 2, "save_every_steps": 4, "log_every_steps": 2},
        "aug": LIGHT_AUG,
    },
    "student": {
        "data": DATA,
        "model": {"head": "cls", **ARCH},
        "optim": {**OPTIM, "layer_decay": 0.75},
        "train": {"precision": "fp32", "epochs": 2, "save_every_steps": 4, "log_every_steps": 2},
        "aug": LIGHT_AUG,
        "distill": {"kind": "hard"},
        "teacher": {"arch": "resnet18"},
    },
}  # fmt: skip
ARMS = [
    {"name": "scratch_cls", "label": "Scratch -> cls", "head": "cls", "init": "scratch", "seeds": [0, 1],
     "fractions": [0.5, 1.0]},
    {"name": "simmim_cls", "head": "cls", "init": "simmim", "seeds": [0, 1], "fractions": [0.5, 1.0]},
    {"name": "simmim_e1_cls", "head": "cls", "init": "simmim", "pretrain_epoch": 1, "seeds": [0],
     "fractions": [0.5], "settings_from": "simmim_cls"},
    {"name": "simmim_distill", "head": "distill", "init": "simmim", "seeds": [0], "settings_from": "simmim_cls"},
]  # fmt: skip
SWEEP = {"fraction": 0.5, "holdout": 0.25, "seed": 0,
         "candidates": [["optim.layer_decay=0.75"], ["optim.layer_decay=1.0"]]}  # fmt: skip


def write_spec(directory: Path, **changes) -> Path:
    for name, recipe in RECIPES.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    spec = {
        "output_dir": str(directory / "study"),
        "data": "synthetic",
        **{name: str(directory / f"{name}.yaml") for name in RECIPES},
        "arms": ARMS,
        "fractions": {0.5: ["train.epochs=3"]},
        "sweep": SWEEP,
        "probe": ["--linear-epochs", "5"],
        "probe_goal": 15.0,
        "comparisons": [
            {"arm": "simmim_cls", "baseline": "scratch_cls", "fraction": 0.5, "expected": 5.0},
            {"arm": "simmim_cls", "baseline": "scratch_cls", "fraction": 1.0, "expected": None},
            ["simmim_distill", "simmim_cls", 0.0],
        ],
        "curve": {
            "baseline": "scratch_cls",
            "arms": ["simmim_e1_cls", "simmim_cls"],
            "fraction": 0.5,
            "seed": 0,
        },
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
        "pretrain", "reconstruction", "probe", "probe_e1", "teacher", "teacher_final",
        "scratch_cls_sweep0", "scratch_cls_sweep1", "simmim_cls_sweep0", "simmim_cls_sweep1",
        "scratch_cls_p50_s0", "simmim_cls_p50_s0", "simmim_e1_cls_p50_s0",
        "scratch_cls_p100_s0", "simmim_cls_p100_s0", "simmim_distill_p100_s0",
        "scratch_cls_p50_s1", "simmim_cls_p50_s1", "scratch_cls_p100_s1", "simmim_cls_p100_s1",
    ]  # fmt: skip
    for name in names:
        record = json.loads(
            (out / name.replace("teacher_final", "teacher/final") / "study_stage.json").read_text()
        )
        assert record["done"] and record["seconds"] > 0
    # The teacher the students saw is the teacher run's last checkpoint, not its best-on-validation export.
    assert (out / "teacher" / "final" / "cnn_config.json").is_file()
    distill = yaml.safe_load((out / "simmim_distill_p100_s0" / "config.yaml").read_text())
    assert distill["teacher"]["path"] == str(out / "teacher" / "final")
    assert distill["model"]["init"] == str(out / "pretrain") and distill["seed"] == 0
    snapshot = yaml.safe_load((out / "simmim_e1_cls_p50_s0" / "config.yaml").read_text())
    assert snapshot["model"]["init"] == str(out / "pretrain" / "snapshots" / "epoch_1")
    half = yaml.safe_load((out / "scratch_cls_p50_s1" / "config.yaml").read_text())
    assert half["data"]["label_fraction"] == 0.5 and half["train"]["epochs"] == 3
    assert half["model"]["init"] == "scratch" and not half["data"]["holdout_from_train"]


def test_the_sweep_is_judged_on_a_train_carve_and_its_choice_is_used(study):
    _, out = study
    r = json.loads((out / "study.json").read_text())
    for arm in ("scratch_cls", "simmim_cls"):
        for i in (0, 1):
            cfg = yaml.safe_load((out / f"{arm}_sweep{i}" / "config.yaml").read_text())
            assert cfg["data"]["holdout_from_train"] and cfg["data"]["val_fraction"] == 0.25
            assert cfg["data"]["label_fraction"] == 0.5 and cfg["seed"] == 0
        scores = [
            json.loads((out / f"{arm}_sweep{i}" / "metrics.json").read_text())["epochs"][-1]["top1"]
            for i in (0, 1)
        ]
        assert r["sweep"]["arms"][arm]["carve_top1"] == scores
        best = 0 if scores[0] >= scores[1] else 1
        chosen = SWEEP["candidates"][best]
        assert r["sweep"]["arms"][arm]["chosen"] == chosen
        decay = float(chosen[0].split("=")[1])
        for run_dir in (f"{arm}_p50_s0", f"{arm}_p100_s1"):
            assert (
                yaml.safe_load((out / run_dir / "config.yaml").read_text())["optim"]["layer_decay"] == decay
            )
    simmim = r["sweep"]["arms"]["simmim_cls"]["chosen"]
    for follower in ("simmim_e1_cls_p50_s0", "simmim_distill_p100_s0"):  # settings_from: simmim_cls
        decay = yaml.safe_load((out / follower / "config.yaml").read_text())["optim"]["layer_decay"]
        assert decay == float(simmim[0].split("=")[1])


def test_report_numbers_are_the_runs_own(study):
    _, out = study
    r = json.loads((out / "study.json").read_text())
    assert r["complete"]

    def final_top1(run: str) -> float:
        return json.loads((out / run / "metrics.json").read_text())["epochs"][-1]["top1"]

    scratch = [final_top1("scratch_cls_p50_s0"), final_top1("scratch_cls_p50_s1")]
    simmim = [final_top1("simmim_cls_p50_s0"), final_top1("simmim_cls_p50_s1")]
    half = r["arms"]["scratch_cls"]["fractions"]["0.5"]
    assert half["top1"] == scratch and half["seeds"] == [0, 1]
    # Sample standard deviation of two values: |a - b| / sqrt(2).
    mean, std = half["top1_mean_std"]
    assert mean == pytest.approx(sum(scratch) / 2) and std == pytest.approx(
        abs(scratch[0] - scratch[1]) / 2**0.5
    )
    assert math.isnan(
        r["arms"]["simmim_distill"]["fractions"]["1"]["top1_mean_std"][1]
    )  # one seed: no spread
    gap = r["comparisons"][0]
    assert gap["gap"] == pytest.approx(sum(simmim) / 2 - sum(scratch) / 2)
    paired = [simmim[0] - scratch[0], simmim[1] - scratch[1]]
    assert gap["paired_gaps"] == pytest.approx(paired)
    # the spread the goal is judged against is that of the per-seed gaps (the seeds pair the runs)
    assert gap["spread"] == pytest.approx(abs(paired[0] - paired[1]) / 2**0.5)
    assert gap["met"] == (gap["gap"] >= 5.0 and gap["gap"] > gap["spread"])
    assert half["precision"] == ["fp32", "fp32"] and not gap["precisions_differ"]  # the recipes say fp32
    assert r["comparisons"][1]["met"] is None  # no goal set
    assert r["teacher"]["top1"] == final_top1("teacher")
    recon = json.loads((out / "reconstruction" / "metrics.json").read_text())
    assert r["reconstruction"]["masked_l1"] == recon["masked_l1"]
    probe = json.loads((out / "probe" / "metrics.json").read_text())
    assert r["probes"]["probe"] == probe and "random_init" in probe
    assert "random_init" not in r["probes"]["probe_e1"]  # the snapshot probes share the final one's baseline
    curve = {p["epoch"]: p for p in r["curve"]}
    assert sorted(curve) == [0, 1, 2]
    assert curve[0]["top1"] == scratch[0] and curve[2]["top1"] == simmim[0]
    assert curve[1]["top1"] == final_top1("simmim_e1_cls_p50_s0")
    assert curve[1]["gain"] == pytest.approx(curve[1]["top1"] - scratch[0])
    last = max(probe["encoder"]["knn"], key=int)
    assert curve[2]["probe"]["knn"]["last"] == probe["encoder"]["knn"][last]["top1"]

    table = (out / "results.md").read_text()
    assert "**Partial:" not in table  # every stage ran
    (row,) = [line for line in table.splitlines() if line.startswith("| Scratch -> cls | scratch | cls |")]
    assert f"| {mean:.2f} ± {std:.2f} (n=2: {scratch[0]:.2f}, {scratch[1]:.2f}) |" in row
    assert "| simmim_distill | simmim | distill |" in table  # label defaults to the name
    assert f"{gap['gap']:+.2f}" in table and "| **total** |" in table and "no goal set" in table
    assert "kNN probe, encoder − random init" in table and "simmim vs scratch" in table
    assert f"std of the per-seed gaps {gap['spread']:.2f}" in table
    # the probe goal is judged at the last block, fixed before the probes ran
    linear = probe["encoder"]["linear"]
    last_gain = linear[last]["top1"] - probe["random_init"]["linear"][last]["top1"]
    assert f"Linear probe, encoder − random init: **{last_gain:+.2f}** points at the last block ({last}) " \
        f"(expected ≥ +15.0: {'met' if last_gain >= 15 else 'not met'}, on one probe run" in table  # fmt: skip
    assert "Partial fine-tune probe, encoder − random init" in table and "Partial fine-tune top-1 |" in table
    for png in ("label_efficiency.png", "pretraining_length.png", "pretraining.png", "probe/probe.png",
                "reconstruction/reconstructions.png"):  # fmt: skip
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_stages_and_resumes_an_unfinished_one(study):
    spec, out = study
    before = json.loads((out / "study.json").read_text())
    # As if the study had been killed during simmim_cls_p50_s1: its checkpoints are there, its record not done.
    record_file = out / "simmim_cls_p50_s1" / "study_stage.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "done": False}))
    result = run("study.py", [str(spec)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"^== (\S+):", result.stdout, re.M) == ["simmim_cls_p50_s1"]  # the only one run
    after = json.loads((out / "study.json").read_text())
    # Resumed from its final checkpoint: the same metrics, and its time accumulates.
    assert after["arms"]["simmim_cls"]["fractions"] == {
        k: {**v, "seconds": after["arms"]["simmim_cls"]["fractions"][k]["seconds"]}
        for k, v in before["arms"]["simmim_cls"]["fractions"].items()
    }
    assert after["stage_seconds"]["simmim_cls_p50_s1"] > before["stage_seconds"]["simmim_cls_p50_s1"]


def test_dry_run_prints_every_comparison_and_what_its_arms_differ_in(study):
    spec, _ = study
    result = run("study.py", [str(spec), "--dry-run"])
    assert result.returncode == 0
    lines = [x for x in result.stdout.splitlines() if x.startswith("comparison:")]
    assert len(lines) == 3
    assert "simmim_cls vs scratch_cls at 50% labels differ in: model.init: simmim vs scratch" in lines[0]
    assert "the same sweep for both" in lines[0]
    assert "model.head: distill vs cls" in lines[2]


def test_an_unfair_comparison_is_refused_unless_the_spec_allows_it(tmp_path):
    arms = [{**ARMS[0], "overrides": ["optim.layer_decay=1.0"]}, *ARMS[1:]]
    spec = write_spec(tmp_path, arms=arms)
    with pytest.raises(ValueError, match=r"simmim_cls vs scratch_cls is unfair: the arms also differ in "
                       r"optim.layer_decay: \(recipe\) vs 1.0"):  # fmt: skip
        load_spec(spec)
    assert not (tmp_path / "study").exists()
    # An untuned arm against a tuned one differs in the sweep: refused too.
    with pytest.raises(ValueError, match="sweep: tuned vs not tuned"):
        load_spec(write_spec(tmp_path, arms=[{**ARMS[0], "tune": False}, *ARMS[1:]]))
    comparisons = [{"arm": "simmim_cls", "baseline": "scratch_cls", "fraction": 0.5, "expected": 5.0,
                    "allow": ["optim.layer_decay"]}]  # fmt: skip
    allowed = load_spec(write_spec(tmp_path, arms=arms, comparisons=comparisons, curve=None))
    (line,) = describe_comparisons(allowed)
    assert "optim.layer_decay: (recipe) vs 1.0" in line and "(allowed: optim.layer_decay)" in line
    result = run("study.py", [str(write_spec(tmp_path, arms=arms)), "--dry-run"])
    assert result.returncode == 2 and result.stderr.startswith("error: comparison simmim_cls vs scratch_cls")


def test_only_runs_the_named_stage_and_a_partial_report_says_so(tmp_path):
    spec = write_spec(tmp_path)
    result = run("study.py", [str(spec), "--only", "pretrain", "reconstruction"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "study"
    assert json.loads((out / "pretrain" / "study_stage.json").read_text())["done"]
    assert (out / "pretrain" / "snapshots" / "epoch_1" / "config.json").is_file()
    assert not (out / "probe").exists() and not (out / "results.md").exists()
    result = run("study.py", [str(spec), "--report"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "results.md").read_text()
    assert report.startswith("**Partial: 2 of 20 stages have run.**") and "not run" in report
    assert run("study.py", [str(spec), "--only", "nosuchstage"]).returncode == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"arms": [{**ARMS[0], "head": "mim"}, *ARMS[1:]]}, "head='mim'"),
        ({"arms": [{**ARMS[0], "fractions": [0]}, *ARMS[1:]]}, "expected a label fraction in (0, 1]"),
        ({"arms": [{**ARMS[0], "pretrain_epoch": 7}, *ARMS[1:]]}, "needs init simmim"),
        ({"arms": [*ARMS[:2], {**ARMS[2], "pretrain_epoch": 7}, ARMS[3]]}, "not one of the pretraining's"),
        ({"arms": [*ARMS[:3], {**ARMS[3], "settings_from": "nobody"}]}, "settings_from='nobody'"),
        ({"sweep": {**SWEEP, "candidates": [["optim.layer_decay=0.75"]]}}, "two or more settings"),
        (
            {"sweep": {**SWEEP, "candidates": [["optim.layer_decay=0.75"], ["optim.layer_decay=7"]]}},
            "optim.layer_decay=7",
        ),
        (
            {"comparisons": [{"arm": "simmim_cls", "baseline": "scratch_cls", "fraction": 0.1}]},
            "has no run at 0.1",
        ),
        ({"teacher": None}, "a distilled arm needs a 'teacher' recipe"),
        (
            {"arms": [*ARMS[:2], {**ARMS[2], "settings_from": "simmim_e1_cls"}, ARMS[3]]},
            "must name a tuned arm",
        ),
        ({"arms": [*ARMS[:3], {**ARMS[3], "settings_from": None}]}, "cannot run its own sweep"),
        ({"arms": [{**ARMS[0], "seeds": [5, 6]}, *ARMS[1:]]}, "a comparison needs seeds in common"),
        ({"curve": {"baseline": "scratch_cls", "arms": ["simmim_e1_cls"], "fraction": 1.0}}, "curve: arm"),
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
    changed = write_spec(tmp_path, output_dir=str(out), student_overrides=["train.epochs=4"])
    with pytest.raises(ValueError, match="was made by .* use another output directory"):
        run_study(load_spec(changed))


def test_an_edited_recipe_is_not_reused_finished_or_resumed(study):
    """The arguments name the recipe, not what it says: an edit shows in the run's saved config."""
    spec, out = study
    recipe = spec.parent / "student.yaml"
    original = recipe.read_text()
    try:
        recipe.write_text(yaml.safe_dump({**RECIPES["student"], "optim": {**RECIPES["student"]["optim"],
                                                                          "weight_decay": 0.1}}))  # fmt: skip
        with pytest.raises(ValueError, match=r"ran with other settings than this study gives it "
                                             r"\(optim.weight_decay: 0.05 -> 0.1\)"):  # fmt: skip
            run_study(load_spec(spec))
    finally:
        recipe.write_text(original)


def test_a_comparison_pairs_seeds_and_flags_arms_trained_in_other_precisions():
    from types import SimpleNamespace

    from simmim.study.report import _comparison, _comparison_lines

    def arm(seeds, top1, precision):
        return {"fractions": {"0.1": {"seeds": seeds, "top1": top1, "precision": precision,
                                      "top1_mean_std": (sum(top1) / len(top1), 0.0)}}}  # fmt: skip

    arms = {
        "simmim": {**arm([0, 1, 2], [60.0, 64.0, 70.0], ["bf16", "bf16", "fp32"]), "label": "SimMIM"},
        "scratch": {**arm([0, 2], [50.0, 58.0], ["bf16", "bf16"]), "label": "Scratch"},
    }
    c = _comparison(SimpleNamespace(arm="simmim", baseline="scratch", fraction=0.1, expected=10.0), arms)
    assert c["paired_seeds"] == [0, 2] and c["paired_gaps"] == [10.0, 12.0]  # seed 1 has no pair
    assert c["gap"] == 11.0 and c["spread"] == pytest.approx(2**0.5)
    assert c["met"] and c["difference_of_means"] == pytest.approx(64.666667 - 54.0)
    assert c["precisions_differ"] and c["precision"] == {0: ("bf16", "bf16"), 2: ("fp32", "bf16")}
    line = _comparison_lines({"comparisons": [c], "arms": arms,
                              "comparison_settings": ["x differ in: init"]})[0]  # fmt: skip
    assert "**+11.00** points" in line and "1 seed(s) without a pair left out" in line and ": met." in line
    assert "trained in different precisions** (seed 0: bf16 vs bf16, seed 2: fp32 vs bf16)" in line
    one = _comparison(SimpleNamespace(arm="simmim", baseline="scratch", fraction=0.1, expected=10.0),
                      {**arms, "scratch": {**arm([0], [50.0], ["bf16"]), "label": "Scratch"}})  # fmt: skip
    assert one["met"] is None and math.isnan(one["spread"])  # one pair: no spread, so no verdict


def test_a_failing_stage_stops_the_study_with_the_resume_hint(tmp_path):
    spec = write_spec(tmp_path, teacher_overrides=["model.arch=no_such_net"])
    result = run("study.py", [str(spec)])
    assert result.returncode == 1
    assert "stage teacher failed" in result.stderr and "run the same command to resume" in result.stderr
    assert json.loads((tmp_path / "study" / "pretrain" / "study_stage.json").read_text())["done"]
    assert not (tmp_path / "study" / "scratch_cls_sweep0").exists()  # nothing after the failure ran


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
