#!/usr/bin/env bash
# Items 3 and 4 of docs/quantization.md, run one after the other (2 threads in all):
#   3. the decode step at 4K with int4 against the same strategy in fp32, beside the floor (kvcompress.bench.speed);
#      then where a quantized step's extra time goes (experiments/quantization/profile_read.py);
#   4. transformers' QuantizedCache (quanto, HQQ) on the bench's ppl@2048 windows and the same 4K decode
#      (experiments/quantization/hf_quantized_cache.py, in the separate virtualenv /work/quant-venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/quant-2026-11-30}
uptime
OMP_NUM_THREADS=2 nice -n 5 python -m kvcompress.bench.speed \
  --caches full,full:kv_bits=4,sink_window,sink_window:kv_bits=4 --lengths 4096 --fraction 0.1 --rounds 5 --steps 8 \
  --threads 2 --out "$OUT/speed"
uptime
OMP_NUM_THREADS=2 nice -n 5 python experiments/quantization/profile_read.py --tokens 4096,410 --bits 4,2 --threads 2 \
  | tee "$OUT/profile_read.jsonl"
uptime
OMP_NUM_THREADS=2 nice -n 5 /work/quant-venv/bin/python experiments/quantization/hf_quantized_cache.py --threads 2 \
  --reference "$OUT/results.json" --out "$OUT/hf_quantized_cache.json"
uptime
