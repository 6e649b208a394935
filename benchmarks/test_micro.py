"""Micro-benchmarks of the pieces every strategy pays for, on SmolLM2-135M shapes (9 query / 3 kv heads, d=64,
30 layers), CPU fp32.

Run: python -m pytest benchmarks/test_micro.py --benchmark-only   (OMP_NUM_THREADS=2 on the 2-core machines)

- attention core per decode step vs `torch.nn.functional.scaled_dot_product_attention` on the same tensors;
- the core with a sparse kept-position mask (what a compressing cache with gaps costs);
- cache bookkeeping per decode step over 30 layers (update + eviction) vs transformers' DynamicCache;
- mask building from kept positions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.masking_utils import causal_mask_function

from kvcompress import attention
from kvcompress.masks import MaskSpec, allowed_from_positions
from kvcompress.strategies import FullCache, SinkWindowCache
from kvcompress.testing import tiny_llama

HQ, HKV, D, LAYERS = 9, 3, 64, 30


class _Module(torch.nn.Module):
    def __init__(self, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx


def _qkv(q_len: int, kv_len: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(1, HQ, q_len, D, generator=gen)
    key = torch.randn(1, HKV, kv_len, D, generator=gen)
    value = torch.randn(1, HKV, kv_len, D, generator=gen)
    return query, key, value


@pytest.mark.parametrize("kv_len", [1024, 4096])
def test_core_decode_step(benchmark, kv_len):
    """The full core call (mask spec -> kernel) for one query token over kv_len contiguous keys."""
    query, key, value = _qkv(1, kv_len)
    spec = MaskSpec(mask_function=causal_mask_function, padding=None, q_offset=kv_len - 1, kv_offset=0)
    module = _Module().eval()
    out, _ = benchmark(attention.kvcompress_attention, module, query, key, value, spec, scaling=D**-0.5)
    reference = F.scaled_dot_product_attention(query, key, value, scale=D**-0.5, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_len", [1024, 4096])
def test_torch_sdpa_decode_step(benchmark, kv_len):
    """Baseline: torch SDPA with grouped heads on the same tensors."""
    query, key, value = _qkv(1, kv_len)
    benchmark(F.scaled_dot_product_attention, query, key, value, scale=D**-0.5, enable_gqa=True)


@pytest.mark.parametrize("kv_len", [1024, 4096])
def test_core_decode_step_sparse_mask(benchmark, kv_len):
    """One query token over kv_len keys with every 4th key masked (a cache keeping scattered positions)."""
    query, key, value = _qkv(1, kv_len)
    mask = (torch.arange(kv_len) % 4 != 0).view(1, 1, 1, kv_len)
    out = benchmark(attention.attend, query, key, value, mask, scaling=D**-0.5)
    expanded = mask.expand(1, HQ, 1, kv_len)
    reference = F.scaled_dot_product_attention(
        query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1), attn_mask=expanded, scale=D**-0.5
    ).transpose(1, 2)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len, kv_len", [(1, 1024), (1, 4096), (128, 1024)])
def test_mask_from_kept_positions(benchmark, q_len, kv_len):
    """`allowed_from_positions` for a sink+window cache (4 sinks, the rest a window) ending at the query."""
    seen = 4 * kv_len
    positions = torch.cat([torch.arange(4), torch.arange(seen - (kv_len - 4), seen)]).view(1, kv_len)
    spec = MaskSpec(mask_function=causal_mask_function, padding=None, q_offset=seen - q_len, kv_offset=0)
    allowed = benchmark(allowed_from_positions, spec, positions, q_len)
    assert allowed.shape == (1, 1, q_len, kv_len)


@pytest.fixture(scope="module")
def layer_model():
    return tiny_llama(num_hidden_layers=LAYERS)  # only its layer count matters to the caches


def _step_tensors():
    return [(torch.randn(1, HKV, 1, D), torch.randn(1, HKV, 1, D)) for _ in range(LAYERS)]


STEPS = 16


def _prefilled(kind: str, model, context: int = 1024):
    keys = torch.randn(1, HKV, context, D)
    if kind == "dynamic":
        cache = DynamicCache(config=model.config)
        for i in range(LAYERS):
            cache.update(keys, keys, i)
        return cache
    cache = FullCache(model) if kind == "full" else SinkWindowCache(model, n_sink=4, window=context // 10)
    for i in range(LAYERS):
        cache.update(keys, keys, i)
        attention._take_layer(i)  # what the core does around its kernel
        cache.layers[i].finish_forward()
    return cache


@pytest.mark.parametrize("context", [1024, 8192])
@pytest.mark.parametrize("kind", ["dynamic", "full", "sink_window"])
def test_cache_update_per_decode_step(benchmark, layer_model, kind, context):
    """16 decode steps of cache bookkeeping over 30 layers (after a `context`-token prefill): DynamicCache.update
    (a torch.cat of the whole layer per token) vs a kvcompress cache's update + post-attention eviction (slot
    storage: the new token is written in place; sink_window keeps 10% and frees one slot a step)."""
    steps = [_step_tensors() for _ in range(STEPS)]

    def run(cache):
        for tensors in steps:
            for i, (k, v) in enumerate(tensors):
                cache.update(k, v, i)
                if kind != "dynamic":
                    attention._take_layer(i)
                    cache.layers[i].finish_forward()
        return cache

    cache = benchmark.pedantic(run, setup=lambda: ((_prefilled(kind, layer_model, context),), {}), rounds=15,
                               warmup_rounds=2)
    benchmark.extra_info["per_step_us"] = benchmark.stats.stats.median / STEPS * 1e6
    expected = context + STEPS if kind != "sink_window" else 4 + context // 10
    kept = cache.layers[0].keys.shape[-2] if kind == "dynamic" else int(cache.layers[0].valid.sum())
    assert kept == expected
