#!/usr/bin/env bash
# Pilots of the fine-tuning recipe that both inits of the long CPU study share (issue 21), on the train
# split only: layer decay 0.65 against 0.75 at 10% of the labels, and whether 3 epochs with all labels are
# enough to rank the inits (against 6).
# Command:   bash recipes/study/imagenette_cpu_finetune_pilots.sh NAME INIT FRACTION [key=value ...]
#            INIT: scratch, or a SimMIM run or snapshot (e.g. .../pretrain/snapshots/epoch_60);
#            FRACTION: 0.1 or 1.0, with the long study's length for it (recipes/study/imagenette_cpu_long.yaml)
#            e.g. bash recipes/study/imagenette_cpu_finetune_pilots.sh ld065_scratch_s0 scratch 0.1 \
#                     optim.layer_decay=0.65 seed=0
# What:      recipes/study/imagenette_cpu_student.yaml as the study runs it, on 90% of the train split
#            (data.holdout_from_train=true, data.val_fraction=0.1, data.holdout_seed=0, the pretraining
#            pilots' carve), judged by top-1 on the other 10% (947 images) at the end. The label fraction is
#            taken of the 90%. Nothing reads the validation split. Run again to resume.
# Output:    runs/finetune_pilots/NAME (metrics.json: the held-out top-1 per evaluation)
# Hardware:  2-core CPU, train.precision=auto; 2-6 minutes per run on a quiet machine.
# Expected:  the SimMIM init above scratch in every pilot; the decision rules and the choices made:
#            docs/results.md ("Fine-tuning pilots").
set -euo pipefail
name=$1 init=$2 fraction=$3; shift 3
out=${PILOT_ROOT:-runs/finetune_pilots}/$name
py=${PYTHON:-.venv/bin/python}
case $fraction in
    0.1) length=(train.epochs=12 optim.warmup_epochs=1.2 train.eval_every_epochs=4 data.label_fraction=0.1) ;;
    1.0) length=(train.epochs=3 optim.warmup_epochs=0.3 train.eval_every_epochs=3) ;;
    *) echo "FRACTION=$fraction: expected 0.1 or 1.0" >&2; exit 2 ;;
esac
$py scripts/finetune.py --recipe recipes/study/imagenette_cpu_student.yaml data.path=../shared/data/imagenette \
    model.head=cls model.init="$init" train.precision=auto "${length[@]}" \
    data.holdout_from_train=true data.val_fraction=0.1 data.holdout_seed=0 output_dir="$out" "$@"
