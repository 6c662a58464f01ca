"""Public layer API: paired ``*_forward`` / ``*_backward`` functions on NCHW arrays.

Every forward returns ``out, cache`` and every backward takes ``(dout, cache)``, as in the
CS231n assignments. Arguments are checked here, once: a wrong shape or value raises
``ValueError``, a wrong type or dtype raises ``TypeError``, and the message names the argument,
what was expected and what came. Inputs are never modified. float32 and float64 are supported
throughout and the output dtype is the input dtype; all arrays of one call must share a dtype.

The heavy loops run in the compiled Cython kernels of :mod:`cnnserve._ext`; matrix products
go to numpy's BLAS. There is no pure-Python fallback: importing this package without the
compiled kernels raises an ImportError that says how to build them, and
:mod:`cnnserve.reference` holds plain loop versions for testing only.

One op family per module, as in ``cython_ext/``: :mod:`~cnnserve.layers.conv`,
:mod:`~cnnserve.layers.pool`, :mod:`~cnnserve.layers.norm`, :mod:`~cnnserve.layers.basic`
(relu, affine, softmax, losses, dropout); the argument checks they share are in
``_checks.py``, the scratch buffers and thread limits in ``_runtime.py``. This module only
re-exports.
"""

from cnnserve.layers.basic import (
    AffineCache,
    DropoutCache,
    affine_backward,
    affine_forward,
    dropout_backward,
    dropout_forward,
    relu_backward,
    relu_forward,
    softmax_backward,
    softmax_forward,
    softmax_loss,
    svm_loss,
)
from cnnserve.layers.conv import ConvCache, PackedFilters, conv_backward, conv_forward, pack_filters
from cnnserve.layers.norm import (
    BatchnormCache,
    GroupnormCache,
    LayernormCache,
    SpatialBatchnormCache,
    batchnorm_backward,
    batchnorm_backward_alt,
    batchnorm_forward,
    layernorm_backward,
    layernorm_forward,
    spatial_batchnorm_backward,
    spatial_batchnorm_forward,
    spatial_groupnorm_backward,
    spatial_groupnorm_forward,
)
from cnnserve.layers.pool import (
    AvgPoolCache,
    MaxPoolCache,
    avg_pool_backward,
    avg_pool_forward,
    max_pool_backward,
    max_pool_forward,
)

__all__ = [
    "AffineCache",
    "ConvCache",
    "DropoutCache",
    "PackedFilters",
    "pack_filters",
    "conv_forward",
    "conv_backward",
    "relu_forward",
    "relu_backward",
    "affine_forward",
    "affine_backward",
    "softmax_forward",
    "softmax_backward",
    "softmax_loss",
    "svm_loss",
    "dropout_forward",
    "dropout_backward",
    "MaxPoolCache",
    "AvgPoolCache",
    "max_pool_forward",
    "max_pool_backward",
    "avg_pool_forward",
    "avg_pool_backward",
    "BatchnormCache",
    "SpatialBatchnormCache",
    "LayernormCache",
    "GroupnormCache",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "layernorm_forward",
    "layernorm_backward",
    "spatial_groupnorm_forward",
    "spatial_groupnorm_backward",
]
