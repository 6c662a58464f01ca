"""First-order update rules: ``next_w, config = rule(w, dw, config=None)``.

The rules and their defaults are those of the CS231n assignments:

=================  ==========================================================================
``sgd``            ``w - learning_rate * dw``
``sgd_momentum``   ``v = momentum * v - learning_rate * dw; w + v``
``rmsprop``        ``cache = decay_rate * cache + (1 - decay_rate) * dw**2;``
                   ``w - learning_rate * dw / (sqrt(cache) + epsilon)``
``adam``           ``t += 1; m, v`` moving averages of ``dw`` and ``dw**2``, bias-corrected
                   with the new ``t``; ``w - learning_rate * m_hat / (sqrt(v_hat) + epsilon)``
=================  ==========================================================================

``config`` holds the hyper-parameters and the rule's state (``velocity``, ``cache``, ``m``,
``v``, ``t``). Missing hyper-parameters take their defaults and missing state starts at zero.
Every call checks its arguments (``ValueError`` for a wrong shape or value, ``TypeError`` for a
wrong type or dtype, naming the argument), never modifies ``w``, ``dw`` or the ``config`` it is
given, and returns a NEW config dict for the next call: keep the returned one. ``next_w`` and
the state arrays have the dtype of ``w`` (float32 stays float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cnnserve._buffers import with_reused_buffers
from cnnserve._checks import FLOAT_DTYPES
from cnnserve._checks import check_int as _check_int
from cnnserve._checks import check_number as _check_number
from cnnserve._ext import load as _load_kernels

_optim = _load_kernels("optim")

__all__ = [
    "UPDATE_RULES",
    "UpdateRule",
    "adam",
    "get_update_rule",
    "rmsprop",
    "rule_name",
    "sgd",
    "sgd_momentum",
]

UpdateRule = Callable[[np.ndarray, np.ndarray, "dict | None"], tuple[np.ndarray, dict]]


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_w_dw(w: Any, dw: Any) -> tuple[np.ndarray, np.ndarray]:
    for name, a in (("w", w), ("dw", dw)):
        if not isinstance(a, np.ndarray) or isinstance(a, np.ma.MaskedArray | np.matrix):
            raise TypeError(f"{name} must be a plain numpy.ndarray, got {type(a).__name__}")
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if dw.shape != w.shape:
        raise ValueError(f"dw must have the shape of w {w.shape}, got {dw.shape}")
    if dw.dtype != w.dtype:
        raise TypeError(
            f"dw has dtype {dw.dtype} but w has dtype {w.dtype}: the gradient must have the "
            "dtype of its parameter"
        )
    return np.asarray(w), np.asarray(dw)


def _read_config(
    config: Any,
    rule: str,
    hyper: dict[str, tuple[float, float, float, str]],
    state: tuple[str, ...],
) -> dict:
    """A new dict: ``config``'s entries, checked, with the defaults of missing hyper-parameters.

    ``hyper`` maps each hyper-parameter to ``(default, low, high, interval)``; ``state`` lists
    the names of the rule's state entries (checked by the rule itself).
    """
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
    allowed = (*hyper, *state)
    unknown = sorted((k for k in config if k not in allowed), key=str)
    if unknown:
        raise ValueError(
            f"config has unknown key(s) {', '.join(map(repr, unknown))} for the {rule!r} "
            f"update rule; expected keys: {', '.join(map(repr, allowed))}"
        )
    out = dict(config)
    for key, (default, low, high, interval) in hyper.items():
        out[key] = _check_number(config.get(key, default), f"config[{key!r}]", low, high, interval)
    return out


def _state_array(config: dict, key: str, w: np.ndarray) -> np.ndarray:
    """``config[key]`` checked against ``w`` (shape and dtype), or zeros like ``w``."""
    value = config.get(key)
    if value is None:
        return np.zeros(w.shape, dtype=w.dtype)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"config[{key!r}] must be a numpy.ndarray, got {type(value).__name__}")
    if value.shape != w.shape:
        raise ValueError(f"config[{key!r}] must have the shape of w {w.shape}, got {value.shape}")
    if value.dtype != w.dtype:
        raise TypeError(f"config[{key!r}] has dtype {value.dtype} but w has dtype {w.dtype}")
    return value


_LR = (0.0, 0.0, math.inf, "[)")
_UNIT = (0.0, 0.0, 1.0, "[)")
_EPSILON = (1e-8, 0.0, math.inf, "()")


# ---------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------


@with_reused_buffers
def sgd(w: np.ndarray, dw: np.ndarray, config: dict | None = None) -> tuple[np.ndarray, dict]:
    """Vanilla stochastic gradient descent: ``next_w = w - learning_rate * dw``.

    Parameters
    ----------
    w : ndarray, any shape, float32 or float64
        Current parameter (not modified).
    dw : ndarray, shape and dtype of w
        Gradient of the loss with respect to ``w`` (not modified).
    config : dict or None
        ``learning_rate`` (float >= 0, default 1e-2).

    Returns
    -------
    next_w : ndarray, shape and dtype of w
    config : dict
        A new dict holding the hyper-parameters, for the next call.
    """
    w, dw = _check_w_dw(w, dw)
    config = _read_config(config, "sgd", {"learning_rate": (1e-2, *_LR[1:])}, ())
    next_w = w - w.dtype.type(config["learning_rate"]) * dw
    return next_w, config


@with_reused_buffers
def sgd_momentum(
    w: np.ndarray, dw: np.ndarray, config: dict | None = None
) -> tuple[np.ndarray, dict]:
    """Stochastic gradient descent with momentum.

    ``v = momentum * v - learning_rate * dw`` and ``next_w = w + v``.

    Parameters
    ----------
    w : ndarray, any shape, float32 or float64
        Current parameter (not modified).
    dw : ndarray, shape and dtype of w
        Gradient of the loss with respect to ``w`` (not modified).
    config : dict or None
        ``learning_rate`` (float >= 0, default 1e-2); ``momentum`` (in [0, 1), default 0.9);
        ``velocity`` (ndarray, shape and dtype of w, default zeros).

    Returns
    -------
    next_w : ndarray, shape and dtype of w
    config : dict
        A new dict with the hyper-parameters and the new ``velocity``, for the next call.
    """
    w, dw = _check_w_dw(w, dw)
    hyper = {"learning_rate": (1e-2, *_LR[1:]), "momentum": (0.9, *_UNIT[1:])}
    config = _read_config(config, "sgd_momentum", hyper, ("velocity",))
    v = _state_array(config, "velocity", w)
    t = w.dtype.type
    v = t(config["momentum"]) * v - t(config["learning_rate"]) * dw
    config["velocity"] = v
    return w + v, config


@with_reused_buffers
def rmsprop(w: np.ndarray, dw: np.ndarray, config: dict | None = None) -> tuple[np.ndarray, dict]:
    """RMSProp: scale the step by a moving average of squared gradients.

    ``cache = decay_rate * cache + (1 - decay_rate) * dw**2`` and
    ``next_w = w - learning_rate * dw / (sqrt(cache) + epsilon)``.

    Parameters
    ----------
    w : ndarray, any shape, float32 or float64
        Current parameter (not modified).
    dw : ndarray, shape and dtype of w
        Gradient of the loss with respect to ``w`` (not modified).
    config : dict or None
        ``learning_rate`` (float >= 0, default 1e-2); ``decay_rate`` (in [0, 1), default
        0.99); ``epsilon`` (float > 0, default 1e-8); ``cache`` (ndarray, shape and dtype of
        w, default zeros).

    Returns
    -------
    next_w : ndarray, shape and dtype of w
    config : dict
        A new dict with the hyper-parameters and the new ``cache``, for the next call.
    """
    w, dw = _check_w_dw(w, dw)
    hyper = {
        "learning_rate": (1e-2, *_LR[1:]),
        "decay_rate": (0.99, *_UNIT[1:]),
        "epsilon": _EPSILON,
    }
    config = _read_config(config, "rmsprop", hyper, ("cache",))
    cache = _state_array(config, "cache", w)
    t = w.dtype.type
    decay = config["decay_rate"]
    cache = t(decay) * cache + t(1.0 - decay) * (dw * dw)
    config["cache"] = cache
    next_w = w - t(config["learning_rate"]) * dw / (np.sqrt(cache) + t(config["epsilon"]))
    return next_w, config


@with_reused_buffers
def adam(w: np.ndarray, dw: np.ndarray, config: dict | None = None) -> tuple[np.ndarray, dict]:
    """Adam: moving averages of the gradient and its square, with bias correction.

    ``t`` is incremented BEFORE it is used, so the first call bias-corrects with ``t = 1``::

        t = t + 1
        m = beta1 * m + (1 - beta1) * dw
        v = beta2 * v + (1 - beta2) * dw**2
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        next_w = w - learning_rate * m_hat / (sqrt(v_hat) + epsilon)

    Parameters
    ----------
    w : ndarray, any shape, float32 or float64
        Current parameter (not modified).
    dw : ndarray, shape and dtype of w
        Gradient of the loss with respect to ``w`` (not modified).
    config : dict or None
        ``learning_rate`` (float >= 0, default 1e-3); ``beta1`` (in [0, 1), default 0.9);
        ``beta2`` (in [0, 1), default 0.999); ``epsilon`` (float > 0, default 1e-8); ``m``,
        ``v`` (ndarrays, shape and dtype of w, default zeros); ``t`` (int >= 0, the number of
        steps taken so far, default 0).

    Returns
    -------
    next_w : ndarray, shape and dtype of w
    config : dict
        A new dict with the hyper-parameters and the new ``m``, ``v`` and ``t``.
    """
    w, dw = _check_w_dw(w, dw)
    hyper = {
        "learning_rate": (1e-3, *_LR[1:]),
        "beta1": (0.9, *_UNIT[1:]),
        "beta2": (0.999, *_UNIT[1:]),
        "epsilon": _EPSILON,
    }
    config = _read_config(config, "adam", hyper, ("m", "v", "t"))
    m = _state_array(config, "m", w)
    v = _state_array(config, "v", w)
    step = _check_int(config.get("t", 0), "config['t']", 0) + 1
    beta1, beta2 = config["beta1"], config["beta2"]
    # One fused pass in the compiled kernel: the same operations, in w's dtype, as
    #   m = beta1*m + (1-beta1)*dw;  v = beta2*v + (1-beta2)*(dw*dw)
    #   next_w = w - lr * (m / (1-beta1**t)) / (sqrt(v / (1-beta2**t)) + epsilon)
    # with the bias corrections computed in double precision and rounded to w's dtype once.
    next_w, m_out, v_out = (np.empty(w.shape, dtype=w.dtype) for _ in range(3))
    flat = [np.ascontiguousarray(a).reshape(-1) for a in (w, dw, m, v)]
    _optim.adam_step(
        *flat,
        next_w.reshape(-1),
        m_out.reshape(-1),
        v_out.reshape(-1),
        config["learning_rate"],
        beta1,
        beta2,
        config["epsilon"],
        1.0 - beta1**step,
        1.0 - beta2**step,
    )
    config.update(m=m_out, v=v_out, t=step)
    return next_w, config


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

UPDATE_RULES: dict[str, UpdateRule] = {
    "sgd": sgd,
    "sgd_momentum": sgd_momentum,
    "rmsprop": rmsprop,
    "adam": adam,
}


def get_update_rule(name_or_callable: str | UpdateRule) -> UpdateRule:
    """Return the update rule called ``name_or_callable``, or the callable itself.

    Parameters
    ----------
    name_or_callable : str or callable
        A key of :data:`UPDATE_RULES` (``'sgd'``, ``'sgd_momentum'``, ``'rmsprop'``,
        ``'adam'``), or a function with the signature ``rule(w, dw, config) -> (next_w,
        config)``.

    Returns
    -------
    rule : callable
    """
    if isinstance(name_or_callable, str):
        try:
            return UPDATE_RULES[name_or_callable]
        except KeyError:
            valid = ", ".join(map(repr, UPDATE_RULES))
            raise ValueError(
                f"unknown update rule {name_or_callable!r}; valid names: {valid} "
                "(or pass a callable rule(w, dw, config) -> (next_w, config))"
            ) from None
    if callable(name_or_callable):
        return name_or_callable
    raise TypeError(
        "update_rule must be the name of an update rule or a callable, "
        f"got {type(name_or_callable).__name__}"
    )


def rule_name(rule: str | UpdateRule) -> str:
    """The JSON name of an update rule: its registry name, or ``callable:module.qualname``."""
    if isinstance(rule, str):
        return rule
    for name, registered in UPDATE_RULES.items():
        if rule is registered:
            return name
    module = getattr(rule, "__module__", "?")
    return f"callable:{module}.{getattr(rule, '__qualname__', type(rule).__name__)}"
