"""Normalisation layers: kernels against the loop oracles, gradients, running statistics,
numerics and argument checks."""

from types import MappingProxyType

import numpy as np
import pytest

from cnnserve import layers, reference
from tests.gradcheck import numeric_gradient, rel_error, tolerance

DTYPES = [np.float32, np.float64]

# (layer, shape of x, G): G is only used by groupnorm. Several cases are degenerate on purpose:
# a single value per statistic (batchnorm with N = 1, layernorm with D = 1, groupnorm with one
# value per group) normalises to xhat = 0.
CASES = [
    ("batchnorm", (4, 5), None),
    ("batchnorm", (1, 3), None),
    ("batchnorm", (7, 1), None),
    ("batchnorm", (3, 9), None),
    ("spatial_batchnorm", (2, 3, 4, 5), None),
    ("spatial_batchnorm", (1, 1, 3, 3), None),
    ("spatial_batchnorm", (3, 2, 1, 1), None),
    ("spatial_batchnorm", (2, 4, 2, 1), None),
    ("layernorm", (4, 5), None),
    ("layernorm", (1, 6), None),
    ("layernorm", (3, 1), None),
    ("layernorm", (5, 17), None),
    ("groupnorm", (2, 6, 3, 4), 1),
    ("groupnorm", (2, 6, 3, 4), 2),
    ("groupnorm", (2, 6, 3, 4), 3),
    ("groupnorm", (2, 6, 3, 4), 6),
    ("groupnorm", (1, 4, 2, 2), 2),
    ("groupnorm", (3, 1, 2, 3), 1),
    ("groupnorm", (1, 3, 1, 1), 3),
]
CASE_IDS = [
    f"{name}-{'x'.join(map(str, shape))}" + (f"-G{G}" if G else "") for name, shape, G in CASES
]

FAST = {
    "batchnorm": (layers.batchnorm_forward, layers.batchnorm_backward),
    "spatial_batchnorm": (layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward),
    "layernorm": (layers.layernorm_forward, layers.layernorm_backward),
    "groupnorm": (layers.spatial_groupnorm_forward, layers.spatial_groupnorm_backward),
}
NAIVE = {
    "batchnorm": (reference.batchnorm_forward_naive, reference.batchnorm_backward_naive),
    "spatial_batchnorm": (
        reference.spatial_batchnorm_forward_naive,
        reference.spatial_batchnorm_backward_naive,
    ),
    "layernorm": (reference.layernorm_forward_naive, reference.layernorm_backward_naive),
    "groupnorm": (
        reference.spatial_groupnorm_forward_naive,
        reference.spatial_groupnorm_backward_naive,
    ),
}


def _affine_shape(name, shape):
    return (1, shape[1], 1, 1) if name == "groupnorm" else (shape[1],)


def _make(name, shape, dtype, seed=0):
    """Random x (offset and scaled), gamma, beta and dout for one case."""
    rng = np.random.default_rng(seed)
    x = (3.0 * rng.standard_normal(shape) + 5.0).astype(dtype)
    ashape = _affine_shape(name, shape)
    gamma = (1.0 + 0.5 * rng.standard_normal(ashape)).astype(dtype)
    beta = rng.standard_normal(ashape).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    return x, gamma, beta, dout


def _forward(name, fast, x, gamma, beta, G=None, param=None):
    """Call a forward with fresh default params ('train' mode for batchnorm)."""
    forward = (FAST if fast else NAIVE)[name][0]
    if param is None:
        param = {"mode": "train"} if "batchnorm" in name else {}
    if name == "groupnorm":
        return forward(x, gamma, beta, G, param)
    return forward(x, gamma, beta, param)


def _backward(name, fast, dout, cache):
    return (FAST if fast else NAIVE)[name][1](dout, cache)


def _assert_close(actual, expected, dtype):
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, **tolerance(dtype))


