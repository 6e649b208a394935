"""The shared attention core against its fp64 reference, and inside a model with per-layer kept lengths."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcompress
from kvcompress import CompressedCache, FullCache, SinkWindowCache, attend
from kvcompress.attention import attention_probs, capture
from kvcompress.testing import left_padded


@st.composite
def attention_inputs(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    q_len = draw(st.integers(1, 6))
    kv_len = draw(st.integers(q_len, q_len + 9))
    dim = draw(st.sampled_from([4, 8, 16]))
    seed = draw(st.integers(0, 2**16))
    mask_kind = draw(st.sampled_from(["none", "causal", "bool"]))
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, q_len, dim, generator=g)
    key = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    value = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "causal":
        mask = True
    else:  # random visibility, some query rows seeing nothing
        mask = torch.rand(batch, 1, q_len, kv_len, generator=g) < draw(st.floats(0.0, 1.0))
    return query, key, value, mask


@settings(max_examples=150, deadline=None)
@given(attention_inputs())
def test_sdpa_path_equals_fp64_reference(inputs):
    query, key, value, mask = inputs
    fast = attend(query, key, value, mask, backend="sdpa")
    reference = attend(query, key, value, mask, backend="reference")
    assert fast.shape == (query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_reference_matches_the_definition_on_one_head():
    g = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, 1, n, 4, generator=g) for n in (3, 5, 5))
    mask = torch.tensor([[True, False, True, True, False], [False] * 5, [True] * 5]).view(1, 1, 3, 5)
    out = attend(query, key, value, mask, backend="reference")[0, :, 0]
    for i in range(3):
        visible = mask[0, 0, i].nonzero().flatten()
        if len(visible) == 0:
            expected = torch.zeros(4)
        else:
            scores = torch.stack([query[0, 0, i] @ key[0, 0, j] / 2.0 for j in visible])
            expected = (scores.softmax(0)[:, None] * value[0, 0, visible]).sum(0)
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=1e-6)


def test_causal_is_bottom_right_aligned():
    g = torch.Generator().manual_seed(2)
    query = torch.randn(1, 2, 2, 8, generator=g)
    key, value = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    explicit = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool).view(1, 1, 2, 5)
    torch.testing.assert_close(attend(query, key, value, True), attend(query, key, value, explicit))


class _PerLayerWindow(CompressedCache):
    """Test strategy: layer l keeps its last 2 + 2 * l tokens, so kept lengths differ per layer."""

    def __init__(self, model):
        super().__init__(model)

    def select(self, layer):
        rank_from_end = layer.valid.flip(-1).cumsum(-1).flip(-1) - 1
        return layer.valid & (rank_from_end < 2 + 2 * layer.layer_idx)


def _decode(model, cache, ids, mask, steps=6):
    """Greedy manual decode with direct model() calls; returns per-step last logits (B, steps, V)."""
    logits = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, past_key_values=cache)
    return torch.stack(logits, 1)


def test_layers_keeping_different_lengths_match_reference_backend(tiny_model):
    ids, mask = left_padded([[5, 9, 17, 33, 41, 8, 12], [7, 3, 90, 11], [64, 65, 66, 67, 68, 69, 70, 71, 72]])
    try:
        kvcompress.set_backend("reference")
        expected = _decode(tiny_model, _PerLayerWindow(tiny_model), ids, mask)
    finally:
        kvcompress.set_backend("auto")
    cache = _PerLayerWindow(tiny_model)
    with capture() as records:
        got = _decode(tiny_model, cache, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert cache.kept_counts()[:, 0].tolist() == [2, 4, 6]
    # each layer's decode query saw exactly that layer's kept tokens
    last = {r["layer_idx"]: r for r in records[-3:]}
    for layer_idx, record in last.items():
        seen = record["kv_positions"][:, 0][record["allowed"][:, 0, -1]].numel()
        assert seen == 3 * (2 + 2 * layer_idx + 1)  # kept before this step + the new token, 3 rows


def test_contiguous_fallback_serves_plain_dynamic_cache(tiny_model):
    """With the model switched to the core, a transformers DynamicCache still gives SDPA's results."""
    from transformers import DynamicCache

    ids, mask = left_padded([[5, 9, 17, 33], [7, 3]])
    tiny_model.set_attn_implementation("sdpa")
    expected = _decode(tiny_model, DynamicCache(config=tiny_model.config), ids, mask)
    kvcompress.enable(tiny_model)
    got = _decode(tiny_model, DynamicCache(config=tiny_model.config), ids, mask)
    real = torch.ones(2, dtype=torch.bool)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend"):
        kvcompress.set_backend("triton")


