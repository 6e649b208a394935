"""Dump what each attention-aware strategy keeps and outputs on the bundled SmolLM2-135M, to compare two checkouts
(not a test: a script; the library's own tests compare against independent references instead).

    python benchmarks/dump_kept_sets.py --out after.pt                    # in the checkout under test
    cd /tmp && PYTHONPATH=<other checkout as a package> python .../dump_kept_sets.py --out before.pt
    python benchmarks/dump_kept_sets.py --compare before.pt after.pt

Per strategy (sized with `for_budget` to `--fraction` of the prompt): a batch of two left-padded essay prompts of
`--length` and `--length` // 2 tokens, prefilled whole (`--chunk 0`) or in chunks, then `--steps` greedy decode
steps. Recorded after every forward: the kept stream positions of every layer, row and kv head, and the logits
of the last position. `--compare` prints, per strategy, the forwards whose kept sets differ and the largest logit
difference.
"""

from __future__ import annotations

import argparse

import torch

STRATEGIES = ("h2o", "tova", "snapkv", "pyramidkv", "knorm", "expected_attention", "sink_window")


@torch.no_grad()
def dump(length: int, fraction: float, steps: int, chunk: int) -> dict:
    import kvcompress.strategies  # noqa: F401
    from kvcompress import registry
    from kvcompress.bench.tasks import _essay_ids
    from kvcompress.cache import cache_arg
    from kvcompress.models import load_model
    from kvcompress.testing import left_padded

    model, tokenizer = load_model()
    essay = _essay_ids(tokenizer, 2 * length)
    ids, mask = left_padded([essay[:length], essay[length : length + length // 2]])
    out = {}
    for name in STRATEGIES:
        cache = registry.get(name).for_budget(model, tokenizer, max(1, round(fraction * length)))
        kept, logits = [], []
        step = chunk or ids.shape[1]
        for start in range(0, ids.shape[1], step):
            result = model(ids[:, start : start + step], attention_mask=mask[:, : start + step], **cache_arg(cache))
        seen = mask
        for decoded in range(steps + 1):
            logits.append(result.logits[:, -1])
            heads = cache.layers[0].keys.shape[1]
            kept.append([[layer.positions.expand(-1, heads, -1)[b, h].tolist() for b in range(2) for h in range(heads)]
                         for layer in cache.layers])
            if decoded < steps:
                seen = torch.cat([seen, torch.ones_like(seen[:, :1])], dim=1)
                result = model(result.logits[:, -1:].argmax(-1), attention_mask=seen, **cache_arg(cache))
        out[name] = {"kept": [[[sorted(p for p in slots if p >= 0) for slots in layer] for layer in forward]
                              for forward in kept], "logits": torch.stack(logits)}
        print(name, "done", flush=True)
    return out


def compare(before: dict, after: dict) -> None:
    for name in before:
        if name not in after:
            print(f"{name}: missing in the second dump")
            continue
        differ = [f for f, (x, y) in enumerate(zip(before[name]["kept"], after[name]["kept"])) if x != y]
        delta = (before[name]["logits"] - after[name]["logits"]).abs().max().item()
        print(f"{name}: {len(before[name]['kept'])} forwards, kept sets differ after forwards {differ or 'none'}; "
              f"max |logit difference| {delta:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--compare", nargs=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--chunk", type=int, default=0, help="prefill chunk size (0: whole)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare:
        compare(*(torch.load(path) for path in args.compare))
    else:
        torch.save(dump(args.length, args.fraction, args.steps, args.chunk), args.out)


if __name__ == "__main__":
    main()
