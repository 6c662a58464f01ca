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

from cnn_helpers cimport run_sum


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


cdef void _pad_image(const floating* x, floating* padded, Py_ssize_t C, Py_ssize_t H,
                     Py_ssize_t W, Py_ssize_t pad) noexcept nogil:
    """Copy one image ``x`` (C, H, W) into ``padded`` (C, H + 2*pad, W + 2*pad), zeros around."""
    cdef Py_ssize_t Hp = H + 2 * pad, Wp = W + 2 * pad, c, h, k
    cdef floating* dst
    cdef const floating* src
    for c in range(C):
        dst = padded + c * Hp * Wp
        for k in range(pad * Wp):
            dst[k] = 0
        for h in range(H):
            src = x + (c * H + h) * W
            dst = padded + (c * Hp + h + pad) * Wp
            for k in range(pad):
                dst[k] = 0
            for k in range(W):
                dst[pad + k] = src[k]
            for k in range(pad + W, Wp):
                dst[k] = 0
        dst = padded + (c * Hp + H + pad) * Wp
        for k in range(pad * Wp):
            dst[k] = 0


cdef extern from "cnn_im2col.h" nogil:
    void cnn_im2col_rows_f(const float* padded, float* cols, Py_ssize_t C, Py_ssize_t Hp,
                           Py_ssize_t Wp, Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride,
                           Py_ssize_t W_out, Py_ssize_t ho0, Py_ssize_t ho1)
    void cnn_im2col_rows_d(const double* padded, double* cols, Py_ssize_t C, Py_ssize_t Hp,
                           Py_ssize_t Wp, Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride,
                           Py_ssize_t W_out, Py_ssize_t ho0, Py_ssize_t ho1)
    void cnn_col2im_rows_f(const float* cols, float* dpadded, Py_ssize_t C, Py_ssize_t Hp,
                           Py_ssize_t Wp, Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride,
                           Py_ssize_t W_out, Py_ssize_t ho0, Py_ssize_t ho1)
    void cnn_col2im_rows_d(const double* cols, double* dpadded, Py_ssize_t C, Py_ssize_t Hp,
                           Py_ssize_t Wp, Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride,
                           Py_ssize_t W_out, Py_ssize_t ho0, Py_ssize_t ho1)
    void cnn_im2row_f(const float* x, float* rows, Py_ssize_t ldr, Py_ssize_t C, Py_ssize_t H,
                      Py_ssize_t W, Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride,
                      Py_ssize_t pad, Py_ssize_t W_out, Py_ssize_t p0, Py_ssize_t p1)
    void cnn_im2row_d(const double* x, double* rows, Py_ssize_t ldr, Py_ssize_t C,
                      Py_ssize_t H, Py_ssize_t W, Py_ssize_t HH, Py_ssize_t WW,
                      Py_ssize_t stride, Py_ssize_t pad, Py_ssize_t W_out, Py_ssize_t p0,
                      Py_ssize_t p1)


