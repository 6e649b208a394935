"""SnapKVCache: keep what the last queries attend to, per kv head (SnapKV, Li et al. 2024, arXiv 2404.14469)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..selection import per_kv_head, recent, top_k
from ..validate import as_int

POOLINGS = ("avg", "max")


@register("snapkv")
class SnapKVCache(CompressedCache):
    """SnapKV: each kv head keeps the `budget - window` tokens its query heads' observation window attends to most
    (pooled along the sequence), plus the observation window itself (the last `window` tokens).

    Paper: Yuhong Li, Yingbing Huang, Bowen Yang, Bharat Venkitesh, Acyr Locatelli, Hanchen Ye, Tianle Cai,
    Patrick Lewis, Deming Chen, "SnapKV: LLM Knows What You are Looking for Before Generation", 2024,
    arXiv 2404.14469.

    After every forward, in every layer, each row and kv head that holds more than `budget` tokens is cut back to
    `budget` (a layer at or under its budget is left alone):
    1. window: the row's last `window` kept tokens by stream position (during prefill, the forward's last `window`
       tokens, i.e. the observation window) are always kept;
    2. scores (B, Hq, S): the softmax probabilities (`observe_window`, exactly as the kernel applied them) of the
       forward's last min(window, q) queries, averaged over those queries, for every older kept token (the
       candidates);
    3. pooling: per query head, the candidates' scores laid out in STREAM order (the row's candidate tokens by
       position, pads and free slots skipped; slot order is not stream order once slots are reused) are pooled
       with a 1-D `kernel` (stride 1, `kernel // 2` zeros on each side: "avg" divides by `kernel` at the edges,
       PyTorch's `count_include_pad`; "max" ignores the padding), then scattered back to their slots;
    4. the pooled scores are averaged over the query heads of each kv group (B, Hkv, S), and each kv head keeps its
       top `budget - window` candidates (ties: lower slot first) plus the window.

    During decoding (one query per forward) the same rule runs whenever a token brings the layer over budget: the
    new token's attention (the only observed query, so the mean is over one query) scores the candidates, the last
    `window` tokens stay as a recent window, and the lowest-scored candidate of each kv head is evicted. A chunked
    prefill scores each chunk with its own last min(window, chunk) queries.

    Deviations from the paper (official code, SnapKV repo):
    - The paper compresses once, after the prompt, and keeps every generated token; here the budget holds during
      decoding too (rule above), and over every prefill chunk.
    - The paper (Mistral/Mixtral, via `repeat_kv`) keeps a top-k per QUERY head; here one per kv head from the mean
      over its query heads (as kvpress does), so grouped-query models save memory.
    - Scores are the mean, not the sum, over the observation queries (the same ranking).
    - Defaults are kvpress's (window 64, kernel 5, average pooling); the paper's experiments use window 32, kernel 7,
      max pooling: `SnapKVCache(model, budget, window=32, kernel=7, pooling="max")`.
    - The window counts inside `budget` (budget = max_capacity_prompt of the official code).
    Deviations from kvpress 0.5.5's SnapKVPress (which also keeps window tokens by giving them the maximum score
    and counts them inside the kept count, pools with avg_pool1d over the non-window keys and averages per group):
    - kvpress compresses after the prefill only, to int(n * (1 - ratio)) tokens, and asserts the prompt is longer
      than the window; here a fixed token budget, enforced after every forward, and a layer at or under budget is
      left as it is (no assertion: a short prompt is simply kept).
    - kvpress assumes one row; here each row pools over its own real tokens (pads never enter the pooled sequence),
      so a padded batch equals each row run alone. kvpress recomputes the window queries' attention from the
      hidden states; here the core hands the probabilities it applied (same mask and scale; on Gemma 3's sliding
      layers, keys outside the sliding window have probability 0).

    Args:
        model: the causal LM this cache serves.
        budget: tokens kept per row, layer and kv head (>= window).
        window: observation window (>= 1, <= budget): queries that score, and recent tokens always kept.
        kernel: pooling kernel size (odd, >= 1; 1 = no pooling).
        pooling: "avg" or "max".
    """

    uses_budget = True

    def __init__(self, model, budget: int = 1024, window: int = 64, kernel: int = 5, pooling: str = "avg"):
        budget = as_int(budget, "budget", minimum=1)
        window = as_int(window, "window", minimum=1)
        kernel = as_int(kernel, "kernel", minimum=1)
        if window > budget:
            raise ValueError(
                f"window ({window}) must be <= budget ({budget}): the observation window is always kept, so it must "
                "fit in the budget"
            )
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (pooling is centred on each token), got {kernel}")
        if not isinstance(pooling, str) or pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        super().__init__(model)
        self.budget, self.window, self.kernel, self.pooling = budget, window, kernel, pooling
        self.observe_window = window

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None) -> SnapKVCache:
        """`budget` tokens with kvpress's window of 64 when it leaves at least half the budget to scored tokens
        (budget >= 128), else a window of max(1, budget // 2); default (None): budget 1024, window 64."""
        if budget is None:
            return cls(model)
        return cls(model, budget=budget, window=min(64, max(1, budget // 2)))

    def layer_budget(self, layer_idx: int) -> int:
        """Tokens kept per row and kv head in layer `layer_idx` (the same for every layer here)."""
        return self.budget

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        budget = self.layer_budget(layer.layer_idx)
        valid = layer.valid  # (B, Hp, S)
        over = valid.sum(dim=-1, keepdim=True) > budget  # (B, Hp, 1)
        if not bool(over.any()):
            return valid
        window = recent(layer, self.window)
        candidates = valid & ~window
        scores = self.scores(layer, candidates)  # (B, Hkv, S)
        keep = window | top_k(scores, candidates, budget - self.window)
        return torch.where(over, keep, valid)

    def scores(self, layer: CompressedLayer, candidates: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S) pooled scores of the candidate slots (`candidates` (B, Hp, S) bool; others score 0)."""
        probs = layer.observation.probs  # (B, Hq, w, S)
        kv_heads = layer.keys.shape[1]
        mean = probs.mean(dim=2)  # (B, Hq, S)
        pooled = self.pool_in_stream_order(mean, layer.stream_rank(), candidates)
        return per_kv_head(pooled, kv_heads)

    def pool_in_stream_order(self, scores: torch.Tensor, rank: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Pool `scores` (B, H, S) along each row's candidates in stream order.

        Args:
            rank: (B, Hp, S) stream rank of each slot (`layer.stream_rank()`); candidates: (B, Hp, S) bool, which
                must be each row's (and head's) oldest tokens (ranks 0..n-1), as they are here (the window is the
                newest). Hp = 1 or Hkv; query head h uses slot layout h // (H / Hp).

        Returns:
            (B, H, S): at a candidate slot, the pooled score of its token among the candidates; 0 elsewhere.
        """
        heads, slots = scores.shape[1], scores.shape[-1]
        rank = rank.repeat_interleave(heads // rank.shape[1], dim=1)
        candidates = candidates.repeat_interleave(heads // candidates.shape[1], dim=1)
        index = torch.where(candidates, rank, slots)  # non-candidates go to a dump column
        dense = scores.new_zeros(*scores.shape[:2], slots + 1)
        dense.scatter_(-1, index, torch.where(candidates, scores, 0.0))
        dense = dense[..., :slots]  # (B, H, S): candidates in stream order, then zeros
        pad = self.kernel // 2
        if self.pooling == "avg":
            pooled = F.avg_pool1d(dense, self.kernel, stride=1, padding=pad)
        else:
            pooled = F.max_pool1d(dense, self.kernel, stride=1, padding=pad)
        back = pooled.gather(-1, torch.where(candidates, rank, 0))
        return back.masked_fill(~candidates, 0.0)
