"""Max and average pooling, forward and backward, on the compiled kernels of ``pool.pyx``."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from cnnserve._ext import load
from cnnserve.layers._checks import (
    check_array,
    check_cache,
    check_dout,
    check_param_int,
    check_params,
    window_count,
)

_pool = load("pool")

__all__ = [
    "AvgPoolCache",
    "MaxPoolCache",
    "avg_pool_backward",
    "avg_pool_forward",
    "max_pool_backward",
    "max_pool_forward",
]

_POOL_KEYS = ("pool_height", "pool_width", "stride")


class MaxPoolCache(NamedTuple):
    """What :func:`max_pool_backward` needs from :func:`max_pool_forward`."""

    x_shape: tuple[int, int, int, int]  # (N, C, H, W)
    dtype: np.dtype  # dtype of x, hence of dout and dx
    argmax: np.ndarray  # (N, C, H_out, W_out) intp: flat index h * W + w of each window's max
    window: tuple[int, int, int]  # (pool_height, pool_width, stride)


class AvgPoolCache(NamedTuple):
    """What :func:`avg_pool_backward` needs from :func:`avg_pool_forward`."""

    x_shape: tuple[int, int, int, int]  # (N, C, H, W)
    dtype: np.dtype  # dtype of x, hence of dout and dx
    pool_param: dict  # {'pool_height': int, 'pool_width': int, 'stride': int}, a normalised copy


def _pool_geometry(x: Any, pool_param: Any, what: str) -> tuple[np.ndarray, dict, int, int]:
    """Check a pooling call; return ``x``, a normalised ``pool_param`` and ``H_out, W_out``."""
    x = check_array(x, "x", 4, "(N, C, H, W)")
    params = check_params(pool_param, "pool_param", _POOL_KEYS, _POOL_KEYS)
    norm = {key: check_param_int(params[key], f"pool_param[{key!r}]", 1) for key in _POOL_KEYS}
    _, _, H, W = x.shape
    stride = norm["stride"]
    H_out = window_count(H, norm["pool_height"], stride, 0, f"{what}: pool_height along H")
    W_out = window_count(W, norm["pool_width"], stride, 0, f"{what}: pool_width along W")
    return x, norm, H_out, W_out


def max_pool_forward(x: np.ndarray, pool_param: dict) -> tuple[np.ndarray, MaxPoolCache]:
    """Forward pass of max pooling: the largest value of every window, per channel.

    Windows may tile the input (2x2, stride 2) or overlap (3x3, stride 2); there is no padding.
    A window holding a NaN yields NaN (NaN propagates, as in PyTorch).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
        Input batch, float32 or float64.
    pool_param : dict
        ``'pool_height'``, ``'pool_width'`` and ``'stride'``, all required ints >= 1.

    Returns
    -------
    out : ndarray, shape (N, C, H_out, W_out)
        Same dtype as x.
    cache : MaxPoolCache
        For :func:`max_pool_backward`: the input shape and dtype and the position of the
        maximum of every window (the first in row-major order when several are equal, the
        first NaN when there is one).

    Shape
    -----
    ``H_out = (H - pool_height) / stride + 1`` and ``W_out = (W - pool_width) / stride + 1``;
    both divisions must be exact and the window must fit in the input, else ValueError.
    """
    x, norm, H_out, W_out = _pool_geometry(x, pool_param, "max pool")
    N, C = x.shape[:2]
    out = np.empty((N, C, H_out, W_out), dtype=x.dtype)
    argmax = np.empty((N, C, H_out, W_out), dtype=np.intp)
    ph, pw, stride = norm["pool_height"], norm["pool_width"], norm["stride"]
    _pool.max_pool_forward(np.ascontiguousarray(x), out, argmax, ph, pw, stride)
    argmax.flags.writeable = False  # the backward kernel indexes dx with it
    return out, MaxPoolCache(x.shape, x.dtype, argmax, (ph, pw, stride))


def max_pool_backward(dout: np.ndarray, cache: MaxPoolCache) -> np.ndarray:
    """Backward pass of :func:`max_pool_forward`.

    Each window's gradient goes, whole, to ONE input position: its first maximum in row-major
    order (as in PyTorch), never split over tied maxima. Overlapping windows that share that
    position add up there; every other position gets 0.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H_out, W_out)
        Upstream gradient, in the dtype of the forward input.
    cache : MaxPoolCache
        From :func:`max_pool_forward`.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    """
    check_cache(cache, MaxPoolCache, "max_pool_forward")
    x_shape, dtype, argmax = cache.x_shape, cache.dtype, cache.argmax
    N, C, H, W = x_shape
    # The kernel writes dx at these indices unchecked: a cache that was edited or built by
    # hand must fail here, not corrupt memory.
    if (
        not isinstance(argmax, np.ndarray)
        or argmax.dtype != np.intp
        or argmax.ndim != 4
        or argmax.shape[:2] != (N, C)
        or (argmax.size and (argmax.min() < 0 or argmax.max() >= H * W))
    ):
        raise ValueError(
            "cache.argmax does not belong to an input of shape "
            f"{tuple(x_shape)}: pass the cache that max_pool_forward returned, unchanged"
        )
    window = cache.window
    if not (
        isinstance(window, tuple)
        and len(window) == 3
        and all(isinstance(v, int) and v >= 1 for v in window)
        and (H - window[0]) % window[2] == 0
        and (W - window[1]) % window[2] == 0
        and argmax.shape[2:] == ((H - window[0]) // window[2] + 1, (W - window[1]) // window[2] + 1)
    ):
        raise ValueError(
            f"cache.window {window!r} does not give the pooled shape "
            f"{argmax.shape[2:]} from {(H, W)}: pass the cache that max_pool_forward returned"
        )
    ph, pw, stride = window
    dout = check_dout(dout, argmax.shape, dtype)
    dx = np.empty(x_shape, dtype=dtype)
    # 2x2 windows at stride 2 tile the input: each window writes its own four pixels.
    tiles = (ph, pw, stride) == (2, 2, 2)
    _pool.max_pool_backward(
        np.ascontiguousarray(dout), np.ascontiguousarray(argmax), dx.reshape(N, C, H * W), W, tiles
    )
    return dx


def avg_pool_forward(x: np.ndarray, pool_param: dict) -> tuple[np.ndarray, AvgPoolCache]:
    """Forward pass of average pooling: the mean of every window, per channel.

    Windows may tile the input or overlap; there is no padding, so every window averages
    ``pool_height * pool_width`` input values.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
        Input batch, float32 or float64.
    pool_param : dict
        ``'pool_height'``, ``'pool_width'`` and ``'stride'``, all required ints >= 1.

    Returns
    -------
    out : ndarray, shape (N, C, H_out, W_out)
        Same dtype as x (the sums accumulate in float64).
    cache : AvgPoolCache
        For :func:`avg_pool_backward`.

    Shape
    -----
    ``H_out = (H - pool_height) / stride + 1`` and ``W_out = (W - pool_width) / stride + 1``;
    both divisions must be exact and the window must fit in the input, else ValueError.
    """
    x, norm, H_out, W_out = _pool_geometry(x, pool_param, "avg pool")
    N, C = x.shape[:2]
    out = np.empty((N, C, H_out, W_out), dtype=x.dtype)
    ph, pw, stride = norm["pool_height"], norm["pool_width"], norm["stride"]
    _pool.avg_pool_forward(np.ascontiguousarray(x), out, ph, pw, stride)
    return out, AvgPoolCache(x.shape, x.dtype, norm)


def avg_pool_backward(dout: np.ndarray, cache: AvgPoolCache) -> np.ndarray:
    """Backward pass of :func:`avg_pool_forward`.

    Each window's gradient is split evenly, ``dout / (pool_height * pool_width)``, over the
    window; overlapping windows add up.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H_out, W_out)
        Upstream gradient, in the dtype of the forward input.
    cache : AvgPoolCache
        From :func:`avg_pool_forward`.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    """
    check_cache(cache, AvgPoolCache, "avg_pool_forward")
    x_shape, dtype, norm = cache
    N, C, H, W = x_shape
    ph, pw, stride = norm["pool_height"], norm["pool_width"], norm["stride"]
    H_out, W_out = (H - ph) // stride + 1, (W - pw) // stride + 1
    dout = check_dout(dout, (N, C, H_out, W_out), dtype)
    dx = np.empty(x_shape, dtype=dtype)
    _pool.avg_pool_backward(np.ascontiguousarray(dout), dx, ph, pw, stride)
    return dx
