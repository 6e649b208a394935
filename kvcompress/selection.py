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


def adaptive_top_k(scores: torch.Tensor, candidates: torch.Tensor, per_head: int | torch.Tensor,
                   alpha: float = 0.2) -> torch.Tensor:
    """AdaKV's allocation (Feng et al. 2024, arXiv 2407.11550): each row keeps its `per_head x H` best candidates
    over ALL its H heads together (heads whose tokens score higher keep more), with a safeguard: every head first
    keeps its floor(alpha x per_head) best (or all its candidates when it has fewer).

    Args:
        scores: (B, H, S) float, comparable across heads. candidates: (B, H or 1, S) bool.
        per_head: the average count per head, an int or a (B, 1, 1) long tensor.
        alpha: the safeguard fraction in [0, 1] (kvpress's AdaKVPress default 0.2).

    Returns:
        (B, H, S) bool keep. Ties are broken by (head, slot) order, lower first (as `top_k`).
    """
    batch, heads, slots = scores.shape
    candidates = candidates.expand_as(scores)
    per_head = torch.as_tensor(per_head, device=scores.device).reshape(-1, 1, 1).expand(batch, 1, 1)
    safe = (alpha * per_head).floor().long()
    guaranteed = top_k(scores, candidates, safe.expand(batch, heads, 1))
    rest = per_head * heads - guaranteed.sum(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    others = candidates & ~guaranteed
    flat = scores.float().masked_fill(~others, float("-inf")).flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=order.device).expand_as(order))
    chosen = (rank < rest.view(batch, 1)) & others.flatten(1)
    return guaranteed | chosen.view(batch, heads, slots)


ALLOCATIONS = ("head", "adakv")


def check_allocation(allocation: str, alpha: float) -> None:
    """ValueError unless `allocation` is "head" (every kv head keeps the budget) or "adakv" (`adaptive_top_k`) and
    `alpha` is a number in [0, 1]."""
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
