"""Layer benchmark: conv forward+backward and max pooling in float32, against the loop
reference and (when importable) PyTorch's CPU path with 2 threads, measured in the same run.

Usage::

    python bench/layers.py                 # the full table
    python bench/layers.py --repeat 3      # fewer repetitions (noisy machines: keep >= 5)
    python bench/layers.py --no-reference  # skip the slow loop reference

Times are medians of ``--repeat`` runs after one warm-up. The loop reference is timed on a
slice of the problem (one image, at most 4 filters or channels) and scaled linearly to the full
shape: its loops are linear in N and F (C for pooling), so the scaled time is what the full run
would take, without spending minutes on it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

try:  # before cnnserve, so that torch's OpenMP runtime starts with its own default settings
    import torch
except ImportError:
    torch = None

from cnnserve import layers, reference

CONV_SHAPES = [  # (N, C, H, W, F, K, stride, pad)
    (64, 3, 32, 32, 32, 7, 1, 3),
    (64, 32, 32, 32, 64, 3, 1, 1),
    (64, 64, 16, 16, 128, 3, 1, 1),
    (16, 3, 227, 227, 64, 11, 4, 0),
    (1, 512, 12, 12, 4096, 7, 1, 0),
]
POOL_SHAPES = [  # (N, C, H, W, K, stride)
    (64, 64, 32, 32, 2, 2),
    (64, 64, 33, 33, 3, 2),
]
THREADS = 2


def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_torch():
    """The torch module set to ``THREADS`` threads, or None when it is not installed."""
    if torch is not None:
        torch.set_num_threads(THREADS)
    return torch


def conv_flops(N, C, H, W, F, K, stride, pad) -> float:
    """Multiply-adds x 2 of forward (1x) plus backward (dx and dw: 2x)."""
    out = (H + 2 * pad - K) // stride + 1
    return 3 * 2.0 * N * F * out * out * C * K * K


def bench_conv(shape, repeat, torch, with_reference) -> dict:
    N, C, H, W, F, K, stride, pad = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W), dtype=np.float32)
    w = rng.standard_normal((F, C, K, K), dtype=np.float32) * 0.1
    b = rng.standard_normal(F, dtype=np.float32)
    param = {"stride": stride, "pad": pad}
    out, _ = layers.conv_forward(x, w, b, param)
    dout = rng.standard_normal(out.shape, dtype=np.float32)

    def ours():
        _, cache = layers.conv_forward(x, w, b, param)
        layers.conv_backward(dout, cache)

    row = {"ours": median_time(ours, repeat)}
    row["gflops"] = conv_flops(*shape) / row["ours"] / 1e9
    row["fwd"] = median_time(lambda: layers.conv_forward(x, w, b, param), repeat)

    if with_reference:
        f_slice = min(F, 4)
        xs, ws, bs = x[:1], w[:f_slice], b[:f_slice]
        ds = dout[:1, :f_slice]

        def ref():
            _, cache = reference.conv_forward_naive(xs, ws, bs, param)
            reference.conv_backward_naive(ds, cache)

        row["reference"] = median_time(ref, 1) * N * (F / f_slice)

    if torch is not None:
        tx = torch.from_numpy(x).requires_grad_(True)
        tw = torch.from_numpy(w).requires_grad_(True)
        tb = torch.from_numpy(b).requires_grad_(True)
        tdout = torch.from_numpy(dout)

        def theirs():
            y = torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=pad)
            y.backward(tdout)
            tx.grad = tw.grad = tb.grad = None

        row["torch"] = median_time(theirs, repeat)
    return row


def bench_pool(shape, repeat, torch, with_reference) -> dict:
    N, C, H, W, K, stride = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W), dtype=np.float32)
    param = {"pool_height": K, "pool_width": K, "stride": stride}
    out, _ = layers.max_pool_forward(x, param)
    dout = rng.standard_normal(out.shape, dtype=np.float32)

    def ours():
        _, cache = layers.max_pool_forward(x, param)
        layers.max_pool_backward(dout, cache)

    row = {"ours": median_time(ours, repeat)}
    row["fwd"] = median_time(lambda: layers.max_pool_forward(x, param), repeat)
    if with_reference:
        c_slice = min(C, 4)

        def ref():
            _, cache = reference.max_pool_forward_naive(x[:1, :c_slice], param)
            reference.max_pool_backward_naive(dout[:1, :c_slice], cache)

        row["reference"] = median_time(ref, 1) * N * (C / c_slice)
    if torch is not None:
        tx = torch.from_numpy(x).requires_grad_(True)
        tdout = torch.from_numpy(dout)

        def theirs():
            y = torch.nn.functional.max_pool2d(tx, K, stride)
            y.backward(tdout)
            tx.grad = None

        row["torch"] = median_time(theirs, repeat)
    return row


def describe_machine(torch) -> list[str]:
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, numpy {np.__version__}",
    ]
    try:
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            lines.append(
                f"  {pool['user_api']}: {pool['internal_api']} {pool.get('version')} "
                f"({pool['num_threads']} threads, {pool.get('architecture', '?')})"
            )
    except ImportError:
        lines.append("  (pip install threadpoolctl to list the BLAS and OpenMP pools)")
    if torch is not None:
        lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    else:
        lines.append("torch: not installed, no comparison column")
    return lines


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:9.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per row (median)")
    parser.add_argument("--no-reference", action="store_true", help="skip the loop reference")
    args = parser.parse_args(argv)
    torch = load_torch()
    print("\n".join(describe_machine(torch)))
    with_ref = not args.no_reference

    header = (
        f"{'layer (float32, fwd+bwd)':<38} {'ms':>9} {'fwd ms':>9} {'GFLOP/s':>8} "
        f"{'ref x':>9} {'torch ms':>9} {'ours/torch':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    ratios = []
    rows = [("conv", s) for s in CONV_SHAPES] + [("pool", s) for s in POOL_SHAPES]
    for kind, shape in rows:
        if kind == "conv":
            N, C, H, W, F, K, stride, pad = shape
            label = f"conv {N}x{C}x{H}x{W} F{F} {K}x{K} s{stride} p{pad}"
            row = bench_conv(shape, args.repeat, torch, with_ref)
            gflops = f"{row['gflops']:8.1f}"
        else:
            N, C, H, W, K, stride = shape
            label = f"maxpool {N}x{C}x{H}x{W} {K}x{K} s{stride}"
            row = bench_pool(shape, args.repeat, torch, with_ref)
            gflops = f"{'-':>8}"
        speedup = f"{row['reference'] / row['ours']:9.0f}" if "reference" in row else f"{'-':>9}"
        ratio = row["ours"] / row["torch"] if "torch" in row else None
        if ratio is not None:
            ratios.append(ratio)
        print(
            f"{label:<38} {fmt_ms(row['ours'])} {fmt_ms(row['fwd'])} {gflops} {speedup} "
            f"{fmt_ms(row.get('torch'))} {'-' if ratio is None else f'{ratio:10.2f}':>10}",
            flush=True,
        )
    if ratios:
        gmean = float(np.exp(np.mean(np.log(ratios))))
        print(f"\ngeometric mean of ours/torch over {len(ratios)} rows: {gmean:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
