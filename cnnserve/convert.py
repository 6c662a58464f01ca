"""FC -> conv conversion: a trained classifier as a fully convolutional network.

A :class:`~cnnserve.model.ConvNet` trained on ``T x T`` images ends in affine (fully connected)
layers, which only take inputs of that size. Their neurons compute dot products just as conv
filters do, so (the source notes' "Converting FC layers to CONV layers", Caffe's net surgery,
OverFeat):

- the first affine layer, reading a ``(C, Hf, Wf)`` volume, becomes a valid convolution with
  ``Hf x Wf`` filters: its weight matrix ``(C*Hf*Wf, U)`` reshaped to ``(U, C, Hf, Wf)``, which
  is exactly the NCHW order in which the affine layer flattened its input;
- every later affine layer, reading a vector of D values, becomes a ``1 x 1`` convolution with
  weights ``(U, D, 1, 1)``;
- layers after an affine layer act per cell: batchnorm (test mode) becomes a per-channel
  spatial batchnorm, layernorm normalises each cell over its channels, relu stays, and dropout
  (an identity at inference) is dropped;
- a batchnorm right after a convolution is folded into its weights at inference;
- group norm takes its statistics over the whole feature map, which on a larger image are
  not a window's: from the first group norm on, the converted network runs window by window
  on each window's patch of the feature map before it (the layers before it still run once
  over the whole image), so that every cell still equals the network on its crop.

On an input of training size the converted network gives the original's scores;
:func:`to_fully_convolutional` checks that, and records the check. On a larger image it gives
one cell of scores per training-size window, at the network's total stride; see
:class:`Geometry` and :mod:`cnnserve.dense`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from cnnserve._checks import check_dtype, check_int
from cnnserve.engine import PlanCache
from cnnserve.geometry import Geometry
from cnnserve.images import preprocess
from cnnserve.modelfile import (
    FORMAT_NAME,
    ModelFileError,
    check_tensors,
    read_converted_file,
    read_metadata,
    read_model_file,
    write_converted_file,
)
from cnnserve.network import ConvNet, layer_forward
from cnnserve.specs import (
    check_class_names,
    check_config,
    check_input_shape,
    check_layers,
    check_normalization,
    describe_spec,
    normalise_spec,
    out_shape,
    plan_layers,
    run_order,
    shape_text,
)

__all__ = [
    "CHECK_TOLERANCE",
    "ConversionError",
    "FcnLayer",
    "FullyConvNet",
    "Geometry",
    "as_fully_convolutional",
    "convert_plan",
    "load_fully_convolutional",
    "per_window_start",
    "save_fully_convolutional",
    "to_fully_convolutional",
]

# Largest |converted - original| / score scale the self-check accepts, per dtype.
CHECK_TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


class ConversionError(ValueError):
    """A network cannot be converted, or its converted scores differ from the original's."""


# ---------------------------------------------------------------------------------------------
# The converted network
# ---------------------------------------------------------------------------------------------


class FcnLayer(NamedTuple):
    """One layer of a converted network."""

    kind: str  # conv, max_pool, avg_pool, relu, spatial_batchnorm, spatial_groupnorm,
    # channel_layernorm
    spec: dict  # a spatial layer spec (conv: filters, size, stride, pad)
    source: int  # index of the original layer
    converted_from: str  # "" or the original layer ("affine 128")
    param_names: tuple[str, ...]
    eps: float  # normalisation layers (0 otherwise)


