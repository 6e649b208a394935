"""PNG plots of a results dict: score vs KV bytes (relative to a full cache) per task with 95% error bars (each
strategy's points moved sideways by a fixed small offset, `DODGE`, so strategies at the same budget do not hide
each other's bars), decode tokens/s vs context length."""

from __future__ import annotations

import itertools
import pathlib

from . import stats


def _ok(results: dict) -> list[dict]:
    return [c for c in results["cells"].values() if c.get("status") == "ok"]


def strategy_label(cell: dict) -> str:
    """The strategy as tables and plots name it: the AnLLM rule on a model never anchor-trained (`anchor` on the base
    model; cells record `anchor_trained`) is marked "(untrained)", beside the trained rows
    (`anchor:model=smollm2-135m-anchor-ac`)."""
    return f"{cell['strategy']} (untrained)" if cell.get("anchor_trained") is False else cell["strategy"]


def _series_label(cell: dict) -> str:
    label = strategy_label(cell)
    return label if cell["budget"] == "-" else f"{label} {cell['budget']}"


def colors(cells: list[dict]) -> dict[str, str]:
    """One colour per strategy (`cell["strategy"]`), the same in every plot of a run (strategies in sorted order)."""
    strategies = sorted({c["strategy"] for c in cells})
    if len(strategies) <= 10:
        return {s: f"C{i}" for i, s in enumerate(strategies)}
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    return {s: palette(i % 20) for i, s in enumerate(strategies)}


DODGE = 0.03  # strategies' points spread over +-DODGE/2 of the x axis so equal budgets do not hide error bars


def dodge(index: int, count: int) -> float:
    """The x offset of the `index`-th of `count` strategies: spread evenly over [-DODGE/2, +DODGE/2]."""
    return DODGE * (index - (count - 1) / 2) / max(1, count - 1)


def score_series(results: dict) -> dict[str, dict[str, list[dict]]]:
    """What the score plot draws: {task: {strategy: points sorted by x}}, each point {"x" (KV bytes held relative to
    a full cache, `kv_bytes_fraction`: the one axis on which evicted and quantized caches compare; the kept fraction
    for cells without it), "kept_fraction", "score", "low", "high" (its 95% interval; None when the cell has none),
    "metric", "budget"}."""
    out: dict[str, dict[str, list[dict]]] = {}
    for cell in _ok(results):
        metric = stats.score_metric(cell)
        if metric is None or cell.get("kept_fraction") is None:
            continue
        interval = cell.get("ci", {}).get(metric) or {}
        out.setdefault(cell["task"], {}).setdefault(cell["strategy"], []).append({
            "x": cell.get("kv_bytes_fraction", cell["kept_fraction"]), "kept_fraction": cell["kept_fraction"],
            "score": cell[metric], "metric": metric, "budget": cell["budget"],
            "low": interval.get("low"), "high": interval.get("high")})
    for by_strategy in out.values():
        for strategy in by_strategy:
            by_strategy[strategy].sort(key=lambda p: p["x"])
    return {task: dict(sorted(by_strategy.items())) for task, by_strategy in out.items()}


def error_bars(points: list[dict]) -> list[list[float]]:
    """matplotlib's yerr (2, points): distances from each score to its interval's bounds (0 where none)."""
    return [[0.0 if p["low"] is None else max(0.0, p["score"] - p["low"]) for p in points],
            [0.0 if p["high"] is None else max(0.0, p["high"] - p["score"]) for p in points]]


def plot_all(results: dict, out: pathlib.Path) -> list[pathlib.Path]:
    """Write the plots that the results allow; returns their paths (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    cells = _ok(results)
    palette = colors(cells)

    scores = score_series(results)
    if scores:
        tasks = list(scores)
        cols = min(3, len(tasks))
        rows = -(-len(tasks) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        strategies = sorted({s for by_strategy in scores.values() for s in by_strategy})
        for ax, task in zip(axes.flat, tasks):
            for strategy, points in scores[task].items():
                shift = dodge(strategies.index(strategy), len(strategies))
                ax.errorbar([p["x"] + shift for p in points], [p["score"] for p in points],
                            yerr=error_bars(points), marker="o", capsize=2, color=palette[strategy], label=strategy)
            metric = next(iter(scores[task].values()))[0]["metric"]
            ax.set_title(task)
            ax.set_xlabel("KV bytes / full cache")
            ax.set_ylabel(metric + (" (lower is better)" if metric == "perplexity" else ""))
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
        handles = [plt.Line2D([], [], color=palette[s], marker="o", label=s) for s in strategies]
        fig.suptitle(f"score vs KV kept, 95% intervals ({results['environment'].get('model')})")
        fig.tight_layout()
        # beside the panels, not over them: the figure grows to hold it (bbox_inches="tight")
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, ncol=1)
        path = out / "accuracy_vs_kv_kept.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    speed = [c for c in cells if c.get("task_name") == "speed" and c.get("decode_tokens_per_s") is not None]
    if speed:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for strategy in sorted({c["strategy"] for c in speed}):  # colour = strategy, line style = budget
            budgets = sorted({c["budget"] for c in speed if c["strategy"] == strategy})
            for style, budget in zip(itertools.cycle(["-", "--", ":", "-."]), budgets):
                series = [c for c in speed if c["strategy"] == strategy and c["budget"] == budget]
                xs, ys = zip(*sorted((c["context_tokens"], c["decode_tokens_per_s"]) for c in series))
                ax.plot(xs, ys, marker="o", label=_series_label(series[0]), color=palette[strategy], linestyle=style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title(f"decode speed ({results['environment'].get('device')})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "decode_speed_vs_context.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
