"""Model files: both formats (trained and converted), reading, writing and checking.

A model file is one safetensors file: the tensors, and in its metadata ``format`` (which of
the two formats), ``format_version`` and ``cnnserve``, a JSON document with the architecture
(:meth:`cnnserve.network.ConvNet.config`), the class names, the input normalisation, the
dtype and the training record. The two formats:

``cnnserve.model`` (:func:`save_model`, :func:`read_model_file`, :func:`load_model`)
    A trained network: its parameters and batchnorm running statistics under their own names
    (``W1``, ``b1``, ``gamma2``, ``running_mean2``...). A solver checkpoint adds its state:
    tensors under ``state/`` and a JSON ``state`` metadata entry.
``cnnserve.fcn`` (:func:`write_converted_file`, :func:`read_converted_file`)
    A converted, fully convolutional network (:mod:`cnnserve.convert`): the same names, the
    affine weights in their conv shapes, and a ``conversion`` entry with the geometry and the
    self-check of the conversion.

Reading never unpickles. Every tensor is checked against the architecture (present, of its
shape and dtype, finite) before any network is built; a missing, truncated, corrupt or
mismatched file raises :class:`ModelFileError` naming the file and, where one is at fault,
the tensor. Writing is atomic: a crash leaves the old file or the new one.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cnnserve import __version__
from cnnserve._checks import check_dtype
from cnnserve._files import atomic_write_bytes
from cnnserve.network import ConvNet
from cnnserve.specs import tensor_shapes

__all__ = [
    "FCN_FORMAT_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_MODEL_PARAMS",
    "MAX_MODEL_PIXELS",
    "ConvertedFile",
    "ModelFile",
    "ModelFileError",
    "check_format",
    "check_model_size",
    "check_tensors",
    "load_model",
    "read_converted_file",
    "read_metadata",
    "read_model_file",
    "read_safetensors",
    "save_model",
    "write_converted_file",
    "write_model_file",
]

FORMAT_NAME = "cnnserve.model"  # a trained network
FCN_FORMAT_NAME = "cnnserve.fcn"  # a converted network (cnnserve.convert)
FORMAT_VERSION = 1
STATE_PREFIX = "state/"

#: Largest training input (H*W) of a model file read by default: 512x512, 4096 times the
#: shipped digits models' 8x8. Every map and warm-up of a model scales with it.
MAX_MODEL_PIXELS = 512 * 512
#: Most numbers in a model file's architecture tensors read by default: 16.8 M (64 MiB in
#: float32), 300 times the shipped models' 53 k.
MAX_MODEL_PARAMS = 2**24


class ModelFileError(ValueError):
    """A model file is missing, truncated, corrupt, or does not match its architecture."""


# ---------------------------------------------------------------------------------------------
# Safetensors files and their checks
# ---------------------------------------------------------------------------------------------


def write_model_file(
    path: str | os.PathLike,
    format_name: str,
    tensors: Mapping[str, np.ndarray],
    meta: Mapping,
    state: Mapping | None = None,
) -> Path:
    """Write tensors and cnnserve metadata as a safetensors file, atomically.

    The metadata holds ``format`` (``format_name``), ``format_version``, ``cnnserve`` (``meta``
    as JSON) and, when given, ``state`` (JSON).

    Raises
    ------
    ModelFileError
        The file's directory does not exist.
    """
    from safetensors.numpy import save as _save_bytes

    path = Path(path)
    if not path.parent.is_dir():
        raise ModelFileError(
            f"cannot write model file {path}: directory {path.parent} does not exist"
        )
    metadata = {
        "format": format_name,
        "format_version": str(FORMAT_VERSION),
        "cnnserve": json.dumps(meta, allow_nan=False),
    }
    if state is not None:
        metadata["state"] = json.dumps(state, allow_nan=False)
    contiguous = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    atomic_write_bytes(path, _save_bytes(contiguous, metadata=metadata))
    return path


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """A safetensors file's handle; a missing or unreadable file is a :class:`ModelFileError`."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ModelFileError(f"model file {path} {what}")
    if path.suffix.lower() == ".onnx":
        raise ModelFileError(
            f"model file {path} is an ONNX file: import it first with `cnnserve import {path}` "
            "(the service's models directory takes .onnx files as they are)"
        )
    try:
        with safe_open(str(path), framework="numpy") as handle:
            yield handle
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"model file {path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, reading only its header (no tensor).

    Raises
    ------
    ModelFileError
        As :func:`read_safetensors`.
    """
    with _open_safetensors(Path(path)) as handle:
        return dict(handle.metadata() or {})


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and tensors of a safetensors file (never unpickles).

    Raises
    ------
    ModelFileError
        The file is missing, a directory, or not a readable safetensors file.
    """
    with _open_safetensors(Path(path)) as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: np.array(handle.get_tensor(name)) for name in handle.keys()}
    return metadata, tensors


