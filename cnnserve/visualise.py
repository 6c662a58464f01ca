"""Inside the network: every layer's activations for one image, and the learned filters.

The source notes teach a ConvNet through two kinds of pictures, drawn here with Pillow and
NumPy only:

- :func:`activations` runs one image through a network layer by layer (test mode) and keeps
  every layer's output, in order, with its name and shape; :func:`activation_grid` draws one
  picture per layer: each channel of a ``(C, H, W)`` volume is a grey tile scaled to its own
  minimum and maximum (black to white), enlarged by a whole factor and labelled with the
  layer and its shape; a vector layer is drawn as bars, and the classifier's scores as the
  bars of their softmax probabilities with the class names. :func:`activation_sheet` stacks
  the pictures into one (the notes' figure: input, conv, relu, pool, ..., scores).
- :func:`filter_grid` draws a conv layer's weights: the first conv layer's filters as RGB
  (three input channels) or grey tiles, each filter scaled to its own minimum and maximum
  over all its channels (CS231n's ``visualize_grid`` normalisation); a later layer's filters
  one tile per input channel, a row per filter, scaled the same way.

Layers are numbered as in :meth:`ConvNet.summary() <cnnserve.network.ConvNet.summary>` and
``cnnserve info`` (0 is the first layer); the input is ``"input"``. Filters are numbered as
their weights, ``W1`` (``layer=1``) being the first layer with weights.

Every picture is checked against :data:`cnnserve.heatmap.MAX_PICTURE_PIXELS` before it is
drawn, the limit of the heatmaps.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cnnserve import _draw, heatmap
from cnnserve._checks import check_int
from cnnserve.convert import FullyConvNet
from cnnserve.images import model_pixels, resize
from cnnserve.network import ConvNet, layer_forward
from cnnserve.specs import describe_spec, shape_text

__all__ = [
    "TILE_RANGE",
    "Activation",
    "LayerPicture",
    "activation_grid",
    "activation_sheet",
    "activations",
    "channel_tiles",
    "check_grid_size",
    "filter_grid",
    "layer_choices",
    "select_layers",
    "trained_network",
]

#: The smallest and largest tile a grid accepts, in pixels of its long side.
TILE_RANGE = (4, 512)

_BACKGROUND = (255, 255, 255)
_GAP_COLOUR = (200, 200, 200)
_BAR = (31, 119, 180)
_BAR_NEGATIVE = (214, 39, 40)
_TOP = (255, 127, 14)
_GAP = 2  # pixels between tiles
_MARGIN = 6  # pixels around a picture's content
_FONT = 13
_SMALL = 11


# ---------------------------------------------------------------------------------------------
# The network and its activations
# ---------------------------------------------------------------------------------------------

_REBUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REBUILT_LOCK = threading.Lock()


def trained_network(model: ConvNet | FullyConvNet) -> ConvNet:
    """The trained network of a model: itself, or the one a converted network came from.

    A :class:`~cnnserve.convert.FullyConvNet` keeps the original architecture and weights
    (affine weights reshaped to conv shapes, batchnorm statistics unfolded): the network is
    rebuilt from them exactly, once per converted network (cached while it lives), so that
    every layer of the original, even a batchnorm folded into its conv or a dropout the
    conversion dropped, has its own output.

    Returns
    -------
    ConvNet
        Test-mode use only: shared between callers, never to be trained.

    Raises
    ------
    TypeError
        ``model`` is neither a ConvNet nor a FullyConvNet.
    """
    if isinstance(model, ConvNet):
        return model
    if not isinstance(model, FullyConvNet):
        raise TypeError(f"model must be a ConvNet or a FullyConvNet, got {type(model).__name__}")
    with _REBUILT_LOCK:
        net = _REBUILT.get(model)
        if net is None:
            net = ConvNet.from_config(
                model.config, class_names=model.class_names, normalization=model.normalization
            )
            for name, value in net.params.items():
                stored = model.params[name]
                if stored.shape != value.shape:  # an affine weight (U, C, Hf, Wf) -> (D, U)
                    stored = stored.reshape(stored.shape[0], -1).T
                net.params[name] = np.array(stored, dtype=net.dtype, order="C")
            for bn in net.bn_params:
                bn["running_mean"] = np.array(model.params[f"running_mean{bn['name']}"])
                bn["running_var"] = np.array(model.params[f"running_var{bn['name']}"])
            _REBUILT[model] = net
    return net


@dataclass(frozen=True, eq=False)
class Activation:
    """One layer's output for one image.

    Attributes
    ----------
    index : int or None
        The layer's index (as in ``ConvNet.summary()``); None for the input.
    name : str
        ``"input"``, ``"conv 16 3x3 s1 p0"``, ``"relu"``, ..., ``"scores"`` (the classifier).
    kind : str
        The spec's type (``"input"`` for the input, ``"affine"`` for the classifier).
    values : ndarray
        float32, shape :attr:`shape`: the layer's output (the input: the image's pixels in
        [0, 1], which the network sees normalised).
    """

    index: int | None
    name: str
    kind: str
    values: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of a volume or ``(D,)`` of a vector."""
        return tuple(self.values.shape)

    @property
    def key(self) -> str:
        """How the layer is named in ``layers=``: ``"input"`` or its index."""
        return "input" if self.index is None else str(self.index)

    @property
    def title(self) -> str:
        """``"3  max_pool 2x2 s2  (16, 3, 3)"``: the label of the layer's picture."""
        where = "input" if self.index is None else f"{self.index}  {self.name}"
        return f"{where}  {shape_text(self.shape)}"

    def channel_stats(self) -> dict[str, np.ndarray]:
        """Per channel of a volume (per unit of a vector): ``min``, ``max``, ``mean``, ``std``
        and ``zero_fraction`` (the share of exact zeros, e.g. of a ReLU), each float32 of
        shape ``(C,)`` (``(D,)``)."""
        v = self.values.reshape(self.values.shape[0], -1).astype(np.float64)  # (C, H*W)
        return {
            "min": v.min(axis=1).astype(np.float32),
            "max": v.max(axis=1).astype(np.float32),
            "mean": v.mean(axis=1).astype(np.float32),
            "std": v.std(axis=1).astype(np.float32),
            "zero_fraction": (v == 0).mean(axis=1).astype(np.float32),
        }


