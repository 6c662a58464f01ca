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


cdef inline bint _replaces(floating v, floating best) noexcept nogil:
    """True if ``v`` takes over from ``best`` in a row-major scan: larger, or the first NaN.

    Strict ``>`` keeps the first of equal maxima; ``v != v`` is a NaN, taken only while ``best``
    is not NaN yet, so the first NaN stays.
    """
    return v > best or (v != v and best == best)


cdef void _max_pool_plane(const floating* xp, floating* outp, Py_ssize_t* argp, Py_ssize_t W,
                          Py_ssize_t H_out, Py_ssize_t W_out, Py_ssize_t pool_height,
                          Py_ssize_t pool_width, Py_ssize_t stride) noexcept nogil:
    """Max pool one (H, W) plane ``xp`` into one (H_out, W_out) plane ``outp`` / ``argp``."""
    cdef Py_ssize_t ho, wo, i, j, start, at, best_at
    cdef floating v, best
    for ho in range(H_out):
        for wo in range(W_out):
            start = ho * stride * W + wo * stride
            best = xp[start]
            best_at = start
            for i in range(pool_height):
                for j in range(pool_width):
                    at = start + i * W + j
                    v = xp[at]
                    if _replaces(v, best):
                        best = v
                        best_at = at
            outp[ho * W_out + wo] = best
            argp[ho * W_out + wo] = best_at


cdef void _max_pool_plane_2x2(const floating* xp, floating* outp, Py_ssize_t* argp, Py_ssize_t W,
                              Py_ssize_t H_out, Py_ssize_t W_out) noexcept nogil:
    """:func:`_max_pool_plane` for 2x2 windows at stride 2, unrolled in the same order."""
    cdef Py_ssize_t ho, wo, at, best_at
    cdef floating v, best
    for ho in range(H_out):
        for wo in range(W_out):
            at = 2 * ho * W + 2 * wo
            best = xp[at]
            best_at = at
            v = xp[at + 1]
            if _replaces(v, best):
                best = v
                best_at = at + 1
            v = xp[at + W]
            if _replaces(v, best):
                best = v
                best_at = at + W
            v = xp[at + W + 1]
            if _replaces(v, best):
                best = v
                best_at = at + W + 1
            outp[ho * W_out + wo] = best
            argp[ho * W_out + wo] = best_at


cdef inline void _take(const floating* xp, Py_ssize_t at, floating* best,
                       Py_ssize_t* best_at) noexcept nogil:
    """Let ``xp[at]`` take over from ``best[0]`` (at ``best_at[0]``) if :func:`_replaces`."""
    cdef floating v = xp[at]
    if _replaces(v, best[0]):
        best[0] = v
        best_at[0] = at


cdef void _max_pool_plane_3x3(const floating* xp, floating* outp, Py_ssize_t* argp, Py_ssize_t W,
                              Py_ssize_t H_out, Py_ssize_t W_out,
                              Py_ssize_t stride) noexcept nogil:
    """:func:`_max_pool_plane` for 3x3 windows (any stride), unrolled in the same order."""
    cdef Py_ssize_t ho, wo, at, best_at
    cdef floating best
    for ho in range(H_out):
        for wo in range(W_out):
            at = ho * stride * W + wo * stride
            best = xp[at]
            best_at = at
            _take(xp, at + 1, &best, &best_at)
            _take(xp, at + 2, &best, &best_at)
            _take(xp, at + W, &best, &best_at)
            _take(xp, at + W + 1, &best, &best_at)
            _take(xp, at + W + 2, &best, &best_at)
            _take(xp, at + 2 * W, &best, &best_at)
            _take(xp, at + 2 * W + 1, &best, &best_at)
            _take(xp, at + 2 * W + 2, &best, &best_at)
            outp[ho * W_out + wo] = best
            argp[ho * W_out + wo] = best_at


def max_pool_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                     Py_ssize_t[:, :, :, ::1] argmax,
                     Py_ssize_t pool_height, Py_ssize_t pool_width, Py_ssize_t stride):
    """Fill ``out`` and ``argmax`` (N, C, H_out, W_out) from ``x`` (N, C, H, W).

    The common 2x2 stride-2 and 3x3 (any stride) windows take unrolled paths (about 1.5x
    faster), with the same results.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], W = x.shape[3]
    cdef Py_ssize_t H_out = out.shape[2], W_out = out.shape[3]
    cdef Py_ssize_t nc, n, c
    cdef bint two_by_two = pool_height == 2 and pool_width == 2 and stride == 2
    cdef bint three_by_three = pool_height == 3 and pool_width == 3
    cdef int threads = cnn_threads_for(N * C * H_out * W_out * pool_height * pool_width)
    with nogil:
        for nc in prange(N * C, schedule="static", num_threads=threads):
            n = nc // C
            c = nc % C
            if two_by_two:
                _max_pool_plane_2x2(&x[n, c, 0, 0], &out[n, c, 0, 0], &argmax[n, c, 0, 0], W,
                                    H_out, W_out)
            elif three_by_three:
                _max_pool_plane_3x3(&x[n, c, 0, 0], &out[n, c, 0, 0], &argmax[n, c, 0, 0], W,
                                    H_out, W_out, stride)
            else:
                _max_pool_plane(&x[n, c, 0, 0], &out[n, c, 0, 0], &argmax[n, c, 0, 0], W,
                                H_out, W_out, pool_height, pool_width, stride)


def max_pool_backward(const floating[:, :, :, ::1] dout, const Py_ssize_t[:, :, :, ::1] argmax,
                      floating[:, :, ::1] dx):
    """Scatter-add ``dout`` (N, C, H_out, W_out) into ``dx`` (N, C, H * W) at ``argmax``.

    ``dx`` is the (N, C, H, W) gradient viewed with each plane flattened; it is overwritten
    (zeroed first). Overlapping windows that share an argmax add up there.
    """
    cdef Py_ssize_t N = dx.shape[0], C = dx.shape[1], P = dx.shape[2]
    cdef Py_ssize_t H_out = dout.shape[2], W_out = dout.shape[3]
    cdef Py_ssize_t nc, n, c, k, ho, wo
    cdef int threads = cnn_threads_for(N * C * (P + H_out * W_out))
    with nogil:
        for nc in prange(N * C, schedule="static", num_threads=threads):
            n = nc // C
            c = nc % C
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
