"""Public layer API: paired ``*_forward`` / ``*_backward`` functions on NCHW arrays.

Every forward returns ``out, cache`` and every backward takes ``(dout, cache)``, as in the
CS231n assignments. Arguments are checked here, once: a wrong shape or value raises
``ValueError``, a wrong type or dtype raises ``TypeError``, and the message names the argument,
what was expected and what came. Inputs are never modified. float32 and float64 are supported
throughout and the output dtype is the input dtype; all arrays of one call must share a dtype.

The heavy loops run in the compiled Cython kernels of :mod:`cnnserve._ext`; matrix products
go to numpy's BLAS. There is no pure-Python fallback: :mod:`cnnserve.reference` holds plain
loop versions for testing only.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from cnnserve._checks import check_int
from cnnserve._checks import check_number as _check_number

try:
    from cnnserve._ext import activation as _activation
    from cnnserve._ext import conv as _conv
    from cnnserve._ext import norm as _norm
    from cnnserve._ext import pool as _pool
except ImportError as exc:  # pragma: no cover - exercised by a test in a patched interpreter
    raise ImportError(
        "cnnserve's compiled Cython kernels (cnnserve._ext) are missing or failed to load "
        f"({exc}). Build them from the repository root with `make install` "
        "(or `pip install -e .` in your environment)."
    ) from exc

__all__ = [
    "AffineCache",
    "ConvCache",
    "DropoutCache",
    "PackedFilters",
    "pack_filters",
    "conv_forward",
    "conv_backward",
    "relu_forward",
    "relu_backward",
    "affine_forward",
    "affine_backward",
    "softmax_forward",
    "softmax_backward",
    "softmax_loss",
    "svm_loss",
    "dropout_forward",
    "dropout_backward",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# Argument checks shared by every layer
# ---------------------------------------------------------------------------------------------


def _check_array(a: Any, name: str, ndim: int | None = None, layout: str = "") -> np.ndarray:
    """Return ``a`` as an ndarray if it is a non-empty float32/float64 array of ``ndim`` dims.

    Subclasses are viewed as plain ndarrays (a memmap works), except those whose meaning a
    plain array would lose: masked arrays (the mask) and np.matrix (its 2-D algebra).
    """
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if isinstance(a, np.ma.MaskedArray | np.matrix):
        raise TypeError(
            f"{name} must be a plain numpy.ndarray, got {type(a).__name__}: fill masked "
            "values or convert with np.asarray first"
        )
    a = np.asarray(a)
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        shape_hint = f" {layout}" if layout else ""
        raise ValueError(f"{name} must be {ndim}-D{shape_hint}, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {a.shape}")
    return a


def _check_same_dtype(first_name: str, first: np.ndarray, **others: np.ndarray) -> None:
    """Raise TypeError unless every array in ``others`` has the dtype of ``first``."""
    for name, a in others.items():
        if a.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {a.dtype} but {first_name} has dtype {first.dtype}: "
                "all arrays of one layer call must share one dtype"
            )


def _check_shape(a: np.ndarray, name: str, expected: tuple[int, ...], meaning: str) -> None:
    if a.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} {meaning}, got {a.shape}")


# Window sizes, strides and pads are C integers in the kernels.
_MAX_INT_PARAM = 2**31 - 1


def _check_int(value: Any, name: str, minimum: int, maximum: int = _MAX_INT_PARAM) -> int:
    """:func:`cnnserve._checks.check_int`, bounded by what the kernels' C ints hold."""
    return check_int(value, name, minimum, maximum)


def _check_params(
    params: Any, name: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
) -> Mapping:
    """Check that ``params`` is a mapping with only ``allowed`` keys and all ``required`` ones."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(params).__name__}")
    unknown = sorted(set(params) - set(allowed), key=str)
    if unknown:
        raise ValueError(
            f"{name} has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"expected keys: {', '.join(map(repr, allowed))}"
        )
    for key in required:
        if key not in params:
            raise ValueError(f"{name} is missing the required key {key!r}")
    return params


def _window_count(size: int, window: int, stride: int, pad: int, what: str) -> int:
    """Number of window positions along one axis: ``(size + 2*pad - window) / stride + 1``.

    Raises ValueError when the window does not fit or the positions do not tile the padded
    axis exactly (the result is never silently floored).
    """
    span = size + 2 * pad - window
    padded = f"{size} + 2*pad ({pad}) = {size + 2 * pad}" if pad else f"{size}"
    if span < 0:
        raise ValueError(f"{what} is larger than the input: window {window} > {padded}")
    if span % stride:
        spelled = f"({size} + 2*{pad} - {window})" if pad else f"({size} - {window})"
        raise ValueError(
            f"{what} does not divide evenly: {spelled} = {span} is not a multiple of stride "
            f"{stride}; crop or pad the input so that it is"
        )
    return span // stride + 1


def _check_dout(dout: Any, expected_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Check an upstream gradient against the forward output it belongs to."""
    dout = _check_array(dout, "dout")
    if dout.shape != tuple(expected_shape):
        raise ValueError(
            f"dout must have the shape of the forward output {tuple(expected_shape)}, "
            f"got {dout.shape}"
        )
    if dout.dtype != dtype:
        raise TypeError(f"dout has dtype {dout.dtype} but the forward pass ran in {dtype}")
    return dout


def _check_cache(cache: Any, cache_type: type, forward_name: str) -> None:
    if not isinstance(cache, cache_type):
        raise TypeError(
            f"cache must be the {cache_type.__name__} returned by {forward_name}, "
            f"got {type(cache).__name__}"
        )


def _check_labels(y: Any, num_samples: int, num_classes: int) -> np.ndarray:
    """Check class labels ``y`` of shape (N,) with values in ``[0, num_classes)``."""
    if not isinstance(y, np.ndarray):
        raise TypeError(f"y must be a numpy.ndarray of integer labels, got {type(y).__name__}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must have an integer dtype, got {y.dtype}")
    if y.shape != (num_samples,):
        raise ValueError(
            f"y must have shape ({num_samples},) (one label per row of x), got {y.shape}"
        )
    if y.min() < 0 or y.max() >= num_classes:
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise ValueError(f"labels in y must be in [0, {num_classes}), got {bad}")
    return y


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------


class ConvCache(NamedTuple):
    """What :func:`conv_backward` needs from :func:`conv_forward`.

    It unpacks like the source notes' cache, ``x, w, b, conv_param = cache``.
    """

    x: np.ndarray  # (N, C, H, W), C-contiguous (the caller's array when it already was)
    w: np.ndarray  # (F, C, HH, WW)
    b: np.ndarray  # (F,)
    conv_param: dict  # {'stride': int, 'pad': int}, a normalised copy


class _ScratchPool:
    """Scratch buffers for column matrices, shared by all threads and reused across calls.

    A call borrows its buffers (no two running calls ever share one) and returns them when it
    ends. At most ``keep`` buffers of at most ``max_bytes`` each stay allocated between calls,
    so the memory held while idle is bounded whatever the number of threads; a larger buffer
    (one huge image) is freed when its call ends.
    """

    def __init__(self, keep: int, max_bytes: int):
        self.keep = keep
        self.max_bytes = max_bytes
        self._free: list[np.ndarray] = []  # 1-D uint8 buffers
        self._lock = threading.Lock()

    def _take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fits = [i for i, buf in enumerate(self._free) if buf.nbytes >= nbytes]
            if fits:  # the smallest buffer that is large enough
                return self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
        return np.empty(nbytes, dtype=np.uint8)

    def _give(self, buf: np.ndarray) -> None:
        if buf.nbytes > self.max_bytes:
            return
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self.keep:  # drop the smallest
                self._free.sort(key=lambda b: b.nbytes)
                del self._free[0]

    @contextmanager
    def borrow(self, sizes: tuple[int, ...], dtype: np.dtype) -> Iterator[list[np.ndarray]]:
        """1-D arrays of ``dtype`` with the given numbers of elements, for one ``with`` block."""
        itemsize = np.dtype(dtype).itemsize
        raw = [self._take(size * itemsize) for size in sizes]
        try:
            yield [buf[: size * itemsize].view(dtype) for buf, size in zip(raw, sizes, strict=True)]
        finally:
            for buf in raw:
                self._give(buf)


# The column matrix of a whole batch can be hundreds of MB: it is built for a chunk of about
# _CHUNK_BYTES of images at a time, in reused scratch buffers, so the GEMMs read data that is
# still in cache and no call pays for page-faulting a fresh allocation.
_CHUNK_BYTES = 8 * 2**20
_SCRATCH = _ScratchPool(keep=4, max_bytes=4 * _CHUNK_BYTES)


def _reset_scratch_in_child() -> None:
    """A fork copies the pool's lock in whatever state another thread left it: start afresh."""
    global _SCRATCH
    _SCRATCH = _ScratchPool(keep=_SCRATCH.keep, max_bytes=_SCRATCH.max_bytes)


os.register_at_fork(after_in_child=_reset_scratch_in_child)


