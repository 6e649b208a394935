"""The README's headline from a RULER grid (`ruler_grid.sh`): the average over the niah tasks every row has, per
query mode, strategy and kept fraction, each with its 95% interval (`kvcompress.bench.leaderboard.ruler_rows`: Wilson
on the effective sample size of the stratified mean). Prints the README's compact table (a column per kept
fraction); writes to --out the plot (one panel per query mode), ruler_average.json (the rows: per-task scores, the
average, its interval, n) and table.md (every task's score, then which strategies are statistically tied at each
budget). With --readme, the table inside that file's `<!-- headline:start -->` block is replaced by the printed one
(the prose around it is the author's to update; tests/test_readme.py ties the table to ruler_average.json).

    python experiments/kvzip/ruler_headline.py docs/results/ruler4k-grid-qwen2.5-0.5b \
        --out docs/results/ruler4k-headline-qwen2.5-0.5b --readme README.md
"""

from __future__ import annotations

import argparse
import json
import pathlib

from needle_table import pivot  # this folder's README-table layout

from kvcompress.bench import leaderboard, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=pathlib.Path, help="the grid's --out folder (or its results.json)")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--readme", type=pathlib.Path, help="replace the table of this file's headline block")
    args = parser.parse_args()
    results = json.loads((args.folder if args.folder.suffix == ".json" else args.folder / "results.json").read_text())
    stats.annotate(results)
    rows = [r for r in leaderboard.ruler_rows(results) if r["average"] is not None]
    if not rows:
        raise SystemExit(f"no RULER rows with an average in {args.folder}")
    args.out.mkdir(parents=True, exist_ok=True)
    table = pivot(rows, label=lambda row: row["strategy"], score=_score, kept="kept_fraction")
    print("\n".join(table))
    print(f"\n(averaged tasks per row: {sorted({len(r['averaged']) for r in rows})}; "
          f"n per task: {sorted({r['n'] for r in rows})})")
    (args.out / "ruler_average.json").write_text(json.dumps(
        {"environment": results.get("environment"), "rows": [{k: v for k, v in r.items() if k != "examples"}
                                                             for r in rows]}, indent=1))
    (args.out / "table.md").write_text(
        f"# RULER per task (x100) and their average\n\n{leaderboard.ruler_table(results)}\n\n"
        f"# Ties at each budget\n\n{leaderboard.ties_table(results)}\n")
    print("plot:", leaderboard.plot_leaderboard(results, args.out / "accuracy_vs_kv_kept.png"))
    if args.readme:
        args.readme.write_text(replace_headline_table(args.readme.read_text(), table))
        print("table replaced in", args.readme)


def replace_headline_table(text: str, table: list[str]) -> str:
    """`text` with the markdown table (its run of lines starting with "|") inside the block between
    `<!-- headline:start -->` and `<!-- headline:end -->` replaced by `table`; an error if the block or its table is
    missing, or the block holds more than one table."""
    start, end = "<!-- headline:start -->", "<!-- headline:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"the README needs exactly one {start} ... {end} block")
    head, rest = text.split(start)
    block, tail = rest.split(end)
    lines = block.split("\n")
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not rows or rows != list(range(rows[0], rows[-1] + 1)):
        raise SystemExit("the headline block needs exactly one markdown table (one run of lines starting with '|')")
    lines[rows[0]:rows[-1] + 1] = table
    return head + start + "\n".join(lines) + end + tail


def _score(row: dict) -> str:
    ci = row["ci"]
    return f"{100 * row['average']:.1f}" + ("" if ci is None else f" [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]")


if __name__ == "__main__":
    main()
