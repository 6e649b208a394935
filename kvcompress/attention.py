"""The one attention core every kvcompress strategy runs through.

`kvcompress_attention` is registered with transformers' `AttentionInterface` as "kvcompress" (and
`kvcompress_mask` with `AttentionMaskInterface`), by `enable(model)`, never at import. For each layer it

1. takes the cache layer that `update` just served (a kvcompress cache), or treats the keys as contiguous
   (any other cache, or none);
2. lets that layer re-rotate queries/keys when it keeps positions "within the cache";
3. builds the boolean mask from the kept absolute positions (`masks.allowed_from_positions`);
4. runs one kernel chosen by `attend` (SDPA, or the fp64-checkable reference), and `attention_probs` when the
   model asks for `output_attentions`; where a strategy observes every query's probabilities anyway (a decode
   step of a strategy that observes probabilities, H2O's prefill, KVzip's reconstruction) the probabilities it
   observes serve the output too;
5. computes what an attention-aware strategy declared it observes (`Observation`: the queries, the
   probabilities of the last w queries, the attention each slot received, summed or its max) with the same mask
   and scale; a pad query observes nothing (its row is all zeros);
6. tells the cache layer the forward is done, so it evicts (after attention, never before).

A forward through a `CacheGroup` (batch-1 caches decoded together) runs these steps for each member on its own row.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from .masks import MaskSpec, allowed_from_positions, kvcompress_mask
from .rope import serving_layer

if TYPE_CHECKING:
    from .layer import CompressedLayer

IMPLEMENTATION = "kvcompress"
BACKENDS = ("auto", "sdpa", "reference")

_state = threading.local()  # .layer: the CompressedLayer whose update() awaits its attention; .group: a CacheGroup
# layer's (layer index, [(member layer, keys, values)]) awaiting it; .captures: list
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose the kernel: "auto" (SDPA on every device), "sdpa", or "reference" (fp64 einsum, slow, exact)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def enable(model: PreTrainedModel) -> None:
    """Register the kvcompress core with transformers and switch `model` to it (idempotent).

    The core gives the same results as transformers' SDPA path for any cache (DynamicCache included), so a model
    switched to it stays usable without kvcompress caches.
    """
    AttentionInterface.register(IMPLEMENTATION, kvcompress_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, kvcompress_mask)
    if model.config._attn_implementation != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)
    if model.config._attn_implementation != IMPLEMENTATION:
        raise TypeError(
            f"{type(model).__name__} cannot switch its attention implementation (it does not use transformers' "
            "AttentionInterface), so kvcompress caches cannot drive it"
        )


def serve_layer(layer: CompressedLayer) -> None:
    """Called by `CompressedLayer.update`: the next attention call for this layer index belongs to `layer`.

    Raises RuntimeError if the previously served layer of the same cache never reached the core (the model runs
    another attention implementation), before any wrong output is produced. A layer left pending by ANOTHER cache
    (whose forward failed midway) is dropped: that cache refuses its next update itself (`awaiting_attention`).
    """
    pending = getattr(_state, "layer", None)
    if pending is not None and pending.awaiting_attention and _same_cache(pending, layer):
        _state.layer = None
        raise not_served_error(pending.layer_idx)
    _state.layer = layer
    _state.group = None  # a CacheGroup forward that failed midway leaves nothing for this one


def row_of(value, row: int, rows: int):
    """Row `row` (as a batch of one) of a per-row tensor of `rows` rows; a tensor shared by the rows (batch 1) or any
    other value as is. How a `CacheGroup` hands each member its row of a forward's arguments."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows and rows > 1:
        return value[row : row + 1]
    return value


def serve_group(layer_idx: int, served: list[tuple[CompressedLayer, torch.Tensor, torch.Tensor]]) -> None:
    """Called by a `CacheGroup` layer's update: the next attention call for `layer_idx` runs each member's layer
    in `served` ((layer, keys, values) as its `update` returned them) on its own row of the queries."""
    _state.layer = None
    _state.group = (layer_idx, served)


def _take_group(layer_idx: int | None):
    group = getattr(_state, "group", None)
    if group is None:
        return None
    _state.group = None
    if group[0] != layer_idx:
        raise RuntimeError(f"a CacheGroup's layer {group[0]} was updated, but attention ran for layer {layer_idx}")
    return group[1]


