"""A study: does SimMIM pretraining pay off, and by how much, compared fairly, from one spec file.

Every stage is a run of our own scripts, so the study measures exactly what users run. Stages, in order,
each a directory under the study's output_dir:
  pretrain              scripts/pretrain.py on the train split (labels unused); with train.snapshot_epochs
                        it also keeps the encoder after those epochs (the pretraining-length curve)
  reconstruction        scripts/eval_reconstruction.py of the pretrained model on the validation split
  probe, probe_e<N>     scripts/eval_probe.py (kNN and linear) of the final encoder, with the random-init
                        baseline, and of every snapshot
  teacher               (only with a distilled arm) the CNN teacher, then teacher/final, its last weights
  <arm>_sweep<i>        each candidate setting of the sweep, for every tuned arm, trained on the train split
                        minus a held-out carve and judged on that carve: never on the validation split
  <arm>_p<pct>_s<seed>  each arm at each label fraction (class-balanced, drawn by the seed) and seed
Then results.md, the plots and study.json in output_dir.

Fairness: arms of a comparison may differ only in what it is about (the init, the head, the label
fraction) and in the values the same sweep chose for each; anything else is refused unless the comparison
lists it under `allow`. `describe_comparisons` prints, for each comparison, where its arms differ.

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
# What a comparison may be about: its arms may differ in these without saying so.
COMPARED = ("model.init", "model.head", "data.label_fraction")
RESERVED = {"pretrain", "reconstruction", "probe", "teacher"}


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class Arm:
    """One student arm: a head on an initialisation, run at each label fraction and seed."""

    name: str  # also its directories' prefix: <name>_p<pct>_s<seed>
    label: str  # how tables and plots name it
    head: str  # "cls" or "distill"
    init: str  # "scratch" or "simmim" (the study's pretrained model)
    seeds: tuple[int, ...]
    fractions: tuple[float, ...] = (1.0,)  # label fractions
    pretrain_epoch: int | None = None  # simmim only: a snapshot's epoch instead of the final encoder
    overrides: tuple[str, ...] = ()  # key.sub=value for this arm only
    tune: bool = True  # gets the spec's sweep (when it has one)
    settings_from: str | None = None  # use the sweep choice of this other arm instead of its own sweep


@dataclass(frozen=True)
class Sweep:
    """Candidate settings tried for every tuned arm, on a held-out carve of the train split."""

    candidates: tuple[tuple[str, ...], ...]
    fraction: float = 1.0  # the label fraction the sweep trains at
    holdout: float = 0.1  # the share of train held out to judge the candidates
    seed: int = 0


@dataclass(frozen=True)
class Comparison:
    arm: str
    baseline: str
    fraction: float
    expected: float | None  # the gap in points of top-1 the study expects, set before it runs; None: no goal
    allow: tuple[str, ...] = ()  # other settings the arms may differ in, said explicitly


@dataclass(frozen=True)
class Curve:
    """Fine-tune top-1 against pretraining length: arms from snapshots (and the final one), one seed."""

    baseline: str
    arms: tuple[str, ...]
    fraction: float
    seed: int


@dataclass(frozen=True)
class StudySpec:
    """A study file: recipes of the kinds of run, the arms, the sweep, and what to compare."""

    output_dir: str
    data: str  # data.path of every stage
    pretrain: str  # recipe paths
    student: str
    arms: tuple[Arm, ...]
    teacher: str | None = None  # needed by distilled arms only
    comparisons: tuple[Comparison, ...] = ()
    fractions: dict[float, tuple[str, ...]] = field(default_factory=dict)  # overrides at a label fraction
    sweep: Sweep | None = None
    curve: Curve | None = None
    probe: tuple[str, ...] = ()  # extra eval_probe.py arguments, e.g. ["--layers", "2", "4", "6"]
    probe_goal: float | None = None  # the gain over random init (points, best block) the study expects...
    probe_goal_on: str = "linear"  # ... of this probe: "linear" (the headline probe), "knn" or "partial"
    pretrain_overrides: tuple[str, ...] = ()
    teacher_overrides: tuple[str, ...] = ()
    student_overrides: tuple[str, ...] = ()
    reconstruction_images: int = 8

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


PROBE_NAMES = {"knn": "kNN", "linear": "Linear", "partial": "Partial fine-tune"}


def _probe_name(value: Any, path: Path) -> str:
    if value not in PROBE_NAMES:
        raise ValueError(f"{path}: probe_goal_on={value!r}, expected one of {', '.join(PROBE_NAMES)}")
    return value


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ValueError(f"{key}={value!r}: expected a list of 'key.sub=value' strings")
    return tuple(value)


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{where}={value!r}: expected a label fraction in (0, 1]")
    return float(value)


def _keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (expected some of {sorted(allowed)})")


def _arm(a: Any, where: str) -> Arm:
    if not isinstance(a, dict):
        raise ValueError(f"{where}={a!r}: expected a mapping")
    _keys(a, set(Arm.__dataclass_fields__), where)
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
    fractions = tuple(_fraction(f, f"{where}.fractions") for f in a.get("fractions", [1.0]))
    if not fractions or len(set(fractions)) != len(fractions):
        raise ValueError(f"{where}: fractions={a.get('fractions')!r}, expected distinct label fractions")
    epoch = a.get("pretrain_epoch")
    if epoch is not None and (a["init"] != "simmim" or not isinstance(epoch, int) or epoch < 1):
        raise ValueError(f"{where}: pretrain_epoch={epoch!r} needs init simmim and a positive epoch")
    return Arm(
        name=a["name"],
        label=a.get("label", a["name"]),
        head=a["head"],
        init=a["init"],
        seeds=tuple(seeds),
        fractions=fractions,
        pretrain_epoch=epoch,
        overrides=_strings(a.get("overrides"), f"{where}.overrides"),
        tune=bool(a.get("tune", True)),
        settings_from=a.get("settings_from"),
    )


def load_spec(path: str | Path, output_dir: str | None = None) -> StudySpec:
    """Read and check a study file; every recipe, override and comparison is validated here, before any
    stage runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of study keys")
    _keys(raw, set(StudySpec.__dataclass_fields__), str(path))
    for key in ("output_dir", "data", "pretrain", "student", "arms"):
        if key not in raw:
            raise ValueError(f"{path}: {key!r} is required")
    # Sections are read in this order so that a spec with several mistakes always reports the same one first.
    arms = _arms(raw, path)
    names = [a.name for a in arms]
    fractions = {}
    for key, value in (raw.get("fractions") or {}).items():
        fractions[_fraction(key, f"{path}: fractions key")] = _strings(value, f"fractions[{key}]")
    sweep = _sweep(raw, path)
    comparisons = _comparisons(raw, names, path)
    curve = _curve(raw, names, path)
    probe = raw.get("probe") or []
    if not isinstance(probe, list) or not all(isinstance(p, (str, int, float)) for p in probe):
        raise ValueError(f"{path}: probe={probe!r}: expected a list of eval_probe.py arguments")
    spec = StudySpec(
        output_dir=output_dir or raw["output_dir"],
        data=str(raw["data"]),
        pretrain=raw["pretrain"],
        student=raw["student"],
        arms=arms,
        teacher=raw.get("teacher"),
        comparisons=comparisons,
        fractions=fractions,
        sweep=sweep,
        curve=curve,
        probe=tuple(str(p) for p in probe),
        probe_goal=None if raw.get("probe_goal") is None else float(raw["probe_goal"]),
        probe_goal_on=_probe_name(raw.get("probe_goal_on", "linear"), path),
        pretrain_overrides=_strings(raw.get("pretrain_overrides"), "pretrain_overrides"),
        teacher_overrides=_strings(raw.get("teacher_overrides"), "teacher_overrides"),
        student_overrides=_strings(raw.get("student_overrides"), "student_overrides"),
        reconstruction_images=int(raw.get("reconstruction_images", 8)),
    )
    _check_spec(spec, path)
    for stage in plan(spec, check=True):
        stage.check()
    return spec


