"""Needles answered after kvpress 0.5.5's KVzipPress compressed the haystack, on the ids the project's bench made.

Runs in kvpress's own virtualenv, never in the project's (it does not import kvcompress):

    /work/kvpress-venv/bin/python experiments/kvpress_peer/needle_kvpress.py

(exact commands: README.md beside this file). Input: `needle_ids.json` (written by `needle_compare.py --write-ids`
in the project's venv: the needle@2048 samples of `kvcompress.bench.tasks.TASKS["needle"]`, limit 10, seed 0).
Output: `needle_kvpress.json`, read by `needle_compare.py`.

How kvpress answers: its own pipeline code on these ids. `KVPressTextGenerationPipeline._forward` (the step after
the pipeline's tokenization, which is skipped: the ids are given) prefills the haystack through the base model
inside `with press(model)` (KVzipPress scores and cuts there, on leaving the block), then `generate_answer` feeds the
question ids in one forward at positions N.. (the cut pairs masked by kvpress's attention patch) and decodes greedily
(`max_new_tokens` 8, stopping early at the end-of-sequence token). The model is the bundled SmolLM2-135M GGUF in
fp32 on the CPU (`dump_kvpress.load_model`); KVzipPress needs the tokenizer at `model.config.name_or_path`, so the
GGUF's tokenizer and config are saved to a temporary folder first (`dump_kvpress.gguf_tokenizer_folder`).

Configurations: no press (full cache), KVzipPress(compression_ratio=0.75) (layerwise False, kvpress's default: a
global allocation), and the variant of `dump_kvpress.py` that scores from position 0 (KVzipPress takes the first
`prefix_length` = 24 tokens for the chat template's prefix; the bench's haystack has none, so kvpress leaves
positions 4..23 unscored and drops them).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import re
import tempfile
import time

import torch
import transformers
from kvpress import KVzipPress
from kvpress.pipeline import KVPressTextGenerationPipeline

from dump_kvpress import RecordingKVzipPress, environment, gguf_tokenizer_folder, load_model, write_json

HERE = pathlib.Path(__file__).resolve().parent
CONFIGS = {
    "full": lambda ratio: None,
    "KVzipPress": lambda ratio: KVzipPress(compression_ratio=ratio),
    # the variant of dump_kvpress.py: prefix_length set to 0, every position scored (not kvpress's behaviour)
    "KVzipPress scored from 0": lambda ratio: RecordingKVzipPress(compression_ratio=ratio, score_from_start=True),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=pathlib.Path, default=HERE / "needle_ids.json")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "needle_kvpress.json")
    parser.add_argument("--ratio", type=float, default=0.75, help="compression_ratio (fraction removed)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    args = parser.parse_args(argv)
    unknown = [name for name in args.configs.split(",") if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; known: {', '.join(CONFIGS)}")
    needles = json.loads(args.ids.read_text())
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("kvpress.presses.kvzip_press").setLevel(logging.ERROR)
    model, tokenizer, gguf = load_model()
    result = {"meta": {**environment(gguf, model), "ratio": args.ratio,
                       "answer_tokens": needles["answer_tokens"]}, "configs": {}}
    with tempfile.TemporaryDirectory() as folder:
        result["tokenizer_folder"] = gguf_tokenizer_folder(model, tokenizer, pathlib.Path(folder))
        pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
        for name in args.configs.split(","):
            answers = []
            for sample in needles["samples"]:
                press = CONFIGS[name](args.ratio)
                inputs = {"context_ids": torch.tensor([sample["prefix"]]),
                          "questions_ids": [torch.tensor([sample["question"]])]}
                start = time.perf_counter()
                with torch.no_grad():
                    text = pipe._forward(inputs, max_new_tokens=needles["answer_tokens"], press=press)[0]
                seconds = time.perf_counter() - start
                hit = sample["number"] in re.sub(r"[\s,]", "", text)  # the bench's rule (Needle.run)
                answers.append({"depth": sample["depth"], "number": sample["number"], "answer": text,
                                "correct": hit, "seconds": round(seconds, 2)})
                print(f"{name:28s} depth {sample['depth']:.3f} number {sample['number']}: {text!r} "
                      f"{'correct' if hit else 'wrong'} ({seconds:.1f} s)", flush=True)
            accuracy = sum(a["correct"] for a in answers) / len(answers)
            result["configs"][name] = {"accuracy": accuracy, "answers": answers}
            print(f"{name}: accuracy {accuracy:.2f}", flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
