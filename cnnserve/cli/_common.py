"""What the ``cnnserve`` commands share: exit codes, the one-line error, argument types and
checks of output paths. A private helper module of :mod:`cnnserve.cli`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "int_in_range",
    "EXIT_ERROR",
    "EXIT_FAILED",
    "CommandError",
    "add_model_limits",
    "check_output",
    "check_target",
    "flag",
    "make_directory",
    "positive_int",
    "size",
]

EXIT_ERROR = 2  # a problem with the input, as argparse uses for usage errors
EXIT_FAILED = 1  # the work itself failed (training diverged)


class CommandError(Exception):
    """An error to report in one line, without a traceback."""


def flag(name: str) -> str:
    """An option's name as its flag: ``lr_decay`` -> ``--lr-decay``."""
    return "--" + name.replace("_", "-")


def check_output(out: Path) -> None:
    """Refuse an --out that training could not write, before spending time on training."""
    if out.suffix != ".safetensors":
        raise CommandError(f"--out must end in .safetensors, got {out}")
    if out.is_dir():
        raise CommandError(f"--out {out} is a directory; give a file name ending in .safetensors")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise CommandError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"--out {out}: no permission to write in {parent}")


def make_directory(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the directories it created, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    for path in missing:
        path.mkdir()
    return missing


def check_target(option: str, path: Path) -> None:
    """An output file of ``--option``: its directory exists and it is not a directory."""
    if path.is_dir():
        raise CommandError(f"--{option} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise CommandError(f"--{option} {path}: directory {path.parent} not found")


def size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. 96x192) as a pair of ints."""
    try:
        h, w = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be HxW, e.g. 96x192, got {text!r}") from exc
    return h, w


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an int from ``low`` to ``high``, inclusive."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message for a non-integer
    return parse


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (its errors name no internal function)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_limits(parser: argparse.ArgumentParser) -> None:
    """``--max-model-pixels/-params/-layers``: what a model file may declare."""
    from cnnserve.modelfile import MAX_MODEL_LAYERS, MAX_MODEL_PARAMS, MAX_MODEL_PIXELS

    parser.add_argument(
        "--max-model-pixels",
        type=positive_int,
        help=f"largest training input H*W a model file may declare (default {MAX_MODEL_PIXELS:,})",
    )
    parser.add_argument(
        "--max-model-params",
        type=positive_int,
        help=f"most parameters a model file may declare (default {MAX_MODEL_PARAMS:,})",
    )
    parser.add_argument(
        "--max-model-layers",
        type=positive_int,
        help=f"most layers a model file may declare (default {MAX_MODEL_LAYERS:,})",
    )
