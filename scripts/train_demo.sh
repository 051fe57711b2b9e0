#!/usr/bin/env bash
# Retrain the shipped demo pipeline (checkpoints/demo) from scratch on the shapes world.
#
#   bash scripts/train_demo.sh gpu  RUNS   # one GPU: ~8.5 min end to end (512 s on an H200); made the shipped files
#   bash scripts/train_demo.sh cpu  RUNS   # a 2-core CPU: 93 min, one stage at a time; 78.5-84% (docs/results.md)
#   bash scripts/train_demo.sh test RUNS   # a few steps of each stage: checks the script itself (gpu's order)
#
# Every stage stops at its --time_limit, having fitted its cosine schedule to the speed it
# measured, so the times below are what each stage takes on any machine:
#   1. the 32 px tokenizer (8x8 tokens);
#   2. the base model on it, and the 64 px tokenizer (16x16 tokens) started from the 32 px
#      one's weights (--init: a VQGAN is fully convolutional) and fine-tuned;
#   3. the super-resolution model (8x8 -> 16x16 tokens), which needs both tokenizers but not
#      the base model.
# On a GPU the base model trains beside the 64 px tokenizer and then the super-res model
# (110 s + max(300 s, 120 s + 240 s)). On a CPU every stage runs alone, one after the other
# (600 s + 500 s + 2700 s + 2100 s): two runs sharing its two cores each ran at well under
# half speed (an earlier version of this recipe ran the base model beside the 64 px
# tokenizer, which then reached only 166 of its 300 steps). The CPU's transformers are
# smaller (`demo_cpu`, `demo_sr_cpu`, at lr 1e-3): in its 45 and 35 minutes they see twice the
# images that `demo` and `demo_sr` would, which took the pipeline from 64% to 78.5-84%.
# Then both transformers are exported to float16 checkpoints in RUNS/demo, which
# `python sample.py --checkpoint RUNS/demo` reads (copy it to checkpoints/demo to ship it).
#
# How the shipped files were made (docs/results.md, "How the shipped demo was trained"): this
# script's gpu mode on one H200, `bash scripts/train_demo.sh gpu /tmp/runs`, then
# `cp -r /tmp/runs/demo/* checkpoints/demo/`; 512 s wall, 96.8-97.8% on the checker.
set -euo pipefail
mode=${1:?usage: train_demo.sh gpu|cpu|test RUNS}
runs=${2:?usage: train_demo.sh gpu|cpu|test RUNS}
# "purple triangle" and "yellow square" never appear in a relation caption during training;
# `evaluate.py shapes` scores such captions separately (held-out composition).
common=(--data shapes --holdout "purple triangle,yellow square" --sample_every 0 --log_every 25 --ckpt_every 2000)
case $mode in
  #       vq32: batch, s   vq64: steps, batch, s   base: preset, batch, s, lr    superres: preset, batch, s, lr     data workers, round 3 beside base
  gpu)  vq32=(128 110)     vq64=(3000 128 120)     base=(demo 256 300 5e-4)      sr=(demo_sr 128 240 5e-4)          workers=7 overlap=1 ;;
  cpu)  vq32=(16 600)      vq64=(300 16 500)       base=(demo_cpu 32 2700 1e-3)  sr=(demo_sr_cpu 16 2100 1e-3)      workers=0 overlap=0 ;;
  test) vq32=(4 0)         vq64=(3 4 0)            base=(demo_cpu 4 0 1e-3)      sr=(demo_sr_cpu 4 0 1e-3)          workers=2 overlap=1 ;;
  *) echo "unknown mode $mode (gpu, cpu or test)" >&2; exit 2 ;;
esac
steps=$([ "$mode" = test ] && echo 3 || echo 100000)   # the time limits decide, except in test mode
# on a GPU two runs share the device: let each take what it needs, not 75% of it up front
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

stamp "round 1: the 32 px tokenizer"
python train.py vqgan --workdir "$runs/vq32" --preset shapes --steps $steps --batch_size ${vq32[0]} \
    --time_limit ${vq32[1]} --lr 1e-3 --data_workers $workers "${common[@]}" > "$runs.vq32.log" 2>&1
stamp "round 1 done"; tail -n 1 "$runs/vq32/metrics.jsonl"

train_base() {
  python train.py base --workdir "$runs/base" --preset ${base[0]} --vqgan "$runs/vq32" --steps $steps \
      --batch_size ${base[1]} --time_limit ${base[2]} --lr ${base[3]} --warmup 500 --data_workers $workers \
      "${common[@]}" > "$runs.base.log" 2>&1
  stamp "base model done"; tail -n 1 "$runs/base/metrics.jsonl"
}
train_vq64() {
  python train.py vqgan --workdir "$runs/vq64" --preset shapes_hr --init "$runs/vq32" --steps ${vq64[0]} \
      --batch_size ${vq64[1]} --time_limit ${vq64[2]} --lr 2e-4 --warmup 20 --data_workers $workers \
      "${common[@]}" > "$runs.vq64.log" 2>&1
  stamp "64 px tokenizer done"; tail -n 1 "$runs/vq64/metrics.jsonl"
}
train_superres() {
  python train.py superres --workdir "$runs/superres" --preset ${sr[0]} --vqgan "$runs/vq32" --vqgan_hr "$runs/vq64" \
      --steps $steps --batch_size ${sr[1]} --time_limit ${sr[2]} --lr ${sr[3]} --warmup 200 --data_workers $workers \
      "${common[@]}" > "$runs.superres.log" 2>&1
  stamp "super-res model done"; tail -n 1 "$runs/superres/metrics.jsonl"
}
if [ $overlap = 1 ]; then
  stamp "rounds 2 and 3: the base model, beside the 64 px tokenizer and then the super-res model"
  train_base & p1=$!
  train_vq64
  train_superres
  wait $p1
else
  stamp "then one at a time: the 64 px tokenizer, the base model, the super-res model"
  train_vq64
  train_base
  train_superres
fi

python train.py export --workdir "$runs/base" --out "$runs/demo/base"
python train.py export --workdir "$runs/superres" --out "$runs/demo/superres"
stamp "exported to $runs/demo"
