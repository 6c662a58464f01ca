"""Normalisation: batch norm (vectors and feature maps), layer norm and group norm, forward
and backward, on the compiled kernels of ``norm.pyx``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from cnnserve._checks import check_number
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

_norm = load("norm")

__all__ = [
    "BatchnormCache",
    "GroupnormCache",
    "LayernormCache",
    "SpatialBatchnormCache",
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "batchnorm_forward",
    "layernorm_backward",
    "layernorm_forward",
    "spatial_batchnorm_backward",
    "spatial_batchnorm_forward",
    "spatial_groupnorm_backward",
    "spatial_groupnorm_forward",
]

_BN_PARAM_KEYS = ("mode", "eps", "momentum", "running_mean", "running_var")
# 'mode' is accepted (and ignored) by layernorm and groupnorm, which behave the same in training
# and at test time, so that code passing one param dict per layer to every norm layer works.
_NORM_PARAM_KEYS = ("eps", "mode")


class BatchnormCache(NamedTuple):
    """What :func:`batchnorm_backward` needs from :func:`batchnorm_forward`."""

    x: np.ndarray  # (N, D), C-contiguous (the caller's array when it already was)
    gamma: np.ndarray  # (D,), C-contiguous
    mean: np.ndarray  # (D,) float64: batch mean ('train') or running mean ('test')
    inv_std: np.ndarray  # (D,) float64: 1 / sqrt(var + eps) of the statistics used
    mode: str  # 'train' or 'test'


class SpatialBatchnormCache(NamedTuple):
    """What :func:`spatial_batchnorm_backward` needs from :func:`spatial_batchnorm_forward`."""

    x: np.ndarray  # (N, C, H, W), C-contiguous
    gamma: np.ndarray  # (C,), C-contiguous
    mean: np.ndarray  # (C,) float64
    inv_std: np.ndarray  # (C,) float64
    mode: str  # 'train' or 'test'


class LayernormCache(NamedTuple):
    """What :func:`layernorm_backward` needs from :func:`layernorm_forward`."""

    x: np.ndarray  # (N, D), C-contiguous
    gamma: np.ndarray  # (D,), C-contiguous
    mean: np.ndarray  # (N, 1) float64, per sample
    inv_std: np.ndarray  # (N, 1) float64


class GroupnormCache(NamedTuple):
    """What :func:`spatial_groupnorm_backward` needs from :func:`spatial_groupnorm_forward`."""

    x: np.ndarray  # (N, C, H, W), C-contiguous
    gamma: np.ndarray  # (C,), C-contiguous (the (1, C, 1, 1) argument flattened)
    G: int  # number of groups, divides C
    mean: np.ndarray  # (N, G) float64, per sample and group
    inv_std: np.ndarray  # (N, G) float64


def _check_eps(params: Mapping, name: str) -> float:
    """Return ``params['eps']`` (default 1e-5) as a float after checking it is finite and > 0."""
    return check_number(params.get("eps", 1e-5), f"{name}['eps']", 0, math.inf, "()")


def _check_mode(params: Mapping, name: str) -> str | None:
    """Return ``params['mode']`` if it is 'train' or 'test', None if it is absent."""
    if "mode" not in params:
        return None
    mode = params["mode"]
    if not isinstance(mode, str) or mode not in ("train", "test"):
        raise ValueError(f"{name}['mode'] must be 'train' or 'test', got {mode!r}")
    return mode


def _check_momentum(params: Mapping) -> float:
    """Return ``params['momentum']`` (default 0.9) after checking it is in [0, 1)."""
    return check_number(params.get("momentum", 0.9), "bn_param['momentum']", 0, 1, "[)")


def _running_stat(params: Mapping, key: str, x: np.ndarray, C: int, default: float) -> np.ndarray:
    """Return ``params[key]`` checked to be a (C,) array of x's dtype, or a filled default."""
    if key not in params:
        return np.full(C, default, dtype=x.dtype)
    name = f"bn_param[{key!r}]"
    stat = check_array(params[key], name, 1, "(C,)")
    check_shape(stat, name, (C,), "(one value per channel of x)")
    check_same_dtype("x", x, **{name: stat})
    return stat


