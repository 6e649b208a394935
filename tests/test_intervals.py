"""The interval code of the bench (kvcompress.bench.stats) against known values, with planted-bug twins."""

import math
import random

import numpy as np
import pytest

from kvcompress.bench import stats

# Wilson 95% intervals: (successes, n, low, high). 81/263, 15/148, 0/20, 1/29, 29/29: the examples of Newcombe
# (1998), "Two-sided confidence intervals for the single proportion: comparison of seven methods", Stat. Med.
# 17:857, method 3 (score, no continuity correction); 0/10 and 10/10: the closed forms z^2 / (n + z^2) and
# n / (n + z^2).
WILSON_KNOWN = [
    (81, 263, 0.2553, 0.3662),
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (1, 29, 0.0061, 0.1718),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (29, 29, 0.8830, 1.0),
]


def wilson_mismatches(interval) -> list:
    """The known cases where `interval(successes, n)` is off by more than 1e-4 (rounding of the tables)."""
    wrong = []
    for successes, n, low, high in WILSON_KNOWN:
        got = interval(successes, n)
        if abs(got[0] - low) > 1e-4 or abs(got[1] - high) > 1e-4:
            wrong.append((successes, n, got))
    return wrong


def test_wilson_matches_textbook_values():
    assert wilson_mismatches(stats.wilson) == []


def wald(successes, n):
    """Planted bug: the normal approximation p +- z sqrt(p(1-p)/n) (zero width at 0/n and n/n)."""
    p = successes / n
    half = stats.z_value() * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


def clopper_pearson(successes, n):
    """Planted bug: the 'exact' Clopper-Pearson interval (wider than Wilson), from beta quantiles."""
    beta = pytest.importorskip("scipy.stats").beta
    low = 0.0 if successes == 0 else beta.ppf(0.025, successes, n - successes + 1)
    high = 1.0 if successes == n else beta.ppf(0.975, successes + 1, n - successes)
    return low, high


@pytest.mark.parametrize("twin", [wald, clopper_pearson])
def test_wilson_check_fails_on_other_intervals(twin):
    assert wilson_mismatches(twin), f"{twin.__name__} passed the Wilson known-value check"


