"""FC -> conv conversion: scores kept, converted weights, geometry, self-check and files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

from cnnserve._checks import window_positions as _window
from cnnserve.convert import (
    ConversionError,
    FullyConvNet,
    Geometry,
    load_fully_convolutional,
    save_fully_convolutional,
    to_fully_convolutional,
)
from cnnserve.model import ConvNet, ModelFileError, load_model, save_model
from cnnserve.modelfile import read_safetensors

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits.safetensors"
DTYPES = [np.float32, np.float64]
REL_TOL = {np.float32: 1e-5, np.float64: 1e-10}


# ---------------------------------------------------------------------------------------------
# Networks for the tests
# ---------------------------------------------------------------------------------------------


def randomise_state(model, seed=0):
    """Non-trivial biases, norm parameters and batchnorm running statistics (in place)."""
    rng = np.random.default_rng(seed + 1000)
    for name, value in model.params.items():
        if name.startswith("b") or name.startswith("beta"):
            value[...] = 0.2 * rng.standard_normal(value.shape)
        elif name.startswith("gamma"):
            value[...] = rng.uniform(0.5, 1.5, value.shape)
    for bn in model.bn_params:
        C = bn["running_mean"].shape[0]
        bn["running_mean"] = (0.5 * rng.standard_normal(C)).astype(model.dtype)
        bn["running_var"] = rng.uniform(0.3, 2.5, C).astype(model.dtype)
    return model


def build(layers, input_shape, num_classes=3, dtype=np.float32, seed=0, **kwargs):
    model = ConvNet(layers, input_shape, num_classes, dtype=dtype, seed=seed, **kwargs)
    return randomise_state(model, seed)


def random_layers(rng, input_shape, *, pad=False, groupnorm=True, spatial=(0, 4), head=(0, 3)):
    """A random valid stack of layer specs (without the classifier) for ``input_shape``.

    Convolutions and pools of random (often non-square) sizes and strides 1 to 3 that tile
    their input exactly, with norms, relus and dropout between them, then affine layers with
    vector norms. ``pad``: convolutions may zero-pad (by 1 or 2). ``groupnorm``: spatial
    group norms may appear (their statistics span the whole feature map).
    """
    C, h, w = input_shape
    layers = []
    for _ in range(int(rng.integers(*spatial))):
        kind = str(rng.choice(["conv", "conv", "max_pool", "avg_pool"]))
        pads = (0, 1, 2) if pad and kind == "conv" else (0,)
        options = [
            (kh, kw, s, p)
            for kh in range(1, 5)
            for kw in range(1, 5)
            for s in (1, 2, 3)
            for p in pads
            if _window(h, kh, s, p)
            and _window(w, kw, s, p)
            and (kind == "conv" or (kh, kw) != (1, 1))
            and p < min(kh, kw)
        ]
        if not options:
            break
        kh, kw, s, p = options[int(rng.integers(len(options)))]
        if kind == "conv":
            C = int(rng.integers(2, 6))
            layers.append({"type": "conv", "filters": C, "size": [kh, kw], "stride": s, "pad": p})
        else:
            layers.append({"type": kind, "size": [kh, kw], "stride": s})
        h, w = _window(h, kh, s, p), _window(w, kw, s, p)
        extra = rng.integers(5)
        if extra == 1:
            layers.append({"type": "spatial_batchnorm"})
        elif extra == 2 and C % 2 == 0 and groupnorm:
            layers.append({"type": "spatial_groupnorm", "groups": 2})
        if rng.random() < 0.7:
            layers.append({"type": "relu"})
        if rng.random() < 0.15:
            layers.append({"type": "dropout", "keep": 0.5})
    for _ in range(int(rng.integers(*head))):
        layers.append({"type": "affine", "units": int(rng.integers(2, 9))})
        for kind in rng.permutation(["batchnorm", "layernorm", "relu", "dropout"]):
            if rng.random() < 0.4:
                layers.append(
                    {"type": "dropout", "keep": 0.8} if kind == "dropout" else {"type": str(kind)}
                )
    return layers


def random_net(seed, dtype=np.float32, *, pad=False, groupnorm=True, min_size=4, max_size=14):
    """A random network on a random (often non-square) input with random weights."""
    rng = np.random.default_rng(seed)
    shape = (
        int(rng.integers(1, 4)),
        int(rng.integers(min_size, max_size + 1)),
        int(rng.integers(min_size, max_size + 1)),
    )
    layers = random_layers(rng, shape, pad=pad, groupnorm=groupnorm)
    return build(layers, shape, int(rng.integers(2, 6)), dtype=dtype, seed=seed)


# Hand-written stacks covering every layer type the conversion handles.
STACKS = {
    # non-square input and kernels, stride 2, spatial batchnorm, avg pool, a full vector head
    "nonsquare_head": (
        [
            {"type": "conv", "filters": 4, "size": [2, 3], "stride": 2},
            {"type": "spatial_batchnorm"},
            {"type": "relu"},
            {"type": "avg_pool", "size": [2, 3], "stride": 1},
            {"type": "affine", "units": 7},
            {"type": "batchnorm"},
            {"type": "relu"},
            {"type": "dropout", "keep": 0.5},
            {"type": "layernorm"},
            {"type": "affine", "units": 5},
        ],
        (2, 10, 13),
    ),
    # overlapping 3x3 pool at stride 2, a stride-3 conv, group norm, dropout on a volume
    "overlap_pool_stride3": (
        [
            {"type": "conv", "filters": 4, "size": 3},
            {"type": "relu"},
            {"type": "max_pool", "size": 3, "stride": 2},
            {"type": "dropout", "keep": 0.6},
            {"type": "conv", "filters": 6, "size": [3, 1], "stride": 3},
            {"type": "spatial_groupnorm", "groups": 3},
            {"type": "relu"},
        ],
        (1, 15, 11),
    ),
    # the first layer is affine: it reads the input volume itself
    "first_affine": (
        [{"type": "affine", "units": 6}, {"type": "relu"}, {"type": "layernorm"}],
        (2, 5, 7),
    ),
    # only the classifier
    "classifier_only": ([], (2, 6, 9)),
    # affine reading a (C, 1, 1) volume, then two more affine layers
    "one_by_one": (
        [
            {"type": "conv", "filters": 5, "size": [4, 3], "stride": 2},
            {"type": "relu"},
            {"type": "affine", "units": 4},
            {"type": "batchnorm"},
            {"type": "affine", "units": 6},
            {"type": "relu"},
        ],
        (3, 4, 3),
    ),
}


def training_inputs(model, n=5, seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *model.input_shape)).astype(model.dtype)


def state_snapshot(model):
    return {name: value.copy() for name, value in model.state_tensors().items()}


# ---------------------------------------------------------------------------------------------
# Scores are kept on training-size inputs
# ---------------------------------------------------------------------------------------------


def assert_same_scores(model, fcn, X):
    expected = model.loss(X).astype(np.float64)  # (N, K), test mode
    got = fcn.forward(X)
    assert got.shape == (X.shape[0], model.num_classes, 1, 1)
    assert got.dtype == model.dtype
    scale = np.max(np.abs(expected))
    tol = REL_TOL[np.dtype(model.dtype).type] * scale
    assert np.max(np.abs(got[:, :, 0, 0] - expected)) <= tol
    assert np.array_equal(np.argmax(got[:, :, 0, 0], axis=1), np.argmax(expected, axis=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(STACKS))
def test_conversion_keeps_scores_of_hand_written_stacks(name, dtype):
    layers, shape = STACKS[name]
    model = build(layers, shape, 4, dtype=dtype, seed=7)
    fcn = to_fully_convolutional(model)
    assert isinstance(fcn, FullyConvNet)
    assert fcn.dtype == np.dtype(dtype)
    assert all(p.dtype == np.dtype(dtype) for p in fcn.params.values())
    assert_same_scores(model, fcn, training_inputs(model))
    check = fcn.check
    assert check["inputs"] == 8  # the default check_size
    assert check["passed"] is True
    assert 0 <= check["max_abs_diff"] <= check["tolerance"]
    assert check["tolerance"] == pytest.approx(REL_TOL[dtype] * check["score_scale"])
    assert check["score_scale"] > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(20))
def test_conversion_keeps_scores_of_random_networks(seed, dtype):
    model = random_net(seed, dtype, pad=seed % 3 == 0)
    X = training_inputs(model, n=6, seed=seed)
    fcn = to_fully_convolutional(model, check_inputs=X)
    assert fcn.check["inputs"] == 6 and fcn.check["passed"] is True
    assert fcn.check["max_abs_diff"] <= fcn.check["tolerance"]
    assert_same_scores(model, fcn, training_inputs(model, n=4, seed=seed + 50))
    # one cell per window: a training-size input gives one cell, a larger one a map
    g = fcn.geometry
    C, th, tw = model.input_shape
    big = np.random.default_rng(seed).standard_normal((2, C, th + 2 * g.stride + 1, tw + g.stride))
    rows = (2 * g.stride + 1) // g.stride + 1  # 3, or 4 at stride 1
    assert fcn.forward(big.astype(dtype)).shape == (2, model.num_classes, rows, 2)


def test_random_networks_cover_the_layer_types():
    """The random stacks above do exercise every layer kind (a guard on the generator)."""
    kinds = set()
    for seed in range(20):
        model = random_net(seed, pad=seed % 3 == 0)
        kinds.update(spec["type"] for spec in model.layers)
        kinds.update("pad" for spec in model.layers if spec.get("pad"))
        kinds.update("stride3" for spec in model.layers if spec.get("stride") == 3)
    assert kinds >= {
        "conv",
        "max_pool",
        "avg_pool",
        "relu",
        "dropout",
        "spatial_batchnorm",
        "spatial_groupnorm",
        "affine",
        "batchnorm",
        "layernorm",
        "pad",
        "stride3",
    }


def test_self_check_uses_the_seed_and_check_size():
    model = build(*STACKS["nonsquare_head"])
    a = to_fully_convolutional(model, check_size=3, seed=5)
    b = to_fully_convolutional(model, check_size=3, seed=5)
    c = to_fully_convolutional(model, check_size=3, seed=6)
    assert a.check["inputs"] == 3
    assert a.check["score_scale"] == b.check["score_scale"]
    assert a.check["score_scale"] != c.check["score_scale"]
    with pytest.raises(ValueError, match="check_size"):
        to_fully_convolutional(model, check_size=0)
    with pytest.raises(ValueError, match="shape"):
        to_fully_convolutional(model, check_inputs=np.zeros((2, 2, 10, 12)))


def test_digits_model_converts():
    model = load_model(DIGITS)
    fcn = to_fully_convolutional(model)
    assert fcn.check["passed"] is True
    assert fcn.class_names == model.class_names
    assert fcn.normalization == model.normalization
    assert fcn.geometry == Geometry(2, (8, 8), (8, 8), (0, 0), True)
    X = model.preprocess(np.random.default_rng(0).random((6, 1, 8, 8)))
    assert_same_scores(model, fcn, X)
    assert [layer.kind for layer in fcn.layers][-3:] == ["conv", "relu", "conv"]  # dropout gone


# ---------------------------------------------------------------------------------------------
# Converted weights
# ---------------------------------------------------------------------------------------------


def test_first_affine_becomes_a_window_conv_in_nchw_order():
    model = build(*STACKS["nonsquare_head"], num_classes=4)
    fcn = to_fully_convolutional(model)
    # conv W1 (4, 2, 2, 3); the avg pool leaves (4, 4, 4); affine W2 (64, 7) -> (7, 4, 4, 4)
    D_U = model.params["W2"]
    assert D_U.shape == (64, 7)
    conv = fcn.params["W2"]
    assert conv.shape == (7, 4, 4, 4)
    Hf, Wf = 4, 4  # W2 reads a (4, 4, 4) volume
    for u, c, y, x in [(0, 0, 0, 0), (6, 3, 3, 3), (2, 1, 3, 0), (5, 2, 0, 2), (3, 3, 1, 2)]:
        assert conv[u, c, y, x] == D_U[c * Hf * Wf + y * Wf + x, u]
    np.testing.assert_array_equal(conv.reshape(7, -1).T, D_U)
    # later affine layers are 1x1 convs on D channels: (U, D, 1, 1)
    assert fcn.params["W3"].shape == (5, 7, 1, 1)
    assert fcn.params["W3"][4, 6, 0, 0] == model.params["W3"][6, 4]
    assert fcn.params["W4"].shape == (4, 5, 1, 1)
    np.testing.assert_array_equal(fcn.params["W4"][:, :, 0, 0], model.params["W4"].T)
    # conv weights, biases and norm tensors unchanged
    np.testing.assert_array_equal(fcn.params["W1"], model.params["W1"])
    for name in ("b1", "b2", "b3", "b4", "gamma1", "beta1", "gamma2", "beta2", "gamma3"):
        np.testing.assert_array_equal(fcn.params[name], model.params[name])
    np.testing.assert_array_equal(fcn.params["running_var1"], model.bn_params[0]["running_var"])
    np.testing.assert_array_equal(fcn.params["running_mean2"], model.bn_params[1]["running_mean"])
    # the converted layers
    kinds = [(layer.kind, layer.converted_from) for layer in fcn.layers]
    assert kinds == [
        ("conv", ""),
        ("spatial_batchnorm", ""),
        ("relu", ""),
        ("avg_pool", ""),
        ("conv", "affine 7"),
        ("spatial_batchnorm", "batchnorm"),
        ("relu", ""),
        ("channel_layernorm", "layernorm"),
        ("conv", "affine 5"),
        ("conv", "affine 4"),
    ]
    assert fcn.layers[4].spec["size"] == [4, 4]
    assert fcn.layers[8].spec["size"] == [1, 1]


def test_first_layer_affine_reads_the_input_volume():
    model = build(*STACKS["first_affine"])
    fcn = to_fully_convolutional(model)
    assert fcn.params["W1"].shape == (6, 2, 5, 7)
    assert fcn.params["W1"][3, 1, 4, 2] == model.params["W1"][1 * 35 + 4 * 7 + 2, 3]
    assert fcn.geometry == Geometry(1, (5, 7), (5, 7), (0, 0), True)
    only = build(*STACKS["classifier_only"])
    fcn = to_fully_convolutional(only)
    assert [layer.kind for layer in fcn.layers] == ["conv"]
    assert fcn.params["W1"].shape == (3, 2, 6, 9)
    assert fcn.geometry == Geometry(1, (6, 9), (6, 9), (0, 0), True)


def test_model_is_not_modified_and_params_are_copies():
    model = build(*STACKS["nonsquare_head"])
    before = state_snapshot(model)
    fcn = to_fully_convolutional(model)
    after = model.state_tensors()
    assert set(after) == set(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype and after[name].shape == value.shape
        np.testing.assert_array_equal(after[name], value)
    for name, value in fcn.params.items():
        for original in after.values():
            assert not np.shares_memory(value, original), name
    # training the model further does not change the converted network
    X = training_inputs(model, n=3)
    scores = fcn.forward(X).copy()
    for value in model.params.values():
        value += 1.0
    np.testing.assert_array_equal(fcn.forward(X), scores)


def test_a_non_convnet_is_refused():
    with pytest.raises(TypeError, match="model must be a ConvNet, got dict"):
        to_fully_convolutional({"layers": []})
    fcn = to_fully_convolutional(build(*STACKS["classifier_only"]))
    with pytest.raises(TypeError, match="ConvNet, got FullyConvNet"):
        to_fully_convolutional(fcn)


def test_a_failing_self_check_raises(monkeypatch):
    model = build(*STACKS["overlap_pool_stride3"])
    original = FullyConvNet.forward

    def perturbed(self, x):
        out = original(self, x)
        return out + 1e-3 * np.max(np.abs(out))

    monkeypatch.setattr(FullyConvNet, "forward", perturbed)
    with pytest.raises(ConversionError, match="differ from the original's"):
        to_fully_convolutional(model)

    monkeypatch.setattr(FullyConvNet, "forward", lambda self, x: original(self, x) * np.nan)
    with pytest.raises(ConversionError, match="differ"):
        to_fully_convolutional(model)

    monkeypatch.setattr(FullyConvNet, "forward", lambda self, x: original(self, x)[:, :2])
    with pytest.raises(ConversionError, match="shape"):
        to_fully_convolutional(model)
    assert issubclass(ConversionError, ValueError)


def test_self_check_tolerance_is_relative_to_the_score_scale(monkeypatch):
    """A difference just under the tolerance passes, just over it fails (float64)."""
    model = build(*STACKS["nonsquare_head"], dtype=np.float64)
    scale = to_fully_convolutional(model).check["score_scale"]
    original = FullyConvNet.forward
    for factor, ok in [(0.5e-10, True), (3e-10, False)]:
        monkeypatch.setattr(
            FullyConvNet, "forward", lambda self, x, f=factor: original(self, x) + f * scale
        )
        if ok:
            check = to_fully_convolutional(model).check
            assert check["max_abs_diff"] == pytest.approx(factor * scale, rel=0.1)
        else:
            with pytest.raises(ConversionError):
                to_fully_convolutional(model)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------

GEOMETRY_CASES = [
    # (layers, input_shape, stride, receptive field, offset)
    ("digits-like", None, None, 2, (8, 8), (0, 0)),
    # conv 5x3 s2 -> (6, 6); pool 3 s3 -> (2, 2); affine 2x2 at jump 6
    (
        "strided",
        [
            {"type": "conv", "filters": 2, "size": [5, 3], "stride": 2},
            {"type": "max_pool", "size": 3, "stride": 3},
        ],
        (1, 15, 13),
        6,
        (15, 13),
        (0, 0),
    ),
    # conv 3 p1 -> 8x8; pool 2 s2 -> 4x4; conv 3 p1 -> 4x4; affine 4x4 at jump 2
    # R = 1 + 2 + 1 + 2*2 + 3*2 = 14, offset = 1 + 1*2 = 3
    (
        "padded",
        [
            {"type": "conv", "filters": 3, "size": 3, "pad": 1},
            {"type": "relu"},
            {"type": "max_pool", "size": 2, "stride": 2},
            {"type": "conv", "filters": 3, "size": 3, "pad": 1},
        ],
        (1, 8, 8),
        2,
        (14, 14),
        (3, 3),
    ),
    # conv 5x3 s2 p2 on 9x11 -> (5, 7); affine 5x7 at jump 2: R = (5 + 8, 3 + 12), P = 2
    (
        "padded_strided",
        [{"type": "conv", "filters": 2, "size": [5, 3], "stride": 2, "pad": 2}],
        (1, 9, 11),
        2,
        (13, 15),
        (2, 2),
    ),
]


@pytest.mark.parametrize(("name", "layers", "shape", "stride", "field", "offset"), GEOMETRY_CASES)
def test_geometry_by_hand(name, layers, shape, stride, field, offset):
    if layers is None:
        layers, shape = (
            [
                {"type": "conv", "filters": 2, "size": 3},
                {"type": "conv", "filters": 2, "size": 3},
                {"type": "max_pool", "size": 2, "stride": 2},
                {"type": "affine", "units": 4},
            ],
            (1, 8, 8),
        )
    g = to_fully_convolutional(build(layers, shape)).geometry
    assert g.stride == stride
    assert g.window == shape[1:]
    assert g.receptive_field == field
    assert g.offset == offset
    assert g.exact is (offset == (0, 0))
    if not g.exact:
        assert g.receptive_field[0] > g.window[0] and g.receptive_field[1] > g.window[1]
        assert "approximate" in g.describe()
    else:
        assert g.receptive_field == g.window
        assert "exact" in g.describe()
    assert g.to_dict() == {
        "stride": stride,
        "window": list(shape[1:]),
        "receptive_field": list(field),
        "offset": list(offset),
        "exact": offset == (0, 0),
    }
    json.dumps(g.to_dict())


def test_geometry_map_size_covered_margins_and_boxes():
    g = Geometry(stride=4, window=(8, 12), receptive_field=(8, 12), offset=(0, 0), exact=True)
    # H = 21: (21 - 8) // 4 + 1 = 4 rows, covering 8 + 12 = 20, margin 1
    # W = 30: (30 - 12) // 4 + 1 = 5 cols, covering 12 + 16 = 28, margin 2
    assert g.map_size(21, 30) == (4, 5)
    assert g.covered(21, 30) == (20, 28)
    assert g.margins(21, 30) == (1, 2)
    assert g.map_size(8, 12) == (1, 1)
    assert g.margins(8, 12) == (0, 0)
    assert g.map_size(11, 15) == (1, 1) and g.margins(11, 15) == (3, 3)
    assert g.box(0, 0) == (0, 0, 12, 8)
    assert g.box(2, 3) == (12, 8, 24, 16)  # x0 = 4*3, y0 = 4*2
    boxes = g.boxes(4, 5)
    assert boxes.shape == (4, 5, 4) and boxes.dtype == np.int64
    for i in range(4):
        for j in range(5):
            assert tuple(boxes[i, j]) == g.box(i, j)
    assert boxes[-1, -1, 3] == 20 and boxes[-1, -1, 2] == 28  # the covered area
    fine = g.finer(2)
    assert fine == Geometry(2, (8, 12), (8, 12), (0, 0), True)
    assert fine.map_size(21, 30) == (7, 10)
    assert g.finer(4).stride == 1 and g.finer(1) == g


@pytest.mark.parametrize(
    ("height", "width"), [(7, 12), (8, 11), (1, 1), (7, 100)], ids=["short", "narrow", "1px", "h"]
)
def test_images_smaller_than_the_window_raise(height, width):
    g = Geometry(4, (8, 12), (8, 12), (0, 0), True)
    message = f"{height}x{width} pixels .* smaller than the network's 8x12 window"
    for method in (g.map_size, g.covered, g.margins):
        with pytest.raises(ValueError, match=message):
            method(height, width)


def test_geometry_argument_errors():
    g = Geometry(4, (8, 8), (8, 8), (0, 0), True)
    with pytest.raises(ValueError, match="stride_divisor must divide .* stride 4, got 3"):
        g.finer(3)
    with pytest.raises(ValueError, match="stride_divisor must divide"):
        g.finer(8)
    with pytest.raises(ValueError, match="stride_divisor"):
        g.finer(0)
    with pytest.raises(TypeError, match="stride_divisor"):
        g.finer(2.0)
    with pytest.raises(ValueError, match="height"):
        g.map_size(0, 10)
    with pytest.raises(TypeError, match="width"):
        g.map_size(10, 10.5)
    with pytest.raises(ValueError, match="i must be >= 0"):
        g.box(-1, 0)
    with pytest.raises(ValueError, match="rows"):
        g.boxes(0, 3)


@given(
    stride=st.sampled_from([1, 2, 3, 4, 6, 8]),
    th=st.integers(1, 20),
    tw=st.integers(1, 20),
    extra_h=st.integers(0, 60),
    extra_w=st.integers(0, 60),
)
def test_geometry_properties(stride, th, tw, extra_h, extra_w):
    g = Geometry(stride, (th, tw), (th, tw), (0, 0), True)
    H, W = th + extra_h, tw + extra_w
    rows, cols = g.map_size(H, W)
    hc, wc = g.covered(H, W)
    bottom, right = g.margins(H, W)
    assert (hc + bottom, wc + right) == (H, W)
    assert 0 <= bottom < stride and 0 <= right < stride
    # every window inside the image, one more would not fit
    boxes = g.boxes(rows, cols)
    assert boxes[..., 2].max() == wc <= W and boxes[..., 3].max() == hc <= H
    assert boxes[0, -1, 2] + stride > W and boxes[-1, 0, 3] + stride > H
    assert np.all(boxes[..., 2] - boxes[..., 0] == tw) and np.all(
        boxes[..., 3] - boxes[..., 1] == th
    )
    for d in range(1, stride + 1):
        if stride % d == 0:
            fine = g.finer(d)
            assert fine.map_size(H, W) == (
                (H - th) // (stride // d) + 1,
                (W - tw) // (stride // d) + 1,
            )


# ---------------------------------------------------------------------------------------------
# forward input checks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_fcn():
    return to_fully_convolutional(build(*STACKS["nonsquare_head"]))  # (2, 10, 13), S = 2


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        ([[[[0.0]]]], TypeError, "x must be a numpy.ndarray, got list"),
        (np.zeros((2, 10, 13)), ValueError, r"x must have shape \(N, 2, H, W\), got \(2, 10, 13\)"),
        (np.zeros((1, 3, 10, 13)), ValueError, r"x must have shape \(N, 2, H, W\)"),
        (np.zeros((1, 1, 2, 10, 13)), ValueError, r"x must have shape \(N, 2, H, W\)"),
        (np.zeros((0, 2, 10, 13)), ValueError, "at least one image, got N = 0"),
        (np.zeros((1, 2, 10, 13), dtype=np.int64), TypeError, "float array"),
        (np.zeros((1, 2, 10, 13), dtype=bool), TypeError, "float array"),
        (np.zeros((1, 2, 9, 13)), ValueError, "9x13 pixels .* smaller than .* 10x13 window"),
        (np.zeros((1, 2, 30, 12)), ValueError, "smaller than"),
    ],
)
def test_forward_input_errors(small_fcn, x, error, message):
    with pytest.raises(error, match=message):
        small_fcn.forward(x)


def test_forward_drops_margins_converts_dtype_and_keeps_its_input(small_fcn):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 15, 18)).astype(np.float32)  # margins (1, 1) at S = 2
    kept = x.copy()
    out = small_fcn.forward(x)
    assert out.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(x, kept)
    np.testing.assert_array_equal(small_fcn.forward(x[:, :, :14, :17]), out)
    np.testing.assert_array_equal(small_fcn.forward(x.astype(np.float64)), out)
    assert small_fcn.forward(x.astype(np.float64)).dtype == np.float32


@pytest.mark.parametrize(
    "front",
    [
        [],
        [{"type": "dropout", "keep": 0.5}],
        [{"type": "max_pool", "size": 1, "stride": 1}],
        [{"type": "avg_pool", "size": 1, "stride": 1}],
    ],
    ids=["relu", "dropout_relu", "max_pool_1x1", "avg_pool_1x1"],
)
def test_forward_does_not_modify_its_input_with_a_leading_relu(front):
    """A relu at the front must not write into the caller's array (in-place relu)."""
    layers = [*front, {"type": "relu"}, {"type": "conv", "filters": 2, "size": 3}]
    model = build(layers, (1, 6, 6))
    fcn = to_fully_convolutional(model)
    rng = np.random.default_rng(1)
    for shape in [(1, 1, 6, 6), (1, 1, 7, 6), (1, 1, 6, 7), (2, 1, 9, 9)]:
        x = rng.standard_normal(shape).astype(np.float32)
        kept = x.copy()
        fcn.forward(x)
        np.testing.assert_array_equal(x, kept)