def _check_norm_affine(
    x: np.ndarray, gamma: Any, beta: Any, shape: tuple[int, ...], layout: str, meaning: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check gamma and beta: arrays of x's dtype and of the given shape."""
    gamma = check_array(gamma, "gamma", len(shape), layout)
    beta = check_array(beta, "beta", len(shape), layout)
    check_same_dtype("x", x, gamma=gamma, beta=beta)
    check_shape(gamma, "gamma", shape, meaning)
    check_shape(beta, "beta", shape, meaning)
    return gamma, beta


def _batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Shared body of the batchnorm forwards; x is (N, C, ...) and gamma, beta are (C,).

    Returns ``out, x_contiguous, gamma_contiguous, mean, inv_std, mode``.
    """
    params = check_params(bn_param, "bn_param", _BN_PARAM_KEYS, ("mode",))
    mode = _check_mode(params, "bn_param")
    eps = _check_eps(params, "bn_param")
    momentum = _check_momentum(params)
    N, C = x.shape[:2]
    running_mean = _running_stat(params, "running_mean", x, C, 0.0)
    running_var = _running_stat(params, "running_var", x, C, 1.0)
    for key, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if not np.all(np.isfinite(stat)):
            raise ValueError(f"bn_param[{key!r}] must be finite, got NaN or inf")
    if np.any(running_var < 0):
        raise ValueError("bn_param['running_var'] must be >= 0, got a negative variance")
    if mode == "train" and not callable(getattr(params, "__setitem__", None)):
        raise TypeError(
            "bn_param must be a mutable mapping (a dict) in 'train' mode: the running "
            f"statistics are written back into it; got {type(params).__name__}"
        )

    x_c = np.ascontiguousarray(x)
    x3 = x_c.reshape(N, C, -1)  # (N, C, S), a view
    gamma_c = np.ascontiguousarray(gamma)
    out = np.empty(x.shape, dtype=x.dtype)
    out3 = out.reshape(N, C, -1)  # (N, C, S), a view the kernel writes into
    if mode == "train":
        mean = np.empty(C)
        var = np.empty(C)
        inv_std = np.empty(C)
        _norm.channel_forward(
            x3, gamma_c, np.ascontiguousarray(beta), eps, out3, mean, var, inv_std
        )
        # New arrays: the caller's running statistics are replaced, never modified in place.
        params["running_mean"] = (
            momentum * running_mean.astype(np.float64) + (1.0 - momentum) * mean
        ).astype(x.dtype)
        params["running_var"] = (
            momentum * running_var.astype(np.float64) + (1.0 - momentum) * var
        ).astype(x.dtype)
    else:
        mean = running_mean.astype(np.float64)
        inv_std = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        _norm.channel_affine(x3, mean, inv_std, gamma_c, np.ascontiguousarray(beta), out3)
    return out, x_c, gamma_c, mean, inv_std, mode


def _batchnorm_backward(
    dout: Any, cache: BatchnormCache | SpatialBatchnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of the batchnorm backwards (cache already type-checked)."""
    x, gamma, mean, inv_std, mode = cache
    N, C = x.shape[:2]
    dout = check_dout(dout, x.shape, x.dtype)
    dout3 = np.ascontiguousarray(dout).reshape(N, C, -1)  # (N, C, S)
    dx = np.empty(x.shape, dtype=x.dtype)
    dgamma = np.empty(C, dtype=x.dtype)
    dbeta = np.empty(C, dtype=x.dtype)
    _norm.channel_backward(
        dout3,
        x.reshape(N, C, -1),
        mean,
        inv_std,
        gamma,
        mode == "train",
        dx.reshape(N, C, -1),
        dgamma,
        dbeta,
    )
    return dx, dgamma, dbeta


def batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict
) -> tuple[np.ndarray, BatchnormCache]:
    """Batch normalisation of features: ``out = gamma * (x - mean) / sqrt(var + eps) + beta``.

    In ``'train'`` mode ``mean`` and ``var`` are the per-feature mean and biased (divided by N)
    variance of this batch, and the running statistics are updated as

    ``running_mean = momentum * running_mean + (1 - momentum) * mean``,
    ``running_var = momentum * running_var + (1 - momentum) * var``

    and written back into ``bn_param`` as NEW arrays (the arrays that were there are not
    modified). In ``'test'`` mode ``mean`` and ``var`` are the running statistics and
    ``bn_param`` is left untouched.

    This is the CS231n convention. PyTorch's ``BatchNorm`` ``momentum`` is ``1 - momentum``
    here (its default 0.1 is 0.9 here), and PyTorch keeps the unbiased (divided by N - 1) batch
    variance in ``running_var``, while this layer keeps the biased one that it normalises with.

    Parameters
    ----------
    x : ndarray, shape (N, D)
    gamma : ndarray, shape (D,)
        Scale.
    beta : ndarray, shape (D,)
        Shift.
    bn_param : dict
        ``'mode'`` (required): ``'train'`` or ``'test'``;
        ``'eps'`` (number > 0, default 1e-5): added to the variance;
        ``'momentum'`` (in [0, 1), default 0.9): weight of the old running statistics;
        ``'running_mean'``, ``'running_var'`` (ndarray (D,) of x's dtype): when missing they
        start as zeros and ones respectively. No other key is accepted.

    Returns
    -------
    out : ndarray, shape (N, D), dtype of x
    cache : BatchnormCache
        For :func:`batchnorm_backward` (in either mode).

    Shape
    -----
    ``out`` has the shape of ``x``; statistics are per feature, over the N samples. With
    N = 1 in 'train' mode every ``x - mean`` is 0 and ``out`` is ``beta``.
    """
    x = check_array(x, "x", 2, "(N, D)")
    gamma, beta = _check_norm_affine(
        x, gamma, beta, (x.shape[1],), "(D,)", "(one value per feature of x)"
    )
    out, x_c, gamma_c, mean, inv_std, mode = _batchnorm_forward(x, gamma, beta, bn_param)
    return out, BatchnormCache(x_c, gamma_c, mean, inv_std, mode)