def test_wilson_matches_scipy_on_a_grid():
    binomtest = pytest.importorskip("scipy.stats").binomtest
    for n in (1, 2, 7, 30, 101):
        for successes in range(n + 1):
            expected = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
            assert stats.wilson(successes, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_wilson_rejects_bad_counts():
    for successes, n in [(-1, 5), (6, 5), (0, 0)]:
        with pytest.raises(ValueError, match="successes"):
            stats.wilson(successes, n)


# ------------------------------------------------------------------------------------------------------------
# Newcombe's paired difference


def paired(both, only_first, only_second, neither):
    """Outcome lists of a paired 2x2 table: `both` pairs right in both, `only_first` right in the first only, ..."""
    first = [1] * both + [1] * only_first + [0] * only_second + [0] * neither
    second = [1] * both + [0] * only_first + [1] * only_second + [0] * neither
    return first, second


def test_newcombe_paired_matches_the_textbook_example():
    """Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8: complete response
    before and after consolidation therapy (Cavo et al. 2012), table [[59, 6], [16, 80]]: Newcombe square-and-add
    estimate -0.0621, 95% CI -0.1186 to -0.0046."""
    difference, low, high = stats.newcombe_paired(*paired(59, 6, 16, 80))
    assert (difference, low, high) == pytest.approx((-0.0621, -0.1186, -0.0046), abs=1e-4)


def test_newcombe_check_fails_without_the_pairing():
    """Planted bug: ignoring the correlation of the pairs (phi = 0, the independent-samples interval) gives a wider
    interval, which the textbook check rejects."""
    first, second = paired(59, 6, 16, 80)
    n = len(first)
    p1, p2 = sum(first) / n, sum(second) / n
    l1, u1 = stats.wilson(sum(first), n)
    l2, u2 = stats.wilson(sum(second), n)
    unpaired = (p1 - p2 - math.hypot(p1 - l1, u2 - p2), p1 - p2 + math.hypot(p2 - l2, u1 - p1))
    assert unpaired != pytest.approx((-0.1186, -0.0046), abs=1e-4)


def test_newcombe_on_identical_outcomes_is_zero_and_narrow():
    """The same outcomes twice: difference 0, an interval around 0 that is narrower than the unpaired one (the
    pairing is used) but not empty (no discordant pair in 100 does not prove a zero difference)."""
    outcomes = [1] * 60 + [0] * 40
    difference, low, high = stats.newcombe_paired(outcomes, outcomes)
    assert difference == 0.0 and low < 0.0 < high
    assert high == pytest.approx(-low)
    unpaired_half = math.hypot(*(b - a for a, b in zip((0.6, 0.6), stats.wilson(60, 100))))
    assert high < 0.5 * unpaired_half
    # all right in both: no correlation can be estimated (phi = 0), the half-width is 1 minus Wilson's low bound
    half = 1 - stats.wilson(20, 20)[0]
    assert stats.newcombe_paired([1] * 20, [1] * 20) == pytest.approx((0.0, -half, half))


def test_newcombe_rejects_unpaired_lists():
    with pytest.raises(ValueError, match="equal length"):
        stats.newcombe_paired([1, 0], [1])


# ------------------------------------------------------------------------------------------------------------
# Bootstrap


def normal_theory(values):
    values = np.asarray(values, dtype=float)
    half = stats.z_value() * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def mean_statistic(strata):
    """The mean of column 0 of the one stratum: (R, n, columns) -> (R,)."""
    return strata[0][..., 0].mean(-1)


def bootstrap_mean(values, **options):
    """The percentile bootstrap interval of a plain mean (the engine behind the perplexity intervals)."""
    return stats.bootstrap([np.asarray(values, dtype=float)[:, None]], mean_statistic, **options)


def bootstrap_mismatch(mean_interval) -> float:
    """Largest gap between a bootstrap interval of the mean and the normal-theory one, relative to the half-width,
    on 400 skew-free samples (where the two must agree to a few percent)."""
    rng = random.Random(7)
    values = [rng.gauss(0.5, 0.2) for _ in range(400)]
    expected = normal_theory(values)
    got = mean_interval(values)
    half = (expected[1] - expected[0]) / 2
    return max(abs(got[0] - expected[0]), abs(got[1] - expected[1])) / half


def test_bootstrap_mean_agrees_with_normal_theory():
    assert bootstrap_mismatch(bootstrap_mean) < 0.1


def test_bootstrap_check_fails_when_resampling_without_replacement(monkeypatch):
    """Planted bug: drawing the examples WITHOUT replacement (a permutation) gives every replicate the same mean:
    a zero-width interval, which the check rejects."""
    monkeypatch.setattr(stats, "resample_indices",
                        lambda rng, replicates, n: np.argsort(rng.random((replicates, n)), axis=1))
    assert bootstrap_mean([0.0, 1.0, 0.5, 0.25]) == pytest.approx((0.4375, 0.4375))
    assert bootstrap_mismatch(bootstrap_mean) > 0.9


def test_bootstrap_of_binary_outcomes_is_close_to_wilson():
    outcomes = [1] * 81 + [0] * 182
    low, high = bootstrap_mean(outcomes)
    assert (low, high) == pytest.approx(stats.wilson(81, 263), abs=0.01)


def test_bootstrap_is_reproducible_and_seeded():
    rng = random.Random(3)
    values = [rng.random() for _ in range(50)]
    assert bootstrap_mean(values) == bootstrap_mean(values)
    assert bootstrap_mean(values, seed=1) != bootstrap_mean(values)


def test_bootstrap_needs_two_examples():
    assert stats.perplexity_interval([10.0], [5]) is None


def test_perplexity_interval_resamples_windows_as_a_ratio():
    nll, tokens = [200.0, 260.0, 150.0, 300.0], [100, 100, 50, 120]
    low, high = stats.perplexity_interval(nll, tokens)
    point = math.exp(sum(nll) / sum(tokens))
    assert low < point < high
    # the extremes: every replicate made of the best or the worst window alone
    per_window = [math.exp(a / b) for a, b in zip(nll, tokens)]
    assert min(per_window) <= low and high <= max(per_window)


def test_paired_bootstrap_on_identical_examples_is_exactly_zero():
    values = np.asarray([[0.25], [1.0], [0.5], [0.0]])
    assert stats.paired_bootstrap(values, values, mean_statistic) == (0.0, 0.0, 0.0)
    windows = np.asarray([[200.0, 100], [260.0, 100], [150.0, 50]])
    assert stats.paired_bootstrap(windows, windows, stats.perplexity_statistic) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_uses_the_pairing():
    """A constant shift of every example: the paired difference is exactly the shift, whatever is resampled (an
    unpaired resampling would spread it)."""
    rng = random.Random(5)
    base = np.asarray([[rng.random()] for _ in range(40)])
    difference, low, high = stats.paired_bootstrap(base + 0.1, base, mean_statistic)
    assert (difference, low, high) == pytest.approx((0.1, 0.1, 0.1), abs=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Wilson on the effective sample size (fractional RULER samples, the RULER average over tasks)


def textbook_wilson(p: float, n: float) -> tuple[float, float]:
    z = 1.959963984540054
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (p + z * z / (2 * n) - half) / (1 + z * z / n), (p + z * z / (2 * n) + half) / (1 + z * z / n)


# (groups, average p, effective sample size), worked by hand
WILSON_OF_MEANS_KNOWN = [
    ([[1] * 7 + [0] * 23], 7 / 30, 30),  # one task of right/wrong samples: Wilson's own interval
    ([[1] * 20 + [0] * 10, [1] * 5 + [0] * 25], 25 / 60, 60),  # p(1-p)/v = 80.8, truncated at the 60 examples
    ([[1] * 30, [1] * 30], 1.0, 60),  # every sample right: [0.940, 1], not [1, 1]
    ([[0] * 10, [1] * 90], 0.5, 36),  # v = 0: the weights' size 1 / (1/40 + 1/360), not 100
    ([[1] * 40, [1, 0, 1, 0]], 0.75, 12),  # p(1-p)/v = 0.1875 / 0.015625 = 12 < the weights' 14.5
    ([[0.5] * 20], 0.5, 20),  # fractional scores: variance below p(1-p), truncated at n
]


def wilson_of_means_mismatches(interval) -> list:
    return [(groups, p, n) for groups, p, n in WILSON_OF_MEANS_KNOWN
            if interval(groups) != pytest.approx(textbook_wilson(p, n), abs=1e-12)]


def test_wilson_of_means_matches_hand_worked_values():
    assert wilson_of_means_mismatches(stats.wilson_of_means) == []
    assert stats.wilson_of_means([[1] * 30, [1] * 30])[0] == pytest.approx(0.9398, abs=1e-4)
    assert stats.wilson_of_means([[1, 0, 1]]) == stats.wilson(2, 3)


@pytest.mark.parametrize("twin", [
    lambda groups: stats.wilson(int(sum(map(sum, groups))), sum(map(len, groups))),  # pools tasks of unequal size
    lambda groups: bootstrap_mean([v for g in groups for v in g]),  # percentile bootstrap: [1, 1] at all-right
    lambda groups: textbook_wilson(float(np.mean([np.mean(g) for g in groups])), sum(map(len, groups))),  # ignores v
])
def test_wilson_of_means_check_fails_for_planted_twins(twin):
    assert wilson_of_means_mismatches(twin) != []


@pytest.mark.parametrize("groups", [[], [[]], [[0.5, 1.2]], [[-0.1]], [[float("nan")]]])
def test_wilson_of_means_refuses_scores_outside_unit_interval(groups):
    with pytest.raises(ValueError):
        stats.wilson_of_means(groups)


def test_fractional_ruler_cell_interval_is_wilson_at_its_size():
    every_value_found = stats.interval(stats.Examples("scores", [1.0] * 30))
    assert every_value_found["method"] == "wilson_effective_n"
    assert (every_value_found["low"], every_value_found["high"]) == stats.wilson(30, 30)  # not [1, 1]
    half_found_once = stats.interval(stats.Examples("scores", [1.0] * 29 + [0.5]))
    assert (half_found_once["low"], half_found_once["high"]) == pytest.approx(textbook_wilson(29.5 / 30, 30))


# ------------------------------------------------------------------------------------------------------------
# Cells


def test_examples_read_every_per_example_format():
    needle = {"n_examples": 2, "answers": [{"correct": True}, {"correct": False}]}
    assert stats.examples(needle, "accuracy") == stats.Examples("binary", [1, 0])
    one_string = {"n_examples": 2, "answers": [{"expected": ["7"], "score": 1.0}, {"expected": ["8"], "score": 0.0}]}
    assert stats.examples(one_string, "accuracy") == stats.Examples("binary", [1, 0])
    several = {"n_examples": 2, "answers": [{"expected": ["7", "8"], "score": 0.5}, {"expected": ["1", "2"],
                                                                                    "score": 1.0}]}
    assert stats.examples(several, "accuracy") == stats.Examples("scores", [0.5, 1.0])
    choice = {"n_examples": 3, "example_correct": "101", "example_loyal": "111"}
    assert stats.examples(choice, "accuracy") == stats.Examples("binary", [1, 0, 1])
    assert stats.examples(choice, "loyalty") == stats.Examples("binary", [1, 1, 1])
    ppl = {"n_examples": 2, "perplexity": 9.0, "window_nll": [1.0, 2.0], "window_tokens": [3, 4]}
    assert stats.examples(ppl, "perplexity") == stats.Examples("windows", [[1.0, 3], [2.0, 4]])
    assert stats.examples({"n_examples": 3, "example_correct": "10"}, "accuracy") is None  # count mismatch
    assert stats.examples({"n_examples": 3, "accuracy": 0.5}, "accuracy") is None  # an older cell


def _cell(task, strategy, budget, outcomes):
    return {"status": "ok", "task": task, "strategy": strategy, "budget": budget,
            "accuracy": sum(map(int, outcomes)) / len(outcomes), "n_examples": len(outcomes),
            "example_correct": outcomes}


def test_annotate_adds_intervals_and_differences_to_full():
    results = {"cells": {
        "piqa|full|-": _cell("piqa", "full", "-", "1101101101"),
        "piqa|sink_window|0.1": _cell("piqa", "sink_window", "0.1", "1001001100"),
        "piqa|old|0.1": {"status": "ok", "task": "piqa", "strategy": "old", "budget": "0.1", "accuracy": 0.5,
                         "n_examples": 10},
        "piqa|broken|0.1": {"status": "error", "task": "piqa", "strategy": "broken", "budget": "0.1"},
    }}
    stats.annotate(results)
    full, window = results["cells"]["piqa|full|-"], results["cells"]["piqa|sink_window|0.1"]
    assert full["ci"]["accuracy"]["method"] == "wilson" and "vs_full" not in full
    assert (full["ci"]["accuracy"]["low"], full["ci"]["accuracy"]["high"]) == stats.wilson(7, 10)
    diff = window["vs_full"]["accuracy"]
    assert diff["method"] == "newcombe_paired" and diff["n"] == 10
    assert (diff["difference"], diff["low"], diff["high"]) == stats.newcombe_paired(
        [int(c) for c in "1001001100"], [int(c) for c in "1101101101"])
    assert "ci" not in results["cells"]["piqa|old|0.1"] and "vs_full" not in results["cells"]["piqa|old|0.1"]
    assert "ci" not in results["cells"]["piqa|broken|0.1"]
    again = stats.annotate(__import__("copy").deepcopy(results))
    assert again == results  # idempotent and deterministic


def test_binary_differences_use_newcombe_not_the_bootstrap():
    """4 discordant pairs out of 100, all one way: an exact McNemar test gives p = 0.125, so the strategies are not
    distinguishable; Newcombe's interval contains 0, the paired bootstrap's ([+0.01, +0.08]) would not. Catches a
    change that bootstraps right/wrong outcomes."""
    first, second = paired(50, 4, 0, 46)
    diff = stats.difference(stats.Examples("binary", first), stats.Examples("binary", second))
    assert diff["method"] == "newcombe_paired" and stats.contains_zero(diff)
    bootstrapped = stats.paired_bootstrap(np.asarray(first, float)[:, None], np.asarray(second, float)[:, None],
                                          mean_statistic)
    assert bootstrapped[1] > 0  # what the bootstrap would have said


# ------------------------------------------------------------------------------------------------------------
# Paired differences of [0, 1] means: MOVER (Newcombe's method 10 generalised)


def test_paired_wilson_of_means_is_newcombe_on_one_group_of_outcomes():
    rng = random.Random(11)
    for _ in range(200):
        n = rng.randint(1, 60)
        first = [rng.random() < 0.6 for _ in range(n)]
        second = [a if rng.random() < 0.7 else rng.random() < 0.4 for a in first]  # correlated pairs
        first, second = [int(a) for a in first], [int(b) for b in second]
        assert stats.paired_wilson_of_means([first], [second]) == pytest.approx(
            stats.newcombe_paired(first, second), abs=1e-12)


def test_paired_wilson_of_means_on_strata():
    """Two equal tasks of 50, each with 2 discordant pairs all one way (McNemar exact p = 0.125 pooled): Newcombe's
    interval of the pooled 100 pairs, tied, where a stratified paired bootstrap excluded 0; identical scores: a
    difference of 0 with an interval, not [0, 0]."""
    first, second = paired(25, 2, 0, 23)
    diff = stats.paired_wilson_of_means([first, first], [second, second])
    assert diff == pytest.approx(stats.newcombe_paired(first + first, second + second), abs=1e-12)
    assert diff[1] < 0 < diff[2]
    same = [[1.0] * 30, [0.5, 1.0] * 15]
    point, low, high = stats.paired_wilson_of_means(same, same)
    assert point == 0 and low < -0.01 and high > 0.01
    with pytest.raises(ValueError):
        stats.paired_wilson_of_means([[1, 0]], [[1]])


def test_paired_wilson_of_means_check_fails_for_a_twin_without_the_pairing():
    """Planted bug: phi = 0 (the pairs treated as independent) widens the interval of strongly paired outcomes; the
    one-group Newcombe check rejects it."""
    first, second = paired(30, 3, 1, 6)

    def unpaired(a, b):
        (s1, s2), n = (sum(a[0]), sum(b[0])), len(a[0])
        return stats._mover(s1 / n, *stats.wilson(s1, n), s2 / n, *stats.wilson(s2, n), 0.0)

    expected = stats.newcombe_paired(first, second)
    assert stats.paired_wilson_of_means([first], [second]) == pytest.approx(expected, abs=1e-12)
    assert unpaired([first], [second]) != pytest.approx(expected, abs=1e-3)


def test_fractional_ruler_difference_uses_mover():
    full = stats.Examples("scores", [1.0] * 30)
    diff = stats.difference(full, full)
    assert diff["method"] == "mover_wilson" and diff["difference"] == 0 and diff["low"] < 0 < diff["high"]
