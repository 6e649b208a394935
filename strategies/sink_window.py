"""SinkWindowCache: attention sinks + sliding window (StreamingLLM, Xiao et al. 2023)."""

from __future__ import annotations

import torch

from ..cache import CompressedCache, CompressedLayer
from ..registry import register


@register("sink_window")
class SinkWindowCache(CompressedCache):
    """Keeps, per row, the first `n_sink` real tokens and the last `window` real tokens; pads are dropped.

    Eviction runs after each forward: tokens of one forward (a prefill chunk) all attend to each other and to the
    tokens kept before it, then the cache is cut back to at most `n_sink + window` tokens per row.

    Args:
        model: the causal LM this cache serves.
        n_sink: number of initial tokens always kept (>= 0; the paper finds 4 enough).
        window: number of most recent tokens kept (>= 1).
        positions: "original" (keys keep their text positions; default) or "cache" (keys and queries rotated at
            their rank within the cache, as in the paper: lets generation run past the model's context).
    """

    uses_budget = True

    def __init__(self, model, n_sink: int = 4, window: int = 1024, positions: str = "original"):
        if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
            raise ValueError(f"n_sink must be an integer >= 0, got {n_sink!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        super().__init__(model, positions=positions)
        self.n_sink, self.window = n_sink, window

    @classmethod
    def for_budget(cls, model, tokenizer, budget: int | None) -> SinkWindowCache:
        """4 sinks + a window of `budget - 4` (at least 1) tokens; default window 1024."""
        if budget is None:
            return cls(model)
        n_sink = min(4, budget - 1)
        return cls(model, n_sink=max(n_sink, 0), window=max(budget - n_sink, 1))

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        valid = layer.valid
        rank = layer.stream_rank()  # index among the row's real tokens, in stream order
        from_end = valid.sum(dim=-1, keepdim=True) - 1 - rank
        return valid & ((rank < self.n_sink) | (from_end < self.window))
