"""Validation of user-given integers and token ids, shared by every strategy (one rule, one message style).

Rule: an integer parameter accepts any integral number: a Python `int`, a numpy integer scalar, or a 0-d torch
integer tensor. It refuses `bool` (True is not a count), floats even when integral-valued (2.0: a float budget or
window is more likely a fraction or a mistake than a count), strings and everything else, with a message naming
the user's parameter and the value given.
"""

from __future__ import annotations

import numbers

import torch


def _integral(value) -> int | None:
    """`value` as a Python int if it is an integral number (not bool), else None."""
    if torch.is_tensor(value):
        if value.ndim != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            return None
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy integers are Integral
        return None
    return int(value)


def as_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as a Python int, or ValueError naming `name` (the user's parameter).

    Accepts int, numpy integer scalars and 0-d integer tensors; refuses bool, floats (even 2.0), strings and
    tensors with more than one element. Bounds are inclusive.
    """
    number = _integral(value)
    low = f" >= {minimum}" if minimum is not None else ""
    high = f" <= {maximum}" if maximum is not None else ""
    wanted = f"an integer{low}{' and' if low and high else ''}{high}"
    if number is None:
        raise ValueError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be {wanted}, got {number}")
    return number


def as_token_ids(value, name: str) -> list[int]:
    """Token ids as a list of Python ints, or ValueError naming `name`.

    Accepts one integral number (int, numpy integer, 0-d integer tensor), a 1-D integer tensor or numpy array,
    or a list/tuple/set/range of integral numbers. Refuses strings (a token, not an id), floats, bools, nested
    sequences and tensors of other shapes or dtypes. The result may be empty; callers decide whether that is allowed.
    """
    if _integral(value) is not None:
        return [_integral(value)]
    if not torch.is_tensor(value) and getattr(getattr(value, "dtype", None), "kind", None) in ("i", "u"):
        value = torch.as_tensor(value)  # a numpy integer array
    if torch.is_tensor(value):
        if value.ndim != 1 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise ValueError(
                f"{name} must be token ids: an integer, a 1-D integer tensor or a list of integers; got a tensor of "
                f"shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        return [int(i) for i in value.tolist()]
    if isinstance(value, (list, tuple, set, frozenset, range)):
        ids = []
        for item in value:
            number = _integral(item)
            if number is None:
                raise ValueError(f"{name} must contain integer token ids, got {item!r} ({type(item).__name__})")
            ids.append(number)
        return ids
    raise ValueError(
        f"{name} must be token ids: an integer, a 1-D integer tensor or a list of integers; got {value!r} "
        f"({type(value).__name__})"
    )