def _images_per_chunk(N: int, elems_per_image: int, itemsize: int) -> int:
    """How many images' scratch matrices fit in ``_CHUNK_BYTES`` (at least 1, at most N)."""
    return max(1, min(N, _CHUNK_BYTES // max(1, elems_per_image * itemsize)))


# The fused kernels build the columns of a block of output rows of one image in a per-thread
# buffer of about this size (a fraction of a core's L2 cache), so that BLAS reads them while
# they are still in cache.
_BLOCK_BYTES = 2**20
# Below this many columns per block (output pixels of one image), a per-image product is too
# thin for BLAS and the weights are re-read for too little work: the batched chunk path wins.
_FUSED_MIN_COLUMNS = 64
# The forward kernel's blocks are smaller: columns of about this size (one core's L1 data
# cache), but at least _FUSED_MIN_COLUMNS of them. Its product (F, K) @ (K, block) then reads
# the block from L1; on the bench's 7x7 layer (K = 147, 32x32 output) blocks of 2 rows ran
# 1.3-1.6x faster than blocks of the whole image (32 rows, 600 KB), which the backward pass's
# dw product (reduction over the block) still prefers.
_FORWARD_BLOCK_BYTES = 48 * 2**10


class _SingleThreadBLAS:
    """Context manager: BLAS runs on one thread inside the fused conv kernels.

    The fused kernels call BLAS (``scipy.linalg.cython_blas``) from inside their OpenMP
    threads; a multithreaded BLAS would start its own threads in each of them and
    oversubscribe the cores (measured 2-10x slower).

    When SciPy has its own BLAS library (the wheels' ``scipy.libs/libscipy_openblas``, which
    only SciPy calls), that library is set to one thread once, at the first fused call, and
    left so: switching it per call wakes OpenBLAS's worker threads, which then spin and take
    the cores from the kernel. Otherwise (SciPy and NumPy share a BLAS, as in conda) every
    BLAS library is set to one thread while any fused kernel runs and restored by the last
    one out; calls nest and may overlap across Python threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._controller = None  # None: not set up yet; False: SciPy's BLAS is single-threaded
        self._limiter = None

    def _setup(self) -> None:
        from threadpoolctl import ThreadpoolController

        blas = ThreadpoolController().select(user_api="blas")
        own = [
            c
            for c in blas.lib_controllers
            if os.path.basename(os.path.dirname(c.filepath)) == "scipy.libs"
        ]
        if own:
            for lib in own:
                lib.set_num_threads(1)
            self._controller = False
        else:
            self._controller = blas

    def __enter__(self) -> None:
        with self._lock:
            if self._controller is None:
                self._setup()
            if self._controller is not False and self._depth == 0:
                self._limiter = self._controller.limit(limits=1)
            self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None


_BLAS_1 = _SingleThreadBLAS()


def _reset_blas_limit_in_child() -> None:
    """A fork copies the lock in whatever state another thread left it: start afresh."""
    global _BLAS_1
    _BLAS_1 = _SingleThreadBLAS()


os.register_at_fork(after_in_child=_reset_blas_limit_in_child)


def _fused_plan(N: int, K: int, H_out: int, W_out: int, F: int, itemsize: int) -> tuple[int, int]:
    """``(threads, rows_per_block)`` for the fused per-image kernels, or ``(0, 0)`` if the
    batched chunk path should run instead.

    The fused kernels split the batch over OpenMP threads by image: they need at least one
    image per thread, and blocks of at least ``_FUSED_MIN_COLUMNS`` output pixels.
    """
    threads = _conv.threads_for(N * F * K * H_out * W_out)
    rows = max(1, min(H_out, _BLOCK_BYTES // (K * W_out * itemsize)))
    if N < threads or rows * W_out < _FUSED_MIN_COLUMNS:
        return 0, 0
    return threads, rows


def _forward_rows(rows: int, K: int, W_out: int, itemsize: int) -> int:
    """Output rows per block of the fused forward kernel, at most the ``rows`` of
    :func:`_fused_plan`: columns of about ``_FORWARD_BLOCK_BYTES``, and at least
    ``_FUSED_MIN_COLUMNS`` of them."""
    small = max(_FORWARD_BLOCK_BYTES // (K * W_out * itemsize), -(-_FUSED_MIN_COLUMNS // W_out))
    return max(1, min(rows, small))


# The skinny kernel (cnn_skinny.h) replaces im2col + BLAS GEMM for float32 products with at
# most this many output columns (output pixels of the whole batch) ...
_SKINNY_MAX_COLUMNS = 64
# ... at least this many (fewer leave most of its 6 x 4 register tile idle) ...
_SKINNY_MIN_COLUMNS = 12
# ... and filter matrices of at least this many values (16 MB in float32): BLAS then reads
# its packed copy from memory, while this kernel reads the weights once, in place.
_SKINNY_MIN_WEIGHTS = 2**22
# Values of K per chunk (a multiple of 16). A block of 6 rows of the weights (24 KB) and a
# block of 4 columns (16 KB) then fit in L1 together, so each block of rows is read from
# memory once and stays in L1 while every block of columns passes over it; the chunk of the
# (columns, K) matrix (at most 256 KB) stays in L2. With the 4 x 6 tile, 1024 measured 7 %
# faster than 2048 (and than 576, 768, 1536, 3072, 4096) with 36 and 64 columns on an AVX-512
# Xeon (48 KB L1, 2 MB L2); with the 6 x 4 tile it is 5-15 % faster than 512 and 2048 and
# about equal to 768.
# With 12 columns the row is bound by memory bandwidth and every value is alike.
_SKINNY_CHUNK = 1024


def _skinny_plan(dtype: np.dtype, columns: int, F: int, K: int) -> int:
    """Values of K per chunk for the skinny float32 kernel, or 0 to use the other paths.

    Taken for float32 on CPUs where its AVX-512 tile runs (``_conv.skinny_fast()``), with
    ``_SKINNY_MIN_COLUMNS <= columns <= _SKINNY_MAX_COLUMNS`` and ``F * K`` of at least
    ``_SKINNY_MIN_WEIGHTS``. The chunk is ``_SKINNY_CHUNK`` values.
    """
    if (
        dtype != np.float32
        or not _SKINNY_MIN_COLUMNS <= columns <= _SKINNY_MAX_COLUMNS
        or F * K < _SKINNY_MIN_WEIGHTS
        or not _conv.skinny_fast()
    ):
        return 0
    return _SKINNY_CHUNK


# Filters packed by pack_filters are read packed (cnn_skinny_packed.h) in products of at most
# this many output columns. Against the unpacked paths on the 4096-filter 7x7 layer: 0.43-0.95
# of the time at 4 to 64 columns (skinny kernel or BLAS), 0.66-0.84 at 72 to 576 (BLAS, which
# packs the filters on every call). At 512 columns a thread's sums (512 rows x 512 columns,
# 1 MiB) and its chunk of the columns (256 x 512, 0.5 MiB) still fit a 2 MiB L2.
_PACKED_MAX_COLUMNS = 512


class PackedFilters:
    """Convolution filters with a copy packed once for repeated forward passes (inference).

    Made by :func:`pack_filters`; pass it to :func:`conv_forward` in place of ``w``. Where the
    forward has at most ``_PACKED_MAX_COLUMNS`` (512) output pixels over the batch and a
    float32 filter matrix of at least ``_SKINNY_MIN_WEIGHTS`` values (a large filter bank
    on a small map, such as a 7x7 layer of 4096 filters at 6x6 outputs), the product reads
    the packed copy, laid out in the order the kernel reads it (``cnn_skinny_packed.h``):
    each thread streams its share of it front to back. On that layer it takes 0.74 of the
    unpacked kernel's time at 36 columns, 0.78 of BLAS's at 72. Other shapes (and the 1x1,
    whole-image and Winograd paths, which come first), and :func:`conv_backward`, use
    :attr:`w`.

    Both copies are read-only, so they cannot disagree. Copying or pickling a PackedFilters
    keeps only :attr:`w` and packs it again on the other side (where the CPU may differ).

    Attributes
    ----------
    w : ndarray, shape (F, C, HH, WW)
        A read-only view of the copy of the filters made by :func:`pack_filters`.
    packed : bool
        True if the packed copy exists (float32, an AVX-512 CPU, a large enough filter
        matrix); otherwise :func:`conv_forward` treats this object as :attr:`w`.
    """

    __slots__ = ("_w", "_packed")

    def __init__(self, w: np.ndarray, packed: np.ndarray | None):
        for array in (w, packed):
            if array is not None:
                array.flags.writeable = False
        self._w = w
        self._packed = packed

    @property
    def w(self) -> np.ndarray:
        view = self._w.view()  # its base is read-only: the flag cannot be set back
        view.flags.writeable = False
        return view

    @property
    def packed(self) -> bool:
        return self._packed is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self._w.shape

    @property
    def dtype(self) -> np.dtype:
        return self._w.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: the copy of the filters and the packed copy."""
        return self._w.nbytes + (0 if self._packed is None else self._packed.nbytes)

    def __reduce__(self):
        # The packed copy must start on a 64-byte boundary, which a copied array need not.
        return pack_filters, (self._w,)

    def __repr__(self) -> str:
        return f"PackedFilters(shape={self.shape}, dtype={self.dtype}, packed={self.packed})"


def pack_filters(w: np.ndarray) -> PackedFilters:
    """Pack convolution filters once, for many :func:`conv_forward` calls with them.

    Parameters
    ----------
    w : ndarray, shape (F, C, HH, WW)
        The filters (float32 or float64). They are copied: later changes to ``w`` do not
        reach the result, so pack again after each update (packing is for fixed weights:
        a trained or converted network at inference).

    Returns
    -------
    PackedFilters
        Holds a read-only copy of ``w`` and, for float32 filter matrices of at least
        ``_SKINNY_MIN_WEIGHTS`` values on a CPU with AVX-512, the packed copy (``F * K``
        values, rows rounded up to a multiple of 32): about twice the memory of ``w``.
        Copying and packing 4096 x 25088 values (411 MB) takes 0.3-0.9 s with 2 threads.
    """
    w = _check_array(w, "w", 4, "(F, C, HH, WW)")
    copy = np.array(w, order="C", copy=True)
    F, K = w.shape[0], math.prod(w.shape[1:])
    packed = None
    if copy.dtype == np.float32 and F * K >= _SKINNY_MIN_WEIGHTS and _conv.skinny_fast():
        packed = _conv.skinny_pack(copy.reshape(F, K), _conv.threads_for(F * K))
    return PackedFilters(copy, packed)


# Winograd F(2x2, 3x3): 3x3 filters at stride 1 take 16 products per 2x2 output tile where a
# direct convolution takes 36. One thread's transform buffers for one image, about
# 16 * (C + F) * tiles values, must stay below this size; larger images use the direct path.
_WINOGRAD_MAX_BYTES = 4 * 2**20
# Minimum output pixels per image for the Winograd path (smaller maps are mostly border).
_WINOGRAD_MIN_PIXELS = 16


def _winograd_plan(
    N: int, C: int, F: int, HH: int, WW: int, stride: int, H_out: int, W_out: int, itemsize: int
) -> tuple[int, int]:
    """``(threads, scratch elements per thread)`` for the Winograd kernels, or ``(0, 0)``.

    Taken for 3x3 filters at stride 1, with at least one image per thread, output maps of at
    least ``_WINOGRAD_MIN_PIXELS`` pixels and per-image buffers within
    ``_WINOGRAD_MAX_BYTES``.
    """
    if (HH, WW, stride) != (3, 3, 1) or H_out * W_out < _WINOGRAD_MIN_PIXELS:
        return 0, 0
    threads = _conv.threads_for(N * F * C * 9 * H_out * W_out)
    scratch = _conv.winograd_scratch(C, F, H_out, W_out, 1)
    if N < threads or scratch * itemsize > _WINOGRAD_MAX_BYTES:
        return 0, 0
    return threads, scratch


def _winograd_filters(w: np.ndarray) -> np.ndarray:
    """``U = G w G^T`` for (F, C, 3, 3) filters, as (16, F, C): plane ``4 * a + b`` holds
    ``U[a, b]`` of every filter and channel."""
    U = np.empty((16, *w.shape[:2]), dtype=w.dtype)
    _conv.winograd_filters(np.ascontiguousarray(w), U)
    return U


def _is_pointwise(HH: int, WW: int, stride: int, pad: int, P: int) -> bool:
    """A 1x1 filter at stride 1 without padding, over maps of at least 64 pixels.

    Each output pixel then sees one input pixel and a product per image needs no im2col. With
    fewer pixels per image those products are too thin for BLAS (one matrix-vector product
    per image at 1x1): the im2col path's single GEMM over the batch is faster.
    """
    return HH == WW == stride == 1 and pad == 0 and P >= 64


def _conv_param(conv_param: Any) -> tuple[int, int]:
    params = _check_params(conv_param, "conv_param", ("stride", "pad"))
    stride = _check_int(params.get("stride", 1), "conv_param['stride']", 1)
    pad = _check_int(params.get("pad", 0), "conv_param['pad']", 0)
    return stride, pad


def conv_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, conv_param: dict
) -> tuple[np.ndarray, ConvCache]:
    """Forward pass of a 2-D convolution (cross-correlation, as in every CNN library).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
        Input batch.
    w : ndarray, shape (F, C, HH, WW), or PackedFilters
        Filters; HH and WW may differ. Filters from :func:`pack_filters` (fixed weights,
        inference) give the same result, faster where their packed copy applies.
    b : ndarray, shape (F,)
        Biases.
    conv_param : dict
        ``'stride'`` (int >= 1, default 1) and ``'pad'`` (int >= 0, default 0): zeros added on
        every side of the height and width axes.

    Returns
    -------
    out : ndarray, shape (N, F, H_out, W_out)
    cache : ConvCache
        For :func:`conv_backward` (its ``w`` is the plain array, also for packed filters).

    Shape
    -----
    ``H_out = (H + 2*pad - HH) / stride + 1`` and ``W_out = (W + 2*pad - WW) / stride + 1``;
    both divisions must be exact, else ValueError.

    Notes
    -----
    3x3 filters at stride 1 use Winograd F(2x2, 3x3), one image per OpenMP thread at a time
    (16 small GEMMs per image on transformed tiles). Packed filters (:func:`pack_filters`)
    with at most 512 output pixels over the batch use their packed copy
    (``cnn_skinny_packed.h``). float32 problems with few output pixels over the batch (12 to
    64) and a filter matrix of at least 2**22 values, on CPUs with AVX-512, use a kernel that
    reads the filters in place along K against the transposed columns (``cnn_skinny.h``)
    instead of BLAS. Other filters, with at least one image per thread, build the im2col
    columns of a block of output rows per thread and multiply them by the (F, C*HH*WW) filter
    matrix with single-threaded BLAS, writing NCHW directly. Otherwise a chunk of images is
    unrolled into a (C*HH*WW, n*H_out*W_out) column matrix and multiplied in one multithreaded
    BLAS GEMM.
    """
    x = _check_array(x, "x", 4, "(N, C, H, W)")
    packed = None
    if isinstance(w, PackedFilters):
        packed, w = w, w.w
    w = _check_array(w, "w", 4, "(F, C, HH, WW)")
    b = _check_array(b, "b", 1, "(F,)")
    _check_same_dtype("x", x, w=w, b=b)
    N, C, H, W = x.shape
    F, Cw, HH, WW = w.shape
    if Cw != C:
        raise ValueError(
            f"w has {Cw} input channels but x has {C}: w must be (F, C, HH, WW) with "
            f"C = x.shape[1] = {C}, got shape {w.shape}"
        )
    _check_shape(b, "b", (F,), "(one bias per filter)")
    stride, pad = _conv_param(conv_param)
    H_out = _window_count(H, HH, stride, pad, "conv: filter height HH along H")
    W_out = _window_count(W, WW, stride, pad, "conv: filter width WW along W")

    x = np.ascontiguousarray(x)
    K, P = C * HH * WW, H_out * W_out
    w_mat = w.reshape(F, K)
    cache = ConvCache(x, w, b, {"stride": stride, "pad": pad})
    if P == 1 and pad == 0:
        # The filter covers the whole image (an affine layer written as a convolution, as
        # after FC-to-conv conversion): one (N, K) @ (K, F) product, no im2col.
        out = x.reshape(N, K) @ w_mat.T  # (N, F)
        out += b
        return out.reshape(N, F, 1, 1), cache
    if _is_pointwise(HH, WW, stride, pad, P):
        # A 1x1 convolution is one (F, C) @ (C, H*W) product per image: no im2col, no transpose.
        out = np.matmul(w_mat, x.reshape(N, C, P))  # (N, F, H*W)
        out += b[:, None]
        return out.reshape(N, F, H_out, W_out), cache
    out = np.empty((N, F, H_out, W_out), dtype=x.dtype)
    threads, scratch = _winograd_plan(N, C, F, HH, WW, stride, H_out, W_out, x.itemsize)
    if threads:
        with _SCRATCH.borrow((threads * scratch,), x.dtype) as (buf,), _BLAS_1:
            _conv.winograd_forward(
                x, _winograd_filters(w), np.ascontiguousarray(b), out,
                buf.reshape(threads, scratch), pad, 1, threads,
            )  # fmt: skip
        return out, cache
    if packed is not None and packed.packed and N * P <= _PACKED_MAX_COLUMNS:
        # The same product on the filters packed once (cnn_skinny_packed.h), against the
        # im2col columns (K, N*P) as they are.
        with _SCRATCH.borrow((K * N * P,), x.dtype) as (cols_buf,):
            cols = cols_buf.reshape(K, N * P)
            _conv.im2col(x, cols, HH, WW, stride, pad)
            _conv.skinny_packed_forward(
                packed._packed, F, cols, np.ascontiguousarray(b), out.reshape(N, F, P),
                _conv.threads_for(N * P * F * K),
            )  # fmt: skip
        return out, cache
    kc = _skinny_plan(x.dtype, N * P, F, K)
    if kc:
        # Few output pixels, a large filter matrix: out[n] (F, P) = w_mat (F, K) @ cols[:, n]
        # with both operands read along K (cnn_skinny.h), no packing of the weights.
        w_mat = np.ascontiguousarray(w_mat)
        with _SCRATCH.borrow((K * N * P + 16,), x.dtype) as (t_buf,):
            # The transposed columns (N*P, K), small, written directly (im2row: one run of WW
            # values per (c, i) of each pixel's patch). They start at the same offset from a
            # 64-byte boundary as w_mat, so that the kernel can read both with vector loads
            # that do not straddle cache lines.
            skip = (w_mat.ctypes.data - t_buf.ctypes.data) % 64 // 4
            cols_t = t_buf[skip : skip + K * N * P].reshape(N * P, K)
            _conv.im2row(x, cols_t, HH, WW, stride, pad)
            _conv.skinny_forward(
                w_mat, cols_t, np.ascontiguousarray(b),
                out.reshape(N, F, P), kc, _conv.threads_for(N * P * F * K),
            )  # fmt: skip
        return out, cache
    threads, rows = _fused_plan(N, K, H_out, W_out, F, x.itemsize)
    if threads:
        rows = _forward_rows(rows, K, W_out, x.itemsize)
        w_mat = np.ascontiguousarray(w_mat)
        scratch = _conv.fused_scratch(C, H, W, HH, WW, pad, W_out, rows)
        with _SCRATCH.borrow((threads * scratch,), x.dtype) as (cols_buf,), _BLAS_1:
            _conv.conv_forward_fused(
                x, w_mat, np.ascontiguousarray(b), out.reshape(N, F, P),
                cols_buf.reshape(threads, -1), HH, WW, stride, pad, rows, threads,
            )  # fmt: skip
        return out, cache
    step = _images_per_chunk(N, max(K, F) * P, x.itemsize)
    with _SCRATCH.borrow((K * step * P, F * step * P), x.dtype) as (cols_buf, prod_buf):
        for n0 in range(0, N, step):
            m = min(step, N - n0)
            cols = cols_buf[: K * m * P].reshape(K, m * P)
            _conv.im2col(x[n0 : n0 + m], cols, HH, WW, stride, pad)
            prod = prod_buf[: F * m * P].reshape(F, m * P)
            np.matmul(w_mat, cols, out=prod)
            # One pass does the (F, m) -> (m, F) transpose and adds the bias.
            chunk = prod.reshape(F, m, H_out, W_out).transpose(1, 0, 2, 3)  # (m, F, H_out, W_out)
            np.add(chunk, b[:, None, None], out=out[n0 : n0 + m])
    return out, cache


def conv_backward(
    dout: np.ndarray, cache: ConvCache, *, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Backward pass of :func:`conv_forward`.

    Parameters
    ----------
    dout : ndarray, shape (N, F, H_out, W_out)
        Upstream gradient.
    cache : ConvCache
        From :func:`conv_forward`.
    need_dx : bool, keyword-only
        False when nothing needs the input's gradient (the first layer of a network): ``dx``
        is then None and, where the path allows, not computed at all.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W), or None without ``need_dx``
    dw : ndarray, shape (F, C, HH, WW)
    db : ndarray, shape (F,)

    Notes
    -----
    Same paths as :func:`conv_forward`. The columns (or Winograd input tiles) are rebuilt
    rather than kept from the forward pass: the cache stays the size of the input, and the
    rebuild costs less than one of the GEMMs. On the per-thread paths each thread keeps its
    own partial ``dw`` and ``db``, summed at the end.
    """
    _check_cache(cache, ConvCache, "conv_forward")
    if not isinstance(need_dx, bool):
        raise TypeError(f"need_dx must be a bool, got {type(need_dx).__name__}")
    dx, dw, db = _conv_backward(dout, cache, need_dx)
    return (dx if need_dx else None), dw, db


def _conv_backward(
    dout: np.ndarray, cache: ConvCache, need_dx: bool
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """:func:`conv_backward` after the cache check; dx may be None without ``need_dx``."""
    x, w, _, conv_param = cache
    N, C, H, W = x.shape
    F, _, HH, WW = w.shape
    stride, pad = conv_param["stride"], conv_param["pad"]
    H_out = (H + 2 * pad - HH) // stride + 1
    W_out = (W + 2 * pad - WW) // stride + 1
    dout = _check_dout(dout, (N, F, H_out, W_out), x.dtype)

    K, P = C * HH * WW, H_out * W_out
    w_mat = w.reshape(F, K)
    threads, scratch = _winograd_plan(N, C, F, HH, WW, stride, H_out, W_out, x.itemsize)
    if threads:
        dx = np.empty(x.shape, dtype=x.dtype)
        dU_parts = np.empty((threads, 16, F, C), dtype=x.dtype)
        db_parts = np.empty((threads, F), dtype=np.float64)
        with _SCRATCH.borrow((threads * scratch,), x.dtype) as (buf,), _BLAS_1:
            _conv.winograd_backward(
                x, _winograd_filters(w), np.ascontiguousarray(dout), dx, dU_parts, db_parts,
                buf.reshape(threads, scratch), pad, 1, threads,
            )  # fmt: skip
        dw = np.empty(w.shape, dtype=x.dtype)
        _conv.winograd_filter_grad(dU_parts, dw)  # G^T dU G, dU summed over threads
        return dx, dw, db_parts.sum(axis=0).astype(x.dtype)
    threads, rows = _fused_plan(N, K, H_out, W_out, F, x.itemsize)
    if threads and not _is_pointwise(HH, WW, stride, pad, P):
        # Per image and thread: dw and db partial sums, dx written directly (NCHW).
        dx = np.empty(x.shape if need_dx else (1, 1, 1, 1), dtype=x.dtype)
        dw_parts = np.empty((threads, K, F), dtype=x.dtype)  # dw transposed, per thread
        db_parts = np.empty((threads, F), dtype=np.float64)
        dout3 = np.ascontiguousarray(dout).reshape(N, F, P)
        scratch = _conv.fused_scratch(C, H, W, HH, WW, pad, W_out, rows)
        with _SCRATCH.borrow((threads * scratch,), x.dtype) as (cols_buf,), _BLAS_1:
            _conv.conv_backward_fused(
                x, np.ascontiguousarray(w_mat), dout3, dx, dw_parts, db_parts,
                cols_buf.reshape(threads, -1), HH, WW, stride, pad, rows, threads, need_dx,
            )  # fmt: skip
        dw = np.ascontiguousarray((dw_parts.sum(axis=0) if threads > 1 else dw_parts[0]).T)
        return dx, dw.reshape(w.shape), db_parts.sum(axis=0).astype(x.dtype)
    db = dout.sum(axis=(0, 2, 3))
    if P == 1 and pad == 0:  # the whole-image filter of conv_forward
        dout2 = dout.reshape(N, F)
        dx = (dout2 @ w_mat).reshape(x.shape)  # (N, K) -> (N, C, H, W)
        dw = dout2.T @ x.reshape(N, K)  # (F, K)
        return dx, dw.reshape(w.shape), db
    if _is_pointwise(HH, WW, stride, pad, P):
        dout3 = dout.reshape(N, F, P)
        dx = np.matmul(w_mat.T, dout3).reshape(x.shape)  # (N, C, H*W) -> (N, C, H, W)
        dw = np.tensordot(dout3, x.reshape(N, C, P), axes=([0, 2], [0, 2]))  # (F, C)
        return dx, dw.reshape(w.shape), db
    dw = np.empty((F, K), dtype=x.dtype)
    dw_chunk = None
    dx = np.empty(x.shape, dtype=x.dtype)
    step = _images_per_chunk(N, max(K, F) * P, x.itemsize)
    with _SCRATCH.borrow((K * step * P, F * step * P), x.dtype) as (cols_buf, dout_buf):
        for n0 in range(0, N, step):
            m = min(step, N - n0)
            cols = cols_buf[: K * m * P].reshape(K, m * P)
            _conv.im2col(x[n0 : n0 + m], cols, HH, WW, stride, pad)
            dout_mat = dout_buf[: F * m * P].reshape(F, m * P)
            np.copyto(dout_mat.reshape(F, m, H_out, W_out), dout[n0 : n0 + m].transpose(1, 0, 2, 3))
            if n0 == 0:
                np.matmul(dout_mat, cols.T, out=dw)
            else:
                dw_chunk = np.matmul(dout_mat, cols.T, out=dw_chunk)
                dw += dw_chunk
            np.matmul(w_mat.T, dout_mat, out=cols)  # cols now holds dcols, (K, m*P)
            _conv.col2im(cols, dx[n0 : n0 + m], HH, WW, stride, pad)
    return dx, dw.reshape(w.shape), db


# ---------------------------------------------------------------------------------------------
# Element-wise layers, affine, softmax and losses (vectorised NumPy: no loops to compile)
# ---------------------------------------------------------------------------------------------


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rectified linear unit ``max(0, x)``, elementwise.

    Parameters
    ----------
    x : ndarray, any shape
        float32 or float64.

    Returns
    -------
    out : ndarray, shape of x, dtype of x
    cache : ndarray
        ``x`` itself (a reference: do not modify x before the backward pass).

    Shape
    -----
    ``out.shape == x.shape``.
    """
    x = _check_array(x, "x")
    return np.maximum(x, 0, out=np.empty_like(x)), x


def relu_backward(dout: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """Backward pass of :func:`relu_forward`: ``dout`` where ``x > 0``, else 0.

    Parameters
    ----------
    dout : ndarray, shape of x
        Upstream gradient, in the dtype of x.
    cache : ndarray
        From :func:`relu_forward`.

    Returns
    -------
    dx : ndarray, shape of x
        The gradient at exactly ``x == 0`` is 0, as in PyTorch.
    """
    x = _check_array(cache, "cache")
    dout = _check_dout(dout, x.shape, x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype)
    flat = [np.ascontiguousarray(a).reshape(-1) for a in (x, dout)]
    _activation.relu_backward(*flat, dx.reshape(-1))
    return dx


class AffineCache(NamedTuple):
    """What :func:`affine_backward` needs from :func:`affine_forward` (``x, w, b = cache``)."""

    x: np.ndarray  # (N, d_1, ..., d_k), the caller's array
    w: np.ndarray  # (D, M)
    b: np.ndarray  # (M,)


def affine_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, AffineCache]:
    """Fully connected layer ``x.reshape(N, D) @ w + b``.

    Parameters
    ----------
    x : ndarray, shape (N, d_1, ..., d_k)
        Each sample is flattened in C order to D = d_1 * ... * d_k values (an (N, C, H, W)
        volume in NCHW order).
    w : ndarray, shape (D, M)
    b : ndarray, shape (M,)

    Returns
    -------
    out : ndarray, shape (N, M)
    cache : AffineCache
        For :func:`affine_backward`; it references x, w and b.

    Shape
    -----
    ``(N, d_1, ..., d_k) -> (N, M)`` with ``D = d_1 * ... * d_k == w.shape[0]``.
    """
    x = _check_array(x, "x")
    w = _check_array(w, "w", 2, "(D, M)")
    b = _check_array(b, "b", 1, "(M,)")
    _check_same_dtype("x", x, w=w, b=b)
    if x.ndim < 2:
        raise ValueError(f"x must be at least 2-D (N, d_1, ..., d_k), got shape {x.shape}")
    D = math.prod(x.shape[1:])
    if w.shape[0] != D:
        raise ValueError(
            f"w must have {D} rows (x.shape[1:] = {x.shape[1:]} flattens to D = {D}), "
            f"got shape {w.shape}"
        )
    _check_shape(b, "b", (w.shape[1],), "(one bias per output unit)")
    out = x.reshape(x.shape[0], D) @ w
    out += b
    return out, AffineCache(x, w, b)


def affine_backward(
    dout: np.ndarray, cache: AffineCache, *, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Backward pass of :func:`affine_forward`.

    Parameters
    ----------
    dout : ndarray, shape (N, M)
        Upstream gradient.
    cache : AffineCache
        From :func:`affine_forward`.
    need_dx : bool, keyword-only
        False when nothing needs the input's gradient (the first layer of a network): ``dx``
        is then None and not computed.

    Returns
    -------
    dx : ndarray, shape (N, d_1, ..., d_k), or None without ``need_dx``
    dw : ndarray, shape (D, M)
    db : ndarray, shape (M,)
    """
    _check_cache(cache, AffineCache, "affine_forward")
    if not isinstance(need_dx, bool):
        raise TypeError(f"need_dx must be a bool, got {type(need_dx).__name__}")
    x, w, _ = cache
    N, M = x.shape[0], w.shape[1]
    dout = _check_dout(dout, (N, M), x.dtype)
    dx = (dout @ w.T).reshape(x.shape) if need_dx else None
    dw = x.reshape(N, -1).T @ dout
    db = dout.sum(axis=0)
    return dx, dw, db


def _softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) scores, shifted by the row max for stability."""
    shifted = x - x.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def softmax_forward(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over classes: ``out[i, j] = exp(x[i, j]) / sum_k exp(x[i, k])``.

    Parameters
    ----------
    x : ndarray, shape (N, C)
        Class scores.

    Returns
    -------
    out : ndarray, shape (N, C)
        Rows are probabilities summing to 1.
    cache : ndarray, shape (N, C)
        A private copy of ``out``, so that editing ``out`` in place (``out[range(N), y] -= 1``)
        does not change the backward pass.

    Shape
    -----
    ``(N, C) -> (N, C)``.
    """
    x = _check_array(x, "x", 2, "(N, C)")
    out = _softmax(x)
    return out, out.copy()


def softmax_backward(dout: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """Backward pass of :func:`softmax_forward`: ``p * (dout - sum(dout * p, axis=1))``.

    Parameters
    ----------
    dout : ndarray, shape (N, C)
    cache : ndarray, shape (N, C)
        From :func:`softmax_forward` (the probabilities p).

    Returns
    -------
    dx : ndarray, shape (N, C)
    """
    p = _check_array(cache, "cache", 2, "(N, C)")
    dout = _check_dout(dout, p.shape, p.dtype)
    return p * (dout - (dout * p).sum(axis=1, keepdims=True))


def softmax_loss(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax scores, and its gradient.

    Parameters
    ----------
    x : ndarray, shape (N, C)
        Class scores.
    y : ndarray of int, shape (N,)
        Labels, ``0 <= y[i] < C``.

    Returns
    -------
    loss : float
    dx : ndarray, shape (N, C)
    """
    x = _check_array(x, "x", 2, "(N, C)")
    N, C = x.shape
    y = _check_labels(y, N, C)
    shifted = x - x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))  # (N,)
    rows = np.arange(N)
    loss = float(np.mean(log_z - shifted[rows, y]))
    dx = np.exp(shifted - log_z[:, None])  # probabilities, (N, C)
    dx[rows, y] -= 1
    dx /= N
    return loss, dx


def svm_loss(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean multiclass hinge loss ``sum_{j != y} max(0, x_j - x_y + 1)``, and its gradient.

    Parameters
    ----------
    x : ndarray, shape (N, C)
    y : ndarray of int, shape (N,)

    Returns
    -------
    loss : float
    dx : ndarray, shape (N, C)
    """
    x = _check_array(x, "x", 2, "(N, C)")
    N, C = x.shape
    y = _check_labels(y, N, C)
    rows = np.arange(N)
    margins = np.maximum(0, x - x[rows, y][:, None] + 1)  # (N, C)
    margins[rows, y] = 0
    loss = float(margins.sum() / N)
    dx = (margins > 0).astype(x.dtype)
    dx[rows, y] -= dx.sum(axis=1)
    dx /= N
    return loss, dx


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


class DropoutCache(NamedTuple):
    """What :func:`dropout_backward` needs from :func:`dropout_forward`."""

    dropout_param: dict  # a copy of the checked dropout_param
    shape: tuple[int, ...]  # shape of x
    dtype: np.dtype  # dtype of x
    mask: np.ndarray | None  # 0 or 1/p, shape of x, in 'train' mode; None in 'test' mode


def dropout_forward(x: np.ndarray, dropout_param: dict) -> tuple[np.ndarray, DropoutCache]:
    """Inverted dropout: keep each unit with probability ``p`` and scale kept ones by ``1/p``.

    The expected value of every output equals the input, so nothing changes at test time.

    Parameters
    ----------
    x : ndarray, any shape
    dropout_param : dict
        ``'p'`` (required): the probability of KEEPING a unit, ``0 < p <= 1``;
        ``'mode'`` (required): ``'train'`` drops units, ``'test'`` returns a copy of ``x``;
        ``'seed'`` (optional int >= 0): the same seed gives the same mask (numpy's
        ``default_rng``); without it every call draws a fresh mask.

    Returns
    -------
    out : ndarray, shape and dtype of x
    cache : DropoutCache
        For :func:`dropout_backward`.

    Shape
    -----
    ``out.shape == x.shape``.
    """
    x = _check_array(x, "x")
    params = _check_params(dropout_param, "dropout_param", ("p", "mode", "seed"), ("p", "mode"))
    p = _check_number(params["p"], "dropout_param['p']", 0, 1, "(]", "the keep probability")
    mode = params["mode"]
    if mode not in ("train", "test"):
        raise ValueError(f"dropout_param['mode'] must be 'train' or 'test', got {mode!r}")
    seed = params.get("seed")
    if seed is not None:
        seed = _check_int(seed, "dropout_param['seed']", 0, maximum=2**128)
    if mode == "test":
        return x.copy(), DropoutCache(dict(params), x.shape, x.dtype, None)
    if 1.0 / p > float(np.finfo(x.dtype).max):
        raise ValueError(f"dropout_param['p'] = {p} is too small for {x.dtype}: 1/p overflows")
    rng = np.random.default_rng(seed)
    mask = (rng.random(x.shape, dtype=x.dtype) < p).astype(x.dtype)
    mask *= x.dtype.type(1.0 / p)
    return x * mask, DropoutCache(dict(params), x.shape, x.dtype, mask)


def dropout_backward(dout: np.ndarray, cache: DropoutCache) -> np.ndarray:
    """Backward pass of :func:`dropout_forward`: ``dout * mask`` in train mode, else ``dout``.

    Parameters
    ----------
    dout : ndarray, shape of x
    cache : DropoutCache
        From :func:`dropout_forward`.

    Returns
    -------
    dx : ndarray, shape and dtype of x
    """
    _check_cache(cache, DropoutCache, "dropout_forward")
    dout = _check_dout(dout, cache.shape, cache.dtype)
    if cache.mask is None:
        return dout.copy()
    return dout * cache.mask


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------


__all__ += [
    "MaxPoolCache",
    "AvgPoolCache",
    "max_pool_forward",
    "max_pool_backward",
    "avg_pool_forward",
    "avg_pool_backward",
]

_POOL_KEYS = ("pool_height", "pool_width", "stride")


class MaxPoolCache(NamedTuple):
    """What :func:`max_pool_backward` needs from :func:`max_pool_forward`."""

    x_shape: tuple[int, int, int, int]  # (N, C, H, W)
    dtype: np.dtype  # dtype of x, hence of dout and dx
    argmax: np.ndarray  # (N, C, H_out, W_out) intp: flat index h * W + w of each window's max
    window: tuple[int, int, int]  # (pool_height, pool_width, stride)


class AvgPoolCache(NamedTuple):
    """What :func:`avg_pool_backward` needs from :func:`avg_pool_forward`."""

    x_shape: tuple[int, int, int, int]  # (N, C, H, W)
    dtype: np.dtype  # dtype of x, hence of dout and dx
    pool_param: dict  # {'pool_height': int, 'pool_width': int, 'stride': int}, a normalised copy


def _pool_geometry(x: Any, pool_param: Any, what: str) -> tuple[np.ndarray, dict, int, int]:
    """Check a pooling call; return ``x``, a normalised ``pool_param`` and ``H_out, W_out``."""
    x = _check_array(x, "x", 4, "(N, C, H, W)")
    params = _check_params(pool_param, "pool_param", _POOL_KEYS, _POOL_KEYS)
    norm = {key: _check_int(params[key], f"pool_param[{key!r}]", 1) for key in _POOL_KEYS}
    _, _, H, W = x.shape
    stride = norm["stride"]
    H_out = _window_count(H, norm["pool_height"], stride, 0, f"{what}: pool_height along H")
    W_out = _window_count(W, norm["pool_width"], stride, 0, f"{what}: pool_width along W")
    return x, norm, H_out, W_out


def max_pool_forward(x: np.ndarray, pool_param: dict) -> tuple[np.ndarray, MaxPoolCache]:
    """Forward pass of max pooling: the largest value of every window, per channel.

    Windows may tile the input (2x2, stride 2) or overlap (3x3, stride 2); there is no padding.
    A window holding a NaN yields NaN (NaN propagates, as in PyTorch).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
        Input batch, float32 or float64.
    pool_param : dict
        ``'pool_height'``, ``'pool_width'`` and ``'stride'``, all required ints >= 1.

    Returns
    -------
    out : ndarray, shape (N, C, H_out, W_out)
        Same dtype as x.
    cache : MaxPoolCache
        For :func:`max_pool_backward`: the input shape and dtype and the position of the
        maximum of every window (the first in row-major order when several are equal, the
        first NaN when there is one).

    Shape
    -----
    ``H_out = (H - pool_height) / stride + 1`` and ``W_out = (W - pool_width) / stride + 1``;
    both divisions must be exact and the window must fit in the input, else ValueError.
    """
    x, norm, H_out, W_out = _pool_geometry(x, pool_param, "max pool")
    N, C = x.shape[:2]
    out = np.empty((N, C, H_out, W_out), dtype=x.dtype)
    argmax = np.empty((N, C, H_out, W_out), dtype=np.intp)
    ph, pw, stride = norm["pool_height"], norm["pool_width"], norm["stride"]
    _pool.max_pool_forward(np.ascontiguousarray(x), out, argmax, ph, pw, stride)
    argmax.flags.writeable = False  # the backward kernel indexes dx with it
    return out, MaxPoolCache(x.shape, x.dtype, argmax, (ph, pw, stride))


def max_pool_backward(dout: np.ndarray, cache: MaxPoolCache) -> np.ndarray:
    """Backward pass of :func:`max_pool_forward`.

    Each window's gradient goes, whole, to ONE input position: its first maximum in row-major
    order (as in PyTorch), never split over tied maxima. Overlapping windows that share that
    position add up there; every other position gets 0.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H_out, W_out)
        Upstream gradient, in the dtype of the forward input.
    cache : MaxPoolCache
        From :func:`max_pool_forward`.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    """
    _check_cache(cache, MaxPoolCache, "max_pool_forward")
    x_shape, dtype, argmax = cache.x_shape, cache.dtype, cache.argmax
    N, C, H, W = x_shape
    # The kernel writes dx at these indices unchecked: a cache that was edited or built by
    # hand must fail here, not corrupt memory.
    if (
        not isinstance(argmax, np.ndarray)
        or argmax.dtype != np.intp
        or argmax.ndim != 4
        or argmax.shape[:2] != (N, C)
        or (argmax.size and (argmax.min() < 0 or argmax.max() >= H * W))
    ):
        raise ValueError(
            "cache.argmax does not belong to an input of shape "
            f"{tuple(x_shape)}: pass the cache that max_pool_forward returned, unchanged"
        )
    window = cache.window
    if not (
        isinstance(window, tuple)
        and len(window) == 3
        and all(isinstance(v, int) and v >= 1 for v in window)
        and (H - window[0]) % window[2] == 0
        and (W - window[1]) % window[2] == 0
        and argmax.shape[2:] == ((H - window[0]) // window[2] + 1, (W - window[1]) // window[2] + 1)
    ):
        raise ValueError(
            f"cache.window {window!r} does not give the pooled shape "
            f"{argmax.shape[2:]} from {(H, W)}: pass the cache that max_pool_forward returned"
        )
    ph, pw, stride = window
    dout = _check_dout(dout, argmax.shape, dtype)
    dx = np.empty(x_shape, dtype=dtype)
    # 2x2 windows at stride 2 tile the input: each window writes its own four pixels.
    tiles = (ph, pw, stride) == (2, 2, 2)
    _pool.max_pool_backward(
        np.ascontiguousarray(dout), np.ascontiguousarray(argmax), dx.reshape(N, C, H * W), W, tiles
    )
    return dx


def avg_pool_forward(x: np.ndarray, pool_param: dict) -> tuple[np.ndarray, AvgPoolCache]:
    """Forward pass of average pooling: the mean of every window, per channel.

    Windows may tile the input or overlap; there is no padding, so every window averages
    ``pool_height * pool_width`` input values.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
        Input batch, float32 or float64.
    pool_param : dict
        ``'pool_height'``, ``'pool_width'`` and ``'stride'``, all required ints >= 1.

    Returns
    -------
    out : ndarray, shape (N, C, H_out, W_out)
        Same dtype as x (the sums accumulate in float64).
    cache : AvgPoolCache
        For :func:`avg_pool_backward`.

    Shape
    -----
    ``H_out = (H - pool_height) / stride + 1`` and ``W_out = (W - pool_width) / stride + 1``;
    both divisions must be exact and the window must fit in the input, else ValueError.
    """
    x, norm, H_out, W_out = _pool_geometry(x, pool_param, "avg pool")
    N, C = x.shape[:2]
    out = np.empty((N, C, H_out, W_out), dtype=x.dtype)
    ph, pw, stride = norm["pool_height"], norm["pool_width"], norm["stride"]
    _pool.avg_pool_forward(np.ascontiguousarray(x), out, ph, pw, stride)
    return out, AvgPoolCache(x.shape, x.dtype, norm)


def avg_pool_backward(dout: np.ndarray, cache: AvgPoolCache) -> np.ndarray:
    """Backward pass of :func:`avg_pool_forward`.

    Each window's gradient is split evenly, ``dout / (pool_height * pool_width)``, over the
    window; overlapping windows add up.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H_out, W_out)
        Upstream gradient, in the dtype of the forward input.
    cache : AvgPoolCache
        From :func:`avg_pool_forward`.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    """
    _check_cache(cache, AvgPoolCache, "avg_pool_forward")
    x_shape, dtype, norm = cache
    N, C, H, W = x_shape
    ph, pw, stride = norm["pool_height"], norm["pool_width"], norm["stride"]
    H_out, W_out = (H - ph) // stride + 1, (W - pw) // stride + 1
    dout = _check_dout(dout, (N, C, H_out, W_out), dtype)
    dx = np.empty(x_shape, dtype=dtype)
    _pool.avg_pool_backward(np.ascontiguousarray(dout), dx, ph, pw, stride)
    return dx


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


__all__ += [
    "BatchnormCache",
    "SpatialBatchnormCache",
    "LayernormCache",
    "GroupnormCache",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "layernorm_forward",
    "layernorm_backward",
    "spatial_groupnorm_forward",
    "spatial_groupnorm_backward",
]

_BN_PARAM_KEYS = ("mode", "eps", "momentum", "running_mean", "running_var")
# 'mode' is accepted (and ignored) by layernorm and groupnorm, which behave the same in training
# and at test time, so that code passing one param dict per layer to every norm layer works.
_NORM_PARAM_KEYS = ("eps", "mode")


class BatchnormCache(NamedTuple):
    """What :func:`batchnorm_backward` needs from :func:`batchnorm_forward`."""

    x: np.ndarray  # (N, D), C-contiguous (the caller's array when it already was)
    gamma: np.ndarray  # (D,), C-contiguous
    mean: np.ndarray  # (D,) float64: batch mean ('train') or running mean ('test')
    inv_std: np.ndarray  # (D,) float64: 1 / sqrt(var + eps) of the statistics used
    mode: str  # 'train' or 'test'


class SpatialBatchnormCache(NamedTuple):
    """What :func:`spatial_batchnorm_backward` needs from :func:`spatial_batchnorm_forward`."""

    x: np.ndarray  # (N, C, H, W), C-contiguous
    gamma: np.ndarray  # (C,), C-contiguous
    mean: np.ndarray  # (C,) float64
    inv_std: np.ndarray  # (C,) float64
    mode: str  # 'train' or 'test'


class LayernormCache(NamedTuple):
    """What :func:`layernorm_backward` needs from :func:`layernorm_forward`."""

    x: np.ndarray  # (N, D), C-contiguous
    gamma: np.ndarray  # (D,), C-contiguous
    mean: np.ndarray  # (N, 1) float64, per sample
    inv_std: np.ndarray  # (N, 1) float64


class GroupnormCache(NamedTuple):
    """What :func:`spatial_groupnorm_backward` needs from :func:`spatial_groupnorm_forward`."""

    x: np.ndarray  # (N, C, H, W), C-contiguous
    gamma: np.ndarray  # (C,), C-contiguous (the (1, C, 1, 1) argument flattened)
    G: int  # number of groups, divides C
    mean: np.ndarray  # (N, G) float64, per sample and group
    inv_std: np.ndarray  # (N, G) float64


def _check_eps(params: Mapping, name: str) -> float:
    """Return ``params['eps']`` (default 1e-5) as a float after checking it is finite and > 0."""
    return _check_number(params.get("eps", 1e-5), f"{name}['eps']", 0, math.inf, "()")


def _check_mode(params: Mapping, name: str) -> str | None:
    """Return ``params['mode']`` if it is 'train' or 'test', None if it is absent."""
    if "mode" not in params:
        return None
    mode = params["mode"]
    if not isinstance(mode, str) or mode not in ("train", "test"):
        raise ValueError(f"{name}['mode'] must be 'train' or 'test', got {mode!r}")
    return mode


def _check_momentum(params: Mapping) -> float:
    """Return ``params['momentum']`` (default 0.9) after checking it is in [0, 1)."""
    return _check_number(params.get("momentum", 0.9), "bn_param['momentum']", 0, 1, "[)")


def _running_stat(params: Mapping, key: str, x: np.ndarray, C: int, default: float) -> np.ndarray:
    """Return ``params[key]`` checked to be a (C,) array of x's dtype, or a filled default."""
    if key not in params:
        return np.full(C, default, dtype=x.dtype)
    name = f"bn_param[{key!r}]"
    stat = _check_array(params[key], name, 1, "(C,)")
    _check_shape(stat, name, (C,), "(one value per channel of x)")
    _check_same_dtype("x", x, **{name: stat})
    return stat


