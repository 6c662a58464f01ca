"""ONNX import (cnnserve.onnx.import_onnx / read_onnx): the PyTorch fixtures of tests/data give
torch's scores, every supported attribute is handled exactly, everything else is refused with
an error naming the node, the op and the attribute."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from cnnserve.convert import to_fully_convolutional
from cnnserve.onnx import OnnxError, import_onnx, read_onnx
from tests.onnx_graphs import (
    DATA,
    FIXTURES,
    REFUSALS,
    conv_classifier,
    expected,
    flat_classifier,
    graph_model,
    log_softmax,
    with_nodes_inserted,
)

LENET_NORM = {"mean": [0.5], "std": [0.25]}


def ort_scores(model: onnx.ModelProto | bytes, x: np.ndarray) -> np.ndarray:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def assert_scores_close(got: np.ndarray, want: np.ndarray) -> None:
    """float32 agreement: 1e-5 of the score scale (sums of a few hundred products)."""
    assert got.shape == want.shape
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(scale, 1.0))


# ---------------------------------------------------------------------------------------------
# The PyTorch fixtures
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_imported_fixture_gives_torchs_scores(name):
    result = read_onnx(DATA / f"{name}.onnx")
    stored = expected(name)
    scores = result.model.scores(stored["inputs"])
    if name == "bn_avg":  # the graph ends in LogSoftmax: cnnserve keeps the logits before it
        assert result.notes == [
            "node '/LogSoftmax' (LogSoftmax) dropped: cnnserve's scores are the logits before "
            "it (cnnserve applies the softmax for probabilities itself)"
        ]
        scores = log_softmax(scores)
    else:
        assert result.notes == []
    assert result.model.dtype == np.float32
    assert_scores_close(scores, stored["scores"])
    assert result.record["onnx_opset"] == {"lenet": 13, "bn_avg": 17, "fc357": 11}[name]
    assert result.record["onnx_producer"].startswith("pytorch")


def test_bn_avg_fixture_keeps_its_layers():
    model = import_onnx(DATA / "bn_avg.onnx")
    kinds = [spec["type"] for spec in model.layers]
    assert kinds == [
        "conv", "spatial_batchnorm", "relu", "spatial_batchnorm", "avg_pool", "conv", "relu",
        "affine", "batchnorm", "relu", "affine",
    ]  # fmt: skip
    # the running statistics are the stored ones, not the defaults
    fixture = onnx.load(DATA / "bn_avg.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in fixture.graph.initializer}
    np.testing.assert_array_equal(model.bn_params[2]["running_var"], inits["bn3.running_var"])
    np.testing.assert_array_equal(model.params["gamma1"], inits["bn1.weight"])


def test_a_volume_of_3x5x7_is_flattened_in_nchw_order():
    """fc357's first fc reads a (3, 5, 7) volume after `view(N, -1)` (a Reshape fed by shape
    arithmetic): its weights must line up with cnnserve's NCHW flatten."""
    model = import_onnx(DATA / "fc357.onnx")
    stored = expected("fc357")
    assert model.info[1].in_shape == (3, 5, 7)
    assert_scores_close(model.scores(stored["inputs"]), stored["scores"])
    # The same weights read in (H, W, C) order give other scores: the order is what is tested.
    w = model.params["W2"].reshape(3, 5, 7, 6).transpose(1, 2, 0, 3).reshape(105, 6)
    model.params["W2"] = np.ascontiguousarray(w)
    assert np.max(np.abs(model.scores(stored["inputs"]) - stored["scores"])) > 1e-2


def test_imported_lenet_converts_and_its_dense_map_is_torchs_crop_loop():
    model = import_onnx(DATA / "lenet.onnx", normalization=LENET_NORM)
    stored = expected("lenet")
    fcn = to_fully_convolutional(model)
    dense = fcn.forward(fcn.preprocess(stored["image01"][None]))[0]  # (10, 4, 6)
    assert fcn.geometry.stride == 4 and dense.shape == (10, 4, 6)
    assert_scores_close(dense, stored["dense"])
    # and cnnserve's own crop loop on the imported network
    x = model.preprocess(stored["image01"])
    crops = np.stack(
        [x[:, 4 * i : 4 * i + 28, 4 * j : 4 * j + 28] for i in range(4) for j in range(6)]
    )
    loop = model.scores(crops).T.reshape(10, 4, 6)
    assert_scores_close(dense, loop)


