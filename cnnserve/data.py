"""Data sets to train on: the bundled digits, MNIST-style IDX files, CIFAR-10, image folders.

:func:`load_dataset` reads one of five formats and returns a :class:`Dataset` whose arrays are
ready for the :class:`~cnnserve.solver.Solver` (``Dataset.solver_data()``):

``"digits"``
    scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download). The
    raw values 0..16 are divided by 16. Split into train / val / test by ``seed``.
``"digits-windows"``
    Training data for a digit *detector*: 8x8 windows cut from canvases of those digits, in
    11 classes, ``"0"`` .. ``"9"`` and ``"background"``. The digits are split exactly as
    ``"digits"`` splits them (same ``seed`` and fractions), and each part's windows are cut
    from canvases of that part's digits only, so the test windows hold only test digits, the
    ones :func:`digits_canvas` places. A window is labelled with a digit when its corner is
    within 1 pixel (in both axes) of that digit's corner, and ``"background"`` when it is
    2 pixels or more off every digit (in some axis): blank windows, halves of digits, parts
    of two digits. See :func:`_canvas_windows` for the canvases and how many windows of
    each kind are taken; about half the windows are digits, half background.
``"idx"``
    MNIST or Fashion-MNIST: a directory holding ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each
    raw or gzipped (``.gz``); the spelling ``train-images.idx3-ubyte`` is accepted too. When
    both a raw and a ``.gz`` copy of a file are present the raw one is read. Images must be
    unsigned bytes, labels unsigned bytes; the classes are ``"0"`` .. ``str(K - 1)`` where ``K``
    is one more than the largest training label. The t10k part is the test split; the val
    split is taken from the train part by ``seed``.
``"cifar10"``
    The CIFAR-10 "python version" directory: ``data_batch_1`` .. ``data_batch_k``,
    ``test_batch`` and ``batches.meta`` (label names). These files are pickles: reading them
    is the only place cnnserve unpickles anything, and it does so with a restricted unpickler
    (see :func:`_load_cifar_pickle`) that resolves no real global, so a crafted file cannot run
    code. ``test_batch`` is the test split; the val split is taken from the batches by ``seed``.
``"folder"``
    ``root/<class name>/<image>.png|.jpg|.jpeg``, read with Pillow. Class names are the sorted
    sub-folder names. Images are grayscale (one channel) when every image is grayscale,
    otherwise RGB (gray images are replicated to three channels; alpha is dropped). All images
    must share one size unless ``image_size=(H, W)`` is given, which resizes each image
    (bilinear). Hidden files and folders (names starting with ``.``) are ignored, and so are
    non-image files beside the class folders (``README``, ``LICENSE``); any other file inside
    a class folder, and any unreadable image, is an error naming the file. Split into
    train / val / test by ``seed``.

The pipeline
------------
1. Pixels are read as integers and scaled to [0, 1]: 8-bit values / 255 (digits: / 16).
2. The per-channel mean and standard deviation (float64, population std floored at
   ``1e-6``) are computed on the *training split only* (after ``limit``) and kept on the
   Dataset, so that a model file can carry them.
3. Every split is normalised with them, ``(x01 - mean[c]) / std[c]``
   (:func:`normalize`, which the service's preprocessing uses again), and stored NCHW in the
   requested dtype (float32 by default).

Splits are deterministic: the same ``seed`` gives the same split whatever the global NumPy
random state. They are stratified: every class contributes to each split in proportion (to
within a sample or two). Anything wrong with the data (a missing or corrupt file, a wrong format,
counts that do not match, labels out of range, an empty or missing class folder, a split that
would be empty) raises :class:`DataError`, naming the file or folder. Wrong arguments raise
``ValueError`` / ``TypeError`` naming the argument.
"""

from __future__ import annotations

import gzip
import math
import numbers
import os
import pickle
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve._checks import check_int as _check_int

__all__ = [
    "BACKGROUND",
    "BUNDLED",
    "DataError",
    "Dataset",
    "FORMATS",
    "STD_EPS",
    "digits_canvas",
    "load_dataset",
    "normalize",
]

#: Formats understood by :func:`load_dataset`.
FORMATS = ("digits", "digits-windows", "idx", "cifar10", "folder")

#: The sources :func:`load_dataset` takes by name: bundled with scikit-learn, no files.
BUNDLED = ("digits", "digits-windows")

#: The class name of a window that is not a digit at its place (``"digits-windows"``).
BACKGROUND = "background"

#: Floor of the per-channel standard deviation, so that a constant channel does not divide by 0.
STD_EPS = 1e-6

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# normalize() accepts pixels this far outside [0, 1]: the round-off of un-normalising data.
_X01_SLACK = 1e-3
# Samples normalised at a time, so that the float64 temporaries stay near 8 MiB.
_CHUNK_BYTES = 8 << 20


