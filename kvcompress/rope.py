"""Rotary position helpers for caches that keep positions "within the cache" (StreamingLLM).

Keys are stored before RoPE: the model rotates new keys at their text positions, the cache un-rotates them with
the model's own cos/sin for those positions (the exact inverse up to rounding), and the attention core rotates
all kept keys, and the queries, at their rank among the row's kept tokens. Works for models whose rotary module
is `forward(x, position_ids) -> (cos, sin)` applied as `x * cos + rotate_half(x) * sin` (Llama, Mistral, Qwen2,
Qwen3, Phi-3, SmolLM, ...); any attention scaling folded into cos/sin is handled (the inverse divides by
cos^2 + sin^2).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryPositions:
    """Applies and undoes the model's RoPE at arbitrary positions.

    Args:
        model: a model with exactly one rotary-embedding module whose name ends in "rotary_emb".
    """

    def __init__(self, model: PreTrainedModel):
        found = [m for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
        if len(found) != 1:
            raise ValueError(
                f"positions='cache' needs a model with one rotary embedding module (`rotary_emb`); "
                f"{type(model).__name__} has {len(found)}. Use positions='original'."
            )
        self.rotary = found[0]

    def cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` (B, S) as (B, 1, S, d), in x's dtype (what the model itself applies)."""
        cos, sin = self.rotary(x, positions.clamp(min=0))
        return cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE of x (B, H, S, d) at positions (B, S); computed in fp32, returned in x's dtype."""
        cos, sin = (t.float() for t in self.cos_sin(x, positions))
        x32 = x.float()
        return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Inverse of `rotate`: x (B, H, S, d) was rotated at positions (B, S)."""
        cos, sin = (t.float() for t in self.cos_sin(x, positions))
        x32 = x.float()
        return ((x32 * cos - rotate_half(x32) * sin) / (cos * cos + sin * sin)).to(x.dtype)
