"""One prefill forward for many caches: several budgets of a strategy, and several strategies.

A cache compresses a prefill AFTER each layer's attention, and the forward's outputs do not depend on what it keeps:
the forward is the same for every cache whose core takes the same path through it (same kernel, same storage), and
only the observation (what the core shows the strategy) and the cut differ. `prefill_shared` runs that forward once
per such group, with eviction deferred: the core computes the observation of every cache of the group, each layer
keeps them, then every cache gets a copy of the prefilled layers and applies its own eviction with its own
observation. The result is bitwise the one each cache gets from running the forward itself
(tests/test_shared_prefill.py checks every registered strategy, mixed in one call), for the cost of one forward per
group plus one eviction per cache: what a sweep over budgets and strategies (the bench's `--share-prefill`) pays.
"""

from __future__ import annotations

import torch

from . import attention
from .cache import MODEL_LINKS, CompressedCache, cache_arg, check_distinct_caches

# what makes the core take another path through a forward, so that caches differing in it cannot share one: the
# kernel (blockwise with reductions for strategies observing all queries; a decode step's kernel for those observing
# probabilities), the storage, the positions. (Recording the input ids, `needs_token_ids`, changes no computation: a
# group's forward runs on a cache that records them when any of its caches needs them.)
_FORWARD_SETTINGS = ("observe_received", "observe_max_received", "position_mode", "page_size")
_HOOKS = ("before_forward", "after_forward", "prepare_deferred")


def shareable_storage(cache: CompressedCache) -> bool:
    """Whether `cache`'s storage can take a shared prefill: not quantized or demoted (`kv_bits` / `evicted`), whose
    stores settle pages as they evict."""
    return cache.kv_bits is None and cache.evicted == "drop"


def forward_key(cache: CompressedCache, query_length: int) -> tuple:
    """Caches with equal keys can share a forward of `query_length` tokens: the core takes the same path through it
    for each (settings in `_FORWARD_SETTINGS`, and for one token `attention.observes_probabilities`, which picks
    the decode kernel; not the storage layout: a dense and a paged store hand the kernel the same keys and values,
    and a cache of another layout takes a copy of the layers in its own, `CompressedLayer.copy_for`), and a
    strategy that runs code of its own around a forward (overrides `before_forward`, `after_forward` or
    `prepare_deferred`: KVzip) shares only with its own class, and only with caches equal in the settings those
    hooks read (`deferred_settings`: KVzip's chunk, overlap, slack and normalisation shape its reconstruction)."""
    own_hooks = any(getattr(type(cache), hook) is not getattr(CompressedCache, hook) for hook in _HOOKS)
    own = (type(cache), tuple(getattr(cache, name) for name in cache.deferred_settings)) if own_hooks else None
    return (tuple(getattr(cache, name) for name in _FORWARD_SETTINGS),
            query_length == 1 and attention.observes_probabilities(cache), own)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same setting
        return False


def _settings(cache: CompressedCache) -> dict:
    return {name: value for name, value in vars(cache).items() if name not in MODEL_LINKS}


def _check(model, caches: list[CompressedCache]) -> None:
    check_distinct_caches(caches, "caches", model)
    for i, cache in enumerate(caches):
        if any(layer.is_initialized for layer in cache.layers):
            raise ValueError(f"caches[{i}] has been used: prefill_shared fills fresh caches")
        if not shareable_storage(cache):
            raise ValueError(f"caches[{i}] has quantized or demoted storage (kv_bits / evicted), which prefill_shared "
                             "does not take: such stores settle pages as they evict")


def _groups(caches: list[CompressedCache], query_length: int) -> list[list[CompressedCache]]:
    """The caches by `forward_key`; in each group a cache that records input ids first (the forward runs on it),
    dense before paged (the others take the layers in their own layout: a paged copy of dense layers holds what the
    paged cache's own forward would, a dense copy of paged layers would keep their capacity rounded to pages)."""
    groups: dict[tuple, list[CompressedCache]] = {}
    for cache in caches:
        groups.setdefault(forward_key(cache, query_length), []).append(cache)
    return [sorted(group, key=lambda cache: (not cache.needs_token_ids, cache.storage_layout() != "dense"))
            for group in groups.values()]


