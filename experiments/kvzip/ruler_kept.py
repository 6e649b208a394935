"""Why a cache loses RULER-4K needles that the full cache finds: for samples of `ruler_niah_<kind>@4096` (a
single-needle kind; question after the compressed context, or `--query before`: in it), per cache: the fraction of the needle's key and value tokens each layer
keeps (mean over kv heads), the fraction of all context tokens it keeps, and the greedy answer; and the model's own
repeat quality on each reconstruction chunk (teacher-forced top-1 accuracy of the repeated tokens, overall and on the
needle's value tokens), which is what KVzip's scores rest on. Not a test: the measurement behind docs/kvzip.md's
RULER paragraph.

    OMP_NUM_THREADS=1 python experiments/kvzip/ruler_kept.py --samples 0,1,2,4 --caches kvzip,kvzip:chunk=4096
    OMP_NUM_THREADS=1 python experiments/kvzip/ruler_kept.py --model qwen2.5-0.5b --fraction 0.1 \
        --samples 0,1,2 --caches kvzip,kvzip:allocation=layer
    OMP_NUM_THREADS=1 python experiments/kvzip/ruler_kept.py --model qwen2.5-0.5b --kind niah_single_uuid \
        --query before --fraction 0.5 --samples 0,1 --caches full,snapkv,tova,sink_window
"""

from __future__ import annotations

import argparse
import json

import torch

from kvcompress.bench import ruler
from kvcompress.bench.speed import _cache_kw, build_cache
from kvcompress.bench.tasks import _greedy_answer, essays_text
from kvcompress.models import DEFAULT_MODEL, load_model


def needle_spans(tokenizer, context: str, key: str, value: str) -> tuple[list[int], list[int], list[int]]:
    """(context ids, token indices of the needle's key, of its value) with the context tokenized alone, as the
    bench feeds it."""
    encoded = tokenizer(context, add_special_tokens=True, return_offsets_mapping=True)
    sentence = f"for {key} is: {value}."
    at = context.index(sentence)
    key_chars = (at + 4, at + 4 + len(key))
    value_chars = (at + len(f"for {key} is: "), at + len(f"for {key} is: ") + len(value))

    def inside(span):
        return [i for i, (a, b) in enumerate(encoded.offset_mapping) if a < span[1] and b > span[0]]

    return encoded.input_ids, inside(key_chars), inside(value_chars)


@torch.no_grad()
def repeat_quality(model, cache, ids: list[int], value: list[int]) -> list[dict]:
    """Teacher-forced top-1 accuracy of each reconstruction chunk's tokens (`cache` builds the sequences), with the
    context before it, in one plain forward per chunk (the model's own attention; no compression)."""
    row = torch.tensor(ids)
    out = []
    for index in range((len(ids) + cache.chunk - 1) // cache.chunk):
        sequence = cache._repeat_sequence(row, index)
        piece = row[index * cache.chunk : (index + 1) * cache.chunk]
        full = torch.tensor([ids + sequence])
        logits = model(full).logits[0]
        first = len(ids) + len(sequence) - len(piece)  # where the chunk's tokens start in `full`
        predicted = logits[first - 1 : first - 1 + len(piece)].argmax(-1)
        right = predicted == piece
        mine = [i - index * cache.chunk for i in value if index * cache.chunk <= i < (index + 1) * cache.chunk]
        out.append({"chunk": index, "tokens": len(piece), "top1": right.float().mean().item(),
                    "value_top1": right[mine].float().mean().item() if mine else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", default="0,1,2,4", help="sample indices (the bench's seeds 0..29)")
    parser.add_argument("--caches", default="kvzip,kvzip:chunk=4096")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--kind", default="niah_single_number", choices=["niah_single_number", "niah_single_word",
                                                                         "niah_single_uuid"])
    parser.add_argument("--query", default="after", choices=["after", "before"])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)  # inference only (a 4K forward with autograd on held 20 GB on qwen2.5-0.5b)
    model, tokenizer = load_model(args.model)
    essays, rows = essays_text(), []
    for index in (int(i) for i in args.samples.split(",")):
        sample = ruler.generate(args.kind, tokenizer, args.length, index, essays)
        (key, value), = sample.info["needles"]
        ids, key_at, value_at = needle_spans(tokenizer, sample.context, key, value)
        context, question, answer_prefix = ruler.prompt_tokens(tokenizer, sample)
        assert context == ids, "offsets tokenization differs from the bench's"
        prefix, tail = (torch.tensor([ids]), torch.tensor([question + answer_prefix])) if args.query == "after" \
            else (torch.tensor([ids + question]), torch.tensor([answer_prefix]))
        row = {"sample": index, "value": value, "context_tokens": len(ids), "key_tokens": key_at,
               "value_tokens": value_at, "caches": {}}
        for name in args.caches.split(","):
            cache = build_cache(name, model, tokenizer, prefix.shape[1], args.fraction)
            model.set_attn_implementation("kvcompress")
            model(prefix, **_cache_kw(cache))
            kept = {"key": [], "value": [], "all": []}
            for layer in cache.layers:
                kept["all"].append(layer.valid.sum(dim=-1).float().mean().item() / len(ids))
                positions = layer.positions[0, :, : layer.used]  # (kv heads or 1, used)
                for part, span in (("key", key_at), ("value", value_at)):
                    span = torch.tensor(span)
                    kept[part].append(torch.stack([torch.isin(span, p) for p in positions]).float().mean().item())
            logits = model(tail, **_cache_kw(cache)).logits[:, -1]
            text, _, _ = _greedy_answer(model, tokenizer, cache, logits, ruler.ANSWER_TOKENS[args.kind],
                                        sample.answers)
            row["caches"][name] = {"kept": kept, "answer": text, "score": ruler.score(text, sample.answers)}
            if name.startswith("kvzip") and "repeat" not in row:
                model.set_attn_implementation("sdpa")
                row["repeat"] = repeat_quality(model, cache, ids, value_at)
            print(f"sample {index} value {value} {name:>16}: score {row['caches'][name]['score']:.0f} "
                  f"answer {text[:24]!r}\n  key kept   " + " ".join(f"{f:.1f}" for f in kept["key"])
                  + "\n  value kept " + " ".join(f"{f:.1f}" for f in kept["value"])
                  + "\n  all kept   " + " ".join(f"{f:.1f}" for f in kept["all"]), flush=True)
        print(f"sample {index} repeat: {row.get('repeat')}", flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"fraction": args.fraction, "length": args.length, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