def im2row(const floating[:, :, :, ::1] x, floating[:, ::1] rows,
           Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride, Py_ssize_t pad):
    """Fill ``rows`` (N*H_out*W_out, C*HH*WW) from ``x`` (N, C, H, W): the transpose of
    :func:`im2col`'s ``cols``, written directly; every entry is written.

    Row ``(n * H_out + ho) * W_out + wo`` is the (C, HH, WW) patch of output pixel (ho, wo) of
    image ``n``, zero where it falls in the padding. Output pixels are split over threads.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t H_out = (H + 2 * pad - HH) // stride + 1
    cdef Py_ssize_t W_out = (W + 2 * pad - WW) // stride + 1
    cdef Py_ssize_t P = H_out * W_out, K = C * HH * WW
    cdef Py_ssize_t q, n, p
    cdef int threads = cnn_threads_for(N * K * P)
    if rows.shape[0] != N * P or rows.shape[1] != K:
        raise ValueError("im2row: rows must be (N*H_out*W_out, C*HH*WW)")
    if N * P == 0 or K == 0:
        return
    with nogil:
        for q in prange(N * P, schedule="static", num_threads=threads):
            n = q // P
            p = q % P
            if floating is float:
                cnn_im2row_f(&x[n, 0, 0, 0], &rows[q, 0], K, C, H, W, HH, WW, stride, pad,
                             W_out, p, p + 1)
            else:
                cnn_im2row_d(&x[n, 0, 0, 0], &rows[q, 0], K, C, H, W, HH, WW, stride, pad,
                             W_out, p, p + 1)


cdef inline void _im2col_rows(const floating* padded, floating* cols, Py_ssize_t C,
                              Py_ssize_t Hp, Py_ssize_t Wp, Py_ssize_t HH, Py_ssize_t WW,
                              Py_ssize_t stride, Py_ssize_t W_out, Py_ssize_t ho0,
                              Py_ssize_t ho1) noexcept nogil:
    """Columns of output rows ``ho0:ho1`` of one zero-padded image ``padded`` (C, Hp, Wp).

    ``cols`` is (C*HH*WW, (ho1-ho0)*W_out), C-contiguous; every entry is written. The padding
    is already in ``padded``, so each output row is one plain (strided) copy (C helper in
    ``cnn_im2col.h``).
    """
    if floating is float:
        cnn_im2col_rows_f(padded, cols, C, Hp, Wp, HH, WW, stride, W_out, ho0, ho1)
    else:
        cnn_im2col_rows_d(padded, cols, C, Hp, Wp, HH, WW, stride, W_out, ho0, ho1)


cdef inline void _col2im_rows(const floating* cols, floating* dpadded, Py_ssize_t C,
                              Py_ssize_t Hp, Py_ssize_t Wp, Py_ssize_t HH, Py_ssize_t WW,
                              Py_ssize_t stride, Py_ssize_t W_out, Py_ssize_t ho0,
                              Py_ssize_t ho1) noexcept nogil:
    """Add the column gradient of output rows ``ho0:ho1`` into ``dpadded`` (C, Hp, Wp), the
    gradient of one zero-padded image; ``cols`` is laid out as in :func:`_im2col_rows`."""
    if floating is float:
        cnn_col2im_rows_f(cols, dpadded, C, Hp, Wp, HH, WW, stride, W_out, ho0, ho1)
    else:
        cnn_col2im_rows_d(cols, dpadded, C, Hp, Wp, HH, WW, stride, W_out, ho0, ho1)


def fused_scratch(Py_ssize_t C, Py_ssize_t H, Py_ssize_t W, Py_ssize_t HH, Py_ssize_t WW,
                  Py_ssize_t pad, Py_ssize_t W_out, Py_ssize_t rows_per_block):
    """Elements of one thread's scratch row for :func:`conv_forward_fused` / ``_backward``:
    a block of columns, then two zero-padded images (the input and its gradient)."""
    return C * HH * WW * rows_per_block * W_out + 2 * C * (H + 2 * pad) * (W + 2 * pad)


def conv_forward_fused(const floating[:, :, :, ::1] x, const floating[:, ::1] w_mat,
                       const floating[::1] b, floating[:, :, ::1] out, floating[:, ::1] scratch,
                       Py_ssize_t HH, Py_ssize_t WW, Py_ssize_t stride, Py_ssize_t pad,
                       Py_ssize_t rows_per_block, int threads):
    """``out[n]`` (F, H_out*W_out) = ``w_mat`` (F, K) @ columns of ``x[n]`` + ``b``, per image.

    Images are split over ``threads`` OpenMP threads; thread ``t`` copies its image with zero
    padding and builds the columns of ``rows_per_block`` output rows at a time in
    ``scratch[t]`` (:func:`fused_scratch` entries) and multiplies them with one single-threaded BLAS call that writes straight into
    ``out`` (NCHW: no transpose). The caller limits BLAS to one thread.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = w_mat.shape[0], K = w_mat.shape[1], P = out.shape[2]
    cdef Py_ssize_t W_out = (W + 2 * pad - WW) // stride + 1
    cdef Py_ssize_t H_out = P // W_out
    cdef Py_ssize_t n, f, p, ho0, ho1, pb, blk
    cdef Py_ssize_t n_blocks = (H_out + rows_per_block - 1) // rows_per_block
    cdef Py_ssize_t Hp = H + 2 * pad, Wp = W + 2 * pad
    cdef int tid
    cdef floating* cols
    cdef floating* padded
    cdef floating* o
    threads = cnn_threads_given(threads)
    with nogil:
        for n in prange(N, schedule="static", num_threads=threads):
            tid = threadid()
            cols = &scratch[tid, 0]
            padded = cols + K * rows_per_block * W_out
            _pad_image(&x[n, 0, 0, 0], padded, C, H, W, pad)
            for blk in range(n_blocks):
                ho0 = blk * rows_per_block
                ho1 = min(ho0 + rows_per_block, H_out)
                pb = (ho1 - ho0) * W_out
                _im2col_rows(padded, cols, C, Hp, Wp, HH, WW, stride, W_out, ho0, ho1)
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
                        int threads, bint need_dx=True):
    """Gradients of :func:`conv_forward_fused`, per image, on ``threads`` OpenMP threads.

    ``dout`` is (N, F, H_out*W_out). Thread ``t`` rebuilds a block of columns in ``scratch[t]``,
    adds ``cols @ dout_block.T`` into ``dw_parts[t]`` (K, F): the transpose of dw, turns the buffer into the column
    gradient ``w_mat.T @ dout_block`` and scatters it into ``dx`` (overwritten), and sums
    ``dout`` rows into ``db_parts[t]`` (F,) in double. The caller sums the parts over threads.
    Without ``need_dx`` (a first layer, whose input needs no gradient) ``dx`` is not written
    and its GEMM and col2im are skipped.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = w_mat.shape[0], K = w_mat.shape[1], P = dout.shape[2]
    cdef Py_ssize_t W_out = (W + 2 * pad - WW) // stride + 1
    cdef Py_ssize_t H_out = P // W_out
    cdef Py_ssize_t n, f, ho0, ho1, pb, t, e, blk, c, h
    cdef Py_ssize_t Hp = H + 2 * pad, Wp = W + 2 * pad
    cdef floating* padded
    cdef floating* dpadded
    cdef const floating* src
    cdef Py_ssize_t n_blocks = (H_out + rows_per_block - 1) // rows_per_block
    cdef int tid
    cdef floating* cols
    cdef const floating* d
    cdef floating* dxn
    for t in range(dw_parts.shape[0]):
        for f in range(F):
            db_parts[t, f] = 0
        for e in range(K):
            for f in range(F):
                dw_parts[t, e, f] = 0
    threads = cnn_threads_given(threads)
    with nogil:
        for n in prange(N, schedule="static", num_threads=threads):
            tid = threadid()
            cols = &scratch[tid, 0]
            padded = cols + K * rows_per_block * W_out
            dpadded = padded + C * Hp * Wp
            _pad_image(&x[n, 0, 0, 0], padded, C, H, W, pad)
            if need_dx:
                for e in range(C * Hp * Wp):
                    dpadded[e] = 0
            for f in range(F):
                db_parts[tid, f] += run_sum(&dout[n, f, 0], P)
            for blk in range(n_blocks):
                ho0 = blk * rows_per_block
                ho1 = min(ho0 + rows_per_block, H_out)
                pb = (ho1 - ho0) * W_out
                _im2col_rows(padded, cols, C, Hp, Wp, HH, WW, stride, W_out, ho0, ho1)
                d = &dout[n, 0, ho0 * W_out]
                # dw.T (K, F) += cols (K, pb) @ dout_block.T (pb, F); column-major (F x K):
                # dout_block^T (F x pb) @ cols (pb x K), so BLAS packs the large operand
                # without transposing it
                _gemm("T", "N", <int>F, <int>K, <int>pb, 1, d, <int>P, cols, <int>pb, 1,
                      &dw_parts[tid, 0, 0], <int>F)
                if not need_dx:
                    continue
                # dcols (K, pb) = w_mat.T (K, F) @ dout_block (F, pb); column-major: (pb x K)
                _gemm("N", "T", <int>pb, <int>K, <int>F, 1, d, <int>P, &w_mat[0, 0], <int>K, 0,
                      cols, <int>pb)
                _col2im_rows(cols, dpadded, C, Hp, Wp, HH, WW, stride, W_out, ho0, ho1)
            if not need_dx:
                continue
            # the gradient of the image is the interior of the padded gradient
            for c in range(C):
                for h in range(H):
                    dxn = &dx[n, c, h, 0]
                    src = dpadded + (c * Hp + h + pad) * Wp + pad
                    for e in range(W):
                        dxn[e] = src[e]


# ---------------------------------------------------------------------------------------------
# Winograd F(2x2, 3x3) for 3x3 filters at stride 1
#
# The output is cut into 2x2 tiles; tile (ti, tj) reads the 4x4 input patch whose top-left
# corner is (2*ti - pad, 2*tj - pad). With B^T, G and A^T the F(2x2, 3x3) matrices,
#   U = G g G^T (per filter and channel, made by the wrapper), V = B^T d B (per channel and
#   tile), M[xi] = U[xi] @ V[xi] for each of the 16 positions xi (one GEMM each), and the
#   output tile is A^T M A.
# The backward pass is the exact gradient of that computation: dM = A dY A^T,
# dU[xi] = sum over tiles dM[xi] @ V[xi].T (the wrapper turns dU into dw = G^T dU G) and
# dV[xi] = U[xi].T @ dM[xi], scattered back as B dV B^T. Transforms only add, subtract and
# (in G) halve, so rounding stays within a few ulps of the direct convolution.
#
# Buffers: V is (16, C, Tb) and M, dM are (16, F, Tb), with Tb the tiles of a block of images
# (tile t = image_in_block * th * tw + ti * tw + tj). The 16 planes of a buffer lie
# _plane(rows, Tb) elements apart, 16 more than rows * Tb: the transforms touch all 16 planes
# at once, and planes a multiple of 4 KiB apart would share one set of the L1 cache.
# ---------------------------------------------------------------------------------------------


cdef extern from "cnn_winograd.h" nogil:
    void cnn_wino_input_f(const float* x, float* padded, float* V, Py_ssize_t C, Py_ssize_t H,
                          Py_ssize_t W, Py_ssize_t pad, Py_ssize_t th, Py_ssize_t tw,
                          Py_ssize_t Tb, Py_ssize_t t0, Py_ssize_t vs)
    void cnn_wino_input_d(const double* x, double* padded, double* V, Py_ssize_t C,
                          Py_ssize_t H, Py_ssize_t W, Py_ssize_t pad, Py_ssize_t th,
                          Py_ssize_t tw, Py_ssize_t Tb, Py_ssize_t t0, Py_ssize_t vs)
    void cnn_wino_output_f(const float* M, float* out, const float* b, Py_ssize_t F,
                           Py_ssize_t H_out, Py_ssize_t W_out, Py_ssize_t th, Py_ssize_t tw,
                           Py_ssize_t Tb, Py_ssize_t t0, Py_ssize_t ms)
    void cnn_wino_output_d(const double* M, double* out, const double* b, Py_ssize_t F,
                           Py_ssize_t H_out, Py_ssize_t W_out, Py_ssize_t th, Py_ssize_t tw,
                           Py_ssize_t Tb, Py_ssize_t t0, Py_ssize_t ms)
    void cnn_wino_dout_f(const float* dout, float* dM, float* edge, Py_ssize_t F,
                         Py_ssize_t H_out, Py_ssize_t W_out, Py_ssize_t th, Py_ssize_t tw,
                         Py_ssize_t Tb, Py_ssize_t t0, Py_ssize_t ms)
    void cnn_wino_dout_d(const double* dout, double* dM, double* edge, Py_ssize_t F,
                         Py_ssize_t H_out, Py_ssize_t W_out, Py_ssize_t th, Py_ssize_t tw,
                         Py_ssize_t Tb, Py_ssize_t t0, Py_ssize_t ms)
    void cnn_wino_dinput_f(const float* dV, float* padded, float* dx, Py_ssize_t C,
                           Py_ssize_t H, Py_ssize_t W, Py_ssize_t pad, Py_ssize_t th,
                           Py_ssize_t tw, Py_ssize_t Tb, Py_ssize_t t0, Py_ssize_t vs)
    void cnn_wino_dinput_d(const double* dV, double* padded, double* dx, Py_ssize_t C,
                           Py_ssize_t H, Py_ssize_t W, Py_ssize_t pad, Py_ssize_t th,
                           Py_ssize_t tw, Py_ssize_t Tb, Py_ssize_t t0, Py_ssize_t vs)


cdef inline Py_ssize_t _plane(Py_ssize_t rows, Py_ssize_t Tb) noexcept nogil:
    """Distance between two of the 16 planes of a (16, rows, Tb) transform buffer."""
    return rows * Tb + 16


def winograd_scratch(Py_ssize_t C, Py_ssize_t F, Py_ssize_t H_out, Py_ssize_t W_out,
                     Py_ssize_t images_per_block):
    """Elements of one thread's scratch row for :func:`winograd_forward` / ``_backward``."""
    cdef Py_ssize_t th = (H_out + 1) // 2, tw = (W_out + 1) // 2
    cdef Py_ssize_t Tb = th * tw * images_per_block
    return ((2 * th + 2) * (2 * tw + 2) + 16 * tw + 6 * tw + 6
            + 16 * _plane(C, Tb) + 16 * _plane(F, Tb))


