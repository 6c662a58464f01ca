"""The Solver: training, epochs, divergence, checkpoints, resume, history, and bad options.

Everything runs on tiny models and data sets so that the whole file takes a few seconds.
"""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from cnnserve import solver as solver_module
from cnnserve.history import plot_history, read_history
from cnnserve.layers import affine_backward, affine_forward, softmax_loss
from cnnserve.model import ConvNet, ModelFileError, load_model, read_model_file, save_model
from cnnserve.optim import sgd
from cnnserve.solver import Solver, TrainingDiverged

QUIET = {"verbose": False, "progress": False}


class Softmax:
    """A duck-typed linear softmax classifier; records the first feature of every batch."""

    def __init__(self, D, C, dtype=np.float64, seed=0):
        rng = np.random.default_rng(seed)
        self.params = {
            "W": (0.01 * rng.standard_normal((D, C))).astype(dtype),
            "b": np.zeros(C, dtype=dtype),
        }
        self.dtype = np.dtype(dtype)
        self.num_classes = C
        self.seen = []

    def loss(self, X, y=None):
        scores, cache = affine_forward(X, self.params["W"], self.params["b"])
        if y is None:
            return scores
        self.seen.append(X[:, 0].copy())
        loss, dscores = softmax_loss(scores, y)
        _, dW, db = affine_backward(dscores, cache)
        return loss, {"W": dW, "b": db}


class ConstantGrad:
    """Loss 1.0 and gradient 1 for every parameter: with sgd, w falls by lr per iteration."""

    def __init__(self, losses=None):
        self.params = {"w": np.zeros(3), "v": np.zeros((2, 2))}
        self.num_classes = 2
        self.losses = list(losses or [])
        self.calls = 0
        self.trace = []  # w[0] at every training call

    def loss(self, X, y=None):
        if y is None:
            return np.zeros((X.shape[0], 2))
        self.calls += 1
        self.trace.append(float(self.params["w"][0]))
        loss = self.losses.pop(0) if self.losses else 1.0
        return loss, {k: np.ones_like(v) for k, v in self.params.items()}


