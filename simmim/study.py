"""A study: SimMIM pretraining and DeiT distillation against training from scratch, from one spec file.

Every stage is a run of our own scripts, so the study measures exactly what users run. Stages, in order,
each a directory under the study's output_dir:
  pretrain         scripts/pretrain.py on the train split (labels unused)
  reconstruction   scripts/eval_reconstruction.py of the pretrained model on the validation split
  teacher          the CNN teacher from scratch (scripts/finetune.py, model.head=cnn); then teacher/final,
                   its last weights (not the best on validation: nothing is selected on the validation split)
  <arm>_s<seed>    each student arm and seed, all from one student recipe (the same budget for every arm)
Then results.md (the table), accuracy.png, pretraining.png and study.json in output_dir.

A finished stage is skipped; an interrupted one resumes from its newest checkpoint when the same command
runs again (the scripts resume from their output_dir). `scripts/study.py` is the command line.
"""

from __future__ import annotations

import json
import math
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from simmim.config import FinetuneConfig, PretrainConfig, load_config

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
STAGE_RECORD = "study_stage.json"  # in a stage's directory: {"done": bool, "seconds": wall time so far}
INITS = ("scratch", "simmim")
HEADS = ("cls", "distill")


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class Arm:
    """One student arm: a head on an initialisation, run once per seed."""

    name: str  # also its directory prefix: <name>_s<seed>
    label: str  # how tables and plots name it
    head: str  # "cls" or "distill"
    init: str  # "scratch" or "simmim" (the study's pretrained model)
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()  # key.sub=value for this arm only


@dataclass(frozen=True)
class StudySpec:
    """A study file: recipes of the three kinds of run, the arms, and what to compare."""

    output_dir: str
    data: str  # data.path of every stage
    pretrain: str  # recipe paths
    teacher: str
    student: str
    arms: tuple[Arm, ...]
    # (arm, baseline, the gap the study expects in points of top-1), e.g. ("simmim_cls", "scratch_cls", 5.0)
    comparisons: tuple[tuple[str, str, float], ...] = ()
    pretrain_overrides: tuple[str, ...] = ()
    teacher_overrides: tuple[str, ...] = ()
    student_overrides: tuple[str, ...] = ()
    reconstruction_images: int = 8


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ValueError(f"{key}={value!r}: expected a list of 'key.sub=value' strings")
    return tuple(value)


def load_spec(path: str | Path, output_dir: str | None = None) -> StudySpec:
    """Read and check a study file; every recipe and override is validated here, before any stage runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f for f in StudySpec.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (expected some of {sorted(known)})")
    for key in ("output_dir", "data", "pretrain", "teacher", "student", "arms"):
        if key not in raw:
            raise ValueError(f"{path}: {key!r} is required")
    if (
        not isinstance(raw["arms"], list)
        or not raw["arms"]
        or not all(isinstance(a, dict) for a in raw["arms"])
    ):
        raise ValueError(f"{path}: arms={raw['arms']!r}, expected a non-empty list of arms")
    arms = []
    for i, a in enumerate(raw["arms"]):
        where = f"{path}: arms[{i}]"
        missing = {"name", "head", "init", "seeds"} - set(a)
        if missing:
            raise ValueError(f"{where}: missing {sorted(missing)}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(a["name"])):
            raise ValueError(f"{where}: name={a['name']!r} must be letters, digits, '_', '.' or '-'")
        if a["head"] not in HEADS:
            raise ValueError(f"{where}: head={a['head']!r}, expected one of {HEADS}")
        if a["init"] not in INITS:
            raise ValueError(f"{where}: init={a['init']!r}, expected one of {INITS}")
        seeds = a["seeds"]
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"{where}: seeds={seeds!r}, expected a non-empty list of integers")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{where}: seeds={seeds!r} repeats a seed")
        arms.append(
            Arm(
                name=a["name"],
                label=a.get("label", a["name"]),
                head=a["head"],
                init=a["init"],
                seeds=tuple(seeds),
                overrides=_strings(a.get("overrides"), f"{where}.overrides"),
            )
        )
    names = [a.name for a in arms]
    if len(set(names)) != len(names) or {"pretrain", "teacher", "reconstruction"} & set(names):
        raise ValueError(f"{path}: arm names {names} must be unique and not pretrain/teacher/reconstruction")
    comparisons = []
    for c in raw.get("comparisons") or []:
        if not (isinstance(c, list) and len(c) == 3 and c[0] in names and c[1] in names):
            raise ValueError(f"{path}: comparison {c!r}: expected [arm, baseline arm, expected gap]")
        comparisons.append((c[0], c[1], float(c[2])))
    spec = StudySpec(
        output_dir=output_dir or raw["output_dir"],
        data=str(raw["data"]),
        pretrain=raw["pretrain"],
        teacher=raw["teacher"],
        student=raw["student"],
        arms=tuple(arms),
        comparisons=tuple(comparisons),
        pretrain_overrides=_strings(raw.get("pretrain_overrides"), "pretrain_overrides"),
        teacher_overrides=_strings(raw.get("teacher_overrides"), "teacher_overrides"),
        student_overrides=_strings(raw.get("student_overrides"), "student_overrides"),
        reconstruction_images=int(raw.get("reconstruction_images", 8)),
    )
    if spec.data != "synthetic" and not Path(spec.data).exists():
        raise FileNotFoundError(f"{path}: data={spec.data!r} does not exist")
    for stage in plan(spec):
        stage.check()
    return spec


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """One run of a script: `scripts/<script> <args>`, writing `directory`."""

    name: str
    script: str
    args: list[str]
    directory: Path
    config: tuple[type, str, list[str]] | None = field(default=None, repr=False)  # (class, recipe, overrides)

    def check(self) -> None:
        """Load the run's config as the script will: unknown keys or bad values fail now, not hours in."""
        if self.config is not None:
            cls, recipe, overrides = self.config
            load_config(cls, recipe, overrides)

    @property
    def record(self) -> dict[str, Any]:
        file = self.directory / STAGE_RECORD
        return json.loads(file.read_text()) if file.is_file() else {"done": False, "seconds": 0.0}


