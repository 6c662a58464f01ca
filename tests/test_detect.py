"""Detections from score maps (cnnserve.detect): peaks, IoU, non-maximum suppression.

Checked against plain-loop references on random maps and boxes, on constructed maps whose
peaks and boxes are known (across scales, at the threshold's edges, with nothing to find),
and end to end on the shipped digits detector's maps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cnnserve.dense import MultiScaleMap, ScoreMap, score_map
from cnnserve.detect import Detection, iou, nms, peaks
from cnnserve.geometry import Geometry
from cnnserve.images import read_image_file

ROOT = Path(__file__).resolve().parents[1]
DETECTOR = ROOT / "models" / "digits_detector.safetensors"
CANVAS = ROOT / "models" / "digits_demo" / "canvas.png"


# ---------------------------------------------------------------------------------------------
# Plain references
# ---------------------------------------------------------------------------------------------


def ref_peaks(plane: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    rows, cols = plane.shape
    found = []
    for i in range(rows):
        for j in range(cols):
            v = float(plane[i, j])
            if v < threshold:
                continue
            ok = True
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if (di, dj) == (0, 0) or not (0 <= a < rows and 0 <= b < cols):
                        continue
                    w = float(plane[a, b])
                    before = a < i or (a == i and b < j)
                    if (before and not v > w) or (not before and not v >= w):
                        ok = False
            if ok:
                found.append((i, j))
    return found


def ref_iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_nms(boxes, scores, limit) -> list[int]:
    order = sorted(range(len(scores)), key=lambda n: (-scores[n], n))
    kept: list[int] = []
    for n in order:
        if all(ref_iou(boxes[n], boxes[k]) <= limit for k in kept):
            kept.append(n)
    return kept


def ref_detections(maps, k, threshold, limit) -> list[tuple]:
    found = []
    for m in maps:
        plane = m.probabilities[k]
        for i, j in ref_peaks(plane, threshold):
            found.append((float(plane[i, j]), m.box(i, j), m.scale))
    keep = ref_nms([f[1] for f in found], [f[0] for f in found], limit)
    return [found[n] for n in keep]


# ---------------------------------------------------------------------------------------------
# Constructed maps
# ---------------------------------------------------------------------------------------------

GEOMETRY = Geometry(stride=2, window=(4, 4), receptive_field=(4, 4), offset=(0, 0), exact=True)


def make_map(planes, scale=1.0, image_size=None, names=("background", "thing"), dtype="float32"):
    """A ScoreMap with these (K, H', W') probabilities at stride 2, window 4, at ``scale``."""
    p = np.asarray(planes, dtype=dtype)
    rows, cols = p.shape[1:]
    resized = (4 + 2 * (rows - 1), 4 + 2 * (cols - 1))
    if image_size is None:
        image_size = (round(resized[0] / scale), round(resized[1] / scale))
    return ScoreMap(
        logits=np.log(np.clip(p, 1e-12, None)),
        probabilities=p,
        geometry=GEOMETRY,
        image_size=image_size,
        class_names=names,
        scale=scale,
        resized_size=resized,
        stride_divisor=1,
    )


def two_class(thing: np.ndarray) -> np.ndarray:
    """(2, H', W'): background = 1 - thing."""
    thing = np.asarray(thing, dtype=np.float64)
    return np.stack([1 - thing, thing])


# ---------------------------------------------------------------------------------------------
# Peaks, IoU, NMS against the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (5, 7), (9, 4)])
def test_peaks_match_the_loop_reference(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    for levels in (3, 5, None):  # few levels: many ties and flat tops
        plane = rng.random(shape)
        if levels:
            plane = np.round(plane * (levels - 1)) / (levels - 1)
        plane = plane.astype(dtype)
        for threshold in (0.0, 0.25, 0.5, 1.0):
            got = [tuple(p) for p in peaks(plane, threshold).tolist()]
            assert got == ref_peaks(plane, threshold), (levels, threshold)


def test_a_flat_top_gives_its_first_cell_only():
    plane = np.zeros((4, 5))
    plane[1:3, 1:4] = 0.8  # a 2x3 plateau
    assert peaks(plane, 0.5).tolist() == [[1, 1]]
    plane[3, 4] = 0.9  # a higher cell touching the plateau's corner (2, 3)
    assert peaks(plane, 0.5).tolist() == [[1, 1], [3, 4]]


def test_iou_known_values():
    assert iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1.0
    assert iou((0, 0, 2, 2), (2, 0, 4, 2)) == 0.0  # touching: x1 is exclusive
    assert iou((0, 0, 2, 2), (5, 5, 7, 7)) == 0.0
    assert iou((0, 0, 4, 2), (2, 0, 6, 2)) == pytest.approx(1 / 3)
    assert iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0  # empty boxes
    with pytest.raises(ValueError, match="a must be 4 finite numbers"):
        iou((0, 0, 1), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="b must have x1 >= x0"):
        iou((0, 0, 1, 1), (3, 0, 1, 1))


def test_iou_and_nms_match_the_references_on_random_boxes():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 40))
        xy = rng.uniform(0, 50, (n, 2))
        wh = rng.uniform(1, 20, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = np.round(rng.random(n), 1)  # ties
        for a in boxes[:5]:
            for b in boxes[:5]:
                assert iou(a, b) == pytest.approx(ref_iou(a, b), abs=1e-12)
                assert iou(a, b) == pytest.approx(iou(b, a), abs=1e-12)
        for limit in (0.0, 0.3, 0.7, 1.0):
            got = nms(boxes, scores, limit).tolist()
            assert got == ref_nms(boxes.tolist(), scores.tolist(), limit), (trial, limit)


def test_nms_bad_arguments():
    with pytest.raises(ValueError, match="as many"):
        nms([[0, 0, 1, 1]], [0.5, 0.6], 0.3)
    with pytest.raises(ValueError, match=r"nms_iou must be in \[0, 1\]"):
        nms([[0, 0, 1, 1]], [0.5], 1.5)
    assert nms(np.zeros((0, 4)), [], 0.3).tolist() == []


# ---------------------------------------------------------------------------------------------
# Detections on constructed maps
# ---------------------------------------------------------------------------------------------


def test_known_peaks_become_their_windows_best_first():
    thing = np.full((6, 8), 0.1)
    thing[1, 1] = 0.7
    thing[4, 6] = 0.9
    thing[4, 5] = 0.6  # beside a higher cell: not a peak
    m = make_map(two_class(thing))
    found = m.detections()  # the default class skips "background"
    assert found == [
        Detection("thing", 1, pytest.approx(0.9), (12.0, 8.0, 16.0, 12.0), 1.0),
        Detection("thing", 1, pytest.approx(0.7), (2.0, 2.0, 6.0, 6.0), 1.0),
    ]
    assert found[0].to_dict() == {
        "class": "thing",
        "class_index": 1,
        "score": found[0].score,
        "box": [12.0, 8.0, 16.0, 12.0],
        "scale": 1.0,
    }
    assert m.detections("thing") == m.detections(1) == found
    # background by name: its peaks are where "thing" is low
    assert all(d.class_name == "background" for d in m.detections("background", 0.5))


def test_overlapping_boxes_across_scales_keep_the_best():
    # Scale 1: a peak at cell (2, 2) -> box (4, 4, 8, 8). Scale 0.5 of the same 16 x 16 image
    # (a 8 x 8 resized image, 3 x 3 cells): cell (1, 1) -> resized box (2, 2, 6, 6) -> original
    # (4, 4, 12, 12): IoU 16/64 = 0.25 with the first.
    big = np.full((7, 7), 0.05)
    big[2, 2] = 0.8
    small = np.full((3, 3), 0.05)
    small[1, 1] = 0.95
    m1 = make_map(two_class(big), 1.0, (16, 16))
    m2 = make_map(two_class(small), 0.5, (16, 16))
    both = MultiScaleMap((m1, m2), m1.class_names)
    assert m2.box(1, 1) == (4.0, 4.0, 12.0, 12.0)
    kept = both.detections("thing", 0.5, nms_iou=0.2)  # 0.25 > 0.2: suppressed
    assert [(d.box, d.scale) for d in kept] == [((4.0, 4.0, 12.0, 12.0), 0.5)]
    kept = both.detections("thing", 0.5, nms_iou=0.25)  # 0.25 is not above 0.25: both stay
    assert [(d.box, d.scale, round(d.score, 2)) for d in kept] == [
        ((4.0, 4.0, 12.0, 12.0), 0.5, 0.95),
        ((4.0, 4.0, 8.0, 8.0), 1.0, 0.8),
    ]


def test_threshold_edges():
    thing = np.full((3, 3), 0.25)
    thing[1, 1] = 0.5  # exactly representable: at the threshold counts
    m = make_map(two_class(thing))
    assert len(m.detections("thing", threshold=0.5)) == 1
    assert m.detections("thing", threshold=float(np.nextafter(0.5, 1))) == []
    assert m.detections("thing", threshold=1.0) == []
    # threshold 0: every local maximum (here the one peak; a flat map gives its first cell)
    assert len(m.detections("thing", threshold=0.0)) == 1
    flat = make_map(two_class(np.full((3, 4), 0.25)))
    assert [d.box for d in flat.detections("thing", 0.0)] == [(0.0, 0.0, 4.0, 4.0)]


def test_no_detections_below_the_threshold():
    m = make_map(two_class(np.linspace(0, 0.49, 20).reshape(4, 5)))
    assert m.detections("thing") == []
    assert MultiScaleMap((m, m), m.class_names).detections("thing") == []


def test_bad_parameters_name_themselves():
    m = make_map(two_class(np.full((2, 2), 0.6)))
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        m.detections(threshold=1.5)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        m.detections(threshold=math.nan)
    with pytest.raises(ValueError, match=r"nms_iou must be in \[0, 1\]"):
        m.detections(nms_iou=-0.1)
    with pytest.raises(ValueError, match="class 'cat' is neither a class name nor an index"):
        m.detections("cat")
    with pytest.raises(TypeError, match="threshold must be a number"):
        m.detections(threshold="0.5")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_random_multiscale_maps_match_the_reference(dtype):
    rng = np.random.default_rng(3)
    for trial in range(10):
        maps = []
        for scale in (1.0, 0.75, 0.5):
            rows, cols = rng.integers(1, 9, 2)
            thing = np.round(rng.random((rows, cols)) * 8) / 8
            maps.append(make_map(two_class(thing), scale, (20, 20), dtype=dtype))
        multi = MultiScaleMap(tuple(maps), maps[0].class_names)
        for threshold, limit in ((0.5, 0.3), (0.0, 0.0), (0.75, 1.0)):
            got = [(d.score, d.box, d.scale) for d in multi.detections(1, threshold, limit)]
            assert got == ref_detections(maps, 1, threshold, limit), (trial, threshold, limit)


# ---------------------------------------------------------------------------------------------
# The shipped detector
# ---------------------------------------------------------------------------------------------


def test_the_shipped_detector_finds_the_demo_canvas_digits():
    image = read_image_file(CANVAS, 1)
    result = score_map(DETECTOR, image, scales=[1.0, 0.75], stride_divisor=2)
    for k in (2, 3):
        got = [(d.score, d.box, d.scale) for d in result.detections(k, 0.5, 0.3)]
        assert got == ref_detections(result.maps, k, 0.5, 0.3)
    # The canvas's "3" sits at (x, y) = (40, 24) (README): the best "3" box holds it.
    best = result.detections("3")[0]
    x0, y0, x1, y1 = best.box
    assert best.class_name == "3" and best.score > 0.9
    assert x0 <= 40 + 4 <= x1 and y0 <= 24 + 4 <= y1
    # Default class: never "background"
    assert result.detections()[0].class_name != "background"


def test_at_most_max_candidates_peaks_are_suppressed(monkeypatch):
    import cnnserve.detect as detect

    rng = np.random.default_rng(5)
    maps = [make_map(two_class(rng.random((12, 15))), scale, (30, 30)) for scale in (1.0, 0.8)]
    multi = MultiScaleMap(tuple(maps), maps[0].class_names)
    full = multi.detections("thing", 0.0, 0.1)
    monkeypatch.setattr(detect, "MAX_CANDIDATES", 7)
    capped = multi.detections("thing", 0.0, 0.1)
    # the best 7 peaks' suppression: the first detections of the full one
    assert 0 < len(capped) < len(full) and capped == full[: len(capped)]
    seventh = sorted((d.score for d in full), reverse=True)[6] if len(full) > 6 else 0
    assert all(d.score >= seventh for d in capped)
