"""How well a model classifies a data split: accuracy and the confusion matrix.

:func:`evaluate` is what ``cnnserve evaluate`` prints (and, with ``--json``, writes); the
training command reports :func:`accuracy` of each split after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnserve._checks import check_int

__all__ = [
    "Evaluation",
    "accuracy",
    "confusion_matrix",
    "evaluate",
    "format_confusion",
    "renormalised",
]


def accuracy(model: Any, X: np.ndarray, y: np.ndarray) -> float | None:
    """The share of ``X`` (N, C, H, W) that ``model.predict`` labels ``y`` (N,); None if N = 0."""
    return float(np.mean(model.predict(X) == y)) if len(y) else None


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``m[i, j]`` of samples of class ``i`` predicted as ``j``: (K, K) int64."""
    num_classes = check_int(num_classes, "num_classes", 1)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def format_confusion(matrix: np.ndarray, names: Sequence[str]) -> str:
    """The confusion matrix as a text table, true classes down, predictions across."""
    labels = [str(n)[:10] for n in names]
    width = max(max(len(s) for s in labels), len(str(int(matrix.max()))), 4)
    head = " " * (width + 2) + " ".join(f"{s:>{width}}" for s in labels)
    lines = ["true \\ predicted", head]
    for label, row in zip(labels, matrix, strict=True):
        lines.append(f"{label:>{width}}  " + " ".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def renormalised(model: Any, X: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """A split normalised with the data set's ``mean``/``std`` (C,), normalised again with the
    model's own statistics (the ones its model file keeps), as inference would see it."""
    x01 = X.astype(np.float64) * std[:, None, None] + mean[:, None, None]
    return model.preprocess(x01)


@dataclass(frozen=True, eq=False)
class Evaluation:
    """A model's results on one split.

    Attributes
    ----------
    accuracy : float
    confusion : ndarray, shape (K, K), int64
        ``confusion[i, j]``: samples of class i predicted as j.
    class_names : tuple of str
    """

    accuracy: float
    confusion: np.ndarray
    class_names: tuple[str, ...]

    @property
    def samples(self) -> int:
        """The number of samples evaluated."""
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        """The number classified correctly."""
        return int(np.trace(self.confusion))

    def to_dict(self) -> dict:
        """JSON-ready: ``samples``, ``accuracy``, ``class_names``, ``confusion_matrix``."""
        return {
            "samples": self.samples,
            "accuracy": self.accuracy,
            "class_names": list(self.class_names),
            "confusion_matrix": self.confusion.tolist(),
        }

    def text(self) -> str:
        """The accuracy and the confusion matrix, as ``cnnserve evaluate`` prints them."""
        return "\n".join(
            [
                f"accuracy: {self.accuracy:.4f} ({self.correct}/{self.samples})",
                format_confusion(self.confusion, self.class_names),
            ]
        )


def evaluate(model: Any, X: np.ndarray, y: np.ndarray) -> Evaluation:
    """Classify ``X`` (N, C, H, W) with ``model`` and compare with the labels ``y`` (N,).

    Raises
    ------
    ValueError
        An empty split.
    """
    if len(y) == 0:
        raise ValueError("cannot evaluate an empty split")
    predicted = model.predict(X)
    matrix = confusion_matrix(y, predicted, model.num_classes)
    return Evaluation(float(np.mean(predicted == y)), matrix, tuple(model.class_names))
