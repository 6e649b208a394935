"""PyramidKVCache: the paper's per-layer budgets (exact total), SnapKV's choice under them (recomputed from an eager
forward), exactness, hypothesis invariants with planted twins, bad input. Shared helpers: tests/test_snapkv.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_snapkv import (
    EXACT,
    EXACT_ROWS,
    MODEL,
    MODEL64,
    PROPERTY_SETTINGS,
    CHOICE_CONTINUATION,
    CHOICE_ROWS,
    batches,
    check_budget,
    check_choice,
    check_large_budget_is_full_cache,
    check_rows_independent,
    planted_example,
)

from kvcompress import PyramidKVCache, SnapKVCache, registry
from kvcompress.selection import per_kv_head
from kvcompress.strategies.pyramidkv import pyramid_budgets
from kvcompress.strategies.snapkv import to_stream
from kvcompress.testing import left_padded, max_step_error, tiny_gemma3, tiny_qwen2


# --- the budget schedule --------------------------------------------------------------------------------------------
def check_schedule(schedule, budget, window, layers, beta):
    """Budgets follow the paper's line (within rounding), keep the window, never rise with depth, and sum to
    exactly layers * budget. The line: scored share A = budget - window, layer l gets
    window + (2A - A/beta) - l * (2A - 2A/beta) / (layers - 1)."""
    budgets = schedule(budget, window, layers, beta)
    scored = budget - window
    assert len(budgets) == layers
    assert sum(budgets) == layers * budget, budgets
    for layer, got in enumerate(budgets):
        line = window + scored if layers == 1 else (
            window + (2 * scored - scored / beta) - layer * (2 * scored - 2 * scored / beta) / (layers - 1))
        assert abs(got - line) < 1 + 1e-9, (layer, got, line)
        assert got >= window
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), budgets


def _official_floor_divisions(budget, window, layers, beta):
    """The official code's integer arithmetic (`//` for min_num and steps): its total falls short."""
    scored = budget - window
    low = scored // beta
    high = 2 * scored - low
    steps = (high - low) // (layers - 1) if layers > 1 else 0
    return [window + high - layer * steps for layer in range(layers)]


@settings(max_examples=200, deadline=None)
@given(
    window=st.integers(1, 64),
    scored=st.integers(0, 5000),
    layers=st.integers(1, 80),
    beta=st.one_of(st.integers(1, 40), st.floats(1, 40)),
)
def test_layer_budgets_follow_the_papers_line_with_an_exact_total(window, scored, layers, beta):
    check_schedule(pyramid_budgets, window + scored, window, layers, beta)


def test_schedule_check_catches_floor_divisions():
    check_schedule(pyramid_budgets, 512, 64, 30, 20)
    with pytest.raises(AssertionError):
        check_schedule(_official_floor_divisions, 512, 64, 30, 20)


def test_kept_counts_follow_the_pyramid_after_a_long_prefill():
    """budget 7, window 2, beta 2, 3 layers: A = 5, line 7.5 / 5 / 2.5 -> 7 / 5 / 2 + one remainder token to the
    lower layer of the tied .5 -> 8 / 5 / 2 scored tokens + the window."""
    cache = PyramidKVCache(MODEL, budget=7, window=2, kernel=3, beta=2)
    assert cache.layer_budgets == [10, 7, 4]
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        MODEL(ids, past_key_values=cache)
    assert cache.kept_counts().tolist() == [[10, 10], [7, 7], [4, 4]]
    assert cache.kept_counts()[:, 0].sum() == 3 * 7


def test_beta_one_is_snapkv():
    ids, mask = left_padded(EXACT_ROWS)
    kept = []
    options = dict(budget=6, window=2, kernel=3)
    for cache in (PyramidKVCache(MODEL, **options, beta=1), SnapKVCache(MODEL, **options)):
        with torch.no_grad():
            MODEL(ids, attention_mask=mask, past_key_values=cache)
        kept.append([cache.kept_positions(layer, h) for layer in range(3) for h in range(2)])
    assert kept[0] == kept[1]


