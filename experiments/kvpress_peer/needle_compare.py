"""Needles answered after KVzip compression: kvcompress's KVzipCache vs kvpress 0.5.5's KVzipPress, same ids.

Runs in the project's virtualenv (kvpress is never imported here), in two steps around `needle_kvpress.py`:

    python experiments/kvpress_peer/needle_compare.py --write-ids   # needle_ids.json, for kvpress's venv
    /work/kvpress-venv/bin/python experiments/kvpress_peer/needle_kvpress.py   # needle_kvpress.json
    python experiments/kvpress_peer/needle_compare.py               # kvcompress's answers, the table

(exact commands: README.md beside this file).

Samples: the project's bench, `TASKS["needle"].prepare(tokenizer, limit=10, seed=0, length=2048, options={})`: 10
haystacks of 2,048 tokens (essays with "The special magic number is N." inserted at depths 1/11 .. 10/11), the
question ids and N. Query after compression: the haystack is prefilled (and compressed), then the question is fed,
then greedy decoding, 8 tokens in all (the bench's `Needle.run`: `metrics.prefill` twice, then
`metrics.greedy_decode` for 7 more tokens); correct when N is in the answer (spaces and commas removed).

kvcompress configurations (SmolLM2-135M from `kvcompress.models.load_model`, fp32, CPU):
- `full`: FullCache.
- `kvzip`: `KVzipCache.for_budget(model, tokenizer, 512, allocation="global")`, 512 = 25% of 2,048 per layer and kv
  head, the same total as KVzipPress(compression_ratio=0.75) keeps (int(30 x 3 x 2048 x 0.75) pairs masked).
- `kvzip, question one token at a time`: the `kvzip` cache, but the question is fed one token per forward, so
  KVzipCache does not reconstruct and cut again after the question (before 2026-12-01 it did after every
  multi-token forward; since then a question shorter than `slack` is not cut, so both rows compute the same thing;
  KVzipPress compresses the haystack only). The question's logits are the same computation; only the cut after it
  is skipped. It isolates that one difference.
Each haystack is compressed once per configuration; the two question modes of `kvzip` answer from two clones of
the same compressed cache.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time

import torch

from kvcompress import FullCache, KVzipCache
from kvcompress.bench import metrics
from kvcompress.bench.tasks import TASKS
from kvcompress.models import load_model

from compare import DOCS, write_markdown

HERE = pathlib.Path(__file__).resolve().parent
MARKERS = ("<!-- kvzip-needle:start -->", "<!-- kvzip-needle:end -->")
LENGTH, LIMIT, SEED, KEPT = 2048, 10, 0, 0.25


def write_ids(tokenizer, out: pathlib.Path, length: int = LENGTH, limit: int = LIMIT, needles: str = ":") -> None:
    """The task's `limit` needles at `length` tokens (those in the slice `needles`, "start:stop") as JSON ids."""
    prepared = TASKS["needle"].prepare(tokenizer, limit=limit, seed=SEED, length=length, options={})
    start, stop = (int(x) if x else None for x in needles.split(":"))
    samples = [{"index": i, "prefix": s["prefix"][0].tolist(), "question": s["question"][0].tolist(),
                "number": s["number"], "depth": s["depth"]}
               for i, s in list(enumerate(prepared["samples"]))[start:stop]]
    out.write_text(json.dumps({"task": f"needle@{length}", "limit": limit, "seed": SEED,
                               "answer_tokens": prepared["answer_tokens"], "samples": samples}))
    print(f"wrote {out}: {len(samples)} samples, prefix {len(samples[0]['prefix'])} tokens, question "
          f"{len(samples[0]['question'])} tokens")


def answer(model, tokenizer, cache, question: torch.Tensor, tokens: int, one_at_a_time: bool) -> str:
    """The bench's query-after answer (Needle.run) from a cache holding the haystack: question, then greedy decoding;
    `one_at_a_time` feeds the question one token per forward instead of in one forward."""
    pieces = [question[:, i : i + 1] for i in range(question.shape[1])] if one_at_a_time else [question]
    for piece in pieces:
        logits, _ = metrics.prefill(model, cache, piece)
    ids, _ = metrics.greedy_decode(model, cache, logits, tokens - 1)
    return tokenizer.decode(ids, skip_special_tokens=True)


