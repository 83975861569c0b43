"""One table from benchmarks/gpu.sh's results: the step (gpu_step.py), FSDP2 on the device (gpu_fsdp.py),
activation checkpointing (activation_memory.py), the loader (gpu_loader.py) and the end-to-end pretraining
run's log, with the targets of the GPU issue beside them.

    python benchmarks/gpu_table.py RESULTS_DIR   # reads step.json, fsdp.json, activation.md, loader.json,
                                                 # e2e_log.jsonl; writes table.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def step_rows(step: dict) -> list[str]:
    lines = [
        "| model | library | compile | batch | img/s | peak GiB | TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in step["rows"]:
        lines.append(
            f"| {r['model']} | {r['library']} | {'on' if r['compile'] else 'off'} | {r['batch']} | "
            f"{r['img_per_s']:.0f} | {r['peak_mib'] / 1024:.1f} | {r['tflops']:.0f} | {r['mfu']:.1%} |"
        )
    return lines


def rate(step: dict, model: str, library: str, compiled: bool) -> float | None:
    found = [
        r["img_per_s"]
        for r in step["rows"]
        if (r["model"], r["library"], r["compile"]) == (model, library, compiled)
    ]
    return found[0] if found else None


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "MISSED")


def main() -> None:
    results = Path(sys.argv[1])
    step = json.loads((results / "step.json").read_text()) if (results / "step.json").is_file() else None
    loader = (
        json.loads((results / "loader.json").read_text()) if (results / "loader.json").is_file() else None
    )
    log = results / "e2e_log.jsonl"
    e2e = None
    if log.is_file():
        train = [json.loads(line) for line in log.read_text().splitlines()]
        rates = [r["img_per_s"] for r in train if r.get("kind") == "train" and r["step"] > 50]
        e2e = statistics.median(rates) if rates else None
    lines = [f"# GPU benchmark: {step['device'] if step else '?'}", ""]
    if step:
        lines += [
            f"torch {step['torch']}, transformers {step['transformers']}; MFU against {step['peak_tflops']} TFLOP/s",
            "",
        ]
        lines += step_rows(step) + [""]
        sync = step["sync_check"]
        if sync is None:
            lines.append("Host syncs in simmim's train_step: not measured (the step phase stopped before)")
        else:
            lines.append(
                f"Host syncs in {sync['steps']} steps of simmim's train_step: {sync['sync_warnings']} {sync['kinds']}"
            )
        lines.append("")
    fsdp = json.loads((results / "fsdp.json").read_text()) if (results / "fsdp.json").is_file() else None
    if fsdp:
        lines.append(
            f"FSDP2 on {fsdp['device']} ({fsdp['model']}, a mesh of one): {'ok' if fsdp['ok'] else 'FAILED'}; "
            f"fp32 weights within {fsdp['fp32_max_weight_difference']:.1e} of the unsharded model, resume "
            f"load difference {fsdp['load_max_weight_difference']:.1e}, after one more step "
            f"{fsdp['resume_max_weight_difference']:.1e}, bf16 losses "
            f"{', '.join(f'{v:.4f}' for v in fsdp['bf16_losses'])}"
        )
        lines.append("")
    activation = results / "activation.md"
    if activation.is_file() and "saving:" in activation.read_text():
        lines += [
            "Activation checkpointing (benchmarks/activation_memory.py):",
            "",
            activation.read_text().strip(),
            "",
        ]
    if loader:
        lines.append(
            f"Loader, {loader['workers']} workers, batch {loader['batch_size']}: {loader['loader_img_per_s']:.0f} img/s; "
            f"CPU decode + transform {loader['cpu_decode_img_per_s_per_worker']:.0f} img/s per worker; "
            f"GPU decode (nvjpeg) + crop: {loader['gpu_decode_img_per_s'] or float('nan'):.0f} img/s"
        )
    if e2e is not None:
        lines.append(
            f"End to end (accelerate launch scripts/pretrain.py, DeiT-B/16, after step 50): {e2e:.0f} img/s"
        )
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    b = "DeiT-base/16"
    for compiled in (False, True):
        ours, theirs = (rate(step, b, lib, compiled) if step else None for lib in ("simmim", "transformers"))
        ratio = ours / theirs if ours and theirs else None
        mode = "compile on" if compiled else "compile off"
        lines.append(
            f"| DeiT-B step >= 2x Transformers ({mode}) | {ratio and f'{ratio:.2f}x'} | {verdict(None if ratio is None else ratio >= 2)} |"
        )
    best_b = (
        max(filter(None, (rate(step, b, "simmim", c) for c in (False, True))), default=None) if step else None
    )
    lines.append(
        f"| DeiT-B >= 4,000 img/s | {best_b and f'{best_b:.0f}'} | {verdict(None if best_b is None else best_b >= 4000)} |"
    )
    best_s = (
        max(filter(None, (rate(step, "DeiT-small/16", "simmim", c) for c in (False, True))), default=None)
        if step
        else None
    )
    lines.append(
        f"| DeiT-S >= 10,000 img/s | {best_s and f'{best_s:.0f}'} | {verdict(None if best_s is None else best_s >= 10000)} |"
    )
    eager = rate(step, b, "simmim", False) if step else None
    share = e2e / eager if e2e and eager else None
    lines.append(
        f"| end to end >= 90% of the step rate | {share and f'{share:.0%}'} | {verdict(None if share is None else share >= 0.9)} |"
    )
    text = "\n".join(lines) + "\n"
    (results / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
