"""Which layers keep the needle: for needles of the bench's needle task (needle@2048; `--length` another), the
fraction of the needle number's tokens each layer keeps (mean over kv heads) after one prefill per cache. Not a test:
the measurement behind docs/kvzip.md's reading of SnapKV in `--query before` mode, and behind docs/results.md's
check that one reconstruction chunk keeps what two do at 4K (the second command).

    OMP_NUM_THREADS=1 python experiments/kvzip/needle_kept.py --caches snapkv,kvzip --fraction 0.25 --query before
    OMP_NUM_THREADS=1 python experiments/kvzip/needle_kept.py --caches kvzip,kvzip:chunk=4000 --fraction 0.1 \
        --query after --length 4096 --limit 100 --needles 6:9     # the paper preset's needles 6-8
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
    parser.add_argument("--length", type=int, default=2048, help="the haystack length in tokens")
    parser.add_argument("--limit", type=int, default=30,
                        help="the task's needle count (30: the grid; 100: the paper preset)")
    parser.add_argument("--needles", default="4:8", help="slice of the task's needles, start:stop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(DEFAULT_MODEL)
    _, task, _ = parse_task(f"needle@{args.length}:{args.query}", {})[0]
    samples = task.prepare(tokenizer, limit=args.limit, seed=0, length=args.length, options={})["samples"]
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
            print(f"needle {sample['number']} depth {sample['depth']:.2f} {name:>8}: "
                  + " ".join(f"{f:.1f}" for f in fractions))


if __name__ == "__main__":
    main()