def _tiled_gqa_attend(query, key, value, mask, backend=None):
    """Planted bug: query head h uses kv head h % Hkv (tiling) instead of h // groups."""
    groups = query.shape[1] // key.shape[1]
    return attend(query, key.repeat(1, groups, 1, 1), value.repeat(1, groups, 1, 1), mask, backend="sdpa")


def test_fp64_comparison_catches_a_planted_head_mapping_bug():
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 6, 3, 8, generator=g)
    key, value = torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    mask = torch.rand(2, 1, 3, 7, generator=g) < 0.7
    reference = attend(query, key, value, mask, backend="reference")
    torch.testing.assert_close(attend(query, key, value, mask, backend="sdpa"), reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_tiled_gqa_attend(query, key, value, mask), reference, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_path_equals_fp64_reference():
    from torch.nn.attention.flex_attention import create_block_mask

    def every_third_or_causal_window(b, h, q, kv):
        return (kv <= q) & ((kv % 3 == 0) | (q - kv < 4))

    g = torch.Generator().manual_seed(4)
    query = torch.randn(2, 4, 40, 8, generator=g)
    key, value = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    block_mask = create_block_mask(every_third_or_causal_window, 2, None, 40, 40, device="cpu")
    flex = attend(query, key, value, block_mask, backend="sdpa")
    reference = attend(query, key, value, block_mask, backend="reference")
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=1e-5)
    dense = torch.ones(40, 40, dtype=torch.bool).tril() & (
        (torch.arange(40)[None, :] % 3 == 0) | (torch.arange(40)[:, None] - torch.arange(40)[None, :] < 4)
    )
    torch.testing.assert_close(attend(query, key, value, dense.view(1, 1, 40, 40), backend="reference"), reference)


# --- attention probabilities (output_attentions, attention-aware strategies) --------------------------------------
def _probs_by_definition(query, key, mask, scaling):
    """fp64, one (b, h, i) at a time: softmax over the keys query i of head h may see (kv head h // groups)."""
    batch, heads, q_len, dim = query.shape
    groups, kv_len = heads // key.shape[1], key.shape[2]
    if mask is None:
        mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    elif mask is True:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len).view(1, 1, q_len, kv_len)
    mask = mask.expand(batch, heads, q_len, kv_len)
    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                seen = mask[b, h, i].nonzero().flatten()
                if len(seen):
                    scores = key[b, h // groups, seen].double() @ query[b, h, i].double() * scaling
                    out[b, h, i, seen] = scores.softmax(0)
    return out


@settings(max_examples=60, deadline=None)
@given(attention_inputs(), st.integers(1, 4), st.integers(1, 3), st.floats(0.05, 1.0))
def test_attention_probs_equal_the_definition(inputs, last, block_size, scaling):
    query, key, value, mask = inputs
    got = attention_probs(query, key, mask, scaling=scaling, last=last, block_size=block_size)
    rows = min(last, query.shape[2])
    expected = _probs_by_definition(query, key, mask, scaling)[:, :, -rows:]
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    # the kernel applies exactly these probabilities: probs @ V == attend's output (zeros for rows seeing nothing)
    groups = query.shape[1] // key.shape[1]
    mixed = got @ value.repeat_interleave(groups, dim=1)[:, :, :, :].float()  # (B, Hq, rows, d)
    output = attend(query, key, value, mask, scaling=scaling)[:, -rows:].transpose(1, 2)
    torch.testing.assert_close(mixed, output, atol=1e-5, rtol=1e-5)


def test_probability_check_catches_a_planted_head_mapping_bug():
    g = torch.Generator().manual_seed(5)
    query, key = torch.randn(1, 6, 3, 8, generator=g), torch.randn(1, 3, 7, 8, generator=g)
    expected = _probs_by_definition(query, key, True, 8**-0.5).float()
    torch.testing.assert_close(attention_probs(query, key, True), expected, atol=1e-6, rtol=1e-5)
    tiled = attention_probs(query, key.repeat(1, 2, 1, 1), True)  # planted: head h uses kv head h % Hkv
    with pytest.raises(AssertionError):
        torch.testing.assert_close(tiled, expected, atol=1e-6, rtol=1e-5)


def test_output_attentions_equal_eager_attention(tiny_model):
    """The core returns (B, Hq, Q, K) probabilities, the same as transformers' eager attention."""
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(6))
    tiny_model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = tiny_model(ids, output_attentions=True).attentions
    with torch.no_grad():
        got = tiny_model(ids, past_key_values=FullCache(tiny_model), output_attentions=True).attentions
    assert len(got) == len(expected) == tiny_model.config.num_hidden_layers
    for layer_got, layer_expected in zip(got, expected):
        assert layer_got.shape == (2, 4, 9, 9)
        torch.testing.assert_close(layer_got, layer_expected, atol=1e-6, rtol=1e-5)


