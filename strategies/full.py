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
    """

    evicts = False

    def __init__(self, model):
        super().__init__(model)

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        return layer.valid
