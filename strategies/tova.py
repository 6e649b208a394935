"""TOVACache: keep the tokens the last query attends to most (TOVA, Oren et al. 2024)."""

from __future__ import annotations

import torch

from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..selection import free_one, lowest, redefines, top_k
from ..validate import as_int


@register("tova")
class TOVACache(CompressedCache):
    """Token Omission Via Attention: Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs",
    EMNLP 2024, arXiv:2401.06104.

    After every forward of a layer (prefill, each prefill chunk, each decode step), if a row holds more than
    `budget` real tokens, it keeps the `budget` tokens with the highest attention probability from the forward's
    LAST query, averaged over ALL query heads of the layer (the kernel's exact softmax, `observe_window = 1`): one
    set per layer and row, shared by all kv heads (select returns (B, 1, S)). The newest token competes like any
    other (the paper does not protect it). A row holding at most `budget` tokens keeps them all; pads are never
    kept. Score ties are broken by slot index.

    Deviations from the paper (and its code, github.com/schwartz-lab-NLP/TOVA):
    - Prefill: the paper's policy runs token by token over the prompt too (each prompt token is added, then the
      lowest-scored state dropped, so each prompt query sees at most `budget` earlier tokens). Here a prefill
      forward attends to all its tokens, then evicts once by the attention of its last query; with
      `prefill_chunk_size` once per chunk, by the chunk's last query. Decoding (one token per forward) is the
      paper's policy exactly: drop the lowest-scored state when the new token brings the layer over budget.
    - The paper evicts one state per step; a forward of q tokens here may drop up to q at once (same set as
      dropping greedily only when the scores do not change in between, which holds within one query).
    Deviations from kvpress 0.5.5's `TOVAPress`: kvpress compresses once after prefill (decoding needs a
    wrapper), keeps a top-k PER KV HEAD of scores that are the same for every head (so the same tokens), always
    keeps the last token (score max + 1, which the paper does not do), scores the last query over the keys before
    it, keeps `int(n * (1 - ratio))` tokens of n (a ratio, not a fixed budget), and computes the last query's
    attention itself from the hidden states (here the core gives the kernel's own probabilities).

    Args:
        model: the causal LM this cache serves.
        budget: the most tokens each row keeps per layer (>= 1).
        positions: "original" (default) or "cache" (see `CompressedCache`: keys and queries rotated at their rank
            among the kept tokens; TOVA keeps one set for every kv head, so it can).
    """

    uses_budget = True
    observe_window = 1

    def __init__(self, model, budget: int = 1024, positions: str = "original"):
        budget = as_int(budget, "budget", minimum=1)
        super().__init__(model, positions=positions)
        self.budget = budget

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None) -> TOVACache:
        """`budget` tokens per row and layer; None: the default (1024)."""
        return cls(model) if budget is None else cls(model, budget=budget)

    def scores(self, layer: CompressedLayer) -> torch.Tensor:
        """(B, 1, S) attention probability of the forward's last query over the slots, averaged over query heads."""
        return layer.observation.probs[:, :, -1].mean(dim=1, keepdim=True)

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        return top_k(self.scores(layer), layer.valid, self.budget)

    def evict(self, layer: CompressedLayer) -> None:
        """A decode step frees exactly what `select` would, without sorting: the row held at most `budget` tokens
        before it and got one, so over budget it drops its one lowest-scored token (`lowest`: ties to the higher
        slot, as `top_k` keeps the lower). tests/test_decode_fast_paths.py holds the two equal."""
        if layer.new_tokens != 1 or redefines(self, TOVACache, "select"):
            super().evict(layer)
        else:
            self._evict_decode_step(layer)

    def _evict_decode_step(self, layer: CompressedLayer) -> None:
        valid = layer.valid  # (B, 1, S)
        over = valid.sum(dim=-1, keepdim=True) > self.budget
        free_one(layer, lowest(self.scores(layer), valid), over)
