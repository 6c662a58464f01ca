"""The "digits-windows" data set (a detector's training data) and the shipped detector."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import cnnserve.data.canvas as canvas_module
from cnnserve.cli import main
from cnnserve.convert import to_fully_convolutional
from cnnserve.data import BACKGROUND, digits_canvas, load_dataset
from cnnserve.data._common import split as _split
from cnnserve.data.canvas import window_labels as _window_labels
from cnnserve.dense import score_map
from cnnserve.model import read_model_file

ROOT = Path(__file__).resolve().parent.parent
DETECTOR = ROOT / "models" / "digits_detector.safetensors"
NAMES = (*"0123456789", "background")
BG = 10  # the label of "background"
PARTS = ("train", "val", "test")


@pytest.fixture(scope="module")
def windows():
    return load_dataset("digits-windows", dtype=np.float64)


def raw(ds, X):
    """Un-normalise windows back to the digits' raw 0..16 values, uint8 (N, 8, 8)."""
    x01 = X[:, 0].astype(np.float64) * ds.std[0] + ds.mean[0]
    values = x01 * 16
    np.testing.assert_allclose(values, np.rint(values), atol=1e-4)  # sixteenths only
    return np.rint(values).astype(np.uint8)


def shifted_digits(X, y, indices):
    """{window bytes: labels} of every digit in ``indices`` shifted by -1, 0, +1 px per axis."""
    out: dict[bytes, set] = {}
    for i in indices:
        pad = np.zeros((10, 10), dtype=np.uint8)
        pad[1:9, 1:9] = X[i, 0]
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                window = pad[1 + dy : 9 + dy, 1 + dx : 9 + dx]
                out.setdefault(window.tobytes(), set()).add(int(y[i]))
    return out


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------


def test_shapes_classes_sizes_and_normalisation(windows, digit_images):
    ds = windows
    _, y = digit_images
    assert ds.name == "digits-windows" and ds.format == "digits-windows"
    assert ds.class_names == NAMES and BACKGROUND == "background" and ds.num_classes == 11
    assert ds.input_shape == (1, 8, 8)
    for part, n_digits in zip(PARTS, (1258, 180, 359), strict=True):
        X, labels = getattr(ds, f"X_{part}"), getattr(ds, f"y_{part}")
        # per digit: its exact window, 4 one-pixel shifts, 3 near and 2 far background
        # windows; per canvas of 4 digits: 1 blank window
        assert len(labels) == 10 * n_digits + math.ceil(n_digits / 4)
        assert X.dtype == np.float64 and X.shape == (len(labels), 1, 8, 8)
        assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(11))
    x = ds.X_train
    assert abs(x.mean()) < 1e-9 and abs(x.std() - 1) < 1e-9  # training statistics
    x32 = load_dataset("digits-windows", limit=200)
    assert x32.X_train.dtype == np.float32 and len(x32.y_train) == 200


def test_balance_half_digits_half_background(windows, digit_images):
    _, y = digit_images
    parts = dict(zip(PARTS, _split(y, 0.1, 0.2, 0, "digits"), strict=True))
    for part in PARTS:
        labels = getattr(windows, f"y_{part}")
        counts = np.bincount(labels, minlength=11)
        # each digit gives 5 windows of its class: the classes keep the digits' proportions
        np.testing.assert_array_equal(counts[:10], 5 * np.bincount(y[parts[part]], minlength=10))
        assert 0.49 < counts[BG] / len(labels) < 0.53
        blank = ~raw(windows, getattr(windows, f"X_{part}")).any(axis=(1, 2))
        assert np.all(labels[blank] == BG)
        assert 0.04 < blank.sum() / counts[BG] < 0.06  # a few blank ones among the background


def test_deterministic_in_the_seed_whatever_the_global_state(windows):
    np.random.seed(7)  # noqa: NPY002 - the global state must not matter
    again = load_dataset("digits-windows", seed=0, dtype=np.float64)
    for name in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test", "mean", "std"):
        np.testing.assert_array_equal(getattr(again, name), getattr(windows, name))
    other = load_dataset("digits-windows", seed=1, dtype=np.float64)
    assert len(other.y_test) == len(windows.y_test)
    assert not np.array_equal(other.X_test, windows.X_test)


def test_digit_windows_are_their_digit_shifted_by_at_most_one_pixel(windows, digit_images):
    """Each part's digit windows are that part's digits, shifted by 0 or 1 px, and nothing else.

    The background windows are none of them: they are 2 px or more off every digit.
    """
    X, y = digit_images
    parts = dict(zip(PARTS, _split(y, 0.1, 0.2, 0, "digits"), strict=True))
    shifted = {part: shifted_digits(X, y, parts[part]) for part in PARTS}
    for part in PARTS:
        W = raw(windows, getattr(windows, f"X_{part}"))
        labels = getattr(windows, f"y_{part}")
        for w, label in zip(W, labels, strict=True):
            key = w.tobytes()
            if label == BG:
                assert key not in shifted[part]
            else:
                assert label in shifted[part].get(key, ())
                assert all(key not in shifted[other] for other in PARTS if other != part)