# --- the choice under the pyramid ------------------------------------------------------------------------------------
class _PyramidFirstObservedQuery(PyramidKVCache):
    """Scores with the first query of the observation window instead of the mean over the window."""

    def scores(self, layer, order):
        first = layer.observation.probs[:, :, 0]
        return per_kv_head(self.pool(to_stream(first, order)), layer.keys.shape[1])


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_kept_set_is_snapkvs_choice_under_each_layers_budget(pooling):
    cache = PyramidKVCache(MODEL64, budget=7, window=2, kernel=3, pooling=pooling, beta=2)
    assert cache.layer_budgets == [10, 7, 4]
    check_choice(MODEL64, cache, CHOICE_ROWS, CHOICE_CONTINUATION)


def test_choice_check_catches_a_planted_bug_under_the_pyramid():
    with pytest.raises(AssertionError, match="not SnapKV's choice"):
        check_choice(MODEL64, _PyramidFirstObservedQuery(MODEL64, budget=7, window=2, kernel=3, beta=2), CHOICE_ROWS,
                     CHOICE_CONTINUATION)


# --- exactness --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 4])
def test_each_step_equals_explicit_mask_forward_padded_gqa(chunk):
    ids, mask = left_padded(EXACT_ROWS)
    kwargs = {} if chunk is None else {"prefill_chunk_size": chunk}
    cache = PyramidKVCache(MODEL, budget=6, window=2, kernel=3, beta=3)
    error, _, _ = max_step_error(MODEL, cache, ids, mask, max_new_tokens=6, **kwargs)
    assert error < EXACT
    assert cache.kept_counts()[:, 0].tolist() == cache.layer_budgets == [9, 6, 3]


@pytest.mark.parametrize("make", [tiny_gemma3, tiny_qwen2], ids=["gemma3", "qwen2"])
def test_each_step_equals_explicit_mask_forward_other_architectures(make):
    model = make(seed=1)
    ids, mask = left_padded(EXACT_ROWS)
    cache = PyramidKVCache(model, budget=6, window=2, kernel=3, beta=2)
    error, _, _ = max_step_error(model, cache, ids, mask, max_new_tokens=5)
    assert error < EXACT
    assert sum(cache.layer_budgets) == len(cache.layers) * 6


# --- hypothesis properties (the twins of the shared checkers are in test_snapkv.py) ---------------------------------
class _PyramidOneOver(PyramidKVCache):
    """Cuts each layer back to its budget + 1."""

    def layer_budget(self, layer_idx):
        return super().layer_budget(layer_idx) + 1


@PROPERTY_SETTINGS
@given(batches(), st.sampled_from([1, 2, 20]))
def test_budget_is_never_exceeded_and_window_is_kept(example, beta):
    rows, continuation, options = example
    check_budget(PyramidKVCache, rows, continuation, {**options, "beta": beta})


def test_budget_check_catches_one_over():
    rows, continuation, options = planted_example()
    check_budget(PyramidKVCache, rows, continuation, options)
    with pytest.raises(AssertionError):
        check_budget(_PyramidOneOver, rows, continuation, options)


@pytest.mark.slow
@PROPERTY_SETTINGS
@given(batches())
def test_budget_covering_everything_is_full_cache(example):
    check_large_budget_is_full_cache(PyramidKVCache, *example)


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(batches())
def test_batch_rows_are_independent(example):
    check_rows_independent(PyramidKVCache, *example)


# --- construction, bad input ------------------------------------------------------------------------------------------
def test_defaults_and_registry():
    cache = PyramidKVCache(MODEL)
    assert (cache.budget, cache.window, cache.kernel, cache.pooling, cache.beta) == (1024, 64, 5, "avg", 20)
    assert sum(cache.layer_budgets) == 3 * 1024
    assert registry.get("pyramidkv") is PyramidKVCache


@pytest.mark.parametrize("budget, window", [(1, 1), (64, 32), (100, 64), (512, 64)])
def test_for_budget_keeps_the_uniform_total(budget, window):
    cache = PyramidKVCache.for_budget(MODEL, None, budget)
    assert cache.window == window and sum(cache.layer_budgets) == 3 * budget


@pytest.mark.parametrize("beta", [0.5, 0, -1, math.nan, math.inf, "20", True, None])
def test_bad_beta_is_refused_naming_it(beta):
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 1, got"):
        PyramidKVCache(MODEL, budget=8, window=2, beta=beta)


def test_window_larger_than_budget_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"window \(9\) must be <= budget \(8\)"):
        PyramidKVCache(MODEL, budget=8, window=9)