def batchnorm_backward(
    dout: np.ndarray, cache: BatchnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`batchnorm_forward`.

    In 'train' mode the gradient flows through the batch statistics too. With
    ``xhat = (x - mean) / sqrt(var + eps)`` and sums over the batch, per feature:

    ``dx = gamma / (N * sqrt(var + eps)) * (N * dout - sum(dout) - xhat * sum(dout * xhat))``.

    In 'test' mode the statistics are constants and ``dx = gamma * dout / sqrt(var + eps)``.
    Both modes run in one compiled kernel; :func:`batchnorm_backward_alt` is the same function
    (the staged computation-graph derivation lives in
    :func:`cnnserve.reference.batchnorm_backward_naive`).

    Parameters
    ----------
    dout : ndarray, shape (N, D)
        Upstream gradient, dtype of x.
    cache : BatchnormCache
        From :func:`batchnorm_forward`.

    Returns
    -------
    dx : ndarray, shape (N, D)
    dgamma : ndarray, shape (D,)
        ``sum(dout * xhat)`` over the batch.
    dbeta : ndarray, shape (D,)
        ``sum(dout)`` over the batch.
    """
    check_cache(cache, BatchnormCache, "batchnorm_forward")
    return _batchnorm_backward(dout, cache)


def batchnorm_backward_alt(
    dout: np.ndarray, cache: BatchnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`batchnorm_forward` by the simplified formula, in NumPy.

    CS231n asks for two backward passes: one through the computation graph and this
    "alternative" one from the closed-form expression. :func:`batchnorm_backward` runs the
    compiled kernel; this one evaluates the same expression with vectorised NumPy (in float64,
    cast back to x's dtype). They agree to rounding, and the kernel is the faster of the two.
    Parameters and returns are those of :func:`batchnorm_backward`.
    """
    check_cache(cache, BatchnormCache, "batchnorm_forward")
    x, gamma, mean, inv_std, mode = cache
    dout = check_dout(dout, x.shape, x.dtype)
    d = dout.astype(np.float64)
    xhat = (x - mean) * inv_std  # (N, D), float64
    dbeta = d.sum(axis=0)
    dgamma = (d * xhat).sum(axis=0)
    if mode == "train":
        # dx = gamma / (N * std) * (N * dout - sum(dout) - xhat * sum(dout * xhat))
        N = x.shape[0]
        dx = (gamma * inv_std / N) * (N * d - dbeta - xhat * dgamma)
    else:  # fixed statistics: out is an affine function of x
        dx = gamma * inv_std * d
    return dx.astype(x.dtype), dgamma.astype(x.dtype), dbeta.astype(x.dtype)


def spatial_batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict
) -> tuple[np.ndarray, SpatialBatchnormCache]:
    """Batch normalisation of conv feature maps, one mean and variance per channel.

    Same as :func:`batchnorm_forward` with each channel as a feature and the N * H * W values
    of a channel as its batch: same ``bn_param`` keys, modes, defaults and running-statistic
    update (written back as new arrays in 'train' mode).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    gamma : ndarray, shape (C,)
    beta : ndarray, shape (C,)
    bn_param : dict
        As for :func:`batchnorm_forward`; ``'running_mean'`` and ``'running_var'`` are (C,).

    Returns
    -------
    out : ndarray, shape (N, C, H, W), dtype of x
    cache : SpatialBatchnormCache
        For :func:`spatial_batchnorm_backward`.

    Shape
    -----
    ``out`` has the shape of ``x``; statistics are per channel, over (N, H, W).
    """
    x = check_array(x, "x", 4, "(N, C, H, W)")
    gamma, beta = _check_norm_affine(
        x, gamma, beta, (x.shape[1],), "(C,)", "(one value per channel of x)"
    )
    out, x_c, gamma_c, mean, inv_std, mode = _batchnorm_forward(x, gamma, beta, bn_param)
    return out, SpatialBatchnormCache(x_c, gamma_c, mean, inv_std, mode)