def _check_norm_affine(
    x: np.ndarray, gamma: Any, beta: Any, shape: tuple[int, ...], layout: str, meaning: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check gamma and beta: arrays of x's dtype and of the given shape."""
    gamma = _check_array(gamma, "gamma", len(shape), layout)
    beta = _check_array(beta, "beta", len(shape), layout)
    _check_same_dtype("x", x, gamma=gamma, beta=beta)
    _check_shape(gamma, "gamma", shape, meaning)
    _check_shape(beta, "beta", shape, meaning)
    return gamma, beta


def _batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Shared body of the batchnorm forwards; x is (N, C, ...) and gamma, beta are (C,).

    Returns ``out, x_contiguous, gamma_contiguous, mean, inv_std, mode``.
    """
    params = _check_params(bn_param, "bn_param", _BN_PARAM_KEYS, ("mode",))
    mode = _check_mode(params, "bn_param")
    eps = _check_eps(params, "bn_param")
    momentum = _check_momentum(params)
    N, C = x.shape[:2]
    running_mean = _running_stat(params, "running_mean", x, C, 0.0)
    running_var = _running_stat(params, "running_var", x, C, 1.0)
    for key, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if not np.all(np.isfinite(stat)):
            raise ValueError(f"bn_param[{key!r}] must be finite, got NaN or inf")
    if np.any(running_var < 0):
        raise ValueError("bn_param['running_var'] must be >= 0, got a negative variance")
    if mode == "train" and not callable(getattr(params, "__setitem__", None)):
        raise TypeError(
            "bn_param must be a mutable mapping (a dict) in 'train' mode: the running "
            f"statistics are written back into it; got {type(params).__name__}"
        )

    x_c = np.ascontiguousarray(x)
    x3 = x_c.reshape(N, C, -1)  # (N, C, S), a view
    gamma_c = np.ascontiguousarray(gamma)
    out = np.empty(x.shape, dtype=x.dtype)
    out3 = out.reshape(N, C, -1)  # (N, C, S), a view the kernel writes into
    if mode == "train":
        mean = np.empty(C)
        var = np.empty(C)
        inv_std = np.empty(C)
        _norm.channel_forward(
            x3, gamma_c, np.ascontiguousarray(beta), eps, out3, mean, var, inv_std
        )
        # New arrays: the caller's running statistics are replaced, never modified in place.
        params["running_mean"] = (
            momentum * running_mean.astype(np.float64) + (1.0 - momentum) * mean
        ).astype(x.dtype)
        params["running_var"] = (
            momentum * running_var.astype(np.float64) + (1.0 - momentum) * var
        ).astype(x.dtype)
    else:
        mean = running_mean.astype(np.float64)
        inv_std = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
        _norm.channel_affine(x3, mean, inv_std, gamma_c, np.ascontiguousarray(beta), out3)
    return out, x_c, gamma_c, mean, inv_std, mode


def _batchnorm_backward(
    dout: Any, cache: BatchnormCache | SpatialBatchnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of the batchnorm backwards (cache already type-checked)."""
    x, gamma, mean, inv_std, mode = cache
    N, C = x.shape[:2]
    dout = _check_dout(dout, x.shape, x.dtype)
    dout3 = np.ascontiguousarray(dout).reshape(N, C, -1)  # (N, C, S)
    dx = np.empty(x.shape, dtype=x.dtype)
    dgamma = np.empty(C, dtype=x.dtype)
    dbeta = np.empty(C, dtype=x.dtype)
    _norm.channel_backward(
        dout3,
        x.reshape(N, C, -1),
        mean,
        inv_std,
        gamma,
        mode == "train",
        dx.reshape(N, C, -1),
        dgamma,
        dbeta,
    )
    return dx, dgamma, dbeta


def batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict
) -> tuple[np.ndarray, BatchnormCache]:
    """Batch normalisation of features: ``out = gamma * (x - mean) / sqrt(var + eps) + beta``.

    In ``'train'`` mode ``mean`` and ``var`` are the per-feature mean and biased (divided by N)
    variance of this batch, and the running statistics are updated as

    ``running_mean = momentum * running_mean + (1 - momentum) * mean``,
    ``running_var = momentum * running_var + (1 - momentum) * var``

    and written back into ``bn_param`` as NEW arrays (the arrays that were there are not
    modified). In ``'test'`` mode ``mean`` and ``var`` are the running statistics and
    ``bn_param`` is left untouched.

    This is the CS231n convention. PyTorch's ``BatchNorm`` ``momentum`` is ``1 - momentum``
    here (its default 0.1 is 0.9 here), and PyTorch keeps the unbiased (divided by N - 1) batch
    variance in ``running_var``, while this layer keeps the biased one that it normalises with.

    Parameters
    ----------
    x : ndarray, shape (N, D)
    gamma : ndarray, shape (D,)
        Scale.
    beta : ndarray, shape (D,)
        Shift.
    bn_param : dict
        ``'mode'`` (required): ``'train'`` or ``'test'``;
        ``'eps'`` (number > 0, default 1e-5): added to the variance;
        ``'momentum'`` (in [0, 1), default 0.9): weight of the old running statistics;
        ``'running_mean'``, ``'running_var'`` (ndarray (D,) of x's dtype): when missing they
        start as zeros and ones respectively. No other key is accepted.

    Returns
    -------
    out : ndarray, shape (N, D), dtype of x
    cache : BatchnormCache
        For :func:`batchnorm_backward` (in either mode).

    Shape
    -----
    ``out`` has the shape of ``x``; statistics are per feature, over the N samples. With
    N = 1 in 'train' mode every ``x - mean`` is 0 and ``out`` is ``beta``.
    """
    x = _check_array(x, "x", 2, "(N, D)")
    gamma, beta = _check_norm_affine(
        x, gamma, beta, (x.shape[1],), "(D,)", "(one value per feature of x)"
    )
    out, x_c, gamma_c, mean, inv_std, mode = _batchnorm_forward(x, gamma, beta, bn_param)
    return out, BatchnormCache(x_c, gamma_c, mean, inv_std, mode)


