"""Fairness: where the arms of a comparison differ, and the refusal of a comparison whose arms differ in
anything but what it compares (the init, the head, the label fraction), the same sweep's choices or what it
allows."""

from __future__ import annotations

import json
from pathlib import Path

from simmim.rundir import METRICS_FILE
from simmim.study.spec import COMPARED, STAGE_RECORD, Arm, Comparison, StudySpec


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


def sweep_source(spec: StudySpec, arm: Arm) -> Arm | None:
    """The arm whose sweep sets `arm`'s settings (itself, or its settings_from), or None if not tuned."""
    if spec.sweep is None:
        return None
    if arm.settings_from is not None:
        return spec.arm(arm.settings_from)
    return arm if arm.tune else None


def final_top1(run_dir: Path) -> float:
    return json.loads((run_dir / METRICS_FILE).read_text())["epochs"][-1]["top1"]


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
        scores.append(final_top1(stage_dir))
    return spec.sweep.candidates[max(range(len(scores)), key=lambda i: (scores[i], -i))]


def check_all_fair(spec: StudySpec) -> None:
    """Every comparison, and every point of the pretraining-length curve against its baseline, fair."""
    for c in spec.comparisons:
        check_fair(spec, c)
    if spec.curve is not None:
        k = spec.curve
        for name in k.arms:
            if name != k.baseline:
                check_fair(spec, Comparison(name, k.baseline, k.fraction, None))
