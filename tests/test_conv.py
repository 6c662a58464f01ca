"""Convolution: the Cython im2col/col2im path against the loop reference and numeric gradients."""

import numpy as np
import pytest

from cnnserve import layers, reference
from cnnserve._ext import conv as conv_ext
from cnnserve.layers import _runtime
from cnnserve.layers import conv as conv_layer
from tests.gradcheck import conv_shape_id, numeric_gradient, scaled_error, tolerance

# (N, C, H, W, F, HH, WW, stride, pad): batch of 1, single channel, non-square kernels and
# inputs, stride 1/2/3, pad 0 and pad > 0, kernel == input (the whole-image path, one GEMM),
# 1x1 kernels (the pointwise path without im2col from 64 pixels on; below that, at stride 2
# and with padding through im2col).
SHAPES = [
    (1, 1, 5, 5, 1, 3, 3, 1, 0),
    (2, 3, 7, 7, 4, 3, 3, 1, 1),
    (3, 2, 9, 8, 3, 3, 2, 2, 0),
    (2, 3, 8, 11, 2, 2, 5, 3, 0),
    (1, 4, 10, 10, 5, 4, 4, 3, 0),
    (2, 3, 6, 9, 2, 4, 3, 2, 2),
    (2, 2, 5, 7, 3, 5, 7, 1, 0),
    (3, 5, 4, 6, 6, 1, 1, 1, 0),
    (1, 6, 5, 3, 2, 1, 1, 1, 0),
    (2, 3, 8, 9, 4, 1, 1, 1, 0),
    (2, 3, 5, 7, 4, 1, 1, 2, 0),
    (2, 3, 4, 4, 2, 1, 1, 1, 1),
    (3, 4, 5, 6, 3, 5, 6, 1, 0),
    (2, 3, 1, 1, 4, 1, 1, 1, 0),
    (2, 3, 5, 5, 2, 3, 3, 3, 2),
    (1, 2, 3, 3, 2, 5, 5, 1, 1),
]


def _random_problem(shape, dtype, seed=0):
    N, C, H, W, F, HH, WW, stride, pad = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, HH, WW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    return x, w, b, {"stride": stride, "pad": pad}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=conv_shape_id)
