"""Tensor operations per decode step, per cache, counted with the torch profiler (not a test: a script).

    python benchmarks/decode_op_counts.py --caches sink_window,h2o --length 1024 --fraction 0.1 [--top 15]

For each cache: the bundled SmolLM2-135M (fp32, CPU) prefills `--length` essay tokens into a cache sized as the
speed bench sizes it (`kvcompress.bench.speed.build_cache`, `--fraction` of the context kept), decodes one warm-up
step, then `--steps` greedy steps under `torch.profiler`. Printed per cache: the operations without a parent
event (top-level `aten::` calls: what Python dispatched, each paying the dispatcher's fixed cost) per step, and
with `--top N` the N most frequent top-level operations, with their calls and CPU time (self + children) per step.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from kvcompress.bench.speed import _cache_kw, build_cache
from kvcompress.bench.tasks import _essay_ids
from kvcompress.models import DEFAULT_MODEL, load_model


@torch.no_grad()
def count(model, tokenizer, name: str, ids: torch.Tensor, fraction: float, steps: int):
    """Of `steps` decode steps: (top-level operations per step, Counters name -> CPU microseconds per step and
    name -> calls per step)."""
    cache = build_cache(name, model, tokenizer, ids.shape[1], fraction)
    model.set_attn_implementation("sdpa" if name == "dynamic" else "kvcompress")
    token = model(ids, **_cache_kw(cache)).logits[:, -1:].argmax(-1)
    token = model(token, **_cache_kw(cache)).logits[:, -1:].argmax(-1)  # warm-up step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = model(token, **_cache_kw(cache)).logits[:, -1:].argmax(-1)
    top = [event for event in prof.events() if event.cpu_parent is None]
    time, calls = collections.Counter(), collections.Counter()
    for event in top:
        time[event.name] += event.cpu_time_total / steps
        calls[event.name] += 1 / steps
    return len(top) / steps, time, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caches", default="sink_window,h2o,tova,snapkv,pyramidkv,knorm,expected_attention")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=0, help="also list the N most frequent top-level operations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(DEFAULT_MODEL)
    ids = torch.tensor([_essay_ids(tokenizer, args.length)[: args.length]])
    for name in args.caches.split(","):
        ops, time, calls = count(model, tokenizer, name, ids, args.fraction, args.steps)
        print(f"{name}: {ops:,.0f} operations per decode step ({sum(time.values()) / 1e3:.1f} ms CPU)")
        for op, n in calls.most_common(args.top):
            print(f"    {op:<40} {n:6.0f} calls {time[op] / 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
