"""ReLU, affine, softmax, the two losses and dropout against the loop reference."""

import numpy as np
import pytest

from cnnserve import layers, reference
from tests.gradcheck import numeric_gradient, scaled_error, tolerance

DTYPES = [np.float32, np.float64]


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (2, 3, 5, 4), (7,), (8, 16, 33, 17)])
def test_relu_matches_reference(shape, dtype):
    # (8, 16, 33, 17) is large enough for the backward kernel's OpenMP path.
    x = _rng().standard_normal(shape).astype(dtype)
    x.flat[0] = 0  # the kink: gradient 0 at exactly 0, as in every framework
    out, cache = layers.relu_forward(x)
    ref_out, ref_cache = reference.relu_forward_naive(x)
    np.testing.assert_array_equal(out, ref_out)
    assert out.dtype == dtype
    dout = _rng(1).standard_normal(shape).astype(dtype)
    dx = layers.relu_backward(dout, cache)
    np.testing.assert_array_equal(dx, reference.relu_backward_naive(dout, ref_cache))
    assert dx.dtype == dtype and dx.flat[0] == 0


def test_relu_backward_selects_and_never_multiplies():
    # dx is dout where x > 0 and exactly 0 elsewhere: a NaN or inf upstream gradient at an
    # inactive unit gives 0 (a product dout * (x > 0) would give NaN), as in PyTorch.
    x = np.array([1.0, -1.0, 0.0, np.nan, 2.0, -3.0], dtype=np.float32)
    dout = np.array([np.nan, np.nan, np.inf, 5.0, 7.0, -np.inf], dtype=np.float32)
    dx = layers.relu_backward(dout, x)  # the cache is x itself
    np.testing.assert_array_equal(dx, [np.nan, 0.0, 0.0, 0.0, 7.0, 0.0])


def test_relu_numeric_gradient_and_non_contiguous():
    x = _rng().standard_normal((6, 5)).T  # a non-contiguous view, entries far from 0
    x[np.abs(x) < 0.05] = 0.5
    x_copy = x.copy()
    out, cache = layers.relu_forward(x)
    dout = _rng(2).standard_normal(out.shape)
    num = numeric_gradient(lambda v: layers.relu_forward(v)[0], x.copy(), dout)
    assert scaled_error(layers.relu_backward(dout, cache), num) < 1e-9
    np.testing.assert_array_equal(x, x_copy)


# ---------------------------------------------------------------------------------------------
# Affine
def test_affine_backward_without_dx():
    x = _rng().standard_normal((4, 2, 3))
    w, b = _rng(1).standard_normal((6, 5)), np.zeros(5)
    out, cache = layers.affine_forward(x, w, b)
    dout = _rng(2).standard_normal(out.shape)
    dx, dw, db = layers.affine_backward(dout, cache)
    none, dw2, db2 = layers.affine_backward(dout, cache, need_dx=False)
    assert none is None and dx.shape == x.shape
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("x_shape", "M"), [((1, 5), 3), ((4, 3, 2, 2), 6), ((3, 7), 1)])
def test_affine_matches_reference_and_numeric_gradient(x_shape, M, dtype):
    rng = _rng(3)
    x = rng.standard_normal(x_shape).astype(dtype)
    D = int(np.prod(x_shape[1:]))
    w = rng.standard_normal((D, M)).astype(dtype)
    b = rng.standard_normal(M).astype(dtype)
    out, cache = layers.affine_forward(x, w, b)
    ref_out, ref_cache = reference.affine_forward_naive(x, w, b)
    np.testing.assert_allclose(out, ref_out, **tolerance(dtype))
    assert out.dtype == dtype
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = layers.affine_backward(dout, cache)
    for g, want in zip(got, reference.affine_backward_naive(dout, ref_cache), strict=True):
        assert g.dtype == dtype and g.shape == want.shape
        np.testing.assert_allclose(g, want, **tolerance(dtype))
    if dtype == np.float64:
        dx, dw, db = got
        assert (
            scaled_error(dx, numeric_gradient(lambda v: layers.affine_forward(v, w, b)[0], x, dout))
            < 1e-9
        )
        assert (
            scaled_error(dw, numeric_gradient(lambda v: layers.affine_forward(x, v, b)[0], w, dout))
            < 1e-9
        )
        assert (
            scaled_error(db, numeric_gradient(lambda v: layers.affine_forward(x, w, v)[0], b, dout))
            < 1e-9
        )