cdef inline void _wino_input(const floating* x, floating* padded, floating* V, Py_ssize_t C,
                             Py_ssize_t H, Py_ssize_t W, Py_ssize_t pad, Py_ssize_t th,
                             Py_ssize_t tw, Py_ssize_t Tb, Py_ssize_t t0) noexcept nogil:
    if floating is float:
        cnn_wino_input_f(x, padded, V, C, H, W, pad, th, tw, Tb, t0, _plane(C, Tb))
    else:
        cnn_wino_input_d(x, padded, V, C, H, W, pad, th, tw, Tb, t0, _plane(C, Tb))


cdef inline void _wino_output(const floating* M, floating* out, const floating* b, Py_ssize_t F,
                              Py_ssize_t H_out, Py_ssize_t W_out, Py_ssize_t th, Py_ssize_t tw,
                              Py_ssize_t Tb, Py_ssize_t t0) noexcept nogil:
    if floating is float:
        cnn_wino_output_f(M, out, b, F, H_out, W_out, th, tw, Tb, t0, _plane(F, Tb))
    else:
        cnn_wino_output_d(M, out, b, F, H_out, W_out, th, tw, Tb, t0, _plane(F, Tb))


cdef inline void _wino_dout(const floating* dout, floating* dM, floating* edge, Py_ssize_t F,
                            Py_ssize_t H_out, Py_ssize_t W_out, Py_ssize_t th, Py_ssize_t tw,
                            Py_ssize_t Tb, Py_ssize_t t0) noexcept nogil:
    if floating is float:
        cnn_wino_dout_f(dout, dM, edge, F, H_out, W_out, th, tw, Tb, t0, _plane(F, Tb))
    else:
        cnn_wino_dout_d(dout, dM, edge, F, H_out, W_out, th, tw, Tb, t0, _plane(F, Tb))


