#!/usr/bin/env bash
# Demonstration (issue 23): SimMIM on 12-bit grey sensor images, normalised with the dataset's statistics
# against ImageNet's (as grey), everything else equal.
# Command:   bash recipes/demos/grey16_imagenette.sh [key=value ...]   (run again to resume; OUT=, EPOCHS=,
#            IMAGENETTE= to vary; the overrides go to both pretrainings)
# Data:      recipes/demos/make_grey16.py: Imagenette's train split as 12-bit grey in 16-bit PNGs, 80 px.
# What:      two pretrainings of recipes/study/imagenette_cpu_pretrain.yaml with model.num_channels=1, for
#            EPOCHS epochs (default 4, 1/2 warmup) on 90% of the split (data.holdout_from_train, seed 0):
#              dataset:  data.normalize=dataset (computed from 1,000 train images at the start)
#              imagenet: data.normalize=explicit, data.mean=[0.449], data.std=[0.226] (ImageNet's RGB
#                        statistics averaged, what a grey image replicated to RGB would be given)
#            then on the other 10% (the same 947 images for both): the held-out masked L1 (log.jsonl,
#            in each arm's normalised units; the summary converts it to the 16-bit pixel scale) and the
#            linear probe of block 6 (scripts/eval_probe.py --holdout 0.1).
# Output:    $OUT/{dataset,imagenet}/ (runs), $OUT/summary.json (printed as a table)
# Hardware:  2-core CPU, train.precision=auto (fp32 without native bf16): about 10 minutes per arm.
set -euo pipefail
OUT=${OUT:-runs/demos/grey16}
EPOCHS=${EPOCHS:-4}
py=${PYTHON:-.venv/bin/python}
data=$OUT/data
$py recipes/demos/make_grey16.py "${IMAGENETTE:-../shared/data/imagenette}" "$data"
declare -A arm_overrides=(
  [dataset]="data.normalize=dataset"
  [imagenet]="data.normalize=explicit data.mean=[0.449] data.std=[0.226]"
)
for arm in dataset imagenet; do
  # shellcheck disable=SC2086  # the overrides are words
  $py scripts/pretrain.py --recipe recipes/study/imagenette_cpu_pretrain.yaml output_dir="$OUT/$arm" \
      data.path="$data" model.num_channels=1 train.epochs="$EPOCHS" optim.warmup_epochs=0.5 \
      train.snapshot_epochs=[] train.eval_every_steps=400 train.eval_batches=null train.precision=auto \
      data.holdout_from_train=true data.val_fraction=0.1 data.holdout_seed=0 ${arm_overrides[$arm]} "$@"
  [ -f "$OUT/$arm/probe/metrics.json" ] || $py scripts/eval_probe.py --checkpoint "$OUT/$arm/export" \
      --data "$data" --holdout 0.1 --layers 6 --probes linear --no-random-init --out "$OUT/$arm/probe"
done
$py - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for arm in ("dataset", "imagenet"):
    run = out / arm
    evals = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if '"kind": "eval"' in l]
    std = json.loads((run / "run.json").read_text())["normalization"]["std"][0]
    probe = json.loads((run / "probe" / "metrics.json").read_text())["encoder"]["linear"]
    rows[arm] = {
        "mean": json.loads((run / "run.json").read_text())["normalization"]["mean"][0], "std": std,
        "masked_l1_normalised": evals[-1]["masked_l1"], "masked_l1_pixels": evals[-1]["masked_l1"] * std,
        "linear_top1_block6": probe["6"]["top1"],
    }
(out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
print(json.dumps(rows, indent=2))
PY
