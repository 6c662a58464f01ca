"""Dense score maps: exactness against a crop loop, finer strides, scales, tiles, results."""

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cnnserve import dense
from cnnserve.convert import (
    FullyConvNet,
    save_fully_convolutional,
    to_fully_convolutional,
)
from cnnserve.dense import MultiScaleMap, ScoreMap, score_map, softmax_cells
from cnnserve.images import as_image, resize
from cnnserve.model import load_model, save_model
from tests.test_convert import build, random_net

DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits.safetensors"
REL_TOL = {np.float32: 1e-5, np.float64: 1e-10}


def crop_loop(model, image, stride):
    """The oracle: the ORIGINAL network on every window's crop of the preprocessed image.

    ``image`` is (C, H, W) pixels in [0, 1]; windows at ``stride`` from the top-left corner.
    Returns (K, rows, cols) scores.
    """
    x = model.preprocess(as_image(image, model.input_shape[0]))  # (C, H, W)
    _, H, W = x.shape
    _, th, tw = model.input_shape
    rows, cols = (H - th) // stride + 1, (W - tw) // stride + 1
    crops = np.stack(
        [
            x[:, stride * i : stride * i + th, stride * j : stride * j + tw]
            for i in range(rows)
            for j in range(cols)
        ]
    )
    return model.scores(crops).reshape(rows, cols, -1).transpose(2, 0, 1)  # (K, rows, cols)


def assert_close_to(got, expected, dtype):
    assert got.shape == expected.shape
    scale = float(np.max(np.abs(expected)))
    assert np.max(np.abs(got.astype(np.float64) - expected)) <= REL_TOL[dtype] * scale


