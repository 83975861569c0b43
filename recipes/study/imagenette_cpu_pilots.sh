#!/usr/bin/env bash
# Pilots that choose the SimMIM settings of the long CPU study (issue 21), on the train split only.
# Command:   bash recipes/study/imagenette_cpu_pilots.sh NAME [key=value ...]   (run again to resume)
#            e.g. bash recipes/study/imagenette_cpu_pilots.sh lr5e-4 optim.base_lr=4e-3
# What:      10 epochs of recipes/study/imagenette_cpu_pretrain.yaml (1 warmup epoch) on 90% of the train
#            split (data.holdout_from_train=true, data.val_fraction=0.1, data.holdout_seed=0), then
#            the held-out masked L1 over the whole other 10% (train.eval_batches=null), every 400 steps and
#            at the end. The probes of each pilot's export (kNN, linear and partial fine-tune, trained on the
#            90% and reported on the 10%) run afterwards: scripts/eval_probe.py --holdout 0.1.
#            Nothing reads the validation split. Each pilot differs from the baseline only in the given keys.
# Output:    runs/pilots/NAME (log.jsonl, export/)
# Hardware:  2-core CPU; fp32 (the AVX2-only AMD EPYC has no fast bf16): about 15 minutes of pretraining
#            per pilot at 96 img/s.
set -euo pipefail
name=$1; shift
out=${PILOT_ROOT:-runs/pilots}/$name
py=${PYTHON:-.venv/bin/python}
precision=${PILOT_PRECISION:-fp32}
$py scripts/pretrain.py --recipe recipes/study/imagenette_cpu_pretrain.yaml output_dir="$out" \
    train.epochs=10 optim.warmup_epochs=1 train.snapshot_epochs=[] train.eval_every_steps=400 \
    train.eval_batches=null data.holdout_from_train=true data.val_fraction=0.1 data.holdout_seed=0 \
    train.precision="$precision" "$@"