# ---------------------------------------------------------------------------------------------
# Kernels against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "shape", "G"), CASES, ids=CASE_IDS)
def test_matches_reference(name, shape, G, dtype):
    x, gamma, beta, dout = _make(name, shape, dtype)
    out, cache = _forward(name, True, x, gamma, beta, G)
    out_ref, cache_ref = _forward(name, False, x, gamma, beta, G)
    assert out.dtype == dtype
    _assert_close(out, out_ref, dtype)
    assert np.all(np.isfinite(out))

    grads = _backward(name, True, dout, cache)
    grads_ref = _backward(name, False, dout, cache_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert grad.dtype == dtype
        _assert_close(grad, grad_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["batchnorm", "spatial_batchnorm"])
def test_batchnorm_test_mode_matches_reference(name, dtype):
    shape = (5, 3) if name == "batchnorm" else (3, 3, 2, 4)
    x, gamma, beta, dout = _make(name, shape, dtype, seed=1)
    rng = np.random.default_rng(2)
    stats = {
        "running_mean": rng.standard_normal(3).astype(dtype),
        "running_var": rng.uniform(0.5, 2.0, 3).astype(dtype),
    }
    out, cache = _forward(name, True, x, gamma, beta, param={"mode": "test", **stats})
    out_ref, cache_ref = _forward(name, False, x, gamma, beta, param={"mode": "test", **stats})
    _assert_close(out, out_ref, dtype)
    for grad, grad_ref in zip(
        _backward(name, True, dout, cache), _backward(name, False, dout, cache_ref), strict=True
    ):
        _assert_close(grad, grad_ref, dtype)


# The kernels run serially below this many elements of x and split the work over OpenMP
# threads from it on (CNN_PARALLEL_MIN_WORK in cython_ext/cnn_threads.h).
PARALLEL_MIN_SIZE = 32768


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("name", "shape", "G"),
    [
        ("batchnorm", (64, 520), None),
        ("spatial_batchnorm", (8, 32, 12, 12), None),
        ("layernorm", (80, 420), None),
        ("groupnorm", (4, 32, 16, 16), 16),
    ],
    ids=["batchnorm", "spatial_batchnorm", "layernorm", "groupnorm"],
)
def test_matches_reference_parallel_path(name, shape, G, dtype):
    """Inputs large enough for the kernels' parallel loops, with work for every thread."""
    assert np.prod(shape) >= PARALLEL_MIN_SIZE
    x, gamma, beta, dout = _make(name, shape, dtype, seed=3)
    out, cache = _forward(name, True, x, gamma, beta, G)
    out_ref, cache_ref = _forward(name, False, x, gamma, beta, G)
    _assert_close(out, out_ref, dtype)
    for grad, grad_ref in zip(
        _backward(name, True, dout, cache), _backward(name, False, dout, cache_ref), strict=True
    ):
        _assert_close(grad, grad_ref, dtype)
    if "batchnorm" in name:
        rng = np.random.default_rng(4)
        C = shape[1]
        stats = {
            "running_mean": rng.standard_normal(C).astype(dtype),
            "running_var": rng.uniform(0.5, 2.0, C).astype(dtype),
        }
        out, cache = _forward(name, True, x, gamma, beta, param={"mode": "test", **stats})
        out_ref, cache_ref = _forward(name, False, x, gamma, beta, param={"mode": "test", **stats})
        _assert_close(out, out_ref, dtype)
        for grad, grad_ref in zip(
            _backward(name, True, dout, cache),
            _backward(name, False, dout, cache_ref),
            strict=True,
        ):
            _assert_close(grad, grad_ref, dtype)
    # Each channel or group is reduced by one thread in a fixed order: the serial path (on one
    # slice of the batch that is below the threshold) gives bit-identical layer-norm rows.
    if name in ("layernorm", "groupnorm"):
        out_one, _ = _forward(name, True, x[:1].copy(), gamma, beta, G)
        np.testing.assert_array_equal(out_one, out[:1])


