"""RULER needles answered after kvpress 0.5.5's KVzipPress compressed the context, on the ids the project's bench made.

Runs in kvpress's own virtualenv, never in the project's (it does not import kvcompress):

    /work/kvpress-venv/bin/python experiments/kvpress_peer/ruler_kvpress.py --ratio 0.9
    /work/kvpress-venv/bin/python experiments/kvpress_peer/ruler_kvpress.py --configs KVzipPress --resume

Input: `ruler_ids_qwen.json` (written by `ruler_compare.py --write-ids` in the project's venv: the grid's
`ruler_niah_single_number@4096` samples on qwen2.5-0.5b, the context ids, the question + answer-prefix ids, the
expected answers, and the model folder: the fp32 safetensors the project saved from the bundled GGUF). Output:
`ruler_kvpress_qwen_<ratio>.json`, read by `ruler_compare.py`.

How kvpress answers: its own pipeline code, `KVPressTextGenerationPipeline._forward` on the given ids (the context
prefilled inside `with press(model)`, the question fed at positions N.., greedy decoding, `answer_tokens` tokens at
most, stopping at the end-of-sequence token). The kept pairs per layer and kv head are read afterwards from each
attention module's `masked_key_indices` (kvpress keeps them until the next prefill).

Configurations: no press (full cache); KVzipPress(compression_ratio, layerwise False: kvpress's default, a global
cut; and layerwise True: the same count per layer); each also scored from position 0 (`RecordingKVzipPress`
of dump_kvpress.py: KVzipPress leaves positions [n_sink, 24) unscored, assuming a chat-template prefix the bench's
context does not have); KVzipPress with pruned pairs masked hard (`hard_mask`: kvpress's fake keys scaled so the
pruned pairs get no attention, as when they are removed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pathlib
import time

import kvpress.attention_patch
import torch
import transformers
from kvpress import KVzipPress
from kvpress.pipeline import KVPressTextGenerationPipeline
from transformers import AutoModelForCausalLM, AutoTokenizer

from dump_kvpress import RecordingKVzipPress, environment, kvzip_kept, write_json

HERE = pathlib.Path(__file__).resolve().parent
CONFIGS = {
    "full": lambda ratio: None,
    "KVzipPress": lambda ratio: KVzipPress(compression_ratio=ratio),
    "KVzipPress layerwise": lambda ratio: KVzipPress(compression_ratio=ratio, layerwise=True),
    "KVzipPress scored from 0": lambda ratio: RecordingKVzipPress(compression_ratio=ratio, score_from_start=True),
    "KVzipPress layerwise scored from 0": lambda ratio: RecordingKVzipPress(compression_ratio=ratio, layerwise=True,
                                                                            score_from_start=True),
    "KVzipPress hard mask": lambda ratio: KVzipPress(compression_ratio=ratio),
}
HARD_MASK_SCALE = 1e6


@contextlib.contextmanager
def hard_mask():
    """kvpress masks a pruned pair by overwriting its key with a fake key k = -1e5 Y / |Y|^2, where <q, Y> > 0 for
    every query q of the forward (`kvpress.attention_patch.search_hyperplane`). The pair's logit <q, k> / sqrt(d) is
    then -1e5 <q, Y> / (|Y|^2 sqrt(d)): when <q, Y> is small against |Y|^2 it is not far below the others, and the
    "pruned" pair still gets attention and adds its value. This scales the fake key by `HARD_MASK_SCALE`, so the
    pruned pairs' attention underflows to 0 (what removing them gives), to measure what the leak does."""
    original = kvpress.attention_patch.search_hyperplane
    kvpress.attention_patch.search_hyperplane = lambda X, max_iter=1000: original(X, max_iter) * HARD_MASK_SCALE
    try:
        yield
    finally:
        kvpress.attention_patch.search_hyperplane = original


PATCHES = {"KVzipPress hard mask": hard_mask}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=pathlib.Path, default=HERE / "ruler_ids_qwen.json")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default ruler_kvpress_qwen_<ratio>.json")
    parser.add_argument("--ratio", type=float, default=0.9, help="compression_ratio (fraction removed)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    parser.add_argument("--limit", type=int, default=None, help="first N samples only")
    parser.add_argument("--samples", default=None, help="comma list of sample indices (default: every sample)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the samples --out already holds for each configuration; run only the others")
    args = parser.parse_args(argv)
    unknown = [name for name in args.configs.split(",") if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; known: {', '.join(CONFIGS)}")
    out = args.out or HERE / f"ruler_kvpress_qwen_{args.ratio}.json"
    needles = json.loads(args.ids.read_text())
    samples = needles["samples"][: args.limit]
    if args.samples:
        wanted = {int(i) for i in args.samples.split(",")}
        samples = [sample for sample in samples if sample["index"] in wanted]
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("kvpress.presses.kvzip_press").setLevel(logging.ERROR)
    folder = pathlib.Path(needles["model_folder"])
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    meta = {**environment(folder / "model.safetensors", model), "ratio": args.ratio,
            "answer_tokens": needles["answer_tokens"], "task": needles["task"]}
    result = {"meta": meta, "configs": {}}
    if args.resume and out.is_file():
        result = json.loads(out.read_text())
        if result["meta"]["answer_tokens"] != meta["answer_tokens"] or result["meta"]["task"] != meta["task"]:
            raise SystemExit(f"--resume: {out} holds another task or answer budget")
    for name in args.configs.split(","):
        rows = result["configs"].get(name, [])
        done = {row["index"] for row in rows}
        for sample in samples:
            if sample["index"] in done:
                continue
            press = CONFIGS[name](args.ratio)
            inputs = {"context_ids": torch.tensor([sample["context"]]),
                      "questions_ids": [torch.tensor([sample["question"]])]}
            start = time.perf_counter()
            with torch.no_grad(), PATCHES.get(name, contextlib.nullcontext)():
                text = pipe._forward(inputs, max_new_tokens=needles["answer_tokens"], press=press)[0]
            seconds = time.perf_counter() - start
            row = {"index": sample["index"], "answers": sample["answers"], "answer": text, "seconds": round(seconds, 1)}
            if press is not None:
                kept = kvzip_kept(model, len(sample["context"]))  # (layers, Hkv, N)
                row["kept_per_layer"] = kept.mean(axis=(1, 2)).round(4).tolist()
            rows.append(row)
            print(f"{name:36s} sample {sample['index']:2d} {sample['answers']}: {text[:40]!r} ({seconds:.0f} s)",
                  flush=True)
            result["configs"][name] = sorted(rows, key=lambda row: row["index"])
            write_json(out, result)  # after every sample: a killed run keeps what it finished (--resume)


if __name__ == "__main__":
    main()
