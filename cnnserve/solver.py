"""Train a classification model with minibatch gradient descent (the CS231n ``Solver``).

::

    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-3},
                    lr_decay=0.95, batch_size=64, num_epochs=10, checkpoint_name="runs/digits")
    solver.train()            # model.params now hold the best-validation parameters
    solver.save_history("runs/digits_history.json")

``data`` holds ``X_train, y_train, X_val, y_val``; the model follows the CS231n interface
(``model.params``, ``model.loss(X, y=None)``). Beyond CS231n:

- each epoch is one pass over the training set in a fresh random order (a permutation drawn
  from the solver's own generator, seeded by ``seed``; the last batch may be smaller);
- a NaN or inf loss stops training with :class:`TrainingDiverged`;
- with ``checkpoint_name``, every epoch atomically writes one model file holding the model and
  the full solver state, plus the history as JSON and PNG; ``resume=`` continues such a run
  and ends bit-for-bit where the uninterrupted run would have ended.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cnnserve._buffers import release_buffer_cache
from cnnserve._checks import FLOAT_DTYPES
from cnnserve._checks import check_int as _check_int
from cnnserve._checks import check_number as _check_number
from cnnserve.checkpoint import (
    json_scalars,
    merge_resumed_options,
    read_checkpoint,
    remove_stale_checkpoint_temps,
    restore_checkpoint,
    write_checkpoint,
)
from cnnserve.data.augment import resolve_augment
from cnnserve.history import HISTORY_FORMAT, plot_history, write_history
from cnnserve.network import ConvNet
from cnnserve.optim import UPDATE_RULES, get_update_rule, rule_name
from cnnserve.progress import EpochProgress
from cnnserve.stopping import (
    TrainingDiverged,
    check_patience,
    early_stop_message,
    stopped_early,
)

__all__ = ["Solver", "TrainingDiverged"]

# Options, their defaults, and whether a resumed run must keep them (they shape the
# trajectory: changing one breaks the bit-for-bit continuation).
_DEFAULTS: dict[str, Any] = {
    "update_rule": "sgd",
    "optim_config": None,
    "lr_decay": 1.0,
    "batch_size": 100,
    "num_epochs": 10,
    "num_train_samples": 1000,
    "num_val_samples": None,
    "seed": 0,
    "augment": None,
    "patience": None,
    "checkpoint_name": None,
    "print_every": 10,
    "verbose": True,
    "progress": True,
    "record": None,
}


class Solver:
    """Minibatch training of a classification model, with checkpoints and resume.

    Parameters
    ----------
    model : object
        ``model.params`` (dict of str to ndarray, updated by the solver) and
        ``model.loss(X, y=None)``: scores of shape (N, num_classes) without ``y``, ``(loss,
        grads)`` with it. Optional: ``model.dtype`` (else the dtype of the parameters),
        ``model.num_classes`` and ``model.input_shape`` (checked against the data),
        ``model.rng`` (a ``np.random.Generator``, saved in checkpoints), ``model.bn_params``
        (running statistics, kept with the best parameters). Checkpoints and resume need a
        :class:`cnnserve.model.ConvNet`.
    data : dict
        ``X_train`` (N_train, ...), ``y_train`` (N_train,), ``X_val`` (N_val, ...), ``y_val``
        (N_val,). X arrays must have the model's floating dtype (convert with
        ``X.astype(model.dtype)`` first: the solver never casts silently); labels are integers
        in ``[0, num_classes)``. Other keys are ignored.
    update_rule : str or callable
        A name from :data:`cnnserve.optim.UPDATE_RULES` (default ``'sgd'``) or a function
        ``rule(w, dw, config) -> (next_w, config)``.
    optim_config : dict, optional
        Hyper-parameters for the update rule; every parameter gets its own deep copy.
    lr_decay : float
        In (0, 1]; every ``learning_rate`` is multiplied by it after each epoch (default 1).
    batch_size : int
        Training minibatch size, >= 1 (default 100).
    num_epochs : int
        Number of epochs, >= 1 (default 10).
    num_train_samples : int or None
        Training samples on which the train accuracy is measured after each epoch (a random
        subset, default 1000; None for all).
    num_val_samples : int or None
        Likewise for validation (default None: all).
    seed : int
        Seeds the solver's generator (epoch permutations, accuracy subsets); default 0.
    augment : Augment, str, dict or None
        Augmentation of every training batch (:mod:`cnnserve.data.augment`): an ``Augment``,
        a spec such as ``"shift=2,flip=0.5"``, ``"default"`` (the default of the data set
        ``record["dataset"]`` names), or None (default: none). The draws come from a
        generator seeded by ``(seed, epoch)``; the pixels are augmented in [0, 1] with the
        model's ``normalization`` when it has one.
    patience : int, optional
        Early stopping (:mod:`cnnserve.stopping`): stop once this many epochs in a row have
        not improved the validation accuracy (ties: the validation loss); the model keeps the
        best epoch's weights either way. None (default): run every epoch.
    checkpoint_name : str or PathLike, optional
        After every epoch, write ``{checkpoint_name}.safetensors`` (model plus solver state),
        ``{checkpoint_name}_history.json`` and ``{checkpoint_name}_history.png``, each
        atomically. The directory must exist.
    print_every : int
        With ``verbose``, print the loss every ``print_every`` iterations (default 10).
    verbose : bool
        Print the loss and the per-epoch accuracies to stdout (default True).
    progress : bool
        Show the progress of every epoch on stderr (default True): a tqdm bar on a terminal,
        otherwise (no carriage-return debris) one line per epoch, unless ``verbose`` prints it.
    record : dict, optional
        JSON-serialisable fields added to the training record of every checkpoint (the data
        set and how it was split, say), so that a checkpoint says what it was trained on.
    resume : str or PathLike, optional
        A checkpoint written by a solver with ``checkpoint_name``: restore the model's weights,
        running statistics and generator, the optimizer state, the histories, the best
        parameters and the solver's generator, and continue with :meth:`train`. Options not
        given are taken from the checkpoint; trajectory options (``update_rule``,
        ``optim_config``, ``lr_decay``, ``batch_size``, ``num_train_samples``,
        ``num_val_samples``, ``seed``, ``augment``) that are given must equal the saved ones.
        ``num_epochs``, ``patience``, ``print_every``, ``verbose``, ``progress`` and
        ``checkpoint_name`` may change.

    Raises
    ------
    TypeError
        Unknown keyword arguments (all are named), or an argument of the wrong type/dtype.
    ValueError
        A bad option value, or data that do not fit the model or each other.

    Attributes
    ----------
    loss_history : list of float
        The training loss of every iteration.
    train_acc_history, val_acc_history : list of float
        The accuracies measured after every epoch.
    val_loss_history : list of float
        The mean softmax cross-entropy of the validation samples after every epoch.
    best_val_acc : float or None
        The best validation accuracy so far; ``best_params`` hold the parameters (copies)
        that reached it, and ``best_epoch`` its epoch (from 1). Among epochs of equal
        validation accuracy (small validation sets saturate) the one with the lowest
        validation loss is kept.
    epoch : int
        Epochs completed.
    iteration : int
        Iterations (parameter updates) completed over the whole run.
    optim_configs : dict of str to dict
        The update rule's config of every parameter.
    epoch_seconds : list of float
        Wall-clock duration of every epoch.
    """

    def __init__(self, model: Any, data: Mapping, **kwargs: Any) -> None:
        resume = kwargs.pop("resume", None)
        unknown = sorted(k for k in kwargs if k not in _DEFAULTS)
        if unknown:
            raise TypeError(
                f"Solver got unknown keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(map(repr, [*_DEFAULTS, 'resume']))}"
            )
        self.model = model
        self.dtype = self._check_model(model)
        checkpoint = None
        if resume is not None:
            checkpoint = read_checkpoint(resume)
            if not isinstance(model, ConvNet):
                raise TypeError(
                    f"resume needs a cnnserve.model.ConvNet, got {type(model).__name__}"
                )
            if "augment" in kwargs:  # compared by its spec
                kwargs["augment"] = resolve_augment(kwargs["augment"]).spec()
            saved = checkpoint.state["options"]
            kwargs = merge_resumed_options(kwargs, saved, resume, list(_DEFAULTS))
        options = {**_DEFAULTS, **kwargs}

        self.update_rule_name = rule_name(options["update_rule"])
        self.update_rule = get_update_rule(options["update_rule"])
        optim_config = options["optim_config"]
        if optim_config is None:
            optim_config = {}
        if not isinstance(optim_config, Mapping):
            raise TypeError(f"optim_config must be a dict, got {type(optim_config).__name__}")
        self.optim_config = dict(optim_config)
        self.lr_decay = _check_number(options["lr_decay"], "lr_decay", 0, 1, "(]")
        self.batch_size = _check_int(options["batch_size"], "batch_size", 1)
        self.num_epochs = _check_int(options["num_epochs"], "num_epochs", 1)
        self.num_train_samples = self._check_optional_int(
            options["num_train_samples"], "num_train_samples"
        )
        self.num_val_samples = self._check_optional_int(
            options["num_val_samples"], "num_val_samples"
        )
        self.seed = _check_int(options["seed"], "seed", 0)
        named = options["record"].get("dataset") if isinstance(options["record"], Mapping) else None
        self.augment = resolve_augment(options["augment"], named)
        self.patience = check_patience(options["patience"])
        self.print_every = _check_int(options["print_every"], "print_every", 1)
        for name in ("verbose", "progress"):
            if not isinstance(options[name], bool):
                raise TypeError(f"{name} must be a bool, got {type(options[name]).__name__}")
        self.verbose = options["verbose"]
        self.progress = options["progress"]
        record = {} if options["record"] is None else options["record"]
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        self.record = dict(record)
        self.checkpoint_name = options["checkpoint_name"]
        if self.checkpoint_name is not None:
            self._check_checkpoint_name(self.checkpoint_name)
            if not isinstance(model, ConvNet):
                raise TypeError(
                    "checkpoint_name needs a cnnserve.model.ConvNet (checkpoints are model "
                    f"files), got {type(model).__name__}"
                )

        self.X_train, self.y_train, self.X_val, self.y_val = self._check_data(data)
        self.num_train = self.X_train.shape[0]
        self.augment.check_shape(self.X_train.shape)
        self.iterations_per_epoch = math.ceil(self.num_train / self.batch_size)
        self._validate_optim_config()
        self._reset()
        if checkpoint is not None:
            self._restore(checkpoint, resume)
        if self.checkpoint_name is not None:  # a new run or a resumed one: its own leftovers
            remove_stale_checkpoint_temps(self.checkpoint_name)

    # -- checks -------------------------------------------------------------------------------

    @staticmethod
    def _check_optional_int(value: Any, name: str) -> int | None:
        return None if value is None else _check_int(value, name, 1)

    @staticmethod
    def _check_model(model: Any) -> np.dtype:
        params = getattr(model, "params", None)
        if not isinstance(params, dict) or not params:
            raise TypeError(
                f"model must have a non-empty dict `params` of arrays, got {type(params).__name__}"
            )
        if not callable(getattr(model, "loss", None)):
            raise TypeError("model must have a method loss(X, y=None)")
        for name, value in params.items():
            if not isinstance(value, np.ndarray) or value.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"model.params[{name!r}] must be a float32 or float64 ndarray, got "
                    f"{getattr(value, 'dtype', type(value).__name__)}"
                )
        dtype = getattr(model, "dtype", None)
        dtype = np.dtype(dtype) if dtype is not None else next(iter(params.values())).dtype
        for name, value in params.items():
            if value.dtype != dtype:
                raise TypeError(
                    f"model.params[{name!r}] has dtype {value.dtype} but the model is {dtype}"
                )
        return dtype

    @staticmethod
    def _check_checkpoint_name(name: Any) -> None:
        if not isinstance(name, str | os.PathLike):
            raise TypeError(f"checkpoint_name must be a str or path, got {type(name).__name__}")
        parent = Path(name).parent
        if not parent.is_dir():
            raise ValueError(
                f"checkpoint_name {str(name)!r}: directory {str(parent)!r} does not exist"
            )

    def _check_data(self, data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        keys = ("X_train", "y_train", "X_val", "y_val")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(
                f"data is missing key(s) {', '.join(map(repr, missing))}; "
                f"expected {', '.join(map(repr, keys))}"
            )
        num_classes = getattr(self.model, "num_classes", None)
        input_shape = getattr(self.model, "input_shape", None)
        arrays = []
        for split in ("train", "val"):
            X, y = data[f"X_{split}"], data[f"y_{split}"]
            xname, yname = f"data['X_{split}']", f"data['y_{split}']"
            if not isinstance(X, np.ndarray):
                raise TypeError(f"{xname} must be a numpy.ndarray, got {type(X).__name__}")
            if X.dtype != self.dtype:
                raise TypeError(
                    f"{xname} has dtype {X.dtype} but the model is {self.dtype}: convert it "
                    f"first, e.g. data['X_{split}'].astype(np.{self.dtype.name})"
                )
            if X.ndim < 2 or X.shape[0] == 0:
                raise ValueError(f"{xname} must be (N, ...) with N >= 1, got shape {X.shape}")
            if input_shape is not None and X.shape[1:] != tuple(input_shape):
                raise ValueError(
                    f"{xname} must have shape (N, {', '.join(map(str, input_shape))}) for this "
                    f"model, got {X.shape}"
                )
            if arrays and X.shape[1:] != arrays[0].shape[1:]:
                raise ValueError(
                    f"{xname} samples have shape {X.shape[1:]} but data['X_train'] samples "
                    f"have shape {arrays[0].shape[1:]}"
                )
            if not isinstance(y, np.ndarray):
                raise TypeError(f"{yname} must be a numpy.ndarray, got {type(y).__name__}")
            if not np.issubdtype(y.dtype, np.integer):
                raise TypeError(f"{yname} must have an integer dtype, got {y.dtype}")
            if y.shape != (X.shape[0],):
                raise ValueError(
                    f"{yname} must have shape ({X.shape[0]},) (one label per row of {xname}), "
                    f"got {y.shape}"
                )
            low, high = int(y.min()), int(y.max())
            if low < 0 or (num_classes is not None and high >= num_classes):
                bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                bad = low if low < 0 else high
                raise ValueError(f"labels in {yname} must be in {bound}, got {bad}")
            arrays += [X, y]
        return arrays[0], arrays[1], arrays[2], arrays[3]

    def _validate_optim_config(self) -> None:
        """Run a built-in rule once on a dummy array so that a bad config fails here."""
        if self.update_rule_name in UPDATE_RULES:
            dummy = np.zeros(1, dtype=self.dtype)
            try:
                self.update_rule(dummy, dummy, copy.deepcopy(self.optim_config))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"optim_config for {self.update_rule_name!r}: {exc}") from None

    def _reset(self) -> None:
        """Fresh training state: no epochs done, empty histories, zeroed optimizer state."""
        self.rng = np.random.default_rng(self.seed)
        self.epoch = 0
        self.iteration = 0
        self.loss_history: list[float] = []
        self.train_acc_history: list[float] = []
        self.val_acc_history: list[float] = []
        self.val_loss_history: list[float] = []
        self.best_val_loss: float | None = None
        self.epoch_seconds: list[float] = []
        self.best_val_acc: float | None = None
        self.best_epoch: int | None = None
        self.best_params: dict[str, np.ndarray] = {}
        self.best_running_stats: list[dict[str, np.ndarray]] = []
        self.optim_configs = {p: copy.deepcopy(self.optim_config) for p in self.model.params}

    # -- training -----------------------------------------------------------------------------

    def _step(self, batch: np.ndarray, epoch: int, it: int) -> float:
        """One update on the training samples ``batch`` (indices); returns the loss.

        The update is all or nothing: if the loss or any updated parameter is not finite,
        nothing changes (parameters, optimizer state, batchnorm running statistics, the
        model's dropout generator) and :class:`TrainingDiverged` is raised.
        """
        X_batch = self.X_train[batch]
        y_batch = self.y_train[batch]
        if self.augment:
            stats = getattr(self.model, "normalization", None) or {}
            X_batch = self.augment.apply(X_batch, self._augment_rng, **stats)
        # The train-mode forward pass also moves the batchnorm running statistics and the
        # dropout generator: keep what they were, to put back if this step diverges.
        bn_params = getattr(self.model, "bn_params", [])
        running = [(bn.get("running_mean"), bn.get("running_var")) for bn in bn_params]
        model_rng = getattr(self.model, "rng", None)
        rng_state = None if model_rng is None else model_rng.bit_generator.state
        loss, grads = self.model.loss(X_batch, y_batch)
        loss = float(loss)
        bad = None if math.isfinite(loss) else f"the loss is {loss}"
        updates = {}
        if bad is None:
            for p, w in self.model.params.items():
                next_w, next_config = self.update_rule(w, grads[p], self.optim_configs[p])
                if not np.all(np.isfinite(next_w)):
                    bad = f"the update of parameter {p!r} has NaN or inf values (loss {loss})"
                    break
                updates[p] = (next_w, next_config)
        if bad is not None:
            for bn, (mean, var) in zip(bn_params, running, strict=True):
                bn["running_mean"], bn["running_var"] = mean, var
            if rng_state is not None:
                model_rng.bit_generator.state = rng_state
            last = self.loss_history[-1] if self.loss_history else None
            last_text = (
                f"the last finite loss was {last:.6g} (iteration {self.iteration})"
                if last is not None
                else "no earlier iteration"
            )
            lr = self.optim_configs[next(iter(self.optim_configs))].get("learning_rate")
            lr_text = f" (learning_rate is now {lr:g})" if isinstance(lr, float) else ""
            raise TrainingDiverged(
                f"training diverged at epoch {epoch + 1}/{self.num_epochs}, iteration "
                f"{it + 1}/{self.iterations_per_epoch} (iteration {self.iteration + 1} "
                f"overall): {bad}; {last_text}. The parameters are left as they were before "
                f"this iteration. Try a lower learning rate{lr_text}.",
                epoch=epoch + 1,
                iteration=it + 1,
                total_iteration=self.iteration + 1,
                loss=loss,
                last_finite_loss=last,
            )
        for p, (next_w, next_config) in updates.items():
            self.model.params[p] = next_w
            self.optim_configs[p] = next_config
        self.iteration += 1
        self.loss_history.append(loss)
        return loss

    def _subsample_rng(self) -> np.random.Generator:
        # Accuracy subsets depend on (seed, epochs done) only: resumable, and measuring
        # accuracy never shifts the training permutations.
        return np.random.default_rng([self.seed, self.epoch])

    def check_accuracy(
        self,
        X: np.ndarray,
        y: np.ndarray,
        num_samples: int | None = None,
        batch_size: int = 100,
    ) -> float:
        """Fraction of samples whose highest test-mode score is the label.

        Parameters
        ----------
        X : ndarray, shape (N, ...)
        y : ndarray of int, shape (N,)
        num_samples : int, optional
            Measure on a random subset of this many samples (drawn from a generator seeded by
            ``(seed, epoch)``, so it is reproducible); None (default) or ``>= N`` uses all.
        batch_size : int
            Samples per forward pass (default 100).

        Returns
        -------
        float
            Accuracy in [0, 1].
        """
        if not isinstance(X, np.ndarray) or not isinstance(y, np.ndarray):
            raise TypeError("X and y must be numpy.ndarrays")
        if X.ndim == 0 or y.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},), got {y.shape}")
        if X.shape[0] == 0:
            raise ValueError("X must hold at least one sample")
        num_samples = self._check_optional_int(num_samples, "num_samples")
        batch_size = _check_int(batch_size, "batch_size", 1)
        N = X.shape[0]
        if num_samples is not None and N > num_samples:
            mask = self._subsample_rng().choice(N, num_samples, replace=False)
            X, y = X[mask], y[mask]
            N = num_samples
        return self._evaluate(X, y, batch_size)[0]

    def _evaluate(self, X: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
        """Accuracy and mean softmax cross-entropy of the test-mode scores of ``X``."""
        correct, loss = 0, 0.0
        for start in range(0, X.shape[0], batch_size):
            scores = np.asarray(self.model.loss(X[start : start + batch_size]), dtype=np.float64)
            labels = y[start : start + batch_size]
            correct += int(np.sum(np.argmax(scores, axis=1) == labels))
            shifted = scores - scores.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            loss -= float(log_probs[np.arange(len(labels)), labels].sum())
        return correct / X.shape[0], loss / X.shape[0]

    def _out(self, message: str) -> None:
        if self.verbose:
            tqdm.write(message, file=sys.stdout)

    def train(self) -> None:
        """Run the remaining epochs, then restore the best-validation parameters.

        After each epoch: decay the learning rates, measure train/val accuracy, keep the best
        parameters, and (with ``checkpoint_name``) write the checkpoint and the history.

        Raises
        ------
        TrainingDiverged
            The loss or an update became NaN/inf. The model keeps the parameters of the
            iteration before (all finite); the last checkpoint, if any, is intact.
        """
        for epoch in range(self.epoch, self.num_epochs):
            if self.stopped_early:
                break
            started = time.perf_counter()
            order = self.rng.permutation(self.num_train)
            self._augment_rng = np.random.default_rng([self.seed, epoch, 1])
            shown = {k: v for k, v in self._epoch_results().items() if k != "loss"}
            bar = EpochProgress(
                epoch + 1,
                self.num_epochs,
                self.iterations_per_epoch,
                enabled=self.progress,
                plain_line=not self.verbose,
            )
            try:
                for it in range(self.iterations_per_epoch):
                    batch = order[it * self.batch_size : (it + 1) * self.batch_size]
                    loss = self._step(batch, epoch, it)
                    if self.iteration % self.print_every == 0:
                        self._out(
                            f"(Iteration {self.iteration} / "
                            f"{self.num_epochs * self.iterations_per_epoch}) loss: {loss:.6f}"
                        )
                    bar.update(loss, **shown)
                self._end_epoch(started)
                bar.finish(self.epoch_seconds[-1], **self._epoch_results())
            finally:
                bar.close()
            if self.stopped_early:
                message = early_stop_message(
                    self.epoch, self.num_epochs, self.best_epoch, self.best_val_acc, self.patience
                )
                self._out(message)
                if self.progress and not self.verbose:
                    print(message, file=sys.stderr, flush=True)
        self.restore_best()
        # The steps' buffers are no longer needed: give the memory back.
        release_buffer_cache()

    def _epoch_results(self) -> dict[str, str]:
        """The last epoch's loss and accuracies, formatted for the progress display."""
        if not self.train_acc_history:
            return {}
        return {
            "loss": f"{self.loss_history[-1]:.4f}",
            "train_acc": f"{self.train_acc_history[-1]:.3f}",
            "val_acc": f"{self.val_acc_history[-1]:.3f}",
        }

    @property
    def stopped_early(self) -> bool:
        """Whether ``patience`` epochs in a row have not improved (see :mod:`cnnserve.stopping`)."""
        return stopped_early(self.epoch, self.best_epoch, self.patience)

    @property
    def finished(self) -> bool:
        """Whether :meth:`train` has nothing left to do: every epoch run, or stopped early."""
        return self.epoch >= self.num_epochs or self.stopped_early

    def _end_epoch(self, started: float) -> None:
        self.epoch += 1
        for config in self.optim_configs.values():
            if "learning_rate" in config:
                config["learning_rate"] = config["learning_rate"] * self.lr_decay
            elif self.lr_decay != 1.0:
                raise ValueError(
                    f"lr_decay is {self.lr_decay} but the config of update rule "
                    f"{self.update_rule_name!r} has no 'learning_rate' to decay"
                )
        train_acc = self.check_accuracy(self.X_train, self.y_train, self.num_train_samples)
        X_val, y_val = self.X_val, self.y_val
        if self.num_val_samples is not None and X_val.shape[0] > self.num_val_samples:
            mask = self._subsample_rng().choice(X_val.shape[0], self.num_val_samples, replace=False)
            X_val, y_val = X_val[mask], y_val[mask]
        val_acc, val_loss = self._evaluate(X_val, y_val, 100)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        self.val_loss_history.append(val_loss)
        # Ties in accuracy (common on small validation sets) go to the lower validation loss.
        if (
            self.best_val_acc is None
            or val_acc > self.best_val_acc
            or (val_acc == self.best_val_acc and val_loss < self.best_val_loss)
        ):
            self.best_val_acc = val_acc
            self.best_val_loss = val_loss
            self.best_epoch = self.epoch
            self.best_params = {k: v.copy() for k, v in self.model.params.items()}
            self.best_running_stats = [
                {k: bn[k].copy() for k in ("running_mean", "running_var") if k in bn}
                for bn in getattr(self.model, "bn_params", [])
            ]
        self.epoch_seconds.append(time.perf_counter() - started)
        self._out(
            f"(Epoch {self.epoch} / {self.num_epochs}) train acc: {train_acc:.6f}; "
            f"val_acc: {val_acc:.6f}"
        )
        if self.checkpoint_name is not None:
            self._save_checkpoint()

    def restore_best(self) -> None:
        """Put the best-validation parameters (and batchnorm running statistics) in the model.

        Does nothing before the first epoch has ended. Copies, so ``best_params`` stay intact.
        """
        if not self.best_params:
            return
        for k, v in self.best_params.items():
            self.model.params[k] = v.copy()
        for bn, stats in zip(
            getattr(self.model, "bn_params", []), self.best_running_stats, strict=True
        ):
            for k, v in stats.items():
                bn[k] = v.copy()

    # -- history ------------------------------------------------------------------------------

    def options(self) -> dict:
        """The solver's options as a JSON-serialisable dict (``update_rule`` by name)."""
        return {
            "update_rule": self.update_rule_name,
            "optim_config": json_scalars(self.optim_config, "optim_config"),
            "lr_decay": self.lr_decay,
            "batch_size": self.batch_size,
            "num_epochs": self.num_epochs,
            "num_train_samples": self.num_train_samples,
            "num_val_samples": self.num_val_samples,
            "seed": self.seed,
            "augment": self.augment.spec(),
            "patience": self.patience,
            "checkpoint_name": None if self.checkpoint_name is None else str(self.checkpoint_name),
            "print_every": self.print_every,
            "verbose": self.verbose,
            "progress": self.progress,
            "record": self.record,
        }

    def history(self) -> dict:
        """The training history as a JSON-serialisable dict (see :mod:`cnnserve.history`)."""
        return {
            "format": HISTORY_FORMAT,
            "version": 1,
            "loss_history": list(self.loss_history),
            "train_acc_history": list(self.train_acc_history),
            "val_acc_history": list(self.val_acc_history),
            "val_loss_history": list(self.val_loss_history),
            "iterations_per_epoch": self.iterations_per_epoch,
            "epochs_completed": self.epoch,
            "num_epochs": self.num_epochs,
            "iterations_completed": self.iteration,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "options": self.options(),
            "timings": {
                "epoch_seconds": list(self.epoch_seconds),
                "total_seconds": float(sum(self.epoch_seconds)),
            },
        }

    def save_history(self, path: str | os.PathLike) -> Path:
        """Write :meth:`history` to ``path`` as JSON, atomically; returns the path."""
        return write_history(self.history(), path)

    def plot_history(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Draw :meth:`history` as a PNG (see :func:`cnnserve.history.plot_history`)."""
        return plot_history(self.history(), path, **kwargs)

    # -- checkpoints --------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        """``{checkpoint_name}.safetensors``, or None without ``checkpoint_name``."""
        if self.checkpoint_name is None:
            return None
        return Path(f"{os.fspath(self.checkpoint_name)}.safetensors")

    def _save_checkpoint(self) -> None:
        write_checkpoint(self)

    def _restore(self, checkpoint: Any, path: Any) -> None:
        restore_checkpoint(self, checkpoint, path)