def plan(spec: StudySpec) -> list[Stage]:
    """The study's runs in order: pretraining, its reconstruction evaluation, the teacher, then the students
    seed by seed (every arm's first seed before any second seed, so an early look covers every arm)."""
    out = Path(spec.output_dir)
    data = f"data.path={spec.data}"

    def training(name: str, script: str, cls: type, recipe: str, overrides: list[str]) -> Stage:
        overrides = [data, *overrides, f"output_dir={out / name}"]
        return Stage(name, script, ["--recipe", recipe, *overrides], out / name, (cls, recipe, overrides))

    stages = [
        training("pretrain", "pretrain.py", PretrainConfig, spec.pretrain, list(spec.pretrain_overrides)),
        Stage(
            "reconstruction",
            "eval_reconstruction.py",
            ["--checkpoint", str(out / "pretrain"), "--data", spec.data, "--out", str(out / "reconstruction")]
            + ["--num-images", str(spec.reconstruction_images)],
            out / "reconstruction",
        ),
        training(
            "teacher",
            "finetune.py",
            FinetuneConfig,
            spec.teacher,
            ["model.head=cnn", *spec.teacher_overrides],
        ),
        Stage(
            "teacher_final",
            "export.py",
            [str(out / "teacher"), "--out", str(out / "teacher" / "final")],
            out / "teacher" / "final",
        ),
    ]
    for i in range(max(len(a.seeds) for a in spec.arms)):
        for arm in spec.arms:
            if i < len(arm.seeds):
                seed = arm.seeds[i]
                init = str(out / "pretrain") if arm.init == "simmim" else "scratch"
                overrides = [f"model.head={arm.head}", f"model.init={init}", f"seed={seed}"]
                if arm.head == "distill":
                    overrides.append(f"teacher.path={out / 'teacher' / 'final'}")
                overrides += [*spec.student_overrides, *arm.overrides]
                stages.append(
                    training(f"{arm.name}_s{seed}", "finetune.py", FinetuneConfig, spec.student, overrides)
                )
    return stages


class StageFailed(RuntimeError):
    pass


