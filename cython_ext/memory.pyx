# cython: language_level=3
"""A caching NumPy memory handler for the arrays of training steps (see cnn_memory.h).

:func:`install` makes it the NumPy memory handler of the calling context (NEP 49: a context
variable, so other threads and the caller's code outside the context are unaffected) and
returns the handler it replaced, for :func:`restore`.
"""

from cpython.pycapsule cimport PyCapsule_New

cimport numpy as cnp

cdef extern from "<pthread.h>" nogil:
    int pthread_atfork(void (*prepare)(), void (*parent)(), void (*child)())

cdef extern from "cnn_memory.h":
    ctypedef struct PyDataMem_Handler:
        pass
    PyDataMem_Handler cnn_mem_handler
    size_t cnn_cache_limit, cnn_cache_bytes, cnn_cache_count
    unsigned long long cnn_cache_hits, cnn_cache_misses
    size_t cnn_cache_release()
    void cnn_cache_after_fork_in_child() nogil

cnp.import_array()
pthread_atfork(NULL, NULL, cnn_cache_after_fork_in_child)

cdef object _handler = PyCapsule_New(<void*>&cnn_mem_handler, "mem_handler", NULL)


def install():
    """Make the caching handler current in this context; returns the previous handler."""
    return cnp.PyDataMem_SetHandler(_handler)


def restore(previous):
    """Make ``previous`` (what :func:`install` returned) the handler again."""
    cnp.PyDataMem_SetHandler(previous)


def set_limit(size_t limit_bytes):
    """Keep at most this many bytes of freed blocks (0: cache nothing)."""
    global cnn_cache_limit
    cnn_cache_limit = limit_bytes
    if cnn_cache_bytes > limit_bytes:
        cnn_cache_release()


def release():
    """Free every cached block; returns the number of bytes given back."""
    return cnn_cache_release()


def stats():
    """``{'hits', 'misses', 'cached_bytes', 'cached_blocks', 'limit_bytes'}``."""
    return {
        "hits": cnn_cache_hits,
        "misses": cnn_cache_misses,
        "cached_bytes": cnn_cache_bytes,
        "cached_blocks": cnn_cache_count,
        "limit_bytes": cnn_cache_limit,
    }
