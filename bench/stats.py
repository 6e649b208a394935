"""95% intervals of the bench scores, from the per-example outcomes each results.json cell stores.

What is computed (confidence `CONFIDENCE` = 0.95 everywhere), per score: the per-example data read from the cell;
the interval of the score (`ci`); the paired difference to another cell on the same examples (`vs_full`, ties):

- accuracy over right/wrong examples (needle, obqa/piqa/boolq, sst2/trec/agnews, and RULER tasks with ONE expected
  string: niah_single_*, niah_multikey): `example_correct` ("0"/"1" per example), needle's `answers[i]["correct"]`
  or RULER's `answers[i]["score"]`; Wilson score interval; Newcombe's paired interval.
- ICL label loyalty: `example_loyal`; Wilson; Newcombe paired.
- accuracy over fractional examples (RULER string match with several expected strings: niah_multivalue,
  niah_multiquery, vt, cwe, fwe): RULER's `answers[i]["score"]`; Wilson on the effective sample size
  (`wilson_of_means`, as for the RULER average over tasks); paired: MOVER from those limits
  (`paired_wilson_of_means`, Newcombe's construction).
- perplexity: `window_nll`, `window_tokens` (one entry per scored window); percentile bootstrap over windows; paired
  percentile bootstrap.

- Wilson (1927): the score interval of a binomial proportion; unlike the normal approximation it stays inside
  [0, 1] and is not empty at 0/n or n/n.
- Newcombe (1998, "Improved confidence intervals for the difference between binomial proportions based on paired
  data", Stat. Med. 17:2635, method 10): Wilson intervals of both proportions combined by square-and-add with the
  estimated correlation of the pairs (phi, set to 0 in Newcombe's small-sample zone 0 <= AD - BC <= n/2). On
  identical outcomes the difference is 0 and the interval is narrow but NOT zero-width (with n pairs and no
  discordant one, a small true difference is still possible); the percentile bootstrap would give [0, 0] there
  and is too narrow with few discordant pairs, which is why binary differences do not use it.
- Bootstrap: percentile interval over `RESAMPLES` resamples of the examples drawn WITH replacement (numpy PCG64
  seeded with `SEED`, so the same data always give the same interval). Paired: both cells are resampled with the
  same example indices. Fewer than `MIN_BOOTSTRAP` examples: no bootstrap interval
  (one window would give a zero-width interval, which is not an answer).
- Wilson on the effective sample size (`wilson_of_means`): the mean of scores in [0, 1] (fractional RULER
  samples) and the RULER average over tasks; a percentile bootstrap is [1, 1] there when every sample is right.
  Their paired differences (to full, ties of the RULER average): `paired_wilson_of_means`, Newcombe's method 10
  generalised (MOVER), not a paired bootstrap, for the reason above.
- Perplexity is bootstrapped over WINDOWS, not tokens: the tokens of one window share its text and, through the
  cache, every earlier eviction decision, so they are far from independent; resampling tokens makes the interval
  too narrow (SmolLM2-135M, full cache, 16 windows of 512 tokens: [23.8, 30.6] by window, [25.5, 28.9] by
  token). The statistic is the cell's own: exp(sum of NLL / sum of predicted tokens) over the resampled windows (a
  ratio estimator, not a mean of per-window perplexities).

Every interval is pointwise: no multiple-comparison correction across cells or strategies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

from kvcompress.registry import split_spec

CONFIDENCE = 0.95
RESAMPLES = 4000
SEED = 0
MIN_BOOTSTRAP = 2
_CHUNK = 500  # replicates drawn at a time (bounds memory to _CHUNK x n indices)


def z_value(confidence: float = CONFIDENCE) -> float:
    """The two-sided standard-normal quantile: 1.95996... for 0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


# ------------------------------------------------------------------------------------------------------------
# Binary outcomes: Wilson, Newcombe


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval (low, high) of the proportion `successes / n`; ValueError unless 0 <= successes <= n,
    n >= 1."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes!r}, n={n!r}")
    return _wilson_bounds(successes / n, n, z_value(confidence))