def convert_plan(config: Mapping) -> tuple[list[FcnLayer], dict[str, tuple[int, ...]], Geometry]:
    """The converted layers, their tensors' shapes and the geometry, from an architecture.

    Allocates nothing, so that a converted model file can be checked before it is loaded.
    """
    check_config(config)
    body = [
        normalise_spec(spec, f"layer {i}") for i, spec in enumerate(check_layers(config["layers"]))
    ]
    head = {"type": "affine", "units": check_int(config["num_classes"], "num_classes", 2)}
    input_shape = check_input_shape(config["input_shape"])
    fcn: list[FcnLayer] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for info, _, owned in plan_layers([*body, head], input_shape):
        kind, spec, names = info.spec["type"], info.spec, info.param_names
        eps = float(spec.get("eps", 0.0))
        if kind in ("conv", "max_pool", "avg_pool", "relu", "spatial_batchnorm"):
            fcn.append(FcnLayer(kind, dict(spec), info.index, "", names, eps))
            shapes.update(owned)
        elif kind == "spatial_groupnorm":
            fcn.append(FcnLayer(kind, dict(spec), info.index, "", names, eps))
            shapes.update(owned)
        elif kind == "affine":
            w_name, b_name = names
            units = spec["units"]
            if len(info.in_shape) == 3:  # reads a (C, Hf, Wf) volume: an Hf x Wf filter
                C, hf, wf = info.in_shape
            else:  # reads a vector of D values: a 1x1 filter on D channels
                C, hf, wf = info.in_shape[0], 1, 1
            conv = {"type": "conv", "filters": units, "size": [hf, wf], "stride": 1, "pad": 0}
            fcn.append(FcnLayer("conv", conv, info.index, describe_spec(spec), names, 0.0))
            shapes[w_name] = (units, C, hf, wf)
            shapes[b_name] = (units,)
        elif kind == "batchnorm":  # test mode: a per-feature affine map, per channel per cell
            bn = {"type": "spatial_batchnorm", "eps": eps}
            fcn.append(FcnLayer("spatial_batchnorm", bn, info.index, "batchnorm", names, eps))
            shapes.update(owned)
        elif kind == "layernorm":  # each cell normalised over its channels
            ln = {"type": "channel_layernorm", "eps": eps}
            fcn.append(FcnLayer("channel_layernorm", ln, info.index, "layernorm", names, eps))
            shapes.update(owned)
        elif kind == "dropout":  # the identity at inference
            continue
        else:
            raise ConversionError(
                f"layer {info.index} ({describe_spec(spec)}) has no fully convolutional equivalent"
            )
    return fcn, shapes, _geometry(fcn, input_shape)


def per_window_start(layers: Sequence[FcnLayer]) -> int | None:
    """Index of the first layer whose output depends on where a window starts, or None.

    Group norm takes its statistics over the whole feature map: on a larger image those of
    the image are not those of a window. From the first group norm on, a converted network
    runs window by window, on each window's patch of the feature map before it.
    """
    return next((k for k, layer in enumerate(layers) if layer.kind == "spatial_groupnorm"), None)


def _trunk_shape(
    layers: Sequence[FcnLayer], input_shape: tuple[int, ...], stop: int | None
) -> tuple[int, ...]:
    """The shape of a training-size input after ``layers[:stop]``."""
    shape = input_shape
    for k, layer in enumerate(layers[:stop]):
        shape = out_shape(layer.spec, shape, f"layer {k}")
    return shape


def _geometry(fcn: Sequence[FcnLayer], input_shape: tuple[int, int, int]) -> Geometry:
    """Stride, receptive field and padding offset, by the usual recursion over the layers.

    The layers that run window by window (:func:`per_window_start`) see only their window's
    patch: they widen the receptive field by that patch and add no padding offset.
    """
    split = per_window_start(fcn)
    jump = 1  # input pixels between neighbouring outputs of the current layer
    field = [1, 1]
    offset = [0, 0]
    for layer in fcn[:split]:
        if layer.kind not in ("conv", "max_pool", "avg_pool"):
            continue
        size, stride = layer.spec["size"], layer.spec["stride"]
        pad = layer.spec.get("pad", 0)
        for axis in (0, 1):
            field[axis] += (size[axis] - 1) * jump
            offset[axis] += pad * jump
        jump *= stride
    stride = jump
    if split is not None:
        patch = _trunk_shape(fcn, input_shape, split)[1:]
        for axis in (0, 1):
            field[axis] += (patch[axis] - 1) * jump
        for layer in fcn[split:]:
            if layer.kind in ("conv", "max_pool", "avg_pool"):
                stride *= layer.spec["stride"]
    return Geometry(
        stride=stride,
        window=(input_shape[1], input_shape[2]),
        receptive_field=(field[0], field[1]),
        offset=(offset[0], offset[1]),
        exact=offset == [0, 0],
    )


