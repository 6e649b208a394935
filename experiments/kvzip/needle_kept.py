"""Which layers keep the needle: for needles of the bench's needle@2048 task, the fraction of the needle number's
tokens each layer keeps (mean over kv heads) after one prefill per cache. Not a test: the measurement behind
docs/kvzip.md's reading of SnapKV in `--query before` mode.

    OMP_NUM_THREADS=1 python experiments/kvzip/needle_kept.py --caches snapkv,kvzip --fraction 0.25 --query before
"""

from __future__ import annotations

import argparse

import torch

from kvcompress.bench.speed import _cache_kw, build_cache
from kvcompress.bench.tasks import _encode, parse_task
from kvcompress.models import DEFAULT_MODEL, load_model


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caches", default="snapkv,kvzip")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--query", default="before", choices=("before", "after"))
    parser.add_argument("--needles", default="4:8", help="slice of the task's 30 needles, start:stop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(DEFAULT_MODEL)
    _, task, _ = parse_task(f"needle@2048:{args.query}", {})[0]
    samples = task.prepare(tokenizer, limit=30, seed=0, length=2048, options={})["samples"]
    start, stop = (int(x) for x in args.needles.split(":"))
    for sample in samples[start:stop]:
        ids = sample["prefix"]
        tokens, number = ids[0].tolist(), _encode(tokenizer, sample["number"])
        at = next(i for i in range(len(tokens)) if tokens[i : i + len(number)] == number)
        span = torch.arange(at, at + len(number))
        for name in args.caches.split(","):
            cache = build_cache(name, model, tokenizer, ids.shape[1], args.fraction)
            model(ids, **_cache_kw(cache))
            fractions = []
            for layer in cache.layers:
                positions = layer.positions[0, :, : layer.used]  # (kv heads or 1, used)
                fractions.append(torch.stack([torch.isin(span, row) for row in positions]).float().mean().item())
            print(f"needle {sample['number']} {name:>8}: " + " ".join(f"{f:.1f}" for f in fractions))


if __name__ == "__main__":
    main()
