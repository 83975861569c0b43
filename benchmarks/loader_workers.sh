#!/usr/bin/env bash
# The CPU study's pretraining end to end with 0, 1 and 2 loader workers: does loading in worker processes
# pay on this machine? Each run is 250 steps of recipes/study/imagenette_cpu_long_pretrain.yaml (compiled,
# train.precision=auto); printed: img/s and the share of time waiting for the loader, per 50-step log
# window from step 100 on (log.jsonl's img_per_s and data_wait_fraction).
#     bash benchmarks/loader_workers.sh [ROUNDS] [DATA]     # 2 rounds, ../shared/data/imagenette
# Run it on an otherwise idle machine: a second torch process on the same cores slows the step many times.
# 2026-12-06, 2-core AMD EPYC with avx512_bf16, bf16: 140-164 img/s with 2 workers, 129-147 with 1,
# 139-157 with 0 (12-13% of the time then spent loading): equal within the noise (docs/performance.md).
set -euo pipefail
rounds=${1:-2}
data=${2:-../shared/data/imagenette}
py=${PYTHON:-.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in $(seq "$rounds"); do
  for workers in 2 0 1; do
    run=$out/r${round}_w$workers
    $py scripts/pretrain.py --recipe recipes/study/imagenette_cpu_long_pretrain.yaml data.path="$data" \
      output_dir="$run" data.num_workers="$workers" train.max_steps=250 train.save_every_steps=100000 \
      train.eval_every_steps=100000 'train.snapshot_epochs=[]' > "$run.log" 2>&1
    $py - "$run/log.jsonl" "$round" "$workers" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
windows = [r for r in records if r["kind"] == "train" and r["step"] >= 100]
print(f"round {sys.argv[2]}, {sys.argv[3]} workers: img/s",
      " / ".join(f"{r['img_per_s']:.0f}" for r in windows),
      "; waiting for the loader", " / ".join(f"{r['data_wait_fraction']:.1%}" for r in windows))
PY
  done
done
