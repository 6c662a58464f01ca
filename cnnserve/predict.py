"""Class scores of one image: what ``cnnserve predict`` prints and the service's /predict returns.

An image of the training size goes through the network as it is. An image of any other size
is first resized to the training size (bilinear, with Pillow's antialiasing when it shrinks),
so that the whole image is classified as one input: for where in a large image a class is,
use a score map (:func:`cnnserve.dense.score_map`).

An image whose channels are not the model's is converted first (colour to grey by ITU-R 601
luma, grey to RGB by repetition: :func:`cnnserve.images.to_channels`), and the result's
``converted`` says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnserve._checks import check_int
from cnnserve.convert import FullyConvNet, as_fully_convolutional
from cnnserve.images import model_pixels, resize
from cnnserve.network import ConvNet

__all__ = ["Prediction", "network_input", "predict", "prediction", "ranked"]


def ranked(probabilities: np.ndarray, k: int, class_names: Sequence[str]) -> list[dict]:
    """The k most likely classes: ``[{"label", "index", "probability"}]``, best first.

    Ties keep the class order. The form of every ranking cnnserve returns (a prediction's
    top-k, a score map's aggregates).

    Parameters
    ----------
    probabilities : ndarray, shape (K,)
    k : int
        At most K.
    class_names : sequence of str, K names
    """
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {"label": class_names[c], "index": int(c), "probability": float(probabilities[c])}
        for c in order
    ]


@dataclass(frozen=True, eq=False)
class Prediction:
    """The class scores of one image.

    Attributes
    ----------
    probabilities : ndarray, shape (K,)
        Softmax of the network's scores, float64.
    class_names : tuple of str
    image_size : tuple of int
        ``(H, W)`` of the image as given.
    resized_to : tuple of int or None
        ``(Th, Tw)`` when the image was resized to the training size, else None.
    converted : str or None
        How the image's channels were converted for the model (e.g. ``"RGB to grey (ITU-R
        601 luma)"``), or None when they were the model's.
    """

    probabilities: np.ndarray
    class_names: tuple[str, ...]
    image_size: tuple[int, int]
    resized_to: tuple[int, int] | None
    converted: str | None = None

    def top_k(self, k: int = 5) -> list[dict]:
        """The k most likely classes, ``[{"label", "index", "probability"}]``.

        ``k`` is clamped to the number of classes.
        """
        k = min(check_int(k, "k", 1), len(self.class_names))
        return ranked(self.probabilities, k, self.class_names)

    def to_dict(self, top_k: int = 5) -> dict:
        """The answer's JSON, as ``/predict`` and ``cnnserve predict --json`` give it.

        Returns
        -------
        dict
            ``predictions`` (:meth:`top_k`), ``image_size`` ``[H, W]``, ``resized_to``
            ``[Th, Tw]`` or None, and ``converted`` (a text or None).
        """
        return {
            "predictions": self.top_k(top_k),
            "image_size": list(self.image_size),
            "resized_to": list(self.resized_to) if self.resized_to else None,
            "converted": self.converted,
        }


def predict(model: FullyConvNet | ConvNet | str | os.PathLike, image: Any) -> Prediction:
    """Classify one image as a whole.

    Parameters
    ----------
    model : FullyConvNet, ConvNet or path
        A converted network (the service's), a trained one, or a model file of either kind.
        The converted network's scores on a training-size input are the original network's
        (its self-check); it runs with batchnorm folded into the convs.
    image : ndarray
        ``(H, W)`` or ``(C, H, W)`` with C 1 (grey) or 3 (RGB), converted to the model's
        channels when they differ; uint8 pixels or floats in [0, 1]; any size >= 1x1
        (resized to the training size when it differs).

    Returns
    -------
    Prediction

    Raises
    ------
    TypeError, ValueError
        A bad image (shape, channels, dtype, range).

    Shape
    -----
    ``(C, H, W)`` -> ``probabilities`` of shape ``(K,)``.
    """
    fcn = as_fully_convolutional(model)
    x, size, resized, converted = network_input(fcn, image)
    scores = fcn.forward(x)[0, :, 0, 0]  # (K,)
    return prediction(fcn, scores, size, resized, converted)


def network_input(
    fcn: FullyConvNet, image: Any
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int] | None, str | None]:
    """The network's input for one image, as :func:`predict` makes it.

    Parameters
    ----------
    fcn : FullyConvNet
    image : ndarray
        As for :func:`predict`.

    Returns
    -------
    x : ndarray, shape (1, C, Th, Tw)
        The image resized to the training size (when it differs) and preprocessed.
    size : tuple of int
        ``(H, W)`` of the image as given.
    resized : tuple of int or None
        ``(Th, Tw)`` when the image was resized, else None.
    converted : str or None
        How the image's channels were converted (:func:`cnnserve.images.to_channels`).
    """
    pixels, converted = model_pixels(image, fcn.input_shape[0])  # (C, H, W) float32, [0, 1]
    size = (pixels.shape[1], pixels.shape[2])
    target = fcn.geometry.window  # the training size (Th, Tw)
    resized = None
    if size != tuple(target):
        pixels = resize(pixels, *target)
        resized = (int(target[0]), int(target[1]))
    return fcn.preprocess(pixels[None]), size, resized, converted


def prediction(
    fcn: FullyConvNet,
    scores: np.ndarray,
    size: tuple[int, int],
    resized: tuple[int, int] | None,
    converted: str | None = None,
) -> Prediction:
    """The :class:`Prediction` of one image from the network's scores ``(K,)`` on it."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores - scores.max()
    probabilities = np.exp(scores)
    probabilities /= probabilities.sum()
    return Prediction(probabilities, fcn.class_names, size, resized, converted)