def test_forward_and_backward_match_reference(shape, dtype):
    x, w, b, param = _random_problem(shape, dtype)
    out, cache = layers.conv_forward(x, w, b, param)
    ref_out, ref_cache = reference.conv_forward_naive(x, w, b, param)
    assert out.dtype == dtype and out.shape == ref_out.shape
    np.testing.assert_allclose(out, ref_out, **tolerance(dtype))

    dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    grads = layers.conv_backward(dout, cache)
    ref_grads = reference.conv_backward_naive(dout, ref_cache)
    for name, got, want in zip(("dx", "dw", "db"), grads, ref_grads, strict=True):
        assert got.dtype == dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, err_msg=name, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape", [(2, 8, 16, 16, 4, 3, 3, 1, 1), (4, 8, 21, 17, 3, 5, 3, 2, 0)], ids=conv_shape_id
)
def test_parallel_path_matches_reference(shape, dtype):
    """Problems above the kernels' serial threshold (cython_ext/cnn_threads.h), so im2col and
    col2im split the (image, channel) planes over OpenMP threads."""
    N, C, H, W, F, HH, WW, stride, pad = shape
    P = ((H + 2 * pad - HH) // stride + 1) * ((W + 2 * pad - WW) // stride + 1)
    assert N * C * HH * WW * P >= 32768
    x, w, b, param = _random_problem(shape, dtype, seed=6)
    out, cache = layers.conv_forward(x, w, b, param)
    ref_out, ref_cache = reference.conv_forward_naive(x, w, b, param)
    np.testing.assert_allclose(out, ref_out, **tolerance(dtype))
    dout = np.random.default_rng(7).standard_normal(out.shape).astype(dtype)
    for got, want in zip(
        layers.conv_backward(dout, cache),
        reference.conv_backward_naive(dout, ref_cache),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, **tolerance(dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=conv_shape_id)
def test_backward_matches_numeric_gradient(shape):
    x, w, b, param = _random_problem(shape, np.float64, seed=3)
    out, cache = layers.conv_forward(x, w, b, param)
    dout = np.random.default_rng(4).standard_normal(out.shape)
    dx, dw, db = layers.conv_backward(dout, cache)

    num_dx = numeric_gradient(lambda v: layers.conv_forward(v, w, b, param)[0], x, dout)
    num_dw = numeric_gradient(lambda v: layers.conv_forward(x, v, b, param)[0], w, dout)
    num_db = numeric_gradient(lambda v: layers.conv_forward(x, w, v, param)[0], b, dout)
    assert scaled_error(dx, num_dx) < 1e-8
    assert scaled_error(dw, num_dw) < 1e-8
    assert scaled_error(db, num_db) < 1e-8


def test_reference_backward_handles_pad_zero():
    """The source notes' backward returned an empty dx for pad=0; ours must not."""
    x, w, b, param = _random_problem((2, 2, 5, 5, 3, 3, 3, 1, 0), np.float64)
    out, cache = reference.conv_forward_naive(x, w, b, param)
    dx, _, _ = reference.conv_backward_naive(np.ones_like(out), cache)
    assert dx.shape == x.shape
    num = numeric_gradient(lambda v: reference.conv_forward_naive(v, w, b, param)[0], x, 1.0)
    assert scaled_error(dx, num) < 1e-8


def test_known_values():
    """A hand-computed 2x2 valid convolution with stride 1."""
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    w = np.array([[[[1.0, 0.0], [0.0, -1.0]]]])
    b = np.array([0.5])
    out, _ = layers.conv_forward(x, w, b, {"stride": 1, "pad": 0})
    # out[i, j] = x[i, j] - x[i+1, j+1] + 0.5 = -4 + 0.5
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), -3.5))
    out, _ = layers.conv_forward(x, w, b, {"stride": 1, "pad": 1})
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0] == -x[0, 0, 0, 0] + 0.5  # only w[1, 1] meets the image
    assert out[0, 0, 3, 3] == x[0, 0, 2, 2] + 0.5  # only w[0, 0] meets the image


def test_default_stride_is_1_and_pad_is_required():
    x, w, b, _ = _random_problem((1, 2, 5, 5, 2, 3, 3, 1, 0), np.float64)
    out_default, _ = layers.conv_forward(x, w, b, {"pad": 0})
    out_explicit, _ = layers.conv_forward(x, w, b, {"stride": 1, "pad": 0})
    np.testing.assert_array_equal(out_default, out_explicit)
    # as in the source notes' API, a forgotten pad is an error, never a silent 0
    for param in ({}, {"stride": 1}):
        with pytest.raises(ValueError, match=r"^conv_param is missing the required key 'pad'$"):
            layers.conv_forward(x, w, b, param)


