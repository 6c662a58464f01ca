"""Helpers shared by the benchmark scripts (standard library only: the parents import nothing
heavy)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

__all__ = ["cpu_model", "median_time", "ms"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds with one decimal, or ``-`` for None."""
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def median_time(
    fn: Callable[[], object], repeat: int, warmup: Callable[[], object] | None = None
) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeat`` runs, after one warm-up run:
    of ``warmup`` when given (a run that must not count, on other inputs), else of ``fn``."""
    (fn if warmup is None else warmup)()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


#: An AlexNet-style padding-free network (input 3 x 227 x 227): bench/dense.py, bench/inference.py.
ALEXNET = [
    {"type": "conv", "filters": 96, "size": 11, "stride": 4, "pad": 0},
    {"type": "relu"},
    {"type": "max_pool", "size": 3, "stride": 2},
    {"type": "conv", "filters": 256, "size": 5, "stride": 1, "pad": 0},
    {"type": "relu"},
    {"type": "max_pool", "size": 3, "stride": 2},
    {"type": "conv", "filters": 384, "size": 3, "stride": 1, "pad": 0},
    {"type": "relu"},
    {"type": "conv", "filters": 384, "size": 3, "stride": 1, "pad": 0},
    {"type": "relu"},
    {"type": "conv", "filters": 256, "size": 3, "stride": 1, "pad": 0},
    {"type": "relu"},
    {"type": "max_pool", "size": 3, "stride": 2},
    {"type": "affine", "units": 4096},
    {"type": "relu"},
    {"type": "dropout", "keep": 0.5},
    {"type": "affine", "units": 4096},
    {"type": "relu"},
    {"type": "dropout", "keep": 0.5},
]
