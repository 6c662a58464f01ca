"""Networks as lists of layer specs, their loss and gradients, and model files.

A network is a list of plain, JSON-serialisable layer specs::

    [{"type": "conv", "filters": 32, "size": 5, "stride": 1, "pad": 0},
     {"type": "relu"},
     {"type": "max_pool", "size": 2, "stride": 2},
     {"type": "affine", "units": 100},
     {"type": "relu"},
     {"type": "dropout", "keep": 0.5}]

:class:`ConvNet` infers every layer's shapes from the input shape, appends the classifier
(an affine layer with ``num_classes`` units) and follows the CS231n model interface:
``model.params`` is a dict of arrays and ``model.loss(X)`` returns class scores, while
``model.loss(X, y)`` runs in training mode and returns ``(loss, grads)``.

Layer types and their keys (defaults in brackets):

============================  ===============================================================
``conv``                      ``filters``, ``size`` (int or [height, width]), ``stride`` [1],
                              ``pad`` [0]
``max_pool``, ``avg_pool``    ``size`` (int or [height, width]), ``stride`` [size]
``relu``                      none
``dropout``                   ``keep``: the probability of keeping a unit, in (0, 1]
``spatial_batchnorm``         ``eps`` [1e-5], ``momentum`` [0.9], on (C, H, W) volumes
``spatial_groupnorm``         ``groups``, ``eps`` [1e-5], on (C, H, W) volumes
``batchnorm``, ``layernorm``  ``eps`` [1e-5] (and ``momentum`` [0.9] for batchnorm), on vectors
``affine``                    ``units``; flattens a volume in NCHW order
============================  ===============================================================

Parameters are named as in CS231n: ``W1, b1, W2, b2, ...`` for the weight layers in order
(conv and affine), ``gamma1, beta1, ...`` for the normalisation layers in order; a batchnorm
layer's running statistics are ``running_mean<k>`` and ``running_var<k>`` with the same ``k``
as its ``gamma<k>``.

Model files are safetensors: the weights and running statistics as tensors, and in the
metadata the architecture, input shape, class names, input normalisation, dtype and a training
record. :func:`load_model` never unpickles; a truncated, corrupt or mismatched file raises
:class:`ModelFileError` naming the file and, where one is at fault, the tensor.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cnnserve import __version__
from cnnserve import layers as L
from cnnserve._buffers import with_reused_buffers
from cnnserve._checks import check_int as _check_int
from cnnserve._checks import check_number as _check_number
from cnnserve._files import atomic_write_bytes

__all__ = [
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

FORMAT_NAME = "cnnserve.model"
FCN_FORMAT_NAME = "cnnserve.fcn"  # a converted network (cnnserve.convert)
FORMAT_VERSION = 1
STATE_PREFIX = "state/"
_DTYPES = {"float32": np.float32, "float64": np.float64}


class ModelFileError(ValueError):
    """A model file is missing, truncated, corrupt, or does not match its architecture."""


# ---------------------------------------------------------------------------------------------
# Layer specs
# ---------------------------------------------------------------------------------------------

_SPEC_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # type: (required, optional)
    "conv": (("filters", "size"), ("stride", "pad")),
    "max_pool": (("size",), ("stride",)),
    "avg_pool": (("size",), ("stride",)),
    "relu": ((), ()),
    "dropout": (("keep",), ()),
    "spatial_batchnorm": ((), ("eps", "momentum")),
    "spatial_groupnorm": (("groups",), ("eps",)),
    "batchnorm": ((), ("eps", "momentum")),
    "layernorm": ((), ("eps",)),
    "affine": (("units",), ()),
}
_SPATIAL = {"conv", "max_pool", "avg_pool", "spatial_batchnorm", "spatial_groupnorm"}
_VECTOR = {"batchnorm", "layernorm"}


class LayerInfo(NamedTuple):
    """One layer of a built network: its normalised spec, shapes and parameter names."""

    index: int  # position in ConvNet.layers (0-based)
    spec: dict  # the spec with every default filled in
    in_shape: tuple[int, ...]  # (C, H, W) or (D,)
    out_shape: tuple[int, ...]
    param_names: tuple[str, ...]  # e.g. ("W1", "b1") or ("gamma2", "beta2")
    bn_index: int | None  # index into ConvNet.bn_params for batchnorm layers


def _pair(value: Any, name: str) -> tuple[int, int]:
    """An int or a [height, width] pair of ints >= 1."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or [height, width], got {value!r}")
        return _check_int(value[0], f"{name}[0]", 1), _check_int(value[1], f"{name}[1]", 1)
    size = _check_int(value, name, 1)
    return size, size


