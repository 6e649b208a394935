"""Integer quantization of keys and values (KIVI layout: Liu et al. 2024, arXiv 2402.02750).

Asymmetric min-max round-to-nearest: a group x gets zero = min(x), scale = (max(x) - min(x)) / (2^bits - 1), codes
round((x - zero) / scale) in [0, 2^bits - 1], and dequantizes to codes * scale + zero, so every element comes back
within scale / 2 of its input (a constant group: scale 0, exact). Codes are packed along the last axis into
uint8 (8 bits: one per byte, 4: two, 2: four); scales and zero points are stored in float16 (bfloat16 inputs keep
bfloat16), as KIVI and HQQ do.

- keys: per CHANNEL over a group of tokens: x (..., G, d) -> one (scale, zero) per channel (..., 1, d);
- values: per TOKEN over groups of `group` channels: x (..., G, d) -> (..., G, d / group) scales and zeros.
"""

from __future__ import annotations

import torch

BITS = (8, 4, 2)


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x` in groups reduced over `dim`: returns (packed codes uint8, scale, zero); scale and zero keep `dim`
    with size 1. Codes are packed along the last axis."""
    levels = 2**bits - 1
    low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    stored = scale_dtype(x.dtype)
    zero = low.to(stored)
    scale = ((high - zero.to(x.dtype)) / levels).to(stored)
    # rounding against the STORED scale and zero, so dequantization reproduces exactly what was rounded
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).to(x.dtype)
    codes = ((x - zero.to(x.dtype)) / safe).round_().clamp_(0, levels).to(torch.uint8)
    return pack(codes, bits), scale, zero


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`: codes * scale + zero in `dtype`; `size` is the unpacked last dimension."""
    values = unpack_as(packed, bits, size, dtype)
    return values.mul_(scale.to(dtype)).add_(zero.to(dtype))  # in place on the fresh copy: the same arithmetic


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., n) with values < 2^bits -> (..., ceil(n * bits / 8)) uint8, first code in the low bits."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    n = codes.shape[-1]
    pad = (-n) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], dim=-1)
    codes = codes.view(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (codes << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, size: int) -> torch.Tensor:
    """Inverse of `pack`: (..., m) uint8 -> (..., size) uint8 codes."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[..., :size]
    # uint8 shifts and masks (no wider integer copy), one per code position in the byte, interleaved back
    codes = torch.stack([(packed >> (i * bits)) & (2**bits - 1) for i in range(per_byte)], dim=-1)
    return codes.flatten(-2)[..., :size]


def unpack_as(packed: torch.Tensor, bits: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """`unpack(packed, bits, size).to(dtype)` in fewer passes: the bytes are read as the widest integer words that
    tile the last axis (8 bytes per int64 where it divides), so each shift-and-mask handles 8 bytes at once (every
    byte's code i is (byte >> i * bits) & mask: the per-byte mask drops what the shift carries in from the next byte
    or the sign), and the codes are converted to `dtype` straight into their interleaved places (no uint8 copy)."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[..., :size].to(dtype)
    packed = packed.contiguous()
    width = packed.shape[-1]
    word = next(w for w in (8, 4, 2, 1) if width % w == 0)
    words = packed if word == 1 else packed.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[word])
    mask = int.from_bytes(bytes([2**bits - 1]) * word, "little")
    out = torch.empty(*packed.shape, per_byte, dtype=dtype, device=packed.device)
    for i in range(per_byte):
        codes = (words >> (i * bits)) & mask if i else words & mask
        out[..., i] = codes if word == 1 else codes.view(torch.uint8)
    return out.flatten(-2)[..., :size]


def quantize_keys(keys: torch.Tensor, bits: int):
    """Keys (..., G, d): per channel over the G tokens."""
    return quantize(keys, bits, dim=-2)


def quantize_values(values: torch.Tensor, bits: int, group: int):
    """Values (..., G, d): per token over groups of `group` channels; scale/zero (..., G, d / group, 1)."""
    grouped = values.view(*values.shape[:-1], values.shape[-1] // group, group)
    packed, scale, zero = quantize(grouped, bits, dim=-1)
    return packed, scale, zero


def dequantize_keys(packed, scale, zero, bits: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(packed, scale, zero, bits, dim, dtype)


def dequantize_values(packed, scale, zero, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    out = dequantize(packed, scale, zero, bits, group, dtype)
    return out.flatten(-2)
