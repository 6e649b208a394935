"""SinkWindowCache (StreamingLLM): exactness, hypothesis invariants (each also run on a planted bug), positions."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvcompress import FullCache, SinkWindowCache
from kvcompress.cache import CompressedCache
from kvcompress.testing import left_padded, max_step_error, tiny_llama

MODEL = tiny_llama(seed=3)  # read-only across hypothesis examples; caches are built per example
PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _teacher_forced(model, cache, ids, mask, continuation):
    """Feed `ids` then the fixed `continuation` (B, T) one token at a time with direct model() calls.

    Returns per-forward last logits (B, T + 1, V) and the kept positions of every layer after every forward:
    a list of (L, B) lists of position lists.
    """
    logits, kept = [], []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
        kept.append([cache.kept_positions(layer) for layer in range(len(cache.layers))])
        for t in range(continuation.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(continuation[:, t : t + 1], attention_mask=mask, past_key_values=cache)
            logits.append(out.logits[:, -1])
            kept.append([cache.kept_positions(layer) for layer in range(len(cache.layers))])
    return torch.stack(logits, 1), kept


@st.composite
def batches(draw):
    """Left-padded prompts of random lengths, a fixed continuation, and n_sink/window."""
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    ids, mask = left_padded(rows)
    continuation = torch.randint(3, 128, (len(rows), draw(st.integers(1, 8))), generator=g)
    return rows, ids, mask, continuation, draw(st.integers(0, 4)), draw(st.integers(1, 8))


# --- property checkers: each raises AssertionError on a violation -----------------------------------------------
def check_budget_and_choice(cache_cls, rows, ids, mask, continuation, n_sink, window):
    """Every layer and row keeps <= n_sink + window tokens: exactly its first n_sink and last window real tokens."""
    cache = cache_cls(MODEL, n_sink=n_sink, window=window)
    _, kept = _teacher_forced(MODEL, cache, ids, mask, continuation)
    pads = [ids.shape[1] - len(r) for r in rows]
    for step, per_layer in enumerate(kept):
        seen = ids.shape[1] + step
        for layer_rows in per_layer:
            for b, positions in enumerate(layer_rows):
                real = list(range(pads[b], seen))
                expected = sorted(set(real[:n_sink]) | set(real[-window:]))
                assert len(positions) <= n_sink + window, (step, b, positions)
                assert positions == expected, (step, b, positions, expected)


def check_large_window_is_full_cache(cache_cls, rows, ids, mask, continuation, n_sink, window):
    """With n_sink + window >= every row's length, logits equal FullCache's."""
    longest = ids.shape[1] + continuation.shape[1]
    got, _ = _teacher_forced(MODEL, cache_cls(MODEL, n_sink=n_sink, window=longest), ids, mask, continuation)
    expected, _ = _teacher_forced(MODEL, FullCache(MODEL), ids, mask, continuation)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def check_rows_independent(cache_cls, rows, ids, mask, continuation, n_sink, window):
    """A row's logits and kept tokens in a padded batch equal those of the row run alone."""
    batch_logits, batch_kept = _teacher_forced(MODEL, cache_cls(MODEL, n_sink=n_sink, window=window), ids, mask, continuation)
    for b, row in enumerate(rows):
        pad = ids.shape[1] - len(row)
        alone_ids = torch.tensor([row])
        logits, kept = _teacher_forced(
            MODEL, cache_cls(MODEL, n_sink=n_sink, window=window), alone_ids, torch.ones_like(alone_ids), continuation[b : b + 1]
        )
        torch.testing.assert_close(batch_logits[b], logits[0], atol=1e-5, rtol=0)
        for step in range(len(kept)):
            assert [p - pad for p in batch_kept[step][0][b]] == kept[step][0][0]


# --- planted bugs -----------------------------------------------------------------------------------------------
class SelectEachForward(SinkWindowCache):
    """SinkWindowCache evicting through `select` after every forward (no decode fast path): the planted bugs below
    are bugs of `select`; tests/test_sink_window_fast_path.py holds the fast path equal to this."""

    evict = CompressedCache.evict


class _OneTooMany(SelectEachForward):
    def select(self, layer):
        valid = layer.valid
        rank = valid.cumsum(-1) - 1
        from_end = valid.sum(-1, keepdim=True) - 1 - rank
        return valid & ((rank < self.n_sink) | (from_end <= self.window))


class _AlwaysDropsOldest(SelectEachForward):
    def select(self, layer):
        keep = super().select(layer)
        first_unsunk = (layer.valid.cumsum(-1) == self.n_sink + 1) & layer.valid
        return keep & ~first_unsunk if layer.valid.sum(-1).min() > self.n_sink + 1 else keep


class _SinksCountPads(SelectEachForward):
    def select(self, layer):
        slot = torch.arange(layer.positions.shape[-1]).expand_as(layer.positions)
        from_end = layer.valid.sum(-1, keepdim=True) - layer.valid.cumsum(-1)
        return layer.valid & ((slot < self.n_sink) | (from_end < self.window))


@PROPERTY_SETTINGS
@given(batches())
def test_budget_is_never_exceeded_and_keeps_sinks_and_window(example):
    check_budget_and_choice(SinkWindowCache, *example)


@PROPERTY_SETTINGS
@given(batches())
def test_window_covering_everything_is_full_cache(example):
    check_large_window_is_full_cache(SinkWindowCache, *example)


@PROPERTY_SETTINGS
@given(batches())
def test_batch_rows_are_independent(example):
    check_rows_independent(SinkWindowCache, *example)


