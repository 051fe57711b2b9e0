#!/usr/bin/env bash
# The paper-scale `base` preset's train step on a lent GPU (MFU in bfloat16), as one
# command. OUT gets one JSON line per run (NAME.json), its stderr (NAME.err), the profile's
# op table (prof/ops.txt) and nvidia-smi's utilisation every 5 s (smi.txt):
#   bash scripts/gpu_mfu.sh OUT [SECONDS] [PRESET]    # SECONDS: the whole script's budget (540)
# While the budget lasts: cuDNN attention at batch 256 (35.3% on an H200, docs/results.md; 34.6% at
# 128, 27.6% at 64), a profiled run at 256, then XLA's attention at batch 128. XLA runs the
# step as CUDA graphs (command buffers), which a trace sees as one event; the profiled run turns
# them off so that each kernel shows, and is timed apart.
out=${1:?usage: gpu_mfu.sh OUT [SECONDS] [PRESET]}; budget=${2:-540}; preset=${3:-base}
mkdir -p "$out"; export PYTHONUNBUFFERED=1
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} > "$out/env.txt" 2>&1
(while true; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader >> "$out/smi.txt" 2>&1; sleep 5; done) &
smi=$!
run() {   # NAME MIN_SECONDS ARGS...: one benchmark if MIN_SECONDS of the budget are left
  local name=$1 need=$2 left=$(( budget - ($(date +%s) - t0) )); shift 2
  [ $left -lt $need ] && { echo "$name: skipped, ${left}s left"; return; }
  timeout $left python3 bench.py train "$preset" --dtype bfloat16 "$@" > "$out/$name.json" 2> "$out/$name.err"
  echo "$name: rc=$? at $(( $(date +%s) - t0 ))s"; cat "$out/$name.json"
}
run cudnn_b256 110 --attention cudnn --batch_size 256
XLA_FLAGS=--xla_gpu_enable_command_buffer= run cudnn_b256_profiled 110 --attention cudnn --batch_size 256 --profile "$out/prof"
run xla_b128 110 --attention xla --batch_size 128
kill $smi
find "$out" -name '*.xplane.pb' -size +20M -delete    # the raw trace, when too big to fetch
