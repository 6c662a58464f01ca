# Shared by every kernel module (``include "cnn_threads.pxi"``): the thread-count policy of
# cnn_threads.h (declared in cnn_helpers.pxd) and the per-module Python hooks that
# cnnserve/_ext/__init__.py uses around fork().

from cnn_helpers cimport (
    cnn_openmp_enabled,
    cnn_parallel_was_used,
    cnn_set_single_threaded,
    cnn_thread_count,
    cnn_threads_for,
    cnn_threads_given,
)


def openmp_enabled():
    """True if this module was compiled with OpenMP (else every loop runs serially)."""
    return cnn_openmp_enabled() == 1


def threads_for(Py_ssize_t work):
    """The number of threads a kernel call with ``work`` inner-loop operations runs on."""
    return cnn_thread_count(work)


def _parallel_used():
    """True once a kernel of this module has run a parallel region with several threads."""
    return cnn_parallel_was_used() == 1


def _set_single_threaded(bint flag):
    """Make every kernel of this module run on the calling thread (used after fork)."""
    cnn_set_single_threaded(1 if flag else 0)


# A module first imported in a child that was forked after a parallel region (by another
# module) starts single-threaded too.
import cnnserve._ext as _package

if getattr(_package, "_child_single_threaded", False):
    _set_single_threaded(True)