def run_stage(stage: Stage, launcher: list[str]) -> float:
    """Run one stage to completion (resuming it if it was interrupted); returns its total wall time."""
    record = stage.record
    command = [*launcher, str(SCRIPTS / stage.script), *stage.args]
    print(f"\n== {stage.name}: {shlex.join(command)}", flush=True)
    start = time.time()
    proc = subprocess.Popen(command)
    returncode = None
    try:
        returncode = proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the run too; a SIGTERM sent to the study alone is passed on. Training runs save a
        # checkpoint and exit; wait for that, so that no orphan keeps writing the stage's directory.
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    finally:  # the time of an interrupted attempt counts too: the stage's wall time is what it cost
        record.update(
            seconds=record["seconds"] + time.time() - start,
            command=shlex.join(command),
            args=stage.args,
            done=returncode == 0,
        )
        stage.directory.mkdir(parents=True, exist_ok=True)
        (stage.directory / STAGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if returncode != 0:
        raise StageFailed(f"stage {stage.name} failed (exit {returncode}); run the same command to resume")
    return record["seconds"]


def run_study(spec: StudySpec, launcher: list[str] | None = None) -> Path:
    """Run every stage not yet done, then write the report; returns the path of results.md."""
    if not SCRIPTS.is_dir():
        raise FileNotFoundError(
            f"{SCRIPTS} not found: a study runs the scripts of a source checkout of simmim"
        )
    launcher = launcher or [sys.executable]
    stages = plan(spec)
    for stage in stages:  # a finished stage is reused only if the study would run it the same way
        ran = stage.record.get("args")
        if stage.record["done"] and ran is not None and ran != stage.args:
            raise ValueError(
                f"{stage.directory} was made by `{shlex.join(ran)}`, this study runs `{shlex.join(stage.args)}`: "
                "use another output directory (--out) or delete that stage"
            )
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    # A SIGTERM (a job scheduler's stop) ends the study as Ctrl-C does: the running stage saves and stops.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for i, stage in enumerate(stages, 1):
            if stage.record["done"]:
                print(f"== {stage.name}: done ({stage.record['seconds'] / 60:.1f} min), skipped", flush=True)
                continue
            print(f"== stage {i}/{len(stages)}", flush=True)
            run_stage(stage, launcher)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return write_report(spec)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------- report
def _history(run_dir: Path) -> list[dict[str, Any]]:
    """Evaluation records of a fine-tuning run, one per epoch (metrics.json's "epochs")."""
    return json.loads((run_dir / "metrics.json").read_text())["epochs"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is nan for one value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def collect(spec: StudySpec) -> dict[str, Any]:
    """Every number the report shows, read back from the stages' own outputs."""
    out = Path(spec.output_dir)
    times = {s.name: round(s.record["seconds"], 1) for s in plan(spec)}
    teacher = _history(out / "teacher")
    results: dict[str, Any] = {
        "teacher": {"top1": teacher[-1]["top1"], "history": teacher},
        "reconstruction": json.loads((out / "reconstruction" / "metrics.json").read_text()),
        "stage_seconds": times,
        "arms": {},
    }
    for arm in spec.arms:
        runs = {seed: _history(out / f"{arm.name}_s{seed}") for seed in arm.seeds}
        final = [runs[s][-1]["top1"] for s in arm.seeds]
        best = [max(r["top1"] for r in runs[s]) for s in arm.seeds]
        top5 = [runs[s][-1].get("top5", math.nan) for s in arm.seeds]
        results["arms"][arm.name] = {
            "label": arm.label,
            "head": arm.head,
            "init": arm.init,
            "seeds": list(arm.seeds),
            "top1": final,  # the last epoch's: the number a fixed budget produces
            "top1_mean_std": _mean_std(final),
            "best_epoch_top1": best,  # for reference only: chosen on the validation split
            "top5": top5,
            "seconds": [times[f"{arm.name}_s{s}"] for s in arm.seeds],
            "history": {str(s): runs[s] for s in arm.seeds},
        }
    results["comparisons"] = []
    for name, base, expected in spec.comparisons:
        a, b = results["arms"][name], results["arms"][base]
        gap = a["top1_mean_std"][0] - b["top1_mean_std"][0]
        spread = max(
            (s for s in (a["top1_mean_std"][1], b["top1_mean_std"][1]) if not math.isnan(s)), default=0
        )
        results["comparisons"].append(
            {"arm": name, "baseline": base, "gap": gap, "expected": expected, "spread": spread,
             "met": gap >= expected and gap > spread}
        )  # fmt: skip
    results["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return results


def write_report(spec: StudySpec) -> Path:
    """results.md, accuracy.png, pretraining.png and study.json in the study's output_dir."""
    out = Path(spec.output_dir)
    r = collect(spec)
    (out / "study.json").write_text(json.dumps(r, indent=2) + "\n")
    plot_accuracy(spec, r, out / "accuracy.png")
    plot_pretraining(out / "pretrain", out / "pretraining.png")

    t = r["stage_seconds"]
    lines = [
        "| Arm | Init | Head | Seeds | Top-1 (%), last epoch | Per seed | Top-5 (%) | Minutes per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in r["arms"].values():
        mean5 = statistics.fmean(arm["top5"])
        lines.append(
            f"| {arm['label']} | {arm['init']} | {arm['head']} | {len(arm['seeds'])} "
            f"| {_fmt(*arm['top1_mean_std'])} | {', '.join(f'{v:.2f}' for v in arm['top1'])} "
            f"| {mean5:.2f} | {statistics.fmean(arm['seconds']) / 60:.1f} |"
        )
    teacher_epochs = len(r["teacher"]["history"])
    lines.append(
        f"| Teacher (CNN, {teacher_epochs} epochs) | scratch | cnn | 1 | {r['teacher']['top1']:.2f} | | "
        f"{r['teacher']['history'][-1].get('top5', math.nan):.2f} | {t['teacher'] / 60:.1f} |"
    )
    lines += ["", "Mean ± sample standard deviation over seeds, on the whole validation split.", ""]
    for c in r["comparisons"]:
        verdict = "met" if c["met"] else "not met"
        lines.append(
            f"- {r['arms'][c['arm']]['label']} − {r['arms'][c['baseline']]['label']}: "
            f"**{c['gap']:+.2f}** points (expected ≥ {c['expected']:+.1f}, largest seed std "
            f"{c['spread']:.2f}): {verdict}"
        )
    rec, base = r["reconstruction"], r["reconstruction"]["baselines"]
    lines += [
        "",
        f"Reconstruction of the pretrained model on {rec['num_images']} validation images "
        f"(mask ratio {rec['mask_ratio']}, mask patch {rec['mask_patch_size']} px): masked L1 "
        f"{rec['masked_l1']:.4f} (mean-colour fill {base['mean_fill']['masked_l1']:.4f}, random init "
        f"{base['random_init']['masked_l1']:.4f}); masked PSNR {rec['masked_psnr']:.2f} dB (mean-colour fill "
        f"{base['mean_fill']['masked_psnr']:.2f} dB, random init {base['random_init']['masked_psnr']:.2f} dB).",
        "",
        "| Stage | Minutes |",
        "|---|---|",
        *(f"| {name} | {seconds / 60:.1f} |" for name, seconds in t.items()),
        f"| **total** | **{sum(t.values()) / 60:.1f}** |",
        "",
        "![validation top-1 per epoch](accuracy.png)",
        "![pretraining loss](pretraining.png)",
        "![reconstructions](reconstruction/reconstructions.png)",
        "",
    ]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def _pyplot():
    """matplotlib.pyplot drawing to files only (no display on a server); imported when a report is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(spec: StudySpec, r: dict[str, Any], path: Path) -> None:
    """Validation top-1 per epoch: each arm's mean over seeds, shaded between its lowest and highest seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in r["arms"].values():
        runs = list(arm["history"].values())
        n = min(len(h) for h in runs)
        epochs = [round(h["epoch"], 2) for h in runs[0][:n]]
        values = [[h[e]["top1"] for h in runs] for e in range(n)]  # (epochs, seeds)
        line = ax.plot(epochs, [statistics.fmean(v) for v in values], marker="o", ms=3, label=arm["label"])
        if len(runs) > 1:
            ax.fill_between(
                epochs,
                [min(v) for v in values],
                [max(v) for v in values],
                alpha=0.2,
                color=line[0].get_color(),
            )
    teacher = r["teacher"]["history"]
    ax.plot([h["epoch"] for h in teacher], [h["top1"] for h in teacher], "k--", lw=1, label="CNN teacher")
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title=f"{Path(spec.output_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pretraining(run_dir: Path, path: Path) -> None:
    """SimMIM's training loss and held-out masked L1 against the epoch, from the run's log.jsonl."""
    plt = _pyplot()
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps_per_epoch = next(x["steps_per_epoch"] for x in records if x["kind"] == "schedule")
    train = [x for x in records if x["kind"] == "train" and "loss" in x]
    evals = [x for x in records if x["kind"] == "eval" and "masked_l1" in x]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    epochs = [x["step"] / steps_per_epoch for x in train]
    ax.plot(epochs, [x["loss"] for x in train], lw=1, label="train loss (masked L1)")
    epochs = [x["step"] / steps_per_epoch for x in evals]
    ax.plot(epochs, [x["masked_l1"] for x in evals], "o-", ms=3, label="held-out masked L1")
    ax.set(xlabel="epoch", ylabel="L1 on masked pixels (normalised)", title="SimMIM pretraining")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