@pytest.mark.parametrize(
    "shape", [(2, 3, 7, 7, 4, 3, 3, 2, 1), (2, 3, 8, 9, 4, 1, 1, 1, 0), (3, 4, 5, 6, 3, 5, 6, 1, 0)], ids=conv_shape_id
)  # fmt: skip
def test_non_contiguous_inputs_and_inputs_untouched(shape):
    x, w, b, param = _random_problem(shape, np.float64)
    x_f = np.asfortranarray(x)
    w_view = np.repeat(w, 2, axis=0)[::2]  # a strided view
    b_view = np.repeat(b, 2)[::2]
    assert not x_f.flags.c_contiguous and not w_view.flags.c_contiguous
    assert not b_view.flags.c_contiguous
    copies = [a.copy() for a in (x_f, w_view, b_view)]
    out, cache = layers.conv_forward(x_f, w_view, b_view, param)
    np.testing.assert_allclose(out, reference.conv_forward_naive(x, w, b, param)[0], rtol=1e-12)
    dout = np.asfortranarray(np.random.default_rng(0).standard_normal(out.shape))
    dx, dw, db = layers.conv_backward(dout, cache)
    ref = reference.conv_backward_naive(np.ascontiguousarray(dout), (x, w, b, param))
    for got, want in zip((dx, dw, db), ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for a, copy in zip((x_f, w_view, b_view), copies, strict=True):
        np.testing.assert_array_equal(a, copy)


def test_cache_keeps_a_private_copy_of_conv_param():
    x, w, b, param = _random_problem((1, 1, 5, 5, 1, 3, 3, 1, 1), np.float64)
    out, cache = layers.conv_forward(x, w, b, param)
    param["pad"] = 0  # the caller reuses its dict; the pending backward must not change
    dx, _, _ = layers.conv_backward(np.ones_like(out), cache)
    assert dx.shape == x.shape


def test_float32_close_to_float64():
    x, w, b, param = _random_problem((4, 8, 12, 12, 16, 3, 3, 1, 1), np.float64)
    out64, cache64 = layers.conv_forward(x, w, b, param)
    args32 = [a.astype(np.float32) for a in (x, w, b)]
    out32, cache32 = layers.conv_forward(*args32, param)
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4)
    dout = np.random.default_rng(0).standard_normal(out64.shape)
    for g32, g64 in zip(
        layers.conv_backward(dout.astype(np.float32), cache32),
        layers.conv_backward(dout, cache64),
        strict=True,
    ):
        np.testing.assert_allclose(g32, g64, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _good():
    return _random_problem((2, 3, 8, 8, 4, 3, 3, 1, 1), np.float64)


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, r"x must be 4-D \(N, C, H, W\), got shape \(3, 8, 8\)"),
        (lambda a: a.update(w=a["w"][0]), ValueError, r"w must be 4-D \(F, C, HH, WW\)"),
        (lambda a: a.update(b=a["b"][:, None]), ValueError, r"b must be 1-D"),
        (lambda a: a.update(x=a["x"].tolist()), TypeError, r"x must be a numpy.ndarray, got list"),
        (lambda a: a.update(x=a["x"].astype(np.int64)), TypeError, r"x must have dtype float32 or float64, got int64"),
        (lambda a: a.update(w=a["w"].astype(object)), TypeError, r"w must have dtype float32 or float64, got object"),
        (lambda a: a.update(w=a["w"].astype(np.float32)), TypeError, r"w has dtype float32 but x has dtype float64"),
        (lambda a: a.update(w=a["w"][:, :2]), ValueError, r"w has 2 input channels but x has 3"),
        (lambda a: a.update(b=a["b"][:3]), ValueError, r"b must have shape \(4,\) \(one bias per filter\), got \(3,\)"),
        (lambda a: a.update(x=a["x"][:0]), ValueError, r"x must not be empty"),
        (lambda a: a.update(param={"stride": 0, "pad": 1}), ValueError, r"conv_param\['stride'\] must be >= 1, got 0"),
        (lambda a: a.update(param={"stride": 1, "pad": -1}), ValueError, r"conv_param\['pad'\] must be >= 0, got -1"),
        (lambda a: a.update(param={"stride": 1.0, "pad": 1}), TypeError, r"conv_param\['stride'\] must be an int, got float"),
        (lambda a: a.update(param={"stride": True, "pad": 1}), TypeError, r"conv_param\['stride'\] must be an int, got bool"),
        (lambda a: a.update(param={"strides": 1}), ValueError, r"conv_param has unknown key\(s\) 'strides'"),
        (lambda a: a.update(param=[1, 1]), TypeError, r"conv_param must be a dict, got list"),
        (lambda a: a.update(param={"stride": 3, "pad": 1}), ValueError, r"\(8 \+ 2\*1 - 3\) = 7 is not a multiple of stride 3"),
        (lambda a: a.update(param={"stride": 1, "pad": 0}, w=np.ones((4, 3, 9, 3))), ValueError, r"filter height HH along H is larger than the input: window 9 > 8$"),
        (lambda a: a.update(param={"stride": 1, "pad": 1}, w=np.ones((4, 3, 3, 11))), ValueError, r"filter width WW along W is larger than the input: window 11 > 8 \+ 2\*pad \(1\) = 10"),
        (lambda a: a.update(param={"stride": 2**31, "pad": 1}), ValueError, r"conv_param\['stride'\] must be <= 2147483647, got 2147483648"),
        (lambda a: a.update(param={"stride": 1, "pad": 10**30}), ValueError, r"conv_param\['pad'\] must be <= 2147483647"),
        (lambda a: a.update(x=np.ma.masked_array(a["x"])), TypeError, r"x must be a plain numpy.ndarray, got MaskedArray"),
    ],
)  # fmt: skip
def test_bad_input_raises(mutate, error, match):
    x, w, b, param = _good()
    args = {"x": x, "w": w, "b": b, "param": param}
    mutate(args)
    with pytest.raises(error, match=match):
        layers.conv_forward(args["x"], args["w"], args["b"], args["param"])