def test_describe_summary_repr_and_to_dict(small_fcn):
    text = small_fcn.summary()
    assert "affine 7" in text and "channel_layernorm" in text
    assert "FullyConvNet(" in repr(small_fcn) and "stride=2" in repr(small_fcn)
    d = small_fcn.to_dict()
    json.dumps(d)
    assert d["geometry"] == small_fcn.geometry.to_dict()
    assert d["check"]["passed"] is True
    assert d["input_shape"] == [2, 10, 13]
    desc = small_fcn.geometry.describe()
    assert "total stride S: 2" in desc and "window T: 10x13" in desc


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def rewrite(src, dst, *, tensors=None, meta=None, metadata=None):
    """Copy a converted file with its tensors / parsed ``cnnserve`` metadata edited."""
    raw_meta, raw_tensors = read_safetensors(src)
    raw_meta = dict(raw_meta)
    if tensors is not None:
        raw_tensors = tensors(dict(raw_tensors))
    if meta is not None:
        parsed = json.loads(raw_meta["cnnserve"])
        meta(parsed)
        raw_meta["cnnserve"] = json.dumps(parsed)
    if metadata is not None:
        metadata(raw_meta)
    Path(dst).write_bytes(save_safetensors(raw_tensors, metadata=raw_meta))
    return dst


