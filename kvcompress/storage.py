"""Where one layer's keys and values live: storage layouts behind one small interface.

A `CompressedLayer` addresses its pairs by LOGICAL slot: (row b, kv head h, slot i), i < capacity. The slot
metadata (stream positions, strategy state) is a dense (B, Hp, C) table in the layer; the bulk, keys and values,
lives in a store:

- `DenseKV` (default): keys/values (B, Hkv, C, d) tensors, logical slot = physical slot. The kernel reads a view,
  nothing is copied; every kv head of a row holds C slots, so heads that keep fewer pairs than the longest one pay
  for the difference.
- `PagedKV` (head-adaptive budgets: KVzip global, AdaKV): each (row, kv head) lane owns pages of `page` slots from
  one shared pool, allocated as its own slots fill, so a layer holds about the pairs its heads keep (within one page
  per lane) however different their counts. The kernel gets a (B, Hkv, used, d) copy gathered for the layer being
  computed (one layer at a time; dropped after that layer's forward), never of the whole cache.

Interface (every store): `capacity`, `grow(capacity)`, `write_range(start, keys, values)`, `write_slots(slots,
keys, values)`, `read(used)`, `read_slots(slots)` / `rewrite_slots(slots, keys)` (positions="cache"),
`map_rows(fn)`, `compact(order, capacity, kept_per_lane)`, `release_after(used_per_lane)`, `clone()`,
`nbytes()`, `heads`, `pair_bytes()`.
Shapes: B rows, Hkv kv heads, d key dim, dv value dim; `slots` (B, Hp, q) long with Hp = 1 (broadcast over heads)
or Hkv.
"""

from __future__ import annotations

import torch

from . import kernels

LAYOUTS = ("dense", "paged")


