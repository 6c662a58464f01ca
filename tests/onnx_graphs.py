"""Small ONNX graphs for the ONNX tests, written with the onnx helper API, and the fixtures.

``tests/data/*.onnx`` were made by PyTorch (``tests/data/make_onnx_fixtures.py``); the graphs
here are hand-written, one construct at a time, for what PyTorch does not emit (or emits only
in some versions) and for every construct cnnserve refuses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = ("lenet", "bn_avg", "fc357")


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{name}_expected.npz") as stored:
        return dict(stored)


def log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def graph_model(
    nodes: list,
    initializers: dict[str, np.ndarray],
    input_shape: list,
    *,
    output_dims: int = 2,
    opset: int = 17,
    extra_inputs: tuple = (),
    elem_type: int = TensorProto.FLOAT,
    output: str | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """A model whose input is ``x`` and whose output is the last node's first output."""
    inputs = [helper.make_tensor_value_info("x", elem_type, input_shape)]
    inputs += [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, input_shape) for n in extra_inputs
    ]
    out = output or nodes[-1].output[0]
    outputs = [helper.make_tensor_value_info(out, elem_type, [None] * output_dims)]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model


def conv_classifier(
    conv: dict | None = None,
    pool: tuple[str, dict] | None = None,
    *,
    size: int = 6,
    kernel: int = 3,
    group_channels: int = 2,
    seed: int = 0,
) -> onnx.ModelProto:
    """x (N, 2, size, size) -> Conv(conv attrs) -> Relu -> [pool] -> Flatten -> Gemm (3 classes),
    with the Gemm's input size taken from ONNX shape inference."""
    rng = np.random.default_rng(seed)
    conv = {"kernel_shape": [kernel, kernel], **(conv or {})}
    group = conv.get("group", 1)
    w = rng.standard_normal((4, group_channels // group, kernel, kernel)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", **conv),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
    ]
    last = "r"
    if pool is not None:
        op, attrs = pool
        nodes.append(helper.make_node(op, [last], ["p"], name="pool", **attrs))
        last = "p"
    nodes.append(helper.make_node("Flatten", [last], ["f"], name="flatten", axis=1))
    probe = graph_model(
        nodes,
        {"w": w, "b": np.zeros(4, np.float32)},
        ["N", group_channels, size, size],
        output_dims=2,
        check=False,
    )
    inferred = onnx.shape_inference.infer_shapes(probe)
    dims = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    shape = dims["f"].type.tensor_type.shape.dim
    features = shape[1].dim_value if len(shape) == 2 and shape[1].dim_value else 1
    nodes.append(helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1))
    inits = {
        "w": w,
        "b": rng.standard_normal(4).astype(np.float32),
        "fw": rng.standard_normal((3, features)).astype(np.float32),
        "fb": rng.standard_normal(3).astype(np.float32),
    }
    return graph_model(nodes, inits, ["N", group_channels, size, size], check=False)


def with_nodes_inserted(model: onnx.ModelProto, after: str, new: list) -> onnx.ModelProto:
    """A copy with ``new`` nodes (a chain reading ``after``'s output) placed right after the
    node named ``after``; the node that read that output reads the chain's end instead."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = list(model.graph.node)
    k = next(i for i, n in enumerate(nodes) if n.name == after)
    produced, end = nodes[k].output[0], new[-1].output[0]
    for node in nodes[k + 1 :]:
        for i, name in enumerate(node.input):
            if name == produced:
                node.input[i] = end
    new[0].input[0] = produced
    del model.graph.node[:]
    model.graph.node.extend([*nodes[: k + 1], *new, *nodes[k + 1 :]])
    return model


def _tail(last: str, features: int, name: str = "fc", seed: int = 0) -> tuple[list, dict]:
    """Gemm to 3 classes reading a flat (N, features) tensor ``last``."""
    rng = np.random.default_rng(seed)
    node = helper.make_node("Gemm", [last, f"{name}.w", f"{name}.b"], ["y"], name=name, transB=1)
    inits = {
        f"{name}.w": rng.standard_normal((3, features)).astype(np.float32),
        f"{name}.b": rng.standard_normal(3).astype(np.float32),
    }
    return [node], inits


def flat_classifier(middle: list, middle_inits: dict, features: int, **options) -> bytes:
    """x (N, 2, 6, 6) -> Flatten -> middle (reading "f", ending in "m") -> Gemm (3 classes)."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flatten", axis=1), *middle]
    tail, inits = _tail("m" if middle else "f", features)
    return graph_model(nodes + tail, {**middle_inits, **inits}, ["N", 2, 6, 6], **options)


