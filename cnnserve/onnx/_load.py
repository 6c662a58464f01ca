"""Reading an ONNX file, its metadata and its constants. A private helper module of
:mod:`cnnserve.onnx`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.onnx._proto import (
    META_CLASS_NAMES,
    META_INPUT_SHAPE,
    META_NORMALIZATION,
    OnnxError,
    onnx_module,
)

__all__ = ["constant_value", "eval_const", "load_proto", "metadata_props"]


# ---------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------


def load_proto(source: Any) -> tuple[Any, str]:
    """The checked ModelProto of a path or bytes, and how to name it in messages."""
    onnx = onnx_module()
    if isinstance(source, bytes | bytearray | memoryview):
        data, label = bytes(source), "ONNX model (bytes)"
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        label = f"ONNX model {path}"
        if not path.is_file():
            raise OnnxError(f"{label}: {'a directory' if path.is_dir() else 'no such file'}")
        data = path.read_bytes()
    else:
        raise TypeError(f"source must be a path or bytes, got {type(source).__name__}")
    if not data:
        raise OnnxError(f"{label}: the file is empty")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and its relatives
        raise OnnxError(
            f"{label}: not an ONNX model (truncated, or another format?): {exc}"
        ) from exc
    missing = [
        what
        for what, present in (
            ("IR version", model.ir_version >= 1),
            ("opset", bool(model.opset_import)),
            ("node", bool(model.graph.node)),
        )
        if not present
    ]
    if missing:
        raise OnnxError(
            f"{label}: not an ONNX model (truncated, or another format?): it has no {missing[0]}"
        )
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise OnnxError(
                f"{label}: initializer {tensor.name!r} is stored in an external file; save the "
                "model with its weights inside (onnx.save(model, path, save_as_external_data="
                "False))"
            )
    if model.graph.sparse_initializer:
        raise OnnxError(f"{label}: sparse initializers are not supported")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - onnx.checker.ValidationError
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[0] if lines else type(exc).__name__
        context = next((line for line in lines if "Name:" in line), None)
        if context:  # "==> Context: Bad node spec for node. Name: pool OpType: MaxPool"
            text += f" ({context.split('Context:')[-1].strip()})"
        raise OnnxError(f"{label}: not a valid ONNX model: {text}") from exc
    return model, label


def metadata_props(model: Any, label: str) -> dict[str, Any]:
    """The cnnserve keys of ``metadata_props``, decoded (JSON, or names separated by commas)."""
    props = {p.key: p.value for p in model.metadata_props}
    out: dict[str, Any] = {}
    for key in (META_CLASS_NAMES, META_NORMALIZATION, META_INPUT_SHAPE):
        if key not in props:
            continue
        text = props[key]
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError as exc:
            if key != META_CLASS_NAMES:
                raise OnnxError(
                    f"{label}: metadata_props {key!r} is not JSON ({exc}): {text[:80]!r}"
                ) from exc
            out[key] = [name.strip() for name in text.split(",")]
    return out


# ---------------------------------------------------------------------------------------------
# Constants and shape computations
# ---------------------------------------------------------------------------------------------


def eval_const(op: str, attrs: Mapping[str, Any], args: list[Any], where: str) -> np.ndarray:
    """One constant-folding op on numpy arrays (``None`` for an absent optional input)."""
    onnx = onnx_module()
    if op == "Identity":
        return args[0]
    if op == "Shape":
        return np.array(args[0].shape, dtype=np.int64)[attrs.get("start", 0) : attrs.get("end")]
    if op == "Cast":
        return args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Unsqueeze":
        axes = attrs.get("axes", args[1] if len(args) > 1 else None)
        out = args[0]
        ndim = out.ndim + len(axes)
        for axis in sorted(int(a) % ndim for a in axes):
            out = np.expand_dims(out, axis)
        return out
    if op == "Squeeze":
        axes = attrs.get("axes", args[1] if len(args) > 1 else None)
        if axes is None:
            return np.squeeze(args[0])
        return np.squeeze(args[0], axis=tuple(int(a) for a in axes))
    if op == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in args], axis=attrs["axis"])
    if op == "Gather":
        return np.take(args[0], args[1], axis=attrs.get("axis", 0))
    if op == "Slice":
        data, starts, ends = args[0], args[1], args[2]
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
        index = [slice(None)] * data.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            index[int(a)] = slice(int(s), int(e), int(st))
        return data[tuple(index)]
    raise OnnxError(f"{where}: op {op} is not supported on constants")


def constant_value(attrs: Mapping[str, Any], where: str) -> np.ndarray:
    onnx = onnx_module()
    for key, value in attrs.items():
        if key == "value":
            return onnx.numpy_helper.to_array(value)
        if key in ("value_float", "value_floats"):
            return np.array(value, dtype=np.float32)
        if key in ("value_int", "value_ints"):
            return np.array(value, dtype=np.int64)
        raise OnnxError(f"{where}: attribute {key} is not supported")
    raise OnnxError(f"{where}: a Constant without a value")