def test_class_names_and_normalisation_from_metadata_props_or_arguments():
    model = onnx.load(DATA / "fc357.onnx")
    names = ["a", "b", "c", "d", "e"]
    helper.set_model_props(
        model,
        {
            "class_names": json.dumps(names),
            "normalization": json.dumps({"mean": [0.1, 0.2], "std": [0.3, 0.4]}),
        },
    )
    data = model.SerializeToString()
    imported = import_onnx(data)
    assert imported.class_names == tuple(names)
    assert imported.normalization == {"mean": [0.1, 0.2], "std": [0.3, 0.4]}
    given = import_onnx(
        data, class_names=list("vwxyz"), normalization={"mean": [0, 0], "std": [1, 1]}
    )
    assert given.class_names == tuple("vwxyz")
    assert given.normalization == {"mean": [0.0, 0.0], "std": [1.0, 1.0]}
    helper.set_model_props(model, {"class_names": "cat, dog,bird,fish,cow"})  # plain text
    assert import_onnx(model.SerializeToString()).class_names == (
        "cat",
        "dog",
        "bird",
        "fish",
        "cow",
    )
    plain = import_onnx(DATA / "fc357.onnx")
    assert plain.class_names == ("0", "1", "2", "3", "4") and plain.normalization is None


@pytest.mark.parametrize(
    ("props", "kwargs", "message"),
    [
        ({"class_names": '["a", "b"]'}, {}, "class_names must be 5 non-empty strings"),
        ({"normalization": "{mean"}, {}, "metadata_props 'normalization' is not JSON"),
        (
            {},
            {"normalization": {"mean": [0.5], "std": [0.2]}},
            "normalization['mean'] must be 2 finite numbers",
        ),
        ({}, {"class_names": ["a", "a", "b", "c", "d"]}, "class_names must be distinct"),
    ],
)
def test_bad_class_names_or_normalisation_are_refused(props, kwargs, message):
    model = onnx.load(DATA / "fc357.onnx")
    helper.set_model_props(model, props)
    with pytest.raises(OnnxError, match=message.replace("[", r"\[").replace("(", r"\(")):
        import_onnx(model.SerializeToString(), **kwargs)


# ---------------------------------------------------------------------------------------------
# Each supported construct, against ONNX Runtime on the same graph
# ---------------------------------------------------------------------------------------------


def check_against_ort(model: onnx.ModelProto, shape: tuple, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    imported = read_onnx(model.SerializeToString())
    assert_scores_close(imported.model.scores(x), ort_scores(model, x))
    return imported


@pytest.mark.parametrize(
    ("conv", "pool", "size", "spec"),
    [
        ({"pads": [1, 1, 1, 1]}, None, 6, "conv 4 3x3 s1 p1"),
        (
            {"auto_pad": "SAME_UPPER"},
            None,
            6,
            "conv 4 3x3 s1 p1",
        ),  # 3x3, stride 1: pads 1 each side
        ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, None, 7, "conv 4 3x3 s2 p1"),
        ({"auto_pad": "VALID", "strides": [3, 3]}, None, 9, "conv 4 3x3 s3 p0"),
        ({"strides": [2, 2], "pads": [1, 1, 1, 1]}, None, 7, "conv 4 3x3 s2 p1"),
        (
            {},
            ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
            6,
            "max_pool 2x2 s2",
        ),
        (
            {},
            ("MaxPool", {"kernel_shape": [3, 3], "auto_pad": "VALID", "storage_order": 1}),
            6,
            "max_pool 3x3 s1",
        ),
        (
            {},
            ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "count_include_pad": 1}),
            6,
            "avg_pool 2x2 s2",
        ),
        (
            {},
            ("AveragePool", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [3, 3]}),
            8,
            "avg_pool 3x3 s3",
        ),
        ({}, ("GlobalAveragePool", {}), 6, "avg_pool 4x4 s1"),
        ({}, ("GlobalMaxPool", {}), 6, "max_pool 4x4 s1"),
    ],
)
def test_conv_and_pool_attributes_are_handled_exactly(conv, pool, size, spec):
    from cnnserve.specs import describe_spec

    model = conv_classifier(conv, pool, size=size)
    imported = check_against_ort(model, (3, 2, size, size))
    described = [describe_spec(s) for s in imported.model.layers]
    assert spec in described, described


