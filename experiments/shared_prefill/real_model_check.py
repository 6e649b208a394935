"""`prefill_shared` on the bundled model: one RULER-4K sample, the caches of the grid's SDPA group prefilled alone
(one forward each) and together (one forward), then the question and a greedy answer from each.

Prints (and writes with --out) the seconds of both, and per cache whether the kept sets, the keys and the answer are
identical. Usage: python experiments/shared_prefill/real_model_check.py [--out FILE.json]
"""

import argparse
import json
import time
from dataclasses import replace

import torch

import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
from kvcompress import registry
from kvcompress.bench import metrics
from kvcompress.bench import tasks as bench_tasks
from kvcompress.bench.runner import parse_budget
from kvcompress.models import load_model

CELLS = [("full", "-"), ("snapkv", "0.25"), ("snapkv", "0.1"), ("tova", "0.25"), ("expected_attention", "0.25"),
         ("knorm", "0.25"), ("sink_window", "0.25"), ("pyramidkv", "0.25")]


def kept(cache) -> list:
    return [layer.positions.tolist() for layer in cache.layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    task = replace(bench_tasks.TASKS["ruler_niah_single_number"], query="after")
    sample = task.prepare(tokenizer, limit=1, seed=0, length=4096, options={})["samples"][0]
    prefix = sample["prefix"]

    def caches():
        out = []
        for name, budget in CELLS:
            cls, options = registry.resolve(name)
            tokens = None if budget == "-" else parse_budget(budget).resolve(prefix.shape[1])
            out.append(cls.for_budget(model, tokenizer, tokens, **options))
        return out

    alone, shared = caches(), caches()
    start = time.perf_counter()
    for cache in alone:
        metrics.prefill(model, cache, prefix)
    alone_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics.prefill_caches(model, shared, prefix)
    shared_seconds = time.perf_counter() - start
    rows = []
    for (name, budget), a, s in zip(CELLS, alone, shared):
        answers = []
        for cache in (a, s):
            logits, _ = metrics.prefill(model, cache, sample["tail"])
            answers.append(bench_tasks._greedy_answer(model, tokenizer, cache, logits, 12, sample["answers"])[0])
        rows.append({"cache": f"{name}|{budget}", "kept_equal": kept(a) == kept(s),
                     "keys_equal": all(torch.equal(x.keys, y.keys) for x, y in zip(a.layers, s.layers)),
                     "answer_equal": answers[0] == answers[1], "answer": answers[1]})
    result = {"context_tokens": prefix.shape[1], "threads": 1, "alone_seconds": round(alone_seconds, 1),
              "shared_seconds": round(shared_seconds, 1), "caches": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
