# cython: language_level=3
"""Pooling kernels: max and average pooling, forward and backward, without padding.

A window of ``pool_height x pool_width`` pixels is placed every ``stride`` pixels, so output
pixel ``(ho, wo)`` reads rows ``ho * stride .. ho * stride + pool_height - 1`` and columns
``wo * stride .. wo * stride + pool_width - 1``. The output size is taken from ``out`` / ``dout``
(the wrapper computed it and checked that it divides exactly). One ``prange`` iteration owns one
``(n, c)`` plane, so no two threads ever write to the same element.

Max pooling also records, for every window, the flat index ``h * W + w`` in the ``H * W`` plane
of the value it took: the backward pass sends the whole window gradient there and nowhere else.
That is the FIRST maximum in row-major order (a strict ``>`` while scanning rows, then columns).
A NaN beats every number: a window holding a NaN yields NaN, and its argmax is the first NaN,
so NaN propagates as in PyTorch.
"""

from cython cimport floating
from cython.parallel cimport prange


include "cnn_threads.pxi"


cdef extern from "cnn_pool.h" nogil:
    void cnn_max_pool_row_2x2_f(const float* r0, const float* r1, float* out, Py_ssize_t* arg,
                                Py_ssize_t base, Py_ssize_t W, Py_ssize_t W_out)
    void cnn_max_pool_row_2x2_d(const double* r0, const double* r1, double* out,
                                Py_ssize_t* arg, Py_ssize_t base, Py_ssize_t W,
                                Py_ssize_t W_out)
    void cnn_max_pool_row_3x3_f(const float* x, Py_ssize_t W, Py_ssize_t row0,
                                Py_ssize_t stride, float* out, Py_ssize_t* arg,
                                Py_ssize_t W_out)
    void cnn_max_pool_row_3x3_d(const double* x, Py_ssize_t W, Py_ssize_t row0,
                                Py_ssize_t stride, double* out, Py_ssize_t* arg,
                                Py_ssize_t W_out)
    void cnn_max_pool_backward_row_2x2_f(const float* dout, const Py_ssize_t* arg, float* r0,
                                         float* r1, Py_ssize_t base, Py_ssize_t W,
                                         Py_ssize_t W_out)
    void cnn_max_pool_backward_row_2x2_d(const double* dout, const Py_ssize_t* arg,
                                         double* r0, double* r1, Py_ssize_t base, Py_ssize_t W,
                                         Py_ssize_t W_out)
    void cnn_max_pool_row_f(const float* x, Py_ssize_t W, Py_ssize_t row0,
                            Py_ssize_t pool_height, Py_ssize_t pool_width, Py_ssize_t stride,
                            float* out, Py_ssize_t* arg, Py_ssize_t W_out)
    void cnn_max_pool_row_d(const double* x, Py_ssize_t W, Py_ssize_t row0,
                            Py_ssize_t pool_height, Py_ssize_t pool_width, Py_ssize_t stride,
                            double* out, Py_ssize_t* arg, Py_ssize_t W_out)


cdef void _max_pool_plane(const floating* xp, floating* outp, Py_ssize_t* argp, Py_ssize_t W,
                          Py_ssize_t H_out, Py_ssize_t W_out, Py_ssize_t pool_height,
                          Py_ssize_t pool_width, Py_ssize_t stride) noexcept nogil:
    """Max pool one (H, W) plane ``xp`` into one (H_out, W_out) plane ``outp`` / ``argp``.

    The rows are C loops without branches (``cnn_pool.h``); 2x2 windows at stride 2 and 3x3
    windows at any stride have their own row functions.
    """
    cdef Py_ssize_t ho
    cdef bint two_by_two = pool_height == 2 and pool_width == 2 and stride == 2
    cdef bint three_by_three = pool_height == 3 and pool_width == 3
    for ho in range(H_out):
        if floating is float:
            if two_by_two:
                cnn_max_pool_row_2x2_f(xp + 2 * ho * W, xp + (2 * ho + 1) * W, outp + ho * W_out,
                                       argp + ho * W_out, 2 * ho * W, W, W_out)
            elif three_by_three:
                cnn_max_pool_row_3x3_f(xp, W, ho * stride, stride, outp + ho * W_out,
                                       argp + ho * W_out, W_out)
            else:
                cnn_max_pool_row_f(xp, W, ho * stride, pool_height, pool_width, stride,
                                   outp + ho * W_out, argp + ho * W_out, W_out)
        else:
            if two_by_two:
                cnn_max_pool_row_2x2_d(xp + 2 * ho * W, xp + (2 * ho + 1) * W, outp + ho * W_out,
                                       argp + ho * W_out, 2 * ho * W, W, W_out)
            elif three_by_three:
                cnn_max_pool_row_3x3_d(xp, W, ho * stride, stride, outp + ho * W_out,
                                       argp + ho * W_out, W_out)
            else:
                cnn_max_pool_row_d(xp, W, ho * stride, pool_height, pool_width, stride,
                                   outp + ho * W_out, argp + ho * W_out, W_out)


