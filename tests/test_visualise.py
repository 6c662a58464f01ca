"""cnnserve.visualise: activations, their grids, and the filter grids.

The grids are checked tile by tile: each tile, shrunk back by its zoom, equals the channel of
the activation it shows scaled to its own range, and its box is where the layout says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve import heatmap as heatmap_module
from cnnserve.convert import load_fully_convolutional, to_fully_convolutional
from cnnserve.model import ConvNet, load_model
from cnnserve.visualise import (
    activation_grid,
    activation_sheet,
    activations,
    channel_tiles,
    filter_grid,
    select_layers,
    trained_network,
)

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def digit():
    """A smooth 8x8 one-channel image in [0, 1]."""
    y, x = np.mgrid[0:8, 0:8]
    return (np.sin(x / 2.0) * np.cos(y / 3.0) * 0.5 + 0.5).astype(np.float32)


def rgb_net(seed: int = 0) -> ConvNet:
    net = ConvNet(
        [
            {"type": "conv", "filters": 4, "size": 3, "pad": 1},
            {"type": "spatial_batchnorm"},
            {"type": "relu"},
            {"type": "max_pool", "size": 2, "stride": 2},
            {"type": "conv", "filters": 3, "size": 3, "pad": 0},
            {"type": "affine", "units": 6},
            {"type": "dropout", "keep": 0.5},
        ],
        input_shape=(3, 10, 10),
        num_classes=3,
        seed=seed,
        class_names=["cat", "dog", "bird"],
    )
    rng = np.random.default_rng(seed)
    bn = net.bn_params[0]
    bn["running_mean"] = rng.standard_normal(4).astype(np.float32)
    bn["running_var"] = rng.uniform(0.5, 2, 4).astype(np.float32)
    return net


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


def test_activations_are_every_layer_in_order_with_names_and_shapes(model, digit):
    found = activations(model, digit)
    assert [a.key for a in found] == ["input", *map(str, range(11))]
    assert [a.name for a in found][:4] == [
        "input",
        "conv 32 3x3 s1 p0",
        "spatial_batchnorm",
        "relu",
    ]
    assert found[-1].name == "scores" and found[-1].shape == (10,)
    assert [a.shape for a in found[1:]] == [info.out_shape for info in model.info]
    assert found[3].title == "2  relu  (32, 6, 6)"
    np.testing.assert_array_equal(found[0].values, digit[None])  # the pixels themselves
    # Each layer is the layer function of the one before, in test mode.
    x = model.preprocess(digit[None, None])
    np.testing.assert_allclose(found[-1].values, model.loss(x)[0], rtol=1e-5, atol=1e-5)
    assert (found[3].values >= 0).all() and (
        found[3].values == np.maximum(found[2].values, 0)
    ).all()
    pooled = found[6].values.reshape(64, 2, 2, 2, 2).max(axis=(2, 4))
    np.testing.assert_array_equal(found[7].values, pooled)
    np.testing.assert_array_equal(found[10].values, found[9].values)  # dropout: the identity


def test_a_converted_network_gives_the_trained_networks_activations(model, digit):
    fcn = load_fully_convolutional(MODEL)  # batchnorm folded, dropout dropped
    assert trained_network(fcn) is trained_network(fcn)  # rebuilt once
    for a, b in zip(activations(model, digit), activations(fcn, digit), strict=True):
        assert (a.key, a.name, a.shape) == (b.key, b.name, b.shape)
        np.testing.assert_array_equal(a.values, b.values)
    net = rgb_net()
    image = np.random.default_rng(1).random((3, 10, 10), dtype=np.float32)
    converted = activations(to_fully_convolutional(net), image)
    for a, b in zip(activations(net, image), converted, strict=True):
        np.testing.assert_array_equal(a.values, b.values)


def test_images_are_converted_and_resized_as_predict_does(model, digit):
    big = np.kron(digit, np.ones((3, 3), np.float32))  # 24x24
    as_uint8 = np.rint(digit * 255).astype(np.uint8)
    assert activations(model, big)[0].shape == (1, 8, 8)
    np.testing.assert_allclose(activations(model, as_uint8)[0].values[0], as_uint8 / 255, atol=1e-7)
    grey = np.random.default_rng(2).random((10, 10), dtype=np.float32)
    grey_to_rgb = activations(rgb_net(), grey)[0].values  # repeated, as predict converts
    np.testing.assert_array_equal(grey_to_rgb, np.repeat(grey[None], 3, axis=0))
    with pytest.raises(ValueError, match=r"\(H, W\), \(1, H, W\) or \(3, H, W\) for this model"):
        activations(rgb_net(), np.zeros((2, 8, 8), np.float32))
    with pytest.raises(TypeError, match="model must be a ConvNet or a FullyConvNet"):
        activations("model.safetensors", digit)


def test_channel_stats(model, digit):
    relu = activations(model, digit)[3]
    stats = relu.channel_stats()
    v = relu.values.reshape(32, -1)
    np.testing.assert_allclose(stats["max"], v.max(axis=1))
    np.testing.assert_allclose(stats["mean"], v.mean(axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["zero_fraction"], (v == 0).mean(axis=1))
    assert all(s.shape == (32,) and s.dtype == np.float32 for s in stats.values())


def test_select_layers(model, digit):
    found = activations(model, digit)
    assert [a.key for a in select_layers(found, "input, 3,0,3")] == ["input", "3", "0"]
    assert [a.key for a in select_layers(found, [10, "2"])] == ["10", "2"]
    assert select_layers(found, None) == found
    with pytest.raises(
        ValueError,
        match=r"layer '11' is not a layer of this network; the layers are input, 0 \(conv 32 3x3 s1 p0\), 1 \(spatial_batchnorm\)",
    ):
        select_layers(found, "1,11")
    with pytest.raises(ValueError, match="layer '-1' is not a layer"):
        select_layers(found, -1)
    with pytest.raises(TypeError, match="layers must be layer indices or 'input'"):
        select_layers(found, [1.5])


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


def tile_of(picture: Image.Image, box, zoom: int) -> np.ndarray:
    """The tile in ``box``, each ``zoom x zoom`` square checked constant and shrunk to one."""
    tile = np.asarray(picture.crop(box))  # (h, w, 3)
    small = tile[::zoom, ::zoom]
    np.testing.assert_array_equal(np.repeat(np.repeat(small, zoom, 0), zoom, 1), tile)
    return small


def test_channel_tiles_scale_each_channel_to_its_range():
    v = np.stack([np.arange(4.0).reshape(2, 2), np.full((2, 2), 3.0), [[-1, 1], [0, 0]]])
    tiles = channel_tiles(v)
    assert tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles[0], [[0, 85], [170, 255]])
    np.testing.assert_array_equal(tiles[1], 0)  # constant: black
    np.testing.assert_array_equal(tiles[2], [[0, 255], [128, 128]])


def test_every_tile_equals_the_scaled_channel_it_shows(model, digit):
    found = activations(model, digit)
    pictures = activation_grid(found, layers="0,2,6", tile=48)
    for p, key in zip(pictures, ["0", "2", "6"], strict=True):
        a = p.activation
        assert a.key == key
        C, H, W = a.shape
        assert p.zoom == -(-48 // max(H, W)) and len(p.tiles) == C
        expected = channel_tiles(a.values)
        for c, box in enumerate(p.tiles):
            assert (box[2] - box[0], box[3] - box[1]) == (W * p.zoom, H * p.zoom)
            small = tile_of(p.picture, box, p.zoom)
            assert (small == small[..., :1]).all()  # grey
            np.testing.assert_array_equal(small[..., 0], expected[c])
    # Layout: a near-square grid, left to right then down, 2 pixels apart.
    relu = pictures[1]  # 32 channels of 6x6 at zoom 8: 6 columns
    x0, y0 = relu.tiles[0][:2]
    for c, box in enumerate(relu.tiles):
        assert box[:2] == (x0 + (c % 6) * 50, y0 + (c // 6) * 50)
    # A dead ReLU channel is black, a live one spans black to white.
    for c, box in enumerate(relu.tiles):
        small = tile_of(relu.picture, box, relu.zoom)[..., 0]
        if relu.activation.values[c].max() == 0:
            assert (small == 0).all()
        else:
            assert small.min() == 0 and small.max() == 255


def test_the_input_is_drawn_as_it_is_and_rgb_as_colour(model, digit):
    p = activation_grid(activations(model, digit), layers="input")[0]
    np.testing.assert_array_equal(
        tile_of(p.picture, p.tiles[0], p.zoom)[..., 0], np.rint(digit * 255)
    )
    net = rgb_net()
    image = np.random.default_rng(2).random((3, 10, 10), dtype=np.float32)
    p = activation_grid(activations(net, image), layers="input", tile=20)[0]
    assert len(p.tiles) == 1 and p.zoom == 2
    colour = tile_of(p.picture, p.tiles[0], 2)
    np.testing.assert_array_equal(colour, np.rint(np.moveaxis(image, 0, -1) * 255))


def test_vectors_and_scores_are_bars(model, digit):
    found = activations(model, digit)
    scores, hidden = activation_grid(found, layers="10,7", class_names=model.class_names)
    assert scores.tiles == () and hidden.tiles == ()
    pixels = np.asarray(scores.picture)
    orange = np.all(pixels == (255, 127, 14), axis=2)  # the top class's bar
    blue = np.all(pixels == (31, 119, 180), axis=2)
    assert orange.any()
    p = np.exp(found[-1].values - found[-1].values.max())
    p /= p.sum()
    # The top class's bar is the tallest, and bar heights follow the probabilities.
    heights = {}
    cols = np.flatnonzero(orange.any(axis=0) | blue.any(axis=0))
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    assert len(runs) == sum(p >= 1 / 80) or len(runs) == 10  # bars under a pixel vanish
    for run in runs:
        column = orange[:, run[0]] | blue[:, run[0]]
        heights[run[0]] = column.sum()
    tallest = max(heights.values())
    assert tallest == pytest.approx(80 * p.max(), abs=1.5)
    assert orange[:, np.flatnonzero(orange.any(axis=0))[0]].sum() == tallest
    # A hidden layer's negative values are red bars below the zero line.
    red = np.all(np.asarray(hidden.picture) == (214, 39, 40), axis=2)
    assert red.any() == bool((found[8].values < 0).any())


def test_a_sheet_stacks_the_pictures(model, digit):
    pictures = activation_grid(activations(model, digit), layers="input,0,10")
    sheet = activation_sheet(pictures)
    assert sheet.width == max(p.picture.width for p in pictures)
    assert sheet.height == sum(p.picture.height for p in pictures) + 2 * 8
    second = pictures[1].picture
    y = pictures[0].picture.height + 8
    np.testing.assert_array_equal(
        np.asarray(sheet.crop((0, y, second.width, y + second.height))), np.asarray(second)
    )


def test_grids_beyond_the_picture_limit_are_refused(model, digit, monkeypatch):
    found = activations(model, digit)
    monkeypatch.setattr(heatmap_module, "MAX_PICTURE_PIXELS", 120_000)
    activation_grid(found, layers="0")  # 310 x 346
    with pytest.raises(
        ValueError, match=r"layer 0's grid would be a \d+x\d+ picture, more than 120,000 pixels"
    ):
        activation_grid(found, layers="0", tile=200)
    with pytest.raises(ValueError, match="the filters of W2 would be a"):
        filter_grid(model, 2, tile=200)
    with pytest.raises(ValueError, match="tile must be"):
        activation_grid(found, tile=1000)


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------


def filter_scaled(w: np.ndarray) -> np.ndarray:
    """CS231n's normalisation: each filter to its own min .. max over all its channels."""
    low = w.min(axis=(1, 2, 3), keepdims=True)
    high = w.max(axis=(1, 2, 3), keepdims=True)
    return np.rint((w - low) / (high - low) * 255).astype(np.uint8)


