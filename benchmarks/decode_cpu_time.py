"""CPU time of a decode step per cache, on one thread: a companion of `python -m kvcompress.bench.speed` for a machine
shared with other jobs (not a test: a script).

    python benchmarks/decode_cpu_time.py --caches sink_window,h2o --lengths 4096,8192 --fraction 0.1 --out t.json

Caches are built and prefilled as the speed bench does (`kvcompress.bench.speed.build_cache`, the same essay
tokens), then `--rounds` interleaved rounds (the order rotates) of `--steps` greedy decode steps each. Measured:
the CPU time of the calling thread (`time.thread_time`) per decode step and per prefill, with torch on ONE thread,
so all the work runs on that thread. Unlike wall time, this does not grow when other processes take the cores
(it still includes cache and memory-bandwidth contention): what a step costs, not how long it waited. Printed:
median step CPU ms (IQR) per cache, its ratio to the first cache's, and the prefill CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from kvcompress.bench.speed import _cache_kw, build_cache
from kvcompress.bench.tasks import _essay_ids
from kvcompress.models import DEFAULT_MODEL, load_model


@torch.no_grad()
def run_length(model, tokenizer, ids, names, fraction, rounds, steps) -> list[dict]:
    live, rows = {}, {}
    for name in names:
        cache = build_cache(name, model, tokenizer, ids.shape[1], fraction)
        model.set_attn_implementation("sdpa" if name == "dynamic" else "kvcompress")
        start = time.thread_time()
        token = model(ids, **_cache_kw(cache)).logits[:, -1:].argmax(-1)
        prefill = time.thread_time() - start
        token = model(token, **_cache_kw(cache)).logits[:, -1:].argmax(-1)  # warm-up step
        live[name] = [cache, token]
        rows[name] = {"cache": name, "context_tokens": ids.shape[1], "prefill_cpu_s": prefill, "step_cpu_s": []}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            cache, token = live[name]
            model.set_attn_implementation("sdpa" if name == "dynamic" else "kvcompress")
            for _ in range(steps):
                start = time.thread_time()
                token = model(token, **_cache_kw(cache)).logits[:, -1:].argmax(-1)
                rows[name]["step_cpu_s"].append(time.thread_time() - start)
            live[name][1] = token
    base = statistics.median(rows[names[0]]["step_cpu_s"])
    for row in rows.values():
        samples = row["step_cpu_s"]
        quartiles = statistics.quantiles(samples, n=4)
        row.update(step_cpu_ms=statistics.median(samples) * 1e3, step_cpu_ms_iqr=(quartiles[2] - quartiles[0]) * 1e3,
                   ratio_to_first=statistics.median(samples) / base)
    return [rows[name] for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caches", default="sink_window,h2o,tova,snapkv,pyramidkv,knorm,expected_attention")
    parser.add_argument("--lengths", default="4096,8192")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=None, help="JSON file for the rows and the environment")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    names = args.caches.split(",")
    lengths = [int(n) for n in args.lengths.split(",")]
    model, tokenizer = load_model(DEFAULT_MODEL)
    essay = _essay_ids(tokenizer, max(lengths))
    load_before, started = os.getloadavg(), time.time()
    rows = []
    for length in lengths:
        rows += run_length(model, tokenizer, torch.tensor([essay[:length]]), names, args.fraction, args.rounds,
                           args.steps)
    environment = {"torch": torch.__version__, "threads": 1, "loadavg_before": load_before,
                   "loadavg_after": os.getloadavg(), "wall_seconds": time.time() - started, "rounds": args.rounds,
                   "steps": args.steps, "fraction": args.fraction,
                   "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"| context | cache | step CPU ms (IQR) | vs {names[0]} | prefill CPU s |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context_tokens']} | {r['cache']} | {r['step_cpu_ms']:.1f} ({r['step_cpu_ms_iqr']:.1f}) | "
              f"{r['ratio_to_first']:.2f}x | {r['prefill_cpu_s']:.1f} |")
    print(f"\none thread, medians of {args.rounds} rounds x {args.steps} steps; load average before/after "
          f"{load_before[0]:.2f}/{environment['loadavg_after'][0]:.2f}; {environment['wall_seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"environment": environment, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
