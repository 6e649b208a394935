"""The physical floor of a decode step: bytes it must read / the machine's memory read bandwidth.

A decode step of a causal LM reads every weight once (the input embedding only one row, unless it is tied to the
output head, which reads it whole) plus the kept keys and values of every layer. Its time cannot beat
`bytes / read bandwidth`, so decode speed is judged by `step time / floor` (1.0 would be perfect) rather than by a
speed-up target that ignores how much of a step the weights take.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from transformers.cache_utils import Cache


def read_bandwidth(device: torch.device | str = "cpu", megabytes: int = 512, repeats: int = 7) -> dict:
    """Memory read bandwidth measured as a reduction over a large fp32 tensor (larger than the CPU caches).

    Runs with the current torch thread count (so it measures what the model's matmuls can reach). Returns
    {"bytes_per_s": median, "samples": [bytes/s per repeat], "megabytes": tensor size}.
    """
    device = torch.device(device)
    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    samples = []
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        data.sum()
        _sync(device)
        seconds = time.perf_counter() - start
        if i:  # the first pass warms up (page faults, kernel selection)
            samples.append(data.nbytes / seconds)
    del data
    return {"bytes_per_s": statistics.median(samples), "samples": samples, "megabytes": megabytes}


@torch.no_grad()
def matmul_seconds(model, repeats: int = 7) -> dict:
    """The weight matmuls of one decode step alone: every `torch.nn.Linear` of `model` (projections, MLP, output
    head) applied to one token's activation, in turn, on the model's device and dtype. What torch's kernels reach
    on these matrices with the current thread count; a decode step cannot beat it whatever its cache does, so
    `step - matmul` bounds what attention, norms, Python and the cache cost.

    Returns {"seconds": median, "samples": [seconds per repeat], "linears": count}.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    device = next(model.parameters()).device
    inputs = [torch.randn(1, 1, m.in_features, dtype=m.weight.dtype, device=m.weight.device) for m in linears]
    samples = []
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        for module, x in zip(linears, inputs):
            module(x)
        _sync(device)
        if i:  # the first pass warms up
            samples.append(time.perf_counter() - start)
    return {"seconds": statistics.median(samples), "samples": samples, "linears": len(linears)}


@functools.lru_cache(maxsize=8)
def process_bandwidth(device: str = "cpu") -> float:
    """`read_bandwidth(device)["bytes_per_s"]`, measured once per process and device."""
    return read_bandwidth(device)["bytes_per_s"]


def weight_bytes(model) -> int:
    """Bytes of parameters one decode step reads: every distinct parameter tensor once, except that an input
    embedding not tied to the output head counts one row (a step looks up one token)."""
    seen, total = set(), 0
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    for param in model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        if param is embedding and not tied:
            total += param[0].nbytes
        else:
            total += param.nbytes
    return total


def cache_kv_bytes(cache: Cache) -> int:
    """Bytes of the kept keys and values a step must read: `kv_bytes_used()` of a kvcompress cache, else the sum
    over the layers' `keys`/`values` tensors (DynamicCache)."""
    if hasattr(cache, "kv_bytes_used"):
        return int(cache.kv_bytes_used())
    return sum(
        layer.keys.nbytes + layer.values.nbytes
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None and layer.keys.numel()
    )


def floor_stats(model, cache: Cache, step_seconds: float, device: str = "cpu") -> dict:
    """The floor of one decode step with `cache` and how far `step_seconds` is from it.

    Returns:
        step_bytes: weight bytes + kept KV bytes (what a step must read); bandwidth_gb_s (1e9 bytes/s, measured
        once per process); floor_ms = step_bytes / bandwidth; step_ms; floor_ratio = step / floor (>= 1).
    """
    bandwidth = process_bandwidth(str(device))
    step_bytes = weight_bytes(model) + cache_kv_bytes(cache)
    floor = step_bytes / bandwidth
    return {
        "step_bytes": step_bytes,
        "bandwidth_gb_s": bandwidth / 1e9,
        "floor_ms": floor * 1e3,
        "step_ms": step_seconds * 1e3,
        "floor_ratio": step_seconds / floor,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
