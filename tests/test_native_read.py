"""The native quantized read (`kvcompress.kernels.read_pages`): bitwise the torch read (`QuantizedKV.read_torch`) on
random stores (every bits, dtype, page, head and value width, quantized / full-precision / missing pages, `used`
cutting a page), with planted-bug twins built from the kernel's own source; a model decoding with kv_bits gives
bitwise the same logits through either read; a build that fails leaves the torch path with a warning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcompress import FullCache, SinkWindowCache, kernels
from kvcompress import quantize as Q
from kvcompress.cache import cache_arg
from kvcompress.storage import QuantizedKV
from kvcompress.testing import tiny_llama

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _native():
    if not kernels.available():
        pytest.skip(f"the native read is not built here: {kernels.unavailable_reason()}")


def random_store(seed, bits, dtype, batch, heads, pages, page, dim, vdim, group) -> QuantizedKV:
    """A store in any state the table can express: each (row, head, page) entry is a full-precision page, a
    quantized page or none; codes, scales and zero points random (padding bits included)."""
    gen = torch.Generator().manual_seed(seed)
    stored = Q.scale_dtype(dtype)
    full, quantized = 3, 5
    key_pool = torch.randn(full, page, dim, generator=gen).to(dtype)
    value_pool = torch.randn(full, page, vdim, generator=gen).to(dtype)

    def codes(*shape):
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)

    def scales(*shape):
        return (torch.rand(*shape, generator=gen) * 0.3).to(stored)

    def zeros(*shape):
        return torch.randn(*shape, generator=gen).to(stored)

    q = {"keys": codes(quantized, page, -(-dim * bits // 8)), "key_scale": scales(quantized, 1, dim),
         "key_zero": zeros(quantized, 1, dim), "values": codes(quantized, page, vdim // group, -(-group * bits // 8)),
         "value_scale": scales(quantized, page, vdim // group, 1),
         "value_zero": zeros(quantized, page, vdim // group, 1), "free": []}
    table = torch.randint(-quantized - 1, full, (batch, heads, pages), generator=gen)  # -1 none, <= -2 quantized
    table[0, 0, 0] = -2  # at least one quantized page
    return QuantizedKV(key_pool, value_pool, table, [], page, bits, group, residual=0, quantized=q)


def check_native_equals_torch(seed, bits, dtype, shape, cut, module=None) -> None:
    batch, heads, pages, page, dim, vdim, group = shape
    store = random_store(seed, bits, dtype, batch, heads, pages, page, dim, vdim, group)
    used = max(1, pages * page - cut)
    keys, values = kernels.read_pages(store.table[..., : -(-used // page)], store.quantized, store.key_pool,
                                      store.value_pool, bits, used, module=module)
    want_keys, want_values = store.read_torch(used)
    assert keys.dtype == dtype and keys.shape == want_keys.shape and values.shape == want_values.shape
    assert torch.equal(keys, want_keys), (bits, dtype, shape, used)
    assert torch.equal(values, want_values), (bits, dtype, shape, used)


SHAPES = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.sampled_from([1, 4, 8, 32]),
                   st.sampled_from([1, 3, 8, 64]), st.sampled_from([4, 8, 16]), st.sampled_from([1, 2, 4]))


@SETTINGS
@given(seed=st.integers(0, 2**16), bits=st.sampled_from(Q.BITS), dtype=st.sampled_from(DTYPES), shape=SHAPES,
       cut=st.integers(0, 31))
def test_native_read_is_bitwise_the_torch_read(seed, bits, dtype, shape, cut):
    _native()
    cut = min(cut, shape[2] * shape[3] - 1)
    check_native_equals_torch(seed, bits, dtype, shape, cut)


_TWINS = {
    # the codes of a byte taken from the high bits first
    "nibble_order": ("(byte >> (i * BITS)) & mask", "(byte >> ((per_byte - 1 - i) * BITS)) & mask"),
    # half types: code * scale + zero rounded once, where torch rounds the product and then the sum
    "one_rounding": ("static_cast<T>(static_cast<A>(static_cast<T>(static_cast<A>(code) * s)) + z)",
                     "static_cast<T>(static_cast<A>(code) * s + z)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("twin", sorted(_TWINS))
def test_the_check_catches_planted_kernels(twin):
    """Each twin is the kernel's source with one planted change, built as its own module: the check above fails
    on it within a few random stores."""
    _native()
    old, new = _TWINS[twin]
    assert old in kernels._SOURCE
    module = kernels.build(kernels._SOURCE.replace(old, new), name=f"kvcompress_twin_{twin}_{kernels._NAME}")
    caught = 0
    for seed in range(8):
        for bits, dtype in [(4, torch.bfloat16), (2, torch.float16), (4, torch.float32)]:
            try:
                check_native_equals_torch(seed, bits, dtype, (1, 2, 3, 8, 64, 16, 4), 3, module=module)
            except AssertionError:
                caught += 1
    assert caught > 0, twin


@pytest.mark.parametrize("make", [lambda m: FullCache(m, kv_bits=4, residual=4, group=4),
                                  lambda m: SinkWindowCache(m, n_sink=2, window=20, kv_bits=2, residual=4, group=4)])
def test_decoding_through_either_read_gives_bitwise_the_same_logits(make, monkeypatch):
    _native()
    model = tiny_llama(seed=3)
    ids = torch.randint(3, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))

    def decode():
        cache = make(model)
        logits = [model(ids, **cache_arg(cache)).logits[:, -1]]
        token = logits[-1].argmax(-1, keepdim=True)
        for _ in range(6):
            logits.append(model(token, **cache_arg(cache)).logits[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
        assert any(bool((layer.store.table <= -2).any()) for layer in cache.layers)  # quantized pages were read
        return torch.stack(logits)

    with torch.no_grad():
        native = decode()
        monkeypatch.setattr(kernels, "available", lambda: False)
        assert torch.equal(native, decode())


def test_a_table_naming_no_page_is_an_error_not_a_stray_read():
    _native()
    store = random_store(1, 4, torch.float32, 1, 2, 2, 4, 8, 8, 4)
    for bad in (store.key_pool.shape[0], -store.quantized["keys"].shape[0] - 2):
        table = store.table.clone()
        table[0, 1, 1] = bad
        with pytest.raises(IndexError, match="names no page"):  # as the torch read's indexing raises
            kernels.read_pages(table, store.quantized, store.key_pool, store.value_pool, 4, 8)
    with pytest.raises(RuntimeError, match="cannot hold used"):
        kernels.read_pages(store.table, store.quantized, store.key_pool, store.value_pool, 4, 9)


def test_a_failed_build_warns_and_leaves_the_torch_path(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setattr(kernels, "build", fail)
    with pytest.warns(RuntimeWarning, match="Ninja is required"):
        assert not kernels.available()
    assert "Ninja is required" in kernels.unavailable_reason()
    store = random_store(0, 4, torch.float32, 1, 2, 2, 4, 8, 8, 4)
    keys, values = store.read(7)  # the torch path
    assert torch.equal(keys, store.read_torch(7)[0]) and torch.equal(values, store.read_torch(7)[1])


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setenv("KVCOMPRESS_NATIVE", "0")
    assert not kernels.available() and "KVCOMPRESS_NATIVE=0" in kernels.unavailable_reason()