def test_affine_bad_input():
    x, w, b = np.ones((2, 3, 4)), np.ones((12, 5)), np.ones(5)
    with pytest.raises(ValueError, match=r"w must have 12 rows .* got shape \(11, 5\)"):
        layers.affine_forward(x, w[:11], b)
    with pytest.raises(ValueError, match=r"b must have shape \(5,\)"):
        layers.affine_forward(x, w, b[:4])
    with pytest.raises(ValueError, match=r"x must be at least 2-D"):
        layers.affine_forward(np.ones(12), w, b)
    with pytest.raises(TypeError, match=r"b has dtype float32 but x has dtype float64"):
        layers.affine_forward(x, w, b.astype(np.float32))
    with pytest.raises(TypeError, match=r"x must have dtype float32 or float64, got int64"):
        layers.affine_forward(x.astype(np.int64), w, b)
    out, cache = layers.affine_forward(x, w, b)
    with pytest.raises(
        ValueError, match=r"dout must have the shape of the forward output \(2, 5\)"
    ):
        layers.affine_backward(out.T, cache)


# ---------------------------------------------------------------------------------------------
# Softmax and losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_forward_backward(dtype):
    rng = _rng(4)
    x = (rng.standard_normal((5, 7)) * 3).astype(dtype)
    p, cache = layers.softmax_forward(x)
    ref_p, ref_cache = reference.softmax_forward_naive(x)
    np.testing.assert_allclose(p, ref_p, **tolerance(dtype))
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-6)
    assert p.dtype == dtype
    dout = rng.standard_normal(p.shape).astype(dtype)
    dx = layers.softmax_backward(dout, cache)
    np.testing.assert_allclose(
        dx, reference.softmax_backward_naive(dout, ref_cache), **tolerance(dtype)
    )
    if dtype == np.float64:
        num = numeric_gradient(lambda v: layers.softmax_forward(v)[0], x, dout)
        assert scaled_error(dx, num) < 1e-8