def _arms(raw: dict, path: Path) -> tuple[Arm, ...]:
    """The spec's arms, each checked, with unique names and a settings_from that names a sweeping arm."""
    if not isinstance(raw["arms"], list) or not raw["arms"]:
        raise ValueError(f"{path}: arms={raw['arms']!r}, expected a non-empty list of arms")
    arms = tuple(_arm(a, f"{path}: arms[{i}]") for i, a in enumerate(raw["arms"]))
    names = [a.name for a in arms]
    if len(set(names)) != len(names) or RESERVED & set(names):
        raise ValueError(f"{path}: arm names {names} must be unique and not one of {sorted(RESERVED)}")
    for a in arms:
        if a.settings_from is None:
            continue
        source = next((b for b in arms if b.name == a.settings_from), None)
        if source is None or not source.tune or source.settings_from is not None:
            raise ValueError(
                f"{path}: arm {a.name}: settings_from={a.settings_from!r} must name a tuned arm "
                "that runs its own sweep"
            )
    return arms


def _sweep(raw: dict, path: Path) -> Sweep | None:
    if raw.get("sweep") is None:
        return None
    s = raw["sweep"]
    _keys(s, set(Sweep.__dataclass_fields__), f"{path}: sweep")
    candidates = s.get("candidates")
    if not isinstance(candidates, list) or len(candidates) < 2:
        raise ValueError(f"{path}: sweep.candidates={candidates!r}, expected a list of two or more settings")
    sweep = Sweep(
        candidates=tuple(_strings(c, f"sweep.candidates[{i}]") for i, c in enumerate(candidates)),
        fraction=_fraction(s.get("fraction", 1.0), "sweep.fraction"),
        holdout=float(s.get("holdout", 0.1)),
        seed=int(s.get("seed", 0)),
    )
    if not 0 < sweep.holdout < 1:
        raise ValueError(f"{path}: sweep.holdout={sweep.holdout}: expected a fraction in (0, 1)")
    return sweep


def _comparisons(raw: dict, names: list[str], path: Path) -> tuple[Comparison, ...]:
    comparisons = []
    for i, c in enumerate(raw.get("comparisons") or []):
        where = f"{path}: comparisons[{i}]"
        if isinstance(c, list) and len(c) == 3:  # the short form: [arm, baseline, expected gap]
            c = {"arm": c[0], "baseline": c[1], "expected": c[2]}
        if not isinstance(c, dict) or c.get("arm") not in names or c.get("baseline") not in names:
            raise ValueError(f"{where}: {c!r}: expected {{arm, baseline, expected}} naming two arms")
        _keys(c, set(Comparison.__dataclass_fields__), where)
        comparisons.append(
            Comparison(
                arm=c["arm"],
                baseline=c["baseline"],
                fraction=_fraction(c.get("fraction", 1.0), f"{where}.fraction"),
                expected=None if c.get("expected") is None else float(c["expected"]),
                allow=tuple(c.get("allow") or ()),
            )
        )
    return tuple(comparisons)


def _curve(raw: dict, names: list[str], path: Path) -> Curve | None:
    if raw.get("curve") is None:
        return None
    c = raw["curve"]
    _keys(c, set(Curve.__dataclass_fields__), f"{path}: curve")
    if c.get("baseline") not in names or not all(a in names for a in c.get("arms") or [None]):
        raise ValueError(f"{path}: curve={c!r}: baseline and arms must name arms")
    return Curve(c["baseline"], tuple(c["arms"]), _fraction(c.get("fraction", 1.0), "curve.fraction"),
                 int(c.get("seed", 0)))  # fmt: skip


