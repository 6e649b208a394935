"""Where a quantized decode step's extra time goes: one layer's `QuantizedKV.read` (the dequantization the core asks
for once per layer per step), at SmolLM2-135M's layer shape (1 row, 3 kv heads, head dim 64, fp32), against the fp32
paths (`PagedKV.read` of the same pairs; the attention of one query over them).

    OMP_NUM_THREADS=1 python experiments/quantization/profile_read.py --tokens 4096,410 --threads 1

Timed: `native` (kvcompress.kernels: one pass from the codes, what `read` runs on CPU when the kernel is built),
`torch` (`read_torch`: gather the packed pages, unpack, convert, times scale plus zero, copy the full-precision
pages), and its two largest parts on their own (`dequantize keys`, `dequantize values`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvcompress import kernels
from kvcompress.quantize import dequantize_keys, dequantize_values
from kvcompress.storage import PagedKV, QuantizedKV


def filled_store(tokens: int, bits: int, group: int, residual: int, heads: int = 3, dim: int = 64) -> QuantizedKV:
    """A QuantizedKV holding `tokens` kept pairs in stream order, aged pages quantized (what a FullCache layer holds
    after a prefill of `tokens`)."""
    keys = torch.randn(1, heads, tokens, dim)
    values = torch.randn(1, heads, tokens, dim)
    store = QuantizedKV.empty(keys, values, page=group, bits=bits, group=min(group, dim), residual=residual)
    store.grow(tokens)
    store.write_range(0, keys, values)
    positions = torch.arange(store.capacity).view(1, 1, -1)
    positions = torch.where(positions < tokens, positions, -1)
    store.settle(positions, tokens)
    return store


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def profile(tokens: int, bits: int, group: int, residual: int, repeats: int) -> dict:
    store = filled_store(tokens, bits, group, residual)
    out = {"tokens": tokens, "bits": bits, "group": group, "residual": residual}
    if kernels.available():
        out["native_read_ms"] = timed(lambda: store.read(tokens), repeats) * 1e3
    out["torch_read_ms"] = timed(lambda: store.read_torch(tokens), repeats) * 1e3
    q, dim = store.quantized, store.key_pool.shape[-1]
    out["dequantize_keys_ms"] = timed(lambda: dequantize_keys(q["keys"], q["key_scale"], q["key_zero"], bits, dim,
                                                              torch.float32), repeats) * 1e3
    out["dequantize_values_ms"] = timed(lambda: dequantize_values(q["values"], q["value_scale"], q["value_zero"],
                                                                  bits, store.group, torch.float32), repeats) * 1e3
    keys, values = store.read(tokens)
    fp32 = PagedKV.empty(keys, values, page=group)
    fp32.grow(tokens)
    fp32.write_range(0, keys, values)
    out["fp32_read_ms"] = timed(lambda: fp32.read(tokens), repeats) * 1e3
    query = torch.randn(1, 9, 1, dim)
    out["attention_ms"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, enable_gqa=True), repeats) * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="4096,410")
    p.add_argument("--bits", default="4,2")
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import json
    import os

    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")
    for tokens in (int(t) for t in args.tokens.split(",")):
        for bits in (int(b) for b in args.bits.split(",")):
            print(json.dumps(profile(tokens, bits, args.group, args.residual, args.repeats)), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
