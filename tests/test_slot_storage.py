"""Slot storage: slots never move, free slots are reused, order of slots never matters, memory is given back."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress import AnchorCache, FullCache, SinkWindowCache
from kvcompress.cache import CompressedCache, cache_arg
from kvcompress.testing import left_padded, tiny_llama

MODEL = tiny_llama()
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CACHES = {
    "full": lambda m: FullCache(m),
    "sink_window": lambda m: SinkWindowCache(m, n_sink=2, window=5),
    "anchor": lambda m: AnchorCache(m, anchor_ids=[7, 11], keep_first=1),
}


def _permute_slots(cache, generator) -> None:
    """Shuffle the slots [0, used) of every layer and row: keys, values, positions and per-slot state together."""
    for layer in cache.layers:
        batch, used = layer.keys.shape[0], layer.used
        order = torch.stack([torch.randperm(used, generator=generator) for _ in range(batch)])  # (B, used)
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            index = order[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[-1])
            tensor[:, :, :used] = tensor[:, :, :used].gather(2, index)
        for table in (layer._positions, *layer.state.values()):
            table[..., :used] = table[..., :used].gather(-1, order[:, None, :].expand(-1, table.shape[1], -1))
        table = layer._positions
        layer.ordered = layer.dense = False  # the slots no longer follow stream order
        layer.holes = bool((table[..., :used] < 0).any())
        layer.new_slots = None


def _continue(model, cache, ids, mask, steps=4):
    logits, token = [], ids[:, -1:]
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, **cache_arg(cache), use_cache=True).logits[:, -1]
            logits.append(out)
            token = out.argmax(-1, keepdim=True)
    return torch.stack(logits, 1)


@SETTINGS
@given(
    rows=st.lists(st.lists(st.integers(3, 127), min_size=3, max_size=14), min_size=1, max_size=3),
    name=st.sampled_from(sorted(CACHES)),
    seed=st.integers(0, 2**16),
)
def test_permuting_the_slots_never_changes_the_logits(rows, name, seed):
    ids, mask = left_padded(rows)
    reference, permuted = CACHES[name](MODEL), CACHES[name](MODEL)
    with torch.no_grad():
        for cache in (reference, permuted):
            MODEL(ids, attention_mask=mask, **cache_arg(cache), use_cache=True)
    _permute_slots(permuted, torch.Generator().manual_seed(seed))
    expected = _continue(MODEL, reference, ids, mask)
    got = _continue(MODEL, permuted, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert permuted.kept_positions(1) == reference.kept_positions(1)


def test_planted_rank_by_slot_is_caught_by_the_permutation_check():
    """A sink window that ranks tokens by slot index (the bug slot reuse invites) fails the permutation check."""

    class RankBySlot(SinkWindowCache):
        evict = CompressedCache.evict  # through `select` after every forward (no decode fast path)

        def select(self, layer):
            valid = layer.valid
            rank = valid.cumsum(-1) - 1
            return valid & ((rank < self.n_sink) | (valid.sum(-1, keepdim=True) - 1 - rank < self.window))

    ids, mask = left_padded([[5, 9, 17, 33, 41, 8, 12, 50, 60]])
    reference, permuted = RankBySlot(MODEL, n_sink=2, window=3), RankBySlot(MODEL, n_sink=2, window=3)
    with torch.no_grad():
        for cache in (reference, permuted):
            MODEL(ids, attention_mask=mask, **cache_arg(cache), use_cache=True)
    _permute_slots(permuted, torch.Generator().manual_seed(3))
    _continue(MODEL, reference, ids, mask), _continue(MODEL, permuted, ids, mask)
    assert permuted.kept_positions(1) != reference.kept_positions(1)


def test_decode_writes_into_freed_slots_without_moving_kept_keys():
    cache = SinkWindowCache(MODEL, n_sink=2, window=4)
    ids = torch.arange(3, 23).unsqueeze(0)
    with torch.no_grad():
        MODEL(ids, **cache_arg(cache), use_cache=True)
    layer = cache.layers[0]
    capacity = layer.capacity
    before = {int(p): layer.keys[0, :, s].clone() for s, p in enumerate(layer.positions[0, 0]) if p >= 0}
    slots_before = {int(p): s for s, p in enumerate(layer.positions[0, 0].tolist()) if p >= 0}
    with torch.no_grad():
        for t in range(6):
            MODEL(torch.tensor([[40 + t]]), attention_mask=torch.ones(1, 21 + t, dtype=torch.long),
                  **cache_arg(cache), use_cache=True)
            for s, p in enumerate(layer.positions[0, 0].tolist()):
                if p in before:  # a kept token is still in its slot, untouched
                    assert slots_before[p] == s and torch.equal(layer.keys[0, :, s], before[p])
    assert layer.capacity == capacity  # steady state: one slot freed, one written, no growth
    assert cache.kept_positions(0) == [[0, 1, 22, 23, 24, 25]]


def test_a_long_prefill_through_a_budgeted_cache_gives_memory_back():
    cache, full = SinkWindowCache(MODEL, n_sink=4, window=12), FullCache(MODEL)
    ids = torch.randint(3, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        MODEL(ids, **cache_arg(cache), use_cache=True)
        MODEL(ids, **cache_arg(full), use_cache=True)
    assert full.layers[0].capacity == 300
    assert cache.layers[0].capacity <= 16 + max(8, 16 // 16)  # kept tokens + a small reserve
    assert cache.kv_bytes_used() * 300 == full.kv_bytes_used() * 16
    assert cache.kv_bytes() < full.kv_bytes() / 10


def test_full_cache_grows_geometrically_and_holds_at_most_an_eighth_more():
    """Appends reallocate by 1/8 of the capacity (at least 16 slots): few reallocations, and the slots held stay
    within 1.125x of those used (+16) at every step (a 1.5x growth would hold up to 1.5x)."""
    cache = FullCache(MODEL)
    capacities, ratios = [], []
    with torch.no_grad():
        MODEL(torch.arange(3, 35).repeat(20).unsqueeze(0), **cache_arg(cache), use_cache=True)  # 640 tokens
        for t in range(200):
            MODEL(torch.tensor([[5]]), attention_mask=torch.ones(1, 641 + t, dtype=torch.long), **cache_arg(cache),
                  use_cache=True)
            capacities.append(cache.layers[0].capacity)
            ratios.append(cache.kv_bytes() / cache.kv_bytes_used())
    assert sorted(set(capacities)) == [720, 810, 911]  # 640 -> 720 -> 810 -> 911: 3 reallocations for 200 tokens
    assert max(ratios) == pytest.approx(810 / 721) and max(ratios) < 1.125  # right after the second growth
    small = FullCache(MODEL)
    with torch.no_grad():
        MODEL(torch.arange(3, 35).unsqueeze(0), **cache_arg(small), use_cache=True)
        MODEL(torch.tensor([[5]]), attention_mask=torch.ones(1, 33, dtype=torch.long), **cache_arg(small))
    assert small.layers[0].capacity == 32 + 16  # at least GROWTH_MIN_SLOTS


@pytest.mark.parametrize("name", sorted(CACHES))
def test_kv_bytes_used_counts_kept_tokens_and_kv_bytes_the_buffers(name):
    cache = CACHES[name](MODEL)
    ids, mask = left_padded([[5, 7, 9, 11, 13, 15], [20, 21, 22]])
    with torch.no_grad():
        MODEL(ids, attention_mask=mask, **cache_arg(cache), use_cache=True)
    cfg = MODEL.config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    kept = int(cache.kept_counts().sum())  # same count in every kv head
    assert cache.kv_bytes_used() == kept * per_token
    assert cache.kv_bytes() == sum(layer.capacity for layer in cache.layers) * 2 * per_token


def test_each_layer_stores_on_its_own_device_and_dtype():
    """Issue 10 item 4 without a GPU: a layer's slots (keys, values, positions, per-slot state) take the device and
    dtype of the keys that layer receives, as with accelerate's device_map (layers on different devices); growth
    and eviction keep them there."""
    from kvcompress import attention

    model = tiny_llama(num_hidden_layers=2)
    cache = SinkWindowCache(model, n_sink=1, window=3)
    dtypes = [torch.float32, torch.bfloat16]
    for step in range(6):
        for i, dtype in enumerate(dtypes):
            keys = torch.randn(1, 2, 4 if step == 0 else 1, 16, dtype=dtype)
            cache._owner_forward = True  # what the model's pre-hook marks when its forward uses the cache
            out_keys, out_values = cache.update(keys, keys, i)
            assert out_keys.dtype == out_values.dtype == dtype
            layer = attention._take_layer(i)
            layer.slot_state("age", heads=2)
            layer.finish_forward()
    for layer, dtype in zip(cache.layers, dtypes):
        assert layer.keys.dtype == layer.values.dtype == dtype and layer.keys.device.type == "cpu"
        assert layer.positions.device == layer.keys.device and layer.state["age"].device == layer.keys.device
        assert int(layer.valid.sum()) == 4