def activations(model: ConvNet | FullyConvNet, image: Any) -> list[Activation]:
    """Every layer's output for one image, in the network's layer order.

    Parameters
    ----------
    model : ConvNet or FullyConvNet
        A trained network, or a converted one (its trained network is rebuilt,
        :func:`trained_network`). Runs in test mode: batchnorm uses its running statistics,
        dropout is the identity.
    image : ndarray
        ``(H, W)`` or ``(C, H, W)``, C 1 or 3 (converted to the model's channels); uint8
        pixels or floats in [0, 1]. An image of another size than the training size is
        resized to it (bilinear), as ``/predict`` does.

    Returns
    -------
    list of Activation
        The input first, then one per layer; the last is the classifier's scores ``(K,)``.

    Raises
    ------
    TypeError, ValueError
        A bad model or image (shape, channels, dtype, range).

    Shape
    -----
    Layer ``k``'s activation has ``model.info[k].out_shape``.
    """
    net = trained_network(model)
    pixels, _ = model_pixels(image, net.input_shape[0])  # (C, H, W) float32 in [0, 1]
    if pixels.shape != net.input_shape:
        pixels = resize(pixels, net.input_shape[1], net.input_shape[2])
    out = net.preprocess(pixels[None])  # (1, C, H, W)
    found = [Activation(None, "input", "input", pixels)]
    last = len(net.info) - 1
    for info in net.info:
        kind = info.spec["type"]
        weights = [net.params[name] for name in info.param_names]
        options: dict[str, Any] = {}
        if info.bn_index is not None:
            bn = net.bn_params[info.bn_index]
            options["bn_param"] = {
                "mode": "test",
                "eps": bn["eps"],
                "momentum": bn["momentum"],
                "running_mean": bn["running_mean"],
                "running_var": bn["running_var"],
            }
        out = layer_forward(info.spec, out, weights, **options)[0]
        name = "scores" if info.index == last else describe_spec(info.spec)
        values = np.array(out[0], dtype=np.float32)  # (C, H, W) or (D,)
        found.append(Activation(info.index, name, kind, values))
    return found


