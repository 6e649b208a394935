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
from .validate import as_int

POSITION_MODES = ("original", "cache")
# transformers 5.24 renamed `past_key_values` to `cache` in forward and generate (the old name still works there,
# with a deprecation warning from generate). Internal calls use `**cache_arg(cache)` to be silent on both sides.
CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_arg(cache: Cache) -> dict:
    """`{"cache": cache}` on transformers >= 5.24, `{"past_key_values": cache}` before."""
    return {CACHE_ARG: cache}


class UnsupportedFeatureError(NotImplementedError):
    """A transformers feature that a compressing cache cannot serve exactly (crop, ...)."""


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
            self._cache._check_attached()
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
        """Beam search: row r becomes old row `beam_idx[r]` (keys, values and positions move together, so the
        eviction state of a beam follows it exactly)."""
        self.batch_select_indices(beam_idx)

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
            indices = indices.to(self.keys.device)
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.positions = self.positions[indices]

    def __getstate__(self) -> dict:
        state = dict(vars(self))
        state.pop("_cache", None)  # a weak proxy; the owning cache restores it (CompressedCache.__setstate__)
        return state

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
        self._hooks = _install_hooks(model, self)
        attention.enable(model)

    @property
    def is_croppable(self) -> bool:
        """Evicted tokens cannot be restored, so `crop` (assisted decoding, DoLa) is refused."""
        return False

    @classmethod
    def for_budget(cls, model, tokenizer, budget: int | None) -> CompressedCache:
        """A cache for the bench: keep at most `budget` tokens per row (None: the strategy's own default).

        `budget` is validated here for every strategy: None or an integral number >= 1 (int, numpy integer, 0-d
        integer tensor; not bool, not a float, even 8.0: a kept fraction must be resolved to tokens first), else
        ValueError quoting `budget`. Then `_from_budget` (the per-strategy hook) maps the valid budget to the
        strategy's parameters. Strategies whose size is not a budget (`uses_budget = False`: full, anchors) ignore
        it; those that cannot be built from a model alone (label words) raise ValueError.
        """
        if budget is not None:
            budget = as_int(budget, "budget", minimum=1)
        return cls._from_budget(model, tokenizer, budget)

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None) -> CompressedCache:
        """Strategy hook of `for_budget`: `budget` is None or an int >= 1."""
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
        """An independent copy (tensors copied, its own hooks on the model), e.g. to answer many queries from one
        compressed prefix without recomputing it. `copy.deepcopy(cache)` does the same. The hooks of a clone are
        removed when the clone is garbage-collected."""
        new = object.__new__(type(self))  # not copy.copy: __getstate__/__setstate__ are for pickling only
        new.__dict__.update(vars(self))
        shared = {"layers", "_hooks", "_model_ref", "rope"}
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
        model = None if self._model_ref is None else self._model_ref()
        if self._model_ref is not None and model is None and self.needs_token_ids:
            raise RuntimeError("the model of this cache is gone; cannot clone a cache that records token ids")
        new._hooks = [] if model is None else _install_hooks(model, new)
        return new

    def __deepcopy__(self, memo) -> CompressedCache:
        return self.clone()

    # pickling --------------------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Everything but the link to the model (weak reference, hooks, rotary module): a pickled or
        `torch.save`d cache comes back detached; `attach(model)` reconnects it before use."""
        state = dict(vars(self))
        state.update(_model_ref=None, _hooks=[], rope=None, _forward_ids=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for layer in self.layers:
            layer._cache = weakref.proxy(self)

    def attach(self, model: PreTrainedModel) -> CompressedCache:
        """Connect this cache to `model` (after `pickle.loads` / `torch.load`, or to move it to another instance of
        the same model): installs its hooks and switches `model` to the kvcompress core. Returns the cache.

        Raises ValueError if `model` has a different number of layers than the cache.
        """
        check_causal_lm(model)
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        if layers != len(self.layers):
            raise ValueError(f"this cache has {len(self.layers)} layers but the model given to attach() has {layers}")
        for handle in self._hooks:
            handle.remove()
        self._model_ref = weakref.ref(model)
        self._hooks = _install_hooks(model, self)
        self.rope = RotaryPositions(model) if self.position_mode == "cache" else None
        attention.enable(model)
        return self

    def _check_attached(self) -> None:
        if self._model_ref is None:
            raise RuntimeError(
                f"this {type(self).__name__} was unpickled (or torch.load-ed) without its model; call "
                "cache.attach(model) before using it"
            )

    # batch rows ------------------------------------------------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row r becomes old row `beam_idx[r]`. Everything a row owns moves with it (keys, values,
        positions, token ids, the strategy's per-row state via `_reindex_rows`), so each beam is evicted exactly as
        a batch-1 cache fed that beam's tokens would be."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.layers[0].positions.shape[0] if self.layers[0].is_initialized else None
        super().batch_repeat_interleave(repeats)
        if rows is not None:
            self._reindex_rows(torch.arange(rows).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._reindex_rows(indices)

    def _reindex_rows(self, index: torch.Tensor) -> None:
        """Strategy hook: new row r is old row `index[r]` ((B_new,) long). Strategies with per-row state beyond
        the layers (memos, per-row tables) extend this and call super()."""
        if self.token_ids is not None:
            self.token_ids = self.token_ids[index.to(self.token_ids.device)]

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

    def _check_forward_input(self, args: tuple, kwargs: dict) -> None:
        """Refuse, before the model runs, a forward of this cache with no new token or whose 2-D attention_mask
        does not cover the tokens already held plus the new ones (not a continuation of this cache).

        Detected: an empty input; `generate` with a used cache and a new prompt not longer than the tokens the
        cache has seen (generate then feeds nothing, or a tail of the prompt, or the whole prompt again), through
        the mask length or, when generate dropped an all-ones mask, through position_ids placed before the cache's
        tokens. Not detectable, for any cache: a new prompt LONGER than what the cache has seen (generate feeds only
        its tail, which looks like a continuation; the ids of the rest never reach the model), and direct calls
        with neither attention_mask nor position_ids.
        """
        ids = kwargs.get("input_ids", args[0] if args else None)
        inputs = ids if ids is not None else kwargs.get("inputs_embeds")
        if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2:
            return
        name, q_len, seen = "input_ids" if ids is not None else "inputs_embeds", inputs.shape[1], self.get_seq_length()
        fix = "For a new prompt use a fresh cache or cache.reset()."
        if q_len == 0 and seen == 0:
            raise ValueError(f"empty input: {name} has shape {tuple(inputs.shape)}; give at least one token")
        if q_len == 0:
            raise ValueError(
                f"this {type(self).__name__} already holds {seen} tokens and this forward brings no new token: "
                f"generate() feeds only the prompt tokens past the {seen} the cache has seen, so a prompt of at most "
                f"{seen} tokens is not a continuation of it. {fix}"
            )
        mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        not_continuation = f"the input is not a continuation of this cache (e.g. generate() with a new prompt not " \
            f"longer than {seen} tokens). {fix}"
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[-1] != seen + q_len:
            raise ValueError(
                f"this {type(self).__name__} already holds {seen} tokens, so {q_len} new tokens need an "
                f"attention_mask of {seen + q_len} columns (past + new), but the attention_mask covers "
                f"{mask.shape[-1]} tokens: {not_continuation}"
            )
        # generate() drops an all-ones mask but always passes position_ids; without padding a continuation's
        # positions are seen, seen + 1, ...: new tokens all placed before what the cache holds overlap it.
        if mask is None and seen and isinstance(position_ids, torch.Tensor) and position_ids.numel() \
                and int(position_ids.max()) < seen:
            raise ValueError(
                f"this {type(self).__name__} already holds {seen} tokens, but this forward's position_ids are "
                f"{int(position_ids.min())}..{int(position_ids.max())}: {not_continuation}"
            )

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


def _install_hooks(model: PreTrainedModel, cache: CompressedCache) -> list:
    """Hooks tying `cache` to the forwards of `model`; removed when the cache is garbage-collected.

    - A forward pre-hook on `model.base_model` (the module owning the input embeddings, so a direct call of the
      base model is covered too): at the start of EVERY forward it drops ids recorded by an earlier forward (ids
      belong to the forward that uses them: a forward with `inputs_embeds` then fails with "pass input_ids"), and
      when the forward uses this cache it checks the input (`_check_forward_input`).
    - `needs_token_ids`: a forward pre-hook on the input embeddings handing the forward's input ids to `cache`.
    """
    cache_ref = weakref.ref(cache)

    def start(module, args, kwargs):
        target = cache_ref()
        if target is not None:
            target._forward_ids = None
            if any(kwargs.get(name) is target for name in ("past_key_values", "cache")):
                target._check_forward_input(args, kwargs)

    def record(module, args):
        target = cache_ref()
        if target is not None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            target._forward_ids = args[0]

    handles = [model.base_model.register_forward_pre_hook(start, with_kwargs=True)]
    if cache.needs_token_ids:
        handles.append(model.get_input_embeddings().register_forward_pre_hook(record))
    for handle in handles:
        weakref.finalize(cache, handle.remove)
    return handles
