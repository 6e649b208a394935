"""RULER summary and leaderboard view of a results dict: each RULER task and their average per (context length,
query mode, strategy, budget), the average against the kept fraction per strategy (table and plot).

Used by the CLI whenever a run holds `ruler_*` cells (`python -m kvcompress.bench --preset leaderboard`); works on
any registered strategy, since it reads only the cells. The average is the plain mean over the RULER tasks that
every row of the same context length has (all of them in a finished run; in a partial or failed run the others are
shown but not averaged, so strategies are compared on the same tasks); the `tasks` column says how many.
"""

from __future__ import annotations

import pathlib
import statistics

from .ruler import KINDS

_SHORT = {"niah_single_number": "s-num", "niah_single_word": "s-word", "niah_single_uuid": "s-uuid",
          "niah_multikey": "mkey", "niah_multivalue": "mval", "niah_multiquery": "mquery", "vt": "vt", "cwe": "cwe",
          "fwe": "fwe"}


def ruler_rows(results: dict) -> list[dict]:
    """One dict per (length, query, strategy, budget) with RULER cells: {length, query, strategy, budget,
    kept_fraction (mean over its tasks), scores {kind: score in [0, 1]}, average, n (samples per task)}."""
    groups: dict[tuple, dict] = {}
    for cell in results["cells"].values():
        if cell.get("status") != "ok" or not str(cell.get("task_name", "")).startswith("ruler_"):
            continue
        key = (cell.get("context_length"), cell.get("query") or "after", cell["strategy"], cell["budget"])
        row = groups.setdefault(key, {"length": key[0], "query": key[1], "strategy": key[2], "budget": key[3],
                                      "scores": {}, "kept": [], "n": cell.get("n_examples")})
        row["scores"][cell["task_name"][len("ruler_"):]] = cell["accuracy"]
        row["kept"].append(cell["kept_fraction"])
    common: dict[object, set] = {}  # per length: the tasks every row has (a partial run averages like with like)
    for row in groups.values():
        common[row["length"]] = common.get(row["length"], set(row["scores"])) & set(row["scores"])
    rows = []
    for row in groups.values():
        row["kept_fraction"] = statistics.fmean(row.pop("kept"))
        row["averaged"] = sorted(common[row["length"]])
        row["average"] = statistics.fmean(row["scores"][k] for k in row["averaged"]) if row["averaged"] else None
        rows.append(row)
    return sorted(rows, key=lambda r: (r["length"] or 0, r["query"] != "after", r["strategy"], r["kept_fraction"]))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def ruler_table(results: dict) -> str:
    """Markdown: every RULER task's score (x100) and the average, per length, query mode, strategy and budget."""
    kinds = [k for k in KINDS if any(k in r["scores"] for r in ruler_rows(results))]
    lines = ["| length | query | strategy | budget | kept frac | " + " | ".join(_SHORT[k] for k in kinds)
             + " | average | tasks | n |", "|---:|---|---|---|---:|" + "---:|" * (len(kinds) + 3)]
    for r in ruler_rows(results):
        cells = " | ".join("-" if k not in r["scores"] else f"{100 * r['scores'][k]:.1f}" for k in kinds)
        lines.append(f"| {r['length']} | {r['query']} | {r['strategy']} | {r['budget']} | {r['kept_fraction']:.3f} | "
                     f"{cells} | **{_pct(r['average'])}** | {len(r['averaged'])} | {r['n']} |")
    return "\n".join(lines)


def leaderboard_table(results: dict) -> str:
    """Markdown: RULER average (x100) per strategy and budget, one column per query mode, per context length."""
    by_key: dict[tuple, dict] = {}
    for r in ruler_rows(results):
        entry = by_key.setdefault((r["length"], r["strategy"], r["budget"]), {"kept": []})
        if r["average"] is not None:
            entry[r["query"]] = r["average"]
        entry["kept"].append(r["kept_fraction"])
    lines = ["| length | strategy | budget | kept frac | RULER avg, query after | RULER avg, query before |",
             "|---:|---|---|---:|---:|---:|"]
    for (length, strategy, budget), e in sorted(by_key.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1],
                                                                                statistics.fmean(kv[1]["kept"]))):
        after, before = (("-" if q not in e else f"{100 * e[q]:.1f}") for q in ("after", "before"))
        lines.append(f"| {length} | {strategy} | {budget} | {statistics.fmean(e['kept']):.3f} | {after} | {before} |")
    return "\n".join(lines)


def plot_leaderboard(results: dict, path: pathlib.Path) -> pathlib.Path | None:
    """One PNG: RULER average vs kept fraction, a colour per strategy, solid = query after, dashed = before.
    Returns the path, or None when there is nothing to plot or matplotlib is missing."""
    rows = ruler_rows(results)
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    strategies = sorted({r["strategy"] for r in rows})
    colors = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy in strategies:
        for query, style in (("after", "-"), ("before", "--")):
            points = sorted((r["kept_fraction"], 100 * r["average"]) for r in rows
                            if r["strategy"] == strategy and r["query"] == query and r["average"] is not None)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o", color=colors[strategy], label=f"{strategy} ({query})")
    lengths = sorted({r["length"] for r in rows})
    n_tasks = min(len(r["averaged"]) for r in rows)
    ax.set_title(f"RULER average ({n_tasks} tasks) vs KV kept\n{results['environment'].get('model')}, "
                 f"{'/'.join(map(str, lengths))} tokens", fontsize=10)
    ax.set_xlabel("KV kept fraction")
    ax.set_ylabel("RULER average score (%)")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
