#!/usr/bin/env bash
# The long CPU runs behind issues 16 and 19, in order, each resumable where it stopped (their --out folders are
# TRACKED: commit them before a session ends, `git add -A docs/results && git commit -m "Run journals"`):
#   1. the qwen2.5-0.5b RULER-4K grid, one process per query mode (experiments/kvzip/ruler_grid.sh; about 11 CPU-hours
#      left on 2026-12-02 at 19:30 UTC: multivalue and multiquery);
#   2. then `--preset paper` on the bundled SmolLM2-135M as two torchrun ranks (about 18 CPU-hours, docs/bench.md).
# Run from the repository root with the venv active:
#   mkdir -p runs && nohup bash experiments/long_runs.sh >> runs/long_runs.log 2>&1 &
# Both steps run niced, 1 thread per process (2 processes: one per core of the 2-core machines these ran on).
set -euo pipefail
nice -n 15 bash experiments/kvzip/ruler_grid.sh "" after 0.25,0.5,0.1 qwen2.5-0.5b &
after=$!
nice -n 15 bash experiments/kvzip/ruler_grid.sh "" before 0.25,0.5,0.1 qwen2.5-0.5b &
before=$!
wait "$after" "$before"
OMP_NUM_THREADS=1 nice -n 15 torchrun --standalone --nproc_per_node 2 -m kvcompress.bench --preset paper --threads 1 \
    --no-progress --out docs/results/paper --resume
