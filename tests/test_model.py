"""Networks from layer specs: shapes, loss, gradients, modes, and model files."""

import json
import math
import os

import numpy as np
import pytest

from cnnserve import layers as L
from cnnserve.model import (
    PRESETS,
    ConvNet,
    ModelFileError,
    ThreeLayerConvNet,
    load_model,
    preset_layers,
    read_model_file,
    save_model,
)
from cnnserve.specs import run_order
from tests.gradcheck import numeric_gradient, scaled_error

# Every layer type, on a small odd-sized input: conv with a non-square kernel and stride 2,
# an overlapping pool, both spatial norms, dropout, and vector norms after an affine layer.
ALL_TYPES = [
    {"type": "conv", "filters": 4, "size": [3, 2], "stride": 2, "pad": 1},
    {"type": "spatial_batchnorm"},
    {"type": "relu"},
    {"type": "max_pool", "size": 3, "stride": 1},
    {"type": "conv", "filters": 4, "size": 1},
    {"type": "spatial_groupnorm", "groups": 2},
    {"type": "avg_pool", "size": [2, 1], "stride": 1},
    {"type": "affine", "units": 6},
    {"type": "batchnorm"},
    {"type": "relu"},
    {"type": "dropout", "keep": 0.7},
    {"type": "affine", "units": 5},
    {"type": "layernorm"},
]


def _data(shape, n=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)), rng.integers(classes, size=n)


def test_three_layer_convnet_matches_cs231n():
    model = ThreeLayerConvNet()
    assert [(k, v.shape) for k, v in model.params.items()] == [
        ("W1", (32, 3, 7, 7)),
        ("b1", (32,)),
        ("W2", (32 * 16 * 16, 100)),
        ("b2", (100,)),
        ("W3", (100, 10)),
        ("b3", (10,)),
    ]
    assert all(v.dtype == np.float32 for v in model.params.values())
    assert abs(float(np.std(model.params["W1"])) - 1e-3) < 1e-4  # CS231n's weight_scale
    assert model.layers[0] == {"type": "conv", "filters": 32, "size": [7, 7], "stride": 1, "pad": 3}


def test_initial_loss_is_log_num_classes():
    model = ThreeLayerConvNet(input_dim=(3, 16, 16), num_filters=8, hidden_dim=20)
    X, y = _data((3, 16, 16), n=40, classes=10)
    loss, grads = model.loss(X, y)
    assert abs(loss - math.log(10)) < 0.01
    assert set(grads) == set(model.params)


def test_regularisation_adds_half_reg_sum_of_squared_weights():
    X, y = _data((3, 8, 8), n=3)
    plain = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=2, hidden_dim=4, num_classes=3)
    reg = ThreeLayerConvNet(
        input_dim=(3, 8, 8), num_filters=2, hidden_dim=4, num_classes=3, reg=0.7
    )
    loss0, grads0 = plain.loss(X, y)
    loss1, grads1 = reg.loss(X, y)
    weights = sum(float(np.sum(reg.params[k].astype(np.float64) ** 2)) for k in ("W1", "W2", "W3"))
    assert loss1 - loss0 == pytest.approx(0.5 * 0.7 * weights, rel=1e-5)
    np.testing.assert_allclose(grads1["W2"] - grads0["W2"], 0.7 * reg.params["W2"], rtol=1e-5)
    np.testing.assert_array_equal(grads1["b2"], grads0["b2"])  # biases are not regularised


def test_he_initialisation_by_default():
    model = ConvNet([{"type": "conv", "filters": 64, "size": 5}], (8, 9, 9), 10)
    std = float(np.std(model.params["W1"]))
    assert std == pytest.approx(math.sqrt(2 / (8 * 5 * 5)), rel=0.05)
    fc = float(np.std(model.params["W2"]))  # the classifier reads 64 * 5 * 5 inputs
    assert fc == pytest.approx(math.sqrt(2 / (64 * 5 * 5)), rel=0.05)