class FullyConvNet:
    """A classifier with its affine layers turned into convolutions (inference only).

    Build one with :func:`to_fully_convolutional` or :func:`load_fully_convolutional`.

    Attributes
    ----------
    layers : list of FcnLayer
        The converted layers.
    params : mapping of str to ndarray
        Weights with the original names (``W<k>``, ``b<k>``, ``gamma<k>``, ...; batchnorm
        statistics as ``running_mean<k>``, ``running_var<k>``); converted affine weights have
        conv shapes ``(U, C, Hf, Wf)``. Copies, and read-only (the mapping and the arrays): a
        batchnorm after a conv is folded into that conv's weights once, when the network is
        built, so the weights are fixed for the network's life.
    geometry : Geometry
    input_shape : tuple of int
        ``(C, Th, Tw)``, the training input shape.
    num_classes, class_names, normalization, dtype
        As the original network's.
    config : dict
        The original network's architecture (:meth:`ConvNet.config`).
    check : dict
        The self-check of the conversion: ``inputs``, ``max_abs_diff``, ``score_scale``,
        ``tolerance``, ``passed``.
    training : dict
        The original model's training record.
    per_window_from : int or None
        Index of the first layer that runs window by window (a group norm), or None.
    patch_shape : tuple of int
        ``(C, hp, wp)``: the feature map before :attr:`per_window_from` on a training-size
        input (each window's patch); the output shape of the whole network when it runs in
        one pass.

    Shape
    -----
    :meth:`forward` maps ``(N, C, H, W)`` with ``H >= Th``, ``W >= Tw`` to
    ``(N, num_classes, (H - Th) // S + 1, (W - Tw) // S + 1)``.
    """

    def __init__(
        self,
        config: Mapping,
        tensors: Mapping[str, np.ndarray],
        *,
        class_names: Sequence[str],
        normalization: Mapping | None,
        check: Mapping | None = None,
        training: Mapping | None = None,
    ) -> None:
        self.layers, shapes, self.geometry = convert_plan(config)
        self.config = json.loads(json.dumps(dict(config)))  # a deep, JSON-clean copy
        self.dtype = check_dtype(config.get("dtype", "float32"))
        self.input_shape = check_input_shape(config["input_shape"])
        self.num_classes = int(config["num_classes"])
        self.class_names = check_class_names(class_names, self.num_classes)
        self.normalization = check_normalization(normalization, self.input_shape[0])
        check_tensors("the converted network", tensors, shapes, self.dtype)
        params = {name: np.array(tensors[name], order="C") for name in shapes}
        for value in params.values():
            value.flags.writeable = False  # the folded weights below are computed from them
        self.params = MappingProxyType(params)
        self.check = dict(check or {})
        self.training = dict(training or {})
        self._folded = self._fold_batchnorm()
        self.per_window_from = per_window_start(self.layers)
        # A relu before a max pool runs after it: the same values on a quarter of the cells
        # (see cnnserve.specs.run_order). Never across the per-window split: neither layer
        # is a group norm.
        position = {id(layer): k for k, layer in enumerate(self.layers)}
        self._order = [position[id(layer)] for layer in run_order(self.layers)]
        self.patch_shape = _trunk_shape(self.layers, self.input_shape, self.per_window_from)
        self._plans = PlanCache(self)

    def _fold_batchnorm(self) -> dict[int, tuple[np.ndarray, np.ndarray] | None]:
        """Test-mode batchnorm right after a conv, folded into that conv's weights and bias.

        ``bn(conv(x)) = conv(x) * s + (beta - mean * s)`` per channel, with
        ``s = gamma / sqrt(var + eps)``: the conv with weights ``W * s`` and bias
        ``(b - mean) * s + beta`` (computed in float64), and one pass over the largest
        activations fewer. Returns, by layer index, the folded ``(W, b)`` of a conv and None
        for a batchnorm that was folded away.
        """
        folded: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}
        for k in range(len(self.layers) - 1):
            conv, bn = self.layers[k], self.layers[k + 1]
            if conv.kind != "conv" or bn.kind != "spatial_batchnorm":
                continue
            p = self.params
            n = bn.param_names[0][len("gamma") :]
            var = p[f"running_var{n}"].astype(np.float64)
            scale = p[bn.param_names[0]] / np.sqrt(var + bn.eps)
            w = p[conv.param_names[0]] * scale[:, None, None, None]
            b = (p[conv.param_names[1]] - p[f"running_mean{n}"]) * scale + p[bn.param_names[1]]
            folded[k] = (w.astype(self.dtype), b.astype(self.dtype))
            folded[k + 1] = None
        return folded

    # -- description --------------------------------------------------------------------------

    def summary(self) -> str:
        """A table of the converted layers and their output shapes on a training-size input."""
        rows = [("#", "layer", "from", "output shape")]
        shape: tuple[int, ...] = self.input_shape
        rows.append(("", "input", "", shape_text(shape)))
        for k, layer in enumerate(self.layers):
            shape = out_shape(layer.spec, shape, f"layer {k}")
            label = describe_spec(layer.spec) if layer.kind != "channel_layernorm" else layer.kind
            origin = f"layer {layer.source}" + (
                f" ({layer.converted_from})" if layer.converted_from else ""
            )
            rows.append((str(k), label, origin, shape_text(shape)))
        widths = [max(len(row[c]) for row in rows) for c in range(4)]
        lines = [
            "  ".join(f"{row[c]:<{widths[c]}}" if c else f"{row[c]:>{widths[c]}}" for c in range(4))
            for row in rows
        ]
        if self.per_window_from is not None:
            C, hp, wp = self.patch_shape
            lines.append(
                f"layers {self.per_window_from}.. run window by window, on each window's "
                f"({C}, {hp}, {wp}) patch of the feature map: group norm takes its statistics "
                "per window, as on a crop"
            )
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict:
        """JSON-ready description: geometry, check, layers, classes."""
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "dtype": self.dtype.name,
            "geometry": self.geometry.to_dict(),
            "per_window_from": self.per_window_from,
            "check": dict(self.check),
            "layers": [
                {
                    "layer": describe_spec(layer.spec)
                    if layer.kind != "channel_layernorm"
                    else layer.kind,
                    "from_layer": layer.source,
                    "converted_from": layer.converted_from or None,
                }
                for layer in self.layers
            ],
        }

    def __repr__(self) -> str:
        g = self.geometry
        return (
            f"FullyConvNet({len(self.layers)} layers, window={g.window[0]}x{g.window[1]}, "
            f"stride={g.stride}, num_classes={self.num_classes}, dtype={self.dtype.name})"
        )

    # -- computation --------------------------------------------------------------------------

    def preprocess(self, x01: np.ndarray) -> np.ndarray:
        """Normalise [0, 1] pixels as training did (the normalisation in the model file).

        Parameters
        ----------
        x01 : ndarray, shape (N, C, H, W) or (C, H, W), float in [0, 1]

        Returns
        -------
        ndarray of the model's dtype, same shape.

        Raises
        ------
        TypeError, ValueError
            Not float pixels in [0, 1] (the rule of :func:`cnnserve.images.preprocess`), or
            not the model's channels.
        """
        return preprocess(x01, self.normalization, self.dtype, channels=self.input_shape[0])

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Class scores of every window of ``x`` (already preprocessed), in one pass.

        Rows and columns at the bottom and right that no window covers (the margins of
        :meth:`Geometry.margins`) are left out before the pass.

        Parameters
        ----------
        x : ndarray, shape (N, C, H, W)
            In the model's dtype (other float dtypes are converted).

        Returns
        -------
        ndarray, shape (N, num_classes, H', W')
            ``H' = (H - Th) // S + 1``, ``W' = (W - Tw) // S + 1``.

        Raises
        ------
        TypeError, ValueError
            ``x`` is not a real 4-D array with the model's channels, or is smaller than the
            window.
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
        C = self.input_shape[0]
        if x.ndim != 4 or x.shape[1] != C:
            raise ValueError(f"x must have shape (N, {C}, H, W), got {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("x must hold at least one image, got N = 0")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"x must be a float array (preprocessed pixels), got {x.dtype}")
        hc, wc = self.geometry.covered(x.shape[2], x.shape[3])
        out = np.ascontiguousarray(x[:, :, :hc, :wc], dtype=self.dtype)
        owned = out is not x and not np.may_share_memory(out, x)
        split = self.per_window_from
        if split is None:  # one compiled pass (cnnserve.engine), a plan per input size
            return self._plans(out)
        return self._per_window(self._run(0, split, out, owned))

    def _run(self, start: int, stop: int | None, x: np.ndarray, owned: bool) -> np.ndarray:
        """``layers[start:stop]`` on x; ``owned``: x may be overwritten."""
        out = x
        stop = len(self.layers) if stop is None else stop
        for k in self._order[start:stop]:
            layer = self.layers[k]
            if k in self._folded:
                if self._folded[k] is None:  # a batchnorm folded into the conv before it
                    continue
                out = layer_forward(layer.spec, out, self._folded[k])[0]
            elif layer.kind == "relu" and owned:
                np.maximum(out, 0, out=out)  # in place: tiles of large images stay small
            else:
                weights, options = self._weights(layer)
                out = layer_forward(layer.spec, out, weights, **options)[0]
            owned = True
        return out

    #: Values of the window patches gathered at a time for the per-window layers.
    PATCH_VALUES = 2**21

    def _per_window(self, trunk: np.ndarray) -> np.ndarray:
        """The layers from :attr:`per_window_from` on, run on every window's patch.

        ``trunk`` (N, C, Hf, Wf) is the feature map before them; window (i, j) is its
        ``(hp, wp)`` patch at ``(i, j) * step``, where ``(C, hp, wp)`` is that feature map on
        a training-size input and ``step`` the stride of the layers after it.
        """
        C, hp, wp = self.patch_shape
        step = self.geometry.stride
        for layer in self.layers[: self.per_window_from]:
            if layer.kind in ("conv", "max_pool", "avg_pool"):
                step //= layer.spec["stride"]
        N, _, Hf, Wf = trunk.shape
        rows, cols = (Hf - hp) // step + 1, (Wf - wp) // step + 1
        windows = np.lib.stride_tricks.sliding_window_view(trunk, (hp, wp), axis=(2, 3))
        windows = windows[:, :, ::step, ::step]  # (N, C, rows, cols, hp, wp), a view
        out = np.empty((N, self.num_classes, rows, cols), dtype=self.dtype)
        block = max(1, self.PATCH_VALUES // (C * hp * wp * cols))  # rows of windows at a time
        for n in range(N):
            for r0 in range(0, rows, block):
                r1 = min(rows, r0 + block)
                patches = windows[n, :, r0:r1].transpose(1, 2, 0, 3, 4)  # (r, cols, C, hp, wp)
                patches = np.ascontiguousarray(patches).reshape(-1, C, hp, wp)
                scores = self._run(self.per_window_from, None, patches, True)  # (r*cols, K, 1, 1)
                out[n, :, r0:r1] = scores.reshape(r1 - r0, cols, -1).transpose(2, 0, 1)
        return out

    def _weights(self, layer: FcnLayer) -> tuple[tuple[np.ndarray, ...], dict[str, Any]]:
        """The arguments of :func:`~cnnserve.network.layer_forward` for ``layer``, test mode:
        its weights and, for a batchnorm, its ``bn_param``."""
        weights = tuple(self.params[name] for name in layer.param_names)
        if layer.kind != "spatial_batchnorm":
            return (weights, {})
        k = layer.param_names[0][len("gamma") :]
        bn_param = {
            "mode": "test",
            "eps": layer.eps,
            "running_mean": self.params[f"running_mean{k}"],
            "running_var": self.params[f"running_var{k}"],
        }
        return (weights, {"bn_param": bn_param})


# ---------------------------------------------------------------------------------------------
# Conversion and its check
# ---------------------------------------------------------------------------------------------


def _converted_tensors(model: ConvNet, fcn_shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """The model's tensors, with affine weights reshaped to their conv shapes."""
    tensors = {}
    for name, value in model.state_tensors().items():
        shape = fcn_shapes[name]
        if value.shape != shape:  # an affine weight (D, U) -> (U, C, Hf, Wf)
            value = value.T.reshape(shape)
        tensors[name] = np.array(value, dtype=model.dtype, order="C")  # a copy: the model
        # may go on training
    return tensors


def to_fully_convolutional(
    model: ConvNet,
    *,
    check_inputs: np.ndarray | None = None,
    check_size: int = 8,
    seed: int = 0,
) -> FullyConvNet:
    """Convert a trained network's affine layers into convolutions, and check the result.

    Parameters
    ----------
    model : ConvNet
        Any network :class:`~cnnserve.model.ConvNet` builds. Batchnorm runs in test mode
        (its running statistics), dropout is dropped (inference). The model is not modified;
        the converted network holds copies of its weights.
    check_inputs : ndarray, shape (N, C, Th, Tw), optional
        Preprocessed training-size inputs for the self-check. By default ``check_size``
        standard normal images (normalised pixels have mean 0 and standard deviation 1)
        drawn with ``seed``.
    check_size : int
        Number of random images for the self-check when ``check_inputs`` is not given.
    seed : int
        Seed of the random check images.

    Returns
    -------
    FullyConvNet
        Its :attr:`~FullyConvNet.check` records the self-check: the largest absolute
        difference between the converted and the original scores, the score scale (largest
        absolute original score) and the tolerance (``1e-5`` of the scale in float32,
        ``1e-10`` in float64).

    Raises
    ------
    TypeError
        ``model`` is not a ConvNet.
    ConversionError
        A layer has no fully convolutional equivalent, or the converted scores differ from
        the original's by more than the tolerance.

    Shape
    -----
    See :class:`Geometry`: on an ``H x W`` image the converted network gives
    ``(num_classes, (H - Th) // S + 1, (W - Tw) // S + 1)`` scores.
    """
    if not isinstance(model, ConvNet):
        raise TypeError(f"model must be a ConvNet, got {type(model).__name__}")
    config = model.config()
    _, shapes, _ = convert_plan(config)
    fcn = FullyConvNet(
        config,
        _converted_tensors(model, shapes),
        class_names=model.class_names,
        normalization=model.normalization,
    )
    if check_inputs is None:
        check_size = check_int(check_size, "check_size", 1, 4096)
        rng = np.random.default_rng(check_int(seed, "seed", 0))
        check_inputs = rng.standard_normal((check_size, *model.input_shape))
    X = model._check_x(check_inputs)
    if not np.all(np.isfinite(X)):
        raise ValueError("check_inputs must be finite (no NaN or inf)")
    fcn.check = _self_check(model, fcn, X)
    return fcn


def _self_check(model: ConvNet, fcn: FullyConvNet, X: np.ndarray) -> dict:
    """Compare the converted network with the original on training-size inputs X."""
    expected = model.scores(X)  # (N, K), test mode
    got = fcn.forward(X)  # (N, K, 1, 1)
    if got.shape != (*expected.shape, 1, 1):
        raise ConversionError(
            f"the converted network gives scores of shape {got.shape} on training-size inputs; "
            f"expected {(*expected.shape, 1, 1)}"
        )
    diff = float(np.max(np.abs(got[:, :, 0, 0].astype(np.float64) - expected)))
    scale = max(float(np.max(np.abs(expected))), np.finfo(model.dtype).tiny)
    tolerance = CHECK_TOLERANCE[model.dtype.name] * scale
    if not diff <= tolerance:  # NaN fails too
        raise ConversionError(
            f"the converted network's scores differ from the original's by {diff:.3g} on "
            f"{X.shape[0]} training-size inputs, above the tolerance {tolerance:.3g} "
            f"({CHECK_TOLERANCE[model.dtype.name]:g} of the score scale {scale:.3g})"
        )
    return {
        "inputs": int(X.shape[0]),
        "max_abs_diff": diff,
        "score_scale": scale,
        "tolerance": tolerance,
        "relative_tolerance": CHECK_TOLERANCE[model.dtype.name],
        "passed": True,
    }


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def save_fully_convolutional(fcn: FullyConvNet, path: str | os.PathLike) -> Path:
    """Write a converted network to a safetensors file, atomically.

    The file holds the converted weights (conv shapes) and, in its metadata, the original
    architecture, classes, normalisation, training record, geometry and self-check
    (:func:`cnnserve.modelfile.write_converted_file`). It is read back by
    :func:`load_fully_convolutional`.

    Returns
    -------
    pathlib.Path
    """
    if not isinstance(fcn, FullyConvNet):
        raise TypeError(f"fcn must be a FullyConvNet, got {type(fcn).__name__}")
    return write_converted_file(
        path,
        config=fcn.config,
        tensors=fcn.params,
        class_names=fcn.class_names,
        normalization=fcn.normalization,
        dtype=fcn.dtype,
        training=fcn.training,
        geometry=fcn.geometry.to_dict(),
        check=fcn.check,
    )


def load_fully_convolutional(path: str | os.PathLike, **limits: int) -> FullyConvNet:
    """A converted network from a file: a converted one, or a trained model converted now.

    Parameters
    ----------
    path : str or PathLike
        A file written by :func:`save_fully_convolutional` (``cnnserve convert``), or a
        trained model file (:func:`~cnnserve.modelfile.save_model`), which is converted and
        self-checked on loading.
    **limits : int
        ``max_pixels``, ``max_params``, ``max_layers``: what the file may declare, checked
        from its header before anything is read (:func:`~cnnserve.modelfile.check_model_size`).

    Raises
    ------
    ModelFileError
        A missing, corrupt or mismatched file (naming the file and the tensor).
    ConversionError
        A trained model whose conversion fails its self-check.
    """
    path = Path(path)
    if read_metadata(path).get("format") == FORMAT_NAME:  # the header only
        file = read_model_file(path, **limits)
        fcn = to_fully_convolutional(file.model)
        fcn.training = dict(file.training)
        return fcn
    stored = read_converted_file(path, lambda config: convert_plan(config)[1], **limits)
    try:
        fcn = FullyConvNet(
            stored.config,
            stored.tensors,
            class_names=stored.class_names,
            normalization=stored.normalization,
            check=stored.check,
            training=stored.training,
        )
    except (ValueError, TypeError) as exc:
        raise ModelFileError(f"{path} has invalid metadata: {exc}") from exc
    if stored.geometry is not None and stored.geometry != fcn.geometry.to_dict():
        raise ModelFileError(
            f"{path}: the stored geometry {stored.geometry} does not match the "
            f"architecture's {fcn.geometry.to_dict()}"
        )
    return fcn


def as_fully_convolutional(model: FullyConvNet | ConvNet | str | os.PathLike) -> FullyConvNet:
    """A converted network from what a user has: itself, a trained network, or a file.

    A :class:`~cnnserve.network.ConvNet` is converted (and self-checked) on every call:
    convert once with :func:`to_fully_convolutional` for repeated use.
    """
    if isinstance(model, FullyConvNet):
        return model
    if isinstance(model, ConvNet):
        return to_fully_convolutional(model)
    if isinstance(model, str | os.PathLike):
        return load_fully_convolutional(model)
    raise TypeError(
        f"model must be a FullyConvNet, a ConvNet or a model file path, got {type(model).__name__}"
    )
