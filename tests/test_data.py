"""Data sets: digits, IDX, CIFAR-10 batches and image folders, built tiny in tmp_path."""

import gzip
import os
import pickle
import re
import struct

import numpy as np
import pytest
from PIL import Image

from cnnserve.data import DataError, Dataset, load_dataset, normalize

# ---------------------------------------------------------------------------------------------
# Writers of tiny data sets in the real formats
# ---------------------------------------------------------------------------------------------

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(arr, *, type_code=0x08, itemtype=">u1"):
    arr = np.asarray(arr)
    header = bytes([0, 0, type_code, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(itemtype).tobytes()


def write_file(path, payload):
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_idx(root, *, n_train=40, n_test=10, hw=(4, 5), classes=4, gz=False):
    """Train image i is filled with i (test: 200 + i) so that every sample can be told apart."""
    root.mkdir(parents=True, exist_ok=True)
    H, W = hw
    arrays = {
        "train_images": np.arange(n_train, dtype=np.uint8)[:, None, None] * np.ones((H, W), int),
        "train_labels": np.arange(n_train) % classes,
        "test_images": (200 + np.arange(n_test))[:, None, None] * np.ones((H, W), int),
        "test_labels": np.arange(n_test) % classes,
    }
    suffix = ".gz" if gz else ""
    for key, arr in arrays.items():
        write_file(root / (IDX_NAMES[key] + suffix), idx_bytes(arr))
    return root


def sample_ids(ds, X):
    """Undo the normalisation (float64 data sets) and read the id stored in pixel (0, 0)."""
    x01 = X * ds.std[:, None, None] + ds.mean[:, None, None]
    return np.rint(x01[:, 0, 0, 0] * 255).astype(int)


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (BINSTRING), like the real CIFAR-10 files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str8(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_str8
    dispatch[str] = save_str8


def dump_pickle(path, obj, *, py2=False, protocol=4):
    if py2:
        import io

        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        # Python 2 numpy wrote its globals as numpy.core.multiarray
        payload = buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    else:
        payload = pickle.dumps(obj, protocol=protocol)
    path.write_bytes(payload)


CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]


def make_cifar(root, *, n_batches=2, per_batch=10, n_test=5, py2=False, protocol=4):
    """Image i (over all training batches) has first byte i; test image j has 200 + j."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    k = len(CIFAR_NAMES)
    for b in range(n_batches):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[:, 0] = b * per_batch + np.arange(per_batch)
        labels = [int(v) % k for v in data[:, 0]]
        batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data}
        dump_pickle(root / f"data_batch_{b + 1}", batch, py2=py2, protocol=protocol)
    data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    data[:, 0] = 200 + np.arange(n_test)
    test = {b"labels": [j % k for j in range(n_test)], b"data": data}
    dump_pickle(root / "test_batch", test, py2=py2, protocol=protocol)
    meta = {b"label_names": CIFAR_NAMES, b"num_vis": 3072}
    dump_pickle(root / "batches.meta", meta, py2=py2, protocol=protocol)
    return root


def save_image(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path, **kw)
    return path


def make_folder(root, classes=("cat", "dog", "eel"), per_class=5, hw=(6, 7), rgb=True, seed=0):
    """Random images; returns {image bytes (C, H, W): class index} for exact round trips."""
    rng = np.random.default_rng(seed)
    expected = {}
    for k, name in enumerate(classes):
        for i in range(per_class):
            shape = hw + (3,) if rgb else hw
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            save_image(root / name / f"img{i}.png", arr)
            chw = arr.transpose(2, 0, 1) if rgb else arr[None]
            expected[chw.tobytes()] = k
    return expected


def pixels(ds, X):
    """The 8-bit pixels of normalised X (float64 data sets)."""
    x01 = X * ds.std[:, None, None] + ds.mean[:, None, None]
    return np.rint(x01 * 255).astype(np.uint8)


def check_normalised(ds, tol=1e-6):
    """Training statistics: normalised train data has mean 0 and std 1 per channel."""
    X = ds.X_train.astype(np.float64)
    np.testing.assert_allclose(X.mean(axis=(0, 2, 3)), 0, atol=tol)
    np.testing.assert_allclose(X.std(axis=(0, 2, 3)), 1, atol=tol)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def test_digits_shapes_classes_and_splits(digits):
    ds = digits
    assert isinstance(ds, Dataset)
    assert ds.name == "digits" and ds.format == "digits"
    assert ds.class_names == tuple("0123456789") and ds.num_classes == 10
    assert ds.input_shape == (1, 8, 8)
    n = len(ds.y_train) + len(ds.y_val) + len(ds.y_test)
    assert n == 1797
    assert (len(ds.y_val), len(ds.y_test)) == (180, 359)  # round(0.1 * 1797), round(0.2 * 1797)
    for X, y in [(ds.X_train, ds.y_train), (ds.X_val, ds.y_val), (ds.X_test, ds.y_test)]:
        assert X.dtype == np.float32 and X.shape[1:] == (1, 8, 8) and X.flags.c_contiguous
        assert y.dtype == np.int64 and y.shape == X.shape[:1]
    assert ds.mean.dtype == np.float64 and ds.mean.shape == (1,) and ds.std.shape == (1,)
    check_normalised(ds, tol=1e-5)
    # stratified: each class in each split in proportion, to within one sample
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_val, ds.y_test]), minlength=10)
    for y, frac in [(ds.y_val, 0.1), (ds.y_test, 0.2)]:
        assert np.all(np.abs(np.bincount(y, minlength=10) - frac * counts) <= 1.5)


def test_digits_values_are_sixteenths_and_stats_come_from_train(digits):
    ds = load_dataset("DIGITS", dtype=np.float64)
    x01 = ds.X_train * ds.std[0] + ds.mean[0]
    np.testing.assert_allclose(x01 * 16, np.rint(x01 * 16), atol=1e-9)
    assert x01.min() > -1e-12 and x01.max() <= 1 + 1e-12
    assert ds.mean[0] == pytest.approx(x01.mean(), abs=1e-12)
    assert ds.std[0] == pytest.approx(x01.std(), abs=1e-12)
    # the same seed gives the same split as the float32 fixture
    np.testing.assert_array_equal(ds.y_train, digits.y_train)
    np.testing.assert_allclose(ds.X_test, digits.X_test, atol=1e-5)


def test_split_is_deterministic_and_independent_of_global_state(digits):
    np.random.seed(123)  # noqa: NPY002 - the global state must not matter
    again = load_dataset("digits")
    np.random.seed(456)  # noqa: NPY002
    _ = np.random.random(10)  # noqa: NPY002
    again2 = load_dataset("digits", seed=0)
    for ds in (again, again2):
        for part in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
            np.testing.assert_array_equal(getattr(ds, part), getattr(digits, part))
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)
    assert not np.array_equal(other.X_test, digits.X_test)
    assert len(other.y_train) == len(digits.y_train)


def test_limit_keeps_a_stratified_prefix_and_recomputes_stats(digits):
    ds = load_dataset("digits", limit=100)
    assert len(ds.y_train) == 100
    assert len(ds.y_val) == len(digits.y_val) and len(ds.y_test) == len(digits.y_test)
    np.testing.assert_array_equal(ds.y_test, digits.y_test)
    assert np.all(np.abs(np.bincount(ds.y_train, minlength=10) - 10) <= 1)
    check_normalised(ds, tol=1e-5)
    assert ds.mean[0] != digits.mean[0]
    assert len(load_dataset("digits", limit=10**6).y_train) == len(digits.y_train)


def test_fractions_zero_and_custom(digits):
    ds = load_dataset("digits", val_fraction=0.0, test_fraction=0.5)
    assert ds.X_val.shape == (0, 1, 8, 8) and ds.y_val.shape == (0,)
    assert len(ds.y_test) == 899 and len(ds.y_train) == 898


def test_dataset_helpers(digits):
    data = digits.solver_data()
    assert set(data) == {"X_train", "y_train", "X_val", "y_val"}
    assert data["X_train"] is digits.X_train and data["y_val"] is digits.y_val
    text = digits.summary()
    assert "digits" in text and "1x8x8" in text and "10 classes" in text
    assert "train 1258 / val 180 / test 359" in text and len(text.splitlines()) == 2


def test_dataset_checks_its_fields(digits):
    fields = {k: getattr(digits, k) for k in Dataset.__dataclass_fields__}
    with pytest.raises(ValueError, match="y_val must be int64"):
        Dataset(**{**fields, "y_val": digits.y_val.astype(np.int32)})
    with pytest.raises(ValueError, match="X_test must have shape"):
        Dataset(**{**fields, "X_test": digits.X_test[:, :, :4]})
    with pytest.raises(ValueError, match="mean must be float64"):
        Dataset(**{**fields, "mean": np.zeros(3)})
    with pytest.raises(ValueError, match="format must be one of"):
        Dataset(**{**fields, "format": "png"})


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"seed": True}, TypeError, "seed must be an int"),
        ({"val_fraction": 1.0}, ValueError, r"val_fraction must be in \[0, 1\), got 1.0"),
        ({"val_fraction": -0.1}, ValueError, "val_fraction must be in"),
        ({"val_fraction": float("nan")}, ValueError, "val_fraction must be in"),
        ({"val_fraction": "0.1"}, TypeError, "val_fraction must be a number"),
        ({"test_fraction": 1}, ValueError, "test_fraction must be in"),
        (
            {"val_fraction": 0.5, "test_fraction": 0.5},
            ValueError,
            r"val_fraction \+ test_fraction must be below 1",
        ),
        ({"dtype": np.int32}, TypeError, "dtype must be float32 or float64"),
        ({"dtype": "float16"}, TypeError, "dtype must be float32 or float64"),
        ({"dtype": "nonsense"}, TypeError, "dtype must be float32 or float64"),
        ({"dtype": None}, TypeError, "dtype must be float32 or float64"),
        ({"limit": 0}, ValueError, "limit must be >= 1, got 0"),
        ({"limit": 2.0}, TypeError, "limit must be an int"),
        ({"format": "mnist"}, ValueError, "format must be one of"),
        ({"format": "idx"}, ValueError, "source 'digits' is the digits format"),
        ({"image_size": (0, 4)}, ValueError, "image_size must be >= 1"),
        ({"image_size": (4,)}, TypeError, r"image_size must be a pair \(H, W\)"),
        ({"image_size": (8, 8)}, ValueError, "image_size applies to image folders only"),
    ],
)
def test_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        load_dataset("digits", **kwargs)


def test_bad_source_type_and_digits_format_on_a_path(tmp_path):
    with pytest.raises(
        TypeError,
        match=r"source must be one of \('digits', 'digits-windows', 'faces', 'mnist-5k'\) or a path, got int",
    ):
        load_dataset(123)
    with pytest.raises(ValueError, match="format='digits' needs source='digits'"):
        load_dataset(tmp_path, format="digits")


def test_string_dtype_is_accepted():
    ds = load_dataset("digits", dtype="float64", limit=50)
    assert ds.X_train.dtype == ds.X_val.dtype == ds.X_test.dtype == np.float64


# ---------------------------------------------------------------------------------------------
# normalize
# ---------------------------------------------------------------------------------------------


def test_normalize_formula_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    x = rng.random((4, 3, 5, 6))
    mean, std = np.array([0.1, 0.5, 0.9]), np.array([0.2, 1.0, 0.3])
    x_copy = x.copy()
    out = normalize(x, mean, std)
    assert out.dtype == np.float32 and out.shape == x.shape
    expected = (x - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(x, x_copy)
    out64 = normalize(x.astype(np.float32), list(mean), tuple(std), dtype=np.float64)
    assert out64.dtype == np.float64
    single = normalize(x[2], mean, std, dtype=np.float64)
    assert single.shape == (3, 5, 6)
    np.testing.assert_allclose(single, expected[2], rtol=1e-12)


def test_normalize_accepts_round_off_of_float32_data(digits):
    # un-normalising float32 data gives values a hair outside [0, 1]: they are fine
    x01 = digits.X_test.astype(np.float64) * digits.std[0] + digits.mean[0]
    out = normalize(x01, digits.mean, digits.std)
    np.testing.assert_allclose(out, digits.X_test, atol=1e-5)
    assert normalize(np.full((1, 1, 1), 1.0005), [0.5], [0.5])[0, 0, 0] == pytest.approx(1.001)
    with pytest.raises(ValueError, match="1 values outside, e.g. 1.01"):
        normalize(np.full((1, 1, 1), 1.01), [0.5], [0.5])


def test_normalize_matches_the_dataset_pipeline(tmp_path):
    ds = load_dataset(make_idx(tmp_path / "m"), dtype=np.float64)
    x01 = pixels(ds, ds.X_test) / 255.0
    np.testing.assert_allclose(normalize(x01, ds.mean, ds.std, np.float64), ds.X_test, atol=1e-12)


@pytest.mark.parametrize(
    "x, mean, std, dtype, exc, message",
    [
        (
            np.zeros((2, 3, 4, 4), np.uint8),
            [0] * 3,
            [1] * 3,
            np.float32,
            TypeError,
            "x01 must have dtype float32 or float64",
        ),
        ([[[0.5]]], [0], [1], np.float32, TypeError, "x01 must be a numpy.ndarray"),
        (
            np.zeros((3, 4)),
            [0] * 3,
            [1] * 3,
            np.float32,
            ValueError,
            r"x01 must be 4-D \(N, C, H, W\) or 3-D",
        ),
        (
            np.zeros((2, 3, 4, 4)),
            [0, 0],
            [1] * 3,
            np.float32,
            ValueError,
            r"mean must have one value per channel \(3\), got 2",
        ),
        (
            np.zeros((2, 3, 4, 4)),
            [0] * 3,
            [1, 0, 1],
            np.float32,
            ValueError,
            "std must be positive",
        ),
        (
            np.zeros((2, 3, 4, 4)),
            [0] * 3,
            [1, np.inf, 1],
            np.float32,
            ValueError,
            "std must be finite",
        ),
        (
            np.zeros((2, 3, 4, 4)),
            ["a"] * 3,
            [1] * 3,
            np.float32,
            TypeError,
            "mean must be a sequence of 3 numbers",
        ),
        (
            np.full((2, 1, 4, 4), 255.0),
            [0],
            [1],
            np.float32,
            ValueError,
            r"x01 must hold pixels in \[0, 1\] \(divide 8-bit values by 255\)",
        ),
        (
            np.full((2, 1, 4, 4), np.nan),
            [0],
            [1],
            np.float32,
            ValueError,
            "x01 must hold pixels in",
        ),
        (np.zeros((2, 1, 4, 4)), [0], [1], np.int64, TypeError, "dtype must be float32 or float64"),
    ],
)
def test_normalize_bad_inputs(x, mean, std, dtype, exc, message):
    with pytest.raises(exc, match=message):
        normalize(x, mean, std, dtype)


# ---------------------------------------------------------------------------------------------
# IDX (MNIST)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    root = make_idx(tmp_path / "mnist", gz=gz)
    ds = load_dataset(root, dtype=np.float64, seed=3)
    assert ds.format == "idx" and ds.name == str(root.resolve())
    assert ds.class_names == ("0", "1", "2", "3") and ds.input_shape == (1, 4, 5)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (36, 4, 10)
    train_ids, val_ids = sample_ids(ds, ds.X_train), sample_ids(ds, ds.X_val)
    assert sorted(np.concatenate([train_ids, val_ids])) == list(range(40))
    np.testing.assert_array_equal(ds.y_train, train_ids % 4)
    np.testing.assert_array_equal(ds.y_val, val_ids % 4)
    # the test part keeps its order; every pixel of an image is its id
    np.testing.assert_array_equal(sample_ids(ds, ds.X_test), 200 + np.arange(10))
    np.testing.assert_array_equal(ds.y_test, np.arange(10) % 4)
    np.testing.assert_array_equal(
        pixels(ds, ds.X_test)[:, 0], (200 + np.arange(10))[:, None, None] * np.ones((4, 5), int)
    )
    # statistics of the training split only: not of val, not of test
    x01 = train_ids / 255.0
    assert ds.mean[0] == pytest.approx(x01.mean(), abs=1e-12)
    assert ds.std[0] == pytest.approx(x01.std(), abs=1e-12)
    check_normalised(ds, tol=1e-9)
    # the val split is stratified: one per class
    assert sorted(ds.y_val) == [0, 1, 2, 3]


def test_idx_seed_changes_val_split_and_dotted_names(tmp_path):
    root = make_idx(tmp_path / "m")
    a, b = load_dataset(root, seed=0), load_dataset(root, seed=0)
    c = load_dataset(root, seed=1)
    np.testing.assert_array_equal(a.X_val, b.X_val)
    assert set(sample_ids(a, a.X_val.astype(np.float64))) != set(
        sample_ids(c, c.X_val.astype(np.float64))
    )
    # Kaggle-style names: train-images.idx3-ubyte
    for path in list(root.iterdir()):
        path.rename(root / path.name.replace("-idx", ".idx"))
    d = load_dataset(root, format="idx")
    np.testing.assert_array_equal(d.X_val, a.X_val)


def test_idx_prefers_raw_beside_gz_and_ignores_stray_subfolders(tmp_path):
    root = make_idx(tmp_path / "m")
    for name in IDX_NAMES.values():
        (root / (name + ".gz")).write_bytes(b"not gzip at all")
    (root / "processed").mkdir()
    ds = load_dataset(root)
    assert ds.format == "idx" and len(ds.y_test) == 10


def idx_case(root, key, payload, gz=False):
    name = IDX_NAMES[key] + (".gz" if gz else "")
    for old in root.glob(IDX_NAMES[key] + "*"):
        old.unlink()
    write_file(root / name, payload)
    return name


@pytest.mark.parametrize(
    "key, make_payload, message",
    [
        ("train_images", lambda good: good[:-3], "truncated"),
        ("train_images", lambda good: good + b"\x00", "trailing bytes"),
        ("train_images", lambda good: good[:6], "truncated IDX header"),
        ("train_images", lambda good: b"\x08\x03\x00\x00" + good[4:], "not an IDX file"),
        ("test_labels", lambda good: b"", "not an IDX file"),
        ("train_images", lambda good: b"\x00\x00\x07\x03" + good[4:], "not an IDX file"),
        (
            "train_images",
            lambda good: idx_bytes(np.zeros((40, 4, 5)), type_code=0x0D, itemtype=">f4"),
            "must be unsigned bytes, got float",
        ),
        ("train_images", lambda good: idx_bytes(np.zeros((40, 20))), r"must be 3-D \(N, H, W\)"),
        ("train_labels", lambda good: idx_bytes(np.zeros((40, 1))), r"must be 1-D"),
        ("test_labels", lambda good: idx_bytes(np.arange(10) % 4 + 3), "label 6 out of range"),
        ("train_labels", lambda good: idx_bytes(np.zeros(40)), "every training label is 0"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_idx_bad_files(tmp_path, key, make_payload, message, gz):
    root = make_idx(tmp_path / "m")
    good = (root / IDX_NAMES[key]).read_bytes()
    name = idx_case(root, key, make_payload(good), gz=gz)
    with pytest.raises(DataError, match=re.escape(name)) as info:
        load_dataset(root)
    assert re.search(message, str(info.value)), str(info.value)


def test_idx_count_mismatch_names_both_files(tmp_path):
    root = make_idx(tmp_path / "m")
    idx_case(root, "train_labels", idx_bytes(np.arange(39) % 4))
    with pytest.raises(
        DataError,
        match="train-images-idx3-ubyte holds 40 images but train-labels-idx1-ubyte holds 39 labels",
    ):
        load_dataset(root)


def test_idx_test_images_of_another_size(tmp_path):
    root = make_idx(tmp_path / "m")
    idx_case(root, "test_images", idx_bytes(np.zeros((10, 5, 5))))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: test images are"):
        load_dataset(root)


def test_idx_missing_and_corrupt_gz(tmp_path):
    root = make_idx(tmp_path / "m", gz=True)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        DataError, match=r"missing IDX file t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\)"
    ):
        load_dataset(root)
    root = make_idx(tmp_path / "m2", gz=True)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])  # a truncated gzip stream
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        load_dataset(root)
    path.write_bytes(b"\x1f\x8b but not really gzip")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        load_dataset(root)


def test_idx_val_fraction_too_small_for_the_train_part(tmp_path):
    root = make_idx(tmp_path / "m", n_train=8)
    with pytest.raises(
        DataError, match="val_fraction=0.05 of 8 samples leaves the val split empty"
    ):
        load_dataset(root, val_fraction=0.05)
    assert len(load_dataset(root, val_fraction=0).y_train) == 8


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "writer", [{"protocol": 4}, {"protocol": 2, "py2": True}, {"protocol": 5}, {"protocol": 2}]
)
def test_cifar_round_trip(tmp_path, writer):
    root = make_cifar(tmp_path / "cifar-10-batches-py", **writer)
    ds = load_dataset(root, dtype=np.float64)
    assert ds.format == "cifar10" and ds.input_shape == (3, 32, 32)
    assert ds.class_names == ("airplane", "automobile", "bird", "cat", "deer")
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (18, 2, 5)
    # NCHW: byte 0 of a row is channel 0, pixel (0, 0); the rows come back bit for bit
    ids = sample_ids(ds, ds.X_train)
    assert sorted(np.concatenate([ids, sample_ids(ds, ds.X_val)])) == list(range(20))
    np.testing.assert_array_equal(ds.y_train, ids % 5)
    rng = np.random.default_rng(7)
    rows = np.concatenate([rng.integers(0, 256, (10, 3072), dtype=np.uint8) for _ in range(2)])
    rows[:, 0] = np.arange(20)
    np.testing.assert_array_equal(pixels(ds, ds.X_train).reshape(-1, 3072), rows[ids])
    np.testing.assert_array_equal(sample_ids(ds, ds.X_test), 200 + np.arange(5))
    # per-channel statistics of the training split only
    x01 = rows[ids].reshape(-1, 3, 1024) / 255.0
    np.testing.assert_allclose(ds.mean, x01.mean(axis=(0, 2)), atol=1e-12)
    np.testing.assert_allclose(ds.std, x01.std(axis=(0, 2)), atol=1e-12)
    check_normalised(ds, tol=1e-9)


def test_cifar_five_batches_detected_by_name(tmp_path):
    root = make_cifar(tmp_path / "c", n_batches=5, per_batch=4)
    ds = load_dataset(str(root), limit=7)
    assert ds.format == "cifar10" and len(ds.y_train) == 7 and len(ds.y_val) == 2
    assert ds.X_train.dtype == np.float32


def evil_call(marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Evil()


class Harmless:
    pass


@pytest.mark.parametrize(
    "make_payload, message",
    [
        (
            lambda m: pickle.dumps({b"data": evil_call(m), b"labels": []}),
            "refusing to load global (posix|nt).system",
        ),
        (
            lambda m: pickle.dumps({b"data": Harmless(), b"labels": []}),
            "refusing to load global tests.test_data.Harmless",
        ),
        (lambda m: pickle.dumps(evil_call(m), protocol=0), "refusing to load global"),
        (lambda m: b"cbuiltins\neval\n(S'print(1)'\ntR.", "refusing to load global builtins.eval"),
        (
            lambda m: pickle.dumps({b"data": np.array([1, "x"], dtype=object), b"labels": [0, 1]}),
            "'O8' is not an integer dtype",
        ),
        (
            lambda m: pickle.dumps(
                {b"data": np.ma.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
            ),
            "refusing to load global numpy.ma",
        ),
        (
            lambda m: pickle.dumps({b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]}),
            "'f8' is not an integer dtype",
        ),
        (lambda m: b"garbage that is not a pickle", "not a CIFAR-10 python batch"),
        (lambda m: b"", "not a CIFAR-10 python batch"),
        (lambda m: pickle.dumps([1, 2, 3]), r"a list, not a dict"),
        (lambda m: pickle.dumps({b"labels": [0, 1]}), "no 'data' entry"),
        (
            lambda m: pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            r"data must be uint8 of shape \(N, 3072\)",
        ),
        (
            lambda m: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
            "2 images but 1 labels",
        ),
        (
            lambda m: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 5]}),
            r"label 5 out of range 0..4 \(batches.meta names 5 classes\)",
        ),
        (
            lambda m: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, "a"]}),
            "labels must be a list of ints",
        ),
    ],
)
def test_cifar_bad_or_hostile_batch(tmp_path, make_payload, message):
    root = make_cifar(tmp_path / "c")
    marker = tmp_path / "pwned"
    (root / "data_batch_2").write_bytes(make_payload(marker))
    with pytest.raises(DataError, match="data_batch_2") as info:
        load_dataset(root)
    assert re.search(message, str(info.value)), str(info.value)
    assert not marker.exists()


def test_cifar_hostile_meta_never_runs(tmp_path):
    root = make_cifar(tmp_path / "c")
    marker = tmp_path / "pwned"
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [evil_call(marker)]}))
    with pytest.raises(DataError, match="batches.meta: not a CIFAR-10 python batch"):
        load_dataset(root)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: (r / "test_batch").unlink(), "test_batch: missing CIFAR-10 file"),
        (lambda r: (r / "batches.meta").unlink(), "batches.meta: missing CIFAR-10 file"),
        (
            lambda r: (r / "data_batch_1").rename(r / "data_batch_3"),
            "missing CIFAR-10 file data_batch_1",
        ),
        (
            lambda r: dump_pickle(r / "batches.meta", {b"label_names": [b"only"]}),
            "batches.meta: at least 2 label names",
        ),
        (
            lambda r: dump_pickle(r / "batches.meta", {b"label_names": [1, 2]}),
            "batches.meta: label_names must be a list of strings",
        ),
    ],
)
def test_cifar_missing_or_bad_files(tmp_path, change, message):
    root = make_cifar(tmp_path / "c")
    change(root)
    with pytest.raises(DataError, match=message):
        load_dataset(root)


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def test_folder_rgb_png_round_trip(tmp_path):
    root = tmp_path / "pets"
    expected = make_folder(root)
    (root / "README.md").write_text("beside the class folders: ignored")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00junk")
    save_image(root / ".hidden_class" / "x.png", np.zeros((6, 7, 3)))
    ds = load_dataset(root, dtype=np.float64)
    assert ds.format == "folder" and ds.class_names == ("cat", "dog", "eel")
    assert ds.input_shape == (3, 6, 7)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (10, 2, 3)
    seen = {}
    for X, y in [(ds.X_train, ds.y_train), (ds.X_val, ds.y_val), (ds.X_test, ds.y_test)]:
        for img, label in zip(pixels(ds, X), y, strict=True):
            seen[img.tobytes()] = int(label)
    assert seen == expected  # every pixel of every image, with its label
    train = pixels(ds, ds.X_train).astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, train.mean(axis=(0, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(ds.std, train.std(axis=(0, 2, 3)), atol=1e-12)
    check_normalised(ds, tol=1e-9)


def test_folder_known_pixel(tmp_path):
    root = tmp_path / "f"
    for name, value in [("a", (10, 20, 30)), ("b", (200, 100, 0))]:
        for i in range(5):
            save_image(root / name / f"{i}.png", np.full((2, 3, 3), value))
    ds = load_dataset(root, dtype=np.float64, val_fraction=0.2, test_fraction=0.2)
    x = ds.X_train[ds.y_train == 0][0]  # (3, 2, 3)
    np.testing.assert_allclose(
        x * ds.std[:, None, None] + ds.mean[:, None, None],
        np.array([10, 20, 30])[:, None, None] / 255 * np.ones((2, 3)),
        atol=1e-12,
    )


def test_folder_all_gray_is_one_channel_and_mixed_is_rgb(tmp_path):
    root = tmp_path / "g"
    expected = make_folder(root, classes=("x", "y"), rgb=False)
    ds = load_dataset(root, dtype=np.float64)
    assert ds.input_shape == (1, 6, 7) and ds.mean.shape == (1,)
    got = {img.tobytes() for img in pixels(ds, np.concatenate([ds.X_train, ds.X_val, ds.X_test]))}
    assert got == set(expected)
    gray = np.arange(42, dtype=np.uint8).reshape(6, 7)
    save_image(root / "x" / "gray.png", gray)
    save_image(root / "y" / "color.png", np.zeros((6, 7, 3)))
    ds = load_dataset(root, dtype=np.float64)
    assert ds.input_shape == (3, 6, 7)
    images = pixels(ds, np.concatenate([ds.X_train, ds.X_val, ds.X_test]))
    assert any(np.array_equal(img, np.stack([gray] * 3)) for img in images)


def test_folder_jpg_and_jpeg_load(tmp_path):
    root = tmp_path / "j"
    for name, value in [("dark", 40), ("light", 220)]:
        for i, ext in enumerate(["jpg", "JPEG", "jpeg", "png"]):
            save_image(
                root / name / f"{i}.{ext}",
                np.full((8, 8, 3), value),
                **({"format": "JPEG", "quality": 95} if ext != "png" else {}),
            )
    ds = load_dataset(root, val_fraction=0.25, test_fraction=0.25, dtype=np.float64)
    assert ds.input_shape == (3, 8, 8) and len(ds.y_train) == 4
    for X, y in [(ds.X_train, ds.y_train), (ds.X_test, ds.y_test)]:
        for img, label in zip(pixels(ds, X).astype(int), y, strict=True):
            assert np.abs(img - (40 if label == 0 else 220)).max() <= 3


def test_folder_image_size_resizes_to_h_w(tmp_path):
    root = tmp_path / "r"
    save_image(root / "a" / "0.png", np.zeros((10, 12, 3)))
    save_image(root / "a" / "1.png", np.zeros((4, 4, 3)))
    save_image(root / "b" / "0.png", np.full((5, 9), 255))
    save_image(root / "b" / "1.png", np.full((6, 5, 3), 255))
    with pytest.raises(
        DataError, match=re.escape(os.path.join("a", "1.png")) + r": the image is 4x4 \(HxW\), "
    ) as info:
        load_dataset(root, val_fraction=0.25, test_fraction=0.25)
    assert "0.png is 10x12; pass image_size=(H, W) (cnnserve train --image-size H,W)" in str(
        info.value
    )
    ds = load_dataset(root, val_fraction=0.25, test_fraction=0.25, image_size=(6, 5))
    assert ds.input_shape == (3, 6, 5)


def test_folder_channels_converts_colour_to_luma_and_grey_to_rgb(tmp_path):
    root = tmp_path / "c"
    expected = make_folder(root, classes=("x", "y"), hw=(3, 4))
    ds = load_dataset(root, dtype=np.float64, channels=1)
    assert ds.input_shape == (1, 3, 4) and ds.mean.shape == (1,)
    images = pixels(ds, np.concatenate([ds.X_train, ds.X_val, ds.X_test]))
    lumas = set()
    for chw in expected:
        rgb = np.frombuffer(chw, np.uint8).reshape(3, 3, 4).astype(np.float64)
        grey = np.rint(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).astype(np.uint8)
        lumas.add(grey[None].tobytes())
    assert {img.tobytes() for img in images} == lumas
    grey_root = tmp_path / "g"
    expected = make_folder(grey_root, classes=("x", "y"), hw=(3, 4), rgb=False)
    ds = load_dataset(grey_root, dtype=np.float64, channels=3)
    assert ds.input_shape == (3, 3, 4)
    images = pixels(ds, np.concatenate([ds.X_train, ds.X_val, ds.X_test]))
    assert {img.tobytes() for img in images} == {
        np.repeat(np.frombuffer(g, np.uint8).reshape(1, 3, 4), 3, axis=0).tobytes()
        for g in expected
    }
    assert load_dataset(grey_root, channels=1).input_shape == (1, 3, 4)  # its own


def test_channels_apply_to_every_source(digits, tmp_path):
    three = load_dataset("digits", channels=3, dtype=np.float64)
    assert three.input_shape == (3, 8, 8)
    np.testing.assert_array_equal(three.y_train, digits.y_train)
    np.testing.assert_allclose(three.X_train[:, 1], digits.X_train[:, 0], atol=1e-6)
    np.testing.assert_array_equal(three.X_test[:, 0], three.X_test[:, 2])
    grey = load_dataset(make_cifar(tmp_path / "cifar"), channels=1)
    assert grey.input_shape == (1, 32, 32) and grey.X_test.shape[1] == 1
    for bad in (2, 0, True, "3"):
        with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
            load_dataset("digits", channels=bad)


def test_folder_16_bit_transparent_and_palette_images(tmp_path):
    root = tmp_path / "modes"
    deep = np.array([[0, 257, 65535], [1000, 30000, 65000]], np.uint16)
    for i in range(3):
        (root / "deep").mkdir(parents=True, exist_ok=True)
        Image.fromarray(deep).save(root / "deep" / f"{i}.png")
        rgba = np.zeros((2, 3, 4), np.uint8)
        rgba[..., 3] = [[0, 255, 0], [255, 0, 255]]  # transparent: white
        save_image(root / "see-through" / f"{i}.png", rgba)
    ds = load_dataset(root, dtype=np.float64, val_fraction=1 / 6, test_fraction=1 / 6)
    assert ds.input_shape == (3, 2, 3)  # an RGBA image: colour
    images = pixels(ds, np.concatenate([ds.X_train, ds.X_val, ds.X_test]))
    labels = np.concatenate([ds.y_train, ds.y_val, ds.y_test])
    scaled = np.rint(deep / 257).astype(np.uint8)
    for img, label in zip(images, labels, strict=True):
        if label == 0:
            np.testing.assert_array_equal(img, np.stack([scaled] * 3))
        else:
            white = np.array([[255, 0, 255], [0, 255, 0]], np.uint8)
            np.testing.assert_array_equal(img, np.stack([white] * 3))


def test_folder_split_determinism(tmp_path):
    root = tmp_path / "d"
    make_folder(root, per_class=10, hw=(3, 3))
    a, b, c = (load_dataset(root, seed=s) for s in (5, 5, 6))
    np.testing.assert_array_equal(a.X_test, b.X_test)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    assert not np.array_equal(a.X_test, c.X_test)
    assert np.all(np.bincount(a.y_test) == 2) and np.all(np.bincount(a.y_val) == 1)


def test_folder_errors(tmp_path):
    # corrupt image
    root = tmp_path / "corrupt"
    make_folder(root, classes=("a", "b"))
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken.png: cannot read image"):
        load_dataset(root)
    # truncated image
    good = (root / "a" / "img0.png").read_bytes()
    (root / "b" / "broken.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"broken.png: cannot read image"):
        load_dataset(root)
    # a jpg that is no image at all
    (root / "b" / "broken.png").unlink()
    (root / "b" / "text.jpg").write_text("hello")
    with pytest.raises(DataError, match=r"text.jpg: cannot read image"):
        load_dataset(root)
    (root / "b" / "text.jpg").unlink()
    # a file that is not an image
    (root / "b" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes.txt: not an image file"):
        load_dataset(root)
    (root / "b" / "notes.txt").unlink()
    # a nested folder
    (root / "b" / "sub").mkdir()
    with pytest.raises(DataError, match=r"sub: not an image file"):
        load_dataset(root)
    (root / "b" / "sub").rmdir()
    # an image beside the class folders
    save_image(root / "stray.png", np.zeros((6, 7, 3)))
    with pytest.raises(DataError, match="stray.png: an image outside a class folder"):
        load_dataset(root)
    (root / "stray.png").unlink()
    # empty class folder (hidden files do not count)
    (root / "c").mkdir()
    (root / "c" / ".keep").write_text("")
    with pytest.raises(
        DataError, match=re.escape(str((root / "c").resolve())) + ": empty class folder"
    ):
        load_dataset(root)


def test_folder_needs_two_classes_and_enough_samples(tmp_path):
    root = tmp_path / "one"
    make_folder(root, classes=("only",))
    with pytest.raises(
        DataError,
        match=r"one: an image folder needs at least 2 class sub-folders, found 1 \(only\)",
    ):
        load_dataset(root, format="folder")
    root = tmp_path / "tiny"
    make_folder(root, classes=("a", "b"), per_class=2)
    with pytest.raises(
        DataError, match="tiny: val_fraction=0.1 of 4 samples leaves the val split empty"
    ):
        load_dataset(root)
    with pytest.raises(
        DataError, match="tiny: the split of 4 samples leaves the train split empty"
    ):
        load_dataset(root, val_fraction=0.5, test_fraction=0.49)
    assert len(load_dataset(root, val_fraction=0.25, test_fraction=0.25).y_train) == 2


# ---------------------------------------------------------------------------------------------
# Paths and format detection
# ---------------------------------------------------------------------------------------------


def test_missing_path_file_path_and_empty_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere: no such file or directory"):
        load_dataset(missing)
    with pytest.raises(DataError, match="nowhere: no such file or directory"):
        load_dataset(str(missing), format="idx")
    a_file = tmp_path / "train-images-idx3-ubyte"
    a_file.write_bytes(b"")
    with pytest.raises(DataError, match="train-images-idx3-ubyte: expected a directory"):
        load_dataset(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden").mkdir()
    with pytest.raises(DataError, match="empty: no data set found"):
        load_dataset(empty)


def test_explicit_format_must_match_contents(tmp_path):
    idx = make_idx(tmp_path / "idx")
    with pytest.raises(
        DataError,
        match=r"idx: format='cifar10' but it holds no CIFAR-10 batches; found IDX files \(t10k-images",
    ):
        load_dataset(idx, format="cifar10")
    with pytest.raises(DataError, match="format='folder' but it holds no class sub-folders"):
        load_dataset(idx, format="folder")
    cifar = make_cifar(tmp_path / "cifar")
    with pytest.raises(
        DataError,
        match=r"format='idx' but it holds no IDX files; found CIFAR-10 batches \(batches.meta",
    ):
        load_dataset(cifar, format="idx")
    folder = tmp_path / "folder"
    make_folder(folder, classes=("a", "b"))
    with pytest.raises(
        DataError,
        match=r"format='idx' but it holds no IDX files; found class sub-folders \(a/, b/\)",
    ):
        load_dataset(folder, format="idx")
    make_idx(cifar)
    with pytest.raises(DataError, match="ambiguous"):
        load_dataset(cifar)
    assert load_dataset(cifar, format="idx").format == "idx"
    assert load_dataset(cifar, format="cifar10").format == "cifar10"