cdef inline void _wino_dinput(const floating* dV, floating* padded, floating* dx, Py_ssize_t C,
                              Py_ssize_t H, Py_ssize_t W, Py_ssize_t pad, Py_ssize_t th,
                              Py_ssize_t tw, Py_ssize_t Tb, Py_ssize_t t0) noexcept nogil:
    if floating is float:
        cnn_wino_dinput_f(dV, padded, dx, C, H, W, pad, th, tw, Tb, t0, _plane(C, Tb))
    else:
        cnn_wino_dinput_d(dV, padded, dx, C, H, W, pad, th, tw, Tb, t0, _plane(C, Tb))


def winograd_filters(const floating[:, :, :, ::1] w, floating[:, :, ::1] U):
    """``U`` (16, F, C) = G g G^T for each 3x3 filter ``g`` of ``w`` (F, C, 3, 3); plane
    ``4 * a + b`` holds entry (a, b)."""
    cdef Py_ssize_t F = w.shape[0], C = w.shape[1], f, c, k
    cdef floating t[4][3]
    cdef floating r0, r1, r2
    for f in range(F):
        for c in range(C):
            for k in range(3):  # t = G g, column k
                r0 = w[f, c, 0, k]
                r1 = w[f, c, 1, k]
                r2 = w[f, c, 2, k]
                t[0][k] = r0
                t[1][k] = (r0 + r1 + r2) * 0.5
                t[2][k] = (r0 - r1 + r2) * 0.5
                t[3][k] = r2
            for k in range(4):  # U = t G^T, row k
                r0 = t[k][0]
                r1 = t[k][1]
                r2 = t[k][2]
                U[4 * k, f, c] = r0
                U[4 * k + 1, f, c] = (r0 + r1 + r2) * 0.5
                U[4 * k + 2, f, c] = (r0 - r1 + r2) * 0.5
                U[4 * k + 3, f, c] = r2


