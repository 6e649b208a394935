"""AnSAN: the anchor-based self-attention training mask of AnLLM (Pang et al. 2024), dense and FlexAttention.

Rule (DESIGN.md section 2). In each row, the real (non-pad) tokens that are anchors sit at a0 < a1 < ...;
segment k is (a_{k-1}, a_k]: the anchor closes its segment, and tokens after the last anchor form one more, open
segment. A query i may attend a key j only if j <= i (causal), both are real tokens, and

- i is a non-anchor of segment k: j is in segment k, or j is an anchor of an earlier segment;
- i is the anchor a_k: j is in segment k (an anchor sees no earlier anchor).

Pads: a pad position (attention_mask 0) is neither an anchor nor a member of any segment, whatever its id: it
attends nothing and nothing attends it, and it does not split or close a segment (segments are defined on the
real tokens only, so left, right or inner padding all give the same mask over the real tokens). A pad query row
is all False; the kvcompress attention core returns zeros for such rows (never NaN).

Both forms are applied through the shared core: `model(ids, attention_mask=ansan_mask(...)[:, None])` (4-D bool,
used as is by the core), or `attention_mask=ansan_block_mask(...)` (FlexAttention, block-sparse, for long
sequences; eager on CPU, compiled on CUDA).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def anchor_flags(
    input_ids: torch.Tensor, anchor_ids: Iterable[int] | torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token anchor flags and segment indices.

    Args:
        input_ids: (B, N) long.
        anchor_ids: the anchor token ids (non-empty).
        attention_mask: (B, N), 1/True for real tokens, 0 for pads; None = no pads.

    Returns:
        is_anchor (B, N) bool (False on pads), segment (B, N) long (number of anchors strictly before the token;
        an anchor a_k has segment k, like the tokens it closes), real (B, N) bool.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    anchors = torch.as_tensor(list(anchor_ids) if not isinstance(anchor_ids, torch.Tensor) else anchor_ids)
    if anchors.numel() == 0:
        raise ValueError("anchor_ids is empty: AnSAN needs at least one anchor token id")
    real = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(device=input_ids.device).bool()
    )
    if real.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(real.shape)} != input_ids shape {tuple(input_ids.shape)}")
    is_anchor = torch.isin(input_ids, anchors.to(device=input_ids.device, dtype=input_ids.dtype)) & real
    segment = is_anchor.long().cumsum(dim=-1) - is_anchor.long()
    return is_anchor, segment, real


def ansan_mask(
    input_ids: torch.Tensor, anchor_ids: Iterable[int] | torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense AnSAN mask.

    Args:
        input_ids: (B, N) long. anchor_ids: anchor token ids. attention_mask: (B, N) 1 = real, 0 = pad, or None.

    Returns:
        (B, N, N) bool, [b, i, j] True when query i may attend key j (see the module docstring). Pass it to a model
        as `attention_mask=mask[:, None]` (B, 1, N, N).
    """
    is_anchor, segment, real = anchor_flags(input_ids, anchor_ids, attention_mask)
    n = input_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
    same = segment[:, :, None] == segment[:, None, :]
    # An anchor key j < i is always in an earlier segment than i; anchors queries may not use it.
    earlier_anchor = is_anchor[:, None, :] & ~is_anchor[:, :, None]
    return causal & real[:, :, None] & real[:, None, :] & (same | earlier_anchor)


def ansan_mask_mod(
    input_ids: torch.Tensor, anchor_ids: Iterable[int] | torch.Tensor, attention_mask: torch.Tensor | None = None
) -> Callable:
    """FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool` of the AnSAN mask (same rule as `ansan_mask`).

    The returned function indexes (B, N) tensors computed here; it is valid for q_idx, kv_idx < N.
    """
    is_anchor, segment, real = anchor_flags(input_ids, anchor_ids, attention_mask)

    def mask_mod(b, h, q_idx, kv_idx):
        same = segment[b, q_idx] == segment[b, kv_idx]
        earlier_anchor = is_anchor[b, kv_idx] & ~is_anchor[b, q_idx]
        return (kv_idx <= q_idx) & real[b, q_idx] & real[b, kv_idx] & (same | earlier_anchor)

    return mask_mod


def ansan_block_mask(
    input_ids: torch.Tensor,
    anchor_ids: Iterable[int] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    block_size: int = 128,
) -> BlockMask:
    """FlexAttention `BlockMask` (B, 1 head, N, N) of the AnSAN mask, for `flex_attention` / the kvcompress core.

    Args:
        input_ids: (B, N). anchor_ids, attention_mask: as `ansan_mask`. block_size: FlexAttention block size.
    """
    batch, n = input_ids.shape
    mask_mod = ansan_mask_mod(input_ids, anchor_ids, attention_mask)
    return create_block_mask(
        mask_mod, batch, None, n, n, device=str(input_ids.device), BLOCK_SIZE=block_size
    )
