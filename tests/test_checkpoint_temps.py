"""Checkpoints: the partial files of a killed write, and the model-size limits.

A checkpoint is written to ``.NAME.<12 hex>.tmp`` and renamed over ``NAME``; a kill between
the two leaves the temporary file, which nothing else would ever remove: a new or resumed run
of that name removes it. The limits on what a model file may declare guard serving, not a
run resuming its own checkpoint.
"""

from __future__ import annotations

import os

import numpy as np

from cnnserve._files import atomic_write_bytes, remove_stale_temps
from cnnserve.model import ConvNet
from cnnserve.solver import Solver

LAYERS = [{"type": "conv", "filters": 2, "size": 3, "pad": 1}, {"type": "relu"}]
OPTIONS = {"batch_size": 8, "seed": 3, "verbose": False, "progress": False}


def data() -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(3, size=30)
    X = (rng.standard_normal((30, 1, 4, 4)) + y[:, None, None, None]).astype(np.float32)
    return {"X_train": X[:20], "y_train": y[:20], "X_val": X[20:], "y_val": y[20:]}


def leftovers(folder, names) -> list[str]:
    """Partial files as a kill mid-write leaves them, for each of ``names``."""
    made = []
    for i, name in enumerate(names):
        tmp = folder / f".{name}.{i:012x}.tmp"
        tmp.write_bytes(b"partial")
        made.append(tmp.name)
    return made


OWN = ["run.safetensors", "run_history.json", "run_history.png"]
# Not this checkpoint's: another run's, a name that merely starts the same, a user's file.
OTHERS = ["run2.safetensors", "runx_history.json", "other.safetensors"]


def test_a_new_run_removes_its_own_leftovers_only(tmp_path):
    leftovers(tmp_path, OWN)
    kept = leftovers(tmp_path, OTHERS)
    (tmp_path / ".run.safetensors.notahexname.tmp").write_bytes(b"mine")
    kept.append(".run.safetensors.notahexname.tmp")
    Solver(ConvNet(LAYERS, (1, 4, 4), 3), data(), checkpoint_name=tmp_path / "run", **OPTIONS)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_a_resumed_run_removes_its_own_leftovers(tmp_path):
    name = tmp_path / "run"
    Solver(
        ConvNet(LAYERS, (1, 4, 4), 3), data(), num_epochs=1, checkpoint_name=name, **OPTIONS
    ).train()
    leftovers(tmp_path, OWN)
    solver = Solver(
        ConvNet(LAYERS, (1, 4, 4), 3),
        data(),
        num_epochs=2,
        checkpoint_name=name,
        resume=f"{name}.safetensors",
        **OPTIONS,
    )
    assert sorted(os.listdir(tmp_path)) == sorted(OWN)
    solver.train()
    assert sorted(os.listdir(tmp_path)) == sorted(OWN)


def test_remove_stale_temps_matches_the_names_atomic_writes_make(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    written = []
    real_replace = os.replace

    def crash(src, dst):  # a kill between the write and the rename
        written.append(src)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    try:
        atomic_write_bytes(target, b"data")
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(os, "replace", real_replace)
    # atomic_write_bytes removes its own file on an exception; a kill would not: put it back
    stale = written[0]
    open(stale, "wb").close()
    assert remove_stale_temps(target) == [stale] and not os.listdir(tmp_path)


def test_a_checkpoint_over_the_serving_limits_still_resumes(tmp_path):
    """The model-size limits guard serving; a run's own checkpoint resumes whatever its size."""
    import pytest

    from cnnserve.model import ModelFileError, load_model

    layers = [{"type": "conv", "filters": 2, "size": 8, "stride": 8, "pad": 0}]
    rng = np.random.default_rng(0)
    X = rng.random((6, 1, 520, 520), dtype=np.float32)  # 270,400 pixels: over 512 x 512
    y = np.array([0, 1, 2, 0, 1, 2])
    big = {"X_train": X[:4], "y_train": y[:4], "X_val": X[4:], "y_val": y[4:]}
    name = tmp_path / "big"
    Solver(
        ConvNet(layers, (1, 520, 520), 3), big, num_epochs=1, checkpoint_name=name, **OPTIONS
    ).train()
    with pytest.raises(ModelFileError, match="more than the limit"):
        load_model(f"{name}.safetensors")
    solver = Solver(
        ConvNet(layers, (1, 520, 520), 3),
        big,
        num_epochs=2,
        checkpoint_name=name,
        resume=f"{name}.safetensors",
        **OPTIONS,
    )
    assert solver.epoch == 1
