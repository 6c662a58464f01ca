"""Element-wise layers, affine, softmax, the losses and dropout (vectorised NumPy, plus the
ReLU backward kernel)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from cnnserve._checks import check_labels, check_number
from cnnserve._ext import load
from cnnserve.layers._checks import (
    check_array,
    check_cache,
    check_dout,
    check_param_int,
    check_params,
    check_same_dtype,
    check_shape,
)

_activation = load("activation")

__all__ = [
    "AffineCache",
    "DropoutCache",
    "affine_backward",
    "affine_forward",
    "dropout_backward",
    "dropout_forward",
    "relu_backward",
    "relu_forward",
    "softmax_backward",
    "softmax_forward",
    "softmax_loss",
    "svm_loss",
]


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rectified linear unit ``max(0, x)``, elementwise.

    Parameters
    ----------
    x : ndarray, any shape
        float32 or float64.

    Returns
    -------
    out : ndarray, shape of x, dtype of x
    cache : ndarray
        ``x`` itself (a reference: do not modify x before the backward pass).

    Shape
    -----
    ``out.shape == x.shape``.
    """
    x = check_array(x, "x")
    return np.maximum(x, 0, out=np.empty_like(x)), x


def relu_backward(dout: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """Backward pass of :func:`relu_forward`: ``dout`` where ``x > 0``, else 0.

    Parameters
    ----------
    dout : ndarray, shape of x
        Upstream gradient, in the dtype of x.
    cache : ndarray
        From :func:`relu_forward`.

    Returns
    -------
    dx : ndarray, shape of x
        The gradient at exactly ``x == 0`` is 0, as in PyTorch.
    """
    x = check_array(cache, "cache")
    dout = check_dout(dout, x.shape, x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype)
    flat = [np.ascontiguousarray(a).reshape(-1) for a in (x, dout)]
    _activation.relu_backward(*flat, dx.reshape(-1))
    return dx


class AffineCache(NamedTuple):
    """What :func:`affine_backward` needs from :func:`affine_forward` (``x, w, b = cache``)."""

    x: np.ndarray  # (N, d_1, ..., d_k), the caller's array
    w: np.ndarray  # (D, M)
    b: np.ndarray  # (M,)


def affine_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, AffineCache]:
    """Fully connected layer ``x.reshape(N, D) @ w + b``.

    Parameters
    ----------
    x : ndarray, shape (N, d_1, ..., d_k)
        Each sample is flattened in C order to D = d_1 * ... * d_k values (an (N, C, H, W)
        volume in NCHW order).
    w : ndarray, shape (D, M)
    b : ndarray, shape (M,)

    Returns
    -------
    out : ndarray, shape (N, M)
    cache : AffineCache
        For :func:`affine_backward`; it references x, w and b.

    Shape
    -----
    ``(N, d_1, ..., d_k) -> (N, M)`` with ``D = d_1 * ... * d_k == w.shape[0]``.
    """
    x = check_array(x, "x")
    w = check_array(w, "w", 2, "(D, M)")
    b = check_array(b, "b", 1, "(M,)")
    check_same_dtype("x", x, w=w, b=b)
    if x.ndim < 2:
        raise ValueError(f"x must be at least 2-D (N, d_1, ..., d_k), got shape {x.shape}")
    D = math.prod(x.shape[1:])
    if w.shape[0] != D:
        raise ValueError(
            f"w must have {D} rows (x.shape[1:] = {x.shape[1:]} flattens to D = {D}), "
            f"got shape {w.shape}"
        )
    check_shape(b, "b", (w.shape[1],), "(one bias per output unit)")
    out = x.reshape(x.shape[0], D) @ w
    out += b
    return out, AffineCache(x, w, b)


def affine_backward(
    dout: np.ndarray, cache: AffineCache, *, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Backward pass of :func:`affine_forward`.

    Parameters
    ----------
    dout : ndarray, shape (N, M)
        Upstream gradient.
    cache : AffineCache
        From :func:`affine_forward`.
    need_dx : bool, keyword-only
        False when nothing needs the input's gradient (the first layer of a network): ``dx``
        is then None and not computed.

    Returns
    -------
    dx : ndarray, shape (N, d_1, ..., d_k), or None without ``need_dx``
    dw : ndarray, shape (D, M)
    db : ndarray, shape (M,)
    """
    check_cache(cache, AffineCache, "affine_forward")
    if not isinstance(need_dx, bool):
        raise TypeError(f"need_dx must be a bool, got {type(need_dx).__name__}")
    x, w, _ = cache
    N, M = x.shape[0], w.shape[1]
    dout = check_dout(dout, (N, M), x.dtype)
    dx = (dout @ w.T).reshape(x.shape) if need_dx else None
    dw = x.reshape(N, -1).T @ dout
    db = dout.sum(axis=0)
    return dx, dw, db


def _softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) scores, shifted by the row max for stability."""
    shifted = x - x.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def softmax_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over classes: ``out[i, j] = exp(x[i, j]) / sum_k exp(x[i, k])``.

    Parameters
    ----------
    x : ndarray, shape (N, C)
        Class scores.

    Returns
    -------
    out : ndarray, shape (N, C)
        Rows are probabilities summing to 1.
    cache : ndarray, shape (N, C)
        A private copy of ``out``, so that editing ``out`` in place (``out[range(N), y] -= 1``)
        does not change the backward pass.

    Shape
    -----
    ``(N, C) -> (N, C)``.
    """
    x = check_array(x, "x", 2, "(N, C)")
    out = _softmax(x)
    return out, out.copy()


def softmax_backward(dout: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """Backward pass of :func:`softmax_forward`: ``p * (dout - sum(dout * p, axis=1))``.

    Parameters
    ----------
    dout : ndarray, shape (N, C)
    cache : ndarray, shape (N, C)
        From :func:`softmax_forward` (the probabilities p).

    Returns
    -------
    dx : ndarray, shape (N, C)
    """
    p = check_array(cache, "cache", 2, "(N, C)")
    dout = check_dout(dout, p.shape, p.dtype)
    return p * (dout - (dout * p).sum(axis=1, keepdims=True))


def softmax_loss(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax scores, and its gradient.

    Parameters
    ----------
    x : ndarray, shape (N, C)
        Class scores.
    y : ndarray of int, shape (N,)
        Labels, ``0 <= y[i] < C``.

    Returns
    -------
    loss : float
    dx : ndarray, shape (N, C)
    """
    x = check_array(x, "x", 2, "(N, C)")
    N, C = x.shape
    y = check_labels(y, N, C)
    shifted = x - x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))  # (N,)
    rows = np.arange(N)
    loss = float(np.mean(log_z - shifted[rows, y]))
    dx = np.exp(shifted - log_z[:, None])  # probabilities, (N, C)
    dx[rows, y] -= 1
    dx /= N
    return loss, dx


