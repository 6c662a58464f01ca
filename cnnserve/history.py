"""Training histories: JSON files and a PNG plot drawn with Pillow.

A history is the dict built by :meth:`cnnserve.solver.Solver.history`::

    {"format": "cnnserve.history", "version": 1,
     "loss_history": [...],        # one training loss per iteration
     "train_acc_history": [...],   # one training accuracy per epoch
     "val_acc_history": [...],     # one validation accuracy per epoch
     "iterations_per_epoch": int, "epochs_completed": int, "num_epochs": int,
     "best_val_acc": float | None, "best_epoch": int | None,
     "options": {...},         # the solver's options
     "timings": {"epoch_seconds": [...], "total_seconds": float}}

:func:`plot_history` draws the loss per iteration and the accuracies per epoch in two panels,
with axes, ticks and a legend, using ``PIL.ImageDraw`` only (matplotlib is not a dependency).
Files are written atomically: a temporary file in the same directory, renamed over the target.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from cnnserve._files import atomic_write_bytes

__all__ = ["HISTORY_FORMAT", "plot_history", "read_history", "write_history"]

HISTORY_FORMAT = "cnnserve.history"


def write_history(history: Mapping, path: str | os.PathLike) -> Path:
    """Write a history dict to ``path`` as JSON (indented, no NaN), atomically.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    if not isinstance(history, Mapping):
        raise TypeError(f"history must be a dict, got {type(history).__name__}")
    text = json.dumps(history, indent=1, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def read_history(path: str | os.PathLike) -> dict:
    """Read a history JSON file written by :func:`write_history`."""
    path = Path(path)
    history = json.loads(path.read_text())
    if not isinstance(history, dict) or history.get("format") != HISTORY_FORMAT:
        raise ValueError(f"{path} is not a cnnserve training history (format {HISTORY_FORMAT!r})")
    return history


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------

_BACKGROUND = (255, 255, 255)
_AXIS = (40, 40, 40)
_GRID = (225, 225, 225)
_LOSS = (31, 119, 180)
_TRAIN = (31, 119, 180)
_VAL = (255, 127, 14)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: the small bitmap font
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten)
    covering ``[low, high]``; with ``integer`` the step is a whole number (>= 1).

    Returns
    -------
    list of float
        Increasing ticks; the first is <= ``low`` and the last >= ``high``.
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"tick range must be finite, got [{low}, {high}]")
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    multiples = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * power for m in multiples if m * power >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.floor(low / step + 1e-9) * step
    ticks = [round(first, 12)]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(round(first + len(ticks) * step, 12))
    return ticks


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font: Any, anchor: str) -> None:
    """Draw ``text`` anchored like Pillow's ``anchor`` (``'lm'``, ``'rm'``, ``'mt'``, ``'mb'``).

    Positioned by hand from the text's bounding box, so the bitmap fallback font works too.
    """
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0, y1 - y0
    x, y = xy
    x -= {"l": 0, "m": w / 2, "r": w}[anchor[0]] + x0
    y -= {"t": 0, "m": h / 2, "b": h}[anchor[1]] + y0
    draw.text((x, y), text, fill=_AXIS, font=font)


def _height(draw: ImageDraw.ImageDraw, font: Any) -> int:
    """Pixel height of a line of digits and letters in ``font``."""
    _, y0, _, y1 = draw.textbbox((0, 0), "0123456789lg", font=font)
    return y1 - y0


def _label(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


class _Panel:
    """A rectangle of the image with data limits, mapping data to pixel coordinates."""

    def __init__(self, box: tuple[int, int, int, int], xlim: tuple[float, float], ylim):
        self.box = box  # (left, top, right, bottom) in pixels
        self.xlim = xlim
        self.ylim = ylim

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        px = left + (x - x0) / (x1 - x0) * (right - left)
        py = bottom - (y - y0) / (y1 - y0) * (bottom - top)
        return px, py


def _draw_axes(
    draw: ImageDraw.ImageDraw,
    panel: _Panel,
    xticks: Sequence[float],
    yticks: Sequence[float],
    title: str,
    xlabel: str,
    font: Any,
    small: Any,
) -> None:
    left, top, right, bottom = panel.box
    for y in yticks:
        _, py = panel.to_px(panel.xlim[0], y)
        draw.line([(left, py), (right, py)], fill=_GRID)
        draw.line([(left - 5, py), (left, py)], fill=_AXIS)
        _text(draw, (left - 8, py), _label(y), small, "rm")
    for x in xticks:
        px, _ = panel.to_px(x, panel.ylim[0])
        draw.line([(px, bottom), (px, bottom + 5)], fill=_AXIS)
        _text(draw, (px, bottom + 8), _label(x), small, "mt")
    draw.rectangle([left, top, right, bottom], outline=_AXIS)
    _text(draw, ((left + right) / 2, top - 6), title, font, "mb")
    _text(draw, ((left + right) / 2, bottom + 12 + _height(draw, small)), xlabel, small, "mt")


def _polyline(draw: ImageDraw.ImageDraw, panel: _Panel, xs, ys, colour, markers: bool) -> None:
    points = [panel.to_px(x, y) for x, y in zip(xs, ys, strict=True)]
    if len(points) > 1:
        draw.line(points, fill=colour, width=2, joint="curve")
    if markers or len(points) == 1:
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)