@pytest.mark.parametrize("reg", [0.0, 0.3])
def test_whole_model_gradient_matches_numeric_gradient(reg):
    input_shape = (2, 7, 6)
    model = ConvNet(ALL_TYPES, input_shape, 3, reg=reg, dtype=np.float64, seed=3)
    X, y = _data(input_shape, n=3)
    rng_state = model.rng.bit_generator.state
    for name in ("gamma1", "beta1", "gamma3", "beta3"):  # move norm params off 1 and 0
        model.params[name] = model.params[name] + 0.3 * np.random.default_rng(1).standard_normal(
            model.params[name].shape
        )

    def loss_value(_):
        model.rng.bit_generator.state = rng_state  # the same dropout mask on every call
        return model.loss(X, y)[0]

    model.rng.bit_generator.state = rng_state
    _, grads = model.loss(X, y)
    for name, param in model.params.items():
        expected = numeric_gradient(loss_value, param, 1.0, h=1e-5)
        # A conv bias followed by batch norm has a zero gradient: judge it by absolute error.
        if np.max(np.abs(expected)) > 1e-6:
            assert scaled_error(grads[name], expected) < 1e-6, name
        np.testing.assert_allclose(grads[name], expected, atol=1e-8, err_msg=name)


def _loss_in_spec_order(model, X, y):
    """Loss and gradients with the layers run exactly in spec order (no reordering)."""
    out, caches = X.astype(model.dtype), []
    for info in model.info:
        out, cache = model._forward(info, out, True)
        caches.append(cache)
    loss, dout = L.softmax_loss(out, y)
    grads = {}
    for info, cache in zip(reversed(model.info), reversed(caches), strict=True):
        dout, layer_grads = model._backward(info, dout, cache)
        grads.update(layer_grads)
        if dout is None:
            break
    return loss, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("pool", "shape"),
    [
        ({"type": "max_pool", "size": 2, "stride": 2}, (2, 10, 12)),
        ({"type": "max_pool", "size": 3, "stride": 2}, (2, 9, 11)),  # overlapping windows
        ({"type": "max_pool", "size": [2, 3], "stride": 1}, (2, 9, 11)),
    ],
)
def test_relu_before_max_pool_runs_after_it_with_identical_results(pool, shape, dtype):
    """loss runs relu after max_pool (cheaper): the loss and every gradient are bit-identical
    to running them in spec order, with windows that are all negative, have tied maxima
    (zeros) or a positive maximum."""
    layers = [
        {"type": "conv", "filters": 3, "size": 3, "pad": 1},
        {"type": "relu"},
        pool,
        {"type": "affine", "units": 7},
        {"type": "relu"},
    ]
    model = ConvNet(layers, shape, 4, dtype=dtype, seed=2)
    assert [i.spec["type"] for i in run_order(model.info)][1:3] == [
        "max_pool",
        "relu",
    ]
    X, y = _data(shape, n=5, classes=4, seed=8)
    X[0, :, :4, :4] = 0  # zero windows: ties at 0 after the conv's zero bias
    model.params["b1"][:] = 0
    loss, grads = model.loss(X, y)
    want_loss, want_grads = _loss_in_spec_order(model, X, y)
    assert loss == want_loss
    assert grads.keys() == want_grads.keys()
    for name in grads:
        np.testing.assert_array_equal(grads[name], want_grads[name], err_msg=name)
    np.testing.assert_array_equal(model.loss(X), model.loss(X))  # test mode runs too


def test_gradient_with_respect_to_input_flows_through_every_layer():
    # The first conv's weight gradient depends on everything above it; a broken backward
    # anywhere in the stack shows up here, in float32 too.
    for dtype in (np.float32, np.float64):
        model = ConvNet(ALL_TYPES, (2, 7, 6), 3, dtype=dtype, seed=5)
        X, y = _data((2, 7, 6), n=3)
        _, grads = model.loss(X, y)
        assert grads["W1"].dtype == dtype
        assert np.all(np.isfinite(grads["W1"])) and np.any(grads["W1"] != 0)


