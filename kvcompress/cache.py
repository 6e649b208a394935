"""`CompressedCache`: a transformers `Cache` whose eviction policy is a strategy.

A strategy subclasses `CompressedCache` and implements `select(layer) -> keep`; everything else (storage,
positions, padding, token ids, rotary re-positioning, the contract with `generate`) lives here.

Contract with transformers (5.x), found by experiment (see DESIGN.md):
- `get_seq_length()` is the number of tokens SEEN (fed), not stored: `generate` and the model derive position
  ids and input slicing from it.
- `update()` returns the keys kept before this forward plus ALL new keys; eviction runs after the attention of
  that layer (`finish_forward`, called by the attention core).
- The mask is not built by transformers: the core builds it per layer from `CompressedLayer.positions`.

Storage per layer: keys/values (B, Hkv, S, d) and positions (B, S), the stream position of each slot (its column
in the 2-D attention mask), -1 for an empty slot. Rows may keep different numbers of tokens: a row with fewer
kept tokens has empty slots at the end.
"""

from __future__ import annotations

import copy
import weakref

import torch
import transformers
from packaging.version import Version
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from . import attention
from .rope import RotaryPositions

POSITION_MODES = ("original", "cache")
# transformers 5.24 renamed `past_key_values` to `cache` in forward and generate (the old name still works there,
# with a deprecation warning from generate). Internal calls use `**cache_arg(cache)` to be silent on both sides.
CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_arg(cache: Cache) -> dict:
    """`{"cache": cache}` on transformers >= 5.24, `{"past_key_values": cache}` before."""
    return {CACHE_ARG: cache}


class UnsupportedFeatureError(NotImplementedError):
    """A transformers feature that a compressing cache cannot serve exactly (beam search, crop, ...)."""