class DataError(ValueError):
    """A data set cannot be read: missing or corrupt file, wrong format, inconsistent content."""


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set split into train / val / test, normalised, NCHW.

    Attributes
    ----------
    name : str
        ``"digits"``, ``"digits-windows"``, or the resolved path the data came from.
    format : str
        One of :data:`FORMATS`: ``"digits"``, ``"digits-windows"``, ``"idx"``, ``"cifar10"``,
        ``"folder"``.
    class_names : tuple of str
        Label ``k`` is ``class_names[k]``.
    X_train, X_val, X_test : numpy.ndarray
        Normalised images, shape ``(N, C, H, W)``, float32 or float64.
    y_train, y_val, y_test : numpy.ndarray
        int64 labels in ``[0, num_classes)``, shape ``(N,)``.
    mean, std : numpy.ndarray
        float64, shape ``(C,)``: statistics of the training pixels in [0, 1], so that
        ``x01 = X * std[c] + mean[c]``.

    Notes
    -----
    Equality is identity (``eq=False``): comparing arrays element-wise has no single truth
    value. The arrays themselves are ordinary writable arrays; do not modify them in place.
    """

    name: str
    format: str
    class_names: tuple[str, ...]
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if len(self.class_names) < 2:
            raise ValueError(f"class_names must hold at least 2 names, got {self.class_names!r}")
        shape = None
        dtype = None
        for part in ("train", "val", "test"):
            X = getattr(self, f"X_{part}")
            y = getattr(self, f"y_{part}")
            if not isinstance(X, np.ndarray) or X.ndim != 4:
                got = X.shape if isinstance(X, np.ndarray) else type(X).__name__
                raise ValueError(f"X_{part} must be a 4-D (N, C, H, W) array, got {got}")
            if X.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"X_{part} must be float32 or float64, got {X.dtype}")
            if shape is None:
                shape, dtype = X.shape[1:], X.dtype
            elif X.shape[1:] != shape or X.dtype != dtype:
                raise ValueError(
                    f"X_{part} must have shape (N, *{shape}) and dtype {dtype} like X_train, "
                    f"got {X.shape} {X.dtype}"
                )
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != X.shape[:1]:
                got = (y.shape, y.dtype) if isinstance(y, np.ndarray) else type(y).__name__
                raise ValueError(f"y_{part} must be int64 of shape ({X.shape[0]},), got {got}")
        for stat in ("mean", "std"):
            a = getattr(self, stat)
            if not isinstance(a, np.ndarray) or a.dtype != np.float64 or a.shape != shape[:1]:
                got = (a.shape, a.dtype) if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"{stat} must be float64 of shape ({shape[0]},), got {got}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        C, H, W = self.X_train.shape[1:]
        return (int(C), int(H), int(W))

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    def solver_data(self) -> dict[str, np.ndarray]:
        """The CS231n ``Solver`` data dict (the arrays themselves, not copies).

        Returns
        -------
        dict
            ``{'X_train', 'y_train', 'X_val', 'y_val'}``.
        """
        return {
            "X_train": self.X_train,
            "y_train": self.y_train,
            "X_val": self.X_val,
            "y_val": self.y_val,
        }

    def summary(self) -> str:
        """Two lines: name, format, input shape, split sizes, dtype; then the classes."""
        C, H, W = self.input_shape
        names = ", ".join(self.class_names[:10])
        if self.num_classes > 10:
            names += f", ... ({self.num_classes - 10} more)"
        return (
            f"{self.name} ({self.format}): {C}x{H}x{W} images, {self.num_classes} classes, "
            f"train {len(self.y_train)} / val {len(self.y_val)} / test {len(self.y_test)}, "
            f"{self.X_train.dtype}\n"
            f"classes: {names}"
        )


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        ok = False
    else:  # dtype=None would give float64: refuse it explicitly
        ok = dtype is not None and dt in _FLOAT_DTYPES
    if not ok:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


def _check_stat(a: Any, name: str, C: int) -> np.ndarray:
    try:
        arr = np.array(a, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of {C} numbers, got {a!r}") from None
    if arr.shape != (C,):
        raise ValueError(f"{name} must have one value per channel ({C}), got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def _normalize_into(out: np.ndarray, src: np.ndarray, scale: float, mean, std) -> None:
    """``out[:] = (src / scale - mean[c]) / std[c]``, a few MiB of samples at a time."""
    N = src.shape[0]
    per_sample = max(1, math.prod(src.shape[1:]) * 8)
    step = max(1, _CHUNK_BYTES // per_sample)
    m = mean[:, None, None]  # (C, 1, 1)
    s = std[:, None, None]
    for start in range(0, N, step):
        x = src[start : start + step].astype(np.float64)  # (n, C, H, W)
        if scale != 1:
            x /= scale
        x -= m
        x /= s
        out[start : start + step] = x


def normalize(x01: np.ndarray, mean, std, dtype=np.float32) -> np.ndarray:
    """Normalise [0, 1] pixels per channel: ``(x01 - mean[c]) / std[c]``.

    Parameters
    ----------
    x01 : numpy.ndarray
        float32 or float64 pixels in [0, 1], shape ``(N, C, H, W)`` or ``(C, H, W)``. Not
        modified. Values up to 1e-3 outside [0, 1] (round-off, e.g. of ``X * std + mean``)
        are taken as they are; anything further out is an error.
    mean, std : array_like
        Per-channel statistics, shape ``(C,)`` (e.g. ``Dataset.mean`` / ``Dataset.std``);
        ``std`` must be positive.
    dtype : {numpy.float32, numpy.float64}, optional
        dtype of the result (the arithmetic is done in float64).

    Returns
    -------
    numpy.ndarray
        A new array of ``x01``'s shape in ``dtype``.

    Raises
    ------
    TypeError
        ``x01`` is not a float array, or ``dtype`` is not float32/float64.
    ValueError
        Wrong number of dimensions or channels, values outside [0, 1] or NaN (pixels of 0..255
        must be divided by 255 first), non-finite statistics or ``std <= 0``.
    """
    dt = _check_dtype(dtype)
    if not isinstance(x01, np.ndarray):
        raise TypeError(f"x01 must be a numpy.ndarray, got {type(x01).__name__}")
    if x01.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"x01 must have dtype float32 or float64 (pixels scaled to [0, 1]), got {x01.dtype}"
        )
    if x01.ndim not in (3, 4):
        raise ValueError(f"x01 must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {x01.shape}")
    x = x01 if x01.ndim == 4 else x01[None]  # (N, C, H, W)
    C = x.shape[1]
    mean_arr = _check_stat(mean, "mean", C)
    std_arr = _check_stat(std, "std", C)
    if np.any(std_arr <= 0):
        raise ValueError(f"std must be positive, got {std_arr.tolist()}")
    outside = ~((x >= -_X01_SLACK) & (x <= 1 + _X01_SLACK))  # NaN is outside too
    if outside.any():
        raise ValueError(
            "x01 must hold pixels in [0, 1] (divide 8-bit values by 255), got "
            f"{int(outside.sum())} values outside, e.g. {x[outside][0]}"
        )
    out = np.empty(x.shape, dtype=dt)
    _normalize_into(out, x, 1, mean_arr, std_arr)
    return out if x01.ndim == 4 else out[0]


def _channel_stats(raw: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
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


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not 0 <= value < 1:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _check_image_size(image_size: Any) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if not isinstance(image_size, tuple | list) or len(image_size) != 2:
        raise TypeError(f"image_size must be a pair (H, W) of ints, got {image_size!r}")
    H, W = (_check_int(v, "image_size", 1) for v in image_size)
    return (H, W)


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


def _stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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


def _split(
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
    order = _stratified_order(y, rng)
    test = order[:n_test]
    val = order[n_test : n_test + n_val]
    train = order[n_test + n_val :]
    return train, rng.permutation(val), rng.permutation(test)


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

_IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")
_IDX_PARTS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("t10k", "images"): "t10k-images-idx3-ubyte",
    ("t10k", "labels"): "t10k-labels-idx1-ubyte",
}
# IDX type code -> (name, big-endian dtype)
_IDX_TYPES = {
    0x08: ("unsigned byte", ">u1"),
    0x09: ("signed byte", ">i1"),
    0x0B: ("short", ">i2"),
    0x0C: ("int", ">i4"),
    0x0D: ("float", ">f4"),
    0x0E: ("double", ">f8"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file: ``00 00 <type> <ndim>``, ndim big-endian uint32 sizes, the data."""
    buf = _read_bytes(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_TYPES or buf[3] == 0:
        raise DataError(
            f"{path}: not an IDX file (magic bytes {buf[:4].hex(' ') or 'missing'}, expected "
            "00 00 <type code> <number of dimensions>)"
        )
    type_name, dtype = _IDX_TYPES[buf[2]]
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(f"{path}: truncated IDX header ({len(buf)} bytes, expected {header})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims) * np.dtype(dtype).itemsize
    if len(buf) != expected:
        what = "truncated" if len(buf) < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: the header says {type_name} {dims}, which is {expected} bytes, "
            f"but the file holds {len(buf)}"
        )
    if buf[2] != 0x08:
        raise DataError(f"{path}: IDX data must be unsigned bytes, got {type_name}")
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(dims)


def _idx_files(root: Path) -> dict[tuple[str, str], Path]:
    found: dict[tuple[str, str], Path] = {}
    for entry in sorted(root.iterdir()):
        m = _IDX_NAME.match(entry.name)
        if m is None or not entry.is_file():
            continue
        key = (m.group(1), m.group(2))
        # A raw copy beside the .gz (after `gunzip -k`) is preferred: same content, faster.
        if key not in found or found[key].name.endswith(".gz"):
            found[key] = entry
    return found


def _load_idx(root: Path):
    files = _idx_files(root)
    for key, name in _IDX_PARTS.items():
        if key not in files:
            raise DataError(f"{root}: missing IDX file {name} (or {name}.gz)")
    parts = {}
    for split in ("train", "t10k"):
        img_path, lbl_path = files[(split, "images")], files[(split, "labels")]
        images = _read_idx(img_path)
        labels = _read_idx(lbl_path)
        if images.ndim != 3 or 0 in images.shape:
            raise DataError(
                f"{img_path}: images must be 3-D (N, H, W) and non-empty, got {images.shape}"
            )
        if labels.ndim != 1:
            raise DataError(f"{lbl_path}: labels must be 1-D (N,), got shape {labels.shape}")
        if len(labels) != len(images):
            raise DataError(
                f"{img_path.name} holds {len(images)} images but {lbl_path.name} holds "
                f"{len(labels)} labels (in {root})"
            )
        parts[split] = (images[:, None], labels.astype(np.int64), img_path, lbl_path)
    X_tr, y_tr, img_tr, lbl_tr = parts["train"]
    X_te, y_te, img_te, lbl_te = parts["t10k"]
    if X_tr.shape[1:] != X_te.shape[1:]:
        raise DataError(
            f"{img_te}: test images are {X_te.shape[2:]}, training images {X_tr.shape[2:]}"
        )
    K = int(y_tr.max()) + 1
    if K < 2:
        raise DataError(f"{lbl_tr}: every training label is 0; at least 2 classes are needed")
    if y_te.max() >= K:
        bad = int(y_te.max())
        raise DataError(
            f"{lbl_te}: label {bad} out of range: the training labels ({lbl_tr.name}) "
            f"go from 0 to {K - 1}"
        )
    class_names = tuple(str(k) for k in range(K))
    return class_names, X_tr, y_tr, X_te, y_te


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# ---------------------------------------------------------------------------------------------

_CIFAR_BATCH = re.compile(r"^data_batch_(\d+)$")
_CIFAR_NAMES = ("test_batch", "batches.meta")
# Integer dtypes a numpy array inside a CIFAR pickle may have (data uint8, labels some int).
_PICKLE_DTYPES = frozenset(f"{k}{n}" for k in "ui" for n in (1, 2, 4, 8))


class _NDArrayTag:
    """Stands for ``numpy.ndarray`` inside a pickle: a name, nothing is constructed from it."""


class _DtypeStub:
    """Records ``numpy.dtype(obj, align, copy)`` and its pickled state without building it."""

    def __init__(self, obj=None, align=False, copy=False):
        self.obj = obj
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _ArrayStub:
    """Records the state of a pickled ndarray; :func:`_materialize` checks and builds it."""

    def __init__(self, shape=None, dtype=None, raw=None, order="C"):
        self.state = None if raw is None else (1, shape, dtype, order == "F", raw)

    def __setstate__(self, state):
        self.state = state


def _reconstruct_stub(subtype, shape, dtype):
    # numpy.core.multiarray._reconstruct(ndarray, (0,), b'b'); the BUILD that follows sets state.
    if subtype is not _NDArrayTag:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    return _ArrayStub()


def _frombuffer_stub(buf, dtype, shape, order):
    # Protocol 5 form of an ndarray: numpy._core.numeric._frombuffer(buffer, dtype, shape, order).
    if not isinstance(buf, bytes | bytearray):
        raise pickle.UnpicklingError("_frombuffer of something other than bytes")
    return _ArrayStub(shape, dtype, bytes(buf), order)


def _codecs_encode_stub(text, encoding="utf-8"):
    # Protocol <= 2 pickles written by Python 3 spell bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as (str, 'latin1')")
    return text.encode("latin1")


_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): _NDArrayTag,
    ("numpy", "dtype"): _DtypeStub,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_stub,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_stub,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer_stub,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer_stub,
    ("_codecs", "encode"): _codecs_encode_stub,
}


