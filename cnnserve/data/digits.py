"""scikit-learn's bundled 8x8 handwritten digits: the ``"digits"`` format of :mod:`cnnserve.data`.

1797 images of 10 classes, no download; the raw values 0..16 are divided by 16.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LEVELS", "load_digits"]

#: The largest raw value of a digit's pixel (which maps to 1).
LEVELS = 16


def load_digits() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """``(class_names, X, y)``: X uint8 (1797, 1, 8, 8) of raw values 0..16, y int64."""
    from sklearn.datasets import load_digits as sklearn_digits  # slow: only when asked for

    bunch = sklearn_digits()
    X = np.rint(bunch.images).astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    return tuple(str(int(c)) for c in bunch.target_names), X, y