class CompressedLayer(CacheLayerMixin):
    """One layer's kept keys and values.

    Attributes:
        keys, values: (B, Hkv, S, d). In positions="cache" mode keys are stored before RoPE.
        positions: (B, S) long, stream position of each slot, -1 for an empty slot (evicted row padding or a pad).
        seen: tokens fed to this layer so far (per row, pads included).
        dense: True while positions are exactly 0..seen-1 in every row (nothing evicted, no pads): the core then
            skips building masks.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: CompressedCache, layer_idx: int):
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.positions: torch.Tensor | None = None
        self.seen = 0
        self.dense = True
        self.new_tokens = 0  # tokens of the forward in flight (or the last one)
        self.awaiting_attention = False  # update() ran, the core's finish_forward() not yet

    # transformers API -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.positions = torch.empty(key_states.shape[0], 0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new keys/values (B, Hkv, q, d); return all kept-before plus new ones (B, Hkv, S+q, d)."""
        if self.awaiting_attention:
            raise attention.not_served_error(self.layer_idx)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, q_len = key_states.shape[0], key_states.shape[-2]
        if batch != self.positions.shape[0]:
            raise ValueError(
                f"this cache holds a batch of {self.positions.shape[0]} rows but got {batch}; "
                "use a new cache (or cache.reset()) for a different batch"
            )
        if self.layer_idx == 0:
            self._cache._record_token_ids(batch, q_len)
        new_positions = torch.arange(self.seen, self.seen + q_len, device=self.positions.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_positions.expand(batch, q_len)], dim=-1)
        self.seen += q_len
        self.new_tokens = q_len
        self.awaiting_attention = True
        attention.serve_layer(self)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_slots
        return stored + query_length, self.seen - stored

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.is_initialized = False
        self.seen = 0
        self.dense = True
        self.new_tokens = 0
        self.awaiting_attention = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise UnsupportedFeatureError(
            "beam search (num_beams > 1) is not supported by kvcompress caches: eviction decisions are per row "
            "and cannot follow beam reordering exactly; use greedy or sampling"
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedFeatureError(
            "crop is not supported by kvcompress caches (evicted tokens cannot be restored), so assisted/speculative "
            "decoding and DoLa cannot use them"
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.positions = self.positions[indices]

    # kvcompress ---------------------------------------------------------------------------------------------
    @property
    def stored_slots(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    @property
    def valid(self) -> torch.Tensor:
        """(B, S) bool: slots that hold a real kept token."""
        return self.positions >= 0

    def prepare_attention(self, query, key, position_ids, new_padding):
        """Called by the core before the kernel. Marks new pads, re-rotates in positions="cache" mode.

        Args:
            query: (B, Hq, q, d) rotated by the model at `position_ids` (B, q).
            key: (B, Hkv, S, d), this layer's `keys` as returned by `update`.
            new_padding: (B, q) bool, True for real tokens, or None.

        Returns:
            (query, key, positions (B, S)) for the mask and the kernel.
        """
        q_len = self.new_tokens
        if new_padding is not None and not bool(new_padding.all()):
            self.positions[:, -q_len:].masked_fill_(~new_padding.to(self.positions.device), -1)
            self.dense = False
        if self._cache.position_mode == "cache":
            if position_ids is None:
                raise RuntimeError("positions='cache' needs the model to pass position_ids to its attention")
            position_ids = position_ids.expand(query.shape[0], -1)
            rope = self._cache.rope
            self.keys[..., -q_len:, :] = rope.unrotate(self.keys[..., -q_len:, :], position_ids)
            cache_positions = (self.valid.cumsum(dim=-1) - 1).clamp(min=0)
            key = rope.rotate(self.keys, cache_positions)
            query = rope.rotate(rope.unrotate(query, position_ids), cache_positions[:, -q_len:])
        return query, key, self.positions

    def finish_forward(self) -> None:
        """Called by the core after the kernel: apply the strategy's eviction."""
        self.awaiting_attention = False
        if not self._cache.evicts:
            return
        keep = self._cache.select(self) & self.valid
        self.keep_only(keep)

    def keep_only(self, keep: torch.Tensor) -> None:
        """Drop every slot where `keep` (B, S) is False; kept slots stay in stream order."""
        counts = keep.sum(dim=-1)
        width = int(counts.max()) if counts.numel() else 0
        if width == keep.shape[-1] and bool(keep.all()):
            return
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]  # kept slots first
        positions = self.positions.gather(-1, order)
        filled = torch.arange(width, device=keep.device) < counts.unsqueeze(-1)
        self.positions = positions.masked_fill(~filled, -1)
        if bool((order == order[:1]).all()):  # every row keeps the same slots: one index_select, no gather
            self.keys = self.keys.index_select(2, order[0])
            self.values = self.values.index_select(2, order[0])
        else:
            index = order[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
            self.keys = self.keys.gather(2, index)
            self.values = self.values.gather(2, index)
        self.dense = False


class CompressedCache(Cache):
    """A transformers `Cache` that keeps, per layer and batch row, the tokens its strategy selects.

    Subclasses implement `select`. Building one switches `model` to the kvcompress attention core
    (`attn_implementation="kvcompress"`), which gives the same results as SDPA for any cache.

    Args:
        model: a decoder-only causal LM (`AutoModelForCausalLM`) using transformers' AttentionInterface.
        positions: "original" (keys keep the RoPE rotation of their text position; default) or "cache" (keys are
            re-rotated at their rank among the kept tokens, as in StreamingLLM, so text longer than the model's
            context can be streamed).
    """

    evicts = True  # False: never call `select` (FullCache)
    needs_token_ids = False  # True: record the input ids of every forward (anchors, label words)
    uses_budget = False  # True: `for_budget` sizes the cache to the budget (the bench sweeps budgets for it)

    def __init__(self, model: PreTrainedModel, *, positions: str = "original"):
        check_causal_lm(model)
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        self.position_mode = positions
        self.rope = RotaryPositions(model) if positions == "cache" else None
        config = model.config.get_text_config(decoder=True)
        super().__init__(layers=[CompressedLayer(self, i) for i in range(config.num_hidden_layers)])
        self.token_ids: torch.Tensor | None = None  # (B, seen) when needs_token_ids
        self._forward_ids: torch.Tensor | None = None
        self._model_ref = weakref.ref(model)
        self._hook = _install_ids_hook(model, self) if self.needs_token_ids else None
        attention.enable(model)

    @property
    def is_croppable(self) -> bool:
        """Evicted tokens cannot be restored, so `crop` (assisted decoding, DoLa) is refused."""
        return False

    @classmethod
    def for_budget(cls, model, tokenizer, budget: int | None) -> CompressedCache:
        """A cache for the bench: keep at most `budget` tokens per row (None: the strategy's own default).

        Strategies whose size is not a budget (`uses_budget = False`: full, anchors) ignore `budget`; those that
        cannot be built from a model alone (label words) raise ValueError.
        """
        return cls(model)

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        """Which slots of `layer` to keep after the current forward.

        Args:
            layer: its `positions` (B, S) (-1 = empty), `keys`/`values` (B, Hkv, S, d), `seen`, `new_tokens`,
                `layer_idx`; `self.token_ids` (B, seen) when `needs_token_ids`.

        Returns:
            (B, S) bool, True = keep. Empty slots are dropped whatever is returned.
        """
        raise NotImplementedError

    def clone(self) -> CompressedCache:
        """An independent copy (tensors copied, its own token-id hook), e.g. to answer many queries from one
        compressed prefix without recomputing it. `copy.deepcopy(cache)` does the same."""
        new = copy.copy(self)
        shared = {"layers", "_hook", "_model_ref", "rope"}
        for name, value in vars(self).items():
            if name not in shared:
                setattr(new, name, copy.deepcopy(value))
        new.layers = []
        for layer in self.layers:
            twin = copy.copy(layer)
            twin._cache = weakref.proxy(new)
            for name in ("keys", "values", "positions"):
                tensor = getattr(layer, name)
                setattr(twin, name, None if tensor is None else tensor.clone())
            new.layers.append(twin)
        model = self._model_ref()
        if self.needs_token_ids:
            if model is None:
                raise RuntimeError("the model of this cache is gone; cannot clone a cache that records token ids")
            new._hook = _install_ids_hook(model, new)
        return new

    def __deepcopy__(self, memo) -> CompressedCache:
        return self.clone()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.token_ids is not None:
            self.token_ids = self.token_ids.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.token_ids is not None:
            self.token_ids = self.token_ids[indices]

    # token ids ------------------------------------------------------------------------------------------------
    def _record_token_ids(self, batch: int, q_len: int) -> None:
        if not self.needs_token_ids:
            return
        ids = self._forward_ids
        self._forward_ids = None
        if ids is None or ids.shape != (batch, q_len):
            raise ValueError(
                f"{type(self).__name__} chooses tokens by id, but this forward's input ids were not seen "
                "(pass input_ids, not inputs_embeds)"
            )
        ids = ids.to(self.layers[0].positions.device)
        self.token_ids = ids if self.token_ids is None else torch.cat([self.token_ids, ids], dim=-1)

    def ids_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Token ids (B, S) at stream `positions` (B, S); -1 where the position is -1."""
        ids = self.token_ids.gather(-1, positions.clamp(min=0))
        return ids.masked_fill(positions < 0, -1)

    # reporting ----------------------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of key and value storage held now, over all layers (empty row slots included)."""
        return sum(
            layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized
        )

    def kept_counts(self) -> torch.Tensor:
        """(L, B) long: kept tokens per layer and row."""
        return torch.stack([layer.valid.sum(dim=-1) for layer in self.layers])

    def kept_positions(self, layer_idx: int = 0) -> list[list[int]]:
        """Stream positions kept by `layer_idx`, one sorted list per row."""
        positions = self.layers[layer_idx].positions
        return [row[row >= 0].tolist() for row in positions]

    def reset(self) -> None:
        super().reset()
        self.token_ids = None
        self._forward_ids = None


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_causal_lm(model) -> None:
    """Raise TypeError unless the kvcompress core can serve every layer of `model` exactly.

    Refused: anything but a decoder-only transformers causal LM; models whose attention does not go through
    transformers' AttentionInterface (Mamba and other state-space models, older architectures); hybrid models
    whose `config.layer_types` include anything but full and sliding-window attention (linear attention, conv,
    chunked, indexed ...); attention-logit soft-capping (Gemma 2), which the core's kernels do not apply; layers
    that reuse another layer's KV (Gemma 3n / Gemma 4 KV sharing).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if model.config.is_encoder_decoder or name not in causal_classes:
        raise TypeError(f"kvcompress caches need a decoder-only causal LM (AutoModelForCausalLM); got {name}")
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(
            f"{name} does not run its attention through transformers' AttentionInterface (state-space models such as "
            "Mamba keep no per-token KV cache; older architectures have their own attention code), so kvcompress "
            "caches cannot drive it"
        )
    config = model.config.get_text_config(decoder=True)
    other_types = sorted(set(getattr(config, "layer_types", None) or ()) - set(SUPPORTED_LAYER_TYPES))
    if other_types:
        raise TypeError(
            f"{name} has layers of type {other_types}; kvcompress caches support only {list(SUPPORTED_LAYER_TYPES)} "
            "layers (hybrid linear-attention / state-space / chunked models are not supported)"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise TypeError(
            f"{name} uses attn_logit_softcapping={config.attn_logit_softcapping}; the kvcompress core does not "
            "apply attention-logit soft-capping, so its results would be wrong"
        )
    if getattr(config, "num_kv_shared_layers", 0) or "reuse" in (getattr(config, "kv_sharing_modes", None) or ()):
        raise TypeError(f"{name} shares KV between layers, which kvcompress caches do not support")


def _install_ids_hook(model: PreTrainedModel, cache: CompressedCache):
    """Forward pre-hook on the input embeddings that hands each forward's input ids to `cache`; removed when
    the cache is garbage-collected."""
    cache_ref = weakref.ref(cache)

    def record(module, args):
        target = cache_ref()
        if target is not None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            target._forward_ids = args[0]

    handle = model.get_input_embeddings().register_forward_pre_hook(record)
    weakref.finalize(cache, handle.remove)
    return handle
