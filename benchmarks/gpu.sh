#!/usr/bin/env bash
# The prepared GPU benchmark, for the H200 lent to some tasks (DEVELOPERS.md; the device tool's README):
# the SimMIM step against Transformers (DeiT-B/16, DeiT-S/16, 224 px, bf16, compile off and on: img/s, peak
# memory, MFU), simmim's step checked for host syncs, FSDP2 on CUDA against the unsharded model, the memory
# activation checkpointing saves, the loader with 14 workers on JPEGs of 224-500 px against GPU decoding,
# and a 300-step `accelerate launch scripts/pretrain.py` end to end on those JPEGs.
# One table (table.md) and the raw results go to $OUT.
#
#   bash benchmarks/gpu.sh                 # on the GPU machine: 7 minutes at most (the issue allows 8)
#   bash benchmarks/gpu.sh --tiny          # anywhere, on CPU: tiny sizes, to check that the script runs
#
# Setup there: that machine has torch, torchvision, accelerate, transformers, timm, tensorboard and
# safetensors, but not pydantic, torchdata or datasets. `bash benchmarks/gpu_wheels.sh`, run here first,
# downloads their wheels into .whl/ (3.7 MB); the device call carries it:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540)
# They are installed there into /tmp/site; simmim itself is read from this checkout (PYTHONPATH).
# Each phase has its own time limit and a failed phase does not stop the others: the table says what ran.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
OUT=${OUT:-runs/gpu_benchmark}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/gpu.log"; }

# simmim from this checkout, for the benchmark scripts and the launched run alike (a `python3 -c "import
# simmim"` check would pass on the working directory alone, and scripts run from benchmarks/ would not).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ $TINY == 0 && -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then  # tiny: this venv
    log "installing carried wheels"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'EOF' | tee -a "$OUT/gpu.log"
import torch, torchvision, accelerate, transformers
print("torch", torch.__version__, "torchvision", torchvision.__version__, "accelerate", accelerate.__version__,
      "transformers", transformers.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

if [[ $TINY == 1 ]]; then
    STEP_ARGS=(--tiny --steps 2 --warmup 1); IMAGES=64; WORKERS=2; BATCHES=3; LOADER_BATCH=16
    E2E=(model.hidden_size=64 model.num_hidden_layers=2 model.num_attention_heads=2 model.intermediate_size=128
         model.image_size=64 mask.patch_size=32 data.batch_size=8 train.max_steps=6 train.log_every_steps=2)
    LAUNCH=(accelerate launch --num_processes 1 --cpu); STEP_LIMIT=300; E2E_LIMIT=300; DEADLINE=1500
    FSDP_ARGS=(--device cpu --variant tiny --image-size 32 --batch-size 4 --steps 2)
    MEMORY_ARGS=(--device cpu --variant tiny --image-size 32 --batch-size 4 --steps 1)
else
    STEP_ARGS=(--steps 20 --warmup 5); IMAGES=2000; WORKERS=14; BATCHES=20; LOADER_BATCH=128
    E2E=(model.variant=base model.image_size=224 data.batch_size=128 train.max_steps=300 train.log_every_steps=25)
    LAUNCH=(accelerate launch --num_processes 1 --mixed_precision bf16); STEP_LIMIT=200; E2E_LIMIT=90; DEADLINE=420
    FSDP_ARGS=(--variant small --batch-size 32 --steps 4)
    MEMORY_ARGS=(--variant base --batch-size 128 --steps 3 --bf16)
fi

# Each phase gets its own cap, cut to what is left of the whole run's deadline (the table needs a few
# seconds); -k: a phase that ignores SIGTERM (pretraining saves a checkpoint on it) is killed 10 s later.
limit() { local left=$((DEADLINE - SECONDS - 20)); echo $(($1 < left ? $1 : (left > 1 ? left : 1))); }
capped() { timeout -k 10 "$@"; }

log "FSDP2 on the device (a mesh of one), against the model unsharded"
capped "$(limit 45)" python3 benchmarks/gpu_fsdp.py "${FSDP_ARGS[@]}" --out "$OUT/fsdp.json" 2>&1 | tee -a "$OUT/gpu.log"

log "step: simmim against Transformers (eager rows first; each row is written as it is measured)"
capped "$(limit "$STEP_LIMIT")" python3 benchmarks/gpu_step.py "${STEP_ARGS[@]}" --out "$OUT/step.json" 2>&1 | tee -a "$OUT/gpu.log"

log "JPEGs: $IMAGES of 224-500 px, and the loader with $WORKERS workers"
capped "$(limit 60)" python3 benchmarks/gpu_loader.py --make "$WORK/jpegs" --images "$IMAGES" --data "$WORK/jpegs" \
    --workers "$WORKERS" --batch-size "$LOADER_BATCH" --batches "$BATCHES" --out "$OUT/loader.json" 2>&1 | tee -a "$OUT/gpu.log"

log "end to end: accelerate launch scripts/pretrain.py on the JPEGs"
capped "$(limit "$E2E_LIMIT")" "${LAUNCH[@]}" scripts/pretrain.py data.path="$WORK/jpegs" data.val_fraction=0.02 \
    data.num_workers="$WORKERS" train.epochs=1000 train.eval_every_steps=100000 train.save_every_steps=100000 \
    "${E2E[@]}" output_dir="$WORK/e2e" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -20 | tee -a "$OUT/gpu.log"
cp "$WORK/e2e/log.jsonl" "$OUT/e2e_log.jsonl" 2>/dev/null

log "activation checkpointing: memory and time"
capped "$(limit 45)" python3 benchmarks/activation_memory.py "${MEMORY_ARGS[@]}" 2>>"$OUT/gpu.log" | tee "$OUT/activation.md" | tee -a "$OUT/gpu.log"

log "table"
python3 benchmarks/gpu_table.py "$OUT" 2>&1 | tee -a "$OUT/gpu.log"
rm -rf "$WORK"