def batchnorm_backward(
    dout: np.ndarray, cache: BatchnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`batchnorm_forward`.

    In 'train' mode the gradient flows through the batch statistics too. With
    ``xhat = (x - mean) / sqrt(var + eps)`` and sums over the batch, per feature:

    ``dx = gamma / (N * sqrt(var + eps)) * (N * dout - sum(dout) - xhat * sum(dout * xhat))``.

    In 'test' mode the statistics are constants and ``dx = gamma * dout / sqrt(var + eps)``.
    Both modes run in one compiled kernel; :func:`batchnorm_backward_alt` is the same function
    (the staged computation-graph derivation lives in
    :func:`cnnserve.reference.batchnorm_backward_naive`).

    Parameters
    ----------
    dout : ndarray, shape (N, D)
        Upstream gradient, dtype of x.
    cache : BatchnormCache
        From :func:`batchnorm_forward`.

    Returns
    -------
    dx : ndarray, shape (N, D)
    dgamma : ndarray, shape (D,)
        ``sum(dout * xhat)`` over the batch.
    dbeta : ndarray, shape (D,)
        ``sum(dout)`` over the batch.
    """
    _check_cache(cache, BatchnormCache, "batchnorm_forward")
    return _batchnorm_backward(dout, cache)


def batchnorm_backward_alt(
    dout: np.ndarray, cache: BatchnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`batchnorm_forward` by the simplified formula, in NumPy.

    CS231n asks for two backward passes: one through the computation graph and this
    "alternative" one from the closed-form expression. :func:`batchnorm_backward` runs the
    compiled kernel; this one evaluates the same expression with vectorised NumPy (in float64,
    cast back to x's dtype). They agree to rounding, and the kernel is the faster of the two.
    Parameters and returns are those of :func:`batchnorm_backward`.
    """
    _check_cache(cache, BatchnormCache, "batchnorm_forward")
    x, gamma, mean, inv_std, mode = cache
    dout = _check_dout(dout, x.shape, x.dtype)
    d = dout.astype(np.float64)
    xhat = (x - mean) * inv_std  # (N, D), float64
    dbeta = d.sum(axis=0)
    dgamma = (d * xhat).sum(axis=0)
    if mode == "train":
        # dx = gamma / (N * std) * (N * dout - sum(dout) - xhat * sum(dout * xhat))
        N = x.shape[0]
        dx = (gamma * inv_std / N) * (N * d - dbeta - xhat * dgamma)
    else:  # fixed statistics: out is an affine function of x
        dx = gamma * inv_std * d
    return dx.astype(x.dtype), dgamma.astype(x.dtype), dbeta.astype(x.dtype)


def spatial_batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict
) -> tuple[np.ndarray, SpatialBatchnormCache]:
    """Batch normalisation of conv feature maps, one mean and variance per channel.

    Same as :func:`batchnorm_forward` with each channel as a feature and the N * H * W values
    of a channel as its batch: same ``bn_param`` keys, modes, defaults and running-statistic
    update (written back as new arrays in 'train' mode).

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    gamma : ndarray, shape (C,)
    beta : ndarray, shape (C,)
    bn_param : dict
        As for :func:`batchnorm_forward`; ``'running_mean'`` and ``'running_var'`` are (C,).

    Returns
    -------
    out : ndarray, shape (N, C, H, W), dtype of x
    cache : SpatialBatchnormCache
        For :func:`spatial_batchnorm_backward`.

    Shape
    -----
    ``out`` has the shape of ``x``; statistics are per channel, over (N, H, W).
    """
    x = _check_array(x, "x", 4, "(N, C, H, W)")
    gamma, beta = _check_norm_affine(
        x, gamma, beta, (x.shape[1],), "(C,)", "(one value per channel of x)"
    )
    out, x_c, gamma_c, mean, inv_std, mode = _batchnorm_forward(x, gamma, beta, bn_param)
    return out, SpatialBatchnormCache(x_c, gamma_c, mean, inv_std, mode)


