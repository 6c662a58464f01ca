"""Helpers shared by the benchmark scripts (standard library only: the parents import nothing
heavy)."""

from __future__ import annotations

import platform

__all__ = ["cpu_model", "ms"]


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