def test_train_and_test_modes():
    model = ConvNet(ALL_TYPES, (2, 7, 6), 3, seed=1)
    X, y = _data((2, 7, 6), n=5)
    before = [bn["running_mean"].copy() for bn in model.bn_params]
    first, second = model.loss(X), model.loss(X)
    np.testing.assert_array_equal(first, second)  # test mode: no dropout, fixed statistics
    assert all(
        np.array_equal(b, bn["running_mean"]) for b, bn in zip(before, model.bn_params, strict=True)
    )
    model.loss(X, y)
    assert not any(
        np.array_equal(b, bn["running_mean"]) for b, bn in zip(before, model.bn_params, strict=True)
    )
    assert not np.array_equal(model.loss(X), first)  # new running statistics are used
    # Dropout draws a new mask from model.rng on every training call.
    assert model.loss(X, y)[0] != model.loss(X, y)[0]


def test_scores_and_predict_in_batches():
    model = ConvNet([{"type": "conv", "filters": 3, "size": 3}], (1, 5, 5), 4, seed=2)
    X, _ = _data((1, 5, 5), n=7)
    full = model.loss(X)
    np.testing.assert_allclose(model.scores(X, batch_size=3), full, rtol=1e-6)
    np.testing.assert_array_equal(model.predict(X, batch_size=2), np.argmax(full, axis=1))


def test_inputs_are_converted_and_not_modified():
    model = ThreeLayerConvNet(input_dim=(1, 4, 4), num_filters=2, filter_size=3, hidden_dim=3)
    X = np.arange(32, dtype=np.int64).reshape(2, 1, 4, 4)
    copy = X.copy()
    assert model.loss(X).dtype == np.float32
    np.testing.assert_array_equal(X, copy)