@pytest.mark.parametrize(("name", "shape", "G"), CASES, ids=CASE_IDS)
def test_float32_matches_float64(name, shape, G):
    x, gamma, beta, dout = _make(name, shape, np.float64, seed=4)
    # Round the data to float32 first, so both runs see the same values.
    x, gamma, beta, dout = (a.astype(np.float32).astype(np.float64) for a in (x, gamma, beta, dout))
    out64, cache64 = _forward(name, True, x, gamma, beta, G)
    f32 = [a.astype(np.float32) for a in (x, gamma, beta)]
    out32, cache32 = _forward(name, True, *f32, G)
    _assert_close(out32, out64, np.float32)
    grads64 = _backward(name, True, dout, cache64)
    grads32 = _backward(name, True, dout.astype(np.float32), cache32)
    for g32, g64 in zip(grads32, grads64, strict=True):
        assert g32.dtype == np.float32
        _assert_close(g32, g64, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "shape", "G"), CASES, ids=CASE_IDS)
def test_non_contiguous_inputs(name, shape, G, dtype):
    x, gamma, beta, dout = _make(name, shape, dtype, seed=5)

    def strided(a):
        """The same values as ``a`` in a non-contiguous view (every other element)."""
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        big[..., ::2] = a
        view = big[..., ::2]
        assert not view.flags.c_contiguous or view.size == 1
        return view

    x_f = np.asfortranarray(x) if x.ndim == 2 and min(x.shape) > 1 else strided(x)
    out, cache = _forward(name, True, x, gamma, beta, G)
    out_nc, cache_nc = _forward(name, True, x_f, strided(gamma), strided(beta), G)
    np.testing.assert_array_equal(out_nc, out)
    grads = _backward(name, True, dout, cache)
    grads_nc = _backward(name, True, strided(dout), cache_nc)
    for g_nc, g in zip(grads_nc, grads, strict=True):
        np.testing.assert_array_equal(g_nc, g)


@pytest.mark.parametrize(("name", "shape", "G"), CASES, ids=CASE_IDS)
def test_inputs_not_modified(name, shape, G):
    x, gamma, beta, dout = _make(name, shape, np.float64, seed=6)
    copies = [a.copy() for a in (x, gamma, beta, dout)]
    out, cache = _forward(name, True, x, gamma, beta, G)
    dx, dgamma, dbeta = _backward(name, True, dout, cache)
    for a, a0 in zip((x, gamma, beta, dout), copies, strict=True):
        np.testing.assert_array_equal(a, a0)
    for result in (out, dx, dgamma, dbeta):
        for a in (x, gamma, beta, dout):
            assert not np.shares_memory(result, a)
    assert dgamma.shape == dbeta.shape == gamma.shape


# ---------------------------------------------------------------------------------------------
# Numeric gradients
# ---------------------------------------------------------------------------------------------


def _check_gradients(name, x, gamma, beta, dout, G=None, make_param=lambda: None):
    """Compare dx, dgamma, dbeta with central differences of sum(forward(...) * dout)."""
    _, cache = _forward(name, True, x, gamma, beta, G, make_param())
    dx, dgamma, dbeta = _backward(name, True, dout, cache)

    def fx(v):
        return _forward(name, True, v, gamma, beta, G, make_param())[0]

    def fgamma(v):
        return _forward(name, True, x, v, beta, G, make_param())[0]

    def fbeta(v):
        return _forward(name, True, x, gamma, v, G, make_param())[0]

    # h = 1e-4: the O(h^2) truncation error of central differences is ~1e-9 relative here,
    # while with h = 1e-6 rounding (~1e-9 absolute) dominates the smallest dx entries (~1e-4),
    # and rel_error takes the worst entry.
    h = 1e-4
    assert rel_error(dx, numeric_gradient(fx, x.copy(), dout, h)) < 1e-6
    assert rel_error(dgamma, numeric_gradient(fgamma, gamma.copy(), dout, h)) < 1e-6
    assert rel_error(dbeta, numeric_gradient(fbeta, beta.copy(), dout, h)) < 1e-6
    return dx


@pytest.mark.parametrize(("name", "shape", "G"), CASES, ids=CASE_IDS)
def test_numeric_gradients(name, shape, G):
    x, gamma, beta, dout = _make(name, shape, np.float64, seed=7)
    dx = _check_gradients(name, x, gamma, beta, dout, G)
    if "batchnorm" in name:
        # Through the batch statistics, the gradient of each channel sums to zero.
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        np.testing.assert_allclose(dx.sum(axis=axes), 0, atol=1e-10)


