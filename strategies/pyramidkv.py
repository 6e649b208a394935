"""PyramidKVCache: SnapKV with per-layer budgets decreasing linearly with depth (PyramidKV, Cai et al. 2024)."""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

from ..registry import register
from .snapkv import SnapKVCache


def pyramid_budgets(budget: int, window: int, layers: int, beta: float) -> list[int]:
    """Per-layer token budgets (window included) of PyramidKV, summing to exactly `layers * budget`.

    The paper's schedule (official code: `PyramidKVCluster`): beside the `window` tokens every layer keeps, the
    scored tokens A = budget - window of a uniform cache are spread linearly over depth, from
    max_num = 2A - A / beta at layer 0 down to min_num = A / beta at the last layer, so their mean is A. Each
    layer's share is rounded by largest remainders (floors, then +1 to the largest fractional parts, lower layers
    first on ties), so the sum is exact and the budgets stay non-increasing with depth.

    Returns:
        `layers` ints, each >= window; with one layer (or beta = 1) every layer gets `budget`.
    """
    scored = budget - window
    if layers == 1:
        return [budget]
    beta = Fraction(int(beta)) if isinstance(beta, numbers.Integral) else Fraction(float(beta))
    low = Fraction(scored) / beta
    high = 2 * scored - low
    step = (high - low) / (layers - 1)
    exact = [high - layer * step for layer in range(layers)]
    floors = [math.floor(share) for share in exact]
    missing = layers * scored - sum(floors)
    by_remainder = sorted(range(layers), key=lambda layer: (-(exact[layer] - floors[layer]), layer))
    for layer in by_remainder[:missing]:
        floors[layer] += 1
    return [window + share for share in floors]


@register("pyramidkv")
class PyramidKVCache(SnapKVCache):
    """PyramidKV: SnapKV's choice (see `SnapKVCache`: pooled attention of the observation window, top-k per kv head
    plus the window), with a budget per layer that decreases linearly with depth (`pyramid_budgets`), for the same
    total KV as a uniform SnapKV cache of `budget` tokens per layer (sum over layers == layers * budget exactly).

    Paper: Zefan Cai, Yichi Zhang, Bofei Gao, Yuliang Liu, Tianyu Liu, Keming Lu, Wayne Xiong, Yue Dong, Baobao
    Chang, Junjie Hu, Wen Xiao, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    2024, arXiv 2406.02069.

    Layer l keeps at most `layer_budgets[l]` tokens per row and kv head, after every forward (prefill and decoding,
    as `SnapKVCache`). Deviations from the paper (official code, `PyramidKVCluster`) beyond those of SnapKVCache:
    - Budgets are fixed from `budget`, not from the prompt length: the official code caps layer 0's share at the
      prompt length minus the window (moving the excess to the upper layers) and compresses uniformly, SnapKV-like,
      when the prompt is shorter than twice the scored budget. Here a layer whose budget exceeds what it has seen
      keeps everything, so the total is then below `layers * budget` (never above).
    - Shares are rounded by largest remainders (exact total, non-increasing) where the official code uses integer
      floor divisions (the total can fall a few tokens short).
    Deviations from kvpress 0.5.5's PyramidKVPress: kvpress spreads the pyramid over the whole kept count, window
    included (top layer int(n * (1 - ratio)) / beta tokens, window inside), and falls back to uniform SnapKV
    budgets unless that top layer holds at least `window` tokens (with its defaults: unless the uniform kept count
    is >= 1280 tokens); here the window is kept on top of the scored pyramid in every layer, as the paper's code
    does, so the pyramid applies at every budget.

    Args:
        model, budget, window, kernel, pooling, positions: as `SnapKVCache` (`budget` is the MEAN per-layer
            budget; `for_budget` picks the window by SnapKVCache's rule: 64 above a budget of 64, else half).
        beta: steepness (a number >= 1): the last layer keeps (budget - window) / beta scored tokens; 1 = uniform.
            Default 20 (paper's code and kvpress).
    """

    def __init__(self, model, budget: int = 1024, window: int = 64, kernel: int = 5, pooling: str = "avg",
                 beta: float = 20, positions: str = "original", allocation: str = "head", alpha: float = 0.2):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta < 1:
            raise ValueError(f"beta must be a finite number >= 1, got {beta!r}")
        super().__init__(model, budget=budget, window=window, kernel=kernel, pooling=pooling, positions=positions,
                         allocation=allocation, alpha=alpha)
        self.beta = beta
        self.layer_budgets = pyramid_budgets(self.budget, self.window, len(self.layers), beta)

    def layer_budget(self, layer_idx: int) -> int:
        return self.layer_budgets[layer_idx]