@pytest.fixture
def converted_file(tmp_path):
    model = build(
        *STACKS["nonsquare_head"],
        num_classes=3,
        class_names=["cat", "dog", "eel"],
        normalization={"mean": [0.4, 0.5], "std": [0.2, 0.3]},
    )
    fcn = to_fully_convolutional(model)
    fcn.training = {"epochs": 3}
    path = save_fully_convolutional(fcn, tmp_path / "net.fcn.safetensors")
    return fcn, path


def test_save_load_round_trip(converted_file):
    fcn, path = converted_file
    assert path.is_file()
    back = load_fully_convolutional(str(path))
    assert back.check == fcn.check
    assert back.geometry == fcn.geometry
    assert back.class_names == ("cat", "dog", "eel")
    assert back.normalization == fcn.normalization
    assert back.config == fcn.config
    assert back.training == {"epochs": 3}
    assert back.dtype == fcn.dtype
    assert set(back.params) == set(fcn.params)
    x = np.random.default_rng(0).standard_normal((2, 2, 17, 20)).astype(np.float32)
    np.testing.assert_array_equal(back.forward(x), fcn.forward(x))
    x01 = np.random.default_rng(1).random((2, 12, 15))
    np.testing.assert_array_equal(back.preprocess(x01), fcn.preprocess(x01))


