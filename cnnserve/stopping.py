"""Why training stops before its last epoch: early stopping (``patience``) and divergence.

Early stopping watches the validation accuracy after every epoch. An epoch *improves* when its
validation accuracy is higher than every earlier epoch's, or equal to the best with a lower
validation loss (small validation sets saturate: the loss breaks the tie); this is the same
rule by which the :class:`~cnnserve.solver.Solver` keeps its best parameters. With
``patience=N`` training stops once ``N`` epochs in a row have not improved, and the model keeps
the weights of the best epoch. The state is the run's own history (the best epoch and the
epochs done), so a checkpoint of a stopped run stays stopped when it is resumed with the same
patience, and goes on with a larger one.
"""

from __future__ import annotations

from typing import Any

from cnnserve._checks import check_int

__all__ = ["TrainingDiverged", "check_patience", "early_stop_message", "stopped_early"]


def check_patience(patience: Any) -> int | None:
    """``patience`` checked: None (no early stopping) or an int >= 1."""
    return None if patience is None else check_int(patience, "patience", 1)


def stopped_early(epoch: int, best_epoch: int | None, patience: int | None) -> bool:
    """Whether a run at ``epoch`` (epochs done) whose best epoch is ``best_epoch`` has had
    ``patience`` epochs in a row without improvement."""
    return patience is not None and best_epoch is not None and epoch - best_epoch >= patience


def early_stop_message(
    epoch: int, num_epochs: int, best_epoch: int, best_val_acc: float, patience: int
) -> str:
    """The line that says a run stopped early and which weights it keeps."""
    return (
        f"early stopping after epoch {epoch} of {num_epochs}: validation accuracy has not "
        f"improved for {patience} epoch{'s' if patience != 1 else ''} (patience {patience}); "
        f"keeping the weights of epoch {best_epoch} (val acc {best_val_acc:.4f})"
    )


class TrainingDiverged(RuntimeError):
    """The training loss (or an updated parameter) became NaN or infinite.

    Attributes
    ----------
    epoch : int
        The epoch it happened in, counted from 1.
    iteration : int
        The iteration within that epoch, counted from 1.
    total_iteration : int
        The iteration counted over the whole run, from 1.
    loss : float
        The non-finite loss (or the finite loss whose update was not finite).
    last_finite_loss : float or None
        The loss of the last iteration whose update was applied.
    """

    def __init__(
        self,
        message: str,
        *,
        epoch: int,
        iteration: int,
        total_iteration: int,
        loss: float,
        last_finite_loss: float | None,
    ) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.iteration = iteration
        self.total_iteration = total_iteration
        self.loss = loss
        self.last_finite_loss = last_finite_loss
