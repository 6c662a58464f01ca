"""The training-history picture and the heatmaps' legend (class label and colour bar)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnnserve.heatmap import add_legend, colorize, heatmap_image
from cnnserve.history import history_picture, log_ticks, nice_ticks

ORANGE = (255, 127, 14)  # validation
GREEN = (44, 160, 44)  # the chosen epoch

# ---------------------------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------------------------


def test_log_ticks():
    assert log_ticks(0.02, 3.5) == [0.01, 0.1, 1.0, 10.0]
    assert log_ticks(0.3, 0.9) == [0.2, 0.5, 1.0]
    assert log_ticks(1.0, 1.0) == [1.0, 2.0]  # an axis with a length
    assert log_ticks(0.7, 0.7) == [0.5, 1.0]
    with pytest.raises(ValueError, match="a log axis needs 0 < low"):
        log_ticks(0.0, 1.0)


def history(val_loss, val_acc, train_acc, best, per_epoch=10):
    n = len(val_acc)
    loss = list(np.geomspace(3.0, 0.05, n * per_epoch))
    return {
        "loss_history": loss,
        "val_loss_history": val_loss,
        "train_acc_history": train_acc,
        "val_acc_history": val_acc,
        "iterations_per_epoch": per_epoch,
        "best_epoch": best,
    }


def mask(picture: Image.Image, colour) -> np.ndarray:
    return np.all(np.asarray(picture) == colour, axis=2)


def test_validation_loss_is_on_a_log_scale():
    """Losses 10, 1, 0.1, 0.01 at epochs 1..4 sit at equal steps: a log axis."""
    picture = history_picture(history([10.0, 1.0, 0.1, 0.01], [0.5] * 4, [0.5] * 4, None))
    orange = mask(picture, ORANGE)[:300]  # the loss panel
    left, right = 75, 775  # panel box at 800 x 600; epochs 0..4 on x
    rows = []
    for epoch in (1, 2, 3):
        x = round(left + epoch / 4 * (right - left))
        ys = np.flatnonzero(orange[:, x - 1 : x + 2].any(axis=1))
        rows.append(ys.mean())
    steps = np.diff(rows)
    assert steps[0] > 20 and abs(steps[0] - steps[1]) <= 2


def test_accuracy_axis_fits_the_data_and_the_chosen_epoch_is_marked():
    val_acc = [0.90, 0.95, 0.97, 0.99, 0.98]
    picture = history_picture(history([1.0, 0.5, 0.3, 0.2, 0.25], val_acc, val_acc, 4))
    orange = mask(picture, ORANGE)[300:]  # the accuracy panel
    ys = np.flatnonzero(orange.any(axis=1))
    # From 0.90 to 0.99 spans most of the panel's ~220 rows (on a 0..1 axis: about 20).
    assert ys.max() - ys.min() > 150
    green = mask(picture, GREEN)
    x = round(75 + 4 / 5 * 700)  # epoch 4 of 0..5
    column = green[:, x - 1 : x + 2].any(axis=1)
    assert column[:300].sum() > 50 and column[300:].sum() > 50  # dashed, in both panels
    lines = np.flatnonzero(green.sum(axis=0) > 50)  # columns of a line (not the legend's swatch)
    assert set(lines) <= {x - 1, x, x + 1} and lines.size
    assert not mask(history_picture(history([1.0] * 5, val_acc, val_acc, None)), GREEN).any()


def test_a_history_without_validation_loss_still_draws():
    old = history([], [0.4, 0.6], [0.5, 0.7], 2)
    del old["val_loss_history"]
    picture = history_picture(old, width=320, height=240)
    assert picture.size == (320, 240)
    assert nice_ticks(0, 1, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


# ---------------------------------------------------------------------------------------------
# Heatmap legends
# ---------------------------------------------------------------------------------------------


def find(sheet: Image.Image, picture: Image.Image) -> tuple[int, int]:
    """Where ``picture`` is pasted unchanged in ``sheet``."""
    big, small = np.asarray(sheet), np.asarray(picture)
    h, w = small.shape[:2]
    for y in range(big.shape[0] - h + 1):
        for x in range(min(20, big.shape[1] - w + 1)):
            if np.array_equal(big[y : y + h, x : x + w], small):
                return x, y
    raise AssertionError("the picture is not in the sheet")


def test_a_legend_keeps_the_heatmap_and_adds_its_colour_bar():
    image = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    values = np.linspace(0, 1, 6 * 8).reshape(6, 8)
    bare = heatmap_image(image, values, stride=7, window=10, zoom=3)
    framed = heatmap_image(image, values, stride=7, window=10, zoom=3, legend="class 'cat': p")
    x, y = find(framed, bare)
    assert x == 6 and 15 < y < 40  # below the title
    assert framed.width > bare.width + 30 and framed.height >= bare.height + y
    np.testing.assert_array_equal(
        np.asarray(add_legend(bare, "class 'cat': p")), np.asarray(framed)
    )
    # The colour bar: a column beside the heatmap runs from the top colour down to the bottom.
    column = np.asarray(framed)[y : y + bare.height, 6 + bare.width + 10 + 7]
    ends = colorize(np.array([[1.0, 0.0]]))[0]
    np.testing.assert_array_equal(column[0], ends[0])
    np.testing.assert_array_equal(column[-1], ends[1])
    lightness = column.astype(int).sum(axis=1)
    assert (np.diff(lightness) <= 3).all()  # darker downwards (inferno is monotone)
    # The title's text is drawn: dark pixels above the heatmap.
    assert (np.asarray(framed)[:y, :].sum(axis=2) < 300).any()


def test_a_tiny_heatmap_gets_a_readable_bar_and_errors_are_named():
    tiny = Image.new("RGB", (8, 8))
    framed = add_legend(tiny, "class '3': probability", vmin=0.0, vmax=0.5)
    assert framed.height >= 120 and framed.width > 100
    with pytest.raises(TypeError, match="picture must be a PIL.Image.Image"):
        add_legend(np.zeros((8, 8)), "x")
    with pytest.raises(TypeError, match="title must be a str"):
        add_legend(tiny, 3)
    with pytest.raises(ValueError, match="vmax must be greater than vmin"):
        add_legend(tiny, "x", vmin=1, vmax=1)