def test_load_a_trained_model_file_converts_it(tmp_path):
    model = build(*STACKS["overlap_pool_stride3"], dtype=np.float64)
    path = save_model(model, tmp_path / "trained.safetensors")
    fcn = load_fully_convolutional(path)
    assert fcn.check["passed"] is True
    assert fcn.dtype == np.float64
    direct = to_fully_convolutional(model)
    x = np.random.default_rng(0).standard_normal((1, 1, 21, 17))
    np.testing.assert_array_equal(fcn.forward(x), direct.forward(x))
    digits = load_fully_convolutional(DIGITS)
    assert digits.geometry.stride == 2 and digits.check["passed"] is True


def test_load_model_refuses_a_converted_file(converted_file):
    _, path = converted_file
    with pytest.raises(ModelFileError, match=f"{path}.* is a converted"):
        load_model(path)


@pytest.mark.parametrize("how", ["garbage", "truncated", "half_header", "empty"])
def test_corrupt_converted_files_raise(converted_file, tmp_path, how):
    _, path = converted_file
    data = path.read_bytes()
    bad = tmp_path / f"{how}.safetensors"
    bad.write_bytes(
        {
            "garbage": b"\x00\x01not a safetensors file at all" * 10,
            "truncated": data[: len(data) - 40],
            "half_header": data[:20],
            "empty": b"",
        }[how]
    )
    with pytest.raises(ModelFileError, match=str(bad)):
        load_fully_convolutional(bad)


