"""The ``cnnserve`` command: train, evaluate and inspect models.

Run ``cnnserve --help`` or ``cnnserve COMMAND --help`` for the options. Errors in what the
user gave (a missing data file, a corrupt model, an impossible architecture) print one line,
``cnnserve COMMAND: error: ...``, and exit with status 2; training that diverges exits with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

EXIT_ERROR = 2  # a problem with the input, as argparse uses for usage errors
EXIT_FAILED = 1  # the work itself failed (training diverged)


class CommandError(Exception):
    """An error to report in one line, without a traceback."""


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def _architecture(arch: str, input_shape: tuple[int, int, int]) -> tuple[list[dict], str]:
    """Layer specs from a preset name or a JSON file (a list of specs or {"layers": [...]})."""
    from cnnserve.model import PRESETS, preset_layers

    if arch in PRESETS:
        return preset_layers(arch, input_shape), arch
    path = Path(arch)
    if not path.is_file():
        raise CommandError(
            f"--arch {arch!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"--arch {path}: not a readable JSON file: {exc}") from exc
    if isinstance(spec, dict):
        spec = spec.get("layers")
    if not isinstance(spec, list):
        raise CommandError(f'--arch {path}: expected a list of layer specs or {{"layers": [...]}}')
    return spec, str(path)


def _add_data_options(parser: argparse.ArgumentParser, *, training: bool) -> None:
    """--data and the split options.

    Every default is None here: ``train`` fills in its defaults (or a resumed run's values),
    ``evaluate`` the values the model file records.
    """
    group = parser.add_argument_group("data")
    later = (
        "default: the checkpoint's with --resume"
        if training
        else "default: the data the model was trained on"
    )
    group.add_argument(
        "--data",
        help="'digits' (scikit-learn's bundled 8x8 digits) or a path: an MNIST/Fashion-MNIST "
        "IDX directory, a CIFAR-10 python batches directory, or an image folder "
        f"(root/<class>/*.png); {later}",
    )
    group.add_argument(
        "--data-format",
        choices=["digits", "idx", "cifar10", "folder"],
        help="the data format (default: detected from the path's contents)",
    )
    default = " (default {})" if training else " (default: as in training)"
    group.add_argument(
        "--seed",
        type=int,
        help="seed of the train/val/test split"
        + (", the initial weights and the batch order" if training else "")
        + default.format(0),
    )
    group.add_argument(
        "--val-fraction",
        type=float,
        help="fraction held out for validation" + default.format(0.1),
    )
    group.add_argument(
        "--test-fraction",
        type=float,
        help="fraction held out for testing, from digits and image folders (IDX and CIFAR-10 "
        "come with a test part)" + default.format(0.2),
    )


_SPLIT_DEFAULTS = {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.2}


def _load_data(args: argparse.Namespace, dtype: Any, defaults: dict | None = None) -> Any:
    """Load ``--data`` with the split options, missing ones taken from ``defaults``.

    ``defaults`` (a model's training record) apply only when ``--data`` names the data set
    the record names, or is absent.
    """
    from cnnserve.data import load_dataset

    defaults = dict(defaults or {})
    if not _same_source(args.data, defaults.get("dataset")):
        defaults = {}  # another data set: the training split options do not apply
    source = args.data or defaults.get("dataset")
    if source is None:
        raise CommandError("--data is required: the model file does not name its data set")
    options: dict[str, Any] = {"format": args.data_format or defaults.get("data_format")}
    for key, fallback in _SPLIT_DEFAULTS.items():
        value = getattr(args, key)
        options[key] = value if value is not None else defaults.get(key, fallback)
    if defaults and args.seed is not None and args.seed != defaults.get("seed", 0):
        print(
            f"note: the model was trained on the split of seed {defaults.get('seed', 0)}; with "
            f"--seed {args.seed} the held-out images overlap its training images",
            file=sys.stderr,
        )
    limit = getattr(args, "limit", None)
    if limit is not None:
        options["limit"] = limit
    return load_dataset(source, dtype=dtype, **options)


def _accuracy(model: Any, X: np.ndarray, y: np.ndarray) -> float | None:
    """Accuracy of ``model`` on ``(X, y)``, or None for an empty split."""
    return float(np.mean(model.predict(X) == y)) if len(y) else None


def _same_source(given: str | None, recorded: str | None) -> bool:
    """True if ``--data given`` names the data set a model file records as ``recorded``."""
    if given is None or recorded is None:
        return given is None
    if given.lower() == "digits" or recorded == "digits":
        return given.lower() == recorded
    return Path(given).resolve() == Path(recorded).resolve()


# Training options: their defaults, and the name of each in a checkpoint's solver options.
TRAIN_DEFAULTS = {
    "arch": "digits",
    "epochs": 10,
    "batch_size": 50,
    "update_rule": "adam",
    "lr": 1e-3,
    "lr_decay": 1.0,
    "reg": 0.0,
    "weight_scale": None,
    "dtype": "float32",
    "train_samples": 1000,
}
# Options fixed by a checkpoint: a resumed run must keep them to continue the same run.
_RESUME_FIXED = {
    "batch_size": lambda o, r: o["batch_size"],
    "update_rule": lambda o, r: o["update_rule"],
    "lr": lambda o, r: (o["optim_config"] or {}).get("learning_rate"),
    "lr_decay": lambda o, r: o["lr_decay"],
    "train_samples": lambda o, r: o["num_train_samples"],
    "seed": lambda o, r: o["seed"],
    "arch": lambda o, r: r.get("architecture"),
    "reg": lambda o, r: r.get("reg"),
    "weight_scale": lambda o, r: r.get("weight_scale"),
    "dtype": lambda o, r: r.get("dtype"),
    "limit": lambda o, r: r.get("limit"),
    "val_fraction": lambda o, r: r.get("val_fraction"),
    "test_fraction": lambda o, r: r.get("test_fraction"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resume_options(args: argparse.Namespace) -> tuple[Any, dict]:
    """The checkpoint ``--resume`` names, and the options of the run it continues.

    A flag given again must have the value the run started with; flags not given take it.
    """
    from cnnserve.model import read_model_file

    file = read_model_file(args.resume)
    state = file.state if isinstance(file.state, dict) else {}
    saved, record = state.get("options"), file.training
    if not isinstance(saved, dict) or "record" not in saved:
        raise CommandError(
            f"--resume {args.resume} is not a checkpoint written by `cnnserve train` (no "
            "solver state); start a new run instead"
        )
    if args.epochs is None:
        args.epochs = saved["num_epochs"]  # finish the run as planned
    conflicts = []
    for name, read in _RESUME_FIXED.items():
        was, given = read(saved, record), getattr(args, name, None)
        if given is None:
            setattr(args, name, was)
        elif given != was:
            conflicts.append(f"{_flag(name)} {given} (the run has {was})")
    if args.data is None:
        args.data = record.get("dataset")
        args.data_format = args.data_format or record.get("data_format")
    elif not _same_source(args.data, record.get("dataset")):
        conflicts.append(f"--data {args.data} (the run has {record.get('dataset')})")
    if conflicts:
        raise CommandError(
            f"--resume {args.resume}: a resumed run keeps the options it started with; "
            f"{'; '.join(conflicts)}. Leave them out, or start a new run to change them"
        )
    return file, record


def _check_output(out: Path) -> None:
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


def _make_directory(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the directories it created, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    for path in missing:
        path.mkdir()
    return missing


def _cmd_train(args: argparse.Namespace) -> int:
    from cnnserve.model import ConvNet, save_model
    from cnnserve.solver import Solver

    out = Path(args.out)
    _check_output(out)
    checkpoint = Path(args.checkpoint or f"{out.with_suffix('')}_checkpoint")
    if checkpoint.suffix == ".safetensors":
        checkpoint = checkpoint.with_suffix("")  # the Solver adds it
    resumed = _resume_options(args) if args.resume else None
    if args.data is None:
        raise CommandError("--data is required (or --resume a checkpoint that names its data)")
    for name, default in {**TRAIN_DEFAULTS, **_SPLIT_DEFAULTS}.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    dtype = np.dtype(args.dtype)
    started = time.perf_counter()
    data = _load_data(args, dtype)
    print(data.summary(), flush=True)
    if resumed is not None:
        model = resumed[0].model
        if model.input_shape != data.input_shape or model.num_classes != data.num_classes:
            raise CommandError(
                f"--resume {args.resume}: the checkpoint's model takes {model.input_shape} with "
                f"{model.num_classes} classes, the data is {data.input_shape} with "
                f"{data.num_classes}"
            )
    else:
        layers, args.arch = _architecture(args.arch, data.input_shape)
        model = ConvNet(
            layers,
            data.input_shape,
            data.num_classes,
            weight_scale=args.weight_scale,
            reg=args.reg,
            dtype=dtype,
            seed=args.seed,
            class_names=list(data.class_names),
            normalization={"mean": data.mean.tolist(), "std": data.std.tolist()},
        )
    print(model.summary(), flush=True)
    record = {
        "dataset": data.name,
        "data_format": data.format,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "limit": args.limit,
        "num_train": int(len(data.y_train)),
        "num_val": int(len(data.y_val)),
        "num_test": int(len(data.y_test)),
        "architecture": args.arch,
        "dtype": dtype.name,
        "reg": model.reg,
        "weight_scale": args.weight_scale,
        "batch_size": args.batch_size,
        "update_rule": args.update_rule,
        "learning_rate": args.lr,
        "lr_decay": args.lr_decay,
    }
    created = _make_directory(checkpoint.parent) + _make_directory(out.parent)
    try:
        solver = Solver(
            model,
            data.solver_data(),
            update_rule=args.update_rule,
            optim_config={"learning_rate": args.lr},
            lr_decay=args.lr_decay,
            batch_size=args.batch_size,
            num_epochs=args.epochs,
            num_train_samples=args.train_samples,
            checkpoint_name=str(checkpoint),
            print_every=10**9,
            verbose=not args.quiet,
            progress=not args.quiet,
            seed=args.seed,
            record=record,
            resume=args.resume,
        )
    except BaseException:
        for folder in reversed(created):  # leave nothing behind for a run that never started
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    solver.train()
    accuracy = {
        "train_acc": _accuracy(model, data.X_train, data.y_train),
        "val_acc": _accuracy(model, data.X_val, data.y_val),
        "test_acc": _accuracy(model, data.X_test, data.y_test),
    }
    record.update(
        epochs=args.epochs,
        best_val_acc=solver.best_val_acc,
        best_epoch=solver.best_epoch,
        **accuracy,
        train_seconds=round(time.perf_counter() - started, 1),
    )
    save_model(model, out, training={k: v for k, v in record.items() if v is not None})
    history = out.with_name(out.stem + "_history.json")
    solver.save_history(history)
    solver.plot_history(history.with_suffix(".png"))
    shown = {k: "n/a" if v is None else f"{v:.4f}" for k, v in accuracy.items()}
    print(
        f"train accuracy {shown['train_acc']}, val {shown['val_acc']}, "
        f"test {shown['test_acc']} ({record['train_seconds']} s)"
    )
    print(f"wrote {out}, {history} and {history.with_suffix('.png')}")
    return 0


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def _renormalised(model: Any, data: Any, X: np.ndarray) -> np.ndarray:
    """The split ``X`` normalised with the model's statistics instead of the data set's."""
    x01 = X.astype(np.float64) * data.std[:, None, None] + data.mean[:, None, None]
    return model.preprocess(x01)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``m[i, j]`` of samples of class ``i`` predicted as ``j``: (K, K) int64."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def format_confusion(matrix: np.ndarray, names: Sequence[str]) -> str:
    """The confusion matrix as a text table, true classes down, predictions across."""
    labels = [str(n)[:10] for n in names]
    width = max(max(len(s) for s in labels), len(str(int(matrix.max()))), 4)
    head = " " * (width + 2) + " ".join(f"{s:>{width}}" for s in labels)
    lines = ["true \\ predicted", head]
    for label, row in zip(labels, matrix, strict=True):
        lines.append(f"{label:>{width}}  " + " ".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnserve.model import read_model_file

    file = read_model_file(args.model)
    model, record = file.model, file.training
    data = _load_data(args, model.dtype, defaults=record)
    if data.input_shape != model.input_shape or data.num_classes != model.num_classes:
        raise CommandError(
            f"{args.model} takes {model.input_shape} images of {model.num_classes} classes, "
            f"but {data.name} holds {data.input_shape} images of {data.num_classes} classes"
        )
    X, y = getattr(data, f"X_{args.split}"), getattr(data, f"y_{args.split}")
    if len(y) == 0:
        raise CommandError(f"the {args.split} split of {data.name} is empty")
    predicted = model.predict(_renormalised(model, data, X))
    accuracy = float(np.mean(predicted == y))
    matrix = confusion_matrix(y, predicted, model.num_classes)
    if args.json:
        result = {
            "model": str(args.model),
            "dataset": data.name,
            "split": args.split,
            "samples": int(len(y)),
            "accuracy": accuracy,
            "class_names": list(model.class_names),
            "confusion_matrix": matrix.tolist(),
        }
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model} on the {args.split} split of {data.name} ({len(y)} images)")
        print(f"accuracy: {accuracy:.4f} ({int(np.sum(predicted == y))}/{len(y)})")
        print(format_confusion(matrix, model.class_names))
    return 0


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    from cnnserve.model import read_model_file

    file = read_model_file(args.model)
    model = file.model
    if args.json:
        info = {
            "model": str(args.model),
            "architecture": model.config(),
            "input_shape": list(model.input_shape),
            "class_names": list(model.class_names),
            "normalization": model.normalization,
            "parameters": model.num_parameters(),
            "training": file.training,
        }
        print(json.dumps(info, indent=2))
        return 0
    size = Path(args.model).stat().st_size
    print(f"{args.model} ({size:,} bytes)")
    print(f"input shape (C, H, W): {model.input_shape}, dtype {np.dtype(model.dtype).name}")
    print(f"classes ({model.num_classes}): {', '.join(model.class_names)}")
    if model.normalization:
        mean = ", ".join(f"{v:.4f}" for v in model.normalization["mean"])
        std = ", ".join(f"{v:.4f}" for v in model.normalization["std"])
        print(f"input normalisation: mean [{mean}], std [{std}] (of [0, 1] pixels)")
    print(model.summary())
    if file.training:
        print("training record:")
        for key, value in file.training.items():
            text = f"{value:.6g}" if isinstance(value, float) else value
            print(f"  {key}: {text}")
    if file.state is not None:
        print("(a solver checkpoint: it also holds the optimizer state to resume training)")
    return 0


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cnnserve`` command."""
    from cnnserve import __version__

    parser = argparse.ArgumentParser(
        prog="cnnserve",
        description="Train, inspect and serve small convolutional networks.",
    )
    parser.add_argument("--version", action="version", version=f"cnnserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a network and save it as a model file",
        description="Train a network on a data set and save it to a .safetensors model file, "
        "with a checkpoint after every epoch and the history as JSON and PNG beside it.",
    )
    _add_data_options(train, training=True)
    train.add_argument("--limit", type=_positive_int, help="use at most this many training images")
    train.add_argument(
        "--arch", help="a preset (digits, three_layer, lenet) or a JSON file (default digits)"
    )
    train.add_argument("--epochs", type=_positive_int, help="epochs in all (default 10)")
    train.add_argument("--batch-size", type=_positive_int, help="default 50")
    train.add_argument(
        "--update-rule",
        choices=["sgd", "sgd_momentum", "rmsprop", "adam"],
        help="default adam",
    )
    train.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    train.add_argument("--lr-decay", type=float, help="learning-rate factor per epoch (default 1)")
    train.add_argument("--reg", type=float, help="L2 strength: 0.5*reg*sum(W**2) (default 0)")
    train.add_argument("--weight-scale", type=float, help="initial weight std (default: He)")
    train.add_argument("--dtype", choices=["float32", "float64"], help="default float32")
    train.add_argument(
        "--train-samples",
        type=_positive_int,
        help="training images used for the per-epoch training accuracy (default 1000)",
    )
    train.add_argument("--out", required=True, help="the model file to write (.safetensors)")
    train.add_argument(
        "--checkpoint",
        help="checkpoint name, written as NAME.safetensors after every epoch "
        "(default: OUT without suffix + '_checkpoint')",
    )
    train.add_argument(
        "--resume",
        help="continue the run a checkpoint file holds (its options apply; give --epochs for "
        "the new total)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy and confusion matrix of a model on a data split",
        description="Evaluate a model file on a split of a data set (by default the held-out "
        "test split of the data it was trained on, split as in training).",
    )
    evaluate.add_argument("model", help="a .safetensors model file")
    _add_data_options(evaluate, training=False)
    evaluate.add_argument("--split", choices=["train", "val", "test"], default="test")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.set_defaults(handler=_cmd_evaluate)

    info = commands.add_parser(
        "info",
        help="architecture, shapes, parameter count and training record of a model file",
    )
    info.add_argument("model", help="a .safetensors model file")
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    info.set_defaults(handler=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cnnserve`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from cnnserve.data import DataError
    from cnnserve.model import ModelFileError
    from cnnserve.solver import TrainingDiverged

    prefix = f"cnnserve {args.command}: error:"
    try:
        status = args.handler(args)
        sys.stdout.flush()  # here, so that a closed pipe is handled below, not at exit
        return status
    except TrainingDiverged as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (CommandError, DataError, ModelFileError, ValueError, TypeError) as exc:
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
