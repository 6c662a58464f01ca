# cython: language_level=3
"""The inference engine's one call: a compiled plan's whole forward, GIL released.

``cnnserve.engine`` builds the plan (descriptors, packed parameters, buffer sizes) and checks
the input; this module only runs it. See cnn_engine.h for the ops and the kernels.
"""

from cython cimport floating


include "cnn_threads.pxi"


cdef extern from "cnn_engine.h" nogil:
    int CNN_ENG_FIELDS
    int CNN_ENG_MR
    int CNN_ENG_NR
    int CNN_ENG_WINO_SKEW
    int CNN_ENG_RB
    int CNN_ENG_RX
    void cnn_eng_set_portable(int flag)
    int cnn_eng_uses_avx2()
    void cnn_eng_run_f(const long long* desc, const double* eps, int nops, const float* params,
                       const long long* offs, const float* x, float* out, Py_ssize_t N,
                       Py_ssize_t max_batch, Py_ssize_t in_size, Py_ssize_t out_size,
                       float* buf0, float* buf1, float* padded, float* wino, double* times)
    void cnn_eng_run_d(const long long* desc, const double* eps, int nops,
                       const double* params, const long long* offs, const double* x,
                       double* out, Py_ssize_t N, Py_ssize_t max_batch, Py_ssize_t in_size,
                       Py_ssize_t out_size, double* buf0, double* buf1, double* padded,
                       double* wino, double* times)


FIELDS = CNN_ENG_FIELDS
MR = CNN_ENG_MR
NR = CNN_ENG_NR
WINO_SKEW = CNN_ENG_WINO_SKEW
RB = CNN_ENG_RB
RX = CNN_ENG_RX


def set_portable(bint flag):
    """Force the portable tiles (True) instead of the AVX2 ones, for every plan."""
    cnn_eng_set_portable(1 if flag else 0)


def uses_avx2():
    """True when float32 plans run the AVX2/FMA tiles on this CPU (and they are not switched
    off)."""
    return cnn_eng_uses_avx2() == 1


def run(const long long[:, ::1] desc, const double[::1] eps, const floating[::1] params,
        const long long[::1] offs, const floating[::1] x, floating[::1] out, Py_ssize_t N,
        Py_ssize_t max_batch, Py_ssize_t in_size, Py_ssize_t out_size, floating[::1] buf0,
        floating[::1] buf1, floating[::1] padded, floating[::1] wino,
        double[::1] times=None):
    """Every op of ``desc`` on ``x`` (N images of ``in_size`` values) into ``out``; with
    ``times`` (one value per op), each op's seconds are added to its value."""
    cdef int nops = desc.shape[0]
    cdef double* clock = NULL
    if times is not None:
        if times.shape[0] != nops:
            raise ValueError(f"times must hold {nops} values, got {times.shape[0]}")
        clock = &times[0]
    with nogil:
        if floating is float:
            cnn_eng_run_f(&desc[0, 0], &eps[0], nops, &params[0], &offs[0], &x[0], &out[0], N,
                          max_batch, in_size, out_size, &buf0[0], &buf1[0], &padded[0],
                          &wino[0], clock)
        else:
            cnn_eng_run_d(&desc[0, 0], &eps[0], nops, &params[0], &offs[0], &x[0], &out[0], N,
                          max_batch, in_size, out_size, &buf0[0], &buf1[0], &padded[0],
                          &wino[0], clock)