def test_a_tensor_of_the_wrong_shape_raises(converted_file, tmp_path):
    _, path = converted_file

    def as_trained(tensors):  # the affine weight in its (D, U) shape
        tensors["W2"] = np.ascontiguousarray(tensors["W2"].reshape(7, -1).T)
        return tensors

    bad = rewrite(path, tmp_path / "shape.safetensors", tensors=as_trained)
    with pytest.raises(ModelFileError, match=rf"{bad}.*'W2' has shape \(64, 7\).*\(7, 4, 4, 4\)"):
        load_fully_convolutional(bad)

    def drop(tensors):
        del tensors["running_var2"]
        return tensors

    bad = rewrite(path, tmp_path / "missing.safetensors", tensors=drop)
    with pytest.raises(ModelFileError, match=rf"{bad} is missing tensor 'running_var2'"):
        load_fully_convolutional(bad)

    def wrong_dtype(tensors):
        tensors["b1"] = tensors["b1"].astype(np.float64)
        return tensors

    bad = rewrite(path, tmp_path / "dtype.safetensors", tensors=wrong_dtype)
    with pytest.raises(ModelFileError, match=rf"{bad}.*'b1' has dtype float64"):
        load_fully_convolutional(bad)

    def not_finite(tensors):
        tensors["W3"] = tensors["W3"].copy()
        tensors["W3"][0, 0, 0, 0] = np.nan
        return tensors

    bad = rewrite(path, tmp_path / "nan.safetensors", tensors=not_finite)
    with pytest.raises(ModelFileError, match=rf"{bad}: tensor 'W3' has NaN"):
        load_fully_convolutional(bad)

    def extra(tensors):
        tensors["W9"] = np.zeros(3, np.float32)
        return tensors

    bad = rewrite(path, tmp_path / "extra.safetensors", tensors=extra)
    with pytest.raises(ModelFileError, match=rf"{bad} holds tensor\(s\) 'W9'"):
        load_fully_convolutional(bad)