def _normalise_spec(spec: Any, where: str) -> dict:
    """Check one layer spec and return a copy with every default filled in."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"{where} must be a dict with a 'type' key, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in _SPEC_KEYS:
        raise ValueError(
            f"{where} has unknown type {kind!r}; known types: {', '.join(sorted(_SPEC_KEYS))}"
        )
    required, optional = _SPEC_KEYS[kind]
    unknown = sorted(set(spec) - {"type", *required, *optional}, key=str)
    if unknown:
        allowed = ", ".join(repr(k) for k in (*required, *optional)) or "none"
        raise ValueError(
            f"{where} ({kind}) has unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed keys: {allowed}"
        )
    missing = [key for key in required if key not in spec]
    if missing:
        raise ValueError(f"{where} ({kind}) is missing the key(s) {', '.join(map(repr, missing))}")
    out: dict[str, Any] = {"type": kind}
    if kind == "conv":
        out["filters"] = _check_int(spec["filters"], f"{where} filters", 1)
        out["size"] = list(_pair(spec["size"], f"{where} size"))
        out["stride"] = _check_int(spec.get("stride", 1), f"{where} stride", 1)
        out["pad"] = _check_int(spec.get("pad", 0), f"{where} pad", 0)
    elif kind in ("max_pool", "avg_pool"):
        out["size"] = list(_pair(spec["size"], f"{where} size"))
        stride = spec.get("stride")
        out["stride"] = (
            out["size"][0] if stride is None else _check_int(stride, f"{where} stride", 1)
        )
        if stride is None and out["size"][0] != out["size"][1]:
            raise ValueError(f"{where} ({kind}) with a non-square size needs an explicit stride")
    elif kind == "dropout":
        out["keep"] = _check_number(spec["keep"], f"{where} keep", 0, 1, "(]", "keep probability")
    elif kind == "affine":
        out["units"] = _check_int(spec["units"], f"{where} units", 1)
    elif kind == "spatial_groupnorm":
        out["groups"] = _check_int(spec["groups"], f"{where} groups", 1)
    if kind in ("spatial_batchnorm", "batchnorm", "layernorm", "spatial_groupnorm"):
        out["eps"] = _check_number(spec.get("eps", 1e-5), f"{where} eps", 0, math.inf, "()")
    if kind in ("spatial_batchnorm", "batchnorm"):
        out["momentum"] = _check_number(spec.get("momentum", 0.9), f"{where} momentum", 0, 1, "[]")
    return out


def _window(size: int, window: int, stride: int, pad: int) -> int | None:
    """Output length of a sliding window, or None if it does not fit or tile exactly."""
    span = size + 2 * pad - window
    if span < 0 or span % stride:
        return None
    return span // stride + 1


def _describe(spec: Mapping) -> str:
    """A short text for a spec: ``conv 32 5x5 s1 p0``."""
    kind = spec["type"]
    if kind == "conv":
        h, w = spec["size"]
        return f"conv {spec['filters']} {h}x{w} s{spec['stride']} p{spec['pad']}"
    if kind in ("max_pool", "avg_pool"):
        h, w = spec["size"]
        return f"{kind} {h}x{w} s{spec['stride']}"
    if kind == "affine":
        return f"affine {spec['units']}"
    if kind == "dropout":
        return f"dropout keep={spec['keep']:g}"
    if kind == "spatial_groupnorm":
        return f"spatial_groupnorm groups={spec['groups']}"
    return kind


def _out_shape(spec: dict, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """The output shape of a layer on an input of ``shape``, or ValueError saying why not."""
    kind = spec["type"]
    fail = f"{where} ({_describe(spec)}) cannot take an input of shape {shape}"
    if kind in _SPATIAL and len(shape) != 3:
        raise ValueError(f"{fail}: it needs a (C, H, W) volume, and affine layers flatten")
    if kind in _VECTOR and len(shape) != 1:
        spatial = "spatial_batchnorm" if kind == "batchnorm" else "spatial_groupnorm (groups=1)"
        raise ValueError(f"{fail}: it needs a vector (D,); use {spatial} on volumes")
    if kind in ("conv", "max_pool", "avg_pool"):
        C, H, W = shape
        (kh, kw), stride = spec["size"], spec["stride"]
        pad = spec.get("pad", 0)
        h_out, w_out = _window(H, kh, stride, pad), _window(W, kw, stride, pad)
        if h_out is None or w_out is None:
            padded = f" + 2*{pad}" if pad else ""
            raise ValueError(
                f"{fail}: a {kh}x{kw} window at stride {stride} must fit in and tile "
                f"(H{padded}, W{padded}) = ({H + 2 * pad}, {W + 2 * pad}) exactly, i.e. "
                f"(size{padded} - window) divisible by the stride"
            )
        return (spec["filters"] if kind == "conv" else C, h_out, w_out)
    if kind == "spatial_groupnorm" and shape[0] % spec["groups"]:
        raise ValueError(f"{fail}: {shape[0]} channels do not split into {spec['groups']} groups")
    if kind == "affine":
        return (spec["units"],)
    return shape


def _plan(
    layers: list[dict], input_shape: tuple[int, ...]
) -> list[tuple[LayerInfo, int, dict[str, tuple[int, ...]]]]:
    """Shapes and tensor names of a stack of normalised specs (the classifier last).

    Returns, per layer, its :class:`LayerInfo`, the fan-in of a weight layer (else 0), and
    the shapes of the tensors it owns: parameters and batchnorm running statistics. Nothing
    is allocated, so a model file can be checked against its architecture first.
    """
    plan = []
    shape = input_shape
    n_weight = n_norm = n_bn = 0
    for i, spec in enumerate(layers):
        where = f"layer {i}" if i < len(layers) - 1 else f"layer {i} (the classifier)"
        out = _out_shape(spec, shape, where)
        kind = spec["type"]
        names: tuple[str, ...] = ()
        shapes: dict[str, tuple[int, ...]] = {}
        fan_in, bn_index = 0, None
        if kind in ("conv", "affine"):
            n_weight += 1
            names = (f"W{n_weight}", f"b{n_weight}")
            if kind == "conv":
                kh, kw = spec["size"]
                fan_in = shape[0] * kh * kw
                shapes[names[0]] = (spec["filters"], shape[0], kh, kw)
            else:
                fan_in = math.prod(shape)
                shapes[names[0]] = (fan_in, spec["units"])
            shapes[names[1]] = (out[0],)
        elif kind in ("spatial_batchnorm", "batchnorm", "layernorm", "spatial_groupnorm"):
            n_norm += 1
            names = (f"gamma{n_norm}", f"beta{n_norm}")
            C = shape[0]
            p_shape = (1, C, 1, 1) if kind == "spatial_groupnorm" else (C,)
            shapes = dict.fromkeys(names, p_shape)
            if kind in ("spatial_batchnorm", "batchnorm"):
                bn_index, n_bn = n_bn, n_bn + 1
                shapes[f"running_mean{n_norm}"] = shapes[f"running_var{n_norm}"] = (C,)
        plan.append((LayerInfo(i, spec, shape, out, names, bn_index), fan_in, shapes))
        shape = out
    return plan


def _check_config(config: Any) -> None:
    """A :meth:`ConvNet.config` dict must be a mapping with the keys that build a network."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    missing = [k for k in ("layers", "input_shape", "num_classes") if k not in config]
    if missing:
        raise ValueError(f"config is missing {', '.join(map(repr, missing))}")


