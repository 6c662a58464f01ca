"""The skinny float32 conv kernel (cnn_skinny.h): few output columns, a large filter matrix."""

import numpy as np
import pytest

from cnnserve import layers, reference
from cnnserve._ext import conv as conv_ext
from cnnserve.layers import conv as conv_layer
from tests.gradcheck import assert_close_to_scale, conv_shape_id, tolerance

FAST = conv_ext.skinny_fast()


def _product_problem(F, K, J, seed=0):
    rng = np.random.default_rng(seed)
    w_mat = rng.standard_normal((F, K)).astype(np.float32)  # (F, K)
    cols_t = rng.standard_normal((J, K)).astype(np.float32)  # (J, K)
    b = rng.standard_normal(F).astype(np.float32)  # (F,)
    return w_mat, cols_t, b


# (F, K, N, P, kc): F not a multiple of the 6-row tile (nor a thread's share of rows), N*P
# not a multiple of the 4-column tile, K not a multiple of 16 (the AVX-512 width) nor of kc,
# kc not a multiple of 16, one column, one row, one chunk larger than K, batch of 1 and
# batches > 1; exact multiples of the tile in rows and columns.
PRODUCT_CASES = [
    (4, 16, 1, 6, 16),
    (6, 16, 1, 4, 16),
    (12, 64, 2, 4, 32),
    (18, 333, 1, 9, 64),
    (25, 130, 3, 5, 48),
    (41, 1030, 1, 11, 512),
    (5, 37, 1, 7, 16),
    (7, 100, 2, 5, 32),
    (13, 1000, 3, 12, 48),
    (1, 33, 1, 1, 1000),
    (3, 17, 4, 1, 5),
    (64, 2053, 1, 36, 512),
    (33, 515, 2, 18, 100),
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("use_fast", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize(("F", "K", "N", "P", "kc"), PRODUCT_CASES)
def test_skinny_forward_matches_float64_product(F, K, N, P, kc, use_fast, threads):
    w_mat, cols_t, b = _product_problem(F, K, N * P)
    out = np.full((N, F, P), np.nan, dtype=np.float32)  # (N, F, P): every entry is written
    conv_ext.skinny_forward(w_mat, cols_t, b, out, kc, threads, use_fast)
    # want[n, f, p] = b[f] + sum_k w_mat[f, k] * cols_t[n * P + p, k], in float64
    prod = w_mat.astype(np.float64) @ cols_t.astype(np.float64).T  # (F, N * P)
    want = prod.reshape(F, N, P).transpose(1, 0, 2) + b[:, None]
    assert_close_to_scale(out, want)


def _at_offset(a, offset):
    """A C-contiguous copy of ``a`` that starts ``offset`` values after a 64-byte boundary."""
    buf = np.empty(a.size + 32, dtype=a.dtype)
    start = (-buf.ctypes.data % 64) // a.itemsize + offset
    out = buf[start : start + a.size].reshape(a.shape)
    out[...] = a
    assert out.ctypes.data % 64 == offset * a.itemsize
    return out


# (F, K, J, kc) with K a multiple of 16: rows of W all start at the same offset from a
# 64-byte boundary, and the kernel takes the values before the first boundary in a masked
# head of the first chunk (kc + head values long). kc of 1 (every later chunk shorter than
# the head), one chunk, K = 16 (a head of up to 15 of its 16 values), odd F and J.
ALIGN_CASES = [
    (5, 16, 7, 1),
    (5, 16, 13, 16),
    (9, 48, 13, 16),
    (6, 256, 36, 64),
    (13, 1040, 12, 1024),
    (7, 2048, 30, 4096),
]


@pytest.mark.parametrize("c_off", [0, 5], ids=["ct-aligned", "ct-offset5"])
@pytest.mark.parametrize("w_off", [0, 1, 4, 12, 15])
@pytest.mark.parametrize(("F", "K", "J", "kc"), ALIGN_CASES)
def test_skinny_forward_any_alignment(F, K, J, kc, w_off, c_off):
    """Correct for W at every offset from a cache line, with CT aligned like W or not."""
    w_mat, cols_t, b = _product_problem(F, K, J, seed=1)
    w_mat, cols_t = _at_offset(w_mat, w_off), _at_offset(cols_t, c_off)
    out = np.full((1, F, J), np.nan, dtype=np.float32)  # (N, F, P) with N = 1
    conv_ext.skinny_forward(w_mat, cols_t, b, out, kc, 2)
    want = w_mat.astype(np.float64) @ cols_t.astype(np.float64).T + b[:, None]  # (F, J)
    assert_close_to_scale(out[0], want)


@pytest.mark.parametrize("w_off", [0, 3, 12])
def test_conv_forward_skinny_weights_off_cache_line(monkeypatch, w_off):
    """conv_forward places its column copy like the weights, wherever the weights start."""
    monkeypatch.setattr(conv_layer, "_SKINNY_MIN_WEIGHTS", 1)
    monkeypatch.setattr(conv_layer, "_SKINNY_CHUNK", 32)  # several chunks of K
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 16, 5, 5)).astype(np.float32)  # K = 16 * 9 = 144
    w = _at_offset(rng.standard_normal((11, 16, 3, 3)).astype(np.float32), w_off)
    b = rng.standard_normal(11).astype(np.float32)
    assert 0 < conv_layer._skinny_plan(x.dtype, 2 * 9, 11, 144) < 144 or not FAST
    out, _ = layers.conv_forward(x, w, b, {"stride": 1, "pad": 0})  # (2, 11, 3, 3)
    ref_out, _ = reference.conv_forward_naive(
        x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), {"stride": 1, "pad": 0}
    )
    assert_close_to_scale(out, ref_out)


