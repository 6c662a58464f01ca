"""Where each cell of a dense score map looks in the input image: :class:`Geometry`.

A converted network (:mod:`cnnserve.convert`) slides over an image at its total stride S; each
cell of its map scores one training-size window. :class:`Geometry` holds those numbers and
the arithmetic on them (map size, covered area, margins, boxes, finer strides), so that the
dense maps, the heatmaps and the service all place cells the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnserve._checks import check_int

__all__ = ["Geometry"]


@dataclass(frozen=True)
class Geometry:
    """Where each cell of a dense score map looks in the input image.

    Attributes
    ----------
    stride : int
        S, the step between neighbouring cells in input pixels (the product of every layer's
        stride).
    window : tuple of int
        ``(Th, Tw)``, the training input size: each cell scores one window of this size.
    receptive_field : tuple of int
        ``(Rh, Rw)``, the input pixels that can influence a cell, padding included. Equal to
        the window for a network without zero padding.
    offset : tuple of int
        ``(Ph, Pw)``, how far the receptive field of cell (0, 0) starts before the image
        origin: the zero padding of the layers, in input pixels.
    exact : bool
        True when no layer pads. Then each cell equals the original network run on its
        window's crop. With padding, a crop's network sees zeros at the crop border where the
        dense pass sees the neighbouring pixels, so cells are close to, not equal to, the crops'
        scores.

    Shape
    -----
    For an image of ``(H, W)`` pixels the map has ``H' = (H - Th) // S + 1`` rows and
    ``W' = (W - Tw) // S + 1`` columns. Cell (i, j) scores the box
    ``x in [S*j, S*j + Tw)``, ``y in [S*i, S*i + Th)``. The last ``(H - Th) % S`` rows and
    ``(W - Tw) % S`` columns of the image are in no window (the margins).
    """

    stride: int
    window: tuple[int, int]
    receptive_field: tuple[int, int]
    offset: tuple[int, int]
    exact: bool

    def _check_size(self, height: Any, width: Any) -> tuple[int, int]:
        height = check_int(height, "height", 1)
        width = check_int(width, "width", 1)
        th, tw = self.window
        if height < th or width < tw:
            raise ValueError(
                f"an image of {height}x{width} pixels (H x W) is smaller than the network's "
                f"{th}x{tw} window: dense maps need an image at least as large as the training "
                "images"
            )
        return height, width

    def map_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H', W')``: the number of cells on an image of ``height x width`` pixels.

        Raises
        ------
        ValueError
            The image is smaller than the window.
        """
        height, width = self._check_size(height, width)
        return (
            (height - self.window[0]) // self.stride + 1,
            (width - self.window[1]) // self.stride + 1,
        )

    def covered(self, height: int, width: int) -> tuple[int, int]:
        """``(Hc, Wc)``: the top-left part of the image that windows cover."""
        rows, cols = self.map_size(height, width)
        return (
            self.window[0] + self.stride * (rows - 1),
            self.window[1] + self.stride * (cols - 1),
        )

    def margins(self, height: int, width: int) -> tuple[int, int]:
        """``(bottom, right)``: rows and columns at the image's edges that no window covers."""
        hc, wc = self.covered(height, width)
        return height - hc, width - wc

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of cell (i, j): the window it scores (x1, y1 exclusive)."""
        i, j = check_int(i, "i", 0), check_int(j, "j", 0)
        s = self.stride
        return s * j, s * i, s * j + self.window[1], s * i + self.window[0]

    def boxes(self, rows: int, cols: int) -> np.ndarray:
        """Every cell's box, shape ``(rows, cols, 4)`` int64: ``(x0, y0, x1, y1)``."""
        rows, cols = check_int(rows, "rows", 1), check_int(cols, "cols", 1)
        out = np.empty((rows, cols, 4), dtype=np.int64)
        out[..., 0] = self.stride * np.arange(cols)[None, :]
        out[..., 1] = self.stride * np.arange(rows)[:, None]
        out[..., 2] = out[..., 0] + self.window[1]
        out[..., 3] = out[..., 1] + self.window[0]
        return out

    def finer(self, divisor: int) -> Geometry:
        """The geometry of a map ``divisor`` times finer (shift-and-stitch): stride S / d.

        Raises
        ------
        ValueError
            ``divisor`` does not divide the stride.
        """
        divisor = check_int(divisor, "stride_divisor", 1)
        if self.stride % divisor:
            raise ValueError(
                f"stride_divisor must divide the network's total stride {self.stride}, "
                f"got {divisor}"
            )
        return Geometry(
            self.stride // divisor, self.window, self.receptive_field, self.offset, self.exact
        )

    def to_dict(self) -> dict:
        """JSON-ready: ``stride``, ``window``, ``receptive_field``, ``offset``, ``exact``."""
        return {
            "stride": self.stride,
            "window": list(self.window),
            "receptive_field": list(self.receptive_field),
            "offset": list(self.offset),
            "exact": self.exact,
        }

    def describe(self) -> str:
        """A few lines for people: stride, window, receptive field, offset, exactness."""
        th, tw = self.window
        rh, rw = self.receptive_field
        exact = (
            "exact (no zero padding inside: each cell equals the network on its crop)"
            if self.exact
            else "approximate (zero padding inside: cells near crop borders differ from crops)"
        )
        return "\n".join(
            [
                f"total stride S: {self.stride}",
                f"window T: {th}x{tw}",
                f"receptive field R: {rh}x{rw}",
                f"padding offset: {self.offset[0]}, {self.offset[1]}",
                f"map size: H' = (H - {th}) // {self.stride} + 1, "
                f"W' = (W - {tw}) // {self.stride} + 1",
                f"cell (i, j) box: x in [{self.stride}*j, {self.stride}*j + {tw}), "
                f"y in [{self.stride}*i, {self.stride}*i + {th})",
                f"dense maps: {exact}",
            ]
        )