def winograd_filter_grad(const floating[:, :, :, ::1] dU_parts, floating[:, :, :, ::1] dw):
    """``dw`` (F, C, 3, 3) = G^T dU G, with dU (16, F, C) the sum of ``dU_parts`` (T, 16, F, C)
    over its first axis (the threads' partial sums)."""
    cdef Py_ssize_t T = dU_parts.shape[0], F = dw.shape[0], C = dw.shape[1], f, c, k, t, e
    cdef floating d[16]
    cdef floating s[3][4]
    cdef floating v0, v1, v2, v3
    for f in range(F):
        for c in range(C):
            for e in range(16):
                d[e] = dU_parts[0, e, f, c]
                for t in range(1, T):
                    d[e] += dU_parts[t, e, f, c]
            for k in range(4):  # s = G^T dU, column k
                v0 = d[k]
                v1 = d[4 + k]
                v2 = d[8 + k]
                v3 = d[12 + k]
                s[0][k] = v0 + (v1 + v2) * 0.5
                s[1][k] = (v1 - v2) * 0.5
                s[2][k] = (v1 + v2) * 0.5 + v3
            for k in range(3):  # dw = s G, row k
                v0 = s[k][0]
                v1 = s[k][1]
                v2 = s[k][2]
                v3 = s[k][3]
                dw[f, c, k, 0] = v0 + (v1 + v2) * 0.5
                dw[f, c, k, 1] = (v1 - v2) * 0.5
                dw[f, c, k, 2] = (v1 + v2) * 0.5 + v3


