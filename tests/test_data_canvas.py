"""digits_canvas: held-out digits pasted on a canvas, a demo image for dense score maps."""

import numpy as np
import pytest

from cnnserve.data import digits_canvas, load_dataset
from cnnserve.data._common import split as _split


def gap(a, b):
    """Pixels between two boxes [x0, y0, x1, y1]: the larger of the x gap and the y gap."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def check_canvas(canvas, placements, X, y, test_idx, size, count, margin):
    H, W = size
    assert canvas.dtype == np.float32 and canvas.shape == (1, H, W)
    assert canvas.min() >= 0 and canvas.max() <= 1
    assert len(placements) == count
    covered = np.zeros((H, W), dtype=bool)
    for p in placements:
        assert set(p) == {"label", "index", "box"}
        assert all(type(v) is int for v in (p["label"], p["index"], *p["box"]))
        x0, y0, x1, y1 = p["box"]
        assert (x1 - x0, y1 - y0) == (8, 8)
        assert x0 >= margin and y0 >= margin and x1 <= W - margin and y1 <= H - margin
        assert p["index"] in test_idx
        assert p["label"] == y[p["index"]]
        np.testing.assert_array_equal(canvas[0, y0:y1, x0:x1], X[p["index"], 0] / 16)
        covered[y0:y1, x0:x1] = True
    assert np.all(canvas[0][~covered] == 0)  # background
    for i, a in enumerate(placements):
        for b in placements[i + 1 :]:
            assert gap(a["box"], b["box"]) >= margin, (a, b)


def test_default_canvas(digit_images):
    X, y = digit_images
    canvas, placements = digits_canvas()
    _, _, test = _split(y, 0.1, 0.2, 0, "digits")
    check_canvas(canvas, placements, X, y, set(test.tolist()), (64, 128), 6, 2)
    labels = [p["label"] for p in placements]
    assert len(set(labels)) == 6


def test_digits_are_the_test_split_of_load_dataset(digit_images):
    X, y = digit_images
    ds = load_dataset("digits", seed=3, val_fraction=0.15, test_fraction=0.25)
    canvas, placements = digits_canvas(
        (40, 40), 4, seed=5, split_seed=3, val_fraction=0.15, test_fraction=0.25
    )
    _, _, test = _split(y, 0.15, 0.25, 3, "digits")
    check_canvas(canvas, placements, X, y, set(test.tolist()), (40, 40), 4, 2)
    # The same images as load_dataset's X_test (normalised there): match them pixel for pixel.
    x01_test = ds.X_test.astype(np.float64) * ds.std[0] + ds.mean[0]  # (N, 1, 8, 8)
    for p in placements:
        x0, y0, x1, y1 = p["box"]
        patch = canvas[0, y0:y1, x0:x1]
        dist = np.abs(x01_test[:, 0] - patch).max(axis=(1, 2))
        k = int(np.argmin(dist))
        assert dist[k] < 1e-5 and ds.y_test[k] == p["label"]
    # With another split seed the indices come from that split instead.
    _, placements0 = digits_canvas((40, 40), 4, seed=5)
    _, _, test0 = _split(y, 0.1, 0.2, 0, "digits")
    assert all(p["index"] in set(test0.tolist()) for p in placements0)


def test_all_ten_labels_are_distinct_and_more_than_ten_repeat_none(digit_images):
    X, y = digit_images
    _, _, test = _split(y, 0.1, 0.2, 0, "digits")
    canvas, placements = digits_canvas((64, 128), 10, seed=1)
    assert sorted(p["label"] for p in placements) == list(range(10))
    check_canvas(canvas, placements, X, y, set(test.tolist()), (64, 128), 10, 2)
    canvas, placements = digits_canvas((120, 120), 25, seed=2, margin=1)
    check_canvas(canvas, placements, X, y, set(test.tolist()), (120, 120), 25, 1)
    assert len({p["index"] for p in placements}) == 25


def test_margin_zero_and_tight_fits(digit_images):
    X, y = digit_images
    test = set(_split(y, 0.1, 0.2, 0, "digits")[2].tolist())
    canvas, placements = digits_canvas((8, 8), 1, margin=0)
    assert placements[0]["box"] == [0, 0, 8, 8]
    check_canvas(canvas, placements, X, y, test, (8, 8), 1, 0)
    canvas, placements = digits_canvas((12, 12), 1, margin=2)
    assert placements[0]["box"] == [2, 2, 10, 10]
    canvas, placements = digits_canvas((8, 16), 2, margin=0)  # exactly two side by side
    assert sorted(p["box"][0] for p in placements) == [0, 8]
    check_canvas(canvas, placements, X, y, test, (8, 16), 2, 0)


def test_deterministic_in_seed_and_independent_of_global_state():
    a = digits_canvas(seed=7)
    np.random.seed(123)  # noqa: NPY002 - the global state must not matter
    np.random.random(10)  # noqa: NPY002
    b = digits_canvas(seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    c = digits_canvas(seed=8)
    assert c[1] != a[1] and not np.array_equal(c[0], a[0])


def test_different_split_seed_changes_the_pool(digit_images):
    _, y = digit_images
    pool3 = set(_split(y, 0.1, 0.2, 3, "digits")[2].tolist())
    _, placements = digits_canvas((64, 64), 10, seed=0, split_seed=3)
    assert all(p["index"] in pool3 for p in placements)


@pytest.mark.parametrize(
    "args, kwargs, exc, message",
    [
        (
            ((7, 20),),
            {},
            ValueError,
            r"size must be at least \(8, 8\) to hold an 8x8 digit, got \(7, 20\)",
        ),
        (((20, 0),), {}, ValueError, "size must be >= 1, got 0"),
        (((20,),), {}, TypeError, r"size must be a pair \(H, W\) of ints"),
        (((20.0, 20),), {}, TypeError, "size must be an int"),
        (
            ((8, 8), 2),
            {"margin": 0},
            ValueError,
            r"cannot fit 2 digits \(8x8, margin 0\) in a canvas of size \(8, 8\): at most 1 fit",
        ),
        (
            ((11, 11), 1),
            {},
            ValueError,
            r"cannot fit 1 digit \(8x8, margin 2\) in a canvas of size \(11, 11\): at most 0 fit",
        ),
        (((64, 128), 200), {}, ValueError, r"cannot fit 200 digits .* size \(64, 128\)"),
        (((64, 64), 0), {}, ValueError, "count must be >= 1, got 0"),
        (((64, 64), 2.0), {}, TypeError, "count must be an int"),
        ((), {"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ((), {"split_seed": "a"}, TypeError, "split_seed must be an int"),
        ((), {"margin": -1}, ValueError, "margin must be >= 0, got -1"),
        ((), {"test_fraction": 0.0}, ValueError, "test_fraction must be positive"),
        ((), {"val_fraction": 1.0}, ValueError, r"val_fraction must be in \[0, 1\), got 1.0"),
        (
            (),
            {"val_fraction": 0.5, "test_fraction": 0.5},
            ValueError,
            "val_fraction \\+ test_fraction must be below 1",
        ),
    ],
)
def test_bad_arguments(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        digits_canvas(*args, **kwargs)


def test_a_crowded_canvas_fails_after_bounded_random_layouts():
    # 16 digits fit on a 4 x 4 grid of (8 + 2)-pixel cells, but random layouts jam long
    # before the densest packing: the error names size and count.
    with pytest.raises(
        ValueError,
        match=r"cannot fit 16 digits \(8x8, margin 2\) in a canvas of size \(42, 42\): no room left after 20 random layouts",
    ):
        digits_canvas((42, 42), 16)


def test_more_digits_than_the_test_split_holds():
    with pytest.raises(ValueError, match=r"count must be <= 18 \(the test split's size\), got 20"):
        digits_canvas((200, 200), 20, test_fraction=0.01)
