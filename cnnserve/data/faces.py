"""Faces and background from scikit-image's bundled files: the ``"faces"`` format.

Two classes, ``"background"`` (label 0) and ``"face"`` (label 1), 25 x 25 grey images:

- ``skimage/data/lfw_subset.npy``: 100 faces and 100 non-faces (backgrounds cut from the same
  Labeled Faces in the Wild photos), 25 x 25, values in [0, 1], stored as ``round(v * 255)``.
- Hard negatives: :data:`HARD_NEGATIVES` windows of 25 x 25 cut from the bundled photos named
  in :data:`NEGATIVE_PHOTOS`, none of which holds a human face. The rule: each photo is turned
  grey (ITU-R 601 luma, ``L = 0.299 R + 0.587 G + 0.114 B``, Pillow's ``convert("L")``), then
  shrunk (box filter) so that its shorter side is each of :data:`NEGATIVE_SIDES` pixels in turn
  (a 25-pixel window then covers an eighth, a quarter or half of it: the scales a face detector
  looks at), and from each shrunk photo two kinds of windows are taken:

  * :data:`WINDOWS_PER_SIDE` windows at uniformly random corners, drawn from
    ``numpy.random.default_rng([14, k])`` for the k-th photo: the photo as it comes;
  * :data:`MATCHED_PER_SIDE` windows that look most like a face: those of the highest
    normalised cross-correlation with the mean of the 100 LFW faces (each window and the mean
    less their own mean, then divided by their norms), among the windows at even corners whose
    pixels are not flat (standard deviation of 2 grey levels or more), taken best first and at
    least half a window (13 pixels) away from every window taken before in one axis (then, if
    a photo has too few such windows, the best of the rest). These are the windows where a
    detector trained on the random ones fires wrongly: the round coins, the cat's eyes, the
    bright blobs of the cell pictures. The mean face is only the yardstick that picks
    background windows; no face's pixels are among the negatives.

  The windows are the same on every call, whatever the split seed.

Left out of the data set on purpose: ``astronaut`` and ``camera`` (both hold a face), and the
photos of :data:`HELD_OUT_PHOTOS`, kept to test a detector on photos it has never seen
(:func:`photo` reads any of them). scikit-image is in the ``data`` extra; it is not imported,
its files are read directly (NumPy, Pillow).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, UnidentifiedImageError

from cnnserve.data._common import DataError
from cnnserve.data.packaged import packaged_file

__all__ = [
    "FACE_CLASSES",
    "HARD_NEGATIVES",
    "HELD_OUT_PHOTOS",
    "MATCHED_PER_SIDE",
    "NEGATIVE_PHOTOS",
    "NEGATIVE_SIDES",
    "PHOTOS",
    "WINDOWS_PER_SIDE",
    "WINDOW",
    "load_faces",
    "photo",
]

#: Class names of the ``"faces"`` data set; label k is ``FACE_CLASSES[k]``.
FACE_CLASSES = ("background", "face")

#: Height and width of every image of the data set.
WINDOW = 25

#: The face-free photos that hard negatives are cut from: every picture scikit-image bundles
#: without a human face, but the :data:`HELD_OUT_PHOTOS` and ``microaneurysms`` (a crop of a
#: retina, like the held-out ``retina``).
NEGATIVE_PHOTOS = (
    "brick",
    "chelsea",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "moon",
    "motorcycle_left",
    "page",
    "text",
    "cell",
    "chessboard_GRAY",
    "clock_motion",
    "color",
    "horse",
    "ihc",
    "logo",
    "motorcycle_right",
    "phantom",
)

#: Face-free photos that the data set never uses: a detector's false positives are counted on them.
HELD_OUT_PHOTOS = ("coffee", "rocket", "retina")

#: The bundled photos :func:`photo` reads, by name, with their file names.
PHOTOS = {
    name: f"data/{name}.jpg"
    if name in ("hubble_deep_field", "retina", "rocket")
    else f"data/{name}.png"
    for name in (*NEGATIVE_PHOTOS, *HELD_OUT_PHOTOS, "astronaut", "camera")
}

#: Shorter sides (pixels) a photo is shrunk to before windows are cut from it.
NEGATIVE_SIDES = (50, 100, 200)

#: Windows cut at random corners at each of :data:`NEGATIVE_SIDES` from each photo.
WINDOWS_PER_SIDE = 30

#: Windows most like the mean LFW face cut at each of :data:`NEGATIVE_SIDES` from each photo.
MATCHED_PER_SIDE = 10

#: Number of hard negatives: every photo, every side, both kinds.
HARD_NEGATIVES = len(NEGATIVE_PHOTOS) * len(NEGATIVE_SIDES) * (WINDOWS_PER_SIDE + MATCHED_PER_SIDE)

_LFW_FILE = "data/lfw_subset.npy"
_LFW_FACES = 100  # the file's first 100 images are faces, the next 100 are not


def photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos, as RGB.

    Parameters
    ----------
    name : str
        A key of :data:`PHOTOS`: a negative or held-out photo, ``"astronaut"`` or ``"camera"``.

    Returns
    -------
    numpy.ndarray
        uint8, shape ``(H, W, 3)`` (grey photos repeated to three channels).

    Raises
    ------
    ValueError
        ``name`` is not a key of :data:`PHOTOS`.
    DataError
        scikit-image is not installed (the message says which extra to install), or the file
        cannot be read.
    """
    if name not in PHOTOS:
        raise ValueError(f"name must be one of {sorted(PHOTOS)}, got {name!r}")
    path = packaged_file("skimage", PHOTOS[name], "faces")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read the photo ({exc})") from exc


