"""Quantized key/value storage (`kv_bits`, `kvcompress.quantize`, `kvcompress.storage.QuantizedKV`): the round trip
stays within half a quantization step (hypothesis, planted twins), attention over dequantized pairs stays within a
bound derived from the step, every kept pair the kernel reads is its true key/value within one step (newest
`residual` tokens exact) through eviction, per-head slots, compaction, beam search, clone and pickling on Llama,
Qwen2 and Gemma 3, memory shrinks, `kv_bits=None` is bitwise today's storage, and bad input is refused."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress import AnchorCache, FullCache, H2OCache, KVzipCache, SinkWindowCache, SnapKVCache, attention, capture
from kvcompress import quantize as Q
from kvcompress.cache import cache_arg
from kvcompress.storage import DenseKV, QuantizedKV
from kvcompress.testing import CharTokenizer, left_padded, tiny_gemma3, tiny_llama, tiny_qwen2

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the round trip -----------------------------------------------------------------------------------------------
def check_round_trip(quantize_fn, x, bits, group):
    """Every element comes back within half a step (its group's scale / 2), plus what storing the scale and zero
    point in float16 costs (relative error 2^-11 of |x| and of the group's range, bounded by 2^-10 here)."""
    packed, scale, zero = quantize_fn(x, bits) if group is None else quantize_fn(x, bits, group)
    if group is None:
        back = Q.dequantize_keys(packed, scale, zero, bits, x.shape[-1], x.dtype)
        step = scale.float().expand_as(x)
    else:
        back = Q.dequantize_values(packed, scale, zero, bits, group, x.dtype)
        step = scale.float().expand(*scale.shape[:-1], group).flatten(-2)
    error = (back.float() - x.float()).abs()
    fp16 = 2**-10 * (x.float().abs() + step * (2**bits - 1))
    assert bool((error <= step / 2 + fp16).all()), float((error - step / 2 - fp16).max())


@SETTINGS
@given(st.sampled_from(Q.BITS), st.integers(1, 6), st.sampled_from([8, 16, 32]), st.integers(0, 2**16),
       st.floats(0.01, 100.0))
def test_round_trip_is_within_half_a_step(bits, tokens, dim, seed, spread):
    x = torch.randn(2, tokens, dim, generator=torch.Generator().manual_seed(seed)) * spread
    check_round_trip(Q.quantize_keys, x, bits, None)
    check_round_trip(Q.quantize_values, x, bits, 8)


def _truncating_quantize(x, bits, dim):
    """Planted: codes truncated instead of rounded."""
    levels = 2**bits - 1
    low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    zero, scale = low.half(), ((high - low) / levels).half()
    codes = ((x - zero.float()) / scale.float().clamp(min=1e-12)).floor().clamp(0, levels).to(torch.uint8)
    return Q.pack(codes, bits), scale, zero


def _off_by_one_levels(x, bits, dim):
    """Planted: scale divides by 2^bits instead of 2^bits - 1 (the maximum is clamped a step short)."""
    levels = 2**bits
    low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    zero, scale = low.half(), ((high - low) / levels).half()
    codes = ((x - zero.float()) / scale.float().clamp(min=1e-12)).round().clamp(0, levels - 1).to(torch.uint8)
    return Q.pack(codes, bits), scale, zero


@pytest.mark.parametrize("planted", [_truncating_quantize, _off_by_one_levels])
def test_round_trip_check_catches_planted_quantizers(planted, monkeypatch):
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1)) * 3
    monkeypatch.setattr(Q, "quantize", planted)
    with pytest.raises(AssertionError):
        check_round_trip(Q.quantize_keys, x, 2, None)


