"""Update rules against hand-computed steps, defaults, dtypes, immutability and bad configs.

The expected values below are worked out by hand (the arithmetic is in the comments; square
roots and divisions checked to 20+ digits with decimal arithmetic), not by re-running the
formula under test.
"""

import math

import numpy as np
import pytest

from cnnserve import optim
from cnnserve.optim import UPDATE_RULES, adam, get_update_rule, rmsprop, sgd, sgd_momentum

EXACT = {"rtol": 1e-13, "atol": 0}


def run(rule, w, grads, config):
    """Apply ``rule`` once per gradient; return the list of (w, config) after each step."""
    out = []
    for g in grads:
        w, config = rule(w, np.array(g, dtype=w.dtype), config)
        out.append((w, config))
    return out


# ---------------------------------------------------------------------------------------------
# Hand-computed steps (float64)
# ---------------------------------------------------------------------------------------------


def test_sgd_hand_computed():
    w = np.array([1.0, -2.0])
    steps = run(sgd, w, [[0.5, 0.1], [-0.5, 0.2], [0.0, -1.0]], {"learning_rate": 0.1})
    # w - 0.1 * dw, three times
    np.testing.assert_allclose(steps[0][0], [0.95, -2.01], **EXACT)
    np.testing.assert_allclose(steps[1][0], [1.0, -2.03], **EXACT)
    np.testing.assert_allclose(steps[2][0], [1.0, -1.93], **EXACT)
    assert steps[2][1] == {"learning_rate": 0.1}


def test_sgd_momentum_hand_computed():
    w = np.array([1.0, -2.0])
    config = {"learning_rate": 0.1, "momentum": 0.9}
    steps = run(sgd_momentum, w, [[0.5, 0.1], [-0.5, 0.2], [0.0, 0.0]], config)
    # v1 = -0.1 * [0.5, 0.1] = [-0.05, -0.01];  w1 = [0.95, -2.01]
    np.testing.assert_allclose(steps[0][1]["velocity"], [-0.05, -0.01], **EXACT)
    np.testing.assert_allclose(steps[0][0], [0.95, -2.01], **EXACT)
    # v2 = 0.9 * [-0.05, -0.01] - 0.1 * [-0.5, 0.2] = [-0.045 + 0.05, -0.009 - 0.02]
    #    = [0.005, -0.029];  w2 = [0.955, -2.039]
    np.testing.assert_allclose(steps[1][1]["velocity"], [0.005, -0.029], **EXACT)
    np.testing.assert_allclose(steps[1][0], [0.955, -2.039], **EXACT)
    # v3 = 0.9 * v2 = [0.0045, -0.0261];  w3 = [0.9595, -2.0651]
    np.testing.assert_allclose(steps[2][1]["velocity"], [0.0045, -0.0261], **EXACT)
    np.testing.assert_allclose(steps[2][0], [0.9595, -2.0651], **EXACT)


def test_rmsprop_hand_computed():
    w = np.array([1.0, -2.0])
    # defaults: learning_rate 1e-2, decay_rate 0.99, epsilon 1e-8
    steps = run(rmsprop, w, [[0.5, 0.1], [-0.5, 0.3], [0.25, 0.0]], None)
    # cache1 = 0.01 * [0.25, 0.01] = [0.0025, 0.0001];  sqrt = [0.05, 0.01]
    # step = 0.01 * [0.5 / (0.05 + 1e-8), 0.1 / (0.01 + 1e-8)]
    #      = [0.1 / (1 + 2e-7), 0.1 / (1 + 1e-6)] = [0.1 - 2e-8, 0.1 - 1e-7] (+ O(1e-14))
    np.testing.assert_allclose(steps[0][1]["cache"], [0.0025, 0.0001], **EXACT)
    np.testing.assert_allclose(steps[0][0], [0.90000002, -2.0999999], **EXACT)
    # cache2 = 0.99 * [0.0025, 0.0001] + 0.01 * [0.25, 0.09] = [0.004975, 0.000999]
    # sqrt = [0.0705336798983294..., 0.0316069612585582...]
    # w2 = [0.90000002 + 0.005 / 0.07053368..., -2.0999999 - 0.003 / 0.03160696...]
    np.testing.assert_allclose(steps[1][1]["cache"], [0.004975, 0.000999], **EXACT)
    np.testing.assert_allclose(steps[1][0], [0.97088813045057976, -2.1949156695453294], rtol=1e-14)
    # cache3 = 0.99 * cache2 + 0.01 * [0.0625, 0] = [0.00555025, 0.00098901]
    # sqrt(0.00555025) = 0.0745 exactly, so the step is 0.0025 / 0.07450001 = 0.0335570425...
    # and the zero gradient leaves w[1] where it was
    np.testing.assert_allclose(steps[2][1]["cache"], [0.00555025, 0.00098901], **EXACT)
    np.testing.assert_allclose(steps[2][0], [0.93733108797501499, -2.1949156695453294], rtol=1e-14)


