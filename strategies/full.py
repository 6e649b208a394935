"""FullCache: keeps every token. The reference baseline (same logits as transformers' DynamicCache)."""

from __future__ import annotations

import torch

from ..cache import CompressedCache, CompressedLayer
from ..registry import register


@register("full")
class FullCache(CompressedCache):
    """Keeps every key and value; pads are stored (as DynamicCache does) but never attended.

    Args:
        model: the causal LM this cache serves.
        positions: "original" (default) or "cache" (see `CompressedCache`; with nothing evicted, a token's rank in
            the cache is its position among the row's real tokens, so both give the same logits).
    """

    evicts = False

    def __init__(self, model, positions: str = "original"):
        super().__init__(model, positions=positions)

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        return layer.valid