@pytest.mark.parametrize("bits", Q.BITS)
def test_packing_round_trips_every_code(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 17), dtype=torch.uint8)
    packed = Q.pack(codes, bits)
    assert packed.shape[-1] == -(-17 * bits // 8)
    assert torch.equal(Q.unpack(packed, bits, 17), codes)


def _unpack_as_shift_only(packed, bits, size, dtype):
    """Planted: codes taken as the shifted words' bytes without the per-byte mask (what the next byte or the sign
    carries in stays)."""
    per_byte, words = 8 // bits, packed.contiguous().view(torch.int64)
    out = torch.empty(*packed.shape, per_byte, dtype=dtype)
    for i in range(per_byte):
        out[..., i] = (words >> (i * bits)).view(torch.uint8) & (2**bits - 1) if i == 0 else (
            words >> (i * bits)).view(torch.uint8)
    return out.flatten(-2)[..., :size]


def check_unpack_as(unpack_as, bits, size, dtype):
    g = torch.Generator().manual_seed(bits * 1000 + size)
    codes = torch.randint(0, 2**bits, (3, 4, size), dtype=torch.uint8, generator=g)
    codes[0] = 2**bits - 1  # every byte 0xff: the int64 words are negative, and shifts carry ones in
    got = unpack_as(Q.pack(codes, bits), bits, size, dtype)
    assert got.dtype == dtype and torch.equal(got, codes.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("size", [12, 16, 17, 20, 32, 48, 64, 128])  # packed widths tiled by int64, int32, int16, bytes
def test_unpack_as_is_unpack_then_convert(bits, size, dtype):
    """The wide-word unpacking `dequantize` uses gives the codes `unpack` gives, in the cache dtype."""
    check_unpack_as(Q.unpack_as, bits, size, dtype)


@pytest.mark.parametrize("bits", [4, 2])
def test_unpack_as_check_catches_a_missing_mask(bits):
    with pytest.raises(AssertionError):
        check_unpack_as(_unpack_as_shift_only, bits, 64, torch.float32)


# --- attention over dequantized pairs against the float64 reference ----------------------------------------------
def attention_bound(query, key_step, value_error, value_max, scaling):
    """Per query (B, Hq, Q): with |k^ - k| <= key_step / 2 per channel, every logit moves by at most
    e = scaling * sum_c |q_c| key_step_c / 2; softmax ratios then stay in [exp(-2e), exp(2e)], so
    |o^ - o| <= (exp(2e) - 1) * max|v| + max|v^ - v|."""
    groups = query.shape[1] // key_step.shape[1]
    step = key_step.repeat_interleave(groups, dim=1)  # (B, Hq, K, d)
    logit = scaling * torch.einsum("bhqd,bhkd->bhqk", query.abs().double(), step.double() / 2).amax(-1)
    return (torch.exp(2 * logit) - 1) * value_max + value_error


@SETTINGS
@given(st.sampled_from(Q.BITS), st.integers(1, 4), st.integers(2, 40), st.integers(0, 2**16))
def test_attention_over_dequantized_pairs_is_within_the_derived_bound(bits, q_len, k_len, seed):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 4, q_len, 16, generator=g)
    key, value = torch.randn(1, 2, k_len, 16, generator=g), torch.randn(1, 2, k_len, 16, generator=g)
    k_hat = Q.dequantize_keys(*Q.quantize_keys(key, bits), bits, 16, key.dtype)
    v_hat = Q.dequantize_values(*Q.quantize_values(value, bits, 8), bits, 8, value.dtype)
    _, k_scale, _ = Q.quantize_keys(key, bits)
    scaling = 16**-0.5
    got = attention.attend(query, k_hat, v_hat, None, scaling=scaling)  # (B, Q, Hq, d)
    exact = attention.attend(query.double(), key.double(), value.double(), None, scaling=scaling, backend="reference")
    bound = attention_bound(query, k_scale.float().expand_as(key), (v_hat - value).abs().max().item(),
                            value.abs().max().item(), scaling)
    error = (got.double() - exact).abs().amax(dim=-1).transpose(1, 2)  # (B, Hq, Q)
    assert bool((error <= bound + 1e-5).all()), float((error - bound).max())


# --- what the kernel reads, through the whole cache ------------------------------------------------------------------
class Recording:
    """Records every (row, kv head, stream position) -> (key, value) a layer was given (`update`), per layer."""

    def __init__(self, cache):
        self.written = [dict() for _ in cache.layers]
        for layer, table in zip(cache.layers, self.written):
            update = layer.update

            def record(keys, values, *args, _update=update, _layer=layer, _table=table, **kwargs):
                for i in range(keys.shape[2]):
                    for b in range(keys.shape[0]):
                        for h in range(keys.shape[1]):
                            _table[b, h, _layer.seen + i] = (keys[b, h, i].clone(), values[b, h, i].clone())
                return _update(keys, values, *args, **kwargs)

            layer.update = record


def run_pair(model, make, rows, steps, bits, residual, group):
    """The same position-based strategy on dense and on quantized storage: prefill `rows` (left-padded), then `steps`
    decode tokens. Returns both caches and the quantized cache's record of what it was given."""
    ids, mask = left_padded(rows)
    exact, quantized = make(model), make(model, kv_bits=bits, residual=residual, group=group)
    record = Recording(quantized)
    with torch.no_grad():
        for cache in (exact, quantized):
            model(ids, attention_mask=mask, **cache_arg(cache))
            feed_mask = mask
            for t in range(steps):
                feed_mask = torch.cat([feed_mask, torch.ones_like(mask[:, :1])], dim=1)
                model(torch.full((len(rows), 1), 3 + t), attention_mask=feed_mask, **cache_arg(cache))
    return exact, quantized, record, ids.shape[1]


def _within_a_step(got, true, levels, lane_keys):
    """got/true (n, d): keys within one step of the per-channel range of every key the lane was ever given
    (`lane_keys`: a quantized page's tokens are among them), values within one step of their own per-token range."""
    k_step = (lane_keys.amax(0) - lane_keys.amin(0)) / levels
    v_step = (true[1].amax(-1, keepdim=True) - true[1].amin(-1, keepdim=True)) / levels
    slack = 2**-9 * (true[0].abs().amax() + true[1].abs().amax() + 1)  # float16 scales and zero points
    return (bool(((got[0] - true[0]).abs() <= k_step + slack).all()),
            bool(((got[1] - true[1]).abs() <= v_step + slack).all()))


def check_kernel_reads_true_pairs(exact, quantized, record, prompt):
    """For every layer, row, kv head and kept position, what the kernel reads (`store.read`) is within one step of
    the truth: the pair the layer was given (values always; keys unless stored before RoPE), and for prompt tokens
    also the dense twin's pair; the lane's newest `residual` kept tokens sit in full-precision pages."""
    levels = 2**quantized.kv_bits - 1
    cache_positions = quantized.position_mode == "cache"
    for le, lq, written in zip(exact.layers, quantized.layers, record.written):
        ke, ve = le.store.read(le.used)
        kq, vq = lq.store.read(lq.used)
        heads = kq.shape[1]
        pe, pq = le.positions.expand(-1, heads, -1), lq.positions.expand(-1, heads, -1)
        for b in range(kq.shape[0]):
            for h in range(heads):
                slot_e = {int(p): i for i, p in enumerate(pe[b, h]) if p >= 0}
                slot_q = {int(p): i for i, p in enumerate(pq[b, h]) if p >= 0}
                assert slot_e.keys() == slot_q.keys()
                kept = sorted(slot_q)
                if not kept:
                    continue
                got = (kq[b, h, [slot_q[p] for p in kept]], vq[b, h, [slot_q[p] for p in kept]])
                given = tuple(torch.stack([written[b, h, p][i] for p in kept]) for i in (0, 1))
                lane = torch.stack([pair[0] for (row, head, _), pair in written.items() if (row, head) == (b, h)])
                keys_ok, values_ok = _within_a_step(got, given, levels, lane)
                assert values_ok and (keys_ok or cache_positions), (lq.layer_idx, b, h)
                early = [p for p in kept if p < prompt]
                if early:
                    twin = (ke[b, h, [slot_e[p] for p in early]], ve[b, h, [slot_e[p] for p in early]])
                    mine = (kq[b, h, [slot_q[p] for p in early]], vq[b, h, [slot_q[p] for p in early]])
                    assert all(_within_a_step(mine, twin, levels, lane)), (lq.layer_idx, b, h, "prompt tokens")
                store = lq.store
                for p in kept[-quantized.residual:] if quantized.residual else []:
                    assert int(store.table[b, h, slot_q[p] // store.page]) >= 0, ("residual token quantized", p)


ROWS = [list(range(3, 40)), list(range(50, 71))]
POSITION_BASED = {
    "full": lambda m, **k: FullCache(m, **k),
    "sink_window": lambda m, **k: SinkWindowCache(m, n_sink=2, window=12, **k),
    "sink_window_cache_positions": lambda m, **k: SinkWindowCache(m, n_sink=2, window=12, positions="cache", **k),
    "anchor": lambda m, **k: AnchorCache(m, anchor_ids=[14, 26], **k),  # decoding drops many pairs at once
}


@pytest.mark.parametrize("name", sorted(POSITION_BASED))
@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gemma3], ids=["llama", "qwen2", "gemma3"])
def test_the_kernel_reads_every_kept_pair_within_one_step(name, bits, build):
    model = build(seed=4)
    run = run_pair(model, POSITION_BASED[name], ROWS, 9, bits, residual=3, group=4)
    assert any((layer.store.table <= -2).any() for layer in run[1].layers)  # pages really got quantized
    check_kernel_reads_true_pairs(*run)


def _read_reference(store: QuantizedKV, used: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain way to read a quantized store: dequantize EVERY quantized page, append them to the full-precision
    pool, and gather each logical slot's row through the table (-1: the zero page 0)."""
    q = store.quantized
    dq_keys = Q.dequantize_keys(q["keys"], q["key_scale"], q["key_zero"], store.bits, store.key_pool.shape[-1],
                                store.key_pool.dtype)
    dq_values = Q.dequantize_values(q["values"], q["value_scale"], q["value_zero"], store.bits, store.group,
                                    store.value_pool.dtype)
    keys = torch.cat([store.key_pool.flatten(0, 1), dq_keys.flatten(0, 1)])
    values = torch.cat([store.value_pool.flatten(0, 1), dq_values.flatten(0, 1)])
    slots = torch.arange(used).expand(*store.table.shape[:2], used)
    entry, offset = store.table.gather(-1, slots // store.page), slots % store.page
    quantized_rows = store.key_pool.shape[0] * store.page + (-entry - 2).clamp(min=0) * store.page + offset
    rows = torch.where(entry <= -2, quantized_rows, entry.clamp(min=0) * store.page + offset)
    return keys[rows], values[rows]


@pytest.mark.parametrize("name", ["full", "anchor"])
@pytest.mark.parametrize("bits", Q.BITS)
def test_read_in_page_order_equals_dequantizing_every_page(name, bits):
    """`QuantizedKV.read` gathers the packed pages in table order and dequantizes only those: bitwise what
    dequantizing every page and gathering the slots gives (full-precision pages, dead slots, unpaged slots)."""
    _, quantized, _, _ = run_pair(tiny_llama(seed=4), POSITION_BASED[name], ROWS, 9, bits, residual=3, group=4)
    checked = 0
    for layer in quantized.layers:
        store = layer.store
        if not bool((store.table <= -2).any()):
            continue
        used = layer.used
        got, want = store.read(used), _read_reference(store, used)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), layer.layer_idx
        checked += 1
    assert checked > 0


class _ResidualIgnored(QuantizedKV):
    def settle(self, positions, seen):
        residual, self.residual = self.residual, 0
        try:
            super().settle(positions, seen)
        finally:
            self.residual = residual


class _ShrinkForgetsRenumbering(QuantizedKV):
    def _shrink(self):
        q = self.quantized
        if len(q["free"]) >= max(4, q["keys"].shape[0] // 4):
            quantized = self.table <= -2
            used = -self.table[quantized] - 2
            for name in ("keys", "key_scale", "key_zero", "values", "value_scale", "value_zero"):
                q[name] = q[name][used]
            q["free"] = []  # planted: the table still points at the old page numbers


@pytest.mark.parametrize("planted, strategy", [(_ResidualIgnored, "full"), (_ShrinkForgetsRenumbering, "anchor")])
def test_the_read_check_catches_planted_store_bugs(planted, strategy, monkeypatch):
    import kvcompress.layer

    model = tiny_llama(seed=4)
    check_kernel_reads_true_pairs(*run_pair(model, POSITION_BASED[strategy], ROWS, 30, 4, residual=3, group=2))
    monkeypatch.setattr(kvcompress.layer, "QuantizedKV", planted)
    with pytest.raises((AssertionError, IndexError)):
        check_kernel_reads_true_pairs(*run_pair(model, POSITION_BASED[strategy], ROWS, 30, 4, residual=3, group=2))


@pytest.mark.parametrize("make", [
    lambda m, **k: H2OCache(m, heavy=6, recent=4, **k),
    lambda m, **k: SnapKVCache(m, budget=8, window=2, kernel=3, **k),
    lambda m, **k: KVzipCache(m, CharTokenizer(), budget=6, chunk=8, allocation="global", **k),
], ids=["h2o", "snapkv", "kvzip_global"])
def test_attention_aware_strategies_run_on_quantized_storage(make):
    """Strategies that choose by attention (per-head slots, slot reuse, compaction, a question forward) run on
    quantized storage; their kept pairs stay within budget and the memory held is below the dense cache's."""
    model = tiny_llama(seed=5)
    ids, mask = left_padded(ROWS)
    dense, quantized = make(model), make(model, kv_bits=4, residual=2, group=4)
    with torch.no_grad():
        for cache in (dense, quantized):
            model(ids, attention_mask=mask, **cache_arg(cache))
            grown = torch.cat([mask, torch.ones_like(mask[:, :6])], 1)
            model(torch.full((2, 6), 9), attention_mask=grown, **cache_arg(cache))
            for t in range(12):
                grown = torch.cat([grown, torch.ones_like(mask[:, :1])], 1)
                model(torch.full((2, 1), 5 + t), attention_mask=grown, **cache_arg(cache))
    assert quantized.kv_bytes() < dense.kv_bytes()
    assert torch.equal(quantized.kept_counts().sum(), dense.kept_counts().sum()) or isinstance(dense, KVzipCache)


def test_beam_search_clone_and_pickle_on_quantized_storage():
    model = tiny_llama(seed=6)
    ids = torch.arange(3, 33).unsqueeze(0)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    cache = SinkWindowCache(model, n_sink=2, window=10, kv_bits=4, residual=2, group=4)
    out = model.generate(ids, **cache_arg(cache), **kwargs)  # beams: repeat, reorder, select rows
    assert out.shape[1] == ids.shape[1] + 6
    cache = FullCache(model, kv_bits=2, residual=2, group=4)
    with torch.no_grad():
        model(ids, **cache_arg(cache))
    twins = [cache.clone(), pickle.loads(pickle.dumps(cache)).attach(model)]
    with torch.no_grad():
        expected = model(torch.tensor([[7]]), **cache_arg(cache)).logits
        for twin in twins:
            torch.testing.assert_close(model(torch.tensor([[7]]), **cache_arg(twin)).logits, expected, atol=0, rtol=0)


def test_memory_shrinks_with_the_bits():
    model = tiny_llama(seed=7, head_dim=32, hidden_size=128, num_attention_heads=4)
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    held = {}
    for bits in (None, 8, 4, 2):
        cache = FullCache(model, kv_bits=bits, residual=8, group=32)
        with torch.no_grad():
            model(ids, **cache_arg(cache))
        held[bits] = cache.kv_bytes()
    assert held[None] > held[8] > held[4] > held[2]
    assert held[4] < 0.45 * held[None], held  # a tiny model: one zero page and the residual page weigh here


def test_no_bits_is_todays_dense_storage_bitwise():
    model = tiny_llama(seed=8)
    ids, mask = left_padded(ROWS)
    a, b = SinkWindowCache(model, n_sink=2, window=8), SinkWindowCache(model, n_sink=2, window=8, kv_bits=None)
    with torch.no_grad():
        la = model(ids, attention_mask=mask, **cache_arg(a)).logits
        lb = model(ids, attention_mask=mask, **cache_arg(b)).logits
    assert isinstance(b.layers[0].store, DenseKV) and torch.equal(la, lb)


# --- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(kv_bits=3), r"kv_bits must be None or one of \(8, 4, 2\), got 3"),
    (dict(kv_bits=0), r"kv_bits must be None or one of \(8, 4, 2\), got 0"),
    (dict(kv_bits=True), r"kv_bits must be None or one of \(8, 4, 2\), got True"),
    (dict(kv_bits=4, residual=-1), r"residual must be an integer >= 0, got -1"),
    (dict(kv_bits=4, group=12), r"group \(12\) must divide the head dimension \(16\)"),
    (dict(kv_bits=4, group=0), r"group must be an integer >= 1, got 0"),
])
def test_bad_storage_options_name_the_parameter(options, message):
    with pytest.raises(ValueError, match=message):
        FullCache(tiny_llama(), **options)


def test_unsupported_dtype_is_refused():
    from kvcompress.model_checks import check_quantizable

    model = tiny_llama().to(torch.float16)
    FullCache(model, kv_bits=4, group=8)  # half precision is fine

    class IntegerWeights:  # what a model with integer (quantized) weights reports
        config = model.config

        def parameters(self):
            yield torch.zeros(2, dtype=torch.int8)

    with pytest.raises(ValueError, match=r"quantized storage \(kv_bits\) supports models in"):
        check_quantizable(IntegerWeights(), 8)


def test_for_budget_takes_the_storage_options():
    model = tiny_llama()
    cache = SnapKVCache.for_budget(model, None, 16, kv_bits=8, residual=4, group=8)
    assert (cache.kv_bits, cache.residual, cache.group, cache.budget) == (8, 4, 8, 16)


def test_storage_cannot_change_after_the_first_forward():
    model = tiny_llama()
    cache = FullCache(model)
    with torch.no_grad():
        model(torch.tensor([[3, 4]]), **cache_arg(cache))
    with pytest.raises(RuntimeError, match="before the cache's first forward"):
        cache.set_storage(kv_bits=4)


# --- demote instead of drop (MiKV) -----------------------------------------------------------------------------------
def _decode(model, cache, ids, steps=10):
    out = []
    with torch.no_grad():
        out.append(model(ids, **cache_arg(cache)).logits[:, -1])
        for t in range(steps):
            out.append(model(ids[:, t : t + 1], **cache_arg(cache)).logits[:, -1])
    return torch.stack(out, 1)


DEMOTE_IDS = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [
    lambda m, **k: SinkWindowCache(m, n_sink=2, window=10, **k),
    lambda m, **k: H2OCache(m, heavy=6, recent=6, **k),
    lambda m, **k: SnapKVCache(m, budget=12, window=4, kernel=3, **k),
], ids=["sink_window", "h2o", "snapkv"])
def test_demoted_pairs_are_still_attended_and_outside_the_budget(make):
    """evicted=4: every token ever fed stays visible to later queries (the freed ones demoted), the strategy still
    keeps at most its budget in its own slots, the demoted pairs are counted in the bytes, and the logits come much
    closer to the full cache's than when the freed pairs are dropped."""
    model = tiny_llama(seed=3)
    full = _decode(model, FullCache(model), DEMOTE_IDS)
    dropped = _decode(model, make(model), DEMOTE_IDS)
    cache = make(model, evicted=4, group=4)
    with capture() as records:
        demoted = _decode(model, cache, DEMOTE_IDS)
    last = [r for r in records if r["q_offset"] == DEMOTE_IDS.shape[1] + 9]  # the last decode step, every layer
    for record in last:
        seen = record["kv_positions"][record["allowed"][:, :, -1]]
        assert set(seen.tolist()) == set(range(DEMOTE_IDS.shape[1] + 10))  # nothing lost
    assert int(cache.kept_counts().max()) <= 12
    assert all(layer.demoted.used_bytes() > 0 for layer in cache.layers)
    assert (demoted - full).abs().max() < 0.1 * (dropped - full).abs().max()