@pytest.mark.parametrize("name", ["batchnorm", "spatial_batchnorm"])
def test_numeric_gradients_test_mode(name):
    shape = (4, 3) if name == "batchnorm" else (2, 3, 2, 3)
    x, gamma, beta, dout = _make(name, shape, np.float64, seed=8)
    stats = {"running_mean": np.array([4.0, 5.0, 6.0]), "running_var": np.array([9.0, 1.0, 4.0])}

    def make_param():
        return {"mode": "test", **stats}

    dx = _check_gradients(name, x, gamma, beta, dout, make_param=make_param)
    # Fixed statistics: the gradient is the plain affine one.
    scale = gamma / np.sqrt(stats["running_var"] + 1e-5)
    expected = dout * (scale if x.ndim == 2 else scale[:, None, None])
    np.testing.assert_allclose(dx, expected, rtol=1e-12)


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_backward_alt_equals_backward(mode, dtype):
    """The NumPy closed form (alt) and the compiled kernel are independent implementations."""
    x, gamma, beta, dout = _make("batchnorm", (6, 4), dtype, seed=9)
    _, cache = layers.batchnorm_forward(x, gamma, beta, {"mode": mode})
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-14}
    for a, b in zip(
        layers.batchnorm_backward(dout, cache),
        layers.batchnorm_backward_alt(dout, cache),
        strict=True,
    ):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(a, b, **tol)


