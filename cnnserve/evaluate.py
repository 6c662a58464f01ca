"""How well a model classifies a data split: accuracy, the confusion matrix and, per class,
precision, recall, F1 and support.

Per class ``k`` (``m`` the confusion matrix, true classes down): precision ``m[k, k] /
m[:, k].sum()`` (of the samples predicted ``k``, the share that are ``k``), recall ``m[k, k] /
m[k, :].sum()`` (of the samples of class ``k``, the share found), F1 their harmonic mean, support
``m[k, :].sum()``. A ratio with nothing to divide by (no sample predicted ``k``, or none of class
``k``) is undefined: None in Python and JSON, ``-`` in the text, and left out of the macro
average (the mean over the classes where it is defined); the weighted average weighs each class
by its support.

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
    "class_metrics",
    "confusion_matrix",
    "evaluate",
    "format_confusion",
    "format_class_metrics",
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
    """The confusion matrix as a text table, true classes down, predictions across, every
    class named in full."""
    labels = [str(n) for n in names]
    width = max(max(len(s) for s in labels), len(str(int(matrix.max()))), 4)
    head = " " * (width + 2) + " ".join(f"{s:>{width}}" for s in labels)
    lines = ["true \\ predicted", head]
    for label, row in zip(labels, matrix, strict=True):
        lines.append(f"{label:>{width}}  " + " ".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def class_metrics(matrix: np.ndarray) -> dict[str, list]:
    """Per-class precision, recall, F1 and support of a confusion matrix (K, K).

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1``: lists of K floats or None (undefined, see the
        module docstring); ``support``: K ints.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    hits = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)

    def ratio(num: np.ndarray, den: np.ndarray) -> list:
        return [float(n / d) if d else None for n, d in zip(num, den, strict=True)]

    precision, recall = ratio(hits, predicted), ratio(hits, support)
    f1 = [
        None if p is None or r is None else (0.0 if p + r == 0 else 2 * p * r / (p + r))
        for p, r in zip(precision, recall, strict=True)
    ]
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.tolist()}


def _averages(metrics: dict[str, list]) -> dict[str, dict]:
    """The macro and the support-weighted averages of :func:`class_metrics`."""
    support = np.asarray(metrics["support"], dtype=np.float64)
    out: dict[str, dict] = {"macro": {}, "weighted": {}}
    for key in ("precision", "recall", "f1"):
        values = metrics[key]
        defined = [v for v in values if v is not None]
        out["macro"][key] = float(np.mean(defined)) if defined else None
        weights = np.array(
            [s if v is not None else 0.0 for v, s in zip(values, support, strict=True)]
        )
        total = weights.sum()
        filled = np.array([0.0 if v is None else v for v in values])
        out["weighted"][key] = float(filled @ weights / total) if total else None
    for kind in out:
        out[kind]["support"] = int(support.sum())
    return out


def format_class_metrics(matrix: np.ndarray, names: Sequence[str]) -> str:
    """Precision, recall, F1 and support per class as a text table, every class named in
    full, then the macro and weighted averages."""
    metrics = class_metrics(matrix)
    averages = _averages(metrics)
    rows = [
        (str(name), *(metrics[k][i] for k in ("precision", "recall", "f1", "support")))
        for i, name in enumerate(names)
    ]
    rows += [
        (f"{kind} avg", *(averages[kind][k] for k in ("precision", "recall", "f1", "support")))
        for kind in ("macro", "weighted")
    ]
    width = max(12, *(len(r[0]) for r in rows))
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for i, (name, p, r, f, n) in enumerate(rows):
        if i == len(names):
            lines.append("")
        shown = ["-" if v is None else f"{v:.4f}" for v in (p, r, f)]
        lines.append(f"{name:<{width}}  {shown[0]:>9}  {shown[1]:>6}  {shown[2]:>6}  {n:>7}")
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

    def per_class(self) -> list[dict]:
        """Per class: ``{"class", "index", "precision", "recall", "f1", "support"}`` (None
        where a ratio is undefined)."""
        metrics = class_metrics(self.confusion)
        keys = ("precision", "recall", "f1", "support")
        return [
            {"class": name, "index": k, **{key: metrics[key][k] for key in keys}}
            for k, name in enumerate(self.class_names)
        ]

    def to_dict(self) -> dict:
        """JSON-ready: ``samples``, ``accuracy``, ``class_names``, ``confusion_matrix``,
        ``per_class`` (see :meth:`per_class`) and ``averages`` (``macro`` and ``weighted``
        precision, recall, F1 and support)."""
        return {
            "samples": self.samples,
            "accuracy": self.accuracy,
            "class_names": list(self.class_names),
            "confusion_matrix": self.confusion.tolist(),
            "per_class": self.per_class(),
            "averages": _averages(class_metrics(self.confusion)),
        }

    def text(self) -> str:
        """The accuracy, the confusion matrix and the per-class table, as ``cnnserve
        evaluate`` prints them."""
        return "\n".join(
            [
                f"accuracy: {self.accuracy:.4f} ({self.correct}/{self.samples})",
                format_confusion(self.confusion, self.class_names),
                "",
                format_class_metrics(self.confusion, self.class_names),
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
