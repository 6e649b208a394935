#!/usr/bin/env bash
# Issue 16 "must show": needle@2048 in both query modes, every strategy at kept fractions 0.1 / 0.25 / 0.5, 30 needles
# per cell (95% intervals in the output). Resumable (rerun after a kill); query "after" first. `--share-prefill`: one
# prefill forward per sample for the strategies the core serves alike (bitwise the scores of separate prefills).
# Usage: nice -n 15 bash experiments/kvzip/needle_grid.sh runs/needle2k
set -euo pipefail
out=${1:-runs/needle2k}
strategies=full,kvzip,kvzip:allocation=layer,snapkv,sink_window,h2o,tova,pyramidkv,knorm,expected_attention,anchor
for query in after before; do
  python -m kvcompress.bench --tasks needle@2048 --query "$query" --budgets 0.1,0.25,0.5 --limit 30 \
      --strategies "$strategies" --threads 2 --no-progress --share-prefill --out "$out" --resume
done