def test_a_geometry_that_does_not_match_raises(converted_file, tmp_path):
    _, path = converted_file

    def lie(meta):
        meta["conversion"]["geometry"]["stride"] = 4

    bad = rewrite(path, tmp_path / "geometry.safetensors", meta=lie)
    with pytest.raises(ModelFileError, match=f"{bad}.*geometry"):
        load_fully_convolutional(bad)

    def shift(meta):
        meta["conversion"]["geometry"]["offset"] = [1, 1]

    bad = rewrite(path, tmp_path / "offset.safetensors", meta=shift)
    with pytest.raises(ModelFileError, match=f"{bad}.*geometry"):
        load_fully_convolutional(bad)


def test_bad_metadata_raises(converted_file, tmp_path):
    _, path = converted_file
    cases = {
        "json": lambda m: m.update(cnnserve="{not json"),
        "no_meta": lambda m: m.pop("cnnserve"),
        "version": lambda m: m.update(format_version="99"),
        "other": lambda m: m.update(format="something.else"),
    }
    for name, edit in cases.items():
        bad = rewrite(path, tmp_path / f"{name}.safetensors", metadata=edit)
        with pytest.raises(ModelFileError, match=str(bad)):
            load_fully_convolutional(bad)

    def no_arch(meta):
        del meta["architecture"]

    def bad_layer(meta):
        meta["architecture"]["layers"][0]["type"] = "warp"

    def bad_classes(meta):
        meta["class_names"] = ["a"]

    for name, edit in {"arch": no_arch, "layer": bad_layer, "classes": bad_classes}.items():
        bad = rewrite(path, tmp_path / f"{name}.safetensors", meta=edit)
        with pytest.raises(ModelFileError, match=f"{bad} has invalid metadata"):
            load_fully_convolutional(bad)


