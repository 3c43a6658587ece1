"""Type checks for numbers that come from users: no silent casts (1.7 is not a seed, true is not 1,
nan is not a guidance scale). Each raises :class:`UnlearnAtkError` with ``what`` in its message."""

from __future__ import annotations

import math
from typing import Any

from .errors import UnlearnAtkError


def whole(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) within [low, high]."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if not is_int or (low is not None and value < low) or (high is not None and value > high):
        bounds = _bounds(low, high)
        raise UnlearnAtkError(f"{what} is {value!r}; it must be a whole number{bounds}")
    return value


def finite(value: Any, what: str, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float if it is a finite int or float (not a bool) within [low, high]."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise UnlearnAtkError(f"{what} is {value!r}; it must be a finite number{_bounds(low, high)}")
    return float(value)


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise UnlearnAtkError(f"{what} is {value!r}; it must be text")
    return value


def _bounds(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" between {low} and {high}"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""
