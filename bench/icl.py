"""In-context-learning classification with label-word anchors ("Label Words are Anchors", Wang et al. 2023).

Tasks (data: bundled with the package under `kvcompress/bench/data/icl/`, Apache-2.0, see SOURCE.md there; read
with importlib.resources, so it works from a clone, an editable install and a wheel; `data_dir=` overrides):

| task   | template                                   | label words                                                   |
|--------|--------------------------------------------|---------------------------------------------------------------|
| sst2   | `Review: <text>\\nSentiment: <label>\\n`     | negative, positive                                            |
| trec   | `Question: <text>\\nAnswer Type: <label>\\n` | abbreviation, entity, description, person, location, number   |
| agnews | `Article: <text>\\nAnswer: <label>\\n`       | world, sports, business, technology                           |

Methods (all answer each test input from one prefix computed once per task and seed, copied per query):
- `full`: full ICL, the demonstrations' whole KV.
- `label_words` (Hidden_anchor): the demonstrations' KV reduced to the label-word and formatting tokens.
- `text_anchor`: the demonstrations with their input text removed, format and labels kept as text (recomputed).
- `hidden_random`: the first token plus random non-anchor positions, as many in all as Hidden_anchor keeps
  (seeded; drawn from all positions only if the prefix has too few non-anchor tokens).

Prediction: argmax of the next-token logits over the FIRST token of `" " + label word` (the label words of these
tasks are single tokens for SmolLM2; distinct first tokens are checked). Label loyalty: % of test inputs where a
method predicts the same class as full ICL. Speed-up: median time of answering one query (copying the prefix cache
plus the query forward) from the full prefix, divided by the same from the method's prefix.

CLI: `python -m kvcompress.bench.icl --tasks sst2,trec,agnews --seeds 0,1,2 --limit 500 --json out.json`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import json
import os
import pathlib
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from kvcompress.icl_prompts import IclTemplate, match_anchor_tokens, token_offsets
from kvcompress.strategies.full import FullCache
from kvcompress.strategies.label_words import CompressedPrefix, LabelWordCache
from kvcompress.strategies.random_keep import RandomKeepCache

TEMPLATES: dict[str, IclTemplate] = {
    "sst2": IclTemplate("Review:", "\nSentiment:", ("negative", "positive")),
    "trec": IclTemplate(
        "Question:", "\nAnswer Type:", ("abbreviation", "entity", "description", "person", "location", "number")
    ),
    "agnews": IclTemplate("Article:", "\nAnswer:", ("world", "sports", "business", "technology")),
}
METHODS = ("full", "label_words", "text_anchor", "hidden_random")
ALIASES = {"full_icl": "full", "hidden_anchor": "label_words"}
TEST_SUBSET_SEED = 1234  # the evaluated subset does not depend on the demonstration seed
_TREC_CLASSES = {"ABBR": 0, "ENTY": 1, "DESC": 2, "HUM": 3, "LOC": 4, "NUM": 5}


@dataclass
class IclTask:
    """A classification task instance: template, demonstrations (k per class, seeded order) and test examples.

    `demonstrations` and `examples` are lists of (text, class index).
    """

    name: str
    template: IclTemplate
    demonstrations: list[tuple[str, int]]
    examples: list[tuple[str, int]]
    seed: int = 0
    k_per_class: int = 1
    info: dict = field(default_factory=dict)


def resolve_data_dir(data_dir: str | os.PathLike | None = None):
    """The folder of the ICL data files: `data_dir` when given, else the copy bundled as package data.

    Returns a `pathlib.Path` (or an importlib.resources Traversable for a non-filesystem install); raises
    FileNotFoundError naming `data_dir` when the given folder does not exist.
    """
    if data_dir is None:
        return importlib.resources.files(__package__).joinpath("data", "icl")
    path = pathlib.Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r}: no such folder (it should hold sst2_stsa.binary.*, trec_*.txt and "
            "agnews_test.csv; leave data_dir=None for the bundled copy)"
        )
    return path


def _lines(path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"missing ICL data file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _sst2(path) -> list[tuple[str, int]]:
    return [(line[2:].strip(), int(line[0])) for line in _lines(path)]


def _trec(path) -> list[tuple[str, int]]:
    rows = []
    for line in _lines(path):
        tag, text = line.split(" ", 1)
        rows.append((text.strip(), _TREC_CLASSES[tag.split(":", 1)[0]]))
    return rows


def _clean_news(text: str) -> str:
    for old, new in ((" #39;", "'"), ("#39;", "'"), (" quot;", '"'), ("quot;", '"'), ("#36;", "$"), ("\\", " ")):
        text = text.replace(old, new)
    return " ".join(text.split())


def _agnews(path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise FileNotFoundError(f"missing ICL data file: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader)  # header
        return [(_clean_news(f"{title}. {description}"), int(index) - 1) for index, title, description in reader]


def load_icl_task(
    name: str, k_per_class: int = 1, seed: int = 0, limit: int | None = None, data_dir=None
) -> IclTask:
    """Load a task with `k_per_class` demonstrations per class (drawn and ordered with `seed`).

    Test examples: the whole test set, or `limit` of them drawn with a fixed seed (the same for every `seed`).
    SST-2 and TREC draw demonstrations from their train files; AG News (test file only) from the test rows not
    evaluated.
    """
    if name not in TEMPLATES:
        raise ValueError(f"unknown ICL task {name!r}; choose from {sorted(TEMPLATES)}")
    if isinstance(k_per_class, bool) or not isinstance(k_per_class, int) or k_per_class < 1:
        raise ValueError(f"k_per_class must be an integer >= 1 (an empty demonstration set is not allowed), "
                         f"got {k_per_class!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit!r}")
    folder = resolve_data_dir(data_dir)
    if name == "sst2":
        pool, test = _sst2(folder / "sst2_stsa.binary.train"), _sst2(folder / "sst2_stsa.binary.test")
    elif name == "trec":
        pool, test = _trec(folder / "trec_train.txt"), _trec(folder / "trec_test.txt")
    else:
        pool = test = _agnews(folder / "agnews_test.csv")
    chosen = list(range(len(test)))
    if limit is not None and limit < len(test):
        chosen = sorted(random.Random(TEST_SUBSET_SEED).sample(chosen, limit))
    examples = [test[i] for i in chosen]
    if pool is test:
        taken = set(chosen)
        pool = [row for i, row in enumerate(test) if i not in taken]
    rng = random.Random(seed)
    demonstrations = []
    for label in range(len(TEMPLATES[name].label_words)):
        candidates = [row for row in pool if row[1] == label]
        if len(candidates) < k_per_class:
            raise ValueError(f"{name}: only {len(candidates)} demonstrations of class {label} for k={k_per_class}")
        demonstrations += rng.sample(candidates, k_per_class)
    rng.shuffle(demonstrations)
    return IclTask(name, TEMPLATES[name], demonstrations, examples, seed, k_per_class,
                   info={"data_dir": str(folder), "test_size": len(test)})


def label_token_ids(tokenizer, template: IclTemplate) -> list[int]:
    """First token id of `" " + word` per label word; ValueError if two labels share it."""
    ids = []
    for word in template.label_words:
        pieces = token_offsets(tokenizer, " " + word)[0]
        if not pieces:
            raise ValueError(f"label word {word!r} tokenizes to nothing")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {template.label_words} share a first token; the first-token rule needs "
                         "distinct first tokens")
    return ids


def build_prefixes(model, tokenizer, task: IclTask, methods: Sequence[str] | Mapping[str, Callable],
                   random_seed: int | None = None) -> tuple[dict[str, CompressedPrefix], dict]:
    """Prefill the demonstrations once per method. Returns ({method: CompressedPrefix}, info)."""
    text, spans = task.template.demonstrations(task.demonstrations)
    match = match_anchor_tokens(tokenizer, text, spans)
    prefix_ids = torch.tensor([match.input_ids], device=model.device)
    length = prefix_ids.shape[-1]
    # Hidden_random draws non-anchor positions (the paper's rule) when there are enough of them, else any position
    non_anchor = len(set(range(1, length)) - set(match.positions))
    random_excludes_anchors = non_anchor >= len(match.positions) - 1
    names = list(methods)
    if "full" not in names:
        names = ["full"] + names  # the reference of label loyalty
    prefixes = {}
    for name in names:
        kind = ALIASES.get(name, name)
        if isinstance(methods, Mapping) and name in methods and kind not in METHODS:
            prefixes[name] = CompressedPrefix(model, methods[name](length), prefix_ids)
        elif kind == "full":
            prefixes[name] = CompressedPrefix(model, FullCache(model), prefix_ids)
        elif kind == "label_words":
            prefixes[name] = CompressedPrefix(model, LabelWordCache(model, match.positions, length), prefix_ids)
        elif kind == "hidden_random":
            cache = RandomKeepCache(model, len(match.positions), length, n_first=1,
                                    exclude=match.positions if random_excludes_anchors else (),
                                    seed=task.seed if random_seed is None else random_seed)
            prefixes[name] = CompressedPrefix(model, cache, prefix_ids)
        elif kind == "text_anchor":
            ids = token_offsets(tokenizer, task.template.text_anchor(task.demonstrations))[0]
            prefixes[name] = CompressedPrefix(model, FullCache(model), torch.tensor([ids], device=model.device))
        else:
            raise TypeError(f"unknown ICL method {name!r}: use {METHODS}, or pass {{name: make_cache}} where "
                            "make_cache(prefix_tokens) returns a kvcompress cache")
    info = {"prefix_tokens": length, "anchor_tokens": len(match.positions), "prompt": text,
            "random_excludes_anchors": random_excludes_anchors}
    return prefixes, info


def evaluate_icl(model, tokenizer, task: IclTask, methods: Sequence[str] | Mapping[str, Callable] = METHODS,
                 progress: bool = True, random_seed: int | None = None) -> dict[str, dict]:
    """Classify `task.examples` with each method; the demonstrations are prefilled once per method.

    Args:
        methods: names from `METHODS` (aliases "full_icl", "hidden_anchor"), or a mapping name -> a function
            `make_cache(prefix_tokens)` returning a fresh kvcompress cache (any strategy) for the prefix.
        random_seed: seed of Hidden_random's draw (default: the task's seed).

    Returns:
        {method: {"accuracy", "loyalty", "kv_tokens_kept", "kv_kept_fraction", "answer_seconds" (median per
        query), "speedup" (full's median / this median), "n_examples", "predictions"}}; "full" is always
        computed (the loyalty reference) and included.
    """
    prefixes, info = build_prefixes(model, tokenizer, task, methods, random_seed)
    label_ids = torch.tensor(label_token_ids(tokenizer, task.template), device=model.device)
    predictions = {name: [] for name in prefixes}
    times = {name: [] for name in prefixes}
    examples = task.examples
    if progress:
        from tqdm import tqdm

        examples = tqdm(examples, desc=f"{task.name} seed {task.seed}", file=sys.stderr)
    for text, _ in examples:
        query = torch.tensor([token_offsets(tokenizer, task.template.query(text))[0]], device=model.device)
        for name, prefix in prefixes.items():
            start = time.perf_counter()
            logits = prefix.next_token_logits(query)
            times[name].append(time.perf_counter() - start)
            predictions[name].append(int(logits[0, label_ids].argmax()))
    gold = [label for _, label in task.examples]
    full_time = statistics.median(times["full"])
    results = {}
    for name, prefix in prefixes.items():
        preds = predictions[name]
        answer = statistics.median(times[name])
        results[name] = {
            "accuracy": sum(p == g for p, g in zip(preds, gold)) / len(gold),
            "loyalty": sum(p == f for p, f in zip(preds, predictions["full"])) / len(gold),
            "kv_tokens_kept": prefix.kv_tokens,
            "kv_kept_fraction": prefix.kv_tokens / info["prefix_tokens"],
            "answer_seconds": answer,
            "speedup": full_time / answer,
            "n_examples": len(gold),
            "predictions": preds,
        }
    return results


# ------------------------------------------------------------------------------------------------------------
# CLI


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown_table(runs: dict[str, dict]) -> str:
    """Rows per task and method, mean ± std over seeds. `runs`: {"task|seed": evaluate_icl output}."""
    names = {"full": "Full ICL", "label_words": "Hidden_anchor", "text_anchor": "Text_anchor",
             "hidden_random": "Hidden_random"}
    lines = ["| task | method | seeds | examples | accuracy % | label loyalty % | KV kept % | KV tokens | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    tasks = sorted({key.split("|")[0] for key in runs}, key=list(TEMPLATES).index)
    for task in tasks:
        seeded = [runs[k] for k in runs if k.split("|")[0] == task]
        for method in [m for m in METHODS if m in seeded[0]] + [m for m in seeded[0] if m not in METHODS]:
            rows = [r[method] for r in seeded]
            lines.append(
                f"| {task} | {names.get(method, method)} | {len(rows)} | {rows[0]['n_examples']} | "
                f"{_mean_std([100 * r['accuracy'] for r in rows])} | {_mean_std([100 * r['loyalty'] for r in rows])} | "
                f"{statistics.mean(100 * r['kv_kept_fraction'] for r in rows):.1f} | "
                f"{statistics.mean(r['kv_tokens_kept'] for r in rows):.0f} | "
                f"{statistics.mean(r['speedup'] for r in rows):.2f}x |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcompress.bench.icl", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="sst2,trec,agnews")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--limit", type=int, default=500, help="test examples per task (0: all)")
    parser.add_argument("--k-per-class", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="write results here (resumes from it if it exists)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--table-only", nargs="+", metavar="JSON",
                        help="print the table of runs saved in these JSON files (merged), compute nothing")
    args = parser.parse_args(argv)
    if args.table_only:
        runs = {}
        for path in args.table_only:
            runs.update(json.loads(pathlib.Path(path).read_text())["runs"])
        print(markdown_table(runs))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from kvcompress.models import load_model

    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    out = pathlib.Path(args.json) if args.json else None
    saved = json.loads(out.read_text()) if out and out.is_file() else {"runs": {}}
    model, tokenizer = load_model(args.model)
    for task_name in tasks:
        for seed in seeds:
            key = f"{task_name}|{seed}"
            if key in saved["runs"]:
                continue
            task = load_icl_task(task_name, args.k_per_class, seed, args.limit or None, args.data_dir)
            saved["runs"][key] = evaluate_icl(model, tokenizer, task, methods, progress=not args.no_progress)
            saved["config"] = {**vars(args), "torch_threads": torch.get_num_threads()}
            if out:
                out.write_text(json.dumps(saved, indent=1))
    runs = {k: v for k, v in saved["runs"].items() if k.split("|")[0] in tasks and int(k.split("|")[1]) in seeds}
    print(markdown_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
