"""Max and average pooling: the Cython kernels against the loop reference and numeric gradients."""

import numpy as np
import pytest

from cnnserve import layers, reference
from tests.gradcheck import numeric_gradient, rel_error, tolerance

# (N, C, H, W, pool_height, pool_width, stride): batch of 1 and single channel, 2x2/2 tiling
# (the kernel's unrolled path), 2x2 at strides 1 and 3 (the generic path), 3x3 at strides 1,
# 2 (overlapping) and 3 (the unrolled 3x3 path),
# non-square windows with stride 1, stride 3 (with gaps between windows), window == input,
# 1-wide windows.
SHAPES = [
    (1, 1, 4, 4, 2, 2, 2),
    (2, 3, 8, 6, 2, 2, 2),
    (2, 2, 5, 4, 2, 2, 1),
    (1, 2, 8, 5, 2, 2, 3),
    (2, 3, 7, 9, 3, 3, 2),
    (1, 2, 5, 6, 3, 3, 1),
    (2, 1, 9, 6, 3, 3, 3),
    (3, 2, 5, 7, 2, 3, 1),
    (2, 2, 7, 10, 1, 4, 3),
    (1, 3, 9, 8, 3, 2, 3),
    (2, 2, 5, 6, 5, 6, 1),
    (1, 2, 5, 6, 5, 6, 4),
    (4, 1, 6, 4, 3, 1, 1),
]

KINDS = {
    "max": (
        layers.max_pool_forward,
        layers.max_pool_backward,
        reference.max_pool_forward_naive,
        reference.max_pool_backward_naive,
    ),
    "avg": (
        layers.avg_pool_forward,
        layers.avg_pool_backward,
        reference.avg_pool_forward_naive,
        reference.avg_pool_backward_naive,
    ),
}


def _ids(shape):
    N, C, H, W, ph, pw, s = shape
    return f"x{N}x{C}x{H}x{W}-p{ph}x{pw}-s{s}"


def _param(ph, pw, stride):
    return {"pool_height": ph, "pool_width": pw, "stride": stride}


def _random_problem(shape, dtype, seed=0):
    N, C, H, W, ph, pw, stride = shape
    x = np.random.default_rng(seed).standard_normal((N, C, H, W)).astype(dtype)
    return x, _param(ph, pw, stride)


