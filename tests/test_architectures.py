"""Exactness on architectures other than Llama: Gemma 3 (sliding-window + full layers, query_pre_attn_scalar,
q/k norms, two RoPE bases) and Qwen2 (q/k/v biases), on prompts longer than Gemma 3's sliding window (8).

Each planted core bug below passes a suite of Llama-only models (their scale is head_dim ** -0.5 and they have no
sliding layers); these tests must catch both.
"""

import dataclasses

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import causal_mask_function

from kvcompress import AnchorCache, FullCache, LabelWordCache, SinkWindowCache, attention
from kvcompress.testing import left_padded, max_step_error, tiny_gemma3, tiny_llama, tiny_qwen2

BUILDERS = {"gemma3": tiny_gemma3, "qwen2": tiny_qwen2, "llama": tiny_llama}
ROWS = [
    [5, 9, 17, 33, 41, 8, 12, 99, 4, 7, 3, 21, 50, 13],  # 14 tokens > sliding window 8
    [7, 3, 90, 11, 9, 40],
    [64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74],
]
EXACT = 1e-5  # fp32, same kernel family: observed errors are ~1e-6


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def arch(request):
    return request.param, BUILDERS[request.param]()


def _batch(padded):
    """(input_ids, attention_mask): the three ROWS left padded, or the first row alone."""
    if padded:
        return left_padded(ROWS)
    return torch.tensor([ROWS[0]]), torch.ones(1, len(ROWS[0]), dtype=torch.long)


def _greedy_logits(model, cache, ids, mask, steps=6):
    out = model.generate(
        ids, attention_mask=mask, past_key_values=cache, max_new_tokens=steps, min_new_tokens=steps,
        do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    return torch.stack(out.logits, 1), out.sequences


def _full_vs_dynamic(model, ids, mask):
    """max |logits| difference of greedy generation with FullCache (kvcompress core) vs DynamicCache (SDPA)."""
    model.set_attn_implementation("sdpa")
    expected, expected_seq = _greedy_logits(model, DynamicCache(config=model.config), ids, mask)
    got, got_seq = _greedy_logits(model, FullCache(model), ids, mask)
    return (got - expected).abs().max().item(), torch.equal(got_seq, expected_seq)


@pytest.mark.parametrize("padded", [False, True])
def test_full_cache_equals_dynamic_cache(arch, padded):
    name, model = arch
    ids, mask = _batch(padded)
    error, same_tokens = _full_vs_dynamic(model, ids, mask)
    assert error < EXACT, name
    assert same_tokens


def _strategies(model):
    return {
        "full": FullCache(model),
        "sink_window": SinkWindowCache.for_budget(model, None, 6),  # 4 sinks + window 2
        "anchor": AnchorCache(model, anchor_ids=[9, 41, 68], keep_first=1),
        "label_words": LabelWordCache(model, keep_positions=[0, 4, 7], prefix_length=10),
    }


@pytest.mark.parametrize("strategy", ["full", "sink_window", "anchor", "label_words"])
@pytest.mark.parametrize("chunk", [None, pytest.param(5, marks=pytest.mark.slow)])
def test_every_strategy_is_exact_against_per_layer_masked_forward(arch, strategy, chunk):
    name, model = arch
    ids, mask = left_padded(ROWS)
    kwargs = {} if chunk is None else {"prefill_chunk_size": chunk}
    error, _, _ = max_step_error(model, _strategies(model)[strategy], ids, mask, max_new_tokens=6, **kwargs)
    assert error < EXACT, (name, strategy)


def test_sliding_layers_see_only_their_window():
    """The visibility recorded for Gemma 3 differs per layer: sliding layers see the last 8 positions only."""
    from kvcompress.testing import generate_with_visibility

    model = tiny_gemma3()
    ids = torch.tensor([ROWS[0]])
    _, _, visible, _ = generate_with_visibility(model, FullCache(model), ids, max_new_tokens=4)
    last = visible[:, 0, -1]  # (L, N): what the last query saw in each layer
    n = last.shape[-1]
    assert last[0].nonzero().flatten().tolist() == list(range(n - 8, n))
    assert last[1].all()  # full layer
    assert torch.equal(last[0], last[2]) and torch.equal(last[1], last[3])


# --- planted core bugs: both must be caught ------------------------------------------------------------------------
def _ignore_sliding_window(monkeypatch):
    """Planted bug: the core builds every layer's mask from plain causal, ignoring transformers' mask_function."""
    real = attention._mask_for

    def causal_only(spec, *args):
        return real(dataclasses.replace(spec, mask_function=causal_mask_function), *args)

    monkeypatch.setattr(attention, "_mask_for", causal_only)


def _ignore_scaling(monkeypatch):
    """Planted bug: the core's kernel call drops the model's `scaling` (uses head_dim ** -0.5)."""
    real = attention.attend

    def unscaled(query, key, value, mask, scaling=None, **kwargs):
        return real(query, key, value, mask, scaling=None, **kwargs)

    monkeypatch.setattr(attention, "attend", unscaled)


def test_planted_sliding_window_bug_is_caught(monkeypatch):
    model = tiny_gemma3()
    ids, mask = left_padded(ROWS)
    assert _full_vs_dynamic(model, ids, mask)[0] < EXACT  # the real core
    _ignore_sliding_window(monkeypatch)
    assert _full_vs_dynamic(model, ids, mask)[0] > 1e-3
    with pytest.raises(AssertionError, match="not in the model's own attention pattern"):
        max_step_error(model, FullCache(model), ids, mask, max_new_tokens=4)


def test_planted_scaling_bug_is_caught(monkeypatch):
    model = tiny_gemma3()
    ids, mask = left_padded(ROWS)
    assert max_step_error(model, SinkWindowCache(model, n_sink=2, window=4), ids, mask, max_new_tokens=4)[0] < EXACT
    _ignore_scaling(monkeypatch)
    assert _full_vs_dynamic(model, ids, mask)[0] > 1e-3
    error, _, _ = max_step_error(model, SinkWindowCache(model, n_sink=2, window=4), ids, mask, max_new_tokens=4)
    assert error > 1e-3


# --- architectures the core cannot serve: refused up front --------------------------------------------------------
def test_state_space_model_is_refused_up_front():
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4))
    with pytest.raises(TypeError, match="MambaForCausalLM .*AttentionInterface"):
        FullCache(mamba)