def test_adam_hand_computed():
    w = np.array([1.0, -2.0])
    steps = run(adam, w, [[0.5, 0.1], [-0.5, -0.1], [0.25, 0.3]], {"learning_rate": 0.1})
    # t = 1:  m = 0.1 * dw = [0.05, 0.01];  v = 0.001 * dw**2 = [0.00025, 0.00001]
    #   m_hat = m / 0.1 = [0.5, 0.1];  v_hat = v / 0.001 = [0.25, 0.01];  sqrt = [0.5, 0.1]
    #   step = 0.1 * [0.5 / 0.50000001, 0.1 / 0.10000001] = [0.1 - 2e-9, 0.1 - 1e-8]
    w1, c1 = steps[0]
    assert c1["t"] == 1
    np.testing.assert_allclose(c1["m"], [0.05, 0.01], **EXACT)
    np.testing.assert_allclose(c1["v"], [0.00025, 0.00001], **EXACT)
    np.testing.assert_allclose(w1, [0.900000002, -2.09999999], **EXACT)
    # t = 2:  m = 0.9 * [0.05, 0.01] + 0.1 * [-0.5, -0.1] = [-0.005, -0.001]
    #   v = 0.999 * [0.00025, 0.00001] + 0.001 * [0.25, 0.01] = [0.00049975, 0.00001999]
    #   1 - 0.9**2 = 0.19, 1 - 0.999**2 = 0.001999
    #   m_hat = [-1/38, -1/190];  v_hat = [0.25, 0.01] (0.00049975 / 0.001999 = 0.25)
    #   step = 0.1 * [-(1/38) / 0.50000001, -(1/190) / 0.10000001]
    #        = [-(1/190)(1 - 2e-8), -(1/190)(1 - 1e-7)]
    w2, c2 = steps[1]
    assert c2["t"] == 2
    np.testing.assert_allclose(c2["m"], [-0.005, -0.001], **EXACT)
    np.testing.assert_allclose(c2["v"], [0.00049975, 0.00001999], **EXACT)
    np.testing.assert_allclose(
        w2, [0.900000002 + (1 - 2e-8) / 190, -2.09999999 + (1 - 1e-7) / 190], **EXACT
    )
    # t = 3:  m = 0.9 * [-0.005, -0.001] + 0.1 * [0.25, 0.3] = [0.0205, 0.0291]
    #   v = 0.999 * [0.00049975, 0.00001999] + 0.001 * [0.0625, 0.09]
    #     = [0.00056175025, 0.00010997001]
    #   1 - 0.9**3 = 0.271, 1 - 0.999**3 = 0.002997001
    w3, c3 = steps[2]
    assert c3["t"] == 3
    np.testing.assert_allclose(c3["m"], [0.0205, 0.0291], **EXACT)
    np.testing.assert_allclose(c3["v"], [0.00056175025, 0.00010997001], **EXACT)
    np.testing.assert_allclose(w3, [0.88779060677388008, -2.1507938500783320], rtol=1e-14)


