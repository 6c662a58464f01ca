# cython: language_level=3
"""Normalisation kernels: per-channel ("batch") and per-sample-group ("layer/group") statistics.

Every kernel sees its input as a C-contiguous ``(N, C, S)`` array: batchnorm on ``(N, D)`` is
``C = D, S = 1``; spatial batchnorm and groupnorm on ``(N, C, H, W)`` use ``S = H * W``;
layernorm on ``(N, D)`` is the group family with ``C = D, S = 1, G = 1``.

* Channel family: one mean and variance per channel ``c``, over the ``M = N * S`` values
  ``x[:, c, :]``. Work is split over blocks of ``CHANNEL_BLOCK`` consecutive channels, read
  sample by sample, so that a block's rows ``x[n, c0:c1, :]`` are one contiguous run even
  when ``S = 1`` (a column-by-column walk would touch one cache line per value).
* Group family: ``G`` groups of ``C / G`` consecutive channels; one mean and variance per
  ``(n, g)``, over the ``K = (C / G) * S`` values ``x[n, g*C/G:(g+1)*C/G, :]`` (a contiguous
  run). Work is split over the ``N * G`` runs; ``dgamma`` and ``dbeta`` are reduced in a
  second loop split over channel blocks, so no two threads write the same entry.

Sums are accumulated in double whatever the data type, over vector partial sums
(independent additions that the CPU overlaps, where one running sum would wait on itself at
every element); the loops over a run are C helpers (``cnn_runs.h``) built for AVX-512 and
AVX2 besides the baseline. The variance is computed in two passes (the mean first, then the mean of
squared deviations), so a large common offset does not cancel the signal. The statistics
(``mean``, ``var``, ``inv_std = 1 / sqrt(var + eps)``) are double arrays. Kernels never
validate and only write into buffers the caller allocated.

Calls on fewer than ``CNN_PARALLEL_MIN_WORK`` elements (``cnn_threads.h``) run on one thread.
Each channel or run is summed by one thread in a fixed order, so results do not depend on the
number of threads.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

include "cnn_threads.pxi"

from cnn_helpers cimport (
    cnn_run_affine_d,
    cnn_run_affine_f,
    cnn_run_dx_d,
    cnn_run_dx_f,
    cnn_run_sum_dy_dev_d,
    cnn_run_sum_dy_dev_f,
    cnn_run_sum_sq_dev_d,
    cnn_run_sum_sq_dev_f,
    run_sum,
)

cdef enum:
    CHANNEL_BLOCK = 16  # channels per work item of the channel-wise reductions


# ---------------------------------------------------------------------------------------------
# Sums over one contiguous run of values
# ---------------------------------------------------------------------------------------------


cdef inline double _sum_sq_dev(const floating* p, Py_ssize_t n, double m) noexcept nogil:
    """``sum((p[:n] - m) ** 2)`` in double."""
    if floating is float:
        return cnn_run_sum_sq_dev_f(p, n, m)
    else:
        return cnn_run_sum_sq_dev_d(p, n, m)


cdef inline void _sum_dy_dev(const floating* dy, const floating* p, Py_ssize_t n, double m,
                             double* sum_dy, double* sum_dy_dev) noexcept nogil:
    """Add ``sum(dy[:n])`` to ``sum_dy[0]`` and ``sum(dy[:n] * (p[:n] - m))`` to ``sum_dy_dev[0]``."""
    if floating is float:
        cnn_run_sum_dy_dev_f(dy, p, n, m, sum_dy, sum_dy_dev)
    else:
        cnn_run_sum_dy_dev_d(dy, p, n, m, sum_dy, sum_dy_dev)


cdef inline void _affine_run(const floating* src, floating* dst, Py_ssize_t n, double m,
                             double scale, double shift) noexcept nogil:
    """``dst[:n] = (src[:n] - m) * scale + shift``, computed in double."""
    if floating is float:
        cnn_run_affine_f(src, dst, n, m, scale, shift)
    else:
        cnn_run_affine_d(src, dst, n, m, scale, shift)


cdef inline void _dx_run(const floating* dy, const floating* x, floating* dx, Py_ssize_t n,
                         double a, double c, double b, double m, double k) noexcept nogil:
    """``dx[:n] = a * (dy[:n] * c - b - (x[:n] - m) * k)``, computed in double."""
    if floating is float:
        cnn_run_dx_f(dy, x, dx, n, a, c, b, m, k)
    else:
        cnn_run_dx_d(dy, x, dx, n, a, c, b, m, k)


# ---------------------------------------------------------------------------------------------
# Channel family (batchnorm, spatial batchnorm)
# ---------------------------------------------------------------------------------------------


cdef void _channel_stats_block(
    const floating[:, :, ::1] x, double eps, double[::1] mean, double[::1] var,
    double[::1] inv_std, Py_ssize_t c0, Py_ssize_t c1,
) noexcept nogil:
    """Mean, biased variance and inverse std of channels ``c0:c1``."""
    cdef Py_ssize_t N = x.shape[0], S = x.shape[2], n, c
    cdef double M = <double>(N * S)
    cdef double acc[CHANNEL_BLOCK]
    for c in range(c0, c1):
        acc[c - c0] = 0.0
    for n in range(N):
        for c in range(c0, c1):
            acc[c - c0] += run_sum(&x[n, c, 0], S)
    for c in range(c0, c1):
        mean[c] = acc[c - c0] / M
        acc[c - c0] = 0.0
    for n in range(N):
        for c in range(c0, c1):
            acc[c - c0] += _sum_sq_dev(&x[n, c, 0], S, mean[c])
    for c in range(c0, c1):
        var[c] = acc[c - c0] / M
        inv_std[c] = 1.0 / sqrt(var[c] + eps)


cdef void _channel_affine_block(
    const floating[:, :, ::1] x, const double[::1] mean, const double[::1] inv_std,
    const floating[::1] gamma, const floating[::1] beta, floating[:, :, ::1] out,
    Py_ssize_t c0, Py_ssize_t c1,
) noexcept nogil:
    """``out = (x - mean) * (gamma * inv_std) + beta`` for channels ``c0:c1``."""
    cdef Py_ssize_t N = x.shape[0], S = x.shape[2], n, c
    for n in range(N):
        for c in range(c0, c1):
            _affine_run(&x[n, c, 0], &out[n, c, 0], S, mean[c], gamma[c] * inv_std[c], beta[c])


cdef void _channel_backward_block(
    const floating[:, :, ::1] dout, const floating[:, :, ::1] x, const double[::1] mean,
    const double[::1] inv_std, const floating[::1] gamma, bint batch_stats,
    floating[:, :, ::1] dx, floating[::1] dgamma, floating[::1] dbeta,
    Py_ssize_t c0, Py_ssize_t c1,
) noexcept nogil:
    """Gradients for channels ``c0:c1`` (see :func:`channel_backward`)."""
    cdef Py_ssize_t N = x.shape[0], S = x.shape[2], n, c
    cdef double M = <double>(N * S)
    cdef double sum_dy[CHANNEL_BLOCK]
    cdef double sum_dy_dev[CHANNEL_BLOCK]
    cdef double m, istd, g, k_mean, k_xhat
    for c in range(c0, c1):
        sum_dy[c - c0] = 0.0
        sum_dy_dev[c - c0] = 0.0
    for n in range(N):
        for c in range(c0, c1):
            _sum_dy_dev(&dout[n, c, 0], &x[n, c, 0], S, mean[c],
                        &sum_dy[c - c0], &sum_dy_dev[c - c0])
    for c in range(c0, c1):
        dbeta[c] = <floating>sum_dy[c - c0]
        dgamma[c] = <floating>(sum_dy_dev[c - c0] * inv_std[c])  # sum(dout * xhat)
    for n in range(N):
        for c in range(c0, c1):
            m = mean[c]
            istd = inv_std[c]
            g = gamma[c] * istd
            k_mean = 0.0
            k_xhat = 0.0
            if batch_stats:
                k_mean = sum_dy[c - c0] / M
                k_xhat = sum_dy_dev[c - c0] * istd / M
            # g * (dout - k_mean - (x - m) * istd * k_xhat)
            _dx_run(&dout[n, c, 0], &x[n, c, 0], &dx[n, c, 0], S, g, 1.0, k_mean, m,
                    istd * k_xhat)


def channel_forward(const floating[:, :, ::1] x, const floating[::1] gamma,
                    const floating[::1] beta, double eps, floating[:, :, ::1] out,
                    double[::1] mean, double[::1] var, double[::1] inv_std):
    """Per-channel batch statistics and ``out = gamma * (x - mean) * inv_std + beta``.

    Writes ``out`` (N, C, S) and the (C,) arrays ``mean``, ``var`` (biased: divided by
    ``N * S``) and ``inv_std = 1 / sqrt(var + eps)``.
    """
    cdef Py_ssize_t C = x.shape[1], blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK, k, c0, c1
    cdef int threads = cnn_threads_for(x.shape[0] * C * x.shape[2])
    with nogil:
        for k in prange(blocks, schedule="static", num_threads=threads):
            c0 = k * CHANNEL_BLOCK
            c1 = min(C, c0 + CHANNEL_BLOCK)
            _channel_stats_block(x, eps, mean, var, inv_std, c0, c1)
            _channel_affine_block(x, mean, inv_std, gamma, beta, out, c0, c1)


def channel_affine(const floating[:, :, ::1] x, const double[::1] mean,
                   const double[::1] inv_std, const floating[::1] gamma,
                   const floating[::1] beta, floating[:, :, ::1] out):
    """``out = gamma * (x - mean) * inv_std + beta`` with given per-channel statistics."""
    cdef Py_ssize_t C = x.shape[1], blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK, k, c0, c1
    cdef int threads = cnn_threads_for(x.shape[0] * C * x.shape[2])
    with nogil:
        for k in prange(blocks, schedule="static", num_threads=threads):
            c0 = k * CHANNEL_BLOCK
            c1 = min(C, c0 + CHANNEL_BLOCK)
            _channel_affine_block(x, mean, inv_std, gamma, beta, out, c0, c1)


def channel_backward(const floating[:, :, ::1] dout, const floating[:, :, ::1] x,
                     const double[::1] mean, const double[::1] inv_std,
                     const floating[::1] gamma, bint batch_stats,
                     floating[:, :, ::1] dx, floating[::1] dgamma, floating[::1] dbeta):
    """Gradients of :func:`channel_forward` (``batch_stats``) or :func:`channel_affine`.

    With ``xhat = (x - mean) * inv_std`` and sums over the ``M = N * S`` values of a channel:
    ``dbeta = sum(dout)``, ``dgamma = sum(dout * xhat)`` and

    * ``batch_stats`` (mean and inv_std came from this batch):
      ``dx = gamma * inv_std / M * (M * dout - sum(dout) - xhat * sum(dout * xhat))``;
    * otherwise (fixed statistics, test mode): ``dx = gamma * inv_std * dout``.
    """
    cdef Py_ssize_t C = x.shape[1], blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK, k, c0, c1
    cdef int threads = cnn_threads_for(x.shape[0] * C * x.shape[2])
    with nogil:
        for k in prange(blocks, schedule="static", num_threads=threads):
            c0 = k * CHANNEL_BLOCK
            c1 = min(C, c0 + CHANNEL_BLOCK)
            _channel_backward_block(dout, x, mean, inv_std, gamma, batch_stats,
                                    dx, dgamma, dbeta, c0, c1)


# ---------------------------------------------------------------------------------------------
# Group family (layernorm, spatial groupnorm)
# ---------------------------------------------------------------------------------------------


cdef void _group_forward_one(
    const floating[:, :, ::1] x, const floating[::1] gamma, const floating[::1] beta,
    Py_ssize_t G, double eps, floating[:, :, ::1] out, double[:, ::1] mean,
    double[:, ::1] inv_std, Py_ssize_t ng,
) noexcept nogil:
    cdef Py_ssize_t S = x.shape[2], Cg = x.shape[1] // G
    cdef double K = <double>(Cg * S)
    cdef Py_ssize_t n = ng // G, g = ng % G, c
    cdef double m, istd, gc, bc
    cdef const floating* run = &x[n, g * Cg, 0]  # the group's Cg * S values, contiguous
    cdef floating* dst
    m = run_sum(run, Cg * S) / K
    istd = 1.0 / sqrt(_sum_sq_dev(run, Cg * S, m) / K + eps)
    mean[n, g] = m
    inv_std[n, g] = istd
    if S == 1:  # layernorm: one value per channel, a flat loop over the run
        dst = &out[n, g * Cg, 0]
        for c in range(Cg):
            gc = gamma[g * Cg + c] * istd
            bc = beta[g * Cg + c]
            dst[c] = <floating>((run[c] - m) * gc + bc)
        return
    for c in range(g * Cg, (g + 1) * Cg):
        _affine_run(&x[n, c, 0], &out[n, c, 0], S, m, gamma[c] * istd, beta[c])


cdef void _group_backward_dx_one(
    const floating[:, :, ::1] dout, const floating[:, :, ::1] x, const double[:, ::1] mean,
    const double[:, ::1] inv_std, const floating[::1] gamma, Py_ssize_t G,
    floating[:, :, ::1] dx, Py_ssize_t ng,
) noexcept nogil:
    cdef Py_ssize_t S = x.shape[2], Cg = x.shape[1] // G
    cdef double K = <double>(Cg * S)
    cdef Py_ssize_t n = ng // G, g = ng % G, c
    cdef double m = mean[n, g], istd = inv_std[n, g]
    cdef double gc, sum_dy, sum_dy_dev, mean_dxhat = 0.0, mean_dxhat_xhat = 0.0
    cdef const floating* dyp
    cdef const floating* xp
    cdef floating* dxp
    cdef Py_ssize_t c0 = g * Cg
    # With dxhat = dout * gamma[c]: mean(dxhat) and mean(dxhat * xhat) over the group.
    if S == 1:  # layernorm: one value per channel, a flat loop over the run
        dyp = &dout[n, c0, 0]
        xp = &x[n, c0, 0]
        dxp = &dx[n, c0, 0]
        for c in range(Cg):
            gc = gamma[c0 + c]
            mean_dxhat += dyp[c] * gc
            mean_dxhat_xhat += dyp[c] * gc * (xp[c] - m)
        mean_dxhat /= K
        mean_dxhat_xhat *= istd / K
        for c in range(Cg):
            gc = gamma[c0 + c]  # a double: the products below are formed in double
            dxp[c] = <floating>(
                istd * (dyp[c] * gc - mean_dxhat - (xp[c] - m) * istd * mean_dxhat_xhat)
            )
        return
    for c in range(c0, c0 + Cg):
        sum_dy = 0.0
        sum_dy_dev = 0.0
        _sum_dy_dev(&dout[n, c, 0], &x[n, c, 0], S, m, &sum_dy, &sum_dy_dev)
        mean_dxhat += gamma[c] * sum_dy
        mean_dxhat_xhat += gamma[c] * sum_dy_dev
    mean_dxhat /= K
    mean_dxhat_xhat *= istd / K
    for c in range(c0, c0 + Cg):
        # istd * (dout * gamma[c] - mean_dxhat - (x - m) * istd * mean_dxhat_xhat)
        _dx_run(&dout[n, c, 0], &x[n, c, 0], &dx[n, c, 0], S, istd, gamma[c], mean_dxhat, m,
                istd * mean_dxhat_xhat)


cdef void _group_backward_params_block(
    const floating[:, :, ::1] dout, const floating[:, :, ::1] x, const double[:, ::1] mean,
    const double[:, ::1] inv_std, Py_ssize_t G, floating[::1] dgamma, floating[::1] dbeta,
    Py_ssize_t c0, Py_ssize_t c1,
) noexcept nogil:
    """``dbeta[c] = sum(dout)`` and ``dgamma[c] = sum(dout * xhat)`` for channels c0:c1."""
    cdef Py_ssize_t N = x.shape[0], S = x.shape[2], Cg = x.shape[1] // G, n, c, g
    cdef double sum_dy[CHANNEL_BLOCK]
    cdef double sum_dy_xhat[CHANNEL_BLOCK]
    cdef Py_ssize_t group_of[CHANNEL_BLOCK]
    cdef double dev
    for c in range(c0, c1):
        sum_dy[c - c0] = 0.0
        sum_dy_xhat[c - c0] = 0.0
        group_of[c - c0] = c // Cg
    cdef const floating* dyp
    cdef const floating* xp
    for n in range(N):
        if S == 1:  # layernorm: the block is one short contiguous run per sample
            dyp = &dout[n, c0, 0]
            xp = &x[n, c0, 0]
            for c in range(c1 - c0):
                g = group_of[c]
                sum_dy[c] += dyp[c]
                sum_dy_xhat[c] += dyp[c] * ((xp[c] - mean[n, g]) * inv_std[n, g])
            continue
        for c in range(c0, c1):
            g = group_of[c - c0]
            dev = 0.0
            _sum_dy_dev(&dout[n, c, 0], &x[n, c, 0], S, mean[n, g], &sum_dy[c - c0], &dev)
            sum_dy_xhat[c - c0] += dev * inv_std[n, g]
    for c in range(c0, c1):
        dgamma[c] = <floating>sum_dy_xhat[c - c0]
        dbeta[c] = <floating>sum_dy[c - c0]


def group_forward(const floating[:, :, ::1] x, const floating[::1] gamma,
                  const floating[::1] beta, Py_ssize_t G, double eps,
                  floating[:, :, ::1] out, double[:, ::1] mean, double[:, ::1] inv_std):
    """Per-(sample, group) statistics and ``out = gamma[c] * (x - mean) * inv_std + beta[c]``.

    ``G`` must divide ``C``. Writes ``out`` (N, C, S) and the (N, G) arrays ``mean`` and
    ``inv_std = 1 / sqrt(var + eps)``, with the biased variance over the group's values.
    """
    cdef Py_ssize_t NG = x.shape[0] * G, ng
    cdef int threads = cnn_threads_for(x.shape[0] * x.shape[1] * x.shape[2])
    with nogil:
        for ng in prange(NG, schedule="static", num_threads=threads):
            _group_forward_one(x, gamma, beta, G, eps, out, mean, inv_std, ng)


def group_backward(const floating[:, :, ::1] dout, const floating[:, :, ::1] x,
                   const double[:, ::1] mean, const double[:, ::1] inv_std,
                   const floating[::1] gamma, Py_ssize_t G,
                   floating[:, :, ::1] dx, floating[::1] dgamma, floating[::1] dbeta):
    """Gradients of :func:`group_forward`.

    With ``xhat = (x - mean[n, g]) * inv_std[n, g]``, ``dxhat = dout * gamma[c]`` and means
    over the ``K`` values of one group: ``dx = inv_std * (dxhat - mean(dxhat) - xhat *
    mean(dxhat * xhat))``; ``dgamma[c]`` and ``dbeta[c]`` sum ``dout * xhat`` and ``dout``
    over the samples and the ``S`` positions of channel ``c``.
    """
    cdef Py_ssize_t NG = x.shape[0] * G, C = x.shape[1], ng, k, c0, c1
    cdef Py_ssize_t blocks = (C + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    cdef int threads = cnn_threads_for(x.shape[0] * C * x.shape[2])
    with nogil:
        # dx: one (n, g) run per iteration; then dgamma, dbeta: one channel block each.
        for ng in prange(NG, schedule="static", num_threads=threads):
            _group_backward_dx_one(dout, x, mean, inv_std, gamma, G, dx, ng)
        for k in prange(blocks, schedule="static", num_threads=threads):
            c0 = k * CHANNEL_BLOCK
            c1 = min(C, c0 + CHANNEL_BLOCK)
            _group_backward_params_block(dout, x, mean, inv_std, G, dgamma, dbeta, c0, c1)
