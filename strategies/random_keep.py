"""RandomKeepCache: Hidden_random, the random baseline of "Label Words are Anchors" (Wang et al. 2023)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..registry import register
from ..validate import as_int
from .label_words import LabelWordCache


@register("hidden_random")
class RandomKeepCache(LabelWordCache):
    """Keeps `n_keep` prefix positions: the first `n_first`, the rest drawn uniformly (seeded) from the prefix
    positions not in `exclude`; everything after the prefix is kept. The same positions in every row and layer.

    The paper's Hidden_random keeps as many random non-label-word tokens as Hidden_anchor keeps anchors; pass the
    anchor positions as `exclude` and their count as `n_keep` for that comparison.

    Args:
        model: the causal LM this cache serves.
        n_keep: prefix positions kept in total (1 <= n_keep, n_first <= n_keep).
        prefix_length: stream positions of the compressed prefix.
        seed: seed of the draw (a private torch.Generator; global RNG untouched).
        n_first: always keep the first `n_first` positions (default 1: the attention sink).
        exclude: positions never drawn (they may still be among the first `n_first`).
    """

    def __init__(self, model, n_keep: int, prefix_length: int, seed: int = 0, n_first: int = 1,
                 exclude: Sequence[int] = (), positions: str = "original"):
        n_keep = as_int(n_keep, "n_keep", minimum=1)
        prefix_length = as_int(prefix_length, "prefix_length", minimum=1)
        n_first = as_int(n_first, f"n_first (with n_keep={n_keep})", minimum=0, maximum=n_keep)
        seed = as_int(seed, "seed")
        excluded = set(exclude)
        pool = [p for p in range(min(n_first, prefix_length), prefix_length) if p not in excluded]
        need = n_keep - min(n_first, prefix_length)
        if need > len(pool):
            raise ValueError(f"cannot draw {need} random positions from {len(pool)} available in the prefix")
        generator = torch.Generator().manual_seed(seed)
        drawn = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:need].tolist()]
        keep = sorted(set(range(min(n_first, prefix_length))) | set(drawn))
        super().__init__(model, keep, prefix_length, n_first=0, positions=positions)
        self.seed = seed

    @classmethod
    def _from_budget(cls, model, tokenizer, budget):
        raise ValueError(
            "hidden_random keeps random positions of a given prefix; build it with "
            "RandomKeepCache(model, n_keep, prefix_length, seed) (see kvcompress.bench.icl)"
        )
