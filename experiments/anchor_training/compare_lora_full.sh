#!/usr/bin/env bash
# Issue 17 item 2: LoRA (ranks 8 and 16, <AC> row trainable in AC mode) against full fine-tuning of SmolLM2-135M
# on the same short token budget (the first 30 steps x 4 x 512 = 61,440 tokens of a 50-step schedule on the default
# training corpus, EP mode), then the held-out essay perplexity gap (64-token chunks) of each. Resumable: rerun the
# script after a kill.
# Usage: nice -n 10 bash experiments/anchor_training/compare_lora_full.sh runs/compare
set -euo pipefail
out=${1:-runs/compare}
mkdir -p "$out"
common=(--mode ep --seq-len 512 --steps 50 --until 30 --warmup 5 --save-every 10 --threads 2 --no-progress)
train() {  # name, extra args...
  local name=$1; shift
  python -m kvcompress.train --output "$out/$name" "${common[@]}" "$@" --resume
  evaluate "$out/$name" "$name"
}
evaluate() {  # model, name
  if [ ! -f "$out/$2.eval.json" ]; then
    python experiments/anchor_eval.py --model "$1" --label "$2" --tasks ppl --out "$out/$2.eval.json.tmp"
    mv "$out/$2.eval.json.tmp" "$out/$2.eval.json"
  fi
}
evaluate smollm2-135m base
train lora8 --lora-rank 8 --lr 5e-4
train full --lr 1e-4
train lora16 --lora-rank 16 --lr 5e-4