class DenseKV:
    """Keys (B, Hkv, C, d) and values (B, Hkv, C, dv): logical slot i is column i."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    @classmethod
    def empty(cls, key_states: torch.Tensor, value_states: torch.Tensor) -> DenseKV:
        batch, heads, _, dim = key_states.shape
        return cls(key_states.new_zeros(batch, heads, 0, dim), value_states.new_zeros(batch, heads, 0,
                                                                                       value_states.shape[-1]))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra > 0:
            self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], extra, self.keys.shape[3])], 2)
            self.values = torch.cat([self.values, self.values.new_zeros(*self.values.shape[:2], extra,
                                                                        self.values.shape[3])], 2)

    def settle(self, positions: torch.Tensor, seen: int) -> None:
        """Store hook after a forward's eviction (quantized stores quantize aged pages): nothing for dense."""

    def after_free(self, positions: torch.Tensor) -> None:
        """Store hook after slots were freed: nothing for dense."""

    def write_range(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys.narrow(2, start, keys.shape[2]).copy_(keys)
        self.values.narrow(2, start, values.shape[2]).copy_(values)

    def write_slots(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        batch, heads, _, dim = self.keys.shape
        index = slots.expand(batch, heads, slots.shape[-1]).unsqueeze(-1)
        self.keys.scatter_(2, index.expand(-1, -1, -1, dim), keys)
        self.values.scatter_(2, index.expand(-1, -1, -1, self.values.shape[-1]), values)

    def read(self, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.narrow(2, 0, used), self.values.narrow(2, 0, used)

    def read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        index = slots.expand(self.keys.shape[0], self.keys.shape[1], -1).unsqueeze(-1)
        return self.keys.gather(2, index.expand(-1, -1, -1, self.keys.shape[-1]))

    def rewrite_slots(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        index = slots.expand(self.keys.shape[0], self.keys.shape[1], -1).unsqueeze(-1)
        self.keys.scatter_(2, index.expand(-1, -1, -1, self.keys.shape[-1]), keys)

    def map_rows(self, fn) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)

    def compact(self, order: torch.Tensor, capacity: int, kept_per_lane: torch.Tensor) -> None:
        """Logical slot j of lane (b, h) becomes slot order[b, h, j] of before, for j < order.shape[-1]."""
        self.keys, self.values = _take(self.keys, order, capacity), _take(self.values, order, capacity)

    def release_after(self, used_per_lane: torch.Tensor) -> None:
        """Nothing to release: every lane owns `capacity` slots."""

    @property
    def heads(self) -> int:
        return self.keys.shape[1]

    def pair_bytes(self) -> int:
        """Bytes of one slot's key and value."""
        return (self.keys.shape[-1] + self.values.shape[-1]) * self.keys.element_size()

    def used_bytes(self, positions: torch.Tensor) -> int:
        """Bytes the kept pairs need (positions (B, Hp, C))."""
        return int((positions >= 0).sum()) * (self.heads // positions.shape[1]) * self.pair_bytes()

    def clone(self) -> DenseKV:
        return DenseKV(self.keys.clone(), self.values.clone())

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def _take(tensor: torch.Tensor, order: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, H, C, d) -> (B, H, capacity, d) holding tensor[b, h, order[b, h', j]] at slot j (h' = h when order has
    a head axis, else 0), zeros after."""
    kept = order.shape[-1]
    index = order.expand(tensor.shape[0], tensor.shape[1], kept).unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1])
    out = tensor.new_zeros(*tensor.shape[:2], capacity, tensor.shape[-1])
    out[:, :, :kept] = tensor.gather(2, index)
    return out


class PagedKV:
    """Pages of `page` slots from one pool per layer; lane (b, h) maps its logical slot i to page
    `table[b, h, i // page]`, offset i % page (-1: no page yet, reads as zeros).

    Storage: key_pool (P, page, d), value_pool (P, page, dv) (page 0 is a zero page that is never handed out),
    table (B, Hkv, C / page) long, a free list of pages. `capacity` (logical, every lane) is a multiple of `page`.
    """

    def __init__(self, key_pool, value_pool, table, free: list[int], page: int):
        self.key_pool, self.value_pool, self.table, self.free, self.page = key_pool, value_pool, table, free, page

    @classmethod
    def empty(cls, key_states: torch.Tensor, value_states: torch.Tensor, page: int = 16) -> PagedKV:
        batch, heads, _, dim = key_states.shape
        key_pool = key_states.new_zeros(1, page, dim)
        value_pool = value_states.new_zeros(1, page, value_states.shape[-1])
        table = torch.full((batch, heads, 0), -1, dtype=torch.long, device=key_states.device)
        return cls(key_pool, value_pool, table, [], page)

    @property
    def capacity(self) -> int:
        return self.table.shape[-1] * self.page

    def grow(self, capacity: int) -> None:
        pages = -(-capacity // self.page) - self.table.shape[-1]
        if pages > 0:
            self.table = torch.cat([self.table, self.table.new_full((*self.table.shape[:2], pages), -1)], dim=-1)

    # pages ------------------------------------------------------------------------------------------------------
    def _allocate(self, count: int) -> torch.Tensor:
        """`count` page numbers (long), growing the pool geometrically when the free list runs out."""
        if len(self.free) < count:
            have = self.key_pool.shape[0]
            extra = max(count - len(self.free), have // 16, 1)  # <= 6.25% of free pages held in reserve
            self.key_pool = torch.cat([self.key_pool, self.key_pool.new_zeros(extra, *self.key_pool.shape[1:])])
            self.value_pool = torch.cat([self.value_pool,
                                         self.value_pool.new_zeros(extra, *self.value_pool.shape[1:])])
            self.free.extend(range(have + extra - 1, have - 1, -1))
        taken = [self.free.pop() for _ in range(count)]
        return torch.tensor(taken, dtype=torch.long, device=self.table.device)

    def _ensure_pages(self, slots: torch.Tensor) -> None:
        """Give every lane a page for each of its logical `slots` (B, Hkv, q) that has none."""
        pages = slots // self.page
        owned = self.table.gather(-1, pages)
        missing = owned == -1
        if not bool(missing.any()):
            return
        # one new page per distinct (b, h, page number) that lacks one
        lane = torch.arange(self.table.shape[0] * self.table.shape[1], device=slots.device).view(
            self.table.shape[0], self.table.shape[1], 1).expand_as(pages)
        width = self.table.shape[-1]  # (lane, page) pairs as one number: a 1-D unique (unique(dim=0) is slow on CPU)
        need = torch.unique(lane[missing] * width + pages[missing])  # sorted: by lane, then page
        new = self._allocate(need.shape[0])
        self.table.view(-1, width)[need // width, need % width] = new

    def _physical(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, q) logical slots -> flat pool rows (page * size + offset); a slot without a page maps into the zero
        page 0 (read as zeros; never written)."""
        pages = self.table.gather(-1, slots // self.page).clamp(min=0)
        return pages * self.page + slots % self.page

    def _lanes(self, slots: torch.Tensor) -> torch.Tensor:
        return slots.expand(self.table.shape[0], self.table.shape[1], slots.shape[-1])

    # interface --------------------------------------------------------------------------------------------------
    def write_range(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        slots = torch.arange(start, start + keys.shape[2], device=self.table.device).view(1, 1, -1)
        self.write_slots(slots, keys, values)

    def write_slots(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        slots = self._lanes(slots)
        self._ensure_pages(slots)
        rows = self._physical(slots).flatten()
        self.key_pool.view(-1, self.key_pool.shape[-1])[rows] = keys.reshape(-1, keys.shape[-1]).to(self.key_pool)
        self.value_pool.view(-1, self.value_pool.shape[-1])[rows] = values.reshape(-1, values.shape[-1]).to(
            self.value_pool)

    def read(self, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hkv, used, d) keys and values in slot order: whole pages gathered in table order (one index per page
        of `page` rows, not one per slot: 30% less time than a row gather for a decode step's read on a CPU), then
        cut to `used` slots; a slot without a page reads the zero page 0."""
        pages = -(-used // self.page)
        entry = self.table[..., :pages].clamp(min=0).flatten()
        lanes = (*self.table.shape[:2], pages * self.page)
        return (self.key_pool.index_select(0, entry).view(*lanes, self.key_pool.shape[-1])[:, :, :used],
                self.value_pool.index_select(0, entry).view(*lanes, self.value_pool.shape[-1])[:, :, :used])

    def settle(self, positions: torch.Tensor, seen: int) -> None:
        """After a forward's eviction (positions (B, Hp, C)): nothing to do for full-precision pages."""

    def after_free(self, positions: torch.Tensor) -> None:
        """After slots were freed (positions set to -1): nothing to do for full-precision pages."""

    def read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        rows = self._physical(self._lanes(slots))
        return _gather_rows(self.key_pool, rows)

    def rewrite_slots(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        rows = self._physical(self._lanes(slots)).flatten()
        self.key_pool.view(-1, self.key_pool.shape[-1])[rows] = keys.reshape(-1, keys.shape[-1])

    def map_rows(self, fn) -> None:
        """Rows selected / repeated / reordered: a page that two lanes would share is copied (each lane owns its pages);
        pages no lane keeps go back to the free lists."""
        before = set(self.table.flatten().tolist()) - {-1}
        table = fn(self.table).clone()
        flat = table.view(-1)
        seen: set[int] = set()
        for i, entry in enumerate(flat.tolist()):
            if entry == -1:
                continue
            if entry in seen:
                flat[i] = self._copy_page(entry)
            else:
                seen.add(entry)
        self._release(before - seen)
        self.table = table

    def _copy_page(self, entry: int) -> int:
        (copy,) = self._allocate(1).tolist()
        self.key_pool[copy] = self.key_pool[entry]
        self.value_pool[copy] = self.value_pool[entry]
        return copy

    def _release(self, entries: set[int]) -> None:
        self.free.extend(sorted(entries, reverse=True))

    def _shrink(self) -> None:
        """Give memory back: when over a quarter of the pool's pages (and at least 4) are free, rebuild the pool with
        the pages in use only (renumbered; the zero page stays page 0)."""
        pages = self.key_pool.shape[0]
        if len(self.free) < max(4, pages // 4):
            return
        used = self.table[self.table >= 0]
        keep = torch.cat([used.new_zeros(1), used])
        self.key_pool, self.value_pool = self.key_pool[keep], self.value_pool[keep]
        self.table[self.table >= 0] = torch.arange(1, keep.shape[0], device=self.table.device)
        self.free = []

    def compact(self, order: torch.Tensor, capacity: int, kept_per_lane: torch.Tensor) -> None:
        """Lane (b, h) keeps its logical slots order[b, h, :kept_per_lane[b, h]] at slots 0.. in a fresh pool that
        holds exactly the pages the lanes need; `capacity` logical slots per lane."""
        kept = order.shape[-1]
        order = self._lanes(order)
        kept_per_lane = kept_per_lane.expand(*self.table.shape[:2])
        keys, values = self.read(max(self.capacity, 1))
        index = order.unsqueeze(-1)
        keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1]))
        values = values.gather(2, index.expand(-1, -1, -1, values.shape[-1]))
        lane_pages = -(-kept_per_lane // self.page)  # pages each lane needs
        total = int(lane_pages.sum())
        self.key_pool = self.key_pool.new_zeros(1 + total, self.page, self.key_pool.shape[-1])
        self.value_pool = self.value_pool.new_zeros(1 + total, self.page, self.value_pool.shape[-1])
        self.free = []
        width = -(-capacity // self.page)
        page_index = torch.arange(width, device=self.table.device).view(1, 1, -1)
        has = page_index < lane_pages.unsqueeze(-1)
        self.table = self.table.new_full((*self.table.shape[:2], width), -1)
        self.table[has] = torch.arange(1, 1 + total, device=self.table.device)
        slots = torch.arange(kept, device=self.table.device).view(1, 1, -1).expand(*self.table.shape[:2], kept)
        live = slots < kept_per_lane.unsqueeze(-1)
        rows = self._physical(slots)[live]
        self.key_pool.view(-1, self.key_pool.shape[-1])[rows] = keys[live]
        self.value_pool.view(-1, self.value_pool.shape[-1])[rows] = values[live]

    def release_after(self, used_per_lane: torch.Tensor) -> None:
        """Return the pages of each lane past its logical slot used_per_lane[b, h] (B, Hkv) to the free list."""
        page_index = torch.arange(self.table.shape[-1], device=self.table.device).view(1, 1, -1)
        idle = (page_index * self.page >= used_per_lane.unsqueeze(-1)) & (self.table >= 0)
        if bool(idle.any()):
            self.free.extend(sorted(self.table[idle].tolist(), reverse=True))
            self.table[idle] = -1
            self._shrink()

    @property
    def heads(self) -> int:
        return self.table.shape[1]

    def pair_bytes(self) -> int:
        return (self.key_pool.shape[-1] + self.value_pool.shape[-1]) * self.key_pool.element_size()

    def clone(self) -> PagedKV:
        return PagedKV(self.key_pool.clone(), self.value_pool.clone(), self.table.clone(), list(self.free), self.page)

    def nbytes(self) -> int:
        """Bytes of the pool (handed-out and free pages) plus the page table."""
        return self.key_pool.nbytes + self.value_pool.nbytes + self.table.nbytes

    def used_bytes(self, positions: torch.Tensor) -> int:
        """Bytes the kept pairs need (positions (B, Hp, C))."""
        return int((positions >= 0).sum()) * (self.heads // positions.shape[1]) * self.pair_bytes()

    def pages_in_use(self) -> int:
        return int((self.table >= 0).sum())


def copy_in_layout(store, layout: str, page: int, capacity: int, used: int):
    """An independent copy of `store` in `layout` ("dense", or "paged" with pages of `page` slots), holding the same
    pairs at the same logical slots: a layer handed to a cache of another layout (`prefill_shared`: KVzip's global
    and layer allocations share one prefill and reconstruction). `capacity`: the layer's logical slots; `used`: its
    slots in use (a paged copy gets pages for those only, as a store filled by its own forward has). A store already
    in `layout`, or quantized, is cloned."""
    if isinstance(store, QuantizedKV) or layout == _layout_of(store, page):
        return store.clone()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    keys, values = store.read(capacity)  # (B, Hkv, capacity, d)
    if layout == "dense":
        return DenseKV(keys.clone(), values.clone())
    paged = PagedKV.empty(keys, values, page)
    paged.grow(capacity)
    paged.write_range(0, keys[:, :, :used], values[:, :, :used])
    return paged


def _layout_of(store, page: int) -> str | None:
    if type(store) is DenseKV:
        return "dense"
    return "paged" if type(store) is PagedKV and store.page == page else None


class QuantizedKV(PagedKV):
    """`PagedKV` whose pages get quantized once they are old: KIVI's layout with eviction (`kvcompress.quantize`).

    A page holds `page` (= the key group size G) consecutive logical slots of one lane. A full-precision page is
    quantized when every slot in it holds a kept pair and all of them are older than the lane's newest `residual`
    tokens (the full-precision window): keys per channel over the page's G tokens, values per token over groups of
    `group` channels, `bits` bits each; the full-precision page goes back to the pool. New tokens are always
    written into full-precision pages.

    Eviction in a quantized page cannot be refilled (its key scales cover the tokens it was quantized with), so a
    freed slot there becomes DEAD: position -2, neither kept nor free; a quantized page whose slots are all dead is
    released. A compaction (after a long prefill or question) dequantizes what it moves, so those pairs are
    quantized again later (a second rounding, within one more half step).

    The table encodes a quantized page q as -(q + 2) (-1: no page). `read` dequantizes this layer's quantized pages
    into a transient buffer (one layer at a time: the core asks per layer).
    """

    def __init__(self, key_pool, value_pool, table, free, page, bits, group, residual, quantized=None):
        super().__init__(key_pool, value_pool, table, free, page)
        self.bits, self.group, self.residual = bits, group, residual
        # quantized pages: codes, scales and zero points; qfree: their free list
        self.quantized = quantized or {"keys": None, "key_scale": None, "key_zero": None, "values": None,
                                       "value_scale": None, "value_zero": None, "free": []}

    @classmethod
    def empty(cls, key_states, value_states, page: int = 32, bits: int = 4, group: int = 32,
              residual: int = 128) -> QuantizedKV:
        base = PagedKV.empty(key_states, value_states, page)
        store = cls(base.key_pool, base.value_pool, base.table, base.free, page, bits, group, residual)
        dim, vdim = key_states.shape[-1], value_states.shape[-1]
        from .quantize import quantize_keys, quantize_values

        empty_keys = key_states.new_zeros(0, page, dim)
        empty_values = value_states.new_zeros(0, page, vdim)
        q = store.quantized
        q["keys"], q["key_scale"], q["key_zero"] = quantize_keys(empty_keys, bits)
        q["values"], q["value_scale"], q["value_zero"] = quantize_values(empty_values, bits, group)
        return store

    # quantized pages ----------------------------------------------------------------------------------------------
    def _q_allocate(self, count: int) -> torch.Tensor:
        q = self.quantized
        if len(q["free"]) < count:
            have = q["keys"].shape[0]
            extra = max(count - len(q["free"]), have // 16, 1)
            for name in ("keys", "key_scale", "key_zero", "values", "value_scale", "value_zero"):
                q[name] = torch.cat([q[name], q[name].new_zeros(extra, *q[name].shape[1:])])
            q["free"].extend(range(have + extra - 1, have - 1, -1))
        return torch.tensor([q["free"].pop() for _ in range(count)], dtype=torch.long, device=self.table.device)

    def read(self, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Hkv, used, d) keys and (B, Hkv, used, dv) values in slot order, in the pools' dtype. In page order:
        the packed pages each lane's table names are gathered first (a quarter of the fp32 bytes at 8 bits, 1/16 at
        2) and dequantized straight into slot order; the few full-precision pages (the residual window, the page
        being filled) are copied over theirs; slots without a page read zeros. Bitwise what dequantizing every page
        and gathering the slots gives (tests/test_quantized_storage.py). On CPU the native kernel of
        `kvcompress.kernels` does all of it in one pass (bitwise the same; `read_torch` where it is not built)."""
        if not bool((self.table <= -2).any()):
            return super().read(used)
        pages = -(-used // self.page)
        if self.key_pool.device.type == "cpu" and kernels.available():  # the same in one pass (kvcompress.kernels)
            return kernels.read_pages(self.table[..., :pages], self.quantized, self.key_pool, self.value_pool,
                                      self.bits, used)
        return self.read_torch(used)

    def read_torch(self, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`read` in torch operations (any device; the reference the native CPU read is tested against)."""
        from .quantize import dequantize_keys, dequantize_values

        pages = -(-used // self.page)
        entry = self.table[..., :pages]  # (B, Hkv, P)
        index = (-entry - 2).clamp(min=0).flatten()  # quantized page numbers (any valid page where it is not one)
        q = {name: tensor.index_select(0, index).unflatten(0, entry.shape)
             for name, tensor in self.quantized.items() if name != "free"}
        keys = dequantize_keys(q["keys"], q["key_scale"], q["key_zero"], self.bits, self.key_pool.shape[-1],
                               self.key_pool.dtype)  # (B, Hkv, P, page, d)
        values = dequantize_values(q["values"], q["value_scale"], q["value_zero"], self.bits, self.group,
                                   self.value_pool.dtype)  # (B, Hkv, P, page, dv)
        full = entry >= 0
        if bool(full.any()):
            keys[full] = self.key_pool[entry[full]]
            values[full] = self.value_pool[entry[full]]
        unpaged = entry == -1
        if bool(unpaged.any()):
            keys[unpaged] = 0
            values[unpaged] = 0
        lanes = entry.shape[:2]
        return (keys.view(*lanes, pages * self.page, -1)[:, :, :used],
                values.view(*lanes, pages * self.page, -1)[:, :, :used])

    def read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """New tokens' keys (positions="cache" un-rotation): always in full-precision pages."""
        return super().read_slots(slots)

    def settle(self, positions: torch.Tensor, seen: int) -> None:
        """Quantize every full-precision page that is full of kept pairs all older than its lane's newest
        `residual` tokens."""
        heads = self.table.shape[1]
        pages = self.table.shape[-1]
        if pages == 0:
            return
        lanes = positions.expand(-1, heads, -1)
        grid = lanes[..., : pages * self.page].reshape(*self.table.shape, self.page)
        newest = lanes.amax(dim=-1)  # (B, Hkv): each lane's newest kept position
        old = grid.amax(dim=-1) <= (newest - self.residual).unsqueeze(-1)
        full = (grid >= 0).all(dim=-1)
        ready = full & old & (self.table >= 0)
        if not bool(ready.any()):
            return
        from .quantize import quantize_keys, quantize_values

        fp = self.table[ready]  # (n,) full-precision page numbers, in (b, h, page) order
        q = self.quantized
        numbers = self._q_allocate(fp.shape[0])
        q["keys"][numbers], q["key_scale"][numbers], q["key_zero"][numbers] = quantize_keys(self.key_pool[fp],
                                                                                              self.bits)
        q["values"][numbers], q["value_scale"][numbers], q["value_zero"][numbers] = quantize_values(
            self.value_pool[fp], self.bits, self.group)
        self.free.extend(fp.tolist())
        self.table[ready] = -numbers - 2
        self._shrink()

    def after_free(self, positions: torch.Tensor) -> None:
        """Freed slots in quantized pages become dead (-2); quantized pages left with no kept pair are released and
        their slots become free again (-1)."""
        quantized = self.table <= -2
        if not bool(quantized.any()):
            return
        heads, pages = self.table.shape[1], self.table.shape[-1]
        if positions.shape[1] != heads:  # the shared layout: every head's pages follow the same slots
            quantized = quantized.all(dim=1, keepdim=True)
        grid = positions[..., : pages * self.page].view(*positions.shape[:2], pages, self.page)
        grid.masked_fill_(quantized.unsqueeze(-1) & (grid == -1), -2)
        empty = quantized & (grid == -2).all(dim=-1)
        if bool(empty.any()):
            lanes = empty.expand(-1, heads, -1) if empty.shape[1] != heads else empty
            self.quantized["free"].extend((-self.table[lanes] - 2).tolist())
            self.table[lanes] = -1
            grid.masked_fill_(empty.unsqueeze(-1), -1)
            self._shrink()

    def write_slots(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        if bool((self.table.gather(-1, self._lanes(slots) // self.page) <= -2).any()):
            raise RuntimeError("a write landed in a quantized page (its free slots are dead, position -2)")
        super().write_slots(slots, keys, values)

    def compact(self, order: torch.Tensor, capacity: int, kept_per_lane: torch.Tensor) -> None:
        """Dequantize every page (transient, this layer), then lay the kept pairs out in full-precision pages; `settle`
        quantizes the aged ones again."""
        if bool((self.table <= -2).any()):
            keys, values = self.read(self.capacity)
            q = self.quantized
            for name in ("keys", "key_scale", "key_zero", "values", "value_scale", "value_zero"):
                q[name] = q[name][:0]  # every quantized page is dequantized: the quantized pool goes
            q["free"] = []
            pool = PagedKV.empty(keys, values, self.page)
            pool.grow(self.capacity)
            pool.write_range(0, keys, values)
            self.key_pool, self.value_pool, self.table, self.free = pool.key_pool, pool.value_pool, pool.table, pool.free
        super().compact(order, capacity, kept_per_lane)

    def _shrink(self) -> None:
        """`PagedKV._shrink` for the full-precision pool, and the same for the quantized pages."""
        super()._shrink()
        q = self.quantized
        pages = q["keys"].shape[0]
        if len(q["free"]) < max(4, pages // 4):
            return
        quantized = self.table <= -2
        used = -self.table[quantized] - 2
        for name in ("keys", "key_scale", "key_zero", "values", "value_scale", "value_zero"):
            q[name] = q[name][used]
        self.table[quantized] = -torch.arange(used.shape[0], device=self.table.device) - 2
        q["free"] = []

    def _copy_page(self, entry: int) -> int:
        if entry >= 0:
            return super()._copy_page(entry)
        (copy,) = self._q_allocate(1).tolist()
        for name in ("keys", "key_scale", "key_zero", "values", "value_scale", "value_zero"):
            self.quantized[name][copy] = self.quantized[name][-entry - 2]
        return -copy - 2

    def _release(self, entries: set[int]) -> None:
        super()._release({e for e in entries if e >= 0})
        self.quantized["free"].extend(sorted((-e - 2 for e in entries if e <= -2), reverse=True))

    def clone(self) -> QuantizedKV:
        quantized = {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) for k, v in self.quantized.items()}
        return QuantizedKV(self.key_pool.clone(), self.value_pool.clone(), self.table.clone(), list(self.free),
                           self.page, self.bits, self.group, self.residual, quantized)

    def nbytes(self) -> int:
        """Full-precision pool + quantized codes, scales and zero points + the page table."""
        q = self.quantized
        return super().nbytes() + sum(q[k].nbytes for k in ("keys", "key_scale", "key_zero", "values",
                                                             "value_scale", "value_zero"))

    def used_bytes(self, positions: torch.Tensor) -> int:
        """Bytes the kept pairs need: full precision in full-precision pages; codes plus their share of scales and
        zero points in quantized pages."""
        heads, pages = self.table.shape[1], self.table.shape[-1]
        kept = (positions.expand(-1, heads, -1)[..., : pages * self.page] >= 0).reshape(*self.table.shape, self.page)
        in_quantized = int((kept & (self.table <= -2).unsqueeze(-1)).sum())
        q = self.quantized
        per_q_pair = (q["keys"][0].nbytes + q["values"][0].nbytes) / self.page + (
            q["key_scale"][0].nbytes + q["key_zero"][0].nbytes) / self.page + (
            q["value_scale"][0].nbytes + q["value_zero"][0].nbytes) / self.page if q["keys"].shape[0] else 0
        return int((int(kept.sum()) - in_quantized) * self.pair_bytes() + in_quantized * per_q_pair)


class DemotedKV:
    """Pairs a strategy freed, kept at low precision and still attended (MiKV, Yang et al. 2024: "No Token Left
    Behind"): `evicted=4 | 2`. Per (row, kv head) lane, logical slots with their stream positions (B, Hkv, D) (-1:
    free), keys and values in a `QuantizedKV` with no full-precision window (a page is quantized once full; a page
    still filling stays in full precision). The strategy never sees these pairs (they are outside its slots and its
    budget); the kernel attends to them after the kept ones."""

    def __init__(self, store: QuantizedKV, positions: torch.Tensor):
        self.store, self.positions = store, positions

    @classmethod
    def empty(cls, keys: torch.Tensor, values: torch.Tensor, bits: int, group: int) -> DemotedKV:
        store = QuantizedKV.empty(keys, values, page=group, bits=bits, group=min(group, values.shape[-1]), residual=0)
        positions = torch.full((*keys.shape[:2], 0), -1, dtype=torch.long, device=keys.device)
        return cls(store, positions)

    @property
    def used(self) -> int:
        return self.positions.shape[-1]

    def add(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Demote pairs: keys/values (B, Hkv, n, d), positions (B, Hkv, n) (-1: nothing to demote there). Each lane's
        pairs go to its lowest free slots."""
        count = int((positions >= 0).sum(dim=-1).max()) if positions.numel() else 0
        if count == 0:
            return
        free = self.positions == -1
        short = count - int(free.sum(dim=-1).min()) if free.numel() else count
        if short > 0:  # grow every lane by whole pages
            extra = -(-short // self.store.page) * self.store.page
            self.positions = torch.cat([self.positions, self.positions.new_full((*self.positions.shape[:2], extra),
                                                                                -1)], dim=-1)
            self.store.grow(self.positions.shape[-1])
            free = self.positions == -1
        order = (positions < 0).to(torch.uint8).argsort(dim=-1, stable=True)[..., :count]  # each lane's real pairs
        real = positions.gather(-1, order) >= 0
        slots = (~free).to(torch.uint8).argsort(dim=-1, stable=True)[..., :count]  # each lane's lowest free slots
        index = order.unsqueeze(-1)
        self.store.write_slots(slots, keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1])),
                               values.gather(2, index.expand(-1, -1, -1, values.shape[-1])))
        current = self.positions.gather(-1, slots)
        self.positions.scatter_(-1, slots, torch.where(real, positions.gather(-1, order), current))
        self.store.settle(self.positions, 0)

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, values = self.store.read(self.used)
        return keys, values, self.positions

    def map_rows(self, fn) -> None:
        self.store.map_rows(fn)
        self.positions = fn(self.positions)

    def clone(self) -> DemotedKV:
        return DemotedKV(self.store.clone(), self.positions.clone())

    def nbytes(self) -> int:
        return self.store.nbytes() + self.positions.nbytes

    def used_bytes(self) -> int:
        return self.store.used_bytes(self.positions)


def _gather_rows(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """pool (P, page, d) and flat row numbers rows (B, H, n) -> (B, H, n, d): `index_select` (a decode step's read
    of every kept pair ran 4x faster than advanced indexing on a CPU; the same values)."""
    flat = pool.view(-1, pool.shape[-1])
    return flat.index_select(0, rows.flatten()).view(*rows.shape, pool.shape[-1])
