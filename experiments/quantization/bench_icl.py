"""`python -m kvcompress.bench` with one extra preset, `icl8`: the quick preset with 8 demonstrations per class in
the ICL tasks (sst2, trec, agnews) instead of 1.

Why: with the bench's one demonstration per class the SST-2 prompt is 56 tokens; quantized storage quantizes whole
pages of `group` (32) kept tokens older than the newest `residual`, so at a 25% budget (14 tokens) nothing is ever
quantized and "25% + int4" is byte for byte "25% fp32" (docs/quantization.md). With 8 per class the prompt is ~450
tokens and a 25% budget fills pages. The CLI has no option for demonstrations per class; this adds none to the
library, it only registers the preset before calling the CLI:

    python experiments/quantization/bench_icl.py --tasks sst2 --strategies ... --budgets ... --out DIR --resume
"""

import sys

from kvcompress.bench import cli

quick = cli.PRESETS["quick"]
cli.PRESETS["icl8"] = {**quick, "options": {**quick["options"], "k_per_class": 8}}

if __name__ == "__main__":
    sys.exit(cli.main([*sys.argv[1:], "--preset", "icl8"]))
