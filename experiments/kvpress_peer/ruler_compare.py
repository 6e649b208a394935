"""KVzip on qwen2.5-0.5b's RULER needles: kvcompress's grid cells vs kvpress 0.5.5's KVzipPress, same token ids.

Runs in the project's virtualenv (kvpress is never imported here), in two steps around `ruler_kvpress.py`:

    python experiments/kvpress_peer/ruler_compare.py --write-ids          # ruler_ids_qwen.json, for kvpress's venv
    /work/kvpress-venv/bin/python experiments/kvpress_peer/ruler_kvpress.py --ratio 0.9
    python experiments/kvpress_peer/ruler_compare.py --ratio 0.9         # the table

Samples: the grid's `ruler_niah_single_number@4096` (docs/results/ruler4k-grid-qwen2.5-0.5b, seed 0, sample i =
`ruler.generate(..., seed=i)`), context / question + answer prefix tokenized as the bench feeds them. The ids are
checked against the grid: each sample's expected answer must equal the one the grid's full-cache cell recorded.
kvcompress's answers are read from the grid's results.json (kvzip and kvzip:allocation=layer at kept fraction
1 - ratio, question after the compressed context), or from the journal of a grid unit still running; kvpress's from
`ruler_kvpress_qwen_<ratio>.json`. Each kvcompress configuration is paired with its kvpress counterpart (kvzip with
KVzipPress, the global cut; allocation="layer" with layerwise=True) on the samples both answered, each scored with
the bench's rule (`ruler.score`: the expected number in the answer).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from kvcompress.bench import journal, ruler
from kvcompress.bench.stats import wilson
from kvcompress.bench.tasks import essays_text
from kvcompress.models import cache_dir, load_model

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GRID = ROOT / "docs" / "results" / "ruler4k-grid-qwen2.5-0.5b" / "results.json"
TASK, KIND, LENGTH, MODEL = "ruler_niah_single_number@4096", "niah_single_number", 4096, "qwen2.5-0.5b"


def write_ids(limit: int, out: pathlib.Path) -> None:
    _, tokenizer = load_model(MODEL)  # also saves the fp32 safetensors folder kvpress loads
    full = json.loads(GRID.read_text())["cells"][f"{TASK}|full|-"]["answers"]
    essays, samples = essays_text(), []
    for index in range(limit):
        sample = ruler.generate(KIND, tokenizer, LENGTH, index, essays)
        if sample.answers != full[index]["expected"]:
            raise SystemExit(f"sample {index}: answers {sample.answers} differ from the grid's "
                             f"{full[index]['expected']}")
        context, question, answer_prefix = ruler.prompt_tokens(tokenizer, sample)
        samples.append({"index": index, "context": context, "question": question + answer_prefix,
                        "answers": sample.answers})
    out.write_text(json.dumps({"task": TASK, "model": MODEL, "model_folder": str(cache_dir() / MODEL),
                               "answer_tokens": ruler.ANSWER_TOKENS[KIND], "samples": samples}))
    print(f"wrote {out}: {len(samples)} samples, context {len(samples[0]['context'])} tokens")


def interval(right: int, n: int) -> str:
    low, high = wilson(right, n)
    return f"{right}/{n} [{low:.2f}, {high:.2f}]"


def journaled(name: str, fraction: str) -> dict[int, dict]:
    """{sample index: answer} a running grid unit has journaled so far for the cell (`kvcompress.bench.journal`)."""
    path = journal.journal_path(GRID.parent, f"{TASK}|{name}|{fraction}")
    return {entry["index"]: entry["record"]["answer"] for entry in journal.entries(path)}


PAIRS = {"kvzip": "KVzipPress", "kvzip:allocation=layer": "KVzipPress layerwise"}  # kvcompress -> kvpress


def table(ratio: float, peer: pathlib.Path) -> None:
    """Each kvcompress configuration beside its kvpress counterpart on the samples both answered (paired: the same
    ids): right answers with Wilson intervals, the samples only one of them answered right, and each one's misses
    that end cut short (`ruler.cut_short`: a first attempt at the expected number, then the end of the answer; not
    checked here that the answer took the whole budget)."""
    kvpress = json.loads(peer.read_text())["configs"]
    cells = json.loads(GRID.read_text())["cells"]
    fraction = f"{1 - ratio:g}"
    print(f"| kept {fraction}, query after | n (paired) | kvcompress right | kvpress right | only kvcompress | "
          "only kvpress | misses cut short: kvcompress / kvpress | kvpress mean kept per layer: min / max |")
    print("|---|---:|---|---|---:|---:|---:|---|")
    for ours_name, theirs_name in PAIRS.items():
        cell = cells.get(f"{TASK}|{ours_name}|{fraction}")
        ours = dict(enumerate(cell["answers"])) if cell else journaled(ours_name, fraction)
        theirs = {row["index"]: row for row in kvpress.get(theirs_name, [])}
        common = sorted(set(ours) & set(theirs))
        if not common:
            print(f"| {ours_name} / {theirs_name} | 0 | | | | | | |")
            continue
        mine = {i for i in common if ruler.score(ours[i]["answer"], ours[i]["expected"]) == 1}
        peer_right = {i for i in common if ruler.score(theirs[i]["answer"], theirs[i]["answers"]) == 1}
        cut = sum(1 for i in common if i not in mine and ruler.cut_short(ours[i]["answer"], ours[i]["expected"]))
        peer_cut = sum(1 for i in common if i not in peer_right
                       and ruler.cut_short(theirs[i]["answer"], theirs[i]["answers"]))
        layers = [sum(theirs[i]["kept_per_layer"][layer] for i in common) / len(common)
                  for layer in range(len(theirs[common[0]]["kept_per_layer"]))]
        print(f"| {ours_name} / {theirs_name} | {len(common)} | {interval(len(mine), len(common))} | "
              f"{interval(len(peer_right), len(common))} | {len(mine - peer_right)} | {len(peer_right - mine)} | "
              f"{cut} / {peer_cut} | {min(layers):.3f} / {max(layers):.3f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-ids", action="store_true")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--ids", type=pathlib.Path, default=HERE / "ruler_ids_qwen.json")
    args = parser.parse_args(argv)
    if args.write_ids:
        write_ids(args.limit, args.ids)
    else:
        table(args.ratio, HERE / f"ruler_kvpress_qwen_{args.ratio}.json")


if __name__ == "__main__":
    main()
