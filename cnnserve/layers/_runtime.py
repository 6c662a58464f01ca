"""Scratch buffers, BLAS thread limits and fork safety for the layer kernels.

A private helper module of :mod:`cnnserve.layers`. Both objects here are shared by every
thread and replaced in a forked child (a fork copies their locks in whatever state another
thread left them): read them as ``_runtime.SCRATCH`` and ``_runtime.BLAS_1`` at each use,
never bind them to another name.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

__all__ = [
    "BLAS_1",
    "CHUNK_BYTES",
    "SCRATCH",
    "ScratchPool",
    "SingleThreadBLAS",
    "images_per_chunk",
]


class ScratchPool:
    """Scratch buffers for column matrices, shared by all threads and reused across calls.

    A call borrows its buffers (no two running calls ever share one) and returns them when it
    ends. At most ``keep`` buffers of at most ``max_bytes`` each stay allocated between calls,
    so the memory held while idle is bounded whatever the number of threads; a larger buffer
    (one huge image) is freed when its call ends.
    """

    def __init__(self, keep: int, max_bytes: int):
        self.keep = keep
        self.max_bytes = max_bytes
        self._free: list[np.ndarray] = []  # 1-D uint8 buffers
        self._lock = threading.Lock()

    def _take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            fits = [i for i, buf in enumerate(self._free) if buf.nbytes >= nbytes]
            if fits:  # the smallest buffer that is large enough
                return self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
        return np.empty(nbytes, dtype=np.uint8)

    def _give(self, buf: np.ndarray) -> None:
        if buf.nbytes > self.max_bytes:
            return
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self.keep:  # drop the smallest
                self._free.sort(key=lambda b: b.nbytes)
                del self._free[0]

    @contextmanager
    def borrow(self, sizes: tuple[int, ...], dtype: np.dtype) -> Iterator[list[np.ndarray]]:
        """1-D arrays of ``dtype`` with the given numbers of elements, for one ``with`` block."""
        itemsize = np.dtype(dtype).itemsize
        raw = [self._take(size * itemsize) for size in sizes]
        try:
            yield [buf[: size * itemsize].view(dtype) for buf, size in zip(raw, sizes, strict=True)]
        finally:
            for buf in raw:
                self._give(buf)


# The column matrix of a whole batch can be hundreds of MB: it is built for a chunk of about
# CHUNK_BYTES of images at a time, in reused scratch buffers, so the GEMMs read data that is
# still in cache and no call pays for page-faulting a fresh allocation.
CHUNK_BYTES = 8 * 2**20
SCRATCH = ScratchPool(keep=4, max_bytes=4 * CHUNK_BYTES)


def _reset_scratch_in_child() -> None:
    """A fork copies the pool's lock in whatever state another thread left it: start afresh."""
    global SCRATCH
    SCRATCH = ScratchPool(keep=SCRATCH.keep, max_bytes=SCRATCH.max_bytes)


os.register_at_fork(after_in_child=_reset_scratch_in_child)


def images_per_chunk(N: int, elems_per_image: int, itemsize: int) -> int:
    """How many images' scratch matrices fit in ``CHUNK_BYTES`` (at least 1, at most N)."""
    return max(1, min(N, CHUNK_BYTES // max(1, elems_per_image * itemsize)))


class SingleThreadBLAS:
    """Context manager: BLAS runs on one thread inside the fused conv kernels.

    The fused kernels call BLAS (``scipy.linalg.cython_blas``) from inside their OpenMP
    threads; a multithreaded BLAS would start its own threads in each of them and
    oversubscribe the cores (measured 2-10x slower).

    When SciPy has its own BLAS library (the wheels' ``scipy.libs/libscipy_openblas``, which
    only SciPy calls), that library is set to one thread once, at the first fused call, and
    left so: switching it per call wakes OpenBLAS's worker threads, which then spin and take
    the cores from the kernel. Otherwise (SciPy and NumPy share a BLAS, as in conda) every
    BLAS library is set to one thread while any fused kernel runs and restored by the last
    one out; calls nest and may overlap across Python threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._controller = None  # None: not set up yet; False: SciPy's BLAS is single-threaded
        self._limiter = None

    def _setup(self) -> None:
        from threadpoolctl import ThreadpoolController

        blas = ThreadpoolController().select(user_api="blas")
        own = [
            c
            for c in blas.lib_controllers
            if os.path.basename(os.path.dirname(c.filepath)) == "scipy.libs"
        ]
        if own:
            for lib in own:
                lib.set_num_threads(1)
            self._controller = False
        else:
            self._controller = blas

    def __enter__(self) -> None:
        with self._lock:
            if self._controller is None:
                self._setup()
            if self._controller is not False and self._depth == 0:
                self._limiter = self._controller.limit(limits=1)
            self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._limiter is not None:
                self._limiter.restore_original_limits()
                self._limiter = None


BLAS_1 = SingleThreadBLAS()


def _reset_blas_limit_in_child() -> None:
    """A fork copies the lock in whatever state another thread left it: start afresh."""
    global BLAS_1
    BLAS_1 = SingleThreadBLAS()


os.register_at_fork(after_in_child=_reset_blas_limit_in_child)