@pytest.mark.parametrize(
    ("attrs", "c_shape"),
    [
        ({}, (3,)),
        ({"alpha": 0.5, "beta": 2.0, "transB": 1}, (1, 3)),
        ({"alpha": -1.5, "transB": 0}, ()),  # a scalar C broadcasts to every unit
        ({"beta": 0.25, "transB": 1}, None),  # no C
    ],
)
def test_gemm_alpha_beta_and_transposes(attrs, c_shape):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 72) if attrs.get("transB") else (72, 3)).astype(np.float32)
    inputs, inits = ["f", "gw"], {"gw": w}
    if c_shape is not None:
        inputs.append("gc")
        inits["gc"] = rng.standard_normal(c_shape).astype(np.float32)
    model = graph_model(
        [
            helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
            helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs),
        ],
        inits,
        ["N", 2, 6, 6],
    )
    check_against_ort(model, (4, 2, 6, 6))


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_and_add_become_one_affine_layer(bias_first):
    rng = np.random.default_rng(4)
    add = ["b", "mm"] if bias_first else ["mm", "b"]
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], name="conv"),  # no bias: the Add is it
        helper.make_node("Add", ["c", "cb"], ["cc"], name="conv_bias"),
        helper.make_node("Relu", ["cc"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w"], ["mm"], name="matmul"),
        helper.make_node("Add", add, ["y"], name="bias"),
    ]
    inits = {
        "cw": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "cb": rng.standard_normal((1, 4, 1, 1)).astype(np.float32),
        "shape": np.array([-1, 64]),
        "w": rng.standard_normal((64, 3)).astype(np.float32),
        "b": rng.standard_normal((1, 3)).astype(np.float32),
    }
    model = graph_model(nodes, inits, ["N", 2, 6, 6])
    imported = check_against_ort(model, (4, 2, 6, 6))
    assert [s["type"] for s in imported.model.layers] == ["conv", "relu", "affine"]


def test_dropout_and_identity_nodes_are_dropped_and_noted():
    model = onnx.load(DATA / "bn_avg.onnx")
    ratio = helper.make_tensor("ratio", onnx.TensorProto.FLOAT, [], [0.3])
    mode = helper.make_tensor("mode", onnx.TensorProto.BOOL, [], [False])
    model.graph.initializer.extend([ratio, mode])
    model = with_nodes_inserted(
        model,
        "/AveragePool",
        [
            helper.make_node("Dropout", ["?", "ratio", "mode"], ["d", "mask"], name="drop"),
            helper.make_node("Identity", ["d"], ["i"], name="same"),
        ],
    )
    onnx.checker.check_model(model)
    result = read_onnx(model.SerializeToString())
    assert "node 'drop' (Dropout) dropped: dropout is the identity at inference" in result.notes
    stored = expected("bn_avg")
    assert_scores_close(log_softmax(result.model.scores(stored["inputs"])), stored["scores"])


def test_dropout_in_training_mode_is_refused():
    model = onnx.load(DATA / "bn_avg.onnx")
    model.graph.initializer.extend([helper.make_tensor("mode", onnx.TensorProto.BOOL, [], [True])])
    model = with_nodes_inserted(
        model, "/AveragePool", [helper.make_node("Dropout", ["?", "", "mode"], ["d"], name="drop")]
    )
    with pytest.raises(OnnxError, match=r"node 'drop' \(Dropout\): its training_mode is true"):
        import_onnx(model.SerializeToString())


@pytest.mark.parametrize("opset", [11, 12, 13, 15, 18, 21])
def test_opsets_11_to_21_are_read(opset):
    middle = [helper.make_node("Relu", ["f"], ["m"], name="relu")]
    model = flat_classifier(middle, {}, 72, opset=opset)
    model.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], name="softmax", axis=1))
    model.graph.output[0].name = "p"
    imported = read_onnx(model.SerializeToString())
    assert imported.record["onnx_opset"] == opset
    assert any("node 'softmax' (Softmax) dropped" in note for note in imported.notes)


def test_opset_22_is_refused():
    with pytest.raises(
        OnnxError, match="it uses opset 22 of the ONNX operators; cnnserve reads opsets 11 to 21"
    ):
        import_onnx(flat_classifier([], {}, 72, opset=22).SerializeToString())


