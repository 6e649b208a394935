"""What the core hands an attention-aware strategy (`Observation`), against an fp64 definition built from what the
kernel saw (`capture()`): queries, probabilities of the last w queries, attention received."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcompress.attention as core
from kvcompress import CompressedCache, SinkWindowCache, capture
from kvcompress.attention import attention_max_received, attention_probs, attention_received
from kvcompress.cache import cache_arg
from kvcompress.selection import per_kv_head, recent, top_k
from kvcompress.testing import left_padded, max_step_error, tiny_gemma3, tiny_llama


class Recorder(CompressedCache):
    """Observes everything, records it with the slots' keys, and keeps a per-kv-head top-k plus a recent window
    (so later forwards see evicted, reused and per-head slots)."""

    observe_queries = True
    observe_received = True
    observe_max_received = True

    def __init__(self, model, window=3, keep=4):
        super().__init__(model)
        self.observe_window, self.keep = window, keep
        self.seen_observations = []

    def select(self, layer):
        obs = layer.observation
        self.seen_observations.append(
            {"queries": obs.queries.clone(), "probs": obs.probs.clone(), "received": obs.received.clone(),
             "max_received": obs.max_received.clone(), "keys": layer.keys[:, :, : layer.used].clone()}
        )
        score = per_kv_head(obs.received, layer.keys.shape[1])
        return top_k(score, layer.valid, self.keep) | recent(layer, 2)


def _definition(query, key, allowed, scale):
    """fp64 probabilities (B, Hq, Q, K), one (b, h, i) at a time over the keys `allowed` (B, 1|Hkv, Q, K) shows."""
    batch, heads, q_len, _ = query.shape
    groups = heads // key.shape[1]
    out = torch.zeros(batch, heads, q_len, key.shape[2], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            visible = allowed[b, min(h // groups, allowed.shape[1] - 1)]
            for i in range(q_len):
                seen = visible[i].nonzero().flatten()
                if len(seen):
                    scores = key[b, h // groups, seen].double() @ query[b, h, i].double() * scale
                    out[b, h, i, seen] = scores.softmax(0)
    return out


def _check_against_definition(model, ids, mask, steps=3, window=3):
    cache = Recorder(model, window=window)
    with capture() as records, torch.no_grad():
        model.generate(ids, attention_mask=mask, **cache_arg(cache), max_new_tokens=steps, min_new_tokens=steps,
                       do_sample=False, pad_token_id=0)
    assert len(records) == len(cache.seen_observations) == model.config.num_hidden_layers * steps
    heads_per_layer = set()
    for record, seen in zip(records, cache.seen_observations):
        scale = model.model.layers[record["layer_idx"]].self_attn.scaling  # Gemma 3: query_pre_attn_scalar
        expected = _definition(seen["queries"], seen["keys"], record["allowed"], scale)
        q_len = expected.shape[2]
        assert seen["probs"].shape[2] == min(window, q_len)
        torch.testing.assert_close(seen["probs"].double(), expected[:, :, -min(window, q_len):], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(seen["received"].double(), expected.sum(dim=2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seen["max_received"].double(), expected.amax(dim=2), atol=1e-6, rtol=1e-5)
        heads_per_layer.add(record["allowed"].shape[1])
    return heads_per_layer


def test_observation_equals_the_definition_with_padding_eviction_and_per_head_slots():
    model = tiny_llama()
    ids, mask = left_padded([list(range(3, 17)), list(range(20, 28))])
    heads = _check_against_definition(model, ids, mask)
    assert heads == {1, model.config.num_key_value_heads}  # prefill shared, decoding per kv head


def test_observation_on_sliding_window_layers():
    model = tiny_gemma3()  # sliding layers: the window is part of the mask the observation must use
    ids = torch.arange(3, 3 + model.config.sliding_window + 5).unsqueeze(0)
    _check_against_definition(model, ids, torch.ones_like(ids), steps=2)


def test_the_check_catches_an_observation_that_ignores_the_mask(monkeypatch):
    """Planted twin: the core observing without the mask (every slot visible) must fail the same check."""
    real = core.observe
    monkeypatch.setattr(core, "observe", lambda cache, q, k, mask, scaling, *rest: real(cache, q, k, None, scaling))
    ids, mask = left_padded([list(range(3, 17)), list(range(20, 28))])
    with pytest.raises(AssertionError):
        _check_against_definition(tiny_llama(), ids, mask)


def _received_error_with_pads_in_a_later_chunk(model) -> float:
    """A second prefill chunk whose row 1 starts with pads (they see row 1's first chunk): the largest error of the
    recorded received / max received attention against the definition with the pad queries observing nothing."""
    cache = Recorder(model, keep=64)
    first = torch.arange(3, 9).repeat(2, 1)
    second = torch.tensor([[30, 31, 32, 33, 34], [0, 0, 40, 41, 42]])
    mask = torch.cat([torch.ones_like(first), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])], dim=1)
    with torch.no_grad():
        model(first, attention_mask=mask[:, :6], **cache_arg(cache))
        cache.seen_observations.clear()
        with capture() as records:
            model(second, attention_mask=mask, **cache_arg(cache))
    error = 0.0
    real_query = mask[:, 6:].bool().view(2, 1, 5, 1)
    for record, seen in zip(records, cache.seen_observations):
        scale = model.model.layers[record["layer_idx"]].self_attn.scaling
        expected = _definition(seen["queries"], seen["keys"], record["allowed"], scale) * real_query
        error = max(error, (seen["received"].double() - expected.sum(dim=2)).abs().max().item(),
                    (seen["max_received"].double() - expected.amax(dim=2)).abs().max().item())
    return error


def test_pad_queries_of_a_later_chunk_observe_nothing():
    assert _received_error_with_pads_in_a_later_chunk(tiny_llama()) < 1e-5


def test_the_check_catches_pad_queries_counted_in_the_received_attention(monkeypatch):
    """Planted twin: the blockwise kernel that also reduces the probabilities (a forward observing what every
    query gives) counting the pad queries."""
    real = core._attention_with_reductions
    monkeypatch.setattr(core, "_attention_with_reductions",
                        lambda q, k, v, mask, scaling, new_padding, *rest: real(q, k, v, mask, scaling, None, *rest))
    assert _received_error_with_pads_in_a_later_chunk(tiny_llama()) > 1e-3


def test_the_check_catches_a_kv_head_mapping_bug_in_the_reducing_kernel(monkeypatch):
    """Planted twin: the same kernel mixing the values of the wrong kv head: the logits check of a per-kv-head
    cache fails."""
    real = core._attention_with_reductions
    monkeypatch.setattr(core, "_attention_with_reductions",
                        lambda q, k, v, *rest: real(q, k, v.flip(1), *rest))
    model = tiny_llama()
    ids, mask = left_padded([list(range(3, 20)), list(range(5, 14))])
    assert max_step_error(model, Recorder(model), ids, mask, max_new_tokens=2)[0] > 1e-3


def test_per_head_selection_is_exact():
    model = tiny_llama()
    ids, mask = left_padded([list(range(3, 20)), list(range(5, 14))])
    error, visible, _ = max_step_error(model, Recorder(model), ids, mask, max_new_tokens=6)
    assert visible.dim() == 4 and visible.shape[1] == model.config.num_key_value_heads  # (B, Hkv, N, N)
    assert not torch.equal(visible[:, 0], visible[:, 1])  # the kv heads really kept different tokens
    assert error < 1e-4


def test_nothing_is_observed_unless_declared_and_nothing_is_kept_after_the_forward():
    model = tiny_llama()
    seen = []

    class Plain(SinkWindowCache):
        def select(self, layer):
            seen.append(layer.observation)
            return super().select(layer)

    cache = Plain(model, n_sink=1, window=3)
    with torch.no_grad():
        model(torch.arange(3, 12).unsqueeze(0), **cache_arg(cache))
    assert seen == [None] * model.config.num_hidden_layers
    recorder = Recorder(model)
    with torch.no_grad():
        model(torch.arange(3, 12).unsqueeze(0), **cache_arg(recorder))
    assert len(recorder.seen_observations) == model.config.num_hidden_layers
    assert all(layer.observation is None for layer in recorder.layers)  # freed once the layer evicted


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 7), st.integers(0, 6), st.integers(1, 4),
       st.integers(0, 2**16))
def test_received_is_the_sum_of_the_probabilities(batch, kv_heads, q_len, extra, block, seed):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * 2, q_len, 8, generator=g)
    key = torch.randn(batch, kv_heads, q_len + extra, 8, generator=g)
    mask = torch.rand(batch, kv_heads, q_len, q_len + extra, generator=g) < 0.6  # per kv head, some rows empty
    expected = attention_probs(query, key, mask).sum(dim=2)
    torch.testing.assert_close(attention_received(query, key, mask, block_size=block), expected, atol=1e-6,
                               rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 7), st.integers(0, 6), st.integers(1, 4),
       st.integers(0, 2**16))
def test_max_received_is_the_largest_probability(batch, kv_heads, q_len, extra, block, seed):
    """Blockwise max equals the max of the full probability matrix, for any block size (a block-local max or a
    max over the wrong axis would differ once there are several blocks)."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * 2, q_len, 8, generator=g)
    key = torch.randn(batch, kv_heads, q_len + extra, 8, generator=g)
    mask = torch.rand(batch, kv_heads, q_len, q_len + extra, generator=g) < 0.6
    expected = attention_probs(query, key, mask).amax(dim=2)
    torch.testing.assert_close(attention_max_received(query, key, mask, block_size=block), expected, atol=1e-6,
                               rtol=1e-5)


def _scoped_max_error(batch, kv_heads, q_len, extra, block, seed) -> float:
    """Largest gap between the max received with a scope (each query's probabilities renormalised over the keys in
    scope, KVzip's chunked scoring) from `attention_max_received` and the reducing kernel, and the fp64 definition:
    the softmax over the keys both the mask and the scope show."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * 2, q_len, 8, generator=g)
    key = torch.randn(batch, kv_heads, q_len + extra, 8, generator=g)
    value = torch.randn(batch, kv_heads, q_len + extra, 8, generator=g)
    mask = torch.rand(batch, kv_heads, q_len, q_len + extra, generator=g) < 0.7
    scope = torch.rand(batch, kv_heads, q_len + extra, generator=g) < 0.5  # per kv head
    expected = _definition(query, key, mask & scope.unsqueeze(2), query.shape[-1] ** -0.5).amax(dim=2)
    blockwise = attention_max_received(query, key, mask, block_size=block, scope=scope)
    _, (_, fused) = core._attention_with_reductions(query, key, value, mask, None, None, _MaxObserver(), scope)
    return max((got.double() - expected).abs().max().item() for got in (blockwise, fused))


class _MaxObserver:
    observe_max_received = True


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 7), st.integers(0, 6), st.integers(1, 4),
       st.integers(0, 2**16))
def test_max_received_in_a_scope_is_the_softmax_over_the_scope(batch, kv_heads, q_len, extra, block, seed):
    assert _scoped_max_error(batch, kv_heads, q_len, extra, block, seed) < 1e-5


def test_the_scope_check_catches_a_max_not_renormalised(monkeypatch):
    """Planted twin: probabilities masked to the scope but not renormalised over it."""
    monkeypatch.setattr(core, "max_over_queries",
                        lambda probs, scope=None: (probs if scope is None else probs * scope).amax(dim=2))
    assert _scoped_max_error(2, 2, 6, 4, 2, seed=3) > 1e-2


def _chunk_after_context(batch, kv_heads, context, q_len, g):
    """(B, Hkv, q, context + q) bool: a context seen with holes, then the chunk's own tokens causally (KVzip's
    reconstruction forward): a block of early queries sees none of the chunk's later keys."""
    seen_context = torch.rand(batch, kv_heads, q_len, context, generator=g) < 0.8
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril() & (torch.rand(batch, kv_heads, q_len, q_len,
                                                                             generator=g) < 0.9)
    return torch.cat([seen_context, causal], dim=-1)