def test_backward_rejects_bad_dout_and_cache():
    x, w, b, param = _good()
    out, cache = layers.conv_forward(x, w, b, param)
    with pytest.raises(
        ValueError, match=r"dout must have the shape of the forward output \(2, 4, 8, 8\)"
    ):
        layers.conv_backward(out[:, :2], cache)
    with pytest.raises(
        TypeError, match=r"dout has dtype float32 but the forward pass ran in float64"
    ):
        layers.conv_backward(out.astype(np.float32), cache)
    with pytest.raises(
        TypeError, match=r"cache must be the ConvCache returned by conv_forward, got tuple"
    ):
        layers.conv_backward(out, (x, w, b, param))


# ---------------------------------------------------------------------------------------------
# Chunking and threads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 3000])
def test_chunked_batches_match_reference(monkeypatch, chunk_bytes):
    """Batches split into several im2col chunks (1 image, or a few) give the same results."""
    monkeypatch.setattr(_runtime, "CHUNK_BYTES", chunk_bytes)
    shape = (5, 3, 7, 7, 4, 3, 3, 2, 1)
    x, w, b, param = _random_problem(shape, np.float64)
    assert _runtime.images_per_chunk(5, 3 * 3 * 3 * 16, 8) < 5  # several chunks
    out, cache = layers.conv_forward(x, w, b, param)
    ref_out, ref_cache = reference.conv_forward_naive(x, w, b, param)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    dout = np.random.default_rng(2).standard_normal(out.shape)
    for got, want in zip(
        layers.conv_backward(dout, cache),
        reference.conv_backward_naive(dout, ref_cache),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_concurrent_calls_from_threads_match_sequential():
    """Kernels release the GIL and every call borrows its own scratch buffers."""
    from concurrent.futures import ThreadPoolExecutor

    problems = [
        _random_problem((4, 8, 20 + 2 * k, 20, 16, 3, 3, 1, 1), np.float32, seed=k)
        for k in range(6)
    ]

    def run(problem):
        x, w, b, param = problem
        out, cache = layers.conv_forward(x, w, b, param)
        return (out, *layers.conv_backward(np.ones_like(out), cache))

    sequential = [run(p) for p in problems]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, problems * 8))
    for k, result in enumerate(concurrent):
        for got, want in zip(result, sequential[k % len(problems)], strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("x_shape", "HH", "WW", "stride", "pad"),
    [((1, 1, 1, 1), 1, 9, 1, 4), ((2, 2, 3, 2), 5, 6, 2, 2), ((1, 3, 2, 2), 6, 6, 3, 2)],
)
def test_im2col_writes_only_its_own_cells_when_the_filter_overhangs(x_shape, HH, WW, stride, pad):
    """Filters that overhang the image by more than one output column: nothing is written
    outside the output buffer, every cell is written, and the results are right."""
    x = np.random.default_rng(0).standard_normal(x_shape)
    N, C, H, W = x_shape
    H_out, W_out = (H + 2 * pad - HH) // stride + 1, (W + 2 * pad - WW) // stride + 1
    size = C * HH * WW * N * H_out * W_out
    guarded = np.full(size + 64, np.nan)
    cols = guarded[:size].reshape(C * HH * WW, N * H_out * W_out)
    conv_ext.im2col(x, cols, HH, WW, stride, pad)
    assert np.isnan(guarded[size:]).all(), "im2col wrote past the end of its output"
    assert not np.isnan(cols).any(), "im2col left cells unwritten"
    w = np.random.default_rng(1).standard_normal((2, C, HH, WW))
    b = np.zeros(2)
    param = {"stride": stride, "pad": pad}
    out, cache = layers.conv_forward(x, w, b, param)
    np.testing.assert_allclose(out, reference.conv_forward_naive(x, w, b, param)[0], rtol=1e-12)
    dx, dw, _ = layers.conv_backward(np.ones_like(out), cache)
    ref_dx, ref_dw, _ = reference.conv_backward_naive(np.ones_like(out), (x, w, b, param))
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Fast paths: Winograd F(2x2, 3x3), fused per-image im2col + BLAS, and the batched chunks
# ---------------------------------------------------------------------------------------------


