"""What import and export share: the lazily imported ``onnx`` package, the errors, and the
metadata keys. A private helper module of :mod:`cnnserve.onnx`."""

from __future__ import annotations

from types import ModuleType

__all__ = [
    "EXPORT_OPSET",
    "META_CLASS_NAMES",
    "META_INPUT_SHAPE",
    "META_KIND",
    "META_NORMALIZATION",
    "OPSETS",
    "OnnxError",
    "OnnxUnavailableError",
    "onnx_module",
]

OPSETS = range(11, 22)  # the default-domain opsets that import reads: 11 to 21
EXPORT_OPSET = 17
EXPORT_IR_VERSION = 8  # the IR version of opset 17: runtimes from 2021 on read it

# metadata_props keys (JSON values) that export writes and import reads
META_CLASS_NAMES = "class_names"
META_NORMALIZATION = "normalization"
META_INPUT_SHAPE = "input_shape"
META_KIND = "cnnserve_kind"  # "trained" or "converted"

INSTALL_HINT = "pip install onnx (from a clone: .venv/bin/pip install -e '.[onnx]')"


class OnnxError(ValueError):
    """An ONNX model that cannot be read into cnnserve exactly, or a model that cannot be
    written to ONNX; the message names the node, its op and the attribute at fault."""


class OnnxUnavailableError(ImportError):
    """The optional ``onnx`` package is not installed."""


def onnx_module() -> ModuleType:
    """The ``onnx`` package, imported on first use: neither training nor serving safetensors
    models needs it.

    Raises
    ------
    OnnxUnavailableError
        It is not installed; the message says which extra installs it.
    """
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError as exc:
        raise OnnxUnavailableError(
            f"ONNX import and export need the onnx package: {INSTALL_HINT} ({exc})"
        ) from exc
    return onnx