def _attend_group(served, module, query, attention_mask, dropout, scaling, kwargs):
    """Each member of a `CacheGroup` through the one-cache path of `kvcompress_attention`, on its row of the
    queries (and of the mask's padding and of position_ids); the outputs stacked in row order. Returns
    (output (B, Q, Hq, d), None)."""
    rows = query.shape[0]
    outputs = []
    for i, (layer, key, value) in enumerate(served):
        mask = attention_mask
        if isinstance(mask, MaskSpec) and mask.padding is not None:
            mask = replace(mask, padding=row_of(mask.padding, i, rows))
        else:
            mask = row_of(mask, i, rows)
        row_kwargs = {name: row_of(arg, i, rows) for name, arg in kwargs.items()}
        _state.layer = layer
        outputs.append(kvcompress_attention(module, query[i : i + 1], key, value, mask, dropout, scaling,
                                            **row_kwargs)[0])
    return torch.cat(outputs, dim=0), None


def _same_cache(a: CompressedLayer, b: CompressedLayer) -> bool:
    """Whether two layers belong to one cache (a forward that failed midway leaves its own cache inconsistent, not
    every other cache of the thread)."""
    try:
        return a._cache == b._cache
    except ReferenceError:  # the failed forward's cache is gone
        return False


def not_served_error(layer_idx: int) -> RuntimeError:
    return RuntimeError(
        f"layer {layer_idx} of a kvcompress cache was updated but not followed by the kvcompress attention core. "
        f"Either the model does not use attn_implementation={IMPLEMENTATION!r} (kvcompress caches set it when "
        "built: do not change it afterwards), or an earlier forward failed midway and left the cache inconsistent "
        "(call cache.reset())"
    )


def _take_layer(layer_idx: int | None) -> CompressedLayer | None:
    layer = getattr(_state, "layer", None)
    if layer is None:
        return None
    _state.layer = None
    if layer.layer_idx != layer_idx:
        raise RuntimeError(
            f"kvcompress cache layer {layer.layer_idx} was updated, but attention ran for layer {layer_idx}; "
            "models that share or reorder KV between layers are not supported"
        )
    return layer


@contextmanager
def capture() -> Iterator[list[dict]]:
    """Record, for every attention call, what the kernel saw: layer index, kv positions (B, H, K), the boolean
    visibility (B, H, Q, K) (H = 1, or Hkv when kv heads keep different tokens) and q_offset. For tests and
    debugging; slow (copies the masks)."""
    records: list[dict] = []
    previous = getattr(_state, "captures", None)
    _state.captures = records
    try:
        yield records
    finally:
        _state.captures = previous


@contextmanager
def capture_paused() -> Iterator[None]:
    """Inside the block, `capture()` records nothing (a strategy's own internal forwards, e.g. KVzip's context
    reconstruction, are not part of what the caller's queries saw)."""
    previous = getattr(_state, "captures", None)
    _state.captures = None
    try:
        yield
    finally:
        _state.captures = previous