def test_skinny_forward_rejects_mismatched_shapes():
    w_mat, cols_t, b = _product_problem(4, 16, 6)
    with pytest.raises(ValueError, match="do not match"):
        conv_ext.skinny_forward(w_mat, cols_t, b, np.empty((1, 4, 5), np.float32), 16, 1)
    with pytest.raises(ValueError, match="kc"):
        conv_ext.skinny_forward(w_mat, cols_t, b, np.empty((1, 4, 6), np.float32), 0, 1)


def test_skinny_plan_switch():
    """Both sides of each condition of the switch, for the bench's 4096-filter row."""
    K = 512 * 49
    kc = conv_layer._skinny_plan(np.dtype(np.float32), 36, 4096, K)
    assert (kc > 0) == FAST
    if FAST:
        assert kc == conv_layer._SKINNY_CHUNK and kc % 16 == 0
    assert conv_layer._skinny_plan(np.dtype(np.float64), 36, 4096, K) == 0  # float64: other paths
    assert conv_layer._skinny_plan(np.dtype(np.float32), 65, 4096, K) == 0  # too many columns
    assert conv_layer._skinny_plan(np.dtype(np.float32), 11, 4096, K) == 0  # too few columns
    assert conv_layer._skinny_plan(np.dtype(np.float32), 36, 64, 1024) == 0  # small weights
    if FAST:
        assert conv_layer._skinny_plan(np.dtype(np.float32), 64, 4096, K) > 0
        assert conv_layer._skinny_plan(np.dtype(np.float32), 12, 4096, K) > 0


# (N, C, H, W, F, HH, WW, stride, pad) with 12..64 output pixels over the batch: batch of 1
# and > 1, F not a multiple of 6, pixels not a multiple of 4, K = C*HH*WW not a multiple of 16,
# padding and strides 2 and 3 (im2row of the columns), non-square filters.
CONV_SHAPES = [
    (2, 3, 11, 10, 7, 3, 2, 3, 2),
    (1, 5, 8, 8, 7, 3, 3, 1, 0),
    (2, 3, 7, 6, 9, 4, 3, 1, 0),
    (3, 4, 7, 7, 5, 3, 3, 2, 1),
    (1, 7, 9, 9, 6, 5, 5, 1, 1),
    (4, 2, 5, 5, 3, 2, 2, 1, 0),
]


@pytest.mark.parametrize("taken", [True, False], ids=["skinny", "other"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=conv_shape_id)
def test_conv_forward_skinny_path_matches_reference(monkeypatch, shape, dtype, taken):
    """With the weight threshold lowered the small problems take the skinny path (float32 on
    AVX-512 CPUs; float64 never does); forward and backward match the float64 loop reference
    either way."""
    N, C, H, W, F, HH, WW, stride, pad = shape
    monkeypatch.setattr(conv_layer, "_SKINNY_MIN_WEIGHTS", 1 if taken else 2**62)
    monkeypatch.setattr(conv_layer, "_SKINNY_CHUNK", 32)  # several chunks of K
    H_out, W_out = (H + 2 * pad - HH) // stride + 1, (W + 2 * pad - WW) // stride + 1
    kc = conv_layer._skinny_plan(np.dtype(dtype), N * H_out * W_out, F, C * HH * WW)
    assert (kc > 0) == (taken and FAST and dtype == np.float32)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, HH, WW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    param = {"stride": stride, "pad": pad}
    out, cache = layers.conv_forward(x, w, b, param)
    ref_out, ref_cache = reference.conv_forward_naive(
        x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), param
    )
    assert out.dtype == dtype and out.shape == ref_out.shape
    if dtype == np.float32:
        assert_close_to_scale(out, ref_out)
    else:
        np.testing.assert_allclose(out, ref_out, **tolerance(dtype))
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = layers.conv_backward(dout, cache)
    ref_grads = reference.conv_backward_naive(dout.astype(np.float64), ref_cache)
    for got, want in zip(grads, ref_grads, strict=True):
        if dtype == np.float32:
            assert_close_to_scale(got, want)
        else:
            np.testing.assert_allclose(got, want, **tolerance(dtype))


@pytest.mark.parametrize("N", [1, 2])
def test_bench_row_4096_filters(N):
    """The bench's (1, 512, 12, 12) x (4096, 512, 7, 7) row (and a batch of 2: 72 columns,
    the other paths) against a float64 product of the same columns."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 512, 12, 12)).astype(np.float32)
    w = (rng.standard_normal((4096, 512, 7, 7)) * 0.01).astype(np.float32)
    b = rng.standard_normal(4096).astype(np.float32)
    assert (conv_layer._skinny_plan(x.dtype, N * 36, 4096, 512 * 49) > 0) == (FAST and N == 1)
    out, _ = layers.conv_forward(x, w, b, {"stride": 1, "pad": 0})  # (N, 4096, 6, 6)
    cols = np.empty((512 * 49, N * 36), dtype=np.float32)  # (K, N*P)
    conv_ext.im2col(x, cols, 7, 7, 1, 0)
    prod = w.reshape(4096, -1).astype(np.float64) @ cols.astype(np.float64)  # (F, N*P)
    want = prod.reshape(4096, N, 6, 6).transpose(1, 0, 2, 3) + b[:, None, None]
    assert_close_to_scale(out, want)
