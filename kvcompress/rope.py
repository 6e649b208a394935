"""Rotary position helpers for caches that keep positions "within the cache" (StreamingLLM).

Keys are stored before RoPE: the model rotates new keys at their text positions, the cache un-rotates them with
the model's own cos/sin for those positions (the exact inverse up to rounding), and the attention core rotates
all kept keys, and the queries, at their rank among the row's kept tokens. Works for models whose rotary module
is `forward(x, position_ids) -> (cos, sin)` applied as `x * cos + rotate_half(x) * sin` (Llama, Mistral, Qwen2,
Qwen3, Phi-3, SmolLM, ...), and for models with one RoPE table per layer type, `forward(x, position_ids,
layer_type)` (Gemma 3: local base on sliding layers, global base on full layers); any attention scaling folded
into cos/sin is handled (the inverse divides by cos^2 + sin^2).

Which layer is being served is set by the attention core around `CompressedLayer.prepare_attention`
(`serving_layer`), so the per-layer-type table is the one the model itself applied in that layer.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import PreTrainedModel

_current = threading.local()  # .layer_idx: the layer whose attention the core is preparing


@contextmanager
def serving_layer(layer_idx: int | None) -> Iterator[None]:
    """Within the block, `RotaryPositions` applies the RoPE table of layer `layer_idx` (set by the core)."""
    previous = getattr(_current, "layer_idx", None)
    _current.layer_idx = layer_idx
    try:
        yield
    finally:
        _current.layer_idx = previous


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryPositions:
    """Applies and undoes the model's RoPE at arbitrary positions.

    Args:
        model: a model with exactly one rotary-embedding module whose name ends in "rotary_emb". If its forward
            takes a `layer_type`, the model's `config.layer_types` give each layer's table.
    """

    def __init__(self, model: PreTrainedModel):
        found = [m for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
        if len(found) != 1:
            raise ValueError(
                f"positions='cache' needs a model with one rotary embedding module (`rotary_emb`); "
                f"{type(model).__name__} has {len(found)}. Use positions='original'."
            )
        self.rotary = found[0]
        self.layer_types: list[str] | None = None
        if "layer_type" in inspect.signature(self.rotary.forward).parameters:
            config = model.config.get_text_config(decoder=True)
            self.layer_types = list(getattr(config, "layer_types", None) or [])
            if len(self.layer_types) != config.num_hidden_layers:
                raise ValueError(
                    f"positions='cache': {type(model).__name__}'s rotary embedding needs a layer type per layer, "
                    "but its config has no complete `layer_types`. Use positions='original'."
                )

    def layer_type(self) -> str | None:
        """The RoPE table of the layer being served (None: the model has a single table)."""
        if self.layer_types is None:
            return None
        layer_idx = getattr(_current, "layer_idx", None)
        if layer_idx is None:
            raise RuntimeError("this model has one RoPE table per layer type; call inside rope.serving_layer(idx)")
        return self.layer_types[layer_idx]

    def cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` (B, S) as (B, 1, S, d), in x's dtype (what the model itself applies)."""
        layer_type = self.layer_type()
        extra = () if layer_type is None else (layer_type,)
        cos, sin = self.rotary(x, positions.clamp(min=0), *extra)
        return cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE of x (B, H, S, d) at positions (B, S); computed in fp32, returned in x's dtype."""
        cos, sin = (t.float() for t in self.cos_sin(x, positions))
        x32 = x.float()
        return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: tuple | None = None) -> torch.Tensor:
        """Inverse of `rotate`: x (B, H, S, d) was rotated at positions (B, S). `cos_sin`: `self.cos_sin(x,
        positions)` when the caller has it already (e.g. the same positions in every layer of a forward)."""
        cos, sin = (t.float() for t in (cos_sin or self.cos_sin(x, positions)))
        x32 = x.float()
        return ((x32 * cos - rotate_half(x32) * sin) / (cos * cos + sin * sin)).to(x.dtype)