def test_a_double_graph_gives_a_float64_network():
    model = onnx.load(DATA / "fc357.onnx")
    for tensor in model.graph.initializer:
        array = onnx.numpy_helper.to_array(tensor).astype(np.float64)
        tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    net = import_onnx(model.SerializeToString())
    stored = expected("fc357")
    assert net.dtype == np.float64
    assert_scores_close(net.scores(stored["inputs"].astype(np.float64)), stored["scores"])


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "make", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_constructs_name_the_node_op_and_attribute(case, make, message, tmp_path):
    data = make()
    with pytest.raises(OnnxError) as caught:
        import_onnx(data)
    assert message in str(caught.value)
    assert str(caught.value).startswith("ONNX model (bytes): ")
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with pytest.raises(OnnxError) as caught:
        import_onnx(path)
    assert message in str(caught.value) and str(caught.value).startswith(f"ONNX model {path}: ")


def test_missing_files_and_wrong_sources(tmp_path):
    with pytest.raises(OnnxError, match="m.onnx: no such file"):
        import_onnx(tmp_path / "m.onnx")
    with pytest.raises(OnnxError, match=": a directory"):
        import_onnx(tmp_path)
    with pytest.raises(TypeError, match="source must be a path or bytes, got int"):
        import_onnx(3)
    with pytest.raises(ValueError, match=r"input_shape \(2, 7, 8\) does not match"):
        import_onnx(DATA / "fc357.onnx", input_shape=(2, 7, 8))


def test_a_graph_of_fixed_batch_size_reshaping_to_that_size_is_read():
    """torch.onnx.export without dynamic axes writes `x.view(x.size(0), -1)` as a Reshape to
    the constant [1, -1]: a flatten, for the batch size the graph was made for."""
    reshape = helper.make_node("Reshape", ["f", "shape"], ["m"], name="flat")
    model = flat_classifier([reshape], {"shape": np.array([1, -1])}, 72)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    result = read_onnx(model.SerializeToString())
    assert result.notes == [
        "node 'flat' (Reshape): the reshape to [1, -1] is taken as a flatten to (N, -1) (the "
        "graph's batch size is fixed at 1; cnnserve takes any)"
    ]
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    assert_scores_close(result.model.scores(x), ort_scores(model, x))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # dynamic: refused
    with pytest.raises(OnnxError, match=r"it reshapes to \[1, -1\]; cnnserve takes only a flatten"):
        import_onnx(model.SerializeToString())


def test_initializers_listed_as_graph_inputs_are_weights_not_inputs():
    model = onnx.load(DATA / "fc357.onnx")  # as exporters with keep_initializers_as_inputs
    for tensor in model.graph.initializer:
        value = helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        model.graph.input.append(value)
    stored = expected("fc357")
    assert_scores_close(
        import_onnx(model.SerializeToString()).scores(stored["inputs"]), stored["scores"]
    )


def test_an_identity_after_the_final_softmax_is_dropped_too():
    model = flat_classifier([], {}, 72)
    model.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], name="softmax", axis=-1))
    model.graph.node.append(helper.make_node("Identity", ["p"], ["out"], name="id"))
    model.graph.output[0].name = "out"
    assert len(read_onnx(model.SerializeToString()).notes) == 1
    model.graph.node[-1].op_type = "Relu"
    with pytest.raises(
        OnnxError,
        match=r"node 'id' \(Relu\): it follows node 'softmax' \(Softmax\), which cnnserve only takes at the end",
    ):
        import_onnx(model.SerializeToString())


def test_weights_that_do_not_fit_the_networks_dtype_are_refused():
    model = onnx.load(DATA / "fc357.onnx")
    for tensor in model.graph.initializer:
        if tensor.name == "fc2.weight":  # float64 values beyond float32, in a FLOAT graph
            big = np.full(tuple(tensor.dims), 1e300)
            tensor.CopyFrom(onnx.numpy_helper.from_array(big, tensor.name))
    with pytest.raises(OnnxError, match="tensor W3 overflows float32"):
        import_onnx(model.SerializeToString())


def test_an_initializer_of_the_wrong_size_is_refused():
    model = onnx.load(DATA / "fc357.onnx")
    model.graph.initializer[0].raw_data = b"\0" * 12
    with pytest.raises(
        OnnxError,
        match=r"\(bytes\): not a valid ONNX model: TensorProto \(tensor name: conv.weight\) "
        r"raw_data size \(12 bytes\) is too small",
    ):
        import_onnx(model.SerializeToString())
