"""The decode-speed floor (bench/floor.py) and the side-by-side speed grid (bench/speed.py), on tiny models."""

import pytest
import torch
from transformers import DynamicCache

from kvcompress import FullCache, SinkWindowCache
from kvcompress.bench import floor, speed
from kvcompress.cache import cache_arg
from kvcompress.testing import tiny_llama


def _prefill(model, cache, n=20):
    ids = torch.arange(3, 3 + n).unsqueeze(0)
    with torch.no_grad():
        model(ids, **cache_arg(cache), use_cache=True)
    return cache


def test_weight_bytes_counts_tied_embedding_once_and_untied_input_embedding_as_one_row():
    untied = tiny_llama(tie_word_embeddings=False)
    params = sum(p.nbytes for p in untied.parameters())
    row = untied.get_input_embeddings().weight[0].nbytes
    embedding = untied.get_input_embeddings().weight.nbytes
    assert floor.weight_bytes(untied) == params - embedding + row

    tied = tiny_llama(tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    distinct = {p.data_ptr(): p.nbytes for p in tied.parameters()}
    assert floor.weight_bytes(tied) == sum(distinct.values())


def test_cache_kv_bytes_of_dynamic_and_full_cache_agree_with_the_config(tiny_model):
    config = tiny_model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    dynamic = _prefill(tiny_model, DynamicCache(config=config))
    full = _prefill(tiny_model, FullCache(tiny_model))
    window = _prefill(tiny_model, SinkWindowCache(tiny_model, n_sink=2, window=3))
    assert floor.cache_kv_bytes(dynamic) == floor.cache_kv_bytes(full) == 20 * per_token
    assert floor.cache_kv_bytes(window) == 5 * per_token


def test_floor_stats_is_bytes_over_bandwidth(tiny_model, monkeypatch):
    monkeypatch.setattr(floor, "process_bandwidth", lambda device: 1e9)  # 1 GB/s, to check the arithmetic
    cache = _prefill(tiny_model, FullCache(tiny_model))
    stats = floor.floor_stats(tiny_model, cache, step_seconds=0.002)
    expected_bytes = floor.weight_bytes(tiny_model) + cache.kv_bytes_used()
    assert stats["step_bytes"] == expected_bytes
    assert abs(stats["floor_ms"] - expected_bytes / 1e9 * 1e3) < 1e-9
    assert abs(stats["floor_ratio"] - 0.002 / (expected_bytes / 1e9)) < 1e-9


def test_read_bandwidth_returns_positive_samples():
    result = floor.read_bandwidth("cpu", megabytes=8, repeats=3)
    assert len(result["samples"]) == 3 and all(s > 0 for s in result["samples"])
    assert min(result["samples"]) <= result["bytes_per_s"] <= max(result["samples"])


def test_matmul_seconds_runs_every_linear_of_the_model(tiny_model):
    calls = []
    linears = [m for m in tiny_model.modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_hook(lambda module, args, out: calls.append(module)) for m in linears]
    try:
        result = floor.matmul_seconds(tiny_model, repeats=3)
    finally:
        for handle in handles:
            handle.remove()
    assert result["linears"] == len(linears) == 7 * tiny_model.config.num_hidden_layers + 1  # q k v o gate up down, head
    assert len(calls) == 4 * len(linears) and set(map(id, calls)) == set(map(id, linears))  # warm-up + 3 repeats
    assert len(result["samples"]) == 3 and min(result["samples"]) <= result["seconds"] <= max(result["samples"])


def test_speed_grid_rows_on_a_tiny_model(tiny_model):
    ids = torch.arange(3, 43).unsqueeze(0)
    names = ["dynamic", "full", "sink_window"]
    rows = speed.run_length(tiny_model, None, ids, names, fraction=0.25, rounds=2, steps=2)
    speed.add_ratios(rows)
    by_name = {r["cache"]: r for r in rows}
    assert [r["cache"] for r in rows] == names
    # every fed token is stored: prefill (40) + warm-up step (1) + 2 rounds x 2 steps
    assert by_name["dynamic"]["kept_tokens"] == by_name["full"]["kept_tokens"] == 40 + 1 + 4
    assert by_name["sink_window"]["kept_tokens"] == 10  # ceil(0.25 * 40)
    adakv = speed.run_length(tiny_model, None, ids, ["snapkv:allocation=adakv"], fraction=0.25, rounds=1, steps=1)[0]
    cache = speed.build_cache("snapkv:allocation=adakv", tiny_model, None, 40, 0.25)
    with torch.no_grad():
        tiny_model(ids, past_key_values=cache)
    counts = torch.stack([layer.valid.sum(-1)[0] for layer in cache.layers])  # (L, Hkv)
    assert counts.float().std() > 0  # the heads keep different counts: the largest would overstate
    # the mean lane (the decode steps keep the budget), not the largest one
    assert adakv["kept_tokens"] == round(counts.double().mean().item()) == 10 < int(counts.max())
    assert by_name["dynamic"]["kv_bytes"] == by_name["full"]["kv_bytes"] > by_name["sink_window"]["kv_bytes"]
    for row in rows:
        assert len(row["step_seconds"]) == 2
        assert row["step_bytes"] == row["weight_bytes"] + row["kv_bytes"]
        assert row["floor_ratio"] == pytest.approx(row["step_ms"] / row["floor_ms"], rel=1e-12)
        assert row["matmul_ratio"] == pytest.approx(row["step_ms"] / row["matmul_ms"], rel=1e-12)
        assert len(row["matmul_samples_ms"]) == 2  # before and after the rounds
    assert by_name["full"]["speedup_vs_full"] == 1.0
    assert by_name["sink_window"]["floor_speedup_vs_full"] > 1.0
    assert by_name["sink_window"]["step_vs_sink_window"] == 1.0
    assert by_name["full"]["step_vs_sink_window"] == pytest.approx(
        by_name["full"]["step_ms"] / by_name["sink_window"]["step_ms"], rel=1e-12)
    # held = what the cache allocated (FullCache grows by 1/8, so it may hold more than its kept pairs)
    assert by_name["full"]["kv_bytes_allocated"] >= by_name["full"]["kv_bytes"]
    assert by_name["dynamic"]["held_over_kept"] == 1.0
    assert tiny_model.config._attn_implementation == "kvcompress"  # dynamic rounds ran on sdpa, then switched back
    assert "| 40 | sink_window | 10 |" in speed.markdown_table(rows)


def test_quantized_cache_floor_reads_its_packed_bytes_not_kept_tokens_times_the_dtype(tiny_model):
    """The floor of a kv_bits cache counts what its storage holds for the kept pairs (codes, scales, zero points
    and the full-precision window: `kv_bytes_used`), so fewer KV bytes lower the floor. Bug it catches: a floor
    from the kept-token count times the model dtype's bytes (an int4 cache would get fp32's floor)."""
    n = 400  # the newest 128 + 16 tokens stay fp32; pages of 32 older than that (256 tokens) are int4
    ids = (torch.arange(n) % 100 + 3).unsqueeze(0)  # within the tiny vocabulary
    full, quantized = FullCache(tiny_model), FullCache(tiny_model, kv_bits=4)
    with torch.no_grad():
        for cache in (full, quantized):
            tiny_model(ids, **cache_arg(cache), use_cache=True)
    assert floor.cache_kv_bytes(quantized) == quantized.kv_bytes_used()
    assert floor.cache_kv_bytes(quantized) < 0.6 * floor.cache_kv_bytes(full)  # 0.47 for head dim 16
    rows = speed.run_length(tiny_model, None, ids, ["full", "full:kv_bits=4"],
                            fraction=1.0, rounds=1, steps=1)
    by_name = {r["cache"]: r for r in rows}
    assert by_name["full:kv_bits=4"]["kept_tokens"] == by_name["full"]["kept_tokens"]
    assert by_name["full:kv_bits=4"]["step_bytes"] < by_name["full"]["step_bytes"]


def test_speed_sink_window_past_the_trained_context_keeps_its_storage_options(tiny_model):
    """Past the model's trained context the speed grid builds sink_window with positions="cache" (StreamingLLM);
    a spec with storage options ("sink_window:kv_bits=4") must get the same strategy, only stored in int4, or
    "int4 against the same strategy in fp32" compares two different strategies there."""
    length = tiny_model.config.max_position_embeddings + 88
    plain = speed.build_cache("sink_window", tiny_model, None, length, 0.1)
    quantized = speed.build_cache("sink_window:kv_bits=4", tiny_model, None, length, 0.1)
    assert plain.position_mode == "cache"
    assert (quantized.position_mode, quantized.n_sink, quantized.window) == ("cache", plain.n_sink, plain.window)
    assert quantized.kv_bits == 4
