"""Augmentation of training batches: the vectorised Augment against a plain per-pixel
reference, reproducibility, the spec, its errors, and the per-data-set defaults."""

import math

import numpy as np
import pytest

from cnnserve.data.augment import AUGMENT_DEFAULTS, Augment, default_augment, resolve_augment


def reference(aug, X, rng, mean=None, std=None):
    """Augment ``X`` image by image, pixel by pixel, with the same draws as Augment.apply."""
    N, C, H, W = X.shape
    dy = rng.integers(-aug.shift, aug.shift + 1, size=N)
    dx = rng.integers(-aug.shift, aug.shift + 1, size=N)
    flips = rng.random(N) < aug.flip
    zoom = 1.0 + rng.uniform(-aug.scale, aug.scale, size=N)
    bright = 1.0 + rng.uniform(-aug.brightness, aug.brightness, size=N)
    contrast = 1.0 + rng.uniform(-aug.contrast, aug.contrast, size=N)
    x = X.astype(np.float64)
    if mean is not None:
        x = x * np.reshape(std, (1, C, 1, 1)) + np.reshape(mean, (1, C, 1, 1))
    out = np.zeros_like(x)
    cy, cx = (H - 1) / 2, (W - 1) / 2

    def pixel(n, c, i, j):
        if aug.pad == "edge":
            i, j = min(max(i, 0), H - 1), min(max(j, 0), W - 1)
        return x[n, c, i, j] if 0 <= i < H and 0 <= j < W else 0.0

    for n in range(N):
        for i in range(H):
            for j in range(W):
                jj = W - 1 - j if flips[n] else j
                sy = (i - cy) / zoom[n] + cy - dy[n]
                sx = (jj - cx) / zoom[n] + cx - dx[n]
                if aug.pad == "edge":
                    sy, sx = min(max(sy, 0), H - 1), min(max(sx, 0), W - 1)
                y0, x0 = math.floor(sy), math.floor(sx)
                wy, wx = sy - y0, sx - x0
                for c in range(C):
                    out[n, c, i, j] = (
                        (1 - wy) * (1 - wx) * pixel(n, c, y0, x0)
                        + (1 - wy) * wx * pixel(n, c, y0, x0 + 1)
                        + wy * (1 - wx) * pixel(n, c, y0 + 1, x0)
                        + wy * wx * pixel(n, c, y0 + 1, x0 + 1)
                    )
        out[n] *= bright[n]
        grey = out[n].mean()
        out[n] = grey + contrast[n] * (out[n] - grey)
    if mean is not None:
        out = np.clip(out, 0, 1)
        out = (out - np.reshape(mean, (1, C, 1, 1))) / np.reshape(std, (1, C, 1, 1))
    return out


CASES = [
    Augment(shift=2),
    Augment(flip=1.0),
    Augment(shift=1, flip=0.5, brightness=0.3, contrast=0.4),
    Augment(scale=0.3),
    Augment(shift=2, scale=0.2, pad="edge"),
    Augment(shift=3, flip=0.5, brightness=0.2, contrast=0.2, scale=0.5, pad="zero"),
]


@pytest.mark.parametrize("aug", CASES, ids=lambda a: a.spec())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_apply_matches_the_per_pixel_reference(aug, dtype, channels):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((4, channels, 7, 9)).astype(dtype)  # odd, unequal sides
    mean, std = rng.uniform(0.2, 0.6, channels), rng.uniform(0.1, 0.4, channels)
    got = aug.apply(X, np.random.default_rng(11), mean=mean, std=std)
    want = reference(aug, X, np.random.default_rng(11), mean, std)
    assert got.dtype == dtype and got.shape == X.shape
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    # without a normalisation: no clipping, X augmented as it is
    got = aug.apply(X, np.random.default_rng(11))
    np.testing.assert_allclose(got, reference(aug, X, np.random.default_rng(11)), atol=tol)


def test_whole_pixel_shifts_and_flips_are_exact():
    X = np.arange(2 * 1 * 6 * 6, dtype=np.float64).reshape(2, 1, 6, 6) + 1
    for seed in range(5):
        out = Augment(shift=2).apply(X, np.random.default_rng(seed))
        for n in range(2):
            # some shift of the image, the uncovered border zero
            found = False
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    moved = np.zeros((6, 6))
                    src = X[n, 0, max(0, -dy) : 6 - max(0, dy), max(0, -dx) : 6 - max(0, dx)]
                    moved[max(0, dy) : 6 - max(0, -dy), max(0, dx) : 6 - max(0, -dx)] = src
                    found |= np.array_equal(out[n, 0], moved)
            assert found
    flipped = Augment(flip=1.0).apply(X, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, X[..., ::-1])


