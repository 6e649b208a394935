"""Kept positions of kvcompress strategies vs kvpress 0.5.5 presses: Jaccard overlap per layer and kv head.

Runs in the project's virtualenv, on the JSON written by `dump_kvpress.py` (kvpress's venv):

    python experiments/kvpress_peer/compare.py --kvpress experiments/kvpress_peer/kvpress_kept.json

(exact commands: README.md beside this file). Not part of CI; kvpress is never imported here.

For every press and compression ratio in the dump, the matching strategy (PAIRS, by registry name; a strategy not
registered in this checkout is listed as missing) is built with `for_budget(model, tokenizer, n_kept)`, n_kept being
the count kvpress kept per layer and kv head (int(N * (1 - ratio)): 512 and 102 of 1024), and fed exactly the
dump's token ids in ONE forward (prefill only, batch 1, no padding; the bundled SmolLM2-135M in fp32 on the CPU,
as in the dump). Then, per layer l and kv head h, ours = `cache.kept_positions(l, h)`, theirs = the dump's
positions, Jaccard = |ours & theirs| / |ours | theirs|. A layer's Jaccard is the mean over its kv heads; the table
gives the mean over layers and the min / max over layers.

Both libraries must see the same model: the full-cache logits of the last prompt token are compared with the
dump's (top-20 ids equal, largest difference printed and saved).

Writes the JSON (--out-json) and the table into the markdown file (--out-md) between the markers
`<!-- peer-table:start -->` and `<!-- peer-table:end -->` (the rest of the file, the explanations, is kept;
a new file gets just the table).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch
import transformers

import kvcompress
from kvcompress import registry
from kvcompress.cache import cache_arg
from kvcompress.models import load_model

# kvpress press -> kvcompress strategy (registry name)
PAIRS = {
    "SnapKVPress": "snapkv",
    "TOVAPress": "tova",
    "KnormPress": "knorm",
    "ExpectedAttentionPress": "expected_attention",
    "StreamingLLMPress": "sink_window",
}
# Extra rows that isolate one difference: the strategy built by its constructor with `budget=n_kept` and these
# options instead of `for_budget` (which picks the strategy's own defaults for the budget).
VARIANTS = {
    "snapkv": [{"window": 64}],  # kvpress's window at every ratio (for_budget: 64 above a budget of 64, else half)
}
START, END = "<!-- peer-table:start -->", "<!-- peer-table:end -->"
HERE = pathlib.Path(__file__).resolve().parent


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def kept_sets(cache, layers: int, heads: int) -> list[list[set[int]]]:
    """[layer][kv head] -> set of kept stream positions (batch row 0)."""
    return [[set(cache.kept_positions(layer, head)[0]) for head in range(heads)] for layer in range(layers)]


def compare_one(model, tokenizer, ids: torch.Tensor, strategy: str, entry: dict, options: dict | None = None):
    """Run `strategy` at kvpress's kept count on `ids` (1, N) and compare with the dump's `entry`.

    Returns (our [layer][kv head] -> kept set, the summary dict of `summarize`).
    `options` None: `for_budget(model, tokenizer, n_kept)`; else the constructor with budget=n_kept and `options`.
    """
    theirs = [[set(head) for head in layer] for layer in entry["kept"]]
    layers, heads = len(theirs), len(theirs[0])
    cls = registry.get(strategy)
    if options is None:
        cache = cls.for_budget(model, tokenizer, entry["n_kept"])
    else:
        cache = cls(model, budget=entry["n_kept"], **options)
    start = time.perf_counter()
    with torch.no_grad():
        model(ids, **cache_arg(cache))
    seconds = time.perf_counter() - start
    ours = kept_sets(cache, layers, heads)
    return ours, summarize(ours, theirs, cache, seconds)


def summarize(ours, theirs, cache, seconds: float) -> dict:
    """Jaccard per layer and kv head, per layer (mean over heads), over layers; kept counts; the cache's options."""
    layers, heads = len(theirs), len(theirs[0])
    per_head = [[jaccard(ours[l][h], theirs[l][h]) for h in range(heads)] for l in range(layers)]
    per_layer = [sum(row) / heads for row in per_head]
    counts = [len(s) for layer in ours for s in layer]
    return {
        "kept_ours_min": min(counts),
        "kept_ours_max": max(counts),
        "per_kv_head_sets": any(ours[l][h] != ours[l][0] for l in range(layers) for h in range(heads)),
        "jaccard_mean": sum(per_layer) / layers,
        "jaccard_min_layer": min(per_layer),
        "jaccard_max_layer": max(per_layer),
        "argmin_layer": per_layer.index(min(per_layer)),
        "jaccard_per_layer": per_layer,
        "jaccard_per_layer_head": per_head,
        "seconds": round(seconds, 2),
        "options": {k: v for k, v in vars(cache).items() if isinstance(v, (int, float, str, bool)) and not
                    k.startswith("_")},
    }