def test_hybrid_layer_types_are_refused_up_front():
    model = tiny_llama()
    model.config.layer_types = ["full_attention", "linear_attention", "full_attention"]
    with pytest.raises(TypeError, match="linear_attention"):
        SinkWindowCache(model, window=4)


def test_attention_logit_softcapping_is_refused_up_front():
    model = tiny_gemma3(attn_logit_softcapping=50.0)
    with pytest.raises(TypeError, match="attn_logit_softcapping"):
        FullCache(model)


# --- other transformers caches on a model switched to the core ----------------------------------------------------
def _generate_logits(model, ids, mask, **kwargs):
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0, **kwargs,
    )
    return torch.stack(out.logits, 1)


@pytest.mark.parametrize("padded", [False, True])
def test_switched_model_serves_transformers_static_cache(arch, padded):
    name, model = arch
    ids, mask = _batch(padded)
    model.set_attn_implementation("sdpa")
    expected = _generate_logits(model, ids, mask, cache_implementation="static")
    attention.enable(model)
    got = _generate_logits(model, ids, mask, cache_implementation="static")
    torch.testing.assert_close(got, expected, atol=EXACT, rtol=0, msg=name)


# --- positions="cache" (StreamingLLM) on Gemma 3: one RoPE base per layer type ------------------------------------
def _rope_by_definition(x, positions, base):
    """x (1, H, S, d) rotated at positions (S,) with RoPE base `base` (rotate-half convention), fp32."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = positions.float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], -1) * sin


def _layer0_cache_positions_error(model):
    """Max |layer-0 attention output - its definition| at the last step of a StreamingLLM run: pre-RoPE q/k/v
    of the kept tokens rotated at their rank in the cache with the RoPE base of layer 0's type."""
    cache = SinkWindowCache(model, n_sink=2, window=4, positions="cache")
    tokens = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(1))
    attn = model.model.layers[0].self_attn
    outputs = []
    hook = attn.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    try:
        with torch.no_grad():
            model(tokens[:, :10], past_key_values=cache)
            for t in range(10, 14):
                model(tokens[:, t : t + 1], past_key_values=cache)
    finally:
        hook.remove()
    kept = [0, 1, 9, 10, 11, 12, 13]
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens))
        shape = (1, 14, -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(hidden).view(shape).transpose(1, 2))[:, :, kept]
        k = attn.k_norm(attn.k_proj(hidden).view(shape).transpose(1, 2))[:, :, kept]
        v = attn.v_proj(hidden).view(shape).transpose(1, 2)[:, :, kept]
        base = model.config.rope_parameters[model.config.layer_types[0]]["rope_theta"]
        rank = torch.arange(len(kept))
        q, k = _rope_by_definition(q, rank, base)[:, :, -1:], _rope_by_definition(k, rank, base)
        groups = attn.num_key_value_groups
        probs = ((q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * attn.scaling).softmax(-1)
        expected = attn.o_proj((probs @ v.repeat_interleave(groups, 1)).transpose(1, 2).reshape(1, 1, -1))
    return (outputs[-1] - expected).abs().max().item()


def _gemma3_first(layer_type):
    other = "full_attention" if layer_type == "sliding_attention" else "sliding_attention"
    # window 64: every kept token is inside the sliding window, so only the RoPE base differs between the types
    # initializer_range 0.2: outputs of order 1, so a wrong table shows as an error far above rounding
    return tiny_gemma3(
        seed=5, num_hidden_layers=2, layer_types=[layer_type, other], sliding_window=64, initializer_range=0.2
    )


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_cache_positions_use_each_layer_types_rope_base(layer_type):
    assert _layer0_cache_positions_error(_gemma3_first(layer_type)) < EXACT


def test_planted_single_rope_table_is_caught(monkeypatch):
    """Planted bug: one rotary table (the full layers') for every layer; the sliding-first model must fail."""
    from kvcompress import rope

    monkeypatch.setattr(rope.RotaryPositions, "layer_type", lambda self: "full_attention")
    assert _layer0_cache_positions_error(_gemma3_first("full_attention")) < EXACT
    assert _layer0_cache_positions_error(_gemma3_first("sliding_attention")) > 1e-3


def test_cache_positions_without_eviction_equal_full_cache_on_gemma3():
    model = tiny_gemma3()
    ids, mask = left_padded(ROWS)
    expected, _ = _greedy_logits(model, FullCache(model), ids, mask)
    got, _ = _greedy_logits(model, SinkWindowCache(model, n_sink=4, window=64, positions="cache"), ids, mask)
    torch.testing.assert_close(got, expected, atol=EXACT, rtol=0)
