"""Issue 16: the prefill cost of kvzip against snapkv's, and the memory kvzip's global allocation holds against the
bytes its kept pairs need. Not a test: a measurement script.

    OMP_NUM_THREADS=1 python experiments/kvzip/prefill_cost.py --lengths 2048,4096 --fraction 0.1 --out cost.json

Per length: the bench's essay tokens (`kvcompress.bench.tasks._essay_ids`), one prefill per cache built as the bench
builds it (`kvcompress.bench.speed.build_cache`, budget = fraction x length), measured as the CPU time of the calling
thread with torch on ONE thread (`time.thread_time`: what the prefill costs, not how long it waited on a shared
machine; caches alternate, `--repeats` rounds, median). After the prefill: `kv_bytes()` (what the cache holds) and
`kv_bytes_used()` (the kept pairs' bytes).
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
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caches", default="snapkv,kvzip,kvzip:allocation=layer")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(DEFAULT_MODEL)
    lengths = [int(n) for n in args.lengths.split(",")]
    essay = _essay_ids(tokenizer, max(lengths))
    load_before, rows = os.getloadavg(), []
    for length in lengths:
        ids = torch.tensor([essay[:length]])
        seconds: dict[str, list[float]] = {name: [] for name in args.caches.split(",")}
        held = {}
        for _ in range(args.repeats):
            for name in seconds:
                cache = build_cache(name, model, tokenizer, length, args.fraction)
                start = time.thread_time()
                model(ids, **_cache_kw(cache))
                seconds[name].append(time.thread_time() - start)
                held[name] = (cache.kv_bytes(), cache.kv_bytes_used())
        base = statistics.median(next(iter(seconds.values())))
        for name, samples in seconds.items():
            rows.append({"cache": name, "context_tokens": length, "prefill_cpu_s": statistics.median(samples),
                         "samples": samples, "vs_first": statistics.median(samples) / base,
                         "kv_bytes_held": held[name][0], "kv_bytes_kept": held[name][1],
                         "held_over_kept": held[name][0] / held[name][1]})
    first = args.caches.split(",")[0]
    print(f"| context | cache | prefill CPU s | vs {first} | held / kept bytes |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context_tokens']} | {r['cache']} | {r['prefill_cpu_s']:.1f} | {r['vs_first']:.2f}x | "
              f"{r['held_over_kept']:.3f} |")
    environment = {"torch": torch.__version__, "threads": 1, "loadavg_before": load_before,
                   "loadavg_after": os.getloadavg(), "fraction": args.fraction, "repeats": args.repeats,
                   "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"\none thread; load average before/after {load_before[0]:.2f}/{environment['loadavg_after'][0]:.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"environment": environment, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
