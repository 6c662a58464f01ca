"""Compiled Cython kernels, built from ``cython_ext/*.pyx`` (never committed).

Kernels take typed memoryviews of one floating type, write into buffers the caller allocated,
release the GIL and never validate their arguments: :mod:`cnnserve.layers` does that.

Three process-wide thread settings live here (``cnnserve/__init__.py`` imports this module
first, so that they are in the environment before NumPy loads its BLAS):

* Idle OpenMP threads spin only briefly, then sleep (``OMP_WAIT_POLICY=PASSIVE`` with
  ``GOMP_SPINCOUNT=10000``, about 0.1 ms; each only when the environment does not set it,
  and no spin count when it sets a wait policy of its own):
  the layers alternate OpenMP kernels with BLAS calls whose own threads need the same cores,
  and on a 2-core machine an OpenMP thread left spinning (GNU OpenMP's default, milliseconds)
  slowed a convolution backward pass by more than ten times. But a thread that sleeps at once
  must be woken by the kernel for the next parallel region, tens of microseconds on a virtual
  machine: a compiled plan runs one region per layer, and a VGG-style net on one image took
  0.6 ms with no spin against 0.31 ms with this one (the training benchmark,
  ``bench/layers.py``, the same with and without it). The settings are read when the OpenMP
  runtime loads, so they apply when cnnserve is imported before anything else that uses
  OpenMP.
* Idle OpenBLAS worker threads spin for about 0.5 ms (``OPENBLAS_THREAD_TIMEOUT=20``, 2**20
  cycles, unless the environment sets it) instead of OpenBLAS's default 2**28 cycles (about
  0.1 s): after each NumPy product (an affine layer, say) the spinning worker took a core from
  the next OpenMP kernel, and a training step's conv forward and backward ran about 2x slower
  than alone. OpenBLAS reads the variable when it loads: it has no effect if NumPy was
  imported before cnnserve.
* GNU OpenMP cannot be used across ``fork()``: in a child forked after a parallel region ran
  in the parent, the next parallel region hangs. A fork hook checks whether any kernel module
  ran one and, if so, makes every kernel in the child run on one thread (multiprocessing's
  fork start method and pre-forking servers keep working; their children run serially).
"""

import importlib
import os
import sys
from types import ModuleType

_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "20"}
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    _ENV_DEFAULTS["GOMP_SPINCOUNT"] = "10000"
#: The variables cnnserve put in the environment (those the environment did not set): a
#: process that starts another program (a benchmark's PyTorch helper) can leave them out.
ENV_SET_BY_CNNSERVE = tuple(name for name in _ENV_DEFAULTS if name not in os.environ)
for _name in ENV_SET_BY_CNNSERVE:
    os.environ[_name] = _ENV_DEFAULTS[_name]

_child_single_threaded = False  # read by the kernel modules when they are imported
_parallel_before_fork = False


def load(name: str) -> ModuleType:
    """Import the kernel module ``cnnserve._ext.<name>``, or say how to build it.

    Raises
    ------
    ImportError
        The compiled module is missing or does not load; the message says to run
        ``make install``.
    """
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        raise ImportError(
            "cnnserve's compiled Cython kernels (cnnserve._ext) are missing or failed to load "
            f"({exc}). Build them from the repository root with `make install` "
            "(or `pip install -e .` in your environment)."
        ) from exc


def _loaded_kernel_modules() -> list:
    """Every kernel module imported so far (each includes cnn_threads.pxi)."""
    prefix = f"{__name__}."
    return [
        module
        for name, module in list(sys.modules.items())
        if name.startswith(prefix) and hasattr(module, "_parallel_used")
    ]


def _before_fork() -> None:
    global _parallel_before_fork
    _parallel_before_fork = _child_single_threaded or any(
        module._parallel_used() for module in _loaded_kernel_modules()
    )


def _after_fork_in_child() -> None:
    global _child_single_threaded
    if _parallel_before_fork:
        _child_single_threaded = True
        for module in _loaded_kernel_modules():
            module._set_single_threaded(True)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
