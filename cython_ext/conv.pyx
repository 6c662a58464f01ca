# cython: language_level=3
"""Convolution kernels: im2col (forward) and col2im (backward).

The column matrix ``cols`` has shape ``(C * HH * WW, N * H_out * W_out)``: row
``(c * HH + i) * WW + j`` holds input pixel ``(c, ho * stride - pad + i, wo * stride - pad + j)``
of image ``n`` at column ``(n * H_out + ho) * W_out + wo``, zero where that pixel falls in the
padding. With weights reshaped to ``(F, C * HH * WW)`` the convolution is one matrix product.
"""

from cython cimport floating
from cython.parallel cimport prange


include "cnn_threads.pxi"


cdef inline Py_ssize_t _first_valid(Py_ssize_t offset, Py_ssize_t stride) noexcept nogil:
    """Smallest o >= 0 with o * stride + offset >= 0."""
    if offset >= 0:
        return 0
    return (-offset + stride - 1) // stride


cdef inline Py_ssize_t _end_valid(Py_ssize_t offset, Py_ssize_t stride, Py_ssize_t size,
                                  Py_ssize_t n_out) noexcept nogil:
    """One past the largest o < n_out with o * stride + offset < size (at least 0)."""
    cdef Py_ssize_t last
    if size - 1 - offset < 0:
        return 0
    last = (size - 1 - offset) // stride + 1
    return last if last < n_out else n_out


def im2col(const floating[:, :, :, ::1] x, floating[:, ::1] cols,
           Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride, Py_ssize_t pad):
    """Fill ``cols`` (C*HH*WW, N*H_out*W_out) from ``x`` (N, C, H, W); every entry is written."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t H_out = (H + 2 * pad - HH) // stride + 1
    cdef Py_ssize_t W_out = (W + 2 * pad - WW) // stride + 1
    cdef Py_ssize_t P = H_out * W_out
    cdef Py_ssize_t nc, n, c, i, j, ho, wo, hi, off_w, wo_lo, wo_hi
    cdef const floating* src
    cdef floating* dst
    cdef int threads = cnn_threads_for(N * C * HH * WW * P)
    with nogil:
        for nc in prange(N * C, schedule="static", num_threads=threads):
            n = nc // C
            c = nc % C
            for i in range(HH):
                for j in range(WW):
                    off_w = j - pad
                    # Columns [wo_lo, wo_hi) read the image; the rest of the row is padding.
                    wo_lo = _first_valid(off_w, stride)
                    if wo_lo > W_out:
                        wo_lo = W_out
                    wo_hi = _end_valid(off_w, stride, W, W_out)
                    if wo_hi < wo_lo:
                        wo_hi = wo_lo
                    for ho in range(H_out):
                        # row (c, i, j) of cols, columns of image n, output row ho
                        dst = &cols[(c * HH + i) * WW + j, n * P + ho * W_out]
                        hi = ho * stride - pad + i
                        if hi < 0 or hi >= H:
                            for wo in range(W_out):
                                dst[wo] = 0
                            continue
                        src = &x[n, c, hi, 0]
                        for wo in range(wo_lo):
                            dst[wo] = 0
                        if stride == 1:  # a contiguous copy the compiler vectorises
                            for wo in range(wo_lo, wo_hi):
                                dst[wo] = src[wo + off_w]
                        else:
                            for wo in range(wo_lo, wo_hi):
                                dst[wo] = src[wo * stride + off_w]
                        for wo in range(wo_hi, W_out):
                            dst[wo] = 0


def col2im(const floating[:, ::1] cols, floating[:, :, :, ::1] dx,
           Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride, Py_ssize_t pad):
    """Scatter-add ``cols`` (C*HH*WW, N*H_out*W_out) into ``dx`` (N, C, H, W).

    ``dx`` is overwritten (zeroed first); entries that came from the padding are dropped.
    """
    cdef Py_ssize_t N = dx.shape[0], C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t H_out = (H + 2 * pad - HH) // stride + 1
    cdef Py_ssize_t W_out = (W + 2 * pad - WW) // stride + 1
    cdef Py_ssize_t P = H_out * W_out
    cdef Py_ssize_t nc, n, c, i, j, ho, wo, hi, wi, off_w, wo_lo, wo_hi
    cdef const floating* src
    cdef floating* dst
    cdef int threads = cnn_threads_for(N * C * (H * W + HH * WW * P))
    with nogil:
        for nc in prange(N * C, schedule="static", num_threads=threads):
            n = nc // C
            c = nc % C
            dst = &dx[n, c, 0, 0]
            for wi in range(H * W):
                dst[wi] = 0
            for i in range(HH):
                for j in range(WW):
                    off_w = j - pad
                    wo_lo = _first_valid(off_w, stride)
                    wo_hi = _end_valid(off_w, stride, W, W_out)
                    for ho in range(H_out):
                        hi = ho * stride - pad + i
                        if hi < 0 or hi >= H:
                            continue
                        src = &cols[(c * HH + i) * WW + j, n * P + ho * W_out]
                        dst = &dx[n, c, hi, 0]
                        if stride == 1:
                            for wo in range(wo_lo, wo_hi):
                                dst[wo + off_w] += src[wo]
                        else:
                            for wo in range(wo_lo, wo_hi):
                                dst[wo * stride + off_w] += src[wo]