def _truncated() -> bytes:
    data = (DATA / "lenet.onnx").read_bytes()
    return data[: len(data) // 2]


def _branch() -> bytes:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Relu", ["r"], ["r2"], name="relu2"),
        helper.make_node("Add", ["r2", "r"], ["s"], name="skip"),
        helper.make_node("Flatten", ["s"], ["f"], name="flatten", axis=1),
    ]
    tail, inits = _tail("f", 72)
    return graph_model(nodes + tail, inits, ["N", 2, 6, 6]).SerializeToString()


def _custom_domain() -> bytes:
    model = onnx.ModelProto.FromString(flat_classifier([], {}, 72).SerializeToString())
    model.graph.node.insert(0, helper.make_node("Foo", ["x"], ["x_foo"], name="foo", domain="ex"))
    model.graph.node[1].input[0] = "x_foo"
    model.opset_import.append(helper.make_opsetid("ex", 1))
    return model.SerializeToString()


def _input_of(shape: list, elem_type: int = TensorProto.FLOAT) -> bytes:
    model = onnx.ModelProto.FromString(flat_classifier([], {}, 72).SerializeToString())
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", elem_type, shape))
    return model.SerializeToString()


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


MAX_2 = ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]})
BN_TRAINING = helper.make_node(
    "BatchNormalization", ["c", "s", "o", "mu", "var"], ["bn"], name="bn", training_mode=1
)
ONES4 = np.ones(4, np.float32)

