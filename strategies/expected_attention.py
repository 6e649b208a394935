"""ExpectedAttentionCache: keep the keys future queries are expected to attend to (Devoto et al. 2025)."""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange

from ..cache import CompressedCache, CompressedLayer
from ..registry import register
from ..rope import RotaryPositions, rotate_half, serving_layer
from ..selection import (
    STREAM_RANK,
    adaptive_top_k,
    check_allocation,
    decode_slot,
    decode_stream_rank,
    first,
    free_one,
    lowest,
    record_stream_rank,
    redefines,
    slot_norms,
    top_k,
)
from ..validate import as_int


VALUE_NORMS = "value_norm"  # per-slot state: ||v|| of each slot's value, computed once per token
EXPECTED_SCORE = "expected_score"  # per-slot state (rescore_every > 1): the score (or p) at the last rescoring


def rotate(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """R x along the last axis for R = diag(cos) + diag(sin) P, P x = rotate_half(x) = (-x2, x1): the (d, d) matrix
    a RoPE table's averaged cos/sin stand for, applied in O(d) per vector (x @ R^T for rows)."""
    cos, sin = rotation
    return x * cos + rotate_half(x) * sin


def logits_of(keys: torch.Tensor, linear: torch.Tensor, quadratic: torch.Tensor | None) -> torch.Tensor:
    """(B, Hkv, g, S) z_h of the keys (B, Hkv, S, d) for the g query heads of each kv head
    (`ExpectedAttentionCache.score_parameters`)."""
    logits = linear @ keys.transpose(-1, -2)
    if quadratic is None:
        return logits
    projected = (keys @ quadratic).unflatten(-1, (linear.shape[2], -1))  # (B, Hkv, S, g, d)
    return logits + (projected * keys.unsqueeze(-2)).sum(dim=-1).transpose(-1, -2)


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
        rescore_every: N >= 1. 1 (default): exact, every decode step over budget rescores every kept key. N > 1: an
            APPROXIMATION for faster decoding (allocation="head" only): a decode step recomputes every kept key's
            logit z_h, each query head's softmax normaliser log Z_h (over the candidates then) and the group-mean
            probability p(k) = mean_h exp(z_h(k) - log Z_h) only every N-th decode step of a layer (and the first
            after a prefill or chunk, which go through `select`, exact); in between, kept keys keep the score of
            their last rescoring, and a new token's p is computed with that rescoring's mu, Sigma, R and log Z_h
            (O(Hq d^2) for one key) and weighted by its value norm. So a step between rescorings is the new token's
            score and one argmin over maintained scores. The normalisers are not updated for the tokens that arrived
            or left since (a new token's p is not renormalised either). Per-slot state: one float32 score per kv head
            and slot (4 B, beside 512 B of key and value on SmolLM2-135M). With kv_bits the state holds p instead and
            the value norms of the values as stored are applied each step (O(S)); a page quantized between two
            rescorings keeps the p of its keys as they were before.
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
        rescore_every: int = 1,
    ):
        budget = as_int(budget, "budget", minimum=1)
        check_allocation(allocation, alpha)
        rescore_every = as_int(rescore_every, "rescore_every", minimum=1)
        if rescore_every > 1 and allocation != "head":
            raise ValueError(f"rescore_every > 1 applies to allocation='head' decode steps; allocation={allocation!r} "
                             "re-splits the budget through select at every step")
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
        self.allocation, self.alpha, self.rescore_every = allocation, float(alpha), rescore_every
        self.use_covariance, self.use_vnorm, self.epsilon = use_covariance, use_vnorm, float(epsilon)
        self._scaling = {  # layer -> the softmax scale of its attention module
            m.layer_idx: m.scaling
            for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and isinstance(getattr(m, "scaling", None), float)
        }
        self._rotary: RotaryPositions | None = None
        self._stats: dict[int, dict[str, torch.Tensor]] = {}  # layer -> count (B,), real (B,), s1, s2
        self._rotation_memo: dict = {}  # RoPE table -> ((table, seen, T, device), the mean rotation as (cos, sin))
        self._unrotation_memo: dict = {}  # RoPE table -> ((table, seen, (B, q), dtype, device), the queries' cos/sin)
        self._rescored: dict = {}  # rescore_every > 1: layer -> [(linear, quadratic), log Z (B,Hkv,g,1), steps since]
        self._pending: dict = {}  # layer -> [(queries, real), ...] not yet in its statistics (`statistics`)

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
        """(B, Hq, q, d) observed queries of the stream positions seen - q .. seen - 1, un-rotated there (see the
        class docstring); their cos/sin are computed once per forward and RoPE table (every layer of a table
        un-rotates the same positions)."""
        positions = torch.arange(layer.seen - queries.shape[2], layer.seen, device=queries.device)
        positions = positions.expand(queries.shape[0], -1)
        with serving_layer(layer.layer_idx):
            rotary = self.rotary()
            key = (rotary.layer_type(), layer.seen, tuple(positions.shape), queries.dtype, queries.device)
            memo = self._unrotation_memo
            if memo.get(key[0], (None,))[0] != key:
                memo[key[0]] = (key, rotary.cos_sin(queries, positions))
            return rotary.unrotate(queries, positions, cos_sin=memo[key[0]][1])

    def future_rotation(self, layer: CompressedLayer, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R, the mean of the RoPE matrices of stream positions seen .. seen + T - 1, as its (cos, sin) diagonals
        ((d,) float64 each: R = diag(cos) + diag(sin) P with P x = rotate_half(x); `rotate` applies it). Computed
        once per forward and RoPE table: every layer of a table shares it."""
        with serving_layer(layer.layer_idx):
            table = self.rotary().layer_type()
        key = (table, layer.seen, self.n_future_positions, like.device)
        memo = self._rotation_memo.get(table)
        if memo is None or memo[0] != key:
            memo = (key, self._mean_rotation(layer, like))
            self._rotation_memo[table] = memo
        return memo[1]

    def _mean_rotation(self, layer: CompressedLayer, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(layer.seen, layer.seen + self.n_future_positions, device=like.device)[None]
        with serving_layer(layer.layer_idx):
            cos, sin = self.rotary().cos_sin(like.float(), positions)  # (1, 1, T, d)
        return cos[0, 0].double().mean(0), sin[0, 0].double().mean(0)

    @staticmethod
    def real_new_tokens(layer: CompressedLayer) -> torch.Tensor:
        """(B, q) bool: which of the forward's q tokens (in stream order) are real; pads are free slots by now."""
        q_len, start = layer.new_tokens, layer.seen - layer.new_tokens
        positions = layer.positions[:, 0]  # (B, S); new tokens are written into every kv head
        if q_len == 1:  # a decode step
            return (positions == start).any(dim=-1, keepdim=True)
        hits = torch.zeros(positions.shape[0], q_len, dtype=torch.long, device=positions.device)
        hits.scatter_add_(1, (positions - start).clamp(min=0), (positions >= start).long())
        return hits > 0

    def _update_statistics(self, layer: CompressedLayer, defer: bool = False,
                           real: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
        """Add this forward's real queries to the layer's running statistics and return them; with `defer` (decode
        steps under rescore_every > 1, which need the statistics only when they rescore) the queries wait in a
        list until `statistics` folds them in, all at once. `real`: `real_new_tokens(layer)` when the caller has
        it."""
        real = self.real_new_tokens(layer) if real is None else real
        self._pending.setdefault(layer.layer_idx, []).append((layer.observation.queries, real))  # (B,Hq,q,d), (B,q)
        return None if defer else self.statistics(layer)

    def statistics(self, layer: CompressedLayer) -> dict[str, torch.Tensor]:
        """The layer's statistics (count (B,), real (B,), s1 (B, Hq, d), s2 (B, Hq, d, d)) with every query of the
        forwards so far folded in: those waiting are consecutive stream positions ending at `layer.seen`."""
        pending = self._pending.pop(layer.layer_idx, [])
        if not pending:
            return self._stats[layer.layer_idx]
        queries = pending[0][0] if len(pending) == 1 else torch.cat([q for q, _ in pending], dim=2)
        real = pending[0][1] if len(pending) == 1 else torch.cat([r for _, r in pending], dim=1)
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
        keys = self.stored_keys(layer)
        return self.probabilities(layer, logits_of(keys, *self.score_parameters(layer, stats, keys)), candidates)

    @staticmethod
    def stored_keys(layer: CompressedLayer) -> torch.Tensor:
        """(B, Hkv, S, d) the layer's keys as stored, promoted to at least float32."""
        keys = layer.keys[:, :, : layer.used]
        dtype = torch.promote_types(keys.dtype, torch.float32)
        return keys if keys.dtype == dtype else keys.to(dtype)

    def score_parameters(self, layer: CompressedLayer, stats: dict[str, torch.Tensor], keys: torch.Tensor):
        """(linear, quadratic) of z_h(k) = linear_h . k + k^T quadratic_h k for the g query heads of each kv head:
        linear (B, Hkv, g, d) = s R mu_h; quadratic (B, Hkv, d, g * d) = s^2 / 2 R Sigma_h R^T side by side, or None
        without the covariance; in the dtype of `keys`."""
        count = stats["count"].clamp(min=1)[:, None, None]
        mean = stats["s1"] / count  # (B, Hq, d) float64
        rotation = self.future_rotation(layer, keys)
        groups = mean.shape[1] // keys.shape[1]
        scale = self._scaling.get(layer.layer_idx, keys.shape[-1] ** -0.5)
        linear = rearrange(scale * rotate(mean, rotation), "b (h g) d -> b h g d", g=groups).to(keys.dtype)
        if not self.use_covariance:
            return linear, None
        cov = stats["s2"] / count[..., None] - einsum(mean, mean, "b h d, b h e -> b h d e")
        # R Sigma R^T = R (Sigma R^T): two O(d^2) rotations of the rows, no (d, d) matrix product
        turned = rotate(rotate(cov, rotation).transpose(-1, -2), rotation).transpose(-1, -2)
        # the g quadratic forms of a kv head side by side: one product with the keys, which are not copied g times
        return linear, rearrange(0.5 * scale**2 * turned, "b (h g) d e -> b h d (g e)", g=groups).to(keys.dtype)

    def probabilities(self, layer: CompressedLayer, logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S) scores from the logits (B, Hkv, g, S): softmax over the candidates per query head, mean over
        the kv group, times the value norm."""
        logits = logits.masked_fill(~candidates[:, :, None], float("-inf"))  # (B, Hkv, g, S)
        return self.weighted(layer, logits.softmax(dim=-1).nan_to_num(0.0).mean(dim=2), candidates)

    def weighted(self, layer: CompressedLayer, probs: torch.Tensor, candidates: torch.Tensor | None) -> torch.Tensor:
        """(B, Hkv, S) scores from the group-mean probabilities (B, Hkv, S): plus epsilon, times the value norm,
        0 outside the candidates (unless `candidates` is None: `lowest` masks them itself)."""
        if self.use_vnorm:
            probs = self.weigh(probs, self.value_norms(layer))
        return probs if candidates is None else probs.masked_fill(~candidates, 0.0)

    def weigh(self, probs: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """(p + epsilon) ||v|| elementwise, divided by 1 + epsilon (the same ranking): finite for any finite epsilon
        (at epsilon = 0, p x 1 + 0 is p: skipped)."""
        if self.epsilon:
            probs = probs * (1.0 / (1.0 + self.epsilon)) + self.epsilon / (1.0 + self.epsilon)
        return probs * norms

    def track_value_norms(self, layer: CompressedLayer, written_slot=None) -> None:
        """Keep ||v|| per slot (`selection.slot_norms`: computed for the slots this forward wrote), on every forward
        before `scores`; nothing to keep when `value_norms` reads the values as stored now. `written_slot`: a
        decode step's `selection.decode_slot`, when the caller has it."""
        if self.use_vnorm and self._norms_per_slot():
            slot_norms(layer, VALUE_NORMS, layer.values, written_slot)

    def value_norms(self, layer: CompressedLayer) -> torch.Tensor:
        """(B, Hkv, S) ||v|| per slot (fp32, fp64 for fp64 caches): the per-slot state `track_value_norms` keeps, or
        on quantized storage (kv_bits) the norms of the values as stored now (a page's values change when it is
        quantized, so a norm taken when its token was written would go stale)."""
        values = layer.values[:, :, : layer.used]
        dtype = torch.promote_types(values.dtype, torch.float32)
        if not self._norms_per_slot():
            return torch.linalg.vector_norm(values, dim=-1, dtype=dtype)
        return layer.slot_state(VALUE_NORMS, heads=values.shape[1], dtype=dtype)[..., : layer.used]

    def _norms_per_slot(self) -> bool:
        return self.kv_bits is None

    def storage_layout(self) -> str:
        return self.layout or ("paged" if self.allocation == "adakv" else "dense")  # AdaKV: heads keep unequal counts

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        stats = self._update_statistics(layer)
        self.track_value_norms(layer)
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

    def evict(self, layer: CompressedLayer) -> None:
        """A decode step frees exactly what `select` would, without sorting: each row and kv head held at most
        `budget` tokens and got one, so over budget it drops its lowest-scored non-sink token (`lowest`: ties to
        the higher slot, as `top_k` keeps the lower). Sinks are read from the stream rank kept in per-slot state
        (`decode_stream_rank`), not from a ranking. Incremental: the query statistics (the step's query only), the
        new value's norm, the rank. Not incremental, by definition: the score of every kept key, recomputed when a
        row is over budget (mu, Sigma and the averaged rotation R all change every step, and z_h(k) depends on
        them through k^T (R Sigma R^T) k: O(Hq S d^2)), unless rescore_every > 1 (the approximation in the class
        docstring; `frozen_scores`). allocation="adakv" always goes through `select`: a row's budget is re-split
        among its kv heads each step, so a step frees up to Hkv pairs anywhere in the row (each head above its
        floor), not one per head. tests/test_decode_fast_paths.py holds this equal to `select`."""
        if self.allocation == "adakv":
            super().evict(layer)
            return
        per_head = layer.positions.shape[1] == layer.keys.shape[1]  # the first eviction gives the layout kv heads
        if layer.new_tokens != 1 or redefines(self, ExpectedAttentionCache, "select") or not per_head \
                or (self.n_sink and STREAM_RANK not in layer.state):
            super().evict(layer)
            self._rescored.pop(layer.layer_idx, None)  # rescore_every > 1: the next decode step rescores
            if self.n_sink:
                record_stream_rank(layer)
        else:
            self._evict_decode_step(layer)

    def _evict_decode_step(self, layer: CompressedLayer) -> None:
        written_slot = decode_slot(layer, layer.keys.shape[1])  # written: (B, Hkv, 1), the same for every kv head
        stats = self._update_statistics(layer, defer=self.rescore_every > 1, real=written_slot[0][:, 0])
        self.track_value_norms(layer, written_slot)
        valid = layer.valid  # (B, Hkv, S)
        count = valid.sum(dim=-1, keepdim=True)
        candidates, rank = valid, None
        if self.n_sink:
            rank = decode_stream_rank(layer, count)
            candidates = valid & (rank >= self.n_sink)
        over = count > self.budget
        if self.rescore_every > 1:
            scores = self.frozen_scores(layer, candidates, written_slot)  # every step: the new token's is kept
            if bool(over.any()):
                free_one(layer, lowest(scores, candidates), over, rank)
        elif bool(over.any()):
            free_one(layer, lowest(self.scores(layer, stats, candidates), candidates), over, rank)

    def frozen_scores(self, layer: CompressedLayer, candidates: torch.Tensor, written_slot=None) -> torch.Tensor:
        """(B, Hkv, S) scores for a decode step under rescore_every = N > 1 (see the class docstring): all
        recomputed on the first decode step after `select` and every N-th after it, with each query head's
        log-normaliser over the candidates then (a query head without candidates gets log Z = 0); otherwise those
        kept in per-slot state, plus the new token's from the last rescoring's parameters and log-normalisers.
        Kept: the scores themselves when a slot's weight (epsilon, value norm) cannot change between rescorings,
        else the group-mean probabilities, weighted each step (kv_bits: a page's values change when quantized).
        `written_slot`: as `selection.decode_slot` returns it."""
        keys = self.stored_keys(layer)
        fixed_weight = not self.use_vnorm or self._norms_per_slot()
        kept = layer.slot_state(EXPECTED_SCORE, heads=keys.shape[1], dtype=keys.dtype)
        memo = self._rescored.get(layer.layer_idx)
        if memo is None or memo[2] >= self.rescore_every:
            parameters = self.score_parameters(layer, self.statistics(layer), keys)
            logits = logits_of(keys, *parameters).masked_fill(~candidates[:, :, None], float("-inf"))
            log_norm = logits.logsumexp(dim=-1, keepdim=True).nan_to_num(neginf=0.0)  # (B, Hkv, g, 1)
            probs = (logits - log_norm).exp().mean(dim=2)  # (B, Hkv, S)
            scores = self.weighted(layer, probs, None)
            kept[..., : layer.used] = scores if fixed_weight else probs
            self._rescored[layer.layer_idx] = [parameters, log_norm, 1]
            return scores
        memo[2] += 1
        written, slot = written_slot if written_slot is not None else decode_slot(layer, keys.shape[1])  # (B, Hkv, 1)
        fresh = logits_of(keys.gather(2, slot.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])), *memo[0])
        fresh = (fresh - memo[1]).exp().mean(dim=2)  # (B, Hkv, 1)
        if fixed_weight and self.use_vnorm:
            fresh = self.weigh(fresh, layer.state[VALUE_NORMS].gather(-1, slot))
        kept.scatter_(-1, slot, fresh if bool(written.all()) else torch.where(written, fresh, kept.gather(-1, slot)))
        return kept[..., : layer.used] if fixed_weight else self.weighted(layer, kept[..., : layer.used], None)

    # per-row state --------------------------------------------------------------------------------------------------
    def _reindex_rows(self, index: torch.Tensor) -> None:
        super()._reindex_rows(index)
        for stats in self._stats.values():
            for name, value in stats.items():
                stats[name] = value[index.to(value.device)]
        for memo in self._rescored.values():
            memo[0] = tuple(None if value is None else value[index.to(value.device)] for value in memo[0])
            memo[1] = memo[1][index.to(memo[1].device)]
        for pending in self._pending.values():
            pending[:] = [(queries[index.to(queries.device)], real[index.to(real.device)]) for queries, real in pending]

    def reset(self) -> None:
        super().reset()
        self._stats, self._rotation_memo, self._unrotation_memo, self._rescored = {}, {}, {}, {}
        self._pending = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_rotary"] = None  # rebuilt from the model after attach()
        return state