def _path(shape, dtype) -> str:
    """Which implementation conv_forward / conv_backward take for this problem."""
    N, C, H, W, F, HH, WW, stride, pad = shape
    H_out, W_out = (H + 2 * pad - HH) // stride + 1, (W + 2 * pad - WW) // stride + 1
    itemsize = np.dtype(dtype).itemsize
    if H_out * W_out == 1 and pad == 0:
        return "whole-image"
    if conv_layer._is_pointwise(HH, WW, stride, pad, H_out * W_out):
        return "pointwise"
    if conv_layer._winograd_plan(N, C, F, HH, WW, stride, H_out, W_out, itemsize)[0]:
        return "winograd"
    if conv_layer._skinny_plan(np.dtype(dtype), N * H_out * W_out, F, C * HH * WW):
        return "skinny"  # forward only; the backward takes the fused or chunk path
    if conv_layer._fused_plan(N, C * HH * WW, H_out, W_out, F, itemsize)[0]:
        return "fused"
    return "chunks"


# (shape, path): odd output sizes, pad 0 to 2, batch of 1, non-square kernels, stride 2 and 3,
# the serial and the OpenMP (2-thread) variants, and both sides of every switch.
FAST_PATH_SHAPES = [
    ((1, 3, 4, 4, 2, 3, 3, 1, 1), "winograd"),  # 4x4 output: the smallest Winograd map
    ((2, 3, 5, 3, 2, 3, 3, 1, 0), "chunks"),  # 3x1 output: below _WINOGRAD_MIN_PIXELS
    ((2, 3, 7, 9, 4, 3, 3, 1, 0), "winograd"),  # 5x7 output: half tiles on two edges
    ((1, 2, 6, 5, 3, 3, 3, 1, 2), "winograd"),  # pad 2: tiles that are mostly padding
    ((3, 4, 11, 8, 5, 3, 3, 1, 1), "winograd"),
    ((2, 8, 16, 16, 4, 3, 3, 1, 1), "winograd"),  # OpenMP, one image per thread
    ((5, 6, 12, 13, 7, 3, 3, 1, 1), "winograd"),  # OpenMP, more images than threads
    ((2, 3, 9, 10, 3, 2, 3, 1, 0), "fused"),  # 8x8 output: exactly _FUSED_MIN_COLUMNS
    ((2, 3, 9, 9, 3, 2, 3, 1, 0), "chunks"),  # 8x7 output: one column short of it
    ((1, 2, 17, 15, 3, 3, 3, 2, 1), "fused"),  # stride 2, batch of 1
    ((2, 3, 25, 27, 4, 4, 3, 3, 0), "fused"),  # stride 3, non-square kernel
    ((3, 3, 16, 16, 6, 7, 7, 1, 3), "fused"),  # OpenMP; the 7x7 layer of the bench
    ((1, 3, 40, 40, 8, 5, 5, 1, 2), "chunks"),  # OpenMP-sized work but one image for 2 threads
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "path"), FAST_PATH_SHAPES, ids=lambda v: v if isinstance(v, str) else conv_shape_id(v)
)
def test_fast_paths_match_reference(shape, path, dtype):
    """Against the loop reference run in float64 on the same inputs: float64 to 1e-10, float32
    to 1e-5 of the largest magnitude (elementwise tolerances would fail on large sums in any
    float32 implementation, the reference's own included)."""
    assert _path(shape, dtype) == path
    x, w, b, param = _random_problem(shape, dtype, seed=11)
    out, cache = layers.conv_forward(x, w, b, param)
    ref_out, ref_cache = reference.conv_forward_naive(
        *(a.astype(np.float64) for a in (x, w, b)), param
    )
    dout = np.random.default_rng(12).standard_normal(out.shape).astype(dtype)
    grads = layers.conv_backward(dout, cache)
    ref_grads = reference.conv_backward_naive(dout.astype(np.float64), ref_cache)
    for name, got, want in zip(
        ("out", "dx", "dw", "db"), (out, *grads), (ref_out, *ref_grads), strict=True
    ):
        assert got.dtype == dtype and got.shape == want.shape, name
        if dtype == np.float64:
            np.testing.assert_allclose(got, want, err_msg=name, **tolerance(dtype))
        else:
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name


