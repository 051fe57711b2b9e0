#!/usr/bin/env bash
# Retrain the shipped demo pipeline (checkpoints/demo) from scratch on the shapes world.
#
#   bash scripts/train_demo.sh gpu  RUNS   # one GPU (an H200 took the times in README.md)
#   bash scripts/train_demo.sh cpu  RUNS   # this 2-core CPU: a smaller, shorter run
#   bash scripts/train_demo.sh test RUNS   # a few steps of each stage: checks the script itself
#
# Four trainings in two rounds, each round's two runs side by side (they share the device,
# and one run alone leaves it idle while its host renders data): the 32 px and 64 px
# tokenizers, then the base model (32 px) and the super-resolution model (32 -> 64 px).
# Every stage stops at its --time_limit, having fitted its cosine schedule to the speed it
# measured. Then each transformer is exported to a float16 checkpoint in RUNS/demo, which
# `python sample.py --checkpoint RUNS/demo` reads (copy it to checkpoints/demo to ship it).
set -euo pipefail
mode=${1:?usage: train_demo.sh gpu|cpu|test RUNS}
runs=${2:?usage: train_demo.sh gpu|cpu|test RUNS}
# "purple triangle" and "yellow square" never appear in a relation caption during training;
# `sample.py --evaluate shapes` scores such captions separately (held-out composition).
common=(--data shapes --holdout "purple triangle,yellow square" --sample_every 0 --log_every 50 --ckpt_every 2000)
case $mode in
  #          vq steps/batch/s  transformer steps, base batch, sr batch, s   data workers
  gpu)  vq=(20000 128 110)     tr=(40000 256 128 300)  workers=7 ;;
  cpu)  vq=(3000 16 1200)      tr=(6000 32 16 2400)    workers=0 ;;
  test) vq=(3 4 0)             tr=(3 4 4 0)            workers=2 ;;
  *) echo "unknown mode $mode (gpu, cpu or test)" >&2; exit 2 ;;
esac
# two runs share the device: let each take what it needs instead of 75% of the GPU up front
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

stamp "round 1: tokenizers (32 px and 64 px)"
python train.py vqgan --workdir "$runs/vq32" --preset shapes    --steps ${vq[0]} --batch_size ${vq[1]} \
    --time_limit ${vq[2]} --lr 1e-3 --data_workers $workers "${common[@]}" > "$runs.vq32.log" 2>&1 &
p1=$!
python train.py vqgan --workdir "$runs/vq64" --preset shapes_hr --steps ${vq[0]} --batch_size ${vq[1]} \
    --time_limit ${vq[2]} --lr 1e-3 --data_workers $workers "${common[@]}" > "$runs.vq64.log" 2>&1 &
p2=$!
wait $p1 && wait $p2
stamp "round 1 done"; tail -n 2 "$runs/vq32/metrics.jsonl" "$runs/vq64/metrics.jsonl"

stamp "round 2: base (8x8 tokens) and super-resolution (8x8 -> 16x16 tokens)"
python train.py base --workdir "$runs/base" --preset demo --vqgan "$runs/vq32" --steps ${tr[0]} \
    --batch_size ${tr[1]} --time_limit ${tr[3]} --lr 5e-4 --warmup 500 --data_workers $workers \
    "${common[@]}" > "$runs.base.log" 2>&1 &
p1=$!
python train.py superres --workdir "$runs/superres" --preset demo_sr --vqgan "$runs/vq32" --vqgan_hr "$runs/vq64" \
    --steps ${tr[0]} --batch_size ${tr[2]} --time_limit ${tr[3]} --lr 5e-4 --warmup 500 --data_workers $workers \
    "${common[@]}" > "$runs.superres.log" 2>&1 &
p2=$!
wait $p1 && wait $p2
stamp "round 2 done"; tail -n 2 "$runs/base/metrics.jsonl" "$runs/superres/metrics.jsonl"

python train.py export --workdir "$runs/base" --out "$runs/demo/base"
python train.py export --workdir "$runs/superres" --out "$runs/demo/superres"
stamp "exported to $runs/demo"
