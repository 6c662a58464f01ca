"""Heatmap pictures: upsampling of score maps, colour maps, overlays, zoom and PNG files."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from cnnserve import heatmap as heatmap_module
from cnnserve.heatmap import (
    CMAPS,
    colorize,
    heatmap_image,
    overlay,
    png_bytes,
    save_png,
    upsample_map,
)

INFERNO_FIRST, INFERNO_LAST = (0x00, 0x00, 0x04), (0xFC, 0xFF, 0xA4)
VIRIDIS_FIRST, VIRIDIS_LAST = (0x44, 0x01, 0x54), (0xFD, 0xE7, 0x25)


def expected_upsample(values, image_size, stride, window, offset=(0.0, 0.0)):
    """The definition, one pixel at a time, in float64: an independent oracle."""
    values = np.asarray(values, dtype=np.float64)
    Hc, Wc = values.shape
    H, W = image_size
    th, tw = window
    out = np.empty((H, W))
    for y in range(H):
        ty = min(max((y + 0.5 - offset[0] - th / 2) / stride, 0), Hc - 1)
        for x in range(W):
            tx = min(max((x + 0.5 - offset[1] - tw / 2) / stride, 0), Wc - 1)
            i0, j0 = int(np.floor(ty)), int(np.floor(tx))
            i1, j1 = min(i0 + 1, Hc - 1), min(j0 + 1, Wc - 1)
            fy, fx = ty - i0, tx - j0
            top = (1 - fx) * values[i0, j0] + fx * values[i0, j1]
            bottom = (1 - fx) * values[i1, j0] + fx * values[i1, j1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


# ---------------------------------------------------------------------------------------------
# upsample_map
# ---------------------------------------------------------------------------------------------


def test_cell_centres_on_pixel_centres_get_the_cell_values_exactly():
    # window 7, stride 2: the centre of cell (i, j) is pixel (3 + 2i, 3 + 2j).
    rng = np.random.default_rng(0)
    values = rng.standard_normal((5, 6)).astype(np.float32)
    up = upsample_map(values, (7 + 2 * 4, 7 + 2 * 5), stride=2, window=(7, 7))
    assert up.dtype == np.float32 and up.shape == (15, 17)
    np.testing.assert_array_equal(up[3:12:2, 3:14:2], values)
    assert up[4, 4] != values[0, 0]  # between centres: a blend


def test_float_stride_and_offset():
    # stride 2.5, window 5, offset (1, 3): cell (i, j) centred at y = 3.5 + 2.5 i,
    # x = 5.5 + 2.5 j, which are pixel centres for even i and j (pixels 3 + 5k, 5 + 5k).
    rng = np.random.default_rng(1)
    values = rng.random((5, 7))
    up = upsample_map(values, (20, 24), stride=2.5, window=(5.0, 5.0), offset=(1.0, 3.0))
    np.testing.assert_array_equal(up[3::5, 5::5][:3, :4], values[::2, ::2].astype(np.float32))
    np.testing.assert_allclose(
        up, expected_upsample(values, (20, 24), 2.5, (5, 5), (1, 3)), rtol=0, atol=1e-6
    )


def test_matches_the_definition_for_odd_geometries():
    rng = np.random.default_rng(2)
    values = rng.standard_normal((4, 3))
    cases = [
        ((13, 11), 1.75, (6.0, 4.5), (0.25, -1.5)),
        ((9, 20), 3, (8, 8), (0, 0)),
        ((3, 3), 4.0, (2, 3), (-2, 5)),  # an image smaller than the map's extent
    ]
    for size, stride, window, offset in cases:
        up = upsample_map(values, size, stride=stride, window=window, offset=offset)
        want = expected_upsample(values, size, stride, window, offset)
        np.testing.assert_allclose(up, want, rtol=0, atol=1e-5, err_msg=str((size, stride)))


def test_constant_map_gives_a_constant_image():
    values = np.full((4, 5), 0.375)
    up = upsample_map(values, (23, 29), stride=3.3, window=(8, 8), offset=(0.5, 0.5))
    assert np.all(up == np.float32(0.375))


def test_linear_ramp_is_linear_between_centres_and_clamped_beyond():
    # Ramp along x: cell j holds 10 j. Window 4, stride 4: centres at x = 2 + 4j, which
    # fall between pixels 1 and 2 (+ 4j); pixel x has value 10 * (x + 0.5 - 2) / 4.
    values = np.tile(10.0 * np.arange(5), (3, 1))  # (3, 5)
    up = upsample_map(values, (12, 20), stride=4, window=4)
    x = np.arange(20)
    want = np.clip(10 * (x + 0.5 - 2) / 4, 0, 40)
    for row in up:
        np.testing.assert_allclose(row, want, rtol=0, atol=1e-5)
    # Between the first and last centres the step from pixel to pixel is constant.
    inner = up[0, 2:18]
    np.testing.assert_allclose(np.diff(inner), 2.5, atol=1e-5)
    # Beyond the outermost centres: the nearest cell's value, exactly.
    assert np.all(up[:, :2] == 0) and np.all(up[:, 18:] == 40)


def test_ramp_along_y_and_clamping_at_every_edge():
    values = np.arange(12, dtype=np.float64).reshape(3, 4)  # value = 4 i + j
    up = upsample_map(values, (10, 12), stride=2, window=7)  # centres at pixels 3, 5, 7
    assert np.all(up[:4, :4] == 0)  # top-left corner: cell (0, 0)
    assert np.all(up[7:, 9:] == 11)  # bottom-right corner: cell (2, 3)
    assert np.all(up[:4, 9:] == 3) and np.all(up[7:, :4] == 8)
    np.testing.assert_allclose(up[4, 3], 2.0)  # halfway between rows 0 and 1 of column 0
    np.testing.assert_allclose(up[4, 4], 2.5)  # halfway on both axes


def test_one_by_one_map_fills_the_image():
    up = upsample_map([[0.8]], (6, 9), stride=2, window=(8, 8))
    assert up.shape == (6, 9) and np.all(up == np.float32(0.8))


def test_nan_cells_spread_only_where_they_weigh():
    values = np.zeros((3, 3))
    values[1, 1] = np.nan
    up = upsample_map(values, (11, 11), stride=2, window=7)  # centres at pixels 3, 5, 7
    assert np.isnan(up[4:7, 4:7]).all()
    nan = np.isnan(up)
    assert nan.sum() == 9  # pixels 3 and 7 sit on centres of NaN-free cells: weight 0
    assert up[3, 3] == 0 and up[5, 3] == 0
    values[1, 1] = np.inf
    up = upsample_map(values, (11, 11), stride=2, window=7)
    assert up[5, 5] == np.inf and up[3, 3] == 0 and up[7, 5] == 0  # exact at centres


def test_round_off_does_not_move_a_centre():
    # Pixel 0's centre is cell 3's centre, but (0.5 - 0.1 - 0.1) / 0.1 = 3.0000000000000004
    # in floating point: the neighbouring NaN must not leak in.
    values = np.array([[0.0, 1.0, 2.0, 5.0, np.nan, 7.0, 8.0, 9.0]])
    up = upsample_map(values, (1, 1), stride=0.1, window=(0.2, 0.2), offset=(0.1, 0.1))
    assert up[0, 0] == 5.0


def test_upsample_does_not_modify_and_accepts_ints():
    values = np.arange(6, dtype=np.int64).reshape(2, 3)
    before = values.copy()
    up = upsample_map(values, (4, 6), stride=2, window=3)  # centres at pixels 1, 3 and 1, 3, 5
    np.testing.assert_array_equal(values, before)
    assert up.dtype == np.float32
    np.testing.assert_array_equal(up[1::2, 1::2], [[0, 1, 2], [3, 4, 5]])
    f = np.ones((2, 2), dtype=np.float32)
    out = upsample_map(f, (3, 3), stride=1, window=1)
    out[:] = 7
    assert np.all(f == 1)  # the result never aliases the input


def test_large_map_uses_float32_and_blocks():
    rng = np.random.default_rng(3)
    values = rng.random((300, 410)).astype(np.float32)
    up = upsample_map(values, (300 * 2 + 6, 410 * 2 + 6), stride=2, window=9)
    assert up.dtype == np.float32 and up.shape == (606, 826)
    np.testing.assert_array_equal(up[4:604:2, 4:824:2], values)  # centres at pixels 4 + 2k


def test_blocks_of_rows_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(11)
    values = rng.random((9, 7))
    image = rng.random((3, 23, 19))
    kw = {"stride": 2.5, "window": (5, 4), "offset": (0.5, -1.0)}
    whole = (upsample_map(values, (23, 19), **kw), np.asarray(heatmap_image(image, values, **kw)))
    monkeypatch.setattr(heatmap_module, "_BLOCK_BYTES", 1)  # one row a block
    assert heatmap_module._block_rows(19) == 1
    np.testing.assert_array_equal(upsample_map(values, (23, 19), **kw), whole[0])
    np.testing.assert_array_equal(np.asarray(heatmap_image(image, values, **kw)), whole[1])
    np.testing.assert_allclose(
        whole[0], expected_upsample(values, (23, 19), 2.5, (5, 4), (0.5, -1)), atol=1e-6
    )


@pytest.mark.parametrize(
    "args, kwargs, exc, message",
    [
        (
            (np.zeros(4), (4, 4)),
            {},
            ValueError,
            r"values must be a non-empty 2-D array \(H', W'\), got \(4,\)",
        ),
        ((np.zeros((0, 3)), (4, 4)), {}, ValueError, r"values must be a non-empty 2-D array"),
        (
            (np.array([["a"]]), (4, 4)),
            {},
            TypeError,
            "values must hold integers or floats, got dtype <U1",
        ),
        (
            (np.ones((2, 2), bool), (4, 4)),
            {},
            TypeError,
            "values must hold integers or floats, got dtype bool",
        ),
        ((np.zeros((2, 2)), (4,)), {}, TypeError, r"image_size must be a pair \(H, W\) of ints"),
        ((np.zeros((2, 2)), (0, 4)), {}, ValueError, r"image_size\[0\] must be >= 1, got 0"),
        ((np.zeros((2, 2)), (4, 2.0)), {}, TypeError, r"image_size\[1\] must be an int"),
        (
            (np.zeros((2, 2)), (4, 4)),
            {"stride": 0},
            ValueError,
            r"stride must be in \(0.0, inf\), got 0",
        ),
        ((np.zeros((2, 2)), (4, 4)), {"stride": float("nan")}, ValueError, "stride must be in"),
        ((np.zeros((2, 2)), (4, 4)), {"stride": "2"}, TypeError, "stride must be a number"),
        (
            (np.zeros((2, 2)), (4, 4)),
            {"window": (0, 3)},
            ValueError,
            r"window\[0\] must be in \(0.0, inf\)",
        ),
        (
            (np.zeros((2, 2)), (4, 4)),
            {"window": (3, 3, 3)},
            TypeError,
            r"window must be a pair \(Th, Tw\)",
        ),
        (
            (np.zeros((2, 2)), (4, 4)),
            {"offset": (0, float("inf"))},
            ValueError,
            r"offset\[1\] must be in",
        ),
        ((np.zeros((2, 2)), (4, 4)), {"offset": 0}, TypeError, r"offset must be a pair \(y, x\)"),
    ],
)
def test_upsample_bad_arguments(args, kwargs, exc, message):
    kw = {"stride": 2, "window": (3, 3), **kwargs}
    with pytest.raises(exc, match=message):
        upsample_map(*args, **kw)


# ---------------------------------------------------------------------------------------------
# colorize
# ---------------------------------------------------------------------------------------------


def test_colour_map_endpoints_clipping_and_nan():
    values = np.array([[0.0, 1.0, -5.0, 7.0, np.nan, -np.inf, np.inf]])
    rgb = colorize(values)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 7, 3)
    assert [tuple(c) for c in rgb[0]] == [
        INFERNO_FIRST,
        INFERNO_LAST,
        INFERNO_FIRST,
        INFERNO_LAST,
        INFERNO_FIRST,
        INFERNO_FIRST,
        INFERNO_LAST,
    ]
    rgb = colorize(np.array([[2.0, 4.0]]), cmap="viridis", vmin=2, vmax=4)
    assert [tuple(c) for c in rgb[0]] == [VIRIDIS_FIRST, VIRIDIS_LAST]


def test_gray_is_the_identity_ramp_and_maps_are_monotone_in_lightness():
    values = np.arange(256, dtype=np.float64)[None] / 255  # (1, 256)
    gray = colorize(values, cmap="gray")
    np.testing.assert_array_equal(gray[0], np.repeat(np.arange(256)[:, None], 3, axis=1))
    for name in ("inferno", "viridis"):
        rgb = colorize(values, cmap=name)[0].astype(float)
        lightness = rgb @ [0.299, 0.587, 0.114]
        assert lightness[-1] > lightness[128] > lightness[0], name
        assert np.abs(np.diff(rgb, axis=0)).max() <= 20  # smooth: no jumps between entries
    assert CMAPS == ("inferno", "viridis", "gray")


def test_colorize_does_not_modify_its_input():
    values = np.array([[-1.0, 0.5, 2.0]], dtype=np.float32)
    before = values.copy()
    colorize(values)
    np.testing.assert_array_equal(values, before)


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"cmap": "jet"}, ValueError, "cmap must be one of inferno, viridis, gray; got 'jet'"),
        ({"cmap": None}, TypeError, "cmap must be a str, one of inferno, viridis, gray"),
        (
            {"vmin": 1.0, "vmax": 1.0},
            ValueError,
            "vmax must be greater than vmin, got vmin=1.0, vmax=1.0",
        ),
        ({"vmin": 2, "vmax": 1}, ValueError, "vmax must be greater than vmin"),
        ({"vmax": float("nan")}, ValueError, "vmax must be in"),
        ({"vmin": -1.7e308, "vmax": 1.7e308}, ValueError, "vmax - vmin must be finite"),
    ],
)
def test_colorize_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        colorize(np.zeros((2, 2)), **kwargs)


def test_colorize_bad_values():
    with pytest.raises(
        ValueError, match=r"values must be a non-empty 2-D array \(H, W\), got \(2, 2, 3\)"
    ):
        colorize(np.zeros((2, 2, 3)))
    with pytest.raises(
        TypeError, match="values must hold integers or floats, got dtype complex128"
    ):
        colorize(np.zeros((2, 2), complex))


# ---------------------------------------------------------------------------------------------
# overlay
# ---------------------------------------------------------------------------------------------


def images(H=5, W=7):
    """The same gray picture in every accepted layout and dtype, and its uint8 RGB."""
    rng = np.random.default_rng(4)
    u8 = rng.integers(0, 256, (H, W), dtype=np.uint8)
    f = u8.astype(np.float64) / 255
    rgb = np.repeat(u8[:, :, None], 3, axis=2)
    return [u8, u8[None], f, f[None].astype(np.float32), np.repeat(f[None], 3, axis=0)], rgb


def test_alpha_zero_gives_the_image_for_every_layout_and_dtype():
    layouts, rgb = images()
    heat = np.random.default_rng(5).random((5, 7))
    for image in layouts:
        before = image.copy()
        picture = overlay(image, heat, alpha=0.0)
        assert isinstance(picture, Image.Image) and picture.mode == "RGB"
        assert picture.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(picture), rgb, err_msg=str(image.shape))
        np.testing.assert_array_equal(image, before)


def test_colour_image_channels_stay_in_order():
    image = np.zeros((3, 2, 2), dtype=np.uint8)
    image[0] = 200  # red
    image[2, 1, 1] = 50
    got = np.asarray(overlay(image, np.zeros((2, 2)), alpha=0))
    assert got[0, 0].tolist() == [200, 0, 0] and got[1, 1].tolist() == [200, 0, 50]


def test_alpha_one_gives_the_colour_map():
    layouts, _ = images()
    heat = np.random.default_rng(6).random((5, 7))
    heat[0, 0] = np.nan
    want = colorize(heat, cmap="viridis", vmin=0.2, vmax=0.9)
    for image in layouts:
        got = overlay(image, heat, alpha=1, cmap="viridis", vmin=0.2, vmax=0.9)
        np.testing.assert_array_equal(np.asarray(got), want)
    assert tuple(want[0, 0]) == VIRIDIS_FIRST


def test_alpha_blends_linearly():
    image = np.full((2, 3), 100, dtype=np.uint8)
    heat = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    got = np.asarray(overlay(image, heat, alpha=0.25, cmap="gray"))
    want = np.where(heat[..., None] == 1, 0.75 * 100 + 0.25 * 255, 0.75 * 100)
    np.testing.assert_array_equal(got, np.rint(np.broadcast_to(want, (2, 3, 3))))


def test_float_image_round_off_is_clipped():
    image = np.array([[-1e-4, 1 + 1e-4]])
    got = np.asarray(overlay(image, np.zeros((1, 2)), alpha=0))
    assert got[0, :, 0].tolist() == [0, 255]


@pytest.mark.parametrize(
    "image, heat, kwargs, exc, message",
    [
        (
            np.zeros((2, 4, 4)),
            np.zeros((4, 4)),
            {},
            ValueError,
            r"image must be \(H, W\) or \(C, H, W\) with C in \{1, 3\}, got shape \(2, 4, 4\)",
        ),
        (
            np.zeros((4, 4, 3)),
            np.zeros((4, 4)),
            {},
            ValueError,
            r"with C in \{1, 3\}, got shape \(4, 4, 3\)",
        ),
        (np.zeros(4), np.zeros((4, 4)), {}, ValueError, r"image must be \(H, W\) or \(C, H, W\)"),
        (np.zeros((0, 4)), np.zeros((0, 4)), {}, ValueError, r"image must be \(H, W\)"),
        (
            np.zeros((4, 4), np.int32),
            np.zeros((4, 4)),
            {},
            TypeError,
            "image must be uint8 or float",
        ),
        ([[0.0]], np.zeros((1, 1)), {}, TypeError, "image must be a numpy.ndarray, got list"),
        (
            np.full((4, 4), 2.0),
            np.zeros((4, 4)),
            {},
            ValueError,
            r"image must hold float pixels in \[0, 1\] \(or be uint8\), got 16 values",
        ),
        (np.full((4, 4), np.nan), np.zeros((4, 4)), {}, ValueError, "image must hold float pixels"),
        (
            np.zeros((4, 4)),
            np.zeros((4, 5)),
            {},
            ValueError,
            r"heat must have the image's shape \(H, W\) = \(4, 4\), got \(4, 5\)",
        ),
        (
            np.zeros((4, 4)),
            np.zeros((1, 4, 4)),
            {},
            ValueError,
            "heat must be a non-empty 2-D array",
        ),
        (
            np.zeros((4, 4)),
            np.zeros((4, 4)),
            {"alpha": 1.5},
            ValueError,
            r"alpha must be in \[0.0, 1.0\], got 1.5",
        ),
        (
            np.zeros((4, 4)),
            np.zeros((4, 4)),
            {"alpha": -0.1},
            ValueError,
            r"alpha must be in \[0.0, 1.0\]",
        ),
        (np.zeros((4, 4)), np.zeros((4, 4)), {"alpha": None}, TypeError, "alpha must be a number"),
        (
            np.zeros((4, 4)),
            np.zeros((4, 4)),
            {"vmin": 1, "vmax": 0},
            ValueError,
            "vmax must be greater than vmin",
        ),
        (
            np.zeros((4, 4)),
            np.zeros((4, 4)),
            {"cmap": "Inferno"},
            ValueError,
            "cmap must be one of inferno, viridis, gray",
        ),
    ],
)
def test_overlay_bad_arguments(image, heat, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        overlay(image, heat, **kwargs)


# ---------------------------------------------------------------------------------------------
# heatmap_image, PNG
# ---------------------------------------------------------------------------------------------


def test_heatmap_image_is_upsample_then_overlay():
    rng = np.random.default_rng(7)
    image = rng.random((3, 12, 14))
    values = rng.random((3, 4))
    kw = {"stride": 3.0, "window": (6, 5), "offset": (0.5, 1.0)}
    picture = heatmap_image(image, values, alpha=0.6, cmap="viridis", vmin=0.1, vmax=0.8, **kw)
    heat = upsample_map(values, (12, 14), **kw)
    want = overlay(image, heat, alpha=0.6, cmap="viridis", vmin=0.1, vmax=0.8)
    assert picture.mode == "RGB" and picture.size == (14, 12)
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(want))


def test_zoom_enlarges_with_nearest_neighbour():
    image = np.random.default_rng(8).random((8, 8))
    values = np.random.default_rng(9).random((2, 2))
    small = np.asarray(heatmap_image(image, values, stride=2, window=6))
    big = heatmap_image(image, values, stride=2, window=6, zoom=4)
    assert big.size == (32, 32) and big.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(big), small.repeat(4, axis=0).repeat(4, axis=1))


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"zoom": 0}, ValueError, "zoom must be >= 1, got 0"),
        ({"zoom": 2.0}, TypeError, "zoom must be an int, got float"),
        ({"alpha": 2}, ValueError, "alpha must be in"),
        ({"cmap": "hot"}, ValueError, "cmap must be one of"),
        ({"vmin": 0.5, "vmax": 0.5}, ValueError, "vmax must be greater than vmin"),
        ({"stride": -1}, ValueError, "stride must be in"),
    ],
)
def test_heatmap_image_bad_arguments(kwargs, exc, message):
    kw = {"stride": 2, "window": 6, **kwargs}
    with pytest.raises(exc, match=message):
        heatmap_image(np.zeros((8, 8)), np.zeros((2, 2)), **kw)


def test_png_round_trip(tmp_path):
    image = np.random.default_rng(10).integers(0, 256, (3, 9, 11), dtype=np.uint8)
    picture = heatmap_image(image, np.eye(3), stride=2, window=5, zoom=2)
    data = png_bytes(picture)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG" and decoded.size == (22, 18) and decoded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(picture))
    path = save_png(picture, tmp_path / "map.png")
    assert path == tmp_path / "map.png" and path.read_bytes() == data
    assert save_png(picture, str(tmp_path / "again.png")).read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["again.png", "map.png"]  # no temporary left


def test_png_errors(tmp_path):
    picture = Image.new("RGB", (2, 2))
    with pytest.raises(TypeError, match="picture must be a PIL.Image.Image, got ndarray"):
        png_bytes(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(TypeError, match="picture must be a PIL.Image.Image"):
        save_png(None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="directory '.*missing' does not exist"):
        save_png(picture, tmp_path / "missing" / "x.png")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="does not exist"):
        save_png(picture, tmp_path / "file" / "x.png")
    with pytest.raises(TypeError, match="path must be a str or path, got int"):
        save_png(picture, 3)
    assert sorted(os.listdir(tmp_path)) == ["file"]