def winograd_forward(const floating[:, :, :, ::1] x, const floating[:, :, ::1] U,
                     const floating[::1] b, floating[:, :, :, ::1] out,
                     floating[:, ::1] scratch, Py_ssize_t pad, Py_ssize_t images_per_block,
                     int threads):
    """3x3 stride-1 convolution of ``x`` (N, C, H, W) into ``out`` (N, F, H_out, W_out) by
    Winograd F(2x2, 3x3), with ``U`` (16, F, C) the transformed filters.

    Blocks of ``images_per_block`` images are split over ``threads`` OpenMP threads; each
    thread's ``scratch`` row holds a padded plane, V (16, C, Tb) and M (16, F, Tb).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = U.shape[1], H_out = out.shape[2], W_out = out.shape[3]
    cdef Py_ssize_t th = (H_out + 1) // 2, tw = (W_out + 1) // 2, T = th * tw
    cdef Py_ssize_t Tb = T * images_per_block
    cdef Py_ssize_t n_blocks = (N + images_per_block - 1) // images_per_block
    cdef Py_ssize_t blk, n, n0, n1, xi
    cdef Py_ssize_t plane = (2 * th + 2) * (2 * tw + 2) + 16 * tw + 6 * tw + 6
    cdef int tid
    cdef floating* padded
    cdef floating* V
    cdef floating* M
    threads = cnn_threads_given(threads)
    with nogil:
        for blk in prange(n_blocks, schedule="static", num_threads=threads):
            tid = threadid()
            padded = &scratch[tid, 0]
            V = padded + plane
            M = V + 16 * _plane(C, Tb)
            n0 = blk * images_per_block
            n1 = min(n0 + images_per_block, N)
            for n in range(n0, n1):
                _wino_input(&x[n, 0, 0, 0], padded, V, C, H, W, pad, th, tw, Tb, (n - n0) * T)
            for xi in range(16):
                # column-major: M[xi] (Tb x F) = V[xi] (Tb x C) @ U[xi]^T (C x F)
                _gemm("N", "N", <int>((n1 - n0) * T), <int>F, <int>C, 1, V + xi * _plane(C, Tb),
                      <int>Tb, &U[xi, 0, 0], <int>C, 0, M + xi * _plane(F, Tb), <int>Tb)
            for n in range(n0, n1):
                _wino_output(M, &out[n, 0, 0, 0], &b[0], F, H_out, W_out, th, tw, Tb,
                             (n - n0) * T)


def winograd_backward(const floating[:, :, :, ::1] x, const floating[:, :, ::1] U,
                      const floating[:, :, :, ::1] dout, floating[:, :, :, ::1] dx,
                      floating[:, :, :, ::1] dU_parts, double[:, ::1] db_parts,
                      floating[:, ::1] scratch, Py_ssize_t pad, Py_ssize_t images_per_block,
                      int threads):
    """Gradients of :func:`winograd_forward`: ``dx`` (overwritten), and per thread ``t`` the
    transformed filter gradient ``dU_parts[t]`` (16, F, C) and ``db_parts[t]`` (F,) in
    double. Each thread's ``scratch`` row holds a padded plane, V (16, C, Tb) (reused for dV)
    and dM (16, F, Tb).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t F = U.shape[1], H_out = dout.shape[2], W_out = dout.shape[3]
    cdef Py_ssize_t th = (H_out + 1) // 2, tw = (W_out + 1) // 2, T = th * tw
    cdef Py_ssize_t Tb = T * images_per_block
    cdef Py_ssize_t n_blocks = (N + images_per_block - 1) // images_per_block
    cdef Py_ssize_t blk, n, n0, n1, xi, f, t, e
    cdef Py_ssize_t plane = (2 * th + 2) * (2 * tw + 2) + 16 * tw + 6 * tw + 6
    cdef Py_ssize_t P = H_out * W_out
    cdef int tid, nt
    cdef floating* padded
    cdef floating* V
    cdef floating* dM
    for t in range(dU_parts.shape[0]):
        for f in range(F):
            db_parts[t, f] = 0
        for xi in range(16):
            for f in range(F):
                for e in range(C):
                    dU_parts[t, xi, f, e] = 0
    threads = cnn_threads_given(threads)
    with nogil:
        for blk in prange(n_blocks, schedule="static", num_threads=threads):
            tid = threadid()
            padded = &scratch[tid, 0]
            V = padded + plane
            dM = V + 16 * _plane(C, Tb)
            n0 = blk * images_per_block
            n1 = min(n0 + images_per_block, N)
            nt = <int>((n1 - n0) * T)
            for n in range(n0, n1):
                _wino_input(&x[n, 0, 0, 0], padded, V, C, H, W, pad, th, tw, Tb, (n - n0) * T)
                _wino_dout(&dout[n, 0, 0, 0], dM, padded, F, H_out, W_out, th, tw, Tb, (n - n0) * T)
                for f in range(F):
                    db_parts[tid, f] += run_sum(&dout[n, f, 0, 0], P)
            for xi in range(16):
                # dU[xi] (F, C) += dM[xi] (F, Tb) @ V[xi].T; column-major (C x F)
                _gemm("T", "N", <int>C, <int>F, nt, 1, V + xi * _plane(C, Tb), <int>Tb,
                      dM + xi * _plane(F, Tb), <int>Tb, 1, &dU_parts[tid, xi, 0, 0], <int>C)
                # dV[xi] (C, Tb) = U[xi].T @ dM[xi], into V; column-major (Tb x C)
                _gemm("N", "T", nt, <int>C, <int>F, 1, dM + xi * _plane(F, Tb), <int>Tb,
                      &U[xi, 0, 0], <int>C, 0, V + xi * _plane(C, Tb), <int>Tb)
            for n in range(n0, n1):
                _wino_dinput(V, padded, &dx[n, 0, 0, 0], C, H, W, pad, th, tw, Tb,
                             (n - n0) * T)


# ---------------------------------------------------------------------------------------------
# Skinny products: few output columns (output pixels of the whole batch), many filters and a
# long K, e.g. 7x7 over 512 channels into 4096 filters at 6x6 outputs (cnn_skinny.h).
# ---------------------------------------------------------------------------------------------


cdef extern from "cnn_skinny.h" nogil:
    const int CNN_SK_MR  # rows of W per tile
    int cnn_skinny_fast_f()
    void cnn_skinny_rows_f(const float* W, const float* CT, float* out, Py_ssize_t K,
                           Py_ssize_t J, const Py_ssize_t* col_off, Py_ssize_t ldo,
                           Py_ssize_t f0, Py_ssize_t f1, Py_ssize_t kc, int use_avx512)