def kvcompress_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: MaskSpec | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function.

    Args:
        query: (B, Hq, Q, d), already rotated by the model at its position ids.
        key, value: (B, Hkv, K, d), what the cache's `update` returned (kept keys, then all new keys).
        attention_mask: a `MaskSpec` from `kvcompress_mask`; or a 4-D bool/additive float mask (B or 1, 1 or H,
            Q, K) or a FlexAttention `BlockMask` given by the caller (training masks, reference forwards), used as
            is; or None (causal).
        dropout: attention dropout probability (training only).
        scaling: softmax scale, default d ** -0.5.

    Returns:
        (output (B, Q, Hq, d), weights). weights is None unless the model is asked for `output_attentions`; then
        it is (B, Hq, Q, K) softmax probabilities (`attention_probs`, before dropout) over the K keys this layer
        attended. With a compressing cache the key axis is the layer's slots as `update` returned them (the
        tokens kept before this forward, then the new ones), not text positions; their stream positions are the
        layer's `positions` before eviction, recorded per call by `capture()` (`kv_positions`).
    """
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("the kvcompress core does not apply attention-logit soft-capping (softcap)")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("the kvcompress core does not apply learned attention sinks (s_aux)")
    served = _take_group(getattr(module, "layer_idx", None))
    if served is not None:  # a CacheGroup: each member on its own row
        return _attend_group(served, module, query, attention_mask, dropout, scaling, kwargs)
    q_len = query.shape[-2]
    layer = _take_layer(getattr(module, "layer_idx", None))
    kv_positions = None
    spec = attention_mask if isinstance(attention_mask, MaskSpec) else None
    new_padding = None
    if layer is not None:
        if spec is not None and spec.padding is not None:
            new_padding = spec.padding[:, spec.q_offset : spec.q_offset + q_len]
        with serving_layer(layer.layer_idx):  # RoPE tables per layer type (positions="cache")
            query, key, kv_positions = layer.prepare_attention(query, key, kwargs.get("position_ids"), new_padding)
    if spec is not None:
        if kv_positions is None:  # contiguous keys: another cache, or none
            start = spec.kv_offset
            kv_positions = torch.arange(start, start + key.shape[-2], device=key.device).expand(key.shape[0], 1, -1)
        mask = _mask_for(spec, kv_positions, layer, q_len, key.shape[-2])
    elif attention_mask is None:
        mask = True if q_len > 1 else None  # True: causal, bottom-right aligned
    else:
        mask = attention_mask

    captures = getattr(_state, "captures", None)
    if captures is not None:
        captures.append(_capture_record(module, spec, kv_positions, mask, q_len, key.shape[-2], key.shape[0]))

    probs = reductions = scope = None
    if layer is not None and getattr(layer._cache, "observe_max_received", False):
        scope = layer._cache.max_received_scope(kv_positions)
    fast = layer is not None and _backend != "reference" and not module.training
    if fast and q_len == 1 and observes_probabilities(layer._cache):
        # a decode step of a strategy that observes probabilities: one softmax serves the output and the
        # observation (one that observes only the queries, expected_attention, keeps the fused kernel)
        output, probs = _decode_attention(query, key, value, mask, scaling)  # probs (B, Hq, 1, K)
    elif fast and _reduces_all_queries(layer._cache) and not isinstance(mask, BlockMask):
        # attention received (summed or max) over every query of a longer forward: the same blockwise softmax
        # serves the output too, instead of a kernel computing it again
        output, reductions = _attention_with_reductions(query, key, value, mask, scaling, new_padding,
                                                        layer._cache, scope)
    else:
        output = attend(query, key, value, mask, scaling=scaling, dropout=dropout if module.training else 0.0)
    weights = None
    if kwargs.get("output_attentions", getattr(module.config, "output_attentions", False)):
        weights = (probs if probs is not None else attention_probs(query, key, mask, scaling)).to(query.dtype)
    if layer is not None:
        observed = mask
        if new_padding is not None and isinstance(mask, torch.Tensor) and not bool(new_padding.all()):
            observed = mask & new_padding.to(mask.device).view(mask.shape[0], 1, q_len, 1)  # pads observe nothing
        slots = (key.shape[-2], layer.used)
        layer.observation = _own_slots(observe(layer._cache, query, key, observed, scaling, probs, reductions, scope),
                                       *slots)
        sharing = layer._cache._deferring
        if sharing:  # prefill_shared: the observation of each other cache sharing this forward, as it would take it
            layer.shared_observations = {
                name: _own_slots(observe(other, query, key, observed, scaling, probs, reductions), *slots)
                for name, other in sharing.items()}
        try:
            layer.finish_forward()
        finally:
            layer.observation = None
    return output, weights


def _own_slots(observation: Observation | None, keys: int, used: int) -> Observation | None:
    """The observation of a layer's `used` own slots of the `keys` attended (demoted pairs, attended after them,
    are not the strategy's)."""
    return observation.narrow(used) if observation is not None and keys > used else observation


def _mask_for(spec: MaskSpec, kv_positions, layer, q_len: int, kv_len: int):
    """Visibility for this layer: None (all visible), True (causal) or a (B, 1 or Hkv, Q, K) bool tensor.

    The shortcuts need the last key to be the last query (bottom-right alignment): not so for a static cache,
    whose keys run to the end of its buffer."""
    if layer is None:
        contiguous = spec.kv_offset + kv_len == spec.q_offset + q_len
    else:
        contiguous = layer.dense
    if contiguous and spec.is_plain_causal:
        if q_len == 1:
            return None
        if q_len == kv_len:
            return True
    if layer is not None and q_len == 1 and spec.mask_function is causal_mask_function:
        # a decode step of a kvcompress cache: every kept key precedes the query and pads hold position -1, so the
        # mask is "slot filled"; None when every slot is (a sink window's steady state: the new token refilled the
        # slot freed by the previous step), which lets the kernel run without a mask
        filled = kv_positions >= 0
        return None if bool(filled.all()) else filled.unsqueeze(2)  # (B, Hp, 1, K)
    return allowed_from_positions(spec, kv_positions, q_len)


