"""Argument checks shared by every layer of :mod:`cnnserve.layers`, and the window geometry.

A private helper module of the layers: each check raises ``TypeError`` for a wrong type or
dtype and ``ValueError`` for a wrong shape or value, with a message that names the argument
and says what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from cnnserve._checks import FLOAT_DTYPES, check_int, window_positions

__all__ = [
    "check_array",
    "check_cache",
    "check_dout",
    "check_param_int",
    "check_params",
    "check_same_dtype",
    "check_shape",
    "window_count",
]


def check_array(a: Any, name: str, ndim: int | None = None, layout: str = "") -> np.ndarray:
    """Return ``a`` as an ndarray if it is a non-empty float32/float64 array of ``ndim`` dims.

    Subclasses are viewed as plain ndarrays (a memmap works), except those whose meaning a
    plain array would lose: masked arrays (the mask) and np.matrix (its 2-D algebra).
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if isinstance(a, np.ma.MaskedArray | np.matrix):
        raise TypeError(
            f"{name} must be a plain numpy.ndarray, got {type(a).__name__}: fill masked "
            "values or convert with np.asarray first"
        )
    a = np.asarray(a)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        shape_hint = f" {layout}" if layout else ""
        raise ValueError(f"{name} must be {ndim}-D{shape_hint}, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {a.shape}")
    return a


def check_same_dtype(first_name: str, first: np.ndarray, **others: np.ndarray) -> None:
    """Raise TypeError unless every array in ``others`` has the dtype of ``first``."""
    for name, a in others.items():
        if a.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {a.dtype} but {first_name} has dtype {first.dtype}: "
                "all arrays of one layer call must share one dtype"
            )


def check_shape(a: np.ndarray, name: str, expected: tuple[int, ...], meaning: str) -> None:
    if a.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} {meaning}, got {a.shape}")


# Window sizes, strides and pads are C integers in the kernels.
_MAX_INT_PARAM = 2**31 - 1


def check_param_int(value: Any, name: str, minimum: int, maximum: int = _MAX_INT_PARAM) -> int:
    """:func:`cnnserve._checks.check_int`, bounded by what the kernels' C ints hold."""
    return check_int(value, name, minimum, maximum)


def check_params(
    params: Any, name: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
) -> Mapping:
    """Check that ``params`` is a mapping with only ``allowed`` keys and all ``required`` ones."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(params).__name__}")
    unknown = sorted(set(params) - set(allowed), key=str)
    if unknown:
        raise ValueError(
            f"{name} has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"expected keys: {', '.join(map(repr, allowed))}"
        )
    for key in required:
        if key not in params:
            raise ValueError(f"{name} is missing the required key {key!r}")
    return params


def window_count(size: int, window: int, stride: int, pad: int, what: str) -> int:
    """Number of window positions along one axis: ``(size + 2*pad - window) / stride + 1``.

    Raises ValueError when the window does not fit or the positions do not tile the padded
    axis exactly (the result is never silently floored).
    """
    count = window_positions(size, window, stride, pad)
    if count is not None:
        return count
    span = size + 2 * pad - window
    padded = f"{size} + 2*pad ({pad}) = {size + 2 * pad}" if pad else f"{size}"
    if span < 0:
        raise ValueError(f"{what} is larger than the input: window {window} > {padded}")
    spelled = f"({size} + 2*{pad} - {window})" if pad else f"({size} - {window})"
    raise ValueError(
        f"{what} does not divide evenly: {spelled} = {span} is not a multiple of stride "
        f"{stride}; crop or pad the input so that it is"
    )


def check_dout(dout: Any, expected_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Check an upstream gradient against the forward output it belongs to."""
    dout = check_array(dout, "dout")
    if dout.shape != tuple(expected_shape):
        raise ValueError(
            f"dout must have the shape of the forward output {tuple(expected_shape)}, "
            f"got {dout.shape}"
        )
    if dout.dtype != dtype:
        raise TypeError(f"dout has dtype {dout.dtype} but the forward pass ran in {dtype}")
    return dout


def check_cache(cache: Any, cache_type: type, forward_name: str) -> None:
    if not isinstance(cache, cache_type):
        raise TypeError(
            f"cache must be the {cache_type.__name__} returned by {forward_name}, "
            f"got {type(cache).__name__}"
        )
