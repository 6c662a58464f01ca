"""Canvases of held-out digits: a demo image for score maps, and detector training windows.

:func:`digits_canvas` pastes test-split digits on a black canvas (an input for
:func:`cnnserve.dense.score_map`). The ``"digits-windows"`` format of :mod:`cnnserve.data`
cuts labelled 8x8 windows from such canvases: see :func:`canvas_windows`.
"""

from __future__ import annotations

import numpy as np

from cnnserve._checks import check_int
from cnnserve.data._common import check_fraction, split, stratified_order
from cnnserve.data.digits import load_digits
from cnnserve.specs import BACKGROUND

__all__ = ["canvas_windows", "digits_canvas", "load_digit_windows", "window_labels"]

_DIGIT = 8  # side of a digit image
_CANVAS_LAYOUTS = 20  # random layouts tried before digits_canvas gives up


def _place_boxes(
    H: int, W: int, count: int, margin: int, rng: np.random.Generator
) -> list[tuple[int, int]] | None:
    """Top-left corners ``(y0, x0)`` of ``count`` 8x8 boxes, or None when a layout jams.

    Each box is drawn uniformly among the corners still free: at least ``margin`` pixels
    from the canvas border and from every box placed before it.
    """
    d = _DIGIT
    # free[y, x]: may a box have its top-left corner at (margin + y, margin + x)?
    ny, nx = H - 2 * margin - d + 1, W - 2 * margin - d + 1
    if ny < 1 or nx < 1:
        return None
    free = np.ones((ny, nx), dtype=bool)
    corners = []
    for _ in range(count):
        spots = np.flatnonzero(free)
        if not spots.size:
            return None
        y, x = divmod(int(spots[rng.integers(spots.size)]), nx)
        corners.append((margin + y, margin + x))
        # Corners closer than d + margin on both axes would overlap or crowd this box.
        reach = d + margin - 1
        free[max(0, y - reach) : y + reach + 1, max(0, x - reach) : x + reach + 1] = False
    return corners


def digits_canvas(
    size: tuple[int, int] = (64, 128),
    count: int = 6,
    *,
    seed: int = 0,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    margin: int = 2,
) -> tuple[np.ndarray, list[dict]]:
    """A demo image for dense score maps: held-out 8x8 digits pasted on a black canvas.

    The digits are scikit-learn's bundled digits (raw 0..16 divided by 16) from the *test*
    split that ``load_dataset("digits", seed=split_seed, val_fraction=val_fraction,
    test_fraction=test_fraction)`` makes, so that a model trained on that data set has never
    seen them. They are pasted at their native 8x8 size at random positions that keep at
    least ``margin`` pixels between any two digits and between every digit and the border.
    With ``count <= 10`` the labels are distinct; with more, the digits are drawn from the
    whole test split without repetition. Everything is deterministic in ``seed`` (and
    ``split_seed``), whatever the global NumPy random state.

    Parameters
    ----------
    size : (int, int), optional
        ``(H, W)`` of the canvas, each at least 8.
    count : int, optional
        Number of digits, >= 1.
    seed : int, optional
        Seed of the choice of digits and of their positions, >= 0.
    split_seed, val_fraction, test_fraction
        The split the digits come from, as for :func:`load_dataset` (``seed``,
        ``val_fraction``, ``test_fraction``); ``test_fraction`` must be positive.
    margin : int, optional
        Minimum gap in pixels between digits, and between digits and the border, >= 0.

    Returns
    -------
    canvas : numpy.ndarray
        float32 in [0, 1] (background 0), shape ``(1, H, W)``.
    placements : list of dict
        One per digit, in the order placed: ``{"label": int, "index": int, "box": [x0, y0,
        x1, y1]}``, where ``index`` is the row in scikit-learn's digits and the box (``x1``,
        ``y1`` exclusive) is where the digit sits: ``canvas[0, y0:y1, x0:x1]`` is that digit.

    Raises
    ------
    TypeError
        An argument of the wrong type.
    ValueError
        ``size`` below 8, ``count`` digits that do not fit (no free position after a bounded
        number of random layouts), more digits than the test split holds, a bad fraction.

    Shape
    -----
    ``(1, H, W)`` with ``(H, W) = size``; every box is ``x1 - x0 = y1 - y0 = 8``.
    """
    if not isinstance(size, tuple | list) or len(size) != 2:
        raise TypeError(f"size must be a pair (H, W) of ints, got {size!r}")
    H, W = (check_int(v, "size", 1) for v in size)
    if H < _DIGIT or W < _DIGIT:
        raise ValueError(f"size must be at least (8, 8) to hold an 8x8 digit, got ({H}, {W})")
    count = check_int(count, "count", 1)
    seed = check_int(seed, "seed", 0)
    split_seed = check_int(split_seed, "split_seed", 0)
    margin = check_int(margin, "margin", 0)
    val_fraction = check_fraction(val_fraction, "val_fraction")
    test_fraction = check_fraction(test_fraction, "test_fraction")
    if test_fraction == 0:
        raise ValueError("test_fraction must be positive: the digits come from the test split")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}"
        )
    # n boxes in a row need 8n + margin (n + 1) pixels: the grid is the densest packing.
    per_col = (H - margin) // (_DIGIT + margin)
    per_row = (W - margin) // (_DIGIT + margin)
    digits = f"{count} digit{'s' if count > 1 else ''}"
    no_fit = f"cannot fit {digits} (8x8, margin {margin}) in a canvas of size ({H}, {W})"
    if count > per_col * per_row:
        raise ValueError(f"{no_fit}: at most {per_col * per_row} fit; enlarge size or lower count")

    _, X, y = load_digits()
    _, _, test = split(y, val_fraction, test_fraction, split_seed, "digits")
    if count > len(test):
        raise ValueError(f"count must be <= {len(test)} (the test split's size), got {count}")
    rng = np.random.default_rng(seed)
    if count <= 10:
        labels = rng.permutation(np.unique(y[test]))[:count]
        chosen = [int(rng.choice(test[y[test] == label])) for label in labels]
    else:
        chosen = [int(i) for i in rng.choice(test, size=count, replace=False)]

    for _ in range(_CANVAS_LAYOUTS):
        corners = _place_boxes(H, W, count, margin, rng)
        if corners is not None:
            break
    else:
        raise ValueError(
            f"{no_fit}: no room left after {_CANVAS_LAYOUTS} random layouts; enlarge size "
            "or lower count or margin"
        )

    canvas = np.zeros((1, H, W), dtype=np.float32)
    placements = []
    for index, (y0, x0) in zip(chosen, corners, strict=True):
        canvas[0, y0 : y0 + _DIGIT, x0 : x0 + _DIGIT] = X[index, 0] / np.float32(16)
        placements.append(
            {
                "label": int(y[index]),
                "index": index,
                "box": [x0, y0, x0 + _DIGIT, y0 + _DIGIT],
            }
        )
    return canvas, placements


