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

`--kvzip FILE` (issue 16 item 5): compares `KVzipCache` with the KVzipPress dump of `dump_kvpress.py --kvzip`
instead (see `compare_kvzip`), writing docs/peer_kvzip.json and the tables between the `kvzip-table` markers.
"""

from __future__ import annotations

import argparse
import base64
import json
import pathlib
import platform
import time

import numpy as np
import torch
import transformers

import kvcompress
from kvcompress import KVzipCache, registry
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
KVZIP_MARKERS = ("<!-- kvzip-table:start -->", "<!-- kvzip-table:end -->")
HERE = pathlib.Path(__file__).resolve().parent
DOCS = HERE.parents[1] / "docs"


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


def write_markdown(path: pathlib.Path, block: str, markers: tuple[str, str] = (START, END)) -> None:
    start, end = markers
    block = f"{start}\n{block}\n{end}"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = "# kvcompress vs kvpress 0.5.5: kept positions\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def same_model(model, ids: torch.Tensor, reference: dict) -> tuple[bool, float]:
    """Both libraries must run the same model: the full-cache logits of the last prompt token vs the dump's top 20.
    Returns (top-20 ids equal, largest |difference| of those logits)."""
    with torch.no_grad():
        logits = model(ids, **cache_arg(registry.get("full")(model))).logits[0, -1]
    ref = reference["full_cache_last_logits_top20"]
    logit_diff = (logits[torch.tensor(ref["ids"])] - torch.tensor(ref["values"])).abs().max().item()
    same_top = logits.topk(20).indices.tolist() == ref["ids"]
    print(f"full-cache last logits vs kvpress dump ({ids.shape[1]} tokens): top-20 ids equal {same_top}, "
          f"max |diff| {logit_diff:.2e}", flush=True)
    return same_top, logit_diff


# --- KVzip (issue 16 item 5) ----------------------------------------------------------------------------------------
class RecordingKVzip(KVzipCache):
    """KVzipCache that records, without changing any of its choices: a clone of itself just before its cut
    (`before_cut`: reconstruction done, every pair still there, scores in its slot state), and what each
    reconstruction forward's queries gave each pair (`chunk_received`: per forward and layer, (Hkv, N) float32 by
    stream position, the max over the forward's queries and the kv group's query heads, before the max with the
    earlier chunks' that makes the score)."""

    before_cut = None
    chunk_received = None

    def evict(self, layer) -> None:
        if self._reconstructing is not None:
            heads = layer.keys.shape[1]
            received = layer.observation.max_received[0].view(heads, -1, layer.used).amax(dim=1)  # (Hkv, used)
            positions = layer.positions[0].expand(heads, -1)
            context = (positions >= 0) & (positions < self._reconstructing)
            by_position = torch.full((heads, self._reconstructing), float("nan"))
            for head in range(heads):
                by_position[head, positions[head][context[head]]] = received[head][context[head]].float()
            if self.chunk_received is None:
                self.chunk_received = []
            if layer.layer_idx == 0:
                self.chunk_received.append([])
            self.chunk_received[-1].append(by_position)
        super().evict(layer)

    def _cut(self, rows: torch.Tensor) -> None:
        self.before_cut, received = None, self.chunk_received  # neither is copied into the clone
        self.chunk_received = None
        self.before_cut = self.clone()
        self.chunk_received = received
        super()._cut(rows)


def cut_again(recorded: RecordingKVzip, budget: int, allocation: str) -> KVzipCache:
    """KVzipCache's own cut (`KVzipCache._cut`) of a clone of `recorded.before_cut` with another budget and
    allocation: the scores depend on neither, so one reconstruction serves every configuration (checked against
    fresh caches in `compare_kvzip`)."""
    replica = recorded.before_cut.clone()
    replica.budget, replica.allocation = budget, allocation
    KVzipCache._cut(replica, torch.ones(1, dtype=torch.bool))
    return replica


def kept_mask(cache, layers: int, heads: int, tokens: int) -> np.ndarray:
    """(layers, Hkv, N) bool: the stream positions each layer and kv head keeps (batch row 0)."""
    mask = np.zeros((layers, heads, tokens), dtype=bool)
    for layer in range(layers):
        for head in range(heads):
            mask[layer, head, cache.kept_positions(layer, head)[0]] = True
    return mask