def spatial_batchnorm_backward(
    dout: np.ndarray, cache: SpatialBatchnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`spatial_batchnorm_forward`.

    The formula of :func:`batchnorm_backward` with the sums over (N, H, W) and N replaced by
    ``M = N * H * W``.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H, W)
    cache : SpatialBatchnormCache

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    dgamma : ndarray, shape (C,)
    dbeta : ndarray, shape (C,)
    """
    _check_cache(cache, SpatialBatchnormCache, "spatial_batchnorm_forward")
    return _batchnorm_backward(dout, cache)


def _group_norm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, G: int, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of layernorm and groupnorm; x is (N, C, ...), gamma and beta any shape of C
    values. Returns ``out, x_contiguous, gamma_flat, mean, inv_std``."""
    N, C = x.shape[:2]
    x_c = np.ascontiguousarray(x)
    gamma_flat = np.ascontiguousarray(gamma.reshape(C))
    out = np.empty(x.shape, dtype=x.dtype)
    mean = np.empty((N, G))
    inv_std = np.empty((N, G))
    _norm.group_forward(
        x_c.reshape(N, C, -1),  # (N, C, S)
        gamma_flat,
        np.ascontiguousarray(beta.reshape(C)),
        G,
        eps,
        out.reshape(N, C, -1),
        mean,
        inv_std,
    )
    return out, x_c, gamma_flat, mean, inv_std


