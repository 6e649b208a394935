"""Leaderboard views of a results dict: which strategies are statistically tied at each budget (every scored task
and the RULER average), and the RULER summary: each RULER task and their average per (context length, query mode,
strategy, budget), the average against the kept fraction per strategy (table and plot, with 95% intervals).

Reads only the cells, so it works on any registered strategy. The RULER average is the plain mean over the RULER
tasks that every row of the same context length has (all of them in a finished run; in a partial or failed run the
others are shown but not averaged, so strategies are compared on the same tasks); the `tasks` column says how many.
Its interval is Wilson's on the effective sample size of the stratified average (`stats.wilson_of_means`).

Tied (`ties`): at one budget of one task, the best strategy is the one with the best score (highest accuracy,
lowest perplexity); another strategy is TIED with it when the 95% interval of their paired difference on the same
examples (`stats.difference`: Newcombe for right/wrong outcomes, its MOVER generalisation for fractional scores
and the RULER average, `stats.paired_wilson_of_means`; a paired bootstrap for perplexity) contains 0, and BELOW it
otherwise. Pointwise 95%, no multiple-comparison correction: with many strategies, some "below" verdicts near the
boundary are expected by chance. Budget-free strategies (budget "-": full, anchor, ...) keep what they keep and are
not ranked.
"""

from __future__ import annotations

import pathlib
import statistics

from . import stats
from .plots import colors, dodge, error_bars, strategy_label
from .ruler import KINDS

_SHORT = {"niah_single_number": "s-num", "niah_single_word": "s-word", "niah_single_uuid": "s-uuid",
          "niah_multikey": "mkey", "niah_multivalue": "mval", "niah_multiquery": "mquery", "vt": "vt", "cwe": "cwe",
          "fwe": "fwe"}


def ruler_rows(results: dict) -> list[dict]:
    """One dict per (length, query, strategy, budget) with RULER cells: {length, query, strategy (as tables name it,
    `plots.strategy_label`: an untrained anchor rule is marked), budget,
    kept_fraction (mean over its tasks), scores {kind: score in [0, 1]}, examples {kind: per-sample scores} (kinds
    whose cell has them), average, ci (interval of the average: {"low", "high"} or None), n (samples per task)}."""
    groups: dict[tuple, dict] = {}
    for cell in results["cells"].values():
        if cell.get("status") != "ok" or not str(cell.get("task_name", "")).startswith("ruler_"):
            continue
        key = (cell.get("context_length"), cell.get("query") or "after", strategy_label(cell), cell["budget"])
        row = groups.setdefault(key, {"length": key[0], "query": key[1], "strategy": key[2], "budget": key[3],
                                      "scores": {}, "examples": {}, "kept": [], "n": cell.get("n_examples")})
        kind = cell["task_name"][len("ruler_"):]
        row["scores"][kind] = cell["accuracy"]
        data = stats.examples(cell, "accuracy")
        if data is not None:
            row["examples"][kind] = data.values
        row["kept"].append(cell["kept_fraction"])
    common: dict[object, set] = {}  # per length: the tasks every row has (a partial run averages like with like)
    for row in groups.values():
        common[row["length"]] = common.get(row["length"], set(row["scores"])) & set(row["scores"])
    rows = []
    for row in groups.values():
        row["kept_fraction"] = statistics.fmean(row.pop("kept"))
        row["averaged"] = sorted(common[row["length"]])
        row["average"] = statistics.fmean(row["scores"][k] for k in row["averaged"]) if row["averaged"] else None
        groups_of_scores = _averaged_examples(row)
        bounds = stats.wilson_of_means(groups_of_scores) if groups_of_scores else None
        row["ci"] = None if bounds is None else {"low": bounds[0], "high": bounds[1]}
        rows.append(row)
    return sorted(rows, key=lambda r: (r["length"] or 0, r["query"] != "after", r["strategy"], r["kept_fraction"]))


def _averaged_examples(row: dict) -> list[list[float]] | None:
    """Per averaged task, the row's per-sample scores; None unless every averaged task has them."""
    if not row["averaged"] or any(k not in row["examples"] for k in row["averaged"]):
        return None
    return [row["examples"][k] for k in row["averaged"]]


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