def _planted_example():
    rows = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23]]
    ids, mask = left_padded(rows)
    return rows, ids, mask, torch.tensor([[30, 31, 32, 33], [40, 41, 42, 43]]), 2, 3


@pytest.mark.parametrize(
    "checker, planted",
    [
        (check_budget_and_choice, _OneTooMany),
        (check_large_window_is_full_cache, _AlwaysDropsOldest),
        (check_rows_independent, _SinksCountPads),
    ],
)
def test_properties_catch_planted_bugs(checker, planted):
    checker(SinkWindowCache, *_planted_example())  # the real strategy passes
    with pytest.raises(AssertionError):
        checker(planted, *_planted_example())


# --- exactness against a full-sequence forward with an explicit mask ---------------------------------------------
@pytest.mark.parametrize(
    "n_sink, window, chunk",
    [(2, 5, None), (0, 4, None), (4, 3, 3), (1, 1, 2), (3, 6, 4)],
)
def test_each_step_equals_explicit_mask_forward(n_sink, window, chunk):
    rows = [[5, 9, 17, 33, 41, 8, 12, 99, 4, 7, 3], [7, 3, 90, 11], [64, 65, 66, 67, 68, 69, 70]]
    ids, mask = left_padded(rows)
    kwargs = {} if chunk is None else {"prefill_chunk_size": chunk}
    cache = SinkWindowCache(MODEL, n_sink=n_sink, window=window)
    error, visible, _ = max_step_error(MODEL, cache, ids, mask, max_new_tokens=10, **kwargs)
    assert error < 1e-5
    # the last query of each row saw its first n_sink real tokens and its last `window` (itself included)
    last = visible[:, -1]
    for b, row in enumerate(rows):
        pad = ids.shape[1] - len(row)
        real = list(range(pad, visible.shape[-1]))
        expected = sorted(set(real[:n_sink]) | set(real[-(window + 1) :]))
        assert last[b].nonzero().flatten().tolist() == expected


# --- positions within the cache (StreamingLLM) -------------------------------------------------------------------
def test_cache_positions_without_eviction_equal_full_cache():
    rows = [[5, 9, 17, 33, 41, 8], [7, 3, 90]]
    ids, mask = left_padded(rows)
    continuation = torch.tensor([[30, 31, 32], [40, 41, 42]])
    got, _ = _teacher_forced(MODEL, SinkWindowCache(MODEL, n_sink=4, window=64, positions="cache"), ids, mask, continuation)
    expected, _ = _teacher_forced(MODEL, FullCache(MODEL), ids, mask, continuation)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_cache_positions_stream_past_max_position_embeddings():
    model = tiny_llama(seed=4, max_position_embeddings=32)
    cache = SinkWindowCache(model, n_sink=4, window=12, positions="cache")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model.generate(
        ids, past_key_values=cache, max_new_tokens=70, min_new_tokens=70, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    assert out.sequences.shape[1] == 80 > model.config.max_position_embeddings
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert cache.kept_counts().max() == 16


def test_cache_positions_rotate_keys_and_queries_at_their_rank_in_the_cache():
    """Layer 0 sees only token embeddings, so its attention can be recomputed from the definition: pre-RoPE
    q/k/v of the kept tokens, rotated at positions 0..K-1 (their rank in the cache), then softmax attention."""
    model = tiny_llama(seed=5)
    n_sink, window = 2, 4
    cache = SinkWindowCache(model, n_sink=n_sink, window=window, positions="cache")
    tokens = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(1))
    attn = model.model.layers[0].self_attn
    outputs = []
    hook = attn.register_forward_hook(lambda module, args, kwargs_out: outputs.append(kwargs_out[0]))
    try:
        with torch.no_grad():
            model(tokens[:, :10], past_key_values=cache)
            for t in range(10, 14):
                model(tokens[:, t : t + 1], past_key_values=cache)
    finally:
        hook.remove()

    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens))  # (1, 14, D)
        shape = (1, 14, -1, attn.head_dim)
        q_raw, k_raw, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    # before the last step the cache kept sinks 0, 1 and window 9..12; the last step adds token 13
    kept = [0, 1, 9, 10, 11, 12, 13]
    assert cache.kept_positions(0) == [[0, 1, 10, 11, 12, 13]]
    # stored keys are pre-RoPE: exactly the projections of the kept tokens (slots are not in stream order)
    layer = cache.layers[0]
    slots = [int((layer.positions[0, 0] == p).nonzero()) for p in [0, 1, 10, 11, 12, 13]]
    torch.testing.assert_close(layer.keys[0][:, slots], k_raw[0][:, [0, 1, 10, 11, 12, 13]], atol=1e-6, rtol=0)

    rank = torch.arange(len(kept)).view(1, -1)
    cos, sin = model.model.rotary_emb(hidden, rank)
    q, k = apply_rotary_pos_emb(q_raw[:, :, kept], k_raw[:, :, kept], cos, sin)
    q = q[:, :, -1:]  # the query of token 13, at cache position 6
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    vv = v[:, :, kept].repeat_interleave(attn.num_key_value_groups, dim=1)
    probs = ((q @ k.transpose(-1, -2)) * attn.scaling).softmax(-1)
    expected = attn.o_proj((probs @ vv).transpose(1, 2).reshape(1, 1, -1))
    torch.testing.assert_close(outputs[-1], expected, atol=1e-5, rtol=0)
