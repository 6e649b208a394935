"""prefill_shared: one forward for several budgets gives every cache exactly what its own forward gives."""

import pytest
import torch

import kvcompress.strategies  # noqa: F401  (registers the built-in strategies)
from kvcompress import AnchorCache, CompressedCache, FullCache, H2OCache, SinkWindowCache, SnapKVCache, registry
from kvcompress.cache import cache_arg
from kvcompress.shared_prefill import forward_key, prefill_shared
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


class _KeepIdsOfParity(CompressedCache):
    """A strategy choosing tokens by their input id (it records the ids): keeps ids of one parity, and the newest."""

    needs_token_ids = True
    parity = 0

    def select(self, layer):
        ids = self.ids_at(layer.positions)
        return layer.valid & ((ids % 2 == self.parity) | (layer.positions == layer.seen - 1))


class _KeepOddIds(_KeepIdsOfParity):
    parity = 1


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


def _check_equal_to_alone(caches, alone, ids, mask, tail, steps, outputs, alone_outputs):
    for i, (s, a) in enumerate(zip(caches, alone)):
        name = f"caches[{i}] ({type(a).__name__})"
        assert torch.equal(outputs[i].logits, alone_outputs[i]), f"{name}: other prefill logits"
        assert kept_sets(s) == kept_sets(a), f"{name}: other kept sets after the shared prefill"
        assert s.kv_bytes() == a.kv_bytes() and s.kv_bytes_used() == a.kv_bytes_used()
        assert (s.token_ids is None) == (a.token_ids is None), f"{name}: recorded ids where alone it has none"
        assert s.token_ids is None or torch.equal(s.token_ids, a.token_ids)
        for layer_s, layer_a in zip(s.layers, a.layers):
            assert torch.equal(layer_s.keys, layer_a.keys) and torch.equal(layer_s.values, layer_a.values)
            assert layer_s.deferred is None
        for (ls, ks), (la, ka) in zip(_continue(s, mask, tail, steps), _continue(a, mask, tail, steps)):
            assert torch.equal(ls, la), f"{name}: other logits after the shared prefill"
            assert ks == ka


def _prefill_counting_forwards(caches, ids, mask):
    """prefill_shared's outputs, and how many forwards of the model it ran."""
    forwards = []
    handle = MODEL.register_forward_hook(lambda *_: forwards.append(1))
    try:
        return prefill_shared(MODEL, caches, ids, attention_mask=mask), len(forwards)
    finally:
        handle.remove()


def _alone(caches, ids, mask):
    with torch.no_grad():
        return [MODEL(ids, attention_mask=mask, **cache_arg(c)).logits for c in caches]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefill_equals_each_cache_prefilled_alone(spec, seed):
    ids, mask, tail, steps = _prompt(seed)
    alone, shared = _caches(spec), _caches(spec)
    alone_outputs = _alone(alone, ids, mask)
    outputs = prefill_shared(MODEL, shared, ids, attention_mask=mask)
    _check_equal_to_alone(shared, alone, ids, mask, tail, steps, outputs, alone_outputs)
    # the budgets must matter, or this test could not tell a shared cut from a copied one
    assert len({str(kept_sets(c)) for c in shared}) == len(BUDGETS)


def test_every_strategy_and_budget_in_one_call_and_the_forwards_it_runs():
    """All specs x budgets (and budgets that give snapkv another observation window) in one call: each cache as
    alone; one forward per group of caches the core serves alike (h2o's blockwise kernel, kvzip's reconstruction)."""
    ids, mask, tail, steps = _prompt(5)
    specs = SPECS + ["full", "sink_window"]
    budgets = BUDGETS + (8,)
    make = lambda: [registry.resolve(spec)[0].for_budget(MODEL, TOKENIZER, b, **registry.resolve(spec)[1])  # noqa
                    for spec in specs for b in (budgets if registry.get(spec.split(":")[0]).uses_budget else [None])]
    by_ids = lambda: [_KeepIdsOfParity(MODEL), _KeepOddIds(MODEL),  # noqa: E731 - two classes sharing recorded ids
                      SinkWindowCache(MODEL, n_sink=2, window=20, positions="cache")]  # keys re-rotated: own forward
    alone, shared = make() + by_ids(), make() + by_ids()
    alone_outputs = _alone(alone, ids, mask)
    outputs, forwards = _prefill_counting_forwards(shared, ids, mask)
    groups = {forward_key(c, ids.shape[1]) for c in shared}
    # h2o, kvzip (both allocations, paged and dense) and the re-rotating sink window take their own forward; every
    # other strategy (AdaKV's paged allocations too) one
    assert forwards == len(groups) == 4
    assert sum(1 for c in shared if isinstance(c, (SnapKVCache, H2OCache))) > 2
    _check_equal_to_alone(shared, alone, ids, mask, tail, steps, outputs, alone_outputs)


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