def _wilson_bounds(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson's score interval of a proportion `p` estimated from `n` (possibly effective, fractional) examples."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0 and 1 the bound is exactly 0 or 1; rounding must not move it past
    return (0.0 if p == 0 else max(0.0, centre - half), 1.0 if p == 1 else min(1.0, centre + half))


def wilson_of_means(groups: Sequence[Sequence[float]], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson interval (low, high) of the average over `groups` (tasks) of each group's mean score, every score in
    [0, 1] (right/wrong, or a fraction of expected strings found), on the effective sample size.

    The average p = mean_k(mean of group k) is a stratified estimate with variance v = sum_k var_k / (K^2 n_k)
    (var_k: group k's variance, ddof 0). Its effective sample size is p(1 - p) / v (Korn & Graubard 1998: n over the
    design effect), truncated at the weights' own effective size n_w = 1 / sum_k 1 / (K^2 n_k) (n_w = the number of
    examples when the groups are equally large; the truncation is Korn & Graubard's design effect >= 1, which makes
    the interval conservative, never narrower than a binomial one), and n_w when v = 0 or p is 0 or 1. Wilson's
    interval of p at that size is the form Franco, Little, Louis & Slud (2019, "Comparative study of confidence
    intervals for proportions in complex sample surveys") recommend. For one group of right/wrong outcomes it is
    exactly `wilson`; for equally large groups of them, `wilson` of the pooled count. Fractional scores in [0, 1]
    have variance at most p(1 - p), so the interval errs wide. Unlike a percentile bootstrap it is not [1, 1] when
    every example is right (30 of 30 right in two tasks: [0.940, 1]).
    """
    p, variance, n_weights = _stratified_mean(_unit_groups(groups))
    n_effective = n_weights if variance == 0 or p * (1 - p) == 0 else min(n_weights, p * (1 - p) / variance)
    return _wilson_bounds(p, n_effective, z_value(confidence))


def _unit_groups(groups: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """The groups as float arrays; ValueError unless one or more non-empty groups of scores in [0, 1]."""
    arrays = [np.asarray(group, dtype=float) for group in groups]
    if not arrays or any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("need one or more non-empty groups of scores")
    if any(((a < 0) | (a > 1) | np.isnan(a)).any() for a in arrays):
        raise ValueError("scores must lie in [0, 1]")
    return arrays


def _stratified_mean(arrays: list[np.ndarray]) -> tuple[float, float, float]:
    """(p, v, n_w) of the mean over K groups of each group's mean: p clipped to [0, 1], its variance
    v = sum_k var_k / (K^2 n_k) (ddof 0) and the weights' effective size n_w = 1 / sum_k 1 / (K^2 n_k)."""
    k = len(arrays)
    p = min(1.0, max(0.0, float(np.mean([a.mean() for a in arrays]))))
    variance = sum(float(a.var()) / (k * k * a.size) for a in arrays)
    return p, variance, 1.0 / sum(1.0 / (k * k * a.size) for a in arrays)


def newcombe_paired(first: Sequence[int], second: Sequence[int],
                    confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(difference, low, high) of mean(first) - mean(second) for paired binary outcomes (0/1 per example, the same
    examples in the same order): Newcombe's method 10 (see the module docstring)."""
    if len(first) != len(second) or not first:
        raise ValueError(f"need two non-empty outcome lists of equal length, got {len(first)} and {len(second)}")
    n = len(first)
    both = sum(1 for a, b in zip(first, second) if a and b)
    only_first = sum(1 for a, b in zip(first, second) if a and not b)
    only_second = sum(1 for a, b in zip(first, second) if b and not a)
    neither = n - both - only_first - only_second
    s1, s2 = both + only_first, both + only_second
    p1, p2 = s1 / n, s2 / n
    l1, u1 = wilson(s1, n, confidence)
    l2, u2 = wilson(s2, n, confidence)
    margins = s1 * (n - s1) * s2 * (n - s2)
    phi = 0.0
    if margins:
        cross = both * neither - only_first * only_second
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    return _mover(p1, l1, u1, p2, l2, u2, phi)


def paired_wilson_of_means(first: Sequence[Sequence[float]], second: Sequence[Sequence[float]],
                           confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(difference, low, high) of two averages of group means, first minus second, scores in [0, 1], the groups
    paired example by example (the same tasks and samples in the same order).

    MOVER (Zou & Donner 2008, the construction of Newcombe's method 10): each average's `wilson_of_means` limits,
    combined by square-and-add with the correlation phi of the two averages, phi = cov / sqrt(v1 v2), where v and
    cov sum each group's (co)variance (ddof 0) over K^2 n_k. Newcombe's small-sample rule (AD - BC lowered by n/2, 0
    when it falls in [0, n/2]) is applied to cov at the weights' size n_w (`wilson_of_means`): cov lowered by
    1 / (2 n_w^2). For one group of right/wrong outcomes this is exactly `newcombe_paired`, and for equal groups
    equally distributed, Newcombe's interval of the pooled outcomes; on identical scores the difference is 0 and the
    interval is narrow but not empty, where a paired bootstrap gives [0, 0] (and is too narrow with few discordant
    pairs)."""
    if len(first) != len(second) or any(len(a) != len(b) for a, b in zip(first, second)):
        raise ValueError("paired groups need the same examples in each group")
    l1, u1 = wilson_of_means(first, confidence)
    l2, u2 = wilson_of_means(second, confidence)
    firsts, seconds = _unit_groups(first), _unit_groups(second)
    (p1, v1, n_weights), (p2, v2, _) = _stratified_mean(firsts), _stratified_mean(seconds)
    k = len(firsts)
    cov = sum(float(np.mean((a - a.mean()) * (b - b.mean()))) / (k * k * a.size) for a, b in zip(firsts, seconds))
    rule = 1 / (2 * n_weights * n_weights)  # Newcombe's n/2 on AD - BC, at the weights' size
    cov = cov - rule if cov > rule else min(cov, 0.0)
    phi = cov / math.sqrt(v1 * v2) if v1 * v2 > 0 else 0.0
    return _mover(p1, l1, u1, p2, l2, u2, phi)


def _mover(p1: float, l1: float, u1: float, p2: float, l2: float, u2: float,
           phi: float) -> tuple[float, float, float]:
    """(p1 - p2, low, high) from each estimate's limits and their correlation (square-and-add)."""
    d1, d2 = p1 - l1, u2 - p2
    e1, e2 = p2 - l2, u1 - p1
    low = p1 - p2 - math.sqrt(max(0.0, d1 * d1 - 2 * phi * d1 * d2 + d2 * d2))
    high = p1 - p2 + math.sqrt(max(0.0, e1 * e1 - 2 * phi * e1 * e2 + e2 * e2))
    return p1 - p2, max(-1.0, low), min(1.0, high)


# ------------------------------------------------------------------------------------------------------------
# Bootstrap


def resample_indices(rng: np.random.Generator, replicates: int, n: int) -> np.ndarray:
    """(replicates, n) example indices drawn uniformly WITH replacement."""
    return rng.integers(0, n, size=(replicates, n))


Statistic = Callable[[list[np.ndarray]], np.ndarray]  # per stratum (R, n_k, columns) -> (R,)


def bootstrap(strata: Sequence[np.ndarray], statistic: Statistic, *, resamples: int = RESAMPLES,
              seed: int = SEED, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval (low, high) of `statistic` over resampled examples.

    Args:
        strata: one (n_k, columns) array per stratum; rows are examples (paired data: one column per cell, the
            same example on one row), resampled within their stratum.
        statistic: maps the resampled strata, [(R, n_k, columns)], to one value per replicate (R,); it must
            give the point estimate when applied to the original data (R = 1).
    """
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, resamples, _CHUNK):
        count = min(_CHUNK, resamples - start)
        values.append(statistic([stratum[resample_indices(rng, count, len(stratum))] for stratum in strata]))
    replicates = np.concatenate(values)
    alpha = 1 - confidence
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def perplexity_statistic(strata: list[np.ndarray]) -> np.ndarray:
    """exp(sum of column 0 (NLL) / sum of column 1 (tokens)) of the one stratum: (R, n, 2) -> (R,)."""
    windows = strata[0]
    return np.exp(windows[..., 0].sum(-1) / windows[..., 1].sum(-1))


def perplexity_interval(window_nll: Sequence[float], window_tokens: Sequence[int],
                        **options) -> tuple[float, float] | None:
    """Bootstrap interval of exp(sum NLL / sum tokens) over resampled windows; None with too few windows."""
    if len(window_nll) < MIN_BOOTSTRAP:
        return None
    return bootstrap([np.column_stack([window_nll, window_tokens]).astype(float)], perplexity_statistic, **options)


def paired_bootstrap(first: np.ndarray, second: np.ndarray, statistic: Statistic,
                     **options) -> tuple[float, float, float] | None:
    """(difference, low, high) of statistic(first) - statistic(second), both (n, columns) on the same examples,
    resampled with the same indices; None with fewer than MIN_BOOTSTRAP examples."""
    if len(first) != len(second):
        raise ValueError(f"paired data need the same examples, got {len(first)} and {len(second)} rows")
    if len(first) < MIN_BOOTSTRAP:
        return None
    width = first.shape[1]

    def difference(strata):
        both = strata[0]
        return statistic([both[..., :width]]) - statistic([both[..., width:]])

    joined = np.concatenate([first, second], axis=1).astype(float)
    point = float(difference([joined[None]])[0])
    return (point, *bootstrap([joined], difference, **options))


# ------------------------------------------------------------------------------------------------------------
# Cells of results.json


def flags(values) -> str:
    """Binary per-example outcomes as a compact string: "1" for true, "0" for false, one character each."""
    return "".join("1" if value else "0" for value in values)


@dataclass(frozen=True)
class Examples:
    """One cell's per-example data for one metric: `kind` is "binary" (values 0/1), "scores" (floats, averaged)
    or "windows" (rows of (NLL, tokens)); `values` is a list of numbers or of pairs."""

    kind: str
    values: list


def score_metric(cell: dict) -> str | None:
    """The cell's headline score: "perplexity", "accuracy", or None (e.g. the speed task)."""
    if cell.get("perplexity") is not None:
        return "perplexity"
    if cell.get("accuracy") is not None:
        return "accuracy"
    return None


def examples(cell: dict, metric: str) -> Examples | None:
    """Per-example data of `metric` in `cell`, or None when the cell has none (a cell written before they were
    stored, or a count that does not match `n_examples`)."""
    found = None
    if metric == "perplexity" and cell.get("window_nll") is not None:
        found = Examples("windows", [list(p) for p in zip(cell["window_nll"], cell["window_tokens"])])
    elif metric == "accuracy" and cell.get("example_correct") is not None:
        found = Examples("binary", [int(c) for c in cell["example_correct"]])
    elif metric == "loyalty" and cell.get("example_loyal") is not None:
        found = Examples("binary", [int(c) for c in cell["example_loyal"]])
    elif metric == "accuracy" and cell.get("answers"):
        answers = cell["answers"]
        if all("correct" in a for a in answers):  # needle
            found = Examples("binary", [int(bool(a["correct"])) for a in answers])
        elif all("score" in a for a in answers):  # RULER string match
            if all(len(a.get("expected", ())) == 1 for a in answers):  # one expected string: right or wrong
                found = Examples("binary", [int(a["score"] == 1) for a in answers])
            else:
                found = Examples("scores", [float(a["score"]) for a in answers])
    if found is None or (cell.get("n_examples") is not None and len(found.values) != cell["n_examples"]):
        return None
    return found


def interval(data: Examples, confidence: float = CONFIDENCE) -> dict | None:
    """{"low", "high", "method", "n", "confidence"} of the score the examples give, or None (too few)."""
    n = len(data.values)
    if n == 0:
        return None
    if data.kind == "binary":
        low, high = wilson(sum(data.values), n, confidence)
        method = "wilson"
    elif data.kind == "scores":
        low, high = wilson_of_means([data.values], confidence)
        method = "wilson_effective_n"
    else:
        bounds = perplexity_interval(*zip(*data.values), confidence=confidence)
        if bounds is None:
            return None
        (low, high), method = bounds, "bootstrap_windows"
    return {"low": low, "high": high, "method": method, "n": n, "confidence": confidence}


def difference(first: Examples, second: Examples, confidence: float = CONFIDENCE) -> dict | None:
    """Paired difference first - second (same examples, same order): {"difference", "low", "high", "method", "n",
    "confidence"}, or None when they cannot be paired (different kinds or counts) or are too few."""
    if first.kind != second.kind or len(first.values) != len(second.values) or not first.values:
        return None
    n = len(first.values)
    if first.kind == "binary":
        point, low, high = newcombe_paired(first.values, second.values, confidence)
        method = "newcombe_paired"
    elif first.kind == "scores":
        point, low, high = paired_wilson_of_means([first.values], [second.values], confidence)
        method = "mover_wilson"
    else:
        found = paired_bootstrap(np.asarray(first.values, dtype=float), np.asarray(second.values, dtype=float),
                                 perplexity_statistic, confidence=confidence)
        if found is None:
            return None
        (point, low, high), method = found, "paired_bootstrap"
    return {"difference": point, "low": low, "high": high, "method": method, "n": n, "confidence": confidence}


def contains_zero(diff: dict) -> bool:
    """True when a difference's interval holds 0 (the two cells are not distinguishable at its confidence)."""
    return diff["low"] <= 0.0 <= diff["high"]


SCORED_METRICS = ("accuracy", "loyalty", "perplexity")


def _model_of(cell: dict) -> str | None:
    """The model a cell ran on: its strategy spec's `model=ALIAS`, else the run's model (`cell["model"]`)."""
    return split_spec(cell.get("strategy", ""))[1].get("model") or cell.get("model")


def annotate(results: dict) -> dict:
    """Add to every "ok" cell with per-example data `ci` {metric: interval(...)} and, when the run has the task's
    `full` cell (on the same model: `full:model=ALIAS` for a row on ALIAS), `vs_full` {metric: difference(cell,
    full)}; cells without data get neither. Deterministic
    (fixed bootstrap seed) and idempotent; returns `results`."""
    cells = results["cells"]
    fulls = {}  # (task, model) -> the full cache's cell: a row on `model=ALIAS` is compared with `full` on ALIAS
    for cell in cells.values():
        name, options = split_spec(cell.get("strategy", ""))
        if name == "full" and set(options) <= {"model"} and cell.get("budget") == "-":
            fulls.setdefault((cell["task"], _model_of(cell)), cell)
    for cell in cells.values():
        cell.pop("ci", None)
        cell.pop("vs_full", None)
        if cell.get("status") != "ok":
            continue
        on_other_model = "model" in split_spec(cell["strategy"])[1]  # never compared with another model's full cache
        full = fulls.get((cell["task"], _model_of(cell)), None if on_other_model else cells.get(f"{cell['task']}|full|-"))
        ci, vs_full = {}, {}
        for metric in SCORED_METRICS:
            data = examples(cell, metric)
            if data is None:
                continue
            found = interval(data)
            if found is not None:
                ci[metric] = found
            reference = examples(full, metric) if full is not None and full is not cell \
                and full.get("status") == "ok" else None
            if reference is not None:
                diff = difference(data, reference)
                if diff is not None:
                    vs_full[metric] = diff
        if ci:
            cell["ci"] = ci
        if vs_full:
            cell["vs_full"] = vs_full
    return results


def with_interval(value: float, interval: dict | None, spec: str) -> str:
    """`value` formatted with `spec` and, when there is one, its interval: "0.750 [0.551, 0.880]"."""
    text = format(value, spec)
    if interval:
        text += f" [{format(interval['low'], spec)}, {format(interval['high'], spec)}]"
    return text


def difference_text(diff: dict | None, spec: str) -> str:
    """A paired difference and its interval, signed: "-0.083 [-0.210, +0.042]"; "-" for none."""
    if not diff:
        return "-"
    sign = "+" + spec
    return f"{format(diff['difference'], sign)} [{format(diff['low'], sign)}, {format(diff['high'], sign)}]"