WHOLE_AND_POINTWISE = [
    ((2, 3, 4, 5, 6, 4, 5, 1, 0), "whole image"),  # a filter as large as the image
    ((2, 3, 9, 9, 4, 1, 1, 1, 0), "pointwise"),  # 1x1 over 81 pixels
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "path"),
    FAST_PATH_SHAPES + WHOLE_AND_POINTWISE,
    ids=lambda v: v if isinstance(v, str) else conv_shape_id(v),
)
def test_backward_without_dx_gives_the_same_dw_and_db(shape, path, dtype):
    """need_dx=False (a network's first layer) skips dx and changes nothing else."""
    x, w, b, param = _random_problem(shape, dtype, seed=5)
    out, cache = layers.conv_forward(x, w, b, param)
    dout = np.random.default_rng(6).standard_normal(out.shape).astype(dtype)
    dx, dw, db = layers.conv_backward(dout, cache)
    none, dw2, db2 = layers.conv_backward(dout, cache, need_dx=False)
    assert none is None and dx.shape == x.shape
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)
    with pytest.raises(TypeError, match="need_dx must be a bool, got int"):
        layers.conv_backward(dout, cache, need_dx=0)


@pytest.mark.parametrize(
    "shape",
    [(2, 2, 5, 7, 3, 3, 3, 1, 1), (1, 2, 6, 6, 2, 3, 3, 1, 0), (2, 2, 9, 10, 2, 2, 3, 1, 0), (1, 2, 17, 16, 2, 3, 2, 2, 1)],
    ids=conv_shape_id,
)  # fmt: skip
def test_fast_paths_match_numeric_gradient(shape):
    assert _path(shape, np.float64) in ("winograd", "fused")
    x, w, b, param = _random_problem(shape, np.float64, seed=13)
    out, cache = layers.conv_forward(x, w, b, param)
    dout = np.random.default_rng(14).standard_normal(out.shape)
    dx, dw, db = layers.conv_backward(dout, cache)
    assert (
        scaled_error(
            dx, numeric_gradient(lambda v: layers.conv_forward(v, w, b, param)[0], x, dout)
        )
        < 1e-8
    )
    assert (
        scaled_error(
            dw, numeric_gradient(lambda v: layers.conv_forward(x, v, b, param)[0], w, dout)
        )
        < 1e-8
    )
    assert (
        scaled_error(
            db, numeric_gradient(lambda v: layers.conv_forward(x, w, v, param)[0], b, dout)
        )
        < 1e-8
    )


@pytest.mark.parametrize(
    "shape", [(4, 16, 12, 12, 32, 3, 3, 1, 1), (4, 3, 16, 16, 16, 5, 5, 1, 2)], ids=conv_shape_id
)
def test_fast_paths_float32_close_to_float64(shape):
    """Winograd's transforms add a few roundings: float32 stays within float32 tolerance of
    the float64 result (which matches the reference to 1e-10)."""
    assert _path(shape, np.float32) == _path(shape, np.float64) != "chunks"
    x, w, b, param = _random_problem(shape, np.float64, seed=15)
    out64, cache64 = layers.conv_forward(x, w, b, param)
    out32, cache32 = layers.conv_forward(*(a.astype(np.float32) for a in (x, w, b)), param)
    scale = np.abs(out64).max()
    assert np.abs(out32 - out64).max() < 1e-5 * scale
    dout = np.random.default_rng(16).standard_normal(out64.shape)
    for g32, g64 in zip(
        layers.conv_backward(dout.astype(np.float32), cache32),
        layers.conv_backward(dout, cache64),
        strict=True,
    ):
        assert np.abs(g32 - g64).max() < 1e-5 * np.abs(g64).max()


