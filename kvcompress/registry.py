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
