"""prefill_shared: one forward for several budgets gives every cache exactly what its own forward gives."""

import pytest
import torch

import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
from kvcompress import H2OCache, SnapKVCache, registry
from kvcompress.cache import cache_arg
from kvcompress.shared_prefill import prefill_shared
from kvcompress.testing import CharTokenizer, left_padded, tiny_llama

from kept_sets import kept_sets

MODEL = tiny_llama(seed=3, initializer_range=0.2)  # peaked attention: strategies disagree on what to keep
TOKENIZER = CharTokenizer()
BUDGETS = (66, 81, 97)  # above 64: every budget gets snapkv's window of 64 (the observation is the same)
BUDGETED = [n for n in registry.available() if registry.get(n).uses_budget]
SPECS = BUDGETED + ["kvzip:allocation=layer", "snapkv:allocation=adakv", "expected_attention:allocation=adakv"]


def _prompt(seed: int):
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 128, (n,), generator=generator).tolist() for n in (130, 104)]
    ids, mask = left_padded(rows)
    tail = torch.randint(3, 128, (2, 3), generator=generator)
    steps = torch.randint(3, 128, (2, 3), generator=generator)
    return ids, mask, tail, steps


def _caches(spec: str):
    cls, options = registry.resolve(spec)
    return [cls.for_budget(MODEL, TOKENIZER, budget, **options) for budget in BUDGETS]


@torch.no_grad()
def _continue(cache, mask, tail, steps):
    """A question (multi-token forward) then single-token steps; the logits and kept sets after each."""
    out = []
    mask = torch.cat([mask, torch.ones_like(tail)], dim=1)
    out.append((MODEL(tail, attention_mask=mask, **cache_arg(cache)).logits, kept_sets(cache)))
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out.append((MODEL(steps[:, t:t + 1], attention_mask=mask, **cache_arg(cache)).logits, kept_sets(cache)))
    return out


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefill_equals_each_cache_prefilled_alone(spec, seed):
    ids, mask, tail, steps = _prompt(seed)
    alone = _caches(spec)
    with torch.no_grad():
        alone_logits = [MODEL(ids, attention_mask=mask, **cache_arg(c)).logits for c in alone]
    shared = _caches(spec)
    logits = prefill_shared(MODEL, shared, ids, attention_mask=mask).logits
    for budget, a, s, a_logits in zip(BUDGETS, alone, shared, alone_logits):
        assert torch.equal(logits, a_logits)
        assert kept_sets(s) == kept_sets(a), f"budget {budget}: other kept sets after the shared prefill"
        assert s.kv_bytes() == a.kv_bytes() and s.kv_bytes_used() == a.kv_bytes_used()
        for layer_s, layer_a in zip(s.layers, a.layers):
            assert torch.equal(layer_s.keys, layer_a.keys) and torch.equal(layer_s.values, layer_a.values)
            assert layer_s.deferred is None
        for (ls, ks), (la, ka) in zip(_continue(s, mask, tail, steps), _continue(a, mask, tail, steps)):
            assert torch.equal(ls, la), f"budget {budget}: other logits after the shared prefill"
            assert ks == ka
    # the budgets must matter, or this test could not tell a shared cut from a copied one
    assert len({str(kept_sets(c)) for c in shared}) == len(BUDGETS)


def test_a_cache_that_kept_the_first_caches_budget_is_caught():
    """Planted bug: copying the state WITH caches[0]'s settings (its budget) gives every cache caches[0]'s cut; the
    comparison above would fail on it."""
    ids, mask, _, _ = _prompt(0)
    shared = [H2OCache.for_budget(MODEL, None, b) for b in BUDGETS]
    prefill_shared(MODEL, shared, ids, attention_mask=mask)
    planted = [H2OCache.for_budget(MODEL, None, b) for b in BUDGETS]
    settings = [dict(heavy=c.heavy, recent=c.recent) for c in planted]
    for cache in planted[1:]:
        vars(cache).update(settings[0])  # what prefill_shared would do if it did not keep each cache's settings
    prefill_shared(MODEL, planted, ids, attention_mask=mask)
    assert kept_sets(planted[0]) == kept_sets(shared[0])
    assert kept_sets(planted[2]) != kept_sets(shared[2])


def test_one_cache_is_a_plain_prefill():
    ids, mask, _, _ = _prompt(2)
    alone, shared = SnapKVCache(MODEL, budget=70), SnapKVCache(MODEL, budget=70)
    with torch.no_grad():
        MODEL(ids, attention_mask=mask, **cache_arg(alone))
    prefill_shared(MODEL, [shared], ids, attention_mask=mask)
    assert kept_sets(shared) == kept_sets(alone)


def test_bad_input_is_refused_by_name():
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(ValueError, match="at least one cache"):
        prefill_shared(MODEL, [], ids)
    with pytest.raises(ValueError, match="of one strategy"):
        prefill_shared(MODEL, [SnapKVCache(MODEL, budget=70), H2OCache(MODEL)], ids)
    with pytest.raises(ValueError, match="observe_window"):  # a window of 4 vs 64: the observation differs
        prefill_shared(MODEL, [SnapKVCache.for_budget(MODEL, None, 70), SnapKVCache.for_budget(MODEL, None, 8)], ids)
    with pytest.raises(ValueError, match="kv_bits"):
        prefill_shared(MODEL, [H2OCache(MODEL, kv_bits=4), H2OCache(MODEL, kv_bits=4)], ids)
    with pytest.raises(ValueError, match="stores its layers"):
        kvzip = registry.get("kvzip")
        prefill_shared(MODEL, [kvzip(MODEL, TOKENIZER), kvzip(MODEL, TOKENIZER, allocation="layer")], ids)
    same = H2OCache(MODEL)
    with pytest.raises(ValueError, match="twice"):
        prefill_shared(MODEL, [same, same], ids)
    with pytest.raises(ValueError, match="not built for this model"):
        prefill_shared(MODEL, [H2OCache(MODEL), H2OCache(tiny_llama(seed=4))], ids)
    used = H2OCache(MODEL)
    with torch.no_grad():
        MODEL(ids, **cache_arg(used))
    with pytest.raises(ValueError, match="has been used"):
        prefill_shared(MODEL, [H2OCache(MODEL), used], ids)
    with pytest.raises(TypeError, match="not a kvcompress"):
        prefill_shared(MODEL, [H2OCache(MODEL), object()], ids)


def test_a_second_forward_while_deferring_is_refused():
    cache = H2OCache(MODEL)
    cache._deferring = True
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        MODEL(ids, **cache_arg(cache))
        with pytest.raises(RuntimeError, match="takes one forward"):
            MODEL(ids[:, :2], **cache_arg(cache))
