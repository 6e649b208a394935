"""The RULER-4K niah grid of `ruler_grid.sh` as tables: for each task, one row per query mode and strategy, one
column per kept fraction, accuracy (right / n) with its 95% Wilson interval, and how many of its misses were cut
mid-answer: they took the whole answer budget (`ruler.ANSWER_TOKENS`: 16 tokens for single_number, where RULER
allows 128) and end in the first 2 or more characters of an expected answer, with no earlier attempt at it
(`ruler.cut_short`: a restated question, then the right digits so far). "-" where the cell has not run yet. An
answer's tokens are the ones the bench recorded (since 2026-12-01), else its text encoded again with the model's
tokenizer. Then the coverage (cells finished of the grid) and, at 25% kept with the question after, each strategy's
accuracy as a share of the full cache's on the tasks where both ran. A "*" marks a cell whose answers were decoded
together with the other caches of their unit (`--decode-together`, `kvcompress.cache_group.CacheGroup`). Writes
table.md into the grid folder.

    python experiments/kvzip/ruler_table.py [docs/results/ruler4k-grid]
"""

from __future__ import annotations

import argparse
import json
import pathlib

from kvcompress.bench import ruler, stats

TASKS = ["single_number", "single_word", "single_uuid", "multikey", "multivalue", "multiquery"]
STRATEGIES = ["full", "kvzip", "kvzip:allocation=layer", "snapkv", "sink_window", "h2o", "tova", "pyramidkv", "knorm",
              "expected_attention", "anchor"]
NO_BUDGET = ("full", "anchor")  # strategies that keep what they keep: one cell per task and mode
FRACTIONS = ["0.1", "0.25", "0.5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=pathlib.Path, default=pathlib.Path("docs/results/ruler4k-grid"))
    args = parser.parse_args()
    results = json.loads((args.folder / "results.json").read_text())
    cells = {k: c for k, c in results["cells"].items() if c.get("status") == "ok"}
    stats.annotate({"cells": cells})
    count_tokens = _token_counter(results["environment"]["model"])
    lines = ["# RULER-4K niah grid: accuracy [95% Wilson interval] (right / n)", ""]
    for task in TASKS:
        lines += [f"## niah_{task}", "", "| query | strategy | " + " | ".join(f"{float(f):.0%} kept" for f in FRACTIONS)
                  + " | no budget |", "|---|---|" + "---:|" * (len(FRACTIONS) + 1)]
        for query in ("after", "before"):
            label = f"ruler_niah_{task}@4096" + (":before" if query == "before" else "")
            for strategy in STRATEGIES:
                budgets = ["-"] if strategy in NO_BUDGET else FRACTIONS
                text = [_score(cells.get(f"{label}|{strategy}|{b}"), count_tokens) for b in budgets]
                text = ["", "", "", text[0]] if strategy in NO_BUDGET else text + [""]
                lines.append(f"| {query} | {strategy} | " + " | ".join(text) + " |")
        lines.append("")
    total = len(TASKS) * 2 * (len(NO_BUDGET) + (len(STRATEGIES) - len(NO_BUDGET)) * len(FRACTIONS))
    done = sum(1 for t in TASKS for q in ("", ":before") for s in STRATEGIES
               for b in (["-"] if s in NO_BUDGET else FRACTIONS) if f"ruler_niah_{t}@4096{q}|{s}|{b}" in cells)
    lines += [f"Coverage: {done} of {total} cells. \"k cut\": misses cut mid-answer by the answer budget. \"*\": "
              "answers decoded together with the other caches of their unit (--decode-together), not one by one.", "",
              "## Share of the full cache's accuracy at 25% kept, asked after (summed right answers over the tasks "
              "where both ran)", "", "| strategy | right / full's right | tasks |", "|---|---:|---:|"]
    for strategy in [s for s in STRATEGIES if s not in NO_BUDGET]:
        mine = full = tasks = 0
        for task in TASKS:
            cell = cells.get(f"ruler_niah_{task}@4096|{strategy}|0.25")
            reference = cells.get(f"ruler_niah_{task}@4096|full|-")
            if cell and reference:
                mine += cell["accuracy"] * cell["n_examples"]
                full += reference["accuracy"] * reference["n_examples"]
                tasks += 1
        if tasks:
            lines.append(f"| {strategy} | {mine:.0f} / {full:.0f} = {mine / full:.0%} | {tasks} |" if full else
                         f"| {strategy} | {mine:.0f} / 0 | {tasks} |")
    (args.folder / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _score(cell: dict | None, count_tokens) -> str:
    if cell is None:
        return "-"
    right = cell["accuracy"] * cell["n_examples"]
    cap = cell.get("answer_tokens", ruler.ANSWER_TOKENS[cell["task_name"].removeprefix("ruler_")])
    cut = sum(1 for answer in cell.get("answers", []) if answer["score"] < 1
              and ruler.cut_short(answer["answer"], answer["expected"])
              and (answer["tokens"] if "tokens" in answer else count_tokens(answer["answer"])) >= cap)
    together = "*" if any(answer.get("decoded_together") for answer in cell.get("answers", [])) else ""
    return f"{stats.with_interval(cell['accuracy'], cell.get('ci', {}).get('accuracy'), '.2f')} ({right:.0f}/" \
           f"{cell['n_examples']}" + (f", {cut} cut)" if cut else ")") + together


def _token_counter(model: str):
    """Tokens of an answer's text in `model`'s tokenizer (a bundled alias: its saved copy, else its GGUF)."""
    from transformers import AutoTokenizer

    from kvcompress import models

    local = models.cache_dir() / model
    if (local / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(local))
    elif model in models.ALIASES:
        path = models.bundled_gguf(model)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


if __name__ == "__main__":
    main()
