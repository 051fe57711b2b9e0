#!/usr/bin/env bash
# One lent GPU session, as one command (docs/results.md, "Speed on a GPU"): the benchmarks,
# then three demo trainings side by side on the same GPU, exported for the CPU's
# `evaluate.py shapes` to judge:
#   ft_base:  the shipped base model fine-tuned (--init checkpoints/demo/base);
#   ft_sr:    the shipped super-res model fine-tuned (--init checkpoints/demo/superres);
#   sr:       a super-res model from scratch on the shipped tokenizers (the reproducible path).
#
#   bash scripts/gpu_session.sh OUT [SECONDS]     # SECONDS: each training's --time_limit (240)
#   bash scripts/gpu_session.sh OUT test          # tiny: checks the script itself on a CPU
#
# Writes OUT/bench.jsonl (one JSON line per benchmark), OUT/logs.tgz (logs and metrics) and
# OUT/{ft_base,ft_sr,sr}/checkpoint.msgpack (float16 exports, a few MB each).
set -u
out=${1:?usage: gpu_session.sh OUT [SECONDS|test]}
limit=${2:-240}
mkdir -p "$out" runs/gpu
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import jax, flax, optax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'transformers', transformers.__version__, jax.devices())" 2>&1; } > "$out/env.txt"
cat "$out/env.txt"

# 1. benchmarks, each alone on the device; a failure or a hang costs only its own line
if [ "$limit" = test ]; then
  benches=("bench.py train tiny --bench_steps 2" "bench.py sample tiny")
  limit=0; batch=(4 4); workers=1
else
  benches=("bench.py train base --dtype bfloat16"
           "bench.py train small --dtype bfloat16" "bench.py train medium --dtype bfloat16"
           "bench.py sample small --dtype bfloat16" "bench.py sample medium --dtype bfloat16")
  batch=(256 128); workers=4
fi
for b in "${benches[@]}"; do
  stamp "benchmark: $b"
  # the paper-scale base preset's step compiles for 60-90 s on an H100, so it gets 420 s (its
  # progress lines on stderr, kept in bench.err, say how far it got)
  case $b in *"train base "*) t=420 ;; *) t=150 ;; esac
  timeout $t python3 $b 2>>"$out/bench.err" | tail -n 1 | tee -a "$out/bench.jsonl"
done

# 2. three trainings side by side (small models leave most of the GPU idle: each takes a
# third of its memory, not the 75% JAX takes by default)
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
common=(--data shapes --holdout "purple triangle,yellow square" --sample_every 0 --log_every 50
        --ckpt_every 5000 --steps 100000 --time_limit "$limit" --data_workers $workers)
[ "$limit" = 0 ] && common+=(--steps 3)
tok=(--vqgan checkpoints/demo/base)
tok_hr=(--vqgan checkpoints/demo/base --vqgan_hr checkpoints/demo/superres)
stamp "training for ${limit}s each"
python3 train.py base --workdir runs/gpu/ft_base --preset demo "${tok[@]}" --init checkpoints/demo/base \
    --batch_size ${batch[0]} --lr 3e-4 --warmup 300 "${common[@]}" > "$out/ft_base.log" 2>&1 &
python3 train.py superres --workdir runs/gpu/ft_sr --preset demo_sr "${tok_hr[@]}" --init checkpoints/demo/superres \
    --batch_size ${batch[1]} --lr 3e-4 --warmup 300 "${common[@]}" > "$out/ft_sr.log" 2>&1 &
python3 train.py superres --workdir runs/gpu/sr --preset demo_sr "${tok_hr[@]}" \
    --batch_size ${batch[1]} --lr 5e-4 --warmup 300 "${common[@]}" > "$out/sr.log" 2>&1 &
wait
stamp "trained"
for run in ft_base ft_sr sr; do
  tail -n 1 runs/gpu/$run/metrics.jsonl
  python3 train.py export --workdir runs/gpu/$run --out "$out/$run"
  cp runs/gpu/$run/metrics.jsonl "$out/$run.metrics.jsonl"
done
(cd "$out" && tar czf logs.tgz env.txt bench.err ./*.log ./*.metrics.jsonl && rm -f bench.err ./*.log ./*.metrics.jsonl env.txt)
stamp "done"