def spatial_batchnorm_backward(
    dout: np.ndarray, cache: SpatialBatchnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`spatial_batchnorm_forward`.

    The formula of :func:`batchnorm_backward` with the sums over (N, H, W) and N replaced by
    ``M = N * H * W``.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H, W)
    cache : SpatialBatchnormCache

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    dgamma : ndarray, shape (C,)
    dbeta : ndarray, shape (C,)
    """
    check_cache(cache, SpatialBatchnormCache, "spatial_batchnorm_forward")
    return _batchnorm_backward(dout, cache)


def _group_norm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, G: int, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of layernorm and groupnorm; x is (N, C, ...), gamma and beta any shape of C
    values. Returns ``out, x_contiguous, gamma_flat, mean, inv_std``."""
    N, C = x.shape[:2]
    x_c = np.ascontiguousarray(x)
    gamma_flat = np.ascontiguousarray(gamma.reshape(C))
    out = np.empty(x.shape, dtype=x.dtype)
    mean = np.empty((N, G))
    inv_std = np.empty((N, G))
    _norm.group_forward(
        x_c.reshape(N, C, -1),  # (N, C, S)
        gamma_flat,
        np.ascontiguousarray(beta.reshape(C)),
        G,
        eps,
        out.reshape(N, C, -1),
        mean,
        inv_std,
    )
    return out, x_c, gamma_flat, mean, inv_std


