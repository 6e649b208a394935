"""Building blocks of `select` shared by the strategies: top-k of a score, the recent window, head grouping.

Shapes: S = the layer's slots (`layer.used`), Hp = 1 or Hkv (the layer's slot layout), H = any head count that
broadcasts against Hp (1 or Hkv).
"""

from __future__ import annotations

import torch
from einops import reduce

from .cache import CompressedLayer


def recent(layer: CompressedLayer, window: int, rank: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hp, S) bool: the `window` most recent kept tokens of each row (and head), by stream position.
    `rank`: `layer.stream_rank()` when the caller has it already (it is an argsort per call)."""
    valid = layer.valid
    if window <= 0:
        return torch.zeros_like(valid)
    rank = layer.stream_rank() if rank is None else rank
    return valid & (valid.sum(dim=-1, keepdim=True) - 1 - rank < window)


def first(layer: CompressedLayer, count: int, rank: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hp, S) bool: the `count` oldest kept tokens of each row (and head) (attention sinks). `rank`: as in
    `recent`."""
    valid = layer.valid
    if count <= 0:
        return torch.zeros_like(valid)
    return valid & ((layer.stream_rank() if rank is None else rank) < count)


def top_k(scores: torch.Tensor, candidates: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """(B, H, S) bool: the `k` candidates with the highest score in each row and head (all candidates when fewer).

    Args:
        scores: (B, H, S) float. candidates: (B, H or 1, S) bool, the slots that may be chosen.
        k: an int >= 0, or a (B, H, 1) long tensor of per-row/head counts.

    Ties are broken by slot index (lower first), so the choice is deterministic.
    """
    candidates = candidates.expand_as(scores)
    k_max = int(k) if not isinstance(k, torch.Tensor) else int(k.max())
    k_max = min(k_max, scores.shape[-1])
    if k_max <= 0:
        return torch.zeros_like(candidates)
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)[..., :k_max]
    chosen = torch.zeros_like(candidates)
    take = torch.ones_like(order, dtype=torch.bool)
    if isinstance(k, torch.Tensor):
        take = torch.arange(k_max, device=order.device) < k
    chosen.scatter_(-1, order, take)
    return chosen & candidates


def per_kv_head(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, ...) -> (B, Hkv, ...): the mean over the query heads of each kv group (query head h uses kv head
    h // (Hq / Hkv))."""
    return reduce(scores, "b (h g) ... -> b h ...", "mean", h=kv_heads)