def kvzip_scores(cache: KVzipCache, tokens: int) -> np.ndarray:
    """(layers, Hkv, N) float32: each position's KVzip score in `cache` (batch row 0; before a cut every slot is
    there), mapped from slots to stream positions."""
    out = np.full((len(cache.layers), cache.layers[0].keys.shape[1], tokens), np.nan, dtype=np.float32)
    for index, layer in enumerate(cache.layers):
        score = cache._scores(layer)[0]  # (Hkv, used)
        positions = layer.positions[0].expand(score.shape[0], -1)
        for head in range(score.shape[0]):
            valid = positions[head] >= 0
            out[index, head, positions[head][valid].numpy()] = score[head][valid].float().numpy()
    return out


def kvpress_cut(scores: np.ndarray, ratio: float, layerwise: bool, n_sink: int) -> np.ndarray:
    """kvpress 0.5.5's KVzip cut rule (`KVzipPress.compress_post`) applied to any (layers, Hkv, N) scores: sinks get
    max + 1; int(layers*Hkv*N*ratio) lowest pairs over all layers (layerwise False), or int(Hkv*N*ratio) lowest of
    each layer over its kv heads (True), are dropped. Ties: lowest index first (a stable sort; kvpress's topk
    leaves them unspecified). Returns the kept mask. Used to split a difference into scores vs cut rule."""
    final = scores.astype(np.float64).copy()
    final[..., :n_sink] = final.max() + 1.0
    kept = np.ones(final.shape, dtype=bool)
    groups = [(kept[l], final[l]) for l in range(len(final))] if layerwise else [(kept, final)]
    for keep, score in groups:
        drop = int(score.size * ratio)
        keep.reshape(-1)[np.argsort(score.reshape(-1), kind="stable")[:drop]] = False
    return kept


def unpack_bits(text: str, shape: tuple[int, ...]) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    return bits[: int(np.prod(shape))].reshape(shape).astype(bool)


def unpack_float32(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape)


