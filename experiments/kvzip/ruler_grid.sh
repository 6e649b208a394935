#!/usr/bin/env bash
# Issue 16 "must show": the six RULER-4K niah tasks in both query modes, every strategy at kept fractions 0.1 / 0.25 /
# 0.5, 30 samples per cell (95% intervals in the output). `--share-prefill`: each sample is prefilled once per group
# of strategies the core serves alike (4 forwards and 2 KVzip reconstructions per sample for the 29 cells of a task
# and mode; scores bitwise those of separate prefills). SmolLM2-135M: about 1.75 CPU-hours per task and mode at
# 1 thread; qwen2.5-0.5b: about 3.1. It spans sessions: the --out folders are TRACKED, so the cells a session
# finishes are committed and the next session resumes from them; a unit killed midway resumes at its first
# unfinished sample (the journals under <out>/samples/, committed with the results). SmolLM2-135M's full cache
# fails most niah tasks (single_word 1/30), so its compressed cells there measure nothing: run `full` alone first
# (STRATEGIES=full) and the grid where the full cache answers.
# `--decode-together` (since 2026-12-02, from niah_single_uuid on): the caches of a unit then answer together, one
# forward per decode step (`kvcompress.cache_group.CacheGroup`, answers 2.7x cheaper on uuid; answers equal to
# decoding one by one in 95 of 95 measured on uuid and multivalue, experiments/kvzip/decode_together.py). Such cells
# journal apart and are marked "*" in the table. The tasks finished before (single_number, single_word) were decoded
# one by one.
# Several copies may run at once into the same folder (the bench merges under a lock); give each a different
# `--query` to avoid running a cell twice.
# Usage: nice -n 15 bash experiments/kvzip/ruler_grid.sh [out] [query: after|before|both] [budgets: 0.25,0.5,0.1]
#            [model: smollm2-135m|qwen2.5-0.5b|...]     env TASKS=kind,kind (default: the six niah kinds),
#                                                        STRATEGIES=a,b (default: every strategy below)
set -euo pipefail
model=${4:-smollm2-135m}
default_out=docs/results/ruler4k-grid
[ "$model" != smollm2-135m ] && default_out=docs/results/ruler4k-grid-$model
out=${1:-$default_out}
queries=${2:-both}
budgets=${3:-0.25,0.5,0.1}
[ "$queries" = both ] && queries="after before"
kinds=${TASKS:-niah_single_number,niah_single_word,niah_single_uuid,niah_multikey,niah_multivalue,niah_multiquery}
tasks=$(echo "$kinds" | sed 's/\([^,]*\)/ruler_\1@4096/g')
# units run in order of first appearance: kvzip's layer allocation (a reconstruction of its own) last
strategies=${STRATEGIES:-full,kvzip,snapkv,sink_window,h2o,tova,pyramidkv,knorm,expected_attention,anchor,kvzip:allocation=layer}
for query in $queries; do
  OMP_NUM_THREADS=1 python -m kvcompress.bench --model "$model" --tasks "$tasks" --query "$query" --budgets "$budgets" \
      --limit 30 --strategies "$strategies" --threads 1 --no-progress --no-plots --share-prefill --decode-together --out "$out" --resume
done
