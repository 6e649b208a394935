"""Building blocks of `select` shared by the strategies: top-k of a score, the recent window, head grouping; and of
the decode-step fast paths (`evict` overrides that free exactly what `select` would, without ranking): `lowest`
(the one slot a top-k of n - 1 leaves out), the stream rank kept up to date in per-slot state, per-slot norms
computed once per token.

Shapes: S = the layer's slots (`layer.used`), Hp = 1 or Hkv (the layer's slot layout), H = any head count that
broadcasts against Hp (1 or Hkv).
"""

from __future__ import annotations

import torch
from einops import reduce

from .layer import CompressedLayer


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


# --- decode-step fast paths ---------------------------------------------------------------------------------------
STREAM_RANK = "stream_rank"  # per-slot state: each kept slot's `stream_rank()`, kept up to date while decoding


def redefines(cache, owner: type, *names: str) -> bool:
    """Whether the class of `cache` redefines any of the methods `names` of `owner`. A decode fast path written for
    `owner.select` runs only when it does not: a subclass that changes `select` is evicted through its `select`."""
    cls = type(cache)
    return any(getattr(cls, name) is not getattr(owner, name) for name in names)


def lowest(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, H, 1) long: per row and head, the candidate that `top_k(scores, candidates, n - 1)` leaves out of its n
    candidates, found by one argmin instead of a sort: the lowest score (compared in float32, as `top_k` does), ties
    to the HIGHER slot index (`top_k` keeps the lower first). Scores must be finite; a row or head without
    candidates gets an arbitrary slot (the caller masks it).

    Args: scores (B, H, S) float; candidates (B, H or 1, S) bool."""
    scores = scores if scores.dtype == torch.float32 else scores.float()
    masked = torch.where(candidates, scores, float("inf"))
    return (masked.shape[-1] - 1) - masked.flip(-1).argmin(dim=-1, keepdim=True)


def record_stream_rank(layer: CompressedLayer) -> None:
    """After an eviction through `keep_only`: store `layer.stream_rank()` in the per-slot state STREAM_RANK, which
    the decode fast paths then keep up to date (`decode_stream_rank`, `free_one`) instead of ranking every step."""
    layer.slot_state(STREAM_RANK, dtype=torch.long)[..., : layer.used] = layer.stream_rank()


def decode_stream_rank(layer: CompressedLayer, count: torch.Tensor, new: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Hp, S) long: the STREAM_RANK state (a view) after a decode step wrote its token, which is the newest of
    its row and so gets rank `count - 1` (`count` (B, Hp, 1): the valid slots now, the new one included; `new`:
    `layer.new_slot_mask()` when the caller has it). Equals `layer.stream_rank()` on valid slots when the state was
    current before the step; stale on free slots."""
    rank = layer.slot_state(STREAM_RANK, dtype=torch.long)[..., : layer.used]
    torch.where(layer.new_slot_mask() if new is None else new, count - 1, rank, out=rank)
    return rank


def free_one(layer: CompressedLayer, slot: torch.Tensor, where: torch.Tensor, rank: torch.Tensor | None = None,
             slot_rank: torch.Tensor | None = None) -> None:
    """A decode step's eviction: free `slot` (B, Hp, 1) where `where` (B, Hp, 1) bool. With `rank` (the view
    `decode_stream_rank` returned), the slots after the freed one in stream order move one rank down, so the state
    stays `layer.stream_rank()`; `slot_rank`: the freed slot's rank, when the caller has it."""
    layer.free_slots(slot, where)
    if rank is not None:
        slot_rank = rank.gather(-1, slot) if slot_rank is None else slot_rank
        torch.where((rank > slot_rank) & where, rank - 1, rank, out=rank)


def decode_slot(layer: CompressedLayer, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a decode step: (written, slot), both (B, heads, 1): whether the row's new token was written (False for a
    pad) and the slot it was written to, per kv head."""
    return layer.new_slot_mask().expand(-1, heads, -1).max(dim=-1, keepdim=True)


def slot_norms(layer: CompressedLayer, name: str, tensor: torch.Tensor,
               written_slot: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, Hkv, S) L2 norms of `tensor` (the layer's keys or values, (B, Hkv, C, d)) per slot, kept in the per-slot
    state `name`: computed (in fp32, fp64 for fp64 caches) for the slots the last forward wrote, read for the others,
    so a forward costs O(new tokens x d). Call it on every forward, so no token is left without a norm.
    `written_slot`: `decode_slot(layer, Hkv)` of a decode step when the caller has it."""
    heads, dim = tensor.shape[1], tensor.shape[-1]
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    norms = layer.slot_state(name, heads=heads, dtype=dtype)
    if layer.new_tokens == 1:  # a decode step: one new slot per row and head (none where the token is a pad)
        written, slot = written_slot if written_slot is not None else decode_slot(layer, heads)  # (B, Hkv, 1)
        fresh = torch.linalg.vector_norm(tensor.gather(2, slot.unsqueeze(-1).expand(-1, -1, -1, dim)), dim=-1,
                                         dtype=dtype)
        norms.scatter_(-1, slot, torch.where(written, fresh, norms.gather(-1, slot)))
        return norms[..., : layer.used]
    new = layer.new_slot_mask().expand(-1, heads, -1)  # (B, Hkv, S)
    slots = new.any(dim=1).any(dim=0).nonzero().flatten()  # slots some row wrote in this forward
    if slots.numel():
        fresh = torch.linalg.vector_norm(tensor[:, :, slots], dim=-1, dtype=dtype)  # (B, Hkv, n)
        norms[:, :, slots] = torch.where(new[:, :, slots], fresh, norms[:, :, slots])
    return norms[..., : layer.used]
