"""What the data-set modules share: the error, argument checks, splits, pixel statistics.

A private helper module of :mod:`cnnserve.data` (its names are for the modules beside it).
"""

from __future__ import annotations

import gzip
import math
import numbers
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve._checks import check_int

__all__ = [
    "STD_EPS",
    "DataError",
    "channel_stats",
    "check_fraction",
    "check_image_size",
    "read_bytes",
    "split",
    "stratified_order",
    "visible",
]

#: Floor of the per-channel standard deviation, so that a constant channel does not divide by 0.
STD_EPS = 1e-6


class DataError(ValueError):
    """A data set cannot be read: missing or corrupt file, wrong format, inconsistent content."""


DataError.__module__ = "cnnserve.data"  # where users import it from


def channel_stats(raw: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean / std of ``raw / levels`` for integer pixels, from histograms.

    ``raw`` is (N, C, H, W) of integers in ``[0, levels]``; returns two float64 ``(C,)``.
    """
    values = np.arange(levels + 1, dtype=np.float64) / levels
    C = raw.shape[1]
    mean = np.empty(C)
    std = np.empty(C)
    for c in range(C):
        counts = np.bincount(raw[:, c].reshape(-1), minlength=levels + 1).astype(np.float64)
        total = counts.sum()
        mean[c] = counts @ values / total
        std[c] = math.sqrt(counts @ (values - mean[c]) ** 2 / total)
    return mean, np.maximum(std, STD_EPS)


def check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not 0 <= value < 1:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def check_image_size(image_size: Any) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if not isinstance(image_size, tuple | list) or len(image_size) != 2:
        raise TypeError(f"image_size must be a pair (H, W) of ints, got {image_size!r}")
    H, W = (check_int(v, "image_size", 1) for v in image_size)
    return (H, W)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when its name ends in ``.gz``; a failure is a DataError."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def visible(path: Path) -> bool:
    """Not a hidden file or folder (its name does not start with ``.``)."""
    return not path.name.startswith(".")


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _part_size(fraction: float, n: int, part: str, where: str) -> int:
    size = int(fraction * n + 0.5)  # round half up
    if fraction > 0 and size == 0:
        raise DataError(
            f"{where}: {part}_fraction={fraction} of {n} samples leaves the {part} split empty"
        )
    return size


def stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of ``range(len(y))`` whose every prefix holds each class in proportion.

    Within class ``c`` (``n_c`` samples, randomly permuted) the ``k``-th sample gets the key
    ``(k + u) / n_c`` with ``u`` uniform in [0, 1); sorting all samples by key interleaves the
    classes so that the first ``m`` samples hold about ``m * n_c / N`` of class ``c`` (each
    class's count is within one of ``t * n_c`` for the key ``t`` of the ``m``-th sample).
    """
    keys = np.empty(len(y))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        keys[idx] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    return np.argsort(keys, kind="stable")


def split(
    y: np.ndarray, val_fraction: float, test_fraction: float, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``(train, val, test)``: stratified, deterministic in ``seed``.

    The train indices are in stratified order (so a prefix is a stratified subset); val and
    test are shuffled.
    """
    rng = np.random.default_rng(seed)
    n = len(y)
    n_test = _part_size(test_fraction, n, "test", where)
    n_val = _part_size(val_fraction, n, "val", where)
    if n - n_test - n_val < 1:
        raise DataError(f"{where}: the split of {n} samples leaves the train split empty")
    order = stratified_order(y, rng)
    test = order[:n_test]
    val = order[n_test : n_test + n_val]
    train = order[n_test + n_val :]
    return train, rng.permutation(val), rng.permutation(test)
