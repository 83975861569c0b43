"""The study's report: every number of every finished stage (study.json), the tables and verdicts
(results.md) and the plots."""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from simmim.evaluation.probe import PLOT_FILE
from simmim.evaluation.reconstruction import baselines_text
from simmim.rundir import LOG_FILE, METRICS_FILE
from simmim.study.fairness import chosen_candidate, describe_comparisons, final_top1
from simmim.study.plan import plan
from simmim.study.spec import PROBE_NAMES, STAGE_RECORD, Curve, StudySpec, percent, pretrain_config, run_name


# ---------------------------------------------------------------------------------------------- report
def _history(run_dir: Path) -> list[dict[str, Any]]:
    """Evaluation records of a fine-tuning run (metrics.json's "epochs")."""
    return json.loads((run_dir / METRICS_FILE).read_text())["epochs"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std is nan for one value (and both for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "not run"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _precisions(run_dir: Path) -> list[str]:
    """The mixed precision each start of a run trained in (log.jsonl's "precision" records, in order; a
    run resumed on another CPU can change it under `train.precision=auto`)."""
    log = run_dir / LOG_FILE
    if not log.is_file():
        return []
    seen = []
    for line in log.read_text().splitlines():
        record = json.loads(line) if '"precision"' in line else {}
        if record.get("kind") == "precision":
            name = "fp32" if record["mixed_precision"] == "no" else record["mixed_precision"]  # accelerate's
            if name not in seen:
                seen.append(name)
    return seen


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
        results["reconstruction"] = json.loads((out / "reconstruction" / METRICS_FILE).read_text())
    probes = {}
    for name in ["probe", *(f"probe_e{e}" for e in pretrain_config(spec).train.snapshot_epochs)]:
        if _done(out / name):
            probes[name] = json.loads((out / name / METRICS_FILE).read_text())
    results["probes"] = probes
    if spec.teacher and _done(out / "teacher"):
        teacher = _history(out / "teacher")
        results["teacher"] = {"top1": teacher[-1]["top1"], "history": teacher}
    if spec.sweep is not None:
        sweeps = {}
        for arm in spec.arms:
            if arm.tune and arm.settings_from is None:
                scores = [
                    final_top1(out / f"{arm.name}_sweep{i}") if _done(out / f"{arm.name}_sweep{i}") else None
                    for i in range(len(spec.sweep.candidates))
                ]
                sweeps[arm.name] = {"carve_top1": scores, "chosen": chosen_candidate(spec, arm)}
        results["sweep"] = {"candidates": spec.sweep.candidates, "fraction": spec.sweep.fraction,
                            "holdout": spec.sweep.holdout, "arms": sweeps}  # fmt: skip
    for arm in spec.arms:
        per_fraction = {}
        for f in arm.fractions:
            runs = {s: out / run_name(arm, f, s) for s in arm.seeds if _done(out / run_name(arm, f, s))}
            final = {s: final_top1(d) for s, d in runs.items()}
            per_fraction[f"{f:g}"] = {
                "seeds": list(final),
                "top1": list(final.values()),  # the last epoch's: the number a fixed budget produces
                "top1_mean_std": _mean_std(list(final.values())),
                "top5": [_history(d)[-1].get("top5", math.nan) for d in runs.values()],
                "best_epoch_top1": [
                    max(r["top1"] for r in _history(d)) for d in runs.values()
                ],  # reference only
                "seconds": [times.get(run_name(arm, f, s), 0.0) for s in final],
                "precision": ["+".join(_precisions(d)) or "unknown" for d in runs.values()],
                "history": {str(s): _history(d) for s, d in runs.items()},
            }
        results["arms"][arm.name] = {
            "label": arm.label, "head": arm.head, "init": arm.init, "pretrain_epoch": arm.pretrain_epoch,
            "settings": chosen_candidate(spec, arm), "fractions": per_fraction,
        }  # fmt: skip
    results["comparisons"] = [_comparison(c, results["arms"]) for c in spec.comparisons]
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


def _comparison(c: Any, arms: dict[str, Any]) -> dict[str, Any]:
    """An arm against its baseline at one label fraction, seed by seed: a seed draws the label subset and
    the fine-tune's randomness for both, so the gap is the mean of the per-seed differences and its spread
    their sample standard deviation. The goal is met when the gap reaches it and exceeds that spread; with
    fewer than two paired seeds there is no verdict."""
    a = arms[c.arm]["fractions"][f"{c.fraction:g}"]
    b = arms[c.baseline]["fractions"][f"{c.fraction:g}"]
    baseline = dict(zip(b["seeds"], b["top1"]))
    paired = {s: x - baseline[s] for s, x in zip(a["seeds"], a["top1"]) if s in baseline}
    gap, spread = _mean_std(list(paired.values()))
    met = None
    if c.expected is not None and len(paired) >= 2:
        met = gap >= c.expected and gap > spread
    # the precision of each paired run, arm and baseline: train.precision=auto follows the CPU
    precision_a, precision_b = dict(zip(a["seeds"], a["precision"])), dict(zip(b["seeds"], b["precision"]))
    precision = {s: (precision_a[s], precision_b[s]) for s in paired}
    return {
        "arm": c.arm, "baseline": c.baseline, "fraction": c.fraction, "expected": c.expected,
        "gap": gap, "spread": spread, "paired_seeds": list(paired), "paired_gaps": list(paired.values()),
        "seeds": (len(a["seeds"]), len(b["seeds"])), "met": met,
        "difference_of_means": a["top1_mean_std"][0] - b["top1_mean_std"][0],
        "precisions_differ": any(x != y for x, y in precision.values()), "precision": precision,
    }  # fmt: skip


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
    """One line per comparison: its paired gap against the goal and the spread of the per-seed gaps, and
    its settings."""
    lines = []
    for c, setting in zip(r["comparisons"], r["comparison_settings"]):
        n = len(c["paired_gaps"])
        if c["expected"] is None:
            verdict = "no goal set"
        elif c["met"] is None:
            verdict = f"no verdict ({n} paired seed{'s' if n != 1 else ''}; two are needed)"
        else:
            verdict = "met" if c["met"] else "not met"
        goal = "no goal" if c["expected"] is None else f"expected ≥ {c['expected']:+.1f}"
        paired = ", ".join(f"{g:+.2f} (seed {s})" for s, g in zip(c["paired_seeds"], c["paired_gaps"]))
        # With one pair there is no spread to compare the gap with: say so, not "std 0.00".
        spread = "no pair" if n == 0 else "one pair, no spread" if n == 1 else f"std of the per-seed gaps {c['spread']:.2f}"
        unpaired = "" if n == max(c["seeds"]) else f"; {max(c['seeds']) - n} seed(s) without a pair left out"
        differ = ""
        if c["precisions_differ"]:
            runs = ", ".join(f"seed {s}: {x} vs {y}" for s, (x, y) in c["precision"].items())
            differ = f" **The arms trained in different precisions** ({runs})."
        arms = f"{r['arms'][c['arm']]['label']} − {r['arms'][c['baseline']]['label']}"
        lines.append(
            f"- {arms} at {percent(c['fraction'])}% labels: **{_signed(c['gap'])}** points, the mean of the "
            f"per-seed gaps ({goal}, {spread}{unpaired}; per seed {paired or 'none'}): {verdict}.{differ} "
            f"Settings: {setting.split(' differ in: ', 1)[1]}"
        )
    return lines


def _signed(value: float) -> str:
    return "not run" if math.isnan(value) else f"{value:+.2f}"


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
             "last block, the final LayerNorm and a new head):", "", f"| Block | {header} |",
             "|---|" + "---|---|" * len(probes)]  # fmt: skip
    for layer in map(str, sorted({int(k) for p in probes for k in m["encoder"][p]})):
        row = [
            m.get(w, {}).get(p, {}).get(layer, {}).get("top1")
            for p in probes
            for w in ("encoder", "random_init")
        ]
        lines.append(f"| {layer} | " + " | ".join("" if v is None else f"{v:.2f}" for v in row) + " |")
    if "random_init" not in m:
        return lines
    lines.append("")
    for probe in probes:
        if probe not in m["random_init"]:
            continue
        gains = {
            k: m["encoder"][probe][k]["top1"] - m["random_init"][probe][k]["top1"]
            for k in m["encoder"][probe]
        }
        # The goal is judged at the last block, fixed before any probe ran: the block of the largest gain is
        # chosen on the validation split it is reported on, so its gain is optimistic (shown beside it).
        best, last = max(gains, key=gains.get), max(gains, key=int)
        goal = ""
        if probe_goal is not None and probe == goal_on:
            verdict = "met" if gains[last] >= probe_goal else "not met"
            goal = f" (expected ≥ {probe_goal:+.1f}: {verdict}, on one probe run: its spread is not measured)"
        largest = (
            f"; the largest gain, {gains[best]:+.2f} at block {best}, is chosen on the validation split and so "
            "optimistic"
            if best != last
            else "; the largest gain too"
        )
        lines.append(
            f"- {PROBE_NAMES[probe]} probe, encoder − random init: **{gains[last]:+.2f}** points at the "
            f"last block ({last}){goal}{largest}"
        )
    return lines


def _reconstruction_line(rec: dict[str, Any]) -> list[str]:
    """The pretrained model's masked L1 beside its baselines, and the space it is measured in."""
    return ["", f"Reconstruction of the pretrained model on {rec['num_images']} validation images (mask ratio "
            f"{rec['mask_ratio']}, mask patch {rec['mask_patch_size']} px): masked L1 {rec['masked_l1']:.4f} "
            f"({baselines_text(rec, 'masked_l1')}), in {rec.get('reconstruction_space', 'pixels')}."]  # fmt: skip


def _figures(spec: StudySpec, r: dict[str, Any], out: Path) -> list[str]:
    """Draw the plots the study has data for; returns their Markdown image lines."""
    figures = []
    if any(runs["top1"] for a in r["arms"].values() for runs in a["fractions"].values()):
        plot_label_efficiency(spec, r, out / "label_efficiency.png")
        figures.append("![top-1 against the label fraction](label_efficiency.png)")
    if r.get("curve") and any(p["top1"] is not None or p["probe"] for p in r["curve"]):
        plot_pretraining_length(r["curve"], out / "pretraining_length.png")
        figures.append("![fine-tune gain and probes against pretraining length](pretraining_length.png)")
    if (out / "pretrain" / LOG_FILE).is_file():
        plot_pretraining(out / "pretrain", out / "pretraining.png")
        figures.append("![pretraining loss](pretraining.png)")
    if (out / "probe" / PLOT_FILE).is_file():
        figures.append(f"![probe top-1 by block](probe/{PLOT_FILE})")
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
    """Fine-tune top-1 and the probes at the last block (where the probe goal is judged; the best block is
    chosen on the split it is scored on) against pretraining epochs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    done = [p for p in curve if p["top1"] is not None]
    ax.plot([p["epoch"] for p in done], [p["top1"] for p in done], "o-", label="fine-tune top-1")
    for probe in PROBE_NAMES:
        pts = [p for p in curve if p["probe"] and probe in p["probe"]]
        ax.plot(
            [p["epoch"] for p in pts],
            [p["probe"][probe]["last"] for p in pts],
            "s--",
            label=f"{probe} probe (last block)",
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
    records = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
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