def _check_spec(spec: StudySpec, path: Path) -> None:
    """The checks across sections: the teacher, the data, the snapshots, and every comparison's fairness."""
    if any(a.head == "distill" for a in spec.arms) and not spec.teacher:
        raise ValueError(f"{path}: a distilled arm needs a 'teacher' recipe")
    for a in spec.arms:
        if spec.sweep is not None and a.head == "distill" and a.tune and a.settings_from is None:
            raise ValueError(
                f"{path}: arm {a.name}: a distilled arm cannot run its own sweep (its teacher saw the "
                "held-out carve); give it settings_from a cls arm, or tune: false"
            )
    if spec.data != "synthetic" and not Path(spec.data).exists():
        raise FileNotFoundError(f"{path}: data={spec.data!r} does not exist")
    snapshots = pretrain_config(spec).train.snapshot_epochs
    for a in spec.arms:
        if a.pretrain_epoch is not None and a.pretrain_epoch not in snapshots:
            raise ValueError(
                f"{path}: arm {a.name}: pretrain_epoch={a.pretrain_epoch} is not one of the pretraining's "
                f"train.snapshot_epochs {list(snapshots)}"
            )
    for c in spec.comparisons:
        for name in (c.arm, c.baseline):
            if c.fraction not in spec.arm(name).fractions:
                raise ValueError(
                    f"{path}: comparison {c.arm} vs {c.baseline}: {name} has no run at {c.fraction}"
                )
        seeds = [spec.arm(name).seeds for name in (c.arm, c.baseline)]
        if not set(seeds[0]) & set(seeds[1]):
            raise ValueError(
                f"{path}: comparison {c.arm} vs {c.baseline}: the arms run seeds {list(seeds[0])} and "
                f"{list(seeds[1])}; a comparison needs seeds in common (it pairs runs of the same seed, "
                "which also draws the label subset)"
            )
        check_fair(spec, c)
    if spec.curve is not None:
        k = spec.curve
        for name in (k.baseline, *k.arms):
            a = spec.arm(name)
            if k.fraction not in a.fractions or k.seed not in a.seeds:
                raise ValueError(
                    f"{path}: curve: arm {name} has no run at fraction {k.fraction} with seed {k.seed}"
                )
            if name != k.baseline:
                check_fair(spec, Comparison(name, k.baseline, k.fraction, None))


def pretrain_config(spec: StudySpec) -> PretrainConfig:
    out = Path(spec.output_dir)
    overrides = [f"data.path={spec.data}", *spec.pretrain_overrides, f"output_dir={out / 'pretrain'}"]
    return load_config(PretrainConfig, spec.pretrain, overrides)


# ---------------------------------------------------------------------------------------------- fairness
def _parse(overrides: tuple[str, ...] | list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in overrides)


def arm_settings(spec: StudySpec, arm: Arm, fraction: float) -> dict[str, str]:
    """The settings by which `arm`'s runs at `fraction` can differ from another arm's (the shared student
    recipe and student_overrides aside); sweep values are listed as chosen later."""
    init = arm.init if arm.pretrain_epoch is None else f"simmim@epoch{arm.pretrain_epoch}"
    settings = {"model.head": arm.head, "model.init": init, "data.label_fraction": f"{fraction:g}"}
    settings |= _parse(spec.fractions.get(fraction, ()))
    settings |= _parse(arm.overrides)
    if spec.sweep is not None:
        source = sweep_source(spec, arm)
        settings["sweep"] = "tuned" if source is not None else "not tuned"
    return settings


def sweep_keys(spec: StudySpec) -> set[str]:
    return set(_parse([o for c in spec.sweep.candidates for o in c])) if spec.sweep else set()


def comparison_diff(spec: StudySpec, c: Comparison) -> dict[str, tuple[str, str]]:
    a = arm_settings(spec, spec.arm(c.arm), c.fraction)
    b = arm_settings(spec, spec.arm(c.baseline), c.fraction)
    return {
        k: (a.get(k, "(recipe)"), b.get(k, "(recipe)"))
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    }


def check_fair(spec: StudySpec, c: Comparison) -> None:
    """Refuse a comparison whose arms differ in more than it is about, unless the spec allows it."""
    unfair = sorted(set(comparison_diff(spec, c)) - set(COMPARED) - set(c.allow))
    if unfair:
        diff = comparison_diff(spec, c)
        detail = "; ".join(f"{k}: {diff[k][0]} vs {diff[k][1]}" for k in unfair)
        raise ValueError(
            f"comparison {c.arm} vs {c.baseline} is unfair: the arms also differ in {detail}. Share the "
            f"setting, give both arms the sweep, or list it under the comparison's 'allow' to say so explicitly"
        )