def max_pool_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                     Py_ssize_t[:, :, :, ::1] argmax,
                     Py_ssize_t pool_height, Py_ssize_t pool_width, Py_ssize_t stride):
    """Fill ``out`` and ``argmax`` (N, C, H_out, W_out) from ``x`` (N, C, H, W)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], W = x.shape[3]
    cdef Py_ssize_t H_out = out.shape[2], W_out = out.shape[3]
    cdef Py_ssize_t nc, n, c
    cdef int threads = cnn_threads_for(N * C * H_out * W_out * pool_height * pool_width)
    with nogil:
        for nc in prange(N * C, schedule="static", num_threads=threads):
            n = nc // C
            c = nc % C
            _max_pool_plane(&x[n, c, 0, 0], &out[n, c, 0, 0], &argmax[n, c, 0, 0], W,
                            H_out, W_out, pool_height, pool_width, stride)


def max_pool_backward(const floating[:, :, :, ::1] dout, const Py_ssize_t[:, :, :, ::1] argmax,
                      floating[:, :, ::1] dx, Py_ssize_t W, bint two_by_two):
    """Scatter-add ``dout`` (N, C, H_out, W_out) into ``dx`` (N, C, H * W) at ``argmax``.

    ``dx`` is the (N, C, H, W) gradient viewed with each plane flattened (rows of ``W``); it is
    overwritten (zeroed first). Overlapping windows that share an argmax add up there. With
    ``two_by_two`` (2x2 windows at stride 2 that tile the plane) every window writes its four
    pixels in one pass instead: the window's gradient at its argmax, 0 at the others.
    """
    cdef Py_ssize_t N = dx.shape[0], C = dx.shape[1], P = dx.shape[2]
    cdef Py_ssize_t H_out = dout.shape[2], W_out = dout.shape[3]
    cdef Py_ssize_t nc, n, c, k, ho, wo
    cdef int threads = cnn_threads_for(N * C * (P + H_out * W_out))
    with nogil:
        for nc in prange(N * C, schedule="static", num_threads=threads):
            n = nc // C
            c = nc % C
            if two_by_two:
                for ho in range(H_out):
                    if floating is float:
                        cnn_max_pool_backward_row_2x2_f(
                            &dout[n, c, ho, 0], &argmax[n, c, ho, 0], &dx[n, c, 2 * ho * W],
                            &dx[n, c, (2 * ho + 1) * W], 2 * ho * W, W, W_out)
                    else:
                        cnn_max_pool_backward_row_2x2_d(
                            &dout[n, c, ho, 0], &argmax[n, c, ho, 0], &dx[n, c, 2 * ho * W],
                            &dx[n, c, (2 * ho + 1) * W], 2 * ho * W, W, W_out)
                continue
            for k in range(P):
                dx[n, c, k] = 0
            for ho in range(H_out):
                for wo in range(W_out):
                    dx[n, c, argmax[n, c, ho, wo]] += dout[n, c, ho, wo]


def avg_pool_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                     Py_ssize_t pool_height, Py_ssize_t pool_width, Py_ssize_t stride):
    """Fill ``out`` (N, C, H_out, W_out) with window means of ``x`` (N, C, H, W).

    Sums accumulate in double precision for either floating type.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t H_out = out.shape[2], W_out = out.shape[3]
    cdef Py_ssize_t nc, n, c, ho, wo, i, j, h0, w0
    cdef double area = <double>(pool_height * pool_width)
    cdef double s
    cdef int threads = cnn_threads_for(N * C * H_out * W_out * pool_height * pool_width)
    with nogil:
        for nc in prange(N * C, schedule="static", num_threads=threads):
            n = nc // C
            c = nc % C
            for ho in range(H_out):
                h0 = ho * stride
                for wo in range(W_out):
                    w0 = wo * stride
                    s = 0
                    for i in range(h0, h0 + pool_height):
                        for j in range(w0, w0 + pool_width):
                            s = s + x[n, c, i, j]
                    out[n, c, ho, wo] = <floating>(s / area)


def avg_pool_backward(const floating[:, :, :, ::1] dout, floating[:, :, :, ::1] dx,
                      Py_ssize_t pool_height, Py_ssize_t pool_width, Py_ssize_t stride):
    """Spread each ``dout`` (N, C, H_out, W_out) value evenly over its window of ``dx``.

    ``dx`` (N, C, H, W) is overwritten (zeroed first); overlapping windows add up.
    """
    cdef Py_ssize_t N = dx.shape[0], C = dx.shape[1], H = dx.shape[2], W = dx.shape[3]
    cdef Py_ssize_t H_out = dout.shape[2], W_out = dout.shape[3]
    cdef Py_ssize_t nc, n, c, ho, wo, i, j, h0, w0
    cdef Py_ssize_t area = pool_height * pool_width
    cdef floating g
    cdef int threads = cnn_threads_for(N * C * (H * W + H_out * W_out * pool_height * pool_width))
    with nogil:
        for nc in prange(N * C, schedule="static", num_threads=threads):
            n = nc // C
            c = nc % C
            for i in range(H):
                for j in range(W):
                    dx[n, c, i, j] = 0
            for ho in range(H_out):
                h0 = ho * stride
                for wo in range(W_out):
                    w0 = wo * stride
                    g = dout[n, c, ho, wo] / area
                    for i in range(h0, h0 + pool_height):
                        for j in range(w0, w0 + pool_width):
                            dx[n, c, i, j] += g
