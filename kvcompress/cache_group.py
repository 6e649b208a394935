"""`CacheGroup`: several batch-1 kvcompress caches run through ONE forward of the model, row i for cache i.

A decode step of a small model is bound by reading its weights, not by attention: one step for 20 caches costs
about 4 times one step for one cache, not 20 times (docs/bench.md). A group lets caches that have seen the same
number of tokens (caches of several strategies and budgets prefilled from one prompt by `prefill_shared`, clones of
one compressed cache asked different questions) take their steps together:

    group = CacheGroup([snapkv_cache, tova_cache, full_cache])
    logits = model(next_tokens (3, 1), cache=group).logits   # row i continues cache i
    out = model.generate(ids (3, L), cache=group, max_new_tokens=64)   # L past what the members have seen

(`generate`: each row's tokens are those of generate on its member alone, `tests/test_cache_group.py`; the rows'
new tokens must be as many, e.g. questions of one length to clones of one compressed context.)

Each member runs its own path of the attention core on its own slots, exactly as in a forward of its own: its
update, mask, kernel, observation and eviction (the core attends row by row, `attention.kvcompress_attention`),
its input checks, `before_forward` and `after_forward` with its row of the inputs, its recorded token ids. The
model's other layers (projections, MLP, norms, head) run on all rows at once, and that is the one difference from
per-member forwards: a BLAS kernel may sum a product in another order for another number of rows (on a CPU a
1-row product is a matrix-vector kernel), so the logits may differ in the last bits, and a greedy token flips only
where two logits tie to that precision (the bench measures the flips: docs/bench.md, "Decoding a unit's caches
together").

Rows may leave: build a new group of the members still running (`without`). A member stays a normal cache: after
the group, it decodes alone as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import attention
from .cache import CompressedCache, check_distinct_caches

# forward arguments that carry one row per batch row (sliced for each member); others are passed as they are
ROW_ARGUMENTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")


class CacheGroup(Cache):
    """Batch-1 `CompressedCache`s decoded together: a forward with `cache=group` (`past_key_values=group` before
    transformers 5.24) and B = len(members) rows feeds row i to `members[i]`.

    Args:
        members: distinct batch-1 kvcompress caches of one model, each already fed the same number of tokens
            (every forward feeds each the same count, so their RoPE and mask offsets agree).

    Raises:
        TypeError: a member is not a `CompressedCache`.
        ValueError: no member, a member twice, a member without a model or of another model than the first, one
            that holds more than one row, or members that have seen different numbers of tokens.
    (Its layers are neither compileable nor croppable, so neither is the group.)
    """

    def __init__(self, members: Sequence[CompressedCache]):
        members = list(members)
        _check_members(members)
        model = members[0]._model_ref()
        super().__init__(layers=[_GroupLayer(self, i) for i in range(len(members[0].layers))])
        self.members = members
        self._ids: torch.Tensor | None = None  # (B, q) input ids of the forward in flight
        self._hooks = _install_group_hooks(model, self)

    def without(self, rows: Sequence[int]) -> CacheGroup | None:
        """A group of the members not in `rows` (their order kept), or None when none is left."""
        drop = set(rows)
        left = [member for i, member in enumerate(self.members) if i not in drop]
        return CacheGroup(left) if left else None

    # transformers API: every member holds the same number of tokens -------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.members[0].get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """The first member's: the kvcompress mask keeps only the query offset (each member's keys carry their
        own positions, `masks.MaskSpec`), which is the same for every member."""
        return self.members[0].get_mask_sizes(query_length, layer_idx)

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError(
            "a CacheGroup only runs forwards of its members: beam search, cropping or batch reordering work on a "
            "member itself (or on one batched CompressedCache)")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = reset = _refuse

    def start_forward(self, args: tuple, kwargs: dict) -> None:
        """Called by the group's pre-hook at the start of a forward using the group: each member starts its
        forward with its row of the inputs, as it would alone (input checks, `before_forward`)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        inputs = ids if ids is not None else kwargs.get("inputs_embeds")
        rows = len(self.members)
        if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or inputs.shape[0] != rows:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else None
            raise ValueError(f"this CacheGroup has {rows} members, so a forward through it takes {rows} input rows "
                             f"(row i continues member i); got inputs of shape {shape}")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions with a CacheGroup: its members attend different keys, so their "
                             "probabilities do not stack; run the member alone to get them")
        self._ids = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None
        for i, member in enumerate(self.members):
            row_args = tuple(attention.row_of(a, i, rows) for a in args[:1]) + tuple(args[1:])
            row_kwargs = {**kwargs, **{name: attention.row_of(kwargs[name], i, rows) for name in ROW_ARGUMENTS
                                       if name in kwargs}}
            member._forward_ids = None
            member._in_forward = member._owner_forward = True  # the member's own after_forward hook then runs
            member._check_forward_input(row_args, row_kwargs)
            member.before_forward(row_args, row_kwargs)


class _GroupLayer(CacheLayerMixin):
    """Layer `layer_idx` of a `CacheGroup`: hands row i of the new keys and values to member i's layer, then the
    members' layers to the core (`attention.serve_group`), which attends each with its own row of queries."""

    is_sliding = False

    def __init__(self, group: CacheGroup, layer_idx: int):
        super().__init__()
        self._group = weakref.proxy(group)
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states, value_states) -> None:  # members initialise their own layers
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: (B, Hkv, q, d), row i for member i. Returns them unchanged: the core reads each
        member's own slots (what the member's `update` returned), not these."""
        group = self._group
        served = []
        for i, member in enumerate(group.members):
            if self.layer_idx == 0 and member.needs_token_ids:  # the member's ids hook saw every row
                member._forward_ids = None if group._ids is None else group._ids[i : i + 1]
            keys, values = member.update(key_states[i : i + 1], value_states[i : i + 1], self.layer_idx,
                                         *args, **kwargs)
            served.append((member.layers[self.layer_idx], keys, values))
        attention.serve_group(self.layer_idx, served)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._group.members[0].layers[self.layer_idx].get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._group.members[0].layers[self.layer_idx].get_seq_length()

    def get_max_length(self) -> int:
        return -1


def _check_members(members: list) -> None:
    check_distinct_caches(members, "members")
    for i, member in enumerate(members):
        layer = member.layers[0]
        if layer.is_initialized and layer.positions.shape[0] != 1:
            raise ValueError(f"members[{i}] holds {layer.positions.shape[0]} rows; a group's members hold one each")
        if member.get_seq_length() != members[0].get_seq_length():
            raise ValueError(
                f"members[{i}] has seen {member.get_seq_length()} tokens and members[0] "
                f"{members[0].get_seq_length()}: a group's members must have seen the same number of tokens (their "
                "positions continue together)")


def _install_group_hooks(model, group: CacheGroup) -> list:
    """A forward pre-hook on `model` and its base model (as a member's own, `cache._install_hooks`), registered after
    the members' own: at the start of a forward using the group, each member starts its forward with its row."""
    group_ref = weakref.ref(group)

    def start(module, args, kwargs):
        target = group_ref()
        if target is not None and any(kwargs.get(name) is target for name in ("past_key_values", "cache")):
            target.start_forward(args, kwargs)

    owners = [model] if model.base_model is model else [model, model.base_model]
    handles = [owner.register_forward_pre_hook(start, with_kwargs=True) for owner in owners]
    for handle in handles:
        weakref.finalize(group, handle.remove)
    return handles