def test_adam_increments_t_before_use():
    # With a given t = 9 the bias correction uses t = 10: 1 - 0.9**10 = 0.6513215599.
    # m = 0.1 * 1 = 0.1, m_hat = 0.1 / 0.6513215599 = 0.15353399327...
    # v = 0.001 * 1 = 0.001, v_hat = 0.001 / (1 - 0.999**10) = 0.001 / 0.009955119790...
    # v_hat = 0.10045083..., sqrt(v_hat) = 0.31693978...
    # step = 1e-3 * 0.15353399 / (0.31693978 + 1e-8) = 4.8442637e-4
    # (bias-correcting with t = 9 instead would give 4.8875e-4)
    w = np.zeros(1)
    next_w, config = adam(w, np.ones(1), {"t": 9})
    assert config["t"] == 10
    np.testing.assert_allclose(next_w, [-4.8442637e-4], rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# Defaults, dtypes, immutability
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule, defaults",
    [
        (sgd, {"learning_rate": 1e-2}),
        (sgd_momentum, {"learning_rate": 1e-2, "momentum": 0.9}),
        (rmsprop, {"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8}),
        (adam, {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
    ],
)
def test_defaults(rule, defaults):
    w = np.ones((2, 3))
    _, config = rule(w, np.ones((2, 3)), None)
    for key, value in defaults.items():
        assert config[key] == value
    _, config2 = rule(w, np.ones((2, 3)), {})
    assert config2.keys() == config.keys()


def test_default_steps_are_the_documented_ones():
    w, dw = np.array([1.0]), np.array([2.0])
    assert sgd(w, dw)[0][0] == pytest.approx(1 - 0.02)  # lr 1e-2
    assert sgd_momentum(w, dw)[0][0] == pytest.approx(1 - 0.02)  # zero velocity
    # rmsprop: cache = 0.01 * 4 = 0.04, sqrt = 0.2, step = 0.01 * 2 / 0.2 = 0.1
    assert rmsprop(w, dw)[0][0] == pytest.approx(0.9, rel=1e-6)
    # adam first step is learning_rate * sign(dw) = 1e-3
    assert adam(w, dw)[0][0] == pytest.approx(1 - 1e-3, rel=1e-9)


def test_state_starts_at_zero_in_w_dtype():
    for dtype in (np.float32, np.float64):
        w = np.ones(3, dtype=dtype)
        zero = np.zeros(3, dtype=dtype)
        _, c = sgd_momentum(w, zero)
        assert c["velocity"].dtype == dtype and not c["velocity"].any()
        _, c = rmsprop(w, zero)
        assert c["cache"].dtype == dtype and not c["cache"].any()
        _, c = adam(w, zero)
        assert c["m"].dtype == dtype and c["v"].dtype == dtype and c["t"] == 1


@pytest.mark.parametrize("name", sorted(UPDATE_RULES))
def test_float32_stays_float32_and_matches_float64(name):
    rule = UPDATE_RULES[name]
    rng = np.random.default_rng(0)
    w64 = rng.standard_normal((4, 5))
    w32 = w64.astype(np.float32)
    c32 = c64 = None
    for _ in range(3):
        dw64 = rng.standard_normal((4, 5))
        w32, c32 = rule(w32, dw64.astype(np.float32), c32)
        w64, c64 = rule(w64, dw64, c64)
        assert w32.dtype == np.float32
        for value in c32.values():
            if isinstance(value, np.ndarray):
                assert value.dtype == np.float32
    np.testing.assert_allclose(w32, w64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(UPDATE_RULES))
def test_inputs_and_config_are_not_modified(name):
    rule = UPDATE_RULES[name]
    w = np.arange(6.0).reshape(2, 3)
    dw = np.full((2, 3), 0.5)
    _, config = rule(w, dw, None)
    state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in config.items()}
    w_before, dw_before = w.copy(), dw.copy()
    next_w, next_config = rule(w, dw, config)
    np.testing.assert_array_equal(w, w_before)
    np.testing.assert_array_equal(dw, dw_before)
    assert next_w is not w
    assert next_config is not config
    for key, value in state.items():
        np.testing.assert_array_equal(config[key], value)
        if isinstance(value, np.ndarray):
            assert next_config[key] is not config[key]


def test_non_contiguous_inputs():
    w = np.arange(12.0).reshape(3, 4).T
    dw = np.ones((4, 3))
    next_w, _ = adam(w, dw, None)
    np.testing.assert_allclose(next_w, w - 1e-3, rtol=0, atol=1e-10)


def test_numpy_scalar_hyper_parameters_keep_float32():
    w = np.ones(2, dtype=np.float32)
    next_w, config = sgd_momentum(
        w, w, {"learning_rate": np.float64(0.1), "momentum": np.float32(0.5)}
    )
    assert next_w.dtype == np.float32 and config["velocity"].dtype == np.float32
    assert type(config["learning_rate"]) is float


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry():
    assert UPDATE_RULES == {
        "sgd": sgd,
        "sgd_momentum": sgd_momentum,
        "rmsprop": rmsprop,
        "adam": adam,
    }
    for name, rule in UPDATE_RULES.items():
        assert get_update_rule(name) is rule

    def custom(w, dw, config=None):
        return w, config

    assert get_update_rule(custom) is custom


def test_registry_errors():
    with pytest.raises(ValueError) as info:
        get_update_rule("adamw")
    message = str(info.value)
    assert "'adamw'" in message
    for name in UPDATE_RULES:
        assert repr(name) in message
    with pytest.raises(TypeError, match="update_rule must be the name of an update rule"):
        get_update_rule(3)


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

W = np.ones((2, 2))


@pytest.mark.parametrize(
    "rule, w, dw, config, error, message",
    [
        (sgd, [1.0], W, None, TypeError, "w must be a plain numpy.ndarray, got list"),
        (
            sgd,
            W,
            np.ones((2, 2), dtype=np.float32),
            None,
            TypeError,
            "dw has dtype float32 but w has dtype float64",
        ),
        (
            sgd,
            W.astype(np.int64),
            W.astype(np.int64),
            None,
            TypeError,
            "w must have dtype float32 or float64, got int64",
        ),
        (sgd, W, np.ones(4), None, ValueError, r"dw must have the shape of w \(2, 2\), got \(4,\)"),
        (sgd, W, W, [0.1], TypeError, "config must be a dict or None, got list"),
        (
            sgd,
            W,
            W,
            {"lr": 0.1},
            ValueError,
            r"config has unknown key\(s\) 'lr' for the 'sgd' update rule; expected keys: 'learning_rate'",
        ),
        (sgd, W, W, {"momentum": 0.9}, ValueError, r"unknown key\(s\) 'momentum' for the 'sgd'"),
        (
            sgd,
            W,
            W,
            {"learning_rate": -0.1},
            ValueError,
            r"config\['learning_rate'\] must be in \[0.0, inf\), got -0.1",
        ),
        (
            sgd,
            W,
            W,
            {"learning_rate": math.nan},
            ValueError,
            r"config\['learning_rate'\] must be in \[0.0, inf\), got nan",
        ),
        (
            sgd,
            W,
            W,
            {"learning_rate": math.inf},
            ValueError,
            r"config\['learning_rate'\] must be in \[0.0, inf\), got inf",
        ),
        (
            sgd,
            W,
            W,
            {"learning_rate": "0.1"},
            TypeError,
            r"config\['learning_rate'\] must be a number, got str '0.1'",
        ),
        (
            sgd,
            W,
            W,
            {"learning_rate": True},
            TypeError,
            r"config\['learning_rate'\] must be a number, got bool",
        ),
        (
            sgd_momentum,
            W,
            W,
            {"momentum": 1.0},
            ValueError,
            r"config\['momentum'\] must be in \[0.0, 1.0\), got 1.0",
        ),
        (
            sgd_momentum,
            W,
            W,
            {"velocity": np.zeros(3)},
            ValueError,
            r"config\['velocity'\] must have the shape of w \(2, 2\), got \(3,\)",
        ),
        (
            sgd_momentum,
            W,
            W,
            {"velocity": np.zeros((2, 2), np.float32)},
            TypeError,
            r"config\['velocity'\] has dtype float32 but w has dtype float64",
        ),
        (
            sgd_momentum,
            W,
            W,
            {"velocity": [[0, 0], [0, 0]]},
            TypeError,
            r"config\['velocity'\] must be a numpy.ndarray, got list",
        ),
        (
            rmsprop,
            W,
            W,
            {"decay_rate": -0.5},
            ValueError,
            r"config\['decay_rate'\] must be in \[0.0, 1.0\), got -0.5",
        ),
        (
            rmsprop,
            W,
            W,
            {"epsilon": 0.0},
            ValueError,
            r"config\['epsilon'\] must be in \(0.0, inf\), got 0.0",
        ),
        (
            rmsprop,
            W,
            W,
            {"cache": np.zeros((2, 1))},
            ValueError,
            r"config\['cache'\] must have the shape of w",
        ),
        (
            adam,
            W,
            W,
            {"beta1": 1.5},
            ValueError,
            r"config\['beta1'\] must be in \[0.0, 1.0\), got 1.5",
        ),
        (
            adam,
            W,
            W,
            {"beta2": math.nan},
            ValueError,
            r"config\['beta2'\] must be in \[0.0, 1.0\), got nan",
        ),
        (adam, W, W, {"t": -1}, ValueError, r"config\['t'\] must be >= 0, got -1"),
        (adam, W, W, {"t": 1.0}, TypeError, r"config\['t'\] must be an int, got float 1.0"),
        (
            adam,
            W,
            W,
            {"m": np.zeros((2, 2)), "v": np.zeros(2)},
            ValueError,
            r"config\['v'\] must have the shape of w",
        ),
        (
            adam,
            W,
            W,
            {"velocity": np.zeros((2, 2))},
            ValueError,
            r"unknown key\(s\) 'velocity' for the 'adam' update rule; expected keys: 'learning_rate', 'beta1', 'beta2', 'epsilon', 'm', 'v', 't'",
        ),
    ],
)
def test_bad_arguments(rule, w, dw, config, error, message):
    with pytest.raises(error, match=message):
        rule(w, dw, config)


def test_module_exports():
    assert set(optim.__all__) >= {"sgd", "sgd_momentum", "rmsprop", "adam", "UPDATE_RULES"}


def _adam_in_numpy(w, dw, m, v, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
    """Adam as whole-array numpy operations in w's dtype: what the fused kernel must equal."""
    t = w.dtype.type
    m = t(beta1) * m + t(1.0 - beta1) * dw
    v = t(beta2) * v + t(1.0 - beta2) * (dw * dw)
    m_hat = m / t(1.0 - beta1**step)
    root = np.sqrt(v / t(1.0 - beta2**step))
    return w - t(lr) * m_hat / (root + t(eps)), m, v


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (64, 129), (7, 3, 5, 5)])
def test_fused_adam_kernel_equals_numpy_bit_for_bit(dtype, shape):
    # (64, 129) is large enough for the kernel's OpenMP path; the others run serially.
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape).astype(dtype)
    dw = rng.standard_normal(shape).astype(dtype)
    m = rng.standard_normal(shape).astype(dtype) * dtype(0.1)
    v = rng.random(shape).astype(dtype)
    config = {"m": m, "v": v, "t": 6, "learning_rate": 3e-3, "beta1": 0.8}
    next_w, out = adam(w, dw, config)
    expected = _adam_in_numpy(w, dw, m, v, 7, lr=3e-3, beta1=0.8)
    for got, want in zip((next_w, out["m"], out["v"]), expected, strict=True):
        assert got.dtype == dtype and got.shape == shape
        np.testing.assert_array_equal(got, want)


def test_fused_adam_kernel_takes_non_contiguous_arrays():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 6)).astype(np.float32)[:, ::2]  # a strided view
    dw = np.asfortranarray(rng.standard_normal((8, 3)).astype(np.float32))
    next_w, config = adam(w, dw)
    expected = _adam_in_numpy(w, dw, np.zeros_like(w), np.zeros_like(w), 1)
    np.testing.assert_array_equal(next_w, expected[0])
    np.testing.assert_array_equal(config["m"], expected[1])
