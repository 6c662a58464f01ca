"""ONNX -> :class:`~cnnserve.network.ConvNet`: a graph read node by node, exactly or refused.

A private helper module of :mod:`cnnserve.onnx`; see :func:`cnnserve.onnx.read_onnx`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cnnserve.network import ConvNet
from cnnserve.onnx._load import constant_value, eval_const, load_proto, metadata_props
from cnnserve.onnx._proto import (
    META_CLASS_NAMES,
    META_INPUT_SHAPE,
    META_NORMALIZATION,
    OPSETS,
    OnnxError,
    onnx_module,
)
from cnnserve.specs import check_input_shape, describe_spec, normalise_spec, out_shape

__all__ = ["OnnxImport", "read_onnx"]

# The ops that become layers (or are dropped), and the ops that compute constants and shapes.
LAYER_OPS = (
    "Conv",
    "Relu",
    "MaxPool",
    "AveragePool",
    "GlobalMaxPool",
    "GlobalAveragePool",
    "BatchNormalization",
    "Flatten",
    "Reshape",
    "Gemm",
    "MatMul",
    "Add",
    "Dropout",
    "Identity",
    "Softmax",
    "LogSoftmax",
)
CONST_OPS = (
    "Constant",
    "Identity",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Cast",
    "Slice",
)
_BATCHES = (1, 2)  # shape computations run for two batch sizes: what depends on N shows


class OnnxImport(NamedTuple):
    """What :func:`read_onnx` made of an ONNX model."""

    model: ConvNet
    notes: list[str]  # what was dropped or assumed, for the user to read
    record: dict  # the import's record, for the model file's training record


# ---------------------------------------------------------------------------------------------
# The graph, node by node
# ---------------------------------------------------------------------------------------------


class _Reader:
    """Walks a graph that must be a chain: one activation flows from the input to the output;
    every other input of a node is a constant (initialisers, Constant nodes, shape arithmetic).
    """

    def __init__(self, model: Any, label: str, input_shape: Any) -> None:
        onnx = onnx_module()
        self.label = label
        self.notes: list[str] = []
        graph = model.graph
        opsets = {op.domain or "ai.onnx": op.version for op in model.opset_import}
        self.opset = opsets.get("ai.onnx")
        if self.opset not in OPSETS:
            raise OnnxError(
                f"{label}: it uses opset {self.opset} of the ONNX operators; cnnserve reads opsets "
                f"{OPSETS.start} to {OPSETS.stop - 1} (convert it with onnx.version_converter)"
            )
        # A value: its arrays for each batch size of _BATCHES (the same array for constants).
        self.values: dict[str, tuple[np.ndarray, ...]] = {}
        for tensor in graph.initializer:
            try:
                array = onnx.numpy_helper.to_array(tensor)
            except Exception as exc:  # noqa: BLE001 - data of the wrong size or type
                raise OnnxError(f"{label}: initializer {tensor.name!r}: {exc}") from exc
            self.values[tensor.name] = (array,) * len(_BATCHES)
        inputs = [i for i in graph.input if i.name not in self.values]
        if len(inputs) != 1:
            names = ", ".join(repr(i.name) for i in inputs)
            raise OnnxError(
                f"{label}: the graph has {len(inputs)} inputs ({names}); a cnnserve network "
                "takes one batch of images"
            )
        if len(graph.output) != 1:
            raise OnnxError(
                f"{label}: the graph has {len(graph.output)} outputs; a cnnserve network gives "
                "one batch of class scores"
            )
        self.output = graph.output[0].name
        self.input_name = inputs[0].name
        tensor_type = inputs[0].type.tensor_type
        dtypes = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64}
        if tensor_type.elem_type not in dtypes:
            name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
            raise OnnxError(
                f"{label}: input {self.input_name!r} is of type {name}; cnnserve networks take "
                "FLOAT or DOUBLE images"
            )
        self.dtype = np.dtype(dtypes[tensor_type.elem_type])
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if len(dims) != 4:
            raise OnnxError(
                f"{label}: input {self.input_name!r} has {len(dims)} dimensions; cnnserve "
                "networks take (N, C, H, W) images"
            )
        if input_shape is not None:
            chw = check_input_shape(input_shape)
            if any(d is not None and d != v for d, v in zip(dims[1:], chw, strict=True)):
                raise OnnxError(
                    f"{label}: input_shape {chw} does not match the input's (C, H, W) {dims[1:]}"
                )
        elif None in dims[1:]:
            axis = "CHW"[dims[1:].index(None)]
            raise OnnxError(
                f"{label}: input {self.input_name!r} has no fixed {axis} (shape {dims}); "
                "export the network with its training input size, or give input_shape (cnnserve "
                "import --input-shape C,H,W)"
            )
        else:
            chw = tuple(dims[1:])
        self.input_shape = chw
        self.fixed_batch = dims[0]  # None when dynamic
        self.act = self.input_name  # the activation that flows along the chain
        self.shape: tuple[int, ...] = chw  # as cnnserve sees it: (C, H, W) or (D,)
        self.flat = False  # ONNX flattened the (C, H, W) volume; cnnserve's affine flattens
        self.done: set[str] = set()  # former activations: reading one again is a branch
        self.layers: list[dict] = []
        self.tensors: list[dict[str, np.ndarray]] = []
        self.bias_open = False  # the last node made a conv or affine layer: Add is its bias
        self.end: str | None = None  # the dropped Softmax / LogSoftmax
        self.used = {name for node in graph.node for name in node.input if name}
        self.used.add(self.output)

    # -- helpers ------------------------------------------------------------------------------

    def refuse(self, where: str, text: str) -> OnnxError:
        return OnnxError(f"{self.label}: {where}: {text}")

    def const(self, node: Any, k: int, where: str, what: str, optional: bool = False) -> Any:
        """Input ``k`` of a node as a constant array (None when optional and absent)."""
        name = node.input[k] if k < len(node.input) else ""
        if not name:
            if optional:
                return None
            raise self.refuse(where, f"its input {what} is missing")
        if name == self.act or name in self.done or name == self.input_name:
            raise self.refuse(
                where, f"its input {what} ({name!r}) is an activation; cnnserve needs a constant"
            )
        if name not in self.values:
            raise self.refuse(where, f"its input {what} ({name!r}) is not computed before it")
        first, second = self.values[name]
        if first.shape != second.shape or not np.array_equal(first, second):
            raise self.refuse(where, f"its input {what} ({name!r}) depends on the batch size")
        return first

    def weight(self, node: Any, k: int, where: str, what: str, optional: bool = False) -> Any:
        value = self.const(node, k, where, what, optional)
        if value is None:
            return None
        if not np.issubdtype(value.dtype, np.floating):
            raise self.refuse(where, f"its {what} is of type {value.dtype}, not a float")
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise self.refuse(where, f"its {what} has NaN or inf values")
        return value

    def attributes(self, node: Any, where: str, known: Sequence[str]) -> dict[str, Any]:
        onnx = onnx_module()
        attrs = {}
        for attr in node.attribute:
            if attr.name not in known:
                raise self.refuse(where, f"attribute {attr.name} is not supported")
            value = onnx.helper.get_attribute_value(attr)
            attrs[attr.name] = value.decode() if isinstance(value, bytes) else value
        return attrs

    def add_layer(self, spec: dict, where: str, tensors: dict[str, np.ndarray]) -> None:
        try:
            spec = normalise_spec(spec, where)
            self.shape = out_shape(spec, self.shape, where)
        except ValueError as exc:
            why = " (ONNX would drop the rows and columns that do not fit; cnnserve does not)"
            raise OnnxError(f"{self.label}: {exc}{why if 'tile' in str(exc) else ''}") from exc
        self.layers.append(spec)
        self.tensors.append(tensors)

    def need_volume(self, where: str) -> tuple[int, int, int]:
        if self.flat or len(self.shape) != 3:
            raise self.refuse(
                where, f"it needs a (C, H, W) volume, but its input is flat ({self.features()},)"
            )
        return self.shape  # type: ignore[return-value]

    def features(self) -> int:
        return math.prod(self.shape)

    # -- the walk -----------------------------------------------------------------------------

    def run(self, graph: Any) -> None:
        for index, node in enumerate(graph.node):
            name = node.name or f"#{index} ({node.output[0] if node.output else ''})"
            where = f"node {name!r} ({node.op_type})"
            if node.domain not in ("", "ai.onnx"):
                raise self.refuse(where, f"op {node.op_type} of domain {node.domain!r} is unknown")
            inputs = [n for n in node.input if n]
            reads_act = self.act in inputs
            if any(n in self.done for n in inputs):
                old = next(n for n in inputs if n in self.done)
                raise self.refuse(
                    where,
                    f"it reads {old!r}, an activation a node before it already consumed: "
                    "cnnserve networks are chains (no branches or skip connections)",
                )
            if node.op_type == "Shape" and reads_act:
                self.shape_of_act(node, where)
                continue
            if not reads_act:
                self.constant_node(node, where)
                continue
            if node.op_type not in LAYER_OPS:
                raise self.refuse(
                    where,
                    f"op {node.op_type} is not supported; cnnserve reads {', '.join(LAYER_OPS)}",
                )
            first = node.input[0] if node.op_type != "Add" else self.act
            if first != self.act or inputs.count(self.act) != 1:
                raise self.refuse(
                    where,
                    f"the activation {self.act!r} must be its first input and only once",
                )
            if self.end is not None and node.op_type != "Identity":
                raise self.refuse(
                    where, f"it follows {self.end}, which cnnserve only takes at the end"
                )
            for extra in node.output[1:]:
                if extra and extra in self.used:
                    raise self.refuse(
                        where, f"its output {extra!r} is used; cnnserve computes the first only"
                    )
            bias_open = self.bias_open
            self.bias_open = False
            getattr(self, "op_" + node.op_type)(node, where, bias_open)
            self.done.add(self.act)
            self.act = node.output[0]

    def shape_of_act(self, node: Any, where: str) -> None:
        attrs = self.attributes(node, where, ("start", "end"))
        dims = (self.features(),) if self.flat else self.shape
        arrays = []
        for n in _BATCHES:
            full = np.array([n, *dims], dtype=np.int64)
            arrays.append(full[attrs.get("start", 0) : attrs.get("end", len(full))])
        self.values[node.output[0]] = tuple(arrays)

    def constant_node(self, node: Any, where: str) -> None:
        if node.op_type not in CONST_OPS:
            if node.op_type in LAYER_OPS:
                raise self.refuse(
                    where,
                    f"it does not read the activation {self.act!r}: cnnserve networks are "
                    "chains (no branches)",
                )
            raise self.refuse(
                where, f"op {node.op_type} is not supported; cnnserve reads {', '.join(LAYER_OPS)}"
            )
        attrs = self.attributes(
            node,
            where,
            ("value", "value_float", "value_floats", "value_int", "value_ints")
            if node.op_type == "Constant"
            else ("to", "axes", "axis", "saturate", "start", "end"),
        )
        if node.op_type == "Constant":
            value = constant_value(attrs, where)
            self.values[node.output[0]] = (value,) * len(_BATCHES)
            return
        for n in node.input:
            if n and n not in self.values:
                raise self.refuse(where, f"its input {n!r} is not computed before it")
        results = []
        for k in range(len(_BATCHES)):
            args = [self.values[n][k] if n else None for n in node.input]
            try:
                results.append(eval_const(node.op_type, attrs, args, where))
            except (ValueError, IndexError, TypeError, KeyError) as exc:
                raise self.refuse(where, f"cannot compute it: {exc}") from exc
        self.values[node.output[0]] = tuple(results)

    # -- the ops ------------------------------------------------------------------------------

    def pads(self, attrs: Mapping, where: str, kernel: Sequence[int], stride: int) -> int:
        """One symmetric pad for both axes, from ``pads`` or ``auto_pad``."""
        auto = attrs.get("auto_pad", "NOTSET")
        given = list(attrs.get("pads", [0, 0, 0, 0]))
        if len(given) != 4:
            raise self.refuse(where, f"attribute pads = {given} is not 4 values for 2-D windows")
        if auto == "NOTSET":
            top, left, bottom, right = given
            if top != bottom or left != right:
                raise self.refuse(
                    where,
                    f"attribute pads = {given} is asymmetric (top, left, bottom, right): "
                    "cnnserve pads each side equally",
                )
            if top != left:
                raise self.refuse(
                    where,
                    f"attribute pads = {given} pads height and width differently: cnnserve "
                    "has one pad for both",
                )
            return top
        if any(given):
            raise self.refuse(where, f"attribute pads = {given} together with auto_pad {auto}")
        if auto == "VALID":
            return 0
        if auto not in ("SAME_UPPER", "SAME_LOWER"):
            raise self.refuse(where, f"attribute auto_pad = {auto!r} is unknown")
        found = []
        for size, k in zip(self.shape[1:], kernel, strict=True):
            total = max((-(-size // stride) - 1) * stride + k - size, 0)
            before = total // 2 if auto == "SAME_UPPER" else total - total // 2
            found.append((before, total - before))
        if any(b != a for b, a in found) or found[0] != found[1]:
            raise self.refuse(
                where,
                f"attribute auto_pad = {auto} pads (before, after) = {found} for (height, width)"
                " here: not one symmetric pad, which is all cnnserve has",
            )
        return found[0][0]

    def stride(self, attrs: Mapping, where: str) -> int:
        strides = list(attrs.get("strides", [1, 1]))
        if len(strides) != 2 or strides[0] != strides[1]:
            raise self.refuse(
                where, f"attribute strides = {strides}: cnnserve has one stride for both axes"
            )
        return int(strides[0])

    def ones(self, attrs: Mapping, key: str, where: str, why: str) -> None:
        values = list(attrs.get(key, [1, 1]))
        if any(v != 1 for v in values):
            raise self.refuse(where, f"attribute {key} = {values} is not supported: {why}")

    def op_Conv(self, node: Any, where: str, _: bool) -> None:
        attrs = self.attributes(
            node, where, ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
        )
        C, _, _ = self.need_volume(where)
        if attrs.get("group", 1) != 1:
            raise self.refuse(
                where,
                f"attribute group = {attrs['group']} is not supported: cnnserve convolutions "
                "read every input channel (group 1)",
            )
        self.ones(attrs, "dilations", where, "cnnserve convolutions are not dilated")
        w = self.weight(node, 1, where, "weight W")
        if w.ndim != 4 or w.shape[1] != C:
            raise self.refuse(where, f"weight W has shape {w.shape}; expected (F, {C}, kH, kW)")
        F, _, kh, kw = w.shape
        kernel = list(attrs.get("kernel_shape", [kh, kw]))
        if kernel != [kh, kw]:
            raise self.refuse(where, f"attribute kernel_shape = {kernel} but W is {kh}x{kw}")
        stride = self.stride(attrs, where)
        pad = self.pads(attrs, where, (kh, kw), stride)
        b = self.weight(node, 2, where, "bias B", optional=True)
        if b is not None and b.shape != (F,):
            raise self.refuse(where, f"bias B has shape {b.shape}; expected ({F},)")
        spec = {"type": "conv", "filters": F, "size": [kh, kw], "stride": stride, "pad": pad}
        self.add_layer(spec, where, {"W": w, "b": np.zeros(F) if b is None else b})
        self.bias_open = True

    def pool(self, node: Any, where: str, kind: str) -> None:
        known = ["auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides"]
        known.append("storage_order" if kind == "max_pool" else "count_include_pad")
        attrs = self.attributes(node, where, known)
        _, H, W = self.need_volume(where)
        self.ones(attrs, "dilations", where, "cnnserve pooling windows are not dilated")
        if "kernel_shape" not in attrs or len(attrs["kernel_shape"]) != 2:
            raise self.refuse(where, "it needs a 2-D kernel_shape")
        kernel = [int(k) for k in attrs["kernel_shape"]]
        stride = self.stride(attrs, where)
        if self.pads(attrs, where, kernel, stride):
            raise self.refuse(
                where, f"attribute pads = {attrs.get('pads')}: cnnserve pooling has no padding"
            )
        spec = {"type": kind, "size": kernel, "stride": stride}
        left = [(n - k) % stride if n >= k else None for n, k in zip((H, W), kernel, strict=True)]
        if attrs.get("ceil_mode", 0) and any(left):
            raise self.refuse(
                where,
                f"attribute ceil_mode = 1 changes the output here: a {kernel[0]}x{kernel[1]} "
                f"window at stride {stride} does not tile ({H}, {W}) exactly, and cnnserve "
                "has no partial windows",
            )
        self.add_layer(spec, where, {})

    def op_MaxPool(self, node: Any, where: str, _: bool) -> None:
        self.pool(node, where, "max_pool")

    def op_AveragePool(self, node: Any, where: str, _: bool) -> None:
        # count_include_pad only matters with padding, which pool() refuses
        self.pool(node, where, "avg_pool")

    def global_pool(self, node: Any, where: str, kind: str) -> None:
        self.attributes(node, where, ())
        _, H, W = self.need_volume(where)
        # stride 1: on a larger image the converted network pools each window's patch
        self.add_layer({"type": kind, "size": [H, W], "stride": 1}, where, {})

    def op_GlobalMaxPool(self, node: Any, where: str, _: bool) -> None:
        self.global_pool(node, where, "max_pool")

    def op_GlobalAveragePool(self, node: Any, where: str, _: bool) -> None:
        self.global_pool(node, where, "avg_pool")

    def op_Relu(self, node: Any, where: str, _: bool) -> None:
        self.attributes(node, where, ())
        self.add_layer({"type": "relu"}, where, {})

    def op_BatchNormalization(self, node: Any, where: str, _: bool) -> None:
        attrs = self.attributes(node, where, ("epsilon", "momentum", "training_mode"))
        if attrs.get("training_mode", 0):
            raise self.refuse(where, "attribute training_mode = 1: only the inference form")
        if self.flat:
            raise self.refuse(
                where,
                f"it normalises a flattened (C, H, W) = {self.shape} volume feature by feature; "
                "cnnserve normalises volumes per channel (before the flatten) and vectors after "
                "an affine layer",
            )
        C = self.shape[0]
        names = ("gamma", "beta", "running_mean", "running_var")
        what = ("scale", "bias B", "input_mean", "input_var")
        tensors = {}
        for k, (name, label) in enumerate(zip(names, what, strict=True)):
            value = self.weight(node, k + 1, where, label)
            if value.shape != (C,):
                raise self.refuse(where, f"its {label} has shape {value.shape}; expected ({C},)")
            tensors[name] = value
        if np.any(tensors["running_var"] < 0):
            raise self.refuse(where, "its input_var has negative values")
        # ONNX stores float32: 1e-3 comes back as 0.0010000000474974513; the shortest decimal
        # of that float32 is the value that was meant (and what export writes back)
        eps = float(str(np.float32(attrs.get("epsilon", 1e-5))))
        if not eps > 0:
            raise self.refuse(where, f"attribute epsilon = {eps}: cnnserve needs epsilon > 0")
        momentum = float(str(np.float32(attrs.get("momentum", 0.9))))
        kind = "spatial_batchnorm" if len(self.shape) == 3 else "batchnorm"
        spec = {"type": kind, "eps": eps, "momentum": momentum if 0 <= momentum <= 1 else 0.9}
        self.add_layer(spec, where, tensors)

    def op_Flatten(self, node: Any, where: str, _: bool) -> None:
        attrs = self.attributes(node, where, ("axis",))
        axis = attrs.get("axis", 1)
        rank = 2 if self.flat or len(self.shape) == 1 else 4
        if axis not in (1, 1 - rank):
            raise self.refuse(where, f"attribute axis = {axis}: only a flatten to (N, -1)")
        self.flat = len(self.shape) == 3

    def op_Reshape(self, node: Any, where: str, _: bool) -> None:
        attrs = self.attributes(node, where, ("allowzero",))
        name = node.input[1] if len(node.input) > 1 else ""
        if name not in self.values:
            raise self.refuse(where, f"its shape input {name!r} is not computed before it")
        targets = self.values[name]
        allowzero = bool(attrs.get("allowzero", 0))
        if not all(self.flattens(n, t, allowzero) for n, t in zip(_BATCHES, targets, strict=True)):
            first = [int(v) for v in np.asarray(targets[0]).reshape(-1)]
            fixed = self.fixed_batch
            constant = all(np.array_equal(targets[0], t) for t in targets)
            if not (fixed is not None and constant and self.flattens(fixed, targets[0], allowzero)):
                raise self.refuse(
                    where, f"it reshapes to {first}; cnnserve takes only a flatten to (N, -1)"
                )
            # A graph exported for one batch size reshapes to that size: still a flatten.
            self.notes.append(
                f"{where}: the reshape to {first} is taken as a flatten to (N, -1) (the graph's "
                f"batch size is fixed at {fixed}; cnnserve takes any)"
            )
        self.flat = len(self.shape) == 3

    def flattens(self, n: int, target: np.ndarray, allowzero: bool) -> bool:
        """Whether a Reshape to ``target`` of a batch of n is the flatten to (n, D)."""
        D = self.features()
        shape = [int(v) for v in np.asarray(target).reshape(-1)]
        dims = (n, D) if self.flat or len(self.shape) == 1 else (n, *self.shape)
        if not allowzero:
            shape = [dims[i] if v == 0 and i < len(dims) else v for i, v in enumerate(shape)]
        if shape.count(-1) == 1:
            known = math.prod(v for v in shape if v != -1)
            shape[shape.index(-1)] = n * D // known if known and n * D % known == 0 else -2
        return shape == [n, D]

    def affine(self, where: str, w: np.ndarray, b: np.ndarray) -> None:
        D = self.features()
        if w.shape[0] != D:
            raise self.refuse(
                where, f"its weight reads {w.shape[0]} features, but its input has {D}"
            )
        self.add_layer({"type": "affine", "units": w.shape[1]}, where, {"W": w, "b": b})
        self.flat = False
        self.bias_open = True

    def need_flat(self, where: str) -> None:
        if len(self.shape) == 3 and not self.flat:
            raise self.refuse(where, f"it reads a {self.shape} volume: flatten it first")

    def op_Gemm(self, node: Any, where: str, _: bool) -> None:
        attrs = self.attributes(node, where, ("alpha", "beta", "transA", "transB"))
        self.need_flat(where)
        if attrs.get("transA", 0):
            raise self.refuse(where, "attribute transA = 1 would mix the images of the batch")
        w = self.weight(node, 1, where, "B")
        if w.ndim != 2:
            raise self.refuse(where, f"its B has shape {w.shape}; expected a matrix")
        if attrs.get("transB", 0):
            w = w.T
        w = w * float(attrs.get("alpha", 1.0))
        c = self.weight(node, 2, where, "C", optional=True)
        units = w.shape[1]
        if c is None:
            b = np.zeros(units)
        else:
            b = self.bias_vector(c, units, 2, where, "C") * float(attrs.get("beta", 1.0))
        self.affine(where, w, b)

    def op_MatMul(self, node: Any, where: str, _: bool) -> None:
        self.attributes(node, where, ())
        self.need_flat(where)
        w = self.weight(node, 1, where, "B")
        if w.ndim != 2:
            raise self.refuse(where, f"its B has shape {w.shape}; expected a matrix")
        self.affine(where, w, np.zeros(w.shape[1]))

    def bias_vector(self, c: np.ndarray, units: int, rank: int, where: str, what: str) -> Any:
        """A constant added to an (N, units) or (N, units, H, W) output, as one value per unit."""
        shape = (1,) * (rank - c.ndim) + c.shape if c.ndim <= rank else None
        if shape is None or any(s != 1 for k, s in enumerate(shape) if k != 1):
            raise self.refuse(
                where, f"its {what} of shape {c.shape} is not one value per output channel"
            )
        if shape[1] not in (1, units):
            raise self.refuse(where, f"its {what} has shape {c.shape}; expected {units} values")
        return np.broadcast_to(c.reshape(-1), (units,)).astype(np.float64)

    def op_Add(self, node: Any, where: str, bias_open: bool) -> None:
        self.attributes(node, where, ())
        if not bias_open:
            raise self.refuse(
                where, "cnnserve takes Add only as the bias right after a Conv, Gemm or MatMul"
            )
        c = self.weight(node, 1 if node.input[0] == self.act else 0, where, "addend")
        layer, tensors = self.layers[-1], self.tensors[-1]
        rank = 4 if layer["type"] == "conv" else 2
        units = tensors["b"].shape[0]
        tensors["b"] = tensors["b"] + self.bias_vector(c, units, rank, where, "addend")
        self.bias_open = True

    def op_Dropout(self, node: Any, where: str, _: bool) -> None:
        attrs = self.attributes(node, where, ("ratio", "seed"))
        del attrs
        mode = self.const(node, 2, where, "training_mode", optional=True)
        if mode is not None and bool(np.asarray(mode).reshape(-1)[0]):
            raise self.refuse(where, "its training_mode is true: only the inference form")
        self.notes.append(f"{where} dropped: dropout is the identity at inference")

    def op_Identity(self, node: Any, where: str, _: bool) -> None:
        self.attributes(node, where, ())

    def softmax(self, node: Any, where: str) -> None:
        attrs = self.attributes(node, where, ("axis",))
        axis = attrs.get("axis", 1 if self.opset < 13 else -1)
        if len(self.shape) != 1 or self.flat or axis not in (1, -1):
            raise self.refuse(where, "cnnserve takes it only over the class scores, at the end")
        self.end = where
        self.notes.append(
            f"{where} dropped: cnnserve's scores are the logits before it "
            "(cnnserve applies the softmax for probabilities itself)"
        )

    def op_Softmax(self, node: Any, where: str, _: bool) -> None:
        self.softmax(node, where)

    def op_LogSoftmax(self, node: Any, where: str, _: bool) -> None:
        self.softmax(node, where)

    # -- the result ---------------------------------------------------------------------------

    def network(self, class_names: Any, normalization: Any) -> ConvNet:
        if self.act != self.output:
            raise OnnxError(
                f"{self.label}: the graph's output {self.output!r} is not the end of the chain "
                f"of layers ({self.act!r})"
            )
        if not self.layers or self.layers[-1]["type"] != "affine":
            last = describe_spec(self.layers[-1]) if self.layers else "nothing"
            raise OnnxError(
                f"{self.label}: the graph must end in a fully connected layer (Gemm, or MatMul "
                f"and Add), the classifier; it ends in {last}"
            )
        units = self.layers[-1]["units"]
        if units < 2:
            raise OnnxError(f"{self.label}: the classifier has {units} output; cnnserve needs 2+")
        try:
            model = ConvNet(
                self.layers[:-1],
                self.input_shape,
                units,
                dtype=self.dtype,
                class_names=class_names,
                normalization=normalization,
            )
        except (ValueError, TypeError) as exc:
            raise OnnxError(f"{self.label}: {exc}") from exc
        with np.errstate(over="ignore"):  # checked below
            self.set_tensors(model)
        for name, value in model.state_tensors().items():
            if not np.all(np.isfinite(value)):  # finite in float64, not in float32
                raise OnnxError(f"{self.label}: tensor {name} overflows {model.dtype.name}")
        return model

    def set_tensors(self, model: ConvNet) -> None:
        for info, tensors in zip(model.info, self.tensors, strict=True):
            if info.spec["type"] in ("conv", "affine"):
                w_name, b_name = info.param_names
                model.params[w_name] = tensors["W"].astype(model.dtype)
                model.params[b_name] = tensors["b"].astype(model.dtype)
            elif info.param_names:
                gamma, beta = info.param_names
                model.params[gamma] = tensors["gamma"].astype(model.dtype)
                model.params[beta] = tensors["beta"].astype(model.dtype)
                bn = model.bn_params[info.bn_index]
                bn["running_mean"] = tensors["running_mean"].astype(model.dtype)
                bn["running_var"] = tensors["running_var"].astype(model.dtype)


def read_onnx(
    source: str | os.PathLike | bytes,
    *,
    class_names: Sequence[str] | None = None,
    normalization: Mapping | None = None,
    input_shape: Sequence[int] | None = None,
) -> OnnxImport:
    """Read an ONNX classifier into a :class:`~cnnserve.network.ConvNet`; see
    :func:`cnnserve.onnx.import_onnx` for the parameters and the ops read."""
    model, label = load_proto(source)
    meta = metadata_props(model, label)
    if input_shape is None and META_INPUT_SHAPE in meta:
        input_shape = meta[META_INPUT_SHAPE]
    reader = _Reader(model, label, input_shape)
    reader.run(model.graph)
    names = class_names if class_names is not None else meta.get(META_CLASS_NAMES)
    norm = normalization if normalization is not None else meta.get(META_NORMALIZATION)
    net = reader.network(names, norm)
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    record = {
        "imported_from": "onnx",
        "onnx_file": Path(source).name if isinstance(source, str | os.PathLike) else None,
        "onnx_producer": producer or None,
        "onnx_opset": reader.opset,
        "onnx_notes": list(reader.notes),
    }
    return OnnxImport(net, list(reader.notes), record)