def test_forward_groups():
    """The strategies the core serves through the same path share a forward; the others take their own."""
    def key(cache, length=40):
        return forward_key(cache, length)
    snapkv, tova, full = SnapKVCache(MODEL, budget=70), registry.get("tova")(MODEL, budget=9), FullCache(MODEL)
    assert key(snapkv) == key(tova) == key(full) == key(SnapKVCache(MODEL, budget=8, window=4))
    assert key(H2OCache(MODEL)) != key(full)  # its prefill's kernel is blockwise (attention received)
    assert key(snapkv, 1) != key(full, 1)  # one token: strategies observing probabilities take the decode kernel
    kvzip = registry.get("kvzip")
    # paged and dense stores: one forward (and one reconstruction), each cache then takes the layers in its layout
    assert key(kvzip(MODEL, TOKENIZER)) == key(kvzip(MODEL, TOKENIZER, allocation="layer"))
    assert key(SnapKVCache(MODEL, budget=70, allocation="adakv")) == key(snapkv)
    assert key(kvzip(MODEL, TOKENIZER)) != key(kvzip(MODEL, TOKENIZER, normalize="chunk"))  # another reconstruction
    assert key(kvzip(MODEL, TOKENIZER, allocation="layer")) != key(SnapKVCache(MODEL, budget=70))  # its own hooks
    assert key(_KeepOddIds(MODEL)) == key(full)  # recording the input ids changes no computation


def test_kvzip_caches_that_reconstruct_differently_take_their_own_forward(monkeypatch):
    """KVzip caches differing in chunk (or overlap, slack) reconstruct differently: each is as alone, in forwards of
    their own. Planted: grouping them by class alone copies the first cache's reconstruction into the others."""
    ids, mask, tail, steps = _prompt(6)
    kvzip = registry.get("kvzip")
    make = lambda: [kvzip(MODEL, TOKENIZER, budget=66, chunk=chunk) for chunk in (130, 40, 17)]  # noqa: E731
    alone, shared = make(), make()
    alone_outputs = _alone(alone, ids, mask)
    outputs, forwards = _prefill_counting_forwards(shared, ids, mask)
    assert forwards == 3
    _check_equal_to_alone(shared, alone, ids, mask, tail, steps, outputs, alone_outputs)
    monkeypatch.setattr(kvzip, "deferred_settings", ())
    planted = make()
    _prefill_counting_forwards(planted, ids, mask)
    assert [kept_sets(c) for c in planted] != [kept_sets(c) for c in alone]


def test_a_group_runs_its_forward_on_a_cache_that_records_ids():
    """Caches recording input ids share the forward of caches that do not: the forward runs on one that records
    them, only those that record them get them. Planted: a group led by a cache that does not record them leaves the
    id strategies without ids."""
    ids, mask, tail, steps = _prompt(4)
    make = lambda: [FullCache(MODEL), SnapKVCache(MODEL, budget=70), _KeepOddIds(MODEL),  # noqa: E731
                    AnchorCache(MODEL, anchor_ids=[5, 7, 9])]
    alone, shared = make(), make()
    alone_outputs = _alone(alone, ids, mask)
    outputs, forwards = _prefill_counting_forwards(shared, ids, mask)
    assert forwards == 1
    _check_equal_to_alone(shared, alone, ids, mask, tail, steps, outputs, alone_outputs)
    planted = make()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("kvcompress.shared_prefill._groups", lambda caches, length: [list(caches)])
        with pytest.raises(AttributeError):  # ids_at on no ids
            prefill_shared(MODEL, planted, ids, attention_mask=mask)


def test_bad_input_is_refused_by_name():
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(ValueError, match="at least one cache"):
        prefill_shared(MODEL, [], ids)
    with pytest.raises(ValueError, match=r"caches\[1\] has quantized or demoted storage"):
        prefill_shared(MODEL, [H2OCache(MODEL), H2OCache(MODEL, kv_bits=4)], ids)
    same = H2OCache(MODEL)
    with pytest.raises(ValueError, match="twice"):
        prefill_shared(MODEL, [same, same], ids)
    with pytest.raises(ValueError, match=r"caches\[1\] was built for another model"):
        prefill_shared(MODEL, [H2OCache(MODEL), H2OCache(tiny_llama(seed=4))], ids)
    with pytest.raises(ValueError, match=r"caches\[0\] has no model yet"):
        prefill_shared(MODEL, [AnchorCache(), H2OCache(MODEL)], ids)
    used = H2OCache(MODEL)
    with torch.no_grad():
        MODEL(ids, **cache_arg(used))
    with pytest.raises(ValueError, match="has been used"):
        prefill_shared(MODEL, [H2OCache(MODEL), used], ids)
    with pytest.raises(TypeError, match="not a kvcompress"):
        prefill_shared(MODEL, [H2OCache(MODEL), object()], ids)


def test_a_second_forward_while_deferring_is_refused():
    cache = H2OCache(MODEL)
    cache._deferring = {}
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        MODEL(ids, **cache_arg(cache))
        with pytest.raises(RuntimeError, match="takes one forward"):
            MODEL(ids[:, :2], **cache_arg(cache))
