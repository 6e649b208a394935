"""Attention masks built from what a cache kept.

transformers builds ONE mask per forward from the first full-attention layer and a kv offset. That cannot describe
a cache whose layers keep different tokens, or whose rows keep different tokens (sinks with left padding). So the
mask function registered for the kvcompress core does not build a tensor: it returns a `MaskSpec` (the model's
pattern function, the 2-D padding mask and the query offset), and the attention core evaluates it per layer on
the absolute positions that layer's cache returned.

Positions are stream indices: token t of a row is the t-th token fed to the model for that batch (pads included),
which is also its column in the 2-D `attention_mask` that `generate` passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.masking_utils import causal_mask_function


@dataclass(frozen=True)
class MaskSpec:
    """What the kvcompress mask function hands to the attention core instead of a 4-D tensor.

    Attributes:
        mask_function: transformers' index-based pattern `f(batch_idx, head_idx, q_idx, kv_idx) -> bool`, evaluated
            here on broadcast index tensors (causal, sliding window, ...).
        padding: (B, N) bool, True for real tokens, over stream positions 0..N-1 (N >= q_offset + q_len); None when
            the batch has no padding.
        q_offset: stream position of the first query token of this forward.
        kv_offset: stream position of the first key when the keys are contiguous (a cache that is not a
            kvcompress cache, or no cache); unused for kvcompress caches, which report positions per slot.
    """

    mask_function: Callable
    padding: torch.Tensor | None
    q_offset: int
    kv_offset: int

    # transformers treats a mask whose `ndim` is not 2 as already prepared for this forward: with a compileable
    # cache (StaticCache) `generate` builds the mask before the forward, and the model's mask builder then hands
    # that MaskSpec back to `kvcompress_mask`, which returns it unchanged.
    ndim = 4

    @property
    def is_plain_causal(self) -> bool:
        return self.mask_function is causal_mask_function and self.padding is None


def kvcompress_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> MaskSpec:
    """Mask function registered with transformers' `AttentionMaskInterface` (signature of `sdpa_mask`).

    `attention_mask` is the 2-D padding mask (B, N), or a `MaskSpec` that `generate` already built for this
    forward (compileable caches), returned as is.
    """
    if isinstance(attention_mask, MaskSpec):
        return attention_mask
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(torch.bool)
        if bool(padding.all()):
            padding = None
    q_offset = int(q_offset)
    return MaskSpec(mask_function=mask_function, padding=padding, q_offset=q_offset, kv_offset=int(kv_offset))


def allowed_from_positions(spec: MaskSpec, kv_positions: torch.Tensor, q_length: int) -> torch.Tensor:
    """Boolean visibility of each kept key to each query.

    Args:
        spec: the forward's `MaskSpec`.
        kv_positions: (B, H, K) long, stream position of each key slot, -1 for a free slot; H = 1 (every kv head
            holds the same tokens) or Hkv (per kv head). A (B, K) tensor is read as H = 1.
        q_length: number of query tokens; their positions are `spec.q_offset + arange(q_length)`.

    Returns:
        (B, H, Q, K) bool, True where query i may attend key slot j: the slot is filled, the pattern function
        allows (q_pos, kv_pos) and the key is not a pad. Slots past the padding mask's width (the unused tail of
        a static cache's buffer) are never visible.
    """
    if kv_positions.ndim == 2:
        kv_positions = kv_positions.unsqueeze(1)
    device = kv_positions.device
    batch, heads, slots = kv_positions.shape
    q_pos = torch.arange(spec.q_offset, spec.q_offset + q_length, device=device).view(1, 1, q_length, 1)
    kv = kv_positions.unsqueeze(2)  # (B, H, 1, K)
    batch_idx = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    allowed = spec.mask_function(batch_idx, 0, q_pos, kv.clamp(min=0))
    allowed = allowed & (kv >= 0)
    if spec.padding is not None:
        padding = spec.padding.to(device)
        width = padding.shape[-1]
        flat = kv_positions.flatten(1)
        real = padding.gather(1, flat.clamp(0, width - 1)) & (flat < width)
        allowed = allowed & real.view(batch, heads, 1, slots)
    return allowed.expand(batch, heads, q_length, slots)