def _blockwise_matches(batch, kv_heads, context, q_len, block, seed) -> bool:
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * 2, q_len, 8, generator=g)
    key = torch.randn(batch, kv_heads, context + q_len, 8, generator=g)
    mask = _chunk_after_context(batch, kv_heads, context, q_len, g)
    probs = _definition(query, key, mask, query.shape[-1] ** -0.5)
    pairs = [(attention_probs(query, key, mask, block_size=block), probs),
             (attention_received(query, key, mask, block_size=block), probs.sum(dim=2)),
             (attention_max_received(query, key, mask, block_size=block), probs.amax(dim=2))]
    return all(torch.allclose(got.double(), want, atol=1e-6, rtol=1e-5) for got, want in pairs)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(0, 5), st.integers(1, 8), st.integers(1, 4),
       st.integers(0, 2**16))
def test_blocks_mask_only_the_keys_some_query_of_the_block_cannot_see(batch, kv_heads, context, q_len, block, seed):
    """A block of queries scores only the keys up to the last one any of them sees and masks only from the first
    one some of them cannot see (`_visible_span`); probabilities, received and max received still equal the dense
    fp64 definition for every block size."""
    assert _blockwise_matches(batch, kv_heads, context, q_len, block, seed)


@pytest.mark.parametrize("planted", ["stops one key early", "masks one key late"])
def test_the_block_check_catches_a_wrong_visible_span(monkeypatch, planted):
    span = core._visible_span
    if planted == "stops one key early":
        monkeypatch.setattr(core, "_visible_span", lambda m: (min(span(m)[0], m.shape[-1] - 1), m.shape[-1] - 1))
    else:
        monkeypatch.setattr(core, "_visible_span", lambda m: (span(m)[0] + 1, span(m)[1]))
    assert not _blockwise_matches(1, 2, 3, 6, 2, seed=1)