@pytest.mark.parametrize(
    ("layers", "shape", "message"),
    [
        (
            [{"type": "conv", "filters": 4, "size": 5}, {"type": "max_pool", "size": 2}],
            (1, 8, 7),
            r"layer 1 \(max_pool 2x2 s2\) cannot take an input of shape \(4, 4, 3\)",
        ),
        (
            [{"type": "conv", "filters": 4, "size": 9}],
            (1, 8, 8),
            r"layer 0 \(conv 4 9x9 s1 p0\) cannot take an input of shape \(1, 8, 8\)",
        ),
        (
            [{"type": "affine", "units": 4}, {"type": "conv", "filters": 2, "size": 1}],
            (1, 3, 3),
            r"layer 1 .* needs a \(C, H, W\) volume",
        ),
        (
            [{"type": "batchnorm"}],
            (2, 3, 3),
            r"layer 0 \(batchnorm\) .* use spatial_batchnorm",
        ),
        (
            [{"type": "spatial_groupnorm", "groups": 4}],
            (6, 3, 3),
            r"6 channels do not split into 4 groups",
        ),
        (
            [{"type": "conv", "filters": 4}],
            (1, 3, 3),
            r"layer 0 \(conv\) is missing the key\(s\) 'size'",
        ),
        (
            [{"type": "conv", "filters": 4, "size": 3, "padding": 1}],
            (1, 3, 3),
            r"unknown key\(s\) 'padding'",
        ),
        ([{"type": "convolution"}], (1, 3, 3), r"layer 0 has unknown type 'convolution'"),
        ([{"type": "dropout", "keep": 0}], (1, 3, 3), r"layer 0 keep .* must be in \(0, 1\]"),
        (
            [{"type": "max_pool", "size": [2, 3]}],
            (1, 4, 6),
            r"non-square size needs an explicit stride",
        ),
        (
            [{"type": "conv", "filters": 2.5, "size": 3}],
            (1, 3, 3),
            r"layer 0 filters must be an int",
        ),
    ],
)
def test_impossible_or_bad_stacks_fail_at_construction(layers, shape, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ConvNet(layers, shape, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_shape": (8, 8)}, ValueError, r"input_shape must be \(C, H, W\)"),
        ({"num_classes": 1}, ValueError, "num_classes must be >= 2"),
        ({"dtype": np.float16}, TypeError, "dtype must be float32 or float64"),
        ({"reg": -1.0}, ValueError, "reg must be in"),
        ({"weight_scale": 0.0}, ValueError, "weight_scale must be in"),
        ({"class_names": ["a", "b"]}, ValueError, "class_names must be 3 non-empty strings"),
        ({"class_names": ["a", "a", "b"]}, ValueError, "class_names must be distinct"),
        ({"normalization": {"mean": [0.5]}}, ValueError, "keys 'mean' and 'std'"),
        ({"normalization": {"mean": [0.5, 1], "std": [1]}}, ValueError, r"normalization\['mean'\]"),
        ({"normalization": {"mean": [0.5], "std": [0.0]}}, ValueError, r"'std'\] must be > 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    args = {"layers": [{"type": "relu"}], "input_shape": (1, 4, 4), "num_classes": 3} | kwargs
    with pytest.raises(error, match=message):
        ConvNet(**args)


def test_bad_loss_inputs():
    model = ConvNet([{"type": "relu"}], (1, 4, 4), 3)
    with pytest.raises(ValueError, match=r"X must have shape \(N, 1, 4, 4\) for this network"):
        model.loss(np.zeros((2, 1, 4, 5)))
    with pytest.raises(TypeError, match="X must be a numpy.ndarray"):
        model.loss([[0.0]])
    with pytest.raises(ValueError, match=r"labels in y must be in \[0, 3\)"):
        model.loss(np.zeros((2, 1, 4, 4)), np.array([0, 3]))


def test_presets_build_and_digits_preset_has_no_padding():
    for name in PRESETS:
        shape = (1, 8, 8) if name == "digits" else (3, 32, 32)
        model = ConvNet(preset_layers(name, shape), shape, 10)
        assert model.loss(np.zeros((2, *shape))).shape == (2, 10)
    assert all(spec.get("pad", 0) == 0 for spec in preset_layers("digits", (1, 8, 8)))
    with pytest.raises(ValueError, match="unknown architecture preset 'vgg'"):
        preset_layers("vgg", (1, 8, 8))


def test_summary_lists_layers_shapes_and_parameter_count():
    model = ConvNet(preset_layers("digits", (1, 8, 8)), (1, 8, 8), 10)
    text = model.summary()
    assert "conv 32 3x3 s1 p0" in text and "(64, 2, 2)" in text and "(classifier)" in text
    assert f"total parameters: {model.num_parameters():,} (float32)" in text


def test_preprocess_uses_the_stored_normalisation():
    model = ConvNet(
        [{"type": "relu"}],
        (2, 2, 2),
        3,
        normalization={"mean": [0.5, 0.25], "std": [0.5, 0.25]},
    )
    x = np.full((2, 2, 2), 0.75)
    out = model.preprocess(x)
    np.testing.assert_allclose(out[0], 0.5)
    np.testing.assert_allclose(out[1], 2.0)
    assert out.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------


def _trained_model(dtype=np.float32):
    model = ConvNet(
        ALL_TYPES,
        (2, 7, 6),
        3,
        dtype=dtype,
        class_names=["cat", "dog", "eel"],
        normalization={"mean": [0.1, 0.2], "std": [0.3, 0.4]},
    )
    X, y = _data((2, 7, 6), n=4)
    model.loss(X, y)  # running statistics move away from their initial values
    for name, value in model.params.items():
        model.params[name] = value + np.asarray(0.01, dtype=dtype)
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    model = _trained_model(dtype)
    path = save_model(model, tmp_path / "m.safetensors", training={"dataset": "toy", "epochs": 3})
    loaded = read_model_file(path)
    for name, value in model.state_tensors().items():
        restored = loaded.model.state_tensors()[name]
        assert restored.dtype == value.dtype
        np.testing.assert_array_equal(restored, value)
    assert loaded.model.layers == model.layers
    assert loaded.model.class_names == ("cat", "dog", "eel")
    assert loaded.model.normalization == model.normalization
    assert loaded.training["dataset"] == "toy" and loaded.training["epochs"] == 3
    assert loaded.training["cnnserve_version"] and loaded.training["date"].startswith("20")
    X, _ = _data((2, 7, 6), n=3, seed=9)
    np.testing.assert_array_equal(loaded.model.loss(X), model.loss(X))
    assert load_model(path).num_parameters() == model.num_parameters()


def test_state_tensors_and_state_round_trip(tmp_path):
    model = ConvNet([{"type": "relu"}], (1, 2, 2), 2)
    extra = {"W1/m": np.arange(8, dtype=np.float32).reshape(4, 2)}
    save_model(model, tmp_path / "c.safetensors", state_tensors=extra, state={"epoch": 2})
    loaded = read_model_file(tmp_path / "c.safetensors")
    np.testing.assert_array_equal(loaded.state_tensors["W1/m"], extra["W1/m"])
    assert loaded.state == {"epoch": 2}
    assert read_model_file(save_model(model, tmp_path / "d.safetensors")).state is None


def test_loaded_parameters_are_writable(tmp_path):
    path = save_model(_trained_model(), tmp_path / "m.safetensors")
    model = load_model(path)
    assert all(p.flags.writeable for p in model.params.values())
    before = model.params["W1"].copy()
    model.params["W1"] += 1.0  # training can continue on a loaded model, in place
    np.testing.assert_array_equal(model.params["W1"], before + 1.0)
    np.testing.assert_array_equal(load_model(path).params["W1"], before)  # the file is untouched


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    model = _trained_model()
    save_model(model, path, training={"epochs": 1})

    def crash(*args):
        raise KeyboardInterrupt("killed during the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, path, training={"epochs": 2})
    assert read_model_file(path).training["epochs"] == 1  # the old file is intact
    assert os.listdir(tmp_path) == ["m.safetensors"]  # and no temporary file is left


def test_save_refuses_non_finite_weights_and_missing_directories(tmp_path):
    model = _trained_model()
    with pytest.raises(ModelFileError, match="directory .* does not exist"):
        save_model(model, tmp_path / "nope" / "m.safetensors")
    model.params["W2"] = model.params["W2"] * np.nan
    with pytest.raises(ValueError, match="tensor 'W2' has NaN or inf"):
        save_model(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def _rewrite(path, tensors=None, metadata=None):
    """Rewrite a model file with edited tensors or metadata (as a hand-edited file would be)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as handle:
        old_meta = handle.metadata()
        old = {name: handle.get_tensor(name) for name in handle.keys()}
    new = old if tensors is None else tensors(old)
    save_file(new, str(path), metadata=old_meta if metadata is None else metadata(old_meta))


def _meta_edit(change):
    def edit(meta):
        inner = json.loads(meta["cnnserve"])
        change(inner)
        return meta | {"cnnserve": json.dumps(inner)}

    return edit


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-7]), "not a readable safetensors file"),
        (lambda p: p.write_bytes(b"\x00" * 64), "not a readable safetensors file"),
        (lambda p: p.write_bytes(b""), "not a readable safetensors file"),
        (
            lambda p: _rewrite(p, tensors=lambda t: t | {"W2": np.zeros((3, 3), np.float32)}),
            r"tensor 'W2' has shape \(3, 3\), but the architecture needs \(4, 4, 1, 1\)",
        ),
        (
            lambda p: _rewrite(p, tensors=lambda t: {k: v for k, v in t.items() if k != "b3"}),
            r"missing tensor 'b3' of shape \(6,\)",
        ),
        (
            lambda p: _rewrite(p, tensors=lambda t: t | {"W9": np.zeros(2, np.float32)}),
            r"tensor\(s\) 'W9' that its architecture does not have",
        ),
        (
            lambda p: _rewrite(p, tensors=lambda t: t | {"b1": t["b1"].astype(np.float64)}),
            r"tensor 'b1' has dtype float64, but the model is float32",
        ),
        (
            lambda p: _rewrite(p, tensors=lambda t: t | {"b1": t["b1"] * np.inf}),
            r"tensor 'b1' has NaN or inf values",
        ),
        (
            lambda p: _rewrite(p, tensors=lambda t: t | {"running_var1": -t["running_var1"]}),
            r"tensor 'running_var1' has negative values",
        ),
        (lambda p: _rewrite(p, metadata=lambda m: {"format": "pt"}), "not a cnnserve model"),
        (
            lambda p: _rewrite(p, metadata=lambda m: m | {"format_version": "99"}),
            "format version '99'",
        ),
        (lambda p: _rewrite(p, metadata=lambda m: m | {"cnnserve": "{"}), "invalid metadata"),
        (
            lambda p: _rewrite(p, metadata=_meta_edit(lambda d: d["architecture"].pop("layers"))),
            "invalid metadata: config is missing 'layers'",
        ),
        (
            lambda p: _rewrite(
                p, metadata=_meta_edit(lambda d: d["architecture"]["layers"][0].update(size=99))
            ),
            r"invalid metadata: layer 0 \(conv 4 99x99 s2 p1\) cannot take",
        ),
    ],
)
def test_damaged_model_files_raise_naming_file_and_tensor(tmp_path, damage, message):
    path = save_model(_trained_model(), tmp_path / "model.safetensors")
    damage(path)
    with pytest.raises(ModelFileError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_missing_model_file_or_directory(tmp_path):
    with pytest.raises(ModelFileError, match=r"nothing\.safetensors does not exist"):
        load_model(tmp_path / "nothing.safetensors")
    with pytest.raises(ModelFileError, match="is a directory"):
        load_model(tmp_path)


class _Exploit:
    """Unpickling this runs code: it would create the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_model_file_never_unpickles(tmp_path):
    import pickle

    from safetensors.numpy import save_file

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    # A whole pickle file, and pickles where a model file keeps JSON (metadata and state).
    (tmp_path / "pickle.safetensors").write_bytes(payload)
    text = payload.decode("latin-1")
    meta = {"format": "cnnserve.model", "format_version": "1", "cnnserve": text}
    save_file({"W1": np.zeros(2, np.float32)}, str(tmp_path / "meta.safetensors"), metadata=meta)
    path = save_model(_trained_model(), tmp_path / "state.safetensors")
    _rewrite(path, metadata=lambda m: m | {"state": text})
    for name in ("pickle", "meta", "state"):
        with pytest.raises(
            ModelFileError, match="not a readable safetensors file|invalid metadata"
        ):
            load_model(tmp_path / f"{name}.safetensors")
    assert not marker.exists()


def test_an_oversized_architecture_fails_before_anything_is_allocated(tmp_path):
    path = save_model(
        ConvNet([{"type": "affine", "units": 4}], (1, 2, 2), 3), tmp_path / "m.safetensors"
    )
    # 10**9 units of 4 inputs would be 16 GB of float32 weights: the file holds 64 bytes.
    _rewrite(
        path, metadata=_meta_edit(lambda d: d["architecture"]["layers"][0].update(units=10**9))
    )
    with pytest.raises(ModelFileError, match=r"declares 8,000,000,003 parameters, more than"):
        load_model(path)  # refused from the header: the parameter limit
    with pytest.raises(
        ModelFileError,
        match=r"tensor 'W1' has shape \(4, 4\), but the architecture needs \(4, 1000000000\)",
    ):
        load_model(path, max_params=10**10)  # a trusted file: the tensors' own check


def test_written_files_get_ordinary_permissions(tmp_path):
    path = save_model(_trained_model(), tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it
    path.chmod(0o640)
    save_model(_trained_model(), path)
    assert path.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