def test_same_seed_same_batch_and_the_input_is_left_alone():
    X = np.random.default_rng(0).random((8, 3, 10, 10)).astype(np.float32)
    before = X.copy()
    aug = AUGMENT_DEFAULTS["faces"]
    a = aug.apply(X, np.random.default_rng(3), mean=[0.5] * 3, std=[0.25] * 3)
    b = aug.apply(X, np.random.default_rng(3), mean=[0.5] * 3, std=[0.25] * 3)
    c = aug.apply(X, np.random.default_rng(4), mean=[0.5] * 3, std=[0.25] * 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(X, before)
    assert Augment().apply(X, np.random.default_rng(0)) is X  # nothing to do


def test_pixels_stay_in_range():
    X = np.random.default_rng(1).random((16, 1, 8, 8))
    aug = Augment(brightness=0.9, contrast=0.9)
    out = aug.apply((X - 0.3) / 0.2, np.random.default_rng(0), mean=[0.3], std=[0.2])
    pixels = out * 0.2 + 0.3
    assert pixels.min() >= -1e-12 and pixels.max() <= 1 + 1e-12


def test_spec_round_trip_and_defaults():
    aug = Augment.parse(" shift=2, flip=0.5 ,brightness=0.1,contrast=0.1,scale=0.1,pad=edge")
    assert aug == Augment(shift=2, flip=0.5, brightness=0.1, contrast=0.1, scale=0.1, pad="edge")
    assert aug.spec() == "shift=2,flip=0.5,brightness=0.1,contrast=0.1,scale=0.1,pad=edge"
    assert Augment.parse(aug.spec()) == aug
    assert Augment.parse("none") == Augment() == Augment.parse("") and not Augment()
    assert Augment().spec() == "none"
    assert not default_augment("digits")  # 8x8 digits: a shift cost accuracy
    assert default_augment("mnist-5k").flip == 0 and default_augment("mnist-5k").shift >= 1
    faces = default_augment("faces")
    assert faces.flip > 0 and faces.shift and faces.brightness and faces.contrast and faces.scale
    assert not default_augment("digits-windows")  # the window's position is its label
    assert not default_augment("/some/folder") and not default_augment(None)
    assert resolve_augment("default", "faces") == faces
    assert resolve_augment({"shift": 1}) == Augment(shift=1)
    assert resolve_augment(None) == Augment() == resolve_augment("none")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("shfit=2", "unknown parameter 'shfit'; known: shift, flip, brightness"),
        ("shift=-1", "augment shift must be >= 0 pixels, got -1"),
        ("shift=1.5", "augment shift must be a whole number of pixels, got 1.5"),
        ("flip=2", r"augment flip must be in \[0, 1\], got 2"),
        ("brightness=1", r"augment brightness must be in \[0, 1\), got 1"),
        ("contrast=-0.1", r"augment contrast must be in \[0, 1\), got -0.1"),
        ("scale=0.6", r"augment scale must be in \[0, 0.5\], got 0.6"),
        ("scale=nan", r"augment scale must be in \[0, 0.5\], got nan"),
        ("pad=reflect", "augment pad must be one of zero, edge, got 'reflect'"),
        ("shift", "expected NAME=VALUE items separated by commas"),
        ("shift=x", "shift='x' is not a number"),
        ("shift=1,shift=2", "shift is given twice"),
    ],
)
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Augment.parse(spec)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"too large for 4 x 4 \(H x W\) images"):
        Augment(shift=2).apply(np.zeros((1, 1, 4, 4)), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"augment needs images of shape \(N, C, H, W\)"):
        Augment(shift=1).check_shape((5, 4))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        Augment(shift=1).apply(np.zeros((1, 1, 8, 8)), 0)
    with pytest.raises(TypeError, match="augment flip must be a number"):
        Augment(flip="0.5")
    with pytest.raises(ValueError, match="unknown parameter"):
        resolve_augment({"rotate": 10})
    with pytest.raises(ValueError, match=r"no data set is named: pass default_augment\(name\)"):
        resolve_augment("default")
    with pytest.raises(TypeError, match="augment must be an Augment"):
        resolve_augment(3)
