"""SnapKVCache: keep what the last queries attend to, per kv head (SnapKV, Li et al. 2024, arXiv 2404.14469)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..selection import (
    STREAM_RANK,
    adaptive_top_k,
    check_allocation,
    decode_stream_rank,
    free_one,
    lowest,
    per_kv_head,
    recent,
    record_stream_rank,
    redefines,
    top_k,
)
from ..validate import as_int

POOLINGS = ("avg", "max")
KVPRESS_WINDOW = 64  # kvpress's SnapKVPress window_size (and this strategy's default)


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
       PyTorch's `count_include_pad`; "max" ignores the padding);
    4. the pooled scores are averaged over the query heads of each kv group (B, Hkv, S), and each kv head keeps its
       top `budget - window` candidates plus the window. Ties (frequent with max pooling: neighbours of a peak share
       its score; with avg pooling when pools cover the same tokens) go to the older token, so the choice never
       depends on where slots sit (kvpress and the paper leave ties to `torch.topk`).

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
    - Window from a budget (`for_budget`, what the bench uses): kvpress's 64 whenever the budget exceeds 64 (with
      window 64 the prefill kept kvpress's sets exactly at 102 of 1,024 essay tokens, docs/peer_kvpress.md, and at
      69 of 700 BoolQ tokens in an independent rerun); at a budget <= 64, where kvpress's window would take the
      whole budget (a recency window, no scored token), half the budget (at least 1).
    - kvpress assumes one row; here each row pools over its own real tokens (pads never enter the pooled sequence),
      so a padded batch equals each row run alone. kvpress recomputes the window queries' attention from the
      hidden states; here the core hands the probabilities it applied (same mask and scale; on Gemma 3's sliding
      layers, keys outside the sliding window have probability 0).
    With one row and a prompt longer than the budget, the prefill keeps exactly kvpress's tokens per layer and kv
    head (checked on a tiny random Llama, 5 settings incl. kvpress's defaults: `experiments/snapkv_vs_kvpress.py`).

    Args:
        model: the causal LM this cache serves.
        budget: tokens kept per row, layer and kv head (>= window).
        window: observation window (>= 1, <= budget): queries that score, and recent tokens always kept.
        kernel: pooling kernel size (odd, >= 1; 1 = no pooling).
        pooling: "avg" or "max".
        positions: only "original" (keeps different tokens per kv head; "cache" raises ValueError).
        allocation: "head" (every kv head keeps `budget`) or "adakv" (AdaKV, Feng et al. 2024: a row's
            `budget x kv heads` pairs are shared by its heads, the best window-attended candidates over all heads
            together, each head keeping at least floor(alpha x (budget - window)) candidates; the window stays per
            head; the cache then stores keys and values in pages per kv head, so the memory follows the unequal
            counts). kvpress's AdaKVPress (alpha_safeguard 0.2) masks instead of freeing and compresses once.
        alpha: AdaKV's safeguard fraction in [0, 1].
    """

    uses_budget = True
    supports_cache_positions = False  # per-kv-head eviction

    def __init__(self, model, budget: int = 1024, window: int = 64, kernel: int = 5, pooling: str = "avg",
                 positions: str = "original", allocation: str = "head", alpha: float = 0.2):
        budget = as_int(budget, "budget", minimum=1)
        check_allocation(allocation, alpha)
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
        super().__init__(model, positions=positions)
        self.budget, self.window, self.kernel, self.pooling = budget, window, kernel, pooling
        self.allocation, self.alpha = allocation, float(alpha)
        self.observe_window = window

    def storage_layout(self) -> str:
        return self.layout or ("paged" if self.allocation == "adakv" else "dense")  # AdaKV: heads keep unequal counts

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None, **options) -> SnapKVCache:
        """`budget` tokens with kvpress's window of 64 whenever it leaves at least one scored token (budget > 64),
        as kvpress's SnapKVPress keeps at every kept count above its window; at budget <= 64 a window of
        max(1, budget // 2) (kvpress's 64-token window would then fill the whole budget: a recency window with no
        scored token). Default (None): budget 1024, window 64."""
        if budget is None:
            return cls(model, **options)
        window = KVPRESS_WINDOW if budget > KVPRESS_WINDOW else max(1, budget // 2)
        return cls(model, budget=budget, window=window, **options)

    def layer_budget(self, layer_idx: int) -> int:
        """Tokens kept per row and kv head in layer `layer_idx` (the same for every layer here)."""
        return self.budget

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        budget = self.layer_budget(layer.layer_idx)
        valid = layer.valid  # (B, Hp, S)
        heads = layer.keys.shape[1]
        if self.allocation == "adakv":  # the row's budget is shared by its heads: over when their total is
            over = (valid.sum(dim=(1, 2)) * (heads // valid.shape[1]) > budget * heads).view(-1, 1, 1)
        else:
            over = valid.sum(dim=-1, keepdim=True) > budget  # (B, Hp, 1)
        if not bool(over.any()):
            return valid
        rank = layer.stream_rank()
        window = recent(layer, self.window, rank)
        candidates = valid & ~window  # each row's (and head's) oldest tokens: stream indices 0..n-1
        order = self.stream_index(rank, candidates)
        scores = self.scores(layer, order)  # (B, Hkv, S), stream layout
        slots = scores.shape[-1]
        in_stream = torch.arange(slots, device=scores.device) < candidates.sum(dim=-1, keepdim=True)
        if self.allocation == "adakv":
            chosen = adaptive_top_k(scores, in_stream, budget - self.window, self.alpha)
        else:
            chosen = top_k(scores, in_stream, budget - self.window)  # ties: the older token first
        keep = window | (from_stream(chosen, order) & candidates)
        return torch.where(over, keep, valid)

    def evict(self, layer: CompressedLayer) -> None:
        """A decode step frees exactly what `select` would, without ranking or sorting the slots: each row and kv
        head held at most its budget and got one token, so over budget it drops the candidate (not in the window)
        of lowest pooled score (`lowest` in stream layout: ties to the newer token, as `top_k` keeps the older).
        The stream order comes from the rank kept in per-slot state (`decode_stream_rank`, `free_one`), not from
        `stream_rank()` (an argsort once slots are reused). Not incremental, by definition: the pooled scores of
        every candidate (the new query's attention, pooled along the stream) are recomputed each step, as `select`
        does (O(Hq S)). allocation="adakv" always goes through `select`: a row's budget is re-split among its kv
        heads each step, so a step frees up to Hkv pairs anywhere in the row (each head above its floor), not one
        per head. tests/test_decode_fast_paths.py holds this equal to `select`."""
        if self.allocation == "adakv":
            super().evict(layer)
            return
        per_head = layer.positions.shape[1] == layer.keys.shape[1]  # the first eviction gives the layout kv heads
        if layer.new_tokens != 1 or redefines(self, SnapKVCache, "select") or not per_head \
                or STREAM_RANK not in layer.state:
            super().evict(layer)
            record_stream_rank(layer)
        else:
            self._evict_decode_step(layer)

    def _evict_decode_step(self, layer: CompressedLayer) -> None:
        valid = layer.valid  # (B, Hkv, S)
        count = valid.sum(dim=-1, keepdim=True)
        rank = decode_stream_rank(layer, count)
        scored = count - self.window  # candidates: the oldest tokens, stream indices 0 .. scored - 1
        order = self.stream_index(rank, valid & (rank < scored))
        scores = self.scores(layer, order)  # (B, Hkv, S) stream layout
        in_stream = torch.arange(scores.shape[-1], device=scores.device) < scored
        dropped = lowest(scores, in_stream)  # (B, Hkv, 1) stream index of the dropped candidate
        slot = (order == dropped).max(dim=-1, keepdim=True).indices  # the candidate at that stream index
        free_one(layer, slot, count > self.layer_budget(layer.layer_idx), rank)

    def stream_index(self, rank: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, Hp, S) long: each candidate slot's index among its row's (and head's) candidates in stream order
        (`rank` = `layer.stream_rank()`; the candidates are the oldest tokens, so their rank is that index); S for
        every other slot."""
        return torch.where(candidates, rank, candidates.shape[-1])

    def scores(self, layer: CompressedLayer, order: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S) SnapKV scores in stream layout: [b, g, i] scores the i-th oldest candidate of row b, kv head
        g (`order` from `stream_index`); 0 past the candidates. Average pooling is linear, as are the move to stream
        layout (a permutation shared by a kv group) and the group mean, so the group mean goes first and a third of
        the heads are moved and pooled on SmolLM2 (Hq = 3 Hkv; the same scores up to float rounding); max pooling
        is not linear: it pools every query head, then averages."""
        mean = layer.observation.probs.mean(dim=2)  # (B, Hq, S) over the observed queries, slot layout
        kv_heads = layer.keys.shape[1]
        if self.pooling == "avg":
            return self.pool(to_stream(per_kv_head(mean, kv_heads), order))
        return per_kv_head(self.pool(to_stream(mean, order)), kv_heads)

    def pool(self, scores: torch.Tensor) -> torch.Tensor:
        """1-D pooling (B, H, S) -> (B, H, S) along a stream layout (candidates first, then zeros): stride 1,
        `kernel // 2` zeros each side (avg: divides by `kernel` at the edges; max: scores are >= 0, so the zeros
        never win over the token itself)."""
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        return pool(scores, self.kernel, stride=1, padding=self.kernel // 2)


def to_stream(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Slot layout -> stream layout: (B, H, S) -> (B, H, S) with out[..., order[..., s]] = values[..., s] for every
    slot s whose `order` (B, Hp, S) is < S, zeros elsewhere. H a multiple of Hp (head h uses layout h // (H / Hp))."""
    slots = values.shape[-1]
    order = order.repeat_interleave(values.shape[1] // order.shape[1], dim=1)
    dense = values.new_zeros(*values.shape[:2], slots + 1)  # column S collects the slots that are not candidates
    dense.scatter_(-1, order, values)
    return dense[..., :slots]


def from_stream(dense: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Stream layout -> slot layout: out[..., s] = dense[..., order[..., s]] (order clamped: mask the result)."""
    order = order.repeat_interleave(dense.shape[1] // order.shape[1], dim=1)
    return dense.gather(-1, order.clamp(max=dense.shape[-1] - 1))
