#!/usr/bin/env bash
# The long CPU runs behind issues 16 and 19, each resumable where it stopped (their --out folders are TRACKED: commit
# them before a session ends, `git add -A docs/results && git commit -m "Run journals"`), as two chains of one
# process each (1 thread, niced: one per core of the 2-core machines these ran on), so neither core waits for the
# other's longer step:
#   after:  the qwen2.5-0.5b RULER-4K grid asked after (experiments/kvzip/ruler_grid.sh), then the paper preset's
#           needle@2048 and @4096 asked after, then piqa, then ppl@2048 for the strategies in AFTER_PPL;
#   before: the grid asked before, then the paper preset's needles asked before, then boolq, then ppl@2048 for the
#           strategies in BEFORE_PPL.
# The QA tasks and ppl are split so that both chains end near the same time (estimated on 2026-12-03: the chain
# asked after had 4.5 CPU-hours of needles left, the other 3; piqa 1.2, boolq 1.4; ppl 1.9, kvzip's cells 1.7x
# the others').
# Both finished on 2026-12-03 (the grid: 348 cells; the paper preset on the bundled SmolLM2-135M: 210 cells, its last
# ppl cells split between the two processes by hand, then the final --resume at 20:33 UTC); a rerun of every step
# finds its cells done and exits quickly.
# The chains write into the same docs/results/paper (the bench merges under a lock; their cells are disjoint); once
# both end, one last `--resume` run of the whole preset finds every cell done and rewrites results.json (the whole
# preset's config, intervals and ties), the table and the plots.
# Run from the repository root with the venv active:
#   mkdir -p runs && nohup bash experiments/long_runs.sh >> runs/long_runs.log 2>&1 &
set -euo pipefail
AFTER_PPL=full,anchor,anchor:model=smollm2-135m-anchor-ac,anchor:model=smollm2-135m-anchor-ep,knorm,sink_window,hidden_random,label_words
BEFORE_PPL=expected_attention,pyramidkv,snapkv,tova,h2o,kvzip
paper() {
  OMP_NUM_THREADS=1 nice -n 15 python -m kvcompress.bench --preset paper --threads 1 --no-progress \
      --out docs/results/paper --resume "$@"
}
chain() {  # $1: query mode; $2: the paper preset's other tasks (a comma list) this chain runs after its needles;
           # $3: the strategies (a comma list) whose ppl@2048 cells this chain runs last
  local query=$1 others=$2 ppl_strategies=$3
  nice -n 15 bash experiments/kvzip/ruler_grid.sh "" "$query" 0.25,0.5,0.1 qwen2.5-0.5b
  paper --no-plots --tasks needle@2048,needle@4096 --query "$query"
  paper --no-plots --tasks "$others"
  paper --no-plots --tasks ppl --strategies "$ppl_strategies"
}
chain after piqa "$AFTER_PPL" &
after=$!
chain before boolq "$BEFORE_PPL" &
before=$!
wait "$after"
wait "$before"
paper
