"""Numeric gradients and error measures shared by the tests."""

from collections.abc import Callable

import numpy as np


def numeric_gradient(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dout: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    """Central-difference gradient of ``sum(f(x) * dout)`` with respect to ``x``.

    ``x`` is perturbed in place one entry at a time and restored; use float64.

    Parameters
    ----------
    f : callable
        Maps an array shaped like ``x`` to an array shaped like ``dout`` (or a scalar when
        ``dout`` is 1.0).
    x : ndarray
    dout : ndarray or float

    Returns
    -------
    grad : ndarray, shape of x
    """
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + h
        pos = np.array(f(x), copy=True)
        x[idx] = old - h
        neg = np.array(f(x), copy=True)
        x[idx] = old
        grad[idx] = np.sum((pos - neg) * dout) / (2 * h)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise relative error ``|a - b| / max(1e-8, |a| + |b|)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def tolerance(dtype: np.dtype) -> dict[str, float]:
    """``np.testing.assert_allclose`` tolerances for comparing a kernel with the reference."""
    if np.dtype(dtype) == np.float32:
        return {"rtol": 1e-4, "atol": 1e-5}
    return {"rtol": 1e-10, "atol": 1e-12}


def scaled_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the larger array's largest magnitude.

    Unlike :func:`rel_error`, an entry near zero does not dominate: central differences have
    an absolute error set by the scale of the whole function, not of each entry.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), 1e-12)
    return float(np.max(np.abs(a - b))) / scale


def assert_close_to_scale(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    """``got`` within ``rel`` of the largest magnitude of ``want`` everywhere (float32 kernels
    against a float64 result: an error relative to each entry would fail near zero)."""
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(got - want))) <= rel * scale


def conv_shape_id(shape: tuple) -> str:
    """A test id for a conv case ``(N, C, H, W, F, HH, WW, stride, pad)``."""
    N, C, H, W, F, HH, WW, s, p = shape
    return f"x{N}x{C}x{H}x{W}-w{F}x{HH}x{WW}-s{s}p{p}"
