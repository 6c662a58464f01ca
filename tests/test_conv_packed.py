"""Filters packed once (layers.pack_filters, cnn_skinny_packed.h): layout, kernel, conv path."""

import copy
import math
import pickle

import numpy as np
import pytest

from cnnserve import layers, reference
from cnnserve._ext import conv as conv_ext
from cnnserve.layers import conv as conv_layer
from tests.gradcheck import assert_close_to_scale, conv_shape_id, tolerance

FAST = conv_ext.skinny_fast()
PANEL, GROUP, CHUNK = 32, 16, 256  # rows per panel, panels per group, k per chunk


def _pack_in_numpy(w_mat):
    """The documented layout of cnn_skinny_packed.h, built with numpy: groups of 16 panels of
    32 rows (zero rows past F), each group chunk by chunk of 256 values of k, each panel's
    chunk k-major ([k][32])."""
    F, K = w_mat.shape
    n_panels = -(-F // PANEL)
    padded = np.zeros((n_panels * PANEL, K), dtype=np.float32)
    padded[:F] = w_mat
    parts = []
    for g0 in range(0, n_panels, GROUP):
        panels = range(g0, min(g0 + GROUP, n_panels))
        for k0 in range(0, K, CHUNK):
            for p in panels:
                parts.append(padded[p * PANEL : (p + 1) * PANEL, k0 : k0 + CHUNK].T.ravel())
    return np.concatenate(parts)


@pytest.mark.parametrize(("F", "K"), [(1, 1), (31, 300), (32, 256), (40, 513), (600, 70)])
def test_skinny_pack_layout(F, K):
    """Every value in its documented place, the padding rows zero, the start 64-byte aligned;
    F over 512 makes two groups, the second one short."""
    w_mat = np.random.default_rng(0).standard_normal((F, K)).astype(np.float32)
    for threads in (1, 2, 3):
        packed = conv_ext.skinny_pack(w_mat, threads)
        assert packed.ctypes.data % 64 == 0
        np.testing.assert_array_equal(packed, _pack_in_numpy(w_mat))


# (F, K, N, P): F under one panel, across panels and groups (one group: threads share its
# panels; several: whole groups each), F not a multiple of 32; K under a chunk, K not a
# multiple of 256 nor of 16; columns J = N*P of 1, under the 12-column tile, exact multiples
# of it and with a partial last block, above the skinny kernel's 64; batches of 1 and > 1.
PRODUCT_CASES = [
    (1, 5, 1, 1),
    (7, 16, 1, 11),
    (32, 256, 1, 12),
    (33, 300, 2, 6),
    (100, 515, 1, 36),
    (513, 64, 3, 5),
    (1100, 257, 1, 25),
    (64, 1030, 4, 18),
    (40, 129, 2, 50),
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("use_fast", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize(("F", "K", "N", "P"), PRODUCT_CASES)
def test_skinny_packed_forward_matches_float64_product(F, K, N, P, use_fast, threads):
    rng = np.random.default_rng(1)
    w_mat = rng.standard_normal((F, K)).astype(np.float32)  # (F, K)
    cols = rng.standard_normal((K, N * P)).astype(np.float32)  # (K, N*P)
    b = rng.standard_normal(F).astype(np.float32)
    packed = conv_ext.skinny_pack(w_mat, 2)
    out = np.full((N, F, P), np.nan, dtype=np.float32)  # (N, F, P): every entry is written
    conv_ext.skinny_packed_forward(packed, F, cols, b, out, threads, use_fast)
    prod = w_mat.astype(np.float64) @ cols.astype(np.float64)  # (F, N*P)
    want = prod.reshape(F, N, P).transpose(1, 0, 2) + b[:, None]
    assert_close_to_scale(out, want)


def test_skinny_packed_forward_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    w_mat = rng.standard_normal((40, 50)).astype(np.float32)
    packed = conv_ext.skinny_pack(w_mat, 1)  # (64 * 50,): two panels
    cols = rng.standard_normal((50, 6)).astype(np.float32)
    b = np.zeros(40, np.float32)
    out = np.empty((1, 40, 6), np.float32)
    with pytest.raises(ValueError, match="not the 3200 of a packed"):
        conv_ext.skinny_packed_forward(packed[:-32], 40, cols, b, out, 1)
    with pytest.raises(ValueError, match="not the 3136 of a packed"):  # cols with another K
        conv_ext.skinny_packed_forward(packed, 40, cols[:49].copy(), b, out, 1)
    with pytest.raises(ValueError, match="do not match"):
        conv_ext.skinny_packed_forward(packed, 40, cols, b[:39], out, 1)
    with pytest.raises(ValueError, match="do not match"):
        conv_ext.skinny_packed_forward(packed, 40, cols, b, np.empty((1, 40, 5), np.float32), 1)
    shifted = np.empty(packed.size + 1, np.float32)[1:]  # 4 bytes off the alignment
    shifted[:] = packed
    with pytest.raises(ValueError, match="64-byte boundary"):
        conv_ext.skinny_packed_forward(shifted, 40, cols, b, out, 1)


@pytest.fixture
def small_packing(monkeypatch):
    """Small problems packed and run packed, as large ones are."""
    monkeypatch.setattr(conv_layer, "_SKINNY_MIN_WEIGHTS", 1)


@pytest.fixture
def packed_calls(monkeypatch):
    """The number of calls of the packed kernel, counted."""
    calls = []
    kernel = conv_ext.skinny_packed_forward

    def spy(*args, **kwargs):
        calls.append(args[1])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(conv_ext, "skinny_packed_forward", spy)
    return calls


# (N, C, H, W, F, HH, WW, stride, pad): batch of 1 and > 1, non-square filters, strides 2
# and 3, pad 0 and > 0, F not a multiple of 32, one output pixel per image with padding,
# columns under the 12-column tile and above the skinny kernel's 64.
CONV_SHAPES = [
    (2, 3, 11, 10, 7, 3, 2, 3, 2),
    (1, 5, 8, 8, 40, 3, 3, 1, 0),
    (2, 3, 7, 6, 9, 4, 3, 1, 0),
    (3, 4, 7, 7, 33, 3, 3, 2, 1),
    (1, 7, 9, 9, 6, 5, 5, 1, 1),
    (4, 2, 9, 9, 3, 2, 2, 1, 0),
    (1, 3, 3, 3, 5, 3, 3, 1, 1),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=conv_shape_id)
def test_conv_forward_packed_matches_reference(small_packing, packed_calls, shape, dtype):
    """Packed filters give the loop reference's output (float32: the packed kernel on AVX-512
    CPUs; float64 is never packed) and the same gradients as the plain filters."""
    N, C, H, W, F, HH, WW, stride, pad = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, HH, WW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    param = {"stride": stride, "pad": pad}
    filters = layers.pack_filters(w)
    assert filters.packed == (FAST and dtype == np.float32)
    out, cache = layers.conv_forward(x, filters, b, param)
    assert packed_calls == ([F] if filters.packed else [])
    ref_out, _ = reference.conv_forward_naive(
        x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), param
    )
    assert out.dtype == dtype and out.shape == ref_out.shape
    if dtype == np.float32:
        assert_close_to_scale(out, ref_out)
    else:
        np.testing.assert_allclose(out, ref_out, **tolerance(dtype))
    assert type(cache.w) is np.ndarray
    np.testing.assert_array_equal(cache.w, w)
    dout = rng.standard_normal(out.shape).astype(dtype)
    plain_out, plain_cache = layers.conv_forward(x, w, b, param)
    for got, want in zip(
        layers.conv_backward(dout, cache), layers.conv_backward(dout, plain_cache), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_conv_forward_packed_only_up_to_the_column_limit(small_packing, packed_calls):
    """Over ``_PACKED_MAX_COLUMNS`` output pixels the plain filters are used, with the same
    result."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    filters = layers.pack_filters(w)
    limit = conv_layer._PACKED_MAX_COLUMNS
    side = math.isqrt(limit)  # side * side <= limit < (side + 1) ** 2
    for pixels_side, used in ((side, FAST), (side + 1, False)):
        packed_calls.clear()
        x = rng.standard_normal((1, 2, pixels_side + 2, pixels_side + 2)).astype(np.float32)
        out, _ = layers.conv_forward(x, filters, b, {"stride": 1, "pad": 0})
        assert packed_calls == ([8] if used else [])
        want, _ = layers.conv_forward(x, w, b, {"stride": 1, "pad": 0})
        assert_close_to_scale(out, want)


def test_pack_filters_is_a_snapshot(small_packing):
    """Changing the caller's array after packing changes neither copy; both are read-only."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = np.zeros(5, np.float32)
    want, _ = layers.conv_forward(x, w, b, {"pad": 0})
    filters = layers.pack_filters(w)
    w[:] = 0
    got, _ = layers.conv_forward(x, filters, b, {"pad": 0})
    np.testing.assert_array_equal(layers.conv_forward(x, filters.w, b, {"pad": 0})[0], want)
    assert_close_to_scale(got, want)
    for array in (filters.w, filters._w, filters._packed):
        if array is not None:
            assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        filters.w[0, 0, 0, 0] = 1
    with pytest.raises(ValueError, match="WRITEABLE"):
        filters.w.flags.writeable = True  # a view of a read-only copy
    with pytest.raises(AttributeError):
        filters.w = w


@pytest.mark.parametrize(
    "duplicate",
    [copy.copy, copy.deepcopy, lambda f: pickle.loads(pickle.dumps(f))],
    ids=["copy", "deepcopy", "pickle"],
)
def test_packed_filters_copy_and_pickle(small_packing, duplicate):
    """A duplicate packs its filters again: its packed copy starts on a 64-byte boundary like
    the original's (a copied array need not), and a pickle holds the filters once."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    filters = layers.pack_filters(rng.standard_normal((40, 4, 3, 3)).astype(np.float32))
    want, _ = layers.conv_forward(x, filters, b, {"pad": 0})
    for _ in range(8):  # an unaligned copy would fail about every other time
        other = duplicate(filters)
        assert other.packed == filters.packed
        if other.packed:
            assert other._packed.ctypes.data % 64 == 0
        np.testing.assert_array_equal(layers.conv_forward(x, other, b, {"pad": 0})[0], want)
    assert len(pickle.dumps(filters)) < filters.w.nbytes + 1000


def test_pack_filters_packs_only_where_the_kernel_applies(monkeypatch):
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    assert not layers.pack_filters(w32).packed  # 48 values, far below the threshold
    monkeypatch.setattr(conv_layer, "_SKINNY_MIN_WEIGHTS", 48)
    filters = layers.pack_filters(w32)
    assert filters.packed == FAST
    assert filters.shape == (4, 3, 2, 2) and filters.dtype == np.float32
    assert filters.nbytes == w32.nbytes + (32 * 12 * 4 if FAST else 0)
    assert repr(filters) == f"PackedFilters(shape=(4, 3, 2, 2), dtype=float32, packed={FAST})"
    assert not layers.pack_filters(w32.astype(np.float64)).packed
    monkeypatch.setattr(conv_ext, "skinny_fast", lambda: False)
    assert not layers.pack_filters(w32).packed  # no AVX-512: nothing to pack for


def test_pack_filters_and_conv_forward_check_their_arguments(small_packing):
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="w must be a numpy.ndarray"):
        layers.pack_filters([[1.0]])
    with pytest.raises(ValueError, match="w must be"):
        layers.pack_filters(np.zeros((3, 3), np.float32))
    filters = layers.pack_filters(rng.standard_normal((4, 3, 2, 2)).astype(np.float32))
    x64 = rng.standard_normal((1, 3, 5, 5))
    with pytest.raises(TypeError, match="dtype"):
        layers.conv_forward(x64, filters, np.zeros(4, np.float32), {"pad": 0})
    with pytest.raises(ValueError, match="input channels"):
        layers.conv_forward(
            x64[:, :2].astype(np.float32), filters, np.zeros(4, np.float32), {"pad": 0}
        )


def test_bench_row_4096_filters_packed():
    """The bench's (1, 512, 12, 12) x (4096, 512, 7, 7) row on packed filters, against a
    float64 product of the same columns."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 512, 12, 12)).astype(np.float32)
    w = (rng.standard_normal((4096, 512, 7, 7)) * 0.01).astype(np.float32)
    b = rng.standard_normal(4096).astype(np.float32)
    filters = layers.pack_filters(w)
    assert filters.packed == FAST
    out, _ = layers.conv_forward(x, filters, b, {"stride": 1, "pad": 0})  # (1, 4096, 6, 6)
    cols = np.empty((512 * 49, 36), dtype=np.float32)  # (K, P)
    conv_ext.im2col(x, cols, 7, 7, 1, 0)
    prod = w.reshape(4096, -1).astype(np.float64) @ cols.astype(np.float64)  # (F, P)
    want = prod.reshape(1, 4096, 6, 6) + b[:, None, None]
    assert_close_to_scale(out, want)
