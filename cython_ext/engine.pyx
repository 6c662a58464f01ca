# cython: language_level=3
"""The inference engine's one call: a compiled plan's whole forward, GIL released.

``cnnserve.engine`` builds the plan (descriptors, packed parameters, buffer sizes) and checks
the input; this module only runs it. See cnn_engine.h for the ops and the kernels.
"""

import numpy as np

cimport numpy as cnp


include "cnn_threads.pxi"

cnp.import_array()


cdef extern from "cnn_engine.h" nogil:
    int CNN_ENG_FIELDS
    int CNN_ENG_MR
    int CNN_ENG_NR
    int CNN_ENG_WINO_SKEW
    int CNN_ENG_RB
    int CNN_ENG_RX
    int CNN_ENG_PORTABLE
    int CNN_ENG_AVX2
    int CNN_ENG_AVX512
    void cnn_eng_set_cap(int cap)
    int cnn_eng_isa()
    int cnn_eng_best_isa()
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


#: The float32 tiles' instruction sets, by name, in order.
ISAS = {"portable": CNN_ENG_PORTABLE, "avx2": CNN_ENG_AVX2, "avx512": CNN_ENG_AVX512}


def set_cap(int cap):
    """Cap the float32 tiles at ``cap`` (a value of :data:`ISAS`) for every plan."""
    cnn_eng_set_cap(cap)


def best_isa():
    """The best float32 tiles this CPU runs, whatever the cap (a value of ISAS)."""
    return cnn_eng_best_isa()


def isa():
    """The float32 tiles in use: the best the CPU has, under the cap (a value of ISAS)."""
    return cnn_eng_isa()


cdef class Program:
    """A compiled plan's fixed arrays (descriptors, eps, parameters, window offsets), held
    with their pointers so that a call only passes its input, output and buffers.

    ``cnnserve.engine.Plan`` builds it and checks every call's arrays (dtype, shape,
    C-contiguity) before :meth:`run`; this class checks only that their dtypes match.
    """

    cdef object arrays
    cdef const long long* desc
    cdef const double* eps
    cdef const void* params
    cdef const long long* offs
    cdef int nops
    cdef int typenum
    cdef Py_ssize_t max_batch, in_size, out_size

    def __cinit__(self, cnp.ndarray desc, cnp.ndarray eps, cnp.ndarray params,
                  cnp.ndarray offs, Py_ssize_t max_batch, Py_ssize_t in_size,
                  Py_ssize_t out_size):
        cdef const long long[:, ::1] d = desc
        cdef const double[::1] e = eps
        cdef const long long[::1] o = offs
        if params.dtype != np.float32 and params.dtype != np.float64:
            raise TypeError(f"params must be float32 or float64, got {params.dtype}")
        if not params.flags.c_contiguous or params.ndim != 1:
            raise ValueError("params must be a C-contiguous vector")
        if d.shape[0] < 1 or d.shape[1] != CNN_ENG_FIELDS or e.shape[0] != d.shape[0]:
            raise ValueError("desc must be (ops, FIELDS) and eps hold one value per op")
        self.arrays = (desc, eps, params, offs)
        self.desc = &d[0, 0]
        self.eps = &e[0]
        self.params = cnp.PyArray_DATA(params)
        self.offs = &o[0]
        self.nops = d.shape[0]
        self.typenum = cnp.PyArray_TYPE(params)
        self.max_batch = max_batch
        self.in_size = in_size
        self.out_size = out_size

    def run(self, cnp.ndarray x, cnp.ndarray out, tuple ws, cnp.ndarray times=None):
        """Every op on ``x`` (N images, C-contiguous) into ``out``, with the call's buffers
        ``ws`` (buf0, buf1, padded, wino); with ``times`` (float64, one value per op), each
        op's seconds are added to its value."""
        cdef cnp.ndarray b0 = ws[0], b1 = ws[1], pad = ws[2], wino = ws[3]
        cdef double* clock = NULL
        cdef Py_ssize_t N = x.shape[0]
        for a in (x, out, b0, b1, pad, wino):
            if cnp.PyArray_TYPE(a) != self.typenum:
                raise TypeError(f"every array must be of the plan's dtype, got {a.dtype}")
        if times is not None:
            if cnp.PyArray_TYPE(times) != cnp.NPY_DOUBLE or times.shape[0] != self.nops:
                raise ValueError(f"times must be {self.nops} float64 values")
            clock = <double*>cnp.PyArray_DATA(times)
        if self.typenum == cnp.NPY_FLOAT:
            with nogil:
                cnn_eng_run_f(self.desc, self.eps, self.nops, <const float*>self.params,
                              self.offs, <const float*>cnp.PyArray_DATA(x),
                              <float*>cnp.PyArray_DATA(out), N, self.max_batch, self.in_size,
                              self.out_size, <float*>cnp.PyArray_DATA(b0),
                              <float*>cnp.PyArray_DATA(b1), <float*>cnp.PyArray_DATA(pad),
                              <float*>cnp.PyArray_DATA(wino), clock)
        else:
            with nogil:
                cnn_eng_run_d(self.desc, self.eps, self.nops, <const double*>self.params,
                              self.offs, <const double*>cnp.PyArray_DATA(x),
                              <double*>cnp.PyArray_DATA(out), N, self.max_batch,
                              self.in_size, self.out_size, <double*>cnp.PyArray_DATA(b0),
                              <double*>cnp.PyArray_DATA(b1), <double*>cnp.PyArray_DATA(pad),
                              <double*>cnp.PyArray_DATA(wino), clock)