# ---------------------------------------------------------------------------------------------
# Windows of digit canvases: training data for a detector
# ---------------------------------------------------------------------------------------------

_WINDOW_CANVAS = (32, 32)  # (H, W) of the canvases the windows are cut from
_WINDOW_COUNT = 4  # digits per canvas (the last canvas of a part may hold fewer)
_WINDOW_MARGIN = 2  # pixels between digits and from the border, as digits_canvas's default
_WINDOW_SHIFTS = 4  # one-pixel shifts per placed digit, besides its exact window
_WINDOW_NEAR = 3  # background windows per placed digit, 2 or 3 pixels off the nearest digit
_WINDOW_FAR = 2  # background windows with ink per placed digit, 4 or more pixels off all
_WINDOW_BLANK = 1  # blank windows per canvas
_WINDOW_LAYOUTS = 100  # random layouts tried per canvas (4 digits in 32x32 never jam in 1e4)


def window_labels(
    shape: tuple[int, int], corners: list[tuple[int, int]], classes: list[int], background: int
) -> tuple[np.ndarray, np.ndarray]:
    """The label and the offset of every 8x8 window of a canvas holding digits.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` of the canvas, each at least 8.
    corners : list of (int, int)
        Top-left corners ``(y0, x0)`` of the digits' 8x8 boxes, at least 2 pixels apart.
    classes : list of int
        The digits' classes, one per corner.
    background : int
        The label of a window that is no digit's.

    Returns
    -------
    label : numpy.ndarray
        int64: ``label[r, c]`` is the class of the window with top-left corner ``(r, c)``:
        the class of the digit whose corner is within 1 pixel in both axes (offset 0 or 1),
        else ``background``.
    offset : numpy.ndarray
        int64: ``offset[r, c] = min over digits of max(|r - y0|, |c - x0|)`` (the canvas
        size ``H + W`` without digits).

    Shape
    -----
    Both ``(H - 7, W - 7)``.
    """
    H, W = shape
    rr, cc = np.indices((H - _DIGIT + 1, W - _DIGIT + 1))  # the windows' corners
    offset = np.full(rr.shape, H + W, dtype=np.int64)
    label = np.full(rr.shape, background, dtype=np.int64)
    for (y0, x0), k in zip(corners, classes, strict=True):
        off = np.maximum(np.abs(rr - y0), np.abs(cc - x0))  # (H - 7, W - 7)
        label[off <= 1] = k
        offset = np.minimum(offset, off)
    return label, offset


