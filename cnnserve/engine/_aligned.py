"""Arrays that start on a cache line, for the engine's parameters and buffers."""

from __future__ import annotations

import numpy as np

#: Alignment in bytes of the packed parameters, of each array in them and of the buffers.
ALIGN = 64


def _aligned_empty(size: int, dtype) -> np.ndarray:
    """An uninitialised 1-D array of ``size`` values starting on a cache line (ALIGN bytes):
    numpy only promises 16 bytes, and a filter panel that straddles cache lines costs the
    tiles that load it."""
    dtype = np.dtype(dtype)
    raw = np.empty(size * dtype.itemsize + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + size * dtype.itemsize].view(dtype)


def _aligned(values: np.ndarray) -> np.ndarray:
    """A copy of 1-D ``values`` starting on a cache line."""
    out = _aligned_empty(values.size, values.dtype)
    out[...] = values
    return out
