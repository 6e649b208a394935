"""FullCache against transformers' DynamicCache: same tokens, same per-step logits (fp32, 1e-5)."""

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from kvcompress import FullCache
from kvcompress.testing import left_padded, max_step_error

# transformers < 5.23 runs single-token GQA decoding in SDPA with repeated kv heads instead of packed query heads;
# the kvcompress core follows 5.23, so older releases differ by fp32 rounding (~3e-5 on SmolLM2 logits of ~30).
SDPA_ATOL = 1e-5 if Version(transformers.__version__) >= Version("5.23") else 1e-4

PROMPTS = [[5, 9, 17, 33, 41, 8, 12, 99, 4], [7, 3, 90, 11], [64, 65, 66, 67, 68, 69]]


def _generate(model, cache, ids, mask, **kwargs):
    kwargs.setdefault("max_new_tokens", 12)
    kwargs.setdefault("do_sample", False)
    return model.generate(
        ids,
        attention_mask=mask,
        past_key_values=cache,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


def _assert_same_generation(model, ids, mask, atol=1e-5, **kwargs):
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    torch.manual_seed(123)
    expected = _generate(model, DynamicCache(config=model.config), ids, mask, **kwargs)
    cache = FullCache(model)
    torch.manual_seed(123)
    got = _generate(model, cache, ids, mask, **kwargs)
    model.set_attn_implementation(previous)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.logits) == len(expected.logits)
    for step_got, step_expected in zip(got.logits, expected.logits):
        torch.testing.assert_close(step_got, step_expected, atol=atol, rtol=0)
    return cache, got


def test_greedy_left_padded_batch_matches_dynamic_cache(tiny_model):
    ids, mask = left_padded(PROMPTS)
    cache, out = _assert_same_generation(tiny_model, ids, mask)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    # kept = every real token fed: prompt length + 11 generated tokens fed back
    assert cache.kept_counts()[0].tolist() == [len(p) + 11 for p in PROMPTS]


def test_sampling_matches_dynamic_cache(tiny_model):
    ids, mask = left_padded(PROMPTS)
    _assert_same_generation(tiny_model, ids, mask, do_sample=True, top_k=20, temperature=0.8)


def test_chunked_prefill_matches_dynamic_cache(tiny_model):
    ids, mask = left_padded(PROMPTS)
    _assert_same_generation(tiny_model, ids, mask, prefill_chunk_size=3)


def test_second_generate_on_same_cache_continues(tiny_model):
    ids, mask = left_padded(PROMPTS)
    cache = FullCache(tiny_model)
    first = _generate(tiny_model, cache, ids, mask, max_new_tokens=5)
    follow = torch.cat([first.sequences, torch.tensor([[21], [22], [23]])], dim=1)
    follow_mask = torch.cat([mask, torch.ones(3, follow.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    continued = _generate(tiny_model, cache, follow, follow_mask, max_new_tokens=5)
    fresh = _generate(tiny_model, FullCache(tiny_model), follow, follow_mask, max_new_tokens=5)
    assert torch.equal(continued.sequences, fresh.sequences)
    for a, b in zip(continued.logits, fresh.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_direct_model_calls_match_dynamic_cache(tiny_model):
    ids, mask = left_padded(PROMPTS)
    outputs = {}
    for name, make in [("dynamic", lambda: DynamicCache(config=tiny_model.config)), ("full", lambda: FullCache(tiny_model))]:
        cache, step_ids, step_mask, logits = make(), ids, mask, []
        with torch.no_grad():
            for _ in range(6):
                out = tiny_model(step_ids, attention_mask=step_mask, past_key_values=cache)
                logits.append(out.logits[:, -1])
                step_ids = out.logits[:, -1:].argmax(-1)
                step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=1)
        outputs[name] = torch.stack(logits)
    torch.testing.assert_close(outputs["full"], outputs["dynamic"], atol=1e-5, rtol=0)


def test_full_cache_equals_explicit_mask_reference(tiny_model):
    ids, mask = left_padded(PROMPTS)
    error, visible, _ = max_step_error(tiny_model, FullCache(tiny_model), ids, mask, max_new_tokens=8)
    assert error < 1e-5
    # FullCache shows each real query every earlier real token
    assert visible[0, -1].sum() == len(PROMPTS[0]) + 7


def test_kv_bytes_counts_allocated_and_used_slots(tiny_model):
    """kv_bytes(): the allocated slot buffers (capacity grows by 1/8, at least 16 slots); kv_bytes_used(): the kept
    tokens."""
    ids, mask = left_padded(PROMPTS)
    cache = FullCache(tiny_model)
    _generate(tiny_model, cache, ids, mask, max_new_tokens=4)
    cfg = tiny_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4
    real = int(mask.sum()) + 3 * len(PROMPTS)  # every real token and 3 fed generated tokens per row; no pads
    assert cache.kv_bytes_used() == real * per_token
    capacity = cache.layers[0].capacity
    assert cache.kv_bytes() == capacity * len(PROMPTS) * per_token
    assert ids.shape[1] + 3 <= capacity <= max(1.125 * (ids.shape[1] + 3), ids.shape[1] + 3 + 16)


@pytest.mark.integration
def test_smollm2_greedy_matches_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    prompts = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived",
        "def fibonacci(n):",
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    _assert_same_generation(model, batch.input_ids, batch.attention_mask, atol=SDPA_ATOL, max_new_tokens=10)
