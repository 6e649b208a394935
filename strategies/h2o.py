"""H2OCache: heavy hitters by accumulated attention + a recent window (H2O, Zhang et al. 2023)."""

from __future__ import annotations

import torch
from einops import reduce

from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..selection import STREAM_RANK, decode_stream_rank, free_one, lowest, record_stream_rank, redefines, top_k
from ..selection import recent as recent_window
from ..validate import as_int

STATE = "h2o_accumulated"


@register("h2o")
class H2OCache(CompressedCache):
    """Heavy-Hitter Oracle: Zhang, Sheng, Zhou, Chen, Zheng, Cai, Song, Tian, Re, Barrett, Wang, Chen, "H2O:
    Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", NeurIPS 2023,
    arXiv:2306.14048.

    Each kv head of each layer and row keeps its `recent` most recent real tokens plus the `heavy` other tokens
    with the largest accumulated attention, so at most `heavy + recent` tokens per row, layer and kv head.

    Score: a (B, Hkv, C) per-slot state (`layer.slot_state`, which follows its token through eviction,
    compaction, batch and beam operations). After every forward (prefill, each prefill chunk, each decode step),
    every kept slot adds the attention it received in that forward, summed over all the forward's queries and over
    the query heads of its kv group (`observe_received`, the kernel's exact softmax); a slot written by this forward
    starts at what it received in it. So a token's score is the attention it received from every query that has
    seen it, from the moment it was fed. Then each kv head keeps `recent_window(recent) | top_k(score, heavy)`.
    Pads are never kept.

    Deviations from the paper (and its code, github.com/FMInference/H2O):
    - GQA: the paper's models are multi-head (one score per attention head). Here a kv head's tokens are shared
      by its query heads, so its score is the SUM over its query heads (the ranking equals their mean).
    - Prefill: the paper's (and the official simulation code's) policy is greedy token by token, so within the
      prompt each query already sees only the kept tokens. Here a forward attends to everything kept before it
      plus all its own tokens, then evicts once (the accumulated score of a prompt token is its attention summed
      over all prompt queries from its own on). With `prefill_chunk_size` it evicts after each chunk. Decoding
      (one token per forward: add its attention, drop the lowest-scored non-recent token) is the paper's policy.
    - Sizes are token counts (`heavy`, `recent`), fixed for the whole run; the paper gives them as fractions of
      the sequence length (e.g. 10% + 10%).
    - The recent window counts the newest token, and `top_k` breaks score ties by slot index.
    Deviations from kvpress 0.5.5 (which has no H2O press; its `ObservedAttentionPress` is the closest): kvpress
    compresses once after prefill (decoding only with a wrapper), keeps NO recent window, averages (instead of
    summing) over the group's query heads, divides each key's sum by the number of queries that could see it
    (H2O does not normalise, which favours early tokens), keeps `int(n * (1 - ratio))` tokens, and needs eager
    attention (here the core computes the scores blockwise, so an 8K prefill never holds 8K x 8K probabilities).

    Args:
        model: the causal LM this cache serves.
        heavy: heavy-hitter tokens kept per row, layer and kv head (>= 0).
        recent: most recent tokens kept per row, layer and kv head (>= 0); `heavy + recent` must be >= 1.
        positions: only "original" (keeps different tokens per kv head; "cache" raises ValueError).
    """

    uses_budget = True
    observe_received = True
    supports_cache_positions = False  # per-kv-head eviction

    def __init__(self, model, heavy: int = 512, recent: int = 512, positions: str = "original"):
        heavy, recent = as_int(heavy, "heavy", minimum=0), as_int(recent, "recent", minimum=0)
        if heavy + recent < 1:
            raise ValueError("heavy + recent must be >= 1 (the cache must keep at least one token), got heavy=0, "
                             "recent=0")
        super().__init__(model, positions=positions)
        self.heavy, self.recent = heavy, recent

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None) -> H2OCache:
        """Half the budget each: `recent = ceil(budget / 2)`, `heavy = floor(budget / 2)` (budget 1 keeps the newest
        token); None: the defaults (512 + 512)."""
        if budget is None:
            return cls(model)
        return cls(model, heavy=budget // 2, recent=budget - budget // 2)

    def _accumulator(self, layer: CompressedLayer) -> torch.Tensor:
        """(B, Hkv, C) float32 accumulated attention of each slot (the layer's per-slot state)."""
        return layer.slot_state(STATE, heads=layer.keys.shape[1], dtype=torch.float32)

    def scores(self, layer_idx: int) -> torch.Tensor:
        """(B, Hkv, S) accumulated attention of the slots [0, used) of layer `layer_idx` (free slots: stale values)."""
        layer = self.layers[layer_idx]
        return self._accumulator(layer)[..., : layer.used]

    def _received(self, layer: CompressedLayer) -> torch.Tensor:
        """(B, Hkv, S) attention each slot received in this forward, summed over queries and each kv group's
        query heads (query head h uses kv head h // (Hq / Hkv))."""
        return reduce(layer.observation.received, "b (h g) s -> b h s", "sum", h=layer.keys.shape[1])

    def _accumulate(self, layer: CompressedLayer, new: torch.Tensor | None = None) -> torch.Tensor:
        """Add this forward's received attention to every slot's accumulator (a slot written by this forward starts
        at what it received; `new`: `layer.new_slot_mask()` when the caller has it); returns the (B, Hkv, S) scores
        (a view of the state)."""
        score = self._accumulator(layer)[..., : layer.used]
        new = layer.new_slot_mask() if new is None else new
        score.masked_fill_(new, 0.0).add_(self._received(layer))  # 0 + r is exactly r
        return score

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        score = self._accumulate(layer)
        keep = recent_window(layer, self.recent)
        return keep | top_k(score, layer.valid & ~keep, self.heavy)

    def evict(self, layer: CompressedLayer) -> None:
        """A decode step (one token per row) frees exactly what `select` would, without sorting: each row and kv head
        held at most `heavy + recent` tokens and got one, so over that it drops its lowest-scored token outside the
        recent window (`lowest`: ties to the higher slot, as `top_k` keeps the lower). The recent window is read
        from the stream rank kept in per-slot state (`decode_stream_rank`), not from a ranking of the slots.
        Incremental: the accumulator adds the step's received attention (O(S), the definition: every kept token
        received some), the rank follows the new token and the freed one. tests/test_decode_fast_paths.py holds
        this equal to `select`."""
        if layer.new_tokens != 1 or redefines(self, H2OCache, "select") or STREAM_RANK not in layer.state:
            super().evict(layer)
            record_stream_rank(layer)
        else:
            self._evict_decode_step(layer)

    def _evict_decode_step(self, layer: CompressedLayer) -> None:
        new = layer.new_slot_mask()
        score = self._accumulate(layer, new)
        valid = layer.valid  # (B, Hkv, S): the layout is per kv head since the first select
        count = valid.sum(dim=-1, keepdim=True)
        rank = decode_stream_rank(layer, count, new)
        candidates = valid & (rank < count - self.recent)  # all but the `recent` newest
        free_one(layer, lowest(score, candidates), count > self.heavy + self.recent, rank)
