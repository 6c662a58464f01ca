"""The ``cnnserve`` command: train, evaluate, inspect, convert, import and export models; dense
score maps; pictures of the activations and filters.

Run ``cnnserve --help`` or ``cnnserve COMMAND --help`` for the options. Errors in what the
user gave (a missing data file, a corrupt model, an impossible architecture) print one line,
``cnnserve COMMAND: error: ...``, and exit with status 2; training that diverges exits with 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cnnserve.cli import detect, inside, interchange, maps, models, serve, train
from cnnserve.cli._common import EXIT_ERROR, EXIT_FAILED, CommandError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cnnserve`` command: each command adds its own."""
    from cnnserve import __version__

    parser = argparse.ArgumentParser(
        prog="cnnserve",
        description="Train, inspect and serve small convolutional networks.",
    )
    parser.add_argument("--version", action="version", version=f"cnnserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        train.add_train,
        train.add_evaluate,
        models.add_info,
        models.add_convert,
        interchange.add_import,
        interchange.add_export,
        maps.add_scoremap,
        maps.add_predict,
        detect.add_detect,
        inside.add_activations,
        inside.add_filters,
        serve.add_serve,
        maps.add_demo,
    ):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cnnserve`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from cnnserve.data import DataError
    from cnnserve.images import ImageError
    from cnnserve.modelfile import ModelFileError
    from cnnserve.solver import TrainingDiverged

    prefix = f"cnnserve {args.command}: error:"
    try:
        status = args.handler(args)
        sys.stdout.flush()  # here, so that a closed pipe is handled below, not at exit
        return status
    except TrainingDiverged as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (CommandError, DataError, ImageError, ModelFileError, ValueError, TypeError) as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `cnnserve evaluate ... | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except OSError as exc:  # a file the command had to write or read: permissions, disk full
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"cnnserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
