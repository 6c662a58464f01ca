"""Training histories: JSON files and a PNG plot drawn with Pillow.

A history is the dict built by :meth:`cnnserve.solver.Solver.history`::

    {"format": "cnnserve.history", "version": 1,
     "loss_history": [...],        # one training loss per iteration
     "train_acc_history": [...],   # one training accuracy per epoch
     "val_acc_history": [...],     # one validation accuracy per epoch
     "val_loss_history": [...],    # one validation loss per epoch
     "iterations_per_epoch": int, "epochs_completed": int, "num_epochs": int,
     "best_val_acc": float | None, "best_epoch": int | None,
     "options": {...},         # the solver's options
     "timings": {"epoch_seconds": [...], "total_seconds": float}}

:func:`plot_history` draws two panels against the epoch, with axes, ticks and legends, using
``PIL.ImageDraw`` only (matplotlib is not a dependency): the training and validation loss on a
log scale, and the training and validation accuracy on an axis fit to the data, with the
epoch whose parameters the solver kept marked in both.
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

from PIL import Image, ImageDraw

from cnnserve import _draw
from cnnserve._files import atomic_write_bytes

__all__ = [
    "HISTORY_FORMAT",
    "history_picture",
    "log_ticks",
    "nice_ticks",
    "plot_history",
    "read_history",
    "write_history",
]

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
_AXIS = _draw.INK
_GRID = (225, 225, 225)
_TRAIN_LIGHT = (174, 199, 232)  # the loss of every iteration
_TRAIN = (31, 119, 180)
_VAL = (255, 127, 14)
_CHOSEN = (44, 160, 44)


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


def log_ticks(low: float, high: float) -> list[float]:
    """Ticks of a log axis covering ``[low, high]`` (both > 0): the powers of ten, and 2 and 5
    times them when the range spans fewer than two decades.

    Returns
    -------
    list of float
        Increasing, at least two; the first is <= ``low`` and the last >= ``high``.
    """
    if not (0 < low <= high < math.inf):
        raise ValueError(f"a log axis needs 0 < low <= high, finite; got [{low}, {high}]")
    lo, hi = math.floor(math.log10(low) + 1e-12), math.ceil(math.log10(high) - 1e-12)
    hi = max(hi, lo + 1)
    multiples = (1, 2, 5) if hi - lo < 2 else (1,)
    ticks = [m * 10.0**e for e in range(lo, hi + 1) for m in multiples]
    ticks = [t for t in ticks if t <= 10.0**hi]
    # Trim to the tightest ticks that still cover the data.
    below = [t for t in ticks if t <= low * (1 + 1e-12)]
    above = [t for t in ticks if t >= high * (1 - 1e-12)]
    chosen = [t for t in ticks if below[-1] <= t <= above[0]]
    if len(chosen) < 2:  # low == high on a tick: the next tick up gives the axis a length
        chosen.append(ticks[ticks.index(chosen[0]) + 1])
    return chosen


def _label(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


class _Panel:
    """A rectangle of the image with data limits, mapping data to pixel coordinates."""

    def __init__(self, box: tuple[int, int, int, int], xlim, ylim, log: bool = False):
        self.box = box  # (left, top, right, bottom) in pixels
        self.xlim = xlim
        self.log = log
        self.ylim = tuple(math.log10(v) for v in ylim) if log else ylim

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        if self.log:
            y = math.log10(y) if y > 0 else y0
        y = min(max(y, y0), y1)  # a point beyond the axis is drawn on it
        px = left + (x - x0) / (x1 - x0) * (right - left)
        py = bottom - (y - y0) / (y1 - y0) * (bottom - top)
        return px, py


def _draw_axes(draw, panel: _Panel, xticks, yticks, title: str, xlabel: str, font, small):
    left, top, right, bottom = panel.box
    for y in yticks:
        _, py = panel.to_px(panel.xlim[0], y)
        draw.line([(left, py), (right, py)], fill=_GRID)
        draw.line([(left - 5, py), (left, py)], fill=_AXIS)
        _draw.text(draw, (left - 8, py), _label(y), small, "rm")
    for x in xticks:
        px, _ = panel.to_px(x, yticks[0])
        draw.line([(px, bottom), (px, bottom + 5)], fill=_AXIS)
        _draw.text(draw, (px, bottom + 8), _label(x), small, "mt")
    draw.rectangle([left, top, right, bottom], outline=_AXIS)
    _draw.text(draw, ((left + right) / 2, top - 6), title, font, "mb")
    below = bottom + 12 + _draw.line_height(small)
    _draw.text(draw, ((left + right) / 2, below), xlabel, small, "mt")


def _polyline(draw, panel: _Panel, xs, ys, colour, markers: bool, width: int = 2) -> None:
    points = [panel.to_px(x, y) for x, y in zip(xs, ys, strict=True)]
    if len(points) > 1:
        draw.line(points, fill=colour, width=width, joint="curve")
    if markers or len(points) == 1:
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)


def _chosen(draw, panel: _Panel, epoch: float | None) -> None:
    """A dashed vertical line at the chosen epoch."""
    if epoch is None or not panel.xlim[0] <= epoch <= panel.xlim[1]:
        return
    _, top, _, bottom = panel.box
    px, _ = panel.to_px(epoch, 1.0)
    for y in range(top + 1, bottom, 8):
        draw.line([(px, y), (px, min(y + 4, bottom - 1))], fill=_CHOSEN, width=2)


def _legend(draw, panel: _Panel, entries, small, corner: str) -> None:
    """A box of ``(text, colour)`` lines in the panel's ``"ur"`` or ``"lr"`` corner."""
    left, top, right, bottom = panel.box
    swatch, line_h = 22, _draw.line_height(small) + 6
    box_w = round(6 + swatch + 6 + max(_draw.text_width(t, small) for t, _ in entries) + 8)
    box_h = line_h * len(entries) + 8
    x0 = right - box_w - 8
    y0 = top + 8 if corner == "ur" else bottom - 8 - box_h
    draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill=_BACKGROUND, outline=_AXIS)
    for k, (text, colour) in enumerate(entries):
        cy = y0 + 4 + line_h * k + line_h / 2
        draw.line([(x0 + 6, cy), (x0 + 6 + swatch, cy)], fill=colour, width=3)
        _draw.text(draw, (x0 + 12 + swatch, cy), text, small, "lm")


