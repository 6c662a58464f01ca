"""Accuracy and confusion matrices (cnnserve.evaluate)."""

import numpy as np
import pytest

from cnnserve.evaluate import Evaluation, confusion_matrix, evaluate, format_confusion


def test_confusion_matrix_counts():
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    assert format_confusion(matrix, ["x", "y", "z"]).splitlines()[2].split() == ["x", "1", "1", "0"]


class _Constant:
    """A model that predicts the given labels, whatever the input."""

    num_classes = 3
    class_names = ("x", "y", "z")

    def __init__(self, predicted):
        self.predicted = np.array(predicted)

    def predict(self, X):
        return self.predicted


def test_evaluate_counts_accuracy_and_confusion():
    y = np.array([0, 0, 1, 2, 2])
    result = evaluate(_Constant([0, 1, 1, 2, 0]), np.zeros((5, 1, 2, 2)), y)
    assert isinstance(result, Evaluation)
    assert result.accuracy == pytest.approx(0.6) and (result.correct, result.samples) == (3, 5)
    np.testing.assert_array_equal(result.confusion, confusion_matrix(y, [0, 1, 1, 2, 0], 3))
    assert result.to_dict()["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert result.text().splitlines()[0] == "accuracy: 0.6000 (3/5)"


def test_evaluate_refuses_an_empty_split():
    with pytest.raises(ValueError, match="empty split"):
        evaluate(_Constant([]), np.zeros((0, 1, 2, 2)), np.zeros(0, dtype=np.int64))
