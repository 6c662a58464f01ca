# cython: language_level=3
"""Convolution kernels: im2col (forward) and col2im (backward).

The column matrix ``cols`` has shape ``(C * HH * WW, N * H_out * W_out)``: row
``(c * HH + i) * WW + j`` holds input pixel ``(c, ho * stride - pad + i, wo * stride - pad + j)``
of image ``n`` at column ``(n * H_out + ho) * W_out + wo``, zero where that pixel falls in the
padding. With weights reshaped to ``(F, C * HH * WW)`` the convolution is one matrix product.
"""

from cython cimport floating
from cython.parallel cimport prange, threadid
from scipy.linalg.cython_blas cimport dgemm, sgemm


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


# ---------------------------------------------------------------------------------------------
# Fused per-image convolution: im2col of a block of output rows into a per-thread buffer that
# stays in cache, then BLAS on that block from inside the OpenMP loop (one BLAS thread each).
# ---------------------------------------------------------------------------------------------


cdef inline void _gemm(char* transa, char* transb, int m, int n, int k, floating alpha,
                       const floating* a, int lda, const floating* b, int ldb, floating beta,
                       floating* c, int ldc) noexcept nogil:
    """Column-major ``c = alpha * op(a) @ op(b) + beta * c`` (BLAS ?gemm) for either type."""
    if floating is float:
        sgemm(transa, transb, &m, &n, &k, &alpha, <float*>a, &lda, <float*>b, &ldb, &beta,
              c, &ldc)
    else:
        dgemm(transa, transb, &m, &n, &k, &alpha, <double*>a, &lda, <double*>b, &ldb, &beta,
              c, &ldc)


cdef void _im2col_rows(const floating* x, floating* cols, Py_ssize_t C, Py_ssize_t H,
                       Py_ssize_t W, Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride,
                       Py_ssize_t pad, Py_ssize_t W_out, Py_ssize_t ho0,
                       Py_ssize_t ho1) noexcept nogil:
    """Columns of output rows ``ho0:ho1`` of one image ``x`` (C, H, W).

    ``cols`` is (C*HH*WW, (ho1-ho0)*W_out), C-contiguous; every entry is written.
    """
    cdef Py_ssize_t pb = (ho1 - ho0) * W_out
    cdef Py_ssize_t c, i, j, ho, wo, hi, off_w, wo_lo, wo_hi
    cdef const floating* src
    cdef floating* dst
    for c in range(C):
        for i in range(HH):
            for j in range(WW):
                off_w = j - pad
                wo_lo = _first_valid(off_w, stride)
                if wo_lo > W_out:
                    wo_lo = W_out
                wo_hi = _end_valid(off_w, stride, W, W_out)
                if wo_hi < wo_lo:
                    wo_hi = wo_lo
                dst = cols + ((c * HH + i) * WW + j) * pb
                for ho in range(ho0, ho1):
                    hi = ho * stride - pad + i
                    if hi < 0 or hi >= H:
                        for wo in range(W_out):
                            dst[wo] = 0
                    else:
                        src = x + (c * H + hi) * W
                        for wo in range(wo_lo):
                            dst[wo] = 0
                        if stride == 1:
                            for wo in range(wo_lo, wo_hi):
                                dst[wo] = src[wo + off_w]
                        else:
                            for wo in range(wo_lo, wo_hi):
                                dst[wo] = src[wo * stride + off_w]
                        for wo in range(wo_hi, W_out):
                            dst[wo] = 0
                    dst += W_out


cdef void _col2im_rows(const floating* cols, floating* dx, Py_ssize_t C, Py_ssize_t H,
                       Py_ssize_t W, Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride,
                       Py_ssize_t pad, Py_ssize_t W_out, Py_ssize_t ho0,
                       Py_ssize_t ho1) noexcept nogil:
    """Add the column gradient of output rows ``ho0:ho1`` into one image's ``dx`` (C, H, W).

    ``cols`` is laid out as in :func:`_im2col_rows`; padding entries are dropped.
    """
    cdef Py_ssize_t pb = (ho1 - ho0) * W_out
    cdef Py_ssize_t c, i, j, ho, wo, hi, off_w, wo_lo, wo_hi
    cdef const floating* src
    cdef floating* dst
    for c in range(C):
        for i in range(HH):
            for j in range(WW):
                off_w = j - pad
                wo_lo = _first_valid(off_w, stride)
                wo_hi = _end_valid(off_w, stride, W, W_out)
                src = cols + ((c * HH + i) * WW + j) * pb
                for ho in range(ho0, ho1):
                    hi = ho * stride - pad + i
                    if hi >= 0 and hi < H:
                        dst = dx + (c * H + hi) * W
                        if stride == 1:
                            for wo in range(wo_lo, wo_hi):
                                dst[wo + off_w] += src[wo]
                        else:
                            for wo in range(wo_lo, wo_hi):
                                dst[wo * stride + off_w] += src[wo]
                    src += W_out