class _CifarUnpickler(pickle.Unpickler):
    """Resolves no real global: numpy's array names map to inert recorders, all else fails."""

    def find_class(self, module, name):
        stub = _PICKLE_GLOBALS.get((module, name))
        if stub is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return stub

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id")


def _text(v) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else v


def _stub_dtype(stub) -> np.dtype:
    if not isinstance(stub, _DtypeStub) or not isinstance(_text(stub.obj), str):
        raise ValueError("the array's dtype is not a plain numpy dtype")
    code = _text(stub.obj)
    if code not in _PICKLE_DTYPES:
        raise ValueError(f"array dtype {code!r} is not an integer dtype")
    order = "|"
    if isinstance(stub.state, tuple) and len(stub.state) > 1:
        order = _text(stub.state[1])
    if order not in ("|", "<", ">", "="):
        raise ValueError(f"array byte order {order!r} is invalid")
    return np.dtype(code if order == "|" else order + code)


def _materialize(value) -> np.ndarray:
    """Turn a recorded ndarray into a real one, checking every field; raise ValueError."""
    if not isinstance(value, _ArrayStub):
        return np.asarray(value)
    state = value.state
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise ValueError("malformed numpy array state")
    shape, dtype, fortran, raw = state[-4:]
    if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
        raise ValueError(f"malformed array shape {shape!r}")
    dt = _stub_dtype(dtype)
    if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dt.itemsize:
        raise ValueError(f"array data does not match shape {shape} and dtype {dt}")
    arr = np.frombuffer(raw, dtype=dt)
    return arr.reshape(shape, order="F" if fortran else "C")


