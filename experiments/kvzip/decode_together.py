"""Decoding a unit's caches together (`CacheGroup`) against one by one: CPU time and answer flips, same process.

For each RULER sample: the grid's 20-cell unit (every strategy the core serves alike, 3 budgets each) is prefilled
once (`prefill_shared`); then two sets of clones of those caches answer the sample, one set one cache at a time
(`Ruler.answer`, what the grid did), the other together (`Ruler.answer_together`), the order alternating per sample.
Prints the CPU seconds of each answering pass (1 thread) and every answer that differs.

    OMP_NUM_THREADS=1 python experiments/kvzip/decode_together.py --kind niah_single_uuid --query after --samples 3
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
from kvcompress import registry
from kvcompress.bench import tasks
from kvcompress.bench.runner import parse_budget
from kvcompress.models import load_model
from kvcompress.shared_prefill import prefill_shared

UNIT = ["full", "snapkv", "sink_window", "tova", "pyramidkv", "knorm", "expected_attention"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--kind", default="niah_single_uuid")
    p.add_argument("--query", default="after", choices=tasks.QUERY_MODES)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--budgets", default="0.1,0.25,0.5")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    task = replace(tasks.TASKS[f"ruler_{args.kind}"], query=args.query)
    prepared = task.prepare(tokenizer, limit=args.samples, seed=0, length=args.length, options={})
    budgets = [parse_budget(b) for b in args.budgets.split(",")]
    specs = [(name, None) for name in UNIT if not registry.get(name).uses_budget] + \
        [(name, b) for name in UNIT if registry.get(name).uses_budget for b in budgets]
    totals = {"one by one": 0.0, "together": 0.0}
    flips = answers = 0
    for index, sample in enumerate(prepared["samples"]):
        context = sample["prefix"].shape[1]
        caches = [registry.get(name).for_budget(model, tokenizer, None if b is None else b.resolve(context))
                  for name, b in specs]
        prefill_shared(model, caches, sample["prefix"], logits_to_keep=1)
        texts = {}
        for mode in (("one by one", "together") if index % 2 == 0 else ("together", "one by one")):
            clones = [cache.clone() for cache in caches]
            start = time.process_time()
            if mode == "together":
                records = task.answer_together(model, tokenizer, clones, sample, prepared)
            else:
                records = [task.answer(model, tokenizer, clone, sample, prepared) for clone in clones]
            seconds = time.process_time() - start
            totals[mode] += seconds
            texts[mode] = [r["answer"]["answer"] for r in records]
            tokens = sum(r["answer"]["tokens"] for r in records)
            print(f"sample {index} {mode}: {seconds:.1f} CPU-s for {len(clones)} caches, {tokens} answer tokens",
                  flush=True)
        for (name, b), alone, together in zip(specs, texts["one by one"], texts["together"]):
            answers += 1
            if alone != together:
                flips += 1
                print(f"  differs: {name}|{b.label if b else '-'}: {alone!r} vs {together!r}")
    print(f"{args.kind} {args.query}, {args.samples} samples x {len(specs)} caches: CPU-s one by one "
          f"{totals['one by one']:.0f}, together {totals['together']:.0f} "
          f"({totals['one by one'] / max(totals['together'], 1e-9):.2f}x); answers that differ: {flips}/{answers}")


if __name__ == "__main__":
    main()