def mean_jaccard(ours, theirs) -> float:
    """Mean over layers and kv heads of the Jaccard overlap of two [layer][head] -> set tables."""
    values = [jaccard(o, t) for ol, tl in zip(ours, theirs) for o, t in zip(ol, tl)]
    return sum(values) / len(values)


def gap(result: dict) -> str:
    value = result.get("kvpress_min_relative_cut_gap")
    return "-" if value is None else f"{value:.1e}"


def table(results: list[dict], tokens: int) -> str:
    lines = [
        f"Prompt: {tokens} tokens (Paul Graham essays), prefill only, batch 1, SmolLM2-135M fp32 CPU. "
        "Jaccard = |ours & kvpress| / |ours | kvpress| per layer and kv head; a layer's value is the mean over "
        "its 3 kv heads; min / max are over the 30 layers (layer index in brackets). kvpress cut gap: the smallest, "
        "over layers and kv heads, of (s_n - s_(n+1)) / |s_n| for the press's sorted scores s (n = kept count): how "
        "close the cut is to a tie.",
        "",
        "| kvpress press | kvcompress strategy | ratio | kept kvpress | kept ours (min-max) | per-head sets (ours) "
        "| mean Jaccard | min (layer) | max (layer) | kvpress cut gap |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if "missing" in r:
            lines.append(f"| {r['press']} | {r['strategy']} | {r['ratio']} | {r['n_kept_kvpress']} | - | - | "
                         f"not in this checkout | - | - | - |")
            continue
        lo, hi = r["jaccard_min_layer"], r["jaccard_max_layer"]
        lines.append(
            f"| {r['press']} | {r['strategy']} | {r['ratio']} | {r['n_kept_kvpress']} | "
            f"{r['kept_ours_min']}-{r['kept_ours_max']} | {'yes' if r['per_kv_head_sets'] else 'no'} | "
            f"{r['jaccard_mean']:.3f} | {lo:.3f} ({r['argmin_layer']}) | {hi:.3f} "
            f"({r['jaccard_per_layer'].index(hi)}) | {gap(r)} |")
    return "\n".join(lines)


def cross_table(cross: dict) -> str:
    """Markdown: mean Jaccard of each strategy (rows, `for_budget`) against each press (columns), per ratio."""
    lines = ["Control: mean Jaccard of every kvcompress strategy (rows) against every kvpress press (columns) at the "
             "same ratio; the matching pairs are the diagonal."]
    for ratio, rows in cross.items():
        presses = list(next(iter(rows.values()))) if rows else []
        lines += ["", f"ratio {ratio}:", "", "| ours \\ kvpress | " + " | ".join(presses) + " |",
                  "|---|" + "---:|" * len(presses)]
        lines += [f"| {s} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |" for s, row in rows.items()]
    return "\n".join(lines)


def write_markdown(path: pathlib.Path, block: str) -> None:
    block = f"{START}\n{block}\n{END}"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if START in text and END in text:
            head, rest = text.split(START, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = "# kvcompress vs kvpress 0.5.5: kept positions\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvpress", type=pathlib.Path, default=HERE / "kvpress_kept.json",
                        help="JSON written by dump_kvpress.py")
    parser.add_argument("--out-json", type=pathlib.Path, default=HERE.parents[1] / "docs" / "peer_kvpress.json")
    parser.add_argument("--out-md", type=pathlib.Path, default=HERE.parents[1] / "docs" / "peer_kvpress.md")
    args = parser.parse_args(argv)

    dump = json.loads(args.kvpress.read_text())
    model, tokenizer = load_model()
    ids = torch.tensor([dump["token_ids"]])

    with torch.no_grad():  # same model on both sides: last-token logits of a full cache
        logits = model(ids, **cache_arg(registry.get("full")(model))).logits[0, -1]
    ref = dump["reference"]["full_cache_last_logits_top20"]
    ref_ids = torch.tensor(ref["ids"])
    logit_diff = (logits[ref_ids] - torch.tensor(ref["values"])).abs().max().item()
    same_top = logits.topk(20).indices.tolist() == ref["ids"]
    print(f"full-cache last logits vs kvpress dump: top-20 ids equal {same_top}, max |diff| {logit_diff:.2e}")

    results, ours_by = [], {}
    for press, ratios in dump["presses"].items():
        strategy = PAIRS[press]
        for ratio, entry in ratios.items():
            head = {"press": press, "ratio": float(ratio), "strategy": strategy, "n_kept_kvpress": entry["n_kept"],
                    "kvpress_min_relative_cut_gap": entry.get("min_relative_cut_gap")}
            if strategy not in registry.available():
                results.append({**head, "missing": True})
                print(f"{press:24s} {ratio}: strategy {strategy!r} is not registered here", flush=True)
                continue
            for options in [None, *VARIANTS.get(strategy, [])]:
                ours, summary = compare_one(model, tokenizer, ids, strategy, entry, options)
                r = {**head, **summary}
                if options is None:
                    ours_by[(strategy, ratio)] = ours
                if options is not None:
                    r["variant"] = options
                    r["strategy"] = f"{strategy}({', '.join(f'{k}={v}' for k, v in options.items())})"
                results.append(r)
                print(f"{press:24s} {ratio}: {r['strategy']} mean Jaccard {r['jaccard_mean']:.3f} "
                      f"(layers {r['jaccard_min_layer']:.3f}-{r['jaccard_max_layer']:.3f}), kept ours "
                      f"{r['kept_ours_min']}-{r['kept_ours_max']} vs {entry['n_kept']}", flush=True)

    # Control: every strategy against every press at the same ratio (the diagonal is the table above); shows how far
    # apart different methods are, i.e. that a high overlap is not what any two methods would give.
    cross = {}
    for ratio in sorted({r for ratios in dump["presses"].values() for r in ratios}, key=float):
        cross[ratio] = {
            strategy: {press: round(mean_jaccard(ours, [[set(h) for h in layer] for layer in
                                                       dump["presses"][press][ratio]["kept"]]), 3)
                       for press in dump["presses"] if ratio in dump["presses"][press]}
            for (strategy, r), ours in ours_by.items() if r == ratio}
    out = {
        "meta": {"kvcompress": kvcompress.__version__, "transformers": transformers.__version__,
                 "torch": torch.__version__, "python": platform.python_version(), "kvpress_dump": dump["meta"],
                 "tokens": len(dump["token_ids"]), "full_logits_top20_equal": same_top,
                 "full_logits_max_abs_diff": logit_diff, "date": time.strftime("%Y-%m-%d")},
        "results": results,
        "cross_mean_jaccard": cross,
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(out, indent=1))
    write_markdown(args.out_md, table(results, len(dump["token_ids"])) + "\n\n" + cross_table(cross))
    print(f"wrote {args.out_json} and the table in {args.out_md}")


if __name__ == "__main__":
    main()