def layer_choices(found: Sequence[Activation]) -> str:
    """The valid ``layers=`` values, for error messages: ``input, 0 (conv ...), 1 (relu)``."""
    return ", ".join(a.key if a.index is None else f"{a.key} ({a.name})" for a in found)


def select_layers(found: Sequence[Activation], layers: Any) -> list[Activation]:
    """The activations named by ``layers``: None (all), or indices and ``"input"``.

    Parameters
    ----------
    found : list of Activation
        From :func:`activations`.
    layers : None, int, str or sequence of int or str
        Layer indices (as in ``ConvNet.summary()``), ``"input"``, or a text such as
        ``"input,0,3"``. Kept in the order given, without repeats.

    Returns
    -------
    list of Activation
        Elements of ``found`` (the same objects).

    Raises
    ------
    ValueError
        An index out of range or a name that is no layer; the message lists the valid ones.
    TypeError
        Not an int, str or sequence of them.
    """
    if layers is None:
        return list(found)
    if isinstance(layers, str):
        layers = [part.strip() for part in layers.split(",")]
    elif isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"layers must be layer indices or 'input', got {layers!r}")
    by_key = {a.key: a for a in found}
    chosen: list[Activation] = []
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, int | str | np.integer):
            raise TypeError(f"layers must be layer indices or 'input', got {item!r}")
        key = str(item).strip().lower()
        if key not in by_key:
            raise ValueError(
                f"layer {str(item)!r} is not a layer of this network; the layers are "
                f"{layer_choices(found)}"
            )
        if by_key[key] not in chosen:
            chosen.append(by_key[key])
    return chosen


# ---------------------------------------------------------------------------------------------
# Tiles and sizes
# ---------------------------------------------------------------------------------------------


def channel_tiles(values: np.ndarray) -> np.ndarray:
    """Each channel scaled to its own range: ``rint(255 * (v - min) / (max - min))``.

    A constant channel (such as a ReLU's dead channel, all zeros) is black.

    Parameters
    ----------
    values : ndarray, shape (C, H, W)

    Returns
    -------
    ndarray
        uint8, shape ``(C, H, W)``.
    """
    v = np.asarray(values, dtype=np.float64)
    low = v.min(axis=(1, 2), keepdims=True)
    span = v.max(axis=(1, 2), keepdims=True) - low
    scaled = np.divide(v - low, span, out=np.zeros_like(v), where=span > 0)
    return np.rint(scaled * 255).astype(np.uint8)


def check_grid_size(width: int, height: int, what: str) -> None:
    """Refuse a picture of more than :data:`~cnnserve.heatmap.MAX_PICTURE_PIXELS` pixels
    (the heatmaps' limit).

    Raises
    ------
    ValueError
        Naming ``what`` and the picture's size, W x H.
    """
    limit = heatmap.MAX_PICTURE_PIXELS  # read at each call: one limit for every picture
    if width * height > limit:
        raise ValueError(
            f"{what} would be a {width}x{height} picture, more than {limit:,} "
            "pixels; ask for fewer layers or a smaller tile"
        )


