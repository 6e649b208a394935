"""`KVzipCache(normalize="chunk")` against kvpress's KVzipPress on the same ids: scores and kept sets.

The KVzip section of docs/peer_kvpress.md traced the difference between the two libraries on a context of two
chunks to two choices: kvpress (and the authors' code) normalise each reconstruction query's attention over the
sinks, the chunk it repeats and the repeat tokens, and score a chunk's pairs from that chunk's queries alone;
kvcompress's default uses the model's own softmax over every pair and the max over every chunk's queries.
`normalize="chunk"` is kvpress's choice. This script checks it on the committed KVzipPress dump
(`kvzip_kept.json`, written by `dump_kvpress.py --kvzip`): for each prompt, one `KVzipCache(normalize="chunk")`
prefill (global allocation, the budget of the dump's first ratio), its scores before the cut against the scores of
kvpress's variant that scores from position 0 (`score_from_start`, the same chunk boundaries) and of KVzipPress as
is, then kvcompress's own cut at every ratio of the dump, both allocations, against each variant's kept sets.

Run from the repository root, in the project's venv (no kvpress needed):
    OMP_NUM_THREADS=1 .venv/bin/python experiments/kvpress_peer/kvzip_chunk_check.py [--tokens 3000]
Writes docs/peer_kvzip_chunk.json and prints the table docs/peer_kvpress.md quotes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compare import (  # noqa: E402  (the comparison helpers of this folder)
    DOCS,
    HERE,
    RecordingKVzip,
    cut_again,
    kept_mask,
    kvpress_cut,
    kvzip_scores,
    mask_jaccard,
    score_agreement,
    unpack_bits,
    unpack_float32,
)

from kvcompress.cache import cache_arg  # noqa: E402
from kvcompress.models import load_model  # noqa: E402


def check_prompt(model, tokenizer, prompt: dict, tokens: int, layers: int, heads: int) -> dict:
    ids, variants = prompt["token_ids"], prompt["variants"]
    ratios = list(variants["kvpress"]["runs"]["global"])
    budget = round(variants["kvpress"]["runs"]["global"][ratios[0]]["n_kept_total"] / (layers * heads))
    cache = RecordingKVzip(model, tokenizer, budget=budget, allocation="global", normalize="chunk")
    start = time.perf_counter()
    with torch.no_grad():
        model(torch.tensor([ids]), **cache_arg(cache))
    seconds = time.perf_counter() - start
    ours = kvzip_scores(cache.before_cut, tokens)
    out = {"tokens": tokens, "seconds": round(seconds, 1), "budget_first_ratio": budget,
           "scores": {v: score_agreement(ours, unpack_float32(record["scores_b64"], (layers, heads, tokens)), record)
                      for v, record in variants.items()},
           "kept": []}
    for allocation, mode in (("global", "global"), ("layer", "layerwise")):
        for ratio in ratios:
            for variant, record in variants.items():
                entry = record["runs"][mode][ratio]
                theirs = unpack_bits(entry["kept_b64"], (layers, heads, tokens))
                kept = kept_mask(cut_again(cache, round(entry["n_kept_total"] / (layers * heads)), allocation),
                                 layers, heads, tokens)
                rule = kvpress_cut(ours, float(ratio), mode == "layerwise", record["n_sink"])
                out["kept"].append({
                    "variant": variant, "allocation": allocation, "ratio": float(ratio),
                    "kept_total_ours": int(kept.sum()), "kept_total_kvpress": int(theirs.sum()),
                    "jaccard_ours_vs_kvpress": float(mask_jaccard(kept, theirs).mean()),
                    "jaccard_kvpress_rule_on_our_scores_vs_kvpress": float(mask_jaccard(rule, theirs).mean())})
    return out


def table(results: list[dict]) -> str:
    lines = ["| N | chunk | scores: max relative difference, ours / `from 0` | ours / `kvpress` median (min-max) |",
             "|---:|---|---:|---|"]
    for r in results:
        for aligned, as_is in zip(r["scores"]["score_from_start"]["chunks"], r["scores"]["kvpress"]["chunks"]):
            lines.append(f"| {r['tokens']} | [{aligned['start']}, {aligned['stop']}) | "
                         f"{aligned['max_relative_difference']:.1e} | {as_is['ratio_ours_to_kvpress_median']:.4f} "
                         f"({as_is['ratio_ours_to_kvpress_min']:.4f}-{as_is['ratio_ours_to_kvpress_max']:.4f}) |")
    lines += ["", "| N | allocation (ours / kvpress) | ratio | kept ours / kvpress | Jaccard vs `from 0` | "
                  "vs `kvpress` | kvpress's rule on our scores vs `from 0` |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        rows = {(k["allocation"], k["ratio"], k["variant"]): k for k in r["kept"]}
        for allocation, ratio in sorted({(k["allocation"], k["ratio"]) for k in r["kept"]}):
            aligned, as_is = rows[allocation, ratio, "score_from_start"], rows[allocation, ratio, "kvpress"]
            lines.append(f"| {r['tokens']} | {allocation} / layerwise={allocation == 'layer'} | {ratio} | "
                         f"{aligned['kept_total_ours']} / {aligned['kept_total_kvpress']} | "
                         f"{aligned['jaccard_ours_vs_kvpress']:.3f} | {as_is['jaccard_ours_vs_kvpress']:.3f} | "
                         f"{aligned['jaccard_kvpress_rule_on_our_scores_vs_kvpress']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=pathlib.Path, default=HERE / "kvzip_kept.json")
    parser.add_argument("--tokens", default="3000", help="prompt lengths of the dump to check (comma-separated)")
    parser.add_argument("--out", type=pathlib.Path, default=DOCS / "peer_kvzip_chunk.json")
    args = parser.parse_args(argv)
    dump = json.loads(args.dump.read_text())
    layers, heads = dump["meta"]["layers"], dump["meta"]["kv_heads"]
    model, tokenizer = load_model()
    results = []
    for n in args.tokens.split(","):
        if n not in dump["prompts"]:
            raise SystemExit(f"--tokens: the dump has prompts of {sorted(dump['prompts'])} tokens, not {n}")
        results.append(check_prompt(model, tokenizer, dump["prompts"][n], int(n), layers, heads))
        print(f"N={n}: {results[-1]['seconds']} s", flush=True)
    args.out.write_text(json.dumps({"meta": {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                                             "kvpress_dump": dump["meta"]}, "results": results}, indent=1))
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