def mask_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(layers, Hkv) Jaccard of two (layers, Hkv, N) kept masks."""
    union = (a | b).sum(-1)
    return np.where(union > 0, (a & b).sum(-1) / np.maximum(union, 1), 1.0)


def check_repeat_inputs(cache: KVzipCache, ids: list[int], variants: dict) -> dict:
    """The token ids each library feeds before every chunk (repeat prompt, previous chunk's last 8 tokens, chat
    template suffix) must be the same: for the variant that scores from position 0 (same chunk boundaries) the
    whole reconstruction sequences are compared; for kvpress as is, the prompt and suffix parts."""
    row = torch.tensor(ids)
    aligned = variants["score_from_start"]
    whole = all(cache._repeat_sequence(row, i) == c["repeat_prompt_ids"] + ids[c["start"]:c["stop"]]
                for i, c in enumerate(aligned["chunks"]))
    first = variants["kvpress"]["chunks"][0]["repeat_prompt_ids"]
    parts = (first == cache.prompt_first + cache.suffix and variants["kvpress"]["suffix_ids"] == cache.suffix and
             all(c["repeat_prompt_ids"][: len(cache.prompt_next)] == cache.prompt_next and
                 c["repeat_prompt_ids"][len(cache.prompt_next) + cache.overlap:] == cache.suffix
                 for c in variants["kvpress"]["chunks"][1:]))
    if not (whole and parts):
        raise RuntimeError("the reconstruction inputs differ between kvpress and kvcompress")
    return {"same_sequences_score_from_start": whole, "same_prompt_and_suffix_kvpress": parts,
            "prompt_first": cache.prompt_first, "prompt_next": cache.prompt_next, "suffix": cache.suffix}


def score_agreement(ours: np.ndarray, theirs: np.ndarray, variant: dict) -> dict:
    """Our scores vs kvpress's on the positions kvpress scored (its chunks, sinks excluded), per chunk: largest
    relative difference and the median and range of ours / theirs."""
    out = []
    for chunk in variant["chunks"]:
        start = max(chunk["start"], variant["n_sink"])
        a, b = ours[..., start:chunk["stop"]].astype(np.float64), theirs[..., start:chunk["stop"]].astype(np.float64)
        ratio = a / b
        out.append({"start": chunk["start"], "stop": chunk["stop"],
                    "max_relative_difference": float(np.max(np.abs(a - b) / b)),
                    "ratio_ours_to_kvpress_median": float(np.median(ratio)),
                    "ratio_ours_to_kvpress_p05": float(np.quantile(ratio, 0.05)),
                    "ratio_ours_to_kvpress_min": float(ratio.min()), "ratio_ours_to_kvpress_max": float(ratio.max())})
    return {"chunks": out, "kvpress_min_scored": float(theirs[..., variant["chunks"][0]["start"]:].min()),
            "kvpress_unscored_positions": list(range(variant["n_sink"], variant["prefix_length"]))}


def chunk_effects(recorded: RecordingKVzip, ours: np.ndarray, aligned: dict, layers: int, heads: int,
                  ratios: list[str]) -> dict:
    """Split the scores' difference from kvpress's into its two causes, on the variant whose chunks start where
    ours do (`aligned`, kvpress scoring from position 0). Ours: a pair's score is the max over EVERY reconstruction
    forward's queries, each softmax over every pair; kvpress's: over its own chunk's queries only, each softmax over
    the sinks, the chunk and the repeat tokens. `own` = what each pair got from its own chunk's forward only (ours):
    own / kvpress is the normalisation alone; ours / own the other chunks' queries alone. Also kvpress's cut rule on
    `own`, against kvpress's kept set (normalisation alone) and against kvpress's rule on our scores (the other
    chunks' queries alone), per allocation and ratio."""
    received = np.stack([np.stack([layer.numpy() for layer in chunk]) for chunk in recorded.chunk_received])
    if not np.array_equal(np.nanmax(received, axis=0), ours):
        raise RuntimeError("the max over the recorded chunks is not KVzipCache's score")
    own = np.full(ours.shape, np.nan, dtype=np.float32)
    theirs = unpack_float32(aligned["scores_b64"], ours.shape)
    out = {"chunks": []}
    for index, chunk in enumerate(aligned["chunks"]):
        part = slice(chunk["start"], chunk["stop"])
        own[..., part] = received[index][..., part]
        low = max(chunk["start"], aligned["n_sink"])
        mine, them, full = (a[..., low:chunk["stop"]].astype(np.float64) for a in (own, theirs, ours))
        out["chunks"].append({
            "start": chunk["start"], "stop": chunk["stop"],
            "own_over_kvpress_median": float(np.median(mine / them)),
            "own_over_kvpress_min": float((mine / them).min()), "own_over_kvpress_max": float((mine / them).max()),
            "ours_over_own_median": float(np.median(full / mine)), "ours_over_own_max": float((full / mine).max()),
            "fraction_max_from_another_chunk": float((full > mine).mean())})
    own[..., : aligned["n_sink"]] = ours[..., : aligned["n_sink"]]
    cuts = {}
    for mode in ("global", "layerwise"):
        for ratio in ratios:
            kvpress_kept = unpack_bits(aligned["runs"][mode][ratio]["kept_b64"], ours.shape)
            on_own = kvpress_cut(own, float(ratio), mode == "layerwise", aligned["n_sink"])
            on_ours = kvpress_cut(ours, float(ratio), mode == "layerwise", aligned["n_sink"])
            cuts[f"{mode} {ratio}"] = {"own_vs_kvpress": float(mask_jaccard(on_own, kvpress_kept).mean()),
                                       "own_vs_ours": float(mask_jaccard(on_own, on_ours).mean())}
    out["kvpress_rule_jaccard"] = cuts
    return out


def compare_kvzip(dump_path: pathlib.Path, out_json: pathlib.Path, out_md: pathlib.Path) -> None:
    """For each prompt of the KVzipPress dump: one KVzipCache prefill per allocation ("global", "layer") at the
    budget matching kvpress's first ratio, recording the cache before its cut; the other ratios are cut from that
    record with KVzipCache's own `_cut` (the fresh caches' kept sets must equal the replayed ones). Budget b per layer
    and kv head: kvpress's kept total / (layers x kv heads) (global) or per layer / kv heads (layer), rounded to the
    nearest integer when it is not one (the table gives both totals). Then per (prompt, kvpress variant, allocation,
    ratio): Jaccard per layer and kv head, and two attributions: kvpress's cut rule applied to OUR scores, against
    kvpress's kept set (what the scores alone change) and against ours (what the cut rule alone changes)."""
    dump = json.loads(dump_path.read_text())
    layers, heads = dump["meta"]["layers"], dump["meta"]["kv_heads"]
    model, tokenizer = load_model()
    results, prompts = [], {}
    for n, prompt in dump["prompts"].items():
        ids, tokens = prompt["token_ids"], int(n)
        same_top, logit_diff = same_model(model, torch.tensor([ids]), prompt["reference"])
        variants = prompt["variants"]
        ratios = list(variants["kvpress"]["runs"]["global"])
        fresh = {}
        for allocation, mode in (("global", "global"), ("layer", "layerwise")):
            total = variants["kvpress"]["runs"][mode][ratios[0]]["n_kept_total"]
            budget = round(total / (layers * heads))
            cache = RecordingKVzip(model, tokenizer, budget=budget, allocation=allocation)
            start = time.perf_counter()
            with torch.no_grad():
                model(torch.tensor([ids]), **cache_arg(cache))
            fresh[allocation] = (cache, budget, time.perf_counter() - start)
            print(f"N={n} KVzipCache(budget={budget}, allocation={allocation!r}): prefill + reconstruction + cut "
                  f"{fresh[allocation][2]:.1f} s", flush=True)
        recorded = fresh["global"][0]
        ours_scores = kvzip_scores(recorded.before_cut, tokens)
        if not np.array_equal(ours_scores, kvzip_scores(fresh["layer"][0].before_cut, tokens), equal_nan=True):
            raise RuntimeError("two KVzipCache runs on the same prompt gave different scores")
        prompts[n] = {"full_logits_top20_equal": same_top, "full_logits_max_abs_diff": logit_diff,
                      "seconds_kvcompress": {a: round(f[2], 1) for a, f in fresh.items()},
                      "seconds_kvpress": {v: variants[v]["seconds"] for v in variants},
                      "repeat_inputs": check_repeat_inputs(recorded, ids, variants),
                      "prefix_length_kvpress": variants["kvpress"]["prefix_length"],
                      "scores": {v: score_agreement(ours_scores, unpack_float32(variants[v]["scores_b64"],
                                                                                (layers, heads, tokens)), variants[v])
                                 for v in variants},
                      "chunk_effects": chunk_effects(recorded, ours_scores, variants["score_from_start"], layers,
                                                     heads, ratios)}
        for allocation, mode in (("global", "global"), ("layer", "layerwise")):
            for ratio in ratios:
                total = variants["kvpress"]["runs"][mode][ratio]["n_kept_total"]
                budget = round(total / (layers * heads))
                replica = cut_again(recorded, budget, allocation)
                ours = kept_mask(replica, layers, heads, tokens)
                cache, fresh_budget, _ = fresh[allocation]
                if budget == fresh_budget and not np.array_equal(ours, kept_mask(cache, layers, heads, tokens)):
                    raise RuntimeError(f"N={n} {allocation}: the replayed cut differs from the fresh cache's")
                for variant, record in variants.items():
                    entry = record["runs"][mode][ratio]
                    theirs = unpack_bits(entry["kept_b64"], (layers, heads, tokens))
                    theirs_scores = unpack_float32(record["scores_b64"], (layers, heads, tokens))
                    per_head = mask_jaccard(ours, theirs)
                    per_layer = per_head.mean(axis=1)
                    emulated = kvpress_cut(ours_scores, float(ratio), mode == "layerwise", record["n_sink"])
                    own_emulated = kvpress_cut(theirs_scores, float(ratio), mode == "layerwise", record["n_sink"])
                    prefix = slice(record["n_sink"], record["prefix_length"])
                    r = {"tokens": tokens, "variant": variant, "allocation": allocation, "ratio": float(ratio),
                         "budget": budget, "kept_total_kvpress": int(theirs.sum()), "kept_total_ours": int(ours.sum()),
                         "kept_per_head_kvpress_min": int(theirs.sum(-1).min()),
                         "kept_per_head_kvpress_max": int(theirs.sum(-1).max()),
                         "kept_per_head_ours_min": int(ours.sum(-1).min()),
                         "kept_per_head_ours_max": int(ours.sum(-1).max()),
                         "sinks_kept_both": bool(theirs[..., : record["n_sink"]].all() and
                                                 ours[..., : replica.n_sink].all()),
                         "kvpress_prefix_pairs_kept": int(theirs[..., prefix].sum()),
                         "ours_prefix_pairs_kept": int(ours[..., prefix].sum()),
                         "jaccard_mean": float(per_layer.mean()), "jaccard_min_layer": float(per_layer.min()),
                         "argmin_layer": int(per_layer.argmin()), "jaccard_max_layer": float(per_layer.max()),
                         "argmax_layer": int(per_layer.argmax()),
                         "jaccard_kvpress_rule_on_kvpress_scores_vs_kvpress": float(
                             mask_jaccard(own_emulated, theirs).mean()),
                         "jaccard_kvpress_rule_on_our_scores_vs_kvpress": float(mask_jaccard(emulated, theirs).mean()),
                         "jaccard_kvpress_rule_on_our_scores_vs_ours": float(mask_jaccard(emulated, ours).mean()),
                         "kvpress_relative_cut_gap": entry["relative_cut_gap"],
                         "jaccard_per_layer": per_layer.tolist(), "jaccard_per_layer_head": per_head.tolist()}
                    results.append(r)
                    print(f"N={n} {variant:16s} {allocation:6s} ratio {ratio}: b={budget} kept {r['kept_total_ours']}"
                          f" vs {r['kept_total_kvpress']}, mean Jaccard {r['jaccard_mean']:.3f} (layers "
                          f"{r['jaccard_min_layer']:.3f}-{r['jaccard_max_layer']:.3f}); kvpress rule on our scores: "
                          f"{r['jaccard_kvpress_rule_on_our_scores_vs_kvpress']:.3f} vs kvpress, "
                          f"{r['jaccard_kvpress_rule_on_our_scores_vs_ours']:.3f} vs ours", flush=True)
    out = {"meta": {"kvcompress": kvcompress.__version__, "transformers": transformers.__version__,
                    "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
                    "kvpress_dump": dump["meta"], "date": time.strftime("%Y-%m-%d")},
           "prompts": prompts, "results": results}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(out, indent=1))
    write_markdown(out_md, kvzip_table(results, prompts), KVZIP_MARKERS)
    print(f"wrote {out_json} and the KVzip tables in {out_md}")