def _check_layers(layers: Any) -> Sequence:
    """``layers`` must be a list of layer specs (not a single spec or a string)."""
    if isinstance(layers, Mapping | str) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of layer specs, got {type(layers).__name__}")
    return layers


def tensor_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor a network of this :meth:`ConvNet.config` holds.

    Checks the architecture like the constructor does, without allocating anything.
    """
    _check_config(config)
    body = [
        _normalise_spec(spec, f"layer {i}")
        for i, spec in enumerate(_check_layers(config["layers"]))
    ]
    head = {"type": "affine", "units": _check_int(config["num_classes"], "num_classes", 2)}
    shapes: dict[str, tuple[int, ...]] = {}
    for _, _, owned in _plan([*body, head], _check_input_shape(config["input_shape"])):
        shapes.update(owned)
    return shapes


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def _digits_layers(input_shape: tuple[int, int, int]) -> list[dict]:
    """Padding-free net for small digit images: its dense score maps are exact."""
    return [
        {"type": "conv", "filters": 32, "size": 3, "stride": 1, "pad": 0},
        {"type": "spatial_batchnorm"},
        {"type": "relu"},
        {"type": "conv", "filters": 64, "size": 3, "stride": 1, "pad": 0},
        {"type": "spatial_batchnorm"},
        {"type": "relu"},
        {"type": "max_pool", "size": 2, "stride": 2},
        {"type": "affine", "units": 128},
        {"type": "relu"},
        {"type": "dropout", "keep": 0.5},
    ]


def _three_layer_layers(input_shape: tuple[int, int, int]) -> list[dict]:
    """CS231n's conv(7x7, same padding)-relu-pool(2x2)-affine(100)-relu stack."""
    return ThreeLayerConvNet.stack(num_filters=32, filter_size=7, hidden_dim=100)


def _lenet_layers(input_shape: tuple[int, int, int]) -> list[dict]:
    """A LeNet-5-like padding-free stack for 28x28 or 32x32 images."""
    return [
        {"type": "conv", "filters": 6, "size": 5},
        {"type": "relu"},
        {"type": "max_pool", "size": 2, "stride": 2},
        {"type": "conv", "filters": 16, "size": 5},
        {"type": "relu"},
        {"type": "max_pool", "size": 2, "stride": 2},
        {"type": "affine", "units": 120},
        {"type": "relu"},
        {"type": "affine", "units": 84},
        {"type": "relu"},
    ]


PRESETS: dict[str, Callable[[tuple[int, int, int]], list[dict]]] = {
    "digits": _digits_layers,
    "three_layer": _three_layer_layers,
    "lenet": _lenet_layers,
}