@torch.no_grad()
def prefill_shared(model, caches: list[CompressedCache], input_ids: torch.Tensor, **forward_kwargs) -> list:
    """Prefill `input_ids` into every cache of `caches` with one forward of `model` per group of caches that can
    share it (`forward_key`).

    Args:
        model: the causal LM every cache was built for.
        caches: fresh caches (nothing fed yet) of any strategies and budgets, without quantized storage. ValueError
            otherwise, naming the cache.
        input_ids: (B, L) the prompt.
        forward_kwargs: passed to the model's forward (attention_mask, position_ids, logits_to_keep, ...).

    Returns:
        The model's output for each cache, in order (one object per forward: caches of one group share it; caches
        of different groups may differ in the last bits, as their own forwards would). Afterwards every cache holds
        exactly (bitwise) what it would hold had it run `model(input_ids, past_key_values=cache, **forward_kwargs)`
        itself; the one exception is the memory allocated (not what is kept) of a paged cache that shares with a
        dense one and evicts nothing at this prefill: its capacity is rounded to pages once, not at each growth.

    How, per group: its first cache (one that records input ids, if any of the group does) runs the forward with
    eviction deferred: the core computes the observation of every cache of the group (`attention.observation_key`:
    once per distinct one) and each layer keeps them (`CompressedLayer.deferred`). Then its strategy's
    `prepare_deferred` runs (budget-independent work after a forward, KVzip's reconstruction; only strategies that
    override it or the other forward hooks share with their own class alone). The first cache of each other
    strategy class takes a copy of the prefilled layers (in its storage layout) and recorded ids. Every other cache
    of a class takes a copy of its class's first cache's state (layers in its own layout), keeping the attributes in
    which it differed from it before the forward (its settings: budget, allocation, windows, ...). Each cache
    then applies its eviction layer by layer (`evict`, with its observation) and `finish_deferred` (KVzip's cut);
    a class's first cache does so last. Eviction is per layer and after that layer's attention in a normal forward
    too, so deferring it changes nothing that later layers compute.
    """
    _check(model, caches)
    outputs = {}
    for group in _groups(caches, input_ids.shape[-1]):
        output = _prefill_group(model, group, input_ids, forward_kwargs)
        outputs.update({id(cache): output for cache in group})
    return [outputs[id(cache)] for cache in caches]


def _prefill_group(model, group: list[CompressedCache], input_ids: torch.Tensor, forward_kwargs: dict):
    settings = {id(cache): _settings(cache) for cache in group}
    classes: dict[type, list[CompressedCache]] = {}
    for cache in group:
        classes.setdefault(type(cache), []).append(cache)
    source = group[0]
    own = attention.observation_key(source)
    source._deferring = {key: cache for cache in group[::-1]
                         if (key := attention.observation_key(cache)) != own}  # one cache per other observation
    try:
        output = model(input_ids, use_cache=True, **forward_kwargs, **cache_arg(source))
    finally:
        source._deferring = None
    source.prepare_deferred()
    for members in classes.values():
        first = members[0]
        if first is not source:  # another strategy: the prefilled layers and ids, its own everything else
            first.layers = [layer.copy_for(first) for layer in source.layers]
            first.token_ids = source.token_ids.clone() if first.needs_token_ids and source.token_ids is not None \
                else None  # the ids only where its own forward would record them
            first.prepare_deferred()
    for members in classes.values():
        first = members[0]
        base = settings[id(first)]
        for cache in members[1:] + [first]:
            if cache is not first:
                own_settings = settings[id(cache)]
                differ = {name for name in own_settings.keys() | base.keys()
                          if not _same(own_settings.get(name), base.get(name))}
                first.copy_state_into(cache, differ)
            for layer in cache.layers:
                layer.apply_deferred()
            cache.finish_deferred()
    return output
