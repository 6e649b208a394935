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
        missing = owned < 0
        if not bool(missing.any()):
            return
        # one new page per distinct (b, h, page number) that lacks one
        lane = torch.arange(self.table.shape[0] * self.table.shape[1], device=slots.device).view(
            self.table.shape[0], self.table.shape[1], 1).expand_as(pages)
        need = torch.unique(torch.stack([lane[missing], pages[missing]], dim=1), dim=0)
        new = self._allocate(need.shape[0])
        flat = self.table.view(-1, self.table.shape[-1])
        flat[need[:, 0], need[:, 1]] = new

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
        slots = torch.arange(used, device=self.table.device).view(1, 1, -1).expand(*self.table.shape[:2], used)
        owned = self.table.gather(-1, slots // self.page) >= 0
        rows = torch.where(owned, self._physical(slots), 0)  # page 0 holds zeros
        keys = self.key_pool.view(-1, self.key_pool.shape[-1])[rows]
        values = self.value_pool.view(-1, self.value_pool.shape[-1])[rows]
        return keys, values

    def read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        rows = self._physical(self._lanes(slots))
        return self.key_pool.view(-1, self.key_pool.shape[-1])[rows]

    def rewrite_slots(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        rows = self._physical(self._lanes(slots)).flatten()
        self.key_pool.view(-1, self.key_pool.shape[-1])[rows] = keys.reshape(-1, keys.shape[-1])

    def map_rows(self, fn) -> None:
        """Rows selected / repeated / reordered: lanes that end up sharing a page get their own copy."""
        table = fn(self.table)
        owned = table[table >= 0]
        counts = torch.bincount(owned, minlength=self.key_pool.shape[0]) if owned.numel() else None
        if counts is not None and bool((counts > 1).any()):
            table = table.clone()
            seen: set[int] = set()
            flat = table.view(-1)
            for i, page in enumerate(flat.tolist()):
                if page < 0:
                    continue
                if page in seen:
                    (copy,) = self._allocate(1).tolist()
                    self.key_pool[copy] = self.key_pool[page]
                    self.value_pool[copy] = self.value_pool[page]
                    flat[i] = copy
                else:
                    seen.add(page)
        dropped = set(self.table[self.table >= 0].tolist()) - set(table[table >= 0].tolist())
        self.free.extend(sorted(dropped, reverse=True))
        self.table = table

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

    def pages_in_use(self) -> int:
        return int((self.table >= 0).sum())