def _group_norm_backward(
    dout: Any, x: np.ndarray, gamma: np.ndarray, G: int, mean: np.ndarray, inv_std: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of the layernorm and groupnorm backwards; dgamma, dbeta come out (C,)."""
    N, C = x.shape[:2]
    dout = _check_dout(dout, x.shape, x.dtype)
    dx = np.empty(x.shape, dtype=x.dtype)
    dgamma = np.empty(C, dtype=x.dtype)
    dbeta = np.empty(C, dtype=x.dtype)
    _norm.group_backward(
        np.ascontiguousarray(dout).reshape(N, C, -1),  # (N, C, S)
        x.reshape(N, C, -1),
        mean,
        inv_std,
        gamma,
        G,
        dx.reshape(N, C, -1),
        dgamma,
        dbeta,
    )
    return dx, dgamma, dbeta


def layernorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, ln_param: dict
) -> tuple[np.ndarray, LayernormCache]:
    """Layer normalisation: each sample normalised over its own D features.

    ``out[n] = gamma * (x[n] - mean_n) / sqrt(var_n + eps) + beta`` with the mean and biased
    variance of row ``n``. There are no running statistics: training and test behave the same.

    Parameters
    ----------
    x : ndarray, shape (N, D)
    gamma : ndarray, shape (D,)
    beta : ndarray, shape (D,)
    ln_param : dict
        ``'eps'`` (number > 0, default 1e-5). A ``'mode'`` key ('train' or 'test') is accepted
        and has no effect.

    Returns
    -------
    out : ndarray, shape (N, D), dtype of x
    cache : LayernormCache
        For :func:`layernorm_backward`.

    Shape
    -----
    ``out`` has the shape of ``x``; statistics are per sample, over the D features. With
    D = 1 every ``x - mean`` is 0 and ``out`` is ``beta``.
    """
    x = _check_array(x, "x", 2, "(N, D)")
    gamma, beta = _check_norm_affine(
        x, gamma, beta, (x.shape[1],), "(D,)", "(one value per feature of x)"
    )
    params = _check_params(ln_param, "ln_param", _NORM_PARAM_KEYS)
    _check_mode(params, "ln_param")
    eps = _check_eps(params, "ln_param")
    out, x_c, gamma_c, mean, inv_std = _group_norm_forward(x, gamma, beta, 1, eps)
    return out, LayernormCache(x_c, gamma_c, mean, inv_std)


def layernorm_backward(
    dout: np.ndarray, cache: LayernormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`layernorm_forward`.

    With ``dxhat = dout * gamma`` and means over the D features of a sample:
    ``dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)``.

    Parameters
    ----------
    dout : ndarray, shape (N, D)
    cache : LayernormCache

    Returns
    -------
    dx : ndarray, shape (N, D)
    dgamma : ndarray, shape (D,)
        ``sum(dout * xhat)`` over the samples.
    dbeta : ndarray, shape (D,)
        ``sum(dout)`` over the samples.
    """
    _check_cache(cache, LayernormCache, "layernorm_forward")
    x, gamma, mean, inv_std = cache
    return _group_norm_backward(dout, x, gamma, 1, mean, inv_std)


def spatial_groupnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, G: int, gn_param: dict
) -> tuple[np.ndarray, GroupnormCache]:
    """Group normalisation: each sample's C channels split into G groups of C / G channels.

    Every (sample, group) is normalised over its ``(C / G) * H * W`` values with their mean
    and biased variance; then channel ``c`` is scaled by ``gamma[0, c, 0, 0]`` and shifted by
    ``beta[0, c, 0, 0]``. ``G = 1`` is layer norm over (C, H, W); ``G = C`` is instance norm.
    No running statistics: training and test behave the same.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    gamma : ndarray, shape (1, C, 1, 1)
    beta : ndarray, shape (1, C, 1, 1)
    G : int
        Number of groups, ``>= 1``, must divide C.
    gn_param : dict
        ``'eps'`` (number > 0, default 1e-5). A ``'mode'`` key ('train' or 'test') is accepted
        and has no effect.

    Returns
    -------
    out : ndarray, shape (N, C, H, W), dtype of x
    cache : GroupnormCache
        For :func:`spatial_groupnorm_backward`.

    Shape
    -----
    ``out`` has the shape of ``x``; statistics are per (n, g), over
    ``x[n, g*C/G:(g+1)*C/G, :, :]``.
    """
    x = _check_array(x, "x", 4, "(N, C, H, W)")
    C = x.shape[1]
    gamma, beta = _check_norm_affine(
        x, gamma, beta, (1, C, 1, 1), "(1, C, 1, 1)", "(one value per channel of x)"
    )
    G = _check_int(G, "G", 1)
    if C % G:
        raise ValueError(f"G must divide the number of channels C = {C}, got G = {G}")
    params = _check_params(gn_param, "gn_param", _NORM_PARAM_KEYS)
    _check_mode(params, "gn_param")
    eps = _check_eps(params, "gn_param")
    out, x_c, gamma_flat, mean, inv_std = _group_norm_forward(x, gamma, beta, G, eps)
    return out, GroupnormCache(x_c, gamma_flat, G, mean, inv_std)


def spatial_groupnorm_backward(
    dout: np.ndarray, cache: GroupnormCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward pass of :func:`spatial_groupnorm_forward`.

    With ``dxhat = dout * gamma[c]`` and means over the ``(C / G) * H * W`` values of a group:
    ``dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)``.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H, W)
    cache : GroupnormCache

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    dgamma : ndarray, shape (1, C, 1, 1)
        ``sum(dout * xhat)`` over (N, H, W).
    dbeta : ndarray, shape (1, C, 1, 1)
        ``sum(dout)`` over (N, H, W).
    """
    _check_cache(cache, GroupnormCache, "spatial_groupnorm_forward")
    x, gamma, G, mean, inv_std = cache
    dx, dgamma, dbeta = _group_norm_backward(dout, x, gamma, G, mean, inv_std)
    C = x.shape[1]
    return dx, dgamma.reshape(1, C, 1, 1), dbeta.reshape(1, C, 1, 1)
