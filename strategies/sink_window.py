"""SinkWindowCache: attention sinks + sliding window (StreamingLLM, Xiao et al. 2023)."""

from __future__ import annotations

import torch

from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..validate import as_int


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
        n_sink, window = as_int(n_sink, "n_sink", minimum=0), as_int(window, "window", minimum=1)
        super().__init__(model, positions=positions)
        self.n_sink, self.window = n_sink, window

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