def _matched(small: np.ndarray, template: np.ndarray) -> list[tuple[int, int]]:
    """Corners of the :data:`MATCHED_PER_SIDE` windows of ``small`` (h', w') most like
    ``template`` (25, 25; zero mean, unit norm), by the rule of the module docstring."""
    windows = sliding_window_view(small, (WINDOW, WINDOW))[::2, ::2]  # (r, c, 25, 25)
    centred = windows - windows.mean(axis=(2, 3), keepdims=True)
    norms = np.sqrt(np.square(centred).sum(axis=(2, 3)))  # (r, c)
    score = np.einsum("rcij,ij->rc", centred, template) / np.maximum(norms, 1e-12)
    flat = norms < 2.0 * WINDOW  # standard deviation under 2 grey levels
    order = np.lexsort((np.arange(score.size), -score.ravel()))  # best first, ties row-major
    taken: list[tuple[int, int]] = []
    for k in order:
        i, j = divmod(int(k), score.shape[1])
        corner = (2 * i, 2 * j)
        apart = all(abs(corner[0] - a) >= 13 or abs(corner[1] - b) >= 13 for a, b in taken)
        if not flat.flat[k] and apart:
            taken.append(corner)
            if len(taken) == MATCHED_PER_SIDE:
                return taken
    rest = [divmod(int(k), score.shape[1]) for k in order]
    rest = [(2 * i, 2 * j) for i, j in rest if (2 * i, 2 * j) not in taken]
    return taken + rest[: MATCHED_PER_SIDE - len(taken)]


def _hard_negatives(faces: np.ndarray) -> np.ndarray:
    """``(HARD_NEGATIVES, 25, 25)`` uint8 windows of the face-free photos, by the module's rule;
    ``faces`` (100, 25, 25) in [0, 1] give the mean face the matched windows are picked by."""
    template = faces.mean(axis=0) - faces.mean()
    template /= np.linalg.norm(template)
    windows = []
    for k, name in enumerate(NEGATIVE_PHOTOS):
        grey = Image.fromarray(photo(name)).convert("L")  # ITU-R 601 luma
        rng = np.random.default_rng([14, k])
        for side in NEGATIVE_SIDES:
            w, h = grey.size
            f = side / min(w, h)
            small = np.asarray(
                grey.resize((max(WINDOW, round(w * f)), max(WINDOW, round(h * f))), Image.BOX)
            )  # (h', w')
            rows = rng.integers(0, small.shape[0] - WINDOW + 1, WINDOWS_PER_SIDE)
            cols = rng.integers(0, small.shape[1] - WINDOW + 1, WINDOWS_PER_SIDE)
            corners = [*zip(rows, cols, strict=True), *_matched(small.astype(np.float64), template)]
            windows.extend(small[r : r + WINDOW, c : c + WINDOW] for r, c in corners)
    return np.stack(windows)


def load_faces() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """``(class_names, X, y)``: X uint8 ``(200 + HARD_NEGATIVES, 1, 25, 25)``, y int64.

    The 100 faces are label 1, the 100 LFW non-faces and the :data:`HARD_NEGATIVES` windows
    label 0 (see the module docstring for the rule).

    Raises
    ------
    DataError
        scikit-image is not installed (the message says which extra to install), or a file is
        not what it should be (named in the message).
    """
    path = packaged_file("skimage", _LFW_FILE, "faces")
    try:
        lfw = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the LFW subset ({exc})") from exc
    if lfw.shape != (2 * _LFW_FACES, WINDOW, WINDOW) or not np.isfinite(lfw).all():
        raise DataError(f"{path}: expected 200 finite 25 x 25 images, got shape {lfw.shape}")
    if lfw.min() < 0 or lfw.max() > 1:
        raise DataError(f"{path}: expected values in [0, 1], got {lfw.min()}..{lfw.max()}")
    lfw8 = np.rint(lfw * 255).astype(np.uint8)  # (200, 25, 25)
    X = np.concatenate([lfw8, _hard_negatives(lfw[:_LFW_FACES])])[:, None]  # (N, 1, 25, 25)
    y = np.zeros(len(X), dtype=np.int64)
    y[:_LFW_FACES] = 1
    return FACE_CLASSES, np.ascontiguousarray(X), y
