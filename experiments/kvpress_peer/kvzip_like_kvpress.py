"""Does KVzipCache answer the RULER needles kvpress answers once it scores exactly as kvpress does?

On qwen2.5-0.5b's RULER-4K `niah_single_number` at 10% kept, asked after (the grid's cell), kvpress 0.5.5's
KVzipPress answers 7 samples kvcompress's `kvzip` misses (experiments/kvpress_peer/README.md). Two documented
differences in the scores remain besides kvpress's `normalize="chunk"`-style normalisation:
- kvpress takes the chat template's prefix length (24 tokens for qwen2.5) from the tokenizer and assumes the
  context starts with it: positions [n_sink, 24) of the context are never scored (0, evicted first) and the first
  chunk starts at 24. The bench's RULER context is not chat-templated, so those are the first essay tokens.
- the chunk boundaries follow from that (chunks of 2,048 from position 24).
This script answers chosen samples (default: the 7 kvpress-only ones) with `KVzipCache(normalize="chunk")` whose
scores of positions [n_sink, prefix) are set to 0 before the cut (`KvpressLikeKVzip`), through the bench's own
steps (prefill the context, feed the question and answer prefix, greedy answer of at most the kind's 16 tokens,
scored by `ruler.score`), and prints each answer beside kvpress's and the grid's. Chunk boundaries stay
KVzipCache's (from the first token).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/kvpress_peer/kvzip_like_kvpress.py [--samples 1,4,9]
        [--variant prefix-only]   # the default normalisation, [n_sink, prefix) unscored: which of the two matters
        [--variant default]       # KVzipCache as the grid runs it: checks that the script reproduces the grid

Writes experiments/kvpress_peer/kvzip_like_kvpress.json (other variants: kvzip_like_kvpress_<variant>.json).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch

from kvcompress import KVzipCache
from kvcompress.bench import metrics, ruler
from kvcompress.bench.tasks import _greedy_answer, essays_text
from kvcompress.cache import cache_arg
from kvcompress.models import load_model

HERE = pathlib.Path(__file__).resolve().parent
GRID = HERE.parents[1] / "docs" / "results" / "ruler4k-grid-qwen2.5-0.5b" / "results.json"
KVPRESS = HERE / "ruler_kvpress_qwen_0.9.json"
KIND, LENGTH, MODEL, FRACTION = "niah_single_number", 4096, "qwen2.5-0.5b", 0.1


class KvpressLikeKVzip(KVzipCache):
    """KVzipCache(normalize="chunk") that, like KVzipPress, leaves positions [n_sink, prefix) unscored (score 0)."""

    prefix = 0

    def _final_scores(self, layer):
        score = super()._final_scores(layer)
        positions = layer.positions.expand_as(score)
        unscored = (positions >= self.n_sink) & (positions < self.prefix)
        return score.masked_fill(unscored, 0.0)


def chat_prefix_length(tokenizer) -> int:
    """kvpress's `prefix_length`: tokens of the chat template before a user turn's content."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "dummy context\n#############"}],
                                         add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text.split("dummy context")[0], add_special_tokens=False))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="1,4,9,10,18,24,28")
    parser.add_argument("--variant", choices=("kvpress-like", "prefix-only", "default"), default="kvpress-like",
                        help="kvpress-like: normalize='chunk' and [n_sink, prefix) unscored; prefix-only: the default "
                        "normalisation with [n_sink, prefix) unscored; default: KVzipCache as the grid runs it (a "
                        "check that the script reproduces the grid)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default kvzip_like_kvpress[_default].json here")
    args = parser.parse_args(argv)
    args.out = args.out or HERE / ("kvzip_like_kvpress.json" if args.variant == "kvpress-like" else
                                   f"kvzip_like_kvpress_{args.variant}.json")
    model, tokenizer = load_model(MODEL)
    prefix = chat_prefix_length(tokenizer)
    grid = json.loads(GRID.read_text())["cells"][f"ruler_{KIND}@{LENGTH}|kvzip|{FRACTION}"]["answers"]
    kvpress = {e["index"]: e for e in json.loads(KVPRESS.read_text())["configs"]["KVzipPress"]}
    essays, rows = essays_text(), []
    for index in (int(i) for i in args.samples.split(",")):
        sample = ruler.generate(KIND, tokenizer, LENGTH, index, essays)
        if sample.answers != grid[index]["expected"]:
            raise SystemExit(f"sample {index}: {sample.answers} is not the grid's {grid[index]['expected']}")
        context, question, answer_prefix = ruler.prompt_tokens(tokenizer, sample)
        budget = max(1, math.ceil(FRACTION * len(context)))  # the bench's `Budget.resolve`
        if args.variant in ("kvpress-like", "prefix-only"):
            normalize = "chunk" if args.variant == "kvpress-like" else "context"
            cache = KvpressLikeKVzip(model, tokenizer, budget=budget, normalize=normalize)
            cache.prefix = prefix
        else:  # the grid's cell, to check that this script reproduces it
            cache = KVzipCache(model, tokenizer, budget=budget)
        start = time.perf_counter()
        with torch.no_grad():
            model(torch.tensor([context]), **cache_arg(cache))
        kept = [round(float((layer.positions[0] >= 0).sum(-1).float().mean()) / len(context), 4)
                for layer in cache.layers]  # per layer: mean over kv heads of the fraction kept (ruler_kvpress.py's)
        logits, _ = metrics.prefill(model, cache, torch.tensor([question + answer_prefix]))
        text, _, _ = _greedy_answer(model, tokenizer, cache, logits, ruler.ANSWER_TOKENS[KIND], sample.answers)
        row = {"index": index, "expected": sample.answers, "budget": budget, "prefix": prefix,
               "answer": text, "score": ruler.score(text, sample.answers),
               "cut_short": ruler.cut_short(text, sample.answers), "seconds": round(time.perf_counter() - start, 1),
               "grid_kvzip": grid[index]["answer"], "grid_kvzip_score": grid[index]["score"],
               "kept_per_layer": kept, "kvpress_kept_per_layer": kvpress.get(index, {}).get("kept_per_layer"),
               "kvpress": kvpress[index]["answer"] if index in kvpress else None,
               "kvpress_score": ruler.score(kvpress[index]["answer"], sample.answers) if index in kvpress else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps({"fraction": FRACTION, "task": f"ruler_{KIND}@{LENGTH}",
                                        "variant": args.variant, "rows": rows}, indent=1))
    right = sum(r["score"] for r in rows)
    print(f"{args.variant} kvzip: {right:.0f}/{len(rows)} right, {sum(r['cut_short'] for r in rows)} cut short; "
          f"kvpress {sum(r['kvpress_score'] or 0 for r in rows):.0f}/{len(rows)}; grid kvzip "
          f"{sum(r['grid_kvzip_score'] for r in rows):.0f}/{len(rows)}")


if __name__ == "__main__":
    main()
