"""`CompressedCache`: a transformers `Cache` whose eviction policy is a strategy.

A strategy subclasses `CompressedCache` and implements `select(layer) -> keep`; everything else (storage,
positions, padding, token ids, rotary re-positioning, the contract with `generate`) lives here, in
`kvcompress.layer` (one layer's slots) and in `kvcompress.model_checks` (what a cache can serve).

Contract with transformers (5.x), found by experiment (see DESIGN.md):
- `get_seq_length()` is the number of tokens SEEN (fed), not stored: `generate` and the model derive position
  ids and input slicing from it.
- `update()` returns the keys kept before this forward plus ALL new keys; eviction runs after the attention of
  that layer (`finish_forward`, called by the attention core).
- The mask is not built by transformers: the core builds it per layer from `CompressedLayer.positions`.

Storage per layer (`CompressedLayer`): key/value slots (B, Hkv, C, d) that never move, and the stream position of
each slot (B, 1 or Hkv, C), -1 for a free slot. New tokens are written into free slots, eviction frees slots, and
the mask is built from positions, so slot order does not matter. Rows (and, for per-head strategies, kv heads)
may keep different numbers of tokens.
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
import transformers
from packaging.version import Version
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from . import attention, registry
from .layer import CompressedLayer
from .model_checks import UnsupportedFeatureError, check_causal_lm, check_quantizable
from .rope import RotaryPositions
from .validate import as_int

# CompressedLayer and UnsupportedFeatureError stay importable from here (their home until 2026-12-02)
__all__ = ["CACHE_ARG", "MODEL_LINKS", "CompressedCache", "CompressedLayer", "UnsupportedFeatureError", "cache_arg",
           "prepare"]

POSITION_MODES = ("original", "cache")
# transformers 5.24 renamed `past_key_values` to `cache` in forward and generate (the old name still works there,
# with a deprecation warning from generate). Internal calls use `**cache_arg(cache)` to be silent on both sides.
CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


# attributes of a CompressedCache that tie it to its model (hooks, weak reference, rotary module) or hold its layers:
# never copied as state by `clone` / `copy_state_into`, never a setting (`shared_prefill`)
MODEL_LINKS = frozenset({"layers", "_hooks", "_model_ref", "rope"})


def cache_arg(cache: Cache) -> dict:
    """`{"cache": cache}` on transformers >= 5.24, `{"past_key_values": cache}` before."""
    return {CACHE_ARG: cache}


class CompressedCache(Cache):
    """A transformers `Cache` that keeps, per layer and batch row, the tokens its strategy selects.

    Subclasses implement `select`. Building one switches `model` to the kvcompress attention core
    (`attn_implementation="kvcompress"`), which gives the same results as SDPA for any cache.

    Args:
        model: a decoder-only causal LM (`AutoModelForCausalLM`) using transformers' AttentionInterface.
        positions: "original" (keys keep the RoPE rotation of their text position; default) or "cache" (keys are
            re-rotated at their rank among the kept tokens, as in StreamingLLM, so text longer than the model's
            context can be streamed; refused with a ValueError by strategies that keep different tokens per kv
            head, `supports_cache_positions = False`).
    """

    evicts = True  # False: never call `select` (FullCache)
    # What `select` observes (computed by the core, `layer.observation`, see `attention.Observation`):
    observe_queries = False  # the forward's queries (B, Hq, q, d)
    observe_window = 0  # w > 0: probabilities of the forward's last w queries over the slots (B, Hq, w, S)
    observe_received = False  # attention each slot received, summed over the forward's queries (B, Hq, S)
    observe_max_received = False  # largest attention each slot received from any of the forward's queries (B, Hq, S)
    needs_token_ids = False  # True: record the input ids of every forward (anchors, label words)
    deferred_settings: tuple[str, ...] = ()  # attributes its own forward hooks read (`prefill_shared` groups by them)
    uses_budget = False  # True: `for_budget` sizes the cache to the budget (the bench sweeps budgets for it)
    layout: str | None = None  # key/value storage (kvcompress.storage): "dense" or "paged"; None: storage_layout()
    page_size = 16  # slots per page of the paged layout
    kv_bits: int | None = None  # quantized storage (`set_storage`): 8, 4 or 2 bits; None: the model's dtype
    residual = 128  # quantized storage: newest tokens per lane kept in full precision
    group = 32  # quantized storage: tokens per key group (= page), channels per value group
    evicted: str | int = "drop"  # "drop", or 4 / 2: what the strategy frees is kept at that precision (MiKV)
    # False for strategies that keep different tokens per kv head: positions="cache" re-rotates one token set
    # shared by every kv head (a rank within the cache per row), so they accept only positions="original"
    supports_cache_positions = True
    # during the one forward of `prefill_shared`: {observation key: cache} of the other caches sharing it (the core
    # computes their observations too); the layers keep the observations and evict later. None otherwise.
    _deferring: dict | None = None

    def max_received_scope(self, kv_positions: torch.Tensor) -> torch.Tensor | None:
        """The keys over which `observe_max_received` normalises each query's probabilities: None (default) for
        every key the query sees (the model's own softmax); else a bool (B, Hp, K) over the slots the core attends
        (`kv_positions`: their stream positions, -1 for free or pad slots). A query's probability of a key in scope
        is then its attention renormalised over the scope's keys it sees; keys out of scope observe 0. KVzip's
        `normalize="chunk"` (the paper's chunked scoring) scopes to the sinks, the chunk reconstructed and the
        forward's own tokens."""
        return None

    def __init_subclass__(cls, **kwargs):
        """Every strategy's constructor also takes the storage options (`set_storage`: kv_bits, residual, group)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_takes_storage", False):
            return

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            storage = {name: kwargs.pop(name) for name in STORAGE_OPTIONS if name in kwargs}
            init(self, *args, **kwargs)
            if storage:
                self.set_storage(**storage)

        __init__._takes_storage = True
        cls.__init__ = __init__

    def __init__(self, model: PreTrainedModel | None, *, positions: str = "original"):
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if positions == "cache" and not self.supports_cache_positions:
            supporting = ", ".join(n for n in registry.available() if registry.get(n).supports_cache_positions)
            raise ValueError(
                f"{getattr(type(self), 'strategy_name', type(self).__name__)} does not support positions='cache': it "
                "keeps different tokens per kv head, and positions='cache' re-rotates one token set shared by all "
                f"kv heads; use positions='original' (the default). Strategies that support positions='cache': "
                f"{supporting}"
            )
        self.position_mode = positions
        self.token_ids: torch.Tensor | None = None  # (B, seen) when needs_token_ids
        self._forward_ids: torch.Tensor | None = None
        self._in_forward = False  # a forward of the model using this cache is running (set by the hooks)
        self._owner_forward = False  # set by the model's pre-hook when its forward uses this cache
        self._model_ref, self._hooks, self.rope = None, [], None
        if model is None:  # unbound: layers are made when a prepared model first uses it (`attach`)
            super().__init__(layers=[])
            return
        check_causal_lm(model)
        config = model.config.get_text_config(decoder=True)
        super().__init__(layers=[CompressedLayer(self, i) for i in range(config.num_hidden_layers)])
        self._connect(model)

    @property
    def is_bound(self) -> bool:
        """False for a cache built without a model that no model has used yet."""
        return bool(self.layers)

    def _connect(self, model: PreTrainedModel) -> None:
        self._model_ref = weakref.ref(model)
        self._hooks = _install_hooks(model, self)
        self.rope = RotaryPositions(model) if self.position_mode == "cache" else None
        attention.enable(model)

    def _bind(self, model: PreTrainedModel) -> None:
        """Strategy hook: resolve what a cache built without a model takes from the model (called by `attach` on an
        unbound cache, before its layers are made). Raise ValueError when `model` cannot serve this cache."""

    def _require_bound(self) -> None:
        if not self.is_bound:
            raise RuntimeError(
                f"this {type(self).__name__} was built without a model and the model using it was not prepared for "
                f"that: load the model with kvcompress.models.load_model, or call kvcompress.prepare(model) once, or "
                f"build the cache with the model ({type(self).__name__}(model, ...))"
            )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if self.is_bound else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        self._require_bound()
        return super().get_mask_sizes(query_length, layer_idx)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._require_bound()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        """Evicted tokens cannot be restored, so `crop` (assisted decoding, DoLa) is refused."""
        return False

    @classmethod
    def for_budget(cls, model, tokenizer, budget: int | None, **options) -> CompressedCache:
        """A cache for the bench: keep at most `budget` tokens per row (None: the strategy's own default).

        `budget` is validated here for every strategy: None or an integral number >= 1 (int, numpy integer, 0-d
        integer tensor; not bool, not a float, even 8.0: a kept fraction must be resolved to tokens first), else
        ValueError quoting `budget`. Then `_from_budget` (the per-strategy hook) maps the valid budget to the
        strategy's parameters. Strategies whose size is not a budget (`uses_budget = False`: full, anchors) ignore
        it; those that cannot be built from a model alone (label words) raise ValueError. `options`: the storage
        options (kv_bits, residual, group) go to `set_storage`; the others to the strategy's `_from_budget` when it
        takes keyword options (e.g. KVzip's `allocation`), else ValueError naming them.
        """
        if budget is not None:
            budget = as_int(budget, "budget", minimum=1)
        storage = {k: options.pop(k) for k in STORAGE_OPTIONS if k in options}
        if options and not _takes_options(cls._from_budget):
            raise ValueError(f"{cls.__name__} takes no options {sorted(options)} with a budget")
        cache = cls._from_budget(model, tokenizer, budget, **options)
        return cache.set_storage(**storage) if storage else cache

    @classmethod
    def _from_budget(cls, model, tokenizer, budget: int | None) -> CompressedCache:
        """Strategy hook of `for_budget`: `budget` is None or an int >= 1."""
        return cls(model)

    def select(self, layer: CompressedLayer) -> torch.Tensor:
        """Which slots of `layer` to keep after the current forward.

        Args:
            layer: `positions` (B, Hp, S) stream positions (-1 = free), `valid` (B, Hp, S),
                `stream_rank()` (B, Hp, S), `keys`/`values` (B, Hkv, C, d) (slots [0, S) are attended), `seen`,
                `new_tokens`, `new_slot_mask()`, `slot_state(...)`, `layer_idx`; `self.token_ids` (B, seen) when
                `needs_token_ids`; `observation` (`attention.Observation`) for strategies that declare
                `observe_queries` / `observe_window` / `observe_received` / `observe_max_received`. Slot order is
                not stream order: rank by `stream_rank()`, not by slot index.

        Returns:
            (B, 1, S) bool (the same tokens for every kv head) or (B, Hkv, S) bool (per kv head); True = keep.
            Free slots stay free whatever is returned.
        """
        raise NotImplementedError

    def evict(self, layer: CompressedLayer) -> None:
        """Apply the strategy to `layer` after its attention: free every slot `select` does not keep. A strategy may
        override this with a faster path (e.g. for decode steps) that must free exactly what `select` would."""
        layer.keep_only(self.select(layer))

    def set_storage(self, kv_bits: int | None = None, residual: int = 128, group: int = 32,
                    evicted: str | int = "drop") -> CompressedCache:
        """Key/value storage, before the cache's first forward (every strategy's constructor also takes these).

        Args:
            kv_bits: None (the model's dtype, the default), or 8, 4 or 2: keys quantized per channel and values per
                token in groups (KIVI layout, `kvcompress.storage.QuantizedKV`), except each (row, kv head)'s newest
                `residual` tokens; works with every strategy (eviction, per-head slots, beam search, clone, pickle).
            residual: newest tokens kept in full precision per row and kv head (>= 0).
            group: tokens per key quantization group, and channels per value group (>= 1; must divide the head
                dimension).
            evicted: "drop" (default: what the strategy frees is gone) or 4 / 2: demote instead of drop (MiKV, Yang
                et al. 2024): every pair the strategy frees is kept quantized at that many bits (no full-precision
                window) and still attended by every later query; the strategy's own budget counts only what it
                keeps (`kvcompress.storage.DemotedKV`). Not with positions="cache".

        Returns the cache. ValueError naming the parameter for bad values.
        """
        if kv_bits is not None and (isinstance(kv_bits, bool) or kv_bits not in QUANTIZED_BITS):
            raise ValueError(f"kv_bits must be None or one of {QUANTIZED_BITS}, got {kv_bits!r}")
        residual = as_int(residual, "residual", minimum=0)
        group = as_int(group, "group", minimum=1)
        if evicted != "drop" and (isinstance(evicted, bool) or evicted not in (4, 2)):
            raise ValueError(f"evicted must be 'drop', 4 or 2, got {evicted!r}")
        if evicted != "drop" and self.position_mode == "cache":
            raise ValueError("evicted=4|2 (demoted pairs) is not supported with positions='cache'")
        if any(layer.is_initialized for layer in self.layers):
            raise RuntimeError("set_storage must be called before the cache's first forward")
        model = self._model_ref() if self._model_ref is not None else None
        if (kv_bits is not None or evicted != "drop") and model is not None:
            check_quantizable(model, group)
        self.kv_bits, self.residual, self.group, self.evicted = kv_bits, residual, group, evicted
        return self

    def storage_layout(self) -> str:
        """The key/value layout of the layers: `layout` when set, else the strategy's default ("dense"; strategies
        whose kv heads keep different counts choose "paged", so the memory held follows the pairs kept)."""
        return self.layout or "dense"

    def before_forward(self, args: tuple, kwargs: dict) -> None:
        """Strategy hook: called before every forward of the model that uses this cache, with the base model's
        arguments (input ids, attention_mask, position_ids, ...), after the input checks."""

    def after_forward(self) -> None:
        """Strategy hook: called after every forward of the model that used this cache, once every layer has
        attended and evicted (e.g. to compress across layers, or to run forwards of its own: KVzip)."""

    def prepare_deferred(self) -> None:
        """Strategy hook of `kvcompress.shared_prefill.prefill_shared`, called once after its shared forward (whose
        `after_forward` is not called): the budget-independent part of `after_forward` (e.g. KVzip's reconstruction
        scores), which every cache sharing the forward then inherits. Default: nothing."""

    def finish_deferred(self) -> None:
        """Strategy hook of `prefill_shared`, called on each cache sharing the forward after its layers applied
        their deferred eviction: the rest of `after_forward`. Default: `after_forward()` (all of it)."""
        self.after_forward()

    def copy_state_into(self, target: CompressedCache, keep: set[str]) -> None:
        """Make `target` (a cache of the same class on the same model) hold a copy of this cache's state: every
        attribute is copied (tensors cloned, layers copied) except the link to the model (`target` keeps its own
        hooks) and the attributes named in `keep` (`target`'s settings, e.g. its budget)."""
        for name, value in vars(self).items():
            if name not in MODEL_LINKS and name not in keep:
                setattr(target, name, copy.deepcopy(value))
        target.layers = [layer.copy_for(target) for layer in self.layers]

    def clone(self) -> CompressedCache:
        """An independent copy (tensors copied, its own hooks on the model), e.g. to answer many queries from one
        compressed prefix without recomputing it. `copy.deepcopy(cache)` does the same. The hooks of a clone are
        removed when the clone is garbage-collected."""
        new = object.__new__(type(self))  # not copy.copy: __getstate__/__setstate__ are for pickling only
        new.__dict__.update(vars(self))
        for name, value in vars(self).items():
            if name not in MODEL_LINKS:
                setattr(new, name, copy.deepcopy(value))
        new.layers = [layer.copy_for(new) for layer in self.layers]
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
        state.update(_model_ref=None, _hooks=[], rope=None, _forward_ids=None, _owner_forward=False)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for layer in self.layers:
            layer._cache = weakref.proxy(self)

    def attach(self, model: PreTrainedModel) -> CompressedCache:
        """Connect this cache to `model` (after `pickle.loads` / `torch.load`, to move it to another instance of the
        same model, or to bind a cache built without a model): installs its hooks and switches `model` to the
        kvcompress core. Returns the cache.

        Raises ValueError if `model` has a different number of layers than the cache, or (unbound cache) cannot
        serve it.
        """
        check_causal_lm(model)
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        if not self.is_bound:
            self._bind(model)
            self.layers = [CompressedLayer(self, i) for i in range(layers)]
        if layers != len(self.layers):
            raise ValueError(f"this cache has {len(self.layers)} layers but the model given to attach() has {layers}")
        for handle in self._hooks:
            handle.remove()
        self._connect(model)
        return self

    def _check_attached(self) -> None:
        """Called at the start of every forward through this cache (layer 0's update): the cache must be attached,
        and the forward must be its model's (whose pre-hook marked it), not another model's."""
        if self._model_ref is None:
            raise RuntimeError(
                f"this {type(self).__name__} was unpickled (or torch.load-ed) without its model; call "
                "cache.attach(model) before using it"
            )
        owner_forward, self._owner_forward = self._owner_forward, False
        if not owner_forward:
            raise ValueError(
                f"this {type(self).__name__} belongs to another model: it was built for (or attached to) a different "
                "model instance than the one running this forward, and its hooks (input checks, token ids) sit on "
                "that model. Build a new cache for this model, or move this one with cache.attach(model)"
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
        if kwargs.get("use_cache") is False:
            raise ValueError(
                f"use_cache=False with a {type(self).__name__}: the model still writes every forward into the cache, "
                "while generate() then assumes no cache and feeds the whole sequence again at every step (the second "
                "token would attend to the prompt twice). Pass use_cache=True (the default) to use the cache, or no "
                "cache with use_cache=False"
            )
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
        """Token ids at stream `positions` ((B, S) or (B, H, S)), same shape; -1 where the position is -1."""
        table = self.token_ids
        if positions.ndim == 3:
            table = table.unsqueeze(1).expand(-1, positions.shape[1], -1)
        ids = table.gather(-1, positions.clamp(min=0))
        return ids.masked_fill(positions < 0, -1)

    # reporting ----------------------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of key and value storage allocated now, over all layers (free slots included)."""
        return sum(layer.store.nbytes() + (layer.demoted.nbytes() if layer.demoted is not None else 0)
                   for layer in self.layers if layer.is_initialized)

    def kv_bytes_used(self) -> int:
        """Bytes of the keys and values of kept tokens, over all layers and kv heads (free slots excluded)."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            total += layer.store.used_bytes(layer._positions)
            if layer.demoted is not None:
                total += layer.demoted.used_bytes()
        return total

    def kept_counts(self) -> torch.Tensor:
        """(L, B) long: kept tokens per layer and row (the largest count over kv heads)."""
        return torch.stack([layer.valid.sum(dim=-1).amax(dim=-1) for layer in self.layers])

    def mean_kept_counts(self) -> torch.Tensor:
        """(L, B) float: kept tokens per layer and row, averaged over kv heads (with head-adaptive budgets, kvzip's
        global allocation or AdaKV, heads keep different counts; `kept_counts` gives the largest)."""
        return torch.stack([layer.valid.sum(dim=-1).double().mean(dim=-1) for layer in self.layers])

    def kept_positions(self, layer_idx: int = 0, head: int = 0) -> list[list[int]]:
        """Stream positions kept by `layer_idx` (kv head `head`), one sorted list per row."""
        positions = self.layers[layer_idx].positions
        positions = positions[:, min(head, positions.shape[1] - 1)]
        return [sorted(row[row >= 0].tolist()) for row in positions]

    def reset(self) -> None:
        super().reset()
        self.token_ids = None
        self._forward_ids = None


QUANTIZED_BITS = (8, 4, 2)
STORAGE_OPTIONS = ("kv_bits", "residual", "group", "evicted")


def check_distinct_caches(caches: list, name: str, model=None) -> None:
    """What the APIs taking several caches of one model (`prefill_shared`, `CacheGroup`) ask of them: at least one,
    each a `CompressedCache` bound to `model` (default: the first cache's), none twice. The errors name `name[i]`."""
    if not caches:
        raise ValueError(f"{name} must hold at least one cache")
    for i, cache in enumerate(caches):
        if not isinstance(cache, CompressedCache):
            raise TypeError(f"{name}[{i}] is a {type(cache).__name__}, not a kvcompress CompressedCache")
        if any(cache is other for other in caches[:i]):
            raise ValueError(f"{name}[{i}] appears twice in {name}")
        if not cache.is_bound or cache._model_ref is None:
            raise ValueError(f"{name}[{i}] has no model yet: build it with the model ({type(cache).__name__}(model, "
                             "...)), or attach it (cache.attach(model))")
        if model is None:
            model = cache._model_ref()
            if model is None:
                raise ValueError(f"{name}[{i}]'s model no longer exists (it was garbage-collected)")
        if cache._model_ref() is not model:
            raise ValueError(f"{name}[{i}] was built for another model")


def _takes_options(function) -> bool:
    import inspect

    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(function).parameters.values())


PREPARED = "_kvcompress_binds_caches"


def prepare(model: PreTrainedModel) -> PreTrainedModel:
    """Let caches built without a model (`AnchorCache()`) serve `model`: switches it to the kvcompress core (the same
    results as SDPA for any cache) and adds a forward pre-hook on its base model that binds such a cache (`attach`)
    the first time a forward uses it. Idempotent; `kvcompress.models.load_model` calls it. Returns `model`."""
    check_causal_lm(model)
    attention.enable(model)
    if getattr(model, PREPARED, False):
        return model

    def bind(module, args, kwargs):
        for name in ("past_key_values", "cache"):
            cache = kwargs.get(name)
            if isinstance(cache, CompressedCache) and not cache.is_bound:
                cache.attach(model)
                _start_forward(cache, args, kwargs)  # its own pre-hook was added during this call: not run now

    for owner in [model] if model.base_model is model else [model, model.base_model]:
        owner.register_forward_pre_hook(bind, with_kwargs=True)
    setattr(model, PREPARED, True)
    return model


def _start_forward(cache: CompressedCache, args: tuple, kwargs: dict) -> None:
    cache._forward_ids = None
    cache._in_forward = cache._owner_forward = any(kwargs.get(name) is cache for name in ("past_key_values", "cache"))
    if cache._in_forward:
        cache._check_forward_input(args, kwargs)
        cache.before_forward(args, kwargs)


def _install_hooks(model: PreTrainedModel, cache: CompressedCache) -> list:
    """Hooks tying `cache` to the forwards of `model`; removed when the cache is garbage-collected.

    - A forward pre-hook on `model` and on `model.base_model` (the module owning the input embeddings, so a direct
      call of the base model is covered too, and so are causal LMs whose forward bypasses the base model's): at the
      start of EVERY forward it drops ids recorded by an earlier forward (ids belong to the forward that uses them:
      a forward with `inputs_embeds` then fails with "pass input_ids"), marks whether the forward uses this cache (a
      cache used by another model's forward is refused in `_check_attached`), and if so checks the input
      (`_check_forward_input`) and calls `before_forward`.
    - A forward hook on `model.base_model` calling `after_forward` after a forward that used this cache (only for
      strategies that override `after_forward`).
    - `needs_token_ids`: a forward pre-hook on the input embeddings handing the forward's input ids to `cache`.
    """
    cache_ref = weakref.ref(cache)

    def start(module, args, kwargs):
        target = cache_ref()
        if target is not None:
            _start_forward(target, args, kwargs)

    def finish(module, args, output):
        target = cache_ref()
        if target is not None and getattr(target, "_in_forward", False):
            target._in_forward = False
            if target._deferring is None:  # prefill_shared runs the strategy's hooks itself
                target.after_forward()

    def record(module, args):
        target = cache_ref()
        if target is not None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            target._forward_ids = args[0]

    # on the model AND its base model: a direct call of the base model is covered, and so are causal LMs whose
    # forward bypasses the base model's own (OPT calls its decoder directly)
    owners = [model] if model.base_model is model else [model, model.base_model]
    handles = [owner.register_forward_pre_hook(start, with_kwargs=True) for owner in owners]
    if type(cache).after_forward is not CompressedCache.after_forward:
        handles.append(model.base_model.register_forward_hook(finish))
    if cache.needs_token_ids:
        handles.append(model.get_input_embeddings().register_forward_pre_hook(record))
    for handle in handles:
        weakref.finalize(cache, handle.remove)
    return handles