def _group_norm_backward(
    dout: Any, x: np.ndarray, gamma: np.ndarray, G: int, mean: np.ndarray, inv_std: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of the layernorm and groupnorm backwards; dgamma, dbeta come out (C,)."""
    N, C = x.shape[:2]
    dout = check_dout(dout, x.shape, x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype)
    dgamma = np.empty(C, dtype=x.dtype)
    dbeta = np.empty(C, dtype=x.dtype)
    _norm.group_backward(
        np.ascontiguousarray(dout).reshape(N, C, -1),  # (N, C, S)
        x.reshape(N, C, -1),
        mean,
        inv_std,
        gamma,
        G,
        dx.reshape(N, C, -1),
        dgamma,
        dbeta,
    )
    return dx, dgamma, dbeta


def layernorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, ln_param: dict
) -> tuple[np.ndarray, LayernormCache]:
    """Layer normalisation: each sample normalised over its own D features.

    ``out[n] = gamma * (x[n] - mean_n) / sqrt(var_n + eps) + beta`` with the mean and biased
    variance of row ``n``. There are no running statistics: training and test behave the same.

    Parameters
    ----------
    x : ndarray, shape (N, D)
    gamma : ndarray, shape (D,)
    beta : ndarray, shape (D,)
    ln_param : dict
        ``'eps'`` (number > 0, default 1e-5). A ``'mode'`` key ('train' or 'test') is accepted
        and has no effect.

    Returns
    -------
    out : ndarray, shape (N, D), dtype of x
    cache : LayernormCache
        For :func:`layernorm_backward`.

    Shape
    -----
    ``out`` has the shape of ``x``; statistics are per sample, over the D features. With
    D = 1 every ``x - mean`` is 0 and ``out`` is ``beta``.
    """
    x = check_array(x, "x", 2, "(N, D)")
    gamma, beta = _check_norm_affine(
        x, gamma, beta, (x.shape[1],), "(D,)", "(one value per feature of x)"
    )
    params = check_params(ln_param, "ln_param", _NORM_PARAM_KEYS)
    _check_mode(params, "ln_param")
    eps = _check_eps(params, "ln_param")
    out, x_c, gamma_c, mean, inv_std = _group_norm_forward(x, gamma, beta, 1, eps)
    return out, LayernormCache(x_c, gamma_c, mean, inv_std)


def layernorm_backward(
    dout: np.ndarray, cache: LayernormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`layernorm_forward`.

    With ``dxhat = dout * gamma`` and means over the D features of a sample:
    ``dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)``.

    Parameters
    ----------
    dout : ndarray, shape (N, D)
    cache : LayernormCache

    Returns
    -------
    dx : ndarray, shape (N, D)
    dgamma : ndarray, shape (D,)
        ``sum(dout * xhat)`` over the samples.
    dbeta : ndarray, shape (D,)
        ``sum(dout)`` over the samples.
    """
    check_cache(cache, LayernormCache, "layernorm_forward")
    x, gamma, mean, inv_std = cache
    return _group_norm_backward(dout, x, gamma, 1, mean, inv_std)


def spatial_groupnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, G: int, gn_param: dict
) -> tuple[np.ndarray, GroupnormCache]:
    """Group normalisation: each sample's C channels split into G groups of C / G channels.

    Every (sample, group) is normalised over its ``(C / G) * H * W`` values with their mean
    and biased variance; then channel ``c`` is scaled by ``gamma[0, c, 0, 0]`` and shifted by
    ``beta[0, c, 0, 0]``. ``G = 1`` is layer norm over (C, H, W); ``G = C`` is instance norm.
    No running statistics: training and test behave the same.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    gamma : ndarray, shape (1, C, 1, 1)
    beta : ndarray, shape (1, C, 1, 1)
    G : int
        Number of groups, ``>= 1``, must divide C.
    gn_param : dict
        ``'eps'`` (number > 0, default 1e-5). A ``'mode'`` key ('train' or 'test') is accepted
        and has no effect.

    Returns
    -------
    out : ndarray, shape (N, C, H, W), dtype of x
    cache : GroupnormCache
        For :func:`spatial_groupnorm_backward`.

    Shape
    -----
    ``out`` has the shape of ``x``; statistics are per (n, g), over
    ``x[n, g*C/G:(g+1)*C/G, :, :]``.
    """
    x = check_array(x, "x", 4, "(N, C, H, W)")
    C = x.shape[1]
    gamma, beta = _check_norm_affine(
        x, gamma, beta, (1, C, 1, 1), "(1, C, 1, 1)", "(one value per channel of x)"
    )
    G = check_param_int(G, "G", 1)
    if C % G:
        raise ValueError(f"G must divide the number of channels C = {C}, got G = {G}")
    params = check_params(gn_param, "gn_param", _NORM_PARAM_KEYS)
    _check_mode(params, "gn_param")
    eps = _check_eps(params, "gn_param")
    out, x_c, gamma_flat, mean, inv_std = _group_norm_forward(x, gamma, beta, G, eps)
    return out, GroupnormCache(x_c, gamma_flat, G, mean, inv_std)


def spatial_groupnorm_backward(
    dout: np.ndarray, cache: GroupnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`spatial_groupnorm_forward`.

    With ``dxhat = dout * gamma[c]`` and means over the ``(C / G) * H * W`` values of a group:
    ``dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)``.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H, W)
    cache : GroupnormCache

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    dgamma : ndarray, shape (1, C, 1, 1)
        ``sum(dout * xhat)`` over (N, H, W).
    dbeta : ndarray, shape (1, C, 1, 1)
        ``sum(dout)`` over (N, H, W).
    """
    check_cache(cache, GroupnormCache, "spatial_groupnorm_forward")
    x, gamma, G, mean, inv_std = cache
    dx, dgamma, dbeta = _group_norm_backward(dout, x, gamma, G, mean, inv_std)
    C = x.shape[1]
    return dx, dgamma.reshape(1, C, 1, 1), dbeta.reshape(1, C, 1, 1)