def test_softmax_is_stable_for_huge_scores():
    x = np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32)
    p, _ = layers.softmax_forward(x)
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]])
    loss, dx = layers.softmax_loss(x, np.array([2]))
    assert np.isfinite(loss) and np.all(np.isfinite(dx))
    assert loss == pytest.approx(2000.0 + np.log(2), rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_name", ["softmax_loss", "svm_loss"])
def test_losses_match_reference_and_numeric_gradient(loss_name, dtype):
    rng = _rng(5)
    x = rng.standard_normal((6, 4)).astype(dtype)
    y = rng.integers(0, 4, size=6)
    loss, dx = getattr(layers, loss_name)(x, y)
    ref_loss, ref_dx = getattr(reference, f"{loss_name}_naive")(x, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(ref_loss, rel=1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(dx, ref_dx, **tolerance(dtype))
    assert dx.dtype == dtype
    if dtype == np.float64:
        num = numeric_gradient(lambda v: getattr(layers, loss_name)(v, y)[0], x, 1.0)
        assert scaled_error(dx, num) < 1e-7


def test_softmax_loss_of_uniform_scores_is_log_c():
    loss, _ = layers.softmax_loss(np.zeros((3, 10)), np.array([0, 5, 9]))
    assert loss == pytest.approx(np.log(10))


def test_svm_loss_known_value():
    x = np.array([[3.0, 1.0, 2.5]])
    # label 0: margins max(0, 1 - 3 + 1) = 0 and max(0, 2.5 - 3 + 1) = 0.5
    loss, dx = layers.svm_loss(x, np.array([0]))
    assert loss == pytest.approx(0.5)
    np.testing.assert_array_equal(dx, [[-1.0, 0.0, 1.0]])


@pytest.mark.parametrize("loss_name", ["softmax_loss", "svm_loss"])
def test_losses_reject_bad_labels(loss_name):
    loss = getattr(layers, loss_name)
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels in y must be in \[0, 4\), got 4"):
        loss(x, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels in y must be in \[0, 4\), got -1"):
        loss(x, np.array([0, -1, 1]))
    with pytest.raises(TypeError, match=r"y must have an integer dtype, got float64"):
        loss(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"y must have shape \(3,\)"):
        loss(x, np.array([0, 1]))
    with pytest.raises(TypeError, match=r"y must be a numpy.ndarray of integer labels, got list"):
        loss(x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"x must be 2-D \(N, C\)"):
        loss(np.zeros((3, 4, 1)), np.array([0, 1, 2]))


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_train_keeps_fraction_p_and_scales(dtype):
    x = np.ones((200, 500), dtype=dtype)
    out, cache = layers.dropout_forward(x, {"mode": "train", "p": 0.3, "seed": 7})
    assert out.dtype == dtype
    kept = out != 0
    assert kept.mean() == pytest.approx(0.3, abs=0.01)
    np.testing.assert_allclose(out[kept], 1 / 0.3, rtol=1e-6)
    assert out.mean() == pytest.approx(1.0, abs=0.03)  # inverted dropout keeps the expectation
    dout = np.full_like(x, 2.0)
    dx = layers.dropout_backward(dout, cache)
    np.testing.assert_array_equal(dx != 0, kept)
    np.testing.assert_allclose(dx[kept], 2 / 0.3, rtol=1e-6)


def test_dropout_seed_is_reproducible_and_test_mode_is_identity():
    x = _rng().standard_normal((4, 30))
    a, _ = layers.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 1})
    b, _ = layers.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 1})
    c, _ = layers.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 2})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    out, cache = layers.dropout_forward(x, {"mode": "test", "p": 0.5})
    np.testing.assert_array_equal(out, x)
    assert out is not x
    np.testing.assert_array_equal(layers.dropout_backward(x, cache), x)
    full, _ = layers.dropout_forward(x, {"mode": "train", "p": 1.0})
    np.testing.assert_array_equal(full, x)


@pytest.mark.parametrize(
    ("param", "error", "match"),
    [
        ({"mode": "train"}, ValueError, r"dropout_param is missing the required key 'p'"),
        ({"p": 0.5}, ValueError, r"dropout_param is missing the required key 'mode'"),
        ({"p": 0.0, "mode": "train"}, ValueError, r"dropout_param\['p'\] \(the keep probability\) must be in \(0, 1\], got 0.0"),
        ({"p": 1.5, "mode": "train"}, ValueError, r"\(the keep probability\) must be in \(0, 1\], got 1.5"),
        ({"p": "0.5", "mode": "train"}, TypeError, r"dropout_param\['p'\] must be a number, got str '0.5'"),
        ({"p": 0.5, "mode": "eval"}, ValueError, r"dropout_param\['mode'\] must be 'train' or 'test', got 'eval'"),
        ({"p": 0.5, "mode": "train", "seed": -1}, ValueError, r"dropout_param\['seed'\] must be >= 0"),
        ({"p": 0.5, "mode": "train", "keep": 1}, ValueError, r"unknown key\(s\) 'keep'"),
    ],
)  # fmt: skip
def test_dropout_bad_param(param, error, match):
    with pytest.raises(error, match=match):
        layers.dropout_forward(np.ones((2, 2)), param)


def test_dropout_backward_matches_numeric_gradient():
    """With a fixed seed the mask is a fixed function of nothing but x's shape."""
    x = _rng(9).standard_normal((5, 8))
    param = {"mode": "train", "p": 0.6, "seed": 3}
    out, cache = layers.dropout_forward(x, param)
    dout = _rng(10).standard_normal(out.shape)
    num = numeric_gradient(lambda v: layers.dropout_forward(v, param)[0], x, dout)
    assert scaled_error(layers.dropout_backward(dout, cache), num) < 1e-9


