"""The README's headline table: one task (default needle@2048; `--task` names another, e.g.
ruler_niah_single_number@4096) per strategy and kept fraction, both query modes, each score with its 95% interval
(Wilson) and the paired difference to the full cache (Newcombe), from one or more bench result folders of
`needle_grid.sh` or `ruler_grid.sh` (several folders: runs of the same grid split across processes; a cell present
twice is taken from the latest run, by `started_at`; a results.json file may be named instead of its folder). Prints
the README's compact table (a column per kept fraction); writes the merged results.json, every cell with its paired
difference and the device it ran on (table.md) and the bench's plot beside it (one per query mode in query-*/, and
both modes side by side).

    python experiments/kvzip/needle_table.py --out docs/results/needle2k-2026-11-30 runs/needle2k-after runs/needle2k-before
    python experiments/kvzip/needle_table.py --task ruler_niah_single_number@4096 --out DIR docs/results/ruler4k-grid
"""

from __future__ import annotations

import argparse
import json
import pathlib

from kvcompress.bench import plots, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for the merged results.json and plot")
    parser.add_argument("--task", default="needle@2048", help="the task label without its query mode")
    args = parser.parse_args()
    merged: dict = {"cells": {}}
    for folder in args.folders:
        results = json.loads((folder if folder.suffix == ".json" else folder / "results.json").read_text())
        merged.setdefault("environment", results.get("environment"))
        device = (results.get("environment") or {}).get("device", "cpu")
        for key, cell in results["cells"].items():
            if cell.get("task", "").split(":")[0] == args.task:
                cell.setdefault("device", device.split(":")[0])
                if cell["strategy"] == "anchor":  # the bare spec runs on the bench's model: never anchor-trained
                    cell.setdefault("anchor_trained", False)
                query = cell.get("query", "-")
                name = key if key.endswith(f"|{query}") else f"{key}|{query}"  # merged files carry the mode already
                have = merged["cells"].get(name)
                if have is None or cell.get("started_at", "") > have.get("started_at", ""):
                    merged["cells"][name] = cell
    table = []
    for query in ("after", "before"):
        cells = {k.rsplit("|", 1)[0]: c for k, c in merged["cells"].items() if c.get("query") == query}
        if not cells:
            continue
        stats.annotate({"cells": cells})
        for cell in cells.values():
            table.append(cell)
    # KV bytes kept (relative to the full cache): the mean over layers AND kv heads; the kept fraction of cells run
    # before 2026-11-30 took the largest kv head's count, which overstates kvzip's global allocation
    rows = ["| query | strategy | budget | KV bytes kept | accuracy [95% CI] | vs full [95% CI] | n | device |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for cell in sorted(table, key=lambda c: (c["query"], c["budget"], c["strategy"])):
        if cell.get("status") != "ok":
            continue
        ci = cell.get("ci", {}).get("accuracy")
        diff = cell.get("vs_full", {}).get("accuracy")
        rows.append(f"| {cell['query']} | {plots.strategy_label(cell)} | {cell['budget']} | {cell['kv_bytes_fraction']:.3f} | "
                    f"{stats.with_interval(cell['accuracy'], ci, '.3f')} | "
                    f"{stats.difference_text(diff, '.3f') if diff else '-'} | {cell['n_examples']} | "
                    f"{cell['device']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text("\n".join(rows) + "\n")  # every cell with its paired difference and device
    print("\n".join(pivot(table)))
    (args.out / "results.json").write_text(json.dumps(merged, indent=1))
    for query in ("after", "before"):
        cells = {k: c for k, c in merged["cells"].items() if c.get("query") == query}
        if cells:
            env = merged.get("environment") or {}
            (args.out / f"query-{query}").mkdir(exist_ok=True)
            for path in plots.plot_all({"cells": cells, "environment": env}, args.out / f"query-{query}"):
                print("plot:", path)
    # both modes side by side (the README's headline plot): one panel per query mode
    both = {key: {**cell, "task": f"{args.task}, asked {cell['query']}"} for key, cell in merged["cells"].items()
            if cell.get("query") in ("after", "before")}
    for path in plots.plot_all({"cells": both, "environment": merged.get("environment") or {}}, args.out):
        print("plot:", path)


def pivot(cells: list[dict], label=plots.strategy_label, score=None, kept="kv_bytes_fraction") -> list[str]:
    """The README's compact form: one row per query mode and strategy, one column per kept fraction, the score with
    its 95% interval ("-": not run); strategies without a budget (full, anchor) show their KV kept instead.

    `cells`: dicts with "query", "budget" and `kept` (cells with a "status" other than "ok" are left out); `label`
    names a cell's strategy; `score` formats it (default: accuracy [Wilson interval], `_score`)."""
    score = score or _score
    cells = [c for c in cells if c.get("status", "ok") == "ok"]
    budgets = sorted({c["budget"] for c in cells if c["budget"] != "-"}, key=float)
    rows = ["| query | strategy | " + " | ".join(f"{float(b):.0%} kept" for b in budgets) + " | no budget (KV kept) |",
            "|---|---|" + "---:|" * (len(budgets) + 1)]
    for query in ("after", "before"):
        labels = sorted({label(c) for c in cells if c["query"] == query}, key=lambda name: (name != "full", name))
        for name in labels:
            mine = {c["budget"]: c for c in cells if c["query"] == query and label(c) == name}
            text = [score(mine[b]) if b in mine else "-" for b in budgets]
            free = mine.get("-")
            text.append(f"{score(free)} ({free[kept]:.0%})" if free else "")
            rows.append(f"| {query} | {name} | " + " | ".join(text) + " |")
    return rows


def _score(cell: dict) -> str:
    return stats.with_interval(cell["accuracy"], cell.get("ci", {}).get("accuracy"), ".2f")


if __name__ == "__main__":
    main()