# Rows of W per tile of cnn_skinny.h: a thread's share of rows is a multiple.
cdef Py_ssize_t _SKINNY_MR = CNN_SK_MR


def skinny_fast():
    """True if :func:`skinny_forward` runs its AVX-512 tile on this CPU."""
    return cnn_skinny_fast_f() == 1


def skinny_forward(const float[:, ::1] w_mat, const float[:, ::1] cols_t, const float[::1] b,
                   float[:, :, ::1] out, Py_ssize_t kc, int threads, bint use_fast=True):
    """``out[n, f, p] = b[f] + sum_k w_mat[f, k] * cols_t[n * P + p, k]``, float32 only.

    ``w_mat`` is (F, K), ``cols_t`` (N * P, K) the transposed column matrix (one row per
    output pixel of the batch), ``out`` (N, F, P). K is taken ``kc`` values at a time. The
    rows of ``w_mat`` are split over ``threads`` OpenMP threads in blocks of 6 rows; each
    thread writes only its own rows of ``out``. ``use_fast=False`` forces the portable tile
    (for tests); the AVX-512 tile is used only when :func:`skinny_fast` is true.
    """
    cdef Py_ssize_t F = w_mat.shape[0], K = w_mat.shape[1]
    cdef Py_ssize_t N = out.shape[0], P = out.shape[2], J = cols_t.shape[0]
    cdef Py_ssize_t n_blocks = (F + _SKINNY_MR - 1) // _SKINNY_MR
    cdef Py_ssize_t t, f, j, n, p, f0, f1
    cdef int fast = 1 if (use_fast and cnn_skinny_fast_f() == 1) else 0
    if out.shape[1] != F or cols_t.shape[1] != K or J != N * P or b.shape[0] != F:
        raise ValueError("skinny_forward: shapes of w_mat, cols_t, b and out do not match")
    if kc < 1:
        raise ValueError("skinny_forward: kc must be >= 1")
    if F == 0 or J == 0:
        return
    import numpy as np
    # column j (image n = j // P, pixel p = j % P) lands at out[n, f, p] = base + f*P + col_off[j]
    offsets = np.empty(J, dtype=np.intp)
    cdef Py_ssize_t[::1] col_off = offsets
    for j in range(J):
        col_off[j] = (j // P) * F * P + j % P
    cdef float* o = &out[0, 0, 0]
    threads = cnn_threads_given(threads)
    with nogil:
        for t in prange(threads, schedule="static", num_threads=threads):
            f0 = min(F, (n_blocks * t // threads) * _SKINNY_MR)
            f1 = min(F, (n_blocks * (t + 1) // threads) * _SKINNY_MR)
            for n in range(N):
                for f in range(f0, f1):
                    for p in range(P):
                        o[(n * F + f) * P + p] = b[f]
            if f1 > f0:
                cnn_skinny_rows_f(&w_mat[0, 0], &cols_t[0, 0], o, K, J, &col_off[0], P,
                                  f0, f1, kc, fast)


# ---------------------------------------------------------------------------------------------
# The skinny product on filters packed once (cnn_skinny_packed.h), for fixed weights.
# ---------------------------------------------------------------------------------------------


cdef extern from "cnn_skinny_packed.h" nogil:
    const int CNN_SKP_NR  # columns per tile
    const int CNN_SKP_P  # rows per panel
    const int CNN_SKP_G  # panels per group, a thread's unit of work
    const int CNN_SKP_KC  # values of k per chunk
    Py_ssize_t cnn_skp_panels(Py_ssize_t F)
    Py_ssize_t cnn_skp_groups(Py_ssize_t F)
    size_t cnn_skp_packed_size(Py_ssize_t F, Py_ssize_t K)
    void cnn_skp_pack_f(const float* W, Py_ssize_t F, Py_ssize_t K, float* Wp, Py_ssize_t p0,
                        Py_ssize_t p1)
    void cnn_skp_rows_f(const float* Wp, const float* cols, float* out, Py_ssize_t ldo,
                        const Py_ssize_t* col_off, Py_ssize_t F, Py_ssize_t K, Py_ssize_t J,
                        Py_ssize_t g0, Py_ssize_t g1, Py_ssize_t q0, Py_ssize_t q1, float* acc,
                        float* tail, int use_avx512)


def _aligned_empty(Py_ssize_t n):
    """A float32 array of n values whose data starts on a 64-byte boundary."""
    import numpy as np
    buf = np.empty(n + 16, dtype=np.float32)
    skip = (-buf.ctypes.data) % 64 // 4
    return buf[skip : skip + n]


def skinny_pack(const float[:, ::1] w_mat, int threads):
    """The filter matrix ``w_mat`` (F, K) in the packed layout of ``cnn_skinny_packed.h``.

    Returns a 1-D float32 array (64-byte aligned) of ``ceil(F / 32) * 32 * K`` values, rows
    past F zero. ``threads`` OpenMP threads pack disjoint panels.
    """
    cdef Py_ssize_t F = w_mat.shape[0], K = w_mat.shape[1]
    cdef Py_ssize_t n_panels = cnn_skp_panels(F), t
    packed = _aligned_empty(cnn_skp_packed_size(F, K))
    if F == 0 or K == 0:
        return packed
    cdef float[::1] wp = packed
    threads = cnn_threads_given(threads)
    with nogil:
        for t in prange(threads, schedule="static", num_threads=threads):
            cnn_skp_pack_f(&w_mat[0, 0], F, K, &wp[0], n_panels * t // threads,
                           n_panels * (t + 1) // threads)
    return packed


def skinny_packed_forward(const float[::1] packed, Py_ssize_t F, const float[:, ::1] cols,
                          const float[::1] b, float[:, :, ::1] out, int threads,
                          bint use_fast=True):
    """``out[n, f, p] = b[f] + sum_k W[f, k] * cols[k, n * P + p]``, with ``packed`` made by
    :func:`skinny_pack` from W (F, K), float32 only.

    ``cols`` is (K, N * P), the im2col columns of the batch; ``out`` is (N, F, P). Groups of
    512 rows of W are split over ``threads`` OpenMP threads (the 32-row panels of W when it is
    one group); each thread writes only its own rows of ``out``. ``use_fast=False`` forces the
    portable tile (for tests); the AVX-512 tile is used only when :func:`skinny_fast` is true.
    """
    cdef Py_ssize_t K = cols.shape[0], J = cols.shape[1]
    cdef Py_ssize_t N = out.shape[0], P = out.shape[2]
    cdef Py_ssize_t n_groups = cnn_skp_groups(F), n_panels = cnn_skp_panels(F)
    cdef Py_ssize_t t, f, j, n, p, g0, g1, q0, q1, f0, f1
    cdef bint by_groups
    cdef Py_ssize_t rows_per_group = CNN_SKP_G * CNN_SKP_P
    cdef int fast = 1 if (use_fast and cnn_skinny_fast_f() == 1) else 0
    if packed.shape[0] != <Py_ssize_t>cnn_skp_packed_size(F, K):
        raise ValueError(f"skinny_packed_forward: packed holds {packed.shape[0]} values, not "
                         f"the {cnn_skp_packed_size(F, K)} of a packed ({F}, {K}) matrix")
    if out.shape[1] != F or J != N * P or b.shape[0] != F:
        raise ValueError("skinny_packed_forward: shapes of cols, b and out do not match")
    if F == 0 or J == 0:
        return
    import numpy as np
    if K == 0:  # empty sums (and an empty packed array): the bias alone
        np.asarray(out)[:] = np.asarray(b)[None, :, None]
        return
    if <size_t>&packed[0] % 64 != 0:
        raise ValueError("skinny_packed_forward: packed must start on a 64-byte boundary")
    offsets = np.empty(J, dtype=np.intp)
    cdef Py_ssize_t[::1] col_off = offsets
    for j in range(J):
        col_off[j] = (j // P) * F * P + j % P
    threads = cnn_threads_given(threads)
    by_groups = n_groups > 1
    if threads > (n_groups if by_groups else n_panels):
        threads = <int>(n_groups if by_groups else n_panels)
    # per thread: a group's sums (rows x whole blocks of columns), then the partial block
    cdef Py_ssize_t sums = rows_per_group * ((J + CNN_SKP_NR - 1) // CNN_SKP_NR) * CNN_SKP_NR
    cdef Py_ssize_t scratch = sums + CNN_SKP_KC * CNN_SKP_NR
    scratch_buf = _aligned_empty(threads * scratch)
    cdef float[::1] work = scratch_buf
    cdef float* o = &out[0, 0, 0]
    with nogil:
        for t in prange(threads, schedule="static", num_threads=threads):
            if by_groups:  # whole groups
                g0 = n_groups * t // threads
                g1 = n_groups * (t + 1) // threads
                q0 = 0
                q1 = CNN_SKP_G
            else:  # a share of the panels of the only group
                g0 = 0
                g1 = 1
                q0 = n_panels * t // threads
                q1 = n_panels * (t + 1) // threads
            f0 = min(F, g0 * rows_per_group + q0 * CNN_SKP_P)
            f1 = min(F, (g1 - 1) * rows_per_group + q1 * CNN_SKP_P)
            for n in range(N):
                for f in range(f0, f1):
                    for p in range(P):
                        o[(n * F + f) * P + p] = b[f]
            if f1 > f0:
                cnn_skp_rows_f(&packed[0], &cols[0, 0], o, P, &col_off[0], F, K, J, g0, g1,
                               q0, q1, &work[t * scratch], &work[t * scratch + sums], fast)
