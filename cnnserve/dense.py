"""Dense class-score maps: a converted network slid over an image in one pass.

:func:`score_map` takes an image of any size at least the training size, preprocesses it as
the model was trained, and runs the fully convolutional network (:mod:`cnnserve.convert`)
over it. The result has one cell of class scores per training-size window, at the network's
total stride S, each with the box of the image it scores, plus image-level aggregates.

- **Exact**: for a network without zero padding inside, each cell equals the original
  network run on its window's crop. With padding inside, a crop sees zeros at its border
  where the dense pass sees the neighbouring pixels, so the cells near the crops' borders
  differ from the crops' scores: the result's ``geometry.exact`` is False.
- **Finer maps** (``stride_divisor=d``): shift-and-stitch. The image shifted by every
  multiple of S/d pixels along each axis goes through the network, and the d*d maps are
  interleaved into one map at stride S/d: the same as the crop loop at stride S/d.
- **Several scales** (``scales=[...]``): the image is resized (bilinear, Pillow) for each
  scale; every scale's map has boxes in the original image's coordinates, and the aggregates
  combine the scales.
- **Bounded memory**: the map is computed in tiles of cells. A tile's input is the union of
  its cells' windows (for a padded network, their receptive fields), so tiles overlap by
  ``T - S`` pixels and their maps stitch into the map of one untiled pass (equal to float
  rounding: the conv kernels choose their GEMM path by size). Tiles are the smallest whose
  inputs overlap by at most ``_TILE_OVERLAP`` times their own cells' pixels, and as many
  tiles of one size as fit ``tile_memory`` go through the network together.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cnnserve._checks import check_int, check_number
from cnnserve.convert import FullyConvNet, as_fully_convolutional
from cnnserve.detect import Detection, detections
from cnnserve.encoding import encode_array
from cnnserve.geometry import Geometry
from cnnserve.images import MAX_PIXELS, model_pixels, resize
from cnnserve.network import ConvNet
from cnnserve.predict import ranked
from cnnserve.specs import BACKGROUND, class_index, out_shape

__all__ = [
    "DEFAULT_TILE_MEMORY",
    "MultiScaleMap",
    "ScoreMap",
    "class_index",
    "default_class",
    "encode_array",
    "score_map",
    "softmax_cells",
]

DEFAULT_TILE_MEMORY = 256 * 2**20  # bytes of working memory per batch of tiles
# Tiles are as small as they can be while their windows overlap little: a tile's input is at
# most this many times the pixels of its own cells. Small tiles keep the activations in cache,
# and tiles of the same size go through the network together (at most _MAX_TILE_BATCH at a
# time, within the memory budget), so that the kernels that parallelise over images
# (Winograd, the fused im2col + GEMM) use every core.
_TILE_OVERLAP = 1.35
_MAX_TILE_BATCH = 64


# ---------------------------------------------------------------------------------------------
# Classes
# ---------------------------------------------------------------------------------------------


def default_class(result: ScoreMap | MultiScaleMap) -> int:
    """The class a map shows when none is asked for: the top one by max over the cells.

    A class named ``background`` (a detector's, like the ``digits-windows`` models') is
    skipped: it is the most likely class of almost any image.
    """
    ranked = result.top_k(len(result.class_names), by="max")
    shown = [r for r in ranked if r["label"] != BACKGROUND]
    return (shown or ranked)[0]["index"]


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def softmax_cells(logits: np.ndarray) -> np.ndarray:
    """Per-cell softmax over the class axis: ``(K, H', W')`` -> ``(K, H', W')``.

    Computed a block of rows at a time, so that a large map needs no temporary of its size.
    """
    out = np.empty_like(logits)
    K, rows = logits.shape[0], logits.shape[1]
    step = max(1, 2**22 // max(1, K * logits[0, :1].size))  # about 4M values a block
    for r0 in range(0, rows, step):
        block = out[:, r0 : r0 + step]
        np.subtract(logits[:, r0 : r0 + step], logits[:, r0 : r0 + step].max(axis=0), out=block)
        np.exp(block, out=block)
        block /= block.sum(axis=0)
    return out


class _Aggregates:
    """Image-level aggregates of per-cell probabilities: ``max`` and ``mean``, with top-k."""

    class_names: tuple[str, ...]

    max: np.ndarray  # (K,), defined by the subclasses
    mean: np.ndarray

    def top_k(self, k: int = 5, by: str = "mean") -> list[dict]:
        """The k most likely classes of the image: ``[{"label", "index", "probability"}]``.

        Parameters
        ----------
        k : int
            Clamped to the number of classes.
        by : {"mean", "max"}
            ``mean``: the average probability over the cells (the source notes' "average the
            class scores"). ``max``: the largest probability of any cell, which finds a small
            object anywhere in a large image.
        """
        k = min(check_int(k, "k", 1), len(self.class_names))
        if by not in ("mean", "max"):
            raise ValueError(f"by must be 'mean' or 'max', got {by!r}")
        return ranked(self.mean if by == "mean" else self.max, k, self.class_names)

    def detections(
        self, class_: int | str | None = None, threshold: float = 0.5, nms_iou: float = 0.3
    ) -> list[Detection]:
        """Peaks of a class's probability (default: :func:`default_class`) as boxes in the
        image, over every scale, best first: see :mod:`cnnserve.detect`."""
        k = default_class(self) if class_ is None else class_index(class_, self.class_names)
        return detections(getattr(self, "maps", (self,)), k, threshold, nms_iou)

    def aggregate_dict(self, k: int = 5) -> dict:
        """JSON-ready aggregates: per-class max and mean, and the top-k by each."""
        return {
            "max": {n: float(v) for n, v in zip(self.class_names, self.max, strict=True)},
            "mean": {n: float(v) for n, v in zip(self.class_names, self.mean, strict=True)},
            "top_k_by_mean": self.top_k(k, "mean"),
            "top_k_by_max": self.top_k(k, "max"),
        }


@dataclass(frozen=True, eq=False)
class ScoreMap(_Aggregates):
    """A dense map of class scores over one image (at one scale).

    Attributes
    ----------
    logits : ndarray, shape (K, H', W')
        Class scores of every cell, in the model's dtype.
    probabilities : ndarray, shape (K, H', W')
        Per-cell softmax of ``logits``.
    geometry : Geometry
        Of this map in the pixels of the image the network saw (the resized one for a scale
        other than 1): ``geometry.stride`` is S / stride_divisor.
    image_size : tuple of int
        ``(H, W)`` of the original image.
    class_names : tuple of str
    scale : float
        The requested scale (1.0: the image as given).
    resized_size : tuple of int
        ``(H, W)`` of the image the network saw.
    stride_divisor : int
    converted : str or None
        How the image's channels were converted (:func:`cnnserve.images.to_channels`).

    Shape
    -----
    ``H' = (Hs - Th) // s + 1`` and ``W' = (Ws - Tw) // s + 1``, with ``(Hs, Ws)`` the
    resized size and ``s = S / stride_divisor``.
    """

    logits: np.ndarray
    probabilities: np.ndarray
    geometry: Geometry
    image_size: tuple[int, int]
    class_names: tuple[str, ...]
    scale: float = 1.0
    resized_size: tuple[int, int] = field(default=(0, 0))
    stride_divisor: int = 1
    converted: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(H', W')``."""
        return self.logits.shape[1], self.logits.shape[2]

    @property
    def factors(self) -> tuple[float, float]:
        """``(fy, fx)``: resized size over original size, per axis (1.0 at scale 1)."""
        return (
            self.resized_size[0] / self.image_size[0],
            self.resized_size[1] / self.image_size[1],
        )

    @property
    def max(self) -> np.ndarray:
        """Per class, the largest probability of any cell: shape (K,)."""
        return self.probabilities.max(axis=(1, 2)).astype(np.float64)

    @property
    def mean(self) -> np.ndarray:
        """Per class, the mean probability over the cells: shape (K,)."""
        return self.probabilities.mean(axis=(1, 2), dtype=np.float64)

    def box(self, i: int, j: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of cell (i, j) in the original image (x1, y1 exclusive)."""
        rows, cols = self.shape
        if not (0 <= i < rows and 0 <= j < cols):
            raise IndexError(f"cell ({i}, {j}) is outside the {rows}x{cols} map")
        fy, fx = self.factors
        x0, y0, x1, y1 = self.geometry.box(i, j)
        if fy == fx == 1.0:
            return x0, y0, x1, y1
        return x0 / fx, y0 / fy, x1 / fx, y1 / fy

    def boxes(self) -> np.ndarray:
        """Every cell's box in the original image: shape ``(H', W', 4)``, ``(x0, y0, x1, y1)``.

        int64 at scale 1, float64 otherwise.
        """
        boxes = self.geometry.boxes(*self.shape)
        fy, fx = self.factors
        if fy == fx == 1.0:
            return boxes
        return boxes / np.array([fx, fy, fx, fy])

    def peak(self, class_index: int) -> dict:
        """Where class ``class_index`` is most likely: ``{"row", "col", "box", "probability"}``.

        ``box`` is ``[x0, y0, x1, y1]`` in the original image; the first cell wins a tie.
        """
        class_index = check_int(class_index, "class_index", 0, len(self.class_names) - 1)
        plane = self.probabilities[class_index]
        i, j = divmod(int(np.argmax(plane)), plane.shape[1])
        return {
            "row": i,
            "col": j,
            "box": [float(v) for v in self.box(i, j)],
            "probability": float(plane[i, j]),
        }

    def cell_top_k(self, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Per cell, the k most likely classes: ``(indices, probabilities)``, each (k, H', W')."""
        k = min(check_int(k, "k", 1), len(self.class_names))
        order = np.argsort(-self.probabilities, axis=0, kind="stable")[:k]
        return order, np.take_along_axis(self.probabilities, order, axis=0)

    def geometry_dict(self) -> dict:
        """The geometry in JSON form, with this map's size, covered area and margins."""
        hs, ws = self.resized_size
        fy, fx = self.factors
        d = self.geometry.to_dict()
        d.update(
            stride_divisor=self.stride_divisor,
            scale=self.scale,
            image_size=list(self.image_size),
            resized_size=[hs, ws],
            map_shape=list(self.shape),
            covered=list(self.geometry.covered(hs, ws)),
            margins=list(self.geometry.margins(hs, ws)),
            cell_stride=[self.geometry.stride / fy, self.geometry.stride / fx],
        )
        return d

    def to_dict(self, *, top_k: int = 5, cells: bool = False, scores: bool = True) -> dict:
        """JSON-ready result.

        Parameters
        ----------
        top_k : int
            Classes in the image-level and per-cell rankings.
        cells : bool
            Include ``cells``: every cell's position, box (original image coordinates) and
            top-k, one entry per cell (about 2 KB of Python objects each: for small maps).
            The boxes of all cells follow from ``geometry`` anyway.
        scores : bool
            Include the full ``logits`` and ``probabilities`` arrays, base64 float32 with
            their shape (row-major, little-endian).
        """
        out: dict[str, Any] = {
            "map_shape": list(self.shape),
            "classes": list(self.class_names),
            "geometry": self.geometry_dict(),
            "aggregate": self.aggregate_dict(top_k),
            "converted": self.converted,
        }
        if cells:
            idx, prob = self.cell_top_k(top_k)
            boxes = self.boxes().tolist()
            out["cells"] = [
                {
                    "row": i,
                    "col": j,
                    "box": boxes[i][j],
                    "top_k": [
                        {
                            "label": self.class_names[int(idx[r, i, j])],
                            "index": int(idx[r, i, j]),
                            "probability": float(prob[r, i, j]),
                        }
                        for r in range(idx.shape[0])
                    ],
                }
                for i in range(self.shape[0])
                for j in range(self.shape[1])
            ]
        if scores:
            out["logits"] = encode_array(self.logits)
            out["probabilities"] = encode_array(self.probabilities)
        return out

    def heatmap(self, image: np.ndarray, class_index: int, **options: Any):
        """A picture of one class's probability map over the image (PIL.Image, RGB).

        Parameters
        ----------
        image : ndarray
            The original image as given to :func:`score_map` (colour stays colour).
        class_index : int
            The class to show.
        **options
            ``alpha``, ``cmap``, ``vmin``, ``vmax``, ``zoom`` of
            :func:`cnnserve.heatmap.heatmap_image`.
        """
        from cnnserve.heatmap import heatmap_image

        K = len(self.class_names)
        class_index = check_int(class_index, "class_index", 0, K - 1)
        shape = np.shape(image)
        if tuple(shape[-2:]) != tuple(self.image_size):
            raise ValueError(
                f"image must be the {self.image_size[0]}x{self.image_size[1]} image this map "
                f"was computed on, got shape {shape}"
            )
        fy, fx = self.factors
        th, tw = self.geometry.window
        return heatmap_image(
            image,
            self.probabilities[class_index],
            stride=self.geometry.stride / ((fx + fy) / 2),
            window=(th / fy, tw / fx),
            **options,
        )


@dataclass(frozen=True, eq=False)
class MultiScaleMap(_Aggregates):
    """Score maps of one image at several scales, and their aggregate.

    ``max`` is the largest probability of any cell at any scale; ``mean`` averages the
    scales' mean probabilities (each scale counts once, whatever its number of cells).
    """

    maps: tuple[ScoreMap, ...]
    class_names: tuple[str, ...]
    converted: str | None = None

    @property
    def max(self) -> np.ndarray:
        return np.max([m.max for m in self.maps], axis=0)

    @property
    def mean(self) -> np.ndarray:
        return np.mean([m.mean for m in self.maps], axis=0)

    def to_dict(self, *, top_k: int = 5, cells: bool = False, scores: bool = True) -> dict:
        """JSON-ready: the classes, the aggregate over scales, and each scale's map."""
        return {
            "classes": list(self.class_names),
            "aggregate": self.aggregate_dict(top_k),
            "converted": self.converted,
            "scales": [m.to_dict(top_k=top_k, cells=cells, scores=scores) for m in self.maps],
        }


# ---------------------------------------------------------------------------------------------
# Computation
# ---------------------------------------------------------------------------------------------


def _layer_values(layers: Sequence, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """The largest working set, in values, of ``layers`` on one input of ``shape``.

    Per layer: its input, its output and the scratch of a convolution (the im2col columns
    and the product, or Winograd's transformed tiles). Returns it and the output shape.
    """
    peak = 0
    for k, layer in enumerate(layers):
        out = out_shape(layer.spec, shape, f"layer {k}")
        need = math.prod(shape) + math.prod(out)
        if layer.kind == "conv":
            kh, kw = layer.spec["size"]
            pixels = out[1] * out[2]
            need += max(shape[0] * kh * kw + out[0], 4 * (shape[0] + out[0])) * pixels
        peak = max(peak, need)
        shape = out
    return peak, shape


def _working_bytes(fcn: FullyConvNet, batch: int, height: int, width: int) -> int:
    """An upper estimate of the memory one forward pass of a batch of inputs needs.

    The layers that run window by window add a block of gathered patches and its working set.
    """
    split = fcn.per_window_from
    trunk, shape = _layer_values(fcn.layers[:split], (fcn.input_shape[0], height, width))
    peak = trunk * batch
    if split is not None:
        patch = math.prod(fcn.patch_shape)
        head, _ = _layer_values(fcn.layers[split:], fcn.patch_shape)
        windows = max(1, fcn.PATCH_VALUES // patch) + shape[2]  # a block of rows of windows
        peak = max(peak, math.prod(shape) * batch + windows * (patch + head))
    return peak * fcn.dtype.itemsize


def _tile_plan(fcn: FullyConvNet, rows: int, cols: int, halo: int, budget: int) -> tuple[int, int]:
    """``(t, batch)``: tiles of ``t x t`` cells, ``batch`` of them through the network at once.

    ``t`` is the smallest side whose input overlaps its neighbours' by at most
    ``_TILE_OVERLAP`` (a tile of t cells reads ``T + S*(t + 2*halo - 1)`` pixels for ``S*t`` of
    its own), made smaller if one tile does not fit ``budget`` bytes; ``batch`` is as many
    such tiles as fit the budget.
    """
    g = fcn.geometry
    S = g.stride

    def working(t: int, batch: int) -> int:
        h = g.window[0] + S * (min(t, rows) + 2 * halo - 1)
        w = g.window[1] + S * (min(t, cols) + 2 * halo - 1)
        return _working_bytes(fcn, batch, h, w)

    extra = max(g.window[a] - S + 2 * halo * S for a in (0, 1))  # pixels beyond own cells
    t = min(max(rows, cols), max(1, math.ceil(extra / (S * (math.sqrt(_TILE_OVERLAP) - 1)))))
    if working(t, 1) > budget:
        low, high = 1, t
        while low < high:  # the largest t that fits, or 1
            mid = (low + high + 1) // 2
            if working(mid, 1) <= budget:
                low = mid
            else:
                high = mid - 1
        t = low
    return t, max(1, min(_MAX_TILE_BATCH, budget // working(t, 1)))


def _halo(g: Geometry) -> tuple[int, int, int, int]:
    """Cells of context a tile needs before and after its own, per axis (0 without padding).

    Cell i's receptive field is ``[S*i - P, S*i - P + R)``; a tile computing cells from
    ``i0 - before`` to ``i1 + after`` contains its cells' receptive fields.
    """
    s = g.stride
    before = [-(-g.offset[a] // s) for a in (0, 1)]
    after = [-(-max(0, g.receptive_field[a] - g.window[a] - g.offset[a]) // s) for a in (0, 1)]
    return before[0], after[0], before[1], after[1]


def _tiles(rows: int, cols: int, t: int) -> Iterator[tuple[int, int, int, int]]:
    for i0 in range(0, rows, t):
        for j0 in range(0, cols, t):
            yield i0, min(rows, i0 + t), j0, min(cols, j0 + t)


def _dense_logits(
    fcn: FullyConvNet,
    image: np.ndarray,
    budget: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Logits ``(K, H', W')`` of the (C, H, W) [0, 1] image, computed tile by tile."""
    g = fcn.geometry
    S, (th, tw) = g.stride, g.window
    rows, cols = g.map_size(image.shape[1], image.shape[2])
    hb, ha, wb, wa = _halo(g)
    t, batch_size = _tile_plan(fcn, rows, cols, max(hb, ha, wb, wa), budget)
    out = np.empty((fcn.num_classes, rows, cols), dtype=fcn.dtype)

    # Each tile computes the cells [a, b) x [c, d) (its own plus the halo, within the map)
    # from the pixels their windows cover, and keeps its own cells.
    groups: dict[tuple[int, int], list[tuple[int, int, int, int, int, int]]] = {}
    for i0, i1, j0, j1 in _tiles(rows, cols, t):
        a, b = max(0, i0 - hb), min(rows, i1 + ha)
        c, d = max(0, j0 - wb), min(cols, j1 + wa)
        groups.setdefault((b - a, d - c), []).append((i0, i1, j0, j1, a, c))
    for (n_rows, n_cols), tiles in groups.items():
        h, w = th + S * (n_rows - 1), tw + S * (n_cols - 1)
        for start in range(0, len(tiles), batch_size):
            batch = tiles[start : start + batch_size]
            x01 = np.stack([image[:, S * a : S * a + h, S * c : S * c + w] for *_, a, c in batch])
            logits = fcn.forward(fcn.preprocess(x01))  # (B, K, n_rows, n_cols)
            for (i0, i1, j0, j1, a, c), tile in zip(batch, logits, strict=True):
                out[:, i0:i1, j0:j1] = tile[:, i0 - a : i1 - a, j0 - c : j1 - c]
            if progress is not None:
                progress(len(batch))
    return out


def _tile_count(fcn: FullyConvNet, height: int, width: int, budget: int) -> int:
    g = fcn.geometry
    rows, cols = g.map_size(height, width)
    t, _ = _tile_plan(fcn, rows, cols, max(_halo(g)), budget)
    return math.ceil(rows / t) * math.ceil(cols / t)


def _one_scale(
    fcn: FullyConvNet,
    image: np.ndarray,
    original: tuple[int, int],
    scale: float,
    divisor: int,
    budget: int,
    progress: Callable[[int], None] | None,
) -> ScoreMap:
    """The map of one (already resized) image, at stride S / divisor (shift-and-stitch)."""
    g = fcn.geometry
    fine = g.finer(divisor)
    H, W = image.shape[1], image.shape[2]
    rows, cols = fine.map_size(H, W)
    if divisor == 1:
        logits = _dense_logits(fcn, image, budget, progress)
    else:
        logits = np.empty((fcn.num_classes, rows, cols), dtype=fcn.dtype)
        for qa, qb, y, x in _shifts(g, H, W, divisor):
            part = _dense_logits(fcn, image[:, y:, x:], budget, progress)
            logits[:, qa::divisor, qb::divisor] = part
    return ScoreMap(
        logits=logits,
        probabilities=softmax_cells(logits),
        geometry=fine,
        image_size=original,
        class_names=fcn.class_names,
        scale=scale,
        resized_size=(H, W),
        stride_divisor=divisor,
    )


def _shifts(g: Geometry, H: int, W: int, divisor: int) -> list[tuple[int, int, int, int]]:
    """Shift-and-stitch passes ``(qa, qb, y, x)``: the image shifted by ``(y, x)`` pixels gives
    the cells ``qa::divisor, qb::divisor`` of the map at stride S / divisor. Shifts at which no
    window fits are left out (no cell of the map has them)."""
    step = g.stride // divisor
    return [
        (qa, qb, qa * step, qb * step)
        for qa in range(divisor)
        for qb in range(divisor)
        if H - qa * step >= g.window[0] and W - qb * step >= g.window[1]
    ]


def score_map(
    model: FullyConvNet | ConvNet | str | os.PathLike,
    image: np.ndarray,
    *,
    stride_divisor: int = 1,
    scales: Sequence[float] | None = None,
    tile_memory: int = DEFAULT_TILE_MEMORY,
    progress: bool | Callable[[int], None] = False,
) -> ScoreMap | MultiScaleMap:
    """Dense class scores of an image: one cell per training-size window.

    Parameters
    ----------
    model : FullyConvNet, ConvNet or path
        A converted network, a trained one (converted and self-checked on every call: convert
        once with :func:`~cnnserve.convert.to_fully_convolutional` for repeated use), or a
        model file of either kind.
    image : ndarray
        ``(H, W)`` or ``(C, H, W)`` with C 1 or 3 (converted to the model's channels when
        they differ: ``converted`` says so); uint8 pixels or floats in [0, 1]; ``H >= Th``
        and ``W >= Tw`` (the training size). It is preprocessed with the normalisation
        stored in the model.
    stride_divisor : int
        d >= 1 dividing the total stride S: a map at stride S / d by shift-and-stitch (d * d
        passes).
    scales : sequence of float, optional
        Resize the image by each factor (> 0) and map each; returns a :class:`MultiScaleMap`.
        None (default): the image as it is, a :class:`ScoreMap`.
    tile_memory : int
        Bytes of working memory for the network's activations, per batch of tiles (see the
        module docstring); tiles stitch into the map of one untiled pass, equal to float
        rounding. The result arrays come on top.
    progress : bool or callable
        True: a progress bar over tiles on stderr (tqdm). A callable is called with the
        number of tiles done after each batch of tiles.

    Returns
    -------
    ScoreMap or MultiScaleMap

    Raises
    ------
    TypeError, ValueError
        A bad image (shape, channels, dtype, range), an image (or a scaled image) smaller
        than the window, a stride divisor that does not divide S, a bad scale.

    Shape
    -----
    ``logits`` and ``probabilities`` are ``(K, H', W')`` with ``H' = (H - Th) // s + 1``,
    ``W' = (W - Tw) // s + 1`` and ``s = S / stride_divisor``; cell (i, j) scores the box
    ``x in [s*j, s*j + Tw)``, ``y in [s*i, s*i + Th)``.
    """
    fcn = as_fully_convolutional(model)
    pixels, converted = model_pixels(image, fcn.input_shape[0])
    H, W = pixels.shape[1], pixels.shape[2]
    budget = check_int(tile_memory, "tile_memory", 1)
    fcn.geometry.finer(stride_divisor)  # checks the divisor
    if scales is None:
        fcn.geometry.map_size(H, W)  # checks the size
    sizes = []
    for s in [1.0] if scales is None else _check_scales(scales):
        size = (max(1, round(H * s)), max(1, round(W * s)))
        th, tw = fcn.geometry.window
        if size[0] < th or size[1] < tw:
            raise ValueError(
                f"scale {s:g} resizes the {H}x{W} image to {size[0]}x{size[1]}, smaller than "
                f"the network's {th}x{tw} window"
            )
        if size[0] * size[1] > max(MAX_PIXELS, H * W):
            raise ValueError(
                f"scale {s:g} resizes the {H}x{W} image to {size[0]}x{size[1]}, more than "
                f"{MAX_PIXELS:,} pixels"
            )
        sizes.append((s, size))

    callback, bar = _progress(progress, fcn, sizes, stride_divisor, budget)
    try:
        maps = []
        for s, (hs, ws) in sizes:
            resized = pixels if (hs, ws) == (H, W) else resize(pixels, hs, ws)
            one = _one_scale(fcn, resized, (H, W), s, stride_divisor, budget, callback)
            maps.append(replace(one, converted=converted))
    finally:
        if bar is not None:
            bar.close()
    if scales is None:
        return maps[0]
    return MultiScaleMap(tuple(maps), fcn.class_names, converted)


def _check_scales(scales: Any) -> list[float]:
    """A non-empty list (or 1-D array) of factors in (0, 64]."""
    if isinstance(scales, np.ndarray) and scales.ndim == 1:
        scales = scales.tolist()
    if isinstance(scales, str) or not isinstance(scales, Sequence):
        raise TypeError(f"scales must be a list of numbers, got {type(scales).__name__}")
    if not scales:
        raise ValueError("scales must hold at least one factor, got an empty list")
    return [check_number(s, f"scales[{k}]", 0, 64, "(]") for k, s in enumerate(scales)]


def _progress(
    progress: bool | Callable[[int], None],
    fcn: FullyConvNet,
    sizes: list,
    divisor: int,
    budget: int,
) -> tuple[Callable[[int], None] | None, Any]:
    if callable(progress):
        return progress, None
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")
    if not progress:
        return None, None
    from tqdm.auto import tqdm

    total = sum(
        _tile_count(fcn, hs - y, ws - x, budget)
        for _, (hs, ws) in sizes
        for _, _, y, x in _shifts(fcn.geometry, hs, ws, divisor)
    )
    bar = tqdm(total=total, unit="tile", desc="score map", leave=False)
    return bar.update, bar
