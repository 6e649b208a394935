"""AdaKV allocation (`allocation="adakv"` on snapkv, pyramidkv and expected_attention; `selection.adaptive_top_k`):
the kept set is the best candidates over all kv heads of a row with each head's safeguard (against an independent
reference, hypothesis, planted twin), the row's total budget holds after every forward, attention stays exact, and
the memory follows the unequal head counts (paged storage)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress import ExpectedAttentionCache, PyramidKVCache, SnapKVCache
from kvcompress.cache import cache_arg
from kvcompress.selection import adaptive_top_k, top_k
from kvcompress.storage import PagedKV
from kvcompress.testing import left_padded, max_step_error, tiny_gemma3, tiny_llama

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_adakv(scores, candidates, per_head, alpha):
    """Plain Python: each head's floor(alpha * per_head) best (score desc, slot asc), then the best of the rest over
    all heads (score desc, head asc, slot asc) up to per_head * H in total."""
    batch, heads, slots = scores.shape
    keep = torch.zeros(batch, heads, slots, dtype=torch.bool)
    safe = int(alpha * per_head)
    for b in range(batch):
        taken = set()
        for h in range(heads):
            mine = sorted((s for s in range(slots) if candidates[b, h, s]), key=lambda s: (-float(scores[b, h, s]), s))
            taken |= {(h, s) for s in mine[:safe]}
        rest = sorted(((h, s) for h in range(heads) for s in range(slots) if candidates[b, h, s] and (h, s) not in taken),
                      key=lambda hs: (-float(scores[b, hs[0], hs[1]]), hs[0], hs[1]))
        taken |= set(rest[: max(0, per_head * heads - len(taken))])
        for h, s in taken:
            keep[b, h, s] = True
    return keep


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 12), st.integers(1, 8), st.sampled_from([0.0, 0.2, 0.5, 1.0]),
       st.integers(0, 2**16))
def test_adaptive_top_k_equals_the_reference(batch, heads, slots, per_head, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (batch, heads, slots), generator=g).float()  # many ties on purpose
    candidates = torch.rand(batch, heads, slots, generator=g) < 0.8
    got = adaptive_top_k(scores, candidates, per_head, alpha)
    assert torch.equal(got, reference_adakv(scores, candidates, per_head, alpha))


def test_the_reference_check_catches_per_head_top_k():
    """Planted twin: each head keeps its own per_head best (no sharing) differs when one head scores higher."""
    scores = torch.tensor([[[9.0, 8, 7, 6], [1, 2, 0, 0]]])
    candidates = torch.ones_like(scores, dtype=torch.bool)
    expected = reference_adakv(scores, candidates, 2, 0.0)
    assert expected[0, 0].sum() == 4 and expected[0, 1].sum() == 0  # the strong head keeps the row's 4
    assert not torch.equal(top_k(scores, candidates, 2), expected)


MODEL = tiny_llama(seed=2, initializer_range=0.2)  # peaked attention: heads score differently
ROWS = [list(range(3, 40)), list(range(50, 71))]
MAKERS = {
    "snapkv": lambda m: SnapKVCache(m, budget=8, window=2, kernel=3, allocation="adakv"),
    "pyramidkv": lambda m: PyramidKVCache(m, budget=8, window=2, kernel=3, allocation="adakv"),
    "expected_attention": lambda m: ExpectedAttentionCache(m, budget=8, allocation="adakv"),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_row_budget_holds_heads_differ_and_attention_is_exact(name):
    ids, mask = left_padded(ROWS)
    cache = MAKERS[name](MODEL)
    error, _, _ = max_step_error(MODEL, cache, ids, mask, max_new_tokens=8)
    assert error < 1e-4
    heads = MODEL.config.num_key_value_heads
    for layer in cache.layers:
        counts = layer.valid.expand(-1, heads, -1).sum(dim=-1)  # (B, Hkv)
        budget = cache.layer_budget(layer.layer_idx) if hasattr(cache, "layer_budget") else cache.budget
        assert bool((counts.sum(dim=-1) <= budget * heads).all())
        assert isinstance(layer.store, PagedKV)
    assert any(bool((layer.valid.expand(-1, heads, -1).sum(-1).diff(dim=-1) != 0).any()) for layer in cache.layers)


@pytest.mark.parametrize("name, per_head", [("snapkv", 6), ("expected_attention", 4)])
def test_the_strategies_hand_their_scores_to_adaptive_top_k(name, per_head, monkeypatch):
    """Wiring: over budget, the strategy asks `adaptive_top_k` for budget - window (snapkv) or budget - n_sink
    (expected_attention) per head with its alpha, over its own candidates, and keeps what it returns (plus the
    window or sinks)."""
    import importlib

    module = importlib.import_module(f"kvcompress.strategies.{name}")
    calls = []

    def spy(scores, candidates, k, alpha):
        out = adaptive_top_k(scores, candidates, k, alpha)
        calls.append((k, alpha, out.sum().item(), candidates.expand_as(scores).sum().item()))
        return out

    monkeypatch.setattr(module, "adaptive_top_k", spy)
    ids, mask = left_padded(ROWS[:1])
    cache = MAKERS[name](MODEL)
    with torch.no_grad():
        out = MODEL(ids, attention_mask=mask, **cache_arg(cache))
        for _ in range(4):
            out = MODEL(out.logits[:, -1:].argmax(-1), **cache_arg(cache))
    assert calls and all(k == per_head and alpha == 0.2 for k, alpha, _, _ in calls)
    assert all(kept == min(per_head * 2, available) for _, _, kept, available in calls)


@pytest.mark.parametrize("options, message", [
    (dict(allocation="global"), r"allocation must be one of \('head', 'adakv'\), got 'global'"),
    (dict(allocation="adakv", alpha=1.5), r"alpha must be a number in \[0, 1\], got 1.5"),
    (dict(allocation="adakv", alpha=True), r"alpha must be a number in \[0, 1\], got True"),
])
def test_bad_allocation_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SnapKVCache(MODEL, budget=8, window=2, **options)


def test_for_budget_takes_the_allocation():
    cache = ExpectedAttentionCache.for_budget(MODEL, None, 16, allocation="adakv")
    assert cache.allocation == "adakv" and cache.storage_layout() == "paged"
    assert SnapKVCache.for_budget(MODEL, None, 16).storage_layout() == "dense"


def test_sliding_layers_are_exact_with_adakv():
    model = tiny_gemma3(seed=3)
    ids, mask = left_padded(ROWS)
    error, _, _ = max_step_error(model, SnapKVCache(model, budget=6, window=2, kernel=3, allocation="adakv"), ids, mask,
                                 max_new_tokens=4)
    assert error < 1e-4