def canvas_windows(
    X: np.ndarray, y: np.ndarray, indices: np.ndarray, rng: np.random.Generator, background: int
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled 8x8 windows cut from canvases of the digits ``X[indices]``.

    The digits, in a random order, are pasted four at a time on black 32x32 canvases, at
    random positions at least 2 pixels from each other and from the border (placed as
    :func:`digits_canvas` places them). The window with top-left corner ``(r, c)`` is
    ``canvas[r : r + 8, c : c + 8]``; its *offset* from a digit with corner ``(y0, x0)`` is
    ``max(|r - y0|, |c - x0|)``. A window at offset 0 or 1 from a digit is labelled with that
    digit's class (at most one digit qualifies: two digits' corners are 10 or more pixels
    apart in some axis), any other window ``background``. From each canvas, without
    repetition (fewer where a canvas has fewer candidates):

    - per digit, its exact window and 4 of its 8 one-pixel shifts (a random choice);
    - per digit, 3 background windows at offset 2 or 3 from the nearest digit: shifted digits,
      their halves, parts of a neighbour;
    - per digit, 2 background windows holding ink at offset 4 or more from every digit:
      edges and corners of digits, parts of two digits;
    - 1 blank window.

    So about half the windows are digits (a tenth of them per class), half background.

    Parameters
    ----------
    X : numpy.ndarray
        uint8 digits, raw values 0..16, shape ``(N, 1, 8, 8)``.
    y : numpy.ndarray
        Their int64 labels in ``[0, background)``, shape ``(N,)``.
    indices : numpy.ndarray
        The rows of ``X`` to use: one part of the split.
    rng : numpy.random.Generator
        The source of every random choice.
    background : int
        The label of background windows.

    Returns
    -------
    windows : numpy.ndarray
        uint8, raw values 0..16, shape ``(M, 1, 8, 8)``.
    labels : numpy.ndarray
        int64, shape ``(M,)``.

    Shape
    -----
    ``M = 10 n + ceil(n / 4)`` for ``n = len(indices)`` when no canvas runs short of
    candidates.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    d = _DIGIT
    H, W = _WINDOW_CANVAS
    order = indices[rng.permutation(len(indices))]
    windows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    for start in range(0, len(order), _WINDOW_COUNT):
        group = order[start : start + _WINDOW_COUNT]
        for _ in range(_WINDOW_LAYOUTS):
            corners = _place_boxes(H, W, len(group), _WINDOW_MARGIN, rng)
            if corners is not None:
                break
        else:  # pragma: no cover - the constants make a jam vanishingly rare
            raise RuntimeError(f"no layout of {len(group)} digits in {_WINDOW_CANVAS}")
        canvas = np.zeros((H, W), dtype=np.uint8)
        for index, (y0, x0) in zip(group, corners, strict=True):
            canvas[y0 : y0 + d, x0 : x0 + d] = X[index, 0]
        label, offset = window_labels((H, W), corners, [int(y[i]) for i in group], background)
        view = sliding_window_view(canvas, (d, d))  # (H - 7, W - 7, 8, 8)
        inked = view.any(axis=(2, 3))
        picked = []
        for y0, x0 in corners:
            picked.append((y0, x0))
            for k in rng.choice(len(shifts), _WINDOW_SHIFTS, replace=False):
                picked.append((y0 + shifts[k][0], x0 + shifts[k][1]))
        near = (offset >= 2) & (offset <= 3)
        far = (offset >= 4) & inked
        for mask, per_digit in ((near, _WINDOW_NEAR), (far, _WINDOW_FAR)):
            spots = np.flatnonzero(mask)
            take = min(spots.size, per_digit * len(group))
            for s in rng.choice(spots, take, replace=False):
                picked.append(divmod(int(s), label.shape[1]))
        rows, cols = np.array(picked).T
        windows.append(view[rows, cols][:, None])  # (n, 1, 8, 8)
        labels.append(label[rows, cols])
        windows.append(np.zeros((_WINDOW_BLANK, 1, d, d), dtype=np.uint8))
        labels.append(np.full(_WINDOW_BLANK, background, dtype=np.int64))
    if not windows:
        return np.zeros((0, 1, d, d), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    return np.concatenate(windows), np.concatenate(labels)


def load_digit_windows(seed: int, val_fraction: float, test_fraction: float):
    """The ``"digits-windows"`` source: windows cut from canvases of each part's digits.

    Returns ``(class_names, X, y, train, val, X_test, y_test)`` like the other loaders after
    their split: ``X`` (N, 1, 8, 8) uint8 holds the train then the val windows, ``train``
    (in stratified order) and ``val`` (shuffled) index it; the test windows are shuffled.
    """
    names, X, y = load_digits()
    parts = split(y, val_fraction, test_fraction, seed, "digits-windows")
    background = len(names)
    cut = [
        canvas_windows(X, y, part, np.random.default_rng([seed, 2, k]), background)
        for k, part in enumerate(parts)
    ]
    (X_tr, y_tr), (X_va, y_va), (X_te, y_te) = cut
    rng = np.random.default_rng([seed, 3])
    train = stratified_order(y_tr, rng)
    val = len(y_tr) + rng.permutation(len(y_va))
    test = rng.permutation(len(y_te))
    X_te, y_te = X_te[test], y_te[test]
    return (
        (*names, BACKGROUND),
        np.concatenate([X_tr, X_va]),
        np.concatenate([y_tr, y_va]),
        train,
        val,
        X_te,
        y_te,
    )