def _capture_record(module, spec, kv_positions, mask, q_len, kv_len, batch) -> dict:
    if isinstance(mask, BlockMask):
        mask = create_mask(mask.mask_mod, batch, 1, q_len, kv_len, device=mask.kv_num_blocks.device)
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        allowed = mask.expand(batch, -1, q_len, kv_len)
    elif isinstance(mask, torch.Tensor):  # additive
        allowed = (mask > torch.finfo(mask.dtype).min).expand(batch, -1, q_len, kv_len)
    else:
        allowed = _causal_bool(q_len, kv_len, kv_positions.device if kv_positions is not None else "cpu")
        allowed = allowed.expand(batch, 1, q_len, kv_len)
    return {
        "layer_idx": getattr(module, "layer_idx", None),
        "kv_positions": None if kv_positions is None else kv_positions.clone(),
        "allowed": allowed.clone(),
        "q_offset": None if spec is None else spec.q_offset,
    }


def _causal_bool(q_len: int, kv_len: int, device) -> torch.Tensor:
    """(1, 1, Q, K) bool, bottom-right aligned: query i sees keys j <= i + (K - Q)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len).view(1, 1, q_len, kv_len)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | bool | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads; the dispatcher of the core.

    Args:
        query: (B, Hq, Q, d). key, value: (B, Hkv, K, d) with Hq a multiple of Hkv (query head h uses kv head
            h // (Hq / Hkv)).
        mask: None (every key visible to every query); True (causal, bottom-right aligned: query i sees keys
            j <= i + K - Q); a bool tensor (B or 1, 1 | Hkv | Hq, Q, K), True = visible (a kv-head mask applies to
            every query head of its group); an additive float tensor broadcastable to (B, Hq, Q, K); or a
            FlexAttention `BlockMask` (block-sparse, for long structured masks such as AnSAN training masks). A query
            row that sees no key returns zeros (never NaN).
        backend: "sdpa", "reference" or "auto" (default: `set_backend`'s choice). "auto" uses SDPA, which on CUDA
            picks flash attention when there is no mask and memory-efficient attention with one; a BlockMask runs
            FlexAttention (compiled on CUDA, eager on CPU). "reference" materialises any mask and runs fp64.

    Returns:
        (B, Q, Hq, d) in the query's dtype.
    """
    backend = backend or _backend
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if isinstance(mask, BlockMask):
        if backend != "reference":
            return _flex(query, key, value, mask, scaling)
        mask = create_mask(mask.mask_mod, query.shape[0], 1, q_len, kv_len, device=query.device)
    if mask is True and q_len != kv_len:
        mask = _causal_bool(q_len, kv_len, query.device)
    empty_rows = None
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        seen_any = mask.any(dim=-1, keepdim=True)
        if not bool(seen_any.all()):
            empty_rows = ~seen_any
            mask = mask | empty_rows
            empty_rows = _to_query_heads(empty_rows, query.shape[1])
    if backend == "reference":
        if isinstance(mask, torch.Tensor):
            mask = _to_query_heads(mask, query.shape[1])
        output = _reference(query, key, value, mask, scaling)
    else:
        output = _sdpa(query, key, value, mask, scaling, dropout)
    if empty_rows is not None:
        output = output.masked_fill(empty_rows.transpose(1, 2), 0.0)  # (B, Q, H or 1, 1)
    return output