def test_every_window_holds_only_its_own_parts_digits(monkeypatch, digit_images):
    """Digits replaced by solid blocks whose value names their part: no window mixes parts."""
    X, y = digit_images
    marked = np.zeros_like(X)
    value = dict(zip(PARTS, (4, 8, 16), strict=True))
    for part, indices in zip(PARTS, _split(y, 0.1, 0.2, 0, "digits"), strict=True):
        marked[indices] = value[part]
    monkeypatch.setattr(canvas_module, "load_digits", lambda: (NAMES[:10], marked, y))
    ds = load_dataset("digits-windows", dtype=np.float64)
    for part in PARTS:
        W = raw(ds, getattr(ds, f"X_{part}"))
        assert set(np.unique(W)) == {0, value[part]}


def test_the_background_rule():
    """Offset 0 or 1 (in both axes) from a digit's corner is that digit, 2 or more background."""
    corners, classes = [(3, 4), (3, 14)], [7, 2]  # two digits 2 px apart
    label, offset = _window_labels((16, 26), corners, classes, BG)
    assert label.shape == offset.shape == (9, 19)
    for (y0, x0), k in zip(corners, classes, strict=True):
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                r, c = y0 + dy, x0 + dx
                if 0 <= r < 9 and 0 <= c < 19:
                    expected = k if max(abs(dy), abs(dx)) <= 1 else BG
                    assert label[r, c] == expected, (dy, dx)
                    assert offset[r, c] <= max(abs(dy), abs(dx))
    assert label[3, 6] == BG and label[3, 12] == BG  # 2 px off each, between the two digits
    assert label[1, 4] == BG and label[5, 5] == BG  # 2 px off in one axis is enough
    assert offset[0, 18] == max(abs(0 - 3), abs(18 - 14))
    assert np.count_nonzero(label != BG) == 18
    empty, far = _window_labels((8, 8), [], [], BG)
    assert empty.tolist() == [[BG]] and far.tolist() == [[16]]


def test_limit_fractions_and_wrong_arguments(windows):
    ds = load_dataset("DIGITS-WINDOWS", limit=330)
    assert len(ds.y_train) == 330
    assert abs(np.mean(ds.y_train == BG) - np.mean(windows.y_train == BG)) < 0.01
    np.testing.assert_array_equal(ds.y_test, windows.y_test)  # val and test unchanged
    no_val = load_dataset("digits-windows", val_fraction=0.0, test_fraction=0.3)
    assert no_val.X_val.shape == (0, 1, 8, 8) and len(no_val.y_test) == 10 * 539 + 135
    with pytest.raises(ValueError, match="source 'digits-windows' is the digits-windows format"):
        load_dataset("digits-windows", format="digits")
    with pytest.raises(ValueError, match="format='digits-windows' needs source='digits-windows'"):
        load_dataset("/tmp", format="digits-windows")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_train_and_evaluate_on_digits_windows(tmp_path, capsys):
    out = tmp_path / "det.safetensors"
    argv = ["train", "--data", "digits-windows", "--limit", "300", "--epochs", "1"]
    argv += ["--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--batch-size", "100", "--out", str(out), "--quiet"]) == 0
    file = read_model_file(out)
    record = file.training
    assert record["dataset"] == "digits-windows" and record["data_format"] == "digits-windows"
    assert record["num_train"] == 300 and record["num_test"] == 3680
    assert file.model.class_names == NAMES
    capsys.readouterr()
    # the model's own data set and split, by default and when named again (any case)
    for extra in ([], ["--data", "Digits-Windows"]):
        assert main(["evaluate", str(out), "--json", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["dataset"] == "digits-windows" and result["samples"] == 3680
        assert result["class_names"] == list(NAMES)
        matrix = np.array(result["confusion_matrix"])
        assert matrix.shape == (11, 11) and matrix.sum() == 3680
        assert matrix[BG].sum() == 1885
    # the plain digits have 10 classes: not this model's data
    assert main(["evaluate", str(out), "--data", "digits"]) == 2
    assert "11 classes" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The shipped detector
# ---------------------------------------------------------------------------------------------


def test_the_shipped_detector_locates_each_digit_of_a_canvas():
    assert DETECTOR.is_file(), "models/digits_detector.safetensors is missing"
    file = read_model_file(DETECTOR)
    assert file.training["dataset"] == "digits-windows" and file.training["seed"] == 0
    assert file.model.class_names == NAMES
    fcn = to_fully_convolutional(file.model)
    canvas, placements = digits_canvas((48, 96), 6, seed=0)  # held-out digits
    result = score_map(fcn, canvas, stride_divisor=2)  # a cell at every pixel
    for place in placements:
        peak = result.peak(place["label"])
        x0, y0 = place["box"][:2]
        assert abs(peak["box"][0] - x0) <= 1 and abs(peak["box"][1] - y0) <= 1, (place, peak)
        assert peak["probability"] > 0.5
    # windows without ink are background
    ink = np.lib.stride_tricks.sliding_window_view(canvas[0] > 0, (8, 8)).any(axis=(2, 3))
    assert ink.shape == result.shape and (~ink).sum() > 1000
    assert np.all(result.probabilities.argmax(axis=0)[~ink] == BG)
