"""Layer benchmark: conv, max pooling and spatial batch norm, forward+backward in float32,
against the loop reference and (when importable) PyTorch's CPU path with 2 threads.

Usage::

    python bench/layers.py                 # the full table
    python bench/layers.py --repeat 3      # fewer repetitions (noisy machines: keep >= 5)
    python bench/layers.py --no-reference  # skip the slow loop reference
    python bench/layers.py --only conv     # only the rows whose label contains "conv"

Columns: fwd+bwd time and GFLOP/s, forward time and GFLOP/s, the forward rate as a share of
numpy's float32 GEMM rate (``%GEMM``: each forward run is paired with a GEMM run just before
it, and the column is the median of the pairs' shares; ``*`` marks the two rows with the
largest forward GEMMs), the speed-up over the loop reference, PyTorch's time and the
ratio ours/torch; then the geometric means of the ratios over the conv rows and over all
rows. GFLOP/s always count a direct convolution's multiply-adds, also where the Winograd
path does fewer (an effective rate, the usual convention). A last table times the forward of
the conv rows that can read filters packed once (``layers.pack_filters``, for fixed weights
at inference), with the packing time and %GEMM.

Times are medians of ``--repeat`` runs after one warm-up. Both sides run in the same
invocation, row by row, on identical arrays: cnnserve in this process, PyTorch in a helper
process started with this process's original environment. Two OpenMP runtimes in one process
make each other's idle threads compete for the 2 cores, which would distort both columns.

The loop reference is timed on a slice of the problem (one image, at most 4 filters or
channels) and scaled linearly to the full shape: its loops are linear in N and F (C for
pooling and batch norm), so the scaled time is what the full run would take, without spending
minutes on it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

# cnnserve before NumPy, as in any program that uses it: its thread defaults (idle OpenBLAS
# workers stop spinning after ~0.5 ms instead of ~0.1 s) must be set before NumPy loads its
# BLAS, or a spinning BLAS worker takes a core from the next OpenMP kernel.
import cnnserve  # isort: skip
import numpy as np
from _common import median_time  # bench/ is on sys.path: these scripts run as files

THREADS = 2
ROWS = [  # (kind, shape)
    *[
        ("conv", s)  # (N, C, H, W, F, K, stride, pad)
        for s in [
            (64, 3, 32, 32, 32, 7, 1, 3),
            (64, 32, 32, 32, 64, 3, 1, 1),
            (64, 64, 16, 16, 128, 3, 1, 1),
            (16, 3, 227, 227, 64, 11, 4, 0),
            (1, 512, 12, 12, 4096, 7, 1, 0),
        ]
    ],
    ("maxpool", (64, 64, 32, 32, 2, 2)),  # (N, C, H, W, K, stride)
    ("maxpool", (64, 64, 33, 33, 3, 2)),
    ("spatial_batchnorm", (64, 64, 32, 32)),  # (N, C, H, W)
]


def make_arrays(kind: str, shape: tuple) -> dict[str, np.ndarray]:
    """The same float32 inputs, for cnnserve and for torch (fixed seed)."""
    rng = np.random.default_rng(0)
    if kind == "conv":
        N, C, H, W, F, K, stride, pad = shape
        out_size = (H + 2 * pad - K) // stride + 1
        return {
            "x": rng.standard_normal((N, C, H, W), dtype=np.float32),
            "w": rng.standard_normal((F, C, K, K), dtype=np.float32) * 0.1,
            "b": rng.standard_normal(F, dtype=np.float32),
            "dout": rng.standard_normal((N, F, out_size, out_size), dtype=np.float32),
        }
    if kind == "maxpool":
        N, C, H, W, K, stride = shape
        out_size = (H - K) // stride + 1
        return {
            "x": rng.standard_normal((N, C, H, W), dtype=np.float32),
            "dout": rng.standard_normal((N, C, out_size, out_size), dtype=np.float32),
        }
    N, C, H, W = shape
    return {
        "x": rng.standard_normal((N, C, H, W), dtype=np.float32),
        "gamma": rng.standard_normal(C, dtype=np.float32),
        "beta": rng.standard_normal(C, dtype=np.float32),
        "dout": rng.standard_normal((N, C, H, W), dtype=np.float32),
    }


def conv_flops(N, C, H, W, F, K, stride, pad) -> float:
    """2 x multiply-adds of forward (1x) plus backward (dx and dw: 2x)."""
    return 3 * conv_forward_flops(N, C, H, W, F, K, stride, pad)


def conv_forward_flops(N, C, H, W, F, K, stride, pad) -> float:
    """2 x multiply-adds of the forward pass of a direct convolution (its GEMM's FLOPs)."""
    out = (H + 2 * pad - K) // stride + 1
    return 2.0 * N * F * out * out * C * K * K


GEMM_SIZE = 2048


def gemm_step(size: int = GEMM_SIZE) -> tuple[Callable[[], object], float]:
    """numpy's float32 GEMM on (size x size) matrices, and its FLOPs: the machine's BLAS rate."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    return (lambda: np.matmul(a, b, out=out)), 2.0 * size**3


def paired_share(
    forward: Callable[[], object],
    flops: float,
    gemm: Callable[[], object],
    gemm_flops: float,
    repeat: int,
) -> tuple[float, float]:
    """``(median forward time, median share of the GEMM rate)``, the GEMM timed beside it.

    The GEMM and the forward run alternately, ``repeat`` pairs after one warm-up each, and
    each pair gives one share (forward FLOP/s over the GEMM's FLOP/s of the same moment).
    On a shared machine whose speed drifts by tens of percent within minutes, a GEMM rate
    measured once at the start would make the share follow the drift, not the kernel.
    """
    forward()
    gemm()
    times, shares = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        gemm()
        middle = time.perf_counter()
        forward()
        end = time.perf_counter()
        times.append(end - middle)
        shares.append((flops / (end - middle)) / (gemm_flops / (middle - start)))
    return statistics.median(times), statistics.median(shares)


# ---------------------------------------------------------------------------------------------
# cnnserve side (this process)
# ---------------------------------------------------------------------------------------------


def ours_step(
    kind: str, shape: tuple, a: dict, naive: bool = False, backward: bool = True
) -> Callable[[], object]:
    """cnnserve's forward (+ backward) step for a row, or the loop reference's (``naive``)."""
    from cnnserve import layers, reference

    impl = reference if naive else layers
    suffix = "_naive" if naive else ""
    if kind == "conv":
        param = {"stride": shape[6], "pad": shape[7]}
        name = "conv"

        def forward():
            return getattr(impl, f"conv_forward{suffix}")(a["x"], a["w"], a["b"], param)
    elif kind == "maxpool":
        param = {"pool_height": shape[4], "pool_width": shape[4], "stride": shape[5]}
        name = "max_pool"

        def forward():
            return getattr(impl, f"max_pool_forward{suffix}")(a["x"], param)
    else:
        name = "spatial_batchnorm"

        def forward():
            fn = getattr(impl, f"spatial_batchnorm_forward{suffix}")
            return fn(a["x"], a["gamma"], a["beta"], {"mode": "train"})

    if not backward:
        return forward
    bwd = getattr(impl, f"{name}_backward{suffix}")
    return lambda: bwd(a["dout"], forward()[1])


def reference_slice(kind: str, a: dict) -> tuple[dict, float]:
    """Arrays cut to one image and at most 4 filters/channels, and the factor to scale by."""
    N = a["x"].shape[0]
    if kind == "conv":
        F = a["w"].shape[0]
        f = min(F, 4)
        cut = {"x": a["x"][:1], "w": a["w"][:f], "b": a["b"][:f], "dout": a["dout"][:1, :f]}
        return cut, N * F / f
    C = a["x"].shape[1]
    c = min(C, 4)
    cut = {key: (v[:1, :c] if v.ndim == 4 else v[:c]) for key, v in a.items()}
    if kind == "spatial_batchnorm":  # batch statistics need the whole batch: keep N
        cut = {key: (v[:, :c] if v.ndim == 4 else v[:c]) for key, v in a.items()}
        return cut, C / c
    return cut, N * C / c


# ---------------------------------------------------------------------------------------------
# torch side (a helper process)
# ---------------------------------------------------------------------------------------------


def torch_step(torch, kind: str, shape: tuple) -> Callable[[], object]:
    """The same forward+backward step in ``torch.nn.functional``, on the same arrays."""
    F = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in make_arrays(kind, shape).items()}
    leaves = [t[k].requires_grad_(True) for k in ("x", "w", "b", "gamma", "beta") if k in t]
    if kind == "conv":

        def forward():
            return F.conv2d(t["x"], t["w"], t["b"], stride=shape[6], padding=shape[7])
    elif kind == "maxpool":

        def forward():
            return F.max_pool2d(t["x"], shape[4], shape[5])
    else:
        running = [torch.zeros(shape[1]), torch.ones(shape[1])]

        def forward():
            return F.batch_norm(t["x"], *running, t["gamma"], t["beta"], training=True)

    def step():
        forward().backward(t["dout"])
        for leaf in leaves:
            leaf.grad = None

    return step


def torch_worker() -> int:
    """Read ``{"kind", "shape", "repeat"}`` lines on stdin; answer ``{"seconds"}`` lines."""
    import torch

    torch.set_num_threads(THREADS)
    print(json.dumps({"version": torch.__version__, "threads": torch.get_num_threads()}))
    sys.stdout.flush()
    for line in sys.stdin:
        job = json.loads(line)
        step = torch_step(torch, job["kind"], tuple(job["shape"]))
        print(json.dumps({"seconds": median_time(step, job["repeat"])}))
        sys.stdout.flush()
    return 0


class TorchProcess:
    """A helper process that times the torch side of each row."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--torch-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = json.loads(self.proc.stdout.readline())

    def time(self, kind: str, shape: tuple, repeat: int) -> float:
        job = {"kind": kind, "shape": list(shape), "repeat": repeat}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def start_torch(env: dict[str, str]) -> TorchProcess | None:
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return None
    except ImportError:
        return None
    return TorchProcess(env)


# ---------------------------------------------------------------------------------------------


def limit_threads() -> None:
    """Give cnnserve the THREADS threads that torch gets (BLAS and OpenMP), on any machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(f"threadpoolctl is not installed: cnnserve may use more than {THREADS} threads")
        return
    from cnnserve import layers  # noqa: F401  (loads the OpenMP runtime to be limited)

    threadpool_limits(limits=THREADS)


def describe_machine(torch: TorchProcess | None) -> list[str]:
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, numpy {np.__version__}",
    ]
    try:
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            lines.append(
                f"  {pool['user_api']}: {pool['internal_api']} {pool.get('version') or ''} "
                f"({pool['num_threads']} threads)"
            )
    except ImportError:
        lines.append("  (pip install threadpoolctl to list the BLAS and OpenMP pools)")
    if torch is not None:
        lines.append(f"torch {torch.info['version']}, {torch.info['threads']} threads")
    else:
        lines.append("torch: not installed, no comparison column")
    return lines


def packed_rows(
    rows: list,
    gemm: Callable[[], object],
    gemm_flops: float,
    shares: dict,
    largest: list,
    repeat: int,
) -> None:
    """The conv rows whose forward reads packed filters (``layers.pack_filters``: fixed
    weights, as at inference): packing time, forward time and %GEMM, paired as above."""
    from unittest import mock

    from cnnserve import layers
    from cnnserve.layers import conv as conv_layer

    lines = []
    for kind, shape in rows:
        if kind != "conv":
            continue
        stride, pad = shape[6], shape[7]
        a = make_arrays(kind, shape)
        start = time.perf_counter()
        filters = layers.pack_filters(a["w"])
        pack_time = time.perf_counter() - start
        forward = functools.partial(
            layers.conv_forward, a["x"], filters, a["b"], {"stride": stride, "pad": pad}
        )
        kernel = conv_layer._conv.skinny_packed_forward
        with mock.patch.object(conv_layer._conv, "skinny_packed_forward", wraps=kernel) as spy:
            forward()  # another path (Winograd, 1x1, too many columns) may come first
        if not spy.called:
            continue
        fwd_time, fraction = paired_share(
            forward, conv_forward_flops(*shape), gemm, gemm_flops, repeat
        )
        star = "*" if shape in largest else ""
        lines.append(
            f"{label(kind, shape):<38} {pack_time * 1e3:8.1f} {fwd_time * 1e3:8.2f} "
            f"{conv_forward_flops(*shape) / fwd_time / 1e9:8.1f} {100 * fraction:>5.0f}{star} "
            f"{100 * shares[shape]:>9.0f}"
        )
    if not lines:
        return
    header = (
        f"{'forward, filters packed once':<38} {'pack ms':>8} {'fwd ms':>8} {'fwd GF/s':>8} "
        f"{'%GEMM':>6} {'unpacked':>9}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    print("\n".join(lines))
    print("unpacked: the %GEMM of the same forward on the plain filters, in the table above.")


def label(kind: str, shape: tuple) -> str:
    if kind == "conv":
        N, C, H, W, F, K, stride, pad = shape
        return f"conv {N}x{C}x{H}x{W} F={F} {K}x{K} s{stride} p{pad}"
    if kind == "maxpool":
        N, C, H, W, K, stride = shape
        return f"maxpool {N}x{C}x{H}x{W} {K}x{K} s{stride}"
    return "spatial batchnorm {}x{}x{}x{}".format(*shape)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per row (median)")
    parser.add_argument("--no-reference", action="store_true", help="skip the loop reference")
    parser.add_argument(
        "--only", default="", help="run only the rows whose label contains this text"
    )
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        return torch_worker()

    # torch's helper gets the environment as it was before cnnserve set its thread defaults
    env = {k: v for k, v in os.environ.items() if k not in cnnserve._ext.ENV_SET_BY_CNNSERVE}
    torch = start_torch(env)
    limit_threads()
    print("\n".join(describe_machine(torch)))
    gemm, gemm_flops = gemm_step()
    rate = gemm_flops / median_time(gemm, args.repeat)
    print(
        f"numpy float32 GEMM {GEMM_SIZE}x{GEMM_SIZE}x{GEMM_SIZE}, {THREADS} threads: "
        f"{rate / 1e9:.1f} GFLOP/s (at the start; each %GEMM is paired, see below)"
    )
    rows = [(kind, shape) for kind, shape in ROWS if args.only in label(kind, shape)]
    conv_rows = [shape for kind, shape in rows if kind == "conv"]
    # The two conv rows with the largest forward GEMMs (FLOPs; ties keep the table order).
    largest = sorted(conv_rows, key=lambda s: -conv_forward_flops(*s))[:2]
    header = (
        f"{'layer (float32, fwd+bwd)':<38} {'ms':>8} {'GFLOP/s':>8} {'fwd ms':>8} "
        f"{'fwd GF/s':>8} {'%GEMM':>6} {'ref x':>7} {'torch ms':>9} {'ours/torch':>10}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    ratios: dict[str, list[float]] = {"conv": [], "all": []}
    shares: dict[tuple, float] = {}  # conv shape -> the forward's %GEMM
    for kind, shape in rows:
        a = make_arrays(kind, shape)
        ours = median_time(ours_step(kind, shape, a), args.repeat)
        forward = ours_step(kind, shape, a, backward=False)
        gflops = fwd_gflops = share = "-"
        if kind == "conv":
            gflops = f"{conv_flops(*shape) / ours / 1e9:.1f}"
            fwd_time, fraction = paired_share(
                forward, conv_forward_flops(*shape), gemm, gemm_flops, args.repeat
            )
            fwd_gflops = f"{conv_forward_flops(*shape) / fwd_time / 1e9:.1f}"
            share = f"{100 * fraction:.0f}{'*' if shape in largest else ''}"
            shares[shape] = fraction
        else:
            fwd_time = median_time(forward, args.repeat)
        speedup = "-"
        if not args.no_reference:
            cut, scale = reference_slice(kind, a)
            ref = median_time(ours_step(kind, shape, cut, naive=True), 1) * scale
            speedup = f"{ref / ours:.0f}"
        theirs = torch.time(kind, shape, args.repeat) if torch is not None else None
        ratio = torch_ms = "-"
        if theirs is not None:
            ratios["all"].append(ours / theirs)
            if kind == "conv":
                ratios["conv"].append(ours / theirs)
            ratio = f"{ours / theirs:.2f}"
            torch_ms = f"{theirs * 1e3:.2f}"
        print(
            f"{label(kind, shape):<38} {ours * 1e3:8.2f} {gflops:>8} {fwd_time * 1e3:8.2f} "
            f"{fwd_gflops:>8} {share:>6} {speedup:>7} {torch_ms:>9} {ratio:>10}",
            flush=True,
        )
    if torch is not None:
        torch.close()
    print(
        "\nGFLOP/s count a direct convolution's multiply-adds (fwd: 1x, fwd+bwd: 3x).\n%GEMM is "
        "the median over the forward runs of its rate over the rate of a GEMM run just before "
        "it;\n* marks the two largest forward GEMMs."
    )
    for name, values in ratios.items():
        if values:
            gmean = float(np.exp(np.mean(np.log(values))))
            print(f"geometric mean of ours/torch over {len(values)} {name} rows: {gmean:.2f}")
    packed_rows(rows, gemm, gemm_flops, shares, largest, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
