"""Heatmap pictures of dense class-score maps, with Pillow and NumPy only (no matplotlib).

A dense score map has one cell per ``Th x Tw`` window of the image, at total stride ``S``:
cell ``(i, j)`` covers the box ``x`` in ``[ox + S*j, ox + S*j + Tw)``, ``y`` in
``[oy + S*i, oy + S*i + Th)`` of the image, where ``(oy, ox)`` is the offset of the first
window. To draw it over the image:

1. :func:`upsample_map` interpolates the map bilinearly back to one value per image pixel,
   placing each cell's value at the centre of its window;
2. :func:`colorize` maps values to colours through a small built-in colour map
   (``"inferno"``, ``"viridis"``, ``"gray"``);
3. :func:`overlay` blends the colours over the image;

:func:`heatmap_image` does the three (and an optional nearest-neighbour zoom for tiny images);
:func:`add_legend` writes the class label above a heatmap and its colour bar beside it;
:func:`png_bytes` / :func:`save_png` encode the picture. Work is done in float32, a block of
rows at a time, so that a 4096 x 4096 picture needs little more than its own memory.

Pixel coordinates are continuous: pixel ``x`` spans ``[x, x + 1)`` and its centre is
``x + 0.5``.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cnnserve import _draw
from cnnserve._checks import check_int, check_number, short
from cnnserve._files import atomic_write_bytes

__all__ = [
    "CMAPS",
    "MAX_PICTURE_PIXELS",
    "MAX_ZOOM",
    "add_legend",
    "check_picture_size",
    "colorize",
    "heatmap_image",
    "montage",
    "overlay",
    "png_bytes",
    "save_png",
    "upsample_map",
]

# Anchor colours of the colour maps, evenly spaced from the low end to the high end. inferno
# and viridis are the usual 10-step samples of matplotlib's maps; the LUTs interpolate them.
_ANCHORS: dict[str, tuple[str, ...]] = {
    "inferno": (
        "#000004",
        "#1b0c41",
        "#4a0c6b",
        "#781c6d",
        "#a52c60",
        "#cf4446",
        "#ed6925",
        "#fb9b06",
        "#f7d13d",
        "#fcffa4",
    ),
    "viridis": (
        "#440154",
        "#482878",
        "#3e4989",
        "#31688e",
        "#26828e",
        "#1f9e89",
        "#35b779",
        "#6ece58",
        "#b5de2b",
        "#fde725",
    ),
    "gray": ("#000000", "#ffffff"),
}

#: Names of the built-in colour maps.
CMAPS = tuple(_ANCHORS)
#: The largest picture heatmap_image draws (width x height after the zoom): 384 MiB of RGB.
MAX_PICTURE_PIXELS = 2**27
#: The largest enlargement of a picture (each pixel a 64 x 64 square): 8 x 8 -> 512 x 512.
MAX_ZOOM = 64

_LUT_SIZE = 256
# Rows of a block: about this many bytes per float32 row-block temporary.
_BLOCK_BYTES = 4 << 20
# Slack accepted on float images in [0, 1] (the round-off of un-normalising data); clipped.
_X01_SLACK = 1e-3
# A continuous cell index this close to an integer is that integer (exact values at centres).
_SNAP = 1e-9


def _build_lut(anchors: tuple[str, ...]) -> np.ndarray:
    """(256, 3) uint8: the anchors linearly interpolated, first and last entries exact."""
    rgb = np.array([[int(a[k : k + 2], 16) for k in (1, 3, 5)] for a in anchors], np.float64)
    where = np.linspace(0.0, _LUT_SIZE - 1, len(anchors))  # LUT index of each anchor
    at = np.arange(_LUT_SIZE, dtype=np.float64)
    lut = np.stack([np.interp(at, where, rgb[:, c]) for c in range(3)], axis=1)  # (256, 3)
    lut = np.rint(lut).astype(np.uint8)
    lut.setflags(write=False)
    return lut


_LUTS = {name: _build_lut(anchors) for name, anchors in _ANCHORS.items()}


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _real_array(a: Any, name: str, shape_text: str, ndim: int) -> np.ndarray:
    """``a`` as an array of integers or floats with ``ndim`` dimensions, none of them empty."""
    arr = np.asarray(a) if not isinstance(a, np.ndarray) else a
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold integers or floats, got dtype {arr.dtype}")
    if arr.ndim != ndim or 0 in arr.shape:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array {shape_text}, got {arr.shape}")
    return arr


def _pair(value: Any, name: str, what: str) -> tuple[Any, Any]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise TypeError(f"{name} must be a pair {what}, got {short(repr(value))}")
    return value[0], value[1]


def _check_size(image_size: Any) -> tuple[int, int]:
    h, w = _pair(image_size, "image_size", "(H, W) of ints")
    return check_int(h, "image_size[0]", 1), check_int(w, "image_size[1]", 1)


def _check_geometry(stride: Any, window: Any, offset: Any) -> tuple[float, ...]:
    """``(stride, Th, Tw, oy, ox)`` checked: positive finite stride and window, finite offset."""
    s = check_number(stride, "stride", 0.0, math.inf, "()")
    if isinstance(window, tuple | list):
        th, tw = _pair(window, "window", "(Th, Tw) of numbers")
    else:
        th = tw = window
    th = check_number(th, "window[0]", 0.0, math.inf, "()")
    tw = check_number(tw, "window[1]", 0.0, math.inf, "()")
    oy, ox = _pair(offset, "offset", "(y, x) of numbers")
    oy = check_number(oy, "offset[0]", -math.inf, math.inf, "()")
    ox = check_number(ox, "offset[1]", -math.inf, math.inf, "()")
    return s, th, tw, oy, ox


def _check_range(vmin: Any, vmax: Any) -> tuple[float, float]:
    lo = check_number(vmin, "vmin", -math.inf, math.inf, "()")
    hi = check_number(vmax, "vmax", -math.inf, math.inf, "()")
    if not hi > lo:
        raise ValueError(f"vmax must be greater than vmin, got vmin={lo}, vmax={hi}")
    if not math.isfinite(hi - lo):
        raise ValueError(f"vmax - vmin must be finite, got vmin={lo}, vmax={hi}")
    return lo, hi


def _check_cmap(cmap: Any) -> np.ndarray:
    if not isinstance(cmap, str):
        raise TypeError(f"cmap must be a str, one of {', '.join(CMAPS)}; got {type(cmap).__name__}")
    if cmap not in _LUTS:
        raise ValueError(f"cmap must be one of {', '.join(CMAPS)}; got {short(repr(cmap))}")
    return _LUTS[cmap]


def _block_rows(width: int, channels: int = 1) -> int:
    return max(1, _BLOCK_BYTES // (4 * channels * max(1, width)))


# ---------------------------------------------------------------------------------------------
# Upsampling
# ---------------------------------------------------------------------------------------------


def _axis_weights(
    n_out: int, n_cells: int, stride: float, window: float, offset: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output pixel along one axis: the two cells to blend and the weight of the second.

    Returns ``(i0, i1, w)``, each of shape ``(n_out,)``: value ``(1 - w) * v[i0] + w * v[i1]``.
    Where ``w == 0`` (a pixel at a cell centre, or clamped beyond the outermost centres),
    ``i1 == i0``.
    """
    centres = np.arange(n_out, dtype=np.float64) + 0.5
    t = (centres - offset - window / 2) / stride  # continuous cell index, (n_out,)
    t = np.clip(t, 0.0, n_cells - 1)
    near = np.rint(t)
    t = np.where(np.abs(t - near) < _SNAP, near, t)
    i0 = np.floor(t).astype(np.intp)
    w = t - i0
    i1 = np.where(w > 0, np.minimum(i0 + 1, n_cells - 1), i0)
    return i0, i1, w.astype(np.float32)


