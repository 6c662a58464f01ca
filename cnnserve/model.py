"""The model API in one import: networks, layer specs, presets and model files.

Re-exports only, so that ``from cnnserve.model import ConvNet, load_model, save_model`` stays
the one line a script needs. The code lives in its rooms:

- :mod:`cnnserve.specs`: layer specs, shape inference, parameter names, presets;
- :mod:`cnnserve.network`: :class:`ConvNet`, :class:`ThreeLayerConvNet` and the per-layer
  dispatcher;
- :mod:`cnnserve.modelfile`: model files (trained and converted), reading and writing.
"""

from cnnserve.modelfile import (
    FCN_FORMAT_NAME,
    FORMAT_NAME,
    ModelFile,
    ModelFileError,
    load_model,
    read_metadata,
    read_model_file,
    save_model,
    write_model_file,
)
from cnnserve.network import ConvNet, ThreeLayerConvNet
from cnnserve.specs import PRESETS, LayerInfo, preset_layers, tensor_shapes

__all__ = [
    "FCN_FORMAT_NAME",
    "FORMAT_NAME",
    "PRESETS",
    "ConvNet",
    "LayerInfo",
    "ModelFile",
    "ModelFileError",
    "ThreeLayerConvNet",
    "load_model",
    "preset_layers",
    "read_metadata",
    "read_model_file",
    "save_model",
    "tensor_shapes",
    "write_model_file",
]