def _finite_floats(values: Any, name: str) -> list[float]:
    if values is None:
        return []
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"history[{name!r}] must be a list of numbers, got {type(values).__name__}")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"history[{name!r}] holds NaN or inf values")
    return out


def plot_history(
    history: Mapping, path: str | os.PathLike, *, width: int = 800, height: int = 600
) -> Path:
    """Draw the training loss and the train/validation accuracies as a PNG, atomically.

    The top panel is the loss per iteration, the bottom panel the accuracy per epoch (train
    and validation, with a legend). Either may be empty (no data yet): its axes are drawn.

    Parameters
    ----------
    history : dict
        With ``"loss_history"`` (per iteration), ``"train_acc_history"`` and
        ``"val_acc_history"`` (per epoch), as built by :meth:`cnnserve.solver.Solver.history`.
    path : str or PathLike
        The PNG file to write.
    width, height : int
        Image size in pixels (at least 320 x 240).

    Returns
    -------
    pathlib.Path
        The path written.

    Shape
    -----
    The image is ``width x height`` RGB.
    """
    if not isinstance(history, Mapping):
        raise TypeError(f"history must be a dict, got {type(history).__name__}")
    for name, value, minimum in (("width", width, 320), ("height", height, 240)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum} pixels, got {value}")
    loss = _finite_floats(history.get("loss_history"), "loss_history")
    train_acc = _finite_floats(history.get("train_acc_history"), "train_acc_history")
    val_acc = _finite_floats(history.get("val_acc_history"), "val_acc_history")

    scale = min(width / 800, height / 600)
    font, small = _font(max(10, round(15 * scale))), _font(max(9, round(12 * scale)))
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    # Vertical layout from the font sizes: title above each panel, tick labels and the axis
    # label below it.
    title_h, label_h = _height(draw, font), _height(draw, small)
    above = 6 + title_h + 6
    below = 8 + label_h + 4 + label_h + 6
    left, right = round(75 * scale), width - round(25 * scale)
    top1 = above
    gap = below + above
    plot_h = (height - top1 - gap - below) // 2
    bottom1 = top1 + plot_h
    top2 = bottom1 + gap
    bottom2 = top2 + plot_h

    # Loss per iteration (iterations counted from 1).
    iters = list(range(1, len(loss) + 1))
    xt = nice_ticks(1, max(len(loss), 2), 6, integer=True)
    yt = nice_ticks(min(loss), max(loss), 5) if loss else [0.0, 1.0]
    panel = _Panel((left, top1, right, bottom1), (xt[0], xt[-1]), (yt[0], yt[-1]))
    _draw_axes(draw, panel, xt, yt, "training loss", "iteration", font, small)
    _polyline(draw, panel, iters, loss, _LOSS, markers=False)

    # Accuracy per epoch (epochs counted from 1), y from 0 to 1.
    n_epochs = max(len(train_acc), len(val_acc))
    xt = nice_ticks(1, max(n_epochs, 2), 6, integer=True)
    if xt[0] > 1 or len(xt) < 2:
        xt = [1.0, *xt]
    yt = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    panel = _Panel((left, top2, right, bottom2), (min(xt[0], 1), xt[-1]), (0.0, 1.0))
    _draw_axes(draw, panel, xt, yt, "accuracy", "epoch", font, small)
    _polyline(draw, panel, range(1, len(train_acc) + 1), train_acc, _TRAIN, markers=True)
    _polyline(draw, panel, range(1, len(val_acc) + 1), val_acc, _VAL, markers=True)

    # Legend in the lower right corner of the accuracy panel.
    entries = [("train", _TRAIN), ("val", _VAL)]
    swatch = max(14, round(22 * scale))
    text_w = max(draw.textlength(text, font=small) for text, _ in entries)
    line_h = label_h + 6
    box_w = round(6 + swatch + 6 + text_w + 8)
    x0, y1 = right - box_w - 8, bottom2 - 8
    y0 = y1 - line_h * len(entries) - 8
    draw.rectangle([x0, y0, x0 + box_w, y1], fill=_BACKGROUND, outline=_AXIS)
    for k, (text, colour) in enumerate(entries):
        cy = y0 + 4 + line_h * k + line_h / 2
        draw.line([(x0 + 6, cy), (x0 + 6 + swatch, cy)], fill=colour, width=3)
        _text(draw, (x0 + 12 + swatch, cy), text, small, "lm")

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