def svm_loss(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean multiclass hinge loss ``sum_{j != y} max(0, x_j - x_y + 1)``, and its gradient.

    Parameters
    ----------
    x : ndarray, shape (N, C)
    y : ndarray of int, shape (N,)

    Returns
    -------
    loss : float
    dx : ndarray, shape (N, C)
    """
    x = check_array(x, "x", 2, "(N, C)")
    N, C = x.shape
    y = check_labels(y, N, C)
    rows = np.arange(N)
    margins = np.maximum(0, x - x[rows, y][:, None] + 1)  # (N, C)
    margins[rows, y] = 0
    loss = float(margins.sum() / N)
    dx = (margins > 0).astype(x.dtype)
    dx[rows, y] -= dx.sum(axis=1)
    dx /= N
    return loss, dx


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


class DropoutCache(NamedTuple):
    """What :func:`dropout_backward` needs from :func:`dropout_forward`."""

    dropout_param: dict  # a copy of the checked dropout_param
    shape: tuple[int, ...]  # shape of x
    dtype: np.dtype  # dtype of x
    mask: np.ndarray | None  # 0 or 1/p, shape of x, in 'train' mode; None in 'test' mode


def dropout_forward(x: np.ndarray, dropout_param: dict) -> tuple[np.ndarray, DropoutCache]:
    """Inverted dropout: keep each unit with probability ``p`` and scale kept ones by ``1/p``.

    The expected value of every output equals the input, so nothing changes at test time.

    Parameters
    ----------
    x : ndarray, any shape
    dropout_param : dict
        ``'p'`` (required): the probability of KEEPING a unit, ``0 < p <= 1``;
        ``'mode'`` (required): ``'train'`` drops units, ``'test'`` returns a copy of ``x``;
        ``'seed'`` (optional int >= 0): the same seed gives the same mask (numpy's
        ``default_rng``); without it every call draws a fresh mask.

    Returns
    -------
    out : ndarray, shape and dtype of x
    cache : DropoutCache
        For :func:`dropout_backward`.

    Shape
    -----
    ``out.shape == x.shape``.
    """
    x = check_array(x, "x")
    params = check_params(dropout_param, "dropout_param", ("p", "mode", "seed"), ("p", "mode"))
    p = check_number(params["p"], "dropout_param['p']", 0, 1, "(]", "the keep probability")
    mode = params["mode"]
    if mode not in ("train", "test"):
        raise ValueError(f"dropout_param['mode'] must be 'train' or 'test', got {mode!r}")
    seed = params.get("seed")
    if seed is not None:
        seed = check_param_int(seed, "dropout_param['seed']", 0, maximum=2**128)
    if mode == "test":
        return x.copy(), DropoutCache(dict(params), x.shape, x.dtype, None)
    if 1.0 / p > float(np.finfo(x.dtype).max):
        raise ValueError(f"dropout_param['p'] = {p} is too small for {x.dtype}: 1/p overflows")
    rng = np.random.default_rng(seed)
    mask = (rng.random(x.shape, dtype=x.dtype) < p).astype(x.dtype)
    mask *= x.dtype.type(1.0 / p)
    return x * mask, DropoutCache(dict(params), x.shape, x.dtype, mask)


def dropout_backward(dout: np.ndarray, cache: DropoutCache) -> np.ndarray:
    """Backward pass of :func:`dropout_forward`: ``dout * mask`` in train mode, else ``dout``.

    Parameters
    ----------
    dout : ndarray, shape of x
    cache : DropoutCache
        From :func:`dropout_forward`.

    Returns
    -------
    dx : ndarray, shape and dtype of x
    """
    check_cache(cache, DropoutCache, "dropout_forward")
    dout = check_dout(dout, cache.shape, cache.dtype)
    if cache.mask is None:
        return dout.copy()
    return dout * cache.mask