def upsample_map(
    values: Any,
    image_size: tuple[int, int],
    *,
    stride: float,
    window: tuple[float, float] | float,
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Interpolate a dense score map back to one value per image pixel.

    Cell ``(i, j)`` of the map covers the image box ``x`` in ``[ox + stride*j, ox + stride*j +
    Tw)``, ``y`` in ``[oy + stride*i, oy + stride*i + Th)``; its value is placed at the centre
    of that box, ``(oy + stride*i + Th/2, ox + stride*j + Tw/2)`` in continuous pixel
    coordinates (pixel ``x`` spans ``[x, x + 1)``, its centre is ``x + 0.5``). Each pixel takes
    the bilinear interpolation of the four cell centres around its own centre; pixels beyond the
    outermost centres take the value of the nearest cell (clamped). A pixel whose centre is a
    cell centre gets exactly that cell's value. NaN cells spread to the pixels whose value
    depends on them (those with a nonzero weight on them).

    The interpolation is separable (along rows, then along columns, with precomputed indices
    and weights) and done in float32 a block of rows at a time, so that the memory used is
    about the map, one intermediate ``(H', W)`` array and the result.

    Parameters
    ----------
    values : array_like
        The map, 2-D of integers or floats, shape ``(H', W')``. Not modified.
    image_size : (int, int)
        ``(H, W)`` of the image the map was computed on.
    stride : float
        Distance in image pixels between neighbouring cells (the network's total stride,
        divided by the scale for a map of a rescaled image). Positive.
    window : (float, float) or float
        ``(Th, Tw)``, the size in image pixels of the window each cell covers; one number
        means a square window. Positive.
    offset : (float, float), optional
        ``(y, x)`` of the top-left corner of cell ``(0, 0)``'s window. May be negative.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(H, W)``.

    Raises
    ------
    TypeError
        ``values`` does not hold numbers, or an argument has the wrong type.
    ValueError
        ``values`` is not 2-D or is empty; a size, stride or window that is not positive; a
        non-finite number.

    Shape
    -----
    ``(H', W')`` -> ``(H, W)`` with ``(H, W) = image_size``. Pixel ``x``'s continuous cell
    index is ``(x + 0.5 - ox - Tw/2) / stride``, clamped to ``[0, W' - 1]`` (likewise ``y``).
    """
    v = _real_array(values, "values", "(H', W')", 2)
    H, W = _check_size(image_size)
    s, th, tw, oy, ox = _check_geometry(stride, window, offset)
    Hc, Wc = v.shape
    v = v.astype(np.float32, copy=False)  # never written to
    x0, x1, wx = _axis_weights(W, Wc, s, tw, ox)
    y0, y1, wy = _axis_weights(H, Hc, s, th, oy)

    with np.errstate(invalid="ignore"):  # inf * 0 where the weight is 0: fixed up below
        return _upsample(v, H, W, (x0, x1, wx), (y0, y1, wy))


def _upsample(v: np.ndarray, H: int, W: int, xs: tuple, ys: tuple) -> np.ndarray:
    """The two separable passes of :func:`upsample_map`, a block of rows at a time."""
    (x0, x1, wx), (y0, y1, wy) = xs, ys
    Hc = v.shape[0]
    exact_x = wx == 0
    exact_y = wy == 0
    one_wx = 1 - wx

    # Along rows: (H', W') -> (H', W).
    rows = np.empty((Hc, W), dtype=np.float32)
    step = _block_rows(W)
    for r in range(0, Hc, step):
        src = v[r : r + step]  # (h, W')
        out = src[:, x0]  # (h, W), a new array
        out *= one_wx
        second = src[:, x1]
        second *= wx
        out += second
        out[:, exact_x] = src[:, x0[exact_x]]  # exact (even for inf) where the weight is 0
        rows[r : r + step] = out

    # Along columns: (H', W) -> (H, W).
    result = np.empty((H, W), dtype=np.float32)
    for r in range(0, H, step):
        sl = slice(r, r + step)
        out = rows[y0[sl]]  # (h, W)
        out *= (1 - wy[sl])[:, None]
        second = rows[y1[sl]]
        second *= wy[sl][:, None]
        out += second
        exact = exact_y[sl]
        out[exact] = rows[y0[sl][exact]]
        result[sl] = out
    return result


# ---------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------


def _lut_index(block: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """uint8 LUT index of each value: vmin -> 0, vmax -> 255, NaN -> 0."""
    t = np.clip(block.astype(np.float64), vmin, vmax)  # a copy: the input is not touched
    t -= vmin
    t *= (_LUT_SIZE - 1) / (vmax - vmin)
    np.rint(t, out=t)
    np.clip(t, 0, _LUT_SIZE - 1, out=t)  # round-off of a huge range
    t[np.isnan(t)] = 0
    return t.astype(np.uint8)


def colorize(
    values: Any, *, cmap: str = "inferno", vmin: float = 0.0, vmax: float = 1.0
) -> np.ndarray:
    """Map values to colours through a built-in colour map.

    Values are clipped to ``[vmin, vmax]`` and scaled linearly to a 256-entry table
    interpolated between the colour map's anchor colours: ``vmin`` (and below) gives the first
    anchor, ``vmax`` (and above) the last. NaN gives the first colour.

    Parameters
    ----------
    values : array_like
        2-D integers or floats, shape ``(H, W)``. Not modified.
    cmap : {"inferno", "viridis", "gray"}, optional
        The colour map (see :data:`CMAPS`).
    vmin, vmax : float, optional
        The values mapped to the two ends of the colour map; finite, ``vmax > vmin``.

    Returns
    -------
    numpy.ndarray
        uint8 RGB, shape ``(H, W, 3)``.

    Raises
    ------
    TypeError
        ``values`` does not hold numbers, or an argument has the wrong type.
    ValueError
        ``values`` is not 2-D or is empty, an unknown ``cmap`` (the message lists the names),
        ``vmax <= vmin`` or a non-finite bound.

    Shape
    -----
    ``(H, W)`` -> ``(H, W, 3)``.
    """
    lut = _check_cmap(cmap)
    lo, hi = _check_range(vmin, vmax)
    v = _real_array(values, "values", "(H, W)", 2)
    H, W = v.shape
    out = np.empty((H, W, 3), dtype=np.uint8)
    step = _block_rows(W, 2)  # float64 temporaries
    for r in range(0, H, step):
        out[r : r + step] = lut[_lut_index(v[r : r + step], lo, hi)]
    return out


def _check_image(image: Any) -> np.ndarray:
    """``image`` as (C, H, W) with C in {1, 3}, uint8 or float (range checked); not copied."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy.ndarray, got {type(image).__name__}")
    if image.dtype != np.uint8 and image.dtype.kind != "f":
        raise TypeError(f"image must be uint8 or float (pixels in [0, 1]), got {image.dtype}")
    shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[0] in (1, 3))
    if not shape_ok or 0 in image.shape:
        raise ValueError(
            f"image must be (H, W) or (C, H, W) with C in {{1, 3}}, got shape {image.shape}"
        )
    img = image if image.ndim == 3 else image[None]  # (C, H, W)
    if img.dtype.kind == "f":
        outside = ~((img >= -_X01_SLACK) & (img <= 1 + _X01_SLACK))  # NaN is outside too
        if outside.any():
            raise ValueError(
                "image must hold float pixels in [0, 1] (or be uint8), got "
                f"{int(outside.sum())} values outside, e.g. {img[outside][0]}"
            )
    return img


def _blend(img: np.ndarray, heat: np.ndarray, alpha: float, lut, lo: float, hi: float):
    """(H, W, 3) uint8: ``(1 - alpha) * image + alpha * colours``, a block of rows at a time."""
    C, H, W = img.shape
    out = np.empty((H, W, 3), dtype=np.uint8)
    scale = 1.0 if img.dtype == np.uint8 else 255.0
    step = _block_rows(W, 3)
    for r in range(0, H, step):
        sl = slice(r, r + step)
        base = img[:, sl].astype(np.float32)  # (C, h, W), a copy
        if scale != 1.0:
            np.clip(base, 0.0, 1.0, out=base)
            base *= scale
        base = np.moveaxis(base, 0, -1)  # (h, W, C): broadcasts over RGB when C == 1
        colour = lut[_lut_index(heat[sl], lo, hi)].astype(np.float32)  # (h, W, 3)
        colour *= alpha
        mixed = colour + base * np.float32(1 - alpha)  # (h, W, 3)
        np.rint(mixed, out=mixed)
        np.clip(mixed, 0, 255, out=mixed)
        out[sl] = mixed
    return out


def _check_overlay(alpha: Any, cmap: Any, vmin: Any, vmax: Any):
    """``(alpha, lut, vmin, vmax)`` checked."""
    lut = _check_cmap(cmap)
    lo, hi = _check_range(vmin, vmax)
    a = check_number(alpha, "alpha", 0.0, 1.0, "[]")
    return a, lut, lo, hi


def overlay(
    image: np.ndarray,
    heat: Any,
    *,
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Image.Image:
    """Blend a colourised heat map over an image.

    The result is ``(1 - alpha) * image + alpha * colorize(heat)``, rounded to 8 bits, where a
    gray image is replicated to three channels and a float image is scaled by 255.

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)`` or ``(C, H, W)`` with ``C`` 1 (gray) or 3 (RGB); uint8, or floats in
        [0, 1] (values up to 1e-3 outside are clipped: the round-off of un-normalised data).
        Not modified.
    heat : array_like
        Values per pixel, integers or floats, shape ``(H, W)``; NaN gives the first colour.
    alpha : float, optional
        Weight of the heat colours, in [0, 1]: 0 gives the image, 1 the colour map alone.
    cmap : {"inferno", "viridis", "gray"}, optional
        The colour map.
    vmin, vmax : float, optional
        The heat values mapped to the two ends of the colour map; ``vmax > vmin``.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, ``W`` pixels wide and ``H`` high.

    Raises
    ------
    TypeError
        ``image`` is not a uint8 or float array, or another argument has the wrong type.
    ValueError
        A wrong shape (or ``heat`` of another size than the image), float pixels outside
        [0, 1] or NaN, ``alpha`` outside [0, 1], ``vmax <= vmin``, an unknown ``cmap``.

    Shape
    -----
    ``(H, W)`` or ``(C, H, W)`` image and ``(H, W)`` heat -> an RGB picture of ``W x H``.
    """
    a, lut, lo, hi = _check_overlay(alpha, cmap, vmin, vmax)
    img = _check_image(image)
    h = _real_array(heat, "heat", "(H, W)", 2)
    if h.shape != img.shape[1:]:
        raise ValueError(
            f"heat must have the image's shape (H, W) = {img.shape[1:]}, got {h.shape}"
        )
    return Image.fromarray(_blend(img, h, a, lut, lo, hi))


def check_picture_size(height: int, width: int, zoom: int = 1, *, name: str = "zoom") -> None:
    """Refuse a picture of an image enlarged ``zoom`` times with more than
    ``MAX_PICTURE_PIXELS`` pixels, or a ``zoom`` over ``MAX_ZOOM``: the one set of limits of
    the CLI, the service and the library.

    Raises
    ------
    ValueError
        The message names the option (``name``) and the picture's size, H x W.
    """
    if height * width * zoom * zoom > MAX_PICTURE_PIXELS:
        raise ValueError(
            f"{name} {zoom} would make a {height * zoom}x{width * zoom} (HxW) picture, more than "
            f"{MAX_PICTURE_PIXELS:,} pixels"
        )
    if zoom > MAX_ZOOM:
        raise ValueError(f"{name} must be at most {MAX_ZOOM}, got {zoom}")


def montage(panels: list[Image.Image], columns: int, gap: int = 4) -> Image.Image:
    """Pictures of one size in a grid of ``columns``, ``gap`` pixels apart, on white.

    Shape
    -----
    ``n`` panels of ``w x h`` -> ``columns * w + (columns - 1) * gap`` wide and
    ``rows * h + (rows - 1) * gap`` high, ``rows = ceil(n / columns)``.
    """
    width, height = panels[0].size
    rows = -(-len(panels) // columns)
    sheet = Image.new(
        "RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white"
    )
    for k, panel in enumerate(panels):
        sheet.paste(panel, ((k % columns) * (width + gap), (k // columns) * (height + gap)))
    return sheet


def heatmap_image(
    image: np.ndarray,
    values: Any,
    *,
    stride: float,
    window: tuple[float, float] | float,
    offset: tuple[float, float] = (0.0, 0.0),
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmin: float = 0.0,
    vmax: float = 1.0,
    zoom: int = 1,
    legend: str | None = None,
) -> Image.Image:
    """Draw a dense score map over the image it was computed on.

    :func:`upsample_map` brings the map to the image's size, :func:`overlay` blends it over
    the image, and ``zoom`` enlarges the picture by an integer factor (nearest neighbour, so
    that each pixel becomes a ``zoom x zoom`` square: tiny images need it to be seen).

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)`` or ``(C, H, W)``, ``C`` in {1, 3}; uint8 or floats in [0, 1]. Not
        modified.
    values : array_like
        The map, shape ``(H', W')`` (e.g. one class's probabilities). Not modified.
    stride, window, offset
        The map's geometry, as for :func:`upsample_map`.
    alpha, cmap, vmin, vmax
        As for :func:`overlay`.
    zoom : int, optional
        Enlargement factor, >= 1.
    legend : str, optional
        A title (e.g. ``"class '3': probability"``): :func:`add_legend` writes it above the
        picture and draws the colour bar beside it.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, ``W * zoom`` pixels wide and ``H * zoom`` high (larger with a
        legend).

    Raises
    ------
    TypeError, ValueError
        As for :func:`upsample_map` and :func:`overlay`; ``zoom`` not an int >= 1, or a
        picture of more than ``MAX_PICTURE_PIXELS`` pixels.

    Shape
    -----
    Image ``(H, W)`` or ``(C, H, W)``, map ``(H', W')`` -> an RGB picture of
    ``(W * zoom) x (H * zoom)``.
    """
    zoom = check_int(zoom, "zoom", 1)
    a, lut, lo, hi = _check_overlay(alpha, cmap, vmin, vmax)
    img = _check_image(image)
    _, H, W = img.shape
    check_picture_size(H, W, zoom)
    heat = upsample_map(values, (H, W), stride=stride, window=window, offset=offset)
    picture = Image.fromarray(_blend(img, heat, a, lut, lo, hi))
    if zoom > 1:
        picture = picture.resize((W * zoom, H * zoom), Image.Resampling.NEAREST)
    if legend is not None:
        picture = add_legend(picture, legend, cmap=cmap, vmin=lo, vmax=hi)
    return picture


def add_legend(
    picture: Image.Image, title: str, *, cmap: str = "inferno", vmin: float = 0.0, vmax: float = 1.0
) -> Image.Image:
    """A heatmap with ``title`` above it and its colour bar, ticked, on its right.

    Returns
    -------
    PIL.Image.Image
        RGB, on white; the heatmap unchanged at ``(6, title height)``.

    Shape
    -----
    A ``w x h`` picture -> about ``(w + 60 + tick labels) x (h + 26)``, at least 120 high.
    """
    if not isinstance(picture, Image.Image):
        raise TypeError(f"picture must be a PIL.Image.Image, got {type(picture).__name__}")
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    lo, hi = _check_range(vmin, vmax)
    f = _draw.font(13)
    m, bar_w = 6, 14
    top = m + _draw.line_height(f) + m
    w, h = picture.size
    bar_h = max(h, 120)
    ticks = [hi, (lo + hi) / 2, lo]
    labels = [f"{t:.3g}" for t in ticks]
    bar_x = m + w + 10
    width = max(bar_x + bar_w + 6 + max(_draw.text_width(t, f) for t in labels) + m,
                _draw.text_width(title, f) + 2 * m)  # fmt: skip
    sheet = Image.new("RGB", (width, top + bar_h + 2 * m), "white")
    sheet.paste(picture.convert("RGB"), (m, top))
    levels = np.linspace(hi, lo, bar_h)[:, None].repeat(bar_w, axis=1)  # (bar_h, bar_w)
    sheet.paste(Image.fromarray(colorize(levels, cmap=cmap, vmin=lo, vmax=hi)), (bar_x, top))
    draw = ImageDraw.Draw(sheet)
    draw.rectangle([bar_x - 1, top - 1, bar_x + bar_w, top + bar_h], outline=_draw.INK)
    _draw.text(draw, (m, m), title, f)
    for k, label in enumerate(labels):
        y = top + k * (bar_h - 1) / 2
        draw.line([(bar_x + bar_w, y), (bar_x + bar_w + 3, y)], fill=_draw.INK)
        _draw.text(draw, (bar_x + bar_w + 6, y), label, f, "lm")
    return sheet


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def png_bytes(picture: Image.Image) -> bytes:
    """Encode a picture as PNG.

    Parameters
    ----------
    picture : PIL.Image.Image
        E.g. the result of :func:`heatmap_image`.

    Returns
    -------
    bytes
        The PNG file's bytes.

    Raises
    ------
    TypeError
        ``picture`` is not a PIL image.

    Shape
    -----
    The PNG has the picture's size and mode.
    """
    if not isinstance(picture, Image.Image):
        raise TypeError(f"picture must be a PIL.Image.Image, got {type(picture).__name__}")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(picture: Image.Image, path: str | os.PathLike) -> Path:
    """Write a picture to a PNG file, atomically (the old file or the new, never half of one).

    Parameters
    ----------
    picture : PIL.Image.Image
        E.g. the result of :func:`heatmap_image`.
    path : str or os.PathLike
        The file to write; its directory must exist.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    TypeError
        ``picture`` is not a PIL image, or ``path`` is not a str or path.
    ValueError
        The directory of ``path`` does not exist (or is not a directory).

    Shape
    -----
    The PNG has the picture's size and mode.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or path, got {type(path).__name__}")
    path = Path(path)
    data = png_bytes(picture)
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r}: directory {str(path.parent)!r} does not exist")
    return atomic_write_bytes(path, data)