def test_output_attentions_with_a_compressing_cache_span_the_kept_slots(tiny_model):
    """Key axis = the slots the layer attended (kept before this forward, then the new token), as captured."""
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(7))
    cache = SinkWindowCache(tiny_model, n_sink=2, window=3)
    with torch.no_grad():
        tiny_model(ids, past_key_values=cache)
        with capture() as records:
            step = tiny_model(ids[:, -1:], past_key_values=cache, output_attentions=True)
    assert len(step.attentions) == len(records) == 3
    for probs, record in zip(step.attentions, records):
        slots = record["kv_positions"][0, 0]  # slot order is not stream order; free slots hold -1
        assert probs.shape == (1, 4, 1, slots.numel())
        assert sorted(slots[slots >= 0].tolist()) == [0, 1, 9, 10, 11, 12]  # 2 sinks + 3 recent, plus the new token
        assert bool((probs[..., slots < 0] == 0).all()) and bool((probs[..., slots >= 0] > 0).all())
        torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, 1))


# --- the decode-step mask shortcut ----------------------------------------------------------------------------------
@st.composite
def decode_slot_tables(draw):
    """A decode step of a kvcompress layer: rows with left pads, kept positions in shuffled slots, free slots -1.
    Returns (spec, positions (B, Hp, K)); the new token sits at stream position N - 1 of every row."""
    from transformers.masking_utils import causal_mask_function

    from kvcompress.masks import MaskSpec

    batch, heads, n = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3])), draw(st.integers(2, 12))
    pads = [draw(st.integers(0, n - 1)) for _ in range(batch)]
    padding = torch.tensor([[j >= p for j in range(n)] for p in pads])
    slots = draw(st.integers(n, n + 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    table = torch.full((batch, heads, slots), -1, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            real = [j for j in range(pads[b], n - 1) if torch.rand(1, generator=g) < 0.6] + [n - 1]
            order = torch.randperm(slots, generator=g)[: len(real)]
            table[b, h, order] = torch.tensor(real)
    if padding.all() or draw(st.booleans()):  # the forward's padding mask may be absent (pads are -1 anyway)
        padding = None
    spec = MaskSpec(mask_function=causal_mask_function, padding=padding, q_offset=n - 1, kv_offset=0)
    return spec, table


@settings(max_examples=60, deadline=None)
@given(decode_slot_tables())
def test_decode_step_mask_shortcut_equals_the_mask_from_positions(example):
    """`_mask_for` on a decode step of a kvcompress layer ("slot filled", or None when every slot is) equals the
    general `allowed_from_positions` (pattern function, padding, free slots)."""
    from types import SimpleNamespace

    from kvcompress.attention import _mask_for
    from kvcompress.masks import allowed_from_positions

    spec, table = example
    batch, heads, slots = table.shape
    expected = allowed_from_positions(spec, table, 1)
    got = _mask_for(spec, table, SimpleNamespace(dense=False), 1, slots)
    got = torch.ones_like(expected) if got is None else got.expand_as(expected)
    assert torch.equal(got, expected)
    # the check has teeth: a shortcut that ignored free slots would differ wherever a slot is free
    assert torch.equal(torch.ones_like(expected), expected) == bool((table >= 0).all())
