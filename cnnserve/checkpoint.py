"""Solver checkpoints: writing, reading, checking, restoring, and the rule of a resumed run.

A checkpoint is a model file (:mod:`cnnserve.modelfile`) whose extra state holds everything a
:class:`~cnnserve.solver.Solver` needs to continue the run bit for bit, as the uninterrupted
run would have gone on.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve._files import remove_stale_temps
from cnnserve.history import plot_history, write_history
from cnnserve.modelfile import ModelFileError, read_model_file, save_model
from cnnserve.optim import rule_name

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "TRAJECTORY",
    "json_scalar",
    "json_scalars",
    "merge_resumed_options",
    "read_checkpoint",
    "remove_stale_checkpoint_temps",
    "restore_checkpoint",
    "resume_conflicts",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = "cnnserve.solver"
CHECKPOINT_VERSION = 1


#: The Solver options that shape a run's trajectory: a resumed run must keep them.
TRAJECTORY = (
    "update_rule",
    "optim_config",
    "lr_decay",
    "batch_size",
    "num_train_samples",
    "num_val_samples",
    "seed",
    "augment",
)


def write_checkpoint(solver: Any) -> Path:
    """Write the solver's checkpoint, ``{checkpoint_name}.safetensors``, atomically.

    The model file holds the model and, under ``state/``, what a resumed run needs to go on
    bit for bit: the optimizer state, the best parameters, the histories, the random
    generators' states and the options. The history is written beside it as JSON and PNG.

    Returns
    -------
    pathlib.Path
        The checkpoint written.
    """
    tensors: dict[str, np.ndarray] = {}
    configs: dict[str, dict] = {}
    for p, config in solver.optim_configs.items():
        configs[p] = {}
        for key, value in config.items():
            if isinstance(value, np.ndarray):
                tensors[f"optim/{p}/{key}"] = value
            else:
                configs[p][key] = json_scalar(value, f"optim config {p!r}[{key!r}]")
    for p, value in solver.best_params.items():
        tensors[f"best/{p}"] = value
    for i, stats in enumerate(solver.best_running_stats):
        for key, value in stats.items():
            tensors[f"best_bn/{i}/{key}"] = value
    tensors["loss_history"] = np.asarray(solver.loss_history, dtype=np.float64)
    tensors["train_acc_history"] = np.asarray(solver.train_acc_history, dtype=np.float64)
    tensors["val_acc_history"] = np.asarray(solver.val_acc_history, dtype=np.float64)
    tensors["val_loss_history"] = np.asarray(solver.val_loss_history, dtype=np.float64)
    model_rng = getattr(solver.model, "rng", None)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": solver.epoch,
        "iteration": solver.iteration,
        "num_train": solver.num_train,
        "best_val_acc": solver.best_val_acc,
        "best_val_loss": solver.best_val_loss,
        "best_epoch": solver.best_epoch,
        "best_params": sorted(solver.best_params),
        "best_running_stats": len(solver.best_running_stats),
        "optim_configs": configs,
        "rng_state": solver.rng.bit_generator.state,
        "model_rng_state": None if model_rng is None else model_rng.bit_generator.state,
        "epoch_seconds": list(solver.epoch_seconds),
        "options": solver.options(),
    }
    training = {
        **solver.record,
        "epochs": solver.epoch,
        "train_acc": solver.train_acc_history[-1],
        "val_acc": solver.val_acc_history[-1],
        "best_val_acc": solver.best_val_acc,
        "best_epoch": solver.best_epoch,
    }
    path = save_model(
        solver.model, solver.checkpoint_path, training=training, state_tensors=tensors, state=state
    )
    history = solver.history()
    write_history(history, f"{os.fspath(solver.checkpoint_name)}_history.json")
    plot_history(history, f"{os.fspath(solver.checkpoint_name)}_history.png")
    return path


def checkpoint_files(checkpoint_name: str | os.PathLike) -> list[Path]:
    """The files a checkpoint of this name writes: the model file and its history."""
    name = os.fspath(checkpoint_name)
    return [Path(f"{name}{suffix}") for suffix in (".safetensors", "_history.json", "_history.png")]


def remove_stale_checkpoint_temps(checkpoint_name: str | os.PathLike) -> list[Path]:
    """Remove the partial files that a killed write of this checkpoint left behind.

    A checkpoint is written to a hidden ``.NAME.<hex>.tmp`` file and renamed over ``NAME``;
    a kill in between leaves the temporary file. Only those of this checkpoint's own files
    (the model file and its history) are removed, never another run's.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    removed = []
    for path in checkpoint_files(checkpoint_name):
        removed += remove_stale_temps(path)
    return removed


