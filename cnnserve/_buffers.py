"""Reuse of large array buffers from one training step to the next.

A training step allocates the same large arrays every time (activations, gradients, the
optimizer's new state) and frees them at its end. Left to the C library, blocks of several
MiB go back to the kernel when freed and every step page-faults them in again, a fifth of a
small network's step. Inside :func:`reusing_buffers`, NumPy arrays of 1 MiB or more come from
a small cache of freed blocks of the same size (``cython_ext/cnn_memory.h``), which keeps at
most ``CNNSERVE_ARRAY_CACHE_MB`` MiB (default 256; 0 turns the cache off). The cache is a
NumPy memory handler installed in a context variable: code outside the context, and other
threads, allocate as usual.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from cnnserve._ext import load

__all__ = ["buffer_cache_stats", "release_buffer_cache", "reusing_buffers", "with_reused_buffers"]

_memory = load("memory")
_MAX_MB = 2**20  # 1 TiB: anything larger is a typo


def _limit_from_environment() -> int:
    text = os.environ.get("CNNSERVE_ARRAY_CACHE_MB", "256")
    try:
        megabytes = float(text)
    except ValueError:
        raise ValueError(f"CNNSERVE_ARRAY_CACHE_MB must be a number of MiB, got {text!r}") from None
    if not 0 <= megabytes <= _MAX_MB:  # also rejects NaN and inf
        raise ValueError(f"CNNSERVE_ARRAY_CACHE_MB must be >= 0 and <= {_MAX_MB}, got {text!r}")
    return int(megabytes * 2**20)


_memory.set_limit(_limit_from_environment())


@contextmanager
def reusing_buffers() -> Iterator[None]:
    """Allocate NumPy arrays from the buffer cache inside the ``with`` block."""
    previous = _memory.install()
    try:
        yield
    finally:
        _memory.restore(previous)


F = TypeVar("F", bound=Callable[..., Any])


def with_reused_buffers(function: F) -> F:
    """Decorator: run ``function`` inside :func:`reusing_buffers`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with reusing_buffers():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def buffer_cache_stats() -> dict[str, int]:
    """Hits, misses, cached bytes and blocks, and the limit of the buffer cache."""
    return dict(_memory.stats())


def release_buffer_cache() -> int:
    """Free every cached block (the memory goes back to the C library); returns the bytes."""
    return int(_memory.release())