def test_demoted_pairs_follow_clone_pickle_and_beam_search():
    model = tiny_llama(seed=6)
    ids = torch.arange(3, 33).unsqueeze(0)
    out = model.generate(ids, **cache_arg(SinkWindowCache(model, n_sink=2, window=6, evicted=2, group=4)),
                         max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 5
    cache = SinkWindowCache(model, n_sink=2, window=6, evicted=4, group=4)
    with torch.no_grad():
        model(ids, **cache_arg(cache))
    twins = [cache.clone(), pickle.loads(pickle.dumps(cache)).attach(model)]
    with torch.no_grad():
        expected = model(torch.tensor([[7]]), **cache_arg(cache)).logits
        for twin in twins:
            torch.testing.assert_close(model(torch.tensor([[7]]), **cache_arg(twin)).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("options, message", [
    (dict(evicted=3), r"evicted must be 'drop', 4 or 2, got 3"),
    (dict(evicted=True), r"evicted must be 'drop', 4 or 2, got True"),
    (dict(evicted="keep"), r"evicted must be 'drop', 4 or 2, got 'keep'"),
    (dict(evicted=4, positions="cache"), r"not supported with positions='cache'"),
])
def test_bad_demotion_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SinkWindowCache(tiny_llama(), n_sink=1, window=4, **options)


def test_the_demotion_check_catches_pairs_that_are_dropped_anyway(monkeypatch):
    """Planted: the layer frees slots without handing their pairs to the demoted store."""
    from kvcompress.layer import CompressedLayer

    monkeypatch.setattr(CompressedLayer, "_demote", lambda self, freed: None)
    with pytest.raises(AssertionError):
        test_demoted_pairs_are_still_attended_and_outside_the_budget(
            lambda m, **k: SinkWindowCache(m, n_sink=2, window=10, **k))
