"""Compiled inference plans: a network's whole test-mode forward in one call.

``plan = compile(model, input_shape, dtype=..., max_batch=...)`` turns a trained
:class:`~cnnserve.network.ConvNet` (test mode) or a converted
:class:`~cnnserve.convert.FullyConvNet` into a list of ops, once:

- batch norm (spatial or on vectors) right after a conv or affine layer is folded into its
  weights and bias (in float64, then cast); elsewhere it becomes a per-channel scale and shift;
- a ReLU is fused into the op before it (the conv or affine epilogue, a pool, a norm);
  relu-then-max-pool stays exact (ReLU is non-decreasing: the pool of ReLUs is the ReLU of
  the pool);
- dropout is removed (the identity at test time);
- affine layers become convs whose window is their whole input;
- activations between ops are channels-last (NHWC), the layout the engine's direct
  convolution and its pools want: the input is converted by the first op that needs it (a
  conv while it copies its input), a converted network's map back to NCHW at the end;
- filters are packed once for the engine's tiles; the intermediate buffers are sized
  once for ``max_batch`` images and reused, one set per concurrent call (idle sets are
  kept up to :data:`KEEP_BYTES`, all plans together; those beyond are freed after their call).

``plan(x, out=None)`` checks ``x`` once (shape and dtype: a ``ValueError`` or ``TypeError``
naming what was expected) and runs every op in one call of the compiled engine
(``cnnserve._ext.engine``) with the GIL released and no Python between layers. Batches larger
than ``max_batch`` run ``max_batch`` images at a time inside that call. A plan may be called
from several threads at once: each call takes its own buffers.

A converted network is compiled for one input size (its map's size follows from it); compile
one plan per image size, or keep them in a cache keyed by the size.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

from cnnserve._checks import check_dtype, check_int
from cnnserve._ext import engine as _kernels
from cnnserve.engine._aligned import ALIGN, _aligned, _aligned_empty
from cnnserve.engine._build import (
    CONV,
    ROWCONV,
    TRANSPOSE,
    WINO,
    Builder,
    Op,
    from_converted,
    from_convnet,
)

__all__ = [
    "CPU_PATHS",
    "Plan",
    "PlanCache",
    "available_cpu_paths",
    "compile",
    "cpu_path",
    "set_cpu_path",
]

# Every Plan and PlanCache: a fork copies their locks in whatever state another thread left
# them, so the child gets fresh ones (and drops the parent's spare buffers).
_LOCKED: weakref.WeakSet = weakref.WeakSet()


def _fresh_locks_in_child() -> None:
    global _kept_lock
    _kept_lock = threading.Lock()
    _kept[0] = 0
    for holder in list(_LOCKED):
        if isinstance(holder, Plan):  # its buffers are counted under _kept_lock
            holder._free = []
            holder._held[0] = 0
        else:
            holder._lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_in_child)

(
    F_KIND,
    F_C,
    F_H,
    F_W,
    F_F,
    F_HO,
    F_WO,
    F_KH,
    F_KW,
    F_STRIDE,
    F_PAD,
    F_RELU,
    F_W_OFS,
    F_A_OFS,
    F_B_OFS,
    F_GROUPS,
    F_OFF_OFS,
    F_COPY,
    F_SLOTS,
    F_POOL,
    F_OPAD,
) = range(21)
assert _kernels.FIELDS == 21  # the descriptor layout of cnn_engine.h
#: A 3x3 stride-1 conv with at least this many input and output channels runs as Winograd
#: F(2x2, 3x3). Measured on one core, 3x3 pad 1, against the direct conv: 64 -> 64 over
#: 16 x 16 1.6x faster, 32 -> 64 1.6x, 24 -> 24 over 32 x 32 1.35x; 16 -> 16 and 8 -> 16
#: 1.1-1.3x slower (the transforms cost more than the multiplications they save).
WINO_MIN_CHANNELS = 24
#: Conv output pixels that a conv with a fused max pool computes at a time, at least: a
#: block of tiles (8 tiles of 6 pixels), so that a panel's chunk of filters, read into L1,
#: serves as many pixels as in an unfused conv.
_FUSED_PIXELS = 48
#: Bytes of a Winograd band's transformed tiles (V and M), each thread its own band: about
#: half the L2 cache, the rest for the filters and the input's rows (wide layers take more:
#: _WINO_MIN_BAND tiles, 3 MiB a thread for 512 channels).
WINO_BAND_BYTES = 2**19
#: Tiles in a Winograd band at least (wide layers): each point's filters (C x F values, read
#: from L3 when large) serve this many tiles.
_WINO_MIN_BAND = 48
# F(2x2, 3x3): the filter transform G (the input's B^T and the output's A^T are in the C)
_WINO_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
#: Bytes of buffers that idle plans keep for their next calls, all plans together: a call's
#: buffers that would take the total over it are freed when the call ends. Keeping them matters
#: for large images: memory freed to the system and asked for again comes back page by page
#: (on this project's VM, after a few idle seconds, 1 s to fault in 400 MB: it doubled the
#: detector's 1024 x 1024 forward).
KEEP_BYTES = 2**30
_kept = [0]  # bytes that idle plans keep now
_kept_lock = threading.Lock()


def _release(held: list) -> None:
    """A plan's kept buffers are gone (the plan was collected, or a call took them)."""
    with _kept_lock:
        _kept[0] -= held[0]
        held[0] = 0


