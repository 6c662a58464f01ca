"""Argument checks shared by the whole package: scalars, the float dtypes, window geometry.

Each raises ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of
range, with a message that names the argument and shows what came. Array checks for the
layers live in :mod:`cnnserve.layers._checks`; they build on these.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "FLOAT_DTYPES",
    "check_dtype",
    "check_int",
    "check_labels",
    "check_number",
    "short",
    "window_positions",
]

#: The dtypes of every array a layer, a network or a data set computes in.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


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


def check_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """The dtype rule: ``float32`` or ``float64``, given as a dtype, a type or its name.

    ``None`` is refused (``np.dtype(None)`` would silently mean float64).
    """
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved not in FLOAT_DTYPES:  # (None == float64 in NumPy)
        shown = repr(dtype) if resolved is None else resolved.name
        raise TypeError(f"{name} must be float32 or float64, got {shown}")
    return resolved


def window_positions(size: int, window: int, stride: int, pad: int = 0) -> int | None:
    """Positions of a sliding window along one axis: ``(size + 2*pad - window) / stride + 1``.

    Returns None when the window does not fit in the padded axis or the positions do not
    tile it exactly (the result is never silently floored); callers say why in their terms.
    """
    span = size + 2 * pad - window
    if span < 0 or span % stride:
        return None
    return span // stride + 1


def check_labels(y: Any, num_samples: int, num_classes: int) -> np.ndarray:
    """Class labels ``y`` of shape ``(num_samples,)``, integers in ``[0, num_classes)``."""
    if not isinstance(y, np.ndarray):
        raise TypeError(f"y must be a numpy.ndarray of integer labels, got {type(y).__name__}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must have an integer dtype, got {y.dtype}")
    if y.shape != (num_samples,):
        raise ValueError(
            f"y must have shape ({num_samples},) (one label per row of x), got {y.shape}"
        )
    if y.min() < 0 or y.max() >= num_classes:
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise ValueError(f"labels in y must be in [0, {num_classes}), got {bad}")
    return y
