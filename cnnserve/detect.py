"""Detections from score maps: peaks of a class's probability, as boxes in the image.

A converted network's map (:mod:`cnnserve.dense`) gives, for every training-size window of
the image, the probability of each class. A detector finds where a class is:

1. **Peaks**: in each scale's map, the cells whose probability of the class is at least the
   threshold and a local maximum over their 8 neighbours (:func:`peaks`). On a flat top (equal
   neighbours) the first cell in row-major order is the peak: a cell equal to a neighbour
   before it (the row above, or to its left) is not one.
2. **Boxes**: each peak's window, mapped back through its scale into the original image's
   pixels (``ScoreMap.box``): ``(x0, y0, x1, y1)``, x right, y down, x1/y1 exclusive.
3. **Non-maximum suppression** across the scales (:func:`nms`): greedily, the best remaining
   peak is kept and every other whose box overlaps it by an intersection over union (:func:`iou`)
   above ``nms_iou`` is dropped. Equal scores keep the order of the scales, then row-major.

``ScoreMap.detections`` and ``MultiScaleMap.detections`` call :func:`detections` with the
class they default to (:func:`cnnserve.dense.default_class`: never a class named background).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnserve._checks import check_int, check_number

__all__ = ["MAX_CANDIDATES", "Detection", "detections", "iou", "nms", "peaks"]

# The most peaks that go into the non-maximum suppression, the best first: it costs about
# n * kept IoUs, and a threshold of 0 on a large map has a peak every few cells.
MAX_CANDIDATES = 10_000


@dataclass(frozen=True)
class Detection:
    """One detected object: a peak of a class's probability and the window it scores.

    Attributes
    ----------
    class_name : str
    class_index : int
    score : float
        The class's probability at the peak cell.
    box : tuple of float
        ``(x0, y0, x1, y1)`` in the original image's pixels (x1, y1 exclusive).
    scale : float
        The scale of the map the peak is on (1.0: the image as given).
    """

    class_name: str
    class_index: int
    score: float
    box: tuple[float, float, float, float]
    scale: float

    def to_dict(self) -> dict:
        """JSON-ready: ``{"class", "class_index", "score", "box": [x0, y0, x1, y1], "scale"}``."""
        return {
            "class": self.class_name,
            "class_index": self.class_index,
            "score": self.score,
            "box": list(self.box),
            "scale": self.scale,
        }


def _check_box(box: Any, name: str) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        raise ValueError(f"{name} must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
    if b[2] < b[0] or b[3] < b[1]:
        raise ValueError(f"{name} must have x1 >= x0 and y1 >= y0, got {box!r}")
    return b


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``(x0, y0, x1, y1)`` (x1, y1 exclusive).

    0.0 for boxes that do not overlap, 1.0 for equal boxes of positive area; two empty boxes
    have 0.0.

    Raises
    ------
    ValueError
        A box that is not 4 finite numbers with ``x1 >= x0`` and ``y1 >= y0``.
    """
    a, b = _check_box(a, "a"), _check_box(b, "b")
    return float(_iou_one_many(a, b[None])[0])


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_one_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box ``(4,)`` with each of ``boxes`` ``(n, 4)``: shape ``(n,)``."""
    w = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    h = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    union = _area(box) + _area(boxes) - inter
    out = np.zeros(len(boxes))
    np.divide(inter, union, out=out, where=union > 0)
    return out


def nms(boxes: Any, scores: Any, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: the indices of the boxes kept, best score first.

    Parameters
    ----------
    boxes : array_like, shape (n, 4)
        ``(x0, y0, x1, y1)`` each.
    scores : array_like, shape (n,)
    iou_threshold : float in [0, 1]
        A box whose IoU with a kept, better box is above this is dropped (1: none is).

    Returns
    -------
    ndarray of int64, shape (m,)
        Ties in score keep the input order (a stable sort).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"boxes and scores must be as many, got {len(boxes)} and {len(scores)}")
    limit = check_number(iou_threshold, "nms_iou", 0, 1, "[]")
    order = np.argsort(-scores, kind="stable")
    kept = []
    while order.size:
        best, order = order[0], order[1:]
        kept.append(best)
        if order.size:
            order = order[_iou_one_many(boxes[best], boxes[order]) <= limit]
    return np.array(kept, dtype=np.int64)


def peaks(plane: Any, threshold: float) -> np.ndarray:
    """The peak cells of a map: at least ``threshold`` and a local maximum of 8 neighbours.

    A cell is a peak when it is ``>= threshold``, greater than its neighbours before it in
    row-major order (the row above, and its left) and not less than those after it: a flat
    top gives its first cell.

    Parameters
    ----------
    plane : array_like, shape (H', W')
    threshold : float

    Returns
    -------
    ndarray of int64, shape (n, 2)
        ``(row, col)`` of each peak, in row-major order.
    """
    v = np.asarray(plane)
    if v.ndim != 2:
        raise ValueError(f"plane must be 2-D (H', W'), got shape {v.shape}")
    v = v.astype(np.float64, copy=False)
    padded = np.pad(v, 1, constant_values=-np.inf)
    rows, cols = v.shape
    ok = v >= threshold
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            other = padded[1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]
            ok &= (v > other) if (dy, dx) < (0, 0) else (v >= other)
    return np.argwhere(ok)


def detections(
    maps: Sequence[Any], class_index: int, threshold: float = 0.5, nms_iou: float = 0.3
) -> list[Detection]:
    """Detections of one class over the maps of one image (one per scale), best first.

    Parameters
    ----------
    maps : sequence of ScoreMap
        Each with ``probabilities`` ``(K, H', W')``, ``class_names``, ``scale``, ``geometry``
        and ``factors`` (:class:`cnnserve.dense.ScoreMap`): a peak's box is its
        ``ScoreMap.box``.
    class_index : int
        The class, in ``[0, K)``.
    threshold : float in [0, 1]
        The lowest probability a peak may have.
    nms_iou : float in [0, 1]
        Peaks (from any scale) whose boxes overlap a better one's by an IoU above this are
        dropped.

    Returns
    -------
    list of Detection
        Best score first; empty when no cell reaches the threshold. At most the best
        :data:`MAX_CANDIDATES` peaks go into the suppression (a lower score never suppresses
        a higher one, so the result is the first detections of the suppression of them all).
    """
    if not maps:
        raise ValueError("maps must hold at least one score map, got none")
    names = tuple(maps[0].class_names)
    k = check_int(class_index, "class_index", 0, len(names) - 1)
    threshold = check_number(threshold, "threshold", 0, 1, "[]")
    check_number(nms_iou, "nms_iou", 0, 1, "[]")
    scores, boxes, scales = [], [], []
    for m in maps:
        plane = m.probabilities[k]
        i, j = peaks(plane, threshold).T
        s, (th, tw) = m.geometry.stride, m.geometry.window
        fy, fx = m.factors
        corners = np.stack([s * j, s * i, s * j + tw, s * i + th], axis=1)  # (n, 4) int64
        boxes.append(corners / np.array([fx, fy, fx, fy]))  # in the original image
        scores.append(plane[i, j].astype(np.float64))
        scales.append(np.full(len(i), float(m.scale)))
    score, box, scale = np.concatenate(scores), np.concatenate(boxes), np.concatenate(scales)
    if len(score) > MAX_CANDIDATES:
        best = np.sort(np.argsort(-score, kind="stable")[:MAX_CANDIDATES])  # input order kept
        score, box, scale = score[best], box[best], scale[best]
    keep = nms(box, score, nms_iou).tolist()
    return [
        Detection(names[k], k, float(score[n]), tuple(box[n].tolist()), float(scale[n]))
        for n in keep
    ]
