#!/usr/bin/env bash
# Issue 16 "must show": the six RULER-4K niah tasks in both query modes, every strategy at kept fractions 0.1 / 0.25 /
# 0.5, 30 samples per cell (95% intervals in the output). `--share-prefill`: each sample is prefilled once per group
# of strategies the core serves alike (4 forwards and 2 KVzip reconstructions per sample for the 28 cells of a task
# and mode; scores bitwise those of separate prefills): about 1.75 CPU-hours per task and mode at 1 thread, ~20 in
# all, so it spans sessions. The default --out is TRACKED (docs/results/ruler4k-grid): the cells a session finishes
# are committed and the next session resumes from them (a unit killed midway is lost: the longest, kvzip's, is
# ~30 CPU-minutes).
# Several copies may run at once into the same folder (the bench merges under a lock); give each a different
# `--query` to avoid running a cell twice.
# Usage: nice -n 15 bash experiments/kvzip/ruler_grid.sh [out] [query: after|before|both] [budgets: 0.25,0.5,0.1]
set -euo pipefail
out=${1:-docs/results/ruler4k-grid}
queries=${2:-both}
budgets=${3:-0.25,0.5,0.1}
[ "$queries" = both ] && queries="after before"
tasks=ruler_niah_single_number@4096,ruler_niah_single_word@4096,ruler_niah_single_uuid@4096
tasks=$tasks,ruler_niah_multikey@4096,ruler_niah_multivalue@4096,ruler_niah_multiquery@4096
strategies=full,kvzip,kvzip:allocation=layer,snapkv,sink_window,h2o,tova,pyramidkv,knorm,expected_attention,anchor
for query in $queries; do
  OMP_NUM_THREADS=1 python -m kvcompress.bench --tasks "$tasks" --query "$query" --budgets "$budgets" --limit 30 \
      --strategies "$strategies" --threads 1 --no-progress --no-plots --share-prefill --out "$out" --resume
done
