"""Does cutting the question lose RULER needles? kvzip on `ruler_niah_single_number@4096` samples, question after the
compressed context: one compressed cache per sample, answered from two clones, (a) with the question cut back to the
budget (the rule before 2026-12-01: every multi-token forward was reconstructed and cut; reproduced here by setting
`slack=0` for the question's forward only), (b) with the question kept (the current default, `slack=256`). Prints the
answer, the score and the smallest and largest pairs held by a layer (mean over kv heads) after the question.

    OMP_NUM_THREADS=1 python experiments/kvzip/question_cut.py --model qwen2.5-0.5b --samples 0,1,2 --fraction 0.1

Measured on 2026-12-01 before the fix, with the old code and the question fed in one forward (a) or one token per
forward (b, no second cut), the same two computations: docs/kvzip.md, "The question cut".
"""

from __future__ import annotations

import argparse
import time

import torch

from kvcompress.bench import ruler
from kvcompress.bench.speed import _cache_kw, build_cache
from kvcompress.bench.tasks import _greedy_answer, essays_text
from kvcompress.models import load_model


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--samples", default="0,1,2", help="sample indices (the bench's seeds)")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--cache", default="kvzip", help="a kvzip bench name, e.g. kvzip:allocation=layer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    essays = essays_text()
    for index in (int(i) for i in args.samples.split(",")):
        sample = ruler.generate("niah_single_number", tokenizer, 4096, index, essays)
        context, question, answer_prefix = ruler.prompt_tokens(tokenizer, sample)
        start = time.perf_counter()
        cache = build_cache(args.cache, model, tokenizer, len(context), args.fraction)
        model(torch.tensor([context]), **_cache_kw(cache))
        for label, slack in (("question cut", 0), ("question kept", cache.slack)):
            clone = cache.clone()
            clone.slack = slack
            logits = model(torch.tensor([question + answer_prefix]), **_cache_kw(clone)).logits[:, -1]
            clone.slack = cache.slack  # decode steps as the default rule: kept
            held = [layer.valid.sum(dim=-1).float().mean().item() for layer in clone.layers]
            text, _, _ = _greedy_answer(model, tokenizer, clone, logits, ruler.ANSWER_TOKENS["niah_single_number"],
                                        sample.answers)
            print(f"sample {index} {label:13s}: score {ruler.score(text, sample.answers):.0f} {text!r} "
                  f"held per layer {min(held):.0f}..{max(held):.0f} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
