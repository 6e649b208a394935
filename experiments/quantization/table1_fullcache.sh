#!/usr/bin/env bash
# Table 1 of docs/quantization.md: FullCache int8/int4/int2 against fp32 FullCache, ppl@2048, the same 3 disjoint
# windows for every cell (--limit 3, seed 0). The fp32 `full` cell ran first in one process (2 threads); the rest
# under torchrun, 2 processes x 1 thread (the cells are dealt round-robin, each process saves after each cell,
# --resume keeps finished cells). Cells in priority order.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/quant-2026-11-30}
uptime
OMP_NUM_THREADS=2 nice -n 5 python -m kvcompress.bench --tasks ppl@2048 --limit 3 --threads 2 --no-progress \
  --strategies full --out "$OUT" --resume --no-plots
uptime
OMP_NUM_THREADS=1 nice -n 5 torchrun --standalone --nproc_per_node 2 -m kvcompress.bench --tasks ppl@2048 \
  --limit 3 --threads 1 --no-progress \
  --strategies "full:kv_bits=4:residual=0,full:kv_bits=4,full:kv_bits=2,full:kv_bits=8,full:kv_bits=4:residual=0:group=64,full:kv_bits=2:residual=0" \
  --out "$OUT" --resume
uptime