def check_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    dtype: np.dtype,
) -> None:
    """Every expected tensor is present with its shape and dtype, finite; no other is there.

    Names starting with ``"state/"`` are extra state and are not checked.

    Raises
    ------
    ModelFileError
        Naming the file and the tensor at fault.
    """
    extra = sorted(n for n in tensors if n not in expected and not n.startswith(STATE_PREFIX))
    if extra:
        raise ModelFileError(
            f"{path} holds tensor(s) {', '.join(map(repr, extra))} that its architecture "
            "does not have"
        )
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelFileError(f"{path} is missing tensor {name!r} of shape {shape}")
        value = tensors[name]
        if value.shape != shape:
            raise ModelFileError(
                f"{path}: tensor {name!r} has shape {value.shape}, but the architecture needs "
                f"{shape}"
            )
        if value.dtype != dtype:
            raise ModelFileError(
                f"{path}: tensor {name!r} has dtype {value.dtype}, but the model is {dtype}"
            )
        if not np.all(np.isfinite(value)):
            raise ModelFileError(f"{path}: tensor {name!r} has NaN or inf values")
        if name.startswith("running_var") and np.any(value < 0):
            raise ModelFileError(f"{path}: tensor {name!r} has negative values")


def check_format(path: str | os.PathLike, metadata: Mapping[str, str], format_name: str) -> None:
    """The metadata says this is a cnnserve file of ``format_name`` in the version we read.

    Raises
    ------
    ModelFileError
        Another format (a converted model where a trained one is expected, or the reverse,
        or not a cnnserve file at all) or another format version.
    """
    found = metadata.get("format")
    if found != format_name or "cnnserve" not in metadata:
        if found == FCN_FORMAT_NAME:
            raise ModelFileError(
                f"{path} is a converted (fully convolutional) model file; read it with "
                "cnnserve.convert.load_fully_convolutional or `cnnserve scoremap`"
            )
        if found == FORMAT_NAME and "cnnserve" in metadata:
            raise ModelFileError(
                f"{path} is a trained model file, not a converted one; convert it with "
                "cnnserve.convert.to_fully_convolutional or `cnnserve convert`"
            )
        raise ModelFileError(
            f"{path} is a safetensors file but not a cnnserve model (no {format_name!r} metadata)"
        )
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{path} has model format version {metadata.get('format_version')!r}; this cnnserve "
            f"({__version__}) reads version {FORMAT_VERSION}"
        )


def check_model_size(
    path: str | os.PathLike,
    config: Mapping,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    max_pixels: int = MAX_MODEL_PIXELS,
    max_params: int = MAX_MODEL_PARAMS,
) -> None:
    """A model file's declared input and tensors are within the limits.

    Checked from the header (the architecture and the shapes it implies) before any tensor
    is read or any network built: a file of a few hundred bytes can declare an 8000 x 8000
    input, whose self-check and warm-up would take minutes and gigabytes.

    Parameters
    ----------
    path : str or PathLike
        For the message.
    config : dict
        The architecture (``input_shape`` is ``(C, H, W)``, checked already).
    shapes : dict of tuple
        Every tensor the architecture holds (:func:`~cnnserve.specs.tensor_shapes`).
    max_pixels : int
        Largest ``H * W`` of the training input.
    max_params : int
        Most numbers in those tensors together (weights and normalisation statistics).

    Raises
    ------
    ModelFileError
        Naming the file, what it declares and the limit.
    """
    C, H, W = (int(v) for v in config["input_shape"])
    if H * W > max_pixels:
        raise ModelFileError(
            f"{path} declares a {C}x{H}x{W} input: {H * W:,} pixels, more than the limit of "
            f"{max_pixels:,} (max_pixels; --max-model-pixels of cnnserve info and serve)"
        )
    params = sum(math.prod(shape) for shape in shapes.values())
    if params > max_params:
        raise ModelFileError(
            f"{path} declares {params:,} parameters, more than the limit of {max_params:,} "
            "(max_params; --max-model-params of cnnserve info and serve)"
        )


# ---------------------------------------------------------------------------------------------
# Trained models
# ---------------------------------------------------------------------------------------------