def conv_forward_fused(const floating[:, :, :, ::1] x, const floating[:, ::1] w_mat,
                       const floating[::1] b, floating[:, :, ::1] out, floating[:, ::1] scratch,
                       Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride, Py_ssize_t pad,
                       Py_ssize_t rows_per_block, int threads):
    """``out[n]`` (F, H_out*W_out) = ``w_mat`` (F, K) @ columns of ``x[n]`` + ``b``, per image.

    Images are split over ``threads`` OpenMP threads; thread ``t`` builds the columns of
    ``rows_per_block`` output rows at a time in ``scratch[t]`` (at least K*rows_per_block*W_out
    entries) and multiplies them with one single-threaded BLAS call that writes straight into
    ``out`` (NCHW: no transpose). The caller limits BLAS to one thread.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = w_mat.shape[0], K = w_mat.shape[1], P = out.shape[2]
    cdef Py_ssize_t W_out = (W + 2 * pad - WW) // stride + 1
    cdef Py_ssize_t H_out = P // W_out
    cdef Py_ssize_t n, f, p, ho0, ho1, pb, blk
    cdef Py_ssize_t n_blocks = (H_out + rows_per_block - 1) // rows_per_block
    cdef int tid
    cdef floating* cols
    cdef floating* o
    with nogil:
        for n in prange(N, schedule="static", num_threads=threads):
            tid = threadid()
            cols = &scratch[tid, 0]
            for blk in range(n_blocks):
                ho0 = blk * rows_per_block
                ho1 = min(ho0 + rows_per_block, H_out)
                pb = (ho1 - ho0) * W_out
                _im2col_rows(&x[n, 0, 0, 0], cols, C, H, W, HH, WW, stride, pad, W_out, ho0, ho1)
                o = &out[n, 0, ho0 * W_out]
                for f in range(F):
                    for p in range(pb):
                        o[f * P + p] = b[f]
                # column-major: out block (pb x F, ld P) = cols (pb x K) @ w_mat^T (K x F)
                _gemm("N", "N", <int>pb, <int>F, <int>K, 1, cols, <int>pb, &w_mat[0, 0], <int>K,
                      1, o, <int>P)


def conv_backward_fused(const floating[:, :, :, ::1] x, const floating[:, ::1] w_mat,
                        const floating[:, :, ::1] dout, floating[:, :, :, ::1] dx,
                        floating[:, :, ::1] dw_parts, double[:, ::1] db_parts,
                        floating[:, ::1] scratch, Py_ssize_t HH, Py_ssize_t WW,
                        Py_ssize_t stride, Py_ssize_t pad, Py_ssize_t rows_per_block,
                        int threads):
    """Gradients of :func:`conv_forward_fused`, per image, on ``threads`` OpenMP threads.

    ``dout`` is (N, F, H_out*W_out). Thread ``t`` rebuilds a block of columns in ``scratch[t]``,
    adds ``dout_block @ cols.T`` into ``dw_parts[t]`` (F, K), turns the buffer into the column
    gradient ``w_mat.T @ dout_block`` and scatters it into ``dx`` (overwritten), and sums
    ``dout`` rows into ``db_parts[t]`` (F,) in double. The caller sums the parts over threads.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = w_mat.shape[0], K = w_mat.shape[1], P = dout.shape[2]
    cdef Py_ssize_t W_out = (W + 2 * pad - WW) // stride + 1
    cdef Py_ssize_t H_out = P // W_out
    cdef Py_ssize_t n, f, p, ho0, ho1, pb, t, e, blk
    cdef Py_ssize_t n_blocks = (H_out + rows_per_block - 1) // rows_per_block
    cdef int tid
    cdef floating* cols
    cdef const floating* d
    cdef floating* dxn
    cdef double s
    for t in range(dw_parts.shape[0]):
        for f in range(F):
            db_parts[t, f] = 0
            for e in range(K):
                dw_parts[t, f, e] = 0
    with nogil:
        for n in prange(N, schedule="static", num_threads=threads):
            tid = threadid()
            cols = &scratch[tid, 0]
            dxn = &dx[n, 0, 0, 0]
            for e in range(C * H * W):
                dxn[e] = 0
            for f in range(F):
                d = &dout[n, f, 0]
                s = 0
                for p in range(P):
                    s = s + d[p]
                db_parts[tid, f] += s
            for blk in range(n_blocks):
                ho0 = blk * rows_per_block
                ho1 = min(ho0 + rows_per_block, H_out)
                pb = (ho1 - ho0) * W_out
                _im2col_rows(&x[n, 0, 0, 0], cols, C, H, W, HH, WW, stride, pad, W_out, ho0, ho1)
                d = &dout[n, 0, ho0 * W_out]
                # dw (F, K) += dout_block (F, pb) @ cols.T (pb, K); column-major: (K x F)
                _gemm("T", "N", <int>K, <int>F, <int>pb, 1, cols, <int>pb, d, <int>P, 1,
                      &dw_parts[tid, 0, 0], <int>K)
                # dcols (K, pb) = w_mat.T (K, F) @ dout_block (F, pb); column-major: (pb x K)
                _gemm("N", "T", <int>pb, <int>K, <int>F, 1, d, <int>P, &w_mat[0, 0], <int>K, 0,
                      cols, <int>pb)
                _col2im_rows(cols, dxn, C, H, W, HH, WW, stride, pad, W_out, ho0, ho1)
