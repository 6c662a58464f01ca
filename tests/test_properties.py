"""Property-based tests: random geometries, every layer family against the loop reference.

Hypothesis draws the output size and the window first and derives the input size from them,
so every drawn geometry is valid (it divides exactly); the parametrized tests cover the named
edge cases, these cover the space between them. Under CI the examples are derandomized
(``tests/conftest.py``), so a run is reproducible.
"""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from cnnserve import layers, reference
from tests.gradcheck import tolerance

dtypes = st.sampled_from([np.float32, np.float64])


@st.composite
def conv_problems(draw):
    HH, WW, stride = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
    H_out, W_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    # The input with exactly that many window positions must keep at least one pixel.
    max_pad = ((min(H_out, W_out) - 1) * stride + min(HH, WW) - 1) // 2
    pad = draw(st.integers(0, min(2, max_pad)))
    H = (H_out - 1) * stride + HH - 2 * pad
    W = (W_out - 1) * stride + WW - 2 * pad
    N, C, F = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return (N, C, H, W, F, HH, WW, stride, pad), draw(st.integers(0, 2**16))


@given(conv_problems(), dtypes)
def test_conv_matches_reference(problem, dtype):
    (N, C, H, W, F, HH, WW, stride, pad), seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, HH, WW)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    param = {"stride": stride, "pad": pad}
    out, cache = layers.conv_forward(x, w, b, param)
    ref_out, ref_cache = reference.conv_forward_naive(x, w, b, param)
    np.testing.assert_allclose(out, ref_out, **tolerance(dtype))
    dout = rng.standard_normal(out.shape).astype(dtype)
    for got, want in zip(
        layers.conv_backward(dout, cache),
        reference.conv_backward_naive(dout, ref_cache),
        strict=True,
    ):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **tolerance(dtype))


@st.composite
def pool_problems(draw):
    ph, pw, stride = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    H_out, W_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    H, W = (H_out - 1) * stride + ph, (W_out - 1) * stride + pw
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    # Few distinct values, so that windows often hold tied maxima.
    ties = draw(st.booleans())
    return (N, C, H, W, ph, pw, stride), ties, draw(st.integers(0, 2**16))


@given(pool_problems(), dtypes, st.sampled_from(["max", "avg"]))
def test_pool_matches_reference(problem, dtype, kind):
    (N, C, H, W, ph, pw, stride), ties, seed = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    if ties:
        x = np.round(x)
    x = x.astype(dtype)
    param = {"pool_height": ph, "pool_width": pw, "stride": stride}
    forward, backward = (
        getattr(layers, f"{kind}_pool_forward"),
        getattr(layers, f"{kind}_pool_backward"),
    )
    ref_forward = getattr(reference, f"{kind}_pool_forward_naive")
    ref_backward = getattr(reference, f"{kind}_pool_backward_naive")
    out, cache = forward(x, param)
    ref_out, ref_cache = ref_forward(x, param)
    np.testing.assert_allclose(out, ref_out, **tolerance(dtype))
    dout = rng.standard_normal(out.shape).astype(dtype)
    np.testing.assert_allclose(
        backward(dout, cache), ref_backward(dout, ref_cache), **tolerance(dtype)
    )


@st.composite
def norm_problems(draw):
    N = draw(st.integers(2, 5))
    G = draw(st.integers(1, 3))
    C = G * draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return (N, C, H, W), G, draw(st.integers(0, 2**16))


@given(norm_problems(), dtypes, st.sampled_from(["spatial_batchnorm", "spatial_groupnorm"]))
def test_spatial_norms_match_reference(problem, dtype, kind):
    (N, C, H, W), G, seed = problem
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, C, H, W)) * 3 + 1).astype(dtype)
    if kind == "spatial_batchnorm":
        gamma, beta = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
        args, ref_args = (gamma, beta, {"mode": "train"}), (gamma, beta, {"mode": "train"})
    else:
        gamma = rng.standard_normal((1, C, 1, 1)).astype(dtype)
        beta = rng.standard_normal((1, C, 1, 1)).astype(dtype)
        args, ref_args = (gamma, beta, G, {}), (gamma, beta, G, {})
    out, cache = getattr(layers, f"{kind}_forward")(x, *args)
    # The oracle runs in float64 on the same (float32-rounded) numbers: in float32 its own
    # rounding is large when a group's variance is close to eps, while the kernels accumulate
    # in float64 whatever the dtype.
    ref_args = tuple(a.astype(np.float64) if isinstance(a, np.ndarray) else a for a in ref_args)
    ref_out, ref_cache = getattr(reference, f"{kind}_forward_naive")(
        x.astype(np.float64), *ref_args
    )
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-9, "atol": 1e-10}
    np.testing.assert_allclose(out, ref_out, **tol)
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = getattr(layers, f"{kind}_backward")(dout, cache)
    want = getattr(reference, f"{kind}_backward_naive")(dout.astype(np.float64), ref_cache)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == dtype
        np.testing.assert_allclose(g, r, **tol)
