"""Plain NumPy loop implementations of every layer, written straight from the formulas.

This module is the test oracle for :mod:`cnnserve.layers`: slow, obvious, and never used at
run time. Names follow the CS231n source notes (``conv_forward_naive``, ...). Unlike those
notes, the convolution backward works for ``pad=0``, nothing prints, and max-pool backward
sends each window's gradient to one argmax (the first in row-major order).

Arguments are assumed valid (the checked API is :mod:`cnnserve.layers`); window counts that do
not divide evenly raise ValueError rather than being floored. Every function computes in the
dtype of its input.
"""

from __future__ import annotations

import numpy as np


def _positions(size: int, window: int, stride: int, pad: int = 0) -> int:
    span = size + 2 * pad - window
    if span < 0 or span % stride:
        raise ValueError(f"window {window} with stride {stride}, pad {pad} does not tile {size}")
    return span // stride + 1


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------


def conv_forward_naive(x, w, b, conv_param):
    """Convolution by explicit loops over images, filters and output positions.

    Shapes: x (N, C, H, W), w (F, C, HH, WW), b (F,) -> out (N, F, H_out, W_out) with
    ``H_out = (H + 2*pad - HH) / stride + 1``. Returns ``out, (x, w, b, conv_param)``.
    """
    N, C, H, W = x.shape
    F, _, HH, WW = w.shape
    stride, pad = conv_param.get("stride", 1), conv_param.get("pad", 0)
    H_out = _positions(H, HH, stride, pad)
    W_out = _positions(W, WW, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((N, F, H_out, W_out), dtype=x.dtype)
    for n in range(N):
        for f in range(F):
            for i in range(H_out):
                for j in range(W_out):
                    window = xp[n, :, i * stride : i * stride + HH, j * stride : j * stride + WW]
                    out[n, f, i, j] = np.sum(window * w[f]) + b[f]
    return out, (x, w, b, conv_param)


def conv_backward_naive(dout, cache):
    """Backward of :func:`conv_forward_naive`: returns ``dx, dw, db``.

    Gradients accumulate into a padded ``dx`` that is cropped with explicit end indices,
    so ``pad=0`` works.
    """
    x, w, _, conv_param = cache
    N, C, H, W = x.shape
    F, _, HH, WW = w.shape
    stride, pad = conv_param.get("stride", 1), conv_param.get("pad", 0)
    _, _, H_out, W_out = dout.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    db = np.zeros(F, dtype=x.dtype)
    for n in range(N):
        for f in range(F):
            for i in range(H_out):
                for j in range(W_out):
                    g = dout[n, f, i, j]
                    hs, ws = i * stride, j * stride
                    dw[f] += xp[n, :, hs : hs + HH, ws : ws + WW] * g
                    dxp[n, :, hs : hs + HH, ws : ws + WW] += w[f] * g
                    db[f] += g
    dx = dxp[:, :, pad : pad + H, pad : pad + W]
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# Element-wise layers, affine, softmax and losses
# ---------------------------------------------------------------------------------------------


def relu_forward_naive(x):
    """``max(0, x)`` elementwise; returns ``out, x``."""
    out = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        out[idx] = x[idx] if x[idx] > 0 else 0
    return out, x


def relu_backward_naive(dout, cache):
    """Gradient of ReLU: ``dout`` where ``x > 0``, else 0."""
    x = cache
    dx = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        dx[idx] = dout[idx] if x[idx] > 0 else 0
    return dx


def affine_forward_naive(x, w, b):
    """``out[n, m] = sum_d x[n, d] * w[d, m] + b[m]`` with x flattened to (N, D)."""
    N = x.shape[0]
    xf = x.reshape(N, -1)
    D, M = w.shape
    out = np.zeros((N, M), dtype=x.dtype)
    for n in range(N):
        for m in range(M):
            out[n, m] = np.dot(xf[n], w[:, m]) + b[m]
    return out, (x, w, b)


def affine_backward_naive(dout, cache):
    """Backward of :func:`affine_forward_naive`: returns ``dx, dw, db``."""
    x, w, _ = cache
    N = x.shape[0]
    xf = x.reshape(N, -1)
    dx = np.zeros_like(xf)
    dw = np.zeros_like(w)
    for n in range(N):
        dx[n] = w @ dout[n]
        dw += np.outer(xf[n], dout[n])
    return dx.reshape(x.shape), dw, dout.sum(axis=0)


def softmax_forward_naive(x):
    """Row-wise softmax, one row at a time; returns ``p, p``."""
    p = np.zeros_like(x)
    for n in range(x.shape[0]):
        e = np.exp(x[n] - x[n].max())
        p[n] = e / e.sum()
    return p, p


def softmax_backward_naive(dout, cache):
    """Backward of softmax through its Jacobian ``diag(p) - p p^T``, one row at a time."""
    p = cache
    dx = np.zeros_like(p)
    for n in range(p.shape[0]):
        jac = np.diag(p[n]) - np.outer(p[n], p[n])
        dx[n] = jac @ dout[n]
    return dx


def softmax_loss_naive(x, y):
    """Mean cross-entropy ``-log softmax(x)[y]`` and its gradient, one sample at a time."""
    N = x.shape[0]
    loss = 0.0
    dx = np.zeros_like(x)
    for n in range(N):
        e = np.exp(x[n] - x[n].max())
        p = e / e.sum()
        loss -= np.log(p[y[n]])
        dx[n] = p
        dx[n, y[n]] -= 1
    return float(loss / N), dx / N


def svm_loss_naive(x, y):
    """Mean multiclass hinge loss ``sum_{j != y} max(0, x_j - x_y + 1)`` and its gradient."""
    N, C = x.shape
    loss = 0.0
    dx = np.zeros_like(x)
    for n in range(N):
        for j in range(C):
            if j == y[n]:
                continue
            margin = x[n, j] - x[n, y[n]] + 1
            if margin > 0:
                loss += margin
                dx[n, j] += 1
                dx[n, y[n]] -= 1
    return float(loss / N), dx / N


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------


def _pool_sizes(x_shape, pool_param):
    _, _, H, W = x_shape
    ph, pw = pool_param["pool_height"], pool_param["pool_width"]
    stride = pool_param["stride"]
    return ph, pw, stride, _positions(H, ph, stride), _positions(W, pw, stride)


def max_pool_forward_naive(x, pool_param):
    """Max of every ``pool_height x pool_width`` window, by explicit loops.

    Shapes: x (N, C, H, W) -> out (N, C, H_out, W_out) with
    ``H_out = (H - pool_height) / stride + 1`` (exact). A window holding a NaN gives NaN.
    Returns ``out, (x, pool_param)``.
    """
    N, C = x.shape[:2]
    ph, pw, stride, H_out, W_out = _pool_sizes(x.shape, pool_param)
    out = np.zeros((N, C, H_out, W_out), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for i in range(H_out):
                for j in range(W_out):
                    hs, ws = i * stride, j * stride
                    out[n, c, i, j] = np.max(x[n, c, hs : hs + ph, ws : ws + pw])
    return out, (x, pool_param)


def max_pool_backward_naive(dout, cache):
    """Backward of :func:`max_pool_forward_naive`: returns ``dx``.

    Each window's gradient goes to ONE position, the first maximum in row-major order
    (``np.argmax`` of the C-order window returns the first occurrence, or the first NaN), not
    to every tied maximum as in the source notes. Overlapping windows accumulate.
    """
    x, pool_param = cache
    N, C = x.shape[:2]
    ph, pw, stride, H_out, W_out = _pool_sizes(x.shape, pool_param)
    dx = np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for i in range(H_out):
                for j in range(W_out):
                    hs, ws = i * stride, j * stride
                    k = int(np.argmax(x[n, c, hs : hs + ph, ws : ws + pw]))
                    dx[n, c, hs + k // pw, ws + k % pw] += dout[n, c, i, j]
    return dx


def avg_pool_forward_naive(x, pool_param):
    """Mean of every ``pool_height x pool_width`` window, by explicit loops.

    Same shapes as :func:`max_pool_forward_naive`; returns ``out, (x, pool_param)``.
    """
    N, C = x.shape[:2]
    ph, pw, stride, H_out, W_out = _pool_sizes(x.shape, pool_param)
    out = np.zeros((N, C, H_out, W_out), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            for i in range(H_out):
                for j in range(W_out):
                    hs, ws = i * stride, j * stride
                    out[n, c, i, j] = np.sum(x[n, c, hs : hs + ph, ws : ws + pw]) / (ph * pw)
    return out, (x, pool_param)


def avg_pool_backward_naive(dout, cache):
    """Backward of :func:`avg_pool_forward_naive`: returns ``dx``.

    Each window's ``dout / (pool_height * pool_width)`` is added to every position of the
    window; overlapping windows accumulate.
    """
    x, pool_param = cache
    N, C = x.shape[:2]
    ph, pw, stride, H_out, W_out = _pool_sizes(x.shape, pool_param)
    dx = np.zeros_like(x)
    for n in range(N):
        for c in range(C):
            for i in range(H_out):
                for j in range(W_out):
                    hs, ws = i * stride, j * stride
                    dx[n, c, hs : hs + ph, ws : ws + pw] += dout[n, c, i, j] / (ph * pw)
    return dx


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------
