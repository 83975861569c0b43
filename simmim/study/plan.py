"""The study's stages, in order, each a run of our own scripts with its arguments, and the checked spec."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simmim.config import FinetuneConfig, PretrainConfig, load_config
from simmim.rundir import snapshot_dir
from simmim.study.fairness import check_all_fair, chosen_candidate, sweep_source
from simmim.study.spec import STAGE_RECORD, Arm, StudySpec, pretrain_config, read_spec, run_name


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


def _student_overrides(spec: StudySpec, arm: Arm, fraction: float, seed: int) -> list[str]:
    out = Path(spec.output_dir)
    if arm.init == "scratch":
        init = "scratch"
    elif arm.pretrain_epoch is None:
        init = str(out / "pretrain")
    else:
        init = str(snapshot_dir(out / "pretrain", arm.pretrain_epoch))
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
        snapshot = snapshot_dir(out / "pretrain", epoch)
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


def load_spec(path: str | Path, output_dir: str | None = None) -> StudySpec:
    """Read and check a study file; every recipe, override and comparison is validated here, before any
    stage runs."""
    spec = read_spec(path, output_dir)
    check_all_fair(spec)
    for stage in plan(spec, check=True):
        stage.check()
    return spec
