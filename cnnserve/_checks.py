"""Argument checks shared by the layers, the networks, the update rules and the data sets.

Each raises ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of
range, with a message that names the argument and shows what came.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_int", "check_number", "short"]


def short(value: Any) -> str:
    """``str(value)``, abbreviated when it is very long (a 400-digit integer)."""
    text = str(value)
    return text if len(text) <= 40 else f"{text[:12]}...({len(text)} characters)"


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {short(repr(value))}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if value < minimum else f"<= {maximum}"
        raise ValueError(f"{name} must be {bound}, got {short(value)}")
    return int(value)


def check_number(
    value: Any, name: str, low: float, high: float, interval: str, meaning: str = ""
) -> float:
    """Return ``value`` as a float if it is a real number (not a bool) in the given interval.

    ``interval`` is one of ``'()'``, ``'(]'``, ``'[)'``, ``'[]'``: which ends are included.
    NaN is always rejected, and so is an infinite value unless an end of the interval is one.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {short(repr(value))}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    above = number >= low if interval[0] == "[" else number > low
    below = number <= high if interval[1] == "]" else number < high
    if not (above and below):  # also rejects NaN
        what = f"{name} ({meaning})" if meaning else name
        bounds = f"{interval[0]}{low}, {high}{interval[1]}"
        raise ValueError(f"{what} must be in {bounds}, got {short(value)}")
    return number
