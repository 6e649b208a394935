"""KnormCache: each kv head keeps the keys of lowest L2 norm (Devoto et al. 2024)."""

from __future__ import annotations

import torch

from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..selection import (
    STREAM_RANK,
    decode_stream_rank,
    first,
    free_one,
    lowest,
    recent,
    record_stream_rank,
    redefines,
    slot_norms,
    top_k,
)
from ..validate import as_int


@register("knorm")
class KnormCache(CompressedCache):
    """Keeps, per row, layer and kv head, the `budget` tokens whose keys have the lowest L2 norm (query-free).

    Paper: A. Devoto, Y. Zhao, S. Scardapane, P. Minervini, "A Simple and Effective L2 Norm-Based Strategy for KV
    Cache Compression", EMNLP 2024, arXiv:2406.11430 (low key norm correlates with high attention).

    Semantics, per layer and forward (after the forward's attention, like every kvcompress strategy): if a row
    holds more than `budget` real tokens in some kv head, that kv head keeps its first `n_sink` real tokens, its
    last `window` real tokens, and the `budget - (protected)` remaining tokens of lowest key norm; ties are broken
    by slot index. Pads are never kept. This runs after the prefill (each chunk of a chunked prefill) AND after
    every decoding step, so a new token whose key norm is among the highest is dropped right after it attended
    (unless `window` protects it). Since key norms never change, the set kept after any forward equals the
    `budget` lowest-norm tokens of all tokens seen (with `n_sink = window = 0`).

    Which keys: the keys as the cache stores them, i.e. rotated by RoPE at their text positions
    (positions="original"), as kvpress scores the keys its cache holds. RoPE is a rotation of each 2-d pair, so the
    norm of a rotated key equals the norm of the pre-RoPE key (exactly in real arithmetic, to fp32 rounding in
    practice; models whose rotary embedding folds an attention scaling into cos/sin, e.g. YaRN, scale every norm
    by the same factor, which leaves the ranking unchanged). positions="cache" is refused: this strategy keeps
    different tokens per kv head, and the core re-rotates only one token set shared by all heads.

    Norms are computed once per token, when it arrives (in fp32, fp64 for fp64 caches), and kept in per-slot state
    ("knorm", (B, Hkv, C)), so a forward costs O(new tokens x d), not a pass over the whole cache.

    Deviations: from the paper, which compresses the prompt once and evaluates fixed compression ratios, this
    cache keeps a fixed token budget and compresses during decoding too; the paper keeps no sink or window (both
    default to 0 here, optional). From kvpress's KnormPress: kvpress compresses after prefill only (decoding only
    through its DecodingPress wrapper), keeps int(n * (1 - ratio)) tokens of each prefill instead of a fixed
    budget, protects nothing (as the defaults here), and ranks ties by `topk`'s order.

    Args:
        model: the causal LM this cache serves.
        budget: tokens kept per row, layer and kv head (>= 1).
        n_sink: the first `n_sink` real tokens are always kept (default 0, as the paper and kvpress).
        window: the last `window` real tokens are always kept (default 0: the newest token is not protected).
    """

    uses_budget = True
    supports_cache_positions = False  # per-kv-head eviction

    def __init__(self, model, budget: int = 1024, n_sink: int = 0, window: int = 0, positions: str = "original"):
        budget = as_int(budget, "budget", minimum=1)
        n_sink = as_int(n_sink, "n_sink", minimum=0)
        window = as_int(window, "window", minimum=0)
        if n_sink + window > budget:
            raise ValueError(
                f"budget ({budget}) must be at least n_sink + window ({n_sink} + {window} = {n_sink + window})"
            )
        super().__init__(model, positions=positions)
        self.budget, self.n_sink, self.window = budget, n_sink, window

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None) -> KnormCache:
        """`budget` tokens of lowest key norm per kv head, nothing protected (default None: 1024)."""
        return cls(model) if budget is None else cls(model, budget=budget)

    def key_norms(self, layer: CompressedLayer) -> torch.Tensor:
        """(B, Hkv, S) L2 norms of the keys in slots [0, S): computed for the slots written by the last forward,
        read from per-slot state for the others (`selection.slot_norms`)."""
        return slot_norms(layer, "knorm", layer.keys)

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        valid = layer.valid
        norms = self.key_norms(layer)  # computed every forward, so no new token is left without a norm
        over = valid.sum(dim=-1) > self.budget
        if not bool(over.any()):
            return valid
        rank = layer.stream_rank() if self.n_sink or self.window else None  # one ranking for both
        protected = (first(layer, self.n_sink, rank) | recent(layer, self.window, rank)).expand_as(norms)
        valid = valid.expand_as(norms)
        room = self.budget - protected.sum(dim=-1, keepdim=True)  # (B, Hkv, 1)
        return protected | top_k(-norms, valid & ~protected, room)

    def evict(self, layer: CompressedLayer) -> None:
        """A decode step frees exactly what `select` would, without sorting: each row and kv head held at most
        `budget` tokens and got one, so over budget it drops its highest-norm unprotected key (`lowest` of -norm:
        ties to the higher slot, as `top_k` keeps the lower). Sinks and window are read from the stream rank kept
        in per-slot state (`decode_stream_rank`; not kept when both are 0). Incremental throughout: the new key's
        norm, the rank. tests/test_decode_fast_paths.py holds this equal to `select`."""
        protects = bool(self.n_sink or self.window)
        per_head = layer.positions.shape[1] == layer.keys.shape[1]  # the first eviction gives the layout kv heads
        if layer.new_tokens != 1 or redefines(self, KnormCache, "select") or not per_head \
                or (protects and STREAM_RANK not in layer.state):
            super().evict(layer)
            if protects:
                record_stream_rank(layer)
        else:
            self._evict_decode_step(layer)

    def _evict_decode_step(self, layer: CompressedLayer) -> None:
        norms = self.key_norms(layer)  # (B, Hkv, S)
        valid = layer.valid
        count = valid.sum(dim=-1, keepdim=True)
        candidates, rank = valid, None
        if self.n_sink or self.window:
            rank = decode_stream_rank(layer, count)
            candidates = valid & (rank >= self.n_sink) & (rank < count - self.window)
        free_one(layer, lowest(-norms, candidates), count > self.budget, rank)