def kvzip_table(results: list[dict], prompts: dict) -> str:
    lines = [
        "Jaccard = |ours & kvpress| / |ours | kvpress| per layer and kv head (mean over the 3 kv heads of a layer; "
        "mean, min and max over the 30 layers). Variant `kvpress`: KVzipPress as is; `from 0`: KVzipPress with "
        "`prefix_length` set to 0 (a variant, see below). b: KVzipCache's budget per layer and kv head. "
        "Kept per head: min-max over layers and kv heads. Attribution columns apply kvpress's cut rule "
        "(`kvpress_cut` in compare.py, a numpy copy of `compress_post`) to kvcompress's scores: against kvpress's "
        "kept set it shows what the scores alone change, against ours what the cut rule alone changes; "
        "`copy check`: the same copy applied to kvpress's own scores, against kvpress's kept set (1.000 = the copy "
        "is faithful up to ties).",
        "",
        "| N | variant | allocation (ours / kvpress) | ratio | b | kept total ours / kvpress | kept per head ours "
        "/ kvpress | mean Jaccard | min (layer) | max (layer) | rule on our scores vs kvpress / vs ours / copy check | "
        "pairs 4..P-1 kept ours / kvpress | kvpress cut gap |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        kvpress_mode = "layerwise=False" if r["allocation"] == "global" else "layerwise=True"
        lines.append(
            f"| {r['tokens']} | {'kvpress' if r['variant'] == 'kvpress' else 'from 0'} | {r['allocation']} / "
            f"{kvpress_mode} | {r['ratio']} | {r['budget']} | {r['kept_total_ours']} / {r['kept_total_kvpress']} | "
            f"{r['kept_per_head_ours_min']}-{r['kept_per_head_ours_max']} / {r['kept_per_head_kvpress_min']}-"
            f"{r['kept_per_head_kvpress_max']} | {r['jaccard_mean']:.3f} | {r['jaccard_min_layer']:.3f} "
            f"({r['argmin_layer']}) | {r['jaccard_max_layer']:.3f} ({r['argmax_layer']}) | "
            f"{r['jaccard_kvpress_rule_on_our_scores_vs_kvpress']:.3f} / "
            f"{r['jaccard_kvpress_rule_on_our_scores_vs_ours']:.3f} / "
            f"{r['jaccard_kvpress_rule_on_kvpress_scores_vs_kvpress']:.3f} | {r['ours_prefix_pairs_kept']} / "
            f"{r['kvpress_prefix_pairs_kept']} | {r['kvpress_relative_cut_gap']:.1e} |")
    lines += ["", "Scores (before the cut) on the positions kvpress scores (its chunks, sinks excluded): ours / "
              "kvpress.", "", "| N | variant | chunk | max relative difference | ratio median | ratio 5th percentile "
              "| ratio min-max |", "|---:|---|---|---:|---:|---:|---|"]
    for n, p in prompts.items():
        for variant, agreement in p["scores"].items():
            for c in agreement["chunks"]:
                lines.append(f"| {n} | {'kvpress' if variant == 'kvpress' else 'from 0'} | [{c['start']}, {c['stop']}) | "
                             f"{c['max_relative_difference']:.1e} | {c['ratio_ours_to_kvpress_median']:.4f} | "
                             f"{c['ratio_ours_to_kvpress_p05']:.4f} | {c['ratio_ours_to_kvpress_min']:.4f}-"
                             f"{c['ratio_ours_to_kvpress_max']:.4f} |")
    lines += ["", "Two chunks (kvpress scoring from 0, the same chunk boundaries as ours): `own` = what each pair got "
              "from its own chunk's reconstruction forward in kvcompress (softmax over every pair); kvpress's score: "
              "the same queries, softmax over sinks + chunk + repeat tokens; ours: the max over both chunks' "
              "forwards. Jaccard columns: kvpress's cut rule on `own` vs kvpress's kept set (the normalisation "
              "alone) and vs the rule on our scores (the other chunk's queries alone).", "",
              "| N | chunk | own / kvpress median (min-max) | ours / own median (max) | pairs whose max comes from "
              "the other chunk | rule on own vs kvpress / vs ours |", "|---:|---|---|---|---:|---|"]
    for n, p in prompts.items():
        effects = p["chunk_effects"]
        jaccards = ", ".join(f"{k}: {v['own_vs_kvpress']:.3f} / {v['own_vs_ours']:.3f}"
                             for k, v in effects["kvpress_rule_jaccard"].items())
        for i, c in enumerate(effects["chunks"]):
            lines.append(f"| {n} | [{c['start']}, {c['stop']}) | {c['own_over_kvpress_median']:.4f} "
                         f"({c['own_over_kvpress_min']:.4f}-{c['own_over_kvpress_max']:.4f}) | "
                         f"{c['ours_over_own_median']:.4f} ({c['ours_over_own_max']:.1f}) | "
                         f"{c['fraction_max_from_another_chunk']:.3f} | {jaccards if i == 0 else ''} |")
    lines += ["", f"Positions 0-3 (the 4 sinks of both) kept by both libraries in every row above: "
              f"{all(r['sinks_kept_both'] for r in results)}.", "", "Same model and inputs: " + "; ".join(
        f"N={n}: full-cache last-token top-20 ids equal {p['full_logits_top20_equal']}, max |diff| "
        f"{p['full_logits_max_abs_diff']:.1e}, reconstruction sequences identical "
        f"{p['repeat_inputs']['same_sequences_score_from_start']}, kvpress's prefix_length "
        f"{p['prefix_length_kvpress']}, seconds ours {p['seconds_kvcompress']}, kvpress {p['seconds_kvpress']}"
        for n, p in prompts.items())]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvpress", type=pathlib.Path, default=HERE / "kvpress_kept.json",
                        help="JSON written by dump_kvpress.py")
    parser.add_argument("--kvzip", type=pathlib.Path, default=None, nargs="?", const=HERE / "kvzip_kept.json",
                        help="compare KVzipCache with this KVzipPress dump (dump_kvpress.py --kvzip; default "
                             "kvzip_kept.json here) instead")
    parser.add_argument("--out-json", type=pathlib.Path, default=None,
                        help="default docs/peer_kvpress.json (--kvzip: docs/peer_kvzip.json)")
    parser.add_argument("--out-md", type=pathlib.Path, default=DOCS / "peer_kvpress.md")
    args = parser.parse_args(argv)
    args.out_json = args.out_json or (None if args.kvzip else DOCS / "peer_kvpress.json")

    if args.kvzip is not None:
        compare_kvzip(args.kvzip, args.out_json or DOCS / "peer_kvzip.json", args.out_md)
        return
    dump = json.loads(args.kvpress.read_text())
    model, tokenizer = load_model()
    ids = torch.tensor([dump["token_ids"]])
    same_top, logit_diff = same_model(model, ids, dump["reference"])

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