#: The CPU paths of float32 plans, best first: AVX-512 tiles (where the CPU has AVX-512F),
#: AVX2/FMA tiles, portable C.
CPU_PATHS = ("avx512", "avx2", "portable")


def set_cpu_path(path: str = "best") -> None:
    """Cap the tiles float32 plans run on, for every plan: ``"best"`` (the default: the best
    the CPU has), ``"avx2"`` (never AVX-512) or ``"portable"`` (plain C). For tests and
    comparisons: every path gives the same results up to rounding.

    Raises
    ------
    ValueError
        ``path`` is none of these.
    """
    if path == "best":
        path = CPU_PATHS[0]
    if path not in CPU_PATHS:
        raise ValueError(f"path must be 'best' or one of {', '.join(CPU_PATHS)}; got {path!r}")
    _kernels.set_cap(_kernels.ISAS[path])


def cpu_path() -> str:
    """The tiles float32 plans run on now: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    return {v: k for k, v in _kernels.ISAS.items()}[_kernels.isa()]


def available_cpu_paths() -> tuple[str, ...]:
    """The paths this CPU can run, best first (``"portable"`` always)."""
    best = _kernels.best_isa()
    return tuple(p for p in CPU_PATHS if _kernels.ISAS[p] <= best)


def _pack(weight: np.ndarray) -> np.ndarray:
    """Filters (F, C, KH, KW) as the tiles read them: panels of NR output channels, each
    (K, NR) with k = (kh, kw, c) (the NHWC window's order), zero channels after F."""
    F = weight.shape[0]
    nr = _kernels.NR
    w = weight.transpose(0, 2, 3, 1).reshape(F, -1)
    panels = -(-F // nr)
    w = np.concatenate([w, np.zeros((panels * nr - F, w.shape[1]))])
    return w.reshape(panels, nr, -1).transpose(0, 2, 1)


class Plan:
    """A compiled forward pass (see the module docstring); built by :func:`compile`.

    Attributes
    ----------
    input_shape : tuple of int
        ``(C, H, W)`` of one image.
    output_shape : tuple of int
        One image's output: ``(K,)`` for a trained network, ``(K, H', W')`` for a converted one.
    dtype : numpy.dtype
    max_batch : int
        Images per pass through the planned buffers.
    ops : list of str
        The compiled ops, described (``conv 3x3 s1 p0 +relu``, ...).
    """

    def __init__(self, ops: list[Op], input_shape, output_shape, dtype, max_batch: int) -> None:
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        self.dtype = dtype
        self.max_batch = max_batch
        self.ops = [op.describe() for op in ops]
        desc = np.zeros((len(ops), _kernels.FIELDS), dtype=np.int64)
        eps = np.zeros(len(ops), dtype=np.float64)
        chunks: list[np.ndarray] = []
        offsets: list[np.ndarray] = []
        sizes = {"params": 0, "offs": 0}

        def put(values: np.ndarray, into: list, key: str, kind) -> int:
            start = sizes[key]
            gap = -start % (ALIGN // np.dtype(kind).itemsize)
            if gap:  # every array starts on a cache line, as the whole does
                into.append(np.zeros(gap, dtype=kind))
                start += gap
                sizes[key] = start
            into.append(np.ascontiguousarray(values, dtype=kind).ravel())
            sizes[key] += into[-1].size
            return start

        padded = wino = 1
        for k, op in enumerate(ops):
            row = desc[k]
            row[F_KIND] = op.kind
            row[F_C], row[F_H], row[F_W] = op.in_shape
            row[F_F], row[F_HO], row[F_WO] = op.out_shape
            row[F_KH], row[F_KW] = op.size
            row[F_STRIDE], row[F_PAD], row[F_RELU] = op.stride, op.pad, int(op.relu)
            row[F_GROUPS] = op.groups
            row[F_COPY] = op.copy
            row[F_OPAD] = op.opad
            eps[k] = op.eps
            if op.kind == TRANSPOSE:
                row[F_F] = int(op.back)
            if op.kind == WINO:
                C, H, W = op.in_shape
                F, HO, WO = op.out_shape
                if op.pool:  # the conv's rows and columns the pool reads
                    HO, WO = HO * op.pool, WO * op.pool
                th, tw = -(-HO // 2), -(-WO // 2)
                if op.copy:  # padded to whole 4 x 4 blocks, as cnn_eng_wino copies it
                    Hp, Wp = max(H + 2 * op.pad, 2 * th + 2), max(W + 2 * op.pad, 2 * tw + 2)
                    padded = max(padded, Hp * Wp * C * max_batch)
                width = C + -(-F // _kernels.NR) * _kernels.NR
                band = WINO_BAND_BYTES // (16 * width * dtype.itemsize)
                band = min(max(_WINO_MIN_BAND, band), th * tw * max_batch)
                # a slot per thread that can have work (MR tiles at least), as cnn_eng_wino
                slots = min(os.cpu_count() or 1, -(-th * tw * max_batch // _kernels.MR))
                row[F_GROUPS], row[F_SLOTS], row[F_POOL] = band, slots, op.pool
                wino = max(wino, slots * 16 * (band * width + 2 * _kernels.WINO_SKEW))
                U = np.einsum("ai,fcij,bj->fcab", _WINO_G, op.weight, _WINO_G)
                packed = [
                    _pack(U[:, :, a, b][:, :, None, None]) for a in range(4) for b in range(4)
                ]
                row[F_W_OFS] = put(
                    np.concatenate([p.ravel() for p in packed]), chunks, "params", dtype
                )
            if op.kind == CONV:
                row[F_W_OFS] = put(_pack(op.weight), chunks, "params", dtype)
                C, H, W = op.in_shape
                kh, kw = op.size
                Wp = W + 2 * op.pad
                window = (np.arange(kh)[:, None] * Wp + np.arange(kw)[None, :]) * C
                row[F_OFF_OFS] = put(window, offsets, "offs", np.int64)
                if op.copy:
                    padded = max(padded, (H + 2 * op.pad) * Wp * C * max_batch)
                if op.pool:  # a slot per thread for a few pool rows of the conv's output:
                    # enough pixels for a block of tiles (as the unfused conv takes them)
                    F, _, WO = op.out_shape
                    rowpx = op.pool * op.pool * WO
                    rows = -(-_FUSED_PIXELS // rowpx)
                    slots = os.cpu_count() or 1
                    row[F_POOL], row[F_GROUPS], row[F_SLOTS] = op.pool, rows, slots
                    wino = max(wino, slots * -(-rows * rowpx * F // 16) * 16)
            if op.kind == ROWCONV:
                F, _, kh, kw = op.weight.shape
                w = np.zeros((-(-F // _kernels.RB) * _kernels.RB, kh * kw))
                w[:F] = op.weight.reshape(F, -1)
                w = w.reshape(-1, _kernels.RB, kh * kw).transpose(0, 2, 1)  # [block][k][RB]
                row[F_W_OFS] = put(w, chunks, "params", dtype)
                if op.copy:
                    _, H, W = op.in_shape
                    padded = max(padded, (H + 2 * op.pad) * (W + 2 * op.pad) * max_batch)
            if op.kind in (CONV, WINO, ROWCONV):  # the bias of a whole last panel (NR values)
                nr = _kernels.NR
                bias = np.zeros(-(-op.a.size // nr) * nr)
                bias[: op.a.size] = op.a
                row[F_A_OFS] = put(bias, chunks, "params", dtype)
            elif op.a is not None:
                row[F_A_OFS] = put(op.a, chunks, "params", dtype)
            if op.b is not None:
                row[F_B_OFS] = put(op.b, chunks, "params", dtype)
        self._desc = desc
        self._eps = eps
        self._params = _aligned(np.concatenate(chunks) if chunks else np.zeros(1, dtype=dtype))
        self._offs = np.concatenate(offsets) if offsets else np.zeros(1, dtype=np.int64)
        out_sizes = [
            op.out_shape[0] * (op.out_shape[1] + 2 * op.opad) * (op.out_shape[2] + 2 * op.opad)
            for op in ops
        ]
        self._in_size = int(np.prod(self.input_shape))
        self._out_size = out_sizes[-1]
        # op k writes buffer k % 2, the last op writes the output
        self._buf_sizes = [
            max([1] + [out_sizes[k] * max_batch for k in range(len(ops) - 1) if k % 2 == b])
            for b in (0, 1)
        ] + [padded, wino]
        self._ws_bytes = sum(self._buf_sizes) * self.dtype.itemsize
        self._free: list[tuple[np.ndarray, ...]] = []
        self._held = [0]  # bytes of self._free, counted in _kept
        _LOCKED.add(self)
        weakref.finalize(self, _release, self._held)
        self._program = _kernels.Program(
            desc, eps, self._params, self._offs, max_batch, self._in_size, self._out_size
        )

    def _workspace(self) -> tuple[np.ndarray, ...]:
        with _kept_lock:
            if self._free:
                self._held[0] -= self._ws_bytes
                _kept[0] -= self._ws_bytes
                return self._free.pop()
        return tuple(_aligned_empty(size, self.dtype) for size in self._buf_sizes)

    def _keep(self, ws: tuple[np.ndarray, ...]) -> None:
        """Keep a call's buffers for the next call while the plans' total allows."""
        with _kept_lock:
            if _kept[0] + self._ws_bytes <= KEEP_BYTES:
                _kept[0] += self._ws_bytes
                self._held[0] += self._ws_bytes
                self._free.append(ws)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The network's output for ``x`` ``(N, C, H, W)``, written into ``out`` when given.

        Returns
        -------
        ndarray, shape ``(N, *output_shape)``, of the plan's dtype

        Raises
        ------
        TypeError
            ``x`` or ``out`` is not a numpy array of the plan's dtype.
        ValueError
            ``x`` is not ``(N, *input_shape)`` with N >= 1, is not C-contiguous, or ``out``
            does not have the output's shape, is not C-contiguous or is read-only.
        """
        if not isinstance(x, np.ndarray) or x.dtype != self.dtype:
            got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
            raise TypeError(f"x must be a numpy array of {self.dtype.name}, got {got}")
        if x.ndim != 4 or x.shape[1:] != self.input_shape or x.shape[0] < 1:
            want = ", ".join(map(str, self.input_shape))
            raise ValueError(f"x must have shape (N, {want}) with N >= 1, got {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError("x must be C-contiguous (numpy.ascontiguousarray)")
        N = x.shape[0]
        shape = (N, *self.output_shape)
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif not isinstance(out, np.ndarray) or out.dtype != self.dtype:
            got = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
            raise TypeError(f"out must be a numpy array of {self.dtype.name}, got {got}")
        elif out.shape != shape:
            raise ValueError(f"out must be a C-contiguous array of shape {shape}, got {out.shape}")
        elif not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous (its shape {shape} is right)")
        elif not out.flags.writeable:
            raise ValueError("out is read-only")
        self._run(x, out)
        return out

    def _run(self, x: np.ndarray, out: np.ndarray, times: np.ndarray | None = None) -> None:
        ws = self._workspace()
        try:
            self._program.run(x, out, ws, times)
        finally:
            self._keep(ws)

    def profile(self, x: np.ndarray, calls: int = 10) -> list[tuple[str, float]]:
        """Where a call's time goes: ``x`` run ``calls`` times (after one untimed call that
        warms the buffers and caches), each op timed inside the engine.

        Parameters
        ----------
        x : ndarray, shape ``(N, *input_shape)``
            As for a call.
        calls : int
            Timed calls; the figures are their means.

        Returns
        -------
        list of (str, float)
            Each op's description (as in :attr:`ops`) and its mean seconds per call.
        """
        calls = check_int(calls, "calls", 1)
        out = self(x)
        times = np.zeros(len(self.ops))
        for _ in range(calls):
            self._run(x, out, times)
        return [(op, float(t) / calls) for op, t in zip(self.ops, times, strict=True)]

    def __repr__(self) -> str:
        return (
            f"Plan({len(self.ops)} ops, input_shape={self.input_shape}, "
            f"output_shape={self.output_shape}, dtype={self.dtype.name}, "
            f"max_batch={self.max_batch})"
        )


class PlanCache:
    """Plans of one converted network by input size: the ``size`` most recently used.

    ``cache(x)`` runs ``x`` (N, C, H, W), C-contiguous in the network's dtype, through the
    plan for its (C, H, W), compiling it on first use (``max_batch``: that call's N, at most
    64). Safe to call from several threads; each plan holds its own packed weights, so
    ``size`` bounds the copies kept.
    """

    def __init__(self, model: Any, size: int = 2) -> None:
        self._model = model
        self.size = check_int(size, "size", 1)
        self._plans: OrderedDict[tuple[int, ...], Plan] = OrderedDict()
        self._lock = threading.Lock()
        _LOCKED.add(self)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        key = tuple(x.shape[1:])
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
        if plan is None:
            plan = compile(self._model, key, max_batch=min(max(1, x.shape[0]), 64))
            with self._lock:
                self._plans[key] = plan
                while len(self._plans) > self.size:
                    self._plans.popitem(last=False)
        return plan(x)


def compile(  # noqa: A001 - the name the issue asks for: cnnserve.engine.compile
    model: Any, input_shape: Any = None, *, dtype: Any = None, max_batch: int = 64
) -> Plan:
    """Compile a network's test-mode forward pass into a :class:`Plan`.

    Parameters
    ----------
    model : ConvNet or FullyConvNet
        A trained network (its current weights and batch-norm running statistics, test mode)
        or a converted one (not one whose group norm runs window by window).
    input_shape : tuple of int, optional
        ``(C, H, W)`` of one image: a trained network's own input shape (the default), or for
        a converted network any size its window tiles exactly (default: the window).
    dtype : numpy dtype, optional
        float32 or float64; default the model's dtype. The weights are cast once.
    max_batch : int
        Images per pass through the planned buffers (larger batches run in several passes
        within one call).

    Returns
    -------
    Plan

    Raises
    ------
    ValueError
        A layer with no engine op, an input shape the network cannot take, ``max_batch < 1``.
    TypeError
        Not a ConvNet or FullyConvNet, or a dtype other than float32 and float64.
    """
    converted = hasattr(model, "geometry") and hasattr(model, "layers")
    if not converted and not (hasattr(model, "info") and hasattr(model, "bn_params")):
        raise TypeError(f"model must be a ConvNet or a FullyConvNet, got {type(model).__name__}")
    dtype = check_dtype(model.dtype if dtype is None else dtype)
    max_batch = check_int(max_batch, "max_batch", 1)
    own = tuple(model.input_shape)
    shape = own if input_shape is None else tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape!r}")
    if not converted and shape != own:
        raise ValueError(f"input_shape must be this network's {own}, got {shape}")
    if converted and shape[0] != own[0]:
        raise ValueError(f"input_shape must have {own[0]} channels, got {shape}")
    builder = Builder(shape)
    if converted:
        from_converted(model, builder)
        out_shape = builder.shape
    else:
        from_convnet(model, builder)
        out_shape = (int(np.prod(builder.shape)),)
    if not builder.ops:
        raise ValueError("the network has no layer to compile")
    return Plan(builder.finish(shape, WINO_MIN_CHANNELS), shape, out_shape, dtype, max_batch)