def _check_against_reference(kind, x, param, dout=None):
    """Run layer and reference on x (and dout); compare outputs, dtypes and gradients."""
    forward, backward, ref_forward, ref_backward = KINDS[kind]
    dtype = x.dtype
    out, cache = forward(x, param)
    ref_out, ref_cache = ref_forward(x, param)
    assert out.dtype == dtype and out.shape == ref_out.shape
    if kind == "max":
        np.testing.assert_array_equal(out, ref_out)  # a max is exact
    else:
        np.testing.assert_allclose(out, ref_out, **tolerance(dtype))

    if dout is None:
        dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    dx = backward(dout, cache)
    ref_dx = ref_backward(dout, ref_cache)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx, ref_dx, **tolerance(dtype))
    return out, dx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_backward_match_reference(kind, shape, dtype):
    x, param = _random_problem(shape, dtype)
    N, C, H, W, ph, pw, stride = shape
    out, _ = _check_against_reference(kind, x, param)
    assert out.shape == (N, C, (H - ph) // stride + 1, (W - pw) // stride + 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 16, 16, 16, 2, 2, 2), (8, 16, 17, 17, 3, 3, 2)], ids=_ids)
@pytest.mark.parametrize("kind", KINDS)
def test_parallel_path_matches_reference(kind, shape, dtype):
    """Inputs above the kernels' serial threshold (cython_ext/cnn_threads.h), so the OpenMP
    loops split the planes over threads."""
    N, C, H, W, ph, pw, stride = shape
    H_out, W_out = (H - ph) // stride + 1, (W - pw) // stride + 1
    assert N * C * H_out * W_out * ph * pw >= 32768  # the forward kernels' work
    x, param = _random_problem(shape, dtype, seed=5)
    _check_against_reference(kind, x, param)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs(kind, dtype):
    rng = np.random.default_rng(2)
    # A transposed view: (N, C, W, H) storage read as (N, C, H, W).
    x_t = rng.standard_normal((2, 3, 9, 7)).astype(dtype).transpose(0, 1, 3, 2)
    # A strided slice: every other channel and column, offset rows.
    x_s = rng.standard_normal((2, 6, 9, 14)).astype(dtype)[:, ::2, 2:, ::2]
    param = _param(3, 3, 2)
    for x in (x_t, x_s):
        N, C, H, W = x.shape
        out_shape = (N, C, (H - 3) // 2 + 1, (W - 3) // 2 + 1)
        dout = np.asfortranarray(rng.standard_normal(out_shape).astype(dtype))
        assert not x.flags.c_contiguous and not dout.flags.c_contiguous
        _check_against_reference(kind, x, param, dout)


@pytest.mark.parametrize(
    "shape", [(1, 2, 4, 4, 2, 2, 2), (1, 1, 7, 5, 3, 3, 2), (1, 1, 5, 6, 2, 3, 1)], ids=_ids
)
@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_numeric_gradient(kind, shape):
    forward, backward = KINDS[kind][:2]
    x, param = _random_problem(shape, np.float64, seed=3)  # continuous data: no ties
    out, cache = forward(x, param)
    dout = np.random.default_rng(4).standard_normal(out.shape)
    dx = backward(dout, cache)
    dx_num = numeric_gradient(lambda v: forward(v, param)[0], x, dout)
    assert rel_error(dx, dx_num) < 1e-7


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_tie_sends_whole_gradient_to_first_maximum(dtype):
    # One 2x2 window of four equal values: everything goes to the top-left position.
    x = np.full((1, 1, 2, 2), 3.0, dtype=dtype)
    out, cache = layers.max_pool_forward(x, _param(2, 2, 2))
    np.testing.assert_array_equal(out, [[[[3.0]]]])
    dx = layers.max_pool_backward(np.full((1, 1, 1, 1), 5.0, dtype=dtype), cache)
    np.testing.assert_array_equal(dx, [[[[5.0, 0.0], [0.0, 0.0]]]])

    # Ties within a row and within a column: row-major order means the first row wins,
    # and within it the first column.
    x = np.array([[[[0, 7, 7], [7, 7, 1], [2, 7, 0]]]], dtype=dtype)
    out, cache = layers.max_pool_forward(x, _param(3, 3, 1))
    dx = layers.max_pool_backward(np.ones((1, 1, 1, 1), dtype=dtype), cache)
    expected = np.zeros((1, 1, 3, 3), dtype=dtype)
    expected[0, 0, 0, 1] = 1
    np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_overlapping_windows_accumulate_at_shared_first_maximum(dtype):
    # 3x3 windows, stride 2, over a 3x5 plane: both windows contain column 2, where the tied
    # maxima (0, 2) and (1, 2) sit. Both gradients go to (0, 2); (1, 2) gets nothing.
    x = np.zeros((1, 1, 3, 5), dtype=dtype)
    x[0, 0, 0:2, 2] = 9
    out, cache = layers.max_pool_forward(x, _param(3, 3, 2))
    np.testing.assert_array_equal(out, [[[[9, 9]]]])
    dout = np.array([[[[2.0, 3.0]]]], dtype=dtype)
    dx = layers.max_pool_backward(dout, cache)
    expected = np.zeros_like(x)
    expected[0, 0, 0, 2] = 5
    np.testing.assert_array_equal(dx, expected)
    np.testing.assert_array_equal(
        reference.max_pool_backward_naive(
            dout, reference.max_pool_forward_naive(x, _param(3, 3, 2))[1]
        ),
        expected,
    )


def test_max_pool_constant_input_matches_reference_with_overlap():
    # Everything tied, windows overlapping in both directions.
    x = np.ones((2, 2, 7, 7))
    _, dx = _check_against_reference("max", x, _param(3, 3, 2))
    # Window (ho, wo) sends its gradient to (2*ho, 2*wo): only even rows and columns get any.
    assert np.count_nonzero(dx) == 2 * 2 * 3 * 3
    assert not dx[:, :, 1::2, :].any() and not dx[:, :, :, 1::2].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_propagates_nan_and_routes_gradient_to_first_nan(dtype):
    nan, inf = np.nan, np.inf
    x = np.array(
        [
            [
                [1, 9, nan, 4, -inf, -inf],
                [nan, nan, 3, nan, -inf, -inf],
            ]
        ]
    ).astype(dtype)[None]  # (1, 1, 2, 6): three 2x2 windows
    out, cache = layers.max_pool_forward(x, _param(2, 2, 2))
    # Window 0: a NaN after a larger number; window 1: NaN first; window 2: all -inf.
    np.testing.assert_array_equal(out, np.array([[[[nan, nan, -inf]]]], dtype=dtype))
    dx = layers.max_pool_backward(np.array([[[[1.0, 2.0, 3.0]]]], dtype=dtype), cache)
    expected = np.zeros_like(x)
    expected[0, 0, 1, 0] = 1  # first NaN of window 0 in row-major order, not (1, 1)
    expected[0, 0, 0, 2] = 2  # the NaN at the window's start, not the later (1, 3)
    expected[0, 0, 0, 4] = 3  # all tied at -inf: the first
    np.testing.assert_array_equal(dx, expected)
    ref_out, ref_cache = reference.max_pool_forward_naive(x, _param(2, 2, 2))
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(
        reference.max_pool_backward_naive(np.array([[[[1.0, 2.0, 3.0]]]], dtype=dtype), ref_cache),
        expected,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("ph", "pw", "stride"), [(2, 2, 2), (3, 3, 1), (3, 3, 2), (3, 3, 3), (3, 2, 1)]
)
def test_max_pool_ties_and_nans_match_reference_on_every_path(ph, pw, stride, dtype):
    """Small integers (many ties), NaNs and infinities through the unrolled 2x2 and 3x3 paths
    and the generic one: same maxima, same first-in-row-major-order argmax."""
    rng = np.random.default_rng(21)
    x = rng.integers(-2, 3, size=(2, 3, 3 * stride + ph, 3 * stride + pw)).astype(dtype)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.05] = -np.inf
    param = _param(ph, pw, stride)
    out, cache = layers.max_pool_forward(x, param)
    ref_out, ref_cache = reference.max_pool_forward_naive(x, param)
    np.testing.assert_array_equal(out, ref_out)
    dout = rng.standard_normal(out.shape).astype(dtype)
    np.testing.assert_array_equal(
        layers.max_pool_backward(dout, cache), reference.max_pool_backward_naive(dout, ref_cache)
    )


def test_avg_pool_propagates_nan_to_windows_that_hold_it():
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    x[0, 0, 3, 3] = np.nan
    out, _ = layers.avg_pool_forward(x, _param(2, 2, 2))
    assert np.isnan(out[0, 0, 1, 1])
    np.testing.assert_array_equal(out[0, 0].ravel()[:3], [2.5, 4.5, 10.5])


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_are_not_modified(kind):
    forward, backward = KINDS[kind][:2]
    x, param = _random_problem((2, 3, 7, 7, 3, 3, 2), np.float32)
    x_copy, param_copy = x.copy(), dict(param)
    x.setflags(write=False)  # any write into x would raise
    out, cache = forward(x, param)
    dout = np.ones_like(out)
    dout.setflags(write=False)
    backward(dout, cache)
    np.testing.assert_array_equal(x, x_copy)
    assert param == param_copy
    np.testing.assert_array_equal(dout, np.ones_like(out))


GOOD_X = np.zeros((2, 3, 8, 8))
GOOD_PARAM = _param(2, 2, 2)

# id: (x, pool_param, error, message pattern)
BAD_FORWARD_ARGS = {
    "x-3d": (np.zeros((3, 8, 8)), GOOD_PARAM, ValueError, r"x must be 4-D \(N, C, H, W\), got"),
    "x-list": (GOOD_X.tolist(), GOOD_PARAM, TypeError, r"x must be a numpy.ndarray, got list"),
    "x-int": (GOOD_X.astype(np.int64), GOOD_PARAM, TypeError, r"float32 or float64, got int64"),
    "param-list": (GOOD_X, [2, 2, 2], TypeError, r"pool_param must be a dict, got list"),
    "missing-key": (
        GOOD_X,
        {"pool_height": 2, "pool_width": 2},
        ValueError,
        r"pool_param is missing the required key 'stride'",
    ),
    "unknown-key": (
        GOOD_X,
        {**GOOD_PARAM, "pad": 0},
        ValueError,
        r"pool_param has unknown key\(s\) 'pad'",
    ),
    "stride-0": (
        GOOD_X,
        _param(2, 2, 0),
        ValueError,
        r"pool_param\['stride'\] must be >= 1, got 0",
    ),
    "height-0": (GOOD_X, _param(0, 2, 2), ValueError, r"\['pool_height'\] must be >= 1, got 0"),
    "stride-float": (
        GOOD_X,
        _param(2, 2, 2.0),
        TypeError,
        r"\['stride'\] must be an int, got float",
    ),
    "width-bool": (
        GOOD_X,
        _param(2, True, 2),
        TypeError,
        r"\['pool_width'\] must be an int, got bool",
    ),
    "too-tall": (
        GOOD_X,
        _param(9, 2, 1),
        ValueError,
        r"pool_height along H is larger than the input",
    ),
    "too-wide": (
        GOOD_X,
        _param(2, 9, 1),
        ValueError,
        r"pool_width along W is larger than the input",
    ),
    "no-divide-h": (
        GOOD_X,
        _param(3, 3, 2),
        ValueError,
        r"along H does not divide evenly: .* stride 2",
    ),
    "no-divide-w": (
        GOOD_X,
        _param(2, 3, 2),
        ValueError,
        r"pool_width along W does not divide evenly",
    ),
}


@pytest.mark.parametrize("case", BAD_FORWARD_ARGS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_rejects_bad_arguments(kind, case):
    x, param, error, match = BAD_FORWARD_ARGS[case]
    with pytest.raises(error, match=match):
        KINDS[kind][0](x, param)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_rejects_bad_dout(kind):
    forward, backward = KINDS[kind][:2]
    out, cache = forward(GOOD_X, GOOD_PARAM)  # out (2, 3, 4, 4), float64
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output"):
        backward(np.zeros((2, 3, 4, 5)), cache)
    with pytest.raises(TypeError, match=r"dout has dtype float32 but the forward pass ran in"):
        backward(np.zeros(out.shape, dtype=np.float32), cache)
    with pytest.raises(TypeError, match=r"dout must be a numpy.ndarray, got list"):
        backward(np.zeros(out.shape).tolist(), cache)


def test_backward_rejects_wrong_cache_type():
    _, max_cache = layers.max_pool_forward(GOOD_X, GOOD_PARAM)
    _, avg_cache = layers.avg_pool_forward(GOOD_X, GOOD_PARAM)
    dout = np.zeros((2, 3, 4, 4))
    with pytest.raises(
        TypeError, match=r"MaxPoolCache returned by max_pool_forward, got AvgPoolCache"
    ):
        layers.max_pool_backward(dout, avg_cache)
    with pytest.raises(
        TypeError, match=r"AvgPoolCache returned by avg_pool_forward, got MaxPoolCache"
    ):
        layers.avg_pool_backward(dout, max_cache)
    with pytest.raises(TypeError, match=r"cache must be the MaxPoolCache .*, got tuple"):
        layers.max_pool_backward(dout, (GOOD_X, GOOD_PARAM))


@pytest.mark.parametrize("window", [(3, 3, 1), (0, 0, 0), (2, 2), "2x2", (2.0, 2, 2)])
def test_max_pool_backward_rejects_an_edited_window(window):
    """The 2x2 path writes each window's four pixels: the window must be the cache's own."""
    _, cache = layers.max_pool_forward(GOOD_X, GOOD_PARAM)
    with pytest.raises(ValueError, match=r"cache.window .* does not give the pooled shape"):
        layers.max_pool_backward(np.ones((2, 3, 4, 4)), cache._replace(window=window))


def test_max_pool_cache_argmax_is_read_only():
    """The backward kernel indexes dx with it: a tampered index must not reach the kernel."""
    _, cache = layers.max_pool_forward(GOOD_X, GOOD_PARAM)
    assert not cache.argmax.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        cache.argmax[0, 0, 0, 0] = 10**12


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c._replace(argmax=np.full_like(c.argmax, 10**9)),
        lambda c: c._replace(argmax=np.full_like(c.argmax, -1)),
        lambda c: c._replace(argmax=c.argmax.astype(np.int32)),
        lambda c: c._replace(x_shape=(2, 3, 2, 2)),
        lambda c: c._replace(x_shape=(1, 3, 8, 8)),
        lambda c: c._replace(x_shape=(2, 3, 9, 9)),  # an odd size the 2x2 windows do not tile
    ],
)
def test_max_pool_backward_rejects_an_edited_cache(tamper):
    """An argmax that does not fit the input would make the kernel write out of bounds."""
    out, cache = layers.max_pool_forward(GOOD_X, GOOD_PARAM)
    message = r"cache\.(argmax does not belong to an input of shape|window .* does not give)"
    with pytest.raises(ValueError, match=message):
        layers.max_pool_backward(np.ones_like(out), tamper(cache))
