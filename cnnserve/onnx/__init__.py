"""ONNX in and out: a classifier trained elsewhere becomes a cnnserve network, exactly or with
a clear refusal, and a cnnserve network leaves for any ONNX runtime.

:func:`import_onnx` reads a graph with the ``onnx`` package (``onnx.numpy_helper`` for the
weights) into a :class:`~cnnserve.network.ConvNet`, which then trains, converts, maps and
serves like any other. The graph must be a chain from one image input to one output of class
scores; each op becomes a layer, every attribute handled exactly or refused with an
:class:`OnnxError` that names the node, the op and the attribute:

======================================  ======================================================
``Conv``                                strides (one for both axes), symmetric ``pads`` (one
                                        for both axes), ``auto_pad`` NOTSET / VALID, SAME_*
                                        where it pads symmetrically; dilations 1, group 1
``Relu``                                ``relu``
``MaxPool``, ``AveragePool``            no padding; ``ceil_mode`` 1 only where it changes
                                        nothing; windows that tile the input exactly (ONNX
                                        floors: cnnserve refuses what that would drop)
``GlobalMaxPool``, ``GlobalAveragePool``  a pool over the whole feature map
``BatchNormalization``                  inference form: ``spatial_batchnorm`` on volumes,
                                        ``batchnorm`` on vectors
``Flatten``, ``Reshape`` to (N, -1)     NCHW C order, the order of cnnserve's affine layers
``Gemm``, ``MatMul`` (+ ``Add``)        ``affine`` (``alpha``, ``beta``, ``transB``; not
                                        ``transA``); an ``Add`` of one value per channel
                                        after a Conv, Gemm or MatMul is its bias
``Dropout``, ``Identity``               dropped (the identity at inference)
``Softmax``, ``LogSoftmax``             at the end only: dropped, cnnserve's scores are the
                                        logits (noted)
``Constant``, ``Shape``, ``Gather``,    shape arithmetic (a flatten's target), evaluated
``Unsqueeze``, ``Squeeze``, ``Concat``,
``Cast``, ``Slice``
======================================  ======================================================

Opsets 11 to 21 of the default domain. Class names and the input normalisation come from the
arguments, else from the model's ``metadata_props`` (``class_names``: JSON list or names
separated by commas; ``normalization``: JSON ``{"mean": [...], "std": [...]}``).

:func:`export_onnx` writes a trained network (fixed input size, dynamic batch) or a converted
one (:class:`~cnnserve.convert.FullyConvNet`: dynamic height and width, so one ONNX file gives
the dense score map) with the ``onnx`` helper API, opset 17, with the class names, the
normalisation and the input shape in ``metadata_props``, checked by ``onnx.checker``. The
graph's input is preprocessed (normalised) pixels, ``(N, C, H, W)``.

The ``onnx`` package is optional (the ``onnx`` extra: ``pip install -e '.[onnx]'`` in a
clone): it is imported on the first call, and without it these functions raise
:class:`OnnxUnavailableError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnserve._files import atomic_write_bytes
from cnnserve.convert import FullyConvNet
from cnnserve.network import ConvNet
from cnnserve.onnx._proto import EXPORT_OPSET, OPSETS, OnnxError, OnnxUnavailableError
from cnnserve.onnx._reader import OnnxImport, read_onnx
from cnnserve.onnx._writer import INPUT_NAME, OUTPUT_NAME, network_to_onnx

__all__ = [
    "EXPORT_OPSET",
    "INPUT_NAME",
    "OPSETS",
    "OUTPUT_NAME",
    "OnnxError",
    "OnnxImport",
    "OnnxUnavailableError",
    "export_onnx",
    "import_onnx",
    "read_onnx",
]


def import_onnx(
    source: str | os.PathLike | bytes,
    *,
    class_names: Sequence[str] | None = None,
    normalization: Mapping | None = None,
    input_shape: Sequence[int] | None = None,
) -> ConvNet:
    """An ONNX classifier as a :class:`~cnnserve.network.ConvNet` (see the module docstring).

    Parameters
    ----------
    source : str, PathLike or bytes
        An ``.onnx`` file, or its bytes.
    class_names : sequence of str, optional
        One name per class; default: the model's ``class_names`` metadata, else ``"0", ...``.
    normalization : dict, optional
        ``{"mean": [...], "std": [...]}`` per input channel, in the [0, 1] pixel domain: how
        the network's inputs were normalised; default: the model's ``normalization`` metadata,
        else none.
    input_shape : sequence of int, optional
        ``(C, H, W)`` when the graph's input has no fixed size (default: the graph's, else
        the ``input_shape`` metadata).

    Returns
    -------
    ConvNet
        Of the graph input's dtype (FLOAT: float32, DOUBLE: float64). ``read_onnx`` also
        returns the notes (what was dropped) and a record for the model file.

    Raises
    ------
    OnnxError
        Not an ONNX model (empty, truncated, invalid), or a construct cnnserve cannot
        reproduce exactly: the message names the node, its op and the attribute.
    OnnxUnavailableError
        The ``onnx`` package is not installed.

    Shape
    -----
    The network maps ``(N, C, H, W)`` to ``(N, K)``, as the graph does.
    """
    return read_onnx(
        source, class_names=class_names, normalization=normalization, input_shape=input_shape
    ).model


def export_onnx(
    model: ConvNet | FullyConvNet | str | os.PathLike,
    out: str | os.PathLike | None = None,
) -> Any:
    """A network as an ONNX model (opset 17), written to ``out`` when given (atomically).

    Parameters
    ----------
    model : ConvNet, FullyConvNet, str or PathLike
        A trained network (fixed input size ``(N, C, H, W)``, N dynamic), a converted one
        (dynamic H and W), or a model file of either kind.
    out : str or PathLike, optional
        The ``.onnx`` file to write; its directory must exist.

    Returns
    -------
    onnx.ModelProto
        Checked by ``onnx.checker`` (full check, with shape inference).

    Raises
    ------
    OnnxError
        A converted network whose group norm runs window by window (no single graph does).
    OnnxUnavailableError
        The ``onnx`` package is not installed.

    Shape
    -----
    Trained: ``image`` ``(N, C, H, W)`` -> ``scores`` ``(N, K)``. Converted: ``image``
    ``(N, C, H, W)`` with ``H >= Th``, ``W >= Tw`` -> ``scores``
    ``(N, K, (H - Th) // S + 1, (W - Tw) // S + 1)``.
    """
    proto = network_to_onnx(model)
    if out is not None:
        out = Path(out)
        if not out.parent.is_dir():
            raise OnnxError(f"cannot write {out}: directory {out.parent} does not exist")
        atomic_write_bytes(out, proto.SerializeToString())
    return proto