# Every construct cnnserve refuses: (id, the model's bytes, what the error says). The CLI and
# the service tests take the same table.
REFUSALS = [
    ("group conv", lambda: _bytes(conv_classifier({"group": 2})), "node 'conv' (Conv): attribute group = 2 is not supported"),
    ("dilation", lambda: _bytes(conv_classifier({"dilations": [2, 2]})), "node 'conv' (Conv): attribute dilations = [2, 2] is not supported"),
    ("asymmetric pads", lambda: _bytes(conv_classifier({"pads": [0, 0, 1, 1]})), "node 'conv' (Conv): attribute pads = [0, 0, 1, 1] is asymmetric"),
    ("pads differ per axis", lambda: _bytes(conv_classifier({"pads": [1, 0, 1, 0]})), "node 'conv' (Conv): attribute pads = [1, 0, 1, 0] pads height and width differently"),
    ("auto_pad that pads asymmetrically", lambda: _bytes(conv_classifier({"auto_pad": "SAME_UPPER", "kernel_shape": [2, 2]}, kernel=2)), "node 'conv' (Conv): attribute auto_pad = SAME_UPPER pads (before, after) = [(0, 1), (0, 1)]"),
    ("strides differ per axis", lambda: _bytes(conv_classifier({"strides": [2, 1]}, size=7)), "node 'conv' (Conv): attribute strides = [2, 1]"),
    ("conv stride that floors", lambda: _bytes(conv_classifier({"strides": [2, 2]})), "node 'conv' (Conv) (conv 4 3x3 s2 p0) cannot take an input of shape (2, 6, 6)"),
    ("ceil_mode that matters", lambda: _bytes(conv_classifier(pool=("MaxPool", {**MAX_2[1], "ceil_mode": 1}), size=7)), "node 'pool' (MaxPool): attribute ceil_mode = 1 changes the output here"),
    ("pool that floors", lambda: _bytes(conv_classifier(pool=MAX_2, size=7)), "node 'pool' (MaxPool) (max_pool 2x2 s2) cannot take an input of shape (4, 5, 5)"),
    ("padded pool", lambda: _bytes(conv_classifier(pool=("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}))), "node 'pool' (AveragePool): attribute pads = [1, 1, 1, 1]: cnnserve pooling has no padding"),
    ("unknown op", lambda: _bytes(flat_classifier([helper.make_node("LeakyRelu", ["f"], ["m"], name="leaky")], {}, 72)), "node 'leaky' (LeakyRelu): op LeakyRelu is not supported"),
    ("unknown attribute", lambda: _bytes(conv_classifier(pool=("MaxPool", {**MAX_2[1], "foo": 1}))), "Unrecognized attribute: foo for operator MaxPool (Bad node spec for node. Name: pool OpType: MaxPool)"),
    ("two inputs", lambda: _bytes(graph_model([helper.make_node("Add", ["x", "x2"], ["y"], name="add")], {}, ["N", 3], extra_inputs=("x2",))), "the graph has 2 inputs ('x', 'x2')"),
    ("batchnorm in training mode", lambda: _bytes(graph_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), BN_TRAINING], {"w": np.ones((4, 2, 1, 1), np.float32), "s": ONES4, "o": ONES4, "mu": ONES4, "var": ONES4}, ["N", 2, 6, 6], output_dims=4)), "node 'bn' (BatchNormalization): attribute training_mode = 1"),
    ("softmax before the end", lambda: _bytes(flat_classifier([helper.make_node("Softmax", ["f"], ["sm"], name="sm", axis=1), helper.make_node("Relu", ["sm"], ["m"], name="relu")], {}, 72)), "node 'sm' (Softmax): cnnserve takes it only over the class scores, at the end"),
    ("a branch", _branch, "node 'skip' (Add): it reads 'r', an activation a node before it already consumed"),
    ("transA", lambda: _bytes(flat_classifier([helper.make_node("Gemm", ["f", "g.w"], ["m"], name="g", transA=1)], {"g.w": np.ones((1, 72), np.float32)}, 72)), "node 'g' (Gemm): attribute transA = 1"),
    ("reshape that is no flatten", lambda: _bytes(flat_classifier([helper.make_node("Reshape", ["f", "shape"], ["m"], name="reshape")], {"shape": np.array([0, 2, -1])}, 72, check=False)), "node 'reshape' (Reshape): it reshapes to [0, 2, -1]; cnnserve takes only a flatten to (N, -1)"),
    ("no classifier at the end", lambda: _bytes(graph_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], {}, ["N", 2, 6, 6], output_dims=4)), "the graph must end in a fully connected layer (Gemm, or MatMul and Add), the classifier; it ends in relu"),
    ("dynamic height", lambda: _input_of(["N", 2, "H", 6]), "input 'x' has no fixed H"),
    ("integer input", lambda: _input_of(["N", 2, 6, 6], TensorProto.INT64), "input 'x' is of type INT64"),
    ("opset 10", lambda: _bytes(flat_classifier([], {}, 72, opset=10)), "it uses opset 10 of the ONNX operators; cnnserve reads opsets 11 to 21"),
    ("op of another domain", _custom_domain, "node 'foo' (Foo): op Foo of domain 'ex' is unknown"),
    ("truncated file", _truncated, "not an ONNX model (truncated, or another format?)"),
    ("not ONNX", lambda: b"\x89PNG\r\n\x1a\n not a model at all", "not an ONNX model (truncated, or another format?)"),
    ("empty file", lambda: b"", "the file is empty"),
    ("protobuf, but no model", lambda: b"\x08\x07", "not an ONNX model (truncated, or another format?): it has no opset"),
]  # fmt: skip
