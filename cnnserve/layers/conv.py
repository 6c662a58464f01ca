"""Convolution: :func:`conv_forward` and :func:`conv_backward`, the choice of kernel path for a
shape, and filters packed once for inference (:class:`PackedFilters`).

The paths (see the README's "How it is built"): Winograd F(2x2, 3x3) for 3x3 filters at
stride 1; im2col fused with single-threaded BLAS per image and thread; a batched im2col and one
multithreaded GEMM for few images or thin maps; a kernel of its own for very thin outputs over
large filter banks (``cnn_skinny.h``), and one for filters packed once
(``cnn_skinny_packed.h``); 1x1 and whole-image filters as plain products.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from cnnserve._ext import load
from cnnserve.layers import _runtime
from cnnserve.layers._checks import (
    check_array,
    check_cache,
    check_dout,
    check_param_int,
    check_params,
    check_same_dtype,
    check_shape,
    window_count,
)

_conv = load("conv")

__all__ = ["ConvCache", "PackedFilters", "conv_backward", "conv_forward", "pack_filters"]


class ConvCache(NamedTuple):
    """What :func:`conv_backward` needs from :func:`conv_forward`.

    It unpacks like the source notes' cache, ``x, w, b, conv_param = cache``.
    """

    x: np.ndarray  # (N, C, H, W), C-contiguous (the caller's array when it already was)
    w: np.ndarray  # (F, C, HH, WW)
    b: np.ndarray  # (F,)
    conv_param: dict  # {'stride': int, 'pad': int}, a normalised copy


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
    w = check_array(w, "w", 4, "(F, C, HH, WW)")
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
    # 'pad' is required, as in the source notes' API: a forgotten pad is not silently 0
    params = check_params(conv_param, "conv_param", ("stride", "pad"), required=("pad",))
    stride = check_param_int(params.get("stride", 1), "conv_param['stride']", 1)
    pad = check_param_int(params["pad"], "conv_param['pad']", 0)
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
        ``'stride'`` (int >= 1, default 1) and ``'pad'`` (int >= 0, required, as in the source
        notes: a missing ``'pad'`` is a ValueError, never a silent 0): zeros added on every
        side of the height and width axes.

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
    x = check_array(x, "x", 4, "(N, C, H, W)")
    packed = None
    if isinstance(w, PackedFilters):
        packed, w = w, w.w
    w = check_array(w, "w", 4, "(F, C, HH, WW)")
    b = check_array(b, "b", 1, "(F,)")
    check_same_dtype("x", x, w=w, b=b)
    N, C, H, W = x.shape
    F, Cw, HH, WW = w.shape
    if Cw != C:
        raise ValueError(
            f"w has {Cw} input channels but x has {C}: w must be (F, C, HH, WW) with "
            f"C = x.shape[1] = {C}, got shape {w.shape}"
        )
    check_shape(b, "b", (F,), "(one bias per filter)")
    stride, pad = _conv_param(conv_param)
    H_out = window_count(H, HH, stride, pad, "conv: filter height HH along H")
    W_out = window_count(W, WW, stride, pad, "conv: filter width WW along W")

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
        with _runtime.SCRATCH.borrow((threads * scratch,), x.dtype) as (buf,), _runtime.BLAS_1:
            _conv.winograd_forward(
                x, _winograd_filters(w), np.ascontiguousarray(b), out,
                buf.reshape(threads, scratch), pad, 1, threads,
            )  # fmt: skip
        return out, cache
    if packed is not None and packed.packed and N * P <= _PACKED_MAX_COLUMNS:
        # The same product on the filters packed once (cnn_skinny_packed.h), against the
        # im2col columns (K, N*P) as they are.
        with _runtime.SCRATCH.borrow((K * N * P,), x.dtype) as (cols_buf,):
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
        with _runtime.SCRATCH.borrow((K * N * P + 16,), x.dtype) as (t_buf,):
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
        with _runtime.SCRATCH.borrow((threads * scratch,), x.dtype) as (cols_buf,), _runtime.BLAS_1:
            _conv.conv_forward_fused(
                x, w_mat, np.ascontiguousarray(b), out.reshape(N, F, P),
                cols_buf.reshape(threads, -1), HH, WW, stride, pad, rows, threads,
            )  # fmt: skip
        return out, cache
    step = _runtime.images_per_chunk(N, max(K, F) * P, x.itemsize)
    with _runtime.SCRATCH.borrow((K * step * P, F * step * P), x.dtype) as (cols_buf, prod_buf):
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
    check_cache(cache, ConvCache, "conv_forward")
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
    dout = check_dout(dout, (N, F, H_out, W_out), x.dtype)

    K, P = C * HH * WW, H_out * W_out
    w_mat = w.reshape(F, K)
    threads, scratch = _winograd_plan(N, C, F, HH, WW, stride, H_out, W_out, x.itemsize)
    if threads:
        dx = np.empty(x.shape, dtype=x.dtype)
        dU_parts = np.empty((threads, 16, F, C), dtype=x.dtype)
        db_parts = np.empty((threads, F), dtype=np.float64)
        with _runtime.SCRATCH.borrow((threads * scratch,), x.dtype) as (buf,), _runtime.BLAS_1:
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
        with _runtime.SCRATCH.borrow((threads * scratch,), x.dtype) as (cols_buf,), _runtime.BLAS_1:
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
    step = _runtime.images_per_chunk(N, max(K, F) * P, x.itemsize)
    with _runtime.SCRATCH.borrow((K * step * P, F * step * P), x.dtype) as (cols_buf, dout_buf):
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