def pixels(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.fixture(scope="module")
def digits_model():
    model = load_model(DIGITS)
    return model, to_fully_convolutional(model)


# A padding-free stride-4 network: conv 4x4 s2 on 12x12 -> 5x5, overlapping pool 3 s2 -> 2x2.
STRIDE4 = [
    {"type": "conv", "filters": 4, "size": 4, "stride": 2},
    {"type": "spatial_batchnorm"},
    {"type": "relu"},
    {"type": "max_pool", "size": 3, "stride": 2},
    {"type": "affine", "units": 6},
    {"type": "relu"},
]
# Zero padding inside: conv 3 p1 -> 8x8, pool 2 -> 4x4, conv 3 p1 -> 4x4. S = 2, R = 14, P = 3.
PADDED = [
    {"type": "conv", "filters": 3, "size": 3, "pad": 1},
    {"type": "relu"},
    {"type": "max_pool", "size": 2, "stride": 2},
    {"type": "conv", "filters": 3, "size": 3, "pad": 1},
    {"type": "relu"},
]


@pytest.fixture(scope="module")
def stride4():
    model = build(STRIDE4, (1, 12, 12), 4, dtype=np.float64, seed=4)
    return model, to_fully_convolutional(model)


@pytest.fixture(scope="module")
def padded():
    model = build(PADDED, (1, 8, 8), 3, dtype=np.float64, seed=2)
    return model, to_fully_convolutional(model)


# ---------------------------------------------------------------------------------------------
# Exactness: one pass equals the crop loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(14))
def test_dense_map_equals_the_crop_loop(seed, dtype):
    model = random_net(seed, dtype)
    fcn = to_fully_convolutional(model)
    g = fcn.geometry
    assert g.exact and g.offset == (0, 0) and g.receptive_field == g.window
    rng = np.random.default_rng(seed)
    # sizes where the windows tile the image and sizes that leave margins
    H = g.window[0] + int(rng.integers(0, 3 * g.stride + 2))
    W = g.window[1] + int(rng.integers(0, 3 * g.stride + 2))
    image = pixels((model.input_shape[0], H, W), seed)
    result = score_map(fcn, image)
    assert isinstance(result, ScoreMap)
    rows, cols = g.map_size(H, W)
    assert result.shape == (rows, cols)
    assert result.logits.shape == (model.num_classes, rows, cols)
    assert result.logits.dtype == np.dtype(dtype)
    assert_close_to(result.logits, crop_loop(model, image, g.stride), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("H", "W"), [(12, 12), (13, 12), (20, 27), (23, 30), (12, 40)])
def test_stride4_map_equals_the_crop_loop_with_margins(H, W, dtype):
    model = build(STRIDE4, (1, 12, 12), 4, dtype=dtype, seed=4)
    image = pixels((H, W), H * W)
    result = score_map(model, image)  # a ConvNet is converted on the call
    assert result.geometry.stride == 4
    margins = ((H - 12) % 4, (W - 12) % 4)
    assert tuple(result.geometry_dict()["margins"]) == margins
    assert_close_to(result.logits, crop_loop(model, image, 4), dtype)


def test_digits_model_equals_the_crop_loop(digits_model):
    model, fcn = digits_model
    image = pixels((21, 30), 5)  # 7 x 12 cells, margins (1, 0)
    result = score_map(fcn, image)
    assert result.shape == (7, 12)
    assert result.geometry_dict()["margins"] == [1, 0]
    assert_close_to(result.logits, crop_loop(model, image, 2), np.float32)
    u8 = (image * 255).round().astype(np.uint8)
    assert_close_to(
        score_map(fcn, u8).logits, crop_loop(model, u8 / np.float32(255), 2), np.float32
    )


GROUPNORM = [
    {"type": "conv", "filters": 2, "size": 3},
    {"type": "spatial_groupnorm", "groups": 1},
    {"type": "relu"},
    {"type": "conv", "filters": 3, "size": 2, "stride": 2, "pad": 1},
    {"type": "relu"},
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_groupnorm_network_runs_window_by_window_and_is_exact(dtype):
    """Group norm normalises over the whole feature map, so from it on the converted network
    runs on each window's patch: cells still equal the crop loop (padding after the group
    norm included, since each window pads its own patch)."""
    model = build(GROUPNORM, (1, 6, 6), 2, dtype=dtype)
    fcn = to_fully_convolutional(model)
    assert fcn.per_window_from == 1
    g = fcn.geometry
    assert (g.stride, g.receptive_field, g.offset, g.exact) == (2, (6, 6), (0, 0), True)
    image = pixels((1, 13, 16), 7)
    result = score_map(fcn, image)
    assert result.shape == (4, 6)
    assert_close_to(result.logits, crop_loop(model, image, 2), dtype)
    finer = score_map(fcn, image, stride_divisor=2)
    assert_close_to(finer.logits, crop_loop(model, image, 1), dtype)


def test_a_groupnorm_network_tiles_stitch():
    model = build(GROUPNORM, (1, 6, 6), 2, dtype=np.float64)
    fcn = to_fully_convolutional(model)
    image = pixels((1, 30, 27), 7)
    whole = score_map(fcn, image).logits
    np.testing.assert_allclose(score_map(fcn, image, tile_memory=1).logits, whole, atol=1e-12)
    fcn._PATCH_VALUES = 1  # one row of windows at a time in the per-window layers
    np.testing.assert_allclose(score_map(fcn, image).logits, whole, atol=1e-12)


def test_a_padded_network_is_close_but_not_exact(padded):
    model, fcn = padded
    g = fcn.geometry
    assert g.exact is False
    assert g.offset == (3, 3) and g.receptive_field == (14, 14)
    image = pixels((1, 21, 24), 1)
    result = score_map(fcn, image)
    assert result.geometry.exact is False
    assert result.geometry_dict()["exact"] is False
    assert result.shape == ((21 - 8) // 2 + 1, (24 - 8) // 2 + 1) == (7, 9)
    crops = crop_loop(model, image, 2)
    assert crops.shape == result.logits.shape
    diff = np.abs(result.logits - crops)
    assert diff.max() > 1e-3 * np.abs(crops).max()  # crop borders: zeros vs neighbours
    # but the same picture: the maps go up and down together
    assert np.corrcoef(result.logits.ravel(), crops.ravel())[0, 1] > 0.5
    # the training-size crop itself is exact (nothing outside the window to see)
    x = model.preprocess(image[None, :, :8, :8])
    np.testing.assert_allclose(
        fcn.forward(x)[0, :, 0, 0], model.scores(x)[0], rtol=0, atol=1e-10 * np.abs(crops).max()
    )


def test_a_padded_cell_depends_only_on_its_receptive_field(padded):
    """Cell (i, j) computed from any sub-image holding its receptive field is the same."""
    _, fcn = padded
    g = fcn.geometry
    image = pixels((1, 30, 30), 9)
    full = fcn.forward(fcn.preprocess(image[None]))[0]  # (K, 12, 12)
    S, (P, _), (R, _), (T, _) = g.stride, g.offset, g.receptive_field, g.window
    for i, j in [(3, 4), (5, 5), (6, 2)]:
        # a sub-image of T + S*n pixels starting at a multiple of S that holds the receptive
        # field [S*i - P, S*i - P + R)
        y0, x0 = S * math.floor((S * i - P) / S), S * math.floor((S * j - P) / S)
        y1 = y0 + T + S * math.ceil((S * i - P + R - y0 - T) / S)
        x1 = x0 + T + S * math.ceil((S * j - P + R - x0 - T) / S)
        sub = fcn.forward(fcn.preprocess(image[None, :, y0:y1, x0:x1]))[0]
        np.testing.assert_allclose(
            sub[:, i - y0 // S, j - x0 // S], full[:, i, j], rtol=1e-12, atol=1e-12
        )
        # one pixel less of context: the cell changes
        short = fcn.forward(fcn.preprocess(image[None, :, y0 + S : y1, x0:x1]))[0]
        assert not np.allclose(short[:, i - y0 // S - 1, j - x0 // S], full[:, i, j])


# ---------------------------------------------------------------------------------------------
# Finer maps (shift-and-stitch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 4])
@pytest.mark.parametrize(("H", "W"), [(12, 12), (19, 25), (22, 13)])
def test_stride_divisor_equals_the_crop_loop_at_the_finer_stride(stride4, d, H, W):
    model, fcn = stride4
    image = pixels((1, H, W), H + W)
    result = score_map(fcn, image, stride_divisor=d)
    s = 4 // d
    assert result.geometry.stride == s and result.stride_divisor == d
    assert result.shape == ((H - 12) // s + 1, (W - 12) // s + 1)
    assert_close_to(result.logits, crop_loop(model, image, s), np.float64)
    # the coarse map is every d-th cell of the fine one
    coarse = score_map(fcn, image)
    np.testing.assert_allclose(result.logits[:, ::d, ::d], coarse.logits, rtol=0, atol=1e-12)
    cols = result.shape[1]
    assert result.box(0, cols - 1) == (s * (cols - 1), 0, s * (cols - 1) + 12, 12)
    assert np.array_equal(
        result.boxes()[-1, 0], [0, s * (result.shape[0] - 1), 12, s * (result.shape[0] - 1) + 12]
    )


def test_digits_stride_divisor_2(digits_model):
    model, fcn = digits_model
    image = pixels((17, 22), 11)
    result = score_map(fcn, image, stride_divisor=2)
    assert result.geometry.stride == 1 and result.shape == (10, 15)
    assert_close_to(result.logits, crop_loop(model, image, 1), np.float32)


@pytest.mark.parametrize(("d", "error"), [(3, ValueError), (8, ValueError), (0, ValueError)])
def test_a_stride_divisor_that_does_not_divide_raises(stride4, d, error):
    _, fcn = stride4
    with pytest.raises(error, match="stride_divisor"):
        score_map(fcn, pixels((1, 20, 20)), stride_divisor=d)
    with pytest.raises(TypeError, match="stride_divisor"):
        score_map(fcn, pixels((1, 20, 20)), stride_divisor=2.0)


# ---------------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------------


def test_each_scale_equals_the_map_of_the_resized_image(stride4):
    _, fcn = stride4
    image = pixels((1, 31, 45), 3)
    scales = [1.0, 0.5, 0.7, 1.5]
    result = score_map(fcn, image, scales=scales)
    assert isinstance(result, MultiScaleMap)
    assert len(result.maps) == 4
    for s, m in zip(scales, result.maps, strict=True):
        hs, ws = max(1, round(31 * s)), max(1, round(45 * s))
        assert m.scale == s and m.resized_size == (hs, ws) and m.image_size == (31, 45)
        resized = image if s == 1.0 else resize(image, hs, ws)
        one = score_map(fcn, resized)
        np.testing.assert_array_equal(m.logits, one.logits)
        fy, fx = hs / 31, ws / 45
        assert m.factors == (fy, fx)
        # boxes in the original image's coordinates, per axis
        expected = one.geometry.boxes(*one.shape) / np.array([fx, fy, fx, fy])
        np.testing.assert_allclose(m.boxes(), expected, rtol=1e-12)
        assert m.box(0, 1) == pytest.approx(tuple(expected[0, 1]))
        gd = m.geometry_dict()
        assert gd["cell_stride"] == pytest.approx([4 / fy, 4 / fx])
        assert gd["resized_size"] == [hs, ws] and gd["scale"] == s
    assert result.maps[0].boxes().dtype == np.int64
    # aggregates: max over the scales, mean of the per-scale means
    np.testing.assert_array_equal(result.max, np.max([m.max for m in result.maps], axis=0))
    np.testing.assert_allclose(result.mean, np.mean([m.mean for m in result.maps], axis=0))
    assert result.mean.sum() == pytest.approx(1.0)
    top = result.top_k(2, by="max")
    assert top[0]["probability"] == pytest.approx(result.max.max())
    d = result.to_dict(top_k=2, cells=False)
    json.dumps(d)
    assert len(d["scales"]) == 4 and "cells" not in d["scales"][0]
    assert d["aggregate"]["top_k_by_mean"] == result.top_k(2)


def test_scales_on_the_digits_model(digits_model):
    model, fcn = digits_model
    image = pixels((16, 24), 8)
    result = score_map(model, image, scales=(1.0, 0.5))  # 0.5: exactly the window height
    assert result.maps[1].resized_size == (8, 12) and result.maps[1].shape == (1, 3)
    small = resize(image[None], 8, 12)
    assert_close_to(result.maps[1].logits, crop_loop(model, small, 2), np.float32)
    assert result.maps[1].box(0, 2) == (8.0, 0.0, 24.0, 16.0)


def test_a_scale_that_makes_the_image_too_small_raises(stride4):
    _, fcn = stride4
    with pytest.raises(ValueError, match=r"scale 0.5 .* 20x30 .* 10x15, smaller than .* 12x12"):
        score_map(fcn, pixels((1, 20, 30)), scales=[1.0, 0.5])


@pytest.mark.parametrize(
    "scales",
    [[0], [-1.0], [float("nan")], [1.0, 0.0], [], "1.0", ["1.0"], [True], 2.0, [100.0]],
    ids=[
        "zero",
        "negative",
        "nan",
        "zero_second",
        "empty",
        "string",
        "str_item",
        "bool",
        "float",
        "huge",
    ],
)
def test_bad_scales_raise(stride4, scales):
    _, fcn = stride4
    wrong_type = isinstance(scales, str | float) or scales in (["1.0"], [True])
    with pytest.raises(TypeError if wrong_type else ValueError, match="scales"):
        score_map(fcn, pixels((1, 20, 20)), scales=scales)


def test_scales_upscale_an_image_smaller_than_the_window_and_take_arrays(stride4):
    model, fcn = stride4
    image = pixels((1, 8, 10), 3)  # smaller than the 12x12 window
    with pytest.raises(ValueError, match="smaller than the network's 12x12 window"):
        score_map(fcn, image)
    result = score_map(fcn, image, scales=np.array([2.0, 1.5]))
    assert [m.resized_size for m in result.maps] == [(16, 20), (12, 15)]
    assert_close_to(result.maps[0].logits, crop_loop(model, resize(image, 16, 20), 4), np.float64)
    assert result.maps[0].box(1, 1) == (2.0, 2.0, 8.0, 8.0)  # (4, 4, 16, 16) / 2


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------


def recording(fcn):
    """The FullyConvNet with its forward wrapped to record the shape of every input."""
    shapes = []
    forward = FullyConvNet.forward

    def spy(x):
        shapes.append(x.shape)
        return forward(fcn, x)

    fcn.forward = spy
    return shapes


def test_tiny_tiles_stitch_into_the_untiled_map(stride4):
    model, _ = stride4
    fcn = to_fully_convolutional(model)
    image = pixels((1, 47, 39), 4)  # 9 x 7 cells, margins (3, 3)
    whole = score_map(fcn, image)
    shapes = recording(fcn)
    calls = []
    tiled = score_map(fcn, image, tile_memory=1, progress=calls.append)
    assert len(shapes) > 1 and max(s[2] for s in shapes) == 12  # one cell per tile
    np.testing.assert_allclose(tiled.logits, whole.logits, rtol=0, atol=1e-12)
    assert sum(calls) == 9 * 7 == sum(s[0] for s in shapes)


def test_tiles_of_unequal_sizes_stitch(stride4):
    model, _ = stride4
    fcn = to_fully_convolutional(model)
    image = pixels((1, 47, 39), 4)  # 9 x 7 cells
    whole = score_map(fcn, image)
    # a budget for tiles of 4 x 4 cells: 3 x 2 tiles of 4, 4, 1 rows and 4, 3 columns
    h = w = 12 + 4 * 3
    budget = dense._working_bytes(fcn, 1, h, w)
    assert dense._tile_plan(fcn, 9, 7, 0, budget) == (4, 1)
    shapes = recording(fcn)
    calls = []
    tiled = score_map(fcn, image, tile_memory=budget, progress=calls.append)
    assert {s[2:] for s in shapes} == {(24, 24), (24, 20), (12, 24), (12, 20)}
    np.testing.assert_allclose(tiled.logits, whole.logits, rtol=0, atol=1e-12)
    assert sum(calls) == 6


def test_tiles_are_small_overlap_little_and_go_through_in_batches(digits_model):
    """The digits model (T = 8, S = 2): tiles of 19 x 19 cells read 44 pixels for 38 of their
    own (1.34x the pixels, within _TILE_OVERLAP), and go through the network many at a time."""
    model, fcn = digits_model
    t, batch = dense._tile_plan(fcn, 500, 500, 0, dense.DEFAULT_TILE_MEMORY)
    assert t == 19 and (8 + 2 * (t - 1)) ** 2 <= dense._TILE_OVERLAP * (2 * t) ** 2
    assert (8 + 2 * (t - 2)) ** 2 > dense._TILE_OVERLAP * (2 * (t - 1)) ** 2  # the smallest
    assert batch == dense._MAX_TILE_BATCH
    fcn = to_fully_convolutional(model)
    image = pixels((100, 90), 3)  # 47 x 42 cells: tiles of 19, 19, 9 rows and 19, 19, 4 columns
    whole = fcn.forward(fcn.preprocess(image[None, None]))[0]  # one untiled pass
    shapes = recording(fcn)
    tiled = score_map(fcn, image)
    assert sorted(shapes) == [(1, 1, 24, 14), (2, 1, 24, 44), (2, 1, 44, 14), (4, 1, 44, 44)]
    np.testing.assert_allclose(tiled.logits, whole, rtol=0, atol=1e-5)


def test_tiles_of_a_padded_network_carry_their_halo(padded):
    model, _ = padded
    fcn = to_fully_convolutional(model)
    image = pixels((1, 37, 30), 6)  # 15 x 12 cells
    whole = score_map(fcn, image)
    shapes = recording(fcn)
    calls = []
    tiled = score_map(fcn, image, tile_memory=1, progress=calls.append)
    assert len({s[2:] for s in shapes}) > 1  # edge tiles have less halo
    assert max(s[2] for s in shapes) > 8  # the halo: more than one window per tile
    np.testing.assert_allclose(tiled.logits, whole.logits, rtol=0, atol=1e-12)
    assert sum(calls) == 15 * 12


def test_tiles_in_float32_and_with_stride_divisor(digits_model):
    model, fcn = digits_model
    image = pixels((27, 23), 2)
    whole = score_map(fcn, image, stride_divisor=2)
    calls = []
    tiled = score_map(fcn, image, stride_divisor=2, tile_memory=50_000, progress=calls.append)
    np.testing.assert_allclose(tiled.logits, whole.logits, rtol=0, atol=1e-5)
    expected = sum(
        dense._tile_count(fcn, 27 - qa, 23 - qb, 50_000) for qa in (0, 1) for qb in (0, 1)
    )
    assert sum(calls) == expected > 4


@pytest.mark.parametrize("seed", range(10))
def test_tiles_of_random_padded_networks_stitch(seed):
    model = random_net(seed, np.float64, pad=True)
    fcn = to_fully_convolutional(model)
    g = fcn.geometry
    rng = np.random.default_rng(seed)
    H = g.window[0] + int(rng.integers(0, 6 * g.stride + 2))
    W = g.window[1] + int(rng.integers(0, 6 * g.stride + 2))
    image = pixels((model.input_shape[0], H, W), seed)
    whole = score_map(fcn, image).logits
    for budget in (1, 3000, 20_000):
        tiled = score_map(fcn, image, tile_memory=budget).logits
        np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-12 * np.abs(whole).max())


@pytest.mark.parametrize("seed", [0, 11, 21, 28, 32, 40, 48])
def test_random_networks_at_finer_strides_equal_the_crop_loop(seed):
    model = random_net(seed, np.float64, pad=True)
    fcn = to_fully_convolutional(model)
    g = fcn.geometry
    if not g.exact or g.stride == 1:  # (a guard on the chosen seeds)
        pytest.fail(f"seed {seed} gives {g}")
    rng = np.random.default_rng(seed)
    H = g.window[0] + int(rng.integers(0, 3 * g.stride + 2))
    W = g.window[1] + int(rng.integers(0, 3 * g.stride + 2))
    image = pixels((model.input_shape[0], H, W), seed)
    for d in range(2, g.stride + 1):
        if g.stride % d == 0:
            result = score_map(fcn, image, stride_divisor=d, tile_memory=5000)
            assert_close_to(result.logits, crop_loop(model, image, g.stride // d), np.float64)


def test_progress_bar(stride4, capsys):
    _, fcn = stride4
    image = pixels((1, 30, 30))
    result = score_map(fcn, image, progress=True, tile_memory=1)
    np.testing.assert_array_equal(result.logits, score_map(fcn, image, tile_memory=1).logits)


def test_bad_tile_memory(stride4):
    _, fcn = stride4
    with pytest.raises(ValueError, match="tile_memory"):
        score_map(fcn, pixels((1, 20, 20)), tile_memory=0)
    with pytest.raises(TypeError, match="tile_memory"):
        score_map(fcn, pixels((1, 20, 20)), tile_memory=1e6)


# ---------------------------------------------------------------------------------------------
# ScoreMap API
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_map(digits_model):
    _, fcn = digits_model
    return score_map(fcn, pixels((19, 24), 12))  # 6 x 9 cells, margins (1, 0)


def test_probabilities_are_the_per_cell_softmax(digits_map):
    m = digits_map
    logits = m.logits.astype(np.float64)
    e = np.exp(logits - logits.max(axis=0))
    expected = e / e.sum(axis=0)
    np.testing.assert_allclose(m.probabilities, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.probabilities.sum(axis=0), 1.0, rtol=1e-6)
    assert m.probabilities.shape == m.logits.shape == (10, 6, 9)
    big = np.array([[[1000.0]], [[-1000.0]], [[999.0]]])
    probs = softmax_cells(big.copy())
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs[:, 0, 0], [1 / (1 + math.exp(-1)), 0, 1 / (1 + math.e)])


def test_aggregates_and_top_k(digits_map):
    m = digits_map
    np.testing.assert_allclose(m.max, m.probabilities.reshape(10, -1).max(axis=1))
    np.testing.assert_allclose(m.mean, m.probabilities.reshape(10, -1).mean(axis=1), rtol=1e-6)
    assert m.max.shape == m.mean.shape == (10,)
    assert m.mean.sum() == pytest.approx(1.0, rel=1e-6)
    for by, values in [("mean", m.mean), ("max", m.max)]:
        top = m.top_k(3, by=by)
        order = np.argsort(-values, kind="stable")[:3]
        assert [t["index"] for t in top] == list(order)
        assert [t["label"] for t in top] == [m.class_names[c] for c in order]
        assert [t["probability"] for t in top] == pytest.approx(values[order])
    assert m.top_k() == m.top_k(5, by="mean")
    assert len(m.top_k(100)) == 10  # clamped to the number of classes
    probabilities = [t["probability"] for t in m.top_k(100, by="max")]
    assert probabilities == sorted(probabilities, reverse=True)
    with pytest.raises(ValueError, match="by must be 'mean' or 'max', got 'median'"):
        m.top_k(3, by="median")
    with pytest.raises(ValueError, match="k must be >= 1"):
        m.top_k(0)
    with pytest.raises(TypeError, match="k must be an int"):
        m.top_k(True)


def test_cell_top_k(digits_map):
    m = digits_map
    idx, prob = m.cell_top_k(3)
    assert idx.shape == prob.shape == (3, 6, 9)
    np.testing.assert_array_equal(idx[0], np.argmax(m.probabilities, axis=0))
    np.testing.assert_array_equal(prob[0], m.probabilities.max(axis=0))
    assert np.all(prob[0] >= prob[1]) and np.all(prob[1] >= prob[2])
    for r in range(3):
        np.testing.assert_array_equal(
            prob[r], np.take_along_axis(m.probabilities, idx[r][None], 0)[0]
        )
    assert m.cell_top_k(50)[0].shape == (10, 6, 9)


def test_box_and_boxes(digits_map):
    m = digits_map
    assert m.box(0, 0) == (0, 0, 8, 8)
    assert m.box(2, 3) == (6, 4, 14, 12)  # x0 = 2*3, y0 = 2*2
    assert m.box(5, 8) == (16, 10, 24, 18)
    boxes = m.boxes()
    assert boxes.shape == (6, 9, 4) and boxes.dtype == np.int64
    assert tuple(boxes[2, 3]) == m.box(2, 3)
    for i, j in [(6, 0), (0, 9), (-1, 0), (0, -1)]:
        with pytest.raises(IndexError, match="outside the 6x9 map"):
            m.box(i, j)


def test_to_dict_is_json_with_decodable_arrays(digits_map):
    m = digits_map
    assert "cells" not in m.to_dict(top_k=3)  # one entry per cell only when asked for
    d = m.to_dict(top_k=3, cells=True)
    text = json.dumps(d)
    back = json.loads(text)
    assert back["map_shape"] == [6, 9]
    assert back["classes"] == list(m.class_names)
    for key, array in [("logits", m.logits), ("probabilities", m.probabilities)]:
        enc = back[key]
        assert enc["dtype"] == "float32" and enc["shape"] == [10, 6, 9] and enc["order"] == "C"
        decoded = np.frombuffer(base64.b64decode(enc["data"]), dtype="<f4").reshape(enc["shape"])
        np.testing.assert_array_equal(decoded, array.astype(np.float32))
    cells = back["cells"]
    assert len(cells) == 6 * 9
    idx, prob = m.cell_top_k(3)
    for cell in cells:
        i, j = cell["row"], cell["col"]
        assert cell["box"] == list(m.box(i, j))
        assert [t["index"] for t in cell["top_k"]] == list(idx[:, i, j])
        assert [t["probability"] for t in cell["top_k"]] == pytest.approx(prob[:, i, j])
        assert cell["top_k"][0]["label"] == m.class_names[idx[0, i, j]]
    assert [(c["row"], c["col"]) for c in cells[:3]] == [(0, 0), (0, 1), (0, 2)]
    agg = back["aggregate"]
    assert agg["max"]["3"] == pytest.approx(float(m.max[3]))
    assert agg["mean"]["7"] == pytest.approx(float(m.mean[7]))
    assert agg["top_k_by_mean"] == m.top_k(3, "mean") and agg["top_k_by_max"] == m.top_k(3, "max")
    small = m.to_dict(cells=False, scores=False)
    assert "cells" not in small and "logits" not in small and "probabilities" not in small


def test_float64_logits_are_encoded_as_float32(stride4):
    _, fcn = stride4
    m = score_map(fcn, pixels((1, 20, 24)))
    assert m.logits.dtype == np.float64
    enc = m.to_dict(cells=False)["logits"]
    decoded = np.frombuffer(base64.b64decode(enc["data"]), dtype="<f4").reshape(enc["shape"])
    np.testing.assert_array_equal(decoded, m.logits.astype(np.float32))


def test_geometry_dict(digits_map):
    m = digits_map
    gd = m.geometry_dict()
    json.dumps(gd)
    assert gd["stride"] == 2 and gd["window"] == [8, 8] and gd["exact"] is True
    assert gd["image_size"] == [19, 24] == gd["resized_size"]
    assert gd["map_shape"] == [6, 9]
    assert gd["covered"] == [18, 24] and gd["margins"] == [1, 0]
    assert [c + mg for c, mg in zip(gd["covered"], gd["margins"], strict=True)] == [19, 24]
    assert gd["stride_divisor"] == 1 and gd["scale"] == 1.0 and gd["cell_stride"] == [2.0, 2.0]
    assert gd["receptive_field"] == [8, 8] and gd["offset"] == [0, 0]


# ---------------------------------------------------------------------------------------------
# Models accepted by score_map
# ---------------------------------------------------------------------------------------------


def test_score_map_accepts_a_convnet_a_fcn_and_model_files(tmp_path, stride4):
    model, fcn = stride4
    image = pixels((1, 25, 21), 13)
    expected = score_map(fcn, image).logits
    np.testing.assert_array_equal(score_map(model, image).logits, expected)
    trained = save_model(model, tmp_path / "trained.safetensors")
    converted = save_fully_convolutional(fcn, tmp_path / "converted.safetensors")
    for source in (trained, str(trained), converted, str(converted)):
        np.testing.assert_array_equal(score_map(source, image).logits, expected)
    assert score_map(str(DIGITS), image[0]).logits.shape == (10, 9, 7)  # a trained file
    for bad in (42, {"layers": []}, None, b"bytes"):
        with pytest.raises(
            TypeError, match="model must be a FullyConvNet, a ConvNet or a model file"
        ):
            score_map(bad, image)


def test_score_map_leaves_its_image_alone(stride4):
    _, fcn = stride4
    image = pixels((1, 25, 21), 14)
    kept = image.copy()
    score_map(fcn, image, stride_divisor=2, scales=[1.0, 0.8], tile_memory=1)
    np.testing.assert_array_equal(image, kept)


def test_score_map_image_errors(stride4):
    _, fcn = stride4
    with pytest.raises(ValueError, match="smaller than the network's 12x12 window"):
        score_map(fcn, pixels((1, 11, 40)))
    with pytest.raises(ValueError, match=r"\(H, W\), \(1, H, W\) or \(3, H, W\)"):
        score_map(fcn, pixels((2, 20, 20)))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        score_map(fcn, [[0.0] * 20] * 20)


def test_heatmap_needs_the_image_the_map_was_computed_on(digits_map):
    with pytest.raises(ValueError, match="must be the 19x24 image this map was computed on"):
        digits_map.heatmap(np.zeros((5, 5), dtype=np.uint8), 1)


def test_progress_must_be_a_bool_or_a_callable(stride4):
    _, fcn = stride4
    with pytest.raises(TypeError, match="progress must be a bool or a callable"):
        score_map(fcn, pixels((1, 12, 12)), progress="yes")


def test_a_scale_over_the_pixel_limit_is_refused(stride4, monkeypatch):
    _, fcn = stride4
    monkeypatch.setattr(dense, "MAX_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"resizes the 20x20 image to 40x40, more than 1,000"):
        score_map(fcn, pixels((1, 20, 20)), scales=[1.0, 2.0])
    assert score_map(fcn, pixels((1, 40, 40)), scales=[0.5]).maps[0].shape == (3, 3)  # larger
    # originals may be downscaled


def test_default_class_is_the_top_by_max_other_than_background():
    from cnnserve.convert import Geometry
    from cnnserve.dense import ScoreMap, default_class, softmax_cells

    logits = np.zeros((3, 2, 2), np.float32)
    logits[2] = 9.0  # "background" everywhere
    logits[1, 0, 0] = 8.0  # class "b" in one cell
    logits[0] = 1.0  # class "a": a little everywhere, more on average than "b"
    g = Geometry(stride=2, window=(4, 4), receptive_field=(4, 4), offset=(0, 0), exact=True)

    def scores(names):
        return ScoreMap(logits, softmax_cells(logits), g, (6, 6), names, 1.0, (6, 6), 1)

    assert default_class(scores(("a", "b", "background"))) == 1
    assert default_class(scores(("a", "b", "c"))) == 2  # no background class: the top by max
    only = ScoreMap(
        logits[2:], softmax_cells(logits[2:]), g, (6, 6), ("background",), 1.0, (6, 6), 1
    )
    assert default_class(only) == 0
