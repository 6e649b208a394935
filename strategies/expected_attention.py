"""ExpectedAttentionCache: keep the keys future queries are expected to attend to (Devoto et al. 2025)."""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange

from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..rope import RotaryPositions, serving_layer
from ..selection import adaptive_top_k, check_allocation, first, top_k
from ..validate import as_int


@register("expected_attention")
class ExpectedAttentionCache(CompressedCache):
    """Keeps, per row, layer and kv head, the `n_sink` first tokens and the `budget - n_sink` tokens with the
    highest expected attention from future queries (times the value norm).

    Paper: A. Devoto, M. Jeblick, S. Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from
    Future Queries Distribution", 2025, arXiv:2510.00636 (kvpress's `ExpectedAttentionPress`, its default method).

    Score of a key k (B, Hkv, S, d, as stored: RoPE-rotated at its text position), per query head h of its kv
    group, with the model's softmax scale s (1/sqrt(d) for Llama/Qwen, `query_pre_attn_scalar` for Gemma 3):
        queries ~ N(mu_h, Sigma_h): mean and (population) covariance of the layer's pre-RoPE queries of the row,
            over every real query seen so far except those of the row's first `n_sink` real tokens;
        R = mean over the next `n_future_positions` positions t = n, ..., n + T - 1 of the RoPE matrix R_t
            (the model's own cos/sin: R_t x = x cos_t + rotate_half(x) sin_t; n = the next token's position);
        z_h(k) = s (R mu_h) . k + s^2 / 2 k^T (R Sigma_h R^T) k   (log E[exp(s q.k)] for q ~ N(R mu, R Sigma R^T));
        p_h = softmax of z_h over the row's kept and new tokens except the sinks;
        score(k) = (mean of p_h over the kv group's query heads + epsilon) * ||v||   (times ||v||: `use_vnorm`;
            computed divided by 1 + epsilon, the same ranking, so that a large epsilon cannot overflow).
    Without `use_covariance` the quadratic term is dropped.

    Per forward of a layer (after its attention, `observe_queries`): (1) the forward's real queries (pads and the
    row's first `n_sink` real tokens excluded), un-rotated to pre-RoPE, are added to running per-row sums (count,
    sum, sum of outer products, float64); (2) only if some row holds more than `budget` real tokens, mu/Sigma, R
    (for positions n .. n + T - 1) and the scores of all kept and new slots are recomputed, and the cut is made.
    Decoding is query-free beyond that: a decode step's query only joins the running statistics; no attention
    probability is computed. Cost of a compressing forward: O(Hq S d^2) with the covariance, O(Hq S d) without
    (statistics and R in float64, the per-key products in float32). Measured on SmolLM2-135M (30 layers, 9/3
    heads, d 64), 1 thread, shared machine, 1,024-token prompt, budget 512, greedy decoding: 452 ms per decode step
    vs 184 for sink_window and 191 for knorm; 282 without the covariance.

    Positions: the observed queries are rotated at the model's position ids, which a strategy does not see;
    they are un-rotated at their stream position s (pads counted), and R averages over stream positions
    seen .. seen + T - 1. With left padding the model's position is s - (pads before), so the un-rotated query is
    off by R_{-pads}, which R_{seen + k} turns back into R_{n + k}: exact for left padding and for direct calls
    whenever RoPE rotates each pair by position x frequency (default, linear, llama3, YaRN: a scale folded into
    cos/sin cancels in the un-rotation); not for M-RoPE (3-D position ids) or dynamic NTK scaling (frequencies
    that change with the length). R is computed once per forward and RoPE table (shared by the layers).
    positions="cache" is refused (per-kv-head eviction, see KnormCache).

    Deviations from the paper / kvpress 0.5.5 (defaults n_future_positions=512, n_sink=4, use_covariance=True,
    use_vnorm=True, epsilon=0.0 are kvpress's):
    - Statistics: kvpress takes the queries of the compressing forward only (the prefill, minus its first n_sink
      hidden states), or through its DecodingPress a buffer of up to 256 decoding steps; here running statistics
      over every real query of the row (prefill chunks and decoding steps), so a decode step does not reduce them
      to one query. kvpress counts sinks per forward; here the row's first n_sink real tokens, once.
    - Compression: after every forward that exceeds the budget (prefill chunks and every decoding step), to a
      fixed token budget; kvpress compresses the prefill once to int(n * (1 - ratio)) (DecodingPress: every 512
      steps back to a target size).
    - Scale: the model's softmax scale (kvpress: 1/sqrt(head_dim), which differs on Gemma 3).
    - Batches: per-row statistics and left padding handled; kvpress assumes batch size 1.
    - Sliding-window layers (Gemma 3) score their keys like full layers (keys outside the window are never
      attended again, but may be kept).

    Args:
        model: the causal LM this cache serves (one rotary embedding module, as `kvcompress.rope` supports).
        budget: tokens kept per row, layer and kv head (> n_sink).
        n_future_positions: T, positions averaged in R (>= 1).
        n_sink: first real tokens always kept, and whose queries are left out of the statistics (>= 0).
        use_covariance, use_vnorm: as above (bool). epsilon: added to the probability before the value-norm
            rescaling (a finite float >= 0; infinity would make every score infinite, i.e. keep the oldest tokens;
            a large epsilon ranks by the value norm alone).
        allocation: "head" (every kv head keeps `budget`) or "adakv" (AdaKV, Feng et al. 2024, kvpress's
            AdaKVPress(ExpectedAttentionPress): a row's `(budget - n_sink) x kv heads` scored pairs are the best over
            all its kv heads together, each keeping at least floor(alpha x (budget - n_sink)); stored in pages per kv
            head, so the memory follows the unequal counts).
        alpha: AdaKV's safeguard fraction in [0, 1].
    """

    uses_budget = True
    supports_cache_positions = False  # per-kv-head eviction
    observe_queries = True

    def __init__(
        self,
        model,
        budget: int = 1024,
        n_future_positions: int = 512,
        n_sink: int = 4,
        use_covariance: bool = True,
        use_vnorm: bool = True,
        epsilon: float = 0.0,
        positions: str = "original",
        allocation: str = "head",
        alpha: float = 0.2,
    ):
        budget = as_int(budget, "budget", minimum=1)
        check_allocation(allocation, alpha)
        n_future_positions = as_int(n_future_positions, "n_future_positions", minimum=1)
        n_sink = as_int(n_sink, "n_sink", minimum=0)
        if n_sink >= budget:
            raise ValueError(f"budget ({budget}) must be larger than n_sink ({n_sink})")
        for name, flag in (("use_covariance", use_covariance), ("use_vnorm", use_vnorm)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r} ({type(flag).__name__})")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < math.inf:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        try:
            RotaryPositions(model)
        except ValueError as error:
            raise TypeError(
                f"expected_attention needs a model with one rotary embedding module (`rotary_emb`) to rotate the "
                f"query statistics to future positions; {type(model).__name__} has not: {error}"
            ) from None
        super().__init__(model, positions=positions)
        self.budget, self.n_future_positions, self.n_sink = budget, n_future_positions, n_sink
        self.allocation, self.alpha = allocation, float(alpha)
        self.use_covariance, self.use_vnorm, self.epsilon = use_covariance, use_vnorm, float(epsilon)
        self._scaling = {  # layer -> the softmax scale of its attention module
            m.layer_idx: m.scaling
            for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and isinstance(getattr(m, "scaling", None), float)
        }
        self._rotary: RotaryPositions | None = None
        self._stats: dict[int, dict[str, torch.Tensor]] = {}  # layer -> count (B,), real (B,), s1, s2
        self._rotation_memo: dict = {}  # RoPE table -> ((table, seen, T, device), (d, d) mean rotation)

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None, **options) -> ExpectedAttentionCache:
        """kvpress's defaults; the budget includes the sinks (4, or budget - 1 when budget <= 4); `options`: the
        constructor's (e.g. allocation="adakv")."""
        if budget is None:
            return cls(model, **options)
        return cls(model, budget=budget, n_sink=min(4, budget - 1), **options)

    # query statistics ---------------------------------------------------------------------------------------------
    def rotary(self) -> RotaryPositions:
        if self._rotary is None:
            self._rotary = RotaryPositions(self._model_ref())
        return self._rotary

    def pre_rope_queries(self, layer: CompressedLayer, queries: torch.Tensor) -> torch.Tensor:
        """(B, Hq, q, d) observed queries un-rotated at their stream positions (see the class docstring)."""
        start = layer.seen - layer.new_tokens
        positions = torch.arange(start, layer.seen, device=queries.device).expand(queries.shape[0], -1)
        with serving_layer(layer.layer_idx):
            return self.rotary().unrotate(queries, positions)

    def future_rotation(self, layer: CompressedLayer, like: torch.Tensor) -> torch.Tensor:
        """(d, d) float64: the mean of the RoPE matrices of stream positions seen .. seen + T - 1 (computed once per
        forward and RoPE table: every layer of a table shares it)."""
        with serving_layer(layer.layer_idx):
            table = self.rotary().layer_type()
        key = (table, layer.seen, self.n_future_positions, like.device)
        memo = self._rotation_memo.get(table)
        if memo is None or memo[0] != key:
            memo = (key, self._mean_rotation(layer, like))
            self._rotation_memo[table] = memo
        return memo[1]

    def _mean_rotation(self, layer: CompressedLayer, like: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(layer.seen, layer.seen + self.n_future_positions, device=like.device)[None]
        with serving_layer(layer.layer_idx):
            cos, sin = self.rotary().cos_sin(like.float(), positions)  # (1, 1, T, d)
        cos, sin = cos[0, 0].double().mean(0), sin[0, 0].double().mean(0)
        d = cos.shape[-1]
        half = torch.eye(d // 2, dtype=torch.float64, device=like.device)
        rotate_half = torch.zeros(d, d, dtype=torch.float64, device=like.device)
        rotate_half[: d // 2, d // 2 :], rotate_half[d // 2 :, : d // 2] = -half, half  # P x = rotate_half(x)
        return torch.diag(cos) + torch.diag(sin) @ rotate_half

    @staticmethod
    def real_new_tokens(layer: CompressedLayer) -> torch.Tensor:
        """(B, q) bool: which of the forward's q tokens (in stream order) are real; pads are free slots by now."""
        q_len, start = layer.new_tokens, layer.seen - layer.new_tokens
        positions = layer.positions[:, 0]  # (B, S); new tokens are written into every kv head
        hits = torch.zeros(positions.shape[0], q_len, dtype=torch.long, device=positions.device)
        hits.scatter_add_(1, (positions - start).clamp(min=0), (positions >= start).long())
        return hits > 0

    def _update_statistics(self, layer: CompressedLayer) -> dict[str, torch.Tensor]:
        queries = layer.observation.queries  # (B, Hq, q, d)
        batch, heads, _, dim = queries.shape
        stats = self._stats.get(layer.layer_idx)
        if stats is None:
            stats = {
                "count": torch.zeros(batch, dtype=torch.float64, device=queries.device),
                "real": torch.zeros(batch, dtype=torch.long, device=queries.device),
                "s1": torch.zeros(batch, heads, dim, dtype=torch.float64, device=queries.device),
                "s2": torch.zeros(batch, heads, dim, dim, dtype=torch.float64, device=queries.device),
            }
            self._stats[layer.layer_idx] = stats
        real = self.real_new_tokens(layer)  # (B, q)
        rank = stats["real"][:, None] + real.cumsum(dim=1) - 1  # index among the row's real tokens
        use = (real & (rank >= self.n_sink)).double()
        stats["real"] = stats["real"] + real.sum(dim=1)
        if bool(use.any()):
            pre = self.pre_rope_queries(layer, queries).double() * use[:, None, :, None]
            stats["count"] = stats["count"] + use.sum(dim=1)
            stats["s1"] = stats["s1"] + pre.sum(dim=2)
            if self.use_covariance:
                stats["s2"] = stats["s2"] + einsum(pre, pre, "b h q d, b h q e -> b h d e")
        return stats

    # scores -------------------------------------------------------------------------------------------------------
    def scores(self, layer: CompressedLayer, stats: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S) expected-attention scores of the slots; `candidates` (B, Hkv, S) bool are the slots the
        softmax runs over (others get 0). Statistics and R in float64; the per-key products in the keys' dtype
        promoted to at least float32 (the O(Hq S d^2) part)."""
        keys = layer.keys[:, :, : layer.used]
        dtype = torch.promote_types(keys.dtype, torch.float32)
        keys = keys.to(dtype)  # (B, Hkv, S, d)
        count = stats["count"].clamp(min=1)[:, None, None]
        mean = stats["s1"] / count  # (B, Hq, d) float64
        rotation = self.future_rotation(layer, keys)
        groups = mean.shape[1] // keys.shape[1]
        scale = self._scaling.get(layer.layer_idx, keys.shape[-1] ** -0.5)
        linear = rearrange(scale * mean @ rotation.T, "b (h g) d -> b h g d", g=groups).to(dtype)
        logits = linear.unsqueeze(-2) @ keys.unsqueeze(2).transpose(-1, -2)  # (B, Hkv, g, 1, d) x (B, Hkv, 1, d, S)
        if self.use_covariance:
            cov = stats["s2"] / count[..., None] - einsum(mean, mean, "b h d, b h e -> b h d e")
            quadratic = rearrange(0.5 * scale**2 * rotation @ cov @ rotation.T, "b (h g) d e -> b h g d e", g=groups)
            projected = keys.unsqueeze(2) @ quadratic.to(dtype)  # (B, Hkv, g, S, d)
            logits = logits + (projected * keys.unsqueeze(2)).sum(dim=-1).unsqueeze(-2)
        logits = logits.squeeze(-2).masked_fill(~candidates[:, :, None], float("-inf"))  # (B, Hkv, g, S)
        probs = logits.softmax(dim=-1).nan_to_num(0.0).mean(dim=2)  # (B, Hkv, S)
        if self.use_vnorm:
            # (p + epsilon) ||v||, divided by 1 + epsilon (the same ranking): finite for any finite epsilon, and
            # exactly p ||v|| at epsilon = 0
            weight, offset = 1.0 / (1.0 + self.epsilon), self.epsilon / (1.0 + self.epsilon)
            norms = torch.linalg.vector_norm(layer.values[:, :, : layer.used], dim=-1, dtype=dtype)
            probs = (probs * weight + offset) * norms
        return probs.masked_fill(~candidates, 0.0)

    def storage_layout(self) -> str:
        return self.layout or ("paged" if self.allocation == "adakv" else "dense")  # AdaKV: heads keep unequal counts

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        stats = self._update_statistics(layer)
        valid = layer.valid
        heads = layer.keys.shape[1]
        if self.allocation == "adakv":  # the row's budget is shared by its heads
            over = valid.sum(dim=(1, 2)) * (heads // valid.shape[1]) > self.budget * heads
        else:
            over = valid.sum(dim=-1) > self.budget
        if not bool(over.any()):
            return valid
        sinks = first(layer, self.n_sink).expand(-1, heads, -1)
        candidates = valid.expand(-1, heads, -1) & ~sinks
        scores = self.scores(layer, stats, candidates)
        if self.allocation == "adakv":
            keep = sinks | adaptive_top_k(scores, candidates, self.budget - self.n_sink, self.alpha)
            return torch.where(over.view(-1, 1, 1), keep, valid.expand_as(keep))
        room = self.budget - sinks.sum(dim=-1, keepdim=True)
        return sinks | top_k(scores, candidates, room)

    # per-row state --------------------------------------------------------------------------------------------------
    def _reindex_rows(self, index: torch.Tensor) -> None:
        super()._reindex_rows(index)
        for stats in self._stats.values():
            for name, value in stats.items():
                stats[name] = value[index.to(value.device)]

    def reset(self) -> None:
        super().reset()
        self._stats, self._rotation_memo = {}, {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_rotary"] = None  # rebuilt from the model after attach()
        return state
