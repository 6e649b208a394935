"""Test helpers shared by the per-kv-head strategy tests (knorm, expected_attention): feed a cache token by token
and record which stream positions every layer, row and kv head kept after each forward."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from kvcompress.cache import cache_arg


def kept_sets(cache) -> list:
    """[layer][row][kv head] -> set of kept stream positions."""
    heads = cache.layers[0].keys.shape[1]
    return [[[set(p[p >= 0].tolist()) for p in row] for row in layer.positions.expand(-1, heads, -1)]
            for layer in cache.layers]


@contextmanager
def recording_kept(model, cache):
    """Records `kept_sets(cache)` after every forward of `model` (a forward hook on the model)."""
    kept = []
    handle = model.register_forward_hook(lambda *_: kept.append(kept_sets(cache)))
    try:
        yield kept
    finally:
        handle.remove()


def teacher_forced(model, cache, ids, mask, continuation, chunk: int | None = None):
    """Feed `ids` (B, N) (whole, or in forwards of `chunk` tokens), then `continuation` (B, T) one token at a time
    (direct model() calls). Returns the last logits of the prompt and of every continuation token (B, T + 1, V) and
    the kept sets after every forward (prompt chunks included)."""
    logits = []
    step = chunk or ids.shape[1]
    with torch.no_grad(), recording_kept(model, cache) as kept:
        for start in range(0, ids.shape[1], step):
            out = model(ids[:, start : start + step], attention_mask=mask[:, : start + step], **cache_arg(cache))
        logits.append(out.logits[:, -1])
        for t in range(continuation.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits.append(model(continuation[:, t : t + 1], attention_mask=mask, **cache_arg(cache)).logits[:, -1])
    return torch.stack(logits, 1), kept