def test_first_layer_filters_are_grey_tiles(model):
    grid = filter_grid(model)
    w = model.params["W1"]
    np.testing.assert_array_equal(grid.activation.values, w)
    assert len(grid.tiles) == 32 and grid.zoom == -(-32 // 3)
    expected = filter_scaled(w.astype(np.float64))
    for f, box in enumerate(grid.tiles):
        np.testing.assert_array_equal(tile_of(grid.picture, box, grid.zoom)[..., 0], expected[f, 0])


def test_first_layer_filters_of_an_rgb_network_are_colour_tiles():
    net = rgb_net()
    grid = filter_grid(net, 1, tile=12)
    expected = np.moveaxis(
        filter_scaled(net.params["W1"].astype(np.float64)), 1, -1
    )  # (F, 3, 3, 3)
    assert len(grid.tiles) == 4
    for f, box in enumerate(grid.tiles):
        np.testing.assert_array_equal(tile_of(grid.picture, box, grid.zoom), expected[f])
    assert (
        filter_grid(to_fully_convolutional(net), 1, tile=12).picture.tobytes()
        == grid.picture.tobytes()
    )


def test_later_layers_have_a_tile_per_input_channel(model):
    grid = filter_grid(model, 2)
    w = model.params["W2"]  # (64, 32, 3, 3)
    assert len(grid.tiles) == 64 * 32
    expected = filter_scaled(w.astype(np.float64))
    first_x = grid.tiles[0][0]
    for f in (0, 17, 63):
        for c in (0, 5, 31):
            box = grid.tiles[f * 32 + c]
            assert box[0] == first_x + c * (3 * grid.zoom + 2)  # a row per filter
            np.testing.assert_array_equal(
                tile_of(grid.picture, box, grid.zoom)[..., 0], expected[f, c]
            )
    assert grid.picture.width <= 900


def test_filter_errors(model):
    with pytest.raises(
        ValueError,
        match=r"layer 3 is not a conv layer of this model; its conv layers are 1 \(conv 32 3x3 s1 p0, layer 0\), 2 \(conv 64 3x3 s1 p0, layer 3\)",
    ):
        filter_grid(model, 3)
    no_conv = ConvNet([{"type": "affine", "units": 5}], input_shape=(1, 4, 4), num_classes=2)
    with pytest.raises(
        ValueError,
        match=r"the model has no conv layers, so no filters to draw \(its layers: affine 5, affine 2\)",
    ):
        filter_grid(no_conv)
    with pytest.raises(ValueError, match="layer must be"):
        filter_grid(model, 0)
