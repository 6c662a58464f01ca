# cython: language_level=3
"""Update-rule kernels: one fused pass over a parameter for the adam step.

numpy evaluates adam as about ten whole-array operations, each a pass over memory with a
temporary; this kernel reads ``w``, ``dw``, ``m`` and ``v`` once and writes ``next_w``,
``m_out`` and ``v_out`` once. The arithmetic per element is the same sequence of operations,
in the parameter's floating type, as :func:`cnnserve.optim.adam` documents.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, sqrtf


include "cnn_threads.pxi"


def adam_step(const floating[::1] w, const floating[::1] dw, const floating[::1] m,
              const floating[::1] v, floating[::1] next_w, floating[::1] m_out,
              floating[::1] v_out, double learning_rate, double beta1, double beta2,
              double epsilon, double correction1, double correction2):
    """One adam step on flat arrays of one length; ``correction_k = 1 - beta_k**t``.

    ``m_out = beta1*m + (1-beta1)*dw``, ``v_out = beta2*v + (1-beta2)*dw*dw`` and
    ``next_w = w - lr * (m_out/correction1) / (sqrt(v_out/correction2) + epsilon)``, every
    constant rounded to the floating type first, as numpy does with typed scalars.
    """
    cdef Py_ssize_t i, n = w.shape[0]
    cdef floating b1 = <floating>beta1, c1 = <floating>(1.0 - beta1)
    cdef floating b2 = <floating>beta2, c2 = <floating>(1.0 - beta2)
    cdef floating bc1 = <floating>correction1, bc2 = <floating>correction2
    cdef floating lr = <floating>learning_rate, eps = <floating>epsilon
    cdef floating mi, vi, root
    cdef int threads = cnn_threads_for(n * 8)
    for i in prange(n, nogil=True, schedule="static", num_threads=threads):
        mi = b1 * m[i] + c1 * dw[i]
        vi = b2 * v[i] + c2 * (dw[i] * dw[i])
        if floating is float:
            root = sqrtf(vi / bc2)
        else:
            root = sqrt(vi / bc2)
        m_out[i] = mi
        v_out[i] = vi
        next_w[i] = w[i] - lr * (mi / bc1) / (root + eps)
