"""Strategies by name: `@register("name")` on a `CompressedCache` subclass, `build(name, model, **options)`."""

from __future__ import annotations

from typing import Callable, TypeVar

_STRATEGIES: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a cache class available as `name` to `build`, the tests and the bench."""

    def decorate(cls: T) -> T:
        if name in _STRATEGIES and _STRATEGIES[name] is not cls:
            raise ValueError(f"strategy name {name!r} is already taken by {_STRATEGIES[name].__name__}")
        _STRATEGIES[name] = cls
        cls.strategy_name = name
        return cls

    return decorate


def available() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_STRATEGIES)


def get(name: str) -> type:
    """The cache class registered as `name`; KeyError listing the known names otherwise."""
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(available())}") from None


def build(name: str, model, **options):
    """A new cache of strategy `name` for `model`."""
    return get(name)(model, **options)


def parse_spec(spec: str) -> tuple[str, dict]:
    """A strategy with options, as the bench and the speed runs take it: "name" or "name:key=value[:key=value...]"
    (values: integers, floats, true/false, none, else strings), e.g. "kvzip:allocation=layer",
    "snapkv:kv_bits=4". The bench also takes `model=ALIAS` (that row runs on another model, e.g. an anchor-trained
    one: "anchor:model=smollm2-135m-anchor-ac"). Returns (name, options); KeyError for an unknown name, ValueError
    for a malformed option."""
    get(spec.strip().split(":")[0])
    return split_spec(spec)


def split_spec(spec: str) -> tuple[str, dict]:
    """`parse_spec` without looking the name up (a spec recorded in results, whose strategy this process may not
    have registered). ValueError for a malformed option."""
    name, *parts = spec.strip().split(":")
    options = {}
    for part in parts:
        key, sep, text = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad option {part!r} in strategy {spec!r}: expected key=value")
        options[key.strip()] = _value(text.strip())
    return name, options


def resolve(spec: str) -> tuple[type, dict]:
    """(cache class, options) of a strategy spec (`parse_spec`)."""
    name, options = parse_spec(spec)
    return get(name), options


def _value(text: str):
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
