"""ONNX export (cnnserve.onnx.export_onnx): ONNX Runtime and onnx's reference evaluator give
cnnserve's scores on the exported file, for trained networks (both dtypes) and converted ones
(dense maps on larger images), and import(export(m)) is m."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from cnnserve.convert import load_fully_convolutional, to_fully_convolutional
from cnnserve.modelfile import load_model, save_model
from cnnserve.network import ConvNet
from cnnserve.onnx import OnnxError, OnnxUnavailableError, export_onnx, import_onnx
from tests.onnx_graphs import DATA
from tests.test_onnx import assert_scores_close, ort_scores

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "models").glob("*.safetensors"))

# Every layer kind a trained network can have; 3 x 10 x 10 inputs.
ALL_LAYERS = [
    {"type": "conv", "filters": 4, "size": 3, "stride": 1, "pad": 1},
    {"type": "spatial_batchnorm"},
    {"type": "relu"},
    {"type": "max_pool", "size": 2, "stride": 2},
    {"type": "conv", "filters": 6, "size": [3, 2], "stride": 1, "pad": 0},
    {"type": "spatial_groupnorm", "groups": 3},
    {"type": "avg_pool", "size": [3, 4], "stride": 1},
    {"type": "dropout", "keep": 0.5},
    {"type": "affine", "units": 8},
    {"type": "layernorm"},
    {"type": "relu"},
    {"type": "affine", "units": 7},
    {"type": "batchnorm"},
]
# What import reads back (no group or layer norm in ONNX import): padding, pools, both norms.
IMPORTABLE = [
    {"type": "conv", "filters": 4, "size": 3, "stride": 1, "pad": 1},
    {"type": "spatial_batchnorm", "eps": 1e-3, "momentum": 0.8},
    {"type": "relu"},
    {"type": "avg_pool", "size": 2, "stride": 2},
    {"type": "conv", "filters": 5, "size": [3, 2], "stride": 1, "pad": 0},
    {"type": "max_pool", "size": [1, 2], "stride": 1},
    {"type": "affine", "units": 8},
    {"type": "batchnorm"},
    {"type": "relu"},
]


def trained(layers, dtype, seed=0, **kwargs) -> ConvNet:
    """A network with random weights and batchnorm statistics (as if trained)."""
    net = ConvNet(layers, (3, 10, 10), 4, dtype=dtype, seed=seed, **kwargs)
    rng = np.random.default_rng(seed + 1)
    for name, value in net.params.items():
        net.params[name] = (value + 0.3 * rng.standard_normal(value.shape)).astype(dtype)
    for bn in net.bn_params:
        bn["running_mean"] = rng.uniform(-0.5, 0.5, bn["running_mean"].shape).astype(dtype)
        bn["running_var"] = rng.uniform(0.5, 2.0, bn["running_var"].shape).astype(dtype)
    return net


def images(shape, dtype, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def reference_scores(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ReferenceEvaluator(proto).run(None, {"image": x})[0]


# ---------------------------------------------------------------------------------------------
# Trained networks
# ---------------------------------------------------------------------------------------------


def test_exported_trained_network_runs_in_onnx_runtime_and_the_reference_evaluator():
    net = trained(ALL_LAYERS, np.float32)
    proto = export_onnx(net)
    x = images((5, 3, 10, 10), np.float32)
    want = net.scores(x)
    assert_scores_close(ort_scores(proto, x), want)
    assert_scores_close(reference_scores(proto, x), want)
    ops = {node.op_type for node in proto.graph.node}
    assert "Dropout" not in ops and {"InstanceNormalization", "LayerNormalization"} <= ops


def test_exported_float64_network_equals_cnnserve_in_float64():
    """ONNX Runtime's CPU build has no float64 Conv (NOT_IMPLEMENTED): the reference evaluator
    checks the whole network, ONNX Runtime a float64 network without convolutions."""
    net = trained(ALL_LAYERS, np.float64)
    proto = export_onnx(net)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    x = images((3, 3, 10, 10), np.float64)
    got = reference_scores(proto, x)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, net.scores(x), rtol=0, atol=1e-10)
    dense = trained(
        [{"type": "affine", "units": 9}, {"type": "batchnorm"}, {"type": "relu"}], np.float64
    )
    np.testing.assert_allclose(
        ort_scores(export_onnx(dense), x), dense.scores(x), rtol=0, atol=1e-10
    )


def test_export_metadata_and_signature():
    net = trained(
        IMPORTABLE,
        np.float32,
        class_names=["a", "b", "c", "d"],
        normalization={"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]},
    )
    proto = export_onnx(net)
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == ["a", "b", "c", "d"]
    assert json.loads(meta["normalization"]) == net.normalization
    assert json.loads(meta["input_shape"]) == [3, 10, 10]
    assert meta["cnnserve_kind"] == "trained"
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, 10, 10]
    dims = [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["N", 4]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_import_of_export_is_the_same_network(dtype, tmp_path):
    net = trained(
        IMPORTABLE,
        dtype,
        class_names=["w", "x", "y", "z"],
        normalization={"mean": [0.5] * 3, "std": [0.2] * 3},
    )
    path = tmp_path / "net.onnx"
    export_onnx(net, path)
    back = import_onnx(path)
    assert back.config() == net.config()
    assert back.class_names == net.class_names and back.normalization == net.normalization
    assert back.params.keys() == net.params.keys()
    for name, value in net.params.items():
        assert back.params[name].dtype == value.dtype
        np.testing.assert_array_equal(back.params[name], value, err_msg=name)
    for a, b in zip(net.bn_params, back.bn_params, strict=True):
        np.testing.assert_array_equal(a["running_mean"], b["running_mean"])
        np.testing.assert_array_equal(a["running_var"], b["running_var"])
    x = images((2, 3, 10, 10), dtype)
    np.testing.assert_array_equal(back.scores(x), net.scores(x))


def test_import_of_export_of_an_imported_torch_model_is_the_same():
    net = import_onnx(DATA / "bn_avg.onnx")
    again = import_onnx(export_onnx(net).SerializeToString())
    for name, value in net.state_tensors().items():
        np.testing.assert_array_equal(again.state_tensors()[name], value)


# ---------------------------------------------------------------------------------------------
# Converted networks: one file, any image size
# ---------------------------------------------------------------------------------------------


# Converted: the affine layers become convolutions, the layer and batch norms after them act
# per cell (layernorm as a channel layernorm: Transpose, LayerNormalization, Transpose).
PER_CELL_NORMS = [
    {"type": "conv", "filters": 4, "size": 4, "stride": 2, "pad": 1},
    {"type": "relu"},
    {"type": "affine", "units": 8},
    {"type": "layernorm"},
    {"type": "relu"},
    {"type": "affine", "units": 6},
    {"type": "batchnorm"},
]


@pytest.mark.parametrize("layers", [IMPORTABLE, PER_CELL_NORMS], ids=["importable", "norms"])
@pytest.mark.parametrize("size", [(10, 10), (23, 31), (26, 27)])
def test_exported_converted_network_gives_the_dense_map(size, layers):
    net = trained(layers, np.float32, seed=2)
    fcn = to_fully_convolutional(net)
    proto = export_onnx(fcn)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["cnnserve_kind"] == "converted"
    assert json.loads(meta["geometry"]) == fcn.geometry.to_dict()
    x = images((2, 3, *size), np.float32, seed=3)
    want = fcn.forward(x)  # uncovered margins (odd sizes) are cut off first
    assert want.shape[2:] == ((size[0] - 10) // 2 + 1, (size[1] - 10) // 2 + 1)
    assert_scores_close(ort_scores(proto, x), want)
    assert_scores_close(reference_scores(proto, x), want)


def test_exported_converted_lenet_maps_a_larger_image_like_torch():
    net = import_onnx(DATA / "lenet.onnx")
    proto = export_onnx(to_fully_convolutional(net))
    with np.load(DATA / "lenet_expected.npz") as stored:
        x = ((stored["image01"] - 0.5) / 0.25)[None].astype(np.float32)
        assert_scores_close(ort_scores(proto, x)[0], stored["dense"])


def test_converted_network_with_a_per_window_group_norm_is_refused():
    fcn = to_fully_convolutional(trained(ALL_LAYERS, np.float32))
    assert fcn.per_window_from is not None
    with pytest.raises(OnnxError, match="runs its group norm window by window"):
        export_onnx(fcn)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_models_export_and_run_in_onnx_runtime(path, tmp_path, digits):
    out = tmp_path / "m.onnx"
    export_onnx(path, out)
    net = load_model(path)
    C, H, W = net.input_shape
    if net.input_shape == digits.input_shape:
        x = digits.X_test[:64].astype(np.float32)
    else:  # mnist_lenet (28 x 28), faces (25 x 25): normalised-looking images of their size
        x = images((16, C, H, W), np.float32, seed=4)
    assert_scores_close(ort_scores(out.read_bytes(), x), net.scores(x))
    fcn = load_fully_convolutional(path)
    canvas = images((1, C, H + 32, W + 48), np.float32, seed=5)
    assert_scores_close(ort_scores(export_onnx(fcn), canvas), fcn.forward(canvas))


def test_model_files_of_both_kinds_export(tmp_path):
    net = trained(IMPORTABLE, np.float32)
    save_model(net, tmp_path / "t.safetensors")
    from cnnserve.convert import save_fully_convolutional

    save_fully_convolutional(to_fully_convolutional(net), tmp_path / "c.safetensors")
    kinds = {}
    for name in ("t", "c"):
        proto = export_onnx(tmp_path / f"{name}.safetensors", tmp_path / f"{name}.onnx")
        kinds[name] = {p.key: p.value for p in proto.metadata_props}["cnnserve_kind"]
        assert onnx.load(tmp_path / f"{name}.onnx") == proto
    assert kinds == {"t": "trained", "c": "converted"}


def test_export_errors(tmp_path):
    net = trained(IMPORTABLE, np.float32)
    with pytest.raises(OnnxError, match="directory .*nope does not exist"):
        export_onnx(net, tmp_path / "nope" / "m.onnx")
    assert not (tmp_path / "nope").exists()
    with pytest.raises(
        TypeError, match="model must be a ConvNet, a FullyConvNet or a model file path, got int"
    ):
        export_onnx(3)
    from cnnserve.modelfile import ModelFileError

    with pytest.raises(ModelFileError, match="does not exist"):
        export_onnx(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------
# Without the onnx package
# ---------------------------------------------------------------------------------------------


def test_without_onnx_the_functions_say_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(OnnxUnavailableError, match=r"pip install -e '\.\[onnx\]'"):
        import_onnx(DATA / "fc357.onnx")
    with pytest.raises(OnnxUnavailableError, match=r"pip install -e '\.\[onnx\]'"):
        export_onnx(trained(IMPORTABLE, np.float32))


def test_cnnserve_the_cli_and_the_service_do_not_import_onnx():
    code = (
        "import sys\n"
        "import cnnserve, cnnserve.model, cnnserve.onnx, cnnserve.cli, cnnserve.service.app\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
