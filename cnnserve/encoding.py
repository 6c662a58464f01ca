"""Arrays in compact JSON form: base64 of little-endian bytes, as service answers carry them."""

from __future__ import annotations

import base64

import numpy as np

__all__ = ["encode_array"]


def encode_array(array: np.ndarray, dtype: str = "float32") -> dict:
    """An array in compact JSON form: little-endian bytes in base64, with shape and dtype.

    Parameters
    ----------
    array : ndarray, any shape
    dtype : {"float32", "int32"}
        The stored type (values are cast to it).

    Returns
    -------
    dict
        ``{"dtype", "shape", "order": "C", "data"}``; ``data`` decodes to
        ``prod(shape)`` values in row-major order.
    """
    data = np.ascontiguousarray(array, dtype={"float32": "<f4", "int32": "<i4"}[dtype])
    return {
        "dtype": dtype,
        "shape": list(array.shape),
        "order": "C",
        "data": base64.b64encode(data.tobytes()).decode("ascii"),
    }