def test_missing_file_and_directory_raise(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelFileError, match=f"{missing} does not exist"):
        load_fully_convolutional(missing)
    with pytest.raises(ModelFileError, match="is a directory"):
        load_fully_convolutional(tmp_path)
    fcn = to_fully_convolutional(build(*STACKS["classifier_only"]))
    with pytest.raises(ModelFileError, match="does not exist"):
        save_fully_convolutional(fcn, tmp_path / "no" / "dir.safetensors")
    with pytest.raises(TypeError, match="FullyConvNet"):
        save_fully_convolutional(build(*STACKS["classifier_only"]), tmp_path / "x.safetensors")


def test_saved_file_is_json_clean_with_conversion_record(converted_file):
    fcn, path = converted_file
    metadata, tensors = read_safetensors(path)
    assert metadata["format"] == "cnnserve.fcn"
    meta = json.loads(metadata["cnnserve"])
    assert meta["conversion"]["geometry"] == fcn.geometry.to_dict()
    assert meta["conversion"]["check"] == fcn.check
    assert tensors["W2"].shape == (7, 4, 4, 4)
    assert all(math.isfinite(v) for v in tensors["b2"])


def test_converted_params_are_frozen():
    """Batchnorm is folded into the conv before it when the network is built: the weights
    must not change afterwards, so neither the mapping nor the arrays can be written."""
    model = build(STACKS["nonsquare_head"][0], STACKS["nonsquare_head"][1], 3)
    fcn = to_fully_convolutional(model)
    with pytest.raises(TypeError):
        fcn.params["W1"] = np.zeros_like(fcn.params["W1"])
    with pytest.raises(ValueError, match="read-only"):
        fcn.params["W1"][...] = 0