def _load_cifar_pickle(path: Path) -> dict:
    """Unpickle one CIFAR-10 file with :class:`_CifarUnpickler` (``encoding="bytes"``).

    The file may hold only dicts, lists, tuples, bytes, str, numbers, and numpy arrays of
    integers; the array globals (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
    ``numpy.dtype``) resolve to recorders that construct nothing, and the arrays are rebuilt
    afterwards with ``np.frombuffer`` from their checked shape, integer dtype and bytes. Any
    other global (a class, ``os.system``...) is refused before anything is called.
    """
    if not path.is_file():
        raise DataError(f"{path}: missing CIFAR-10 file")
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    except Exception as exc:  # any failure of the restricted unpickler on untrusted bytes
        raise DataError(
            f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (a {type(obj).__name__}, not a dict)")
    return obj


def _cifar_get(d: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: not a CIFAR-10 python batch (no {key!r} entry)")


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _load_cifar_pickle(path)
    data, labels = _cifar_get(d, "data", path), _cifar_get(d, "labels", path)
    try:
        data, labels = _materialize(data), _materialize(labels)
    except ValueError as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or not len(data):
        raise DataError(
            f"{path}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: labels must be a list of ints")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    labels = labels.astype(np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(
            f"{path}: label {int(bad[0])} out of range 0..{num_classes - 1} "
            f"(batches.meta names {num_classes} classes)"
        )
    return data.reshape(-1, 3, 32, 32), labels  # CIFAR rows are R(32x32) G B: NCHW already


def _cifar_batches(root: Path) -> list[Path]:
    numbered = {}
    for entry in root.iterdir():
        m = _CIFAR_BATCH.match(entry.name)
        if m:
            numbered[int(m.group(1))] = entry
    for k in range(1, max(numbered, default=0) + 1):
        if k not in numbered:
            raise DataError(f"{root}: missing CIFAR-10 file data_batch_{k}")
    if not numbered:
        raise DataError(f"{root}: missing CIFAR-10 file data_batch_1")
    return [numbered[k] for k in sorted(numbered)]


def _load_cifar(root: Path):
    batches = _cifar_batches(root)
    meta_path = root / "batches.meta"
    meta = _load_cifar_pickle(meta_path)
    names = _cifar_get(meta, "label_names", meta_path)
    if not isinstance(names, list | tuple) or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"{meta_path}: label_names must be a list of strings")
    class_names = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)
    if len(class_names) < 2:
        raise DataError(f"{meta_path}: at least 2 label names are needed, got {len(class_names)}")
    train = [_cifar_batch(p, len(class_names)) for p in batches]
    X_te, y_te = _cifar_batch(root / "test_batch", len(class_names))
    X_tr = np.concatenate([b[0] for b in train])
    y_tr = np.concatenate([b[1] for b in train])
    return class_names, X_tr, y_tr, X_te, y_te


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------

_GRAY_MODES = ("1", "L", "LA", "La")
_COLOR_MODES = ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if _visible(p) and p.is_dir()), key=lambda p: p.name)


