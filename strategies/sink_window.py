"""SinkWindowCache: attention sinks + sliding window (StreamingLLM, Xiao et al. 2023)."""

from __future__ import annotations

import torch

from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..selection import first
from ..validate import as_int


@register("sink_window")
class SinkWindowCache(CompressedCache):
    """Keeps, per row, the first `n_sink` real tokens and the last `window` real tokens; pads are dropped.

    Eviction runs after each forward: tokens of one forward (a prefill chunk) all attend to each other and to the
    tokens kept before it, then the cache is cut back to at most `n_sink + window` tokens per row.

    A decode step frees at most one slot per row: the oldest token that is not a sink (sinks are marked in a
    per-slot state when `select` first runs on a layer whose rows all hold their sinks), without ranking the slots.
    `select` stays the definition; tests/test_sink_window_fast_path.py holds the two equal.

    Args:
        model: the causal LM this cache serves.
        n_sink: number of initial tokens always kept (>= 0; the paper finds 4 enough).
        window: number of most recent tokens kept (>= 1).
        positions: "original" (keys keep their text positions; default) or "cache" (keys and queries rotated at
            their rank within the cache, as in the paper: lets generation run past the model's context).
    """

    uses_budget = True

    def __init__(self, model, n_sink: int = 4, window: int = 1024, positions: str = "original"):
        n_sink, window = as_int(n_sink, "n_sink", minimum=0), as_int(window, "window", minimum=1)
        super().__init__(model, positions=positions)
        self.n_sink, self.window = n_sink, window
        self._sinks_marked: set[int] = set()  # layers whose rows all hold n_sink sinks, marked in state "sink"

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None) -> SinkWindowCache:
        """4 sinks + a window of `budget - 4` tokens; below 5, `budget - 1` sinks + a window of 1 (budget 1: the
        newest token only); default (None) 4 sinks + a window of 1024. `budget` is validated by `for_budget`."""
        if budget is None:
            return cls(model)
        n_sink = min(4, budget - 1)
        return cls(model, n_sink=max(n_sink, 0), window=max(budget - n_sink, 1))

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        valid = layer.valid
        rank = layer.stream_rank()  # index among the row's real tokens, in stream order
        from_end = valid.sum(dim=-1, keepdim=True) - 1 - rank
        return valid & ((rank < self.n_sink) | (from_end < self.window))

    def evict(self, layer: CompressedLayer) -> None:
        if layer.seen <= self.n_sink + self.window:  # no row holds more real tokens than it keeps
            return
        if layer.new_tokens == 1 and layer.layer_idx in self._sinks_marked:
            self._evict_oldest_non_sink(layer)
            return
        keep = self.select(layer)
        sinks = keep & first(layer, self.n_sink)
        layer.slot_state("sink", dtype=torch.bool)[..., : layer.used] = sinks
        if bool((sinks.sum(dim=-1) >= self.n_sink).all()):
            self._sinks_marked.add(layer.layer_idx)
        layer.keep_only(keep)

    def _evict_oldest_non_sink(self, layer: CompressedLayer) -> None:
        """A decode step: each row (and head) held at most `window` non-sink tokens before it and got one new token,
        so it frees its oldest non-sink token when it now holds more than `window`. Free slots are never marked
        sinks (sinks are never evicted), so the new token, written into a free slot, is not one."""
        positions = layer.positions  # (B, Hp, S)
        protected = (positions < 0) | layer.slot_state("sink", dtype=torch.bool)[..., : layer.used]
        over = (~protected).sum(dim=-1, keepdim=True) > self.window  # (B, Hp, 1)
        oldest = positions.masked_fill(protected, torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)
        layer.free_slots(oldest, over)

    def reset(self) -> None:
        super().reset()
        self._sinks_marked = set()
