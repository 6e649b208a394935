"""One prefill forward for several caches of one strategy that differ only in their budget.

A cache compresses a prefill AFTER each layer's attention (the forward's outputs do not depend on what it keeps), so
the forward, and the observation its strategy takes of it, is the same for every budget: only the cut differs.
`prefill_shared` runs that forward once, with the eviction deferred, then gives each cache a copy of the prefilled
layers and lets it apply its own eviction with the forward's observation. The result is bitwise the one each cache
gets from running the forward itself (tests/test_shared_prefill.py checks every registered strategy), for the cost
of one forward plus one eviction per cache: what a sweep over budgets (the bench's `--share-prefill`) pays.
"""

from __future__ import annotations

import torch

from .cache import CompressedCache, cache_arg

# settings that shape the forward itself (what the core observes, how keys and values are stored): they must match
SHARED_SETTINGS = ("observe_queries", "observe_window", "observe_received", "observe_max_received", "needs_token_ids",
                   "kv_bits", "residual", "group", "evicted", "position_mode", "page_size")
# attributes that are the link to the model, never a setting
_LINKS = {"layers", "_hooks", "_model_ref", "rope"}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same setting
        return False


def _settings(cache: CompressedCache) -> dict:
    return {name: value for name, value in vars(cache).items() if name not in _LINKS}


def _check(model, caches: list[CompressedCache]) -> None:
    if not caches:
        raise ValueError("caches must hold at least one cache")
    first = caches[0]
    for i, cache in enumerate(caches):
        if not isinstance(cache, CompressedCache):
            raise TypeError(f"caches[{i}] is a {type(cache).__name__}, not a kvcompress CompressedCache")
        if type(cache) is not type(first):
            raise ValueError(f"caches must be of one strategy: caches[0] is a {type(first).__name__}, caches[{i}] "
                             f"a {type(cache).__name__}")
        if any(cache is other for other in caches[:i]):
            raise ValueError(f"caches[{i}] appears twice in caches")
        if not cache.is_bound or cache._model_ref() is not model:
            raise ValueError(f"caches[{i}] was not built for this model")
        if any(layer.is_initialized for layer in cache.layers):
            raise ValueError(f"caches[{i}] has been used: prefill_shared fills fresh caches")
        if cache.kv_bits is not None or cache.evicted != "drop":
            raise ValueError("prefill_shared does not take quantized or demoted storage (kv_bits / evicted): their "
                             "stores settle pages as they evict")
        for name in SHARED_SETTINGS:
            if not _same(getattr(cache, name), getattr(first, name)):
                raise ValueError(f"caches[{i}] has {name}={getattr(cache, name)!r} and caches[0] "
                                 f"{getattr(first, name)!r}: caches sharing a forward must observe and store it alike")
        if cache.storage_layout() != first.storage_layout():
            raise ValueError(f"caches[{i}] stores its layers {cache.storage_layout()!r}, caches[0] "
                             f"{first.storage_layout()!r}: caches sharing a forward must store it alike")


@torch.no_grad()
def prefill_shared(model, caches: list[CompressedCache], input_ids: torch.Tensor, **forward_kwargs):
    """Prefill `input_ids` into every cache of `caches` with ONE forward of `model`.

    Args:
        model: the causal LM every cache was built for.
        caches: fresh caches of one strategy class (e.g. `cls.for_budget(model, tokenizer, b)` for several budgets
            b) that differ only in settings applied at eviction (budget, window sizes, ...): same observation, same
            storage, nothing fed yet. ValueError otherwise, naming the cache and the setting.
        input_ids: (B, L) the prompt.
        forward_kwargs: passed to the model's forward (attention_mask, position_ids, ...).

    Returns:
        The forward's output (logits (B, L, V)). Afterwards every cache holds exactly (bitwise) what it would hold
        had it run `model(input_ids, past_key_values=cache, **forward_kwargs)` itself.

    How: caches[0] runs the forward with its eviction deferred (each layer keeps the observation its strategy
    declared, `CompressedLayer.deferred`), then its strategy's `prepare_deferred` (budget-independent work after a
    forward: KVzip's reconstruction). Each other cache takes a copy of that state, keeping the attributes in which
    it differed from caches[0] before the forward (its settings), and applies the eviction layer by layer
    (`evict`, with the forward's observation), then `finish_deferred` (KVzip's cut). caches[0] does the same last.
    Eviction is per layer and after that layer's attention in a normal forward too, so deferring it changes nothing
    that later layers compute.
    """
    _check(model, caches)
    source = caches[0]
    settings = [_settings(cache) for cache in caches]
    source._deferring = True
    try:
        output = model(input_ids, use_cache=True, **forward_kwargs, **cache_arg(source))
    finally:
        source._deferring = False
    source.prepare_deferred()
    for cache, own in list(zip(caches, settings))[1:] + [(source, settings[0])]:
        if cache is not source:
            differ = {name for name in own.keys() | settings[0].keys()
                      if not _same(own.get(name), settings[0].get(name))}
            source.copy_state_into(cache, differ)
        for layer in cache.layers:
            layer.apply_deferred()
        cache.finish_deferred()
    return output
