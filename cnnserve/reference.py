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


def batchnorm_forward_naive(x, gamma, beta, bn_param):
    """Batchnorm of (N, D) features, one feature at a time, as a staged computation graph.

    'train': per feature ``mu = sum(x) / N``, ``var = sum((x - mu)**2) / N`` (biased), then the
    running statistics are replaced by ``momentum * old + (1 - momentum) * batch`` (new arrays;
    missing ones start as zeros and ones). 'test': the running statistics are used and
    ``bn_param`` is not changed. Returns ``out, cache`` for :func:`batchnorm_backward_naive`.
    """
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    N, D = x.shape
    running_mean = bn_param.get("running_mean", np.zeros(D, dtype=x.dtype))
    running_var = bn_param.get("running_var", np.ones(D, dtype=x.dtype))
    xmu = np.zeros_like(x)  # x - mu, (N, D)
    var = np.zeros(D, dtype=x.dtype)
    if mode == "train":
        mu = np.zeros(D, dtype=x.dtype)
        for d in range(D):
            mu[d] = np.sum(x[:, d]) / N
            for n in range(N):
                xmu[n, d] = x[n, d] - mu[d]
            var[d] = np.sum(xmu[:, d] ** 2) / N
        bn_param["running_mean"] = momentum * running_mean + (1 - momentum) * mu
        bn_param["running_var"] = momentum * running_var + (1 - momentum) * var
    elif mode == "test":
        for d in range(D):
            xmu[:, d] = x[:, d] - running_mean[d]
            var[d] = running_var[d]
    else:
        raise ValueError(f"unknown batchnorm mode {mode!r}")
    sqrtvar = np.sqrt(var + eps)  # (D,)
    ivar = 1 / sqrtvar  # (D,)
    xhat = xmu * ivar  # (N, D)
    out = gamma * xhat + beta
    return out, (mode, xhat, gamma, xmu, ivar, sqrtvar, var, eps)


def batchnorm_backward_naive(dout, cache):
    """Backward of :func:`batchnorm_forward_naive`, node by node back through its graph.

    'train' graph: ``mu = mean(x)``, ``xmu = x - mu``, ``sq = xmu**2``, ``var = mean(sq)``,
    ``sqrtvar = sqrt(var + eps)``, ``ivar = 1 / sqrtvar``, ``xhat = xmu * ivar``,
    ``out = gamma * xhat + beta``. In 'test' mode mu and var are constants. Returns
    ``dx, dgamma, dbeta``.
    """
    mode, xhat, gamma, xmu, ivar, sqrtvar, var, eps = cache
    N = dout.shape[0]
    dbeta = np.sum(dout, axis=0)
    dgamma = np.sum(dout * xhat, axis=0)
    dxhat = dout * gamma
    dxmu1 = dxhat * ivar  # through xhat = xmu * ivar, directly
    if mode == "test":
        return dxmu1, dgamma, dbeta
    divar = np.sum(dxhat * xmu, axis=0)
    dsqrtvar = -1 / sqrtvar**2 * divar
    dvar = 0.5 / np.sqrt(var + eps) * dsqrtvar
    dsq = np.ones_like(xmu) / N * dvar
    dxmu2 = 2 * xmu * dsq  # through sq = xmu**2
    dxmu = dxmu1 + dxmu2
    dmu = -np.sum(dxmu, axis=0)
    dx = dxmu + np.ones_like(xmu) / N * dmu  # through xmu = x - mu and mu = mean(x)
    return dx, dgamma, dbeta


def spatial_batchnorm_forward_naive(x, gamma, beta, bn_param):
    """Batchnorm of (N, C, H, W) per channel: (N*H*W, C) rows through the (N, D) version."""
    N, C, H, W = x.shape
    rows = x.transpose(0, 2, 3, 1).reshape(N * H * W, C)
    out, cache = batchnorm_forward_naive(rows, gamma, beta, bn_param)
    return out.reshape(N, H, W, C).transpose(0, 3, 1, 2), (x.shape, cache)