def blobs(n, D=4, C=3, dtype=np.float64, seed=0):
    """``n`` samples of ``C`` separable Gaussian blobs in ``D`` dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(C, size=n)
    centres = 3.0 * rng.standard_normal((C, D))
    X = centres[y] + 0.3 * rng.standard_normal((n, D))
    return X.astype(dtype), y


def split(X, y, n_val):
    return {"X_train": X[n_val:], "y_train": y[n_val:], "X_val": X[:n_val], "y_val": y[:n_val]}


def index_data(n, n_val=4):
    """Training rows whose first feature is their index (to see which rows a batch holds)."""
    X = np.zeros((n, 2))
    X[:, 0] = np.arange(n)
    y = np.arange(n) % 2
    return {"X_train": X, "y_train": y, "X_val": X[:n_val], "y_val": y[:n_val]}


# A tiny convnet with every kind of state a checkpoint must carry: batchnorm running
# statistics and dropout (the model's generator).
TINY = [
    {"type": "conv", "filters": 3, "size": 3, "pad": 1},
    {"type": "spatial_batchnorm"},
    {"type": "relu"},
    {"type": "max_pool", "size": 2},
    {"type": "affine", "units": 10},
    {"type": "dropout", "keep": 0.8},
    {"type": "relu"},
]


def tiny_net(seed=1, dtype=np.float32):
    return ConvNet(TINY, (1, 4, 4), 3, seed=seed, dtype=dtype)


def image_data(n=37, n_val=12, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(3, size=n + n_val)
    X = rng.standard_normal((n + n_val, 1, 4, 4)) + y[:, None, None, None]
    return split(X.astype(dtype), y, n_val)


RESUME_OPTIONS = {
    "update_rule": "adam",
    "optim_config": {"learning_rate": 5e-3},
    "lr_decay": 0.9,
    "batch_size": 8,  # 37 samples: 5 iterations, the last with 5 samples
    "num_train_samples": 20,  # a random subset every epoch
    "seed": 3,
    **QUIET,
}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def test_small_convnet_overfits_50_samples():
    data = image_data(n=50, n_val=10)
    model = ConvNet(
        [{"type": "conv", "filters": 4, "size": 3, "pad": 1}, {"type": "relu"}],
        (1, 4, 4),
        3,
        seed=0,
    )
    rng = np.random.default_rng(5)
    data["y_train"] = rng.integers(3, size=50)  # random labels: only memorising fits them
    solver = Solver(
        model,
        data,
        update_rule="adam",
        optim_config={"learning_rate": 2e-2},
        batch_size=25,
        num_epochs=60,
        num_train_samples=None,
        **QUIET,
    )
    solver.train()
    assert solver.train_acc_history[-1] == 1.0
    assert solver.loss_history[-1] < 0.1 * solver.loss_history[0]


@pytest.mark.parametrize("rule", ["sgd", "sgd_momentum", "rmsprop", "adam"])
def test_every_rule_learns_blobs_in_float32_and_float64(rule):
    for dtype in (np.float32, np.float64):
        X, y = blobs(120, dtype=dtype)
        model = Softmax(4, 3, dtype=dtype)
        lr = {"sgd": 0.5, "sgd_momentum": 0.1, "rmsprop": 1e-2, "adam": 1e-2}[rule]
        solver = Solver(
            model,
            split(X, y, 20),
            update_rule=rule,
            optim_config={"learning_rate": lr},
            batch_size=10,
            num_epochs=5,
            **QUIET,
        )
        solver.train()
        assert solver.val_acc_history[-1] >= 0.9
        assert solver.loss_history[-1] < solver.loss_history[0]
        assert all(p.dtype == dtype for p in model.params.values())


def test_epoch_is_a_permutation_without_replacement():
    data = index_data(23)
    model = Softmax(2, 2)
    solver = Solver(model, data, batch_size=5, num_epochs=3, seed=7, **QUIET)
    assert solver.iterations_per_epoch == 5  # ceil(23 / 5)
    solver.train()
    batches = model.seen
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3] * 3  # the last batch is smaller
    assert len(solver.loss_history) == 15 == solver.iteration
    orders = []
    for e in range(3):
        seen = np.concatenate(batches[5 * e : 5 * e + 5]).astype(int)
        assert sorted(seen) == list(range(23))  # every sample exactly once per epoch
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])  # a fresh order every epoch
    assert not np.array_equal(orders[0], np.arange(23))

    # The order comes from the solver's own generator: the same seed gives the same order,
    # and the global numpy generator is neither used nor disturbed.
    np.random.seed(0)  # noqa: NPY002 - the legacy global generator must stay untouched
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    again = Softmax(2, 2)
    Solver(again, data, batch_size=5, num_epochs=3, seed=7, **QUIET).train()
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    for a, b in zip(batches, again.seen, strict=True):
        np.testing.assert_array_equal(a, b)
    other = Softmax(2, 2)
    Solver(other, data, batch_size=5, num_epochs=1, seed=8, **QUIET).train()
    assert not np.array_equal(np.concatenate(other.seen), orders[0])


def test_batch_larger_than_the_data_set():
    model = Softmax(2, 2)
    solver = Solver(model, index_data(6), batch_size=100, num_epochs=2, **QUIET)
    solver.train()
    assert solver.iterations_per_epoch == 1
    assert [len(b) for b in model.seen] == [6, 6]


def test_lr_decay_after_every_epoch():
    model = ConstantGrad()
    data = index_data(10)
    solver = Solver(
        model,
        data,
        optim_config={"learning_rate": 0.1},
        lr_decay=0.5,
        batch_size=5,
        num_epochs=3,
        **QUIET,
    )
    solver.train()
    for config in solver.optim_configs.values():
        assert config["learning_rate"] == pytest.approx(0.1 * 0.5**3, rel=1e-15)
    # Two iterations per epoch at learning rates 0.1, 0.05, 0.025: w = -2 * (0.1 + 0.05 +
    # 0.025) = -0.35 at the end. The validation accuracy is constant, so the best parameters
    # (restored into the model) are the first epoch's: w = -0.2.
    assert solver.best_epoch == 1
    np.testing.assert_allclose(solver.best_params["w"], -0.2)
    # w before each of the six iterations: steps of 0.1, 0.1, 0.05, 0.05, 0.025, (0.025)
    np.testing.assert_allclose(model.trace, [0, -0.1, -0.2, -0.25, -0.3, -0.325], rtol=1e-15)
    assert solver.optim_config == {"learning_rate": 0.1}  # the solver's own copy, undecayed


def test_optim_config_is_deep_copied_per_parameter():
    config = {"learning_rate": 0.1, "momentum": 0.5}
    model = ConstantGrad()
    solver = Solver(
        model,
        index_data(10),
        update_rule="sgd_momentum",
        optim_config=config,
        batch_size=5,
        num_epochs=1,
        **QUIET,
    )
    solver.train()
    assert config == {"learning_rate": 0.1, "momentum": 0.5}  # the caller's dict untouched
    assert solver.optim_configs["w"] is not solver.optim_configs["v"]
    assert solver.optim_configs["w"]["velocity"].shape == (3,)
    assert solver.optim_configs["v"]["velocity"].shape == (2, 2)


def _scripted_validation(monkeypatch, results):
    """Make the validation pass after each epoch return the given (accuracy, loss) pairs."""
    results = iter(results)
    real = Solver._evaluate

    def scripted(self, X, y, batch_size):
        if X is self.X_val:
            return next(results)
        return real(self, X, y, batch_size)

    monkeypatch.setattr(Solver, "_evaluate", scripted)


def test_best_validation_parameters_are_restored(monkeypatch):
    _scripted_validation(monkeypatch, [(0.5, 1.0), (0.8, 1.0), (0.6, 1.0), (0.7, 1.0)])
    model = ConstantGrad()
    solver = Solver(
        model,
        index_data(10),
        optim_config={"learning_rate": 0.1},
        batch_size=5,
        num_epochs=4,
        **QUIET,
    )
    solver.train()
    assert solver.val_acc_history == [0.5, 0.8, 0.6, 0.7]
    assert solver.val_loss_history == [1.0, 1.0, 1.0, 1.0]
    assert solver.best_val_acc == 0.8 and solver.best_epoch == 2
    # After epoch 2 (4 iterations of lr 0.1) w = -0.4; training went on to -0.8.
    np.testing.assert_allclose(model.params["w"], -0.4)
    np.testing.assert_allclose(model.params["v"], -0.4)
    assert model.params["w"] is not solver.best_params["w"]  # a copy


def test_ties_in_validation_accuracy_go_to_the_lower_validation_loss(monkeypatch):
    _scripted_validation(monkeypatch, [(0.9, 0.5), (1.0, 0.4), (1.0, 0.2), (1.0, 0.3)])
    model = ConstantGrad()
    solver = Solver(
        model,
        index_data(10),
        optim_config={"learning_rate": 0.1},
        batch_size=5,
        num_epochs=4,
        **QUIET,
    )
    solver.train()
    assert solver.best_epoch == 3 and solver.best_val_loss == 0.2
    np.testing.assert_allclose(model.params["w"], -0.6)


def test_validation_loss_is_the_mean_cross_entropy():
    X, y = blobs(30)
    model = Softmax(4, 3)
    solver = Solver(model, split(X, y, 10), num_epochs=1, **QUIET)
    scores = model.loss(X).astype(np.float64)
    probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    accuracy, loss = solver._evaluate(X, y, 7)
    assert loss == pytest.approx(-np.mean(np.log(probs[np.arange(30), y])), rel=1e-6)
    assert accuracy == np.mean(np.argmax(scores, axis=1) == y)


def test_check_accuracy():
    X, y = blobs(30)
    model = Softmax(4, 3)
    solver = Solver(model, split(X, y, 10), **QUIET)
    predicted = np.argmax(model.loss(X), axis=1)
    full = float(np.mean(predicted == y))
    assert solver.check_accuracy(X, y) == full
    assert solver.check_accuracy(X, y, batch_size=7) == full
    assert solver.check_accuracy(X, y, num_samples=100) == full
    sub = solver.check_accuracy(X, y, num_samples=10)
    assert sub * 10 == int(sub * 10)
    assert solver.check_accuracy(X, y, num_samples=10) == sub  # reproducible
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        solver.check_accuracy(X, y, num_samples=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        solver.check_accuracy(X, y, batch_size=0)
    with pytest.raises(ValueError, match=r"y must have shape \(30,\)"):
        solver.check_accuracy(X, y[:5])


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------


def test_nan_loss_stops_training_with_a_clear_error():
    model = ConstantGrad(losses=[2.0, 1.5, 1.25, 1.0, 0.75, 0.5, float("nan")])
    solver = Solver(
        model,
        index_data(10),
        optim_config={"learning_rate": 0.1},
        batch_size=5,
        num_epochs=5,
        **QUIET,
    )
    with pytest.raises(TrainingDiverged) as info:
        solver.train()
    error = info.value
    assert isinstance(error, RuntimeError)
    message = str(error)
    assert "epoch 4/5, iteration 1/2 (iteration 7 overall)" in message
    assert "the loss is nan" in message
    assert "the last finite loss was 0.5 (iteration 6)" in message
    assert "lower learning rate" in message
    assert (error.epoch, error.iteration, error.total_iteration) == (4, 1, 7)
    assert error.last_finite_loss == 0.5 and math.isnan(error.loss)
    # The parameters are those before the failing iteration: six updates of 0.1.
    np.testing.assert_allclose(model.params["w"], -0.6)
    assert solver.loss_history == [2.0, 1.5, 1.25, 1.0, 0.75, 0.5]
    assert solver.iteration == 6 and solver.epoch == 3


def test_inf_loss_on_the_first_iteration():
    model = ConstantGrad(losses=[float("inf")])
    solver = Solver(model, index_data(10), batch_size=5, num_epochs=1, **QUIET)
    with pytest.raises(TrainingDiverged, match="the loss is inf; no earlier iteration") as info:
        solver.train()
    assert info.value.last_finite_loss is None
    np.testing.assert_array_equal(model.params["w"], 0.0)


def test_non_finite_update_is_not_applied():
    def explode(w, dw, config=None):
        return w + np.inf, config

    model = ConstantGrad()
    solver = Solver(model, index_data(10), update_rule=explode, batch_size=5, **QUIET)
    with pytest.raises(TrainingDiverged, match="the update of parameter 'w' has NaN or inf"):
        solver.train()
    for value in model.params.values():
        np.testing.assert_array_equal(value, 0.0)  # all or nothing: 'v' not updated either


def test_divergence_leaves_batchnorm_statistics_and_dropout_generator_as_they_were():
    model = tiny_net()
    data = image_data()
    solver = Solver(model, data, batch_size=8, num_epochs=1, **QUIET)
    model.loss(data["X_train"][:8], data["y_train"][:8])  # running statistics move off 0 / 1
    running = [(bn["running_mean"].copy(), bn["running_var"].copy()) for bn in model.bn_params]
    rng_state = model.rng.bit_generator.state
    good_w1 = model.params["W1"]
    model.params["W1"] = good_w1 * np.float32(np.nan)  # the next loss is NaN
    with pytest.raises(TrainingDiverged):
        solver.train()
    for bn, (mean, var) in zip(model.bn_params, running, strict=True):
        np.testing.assert_array_equal(bn["running_mean"], mean)
        np.testing.assert_array_equal(bn["running_var"], var)
    assert model.rng.bit_generator.state == rng_state
    model.params["W1"] = good_w1
    assert np.all(np.isfinite(model.loss(data["X_val"])))  # the model is still usable


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------


def assert_same_run(a, b):
    """Two solvers (and their models) ended in exactly the same state."""
    assert a.model.params.keys() == b.model.params.keys()
    for name in a.model.params:
        assert np.array_equal(a.model.params[name], b.model.params[name]), name
        assert np.array_equal(a.best_params[name], b.best_params[name]), name
        for key, value in a.optim_configs[name].items():
            other = b.optim_configs[name][key]
            if isinstance(value, np.ndarray):
                assert np.array_equal(value, other), (name, key)
            else:
                assert value == other, (name, key)
    for bn_a, bn_b in zip(a.model.bn_params, b.model.bn_params, strict=True):
        assert np.array_equal(bn_a["running_mean"], bn_b["running_mean"])
        assert np.array_equal(bn_a["running_var"], bn_b["running_var"])
    assert a.loss_history == b.loss_history
    assert a.train_acc_history == b.train_acc_history
    assert a.val_acc_history == b.val_acc_history
    assert (a.best_val_acc, a.best_epoch) == (b.best_val_acc, b.best_epoch)
    assert (a.epoch, a.iteration) == (b.epoch, b.iteration)
    assert a.rng.bit_generator.state == b.rng.bit_generator.state
    assert a.model.rng.bit_generator.state == b.model.rng.bit_generator.state


def test_checkpoint_files(tmp_path):
    data = image_data()
    name = tmp_path / "run"
    solver = Solver(tiny_net(), data, num_epochs=2, checkpoint_name=name, **RESUME_OPTIONS)
    solver.train()
    assert sorted(os.listdir(tmp_path)) == [
        "run.safetensors",
        "run_history.json",
        "run_history.png",
    ]
    checkpoint = read_model_file(tmp_path / "run.safetensors")
    assert checkpoint.state["epoch"] == 2 and checkpoint.state["iteration"] == 10
    assert checkpoint.training["epochs"] == 2
    assert checkpoint.training["val_acc"] == solver.val_acc_history[-1]
    assert checkpoint.training["best_val_acc"] == solver.best_val_acc
    assert "optim/W1/m" in checkpoint.state_tensors and "best/W1" in checkpoint.state_tensors
    assert checkpoint.state["optim_configs"]["W1"]["t"] == 10
    json.dumps(checkpoint.state)  # plain JSON, rng states included
    # The checkpoint is a model file: load_model gives the weights of the last epoch.
    model = load_model(tmp_path / "run.safetensors")
    assert model.config() == solver.model.config()
    history = read_history(tmp_path / "run_history.json")
    assert history["epochs_completed"] == 2 and len(history["loss_history"]) == 10


def test_resume_is_bit_exact(tmp_path):
    data = image_data()
    straight = Solver(tiny_net(), data, num_epochs=4, **RESUME_OPTIONS)
    straight.train()

    first = Solver(
        tiny_net(), data, num_epochs=2, checkpoint_name=tmp_path / "run", **RESUME_OPTIONS
    )
    first.train()
    # A different initialisation seed: everything must come from the checkpoint.
    resumed = Solver(
        tiny_net(seed=9), data, resume=tmp_path / "run.safetensors", num_epochs=4, **RESUME_OPTIONS
    )
    assert resumed.epoch == 2 and resumed.iteration == 10
    assert resumed.checkpoint_name == str(tmp_path / "run")  # taken from the checkpoint
    resumed.train()
    assert_same_run(straight, resumed)
    assert len(straight.loss_history) == 20 and len(straight.val_acc_history) == 4


def test_kill_during_a_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    data = image_data()
    name = tmp_path / "run"
    solver = Solver(tiny_net(), data, num_epochs=3, checkpoint_name=name, **RESUME_OPTIONS)
    real_replace = os.replace
    replaced = []

    def crash_on_third_checkpoint(src, dst):
        if str(dst).endswith(".safetensors"):
            replaced.append(dst)
            if len(replaced) == 3:
                raise KeyboardInterrupt("killed while writing the checkpoint")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_third_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        solver.train()
    monkeypatch.setattr(os, "replace", real_replace)
    # The epoch-2 checkpoint is intact and no temporary file is left behind.
    assert sorted(os.listdir(tmp_path)) == [
        "run.safetensors",
        "run_history.json",
        "run_history.png",
    ]
    checkpoint = read_model_file(tmp_path / "run.safetensors")
    assert checkpoint.state["epoch"] == 2
    assert read_history(tmp_path / "run_history.json")["epochs_completed"] == 2

    # Resuming from it ends exactly where an uninterrupted run ends.
    resumed = Solver(tiny_net(), data, resume=tmp_path / "run.safetensors", num_epochs=4)
    resumed.train()
    straight = Solver(tiny_net(), data, num_epochs=4, **RESUME_OPTIONS)
    straight.train()
    assert_same_run(straight, resumed)


def test_partial_write_never_replaces_the_checkpoint(tmp_path, monkeypatch):
    data = image_data()
    name = tmp_path / "run"
    solver = Solver(tiny_net(), data, num_epochs=2, checkpoint_name=name, **RESUME_OPTIONS)
    solver.num_epochs = 1
    solver.train()
    good = (tmp_path / "run.safetensors").read_bytes()

    def torn_fsync(fd):  # the disk fills up half way through the new file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", torn_fsync)
    solver.num_epochs = 2
    with pytest.raises(OSError, match="No space left"):
        solver.train()
    assert (tmp_path / "run.safetensors").read_bytes() == good
    assert read_model_file(tmp_path / "run.safetensors").state["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == [
        "run.safetensors",
        "run_history.json",
        "run_history.png",
    ]


def test_resume_of_a_finished_run_only_restores_the_best(tmp_path):
    data = image_data()
    done = Solver(tiny_net(), data, num_epochs=2, checkpoint_name=tmp_path / "r", **RESUME_OPTIONS)
    done.train()
    again = Solver(tiny_net(), data, resume=tmp_path / "r.safetensors")
    again.train()
    assert again.loss_history == done.loss_history
    for k in done.model.params:
        assert np.array_equal(again.model.params[k], done.model.params[k])


def test_resume_errors(tmp_path):
    data = image_data()
    Solver(tiny_net(), data, num_epochs=1, checkpoint_name=tmp_path / "r", **RESUME_OPTIONS).train()
    path = tmp_path / "r.safetensors"
    with pytest.raises(
        ValueError, match=r"different training options: batch_size=4 \(checkpoint: 8\)"
    ):
        Solver(tiny_net(), data, resume=path, batch_size=4)
    with pytest.raises(ValueError, match=r"update_rule='sgd' \(checkpoint: 'adam'\)"):
        Solver(tiny_net(), data, resume=path, update_rule="sgd")
    with pytest.raises(
        ValueError, match="trained on 37 training samples but data\\['X_train'\\] has 30"
    ):
        Solver(
            tiny_net(),
            {**data, "X_train": data["X_train"][:30], "y_train": data["y_train"][:30]},
            resume=path,
        )
    other = ConvNet([{"type": "affine", "units": 5}], (1, 4, 4), 3)
    with pytest.raises(ValueError, match="the model does not match the checkpoint"):
        Solver(other, data, resume=path)
    with pytest.raises(TypeError, match="resume needs a cnnserve.model.ConvNet"):
        Solver(
            Softmax(16, 3, dtype=np.float32),
            {
                **data,
                "X_train": data["X_train"].reshape(37, 16),
                "X_val": data["X_val"].reshape(12, 16),
            },
            resume=path,
        )
    plain = save_model(tiny_net(), tmp_path / "plain.safetensors")
    with pytest.raises(ModelFileError, match="not a solver checkpoint"):
        Solver(tiny_net(), data, resume=plain)
    with pytest.raises(ModelFileError, match="does not exist"):
        Solver(tiny_net(), data, resume=tmp_path / "missing.safetensors")
    # Options that do not shape the run may change.
    resumed = Solver(tiny_net(), data, resume=path, num_epochs=2, print_every=3, progress=False)
    assert resumed.num_epochs == 2 and resumed.print_every == 3


# ---------------------------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------------------------


def test_history_json_and_plot(tmp_path):
    X, y = blobs(60)
    solver = Solver(Softmax(4, 3), split(X, y, 10), batch_size=10, num_epochs=3, **QUIET)
    solver.train()
    path = solver.save_history(tmp_path / "history.json")
    history = json.loads(path.read_text())
    assert history["format"] == "cnnserve.history"
    assert history["loss_history"] == solver.loss_history and len(history["loss_history"]) == 15
    assert (
        history["train_acc_history"] == solver.train_acc_history
        and len(history["train_acc_history"]) == 3
    )
    assert history["val_acc_history"] == solver.val_acc_history
    assert history["iterations_per_epoch"] == 5
    assert history["epochs_completed"] == 3 and history["iterations_completed"] == 15
    assert history["best_val_acc"] == solver.best_val_acc
    assert history["options"]["update_rule"] == "sgd"
    assert history["options"]["batch_size"] == 10 and history["options"]["seed"] == 0
    timings = history["timings"]
    assert len(timings["epoch_seconds"]) == 3 and all(t > 0 for t in timings["epoch_seconds"])
    assert timings["total_seconds"] == pytest.approx(sum(timings["epoch_seconds"]))

    png = plot_history(history, tmp_path / "history.png", width=640, height=480)
    with Image.open(png) as image:
        image.load()
        assert image.format == "PNG" and image.size == (640, 480)
        pixels = np.asarray(image.convert("RGB"))
    # Something besides the white background was drawn, including both line colours.
    assert (pixels != 255).any(axis=2).mean() > 0.01
    colours = {tuple(p) for p in pixels.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours
    with Image.open(solver.plot_history(tmp_path / "default.png")) as image:
        assert image.size == (800, 600)


@pytest.mark.parametrize(
    "history",
    [
        {"loss_history": [], "train_acc_history": [], "val_acc_history": []},
        {"loss_history": [2.0], "train_acc_history": [0.5], "val_acc_history": [0.25]},
        {"loss_history": [1e-9, 1e6, 3.0], "train_acc_history": [1, 1], "val_acc_history": [0, 0]},
    ],
)
def test_plot_edge_cases(tmp_path, history):
    with Image.open(plot_history(history, tmp_path / "h.png", width=320, height=240)) as image:
        assert image.size == (320, 240)


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match=r"history\['loss_history'\] holds NaN or inf"):
        plot_history({"loss_history": [1.0, float("nan")]}, tmp_path / "h.png")
    with pytest.raises(ValueError, match="width must be >= 320 pixels, got 100"):
        plot_history({}, tmp_path / "h.png", width=100)
    with pytest.raises(TypeError, match="history must be a dict"):
        plot_history([1, 2], tmp_path / "h.png")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def test_quiet_solver_prints_nothing(capsys):
    X, y = blobs(30)
    Solver(Softmax(4, 3), split(X, y, 10), batch_size=5, num_epochs=2, **QUIET).train()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_verbose_and_progress_output(capsys):
    X, y = blobs(30)
    solver = Solver(
        Softmax(4, 3), split(X, y, 10), batch_size=5, num_epochs=2, print_every=2, verbose=True
    )
    solver.train()
    captured = capsys.readouterr()
    assert "(Iteration 2 / 8) loss: " in captured.out
    assert "(Epoch 2 / 2) train acc: " in captured.out and "val_acc: " in captured.out
    # stderr is no terminal here: no bar, and the epoch line is verbose's (one per epoch)
    assert captured.err == ""
    Solver(Softmax(4, 3), split(X, y, 10), num_epochs=1, verbose=False).train()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("epoch 1/1: loss ")


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

X0, Y0 = blobs(20)
DATA = split(X0, Y0, 5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"learning_rate": 0.1, "epochs": 3},
            TypeError,
            r"unknown keyword argument\(s\) 'epochs', 'learning_rate'; valid options: 'update_rule'",
        ),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int, got float 2.0"),
        ({"num_epochs": 0}, ValueError, "num_epochs must be >= 1, got 0"),
        ({"lr_decay": 0}, ValueError, r"lr_decay must be in \(0, 1\], got 0"),
        ({"lr_decay": 1.5}, ValueError, r"lr_decay must be in \(0, 1\], got 1.5"),
        ({"lr_decay": float("nan")}, ValueError, r"lr_decay must be in \(0, 1\], got nan"),
        ({"num_train_samples": 0}, ValueError, "num_train_samples must be >= 1, got 0"),
        ({"num_val_samples": -1}, ValueError, "num_val_samples must be >= 1, got -1"),
        ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ({"print_every": 0}, ValueError, "print_every must be >= 1, got 0"),
        ({"verbose": 1}, TypeError, "verbose must be a bool, got int"),
        (
            {"update_rule": "adamw"},
            ValueError,
            "unknown update rule 'adamw'; valid names: 'sgd', 'sgd_momentum', 'rmsprop', 'adam'",
        ),
        (
            {"update_rule": 3},
            TypeError,
            "update_rule must be the name of an update rule or a callable",
        ),
        ({"optim_config": [0.1]}, TypeError, "optim_config must be a dict, got list"),
        (
            {"optim_config": {"lr": 0.1}},
            ValueError,
            r"optim_config for 'sgd': config has unknown key\(s\) 'lr'",
        ),
        (
            {"update_rule": "adam", "optim_config": {"beta1": 1.0}},
            ValueError,
            r"optim_config for 'adam': config\['beta1'\] must be in \[0.0, 1.0\), got 1.0",
        ),
        (
            {"checkpoint_name": "/no/such/dir/run"},
            ValueError,
            "checkpoint_name '/no/such/dir/run': directory '/no/such/dir' does not exist",
        ),
        ({"checkpoint_name": 3}, TypeError, "checkpoint_name must be a str or path, got int"),
        ({"resume": 3}, TypeError, "resume must be a str or path, got int"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        Solver(Softmax(4, 3), DATA, **kwargs)


def test_checkpoint_needs_a_convnet(tmp_path):
    with pytest.raises(TypeError, match="checkpoint_name needs a cnnserve.model.ConvNet"):
        Solver(Softmax(4, 3), DATA, checkpoint_name=tmp_path / "run")


def _without(key):
    return {k: v for k, v in DATA.items() if k != key}


@pytest.mark.parametrize(
    "data, error, message",
    [
        ([X0, Y0], TypeError, "data must be a dict, got list"),
        (
            _without("y_val"),
            ValueError,
            r"data is missing key\(s\) 'y_val'; expected 'X_train', 'y_train', 'X_val', 'y_val'",
        ),
        (
            {**DATA, "X_train": DATA["X_train"].astype(np.float32)},
            TypeError,
            r"data\['X_train'\] has dtype float32 but the model is float64: convert it first, e.g. data\['X_train'\].astype\(np.float64\)",
        ),
        (
            {**DATA, "X_val": DATA["X_val"].tolist()},
            TypeError,
            r"data\['X_val'\] must be a numpy.ndarray, got list",
        ),
        (
            {**DATA, "X_train": DATA["X_train"][:0], "y_train": DATA["y_train"][:0]},
            ValueError,
            r"data\['X_train'\] must be \(N, ...\) with N >= 1, got shape \(0, 4\)",
        ),
        (
            {**DATA, "X_train": DATA["X_train"][:, 0]},
            ValueError,
            r"data\['X_train'\] must be \(N, ...\) with N >= 1, got shape \(15,\)",
        ),
        (
            {**DATA, "X_val": DATA["X_val"][:, :3]},
            ValueError,
            r"data\['X_val'\] samples have shape \(3,\) but data\['X_train'\] samples have shape \(4,\)",
        ),
        (
            {**DATA, "y_train": DATA["y_train"][:10]},
            ValueError,
            r"data\['y_train'\] must have shape \(15,\) \(one label per row of data\['X_train'\]\), got \(10,\)",
        ),
        (
            {**DATA, "y_val": DATA["y_val"].astype(float)},
            TypeError,
            r"data\['y_val'\] must have an integer dtype, got float64",
        ),
        (
            {**DATA, "y_train": DATA["y_train"] + 3},
            ValueError,
            r"labels in data\['y_train'\] must be in \[0, 3\), got 5",
        ),
        (
            {**DATA, "y_val": DATA["y_val"] - 3},
            ValueError,
            r"labels in data\['y_val'\] must be in \[0, 3\), got -3",
        ),
    ],
)
def test_bad_data(data, error, message):
    with pytest.raises(error, match=message):
        Solver(Softmax(4, 3), data)


def test_bad_models():
    with pytest.raises(TypeError, match="model must have a non-empty dict `params`"):
        Solver(object(), DATA)
    model = Softmax(4, 3)
    model.params["b"] = model.params["b"].astype(np.float32)
    with pytest.raises(
        TypeError, match=r"model.params\['b'\] has dtype float32 but the model is float64"
    ):
        Solver(model, DATA)
    with pytest.raises(
        ValueError, match=r"data\['X_train'\] must have shape \(N, 1, 4, 4\) for this model"
    ):
        Solver(tiny_net(dtype=np.float64), DATA)


def test_lr_decay_needs_a_learning_rate():
    def rule(w, dw, config=None):
        return w - 0.1 * dw, config

    solver = Solver(ConstantGrad(), index_data(10), update_rule=rule, lr_decay=0.5, **QUIET)
    with pytest.raises(ValueError, match="has no 'learning_rate' to decay"):
        solver.train()


def test_module_exports():
    assert solver_module.__all__ == ["Solver", "TrainingDiverged"]
    assert Solver(Softmax(4, 3), DATA, update_rule=sgd).update_rule is sgd
