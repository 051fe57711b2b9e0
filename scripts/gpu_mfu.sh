#!/usr/bin/env bash
# The paper-scale `base` preset's train step on a lent GPU (issue 5: MFU, bfloat16), as one
# command; OUT gets one JSON line per run (*.json), its stderr (*.err), the profile's op
# table (prof_*/ops.txt) and nvidia-smi's utilisation every 5 s (smi.txt):
#   bash scripts/gpu_mfu.sh OUT [SECONDS] [PRESET]    # SECONDS: the whole script's budget (300)
# runs, while the budget lasts: XLA attention at batch 64 and cuDNN attention at batch 64,
# both profiled, then cuDNN attention at batch 128.
out=${1:?usage: gpu_mfu.sh OUT [SECONDS] [PRESET]}; budget=${2:-300}; preset=${3:-base}
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
  timeout $left python3 train.py base --benchmark "$preset" --dtype bfloat16 "$@" > "$out/$name.json" 2> "$out/$name.err"
  echo "$name: rc=$? at $(( $(date +%s) - t0 ))s"; cat "$out/$name.json"
}
run xla_b64 60 --attention xla --profile "$out/prof_xla_b64"
run cudnn_b64 60 --attention cudnn --profile "$out/prof_cudnn_b64"
run cudnn_b128 100 --attention cudnn --batch_size 128
kill $smi
find "$out" -name '*.xplane.pb' -size +20M -delete    # the raw traces, when too big to fetch
