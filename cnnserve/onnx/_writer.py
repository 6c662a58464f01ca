"""A cnnserve network -> ONNX (opset 17), written with the ``onnx`` helper API.

A private helper module of :mod:`cnnserve.onnx`; see :func:`cnnserve.onnx.export_onnx`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from cnnserve import __version__
from cnnserve.convert import FullyConvNet, load_fully_convolutional
from cnnserve.modelfile import FCN_FORMAT_NAME, read_metadata, read_model_file
from cnnserve.network import ConvNet
from cnnserve.onnx._proto import (
    EXPORT_IR_VERSION,
    EXPORT_OPSET,
    META_CLASS_NAMES,
    META_INPUT_SHAPE,
    META_KIND,
    META_NORMALIZATION,
    OnnxError,
    onnx_module,
)

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "network_to_onnx"]

INPUT_NAME = "image"  # (N, C, H, W), preprocessed (normalised) pixels
OUTPUT_NAME = "scores"  # (N, K) of a trained network; (N, K, rows, cols) of a converted one


class _Builder:
    """Nodes and initialisers of one graph, with unique names."""

    def __init__(self, dtype: np.dtype) -> None:
        self.onnx = onnx_module()
        self.dtype = dtype
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def tensor(self, name: str, value: np.ndarray, integer: bool = False) -> str:
        array = np.asarray(value, dtype=np.int64 if integer else self.dtype)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        output = f"{name}_out" if op != "Identity" else name
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def _layer(g: _Builder, kind: str, spec: dict, x: str, name: str, tensors: list[np.ndarray]) -> str:
    """One layer's nodes; returns the name of its output."""
    if kind == "conv":
        (kh, kw), s, p = spec["size"], spec["stride"], spec["pad"]
        w, b = (g.tensor(f"{name}.{k}", t) for k, t in zip(("W", "b"), tensors, strict=True))
        return g.node(
            "Conv", [x, w, b], name, kernel_shape=[kh, kw], strides=[s, s], pads=[p, p, p, p]
        )
    if kind == "relu":
        return g.node("Relu", [x], name)
    if kind in ("max_pool", "avg_pool"):
        op = "MaxPool" if kind == "max_pool" else "AveragePool"
        s = spec["stride"]
        return g.node(op, [x], name, kernel_shape=list(spec["size"]), strides=[s, s])
    if kind in ("spatial_batchnorm", "batchnorm"):
        names = ("scale", "B", "mean", "var")
        inputs = [g.tensor(f"{name}.{k}", t) for k, t in zip(names, tensors, strict=True)]
        return g.node(
            "BatchNormalization",
            [x, *inputs],
            name,
            epsilon=spec["eps"],
            momentum=spec.get("momentum", 0.9),
        )
    if kind in ("layernorm", "channel_layernorm"):
        gamma, beta = (g.tensor(f"{name}.{k}", t) for k, t in zip("gb", tensors, strict=True))
        if kind == "layernorm":
            return g.node(
                "LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=spec["eps"]
            )
        x = g.node("Transpose", [x], f"{name}.to_nhwc", perm=[0, 2, 3, 1])
        x = g.node("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=spec["eps"])
        return g.node("Transpose", [x], f"{name}.to_nchw", perm=[0, 3, 1, 2])
    raise OnnxError(f"a {kind} layer has no ONNX form in cnnserve's export")


def _group_norm(
    g: _Builder, spec: dict, x: str, name: str, tensors: list[np.ndarray], chw: tuple
) -> str:
    """Group norm in opset 17 (GroupNormalization is opset 18): the (N, G, C/G*H*W) groups
    through InstanceNormalization, back to (N, C, H, W), then the per-channel scale and shift."""
    G = spec["groups"]
    grouped = g.tensor(f"{name}.grouped_shape", np.array([0, G, -1]), integer=True)
    x = g.node("Reshape", [x, grouped], f"{name}.group")
    ones, zeros = g.tensor(f"{name}.ones", np.ones(G)), g.tensor(f"{name}.zeros", np.zeros(G))
    x = g.node("InstanceNormalization", [x, ones, zeros], name, epsilon=spec["eps"])
    back = g.tensor(f"{name}.volume_shape", np.array([0, *chw]), integer=True)
    x = g.node("Reshape", [x, back], f"{name}.ungroup")
    gamma, beta = (g.tensor(f"{name}.{k}", t) for k, t in zip("gb", tensors, strict=True))
    x = g.node("Mul", [x, gamma], f"{name}.scale")
    return g.node("Add", [x, beta], f"{name}.shift")


def _trained_graph(g: _Builder, model: ConvNet) -> tuple[str, list, list]:
    x, flat = INPUT_NAME, False
    for info in model.info:
        kind, spec, name = info.spec["type"], info.spec, f"layer{info.index}"
        tensors = [model.params[p] for p in info.param_names]
        if info.bn_index is not None:
            bn = model.bn_params[info.bn_index]
            tensors += [bn["running_mean"], bn["running_var"]]
        if kind == "dropout":  # the identity at inference
            continue
        if kind == "affine":
            if len(info.in_shape) == 3 and not flat:
                x = g.node("Flatten", [x], f"{name}.flatten", axis=1)  # NCHW order, as cnnserve
                flat = True
            w, b = (g.tensor(f"{name}.{k}", t) for k, t in zip(("W", "b"), tensors, strict=True))
            x = g.node("Gemm", [x, w, b], name)
        elif kind == "spatial_groupnorm":
            x = _group_norm(g, spec, x, name, tensors, info.in_shape)
        else:
            x = _layer(g, kind, spec, x, name, tensors)
    C, H, W = model.input_shape
    return x, ["N", C, H, W], ["N", model.num_classes]


def _converted_graph(g: _Builder, fcn: FullyConvNet) -> tuple[str, list, list]:
    if fcn.per_window_from is not None:
        raise OnnxError(
            "this converted network runs its group norm window by window (statistics per "
            "window), which one ONNX graph over the whole image cannot do; export the trained "
            "model instead (fixed input size)"
        )
    # Rows and columns that no window covers are cut off first, as FullyConvNet.forward does
    # (ONNX would floor each layer instead: with padding inside, not the same cells).
    C, th, tw = fcn.input_shape
    S = fcn.geometry.stride
    shape = g.node("Shape", [INPUT_NAME], "crop.shape")
    two, four = g.tensor("crop.2", [2], integer=True), g.tensor("crop.4", [4], integer=True)
    hw = g.node("Slice", [shape, two, four], "crop.hw")
    window = g.tensor("crop.window", [th, tw], integer=True)
    stride = g.tensor("crop.stride", [S, S], integer=True)
    cells = g.node("Div", [g.node("Sub", [hw, window], "crop.rest"), stride], "crop.cells")
    covered = g.node("Add", [g.node("Mul", [cells, stride], "crop.span"), window], "crop.covered")
    zeros, axes = g.tensor("crop.starts", [0, 0], integer=True), g.tensor("crop.axes", [2, 3], True)
    x = g.node("Slice", [INPUT_NAME, zeros, covered, axes], "crop")
    for k, layer in enumerate(fcn.layers):
        if layer.kind == "spatial_batchnorm":
            n = layer.param_names[0][len("gamma") :]
            tensors = [fcn.params[p] for p in layer.param_names]
            tensors += [fcn.params[f"running_mean{n}"], fcn.params[f"running_var{n}"]]
        else:
            tensors = [fcn.params[p] for p in layer.param_names]
        x = _layer(g, layer.kind, layer.spec, x, f"layer{k}", tensors)
    return x, ["N", C, "H", "W"], ["N", fcn.num_classes, "rows", "cols"]


def network_to_onnx(model: ConvNet | FullyConvNet | str | os.PathLike) -> Any:
    """The checked ModelProto of a network; see :func:`cnnserve.onnx.export_onnx`."""
    onnx = onnx_module()
    if isinstance(model, str | os.PathLike):
        if read_metadata(model).get("format") == FCN_FORMAT_NAME:
            model = load_fully_convolutional(model)
        else:
            model = read_model_file(model).model
    if isinstance(model, ConvNet):
        kind, dtype = "trained", np.dtype(model.dtype)
    elif isinstance(model, FullyConvNet):
        kind, dtype = "converted", np.dtype(model.dtype)
    else:
        raise TypeError(
            f"model must be a ConvNet, a FullyConvNet or a model file path, got "
            f"{type(model).__name__}"
        )
    g = _Builder(dtype)
    build = _trained_graph if kind == "trained" else _converted_graph
    out, in_dims, out_dims = build(g, model)  # type: ignore[arg-type]
    g.nodes.append(onnx.helper.make_node("Identity", [out], [OUTPUT_NAME], name="output"))
    elem = onnx.TensorProto.FLOAT if dtype == np.float32 else onnx.TensorProto.DOUBLE
    graph = onnx.helper.make_graph(
        g.nodes,
        "cnnserve",
        [onnx.helper.make_tensor_value_info(INPUT_NAME, elem, in_dims)],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, elem, out_dims)],
        g.initializers,
        doc_string=(
            "cnnserve "
            + (
                "classifier: preprocessed (N, C, H, W) images -> (N, K) class scores (logits)"
                if kind == "trained"
                else "fully convolutional network: preprocessed (N, C, H, W) images of any size "
                "at least the training size -> (N, K, rows, cols) score maps, one cell per "
                "training-size window at the network's stride"
            )
        ),  # fmt: skip
    )
    proto = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", EXPORT_OPSET)],
        producer_name="cnnserve",
        producer_version=__version__,
    )
    proto.ir_version = EXPORT_IR_VERSION
    meta = {
        META_KIND: kind,
        META_CLASS_NAMES: json.dumps(list(model.class_names)),
        META_INPUT_SHAPE: json.dumps(list(model.input_shape)),
    }
    if model.normalization is not None:
        meta[META_NORMALIZATION] = json.dumps(model.normalization)
    if kind == "converted":
        meta["geometry"] = json.dumps(model.geometry.to_dict())  # type: ignore[union-attr]
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto
