"""The Solver's augmentation and early stopping, and the progress display."""

import io
import json

import numpy as np
import pytest

from cnnserve.data.augment import Augment
from cnnserve.model import ConvNet, read_model_file
from cnnserve.solver import Solver

QUIET = {"verbose": False, "progress": False}
NET = [{"type": "conv", "filters": 3, "size": 3, "pad": 0}, {"type": "relu"}]


def net(seed=1, dtype=np.float32):
    norm = {"mean": [0.4], "std": [0.3]}
    return ConvNet(NET, (1, 8, 8), 3, seed=seed, dtype=dtype, normalization=norm)


def data(n=40, n_val=12, dtype=np.float32):
    rng = np.random.default_rng(0)
    y = rng.integers(3, size=n + n_val)
    X = rng.standard_normal((n + n_val, 1, 8, 8)) * 0.5 + y[:, None, None, None]
    X = X.astype(dtype)
    return {"X_train": X[n_val:], "y_train": y[n_val:], "X_val": X[:n_val], "y_val": y[:n_val]}


OPTIONS = {
    "update_rule": "adam",
    "optim_config": {"learning_rate": 5e-3},
    "batch_size": 8,
    "seed": 3,
    **QUIET,
}


def params(solver):
    return {k: v.copy() for k, v in solver.model.params.items()}


def test_augmented_training_is_reproducible_and_differs_from_plain():
    aug = "shift=1,flip=0.5,brightness=0.2,contrast=0.2,scale=0.1"
    runs = []
    for augment in (aug, Augment.parse(aug), None):
        solver = Solver(net(), data(), num_epochs=2, augment=augment, **OPTIONS)
        solver.train()
        runs.append(params(solver))
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])
    assert any(not np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_augmented_batches_are_what_augment_gives(monkeypatch):
    seen = []
    model = net()
    loss = model.loss

    def spy(X, y=None):
        if y is not None:
            seen.append(X.copy())
        return loss(X, y)

    monkeypatch.setattr(model, "loss", spy)
    d = data()
    aug = Augment(shift=2, brightness=0.3)
    solver = Solver(model, d, num_epochs=1, augment=aug, **{**OPTIONS, "batch_size": 40})
    order = np.random.default_rng(3).permutation(40)  # the batch order without augmentation
    solver.train()
    want = aug.apply(d["X_train"][order], np.random.default_rng([3, 0, 1]), mean=[0.4], std=[0.3])
    np.testing.assert_array_equal(seen[0], want)


def test_resume_with_augmentation_is_bit_exact_and_keeps_it(tmp_path):
    opts = {**OPTIONS, "augment": "shift=1,flip=0.5,scale=0.1"}
    straight = Solver(net(), data(), num_epochs=3, **opts)
    straight.train()
    first = Solver(net(), data(), num_epochs=1, checkpoint_name=tmp_path / "run", **opts)
    first.train()
    assert read_model_file(tmp_path / "run.safetensors").state["options"]["augment"] == (
        "shift=1,flip=0.5,scale=0.1"
    )
    resumed = Solver(net(seed=9), data(), resume=tmp_path / "run.safetensors", num_epochs=3)
    assert resumed.augment == Augment(shift=1, flip=0.5, scale=0.1)  # from the checkpoint
    resumed.train()
    for name in straight.model.params:
        np.testing.assert_array_equal(straight.model.params[name], resumed.model.params[name])
    with pytest.raises(ValueError, match="augment='shift=2' \\(checkpoint: 'shift=1,flip=0.5"):
        Solver(net(), data(), resume=tmp_path / "run.safetensors", augment="shift=2")


def test_augment_errors():
    with pytest.raises(ValueError, match="unknown parameter 'rotate'"):
        Solver(net(), data(), augment="rotate=10", **QUIET)
    with pytest.raises(ValueError, match=r"too large for 8 x 8"):
        Solver(net(), data(), augment="shift=4", **QUIET)
    flat = {k: v.reshape(len(v), -1) if k.startswith("X") else v for k, v in data().items()}

    class Linear:
        params = {"W": np.zeros((64, 3), np.float32)}

        def loss(self, X, y=None):
            return np.zeros((len(X), 3))

    with pytest.raises(ValueError, match=r"augment needs images of shape \(N, C, H, W\)"):
        Solver(Linear(), flat, augment="shift=1", **QUIET)


def test_patience_stops_and_keeps_the_best_weights(tmp_path):
    # A learning rate of 0: nothing improves after epoch 1, so patience 2 stops after epoch 3.
    opts = {**OPTIONS, "optim_config": {"learning_rate": 0.0}}
    solver = Solver(
        net(), data(), num_epochs=10, patience=2, checkpoint_name=tmp_path / "r", **opts
    )
    solver.train()
    assert solver.epoch == 3 and solver.best_epoch == 1 and solver.stopped_early
    assert solver.finished
    history = solver.history()
    assert history["stopped_early"] is True and history["epochs_completed"] == 3
    assert history["options"]["patience"] == 2
    saved = json.loads((tmp_path / "r_history.json").read_text())
    assert saved["stopped_early"] is True
    # resumed with the same patience: finished, nothing runs; a larger one goes on
    again = Solver(net(), data(), resume=tmp_path / "r.safetensors", **QUIET)
    assert again.finished and again.patience == 2
    again.train()
    assert again.epoch == 3
    more = Solver(net(), data(), resume=tmp_path / "r.safetensors", patience=4, **QUIET)
    assert not more.finished
    more.train()
    assert more.epoch == 5 and more.stopped_early


def test_patience_never_stops_a_run_that_improves(monkeypatch):
    solver = Solver(net(), data(), num_epochs=4, patience=1, **OPTIONS)
    # per epoch: the training accuracy, then the validation accuracy and loss
    results = iter(
        [
            (v, loss)
            for v, loss in [(0.5, 1.0), (0.6, 0.9), (0.7, 0.8), (0.8, 0.7)]
            for _ in range(2)
        ]
    )
    monkeypatch.setattr(solver, "_evaluate", lambda X, y, b: next(results))
    solver.train()
    assert solver.epoch == 4 and not solver.stopped_early and solver.best_epoch == 4


def test_patience_errors():
    with pytest.raises(ValueError, match="patience must be >= 1, got 0"):
        Solver(net(), data(), patience=0, **QUIET)


def test_early_stop_is_said(capsys):
    opts = {**OPTIONS, "optim_config": {"learning_rate": 0.0}, "progress": True}
    Solver(net(), data(), num_epochs=5, patience=1, **opts).train()
    err = capsys.readouterr().err
    assert "early stopping after epoch 2 of 5" in err and "keeping the weights of epoch 1" in err


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_one_plain_line_per_epoch_without_a_terminal(capsys):
    Solver(net(), data(), num_epochs=2, **{**OPTIONS, "progress": True}).train()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: loss ")
    assert "train acc " in lines[1] and "val acc " in lines[1]


def test_a_bar_per_epoch_on_a_terminal(monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    Solver(net(), data(), num_epochs=2, **{**OPTIONS, "progress": True}).train()
    shown = terminal.getvalue()
    assert "epoch 1/2" in shown and "epoch 2/2" in shown and "val_acc=" in shown
    assert "\r" in shown  # tqdm's bar
