"""The ``cnnserve`` command: train, evaluate and inspect models.

Run ``cnnserve --help`` or ``cnnserve COMMAND --help`` for the options. Errors in what the
user gave (a missing data file, a corrupt model, an impossible architecture) print one line,
``cnnserve COMMAND: error: ...``, and exit with status 2; training that diverges exits with 1.
"""

from __future__ import annotations

import argparse
import json
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


def _add_data_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """--data and the split options; without ``required`` they default to the model's record."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        required=required,
        help="'digits' (scikit-learn's bundled 8x8 digits) or a path: an MNIST/Fashion-MNIST "
        "IDX directory, a CIFAR-10 python batches directory, or an image folder "
        "(root/<class>/*.png)" + ("" if required else "; default: the model's training data"),
    )
    group.add_argument(
        "--data-format",
        choices=["digits", "idx", "cifar10", "folder"],
        help="the data format (default: detected from the path's contents)",
    )
    inherit = "" if required else " (default: as in training)"
    group.add_argument(
        "--seed",
        type=int,
        default=0 if required else None,
        help="seed of the train/val/test split, the initial weights and the batch order"
        + (" (default 0)" if required else inherit),
    )
    group.add_argument(
        "--val-fraction",
        type=float,
        default=0.1 if required else None,
        help="fraction held out for validation" + (" (default 0.1)" if required else inherit),
    )
    group.add_argument(
        "--test-fraction",
        type=float,
        default=0.2 if required else None,
        help="fraction held out for testing (digits and image folders; IDX and CIFAR-10 have "
        "a test part)" + (" (default 0.2)" if required else inherit),
    )


def _load_data(args: argparse.Namespace, dtype: Any, defaults: dict | None = None) -> Any:
    from cnnserve.data import load_dataset

    defaults = defaults or {}
    if args.data is not None and args.data != defaults.get("dataset"):
        defaults = {}  # another data set: the training split options do not apply
    source = args.data or defaults.get("dataset")
    if source is None:
        raise CommandError("--data is required: the model file does not name its data set")
    options = {
        "format": args.data_format or defaults.get("data_format"),
        "seed": args.seed if args.seed is not None else defaults.get("seed", 0),
        "dtype": dtype,
    }
    for key in ("val_fraction", "test_fraction"):
        value = getattr(args, key)
        if value is None:
            value = defaults.get(key)
        if value is not None:
            options[key] = value
    if getattr(args, "limit", None) is not None:
        options["limit"] = args.limit
    return load_dataset(source, **options)


def _accuracy(model: Any, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(X) == y)) if len(y) else float("nan")


def _cmd_train(args: argparse.Namespace) -> int:
    from cnnserve.model import ConvNet, read_model_file, save_model
    from cnnserve.solver import Solver

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise CommandError(f"--out must end in .safetensors, got {out}")
    dtype = np.dtype(args.dtype)
    started = time.perf_counter()
    data = _load_data(args, dtype)
    print(data.summary(), flush=True)
    if args.resume:
        model = read_model_file(args.resume).model
        arch_name = "resumed from " + args.resume
        if model.input_shape != data.input_shape or model.num_classes != data.num_classes:
            raise CommandError(
                f"--resume {args.resume}: the checkpoint's model takes {model.input_shape} with "
                f"{model.num_classes} classes, the data is {data.input_shape} with "
                f"{data.num_classes}"
            )
    else:
        layers, arch_name = _architecture(args.arch, data.input_shape)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or str(out.with_suffix("")) + "_checkpoint"
    solver = Solver(
        model,
        data.solver_data(),
        update_rule=args.update_rule,
        optim_config={"learning_rate": args.lr},
        lr_decay=args.lr_decay,
        batch_size=args.batch_size,
        num_epochs=args.epochs,
        num_train_samples=args.train_samples,
        checkpoint_name=checkpoint,
        print_every=10**9,
        verbose=not args.quiet,
        progress=not args.quiet,
        seed=args.seed,
        resume=args.resume,
    )
    solver.train()
    accuracy = {
        "train_acc": _accuracy(model, data.X_train, data.y_train),
        "val_acc": _accuracy(model, data.X_val, data.y_val),
        "test_acc": _accuracy(model, data.X_test, data.y_test),
    }
    record = {
        "dataset": data.name,
        "data_format": data.format,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "num_train": int(len(data.y_train)),
        "num_val": int(len(data.y_val)),
        "num_test": int(len(data.y_test)),
        "architecture": arch_name,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "update_rule": args.update_rule,
        "learning_rate": args.lr,
        "lr_decay": args.lr_decay,
        "reg": model.reg,
        "best_val_acc": float(solver.best_val_acc),
        **accuracy,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    record = {key: value for key, value in record.items() if value is not None}
    save_model(model, out, training=record)
    history = out.with_name(out.stem + "_history.json")
    solver.save_history(history)
    from cnnserve.history import plot_history

    plot_history(json.loads(history.read_text()), history.with_suffix(".png"))
    print(
        f"train accuracy {accuracy['train_acc']:.4f}, val {accuracy['val_acc']:.4f}, "
        f"test {accuracy['test_acc']:.4f} ({record['train_seconds']} s)"
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
    _add_data_options(train, required=True)
    train.add_argument("--limit", type=_positive_int, help="use at most this many training images")
    train.add_argument(
        "--arch", default="digits", help="a preset (digits, three_layer, lenet) or a JSON file"
    )
    train.add_argument("--epochs", type=_positive_int, default=10)
    train.add_argument("--batch-size", type=_positive_int, default=50)
    train.add_argument(
        "--update-rule", default="adam", choices=["sgd", "sgd_momentum", "rmsprop", "adam"]
    )
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    train.add_argument("--lr-decay", type=float, default=1.0, help="per-epoch factor")
    train.add_argument("--reg", type=float, default=0.0, help="L2 strength: 0.5*reg*sum(W**2)")
    train.add_argument("--weight-scale", type=float, help="init std (default: He)")
    train.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    train.add_argument(
        "--train-samples",
        type=_positive_int,
        default=1000,
        help="training images used for the per-epoch training accuracy (default 1000)",
    )
    train.add_argument("--out", required=True, help="the model file to write (.safetensors)")
    train.add_argument(
        "--checkpoint",
        help="checkpoint name, written as NAME.safetensors after every epoch "
        "(default: OUT without suffix + '_checkpoint')",
    )
    train.add_argument("--resume", help="continue from this checkpoint file")
    train.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy and confusion matrix of a model on a data split",
        description="Evaluate a model file on a split of a data set (by default the held-out "
        "test split of the data it was trained on, split as in training).",
    )
    evaluate.add_argument("model", help="a .safetensors model file")
    _add_data_options(evaluate, required=False)
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
        return args.handler(args)
    except TrainingDiverged as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (CommandError, DataError, ModelFileError, ValueError, TypeError) as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"cnnserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
