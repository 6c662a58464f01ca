"""Compiled Cython kernels, built from ``cython_ext/*.pyx`` (never committed).

Kernels take typed memoryviews of one floating type, write into buffers the caller allocated,
release the GIL and never validate their arguments: :mod:`cnnserve.layers` does that.
"""