def preset_layers(name: str, input_shape: tuple[int, int, int]) -> list[dict]:
    """The layer specs of a named preset architecture (without the classifier)."""
    if name not in PRESETS:
        raise ValueError(f"unknown architecture preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name](tuple(input_shape))


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class ConvNet:
    """A network built from layer specs, with the CS231n model interface.

    Parameters
    ----------
    layers : list of dict
        The layer specs (see the module docstring). An affine classifier with
        ``num_classes`` units is appended after them.
    input_shape : tuple of int
        ``(C, H, W)`` of one input image.
    num_classes : int
        Number of classes (>= 2).
    weight_scale : float or None
        Standard deviation of the initial weights. None (default) is He/Kaiming
        initialisation: ``sqrt(2 / fan_in)`` with ``fan_in = C * HH * WW`` for a conv and the
        input length for an affine layer. Biases and ``beta`` start at 0, ``gamma`` at 1.
    reg : float
        L2 regularisation strength: the loss adds ``0.5 * reg * sum(W**2)`` over the weights
        ``W<k>`` (not biases or normalisation parameters).
    dtype : numpy dtype
        float32 (default) or float64: the dtype of every parameter and computation.
    seed : int
        Seeds the weight initialisation and :attr:`rng`, the generator of dropout masks.
    class_names : sequence of str, optional
        One name per class; defaults to ``"0", "1", ...``.
    normalization : dict, optional
        ``{"mean": [...], "std": [...]}`` per input channel, in the [0, 1] pixel domain: how
        training inputs were normalised, stored in the model file for inference.

    Raises
    ------
    ValueError
        A bad spec, or a stack that cannot take the input shape; the message names the
        layer index and the shapes.

    Shape
    -----
    ``loss(X)`` maps X of shape ``(N, *input_shape)`` to scores of shape
    ``(N, num_classes)``.
    """

    def __init__(
        self,
        layers: Sequence[Mapping],
        input_shape: Sequence[int],
        num_classes: int,
        *,
        weight_scale: float | None = None,
        reg: float = 0.0,
        dtype: Any = np.float32,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        normalization: Mapping | None = None,
    ) -> None:
        _check_layers(layers)
        shape = _check_input_shape(input_shape)
        self.num_classes = _check_int(num_classes, "num_classes", 2)
        if weight_scale is not None:
            weight_scale = _check_number(weight_scale, "weight_scale", 0, math.inf, "()")
        self.weight_scale = weight_scale
        self.reg = _check_number(reg, "reg", 0, math.inf, "[)")
        self.dtype = _check_dtype(dtype)
        self.seed = _check_int(seed, "seed", 0, 2**63 - 1)
        self.input_shape = shape
        body = [_normalise_spec(spec, f"layer {i}") for i, spec in enumerate(layers)]
        self.layers = [*body, {"type": "affine", "units": self.num_classes}]
        self.class_names = _check_class_names(class_names, self.num_classes)
        self.normalization = _check_normalization(normalization, shape[0])

        self.info: list[LayerInfo] = []
        self.params: dict[str, np.ndarray] = {}
        self.bn_params: list[dict] = []
        init_rng = np.random.default_rng(self.seed)
        for info, fan_in, shapes in _plan(self.layers, shape):
            kind = info.spec["type"]
            if kind in ("conv", "affine"):
                w_name, b_name = info.param_names
                std = weight_scale if weight_scale is not None else math.sqrt(2.0 / fan_in)
                weights = init_rng.standard_normal(shapes[w_name]) * std
                self.params[w_name] = weights.astype(self.dtype)
                self.params[b_name] = np.zeros(shapes[b_name], dtype=self.dtype)
            elif info.param_names:  # a normalisation layer
                gamma, beta = info.param_names
                self.params[gamma] = np.ones(shapes[gamma], dtype=self.dtype)
                self.params[beta] = np.zeros(shapes[beta], dtype=self.dtype)
            if info.bn_index is not None:
                C = info.in_shape[0]
                self.bn_params.append(
                    {
                        "mode": "train",
                        "eps": info.spec["eps"],
                        "momentum": info.spec["momentum"],
                        "running_mean": np.zeros(C, dtype=self.dtype),
                        "running_var": np.ones(C, dtype=self.dtype),
                        "name": gamma[len("gamma") :],
                    }
                )
            self.info.append(info)
        self.rng = np.random.default_rng(self.seed)

    # -- configuration ------------------------------------------------------------------------

    @property
    def body(self) -> list[dict]:
        """The layer specs without the appended classifier (what the constructor took)."""
        return [dict(spec) for spec in self.layers[:-1]]

    def config(self) -> dict:
        """The JSON-serialisable architecture: enough to rebuild the network (not its weights)."""
        return {
            "layers": self.body,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "dtype": np.dtype(self.dtype).name,
            "reg": self.reg,
            "weight_scale": self.weight_scale,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: Mapping, **kwargs: Any) -> ConvNet:
        """Build a network from :meth:`config` output (fresh weights)."""
        _check_config(config)
        options = {k: config[k] for k in ("weight_scale", "reg", "dtype", "seed") if k in config}
        options.update(kwargs)
        return ConvNet(config["layers"], config["input_shape"], config["num_classes"], **options)

    def num_parameters(self) -> int:
        """Number of trainable scalars (running statistics excluded)."""
        return sum(int(p.size) for p in self.params.values())

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the model: the parameters and the batchnorm running statistics."""
        tensors = dict(self.params)
        for bn in self.bn_params:
            tensors[f"running_mean{bn['name']}"] = bn["running_mean"]
            tensors[f"running_var{bn['name']}"] = bn["running_var"]
        return tensors

    def summary(self) -> str:
        """A table of the layers, their output shapes and parameter counts."""
        rows = [("#", "layer", "output shape", "params")]
        rows.append(("", "input", _shape_text(self.input_shape), ""))
        for info in self.info:
            count = sum(self.params[name].size for name in info.param_names)
            label = _describe(info.spec) + (
                "  (classifier)" if info.index == len(self.info) - 1 else ""
            )
            rows.append(
                (str(info.index), label, _shape_text(info.out_shape), f"{count:,}" if count else "")
            )
        widths = [max(len(row[k]) for row in rows) for k in range(4)]
        lines = [
            f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}"
            for r in rows
        ]
        lines.append(f"total parameters: {self.num_parameters():,} ({np.dtype(self.dtype).name})")
        return "\n".join(line.rstrip() for line in lines)

    # -- computation --------------------------------------------------------------------------

    def _check_x(self, X: Any) -> np.ndarray:
        if not isinstance(X, np.ndarray):
            raise TypeError(f"X must be a numpy.ndarray, got {type(X).__name__}")
        if X.ndim != 4 or X.shape[1:] != self.input_shape:
            raise ValueError(
                f"X must have shape (N, {', '.join(map(str, self.input_shape))}) for this "
                f"network, got {X.shape}"
            )
        if X.shape[0] == 0:
            raise ValueError("X must hold at least one sample, got N = 0")
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise TypeError(f"X must have a real numeric dtype, got {X.dtype}")
        return np.ascontiguousarray(X, dtype=self.dtype)

    @with_reused_buffers
    def loss(self, X: np.ndarray, y: np.ndarray | None = None) -> Any:
        """Class scores (test mode) or the loss and its gradients (train mode).

        Parameters
        ----------
        X : ndarray, shape (N, C, H, W)
            Input batch (converted to the model's dtype).
        y : ndarray of int, shape (N,), optional
            Labels in ``[0, num_classes)``. Given: train mode (batchnorm uses and updates batch
            statistics, dropout drops). Absent: test mode.

        Returns
        -------
        scores : ndarray, shape (N, num_classes)
            When ``y`` is None.
        loss : float, grads : dict of ndarray
            When ``y`` is given: softmax cross-entropy plus ``0.5 * reg * sum(W**2)``, and
            the gradient of that loss for every entry of :attr:`params` (same shapes).
        """
        X = self._check_x(X)
        train = y is not None
        if train:
            y = L._check_labels(y, X.shape[0], self.num_classes)
        out = X
        caches = []
        order = _run_order(self.info)
        for info in order:
            out, cache = self._forward(info, out, train)
            caches.append(cache)
        if not train:
            return out
        data_loss, dout = L.softmax_loss(out, y)
        weights = [
            self.params[info.param_names[0]]
            for info in self.info
            if info.spec["type"] in ("conv", "affine")
        ]
        reg_loss = 0.5 * self.reg * sum(float(np.vdot(w, w)) for w in weights) if self.reg else 0.0
        grads: dict[str, np.ndarray] = {}
        for info, cache in zip(reversed(order), reversed(caches), strict=True):
            dout, layer_grads = self._backward(info, dout, cache)
            grads.update(layer_grads)
            if dout is None:  # a first conv or affine layer: nothing below it has parameters
                break
        if self.reg:
            for info in self.info:
                if info.spec["type"] in ("conv", "affine"):
                    name = info.param_names[0]
                    grads[name] = grads[name] + self.dtype.type(self.reg) * self.params[name]
        return float(data_loss) + reg_loss, grads

    def _forward(self, info: LayerInfo, x: np.ndarray, train: bool) -> tuple[np.ndarray, Any]:
        spec, kind, p = info.spec, info.spec["type"], self.params
        names = info.param_names
        if kind == "conv":
            conv_param = {"stride": spec["stride"], "pad": spec["pad"]}
            return L.conv_forward(x, p[names[0]], p[names[1]], conv_param)
        if kind == "affine":
            return L.affine_forward(x, p[names[0]], p[names[1]])
        if kind == "relu":
            return L.relu_forward(x)
        if kind in ("max_pool", "avg_pool"):
            (ph, pw), stride = spec["size"], spec["stride"]
            pool_param = {"pool_height": ph, "pool_width": pw, "stride": stride}
            fn = L.max_pool_forward if kind == "max_pool" else L.avg_pool_forward
            return fn(x, pool_param)
        if kind == "dropout":
            if not train:
                return x, None
            seed = int(self.rng.integers(2**63))
            return L.dropout_forward(x, {"p": spec["keep"], "mode": "train", "seed": seed})
        if kind in ("spatial_batchnorm", "batchnorm"):
            bn = self.bn_params[info.bn_index]
            bn["mode"] = "train" if train else "test"
            bn_param = {
                k: bn[k] for k in ("mode", "eps", "momentum", "running_mean", "running_var")
            }
            fn = L.spatial_batchnorm_forward if kind == "spatial_batchnorm" else L.batchnorm_forward
            out, cache = fn(x, p[names[0]], p[names[1]], bn_param)
            bn["running_mean"], bn["running_var"] = (
                bn_param["running_mean"],
                bn_param["running_var"],
            )
            return out, cache
        if kind == "layernorm":
            return L.layernorm_forward(x, p[names[0]], p[names[1]], {"eps": spec["eps"]})
        if kind == "spatial_groupnorm":
            return L.spatial_groupnorm_forward(
                x, p[names[0]], p[names[1]], spec["groups"], {"eps": spec["eps"]}
            )
        raise AssertionError(f"unhandled layer type {kind}")  # _normalise_spec rejects others

    def _backward(
        self, info: LayerInfo, dout: np.ndarray, cache: Any
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        kind, names = info.spec["type"], info.param_names
        if kind in ("conv", "affine"):
            fn = L.conv_backward if kind == "conv" else L.affine_backward
            # Nothing needs the gradient of the network's input: the first layer skips it.
            dx, dw, db = fn(dout, cache, need_dx=info.index > 0)
            return dx, {names[0]: dw, names[1]: db}
        if kind == "relu":
            return L.relu_backward(dout, cache), {}
        if kind == "max_pool":
            return L.max_pool_backward(dout, cache), {}
        if kind == "avg_pool":
            return L.avg_pool_backward(dout, cache), {}
        if kind == "dropout":
            return L.dropout_backward(dout, cache), {}
        backward = {
            "spatial_batchnorm": L.spatial_batchnorm_backward,
            "batchnorm": L.batchnorm_backward,
            "layernorm": L.layernorm_backward,
            "spatial_groupnorm": L.spatial_groupnorm_backward,
        }[kind]
        dx, dgamma, dbeta = backward(dout, cache)
        return dx, {names[0]: dgamma, names[1]: dbeta}

    def scores(self, X: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Test-mode class scores of ``X`` (N, C, H, W), computed ``batch_size`` at a time.

        Returns
        -------
        ndarray, shape (N, num_classes)
        """
        batch_size = _check_int(batch_size, "batch_size", 1)
        X = self._check_x(X)
        parts = [self.loss(X[i : i + batch_size]) for i in range(0, X.shape[0], batch_size)]
        return np.concatenate(parts, axis=0)

    def predict(self, X: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Predicted class index of every row of ``X``: ndarray of int64, shape (N,)."""
        return np.argmax(self.scores(X, batch_size), axis=1).astype(np.int64)

    def preprocess(self, x01: np.ndarray) -> np.ndarray:
        """Normalise [0, 1] pixels as training did: ``(x - mean[c]) / std[c]`` per channel.

        Parameters
        ----------
        x01 : ndarray, shape (N, C, H, W) or (C, H, W)

        Returns
        -------
        ndarray of the model's dtype, same shape.
        """
        x = np.asarray(x01, dtype=np.float64)
        if x.ndim not in (3, 4) or x.shape[-3] != self.input_shape[0]:
            raise ValueError(
                f"x01 must be (N, {self.input_shape[0]}, H, W) or ({self.input_shape[0]}, H, W), "
                f"got shape {x.shape}"
            )
        if self.normalization is not None:
            mean = np.asarray(self.normalization["mean"])[:, None, None]
            std = np.asarray(self.normalization["std"])[:, None, None]
            x = (x - mean) / std
        return x.astype(self.dtype)

    def __repr__(self) -> str:
        return (
            f"ConvNet({len(self.layers)} layers, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, dtype={np.dtype(self.dtype).name}, "
            f"params={self.num_parameters():,})"
        )


def _run_order(info: Sequence[Any]) -> list[Any]:
    """The layers in the order :meth:`ConvNet.loss` runs them: ``relu`` then ``max_pool``
    become ``max_pool`` then ``relu``. ``info`` holds layers with a ``spec`` dict (LayerInfo,
    or a converted network's layers, which run in the same order).

    ReLU is non-decreasing, so the max of a window of ReLU outputs is the ReLU of its max, and
    the gradients are the same too: a window whose max is positive sends its gradient to the
    same first maximum either way, and one whose max is at most 0 sends none. On the pooled
    map the ReLU and its backward pass touch a quarter of the values (2x2 windows): about
    1.5 ms less in a ThreeLayerConvNet training step of about 20 ms.
    """
    order = list(info)
    for i in range(len(order) - 1):
        if order[i].spec["type"] == "relu" and order[i + 1].spec["type"] == "max_pool":
            order[i], order[i + 1] = order[i + 1], order[i]
    return order


class ThreeLayerConvNet(ConvNet):
    """CS231n's three-layer network: conv - relu - 2x2 max pool - affine - relu - affine.

    The convolution keeps the spatial size (stride 1, padding ``(filter_size - 1) // 2``),
    so H and W must be even for the pool. Parameters ``W1, b1`` (conv), ``W2, b2`` (hidden)
    and ``W3, b3`` (classifier). ``weight_scale`` defaults to CS231n's 1e-3; pass None for
    He initialisation.
    """

    def __init__(
        self,
        input_dim: Sequence[int] = (3, 32, 32),
        num_filters: int = 32,
        filter_size: int = 7,
        hidden_dim: int = 100,
        num_classes: int = 10,
        weight_scale: float | None = 1e-3,
        reg: float = 0.0,
        dtype: Any = np.float32,
        **kwargs: Any,
    ) -> None:
        layers = self.stack(num_filters, filter_size, hidden_dim)
        super().__init__(
            layers,
            input_dim,
            num_classes,
            weight_scale=weight_scale,
            reg=reg,
            dtype=dtype,
            **kwargs,
        )

    @staticmethod
    def stack(num_filters: int, filter_size: int, hidden_dim: int) -> list[dict]:
        """The layer specs of the stack, without the classifier."""
        size = _check_int(filter_size, "filter_size", 1)
        if size % 2 == 0:
            raise ValueError(f"filter_size must be odd to keep the image size, got {size}")
        return [
            {
                "type": "conv",
                "filters": num_filters,
                "size": size,
                "stride": 1,
                "pad": (size - 1) // 2,
            },
            {"type": "relu"},
            {"type": "max_pool", "size": 2, "stride": 2},
            {"type": "affine", "units": hidden_dim},
            {"type": "relu"},
        ]


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    if isinstance(input_shape, str) or not isinstance(input_shape, Sequence):
        raise TypeError(f"input_shape must be (C, H, W), got {input_shape!r}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    C, H, W = (
        _check_int(v, f"input_shape {n}", 1) for v, n in zip(input_shape, "CHW", strict=True)
    )
    return C, H, W


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if resolved not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {resolved}")
    return resolved


def _check_class_names(class_names: Any, num_classes: int) -> tuple[str, ...]:
    if class_names is None:
        return tuple(str(k) for k in range(num_classes))
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names must be a list of str, got {type(class_names).__name__}")
    names = tuple(class_names)
    if len(names) != num_classes or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"class_names must be {num_classes} non-empty strings (one per class), got {names!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct, got {names!r}")
    return names


def _check_normalization(normalization: Any, channels: int) -> dict | None:
    if normalization is None:
        return None
    if not isinstance(normalization, Mapping) or set(normalization) != {"mean", "std"}:
        raise ValueError(
            f"normalization must be a dict with keys 'mean' and 'std', got {normalization!r}"
        )
    out = {}
    for key in ("mean", "std"):
        values = np.asarray(normalization[key], dtype=np.float64).reshape(-1)
        if values.shape != (channels,) or not np.all(np.isfinite(values)):
            raise ValueError(
                f"normalization[{key!r}] must be {channels} finite numbers (one per input "
                f"channel), got {normalization[key]!r}"
            )
        if key == "std" and np.any(values <= 0):
            raise ValueError(f"normalization['std'] must be > 0, got {normalization[key]!r}")
        out[key] = [float(v) for v in values]
    return out


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------


class ModelFile(NamedTuple):
    """Everything :func:`read_model_file` found in a model file."""

    model: ConvNet
    training: dict  # the training record ({} when there is none)
    state_tensors: dict[str, np.ndarray]  # extra tensors (the "state/" prefix removed)
    state: dict | None  # extra JSON state (a solver checkpoint's), or None


def save_model(
    model: ConvNet,
    path: str | os.PathLike,
    *,
    training: Mapping | None = None,
    state_tensors: Mapping[str, np.ndarray] | None = None,
    state: Mapping | None = None,
) -> Path:
    """Write ``model`` to a safetensors model file, atomically.

    Parameters
    ----------
    model : ConvNet
    path : str or PathLike
        Destination; its directory must exist. An existing file is replaced only once the
        new one is complete.
    training : dict, optional
        The training record (data set, epochs, accuracies, ...). The cnnserve version and
        the date are added.
    state_tensors : dict of ndarray, optional
        Extra tensors (a solver checkpoint's optimizer state), stored as ``state/<name>``.
    state : dict, optional
        Extra JSON-serialisable state, stored in the metadata.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    if not isinstance(model, ConvNet):
        raise TypeError(f"model must be a ConvNet, got {type(model).__name__}")
    tensors = {}
    for name, value in model.state_tensors().items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"refusing to save {path}: tensor {name!r} has NaN or inf values")
        tensors[name] = np.ascontiguousarray(value)
    for name, value in (state_tensors or {}).items():
        tensors[STATE_PREFIX + name] = np.ascontiguousarray(value)
    record = dict(training or {})
    record.setdefault("cnnserve_version", __version__)
    record.setdefault("date", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    meta = {
        "architecture": model.config(),
        "class_names": list(model.class_names),
        "normalization": model.normalization,
        "dtype": np.dtype(model.dtype).name,
        "training": record,
    }
    return write_model_file(path, FORMAT_NAME, tensors, meta, state)


def write_model_file(
    path: str | os.PathLike,
    format_name: str,
    tensors: Mapping[str, np.ndarray],
    meta: Mapping,
    state: Mapping | None = None,
) -> Path:
    """Write tensors and cnnserve metadata as a safetensors file, atomically.

    The metadata holds ``format`` (``format_name``), ``format_version``, ``cnnserve`` (``meta``
    as JSON) and, when given, ``state`` (JSON).

    Raises
    ------
    ModelFileError
        The file's directory does not exist.
    """
    from safetensors.numpy import save as _save_bytes

    path = Path(path)
    if not path.parent.is_dir():
        raise ModelFileError(
            f"cannot write model file {path}: directory {path.parent} does not exist"
        )
    metadata = {
        "format": format_name,
        "format_version": str(FORMAT_VERSION),
        "cnnserve": json.dumps(meta, allow_nan=False),
    }
    if state is not None:
        metadata["state"] = json.dumps(state, allow_nan=False)
    contiguous = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    atomic_write_bytes(path, _save_bytes(contiguous, metadata=metadata))
    return path


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """A safetensors file's handle; a missing or unreadable file is a :class:`ModelFileError`."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ModelFileError(f"model file {path} {what}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            yield handle
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"model file {path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, reading only its header (no tensor).

    Raises
    ------
    ModelFileError
        As :func:`read_safetensors`.
    """
    with _open_safetensors(Path(path)) as handle:
        return dict(handle.metadata() or {})


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and tensors of a safetensors file (never unpickles).

    Raises
    ------
    ModelFileError
        The file is missing, a directory, or not a readable safetensors file.
    """
    with _open_safetensors(Path(path)) as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: np.array(handle.get_tensor(name)) for name in handle.keys()}
    return metadata, tensors


def check_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    dtype: np.dtype,
) -> None:
    """Every expected tensor is present with its shape and dtype, finite; no other is there.

    Names starting with ``"state/"`` are extra state and are not checked.

    Raises
    ------
    ModelFileError
        Naming the file and the tensor at fault.
    """
    extra = sorted(n for n in tensors if n not in expected and not n.startswith(STATE_PREFIX))
    if extra:
        raise ModelFileError(
            f"{path} holds tensor(s) {', '.join(map(repr, extra))} that its architecture "
            "does not have"
        )
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelFileError(f"{path} is missing tensor {name!r} of shape {shape}")
        value = tensors[name]
        if value.shape != shape:
            raise ModelFileError(
                f"{path}: tensor {name!r} has shape {value.shape}, but the architecture needs "
                f"{shape}"
            )
        if value.dtype != dtype:
            raise ModelFileError(
                f"{path}: tensor {name!r} has dtype {value.dtype}, but the model is {dtype}"
            )
        if not np.all(np.isfinite(value)):
            raise ModelFileError(f"{path}: tensor {name!r} has NaN or inf values")
        if name.startswith("running_var") and np.any(value < 0):
            raise ModelFileError(f"{path}: tensor {name!r} has negative values")


def check_format(path: str | os.PathLike, metadata: Mapping[str, str], format_name: str) -> None:
    """The metadata says this is a cnnserve file of ``format_name`` in the version we read.

    Raises
    ------
    ModelFileError
        Another format (a converted model where a trained one is expected, or the reverse,
        or not a cnnserve file at all) or another format version.
    """
    found = metadata.get("format")
    if found != format_name or "cnnserve" not in metadata:
        if found == FCN_FORMAT_NAME:
            raise ModelFileError(
                f"{path} is a converted (fully convolutional) model file; read it with "
                "cnnserve.convert.load_fully_convolutional or `cnnserve scoremap`"
            )
        if found == FORMAT_NAME and "cnnserve" in metadata:
            raise ModelFileError(
                f"{path} is a trained model file, not a converted one; convert it with "
                "cnnserve.convert.to_fully_convolutional or `cnnserve convert`"
            )
        raise ModelFileError(
            f"{path} is a safetensors file but not a cnnserve model (no {format_name!r} metadata)"
        )
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{path} has model format version {metadata.get('format_version')!r}; this cnnserve "
            f"({__version__}) reads version {FORMAT_VERSION}"
        )


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """Read a model file written by :func:`save_model`, checking it against its architecture.

    Raises
    ------
    ModelFileError
        The file is missing, is not a safetensors file (truncated or corrupt), is not a
        cnnserve model, or holds a tensor that is missing, unexpected, of the wrong shape or
        dtype, or not finite. The message names the file and the tensor.
    """
    path = Path(path)
    metadata, tensors = read_safetensors(path)
    check_format(path, metadata, FORMAT_NAME)
    try:
        meta = json.loads(metadata["cnnserve"])
        state = json.loads(metadata["state"]) if "state" in metadata else None
        config = meta["architecture"]
        expected = tensor_shapes(config)  # checks the architecture; allocates nothing
        dtype = _check_dtype(config.get("dtype", "float32"))
        training = dict(meta.get("training") or {})
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelFileError(f"{path} has invalid metadata: {exc}") from exc

    # Every tensor is checked before the network is built, so that the network's own arrays
    # are never larger than what the file holds.
    check_tensors(path, tensors, expected, dtype)
    try:
        model = ConvNet.from_config(
            config, class_names=meta.get("class_names"), normalization=meta.get("normalization")
        )
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path} has invalid metadata: {exc}") from exc
    for name in model.params:
        model.params[name] = tensors[name]
    for bn in model.bn_params:
        bn["running_mean"] = tensors[f"running_mean{bn['name']}"]
        bn["running_var"] = tensors[f"running_var{bn['name']}"]
    extras = {
        name[len(STATE_PREFIX) :]: value
        for name, value in tensors.items()
        if name.startswith(STATE_PREFIX)
    }
    return ModelFile(model, training, extras, state)


def load_model(path: str | os.PathLike) -> ConvNet:
    """Load the network stored in a model file (see :func:`read_model_file` for the errors)."""
    return read_model_file(path).model
