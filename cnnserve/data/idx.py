"""MNIST-style IDX files (MNIST, Fashion-MNIST): the ``"idx"`` format of :mod:`cnnserve.data`.

A directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or gzipped (``.gz``); the
spelling ``train-images.idx3-ubyte`` is accepted too. When both a raw and a ``.gz`` copy of a
file are present the raw one is read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from cnnserve.data._common import DataError, read_bytes

__all__ = ["IDX_NAME", "load_idx"]

IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")
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


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file: ``00 00 <type> <ndim>``, ndim big-endian uint32 sizes, the data."""
    buf = read_bytes(path)
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
        m = IDX_NAME.match(entry.name)
        if m is None or not entry.is_file():
            continue
        key = (m.group(1), m.group(2))
        # A raw copy beside the .gz (after `gunzip -k`) is preferred: same content, faster.
        if key not in found or found[key].name.endswith(".gz"):
            found[key] = entry
    return found


def load_idx(root: Path):
    """``(class_names, X_train, y_train, X_test, y_test)`` of an IDX directory (uint8 NCHW)."""
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