def describe_comparisons(spec: StudySpec) -> list[str]:
    """One line per comparison: the settings in which its arms differ, and what the sweep chose."""
    lines = []
    for c in spec.comparisons:
        diff = comparison_diff(spec, c)
        parts = [f"{k}: {x} vs {y}" for k, (x, y) in diff.items() if k != "sweep"]
        if spec.sweep is not None and "sweep" not in diff and sweep_source(spec, spec.arm(c.arm)):
            chosen = [chosen_candidate(spec, spec.arm(n)) for n in (c.arm, c.baseline)]
            shown = [" ".join(x) if x is not None else "pending" for x in chosen]
            parts.append(f"sweep choice: {shown[0]} vs {shown[1]} (the same sweep for both)")
        allowed = f" (allowed: {', '.join(c.allow)})" if c.allow else ""
        lines.append(
            f"{c.arm} vs {c.baseline} at {c.fraction:.0%} labels differ in: {'; '.join(parts) or 'nothing'}{allowed}"
        )
    return lines


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """One run of a script: `scripts/<script> <args>`, writing `directory`."""

    name: str
    script: str
    args: list[str]
    directory: Path
    config: tuple[type, str, list[str]] | None = field(default=None, repr=False)  # (class, recipe, overrides)
    pending: bool = False  # its settings wait for a sweep: args show the first candidate

    def check(self) -> None:
        """Load the run's config as the script will: unknown keys or bad values fail now, not hours in."""
        if self.config is not None:
            cls, recipe, overrides = self.config
            load_config(cls, recipe, overrides)

    @property
    def record(self) -> dict[str, Any]:
        file = self.directory / STAGE_RECORD
        return json.loads(file.read_text()) if file.is_file() else {"done": False, "seconds": 0.0}


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}"


def run_name(arm: Arm, fraction: float, seed: int) -> str:
    return f"{arm.name}_p{percent(fraction)}_s{seed}"


def sweep_source(spec: StudySpec, arm: Arm) -> Arm | None:
    """The arm whose sweep sets `arm`'s settings (itself, or its settings_from), or None if not tuned."""
    if spec.sweep is None:
        return None
    if arm.settings_from is not None:
        return spec.arm(arm.settings_from)
    return arm if arm.tune else None