# ---------------------------------------------------------------------------------------------
# Running statistics and test mode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["batchnorm", "spatial_batchnorm"])
def test_running_stats_update(name, dtype):
    shape = (8, 3) if name == "batchnorm" else (4, 3, 2, 5)
    axes = (0,) if name == "batchnorm" else (0, 2, 3)
    x, gamma, beta, _ = _make(name, shape, dtype, seed=10)
    old_mean = np.array([1.0, -2.0, 0.5], dtype=dtype)
    old_var = np.array([2.0, 0.5, 1.0], dtype=dtype)
    saved = [a.copy() for a in (x, gamma, beta, old_mean, old_var)]
    bn_param = {"mode": "train", "momentum": 0.75, "running_mean": old_mean, "running_var": old_var}

    _forward(name, True, x, gamma, beta, param=bn_param)

    x64 = x.astype(np.float64)
    expected_mean = 0.75 * old_mean + 0.25 * x64.mean(axis=axes)
    expected_var = 0.75 * old_var + 0.25 * x64.var(axis=axes)  # biased variance
    new_mean, new_var = bn_param["running_mean"], bn_param["running_var"]
    assert new_mean is not old_mean and new_var is not old_var  # written back as new arrays
    assert new_mean.dtype == new_var.dtype == dtype
    _assert_close(new_mean, expected_mean.astype(dtype), dtype)
    _assert_close(new_var, expected_var.astype(dtype), dtype)
    for a, a0 in zip((x, gamma, beta, old_mean, old_var), saved, strict=True):
        np.testing.assert_array_equal(a, a0)
    assert sorted(bn_param) == ["mode", "momentum", "running_mean", "running_var"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_stats_default_to_zeros_and_ones(dtype):
    x, gamma, beta, _ = _make("batchnorm", (10, 4), dtype, seed=11)
    bn_param = {"mode": "train"}
    layers.batchnorm_forward(x, gamma, beta, bn_param)
    x64 = x.astype(np.float64)
    # Default momentum 0.9 from running_mean = 0, running_var = 1.
    _assert_close(bn_param["running_mean"], (0.1 * x64.mean(0)).astype(dtype), dtype)
    _assert_close(bn_param["running_var"], (0.9 + 0.1 * x64.var(0)).astype(dtype), dtype)
    assert bn_param["running_mean"].dtype == bn_param["running_var"].dtype == dtype


def test_running_stats_converge_to_batch_stats():
    x, gamma, beta, _ = _make("spatial_batchnorm", (3, 2, 4, 4), np.float64, seed=12)
    bn_param = {"mode": "train", "momentum": 0.5}
    for _ in range(60):
        layers.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(bn_param["running_var"], x.var(axis=(0, 2, 3)), rtol=1e-12)
    # In test mode the running statistics (now the batch's) give the training output.
    out_train, _ = layers.spatial_batchnorm_forward(x, gamma, beta, dict(bn_param))
    bn_param["mode"] = "test"
    out_test, _ = layers.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(out_test, out_train, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_test_mode_uses_running_stats(dtype):
    x, gamma, beta, _ = _make("batchnorm", (6, 3), dtype, seed=13)
    running_mean = np.array([5.0, 4.0, -1.0], dtype=dtype)
    running_var = np.array([9.0, 0.25, 1.0], dtype=dtype)
    bn_param = {
        "mode": "test",
        "eps": 1e-3,
        "running_mean": running_mean,
        "running_var": running_var,
    }
    out, _ = layers.batchnorm_forward(x, gamma, beta, bn_param)
    x64 = x.astype(np.float64)
    expected = gamma * (x64 - running_mean) / np.sqrt(running_var.astype(np.float64) + 1e-3) + beta
    _assert_close(out, expected.astype(dtype), dtype)
    # Nothing is written back in test mode, and each sample is normalised on its own.
    assert bn_param["running_mean"] is running_mean and bn_param["running_var"] is running_var
    out_first, _ = layers.batchnorm_forward(x[:1], gamma, beta, bn_param)
    np.testing.assert_array_equal(out_first, out[:1])


def test_batchnorm_test_mode_without_running_stats():
    x, gamma, beta, _ = _make("batchnorm", (4, 3), np.float64, seed=14)
    bn_param = {"mode": "test"}
    out, _ = layers.batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(out, gamma * x / np.sqrt(1 + 1e-5) + beta, rtol=1e-12)
    assert bn_param == {"mode": "test"}


def test_batchnorm_single_sample_is_finite():
    """N = 1 in train mode: x - mean is 0, so out is beta and dx is 0, all finite."""
    x, gamma, beta, dout = _make("batchnorm", (1, 5), np.float32, seed=15)
    bn_param = {"mode": "train"}
    out, cache = layers.batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_array_equal(out, beta[None, :])
    dx, dgamma, dbeta = layers.batchnorm_backward(dout, cache)
    np.testing.assert_array_equal(dx, np.zeros_like(x))
    np.testing.assert_array_equal(dgamma, np.zeros_like(gamma))
    np.testing.assert_array_equal(dbeta, dout[0])
    assert np.all(np.isfinite(bn_param["running_var"]))


def test_norm_params_accept_mode_without_effect():
    x, gamma, beta, _ = _make("layernorm", (3, 4), np.float64, seed=16)
    out, _ = layers.layernorm_forward(x, gamma, beta, {})
    out_test, _ = layers.layernorm_forward(x, gamma, beta, {"mode": "test", "eps": 1e-5})
    np.testing.assert_array_equal(out_test, out)
    xg, gg, bg, _ = _make("groupnorm", (2, 4, 2, 2), np.float64, seed=16)
    outg, _ = layers.spatial_groupnorm_forward(xg, gg, bg, 2, {})
    outg_train, _ = layers.spatial_groupnorm_forward(xg, gg, bg, 2, {"mode": "train"})
    np.testing.assert_array_equal(outg_train, outg)


def test_eps_is_used():
    x, gamma, beta, _ = _make("layernorm", (2, 3), np.float64, seed=17)
    out, _ = layers.layernorm_forward(x, np.ones(3), np.zeros(3), {"eps": 2.0})
    xc = x - x.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(out, xc / np.sqrt(x.var(axis=1, keepdims=True) + 2.0), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "G", "axes"),
    [
        ("batchnorm", (256, 4), None, (0,)),
        ("spatial_batchnorm", (8, 3, 8, 8), None, (0, 2, 3)),
        ("layernorm", (4, 512), None, (1,)),
        ("groupnorm", (2, 4, 16, 16), 2, None),
    ],
    ids=["batchnorm", "spatial_batchnorm", "layernorm", "groupnorm"],
)
def test_large_offset_float32(name, shape, G, axes):
    """1e4 + unit noise in float32: a one-pass E[x^2] - E[x]^2 would lose the variance."""
    rng = np.random.default_rng(18)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    ashape = _affine_shape(name, shape)
    gamma, beta = np.ones(ashape, np.float32), np.zeros(ashape, np.float32)
    out, _ = _forward(name, True, x, gamma, beta, G)
    assert out.dtype == np.float32
    out64 = out.astype(np.float64)
    if name == "groupnorm":
        out64 = out64.reshape(shape[0], G, -1)  # (N, G, C/G*H*W)
        axes = (2,)
    np.testing.assert_allclose(out64.mean(axis=axes), 0, atol=1e-4)
    np.testing.assert_allclose(out64.std(axis=axes), 1, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _bn_args(**changes):
    x, gamma, beta, _ = _make("batchnorm", (4, 3), np.float64)
    args = {"x": x, "gamma": gamma, "beta": beta, "bn_param": {"mode": "train"}}
    args.update(changes)
    return args


def _gn_args(**changes):
    x, gamma, beta, _ = _make("groupnorm", (2, 4, 3, 3), np.float64)
    args = {"x": x, "gamma": gamma, "beta": beta, "G": 2, "gn_param": {}}
    args.update(changes)
    return args


F64 = np.float64
BN = layers.batchnorm_forward
SBN = layers.spatial_batchnorm_forward
LN = layers.layernorm_forward
GN = layers.spatial_groupnorm_forward


def _ln(**changes):
    args = {"x": np.ones((4, 3)), "gamma": np.ones(3), "beta": np.zeros(3), "ln_param": {}}
    args.update(changes)
    return args


def _sbn(**changes):
    args = {
        "x": np.ones((2, 3, 2, 2)),
        "gamma": np.ones(3),
        "beta": np.zeros(3),
        "bn_param": {"mode": "train"},
    }
    args.update(changes)
    return args


BAD_FORWARD = [
    # wrong ndim
    (BN, _bn_args(x=np.ones((2, 3, 4))), ValueError, r"x must be 2-D \(N, D\), got shape"),
    (SBN, _sbn(x=np.ones((2, 3))), ValueError, r"x must be 4-D \(N, C, H, W\)"),
    (LN, _ln(x=np.ones(3)), ValueError, r"x must be 2-D"),
    (GN, _gn_args(x=np.ones((2, 4, 9))), ValueError, r"x must be 4-D"),
    (BN, _bn_args(gamma=np.ones((1, 3))), ValueError, r"gamma must be 1-D"),
    (GN, _gn_args(gamma=np.ones(4)), ValueError, r"gamma must be 4-D \(1, C, 1, 1\)"),
    # dtypes
    (BN, _bn_args(x=np.ones((4, 3), dtype=np.int64)), TypeError, r"x must have dtype float32"),
    (LN, _ln(gamma=np.ones(3, dtype=np.int32)), TypeError, r"gamma must have dtype float32"),
    (BN, _bn_args(x=[[1.0, 2.0, 3.0]]), TypeError, r"x must be a numpy.ndarray, got list"),
    (BN, _bn_args(gamma=np.ones(3, np.float32)), TypeError, r"gamma has dtype float32 but x"),
    (SBN, _sbn(beta=np.zeros(3, np.float32)), TypeError, r"beta has dtype float32 but x"),
    (GN, _gn_args(x=np.ones((2, 4, 3, 3), np.float32)), TypeError, r"gamma has dtype float64"),
    # shapes of gamma, beta
    (BN, _bn_args(gamma=np.ones(4)), ValueError, r"gamma must have shape \(3,\)"),
    (BN, _bn_args(beta=np.zeros(2)), ValueError, r"beta must have shape \(3,\)"),
    (SBN, _sbn(gamma=np.ones(2)), ValueError, r"gamma must have shape \(3,\)"),
    (LN, _ln(beta=np.zeros(4)), ValueError, r"beta must have shape \(3,\)"),
    (
        GN,
        _gn_args(gamma=np.ones((1, 3, 1, 1))),
        ValueError,
        r"gamma must have shape \(1, 4, 1, 1\)",
    ),
    (GN, _gn_args(beta=np.ones((4, 1, 1, 1))), ValueError, r"beta must have shape \(1, 4, 1, 1\)"),
    (BN, _bn_args(x=np.ones((0, 3))), ValueError, r"x must not be empty"),
    # mode
    (BN, _bn_args(bn_param={}), ValueError, r"bn_param is missing the required key 'mode'"),
    (SBN, _sbn(bn_param={"eps": 1e-5}), ValueError, r"missing the required key 'mode'"),
    (BN, _bn_args(bn_param={"mode": "eval"}), ValueError, r"'train' or 'test', got 'eval'"),
    (BN, _bn_args(bn_param={"mode": None}), ValueError, r"bn_param\['mode'\] must be 'train'"),
    (LN, _ln(ln_param={"mode": "fit"}), ValueError, r"ln_param\['mode'\] must be 'train'"),
    # params dicts
    (BN, _bn_args(bn_param={"mode": "train", "axis": 1}), ValueError, r"unknown key\(s\) 'axis'"),
    (LN, _ln(ln_param={"momentum": 0.9}), ValueError, r"ln_param has unknown key\(s\)"),
    (GN, _gn_args(gn_param=None), TypeError, r"gn_param must be a dict, got NoneType"),
    (BN, _bn_args(bn_param="train"), TypeError, r"bn_param must be a dict"),
    # eps
    (
        BN,
        _bn_args(bn_param={"mode": "train", "eps": 0}),
        ValueError,
        r"eps'\] must be in \(0, inf\), got 0",
    ),
    (
        SBN,
        _sbn(bn_param={"mode": "test", "eps": -1e-5}),
        ValueError,
        r"must be in \(0, inf\), got -1e-05",
    ),
    (
        LN,
        _ln(ln_param={"eps": 0.0}),
        ValueError,
        r"ln_param\['eps'\] must be in \(0, inf\), got 0.0",
    ),
    (
        GN,
        _gn_args(gn_param={"eps": -1.0}),
        ValueError,
        r"gn_param\['eps'\] must be in \(0, inf\), got -1.0",
    ),
    (GN, _gn_args(gn_param={"eps": float("nan")}), ValueError, r"gn_param\['eps'\] must be"),
    (LN, _ln(ln_param={"eps": "1e-5"}), TypeError, r"ln_param\['eps'\] must be a number, got str"),
    (BN, _bn_args(bn_param={"mode": "train", "eps": True}), TypeError, r"must be a number"),
    # momentum
    (BN, _bn_args(bn_param={"mode": "train", "momentum": 1.0}), ValueError, r"in \[0, 1\)"),
    (BN, _bn_args(bn_param={"mode": "train", "momentum": -0.1}), ValueError, r"momentum"),
    (SBN, _sbn(bn_param={"mode": "train", "momentum": "0.9"}), TypeError, r"momentum'\] must be"),
    # running statistics
    (
        BN,
        _bn_args(bn_param={"mode": "test", "running_mean": np.zeros(4)}),
        ValueError,
        r"bn_param\['running_mean'\] must have shape \(3,\)",
    ),
    (
        SBN,
        _sbn(bn_param={"mode": "train", "running_var": np.ones(3, np.float32)}),
        TypeError,
        r"bn_param\['running_var'\] has dtype float32 but x has dtype float64",
    ),
    (
        BN,
        _bn_args(bn_param={"mode": "train", "running_mean": [0.0, 0.0, 0.0]}),
        TypeError,
        r"bn_param\['running_mean'\] must be a numpy.ndarray, got list",
    ),
    (
        BN,
        _bn_args(bn_param={"mode": "test", "running_var": np.array([1.0, -1.0, 1.0])}),
        ValueError,
        r"running_var'\] must be >= 0",
    ),
    (
        BN,
        _bn_args(bn_param={"mode": "test", "running_var": np.array([1.0, np.inf, 1.0])}),
        ValueError,
        r"bn_param\['running_var'\] must be finite, got NaN or inf",
    ),
    (
        SBN,
        _sbn(bn_param={"mode": "train", "running_mean": np.array([0.0, np.nan, 0.0])}),
        ValueError,
        r"bn_param\['running_mean'\] must be finite, got NaN or inf",
    ),
    (
        LN,
        _ln(ln_param={"eps": 10**400}),
        ValueError,
        r"ln_param\['eps'\] must be in \(0, inf\)",
    ),
    (
        BN,
        _bn_args(bn_param=MappingProxyType({"mode": "train"})),
        TypeError,
        r"bn_param must be a mutable mapping",
    ),
    # groups
    (GN, _gn_args(G=3), ValueError, r"G must divide the number of channels C = 4, got G = 3"),
    (GN, _gn_args(G=8), ValueError, r"G must divide the number of channels C = 4, got G = 8"),
    (GN, _gn_args(G=0), ValueError, r"G must be >= 1, got 0"),
    (GN, _gn_args(G=2.0), TypeError, r"G must be an int, got float"),
    (GN, _gn_args(G=True), TypeError, r"G must be an int, got bool"),
]


@pytest.mark.parametrize(("forward", "kwargs", "error", "match"), BAD_FORWARD)
def test_bad_forward_arguments(forward, kwargs, error, match):
    with pytest.raises(error, match=match):
        forward(**kwargs)


def test_failed_forward_leaves_bn_param_untouched():
    running_mean = np.zeros(3)
    bn_param = {"mode": "train", "running_mean": running_mean, "running_var": np.ones(4)}
    with pytest.raises(ValueError, match=r"running_var'\] must have shape \(3,\)"):
        layers.batchnorm_forward(**_bn_args(bn_param=bn_param))
    assert bn_param["running_mean"] is running_mean
    np.testing.assert_array_equal(running_mean, 0)


def test_test_mode_accepts_read_only_mapping():
    x, gamma, beta, _ = _make("batchnorm", (4, 3), np.float64)
    out, _ = layers.batchnorm_forward(x, gamma, beta, MappingProxyType({"mode": "test"}))
    assert out.shape == (4, 3)


def _caches():
    """One cache of each kind, float64, with its dout shape."""
    x, gamma, beta, _ = _make("batchnorm", (4, 3), F64)
    xs, gs, bs, _ = _make("spatial_batchnorm", (2, 3, 2, 2), F64)
    xg, gg, bg, _ = _make("groupnorm", (2, 4, 2, 2), F64)
    return {
        "batchnorm": layers.batchnorm_forward(x, gamma, beta, {"mode": "train"})[1],
        "spatial_batchnorm": layers.spatial_batchnorm_forward(xs, gs, bs, {"mode": "train"})[1],
        "layernorm": layers.layernorm_forward(x, gamma, beta, {})[1],
        "groupnorm": layers.spatial_groupnorm_forward(xg, gg, bg, 2, {})[1],
    }


BACKWARDS = {
    "batchnorm": layers.batchnorm_backward,
    "batchnorm_alt": layers.batchnorm_backward_alt,
    "spatial_batchnorm": layers.spatial_batchnorm_backward,
    "layernorm": layers.layernorm_backward,
    "groupnorm": layers.spatial_groupnorm_backward,
}


@pytest.mark.parametrize("name", sorted(BACKWARDS))
def test_bad_backward_arguments(name):
    backward = BACKWARDS[name]
    caches = _caches()
    cache = caches[name.removesuffix("_alt")]
    shape = cache.x.shape
    wrong_shape = shape[:-1] + (shape[-1] + 1,)
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output"):
        backward(np.ones(wrong_shape), cache)
    with pytest.raises(TypeError, match=r"dout has dtype float32 but the forward pass ran in"):
        backward(np.ones(shape, np.float32), cache)
    with pytest.raises(TypeError, match=r"dout must have dtype float32 or float64, got int64"):
        backward(np.ones(shape, np.int64), cache)
    expected = type(cache).__name__
    with pytest.raises(TypeError, match=rf"cache must be the {expected} returned by .*, got tuple"):
        backward(np.ones(shape), tuple(cache))
    other = "layernorm" if name.startswith("batchnorm") else "batchnorm"
    with pytest.raises(TypeError, match=rf"cache must be the {expected}"):
        backward(np.ones(shape), caches[other])
