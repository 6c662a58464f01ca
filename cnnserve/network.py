"""Networks: :class:`ConvNet` and the one per-layer dispatcher every network runs on.

:class:`ConvNet` builds a network from layer specs (:mod:`cnnserve.specs`), infers every
layer's shapes from the input shape, appends the classifier (an affine layer with
``num_classes`` units) and follows the CS231n model interface: ``model.params`` is a dict of
arrays and ``model.loss(X)`` returns class scores, while ``model.loss(X, y)`` runs in training
mode and returns ``(loss, grads)``.

:func:`layer_forward` and :func:`layer_backward` are where a spec's ``type`` picks its layer
function of :mod:`cnnserve.layers`: :class:`ConvNet` and the converted
:class:`~cnnserve.convert.FullyConvNet` both run through them. Model files are read and
written by :mod:`cnnserve.modelfile`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cnnserve import layers as L
from cnnserve._buffers import with_reused_buffers
from cnnserve._checks import check_dtype, check_labels
from cnnserve._checks import check_int as _check_int
from cnnserve._checks import check_number as _check_number
from cnnserve.engine import compile as compile_plan
from cnnserve.images import preprocess
from cnnserve.specs import (
    LayerInfo,
    check_class_names,
    check_config,
    check_input_shape,
    check_layers,
    check_normalization,
    describe_spec,
    normalise_spec,
    plan_layers,
    run_order,
    shape_text,
    three_layer_stack,
)

__all__ = ["ConvNet", "ThreeLayerConvNet", "layer_backward", "layer_forward"]

#: From this many images on, :meth:`ConvNet.scores` runs a compiled plan (cnnserve.engine).
PLAN_MIN_IMAGES = 16

# The keys of a batchnorm layer's bn_param (cnnserve.layers.batchnorm_forward).
_BN_KEYS = ("mode", "eps", "momentum", "running_mean", "running_var")


# ---------------------------------------------------------------------------------------------
# The per-layer dispatcher
# ---------------------------------------------------------------------------------------------


def layer_forward(
    spec: Mapping,
    x: np.ndarray,
    weights: Sequence[np.ndarray] = (),
    *,
    train: bool = False,
    bn_param: dict | None = None,
    seed: int | None = None,
) -> tuple[np.ndarray, Any]:
    """One layer's forward pass, picked by ``spec["type"]``.

    Parameters
    ----------
    spec : dict
        A normalised spec (:func:`cnnserve.specs.normalise_spec`), or a converted network's
        ``channel_layernorm`` (each position normalised over its channels).
    x : ndarray
        The layer's input: ``(N, C, H, W)`` for spatial layers, ``(N, D)`` for vector ones.
    weights : sequence of ndarray
        ``(W, b)`` of a conv or affine layer, ``(gamma, beta)`` of a normalisation layer.
    train : bool
        Train mode: dropout drops (with ``seed``); batchnorm's mode is ``bn_param["mode"]``.
    bn_param : dict, optional
        A batchnorm layer's ``bn_param``; its running statistics are written back in train
        mode, as :func:`cnnserve.layers.batchnorm_forward` does.
    seed : int, optional
        The dropout mask's seed (train mode).

    Returns
    -------
    out : ndarray
    cache : object
        For :func:`layer_backward` (None for dropout at test time, which passes ``x`` on).
    """
    kind = spec["type"]
    if kind == "conv":
        conv_param = {"stride": spec["stride"], "pad": spec["pad"]}
        return L.conv_forward(x, weights[0], weights[1], conv_param)
    if kind == "affine":
        return L.affine_forward(x, weights[0], weights[1])
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
        return L.dropout_forward(x, {"p": spec["keep"], "mode": "train", "seed": seed})
    if kind in ("spatial_batchnorm", "batchnorm"):
        fn = L.spatial_batchnorm_forward if kind == "spatial_batchnorm" else L.batchnorm_forward
        return fn(x, weights[0], weights[1], bn_param)
    if kind == "layernorm":
        return L.layernorm_forward(x, weights[0], weights[1], {"eps": spec["eps"]})
    if kind == "spatial_groupnorm":
        gn_param = {"eps": spec["eps"]}
        return L.spatial_groupnorm_forward(x, weights[0], weights[1], spec["groups"], gn_param)
    if kind == "channel_layernorm":
        N, C, H, W = x.shape
        rows = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(-1, C)  # (N*H*W, C)
        out, cache = L.layernorm_forward(rows, weights[0], weights[1], {"eps": spec["eps"]})
        return np.ascontiguousarray(out.reshape(N, H, W, C).transpose(0, 3, 1, 2)), cache
    raise AssertionError(f"unhandled layer type {kind}")  # normalise_spec rejects others


def layer_backward(
    spec: Mapping, dout: np.ndarray, cache: Any, *, need_dx: bool = True
) -> tuple[np.ndarray | None, tuple[np.ndarray, ...]]:
    """The backward pass of :func:`layer_forward`: ``(dx, grads)``.

    ``grads`` is ``(dW, db)`` for a conv or affine layer, ``(dgamma, dbeta)`` for a
    normalisation layer and ``()`` otherwise, in the order of ``weights``. Without
    ``need_dx`` a conv or affine layer returns ``dx = None`` (nothing below needs it).
    """
    kind = spec["type"]
    if kind in ("conv", "affine"):
        fn = L.conv_backward if kind == "conv" else L.affine_backward
        dx, dw, db = fn(dout, cache, need_dx=need_dx)
        return dx, (dw, db)
    if kind == "relu":
        return L.relu_backward(dout, cache), ()
    if kind == "max_pool":
        return L.max_pool_backward(dout, cache), ()
    if kind == "avg_pool":
        return L.avg_pool_backward(dout, cache), ()
    if kind == "dropout":
        return L.dropout_backward(dout, cache), ()
    backward = {
        "spatial_batchnorm": L.spatial_batchnorm_backward,
        "batchnorm": L.batchnorm_backward,
        "layernorm": L.layernorm_backward,
        "spatial_groupnorm": L.spatial_groupnorm_backward,
    }[kind]
    dx, dgamma, dbeta = backward(dout, cache)
    return dx, (dgamma, dbeta)


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
        check_layers(layers)
        shape = check_input_shape(input_shape)
        self.num_classes = _check_int(num_classes, "num_classes", 2)
        if weight_scale is not None:
            weight_scale = _check_number(weight_scale, "weight_scale", 0, math.inf, "()")
        self.weight_scale = weight_scale
        self.reg = _check_number(reg, "reg", 0, math.inf, "[)")
        self.dtype = check_dtype(dtype)
        self.seed = _check_int(seed, "seed", 0, 2**63 - 1)
        self.input_shape = shape
        body = [normalise_spec(spec, f"layer {i}") for i, spec in enumerate(layers)]
        self.layers = [*body, {"type": "affine", "units": self.num_classes}]
        self.class_names = check_class_names(class_names, self.num_classes)
        self.normalization = check_normalization(normalization, shape[0])

        self.info: list[LayerInfo] = []
        self.params: dict[str, np.ndarray] = {}
        self.bn_params: list[dict] = []
        init_rng = np.random.default_rng(self.seed)
        for info, fan_in, shapes in plan_layers(self.layers, shape):
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
        check_config(config)
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
        rows.append(("", "input", shape_text(self.input_shape), ""))
        for info in self.info:
            count = sum(self.params[name].size for name in info.param_names)
            label = describe_spec(info.spec) + (
                "  (classifier)" if info.index == len(self.info) - 1 else ""
            )
            rows.append(
                (str(info.index), label, shape_text(info.out_shape), f"{count:,}" if count else "")
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
            y = check_labels(y, X.shape[0], self.num_classes)
        out = X
        caches = []
        order = run_order(self.info)
        for info in order:
            out, cache = self._forward(info, out, train)
            if train:  # test mode keeps no activation: memory of one layer, not of all
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
        """:func:`layer_forward` with this network's weights, batchnorm state and dropout seed."""
        kind = info.spec["type"]
        weights = [self.params[name] for name in info.param_names]
        if kind == "dropout":
            seed = int(self.rng.integers(2**63)) if train else None
            return layer_forward(info.spec, x, train=train, seed=seed)
        if kind not in ("spatial_batchnorm", "batchnorm"):
            return layer_forward(info.spec, x, weights, train=train)
        bn = self.bn_params[info.bn_index]
        bn["mode"] = "train" if train else "test"
        bn_param = {k: bn[k] for k in _BN_KEYS}
        out, cache = layer_forward(info.spec, x, weights, train=train, bn_param=bn_param)
        bn["running_mean"], bn["running_var"] = bn_param["running_mean"], bn_param["running_var"]
        return out, cache

    def _backward(
        self, info: LayerInfo, dout: np.ndarray, cache: Any
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        # Nothing needs the gradient of the network's input: the first layer skips it.
        dx, grads = layer_backward(info.spec, dout, cache, need_dx=info.index > 0)
        return dx, dict(zip(info.param_names, grads, strict=True))

    def scores(self, X: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Test-mode class scores of ``X`` (N, C, H, W), computed ``batch_size`` at a time.

        From :data:`PLAN_MIN_IMAGES` images on, through a plan compiled for this call
        (:func:`cnnserve.engine.compile`: batch norm folded, ReLU fused, one call for the
        whole forward); fewer run layer by layer, where packing the filters would cost more.

        Returns
        -------
        ndarray, shape (N, num_classes)
        """
        batch_size = _check_int(batch_size, "batch_size", 1)
        X = self._check_x(X)
        if X.shape[0] >= PLAN_MIN_IMAGES:  # compiled now: the weights may change between calls
            return compile_plan(self, max_batch=batch_size)(X)
        parts = [self.loss(X[i : i + batch_size]) for i in range(0, X.shape[0], batch_size)]
        return np.concatenate(parts, axis=0)

    def predict(self, X: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Predicted class index of every row of ``X``: ndarray of int64, shape (N,)."""
        return np.argmax(self.scores(X, batch_size), axis=1).astype(np.int64)

    def preprocess(self, x01: np.ndarray) -> np.ndarray:
        """Normalise [0, 1] pixels as training did: ``(x - mean[c]) / std[c]`` per channel.

        The same rule as every other input path (:func:`cnnserve.images.preprocess`): float
        pixels in [0, 1] (1e-3 of round-off allowed), the model's channels.

        Parameters
        ----------
        x01 : ndarray, shape (N, C, H, W) or (C, H, W)

        Returns
        -------
        ndarray of the model's dtype, same shape.
        """
        return preprocess(x01, self.normalization, self.dtype, channels=self.input_shape[0])

    def __repr__(self) -> str:
        return (
            f"ConvNet({len(self.layers)} layers, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, dtype={np.dtype(self.dtype).name}, "
            f"params={self.num_parameters():,})"
        )


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
        return three_layer_stack(num_filters, filter_size, hidden_dim)