def spatial_batchnorm_backward_naive(dout, cache):
    """Backward of :func:`spatial_batchnorm_forward_naive`: returns ``dx, dgamma, dbeta``."""
    (N, C, H, W), bn_cache = cache
    drows = dout.transpose(0, 2, 3, 1).reshape(N * H * W, C)
    dx, dgamma, dbeta = batchnorm_backward_naive(drows, bn_cache)
    return dx.reshape(N, H, W, C).transpose(0, 3, 1, 2), dgamma, dbeta


def _normalize_block(block, eps):
    """Return ``xhat``, ``1 / sqrt(var + eps)`` of one block of values (any shape)."""
    mu = np.sum(block) / block.size
    var = np.sum((block - mu) ** 2) / block.size
    ivar = 1 / np.sqrt(var + eps)
    return (block - mu) * ivar, ivar


def _normalize_block_backward(dxhat, xhat, ivar):
    """dx of one block from dxhat through the Jacobian of xhat (x normalised by its own stats).

    ``d xhat_i / d x_j = ivar * (delta_ij - 1/K - xhat_i * xhat_j / K)`` for K values.
    """
    K = xhat.size
    xh = xhat.reshape(K)
    jac = ivar * (np.eye(K, dtype=xhat.dtype) - 1 / K - np.outer(xh, xh) / K)  # (K, K)
    return (jac.T @ dxhat.reshape(K)).reshape(xhat.shape)


def layernorm_forward_naive(x, gamma, beta, ln_param):
    """Layer norm of (N, D): each row normalised by its own mean and biased variance."""
    eps = ln_param.get("eps", 1e-5)
    N, D = x.shape
    xhat = np.zeros_like(x)
    ivar = np.zeros(N, dtype=x.dtype)
    out = np.zeros_like(x)
    for n in range(N):
        xhat[n], ivar[n] = _normalize_block(x[n], eps)
        for d in range(D):
            out[n, d] = gamma[d] * xhat[n, d] + beta[d]
    return out, (xhat, ivar, gamma)


def layernorm_backward_naive(dout, cache):
    """Backward of :func:`layernorm_forward_naive` through each row's Jacobian."""
    xhat, ivar, gamma = cache
    dx = np.zeros_like(xhat)
    for n in range(xhat.shape[0]):
        dx[n] = _normalize_block_backward(dout[n] * gamma, xhat[n], ivar[n])
    return dx, np.sum(dout * xhat, axis=0), np.sum(dout, axis=0)


def spatial_groupnorm_forward_naive(x, gamma, beta, G, gn_param):
    """Group norm of (N, C, H, W): each sample's channels in G groups of C/G, normalised per
    (sample, group); gamma and beta are (1, C, 1, 1)."""
    eps = gn_param.get("eps", 1e-5)
    N, C, H, W = x.shape
    Cg = C // G
    xhat = np.zeros_like(x)
    ivar = np.zeros((N, G), dtype=x.dtype)
    for n in range(N):
        for g in range(G):
            group = slice(g * Cg, (g + 1) * Cg)
            xhat[n, group], ivar[n, g] = _normalize_block(x[n, group], eps)
    out = gamma * xhat + beta
    return out, (xhat, ivar, gamma, G)


def spatial_groupnorm_backward_naive(dout, cache):
    """Backward of :func:`spatial_groupnorm_forward_naive`; dgamma, dbeta are (1, C, 1, 1)."""
    xhat, ivar, gamma, G = cache
    N, C, H, W = xhat.shape
    Cg = C // G
    dxhat = dout * gamma
    dx = np.zeros_like(xhat)
    for n in range(N):
        for g in range(G):
            group = slice(g * Cg, (g + 1) * Cg)
            dx[n, group] = _normalize_block_backward(dxhat[n, group], xhat[n, group], ivar[n, g])
    dgamma = np.sum(dout * xhat, axis=(0, 2, 3), keepdims=True)
    dbeta = np.sum(dout, axis=(0, 2, 3), keepdims=True)
    return dx, dgamma, dbeta