def _final_top1(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["epochs"][-1]["top1"]


def chosen_candidate(spec: StudySpec, arm: Arm) -> tuple[str, ...] | None:
    """The sweep candidate with the best last-epoch top-1 on the held-out carve (the first on a tie), or
    None while the sweep has not finished."""
    source = sweep_source(spec, arm)
    if source is None:
        return ()
    out = Path(spec.output_dir)
    scores = []
    for i in range(len(spec.sweep.candidates)):
        stage_dir = out / f"{source.name}_sweep{i}"
        if (
            not (stage_dir / STAGE_RECORD).is_file()
            or not json.loads((stage_dir / STAGE_RECORD).read_text())["done"]
        ):
            return None
        scores.append(_final_top1(stage_dir))
    return spec.sweep.candidates[max(range(len(scores)), key=lambda i: (scores[i], -i))]


def _student_overrides(spec: StudySpec, arm: Arm, fraction: float, seed: int) -> list[str]:
    out = Path(spec.output_dir)
    if arm.init == "scratch":
        init = "scratch"
    elif arm.pretrain_epoch is None:
        init = str(out / "pretrain")
    else:
        init = str(out / "pretrain" / "snapshots" / f"epoch_{arm.pretrain_epoch}")
    overrides = [f"model.head={arm.head}", f"model.init={init}", f"seed={seed}"]
    if fraction < 1.0:
        overrides.append(f"data.label_fraction={fraction:g}")
    if arm.head == "distill":
        overrides.append(f"teacher.path={out / 'teacher' / 'final'}")
    return [*overrides, *spec.student_overrides, *spec.fractions.get(fraction, ()), *arm.overrides]


def _training(
    spec: StudySpec, name: str, script: str, cls: type, recipe: str, overrides: list[str], pending=False
) -> Stage:
    """A training run of `script` on the study's data, writing the stage directory `name`."""
    out = Path(spec.output_dir)
    overrides = [f"data.path={spec.data}", *overrides, f"output_dir={out / name}"]
    return Stage(
        name, script, ["--recipe", recipe, *overrides], out / name, (cls, recipe, overrides), pending
    )


def _pretraining_stages(spec: StudySpec) -> list[Stage]:
    """Pretraining, the reconstruction and probes of its final encoder, and a probe of every snapshot."""
    out = Path(spec.output_dir)
    stages = [
        _training(
            spec, "pretrain", "pretrain.py", PretrainConfig, spec.pretrain, list(spec.pretrain_overrides)
        ),
        Stage(
            "reconstruction",
            "eval_reconstruction.py",
            ["--checkpoint", str(out / "pretrain"), "--data", spec.data, "--out", str(out / "reconstruction")]
            + ["--num-images", str(spec.reconstruction_images)],
            out / "reconstruction",
        ),
        Stage(
            "probe",
            "eval_probe.py",
            [
                "--checkpoint",
                str(out / "pretrain"),
                "--data",
                spec.data,
                "--out",
                str(out / "probe"),
                *spec.probe,
            ],
            out / "probe",
        ),
    ]
    for epoch in pretrain_config(spec).train.snapshot_epochs:
        snapshot = out / "pretrain" / "snapshots" / f"epoch_{epoch}"
        stages.append(
            Stage(
                f"probe_e{epoch}",
                "eval_probe.py",
                [
                    "--checkpoint",
                    str(snapshot),
                    "--data",
                    spec.data,
                    "--out",
                    str(out / f"probe_e{epoch}"),
                    "--no-random-init",
                    *spec.probe,
                ],
                out / f"probe_e{epoch}",
            )  # fmt: skip
        )
    return stages


def _teacher_stages(spec: StudySpec) -> list[Stage]:
    """The CNN teacher and the export of its last weights, which the distilled arms read."""
    out = Path(spec.output_dir)
    return [
        _training(
            spec,
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


def _sweep_stages(spec: StudySpec) -> list[Stage]:
    """Every candidate of the sweep for every arm that runs its own, judged on a carve of the train split."""
    s = spec.sweep
    carve = [
        "data.holdout_from_train=true",
        f"data.val_fraction={s.holdout:g}",
        f"data.holdout_seed={s.seed}",
    ]
    stages = []
    for arm in spec.arms:
        if arm.tune and arm.settings_from is None:
            for i, candidate in enumerate(s.candidates):
                overrides = [*_student_overrides(spec, arm, s.fraction, s.seed), *candidate, *carve]
                stages.append(
                    _training(
                        spec, f"{arm.name}_sweep{i}", "finetune.py", FinetuneConfig, spec.student, overrides
                    )
                )
    return stages


def _arm_stages(spec: StudySpec, check: bool) -> list[Stage]:
    """Every arm's run at each label fraction and seed, with its sweep's choice (see `plan`)."""
    runs = [(arm, f, seed) for arm in spec.arms for f in arm.fractions for seed in arm.seeds]
    # Round by round (every arm's first seed before any second), the smallest label fraction first and the
    # arms of one fraction together: a study stopped early leaves whole comparisons, the cheapest ones.
    order = sorted(range(len(runs)), key=lambda i: (runs[i][0].seeds.index(runs[i][2]), runs[i][1], i))
    stages = []
    for i in order:
        arm, fraction, seed = runs[i]
        chosen = chosen_candidate(spec, arm)
        candidates = spec.sweep.candidates if (check and sweep_source(spec, arm)) else [chosen or ()]
        for candidate in candidates:
            if chosen is None and not check:
                candidate = spec.sweep.candidates[0]
            overrides = [*_student_overrides(spec, arm, fraction, seed), *candidate]
            stages.append(
                _training(
                    spec,
                    run_name(arm, fraction, seed),
                    "finetune.py",
                    FinetuneConfig,
                    spec.student,
                    overrides,
                    pending=chosen is None,
                )  # fmt: skip
            )
    return stages


def plan(spec: StudySpec, check: bool = False) -> list[Stage]:
    """The study's runs in order: pretraining, its evaluations, the teacher, the sweeps, then the arms
    seed by seed (every arm's first seed before any second seed, so an early look covers every arm), in
    each round the smallest label fraction first.

    A run whose settings wait for a sweep is `pending` and shows the first candidate; with `check`, the
    stages for every candidate are returned, so that load_spec validates them all."""
    stages = _pretraining_stages(spec)
    if spec.teacher:
        stages += _teacher_stages(spec)
    if spec.sweep is not None:
        stages += _sweep_stages(spec)
    return stages + _arm_stages(spec, check)


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


def _check_reuse(stages: list[Stage]) -> None:
    """A finished stage is reused only if the study would run it the same way."""
    for stage in stages:
        ran = stage.record.get("args")
        if stage.record["done"] and not stage.pending and ran is not None and ran != stage.args:
            raise ValueError(
                f"{stage.directory} was made by `{shlex.join(ran)}`, this study runs `{shlex.join(stage.args)}`: "
                "use another output directory (--out) or delete that stage"
            )


def run_study(
    spec: StudySpec, launcher: list[str] | None = None, only: list[str] | None = None
) -> Path | None:
    """Run every stage not yet done, then write the report; returns the path of results.md.

    With `only` (stage names), run just those stages and write no report (e.g. start the long pretraining
    first); the study's later run skips them as done."""
    if not SCRIPTS.is_dir():
        raise FileNotFoundError(
            f"{SCRIPTS} not found: a study runs the scripts of a source checkout of simmim"
        )
    launcher = launcher or [sys.executable]
    _check_reuse(plan(spec))
    for line in describe_comparisons(spec):
        print(f"comparison: {line}", flush=True)
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    # A SIGTERM (a job scheduler's stop) ends the study as Ctrl-C does: the running stage saves and stops.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:  # plan again after every stage: a finished sweep settles the runs that wait for it
            stages = plan(spec)
            _check_reuse(stages)
            todo = [s for s in stages if not s.record["done"] and (only is None or s.name in only)]
            if not todo:
                break
            stage = todo[0]
            if stage.pending:
                raise RuntimeError(f"stage {stage.name} waits for a sweep that has not run")  # plan's order
            print(f"== stage {stages.index(stage) + 1}/{len(stages)} ({len(todo)} to run)", flush=True)
            run_stage(stage, launcher)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return write_report(spec) if only is None else None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------- report
def _history(run_dir: Path) -> list[dict[str, Any]]:
    """Evaluation records of a fine-tuning run (metrics.json's "epochs")."""
    return json.loads((run_dir / "metrics.json").read_text())["epochs"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is nan for one value (and both for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "not run"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _done(directory: Path) -> bool:
    file = directory / STAGE_RECORD
    return file.is_file() and json.loads(file.read_text())["done"]


def collect(spec: StudySpec) -> dict[str, Any]:
    """Every number the report shows, read back from the stages' own outputs; stages not yet run are
    missing (a partial study reports what it has, and says so)."""
    out = Path(spec.output_dir)
    stages = plan(spec)
    times = {s.name: round(s.record["seconds"], 1) for s in stages if s.record["seconds"] > 0}
    results: dict[str, Any] = {
        "complete": all(s.record["done"] for s in stages),
        "stages_done": sum(s.record["done"] for s in stages),
        "stages": len(stages),
        "stage_seconds": times,
        "arms": {},
        "comparison_settings": describe_comparisons(spec),
    }
    if _done(out / "reconstruction"):
        results["reconstruction"] = json.loads((out / "reconstruction" / "metrics.json").read_text())
    probes = {}
    for name in ["probe", *(f"probe_e{e}" for e in pretrain_config(spec).train.snapshot_epochs)]:
        if _done(out / name):
            probes[name] = json.loads((out / name / "metrics.json").read_text())
    results["probes"] = probes
    if spec.teacher and _done(out / "teacher"):
        teacher = _history(out / "teacher")
        results["teacher"] = {"top1": teacher[-1]["top1"], "history": teacher}
    if spec.sweep is not None:
        sweeps = {}
        for arm in spec.arms:
            if arm.tune and arm.settings_from is None:
                scores = [
                    _final_top1(out / f"{arm.name}_sweep{i}") if _done(out / f"{arm.name}_sweep{i}") else None
                    for i in range(len(spec.sweep.candidates))
                ]
                sweeps[arm.name] = {"carve_top1": scores, "chosen": chosen_candidate(spec, arm)}
        results["sweep"] = {"candidates": spec.sweep.candidates, "fraction": spec.sweep.fraction,
                            "holdout": spec.sweep.holdout, "arms": sweeps}  # fmt: skip
    for arm in spec.arms:
        per_fraction = {}
        for f in arm.fractions:
            runs = {s: out / run_name(arm, f, s) for s in arm.seeds if _done(out / run_name(arm, f, s))}
            final = {s: _final_top1(d) for s, d in runs.items()}
            per_fraction[f"{f:g}"] = {
                "seeds": list(final),
                "top1": list(final.values()),  # the last epoch's: the number a fixed budget produces
                "top1_mean_std": _mean_std(list(final.values())),
                "top5": [_history(d)[-1].get("top5", math.nan) for d in runs.values()],
                "best_epoch_top1": [
                    max(r["top1"] for r in _history(d)) for d in runs.values()
                ],  # reference only
                "seconds": [times.get(run_name(arm, f, s), 0.0) for s in final],
                "history": {str(s): _history(d) for s, d in runs.items()},
            }
        results["arms"][arm.name] = {
            "label": arm.label, "head": arm.head, "init": arm.init, "pretrain_epoch": arm.pretrain_epoch,
            "settings": chosen_candidate(spec, arm), "fractions": per_fraction,
        }  # fmt: skip
    results["comparisons"] = []
    for c in spec.comparisons:
        a = results["arms"][c.arm]["fractions"][f"{c.fraction:g}"]
        b = results["arms"][c.baseline]["fractions"][f"{c.fraction:g}"]
        gap = a["top1_mean_std"][0] - b["top1_mean_std"][0]
        spread = max(
            (s for s in (a["top1_mean_std"][1], b["top1_mean_std"][1]) if not math.isnan(s)), default=0.0
        )
        paired = [
            x - y for s, x in zip(a["seeds"], a["top1"]) for t, y in zip(b["seeds"], b["top1"]) if s == t
        ]
        results["comparisons"].append(
            {"arm": c.arm, "baseline": c.baseline, "fraction": c.fraction, "gap": gap, "expected": c.expected,
             "spread": spread, "paired_gaps": paired, "seeds": (len(a["seeds"]), len(b["seeds"])),
             "met": None if c.expected is None else (not math.isnan(gap)) and gap >= c.expected and gap > spread}
        )  # fmt: skip
    if spec.curve is not None:
        results["curve"] = pretraining_curve(spec, results)
    results["machine"] = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpus": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pretraining_curve(spec: StudySpec, r: dict[str, Any]) -> list[dict[str, Any]]:
    """Per pretraining length (0 = random init): fine-tune top-1 of the curve's seed at its fraction, its
    gain over the baseline arm's run of the same seed, and the kNN/linear probes of that encoder."""
    c = spec.curve
    key = f"{c.fraction:g}"

    def top1(arm_name: str) -> float | None:
        runs = r["arms"][arm_name]["fractions"].get(key, {})
        seeds = runs.get("seeds", [])
        return runs["top1"][seeds.index(c.seed)] if c.seed in seeds else None

    final_epochs = pretrain_config(spec).train.epochs
    base = top1(c.baseline)
    points = [{"epoch": 0, "top1": base, "gain": 0.0 if base is not None else None,
               "probe": _probe_summary(r["probes"].get("probe"), "random_init")}]  # fmt: skip
    for name in c.arms:
        arm = spec.arm(name)
        epoch = arm.pretrain_epoch or final_epochs
        probe = r["probes"].get("probe" if arm.pretrain_epoch is None else f"probe_e{epoch}")
        value = top1(name)
        points.append({"epoch": epoch, "top1": value, "arm": name, "probe": _probe_summary(probe, "encoder"),
                       "gain": value - base if value is not None and base is not None else None})  # fmt: skip
    return sorted(points, key=lambda p: p["epoch"])


def _probe_summary(metrics: dict | None, which: str) -> dict[str, Any] | None:
    """Each probe's top-1 at the last block and at the best block (the partial probe has the last only)."""
    if not metrics or which not in metrics:
        return None
    summary = {}
    for probe, layers in metrics[which].items():
        last = max(layers, key=int)
        best = max(layers, key=lambda k: layers[k]["top1"])
        summary[probe] = {"last": layers[last]["top1"], "best": layers[best]["top1"], "best_layer": int(best)}
    return summary


def _probe_cell(summary: dict | None, probe: str) -> str:
    q = (summary or {}).get(probe)
    return f"{q['last']:.2f} / {q['best']:.2f} (block {q['best_layer']})" if q else "not run"


def write_report(spec: StudySpec) -> Path:
    """results.md, label_efficiency.png, pretraining_length.png, pretraining.png and study.json."""
    out = Path(spec.output_dir)
    r = collect(spec)
    (out / "study.json").write_text(json.dumps(r, indent=2) + "\n")
    lines = []
    if not r["complete"]:
        lines += [f"**Partial: {r['stages_done']} of {r['stages']} stages have run.** Missing runs are shown as "
                  "'not run'; a mean over fewer seeds says so in its seed count.", ""]  # fmt: skip
    lines += _arms_table(spec, r)
    lines += _comparison_lines(r)
    if "sweep" in r:
        lines += _sweep_table(r["sweep"])
    if r.get("curve"):
        lines += _curve_table(spec.curve, r["curve"])
    if "probe" in r["probes"]:
        lines += _probe_table(r["probes"]["probe"], spec.probe_goal, spec.probe_goal_on)
    if "reconstruction" in r:
        lines += _reconstruction_line(r["reconstruction"])
    if "teacher" in r:
        lines += ["", f"CNN teacher: top-1 {r['teacher']['top1']:.2f}."]
    t = r["stage_seconds"]
    lines += ["", "| Stage | Minutes |", "|---|---|", *(f"| {n} | {s / 60:.1f} |" for n, s in t.items()),
              f"| **total** | **{sum(t.values()) / 60:.1f}** |", ""]  # fmt: skip
    lines += [*_figures(spec, r, out), ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def _arms_table(spec: StudySpec, r: dict[str, Any]) -> list[str]:
    """One row per arm, one column per label fraction: mean ± std over seeds, and each seed's top-1."""
    fractions = sorted({f for a in spec.arms for f in a.fractions}, reverse=True)
    lines = ["| Arm | Init | Head | " + " | ".join(f"{percent(f)}% labels" for f in fractions) + " |",
             "|---|---|---|" + "---|" * len(fractions)]  # fmt: skip
    for arm in r["arms"].values():
        cells = []
        for f in fractions:
            runs = arm["fractions"].get(f"{f:g}")
            if runs is None:
                cells.append("")
                continue
            per_seed = ", ".join(f"{v:.2f}" for v in runs["top1"])
            n = len(runs["top1"])
            cells.append(f"{_fmt(*runs['top1_mean_std'])} (n={n}: {per_seed})" if n else "not run")
        init = arm["init"] + (f" @ epoch {arm['pretrain_epoch']}" if arm["pretrain_epoch"] else "")
        lines.append(f"| {arm['label']} | {init} | {arm['head']} | " + " | ".join(cells) + " |")
    lines += ["", "Top-1 (%) on the whole validation split at the last epoch, mean ± sample standard deviation "
              "over seeds (n), each seed's value in brackets.", ""]  # fmt: skip
    return lines


def _comparison_lines(r: dict[str, Any]) -> list[str]:
    """One line per comparison: its gap against the goal and the seeds' spread, and its settings."""
    lines = []
    for c, setting in zip(r["comparisons"], r["comparison_settings"]):
        verdict = "no goal set" if c["met"] is None else "met" if c["met"] else "not met"
        goal = "no goal" if c["expected"] is None else f"expected ≥ {c['expected']:+.1f}"
        paired = ", ".join(f"{g:+.2f}" for g in c["paired_gaps"])
        # With one seed on either side there is no spread to compare the gap with: say so, not "std 0.00".
        spread = "one seed, no spread" if min(c["seeds"]) < 2 else f"largest seed std {c['spread']:.2f}"
        lines.append(
            f"- {r['arms'][c['arm']]['label']} − {r['arms'][c['baseline']]['label']} at {percent(c['fraction'])}% "
            f"labels: **{c['gap']:+.2f}** points ({goal}, {spread}; per seed {paired or 'none'}): {verdict}. Settings: {setting.split(' differ in: ', 1)[1]}"
        )
    return lines


def _sweep_table(s: dict[str, Any]) -> list[str]:
    """Each tuned arm's carve top-1 for every candidate, and the candidate chosen."""
    lines = ["", f"Sweep (at {percent(s['fraction'])}% labels, trained on the train split minus a held-out "
             f"{s['holdout']:.0%}, judged on that carve; the validation split is never read):", "",
             "| Arm | " + " | ".join(" ".join(c) for c in s["candidates"]) + " | chosen |",
             "|---|" + "---|" * (len(s["candidates"]) + 1)]  # fmt: skip
    for name, a in s["arms"].items():
        scores = " | ".join("not run" if v is None else f"{v:.2f}" for v in a["carve_top1"])
        chosen = " ".join(a["chosen"]) if a["chosen"] is not None else "pending"
        lines.append(f"| {name} | {scores} | {chosen} |")
    return lines


def _curve_table(curve: Curve, points: list[dict[str, Any]]) -> list[str]:
    """Fine-tune top-1, its gain and the probes at each pretraining length (see `pretraining_curve`)."""
    lines = ["", f"Pretraining length (seed {curve.seed}, {percent(curve.fraction)}% labels; epoch 0 = "
             "random init):", "", "| Pretraining epochs | Fine-tune top-1 | Gain over scratch | kNN top-1 "
             "(last / best block) | Linear top-1 (last / best block) | Partial fine-tune top-1 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for p in points:
        top1 = "not run" if p["top1"] is None else f"{p['top1']:.2f}"
        gain = "" if p["gain"] is None else f"{p['gain']:+.2f}"
        knn, linear = (_probe_cell(p["probe"], name) for name in ("knn", "linear"))
        q = (p["probe"] or {}).get("partial")
        partial = f"{q['last']:.2f}" if q else "not run"
        lines.append(f"| {p['epoch']} | {top1} | {gain} | {knn} | {linear} | {partial} |")
    return lines


def _probe_table(m: dict[str, Any], probe_goal: float | None, goal_on: str = "linear") -> list[str]:
    """The final encoder's probes by block beside random init's, each probe's gain, and the goal's verdict
    (judged on `goal_on`, the linear probe unless the spec says otherwise)."""
    probes = [p for p in PROBE_NAMES if p in m.get("encoder", {})]
    header = " | ".join(f"{PROBE_NAMES[p]} | {PROBE_NAMES[p]}, random init" for p in probes)
    lines = ["", f"Probes of the final encoder ({m['train_images']} train / {m['val_images']} validation images, "
             f"{m['pool']} pooling of the patch tokens), top-1 (%) by block (the partial fine-tune trains the "
             "last block only):", "", f"| Block | {header} |", "|---|" + "---|---|" * len(probes)]  # fmt: skip
    for layer in map(str, sorted({int(k) for p in probes for k in m["encoder"][p]})):
        row = [m.get(w, {}).get(p, {}).get(layer, {}).get("top1") for p in probes for w in ("encoder", "random_init")]
        lines.append(f"| {layer} | " + " | ".join("" if v is None else f"{v:.2f}" for v in row) + " |")
    if "random_init" not in m:
        return lines
    lines.append("")
    for probe in probes:
        if probe not in m["random_init"]:
            continue
        gains = {k: m["encoder"][probe][k]["top1"] - m["random_init"][probe][k]["top1"] for k in m["encoder"][probe]}
        best = max(gains, key=gains.get)
        goal = ""
        if probe_goal is not None and probe == goal_on:
            goal = f" (expected ≥ {probe_goal:+.1f}: {'met' if gains[best] >= probe_goal else 'not met'})"
        lines.append(
            f"- {PROBE_NAMES[probe]} probe, encoder − random init: **{gains[best]:+.2f}** points at block {best} "
            f"(the largest gain), {gains[max(gains, key=int)]:+.2f} at the last block{goal}"
        )
    return lines


def _reconstruction_line(rec: dict[str, Any]) -> list[str]:
    """The pretrained model's masked L1 beside its two baselines."""
    base = rec["baselines"]
    return ["", f"Reconstruction of the pretrained model on {rec['num_images']} validation images (mask ratio "
            f"{rec['mask_ratio']}, mask patch {rec['mask_patch_size']} px): masked L1 {rec['masked_l1']:.4f} "
            f"(mean-colour fill {base['mean_fill']['masked_l1']:.4f}, random init "
            f"{base['random_init']['masked_l1']:.4f})."]  # fmt: skip


def _figures(spec: StudySpec, r: dict[str, Any], out: Path) -> list[str]:
    """Draw the plots the study has data for; returns their Markdown image lines."""
    figures = []
    if any(runs["top1"] for a in r["arms"].values() for runs in a["fractions"].values()):
        plot_label_efficiency(spec, r, out / "label_efficiency.png")
        figures.append("![top-1 against the label fraction](label_efficiency.png)")
    if r.get("curve") and any(p["top1"] is not None or p["probe"] for p in r["curve"]):
        plot_pretraining_length(r["curve"], out / "pretraining_length.png")
        figures.append("![fine-tune gain and probes against pretraining length](pretraining_length.png)")
    if (out / "pretrain" / "log.jsonl").is_file():
        plot_pretraining(out / "pretrain", out / "pretraining.png")
        figures.append("![pretraining loss](pretraining.png)")
    if (out / "probe" / "probe.png").is_file():
        figures.append("![probe top-1 by block](probe/probe.png)")
    return figures


def _pyplot():
    """matplotlib.pyplot drawing to files only (no display on a server); imported when a report is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_label_efficiency(spec: StudySpec, r: dict[str, Any], path: Path) -> None:
    """Last-epoch top-1 against the label fraction (log axis) for each arm with two or more fractions:
    the mean over seeds, every seed as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm in r["arms"].values():
        points = sorted((float(f), runs) for f, runs in arm["fractions"].items() if runs["top1"])
        if len(points) < 2:
            continue
        line = ax.plot([100 * f for f, _ in points], [runs["top1_mean_std"][0] for _, runs in points],
                       marker="o", label=arm["label"])  # fmt: skip
        for f, runs in points:
            ax.scatter(
                [100 * f] * len(runs["top1"]), runs["top1"], s=10, color=line[0].get_color(), alpha=0.5
            )
    ax.set_xscale("log")
    ax.set(xlabel="labelled training images (%)", ylabel="validation top-1 (%)", title="label efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pretraining_length(curve: list[dict[str, Any]], path: Path) -> None:
    """Fine-tune top-1 and the probes (best block; the partial fine-tune's last) against pretraining epochs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    done = [p for p in curve if p["top1"] is not None]
    ax.plot([p["epoch"] for p in done], [p["top1"] for p in done], "o-", label="fine-tune top-1")
    for probe in PROBE_NAMES:
        pts = [p for p in curve if p["probe"] and probe in p["probe"]]
        ax.plot(
            [p["epoch"] for p in pts],
            [p["probe"][probe]["best"] for p in pts],
            "s--",
            label=f"{probe} probe (best block)",
        )
    ax.set(xlabel="SimMIM pretraining epochs (0 = random init)", ylabel="validation top-1 (%)",
           title="what pretraining length buys")  # fmt: skip
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
    probes = [x for x in records if x["kind"] == "probe"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    # With loss.norm_target the training loss is in the normalised target's space, the held-out L1 in pixels.
    normalised = any("masked_l1_target" in x for x in evals)
    ax.plot(
        [x["step"] / steps_per_epoch for x in train],
        [x["loss"] for x in train],
        lw=1,
        label="train loss (masked L1, normalised target)" if normalised else "train loss (masked L1)",
    )
    ax.plot(
        [x["step"] / steps_per_epoch for x in evals],
        [x["masked_l1"] for x in evals],
        "o-",
        ms=3,
        label="held-out masked L1",
    )
    ax.set(xlabel="epoch", ylabel="L1 on masked pixels (normalised)", title="SimMIM pretraining")
    ax.grid(alpha=0.3)
    if probes:
        twin = ax.twinx()
        twin.plot([x["step"] / steps_per_epoch for x in probes], [x["probe_knn_top1"] for x in probes], "s--",
                  color="C2", ms=3, label="online kNN top-1 (%)")  # fmt: skip
        twin.set_ylabel("online kNN top-1 (%)")
        twin.legend(fontsize=8, loc="upper center")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
