"""`CompressedLayer`: one layer of a `CompressedCache`, its keys and values in slots that never move (the slot table,
growth, compaction, eviction); the cache (`kvcompress.cache`) holds one per model layer."""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import CacheLayerMixin

from . import attention
from .model_checks import UnsupportedFeatureError
from .storage import DemotedKV, DenseKV, PagedKV, QuantizedKV, copy_in_layout

if TYPE_CHECKING:
    from .cache import CompressedCache

GROWTH_DIVISOR = 8  # a full slot buffer grows by 1/GROWTH_DIVISOR of its capacity ...
GROWTH_MIN_SLOTS = 16  # ... and by at least this many slots (a page of the paged layout)


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