def _read_image(path: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """(H, W) uint8 for a grayscale image, (H, W, 3) uint8 for a colour one."""
    from PIL import Image

    try:
        with Image.open(path, formats=("PNG", "JPEG")) as img:
            img.load()
            mode = img.mode
            if mode in _GRAY_MODES:
                img = img.convert("L")
            elif mode in _COLOR_MODES:
                img = img.convert("RGB")
            else:
                raise DataError(f"{path}: unsupported image mode {mode!r} (8-bit gray or colour)")
            if image_size is not None and img.size != (image_size[1], image_size[0]):
                img = img.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def _load_folder(root: Path, image_size: tuple[int, int] | None):
    classes = _class_dirs(root)
    for entry in sorted(root.iterdir()):
        if _visible(entry) and entry.is_file() and entry.suffix.lower() in _IMAGE_SUFFIXES:
            raise DataError(f"{entry}: an image outside a class folder (use root/<class>/image)")
    if len(classes) < 2:
        raise DataError(
            f"{root}: an image folder needs at least 2 class sub-folders, found "
            f"{len(classes)}" + (f" ({classes[0].name})" if classes else "")
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, ...]] | None = None
    for k, cdir in enumerate(classes):
        files = sorted((p for p in cdir.iterdir() if _visible(p)), key=lambda p: p.name)
        if not files:
            raise DataError(f"{cdir}: empty class folder (no .png/.jpg/.jpeg images)")
        for path in files:
            if not path.is_file() or path.suffix.lower() not in _IMAGE_SUFFIXES:
                raise DataError(
                    f"{path}: not an image file (a class folder may hold only .png, .jpg and "
                    ".jpeg files; hidden files are ignored)"
                )
            img = _read_image(path, image_size)
            if first is None:
                first = (path, img.shape[:2])
            elif img.shape[:2] != first[1]:
                raise DataError(
                    f"{path}: image size {img.shape[:2]} (H, W) differs from {first[1]} of "
                    f"{first[0]}; pass image_size=(H, W) to resize every image"
                )
            images.append(img)
            labels.append(k)
    if all(img.ndim == 2 for img in images):
        X = np.stack(images)[:, None]  # (N, 1, H, W)
    else:
        H, W = first[1]
        X = np.empty((len(images), 3, H, W), dtype=np.uint8)
        for i, img in enumerate(images):
            X[i] = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)  # (3, H, W)
    return tuple(c.name for c in classes), X, np.array(labels, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Format detection and the entry point
# ---------------------------------------------------------------------------------------------


def _scan(root: Path) -> dict[str, list[str]]:
    """What ``root`` holds, per format: the names that identify it."""
    found: dict[str, list[str]] = {"idx": [], "cifar10": [], "folder": []}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not _visible(entry):
            continue
        if entry.is_dir():
            found["folder"].append(entry.name + "/")
        elif _IDX_NAME.match(entry.name):
            found["idx"].append(entry.name)
        elif _CIFAR_BATCH.match(entry.name) or entry.name in _CIFAR_NAMES:
            found["cifar10"].append(entry.name)
    return found


_KIND = {"idx": "IDX files", "cifar10": "CIFAR-10 batches", "folder": "class sub-folders"}


def _describe(found: dict[str, list[str]]) -> str:
    parts = []
    for fmt, names in found.items():
        if names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            parts.append(f"{_KIND[fmt]} ({shown})")
    return "; ".join(parts) if parts else "none of IDX files, CIFAR-10 batches, class sub-folders"


def _detect(root: Path, format: str | None) -> str:
    found = _scan(root)
    if format is not None:
        if not found[format]:
            raise DataError(
                f"{root}: format={format!r} but it holds no {_KIND[format]}; found "
                f"{_describe(found)}"
            )
        return format
    files = [fmt for fmt in ("idx", "cifar10") if found[fmt]]
    if len(files) > 1:
        raise DataError(
            f"{root}: ambiguous, holds {_describe({k: found[k] for k in files})}; pass format="
        )
    if files:
        return files[0]  # data files win over stray sub-folders
    if found["folder"]:
        return "folder"
    raise DataError(
        f"{root}: no data set found: expected IDX files (train-images-idx3-ubyte...), "
        "CIFAR-10 batches (data_batch_1..., test_batch, batches.meta) or class sub-folders"
    )


def _load_digits():
    from sklearn.datasets import load_digits  # slow to import: only when asked for

    bunch = load_digits()
    X = np.rint(bunch.images).astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    return tuple(str(int(c)) for c in bunch.target_names), X, y


def load_dataset(
    source: str | os.PathLike,
    *,
    format: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    dtype=np.float32,
    limit: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> Dataset:
    """Load a data set, split it, and normalise it with its training statistics.

    Parameters
    ----------
    source : str or os.PathLike
        The string ``"digits"`` (any case) for the bundled digits, ``"digits-windows"`` for
        windows of canvases of them (detector training data, see the module docstring), or a
        directory holding IDX files, CIFAR-10 batches or class sub-folders. A ``Path`` is
        always a path.
    format : {"digits", "digits-windows", "idx", "cifar10", "folder"}, optional
        Detected from the directory's contents when None. Given, it must match them (the
        bundled sources: it must be the source's own name).
    seed : int, optional
        Seed of the split (``np.random.default_rng(seed)``), >= 0.
    val_fraction : float, optional
        Share of the samples (IDX, CIFAR-10: of the train part) held out for validation.
    test_fraction : float, optional
        Share held out for testing (digits, digits windows and folders only: IDX and CIFAR-10
        bring their own test part). For ``"digits-windows"`` both fractions are shares of the
        1797 digits, whose windows then make each part. ``val_fraction + test_fraction`` must
        be below 1. A fraction of 0 gives an empty split; a positive fraction that rounds to
        no sample is a :class:`DataError`.
    dtype : {numpy.float32, numpy.float64}, optional
        dtype of the returned X arrays.
    limit : int, optional
        Keep at most this many training samples (a stratified prefix of the shuffled train
        split), for quick runs; val and test are unchanged. The statistics are computed on
        the kept samples. For ``"digits-windows"`` the samples are windows (cut from all the
        training digits).
    image_size : (int, int), optional
        ``(H, W)`` to resize every image of an image folder to. Folders only.

    Returns
    -------
    Dataset
        ``X_*`` of shape ``(N, C, H, W)`` in ``dtype``, ``y_*`` int64 ``(N,)``, ``mean`` and
        ``std`` float64 ``(C,)``. Shapes: digits and digits windows ``(1, 8, 8)``; MNIST
        ``(1, 28, 28)``; CIFAR-10 ``(3, 32, 32)``; folders ``(1 or 3, H, W)``.

    Raises
    ------
    DataError
        Missing path or file, corrupt or wrongly formatted data, inconsistent counts, labels
        out of range, fewer than 2 classes, an empty class folder or split.
    TypeError, ValueError
        A wrong argument; the message names it.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    seed = _check_int(seed, "seed", 0)
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
    dt = _check_dtype(dtype)
    if limit is not None:
        limit = _check_int(limit, "limit", 1)
    image_size = _check_image_size(image_size)
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"source must be 'digits', 'digits-windows' or a path, got {type(source).__name__}"
        )

    if isinstance(source, str) and source.lower() in BUNDLED:
        fmt = name = source.lower()
        if format not in (None, fmt):
            raise ValueError(f"source {fmt!r} is the {fmt} format, got format={format!r}")
    else:
        if format in BUNDLED:
            raise ValueError(f"format={format!r} needs source={format!r}, got {source!r}")
        root = Path(source).expanduser()
        if not root.exists():
            raise DataError(f"{root}: no such file or directory")
        if not root.is_dir():
            raise DataError(f"{root}: expected a directory holding the data set, got a file")
        root = root.resolve()
        try:
            fmt = _detect(root, format)
        except PermissionError as exc:
            raise DataError(f"{root}: cannot list the directory ({exc})") from exc
        name = str(root)
    if image_size is not None and fmt != "folder":
        raise ValueError(f"image_size applies to image folders only, not to format {fmt!r}")

    levels = 16 if fmt in BUNDLED else 255
    if fmt == "digits-windows":
        class_names, X, y, tr, va, X_te, y_te = _load_digit_windows(
            seed, val_fraction, test_fraction
        )
    elif fmt == "digits":
        class_names, X, y = _load_digits()
    else:
        try:
            if fmt == "folder":
                class_names, X, y = _load_folder(root, image_size)
            elif fmt == "idx":
                class_names, X, y, X_te, y_te = _load_idx(root)
            else:
                class_names, X, y, X_te, y_te = _load_cifar(root)
        except OSError as exc:  # a listing or stat that failed (permissions, a vanished file)
            raise DataError(f"{exc.filename or root}: cannot read ({exc})") from exc
    if fmt in ("digits", "folder"):
        tr, va, te = _split(y, val_fraction, test_fraction, seed, name)
        X_te, y_te = X[te], y[te]
    elif fmt != "digits-windows":
        tr, va, _ = _split(y, val_fraction, 0.0, seed, name)
    if limit is not None and limit < len(tr):
        tr = tr[:limit]
    tr = np.random.default_rng([seed, 1]).permutation(tr)
    X_tr, y_tr, X_va, y_va = X[tr], y[tr], X[va], y[va]

    mean, std = _channel_stats(X_tr, levels)

    def prep(raw: np.ndarray) -> np.ndarray:
        out = np.empty(raw.shape, dtype=dt)
        _normalize_into(out, raw, levels, mean, std)
        return out

    return Dataset(
        name=name,
        format=fmt,
        class_names=tuple(class_names),
        X_train=prep(X_tr),
        y_train=y_tr,
        X_val=prep(X_va),
        y_val=y_va,
        X_test=prep(X_te),
        y_test=np.ascontiguousarray(y_te, dtype=np.int64),
        mean=mean,
        std=std,
    )


# ---------------------------------------------------------------------------------------------
# A demo canvas for dense score maps
# ---------------------------------------------------------------------------------------------

_DIGIT = 8  # side of a digit image
_CANVAS_LAYOUTS = 20  # random layouts tried before digits_canvas gives up


def _place_boxes(
    H: int, W: int, count: int, margin: int, rng: np.random.Generator
) -> list[tuple[int, int]] | None:
    """Top-left corners ``(y0, x0)`` of ``count`` 8x8 boxes, or None when a layout jams.

    Each box is drawn uniformly among the corners still free: at least ``margin`` pixels
    from the canvas border and from every box placed before it.
    """
    d = _DIGIT
    # free[y, x]: may a box have its top-left corner at (margin + y, margin + x)?
    ny, nx = H - 2 * margin - d + 1, W - 2 * margin - d + 1
    if ny < 1 or nx < 1:
        return None
    free = np.ones((ny, nx), dtype=bool)
    corners = []
    for _ in range(count):
        spots = np.flatnonzero(free)
        if not spots.size:
            return None
        y, x = divmod(int(spots[rng.integers(spots.size)]), nx)
        corners.append((margin + y, margin + x))
        # Corners closer than d + margin on both axes would overlap or crowd this box.
        reach = d + margin - 1
        free[max(0, y - reach) : y + reach + 1, max(0, x - reach) : x + reach + 1] = False
    return corners


def digits_canvas(
    size: tuple[int, int] = (64, 128),
    count: int = 6,
    *,
    seed: int = 0,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    margin: int = 2,
) -> tuple[np.ndarray, list[dict]]:
    """A demo image for dense score maps: held-out 8x8 digits pasted on a black canvas.

    The digits are scikit-learn's bundled digits (raw 0..16 divided by 16) from the *test*
    split that ``load_dataset("digits", seed=split_seed, val_fraction=val_fraction,
    test_fraction=test_fraction)`` makes, so that a model trained on that data set has never
    seen them. They are pasted at their native 8x8 size at random positions that keep at
    least ``margin`` pixels between any two digits and between every digit and the border.
    With ``count <= 10`` the labels are distinct; with more, the digits are drawn from the
    whole test split without repetition. Everything is deterministic in ``seed`` (and
    ``split_seed``), whatever the global NumPy random state.

    Parameters
    ----------
    size : (int, int), optional
        ``(H, W)`` of the canvas, each at least 8.
    count : int, optional
        Number of digits, >= 1.
    seed : int, optional
        Seed of the choice of digits and of their positions, >= 0.
    split_seed, val_fraction, test_fraction
        The split the digits come from, as for :func:`load_dataset` (``seed``,
        ``val_fraction``, ``test_fraction``); ``test_fraction`` must be positive.
    margin : int, optional
        Minimum gap in pixels between digits, and between digits and the border, >= 0.

    Returns
    -------
    canvas : numpy.ndarray
        float32 in [0, 1] (background 0), shape ``(1, H, W)``.
    placements : list of dict
        One per digit, in the order placed: ``{"label": int, "index": int, "box": [x0, y0,
        x1, y1]}``, where ``index`` is the row in scikit-learn's digits and the box (``x1``,
        ``y1`` exclusive) is where the digit sits: ``canvas[0, y0:y1, x0:x1]`` is that digit.

    Raises
    ------
    TypeError
        An argument of the wrong type.
    ValueError
        ``size`` below 8, ``count`` digits that do not fit (no free position after a bounded
        number of random layouts), more digits than the test split holds, a bad fraction.

    Shape
    -----
    ``(1, H, W)`` with ``(H, W) = size``; every box is ``x1 - x0 = y1 - y0 = 8``.
    """
    if not isinstance(size, tuple | list) or len(size) != 2:
        raise TypeError(f"size must be a pair (H, W) of ints, got {size!r}")
    H, W = (_check_int(v, "size", 1) for v in size)
    if H < _DIGIT or W < _DIGIT:
        raise ValueError(f"size must be at least (8, 8) to hold an 8x8 digit, got ({H}, {W})")
    count = _check_int(count, "count", 1)
    seed = _check_int(seed, "seed", 0)
    split_seed = _check_int(split_seed, "split_seed", 0)
    margin = _check_int(margin, "margin", 0)
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if test_fraction == 0:
        raise ValueError("test_fraction must be positive: the digits come from the test split")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
    # n boxes in a row need 8n + margin (n + 1) pixels: the grid is the densest packing.
    per_col = (H - margin) // (_DIGIT + margin)
    per_row = (W - margin) // (_DIGIT + margin)
    digits = f"{count} digit{'s' if count > 1 else ''}"
    no_fit = f"cannot fit {digits} (8x8, margin {margin}) in a canvas of size ({H}, {W})"
    if count > per_col * per_row:
        raise ValueError(f"{no_fit}: at most {per_col * per_row} fit; enlarge size or lower count")

    _, X, y = _load_digits()
    _, _, test = _split(y, val_fraction, test_fraction, split_seed, "digits")
    if count > len(test):
        raise ValueError(f"count must be <= {len(test)} (the test split's size), got {count}")
    rng = np.random.default_rng(seed)
    if count <= 10:
        labels = rng.permutation(np.unique(y[test]))[:count]
        chosen = [int(rng.choice(test[y[test] == label])) for label in labels]
    else:
        chosen = [int(i) for i in rng.choice(test, size=count, replace=False)]

    for _ in range(_CANVAS_LAYOUTS):
        corners = _place_boxes(H, W, count, margin, rng)
        if corners is not None:
            break
    else:
        raise ValueError(
            f"{no_fit}: no room left after {_CANVAS_LAYOUTS} random layouts; enlarge size "
            "or lower count or margin"
        )

    canvas = np.zeros((1, H, W), dtype=np.float32)
    placements = []
    for index, (y0, x0) in zip(chosen, corners, strict=True):
        canvas[0, y0 : y0 + _DIGIT, x0 : x0 + _DIGIT] = X[index, 0] / np.float32(16)
        placements.append(
            {
                "label": int(y[index]),
                "index": index,
                "box": [x0, y0, x0 + _DIGIT, y0 + _DIGIT],
            }
        )
    return canvas, placements


# ---------------------------------------------------------------------------------------------
# Windows of digit canvases: training data for a detector
# ---------------------------------------------------------------------------------------------

_WINDOW_CANVAS = (32, 32)  # (H, W) of the canvases the windows are cut from
_WINDOW_COUNT = 4  # digits per canvas (the last canvas of a part may hold fewer)
_WINDOW_MARGIN = 2  # pixels between digits and from the border, as digits_canvas's default
_WINDOW_SHIFTS = 4  # one-pixel shifts per placed digit, besides its exact window
_WINDOW_NEAR = 3  # background windows per placed digit, 2 or 3 pixels off the nearest digit
_WINDOW_FAR = 2  # background windows with ink per placed digit, 4 or more pixels off all
_WINDOW_BLANK = 1  # blank windows per canvas
_WINDOW_LAYOUTS = 100  # random layouts tried per canvas (4 digits in 32x32 never jam in 1e4)


def _window_labels(
    shape: tuple[int, int], corners: list[tuple[int, int]], classes: list[int], background: int
) -> tuple[np.ndarray, np.ndarray]:
    """The label and the offset of every 8x8 window of a canvas holding digits.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` of the canvas, each at least 8.
    corners : list of (int, int)
        Top-left corners ``(y0, x0)`` of the digits' 8x8 boxes, at least 2 pixels apart.
    classes : list of int
        The digits' classes, one per corner.
    background : int
        The label of a window that is no digit's.

    Returns
    -------
    label : numpy.ndarray
        int64: ``label[r, c]`` is the class of the window with top-left corner ``(r, c)``:
        the class of the digit whose corner is within 1 pixel in both axes (offset 0 or 1),
        else ``background``.
    offset : numpy.ndarray
        int64: ``offset[r, c] = min over digits of max(|r - y0|, |c - x0|)`` (the canvas
        size ``H + W`` without digits).

    Shape
    -----
    Both ``(H - 7, W - 7)``.
    """
    H, W = shape
    rr, cc = np.indices((H - _DIGIT + 1, W - _DIGIT + 1))  # the windows' corners
    offset = np.full(rr.shape, H + W, dtype=np.int64)
    label = np.full(rr.shape, background, dtype=np.int64)
    for (y0, x0), k in zip(corners, classes, strict=True):
        off = np.maximum(np.abs(rr - y0), np.abs(cc - x0))  # (H - 7, W - 7)
        label[off <= 1] = k
        offset = np.minimum(offset, off)
    return label, offset


def _canvas_windows(
    X: np.ndarray, y: np.ndarray, indices: np.ndarray, rng: np.random.Generator, background: int
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled 8x8 windows cut from canvases of the digits ``X[indices]``.

    The digits, in a random order, are pasted four at a time on black 32x32 canvases, at
    random positions at least 2 pixels from each other and from the border (placed as
    :func:`digits_canvas` places them). The window with top-left corner ``(r, c)`` is
    ``canvas[r : r + 8, c : c + 8]``; its *offset* from a digit with corner ``(y0, x0)`` is
    ``max(|r - y0|, |c - x0|)``. A window at offset 0 or 1 from a digit is labelled with that
    digit's class (at most one digit qualifies: two digits' corners are 10 or more pixels
    apart in some axis), any other window ``background``. From each canvas, without
    repetition (fewer where a canvas has fewer candidates):

    - per digit, its exact window and 4 of its 8 one-pixel shifts (a random choice);
    - per digit, 3 background windows at offset 2 or 3 from the nearest digit: shifted digits,
      their halves, parts of a neighbour;
    - per digit, 2 background windows holding ink at offset 4 or more from every digit:
      edges and corners of digits, parts of two digits;
    - 1 blank window.

    So about half the windows are digits (a tenth of them per class), half background.

    Parameters
    ----------
    X : numpy.ndarray
        uint8 digits, raw values 0..16, shape ``(N, 1, 8, 8)``.
    y : numpy.ndarray
        Their int64 labels in ``[0, background)``, shape ``(N,)``.
    indices : numpy.ndarray
        The rows of ``X`` to use: one part of the split.
    rng : numpy.random.Generator
        The source of every random choice.
    background : int
        The label of background windows.

    Returns
    -------
    windows : numpy.ndarray
        uint8, raw values 0..16, shape ``(M, 1, 8, 8)``.
    labels : numpy.ndarray
        int64, shape ``(M,)``.

    Shape
    -----
    ``M = 10 n + ceil(n / 4)`` for ``n = len(indices)`` when no canvas runs short of
    candidates.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    d = _DIGIT
    H, W = _WINDOW_CANVAS
    order = indices[rng.permutation(len(indices))]
    windows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    for start in range(0, len(order), _WINDOW_COUNT):
        group = order[start : start + _WINDOW_COUNT]
        for _ in range(_WINDOW_LAYOUTS):
            corners = _place_boxes(H, W, len(group), _WINDOW_MARGIN, rng)
            if corners is not None:
                break
        else:  # pragma: no cover - the constants make a jam vanishingly rare
            raise RuntimeError(f"no layout of {len(group)} digits in {_WINDOW_CANVAS}")
        canvas = np.zeros((H, W), dtype=np.uint8)
        for index, (y0, x0) in zip(group, corners, strict=True):
            canvas[y0 : y0 + d, x0 : x0 + d] = X[index, 0]
        label, offset = _window_labels((H, W), corners, [int(y[i]) for i in group], background)
        view = sliding_window_view(canvas, (d, d))  # (H - 7, W - 7, 8, 8)
        inked = view.any(axis=(2, 3))
        picked = []
        for y0, x0 in corners:
            picked.append((y0, x0))
            for k in rng.choice(len(shifts), _WINDOW_SHIFTS, replace=False):
                picked.append((y0 + shifts[k][0], x0 + shifts[k][1]))
        near = (offset >= 2) & (offset <= 3)
        far = (offset >= 4) & inked
        for mask, per_digit in ((near, _WINDOW_NEAR), (far, _WINDOW_FAR)):
            spots = np.flatnonzero(mask)
            take = min(spots.size, per_digit * len(group))
            for s in rng.choice(spots, take, replace=False):
                picked.append(divmod(int(s), label.shape[1]))
        rows, cols = np.array(picked).T
        windows.append(view[rows, cols][:, None])  # (n, 1, 8, 8)
        labels.append(label[rows, cols])
        windows.append(np.zeros((_WINDOW_BLANK, 1, d, d), dtype=np.uint8))
        labels.append(np.full(_WINDOW_BLANK, background, dtype=np.int64))
    if not windows:
        return np.zeros((0, 1, d, d), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    return np.concatenate(windows), np.concatenate(labels)


def _load_digit_windows(seed: int, val_fraction: float, test_fraction: float):
    """The ``"digits-windows"`` source: windows cut from canvases of each part's digits.

    Returns ``(class_names, X, y, train, val, X_test, y_test)`` like the other loaders after
    their split: ``X`` (N, 1, 8, 8) uint8 holds the train then the val windows, ``train``
    (in stratified order) and ``val`` (shuffled) index it; the test windows are shuffled.
    """
    names, X, y = _load_digits()
    parts = _split(y, val_fraction, test_fraction, seed, "digits-windows")
    background = len(names)
    cut = [
        _canvas_windows(X, y, part, np.random.default_rng([seed, 2, k]), background)
        for k, part in enumerate(parts)
    ]
    (X_tr, y_tr), (X_va, y_va), (X_te, y_te) = cut
    rng = np.random.default_rng([seed, 3])
    train = _stratified_order(y_tr, rng)
    val = len(y_tr) + rng.permutation(len(y_va))
    test = rng.permutation(len(y_te))
    X_te, y_te = X_te[test], y_te[test]
    return (
        (*names, BACKGROUND),
        np.concatenate([X_tr, X_va]),
        np.concatenate([y_tr, y_va]),
        train,
        val,
        X_te,
        y_te,
    )
