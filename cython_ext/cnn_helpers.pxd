# cython: language_level=3
# Declarations of the C helpers (cnn_*.h) that several kernel modules share, and the typed
# wrappers that pick the float or double version. A declarations-only .pxd: every module that
# cimports it compiles the header into its own shared object (so the thread flags of
# cnn_threads.h stay per module, as cnnserve/_ext/__init__.py expects around fork()).

from cython cimport floating


cdef extern from "cnn_threads.h" nogil:
    int cnn_threads_for(Py_ssize_t work) noexcept
    int cnn_thread_count(Py_ssize_t work) noexcept
    int cnn_threads_given(int threads) noexcept
    int cnn_openmp_enabled() noexcept
    int cnn_parallel_was_used() noexcept
    void cnn_set_single_threaded(int flag) noexcept


# Sums and updates over one contiguous run of values: vectorised C, built for AVX-512 and AVX2
# besides the baseline, the best version picked when the module loads.
cdef extern from "cnn_runs.h" nogil:
    double cnn_run_sum_f(const float* p, Py_ssize_t n)
    double cnn_run_sum_d(const double* p, Py_ssize_t n)
    double cnn_run_sum_sq_dev_f(const float* p, Py_ssize_t n, double m)
    double cnn_run_sum_sq_dev_d(const double* p, Py_ssize_t n, double m)
    void cnn_run_sum_dy_dev_f(const float* dy, const float* p, Py_ssize_t n, double m,
                              double* sum_dy, double* sum_dy_dev)
    void cnn_run_sum_dy_dev_d(const double* dy, const double* p, Py_ssize_t n, double m,
                              double* sum_dy, double* sum_dy_dev)
    void cnn_run_affine_f(const float* src, float* dst, Py_ssize_t n, double m, double scale,
                          double shift)
    void cnn_run_affine_d(const double* src, double* dst, Py_ssize_t n, double m, double scale,
                          double shift)
    void cnn_run_dx_f(const float* dy, const float* x, float* dx, Py_ssize_t n, double a,
                      double c, double b, double m, double k)
    void cnn_run_dx_d(const double* dy, const double* x, double* dx, Py_ssize_t n, double a,
                      double c, double b, double m, double k)


cdef inline double run_sum(const floating* p, Py_ssize_t n) noexcept nogil:
    """``sum(p[:n])`` in double."""
    if floating is float:
        return cnn_run_sum_f(p, n)
    else:
        return cnn_run_sum_d(p, n)
