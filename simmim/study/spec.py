"""A study file, read and checked: its recipes, arms, sweep, comparisons and curve."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simmim.bounded_yaml import read_yaml
from simmim.config import PretrainConfig, load_config

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
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
    probe_goal: float | None = None  # the gain over random init (points, last block) the study expects...
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


def read_spec(path: str | Path, output_dir: str | None = None) -> StudySpec:
    """Read a study file and check its sections and arms (`simmim.study.runner.load_spec` also validates
    every stage's recipe and overrides)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {str(path)!r} does not exist")
    raw = read_yaml(path.read_text(), f"study file {str(path)!r}") or {}
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
    """The checks across sections: the teacher, the data, the snapshots, the comparisons' runs and seeds
    (their fairness: `simmim.study.fairness.check_all_fair`)."""
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
    if spec.curve is not None:
        k = spec.curve
        for name in (k.baseline, *k.arms):
            a = spec.arm(name)
            if k.fraction not in a.fractions or k.seed not in a.seeds:
                raise ValueError(
                    f"{path}: curve: arm {name} has no run at fraction {k.fraction} with seed {k.seed}"
                )


def pretrain_config(spec: StudySpec) -> PretrainConfig:
    out = Path(spec.output_dir)
    overrides = [f"data.path={spec.data}", *spec.pretrain_overrides, f"output_dir={out / 'pretrain'}"]
    return load_config(PretrainConfig, spec.pretrain, overrides)


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}"


def run_name(arm: Arm, fraction: float, seed: int) -> str:
    return f"{arm.name}_p{percent(fraction)}_s{seed}"