def run(model, tokenizer, needles: dict) -> dict:
    tokens = needles["answer_tokens"]
    budget = int(KEPT * LENGTH)
    builders = {
        "full": lambda: FullCache(model),
        "kvzip": lambda: KVzipCache.for_budget(model, tokenizer, budget, allocation="global"),
    }
    out = {name: [] for name in [*builders, "kvzip, question one token at a time"]}
    for sample in needles["samples"]:
        prefix, question = torch.tensor([sample["prefix"]]), torch.tensor([sample["question"]])
        for name, build in builders.items():
            cache = build()
            _, prefill_seconds = metrics.prefill(model, cache, prefix)
            modes = [(name, False)] + ([("kvzip, question one token at a time", True)] if name == "kvzip" else [])
            compressed = cache
            for label, one_at_a_time in modes:
                text = answer(model, tokenizer, compressed.clone() if len(modes) > 1 else compressed, question,
                              tokens, one_at_a_time)
                hit = sample["number"] in re.sub(r"[\s,]", "", text)  # the bench's rule (Needle.run)
                out[label].append({"depth": sample["depth"], "number": sample["number"], "answer": text,
                                   "correct": hit, "prefill_seconds": round(prefill_seconds, 2)})
                print(f"{label:36s} depth {sample['depth']:.3f} number {sample['number']}: {text!r} "
                      f"{'correct' if hit else 'wrong'} (prefill {prefill_seconds:.1f} s)", flush=True)
    return {name: {"accuracy": sum(a["correct"] for a in answers) / len(answers), "answers": answers}
            for name, answers in out.items()}


def answer_cell(answer: dict) -> str:
    """One recorded answer as a markdown table cell: right or not, then the text (pipes and newlines escaped)."""
    text = answer["answer"].replace("|", "\\|").replace("\n", "\\n")
    return f"{'**ok**' if answer['correct'] else 'no'}: `{text}`"


def table(ours: dict, theirs: dict) -> str:
    names_ours, names_theirs = list(ours), list(theirs["configs"])
    lines = ["Accuracy (10 needles): " + "; ".join(
        [f"kvcompress `{n}` {ours[n]['accuracy']:.1f}" for n in names_ours] +
        [f"kvpress `{n}` {theirs['configs'][n]['accuracy']:.1f}" for n in names_theirs]) + ".", "",
        "| depth | number | " + " | ".join(f"ours `{n}`" for n in names_ours) + " | " +
        " | ".join(f"kvpress `{n}`" for n in names_theirs) + " |",
        "|---:|---:|" + "---|" * (len(names_ours) + len(names_theirs))]

    for i, sample in enumerate(ours[names_ours[0]]["answers"]):
        lines.append(f"| {sample['depth']:.3f} | {sample['number']} | " +
                     " | ".join(answer_cell(ours[n]["answers"][i]) for n in names_ours) + " | " +
                     " | ".join(answer_cell(theirs["configs"][n]["answers"][i]) for n in names_theirs) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-ids", action="store_true", help="only write the needle ids (step 1)")
    parser.add_argument("--length", type=int, default=LENGTH, help="--write-ids: the haystack length in tokens")
    parser.add_argument("--limit", type=int, default=LIMIT, help="--write-ids: the task's needle count")
    parser.add_argument("--needles", default=":", help="--write-ids: which of them, a slice start:stop")
    parser.add_argument("--ids", type=pathlib.Path, default=HERE / "needle_ids.json")
    parser.add_argument("--kvpress", type=pathlib.Path, default=HERE / "needle_kvpress.json")
    parser.add_argument("--out-json", type=pathlib.Path, default=DOCS / "peer_kvzip_needle.json")
    parser.add_argument("--out-md", type=pathlib.Path, default=DOCS / "peer_kvpress.md")
    args = parser.parse_args(argv)
    model, tokenizer = load_model()
    if args.write_ids:
        write_ids(tokenizer, args.ids, args.length, args.limit, args.needles)
        return
    needles = json.loads(args.ids.read_text())
    start = time.perf_counter()
    ours = run(model, tokenizer, needles)
    seconds = time.perf_counter() - start
    theirs = json.loads(args.kvpress.read_text())  # read last: needle_kvpress.py may still be running
    args.out_json.write_text(json.dumps({"meta": {"task": needles["task"], "kept": KEPT, "seconds": round(seconds),
                                                  "threads": torch.get_num_threads(),
                                                  "date": time.strftime("%Y-%m-%d")},
                                         "kvcompress": ours, "kvpress": theirs}, indent=1))
    write_markdown(args.out_md, table(ours, theirs), MARKERS)
    print(f"wrote {args.out_json} and the needle table in {args.out_md} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