# ---------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------


def test_softmax_cache_is_independent_of_the_returned_probabilities():
    x = _rng(11).standard_normal((4, 5))
    p, cache = layers.softmax_forward(x)
    dout = _rng(12).standard_normal(p.shape)
    expected = layers.softmax_backward(dout, cache)
    p[np.arange(4), [0, 1, 2, 3]] -= 1  # the CS231n idiom, done in place
    np.testing.assert_array_equal(layers.softmax_backward(dout, cache), expected)


def test_relu_of_a_0d_array_is_an_array():
    out, cache = layers.relu_forward(np.array(-1.5))
    assert isinstance(out, np.ndarray) and out.shape == () and out == 0
    assert layers.relu_backward(np.array(2.0), cache) == 0


@pytest.mark.parametrize(
    ("backward", "cache", "match"),
    [
        (layers.affine_backward, (np.ones((2, 3)), np.ones((3, 4)), np.ones(4)), r"cache must be the AffineCache returned by affine_forward, got tuple"),
        (layers.dropout_backward, ({"p": 0.5, "mode": "test"}, None), r"cache must be the DropoutCache returned by dropout_forward, got tuple"),
    ],
)  # fmt: skip
def test_backward_rejects_a_cache_from_elsewhere(backward, cache, match):
    with pytest.raises(TypeError, match=match):
        backward(np.ones((2, 4)), cache)


def test_dropout_test_mode_backward_checks_dout():
    _, cache = layers.dropout_forward(np.ones((3, 4)), {"mode": "test", "p": 0.5})
    with pytest.raises(
        ValueError, match=r"dout must have the shape of the forward output \(3, 4\)"
    ):
        layers.dropout_backward(np.ones((7, 7)), cache)
    with pytest.raises(
        TypeError, match=r"dout has dtype float32 but the forward pass ran in float64"
    ):
        layers.dropout_backward(np.ones((3, 4), np.float32), cache)


def test_dropout_keep_probability_too_small_for_the_dtype():
    with pytest.raises(ValueError, match=r"dropout_param\['p'\] = 1e-39 is too small for float32"):
        layers.dropout_forward(np.ones((2, 2), np.float32), {"mode": "train", "p": 1e-39})
    out, _ = layers.dropout_forward(np.ones((2, 2)), {"mode": "train", "p": 1e-39, "seed": 0})
    assert np.isfinite(out).all()  # float64 holds 1/p


def test_huge_numbers_are_abbreviated_in_messages():
    with pytest.raises(
        ValueError, match=r"must be in \(0, 1\], got 100000000000\.\.\.\(401 characters\)"
    ):
        layers.dropout_forward(np.ones(2), {"mode": "train", "p": 10**400})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_gives_exact_zero_where_x_is_not_positive(dtype):
    """Whatever dout holds there (NaN, inf, -0.0): the gradient is +0.0; elsewhere dout as is."""
    x = np.array([[-1.0, 0.0, -0.0, 2.0, np.nan, 3.0, -np.inf, np.inf]], dtype=dtype)
    dout = np.array([[np.nan, np.inf, -0.0, np.nan, 5.0, -np.inf, 1.0, -7.5]], dtype=dtype)
    _, cache = layers.relu_forward(x)
    dx = layers.relu_backward(dout, cache)
    want = np.array([[0.0, 0.0, 0.0, np.nan, 0.0, -np.inf, 0.0, -7.5]], dtype=dtype)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_array_equal(dx, want)
    assert not np.signbit(dx[0, :3]).any()  # +0.0, not -0.0
    dout_f = np.asfortranarray(np.broadcast_to(dout, (3, 8)))  # a non-contiguous dout
    np.testing.assert_array_equal(
        layers.relu_backward(dout_f, layers.relu_forward(np.broadcast_to(x, (3, 8)))[1]),
        np.broadcast_to(want, (3, 8)),
    )
