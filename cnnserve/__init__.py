"""cnnserve: a small CNN library on Cython kernels, and a dense-inference service.

The layer API lives in :mod:`cnnserve.layers`; plain NumPy loop versions of every layer, used
only as a test oracle, live in :mod:`cnnserve.reference`.
"""

__version__ = "0.1.0"

# Process-wide thread settings (environment defaults) must be in place before NumPy loads its
# BLAS: see cnnserve/_ext/__init__.py.
from cnnserve import _ext as _ext  # noqa: E402
