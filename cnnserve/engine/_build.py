"""Compiling a network into the engine's ops: its layers walked in order, batch norm folded,
ReLU fused, layouts chosen (see the package docstring of :mod:`cnnserve.engine`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnserve._ext import engine as _kernels

CONV, MAXPOOL, AVGPOOL, SCALE, CNORM, GNORM, RELU, TRANSPOSE, WINO, ROWCONV = range(10)
_NAMES = {
    CONV: "conv",
    MAXPOOL: "max_pool",
    AVGPOOL: "avg_pool",
    SCALE: "scale",
    CNORM: "channel_norm",
    GNORM: "group_norm",
    RELU: "relu",
    TRANSPOSE: "transpose",
    WINO: "conv",
    ROWCONV: "conv",
}


class Op:
    """One op while compiling: its descriptor fields and its parameters (float64)."""

    def __init__(self, kind: int, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int]):
        self.kind = kind
        self.in_shape = in_shape
        self.out_shape = out_shape
        self.relu = False
        self.size = (1, 1)
        self.stride = 1
        self.pad = 0
        self.groups = 1
        self.eps = 0.0
        self.affine = False
        self.back = False  # TRANSPOSE: NHWC to NCHW (else NCHW to NHWC)
        self.copy = 0  # CONV, WINO: F_COPY (0: input as it is, 1: padded NHWC copy, 2: NCHW)
        self.pool = 0  # CONV, WINO: a max pool of pool x pool at stride pool fused (out_shape
        # its); WINO: 2 x 2 only
        self.opad = 0  # CONV, WINO: its output written with the next conv's zero border
        self.weight: np.ndarray | None = None  # CONV: (F, C, KH, KW)
        self.a: np.ndarray | None = None  # bias, scale or gamma (per channel)
        self.b: np.ndarray | None = None  # shift or beta

    def describe(self) -> str:
        text = _NAMES[self.kind]
        if self.affine:
            text = "affine"
        elif self.kind == TRANSPOSE:
            text = "to NCHW" if self.back else "to NHWC"
        elif self.kind in (CONV, WINO, ROWCONV, MAXPOOL, AVGPOOL):
            text += f" {self.size[0]}x{self.size[1]} s{self.stride}"
            if self.kind in (CONV, WINO, ROWCONV):
                text += f" p{self.pad}"
            if self.kind == WINO:
                text += " winograd"
            elif self.kind == ROWCONV:
                text += " rowwise"
        if self.relu and self.kind != RELU:
            text += " +relu"
        if self.pool:
            text += f" +max_pool {self.pool}x{self.pool} s{self.pool}"
        return text


def _window_out(n: int, k: int, stride: int, pad: int, where: str) -> int:
    span = n + 2 * pad - k
    if span < 0 or span % stride:
        raise ValueError(
            f"{where}: a {k}-wide window at stride {stride} (pad {pad}) does not tile {n} exactly"
        )
    return span // stride + 1


class Builder:
    """Turns a network's layers into ops, tracking the (C, H, W) shape.

    A vector made by flattening a (C, H, W) volume with C > 1 and H * W > 1 lies in memory in
    channels-last order: ``perm`` maps its positions to the flattened NCHW indices the
    network's parameters are written for (None when the two agree), ``flat_from`` the volume.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.ops: list[Op] = []
        self.fusable = False  # the last op may take a following batch norm into its weights
        self.perm: np.ndarray | None = None
        self.flat_from: tuple[int, int, int] | None = None

    def flatten(self) -> None:
        C, H, W = self.shape
        if H * W == 1:
            return
        self.shape = (C * H * W, 1, 1)
        if C > 1:
            self.perm = np.arange(C * H * W).reshape(C, H, W).transpose(1, 2, 0).ravel()
            self.flat_from = (C, H, W)

    def _vector(self, values) -> np.ndarray:
        """Per-value parameters of a flattened vector, in its memory order."""
        values = np.asarray(values, dtype=np.float64).ravel()
        return values if self.perm is None else values[self.perm]

    def conv(self, w: np.ndarray, b: np.ndarray, stride: int, pad: int, where: str) -> None:
        C, H, W = self.shape
        F, wc, kh, kw = w.shape
        if wc != C:
            raise ValueError(f"{where}: filters for {wc} channels on a {C}-channel input")
        ho = _window_out(H, kh, stride, pad, where)
        wo = _window_out(W, kw, stride, pad, where)
        op = Op(CONV, self.shape, (F, ho, wo))
        op.size, op.stride, op.pad = (kh, kw), stride, pad
        op.weight = np.asarray(w, dtype=np.float64)
        op.a = np.asarray(b, dtype=np.float64).ravel()
        self._push(op)
        self.fusable = True

    def affine(self, w: np.ndarray, b: np.ndarray, where: str) -> None:
        """An affine layer: a conv whose window is its whole input, (C, H, W) as it lies."""
        C, H, W = self.shape
        D, F = w.shape
        if D != C * H * W:
            raise ValueError(f"{where}: weights for {D} inputs on {C * H * W} values")
        w = np.asarray(w, dtype=np.float64)
        if self.perm is not None:  # a vector in channels-last order (C, H, W are D, 1, 1)
            w = w[self.perm]
        op = Op(CONV, self.shape, (F, 1, 1))
        op.size, op.affine = (H, W), True
        op.weight = w.T.reshape(F, C, H, W)
        op.a = np.asarray(b, dtype=np.float64).ravel()
        self._push(op)
        self.perm = self.flat_from = None
        self.fusable = True

    def batchnorm(self, gamma, beta, mean, var, eps: float, vector: bool = False) -> None:
        scale = np.asarray(gamma, np.float64).ravel() / np.sqrt(
            np.asarray(var, np.float64).ravel() + eps
        )
        shift = np.asarray(beta, np.float64).ravel() - np.asarray(mean, np.float64).ravel() * scale
        if self.fusable:
            op = self.ops[-1]
            op.weight = op.weight * scale[:, None, None, None]
            op.a = op.a * scale + shift
            return
        if vector:
            self.flatten()
        op = Op(SCALE, self.shape, self.shape)
        op.a, op.b = self._vector(scale), self._vector(shift)
        self._push(op)

    def relu(self) -> None:
        if self.ops and not self.ops[-1].relu:
            self.ops[-1].relu = True
        elif not self.ops:
            op = Op(RELU, self.shape, self.shape)
            op.relu = True
            self._push(op)
        # a ReLU after a ReLU changes nothing
        self.fusable = False

    def pool(self, kind: str, size, stride: int, where: str) -> None:
        C, H, W = self.shape
        kh, kw = size
        op = Op(MAXPOOL if kind == "max_pool" else AVGPOOL, self.shape, self.shape)
        op.out_shape = (
            C,
            _window_out(H, kh, stride, 0, where),
            _window_out(W, kw, stride, 0, where),
        )
        op.size, op.stride = (kh, kw), stride
        self._push(op)

    def norm(self, kind: int, gamma, beta, eps: float, groups: int = 1) -> None:
        op = Op(kind, self.shape, self.shape)
        op.a, op.b = self._vector(gamma), self._vector(beta)
        op.eps, op.groups = float(eps), groups
        self._push(op)

    def _push(self, op: Op) -> None:
        self.ops.append(op)
        self.shape = op.out_shape
        self.fusable = False

    def finish(self, input_shape: tuple[int, int, int], wino_min: int) -> list[Op]:
        """The ops with the layout changes: the NCHW input converted by the first op that
        needs it, and the output back in NCHW (or in the network's flattened order); 3x3
        stride-1 convs of at least ``wino_min`` input and output channels as Winograd."""
        ops = list(self.ops)
        C, H, W = input_shape
        if C > 1 and H * W > 1:
            k = 0
            while k < len(ops) and ops[k].kind == RELU:  # a ReLU does not care
                k += 1
            if k < len(ops) and ops[k].kind == CONV:
                ops[k].copy = 2
            elif k < len(ops):
                op = Op(TRANSPOSE, ops[k].in_shape, ops[k].in_shape)
                ops.insert(k, op)
        for op in ops:
            C, F = op.in_shape[0], op.out_shape[0]
            if op.kind == CONV and op.pad and not op.copy:
                op.copy = 1
            # one input channel at stride 1, rows of at least RX outputs: vectorised along the
            # rows (LeNet's first conv on 256 images: 2.1 ms as CONV, 0.64 ms as ROWCONV)
            if (
                op.kind == CONV
                and not op.affine
                and C == 1
                and op.stride == 1
                and op.out_shape[2] >= _kernels.RX
            ):
                op.kind = ROWCONV
            if (
                op.kind == CONV
                and not op.affine
                and op.size == (3, 3)
                and op.stride == 1
                and min(C, F) >= wino_min
            ):
                op.kind = WINO
        # a max pool of k x k at stride k after a direct conv: fused into it (exact: the
        # conv's ReLU, applied first, commutes with the max)
        k = 0
        while k + 1 < len(ops):
            op, nxt = ops[k], ops[k + 1]
            if (
                op.kind == CONV
                and not op.affine
                and nxt.kind == MAXPOOL
                and nxt.size[0] == nxt.size[1] == nxt.stride
                or op.kind == WINO
                and nxt.kind == MAXPOOL
                and nxt.size[0] == nxt.size[1] == nxt.stride == 2  # a block of outputs
            ):
                op.pool, op.out_shape = nxt.stride, nxt.out_shape
                op.relu = op.relu or nxt.relu
                del ops[k + 1]
            k += 1
        # a conv followed by a padded conv writes its output with the border the next one
        # needs, which then reads it in place (no padded copy); a Winograd conv reads its
        # input in place when that holds whole 4 x 4 blocks (the rows and columns it computes
        # are even: cnn_eng_wino pads to blocks by the same rule) and, if it pads, the conv
        # before it writes the border
        for k, op in enumerate(ops):
            prev = ops[k - 1] if k else None
            by_prev = prev is not None and prev.kind in (CONV, WINO) and not prev.affine
            if op.kind == CONV and op.copy == 1 and by_prev:
                prev.opad, op.copy = op.pad, 0
            if op.kind == WINO and op.copy != 2:
                _, H, W = op.in_shape
                _, HO, WO = op.out_shape
                if op.pool:
                    HO, WO = HO * op.pool, WO * op.pool
                blocks = (
                    H + 2 * op.pad >= 2 * -(-HO // 2) + 2 and W + 2 * op.pad >= 2 * -(-WO // 2) + 2
                )
                op.copy = 0 if blocks and (not op.pad or by_prev) else 1
                if blocks and op.pad and by_prev:
                    prev.opad = op.pad
        last = self.flat_from if self.perm is not None else self.shape
        if last[0] > 1 and last[1] * last[2] > 1:
            op = Op(TRANSPOSE, last, last)
            op.back = True
            ops.append(op)
        return ops


def from_convnet(model: Any, builder: Builder) -> None:
    p = model.params
    for info in model.info:
        spec, names = info.spec, info.param_names
        kind, where = spec["type"], f"layer {info.index} ({spec['type']})"
        if kind == "conv":
            builder.conv(p[names[0]], p[names[1]], spec["stride"], spec["pad"], where)
        elif kind == "affine":
            builder.affine(p[names[0]], p[names[1]], where)
        elif kind in ("spatial_batchnorm", "batchnorm"):
            bn = model.bn_params[info.bn_index]
            eps = spec["eps"]
            builder.batchnorm(
                p[names[0]],
                p[names[1]],
                bn["running_mean"],
                bn["running_var"],
                eps,
                vector=kind == "batchnorm",
            )
        elif kind == "relu":
            builder.relu()
        elif kind in ("max_pool", "avg_pool"):
            builder.pool(kind, spec["size"], spec["stride"], where)
        elif kind == "dropout":
            continue
        elif kind == "layernorm":
            builder.flatten()
            builder.norm(CNORM, p[names[0]], p[names[1]], spec["eps"])
        elif kind == "spatial_groupnorm":
            builder.norm(GNORM, p[names[0]], p[names[1]], spec["eps"], spec["groups"])
        else:
            raise ValueError(f"{where}: no engine op for layer type {kind!r}")


def from_converted(model: Any, builder: Builder) -> None:
    if model.per_window_from is not None:
        raise ValueError(
            "a converted network whose group norm runs window by window "
            f"(from layer {model.per_window_from}) has no single-pass plan"
        )
    p = model.params
    for k, layer in enumerate(model.layers):
        spec, names, where = layer.spec, layer.param_names, f"layer {k} ({layer.kind})"
        if layer.kind == "conv":
            builder.conv(p[names[0]], p[names[1]], spec["stride"], spec["pad"], where)
        elif layer.kind == "spatial_batchnorm":
            n = names[0][len("gamma") :]
            mean, var = p[f"running_mean{n}"], p[f"running_var{n}"]
            builder.batchnorm(p[names[0]], p[names[1]], mean, var, layer.eps)
        elif layer.kind == "relu":
            builder.relu()
        elif layer.kind in ("max_pool", "avg_pool"):
            builder.pool(layer.kind, spec["size"], spec["stride"], where)
        elif layer.kind == "channel_layernorm":
            builder.norm(CNORM, p[names[0]], p[names[1]], layer.eps)
        elif layer.kind == "spatial_groupnorm":
            builder.norm(GNORM, p[names[0]], p[names[1]], layer.eps, spec["groups"])
        else:
            raise ValueError(f"{where}: no engine op for layer type {layer.kind!r}")