def _finite_floats(values: Any, name: str) -> list[float]:
    if values is None:
        return []
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"history[{name!r}] must be a list of numbers, got {type(values).__name__}")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"history[{name!r}] holds NaN or inf values")
    return out


def _epoch_means(loss: list[float], per_epoch: int) -> list[float]:
    """The mean training loss of each whole epoch."""
    return [
        sum(loss[e * per_epoch : (e + 1) * per_epoch]) / per_epoch
        for e in range(len(loss) // per_epoch)
    ]


def history_picture(history: Mapping, *, width: int = 800, height: int = 600) -> Image.Image:
    """The picture of :func:`plot_history`, not written to a file.

    Returns
    -------
    PIL.Image.Image
        RGB, ``width x height``.
    """
    if not isinstance(history, Mapping):
        raise TypeError(f"history must be a dict, got {type(history).__name__}")
    for name, value, minimum in (("width", width, 320), ("height", height, 240)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum} pixels, got {value}")
    loss = _finite_floats(history.get("loss_history"), "loss_history")
    val_loss = _finite_floats(history.get("val_loss_history"), "val_loss_history")
    train_acc = _finite_floats(history.get("train_acc_history"), "train_acc_history")
    val_acc = _finite_floats(history.get("val_acc_history"), "val_acc_history")
    n_epochs = max(len(train_acc), len(val_acc), len(val_loss))
    per_epoch = history.get("iterations_per_epoch")
    if isinstance(per_epoch, bool) or not isinstance(per_epoch, int) or per_epoch < 1:
        per_epoch = max(1, len(loss) // n_epochs) if n_epochs else max(1, len(loss))
    best = history.get("best_epoch")
    best = best if isinstance(best, int) and not isinstance(best, bool) and best >= 1 else None

    scale = min(width / 800, height / 600)
    font, small = _draw.font(max(10, round(15 * scale))), _draw.font(max(9, round(12 * scale)))
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    # Vertical layout from the font sizes: title above each panel, tick labels and the axis
    # label below it.
    title_h, label_h = _draw.line_height(font), _draw.line_height(small)
    above = 6 + title_h + 6
    below = 8 + label_h + 4 + label_h + 6
    left, right = round(75 * scale), width - round(25 * scale)
    plot_h = (height - above - (below + above) - below) // 2
    top1, bottom1 = above, above + plot_h
    top2 = bottom1 + below + above
    bottom2 = top2 + plot_h

    # Both panels: epochs on x (iteration i of the loss at (i + 1) / per_epoch).
    last = max(n_epochs, len(loss) / per_epoch, 1)
    xt = nice_ticks(0, last, 6, integer=True)
    xlim = (0.0, max(xt[-1], 1.0))
    chosen = [(f"chosen: epoch {best}", _CHOSEN)] if best is not None else []

    # Loss, log scale: every iteration (light), each epoch's mean, and validation.
    means = _epoch_means(loss, per_epoch)
    positive = [v for v in (*loss, *val_loss) if v > 0]
    yt = log_ticks(min(positive), max(positive)) if positive else [0.1, 1.0, 10.0]
    panel = _Panel((left, top1, right, bottom1), xlim, (yt[0], yt[-1]), log=True)
    _draw_axes(draw, panel, xt, yt, "loss (log scale)", "epoch", font, small)
    iters = [(i + 1) / per_epoch for i in range(len(loss))]
    _polyline(draw, panel, iters, loss, _TRAIN_LIGHT, markers=False, width=1)
    _polyline(draw, panel, range(1, len(means) + 1), means, _TRAIN, markers=False)
    _polyline(draw, panel, range(1, len(val_loss) + 1), val_loss, _VAL, markers=True)
    _chosen(draw, panel, best)
    entries = [("train, each iteration", _TRAIN_LIGHT), ("train, epoch mean", _TRAIN)]
    _legend(draw, panel, [*entries, ("validation", _VAL), *chosen], small, "ur")

    # Accuracy per epoch, the axis fit to the data.
    accs = [*train_acc, *val_acc]
    if accs:
        low, high = min(accs), max(accs)
        pad = max((high - low) * 0.05, 0.005)
        yt = nice_ticks(max(0.0, low - pad), min(1.0, high + pad), 5)
    else:
        yt = nice_ticks(0.0, 1.0, 5)
    panel = _Panel((left, top2, right, bottom2), xlim, (yt[0], yt[-1]))
    title = "accuracy"
    if best is not None and best <= len(val_acc):
        title += f" (validation {val_acc[best - 1]:.3f} at the chosen epoch {best})"
    _draw_axes(draw, panel, xt, yt, title, "epoch", font, small)
    _polyline(draw, panel, range(1, len(train_acc) + 1), train_acc, _TRAIN, markers=True)
    _polyline(draw, panel, range(1, len(val_acc) + 1), val_acc, _VAL, markers=True)
    _chosen(draw, panel, best)
    _legend(draw, panel, [("train", _TRAIN), ("validation", _VAL), *chosen], small, "lr")
    return image


def plot_history(
    history: Mapping, path: str | os.PathLike, *, width: int = 800, height: int = 600
) -> Path:
    """Draw a training history as a PNG, atomically.

    The top panel is the loss on a log scale against the epoch: every iteration's training
    loss (light), each epoch's mean training loss and the validation loss (when the history
    has ``val_loss_history``). The bottom panel is the accuracy per epoch, training and
    validation, on an axis fit to the data (not 0 to 1, which flattens the curves). The
    chosen epoch (``best_epoch``: the parameters the solver kept) is a dashed green line in
    both. Either panel may be empty (no data yet): its axes are drawn.

    Parameters
    ----------
    history : dict
        With ``"loss_history"`` (per iteration), ``"val_loss_history"``,
        ``"train_acc_history"`` and ``"val_acc_history"`` (per epoch),
        ``"iterations_per_epoch"`` and ``"best_epoch"``, as built by
        :meth:`cnnserve.solver.Solver.history`.
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
    image = history_picture(history, width=width, height=height)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())
