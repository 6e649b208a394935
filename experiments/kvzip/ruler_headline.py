"""The README's headline from a RULER grid (`ruler_grid.sh`): the average over the niah tasks every row has, per
query mode, strategy and kept fraction, each with its 95% interval (`kvcompress.bench.leaderboard.ruler_rows`: Wilson
on the effective sample size of the stratified mean). Prints the README's compact table (a column per kept
fraction); writes to --out the plot (one panel per query mode), ruler_average.json (the rows: per-task scores, the
average, its interval, n) and table.md (every task's score, then which strategies are statistically tied at each
budget).

    python experiments/kvzip/ruler_headline.py docs/results/ruler4k-grid-qwen2.5-0.5b \
        --out docs/results/ruler4k-headline-qwen2.5-0.5b
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
    args = parser.parse_args()
    results = json.loads((args.folder if args.folder.suffix == ".json" else args.folder / "results.json").read_text())
    stats.annotate(results)
    rows = [r for r in leaderboard.ruler_rows(results) if r["average"] is not None]
    if not rows:
        raise SystemExit(f"no RULER rows with an average in {args.folder}")
    args.out.mkdir(parents=True, exist_ok=True)
    print("\n".join(pivot(rows, label=lambda row: row["strategy"], score=_score, kept="kept_fraction")))
    print(f"\n(averaged tasks per row: {sorted({len(r['averaged']) for r in rows})}; "
          f"n per task: {sorted({r['n'] for r in rows})})")
    (args.out / "ruler_average.json").write_text(json.dumps(
        {"environment": results.get("environment"), "rows": [{k: v for k, v in r.items() if k != "examples"}
                                                             for r in rows]}, indent=1))
    (args.out / "table.md").write_text(
        f"# RULER per task (x100) and their average\n\n{leaderboard.ruler_table(results)}\n\n"
        f"# Ties at each budget\n\n{leaderboard.ties_table(results)}\n")
    print("plot:", leaderboard.plot_leaderboard(results, args.out / "accuracy_vs_kv_kept.png"))


def _score(row: dict) -> str:
    ci = row["ci"]
    return f"{100 * row['average']:.1f}" + ("" if ci is None else f" [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]")


if __name__ == "__main__":
    main()