def test_fused_path_with_several_row_blocks_per_image(monkeypatch):
    """Columns are built for a few output rows at a time when an image's do not fit."""
    monkeypatch.setattr(conv_layer, "_BLOCK_BYTES", 6 * 18 * 12 * 8)
    shape = (3, 3, 13, 11, 4, 3, 2, 1, 1)  # 13x12 output, K = 18: blocks of 6, 6 and 1 rows
    assert _path(shape, np.float64) == "fused"
    assert conv_layer._fused_plan(3, 18, 13, 12, 4, 8)[1] == 6
    x, w, b, param = _random_problem(shape, np.float64, seed=17)
    out, cache = layers.conv_forward(x, w, b, param)
    ref_out, ref_cache = reference.conv_forward_naive(x, w, b, param)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    dout = np.random.default_rng(18).standard_normal(out.shape)
    for got, want in zip(
        layers.conv_backward(dout, cache),
        reference.conv_backward_naive(dout, ref_cache),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_forward_blocks_smaller_than_the_backward_ones(dtype):
    """The forward kernel takes blocks of a few rows (``_forward_rows``), the last one short,
    while the backward pass takes the whole image: both match the reference."""
    shape = (3, 3, 15, 11, 5, 7, 7, 1, 3)  # 15x11 output, K = 147
    assert _path(shape, dtype) == "fused"
    itemsize = np.dtype(dtype).itemsize
    rows = conv_layer._fused_plan(3, 147, 15, 11, 5, itemsize)[1]
    forward_rows = conv_layer._forward_rows(rows, 147, 11, itemsize)
    assert rows == 15 and 1 < forward_rows < 15 and 15 % forward_rows
    x, w, b, param = _random_problem(shape, dtype, seed=19)
    out, cache = layers.conv_forward(x, w, b, param)
    ref_out, ref_cache = reference.conv_forward_naive(
        *(a.astype(np.float64) for a in (x, w, b)), param
    )
    dout = np.random.default_rng(20).standard_normal(out.shape).astype(dtype)
    got = (out, *layers.conv_backward(dout, cache))
    want = (ref_out, *reference.conv_backward_naive(dout.astype(np.float64), ref_cache))
    for name, g, r in zip(("out", "dx", "dw", "db"), got, want, strict=True):
        assert g.dtype == dtype, name
        if dtype == np.float64:
            np.testing.assert_allclose(g, r, err_msg=name, **tolerance(dtype))
        else:
            assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max(), name


def test_winograd_switches_off_for_large_transform_buffers(monkeypatch):
    shape = (2, 3, 7, 9, 4, 3, 3, 1, 0)
    assert _path(shape, np.float64) == "winograd"
    x, w, b, param = _random_problem(shape, np.float64, seed=19)
    winograd = layers.conv_forward(x, w, b, param)[0]
    monkeypatch.setattr(conv_layer, "_WINOGRAD_MAX_BYTES", 100)
    assert _path(shape, np.float64) == "chunks"
    direct = layers.conv_forward(x, w, b, param)[0]
    np.testing.assert_allclose(winograd, direct, rtol=1e-12, atol=1e-12)


def test_fast_paths_leave_numpy_blas_threads_alone():
    """The fused kernels run BLAS on one thread; NumPy's own BLAS keeps its thread count."""
    import threadpoolctl  # a dependency of cnnserve: the fused kernels use it

    def numpy_blas_threads():
        return [
            pool["num_threads"]
            for pool in threadpoolctl.threadpool_info()
            if pool["user_api"] == "blas" and "numpy" in pool["filepath"]
        ]

    before = numpy_blas_threads()
    x, w, b, param = _random_problem((4, 8, 16, 16, 8, 5, 5, 1, 2), np.float32)
    out, cache = layers.conv_forward(x, w, b, param)
    layers.conv_backward(out, cache)
    assert numpy_blas_threads() == before
    assert _runtime.BLAS_1._depth == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_filter_transforms_match_the_matrix_formulas(dtype):
    """U = G g G^T and dw = G^T (sum of the threads' dU) G, with the F(2x2, 3x3) matrix G."""
    G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    rng = np.random.default_rng(23)
    w = rng.standard_normal((5, 3, 3, 3)).astype(dtype)
    U = np.empty((16, 5, 3), dtype=dtype)
    conv_ext.winograd_filters(w, U)
    want = np.einsum("ak,fckl,bl->abfc", G, w.astype(np.float64), G).reshape(16, 5, 3)
    np.testing.assert_allclose(U, want, **tolerance(dtype))
    parts = rng.standard_normal((2, 16, 5, 3)).astype(dtype)
    dw = np.empty((5, 3, 3, 3), dtype=dtype)
    conv_ext.winograd_filter_grad(parts, dw)
    dU = parts.astype(np.float64).sum(axis=0).reshape(4, 4, 5, 3)
    np.testing.assert_allclose(dw, np.einsum("ak,abfc,bl->fckl", G, dU, G), **tolerance(dtype))


# (x_shape, HH, WW, stride, pad) for im2row: stride 1/2/3, padding, non-square filters, batch
# of 1 and several images, filters that overhang the image by more than their padding, one
# output pixel, the 4096-filter bench row's geometry (7x7 over 12x12, scaled down in C).
IM2ROW_CASES = [
    ((1, 3, 5, 5), 3, 3, 1, 0),
    ((2, 2, 7, 6), 3, 2, 2, 1),
    ((3, 4, 11, 10), 3, 2, 3, 2),
    ((1, 1, 1, 1), 1, 9, 1, 4),
    ((2, 2, 3, 2), 5, 6, 2, 2),
    ((1, 3, 2, 2), 6, 6, 3, 2),
    ((4, 5, 4, 9), 4, 1, 1, 0),
    ((1, 8, 12, 12), 7, 7, 1, 0),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("x_shape", "HH", "WW", "stride", "pad"), IM2ROW_CASES)
def test_im2row_is_im2col_transposed(x_shape, HH, WW, stride, pad, dtype):
    """im2row writes exactly im2col's columns transposed, every cell and nothing past its
    output buffer."""
    x = np.random.default_rng(0).standard_normal(x_shape).astype(dtype)
    N, C, H, W = x_shape
    H_out, W_out = (H + 2 * pad - HH) // stride + 1, (W + 2 * pad - WW) // stride + 1
    K, J = C * HH * WW, N * H_out * W_out
    cols = np.empty((K, J), dtype=dtype)
    conv_ext.im2col(x, cols, HH, WW, stride, pad)
    guarded = np.full(K * J + 64, np.nan, dtype=dtype)
    rows = guarded[: K * J].reshape(J, K)
    conv_ext.im2row(x, rows, HH, WW, stride, pad)
    assert np.isnan(guarded[K * J :]).all(), "im2row wrote past the end of its output"
    np.testing.assert_array_equal(rows, cols.T)


def test_im2row_parallel_matches_im2col():
    """A problem above the kernels' serial threshold, so the pixels are split over threads."""
    x = np.random.default_rng(1).standard_normal((3, 64, 12, 12)).astype(np.float32)
    cols = np.empty((64 * 25, 3 * 64), dtype=np.float32)  # 5x5 filter, stride 1, pad 0: 8x8
    conv_ext.im2col(x, cols, 5, 5, 1, 0)
    rows = np.empty((3 * 64, 64 * 25), dtype=np.float32)
    conv_ext.im2row(x, rows, 5, 5, 1, 0)
    np.testing.assert_array_equal(rows, cols.T)


def test_im2row_rejects_a_wrong_output_shape():
    x = np.zeros((1, 2, 5, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="im2row"):
        conv_ext.im2row(x, np.empty((9, 17), dtype=np.float32), 3, 3, 1, 0)
