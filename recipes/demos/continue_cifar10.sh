#!/usr/bin/env bash
# Demonstration (issue 23): continued SimMIM pretraining. An encoder pretrained by SimMIM on Imagenette goes
# on with SimMIM on CIFAR-10's unlabelled train images, then is fine-tuned on 10% of CIFAR-10's labels,
# against the same fine-tuning from the Imagenette encoder alone and from scratch.
# Command:   bash recipes/demos/continue_cifar10.sh [key=value ...]   (run again to resume; BASE=, OUT=, SEED=,
#            CONT_EPOCHS=, FT_EPOCHS=, CIFAR= to vary; the overrides go to every run)
# What:      BASE: a SimMIM run on Imagenette's train carve (made here if missing: the study's model and the
#            pilots' chosen settings, 10 epochs: recipes/study/imagenette_cpu_pilots.sh's norm15_lr5e-4).
#            continued: model.init=BASE/export, CONT_EPOCHS (default 1) epochs of SimMIM on 90% of CIFAR-10's
#            train split at 64 px (same target and mask; peak lr 2.5e-4, half BASE's, warmup 0.1 epoch).
#            Fine-tuning, identical for the three inits (continued, imagenette, scratch): the study's
#            student recipe, 10% of the labels of that 90% (class-balanced, drawn with SEED), FT_EPOCHS
#            epochs (default 6), judged on the other 10% of the train split; CIFAR-10's test split is never
#            read. The summary checks that the three runs' configs differ in model.init alone.
# Output:    $OUT/continued, $OUT/ft_{continued,imagenette,scratch}, $OUT/summary.json (printed)
# Hardware:  2-core CPU, train.precision=auto (fp32 without native bf16): about 10 minutes of continued
#            pretraining per epoch and 5 per fine-tune.
set -euo pipefail
OUT=${OUT:-runs/demos/continue_cifar10}
BASE=${BASE:-runs/demos/imagenette_base}
CONT_EPOCHS=${CONT_EPOCHS:-1}
FT_EPOCHS=${FT_EPOCHS:-6}
SEED=${SEED:-0}
py=${PYTHON:-.venv/bin/python}
cifar=${CIFAR:-../shared/data/cifar10}
carve=(data.holdout_from_train=true data.val_fraction=0.1 data.holdout_seed=0 train.precision=auto)
if [ ! -f "$BASE/export/config.json" ]; then
  PILOT_ROOT=$(dirname "$BASE") bash recipes/study/imagenette_cpu_pilots.sh "$(basename "$BASE")" \
      loss.norm_target=true loss.norm_target_window=15 optim.base_lr=4e-3 optim.min_lr=4e-5
fi
$py scripts/pretrain.py --recipe recipes/study/imagenette_cpu_pretrain.yaml output_dir="$OUT/continued" \
    model.init="$BASE/export" data.path=$cifar train.epochs="$CONT_EPOCHS" optim.base_lr=2e-3 optim.min_lr=2e-5 \
    optim.warmup_epochs=0.1 loss.norm_target=true loss.norm_target_window=15 train.snapshot_epochs=[] \
    train.eval_every_steps=400 train.eval_batches=4 "${carve[@]}" "$@"
declare -A inits=([continued]="$OUT/continued/export" [imagenette]="$BASE/export" [scratch]=scratch)
for arm in continued imagenette scratch; do
  $py scripts/finetune.py --recipe recipes/study/imagenette_cpu_student.yaml output_dir="$OUT/ft_$arm" \
      model.init="${inits[$arm]}" data.path=$cifar data.label_fraction=0.1 train.epochs="$FT_EPOCHS" \
      train.eval_every_epochs=3 seed="$SEED" "${carve[@]}" "$@"
done
$py - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import yaml
out = Path(sys.argv[1])

def flat(tree, prefix=""):
    items = {}
    for k, v in tree.items():
        items |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return items

configs = {arm: flat(yaml.safe_load((out / f"ft_{arm}" / "config.yaml").read_text())) for arm in ("continued", "imagenette", "scratch")}
differ = sorted(k for k in configs["scratch"] if len({str(c.get(k)) for c in configs.values()}) > 1)
assert differ == ["model.init", "output_dir"], f"the fine-tunes differ in {differ}"
rows = {}
for arm in configs:
    metrics = json.loads((out / f"ft_{arm}" / "metrics.json").read_text())
    log = [json.loads(l) for l in (out / f"ft_{arm}" / "log.jsonl").read_text().splitlines()]
    times = [e["time"] for e in log if "time" in e]
    rows[arm] = {"best_top1": metrics["best"]["top1"], "final_top1": metrics["epochs"][-1]["top1"],
                 "wall_s": round(times[-1] - times[0])}
cont = [json.loads(l) for l in (out / "continued" / "log.jsonl").read_text().splitlines()]
ctimes = [e["time"] for e in cont if "time" in e]
rows["continued_pretraining_wall_s"] = round(ctimes[-1] - ctimes[0])
rows["fine_tunes_differ_in"] = ["model.init"]
(out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
print(json.dumps(rows, indent=2))
PY
