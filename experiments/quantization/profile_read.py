"""Where a quantized decode step's extra time goes: one layer's `QuantizedKV.read` (the dequantization the core asks
for once per layer per step), split into its parts, at SmolLM2-135M's layer shape (1 row, 3 kv heads, head dim 64,
fp32), against the fp32 paths (`DenseKV.read`: a view; the attention of one query over the same keys).

    OMP_NUM_THREADS=2 nice -n 5 python experiments/quantization/profile_read.py --tokens 4096,410 --threads 2

Parts of `read` (kvcompress/storage.py): `dequantize` (unpack the codes of every quantized page, times scale plus
zero: `_dequantized`), `cat` (full-precision pool + dequantized pages into one buffer), `gather` (logical slots to
rows of that buffer). Also timed: the same work written the two ways that would cut it (not in the library):
`pages in table order`: gather the packed pages each lane's table names FIRST (1/8 of the bytes at 4 bits), then
dequantize straight into slot order (no cat, no second gather); and `lut`: the same with unpacking by a 256-entry
lookup table (byte -> its codes) instead of shifts and masks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvcompress.quantize import dequantize_keys, dequantize_values
from kvcompress.storage import QuantizedKV


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


def table_order_read(store: QuantizedKV, used: int, lut: torch.Tensor | None = None):
    """Dequantize in slot order: gather each lane's packed pages by its table, dequantize once, fill the
    full-precision pages. Same result as `store.read(used)`."""
    q = store.quantized
    pages = -(-used // store.page)
    entry = store.table[..., :pages]  # (B, H, pages)
    quantized = entry <= -2
    index = (-entry - 2).clamp(min=0)
    dim, vdim = store.key_pool.shape[-1], store.value_pool.shape[-1]
    if lut is None:
        keys = dequantize_keys(q["keys"][index], q["key_scale"][index], q["key_zero"][index], store.bits, dim,
                               store.key_pool.dtype)
        values = dequantize_values(q["values"][index], q["value_scale"][index], q["value_zero"][index], store.bits,
                                   store.group, store.value_pool.dtype)
    else:
        keys = lut[q["keys"][index].long()].flatten(-2)[..., :dim] * q["key_scale"][index].float() + \
            q["key_zero"][index].float()
        codes = lut[q["values"][index].long()].flatten(-2)  # (B, H, pages, page, groups, group)
        values = (codes * q["value_scale"][index].float() + q["value_zero"][index].float()).flatten(-2)
    fp = entry.clamp(min=0)
    keys = torch.where(quantized[..., None, None], keys, store.key_pool[fp])
    values = torch.where(quantized[..., None, None], values, store.value_pool[fp])
    return keys.flatten(2, 3)[:, :, :used], values.flatten(2, 3)[:, :, :used]


def unpack_table(bits: int) -> torch.Tensor:
    """(256, 8 / bits) float32: the codes packed in each byte value, first code in the low bits."""
    per_byte = 8 // bits
    byte = torch.arange(256).view(-1, 1)
    return ((byte >> (torch.arange(per_byte) * bits)) & (2**bits - 1)).float()


def profile(tokens: int, bits: int, group: int, residual: int, repeats: int) -> dict:
    store = filled_store(tokens, bits, group, residual)
    q_pages = int((store.table <= -2).sum())
    fp_pages = int((store.table >= 0).sum())
    out = {"tokens": tokens, "bits": bits, "group": group, "residual": residual, "quantized_pages": q_pages,
           "fp_pages": fp_pages}
    out["read_ms"] = timed(lambda: store.read(tokens), repeats) * 1e3
    out["dequantize_ms"] = timed(store._dequantized, repeats) * 1e3
    dq_keys, dq_values = store._dequantized()

    def cat():
        return (torch.cat([store.key_pool.view(-1, 64), dq_keys.view(-1, 64)]),
                torch.cat([store.value_pool.view(-1, 64), dq_values.reshape(-1, 64)]))

    out["cat_ms"] = timed(cat, repeats) * 1e3
    keys, values = cat()
    rows = store._rows(store._all_slots(tokens))
    out["gather_ms"] = timed(lambda: (keys[rows], values[rows]), repeats) * 1e3
    reference = store.read(tokens)
    mine = table_order_read(store, tokens)
    lut = unpack_table(bits)
    fused = table_order_read(store, tokens, lut)
    out["table_order_equal"] = bool(torch.equal(reference[0], mine[0]) and torch.equal(reference[1], mine[1]))
    out["lut_max_abs_diff"] = float(max((reference[0] - fused[0]).abs().max(), (reference[1] - fused[1]).abs().max()))
    out["table_order_read_ms"] = timed(lambda: table_order_read(store, tokens), repeats) * 1e3
    out["lut_read_ms"] = timed(lambda: table_order_read(store, tokens, lut), repeats) * 1e3
    # fp32 references at the same shape: the attention of one decode query (9 query heads over 3 kv heads)
    k, v = reference
    query = torch.randn(1, 9, 1, 64)
    kk, vv = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    out["fp32_attention_ms"] = timed(
        lambda: torch.nn.functional.scaled_dot_product_attention(query, kk, vv), repeats) * 1e3
    out["fp32_kv_mib"] = 2 * k.nbytes / 2**20
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
