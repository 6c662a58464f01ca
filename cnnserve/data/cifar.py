"""CIFAR-10 python batches: the ``"cifar10"`` format of :mod:`cnnserve.data`.

The CIFAR-10 "python version" directory: ``data_batch_1`` .. ``data_batch_k``, ``test_batch``
and ``batches.meta`` (label names). These files are pickles: reading them is the only place
cnnserve unpickles anything, and it does so with a restricted unpickler
(:func:`_load_cifar_pickle`) that resolves no real global, so a crafted file cannot run code.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np

from cnnserve.data._common import DataError

__all__ = ["CIFAR_BATCH", "CIFAR_NAMES", "load_cifar"]

CIFAR_BATCH = re.compile(r"^data_batch_(\d+)$")
CIFAR_NAMES = ("test_batch", "batches.meta")
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
        m = CIFAR_BATCH.match(entry.name)
        if m:
            numbered[int(m.group(1))] = entry
    for k in range(1, max(numbered, default=0) + 1):
        if k not in numbered:
            raise DataError(f"{root}: missing CIFAR-10 file data_batch_{k}")
    if not numbered:
        raise DataError(f"{root}: missing CIFAR-10 file data_batch_1")
    return [numbered[k] for k in sorted(numbered)]


def load_cifar(root: Path):
    """``(class_names, X_train, y_train, X_test, y_test)`` of a CIFAR-10 directory (uint8)."""
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
