"""The shipped models meet the targets the README states for them.

- ``models/mnist_lenet.safetensors``: a padding-free LeNet on mnist-5k, trained with
  augmentation: at least 97 % on the held-out test split its training record names.
- ``models/faces.safetensors``: a padding-free face / background classifier on ``faces``,
  trained with augmentation: over :data:`FACE_SCALES` its best detection on scikit-image's
  astronaut photo is her face (IoU >= 0.5 with the box measured by hand), and on the held-out
  face-free photos (never used in training) it reports no detection at its threshold.

Each test loads the file and evaluates it (seconds): nothing is trained here.
"""

from __future__ import annotations

import numpy as np
import pytest

from cnnserve.data import load_dataset
from cnnserve.data.faces import HELD_OUT_PHOTOS, NEGATIVE_PHOTOS, photo
from cnnserve.dense import score_map
from cnnserve.evaluate import accuracy, renormalised
from cnnserve.model import read_model_file
from tests.shipped_models import (
    ASTRONAUT_FACE,
    FACE_SCALES,
    FACE_STRIDE_DIVISOR,
    FACE_THRESHOLD,
    FACES,
    MNIST_LENET,
    iou,
)


def _padding_free(model) -> bool:
    return all(spec.get("pad", 0) == 0 for spec in model.layers if spec["type"] == "conv")


def _detections(model, name: str) -> list:
    """The face detections of the model on a bundled photo, sent as the RGB photo it is."""
    pixels = np.moveaxis(photo(name), -1, 0)  # (3, H, W): the model converts it to grey
    result = score_map(model, pixels, scales=FACE_SCALES, stride_divisor=FACE_STRIDE_DIVISOR)
    return result.detections("face", threshold=FACE_THRESHOLD)


@pytest.fixture(scope="module")
def faces_model():
    return read_model_file(FACES)


def test_mnist_lenet_scores_97_percent_on_its_held_out_test_split():
    file = read_model_file(MNIST_LENET)
    model, record = file.model, file.training
    assert record["dataset"] == "mnist-5k" and record["augment"] != "none", record
    assert _padding_free(model) and model.input_shape == (1, 28, 28)
    data = load_dataset(
        "mnist-5k",
        seed=record["seed"],
        val_fraction=record["val_fraction"],
        test_fraction=record["test_fraction"],
    )
    assert len(data.y_test) == record["num_test"] == 1000
    acc = accuracy(model, renormalised(model, data.X_test, data.mean, data.std), data.y_test)
    assert acc >= 0.97
    assert acc == pytest.approx(record["test_acc"], abs=1e-9)  # the figure the file records


def test_faces_model_is_a_padding_free_detector_trained_with_augmentation(faces_model):
    model, record = faces_model.model, faces_model.training
    assert model.class_names == ("background", "face") and model.input_shape == (1, 25, 25)
    assert _padding_free(model)
    assert record["dataset"] == "faces" and record["augment"] != "none", record
    assert not set(HELD_OUT_PHOTOS) & set(NEGATIVE_PHOTOS)


def test_faces_model_finds_the_astronauts_face(faces_model):
    found = _detections(faces_model.model, "astronaut")
    assert found, "no face on the astronaut photo"
    best = found[0]
    assert best.class_name == "face" and best.score >= FACE_THRESHOLD
    assert iou(best.box, ASTRONAUT_FACE) >= 0.5, best
    assert best.scale in FACE_SCALES


@pytest.mark.parametrize("name", HELD_OUT_PHOTOS)
def test_faces_model_finds_no_face_on_the_held_out_face_free_photos(faces_model, name):
    assert _detections(faces_model.model, name) == []