def _zoom(h: int, w: int, tile: int) -> int:
    """The whole enlargement that makes an ``h x w`` map about ``tile`` pixels on its long side."""
    return max(1, -(-tile // max(h, w)))


def _columns(n: int, tile_w: int, max_width: int) -> int:
    """Columns of a near-square grid of n tiles, at most ``max_width`` pixels wide."""
    square = math.ceil(math.sqrt(n))
    fit = max(1, (max_width - 2 * _MARGIN + _GAP) // (tile_w + _GAP))
    return max(1, min(n, square if square * (tile_w + _GAP) <= max_width else fit))


@dataclass(frozen=True, eq=False)
class LayerPicture:
    """One layer's picture and where each channel's tile is in it.

    Attributes
    ----------
    activation : Activation
    picture : PIL.Image.Image
        RGB.
    tiles : tuple of (x0, y0, x1, y1)
        The box of channel ``c``'s tile, ``tiles[c]`` (empty for a vector layer, drawn as
        bars). Each tile is the channel of :func:`channel_tiles`, each value a
        ``zoom x zoom`` square; an RGB input is one tile.
    zoom : int
    """

    activation: Activation
    picture: Image.Image
    tiles: tuple[tuple[int, int, int, int], ...]
    zoom: int


def _grid_layout(n: int, tile_h: int, tile_w: int, columns: int, top: int):
    """``(width, height, boxes)`` of n tiles in ``columns`` below a ``top``-pixel title."""
    rows = -(-n // columns)
    boxes = tuple(
        (
            _MARGIN + (k % columns) * (tile_w + _GAP),
            top + (k // columns) * (tile_h + _GAP),
            _MARGIN + (k % columns) * (tile_w + _GAP) + tile_w,
            top + (k // columns) * (tile_h + _GAP) + tile_h,
        )
        for k in range(n)
    )
    width = 2 * _MARGIN + columns * tile_w + (columns - 1) * _GAP
    height = top + rows * tile_h + (rows - 1) * _GAP + _MARGIN
    return width, height, boxes


def _title_height(lines: int) -> int:
    return _MARGIN + lines * (_draw.line_height(_draw.font(_FONT)) + 4) + 2


def _canvas(width: int, height: int, titles: Sequence[str]) -> tuple[Image.Image, Any]:
    """A white picture with ``titles`` written at the top, one a line."""
    f = _draw.font(_FONT)
    width = max(width, *(_draw.text_width(t, f) + 2 * _MARGIN for t in titles))
    picture = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(picture)
    step = _draw.line_height(f) + 4
    for k, title in enumerate(titles):
        _draw.text(draw, (_MARGIN, _MARGIN + k * step), title, f)
    return picture, draw


# ---------------------------------------------------------------------------------------------
# Activation pictures
# ---------------------------------------------------------------------------------------------


def _volume_picture(a: Activation, tile: int, max_width: int, class_names) -> LayerPicture:
    C, H, W = a.shape
    rgb = a.index is None and C == 3
    zoom = _zoom(H, W, tile)
    th, tw = H * zoom, W * zoom
    n = 1 if rgb else C
    columns = _columns(n, tw, max_width)
    titles = [a.title]
    if a.index is None:
        titles.append("the image's pixels (the network sees them normalised)")
    else:
        titles.append(f"{C} channel(s), each scaled to its own min (black) .. max (white)")
    top = _title_height(len(titles))
    width, height, boxes = _grid_layout(n, th, tw, columns, top)
    check_grid_size(width, height, f"layer {a.key}'s grid")
    picture, draw = _canvas(width, height, titles)
    if a.index is None:  # the image as it is, not rescaled
        tiles = np.rint(np.clip(a.values, 0, 1) * 255).astype(np.uint8)  # (C, H, W)
    else:
        tiles = channel_tiles(a.values)
    if rgb:
        tiles = np.moveaxis(tiles, 0, -1)[None]  # (1, H, W, 3)
    for box, t in zip(boxes, tiles, strict=True):
        x0, y0, x1, y1 = box
        draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=_GAP_COLOUR)
        big = np.repeat(np.repeat(t, zoom, axis=0), zoom, axis=1)
        picture.paste(Image.fromarray(big).convert("RGB"), (x0, y0))
    return LayerPicture(a, picture, boxes, zoom)


def _bars_picture(a: Activation, max_width: int, class_names) -> LayerPicture:
    """A vector as bars from a zero line; the classifier as its softmax with class names."""
    v = a.values.astype(np.float64)
    D = v.shape[0]
    scores = a.name == "scores"
    if scores:
        e = np.exp(v - v.max())
        v = e / e.sum()
        top = int(np.argmax(v))
        label = class_names[top] if class_names else str(top)
        titles = [a.title, f"softmax of the scores: top class {label!r}, p = {v[top]:.3f}"]
    else:
        titles = [a.title, f"{D} values as bars, from {v.min():.3g} to {v.max():.3g}"]
    small = _draw.font(_SMALL)
    names = list(class_names) if scores and class_names else []
    labelled = scores and D <= 40
    bar = max(1, min(24, (max_width - 2 * _MARGIN) // max(D, 1) - 1))
    if labelled:
        bar = max(bar, max(_draw.text_width(n, small) for n in names or ["0"]) + 4)
    pitch = bar + (1 if bar < 4 else 3)
    plot_h = 80
    top = _title_height(len(titles))
    label_h = _draw.line_height(small) + 6 if labelled else 0
    width = 2 * _MARGIN + D * pitch
    height = top + plot_h + label_h + _MARGIN
    check_grid_size(width, height, f"layer {a.key}'s bars")
    picture, draw = _canvas(width, height, titles)
    low, high = min(0.0, float(v.min())), max(0.0, float(v.max()))
    if scores:
        low, high = 0.0, 1.0  # probabilities: a bar's height reads as its probability
    span = (high - low) or 1.0
    zero = top + plot_h * high / span
    for k, value in enumerate(v):
        x0 = _MARGIN + k * pitch
        y = top + plot_h * (high - value) / span
        colour = _TOP if scores and k == int(np.argmax(v)) else _BAR
        if value < 0:
            colour = _BAR_NEGATIVE
        draw.rectangle([x0, min(y, zero), x0 + bar - 1, max(y, zero)], fill=colour)
        if labelled:
            text = names[k] if names else str(k)
            _draw.text(draw, (x0 + bar / 2, top + plot_h + 4), text, small, "mt")
    draw.line([(_MARGIN, zero), (_MARGIN + D * pitch, zero)], fill=_draw.INK)
    return LayerPicture(a, picture, (), 1)


def activation_grid(
    found: Sequence[Activation],
    *,
    layers: Any = None,
    tile: int = 48,
    max_width: int = 900,
    class_names: Sequence[str] | None = None,
) -> list[LayerPicture]:
    """One picture per layer: each channel a tile scaled to its own range, labelled.

    Parameters
    ----------
    found : list of Activation
        From :func:`activations`.
    layers : None, int, str or sequence, optional
        Which layers (:func:`select_layers`); default all.
    tile : int, optional
        The long side of a tile in pixels, about: each value becomes a
        ``ceil(tile / max(H, W))``-pixel square (a map larger than ``tile`` keeps one pixel a
        value). 4 to 512.
    max_width : int, optional
        Grids wrap to at most this many pixels wide (a single tile may be wider). 64 to 8192.
    class_names : sequence of str, optional
        Labels of the classifier's bars.

    Returns
    -------
    list of LayerPicture
        In the order of ``layers``.

    Raises
    ------
    TypeError, ValueError
        Bad arguments, a layer that is not one of the network's (the message lists them),
        or a picture of more than ``MAX_PICTURE_PIXELS`` pixels.

    Shape
    -----
    A ``(C, H, W)`` layer with zoom ``z`` gives ``C`` tiles of ``H*z x W*z``, in
    ``columns = ceil(sqrt(C))`` columns (fewer when they would pass ``max_width``), 2 pixels
    apart.
    """
    tile = check_int(tile, "tile", *TILE_RANGE)
    max_width = check_int(max_width, "max_width", 64, 8192)
    out = []
    for a in select_layers(found, layers):
        if a.values.ndim == 3:
            out.append(_volume_picture(a, tile, max_width, class_names))
        else:
            out.append(_bars_picture(a, max_width, class_names))
    return out


def activation_sheet(pictures: Sequence[LayerPicture | Image.Image], gap: int = 8) -> Image.Image:
    """The layers' pictures one under the other, left-aligned, on white.

    Shape
    -----
    As wide as the widest picture; as high as their heights plus ``gap`` between them.
    """
    images = [p.picture if isinstance(p, LayerPicture) else p for p in pictures]
    if not images:
        raise ValueError("pictures must hold at least one picture")
    width = max(im.width for im in images)
    height = sum(im.height for im in images) + gap * (len(images) - 1)
    check_grid_size(width, height, "the activation sheet")
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    y = 0
    for im in images:
        sheet.paste(im, (0, y))
        y += im.height + gap
        if y - gap < height:
            ImageDraw.Draw(sheet).line([(0, y - gap // 2), (width, y - gap // 2)], _GAP_COLOUR)
    return sheet


# ---------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------


def _conv_layers(net: ConvNet) -> list[tuple[int, Any]]:
    """``(k, info)`` of each conv layer, k its weights' number (``W<k>``)."""
    return [
        (int(info.param_names[0][1:]), info) for info in net.info if info.spec["type"] == "conv"
    ]


def filter_grid(
    model: ConvNet | FullyConvNet, layer: int = 1, *, tile: int = 32, max_width: int = 900
) -> LayerPicture:
    """A conv layer's filters as tiles, each filter scaled to its own min .. max.

    The first conv layer reads the image: each filter is one tile, in colour for an RGB
    input (its three channels as R, G, B) and grey for a one-channel one. A later conv
    layer's filters read feature maps: each filter is a row of tiles, one per input channel.
    Every filter is scaled over all its channels together, ``rint(255 * (w - min) / (max -
    min))`` (CS231n's ``visualize_grid``), so that its channels can be compared; a constant
    filter is black.

    Parameters
    ----------
    model : ConvNet or FullyConvNet
    layer : int, optional
        The number of the layer's weights, ``W<layer>`` (1: the first layer with weights).
    tile, max_width : int, optional
        As for :func:`activation_grid`.

    Returns
    -------
    LayerPicture
        Its ``activation`` holds the weights ``(F, C, HH, WW)`` (index: the layer's index);
        ``tiles`` lists filter by filter (first conv layer) or filter-major, channel by
        channel (later layers).

    Raises
    ------
    ValueError
        A model without conv layers, or ``layer`` not one of its conv layers (the message
        lists them); a picture of more than ``MAX_PICTURE_PIXELS`` pixels.

    Shape
    -----
    ``F`` filters of ``(C, HH, WW)`` at zoom ``z``: ``F`` tiles of ``HH*z x WW*z`` (first
    layer) in about ``sqrt(F)`` columns, or ``F`` rows of ``C`` tiles.
    """
    net = trained_network(model)
    tile = check_int(tile, "tile", *TILE_RANGE)
    max_width = check_int(max_width, "max_width", 64, 8192)
    convs = _conv_layers(net)
    if not convs:
        kinds = ", ".join(describe_spec(i.spec) for i in net.info)
        raise ValueError(
            f"the model has no conv layers, so no filters to draw (its layers: {kinds})"
        )
    k = check_int(layer, "layer", 1)
    valid = ", ".join(f"{n} ({describe_spec(info.spec)}, layer {info.index})" for n, info in convs)
    info = next((i for n, i in convs if n == k), None)
    if info is None:
        raise ValueError(
            f"layer {k} is not a conv layer of this model; its conv layers are {valid}"
        )
    w = net.params[info.param_names[0]].astype(np.float64)  # (F, C, HH, WW)
    F, C, HH, WW = w.shape
    low = w.min(axis=(1, 2, 3), keepdims=True)
    span = w.max(axis=(1, 2, 3), keepdims=True) - low
    scaled = np.rint(np.divide(w - low, span, out=np.zeros_like(w), where=span > 0) * 255)
    scaled = scaled.astype(np.uint8)  # (F, C, HH, WW)
    first = info is convs[0][1] and C in (1, 3)
    zoom = _zoom(HH, WW, tile)
    th, tw = HH * zoom, WW * zoom
    name = f"W{k}: {describe_spec(info.spec)}, layer {info.index}"
    shape = f"{F} filters of {shape_text((C, HH, WW))}"
    if first:
        tiles = list(np.moveaxis(scaled, 1, -1)) if C == 3 else list(scaled[:, 0])
        columns = _columns(F, tw, max_width)
        titles = [f"{name}: {shape}", "each filter scaled to its own min (black) .. max (white)"]
    else:
        tiles = [scaled[f, c] for f in range(F) for c in range(C)]
        columns = C
        fit = (max_width - 2 * _MARGIN + _GAP) // C - _GAP  # pixels a tile may take
        zoom = max(1, min(zoom, fit // WW))
        th, tw = HH * zoom, WW * zoom
        titles = [
            f"{name}: {shape}",
            "a row per filter, a tile per input channel; each filter scaled to its own range",
        ]
    top = _title_height(len(titles))
    width, height, boxes = _grid_layout(len(tiles), th, tw, columns, top)
    check_grid_size(width, height, f"the filters of W{k}")
    picture, draw = _canvas(width, height, titles)
    for box, t in zip(boxes, tiles, strict=True):
        x0, y0, x1, y1 = box
        draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=_GAP_COLOUR)
        big = np.repeat(np.repeat(t, zoom, axis=0), zoom, axis=1)
        picture.paste(Image.fromarray(big).convert("RGB"), (x0, y0))
    weights = Activation(info.index, describe_spec(info.spec), "conv", w.astype(np.float32))
    return LayerPicture(weights, picture, boxes, zoom)
