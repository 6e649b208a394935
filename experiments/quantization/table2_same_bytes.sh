#!/usr/bin/env bash
# Table 2 of docs/quantization.md: the same KV bytes spent two ways, and demoted instead of dropped.
#   ppl@2048 on the 3 windows of table 1 (--limit 3, seed 0): 25% kept + int4 (residual 0) holds 0.039 of the fp32
#   bytes, the same as 80 tokens (0.039) kept in fp32; sink_window 62 tokens (0.03) + the rest demoted to int2 holds
#   0.122, the same as 250 tokens in fp32.
#   SST-2 with 8 demonstrations per class (475-token prompt; experiments/quantization/bench_icl.py), 100 test inputs:
#   25% + int4 holds 0.080 (three full pages quantized, the partial fourth in fp32) = 8% in fp32; 3% + int2 demoted
#   holds 0.145 = 14.5% in fp32.
# (Byte fractions from the run itself: kv_bytes_fraction of each cell.)
# Two single-thread streams (2 threads in all): stream a writes into $OUT, stream b into $OUT-b; then b's cells are
# merged into $OUT (as a results.rank1.json, the file a stopped torchrun run leaves and `--resume` reads), and a
# resume that has nothing left to run writes the merged results.json with every interval and paired difference.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/quant-2026-11-30}
COMMON="--threads 1 --no-progress --no-plots --resume"
BENCH="nice -n 5 python -m kvcompress.bench $COMMON"
ICL="nice -n 5 python experiments/quantization/bench_icl.py $COMMON"
export OMP_NUM_THREADS=1
int4=kv_bits=4:residual=0
uptime
(
  set -x
  $BENCH --tasks ppl@2048 --limit 3 --out "$OUT" --budgets 0.25 \
    --strategies "sink_window:$int4,snapkv:$int4,expected_attention:$int4"
  $BENCH --tasks ppl@2048 --limit 3 --out "$OUT" --budgets 0.03 --strategies sink_window:evicted=2
  $ICL --tasks sst2 --limit 100 --out "$OUT" --strategies full
  $ICL --tasks sst2 --limit 100 --out "$OUT" --budgets 0.25 \
    --strategies "sink_window:$int4,snapkv:$int4,expected_attention:$int4"
  uptime
) > "$OUT-stream-a.log" 2>&1 &
(
  set -x
  $BENCH --tasks ppl@2048 --limit 3 --out "$OUT-b" --budgets 80 --strategies sink_window,snapkv,expected_attention
  $BENCH --tasks ppl@2048 --limit 3 --out "$OUT-b" --budgets 250 --strategies sink_window
  $ICL --tasks sst2 --limit 100 --out "$OUT-b" --budgets 0.08 --strategies sink_window,snapkv,expected_attention
  $ICL --tasks sst2 --limit 100 --out "$OUT-b" --budgets 0.03 --strategies sink_window:evicted=2
  $ICL --tasks sst2 --limit 100 --out "$OUT-b" --budgets 0.145 --strategies sink_window
  uptime
) > "$OUT-stream-b.log" 2>&1 &
wait
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
cells = json.loads((out.parent / (out.name + "-b") / "results.json").read_text())["cells"]
(out / "results.rank1.json").write_text(json.dumps({"rank": 1, "world_size": 2, "cells": cells}))
PY
OMP_NUM_THREADS=2 nice -n 5 python experiments/quantization/bench_icl.py --threads 2 --no-progress --resume \
  --out "$OUT" --tasks ppl@2048,sst2 --limit 3 --strategies full
uptime