def test_check_inputs_must_be_finite():
    model = build([], (1, 4, 4), 2)
    with pytest.raises(ValueError, match="check_inputs must be finite"):
        to_fully_convolutional(model, check_inputs=np.full((2, 1, 4, 4), np.nan))


@pytest.mark.parametrize(
    "check, message",
    [
        ({"passed": True}, "invalid self-check record"),
        ({"inputs": 8, "max_abs_diff": "x", "score_scale": 1.0, "tolerance": 1e-5, "passed": True},
         "invalid self-check record"),
        ({"inputs": 8, "max_abs_diff": 0.5, "score_scale": 1.0, "tolerance": 1e-5, "passed": False},
         "records a failed self-check"),
        ({"inputs": 8, "max_abs_diff": 0.5, "score_scale": 1.0, "tolerance": 1e-5, "passed": True},
         "records a failed self-check"),
    ],
)  # fmt: skip
def test_a_converted_file_with_a_bad_self_check_record_is_refused(check, message, tmp_path):
    model = build([{"type": "conv", "filters": 2, "size": 3}], (1, 5, 5), 2)
    path = tmp_path / "fcn.safetensors"
    save_fully_convolutional(to_fully_convolutional(model), path)
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    meta = json.loads(metadata["cnnserve"])
    meta["conversion"]["check"] = check
    metadata["cnnserve"] = json.dumps(meta)
    path.write_bytes(save_safetensors(tensors, metadata=metadata))
    with pytest.raises(ModelFileError, match=message):
        load_fully_convolutional(path)


def test_a_relu_before_a_max_pool_runs_after_it_with_identical_scores():
    """The converted network, like ConvNet.loss, pools before the ReLU that precedes a max
    pool (a quarter of the values): the scores are bit for bit those of the spec order."""
    layers = [
        {"type": "conv", "filters": 3, "size": 3},
        {"type": "relu"},
        {"type": "max_pool", "size": 3, "stride": 2},  # overlapping windows
        {"type": "conv", "filters": 4, "size": 2},
        {"type": "relu"},
        {"type": "max_pool", "size": 2},
    ]
    for dtype in (np.float32, np.float64):
        fcn = to_fully_convolutional(build(layers, (1, 13, 13), 3, dtype=dtype))
        assert [fcn.layers[k].kind for k in fcn._order][:6] == [
            "conv", "max_pool", "relu", "conv", "max_pool", "relu"
        ]  # fmt: skip
        x = np.random.default_rng(0).standard_normal((3, 1, 27, 19)).astype(dtype)
        x[0, 0, :8, :8] = -1.0  # windows with no positive value
        swapped = fcn.forward(x)
        fcn._order = list(range(len(fcn.layers)))
        np.testing.assert_array_equal(fcn.forward(x), swapped)
