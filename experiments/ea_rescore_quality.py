"""What expected_attention's `rescore_every` approximation costs in quality: teacher-forced decoding after a
compressed prompt, exact (rescore_every=1) against rescore_every=N, on identical tokens.

    OMP_NUM_THREADS=1 python experiments/ea_rescore_quality.py --every 4,16 --windows 3 --out ea_rescore.json

Per window (disjoint `--prompt + --decode` token windows of the Paul Graham essays): the prompt is prefilled in one
forward (compressed to `--budget` tokens per layer and kv head), then the next `--decode` tokens are fed ONE at a
time (decode steps: where rescore_every acts) and scored (`bench.metrics.streaming_nll` with chunk 1 after the
prompt). Printed per configuration: perplexity over the decoded tokens, the paired difference in mean NLL to the
exact strategy (per window), and the Jaccard overlap of its kept (layer, kv head, position) triples with the exact
strategy's at the end. FullCache and sink_window rows frame the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
from kvcompress import registry
from kvcompress.bench.metrics import streaming_nll
from kvcompress.bench.tasks import _essay_ids
from kvcompress.cache import cache_arg
from kvcompress.models import DEFAULT_MODEL, load_model


def kept_triples(cache) -> set:
    return {(layer, head, position) for layer in range(len(cache.layers))
            for head in range(cache.layers[layer].keys.shape[1])
            for position in cache.kept_positions(layer, head)[0]}


@torch.no_grad()
def run_window(model, tokenizer, window: torch.Tensor, spec: str, budget: int, prompt: int) -> tuple[float, int, set]:
    cls, options = registry.resolve(spec)
    cache = cls.for_budget(model, tokenizer, budget if cls.uses_budget else None, **options)
    logits = model(window[:, :prompt], **cache_arg(cache)).logits[0, -1].float()
    first = -logits.log_softmax(-1)[int(window[0, prompt])].item()
    total, count = streaming_nll(model, cache, window[:, prompt:], chunk=1)
    triples = kept_triples(cache) if hasattr(cache, "kept_positions") else set()
    return total + first, count + 1, triples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", default="4,16", help="rescore_every values to compare with the exact strategy")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=512)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tokenizer = load_model(DEFAULT_MODEL)
    model.set_attn_implementation("kvcompress")
    length = args.prompt + args.decode
    ids = _essay_ids(tokenizer, length * args.windows)
    windows = [torch.tensor([ids[i * length:(i + 1) * length]]) for i in range(args.windows)]
    exact = "expected_attention"
    specs = ["full", "sink_window", exact] + [f"{exact}:rescore_every={n}" for n in args.every.split(",")]
    rows, started = {}, time.time()
    for spec in specs:
        nll, tokens, kept, seconds = [], [], [], []
        for window in windows:
            start = time.thread_time()
            total, count, triples = run_window(model, tokenizer, window, spec, args.budget, args.prompt)
            seconds.append(time.thread_time() - start)
            nll.append(total)
            tokens.append(count)
            kept.append(triples)
        rows[spec] = {"spec": spec, "window_nll": nll, "window_tokens": tokens, "cpu_seconds": seconds,
                      "perplexity": math.exp(sum(nll) / sum(tokens)), "_kept": kept}
        print(f"{spec}: ppl {rows[spec]['perplexity']:.3f} ({sum(seconds):.0f} CPU s)", flush=True)
    print(f"\n| strategy ({args.budget} kept, {args.decode} decode steps x {args.windows} windows) | ppl | "
          f"mean NLL - exact, per window | kept set vs exact (Jaccard) |\n|---|---:|---:|---:|")
    for spec, row in rows.items():
        diffs = [a / n - b / n for a, b, n in zip(row["window_nll"], rows[exact]["window_nll"], row["window_tokens"])]
        shared = [len(k & e) / max(1, len(k | e)) for k, e in zip(row["_kept"], rows[exact]["_kept"])]
        row.update(nll_minus_exact=diffs, kept_jaccard_with_exact=shared)
        print(f"| {spec} | {row['perplexity']:.3f} | {', '.join(f'{d:+.4f}' for d in diffs)} | "
              f"{', '.join(f'{s:.3f}' for s in shared)} |")
    if args.out:
        for row in rows.values():
            row.pop("_kept")
        environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "wall_seconds":
                       time.time() - started, "loadavg": os.getloadavg(), "args": vars(args),
                       "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(args.out, "w") as handle:
            json.dump({"environment": environment, "rows": list(rows.values())}, handle, indent=1)


if __name__ == "__main__":
    main()
