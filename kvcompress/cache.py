"""`CompressedCache`: a transformers `Cache` whose eviction policy is a strategy.

A strategy subclasses `CompressedCache` and implements `select(layer) -> keep`; everything else (storage,
positions, padding, token ids, rotary re-positioning, the contract with `generate`) lives here.

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
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from . import attention, registry
from .rope import RotaryPositions
from .storage import DemotedKV, DenseKV, PagedKV, QuantizedKV, copy_in_layout
from .validate import as_int

POSITION_MODES = ("original", "cache")
GROWTH_DIVISOR = 8  # a full slot buffer grows by 1/GROWTH_DIVISOR of its capacity ...
GROWTH_MIN_SLOTS = 16  # ... and by at least this many slots (a page of the paged layout)
# transformers 5.24 renamed `past_key_values` to `cache` in forward and generate (the old name still works there,
# with a deprecation warning from generate). Internal calls use `**cache_arg(cache)` to be silent on both sides.
CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


# attributes of a CompressedCache that tie it to its model (hooks, weak reference, rotary module) or hold its layers:
# never copied as state by `clone` / `copy_state_into`, never a setting (`shared_prefill`)
MODEL_LINKS = frozenset({"layers", "_hooks", "_model_ref", "rope"})


def cache_arg(cache: Cache) -> dict:
    """`{"cache": cache}` on transformers >= 5.24, `{"past_key_values": cache}` before."""
    return {CACHE_ARG: cache}


class UnsupportedFeatureError(NotImplementedError):
    """A transformers feature that a compressing cache cannot serve exactly (crop, ...)."""


def _only_none(value, name: str) -> None:
    if value is not None:
        raise AttributeError(f"CompressedLayer.{name} is read from its store (layer.store); it cannot be assigned")


class CompressedLayer(CacheLayerMixin):
    """One layer's kept keys and values, in slots that never move.

    Storage (C = capacity, Hp = 1 or Hkv):
        store: the keys and values by logical slot (`kvcompress.storage`): `DenseKV` (B, Hkv, C, d) buffers, or
            `PagedKV` (per-(row, kv head) pages; the cache's `layout = "paged"`). In positions="cache" mode keys are
            stored before RoPE.
        keys, values: (B, Hkv, C, d) for a dense store (the buffers themselves); for a paged store the
            (B, Hkv, used, d) pairs of slots [0, used), gathered for the forward in flight (dropped after it).
        positions: (B, Hp, used) long view of the slot table (B, Hp, C): the stream position held by each slot,
            -1 for a free slot (evicted, a pad, or never written). Hp = 1 while every kv head keeps the same tokens
            (strategies that choose by position); it becomes Hkv the first time a strategy keeps different tokens per
            kv head.
        used: slots [used, C) are free in every row and head; attention reads slots [0, used).
        state: per-slot strategy state, name -> (B, 1 or Hkv, C) tensor, kept aligned with the slots through
            growth, compaction, batch selection, beam reordering and `clone`.

    New tokens are written in place into free slots (the lowest free slots of each row, after `used` when there
    are none below it); eviction only frees slots; kept keys never move, so a decode step copies nothing but the
    new token. Slot order is therefore NOT stream order: `stream_rank()` gives each slot's rank by position.
    The capacity grows geometrically when a forward needs more free slots (amortised O(1) append), and after a
    forward that leaves far fewer tokens than the capacity (a long prefill through a budgeted cache) the kept
    slots are compacted into a smaller buffer, so the memory is given back.

    Attributes:
        seen: tokens fed to this layer so far (per row, pads included).
        dense: True while slot i holds stream position i for every i < used in every row (nothing evicted, no
            pads): the core then skips building masks.
        new_tokens: tokens of the forward in flight (or the last one).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, cache: CompressedCache, layer_idx: int):
        super().__init__()
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self._positions: torch.Tensor | None = None
        self.store: DenseKV | PagedKV | None = None
        self.demoted: DemotedKV | None = None  # evicted=4|2: pairs the strategy freed, kept at low precision
        self._view: tuple[torch.Tensor, torch.Tensor] | None = None  # paged: the pairs gathered for this forward
        self.state: dict[str, torch.Tensor] = {}
        self.seen = 0
        self.used = 0
        self.dense = True
        self.holes = False  # some slot below `used` may be free in some row (False: none is)
        self.ordered = True  # valid slots are in stream order along the slot axis (no free slot was reused)
        self.new_tokens = 0
        self.new_slots: torch.Tensor | None = None  # (B, Hp, q) slots written by the last update; None: [used-q, used)
        self.awaiting_attention = False  # update() ran, the core's finish_forward() not yet
        self.observation: attention.Observation | None = None  # set by the core during finish_forward only
        # `prefill_shared`: the observations of a forward whose eviction is deferred, by `attention.observation_key`
        self.deferred: dict[tuple, attention.Observation | None] | None = None
        self.shared_observations: dict[tuple, attention.Observation | None] = {}  # set by the core while deferring

    @property
    def keys(self) -> torch.Tensor | None:
        return self._pairs()[0]

    @keys.setter
    def keys(self, value) -> None:
        _only_none(value, "keys")  # transformers' CacheLayerMixin.__init__ sets None; the store owns the tensors

    @property
    def values(self) -> torch.Tensor | None:
        return self._pairs()[1]

    @values.setter
    def values(self, value) -> None:
        _only_none(value, "values")

    def _pairs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.store is None:
            return None, None
        if isinstance(self.store, DenseKV):
            return self.store.keys, self.store.values
        return self._view if self._view is not None else self.store.read(self.used)

    # transformers API -------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        cache = self._cache
        if cache.evicted != "drop":
            self.demoted = DemotedKV.empty(key_states, value_states, cache.evicted, cache.group)
        if cache.kv_bits is not None:
            self.store = QuantizedKV.empty(key_states, value_states, page=cache.group, bits=cache.kv_bits,
                                           group=min(cache.group, value_states.shape[-1]), residual=cache.residual)
        elif cache.storage_layout() == "paged":
            self.store = PagedKV.empty(key_states, value_states, page=cache.page_size)
        else:
            self.store = DenseKV.empty(key_states, value_states)
        self._positions = torch.empty(key_states.shape[0], 1, 0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write new keys/values (B, Hkv, q, d) into free slots; return the slots [0, used) (B, Hkv, used, d),
        which hold every kept token and all q new ones (free slots among them are masked by the core)."""
        if self.awaiting_attention:
            raise attention.not_served_error(self.layer_idx)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, q_len = key_states.shape[0], key_states.shape[-2]
        if batch != self._positions.shape[0]:
            raise ValueError(
                f"this cache holds a batch of {self._positions.shape[0]} rows but got {batch}; "
                "use a new cache (or cache.reset()) for a different batch"
            )
        if self.layer_idx == 0:
            self._cache._check_attached()
            self._cache._record_token_ids(batch, q_len)
        if self.holes and self._cache.evicts:  # a cache that never evicts keeps its pads' slots, as DynamicCache
            self._write_into_free_slots(key_states, value_states)
        else:
            self._append(key_states, value_states)
        self.seen += q_len
        self.new_tokens = q_len
        self.awaiting_attention = True
        attention.serve_layer(self)
        pairs = self.store.read(self.used)
        if isinstance(self.store, PagedKV):
            self._view = pairs
        if self.demoted is not None and self.demoted.used:  # demoted pairs are attended after the kept ones
            keys, values, _ = self.demoted.read()
            heads = pairs[0].shape[1]
            return torch.cat([pairs[0], keys.expand(-1, heads, -1, -1)], 2), \
                torch.cat([pairs[1], values.expand(-1, heads, -1, -1)], 2)
        return pairs

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.used if self._positions is not None else 0
        return kept + query_length, self.seen - kept

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store = self._view = self._positions = self.demoted = None
        self.state = {}
        self.is_initialized = False
        self.seen = self.used = self.new_tokens = 0
        self.dense, self.holes, self.ordered = True, False, True
        self.new_slots = None
        self.awaiting_attention = False
        self.observation = self.deferred = None
        self.shared_observations = {}

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
            self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            indices = indices.to(self._positions.device)
            self._map_rows(lambda t: t[indices])

    def _map_rows(self, fn) -> None:
        """Apply a row operation (select, repeat, reorder) to every per-row tensor of the layer."""
        self.store.map_rows(fn)
        if self.demoted is not None:
            self.demoted.map_rows(fn)
        self._positions = fn(self._positions)
        self.state = {name: fn(value) for name, value in self.state.items()}
        if self.new_slots is not None:
            self.new_slots = fn(self.new_slots)

    def __getstate__(self) -> dict:
        state = dict(vars(self))
        state.pop("_cache", None)  # a weak proxy; the owning cache restores it (CompressedCache.__setstate__)
        state["_view"] = None
        return state

    def copy_for(self, cache: CompressedCache) -> CompressedLayer:
        """An independent copy of this layer (tensors copied) belonging to `cache`, its keys and values in
        `cache`'s storage layout (the same pairs at the same slots; a dense layer copied into pages keeps its
        capacity rounded up to whole pages, where one filled by its own forwards rounds at each growth: equal once
        the copy evicts after a multi-token forward, which compacts a paged layer)."""
        twin = copy.copy(self)
        twin._cache = weakref.proxy(cache)
        for name in ("_positions", "new_slots"):
            tensor = getattr(self, name)
            setattr(twin, name, None if tensor is None else tensor.clone())
        twin.store = None if self.store is None else copy_in_layout(self.store, cache.storage_layout(),
                                                                    cache.page_size, self.capacity, self.used)
        twin.demoted = None if self.demoted is None else self.demoted.clone()
        twin._view = None
        twin.state = {name: value.clone() for name, value in self.state.items()}
        if twin.store is not None and twin.store.capacity > twin.capacity:
            twin._grow(twin.store.capacity)  # a paged copy rounds up to whole pages: widen the slot tables to match
        return twin

    # slots ------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self._positions is None else self._positions.shape[-1]

    @property
    def stored_slots(self) -> int:
        """Slots attention reads ([0, used))."""
        return self.used

    @property
    def valid(self) -> torch.Tensor:
        """(B, Hp, used) bool: slots that hold a real kept token."""
        return self._positions[..., : self.used] >= 0

    @property
    def positions(self) -> torch.Tensor | None:
        """(B, Hp, used) long: the stream position of each slot attention reads, -1 for a free slot (a view of the
        (B, Hp, C) slot table)."""
        return None if self._positions is None else self._positions[..., : self.used]

    def stream_rank(self) -> torch.Tensor:
        """(B, Hp, used) long: each valid slot's rank among its row's valid slots by stream position (0 = oldest);
        free slots get the row's count of valid slots."""
        positions = self.positions
        valid = positions >= 0
        if self.ordered:
            return torch.where(valid, valid.cumsum(dim=-1) - 1, valid.sum(dim=-1, keepdim=True))
        key = torch.where(valid, positions, torch.iinfo(torch.long).max)
        order = key.argsort(dim=-1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return rank

    def new_slot_mask(self) -> torch.Tensor:
        """(B, Hp, used) bool: slots written by the last forward (pads included)."""
        return self.positions >= self.seen - self.new_tokens

    def slot_state(self, name: str, heads: int = 1, dtype: torch.dtype = torch.float32, fill: float = 0.0):
        """The per-slot state `name`, (B, heads, C), created filled with `fill`; grows, compacts, follows batch
        operations and clones with the slots. Index it with [..., :used]; initialise new slots yourself
        (`new_slot_mask()`)."""
        state = self.state.get(name)
        if state is None:
            heads = max(heads, self._positions.shape[1])
            state = torch.full((self._positions.shape[0], heads, self.capacity), fill, dtype=dtype,
                               device=self._positions.device)
            self.state[name] = state
        return state

    def _grown_capacity(self, needed: int) -> int:
        """Capacity after a growth that must hold `needed` slots: 1/8 more than now (at least GROWTH_MIN_SLOTS), so a
        cache that keeps every token (FullCache, KVzip's generated tokens) holds at most ~1.125x the slots it uses
        while appends still reallocate only O(log n) times."""
        return max(needed, self.capacity + max(self.capacity // GROWTH_DIVISOR, GROWTH_MIN_SLOTS))

    def _grow(self, capacity: int) -> None:
        """Reallocate to (at least) `capacity` slots (zeros: a free slot never holds NaN/Inf garbage the kernel could
        read; a paged store rounds up to whole pages)."""
        if capacity <= self.capacity:
            return
        self.store.grow(capacity)
        extra = self.store.capacity - self.capacity

        def widen(tensor, fill):
            pad = tensor.new_full((*tensor.shape[:2], extra), fill)
            return torch.cat([tensor, pad], dim=2)

        self._positions = widen(self._positions, -1)
        self.state = {name: widen(value, 0) for name, value in self.state.items()}

    def _new_positions(self, q_len: int) -> torch.Tensor:
        """(q,) long: the stream positions of a forward's q new tokens."""
        return torch.arange(self.seen, self.seen + q_len, device=self._positions.device)

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write q new tokens at slots [used, used + q) of every row (no free slot below `used`)."""
        q_len = keys.shape[-2]
        start, end = self.used, self.used + q_len
        if end > self.capacity:
            self._grow(end if self.capacity == 0 else self._grown_capacity(end))
        self.store.write_range(start, keys, values)
        if q_len == 1:
            self._positions.narrow(-1, start, 1).fill_(self.seen)
        else:
            self._positions.narrow(-1, start, q_len).copy_(self._new_positions(q_len))
        self.used, self.new_slots = end, None

    def _write_into_free_slots(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write q new tokens into the q lowest free slots of each row and head (growing when a row has fewer)."""
        q_len = keys.shape[-2]
        free = self._positions == -1  # free slots (-2: dead slots of a quantized page, never refilled)
        if q_len == 1:
            self._write_one(keys, values, free)
            return
        free_count = int(free.sum(dim=-1).min())
        if free_count < q_len:
            self._grow(self._grown_capacity(self.capacity + q_len - free_count))
            free = self._positions == -1
        slots = (~free).to(torch.uint8).argsort(dim=-1, stable=True)[..., :q_len]  # (B, Hp, q)
        self.store.write_slots(slots, keys, values)
        self._positions.scatter_(-1, slots, self._new_positions(q_len).expand_as(slots))
        self.used = max(self.used, int(slots.max()) + 1)
        self.new_slots = slots
        self.ordered = False

    def _write_one(self, keys: torch.Tensor, values: torch.Tensor, free: torch.Tensor) -> None:
        """A decode step: write the new token (B, Hkv, 1, d) into the first free slot of each row and head (one
        reduction and one host sync; one row with one slot layout, the usual `generate` case, writes by slicing)."""
        has_free, first_free = free.max(dim=-1, keepdim=True)  # (B, Hp, 1)
        last = int(torch.where(has_free, first_free, self.capacity).max())
        if last == self.capacity:  # some row or head has no free slot
            self._grow(self._grown_capacity(self.capacity + 1))
            first_free = (self._positions == -1).max(dim=-1, keepdim=True)[1]
            last = int(first_free.max())
        if first_free.numel() == 1:
            self.store.write_range(last, keys, values)
            self._positions.narrow(-1, last, 1).fill_(self.seen)
        else:
            self.store.write_slots(first_free, keys, values)
            self._positions.scatter_(-1, first_free, self.seen)
        self.used = max(self.used, last + 1)
        self.new_slots = first_free
        self.ordered = False

    def prepare_attention(self, query, key, position_ids, new_padding):
        """Called by the core before the kernel. Marks new pads, re-rotates in positions="cache" mode.

        Args:
            query: (B, Hq, q, d) rotated by the model at `position_ids` (B, q).
            key: (B, Hkv, used, d), this layer's slots as returned by `update`.
            new_padding: (B, q) bool, True for real tokens, or None.

        Returns:
            (query, key, positions (B, Hp, used)) for the mask and the kernel.
        """
        q_len = self.new_tokens
        if new_padding is not None and not bool(new_padding.all()):
            padding = new_padding.to(self._positions.device)
            new_positions = torch.arange(self.seen - q_len, self.seen, device=padding.device)
            marked = torch.where(padding, new_positions, -1).unsqueeze(1)  # (B, 1, q)
            if self.new_slots is None:
                self._positions[:, :, self.used - q_len : self.used] = marked
            else:
                self._positions.scatter_(-1, self.new_slots, marked.expand_as(self.new_slots))
            self.dense, self.holes = False, True
        if self._cache.position_mode == "cache":
            query, key = self._rotate_within_cache(query, position_ids)
        if self.demoted is not None and self.demoted.used:
            heads = self.demoted.positions.shape[1]
            return query, key, torch.cat([self.positions.expand(-1, heads, -1), self.demoted.positions], dim=-1)
        return query, key, self.positions

    def _rotate_within_cache(self, query, position_ids):
        """positions="cache": un-rotate the new keys (stored before RoPE), then rotate every kept key and the new
        queries at their rank among the row's kept tokens."""
        if position_ids is None:
            raise RuntimeError("positions='cache' needs the model to pass position_ids to its attention")
        if self._positions.shape[1] != 1:
            raise NotImplementedError("positions='cache' with per-head eviction is not supported")
        rope = self._cache.rope
        position_ids = position_ids.expand(query.shape[0], -1)
        slots = self._new_slot_index()  # (B, q): new token i sits in slot slots[:, i]
        self.store.rewrite_slots(slots[:, None], rope.unrotate(self.store.read_slots(slots[:, None]), position_ids))
        if self._view is not None:  # a paged store's gathered pairs predate the rewrite
            self._view = self.store.read(self.used)
        rank = self.stream_rank()[:, 0]  # (B, used)
        key = rope.rotate(self.keys[:, :, : self.used], rank)
        query = rope.rotate(rope.unrotate(query, position_ids), rank.gather(-1, slots))
        return query, key

    def _new_slot_index(self) -> torch.Tensor:
        """(B, q) slots of the last forward's tokens, in stream order (shared slot layout only)."""
        if self.new_slots is not None:
            return self.new_slots[:, 0]
        q_len = self.new_tokens
        start = self.used - q_len
        return torch.arange(start, self.used, device=self._positions.device).expand(self._positions.shape[0], q_len)

    def finish_forward(self) -> None:
        """Called by the core after the kernel: apply the strategy's eviction (or, in the forward of
        `prefill_shared`, keep the observation so that each cache sharing the forward applies its own later)."""
        self.awaiting_attention = False
        try:
            if self._cache._deferring is not None:
                if self.deferred is not None:
                    raise RuntimeError("a cache deferring its eviction (prefill_shared) takes one forward")
                self.deferred = {attention.observation_key(self._cache): self.observation, **self.shared_observations}
                self.shared_observations = {}
            else:
                self._evict()
        finally:
            self._view = None

    def _evict(self) -> None:
        if self._cache.evicts:
            self._cache.evict(self)
        self.store.settle(self._positions, self.seen)  # a quantized store quantizes its aged pages

    def apply_deferred(self) -> None:
        """Apply the eviction `finish_forward` deferred, with the observation of that forward (`prefill_shared`)."""
        if self.deferred is None:
            return
        self.observation, self.deferred = self.deferred[attention.observation_key(self._cache)], None
        try:
            self._evict()
        finally:
            self.observation = None

    def keep_only(self, keep: torch.Tensor) -> None:
        """Free every slot in [0, used) where `keep` ((B, 1 or Hkv, used) bool) is False. Kept slots never move,
        except after a multi-token forward (a prefill) that leaves the layer with far fewer tokens than its capacity:
        they are then compacted once. (A decode step is not checked: it frees at most what it adds, in every
        strategy here, and skipping the count keeps a step's bookkeeping to a few tensor operations.)"""
        valid = self.valid
        if keep.ndim != 3 or keep.shape[-1] != self.used:
            raise ValueError(f"select must return (B, 1 or Hkv, {self.used}) bool, got {tuple(keep.shape)}")
        if keep.shape[1] != self._positions.shape[1]:
            if keep.shape[1] == 1:
                keep = keep.expand_as(valid)
            else:  # a strategy keeps different tokens per kv head: give the slot layout a head axis
                heads = keep.shape[1]
                self._positions = self._positions.expand(-1, heads, -1).clone()
                self.state = {k: v.expand(-1, heads, -1).clone() for k, v in self.state.items()}
                valid = self.valid
        drop = valid & ~keep
        if not bool(drop.any()):
            return
        self._demote(torch.where(drop, self._positions[..., : self.used], -1))
        self._positions[..., : self.used].masked_fill_(drop, -1)
        self.store.after_free(self._positions)
        self.dense, self.holes = False, True
        if bool(drop[..., -1].any()):  # the last attended slot was freed: trim the free tail off `used`
            # (a dead slot, -2, of a quantized page is not free: `used` never ends inside such a page, where the
            # next append would write)
            filled = (self._positions[..., : self.used] != -1).flatten(0, 1).any(dim=0)
            self.used = int(filled.nonzero().max()) + 1 if bool(filled.any()) else 0
            self.holes = bool((self._positions[..., : self.used] < 0).any())
        if self.new_tokens > 1:  # after a multi-token forward (a prefill): give memory back if far below capacity
            kept = int((self._positions >= 0).sum(dim=-1).max())
            reserve = max(8, kept // 16)
            if self.capacity > 2 * (kept + reserve) or isinstance(self.store, PagedKV):
                self._compact(kept + reserve)  # a paged store holds only the pages of its kept pairs

    def free_slots(self, slots: torch.Tensor, where: torch.Tensor) -> None:
        """Free slot `slots[b, h, i]` wherever `where[b, h, i]` ((B, Hp, k) long and bool): a decode step's eviction
        without a host sync. Kept slots never move and `used` is not trimmed (a free slot is masked wherever it is);
        `dense`/`holes` are set as if a slot was freed even when `where` is all False."""
        current = self._positions.gather(-1, slots)
        if self.demoted is not None:
            freed = torch.full_like(self._positions[..., : self.used], -1)
            freed.scatter_(-1, slots, torch.where(where, current, -1))
            self._demote(freed)
        self._positions.scatter_(-1, slots, torch.where(where, -1, current))
        self.dense, self.holes = False, True
        self.store.after_free(self._positions)

    def _demote(self, freed: torch.Tensor) -> None:
        """Hand the pairs about to be freed (`freed` (B, Hp, used): their positions, -1 elsewhere) to the demoted
        store (evicted=4|2); nothing for evicted="drop"."""
        if self.demoted is None:
            return
        keys, values = self.store.read(self.used)
        self.demoted.add(keys, values, freed.expand(-1, keys.shape[1], -1))

    def _compact(self, capacity: int) -> None:
        """Move the kept slots of each row and head to the front of a new buffer of `capacity` slots (keeping their
        slot order)."""
        valid = self._positions >= 0
        counts = valid.sum(dim=-1)  # (B, Hp)
        kept = int(counts.max())
        order = (~valid).to(torch.uint8).argsort(dim=-1, stable=True)[..., :kept]  # (B, Hp, kept)
        self.store.compact(order, capacity, counts)
        capacity = self.store.capacity  # a paged store rounds up to whole pages

        def take(tensor: torch.Tensor, fill) -> torch.Tensor:
            """tensor (B, H, C) with H = Hp, or H = Hkv when Hp = 1 (the layout broadcasts over heads)."""
            index = order.expand(tensor.shape[0], tensor.shape[1], kept)
            out = tensor.new_full((*tensor.shape[:2], capacity), fill)
            out[:, :, :kept] = tensor.gather(2, index)
            return out

        self.state = {name: take(value, 0) for name, value in self.state.items()}
        self._positions = take(self._positions, -1)
        self.used = kept
        self.new_slots = None
        self.holes = bool((self._positions[..., :kept] < 0).any())


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


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
QUANTIZED_BITS = (8, 4, 2)
STORAGE_OPTIONS = ("kv_bits", "residual", "group", "evicted")
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _takes_options(function) -> bool:
    import inspect

    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(function).parameters.values())


def check_quantizable(model, group: int) -> None:
    """ValueError unless quantized storage can serve `model`: a float dtype the quantizer handles and a `group` that
    divides the head dimension (value groups are channels of one head)."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % group and group < head_dim:
        raise ValueError(f"group ({group}) must divide the head dimension ({head_dim}) for quantized storage")
    dtype = next(model.parameters()).dtype
    if dtype not in QUANTIZABLE_DTYPES:
        raise ValueError(f"quantized storage (kv_bits) supports models in {[str(d) for d in QUANTIZABLE_DTYPES]}, "
                         f"this one is {dtype}")


# Architectures whose attention does what the core cannot follow and no config field tells (config.model_type ->
# why), found by the architecture sweep (`python -m kvcompress.architectures`, docs/architectures.md).
UNSERVED_ARCHITECTURES = {
    "diffllama": "its differential attention calls the attention function twice per cache update (the core evicts "
                 "after the first call)",
    "doge": "its attention builds its own dynamic mask from the values and the mask it receives (the core builds "
            "masks from the positions the cache kept)",
    "dory": "it runs its layers in loops over shared or per-loop copies of their KV (cache slots other than the "
            "attention modules' layer_idx)",
    "jetmoe": "its mixture of attention heads repeats the cached kv heads after the cache update, so per-kv-head "
              "slots and masks no longer line up with the heads attending",
}


def outside_attention_interface(name: str) -> str:
    """Why a model class without `_supports_attention_backend` is refused (also decided per class, without a model,
    by `kvcompress.architectures`)."""
    return (f"{name} does not run its attention through transformers' AttentionInterface (state-space models such as "
            "Mamba keep no per-token KV cache; older architectures have their own attention code), so kvcompress "
            "caches cannot drive it")


def check_causal_lm(model) -> None:
    """Raise TypeError unless the kvcompress core can serve every layer of `model` exactly.

    Refused: anything but a decoder-only transformers causal LM; models whose attention does not go through
    transformers' AttentionInterface (Mamba and other state-space models, older architectures); hybrid models
    whose `config.layer_types` include anything but full and sliding-window attention (linear attention, conv,
    chunked, indexed ...); attention-logit soft-capping (Gemma 2), which the core's kernels do not apply; layers
    that reuse another layer's KV (Gemma 3n / Gemma 4 KV sharing); learned attention sinks (gpt-oss); cross-attention
    layers (Mllama, BERT-style decoders with `add_cross_attention`); bidirectional attention (`is_causal` False: a
    BERT-style model without `is_decoder=True`); attention modules that do not map one to one to the cache's layers
    (recurrent or looped layers); the architectures of `UNSERVED_ARCHITECTURES`.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if model.config.is_encoder_decoder or name not in causal_classes:
        raise TypeError(f"kvcompress caches need a decoder-only causal LM (AutoModelForCausalLM); got {name}")
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(outside_attention_interface(name))
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
    if config.model_type in UNSERVED_ARCHITECTURES:
        raise TypeError(f"{name} cannot be served by kvcompress caches: {UNSERVED_ARCHITECTURES[config.model_type]}")
    if getattr(config, "cross_attention_layers", None) or getattr(config, "add_cross_attention", False):
        raise TypeError(f"{name} has cross-attention layers, which kvcompress caches do not support")
    # attention modules: a layer index and a softmax scale (decoder layers have the index only)
    attentions = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "scaling")]
    if any(getattr(m, "sinks", None) is not None for m in attentions):
        raise TypeError(
            f"{name} has learned attention sinks (an extra softmax logit per head, `s_aux`), which the kvcompress "
            "core does not apply, so its results would be wrong"
        )
    if any(getattr(m, "is_causal", True) is False for m in attentions):
        raise TypeError(
            f"{name} attends bidirectionally (is_causal False; a BERT-style model needs config.is_decoder=True to "
            "generate), which kvcompress caches do not support"
        )
    if sorted(m.layer_idx for m in attentions) != list(range(config.num_hidden_layers)):
        raise TypeError(
            f"{name}'s attention modules do not map one to one to its {config.num_hidden_layers} cache layers "
            "(recurrent or looped layers), which kvcompress caches do not support"
        )


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
