# cython: language_level=3
"""Normalisation kernels: per-channel ("batch") and per-sample-group ("layer/group") statistics.

Every kernel sees its input as a C-contiguous ``(N, C, S)`` array: batchnorm on ``(N, D)`` is
``C = D, S = 1``; spatial batchnorm and groupnorm on ``(N, C, H, W)`` use ``S = H * W``;
layernorm on ``(N, D)`` is the group family with ``C = D, S = 1, G = 1``.

* Channel family: one mean and variance per channel ``c``, over the ``M = N * S`` values
  ``x[:, c, :]``. Work is split over channels.
* Group family: ``G`` groups of ``C / G`` consecutive channels; one mean and variance per
  ``(n, g)``, over the ``K = (C / G) * S`` values ``x[n, g*C/G:(g+1)*C/G, :]`` (a contiguous
  block). Work is split over the ``N * G`` blocks; ``dgamma`` and ``dbeta`` are reduced in a
  second loop split over channels, so no two threads write the same entry.

Sums are accumulated in double whatever the data type, and the variance is computed in two
passes (the mean first, then the mean of squared deviations), so a large common offset does
not cancel the signal. The statistics (``mean``, ``var``, ``inv_std = 1 / sqrt(var + eps)``)
are double arrays. Kernels never validate and only write into buffers the caller allocated.

Calls on fewer than ``CNN_PARALLEL_MIN_WORK`` elements (``cnn_threads.h``) run on one thread:
an OpenMP region costs more than such a call, and with several OpenMP processes on one machine
(service workers, test runs) their waiting threads slow each other down many times over. Each
channel or block is computed by one thread in a fixed order, so results do not depend on the
number of threads.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt

cdef extern from "cnn_threads.h":
    int cnn_threads_for(Py_ssize_t work) noexcept nogil


# ---------------------------------------------------------------------------------------------
# Channel family (batchnorm, spatial batchnorm)
# ---------------------------------------------------------------------------------------------


cdef inline void _channel_forward_one(
    const floating[:, :, ::1] x, const floating[::1] gamma, const floating[::1] beta,
    double eps, floating[:, :, ::1] out, double[::1] mean, double[::1] var,
    double[::1] inv_std, Py_ssize_t c,
) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], S = x.shape[2]
    cdef double M = <double>(N * S)
    cdef Py_ssize_t n, s
    cdef double acc = 0.0, m, d, v
    for n in range(N):
        for s in range(S):
            acc += x[n, c, s]
    m = acc / M
    acc = 0.0
    for n in range(N):
        for s in range(S):
            d = x[n, c, s] - m
            acc += d * d
    v = acc / M
    mean[c] = m
    var[c] = v
    inv_std[c] = 1.0 / sqrt(v + eps)
    _channel_affine_one(x, mean, inv_std, gamma, beta, out, c)


cdef inline void _channel_affine_one(
    const floating[:, :, ::1] x, const double[::1] mean, const double[::1] inv_std,
    const floating[::1] gamma, const floating[::1] beta, floating[:, :, ::1] out, Py_ssize_t c,
) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], S = x.shape[2]
    cdef Py_ssize_t n, s
    cdef double m = mean[c], scale = gamma[c] * inv_std[c], shift = beta[c]
    for n in range(N):
        for s in range(S):
            out[n, c, s] = <floating>((x[n, c, s] - m) * scale + shift)


cdef inline void _channel_backward_one(
    const floating[:, :, ::1] dout, const floating[:, :, ::1] x, const double[::1] mean,
    const double[::1] inv_std, const floating[::1] gamma, bint batch_stats,
    floating[:, :, ::1] dx, floating[::1] dgamma, floating[::1] dbeta, Py_ssize_t c,
) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], S = x.shape[2]
    cdef double M = <double>(N * S)
    cdef Py_ssize_t n, s
    cdef double m = mean[c], istd = inv_std[c]
    cdef double sum_dy = 0.0, sum_dy_xhat = 0.0, g, xhat, k_mean = 0.0, k_xhat = 0.0
    for n in range(N):
        for s in range(S):
            sum_dy += dout[n, c, s]
            sum_dy_xhat += dout[n, c, s] * ((x[n, c, s] - m) * istd)
    dbeta[c] = <floating>sum_dy
    dgamma[c] = <floating>sum_dy_xhat
    g = gamma[c] * istd
    if batch_stats:
        k_mean = sum_dy / M
        k_xhat = sum_dy_xhat / M
    for n in range(N):
        for s in range(S):
            xhat = (x[n, c, s] - m) * istd
            dx[n, c, s] = <floating>(g * (dout[n, c, s] - k_mean - xhat * k_xhat))


def channel_forward(const floating[:, :, ::1] x, const floating[::1] gamma,
                    const floating[::1] beta, double eps, floating[:, :, ::1] out,
                    double[::1] mean, double[::1] var, double[::1] inv_std):
    """Per-channel batch statistics and ``out = gamma * (x - mean) * inv_std + beta``.

    Writes ``out`` (N, C, S) and the (C,) arrays ``mean``, ``var`` (biased: divided by
    ``N * S``) and ``inv_std = 1 / sqrt(var + eps)``.
    """
    cdef Py_ssize_t C = x.shape[1], c
    cdef int threads = cnn_threads_for(x.shape[0] * C * x.shape[2])
    with nogil:
        for c in prange(C, schedule="static", num_threads=threads):
            _channel_forward_one(x, gamma, beta, eps, out, mean, var, inv_std, c)


def channel_affine(const floating[:, :, ::1] x, const double[::1] mean,
                   const double[::1] inv_std, const floating[::1] gamma,
                   const floating[::1] beta, floating[:, :, ::1] out):
    """``out = gamma * (x - mean) * inv_std + beta`` with given per-channel statistics."""
    cdef Py_ssize_t C = x.shape[1], c
    cdef int threads = cnn_threads_for(x.shape[0] * C * x.shape[2])
    with nogil:
        for c in prange(C, schedule="static", num_threads=threads):
            _channel_affine_one(x, mean, inv_std, gamma, beta, out, c)


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
    cdef Py_ssize_t C = x.shape[1], c
    cdef int threads = cnn_threads_for(x.shape[0] * C * x.shape[2])
    with nogil:
        for c in prange(C, schedule="static", num_threads=threads):
            _channel_backward_one(dout, x, mean, inv_std, gamma, batch_stats,
                                  dx, dgamma, dbeta, c)


# ---------------------------------------------------------------------------------------------
# Group family (layernorm, spatial groupnorm)
# ---------------------------------------------------------------------------------------------


cdef inline void _group_forward_one(
    const floating[:, :, ::1] x, const floating[::1] gamma, const floating[::1] beta,
    Py_ssize_t G, double eps, floating[:, :, ::1] out, double[:, ::1] mean,
    double[:, ::1] inv_std, Py_ssize_t ng,
) noexcept nogil:
    cdef Py_ssize_t S = x.shape[2], Cg = x.shape[1] // G
    cdef double K = <double>(Cg * S)
    cdef Py_ssize_t n = ng // G, g = ng % G, c, s
    cdef double acc = 0.0, m, d, istd, gc, bc
    for c in range(g * Cg, (g + 1) * Cg):
        for s in range(S):
            acc += x[n, c, s]
    m = acc / K
    acc = 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        for s in range(S):
            d = x[n, c, s] - m
            acc += d * d
    istd = 1.0 / sqrt(acc / K + eps)
    mean[n, g] = m
    inv_std[n, g] = istd
    for c in range(g * Cg, (g + 1) * Cg):
        gc = gamma[c] * istd
        bc = beta[c]
        for s in range(S):
            out[n, c, s] = <floating>((x[n, c, s] - m) * gc + bc)


cdef inline void _group_backward_dx_one(
    const floating[:, :, ::1] dout, const floating[:, :, ::1] x, const double[:, ::1] mean,
    const double[:, ::1] inv_std, const floating[::1] gamma, Py_ssize_t G,
    floating[:, :, ::1] dx, Py_ssize_t ng,
) noexcept nogil:
    cdef Py_ssize_t S = x.shape[2], Cg = x.shape[1] // G
    cdef double K = <double>(Cg * S)
    cdef Py_ssize_t n = ng // G, g = ng % G, c, s
    cdef double m = mean[n, g], istd = inv_std[n, g]
    cdef double dxhat, xhat, gc, mean_dxhat = 0.0, mean_dxhat_xhat = 0.0
    for c in range(g * Cg, (g + 1) * Cg):
        gc = gamma[c]
        for s in range(S):
            dxhat = dout[n, c, s] * gc
            mean_dxhat += dxhat
            mean_dxhat_xhat += dxhat * ((x[n, c, s] - m) * istd)
    mean_dxhat /= K
    mean_dxhat_xhat /= K
    for c in range(g * Cg, (g + 1) * Cg):
        gc = gamma[c]
        for s in range(S):
            xhat = (x[n, c, s] - m) * istd
            dx[n, c, s] = <floating>(
                istd * (dout[n, c, s] * gc - mean_dxhat - xhat * mean_dxhat_xhat)
            )


cdef inline void _group_backward_params_one(
    const floating[:, :, ::1] dout, const floating[:, :, ::1] x, const double[:, ::1] mean,
    const double[:, ::1] inv_std, Py_ssize_t G, floating[::1] dgamma, floating[::1] dbeta,
    Py_ssize_t c,
) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], S = x.shape[2], g = c // (x.shape[1] // G), n, s
    cdef double m, istd, sum_dy = 0.0, sum_dy_xhat = 0.0
    for n in range(N):
        m = mean[n, g]
        istd = inv_std[n, g]
        for s in range(S):
            sum_dy += dout[n, c, s]
            sum_dy_xhat += dout[n, c, s] * ((x[n, c, s] - m) * istd)
    dgamma[c] = <floating>sum_dy_xhat
    dbeta[c] = <floating>sum_dy


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
    cdef Py_ssize_t NG = x.shape[0] * G, C = x.shape[1], ng, c
    cdef int threads = cnn_threads_for(x.shape[0] * C * x.shape[2])
    with nogil:
        # dx: one (n, g) block per iteration; then dgamma, dbeta: one channel each.
        for ng in prange(NG, schedule="static", num_threads=threads):
            _group_backward_dx_one(dout, x, mean, inv_std, gamma, G, dx, ng)
        for c in prange(C, schedule="static", num_threads=threads):
            _group_backward_params_one(dout, x, mean, inv_std, G, dgamma, dbeta, c)