def _pct_interval(value: float | None, ci: dict | None) -> str:
    if value is None:
        return "-"
    return _pct(value) + ("" if ci is None else f" [{_pct(ci['low'])}, {_pct(ci['high'])}]")


def leaderboard_table(results: dict) -> str:
    """Markdown: RULER average (x100) with its 95% interval per strategy and budget, one column per query mode,
    per context length."""
    by_key: dict[tuple, dict] = {}
    for r in ruler_rows(results):
        entry = by_key.setdefault((r["length"], r["strategy"], r["budget"]), {"kept": []})
        if r["average"] is not None:
            entry[r["query"]] = _pct_interval(r["average"], r["ci"])
        entry["kept"].append(r["kept_fraction"])
    lines = ["| length | strategy | budget | kept frac | RULER avg, query after [95% CI] | "
             "RULER avg, query before [95% CI] |", "|---:|---|---|---:|---:|---:|"]
    for (length, strategy, budget), e in sorted(by_key.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1],
                                                                                statistics.fmean(kv[1]["kept"]))):
        after, before = (e.get(q, "-") for q in ("after", "before"))
        lines.append(f"| {length} | {strategy} | {budget} | {statistics.fmean(e['kept']):.3f} | {after} | {before} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Ties at a budget


def _rank_group(task: str, budget: str, metric: str, entries: list[tuple[str, float, object]], pair) -> dict:
    """entries: (strategy, score, per-example data); pair(a, b) -> paired difference a - b or None. The best score
    first (perplexity: the lowest), ties of the score broken by name."""
    sign = 1 if metric == "perplexity" else -1
    entries = sorted(entries, key=lambda e: (sign * e[1], e[0]))
    best_name, best_score, best_data = entries[0]
    tied, below, unpaired = [], [], []
    for name, score, data in entries[1:]:
        diff = pair(data, best_data)
        verdict = {"strategy": name, "score": score, "difference": diff}
        (unpaired if diff is None else tied if stats.contains_zero(diff) else below).append(verdict)
    return {"task": task, "budget": budget, "metric": metric, "best": best_name, "best_score": best_score,
            "tied": tied, "below": below, "not_compared": unpaired}


def ties(results: dict) -> list[dict]:
    """Per (task, budget) with two or more ranked strategies: {"task", "budget", "metric", "best", "best_score",
    "tied", "below", "not_compared"}; each verdict is {"strategy", "score", "difference"} (the paired difference
    to the best with its 95% interval; None when the cells cannot be paired: no per-example data, different
    examples, or too few for an interval, e.g. one perplexity window). The RULER average is ranked as task
    "ruler@<L> average" (query before: "...:before average"). See the module docstring for the definition of tied."""
    groups: dict[tuple[str, str, str], list] = {}
    for cell in results["cells"].values():
        metric = stats.score_metric(cell)
        if cell.get("status") != "ok" or metric is None or cell.get("budget") == "-":
            continue
        groups.setdefault((cell["task"], cell["budget"], metric), []).append(
            (cell["strategy"], cell[metric], stats.examples(cell, metric)))
    out = []
    for (task, budget, metric), entries in groups.items():
        if len(entries) > 1:
            out.append(_rank_group(task, budget, metric, entries,
                                   lambda a, b: None if a is None or b is None else stats.difference(a, b)))
    ruler: dict[tuple, list] = {}
    for row in ruler_rows(results):
        if row["average"] is not None and row["budget"] != "-":
            ruler.setdefault((row["length"], row["query"], row["budget"]), []).append(
                (row["strategy"], row["average"], _averaged_examples(row)))

    def pair_average(a, b):
        if a is None or b is None or [len(g) for g in a] != [len(g) for g in b]:
            return None
        point, low, high = stats.paired_wilson_of_means(a, b)
        return {"difference": point, "low": low, "high": high, "method": "mover_wilson",
                "n": sum(len(g) for g in a), "confidence": stats.CONFIDENCE}

    for (length, query, budget), entries in ruler.items():
        if len(entries) > 1:
            label = f"ruler@{length}" + ("" if query == "after" else f":{query}") + " average"
            out.append(_rank_group(label, budget, "accuracy", entries, pair_average))
    return out


TIES_NOTE = ("tied: the 95% interval of the paired difference to the best strategy at that budget, on the same "
             "examples, contains 0 (Newcombe for right/wrong outcomes and, generalised, for RULER scores and their "
             "average; a paired bootstrap for perplexity; "
             "pointwise, no multiple-comparison correction). below: the interval excludes 0. Budget-free "
             "strategies (budget -) are not ranked.")


def ties_table(results: dict) -> str:
    """Markdown: per task and budget, the best strategy and which others are tied with it or below it (each with
    its paired difference to the best and the 95% interval); "" when nothing is ranked."""
    groups = ties(results)
    if not groups:
        return ""
    lines = ["| task | budget | best | tied with the best: difference [95% CI] | below the best |",
             "|---|---|---|---|---|"]
    for g in groups:
        spec = ".2f" if g["metric"] == "perplexity" else ".3f"

        def listing(verdicts):
            return ", ".join(f"{v['strategy']} {stats.difference_text(v['difference'], spec)}"
                             for v in verdicts) or "-"

        below = listing(g["below"])
        if g["not_compared"]:
            names = ", ".join(v["strategy"] for v in g["not_compared"])
            note = f"not compared (no per-example data, or too few examples): {names}"
            below = note if below == "-" else f"{below}; {note}"
        lines.append(f"| {g['task']} | {g['budget']} | {g['best']} {format(g['best_score'], spec)} | "
                     f"{listing(g['tied'])} | {below} |")
    lines += ["", TIES_NOTE]
    return "\n".join(lines)


def plot_leaderboard(results: dict, path: pathlib.Path) -> pathlib.Path | None:
    """One PNG: RULER average vs kept fraction with 95% error bars, one panel per query mode (after, before), a
    colour per strategy (points moved sideways by `plots.dodge` so equal budgets do not hide each other's bars).
    Returns the path, or None when there is nothing to plot or matplotlib is missing."""
    rows = [r for r in ruler_rows(results) if r["average"] is not None]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    strategies = sorted({r["strategy"] for r in rows})
    palette = colors(rows)
    queries = [q for q in ("after", "before") if any(r["query"] == q for r in rows)]
    fig, axes = plt.subplots(1, len(queries), figsize=(4.6 * len(queries), 3.8), squeeze=False, sharey=True)
    for ax, query in zip(axes.flat, queries):
        for strategy in strategies:
            series = sorted((r for r in rows if r["strategy"] == strategy and r["query"] == query),
                            key=lambda r: r["kept_fraction"])
            if not series:
                continue
            shift = dodge(strategies.index(strategy), len(strategies))
            bars = error_bars([{"score": 100 * r["average"],
                                "low": None if r["ci"] is None else 100 * r["ci"]["low"],
                                "high": None if r["ci"] is None else 100 * r["ci"]["high"]} for r in series])
            ax.errorbar([r["kept_fraction"] + shift for r in series], [100 * r["average"] for r in series],
                        yerr=bars, marker="o", capsize=2, color=palette[strategy], label=strategy)
        ax.set_title(f"asked {query}" + (" the compression" if query == "after" else " it (query in the prompt)"),
                     fontsize=10)
        ax.set_xlabel("KV kept fraction")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("RULER average score (%)")
    lengths = sorted({r["length"] for r in rows})
    n_tasks = min(len(r["averaged"]) for r in rows)
    samples = sorted({r["n"] for r in rows if r["n"] is not None})
    per_task = f", n = {samples[0]} per task" if len(samples) == 1 else ""
    fig.suptitle(f"RULER average over {n_tasks} tasks vs KV kept, 95% intervals\n"
                 f"{results['environment'].get('model')}, {'/'.join(map(str, lengths))} tokens{per_task}", fontsize=10)
    fig.tight_layout()
    handles = [plt.Line2D([], [], color=palette[s], marker="o", label=s) for s in strategies]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
