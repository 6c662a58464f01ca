"""Compiled Cython kernels, built from ``cython_ext/*.pyx`` (never committed).

Kernels take typed memoryviews of one floating type, write into buffers the caller allocated,
release the GIL and never validate their arguments: :mod:`cnnserve.layers` does that.

Idle OpenMP threads are made to sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``, unless
the environment already sets it): the layers alternate OpenMP kernels with BLAS calls whose
own threads need the same cores, and on a 2-core machine a spinning OpenMP thread slowed a
convolution backward pass by more than ten times. The setting is read when the OpenMP runtime
loads, so it applies when cnnserve is imported before anything else that uses OpenMP.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