def read_checkpoint(path: str | os.PathLike) -> Any:
    """A solver checkpoint (a model file with the solver's state), checked before use.

    Returns
    -------
    cnnserve.modelfile.ModelFile
        Its ``state["options"]`` are the run's solver options (see :func:`resume_conflicts`).

    Raises
    ------
    TypeError
        ``path`` is not a str or path.
    ModelFileError
        Not a readable model file, or one without solver state (of this version).
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"resume must be a str or path, got {type(path).__name__}")
    # A run's own checkpoint, of a model the resuming Solver holds already: the size limits
    # that guard loading a model file to serve it do not apply.
    checkpoint = read_model_file(
        path, max_pixels=sys.maxsize, max_params=sys.maxsize, max_layers=sys.maxsize
    )
    state = checkpoint.state
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(
            f"{path} is a model file but not a solver checkpoint (no solver state): "
            "train from it with load_model() and a new Solver instead"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise ModelFileError(
            f"{path} has solver checkpoint version {state.get('version')!r}; this cnnserve "
            f"reads version {CHECKPOINT_VERSION}"
        )
    return checkpoint


def resume_conflicts(given: Mapping, saved: Mapping) -> list[tuple[str, Any, Any]]:
    """The options a resumed run may not change that ``given`` changes: ``(key, given, saved)``.

    A resumed run continues bit for bit only with the options that shape its trajectory
    (update rule, its config, learning-rate decay, batch size, the accuracy subsamples, the
    seed, the augmentation). ``given`` holds Solver options (any subset); ``saved`` the checkpoint's
    ``state["options"]``. An update rule compares by its registered name.
    """
    conflicts = []
    for key, value in given.items():
        if key not in TRAJECTORY:
            continue
        mine = rule_name(value) if key == "update_rule" else value
        if key == "optim_config" and value is None:
            mine = {}
        theirs = saved.get(key)
        if key == "augment":  # specs; a checkpoint from before augmentation has none
            mine, theirs = mine or "none", theirs or "none"
        if mine != theirs:
            conflicts.append((key, mine, theirs))
    return conflicts


def merge_resumed_options(given: Mapping, saved: Mapping, path: Any, names: list[str]) -> dict:
    """The options of a resumed Solver: the checkpoint's ``saved`` options (of ``names``),
    overridden by the ``given`` ones where that is allowed.

    Raises
    ------
    ValueError
        A given option that shapes the run differs from the saved one (all are named), or the
        run used a custom update rule that is not given again.
    """
    merged = {k: saved[k] for k in names if k in saved}
    clashes = resume_conflicts(given, saved)
    conflicts = [f"{key}={mine!r} (checkpoint: {theirs!r})" for key, mine, theirs in clashes]
    merged.update((k, v) for k, v in given.items() if k not in {c[0] for c in clashes})
    if conflicts:
        raise ValueError(
            f"cannot resume {os.fspath(path)!r} with different training options: "
            f"{'; '.join(conflicts)}. These shape the run; to change them, start a new "
            "Solver from load_model(path)"
        )
    rule = merged.get("update_rule", "sgd")
    if isinstance(rule, str) and rule.startswith("callable:"):
        raise ValueError(
            f"the checkpoint {os.fspath(path)!r} was trained with the custom update rule "
            f"{rule[len('callable:') :]}: pass it again as update_rule="
        )
    return merged


def restore_checkpoint(solver: Any, checkpoint: Any, path: Any) -> None:
    """Put a checkpoint's model, optimizer state, histories and generators into ``solver``.

    Raises
    ------
    ValueError
        The solver's model or training data is not the checkpoint's.
    ModelFileError
        The checkpoint's solver state is incomplete.
    """
    state, tensors, saved = checkpoint.state, checkpoint.state_tensors, checkpoint.model
    where = os.fspath(path)
    if solver.model.config() | {"seed": 0} != saved.config() | {"seed": 0}:
        raise ValueError(
            f"the model does not match the checkpoint {where!r}: architecture "
            f"{saved.config()} in the file, {solver.model.config()} given"
        )
    if state["num_train"] != solver.num_train:
        raise ValueError(
            f"the checkpoint {where!r} was trained on {state['num_train']} training "
            f"samples but data['X_train'] has {solver.num_train}: resume with the same data"
        )
    try:
        for name in solver.model.params:
            solver.model.params[name] = saved.params[name]
        for mine, theirs in zip(solver.model.bn_params, saved.bn_params, strict=True):
            mine["running_mean"] = theirs["running_mean"]
            mine["running_var"] = theirs["running_var"]
        if state["model_rng_state"] is not None:
            solver.model.rng.bit_generator.state = state["model_rng_state"]
        solver.rng.bit_generator.state = state["rng_state"]
        solver.epoch = state["epoch"]
        solver.iteration = state["iteration"]
        solver.loss_history = [float(v) for v in tensors["loss_history"]]
        solver.train_acc_history = [float(v) for v in tensors["train_acc_history"]]
        solver.val_acc_history = [float(v) for v in tensors["val_acc_history"]]
        solver.val_loss_history = [float(v) for v in tensors["val_loss_history"]]
        solver.epoch_seconds = [float(v) for v in state["epoch_seconds"]]
        solver.best_val_acc = state["best_val_acc"]
        solver.best_val_loss = state["best_val_loss"]
        solver.best_epoch = state["best_epoch"]
        solver.best_params = {p: tensors[f"best/{p}"] for p in state["best_params"]}
        solver.best_running_stats = [
            {
                k: tensors[f"best_bn/{i}/{k}"]
                for k in ("running_mean", "running_var")
                if f"best_bn/{i}/{k}" in tensors
            }
            for i in range(state["best_running_stats"])
        ]
        configs = {}
        for p in solver.model.params:
            config = dict(state["optim_configs"][p])
            prefix = f"optim/{p}/"
            for name, value in tensors.items():
                if name.startswith(prefix):
                    config[name[len(prefix) :]] = value
            configs[p] = config
        solver.optim_configs = configs
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{where} has an incomplete solver state: {exc!r}") from exc


def json_scalar(value: Any, name: str) -> Any:
    """``value`` as a JSON scalar (numpy scalars become Python ones)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} is {value}: it cannot be saved")
        return value
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} is a {type(value).__name__}, which cannot be saved in a checkpoint "
            "(numbers, strings and arrays can)"
        ) from None
    return value


def json_scalars(config: Mapping, name: str) -> dict:
    """Every value of ``config`` as a JSON scalar (see :func:`json_scalar`)."""
    return {str(k): json_scalar(v, f"{name}[{k!r}]") for k, v in config.items()}