def _to_query_heads(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, 1 | Hkv | Hq, ...) -> broadcastable to Hq query heads (query head h uses kv head h // (Hq / Hkv))."""
    if mask.shape[1] in (1, heads):
        return mask
    return mask.repeat_interleave(heads // mask.shape[1], dim=1)


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | bool | BlockMask | None,
    scaling: float | None = None,
    last: int | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities exactly as `attend` applies them (same mask, scale and GQA mapping).

    The one function for `output_attentions` and for attention-aware strategies (TOVA, SnapKV: `Observation`).
    Queries are processed in blocks of `block_size`, so a long prefill never holds more than one block of scores
    besides the result, and `last=w` computes only the last w query rows (SnapKV's observation window).

    Args:
        query: (B, Hq, Q, d). key: (B, Hkv, K, d), Hq a multiple of Hkv (query head h uses kv head h // (Hq / Hkv)).
        mask: as in `attend`: None (all visible), True (causal, bottom-right aligned), a bool tensor broadcastable
            to (B, Hq, Q, K) (True = visible), an additive float tensor, or a `BlockMask` (materialised).
        scaling: softmax scale, default d ** -0.5.
        last: only the last `last` queries (>= 1; all when None or >= Q).
        block_size: queries per block (>= 1); default: about 2 ** 21 scores per block on a CPU, 2 ** 24 on an
            accelerator (`_block_scores`).

    Returns:
        (B, Hq, min(last, Q), K) float32 (float64 for float64 inputs); row i is the distribution of query
        Q - rows + i over the K keys. A query that sees no key gets a row of zeros (`attend` returns zeros for it).
    """
    batch, heads, q_len, _ = query.shape
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        raise ValueError(f"last must be an integer >= 1 or None, got {last!r}")
    rows = q_len if last is None else min(last, q_len)
    first = q_len - rows
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    probs = torch.zeros(batch, heads, rows, key.shape[-2], dtype=dtype, device=query.device)
    for start, stop, block in _probability_blocks(query, key, mask, scaling, first, block_size):
        probs[:, :, start - first : stop - first, : block.shape[-1]] = block
    return probs


def attention_received(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | bool | BlockMask | None,
    scaling: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """The attention each key received, summed over all Q queries: `attention_probs(...).sum(dim=2)`, computed
    block by block so a long prefill never materialises Q x K probabilities (H2O's heavy-hitter score).

    Args: as `attention_probs`. Returns: (B, Hq, K) float32 (float64 for float64 inputs).
    """
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    total = torch.zeros(*query.shape[:2], key.shape[-2], dtype=dtype, device=query.device)
    for _, _, block in _probability_blocks(query, key, mask, scaling, 0, block_size):
        total[..., : block.shape[-1]] += block.sum(dim=2)
    return total


def attention_max_received(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | bool | BlockMask | None,
    scaling: float | None = None,
    block_size: int | None = None,
    scope: torch.Tensor | None = None,
) -> torch.Tensor:
    """The largest attention probability each key received from any of the Q queries:
    `attention_probs(...).amax(dim=2)`, computed block by block (never Q x K probabilities at once; KVzip's score).

    Args: as `attention_probs`; scope: None, or (B, 1 | Hkv | Hq, K) bool: each query's probabilities are
        renormalised over the keys in scope (`max_over_queries`). Returns: (B, Hq, K) float32 (float64 for float64
        inputs); 0 for a key no query sees.
    """
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    best = torch.zeros(*query.shape[:2], key.shape[-2], dtype=dtype, device=query.device)
    scope = _scope_for_blocks(scope, query.shape[1])
    for _, _, block in _probability_blocks(query, key, mask, scaling, 0, block_size):
        seen = best[..., : block.shape[-1]]
        torch.maximum(seen, max_over_queries(block, scope), out=seen)
    return best


def _scope_for_blocks(scope: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """(B, Hp, K) bool -> (B, 1 | Hq, 1, K), broadcasting over a probability block (B, Hq, q, K)."""
    return None if scope is None else _to_query_heads(scope, heads).unsqueeze(2)


def max_over_queries(probs: torch.Tensor, scope: torch.Tensor | None = None) -> torch.Tensor:
    """probs (B, Hq, q, K') -> (B, Hq, K') the largest probability each key received from the q queries. With a
    `scope` (B, 1 | Hq, 1, K >= K') bool, each query's probabilities are first renormalised over the keys in scope
    (p / sum of p over the scope: the softmax over those keys alone, exactly up to rounding unless every key in scope
    underflows, which then observes 0), and keys out of scope observe 0."""
    if scope is None:
        return probs.amax(dim=2)
    inside = probs * scope[..., : probs.shape[-1]]
    mass = inside.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(probs.dtype).tiny)
    return inside.div_(mass).amax(dim=2)


def _block_scores(device: torch.device) -> int:
    """Scores per query block of the observation: about 8 MB of float32 on a CPU (measured on a 2-core Xeon with
    2 MiB L2 per core: 2 ** 21 scores ran the blockwise softmax 1.5-2.4x faster than 2 ** 24, flat within +-15%
    from 2 ** 20 to 2 ** 22); 2 ** 24 on an accelerator, where fewer, larger kernels win."""
    return 2**21 if device.type == "cpu" else 2**24


def _visible_span(block_mask: torch.Tensor) -> tuple[int, int]:
    """Of a bool (..., q, K) block mask: (open, seen): every query of the block sees keys 0..open-1, none sees a key
    from `seen` on (seen = K when no query sees any key). Two passes over bools, against float passes saved."""
    rows = block_mask.flatten(0, -2)
    visible = rows.any(dim=0).nonzero()
    seen = int(visible[-1]) + 1 if visible.numel() else block_mask.shape[-1]
    hidden = (~rows[:, :seen].all(dim=0)).nonzero()
    return (int(hidden[0]) if hidden.numel() else seen), seen


def _probability_blocks(query, key, mask, scaling, first: int, block_size: int | None):
    """Yield (start, stop, probs (B, Hq, stop - start, K')) for queries first..Q-1, `block_size` queries at a time;
    K' <= K: the keys after the last one any query of the block sees (causal `True`, or a bool mask) are left out
    (probability 0)."""
    batch, heads, q_len, dim = query.shape
    kv_len, groups = key.shape[-2], heads // key.shape[1]
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be an integer >= 1 or None, got {block_size!r}")
    block_size = block_size or max(1, _block_scores(query.device) // max(1, batch * heads * kv_len))
    if isinstance(mask, BlockMask):
        mask = create_mask(mask.mask_mod, batch, 1, q_len, kv_len, device=query.device)
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = scaling if scaling is not None else dim**-0.5
    keys = key.to(dtype)
    for start in range(first, q_len, block_size):
        stop = min(start + block_size, q_len)
        # causal (dense slots): keys after the block's last query are hidden, so they are not scored at all
        seen = stop + kv_len - q_len if mask is True else kv_len
        block_mask = _mask_rows(mask, start, stop, q_len, kv_len, query.device)
        open_keys = 0  # keys every query of the block sees: no masking needed there
        if isinstance(block_mask, torch.Tensor) and block_mask.dtype == torch.bool and q_len > 1:
            # a bool mask likewise (a causal chunk after a context seen whole: KVzip's reconstruction forwards);
            # not for one query, whose probabilities stay bitwise those of `_decode_attention`
            open_keys, seen = _visible_span(block_mask)
        # a kv head's g query heads as one (g x block) matrix against its keys: one matmul per kv head
        q = rearrange(query[:, :, start:stop].to(dtype), "b (h g) q d -> b h (g q) d", g=groups)
        scores = (q @ keys[:, :, :seen].transpose(-1, -2)).view(batch, heads, stop - start, seen)  # (B, Hq, q, K')
        # in place on the block's own fresh scores (bitwise what the out-of-place ops give, one pass and no
        # allocation fewer each: the observation of a long forward is dominated by these passes)
        scores.mul_(scale)
        if block_mask is not None and block_mask.shape[-1] != seen:
            block_mask = block_mask[..., :seen]
        if block_mask is not None and block_mask.dtype == torch.bool:
            block_mask = _to_query_heads(block_mask[..., open_keys:], heads)
            scores[..., open_keys:].masked_fill_(~block_mask, float("-inf"))
            block = scores.softmax(dim=-1)
            if not open_keys:
                blind = ~block_mask.any(dim=-1, keepdim=True)  # queries that see no key: a row of zeros, not NaN
                if blind.any():
                    block.masked_fill_(blind, 0.0)
        else:
            block = (scores if block_mask is None else scores.add_(block_mask.to(dtype))).softmax(dim=-1)
        yield start, stop, block


@dataclass
class Observation:
    """What an attention-aware strategy sees of one layer's forward, computed by the core after the kernel and
    before `select` (only what the cache declares: `observe_queries`, `observe_window`, `observe_received`).

    S is the layer's slot count as `update` returned it (kept tokens before this forward, then the new ones);
    free slots get probability 0.

    Attributes:
        queries: (B, Hq, q, d) the forward's queries as the kernel saw them (rotated), or None.
        probs: (B, Hq, w, S) float32 softmax probabilities of the last w = min(observe_window, q) queries, exactly
            as the kernel applied them (same mask and scale), or None.
        received: (B, Hq, S) float32 attention each slot received, summed over all q queries of the forward, or
            None.
        max_received: (B, Hq, S) float32 largest attention probability each slot received from any of the
            forward's q queries, or None.
    """

    queries: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    received: torch.Tensor | None = None
    max_received: torch.Tensor | None = None

    def narrow(self, slots: int) -> Observation:
        """The observation of the first `slots` keys only (the layer's own slots; demoted pairs come after them)."""
        cut = (lambda t: None if t is None else t[..., :slots])
        return Observation(queries=self.queries, probs=cut(self.probs), received=cut(self.received),
                           max_received=cut(self.max_received))


def observation_key(cache) -> tuple[bool, int, bool, bool]:
    """What `observe` computes for `cache` (queries, window, received, max received): two caches with equal keys
    observe a forward identically."""
    return (bool(getattr(cache, "observe_queries", False)), int(getattr(cache, "observe_window", 0) or 0),
            bool(getattr(cache, "observe_received", False)), bool(getattr(cache, "observe_max_received", False)))


def observes(cache) -> bool:
    """Whether `cache` declares any observation."""
    return bool(getattr(cache, "observe_window", 0) or getattr(cache, "observe_queries", False)
                or getattr(cache, "observe_received", False) or getattr(cache, "observe_max_received", False))


def observes_probabilities(cache) -> bool:
    """Whether `cache` observes attention probabilities (a window of them, or what its keys received), not only
    the queries."""
    return bool(getattr(cache, "observe_window", 0) or _reduces_all_queries(cache))


def observe(cache, query, key, mask, scaling, probs: torch.Tensor | None = None,
            reductions: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
            scope: torch.Tensor | None = None) -> Observation | None:
    """The `Observation` `cache` declares, or None when it declares nothing. `probs`: the probabilities of ALL the
    forward's queries when the caller has them already (a decode step), reused instead of recomputed;
    `reductions`: (received, max received) when the kernel computed them (`_attention_with_reductions`);
    `scope`: the cache's `max_received_scope` (B, Hp, K) bool or None, for the max received."""
    if not observes(cache):
        return None
    window = getattr(cache, "observe_window", 0)
    if window:
        last = probs[:, :, -window:] if probs is not None else attention_probs(query, key, mask, scaling, last=window)
    received, best = reductions if reductions is not None else (None, None)
    if getattr(cache, "observe_received", False) and received is None:
        received = probs.sum(dim=2) if probs is not None else attention_received(query, key, mask, scaling)
    if getattr(cache, "observe_max_received", False) and best is None:
        best = max_over_queries(probs, _scope_for_blocks(scope, probs.shape[1])) if probs is not None \
            else attention_max_received(query, key, mask, scaling, scope=scope)
    return Observation(
        queries=query if getattr(cache, "observe_queries", False) else None,
        probs=last if window else None,
        received=received,
        max_received=best,
    )


def _reduces_all_queries(cache) -> bool:
    """Whether `cache` observes the attention received (summed or max) over all of a forward's queries."""
    return bool(getattr(cache, "observe_received", False) or getattr(cache, "observe_max_received", False))


def _attention_with_reductions(query, key, value, mask, scaling, new_padding, cache, scope=None):
    """A forward of Q queries whose cache observes the attention received over all of them (H2O's prefill,
    KVzip's reconstruction): one blockwise pass (`_probability_blocks`, the probabilities `attention_probs`
    gives) computes the output (probabilities x values, in float32 / float64) and the declared reductions, where
    `attend` then `observe` would compute every probability twice (on a CPU the masked SDPA kernel of a KVzip
    reconstruction forward cost as much as the observation itself).

    Args: as `attend` (no BlockMask); new_padding: (B, Q) bool, False for pad queries (they attend, observe
        nothing), or None; scope: the cache's `max_received_scope` (B, Hp, K) bool, or None.
    Returns: (output (B, Q, Hq, d) in the query's dtype, (received (B, Hq, K) or None, max received or None)).
    """
    batch, heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[-2]
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    values = value.to(dtype)
    output = query.new_empty(batch, q_len, heads, value.shape[-1])
    want_sum = getattr(cache, "observe_received", False)
    want_max = getattr(cache, "observe_max_received", False)
    scope = _scope_for_blocks(scope, heads)
    total = torch.zeros(batch, heads, kv_len, dtype=dtype, device=query.device) if want_sum else None
    best = torch.zeros(batch, heads, kv_len, dtype=dtype, device=query.device) if want_max else None
    pads = None
    if new_padding is not None and not bool(new_padding.all()):
        pads = ~new_padding.to(query.device).view(batch, 1, q_len, 1)
    for start, stop, block in _probability_blocks(query, key, mask, scaling, 0, None):
        seen = block.shape[-1]
        grouped = block.view(batch, kv_heads, -1, seen)  # a kv head's (g x block) probabilities: one matmul
        mixed = (grouped @ values[:, :, :seen]).view(batch, heads, stop - start, -1)
        output[:, start:stop] = mixed.transpose(1, 2)
        if pads is not None:
            block.masked_fill_(pads[:, :, start:stop], 0.0)  # pad queries observe nothing
        if total is not None:
            total[..., :seen] += block.sum(dim=2)
        if best is not None:
            torch.maximum(best[..., :seen], max_over_queries(block, scope), out=best[..., :seen])
    return output, (total, best)


def _decode_attention(query, key, value, mask, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row: (output (B, 1, Hq, d) in the query's dtype, probabilities (B, Hq, 1, K)), bitwise what
    `attention_probs` then `_mix` give (same dtype rules), in a handful of operations: the grouped query heads of
    a kv head form one matrix, so there is no head repetition, no einsum and no copy of the probabilities.
    `mask`: as in `attend`; other than None, True or a bool (B or 1, 1 or Hkv, 1, K) tensor, the general path."""
    batch, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[-2]
    if mask is True:  # causal with one query: every key is visible
        mask = None
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.ndim == 4
                                 and mask.shape[1] in (1, kv_heads) and mask.shape[2] == 1):
        probs = attention_probs(query, key, mask, scaling)
        return _mix(probs, value).to(query.dtype), probs
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32

    def cast(tensor: torch.Tensor, to: torch.dtype) -> torch.Tensor:
        return tensor if tensor.dtype == to else tensor.to(to)  # no dispatch for a no-op

    grouped = cast(query, dtype).reshape(batch, kv_heads, heads // kv_heads, dim)  # (B, Hkv, g, d)
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.matmul(grouped, cast(key, dtype).transpose(-1, -2)) * scale  # (B, Hkv, g, K)
    if mask is None:
        probs = scores.softmax(dim=-1)
    else:  # (B, 1 or Hkv, 1, K) broadcasts over the group's query heads
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    output = torch.matmul(probs, cast(value, dtype))  # (B, Hkv, g, d)
    return cast(output.reshape(batch, 1, heads, -1), query.dtype), probs.reshape(batch, heads, 1, kv_len)


def _mix(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs (B, Hq, Q, K) @ value (B, Hkv, K, d), grouped heads -> (B, Q, Hq, d) (the layout `attend` returns)."""
    groups = probs.shape[1] // value.shape[1]
    mixed = einsum(rearrange(probs, "b (h g) q k -> b h g q k", g=groups), value.to(probs.dtype),
                   "b h g q k, b h k d -> b q h g d")
    return rearrange(mixed, "b q h g d -> b q (h g) d")


def _mask_rows(mask, start: int, stop: int, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """Rows start..stop-1 of `mask` (None, True or a tensor with a query axis of Q or 1)."""
    if mask is None:
        return None
    if mask is True:
        rows = torch.arange(start, stop, device=device).view(-1, 1)
        return (torch.arange(kv_len, device=device).view(1, -1) <= rows + (kv_len - q_len)).view(1, 1, -1, kv_len)
    return mask if mask.shape[-2] == 1 else mask[..., start:stop, :]


def _sdpa(query, key, value, mask, scaling, dropout) -> torch.Tensor:
    """Grouped heads: `enable_gqa` without a mask; with a mask, one query token runs as `groups` queries per kv
    head (no key copies), longer queries repeat the kv heads (the choices transformers' SDPA path makes)."""
    batch, heads, q_len, dim = query.shape
    groups = heads // key.shape[1]
    explicit = isinstance(mask, torch.Tensor)
    gqa_kwargs = {}
    packed = False
    if groups > 1:
        if not explicit:
            gqa_kwargs["enable_gqa"] = True
        elif q_len == 1 and mask.shape[1] in (1, key.shape[1]):
            query = query.view(batch, key.shape[1], groups, dim)  # the group's queries share the kv head's mask
            packed = True
        else:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
            mask = _to_query_heads(mask, heads)
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask if explicit else None,
        dropout_p=dropout,
        is_causal=mask is True,
        scale=scaling,
        **gqa_kwargs,
    )
    if packed:
        output = output.reshape(batch, heads, 1, dim)
    return output.transpose(1, 2)


@lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _flex(query, key, value, block_mask: BlockMask, scaling) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    kernel = _compiled_flex() if query.is_cuda else flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        output = kernel(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1)
    return output.transpose(1, 2)


def _reference(query, key, value, mask, scaling) -> torch.Tensor:
    """Plain float64 softmax attention: the definition every fast path is checked against."""
    dtype = query.dtype
    groups = query.shape[1] // key.shape[1]
    q = rearrange(query.double(), "b (h g) q d -> b h g q d", g=groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = einsum(q, key.double(), "b h g q d, b h k d -> b h g q k") * scale
    scores = rearrange(scores, "b h g q k -> b (h g) q k")
    if mask is True:
        mask = _causal_bool(query.shape[-2], key.shape[-2], query.device)
    if isinstance(mask, torch.Tensor):
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    probs = rearrange(scores.softmax(dim=-1), "b (h g) q k -> b h g q k", g=groups)
    output = einsum(probs, value.double(), "b h g q k, b h k d -> b q h g d")
    return rearrange(output, "b q h g d -> b q (h g) d").to(dtype)