class ModelFile(NamedTuple):
    """Everything :func:`read_model_file` found in a model file."""

    model: ConvNet
    training: dict  # the training record ({} when there is none)
    state_tensors: dict[str, np.ndarray]  # extra tensors (the "state/" prefix removed)
    state: dict | None  # extra JSON state (a solver checkpoint's), or None


def save_model(
    model: ConvNet,
    path: str | os.PathLike,
    *,
    training: Mapping | None = None,
    state_tensors: Mapping[str, np.ndarray] | None = None,
    state: Mapping | None = None,
) -> Path:
    """Write ``model`` to a safetensors model file, atomically.

    Parameters
    ----------
    model : ConvNet
    path : str or PathLike
        Destination; its directory must exist. An existing file is replaced only once the
        new one is complete.
    training : dict, optional
        The training record (data set, epochs, accuracies, ...). The cnnserve version and
        the date are added.
    state_tensors : dict of ndarray, optional
        Extra tensors (a solver checkpoint's optimizer state), stored as ``state/<name>``.
    state : dict, optional
        Extra JSON-serialisable state, stored in the metadata.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    if not isinstance(model, ConvNet):
        raise TypeError(f"model must be a ConvNet, got {type(model).__name__}")
    tensors = {}
    for name, value in model.state_tensors().items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"refusing to save {path}: tensor {name!r} has NaN or inf values")
        tensors[name] = np.ascontiguousarray(value)
    for name, value in (state_tensors or {}).items():
        tensors[STATE_PREFIX + name] = np.ascontiguousarray(value)
    record = dict(training or {})
    record.setdefault("cnnserve_version", __version__)
    record.setdefault("date", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    meta = {
        "architecture": model.config(),
        "class_names": list(model.class_names),
        "normalization": model.normalization,
        "dtype": np.dtype(model.dtype).name,
        "training": record,
    }
    return write_model_file(path, FORMAT_NAME, tensors, meta, state)


def read_model_file(
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_MODEL_PIXELS,
    max_params: int = MAX_MODEL_PARAMS,
) -> ModelFile:
    """Read a model file written by :func:`save_model`, checking it against its architecture.

    Parameters
    ----------
    path : str or PathLike
    max_pixels, max_params : int
        Limits of :func:`check_model_size`, checked from the file's header before any
        tensor is read.

    Raises
    ------
    ModelFileError
        The file is missing, is not a safetensors file (truncated or corrupt), is not a
        cnnserve model, declares an input or parameters over the limits, or holds a tensor
        that is missing, unexpected, of the wrong shape or dtype, or not finite. The message
        names the file and the tensor.
    """
    path = Path(path)
    metadata = read_metadata(path)  # the header only
    check_format(path, metadata, FORMAT_NAME)
    try:
        meta = json.loads(metadata["cnnserve"])
        state = json.loads(metadata["state"]) if "state" in metadata else None
        config = meta["architecture"]
        expected = tensor_shapes(config)  # checks the architecture; allocates nothing
        dtype = check_dtype(config.get("dtype", "float32"))
        training = dict(meta.get("training") or {})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"{path} has invalid metadata: {exc}") from exc
    check_model_size(path, config, expected, max_pixels=max_pixels, max_params=max_params)
    _, tensors = read_safetensors(path)

    # Every tensor is checked before the network is built, so that the network's own arrays
    # are never larger than what the file holds.
    check_tensors(path, tensors, expected, dtype)
    try:
        model = ConvNet.from_config(
            config, class_names=meta.get("class_names"), normalization=meta.get("normalization")
        )
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path} has invalid metadata: {exc}") from exc
    for name in model.params:
        model.params[name] = tensors[name]
    for bn in model.bn_params:
        bn["running_mean"] = tensors[f"running_mean{bn['name']}"]
        bn["running_var"] = tensors[f"running_var{bn['name']}"]
    extras = {
        name[len(STATE_PREFIX) :]: value
        for name, value in tensors.items()
        if name.startswith(STATE_PREFIX)
    }
    return ModelFile(model, training, extras, state)


def load_model(
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_MODEL_PIXELS,
    max_params: int = MAX_MODEL_PARAMS,
) -> ConvNet:
    """Load the network stored in a model file (see :func:`read_model_file` for the errors).

    ``max_pixels`` and ``max_params`` bound the input and the parameters it may declare
    (:func:`check_model_size`).
    """
    return read_model_file(path, max_pixels=max_pixels, max_params=max_params).model


# ---------------------------------------------------------------------------------------------
# Converted models
# ---------------------------------------------------------------------------------------------


class ConvertedFile(NamedTuple):
    """Everything :func:`read_converted_file` found in a converted model file."""

    config: dict  # the original network's architecture (ConvNet.config)
    tensors: dict[str, np.ndarray]  # the converted tensors, checked against the architecture
    class_names: Any  # as stored: checked by the network that is built from them
    normalization: Any
    training: dict  # the original model's training record
    check: dict  # the conversion's self-check record (complete, and passed)
    geometry: dict | None  # the geometry stored at conversion, if any


def write_converted_file(
    path: str | os.PathLike,
    *,
    config: Mapping,
    tensors: Mapping[str, np.ndarray],
    class_names: Any,
    normalization: Mapping | None,
    dtype: np.dtype,
    training: Mapping,
    geometry: Mapping,
    check: Mapping,
) -> Path:
    """Write a converted network's tensors and metadata (format ``cnnserve.fcn``), atomically.

    The metadata holds the original architecture, the classes, the normalisation, the training
    record and a ``conversion`` entry: ``geometry``, ``check`` (the self-check), the cnnserve
    version and the date. :func:`cnnserve.convert.save_fully_convolutional` calls this.
    """
    meta = {
        "architecture": dict(config),
        "class_names": list(class_names),
        "normalization": normalization,
        "dtype": np.dtype(dtype).name,
        "training": dict(training),
        "conversion": {
            "geometry": dict(geometry),
            "check": dict(check),
            "cnnserve_version": __version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    }
    return write_model_file(path, FCN_FORMAT_NAME, tensors, meta)


def read_converted_file(
    path: str | os.PathLike,
    shapes_of: Callable[[Mapping], Mapping[str, tuple[int, ...]]],
    *,
    max_pixels: int = MAX_MODEL_PIXELS,
    max_params: int = MAX_MODEL_PARAMS,
) -> ConvertedFile:
    """Read a converted model file, checking its tensors against its architecture.

    Parameters
    ----------
    path : str or PathLike
    shapes_of : callable
        ``shapes_of(config)``: the name and shape of every tensor the converted network of
        this architecture holds (it checks the architecture and allocates nothing).
    max_pixels, max_params : int
        Limits of :func:`check_model_size`, checked before any tensor is read.

    Raises
    ------
    ModelFileError
        Not a converted cnnserve file, invalid metadata, an incomplete or failed self-check
        record, or a tensor that is missing, unexpected, of the wrong shape or dtype, or not
        finite.
    """
    path = Path(path)
    metadata = read_metadata(path)  # the header only
    check_format(path, metadata, FCN_FORMAT_NAME)
    try:
        meta = json.loads(metadata["cnnserve"])
        config = meta["architecture"]
        shapes = shapes_of(config)  # allocates nothing
        dtype = check_dtype(config.get("dtype", "float32"))
        conversion = meta.get("conversion") or {}
        check = dict(conversion.get("check") or {})
        training = dict(meta.get("training") or {})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"{path} has invalid metadata: {exc}") from exc
    _check_record(path, check)
    check_model_size(path, config, shapes, max_pixels=max_pixels, max_params=max_params)
    _, tensors = read_safetensors(path)
    check_tensors(path, tensors, shapes, dtype)
    return ConvertedFile(
        config=config,
        tensors=tensors,
        class_names=meta.get("class_names"),
        normalization=meta.get("normalization"),
        training=training,
        check=check,
        geometry=conversion.get("geometry"),
    )


def _check_record(path: Path, check: Mapping) -> None:
    """A converted file's self-check record must be complete and must have passed."""
    numbers = ("max_abs_diff", "score_scale", "tolerance")
    valid = (
        isinstance(check.get("inputs"), int)
        and check["inputs"] >= 1
        and all(isinstance(check.get(k), int | float) for k in numbers)
        and isinstance(check.get("passed"), bool)
    )
    if not valid:
        raise ModelFileError(
            f"{path} has an invalid self-check record {dict(check)!r}: it needs inputs, "
            "max_abs_diff, score_scale, tolerance and passed; convert the model again"
        )
    if not (check["passed"] and check["max_abs_diff"] <= check["tolerance"]):
        raise ModelFileError(
            f"{path} records a failed self-check (max |converted - original| = "
            f"{check['max_abs_diff']:.3g}, tolerance {check['tolerance']:.3g}): its scores are "
            "not the original network's"
        )
