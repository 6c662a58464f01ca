"""The ``cnnserve`` command: train, evaluate, inspect and convert models; dense score maps.

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

from cnnserve._files import atomic_write_bytes

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
        "canvases of those digits, with a background class: detector training data) or a "
        "path: an MNIST/Fashion-MNIST IDX directory, a CIFAR-10 python batches directory, or "
        f"an image folder (root/<class>/*.png); {later}",
    )
    group.add_argument(
        "--data-format",
        choices=["digits", "digits-windows", "idx", "cifar10", "folder"],
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
    return load_dataset(source, dtype=dtype, **options)


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
# The flags that are Solver options: a resumed run keeps them (the Solver's rule, in
# cnnserve.solver.resume_conflicts), and flags not given take the run's values.
_SOLVER_FLAGS = {
    "batch_size": "batch_size",
    "update_rule": "update_rule",
    "lr": "optim_config",
    "lr_decay": "lr_decay",
    "train_samples": "num_train_samples",
    "seed": "seed",
}
# The flags that shape the model and its data, kept in the run's training record: a resumed
# run keeps them too.
_RECORD_FLAGS = ("arch", "reg", "weight_scale", "dtype", "limit", "val_fraction", "test_fraction")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_value(flag: str, options: dict) -> Any:
    """A Solver option of a checkpoint as the flag's value (``--lr`` is a learning rate)."""
    value = options.get(_SOLVER_FLAGS[flag])
    return (value or {}).get("learning_rate") if flag == "lr" else value


def _resume_options(args: argparse.Namespace) -> tuple[Any, dict]:
    """The checkpoint ``--resume`` names, and the options of the run it continues.

    A flag given again must have the value the run started with; flags not given take it.
    """
    from cnnserve.data import same_source
    from cnnserve.modelfile import read_model_file
    from cnnserve.solver import resume_conflicts

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
    given = {}
    for flag, option in _SOLVER_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            given[option] = {"learning_rate": value} if flag == "lr" else value
    clashing = {key for key, _, _ in resume_conflicts(given, saved)}
    conflicts = [
        f"{_flag(flag)} {getattr(args, flag)} (the run has {_flag_value(flag, saved)})"
        for flag, option in _SOLVER_FLAGS.items()
        if option in clashing
    ]
    for flag in _SOLVER_FLAGS:
        if getattr(args, flag) is None:
            setattr(args, flag, _flag_value(flag, saved))
    for flag in _RECORD_FLAGS:
        was = record.get("architecture" if flag == "arch" else flag)
        given_value = getattr(args, flag)
        if given_value is None:
            setattr(args, flag, was)
        elif given_value != was:
            conflicts.append(f"{_flag(flag)} {given_value} (the run has {was})")
    if args.data is None:
        args.data = record.get("dataset")
        args.data_format = args.data_format or record.get("data_format")
    elif not same_source(args.data, record.get("dataset")):
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
    from cnnserve.evaluate import accuracy as split_accuracy
    from cnnserve.modelfile import save_model
    from cnnserve.network import ConvNet
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
        "train_acc": split_accuracy(model, data.X_train, data.y_train),
        "val_acc": split_accuracy(model, data.X_val, data.y_val),
        "test_acc": split_accuracy(model, data.X_test, data.y_test),
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


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    from cnnserve.modelfile import FCN_FORMAT_NAME, read_metadata, read_model_file

    if read_metadata(args.model).get("format") == FCN_FORMAT_NAME:
        return _info_converted(args)
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


def _info_converted(args: argparse.Namespace) -> int:
    from cnnserve.convert import load_fully_convolutional

    fcn = load_fully_convolutional(args.model)
    if args.json:
        info = {"model": str(args.model), "converted": True, **fcn.to_dict()}
        info["architecture"] = fcn.config
        info["training"] = fcn.training
        print(json.dumps(info, indent=2))
        return 0
    size = Path(args.model).stat().st_size
    print(f"{args.model} ({size:,} bytes): a converted (fully convolutional) network")
    print(f"training input shape (C, H, W): {fcn.input_shape}, dtype {fcn.dtype.name}")
    print(f"classes ({fcn.num_classes}): {', '.join(fcn.class_names)}")
    print(_converted_text(fcn))
    return 0


# ---------------------------------------------------------------------------------------------
# convert and scoremap
# ---------------------------------------------------------------------------------------------


def _converted_text(fcn: Any) -> str:
    """A converted network's layers, geometry and self-check, as `convert` and `info` print."""
    return "\n".join([fcn.summary(), fcn.geometry.describe(), _check_text(fcn.check)])


def _check_text(check: dict) -> str:
    if not check:
        return "self-check: not recorded"
    return (
        f"self-check: {'passed' if check.get('passed') else 'FAILED'} on {check['inputs']} "
        f"training-size inputs: max |converted - original| = {check['max_abs_diff']:.3g} "
        f"(score scale {check['score_scale']:.3g}, tolerance {check['tolerance']:.3g})"
    )


def _cmd_convert(args: argparse.Namespace) -> int:
    from cnnserve.convert import save_fully_convolutional, to_fully_convolutional
    from cnnserve.modelfile import read_model_file

    source = Path(args.model)
    out = Path(args.out) if args.out else source.with_name(source.stem + "_fcn.safetensors")
    _check_output(out)
    if out.resolve() == source.resolve():
        raise CommandError(f"--out {out} would overwrite the model being converted")
    file = read_model_file(source)
    fcn = to_fully_convolutional(file.model, check_size=args.check_size)
    fcn.training = dict(file.training)
    save_fully_convolutional(fcn, out)
    if args.json:
        print(json.dumps({"model": str(source), "out": str(out), **fcn.to_dict()}, indent=2))
        return 0
    print(f"converted {source} -> {out}")
    print(_converted_text(fcn))
    return 0


def _class_index(value: str | None, class_names: Sequence[str]) -> int | None:
    """``--class``: a class name, or an index when no class has that name."""
    from cnnserve.dense import class_index

    if value is None:
        return None
    try:
        return class_index(value, class_names)
    except ValueError as exc:
        raise CommandError(f"--{exc}") from None


def _scales(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise CommandError(f"--scales must be numbers separated by commas, got {text!r}") from exc


def _cmd_scoremap(args: argparse.Namespace) -> int:
    from cnnserve._checks import check_number
    from cnnserve.convert import load_fully_convolutional
    from cnnserve.dense import MultiScaleMap, default_class, score_map
    from cnnserve.heatmap import check_picture_size, png_bytes
    from cnnserve.images import as_image, read_image_file

    # Everything that can be refused is checked before the map is computed, and the files
    # are written only once both are ready: an error leaves no partial output.
    for option in ("json", "png"):
        if getattr(args, option) is not None:
            _check_target(option, Path(getattr(args, option)))
    check_number(args.alpha, "--alpha", 0, 1, "[]")
    fcn = load_fully_convolutional(args.model)
    class_index = _class_index(args.class_, fcn.class_names)
    image = as_image(read_image_file(args.image, fcn.input_shape[0]), fcn.input_shape[0])
    if args.png:
        check_picture_size(image.shape[1], image.shape[2], args.zoom, name="--zoom")
    started = time.perf_counter()
    result = score_map(
        fcn,
        image,
        stride_divisor=args.stride_divisor,
        scales=_scales(args.scales),
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - started
    maps = result.maps if isinstance(result, MultiScaleMap) else (result,)
    if class_index is None:
        class_index = default_class(result)
    label = fcn.class_names[class_index]

    print(f"image {args.image}: {image.shape[1]}x{image.shape[2]} pixels, {image.shape[0]} "
          f"channel(s); {seconds:.3f} s")  # fmt: skip
    print(fcn.geometry.describe())
    for m in maps:
        g = m.geometry_dict()
        scale = f"scale {m.scale:g}: " if len(maps) > 1 or m.scale != 1 else ""
        print(
            f"{scale}map {g['map_shape'][0]}x{g['map_shape'][1]} cells at stride "
            f"{g['cell_stride'][0]:g} px; margins not covered: {g['margins'][0]} rows, "
            f"{g['margins'][1]} columns"
        )
    for by in ("mean", "max"):
        top = ", ".join(
            f"{r['label']} {r['probability']:.3f}" for r in result.top_k(args.top_k, by=by)
        )
        print(f"top-{min(args.top_k, fcn.num_classes)} by {by} over cells: {top}")
    best = maps[0]
    peak = best.peak(class_index)
    box = ", ".join(f"{v:g}" for v in peak["box"])
    print(
        f"class {label!r}: highest probability {peak['probability']:.3f} at "
        f"cell ({peak['row']}, {peak['col']}), box (x0, y0, x1, y1) = ({box})"
    )
    outputs = []
    if args.json is not None:
        record = {
            "model": str(args.model),
            "image": str(args.image),
            "image_size": [image.shape[1], image.shape[2]],
            "seconds": seconds,
            **result.to_dict(top_k=args.top_k, cells=args.cells, scores=True),
        }
        outputs.append((args.json, json.dumps(record).encode(), ""))
    if args.png is not None:
        picture = best.heatmap(image, class_index, alpha=args.alpha, zoom=args.zoom)
        note = f": class {label!r} probability over the image"
        outputs.append((args.png, png_bytes(picture), note))
    for target, data, note in outputs:
        atomic_write_bytes(Path(target), data)
        print(f"wrote {target}{note}")
    return 0


# ---------------------------------------------------------------------------------------------
# predict and serve
# ---------------------------------------------------------------------------------------------


def _cmd_predict(args: argparse.Namespace) -> int:
    from cnnserve.convert import load_fully_convolutional
    from cnnserve.images import read_image_file
    from cnnserve.predict import predict

    fcn = load_fully_convolutional(args.model)
    image = read_image_file(args.image, fcn.input_shape[0])
    started = time.perf_counter()
    result = predict(fcn, image)
    seconds = time.perf_counter() - started
    ranked = result.top_k(args.top_k)
    if args.json:
        record = {
            "model": str(args.model),
            "image": str(args.image),
            **result.to_dict(args.top_k),
            "time_ms": round(seconds * 1e3, 3),
        }
        print(json.dumps(record, indent=2))
        return 0
    h, w = result.image_size
    resized = (
        f", resized to {result.resized_to[0]}x{result.resized_to[1]}" if result.resized_to else ""
    )
    print(f"image {args.image}: {h}x{w} pixels{resized}; {seconds * 1e3:.1f} ms")
    width = max(len(r["label"]) for r in ranked)
    for rank, r in enumerate(ranked, 1):
        print(f"{rank:>2}. {r['label']:<{width}}  {r['probability']:.4f}  (class {r['index']})")
    return 0


# The `serve` flags that set Settings fields of the same name (as CNNSERVE_* environment
# variables, so that every uvicorn worker process reads the same settings).
_SERVE_SETTINGS = (
    "models",
    "max_body_bytes",
    "max_pixels",
    "max_concurrency",
    "max_waiting",
    "queue_timeout",
    "max_map_cells",
    "max_json_cells",
    "warmup",
)


def _log_config(base: dict, level: str) -> dict:
    """uvicorn's logging set-up, plus the service's own logger (models loaded, errors)."""
    config = json.loads(json.dumps(base))
    config["loggers"]["cnnserve"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def _cmd_serve(args: argparse.Namespace) -> int:
    import tempfile

    import uvicorn
    from pydantic import ValidationError
    from uvicorn.config import LOGGING_CONFIG

    from cnnserve import __version__
    from cnnserve.service.registry import ModelDirectoryError, ModelRegistry
    from cnnserve.service.settings import Settings

    for field in _SERVE_SETTINGS:
        value = getattr(args, field)
        if value is not None:
            os.environ[f"CNNSERVE_{field.upper()}"] = str(value)
    try:
        settings = Settings()  # flags and environment together, checked before uvicorn starts
    except ValidationError as exc:
        problems = "; ".join(
            f"CNNSERVE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise CommandError(f"bad settings: {problems}") from None
    try:
        files = ModelRegistry(settings.models).discover()
    except ModelDirectoryError as exc:
        raise CommandError(str(exc)) from None
    names = ", ".join(p.stem for p in files)
    print(
        f"cnnserve {__version__}: serving {names} from "
        f"{settings.models.resolve()} on http://{args.host}:{args.port} ({args.workers} "
        f"worker(s), {settings.max_concurrency} inference(s) at once each)",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            # Each worker writes its metrics there, and /metrics reports their sum.
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="cnnserve-metrics-"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        uvicorn.run(
            "cnnserve.service.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            log_config=_log_config(LOGGING_CONFIG, args.log_level),
            http="cnnserve.service.server:NoDelayHTTPProtocol",
            timeout_graceful_shutdown=10,
        )
    return 0


def _check_target(option: str, path: Path) -> None:
    """An output file of ``--option``: its directory exists and it is not a directory."""
    if path.is_dir():
        raise CommandError(f"--{option} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise CommandError(f"--{option} {path}: directory {path.parent} not found")


def _size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. 96x192) as a pair of ints."""
    try:
        h, w = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be HxW, e.g. 96x192, got {text!r}") from exc
    return h, w


_DEMO_MAX_PIXELS = 2**22  # canvases up to 2048 x 2048


def _cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image, ImageDraw

    from cnnserve.convert import load_fully_convolutional
    from cnnserve.data import BUNDLED, digits_canvas
    from cnnserve.dense import score_map
    from cnnserve.heatmap import check_picture_size, montage, png_bytes
    from cnnserve.specs import BACKGROUND

    height, width = args.size
    if height * width > _DEMO_MAX_PIXELS:
        raise CommandError(f"--size {height}x{width} is over {_DEMO_MAX_PIXELS:,} pixels")
    zoom = args.zoom
    check_picture_size(height, width, zoom, name="--zoom")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is not a directory")
    fcn = load_fully_convolutional(args.model)
    digits = tuple(map(str, range(10)))
    if fcn.input_shape != (1, 8, 8) or fcn.class_names not in (digits, (*digits, BACKGROUND)):
        raise CommandError(
            f"the demo places scikit-learn digits: it needs a digits model (input (1, 8, 8), "
            f"classes 0..9, and maybe {BACKGROUND!r}), got input {fcn.input_shape} and classes "
            f"{fcn.class_names}"
        )
    record = fcn.training
    if record.get("dataset") not in BUNDLED or not record.get("test_fraction"):
        raise CommandError(
            "the demo shows digits the model has never seen: it needs a model trained on "
            f"{' or '.join(map(repr, BUNDLED))} with a test split (its training record has "
            f"dataset {record.get('dataset')!r}, test_fraction {record.get('test_fraction')!r})"
        )
    split = {
        "split_seed": int(record.get("seed", 0)),
        "val_fraction": float(record.get("val_fraction", 0.1)),
        "test_fraction": float(record["test_fraction"]),
    }
    canvas, placements = digits_canvas(args.size, args.count, seed=args.seed, **split)
    result = score_map(fcn, canvas, stride_divisor=fcn.geometry.stride)  # stride 1: a cell
    # at every position
    # The canvas at its own size (8-bit gray): an input for `cnnserve scoremap`.
    picture = Image.fromarray(np.rint(canvas[0] * 255).astype(np.uint8), mode="L")
    panels, rows = [], []
    for place in sorted(placements, key=lambda p: p["label"]):
        label, (x0, y0, x1, y1) = place["label"], place["box"]
        probability = result.probabilities[label]
        panel = result.heatmap(canvas, label, alpha=0.7, zoom=zoom)
        draw = ImageDraw.Draw(panel)
        draw.rectangle([x0 * zoom, y0 * zoom, x1 * zoom - 1, y1 * zoom - 1], outline="cyan")
        draw.text((3, 2), f"class {label}", fill="white")
        panels.append(panel)
        here = float(probability[y0, x0])  # the cell whose window is exactly the digit
        predicted = int(np.argmax(result.probabilities[:, y0, x0]))
        py, px = np.unravel_index(int(np.argmax(probability)), probability.shape)
        rows.append((label, place["index"], (x0, y0), here, predicted, (int(px), int(py))))
    files = {"canvas.png": png_bytes(picture), "heatmaps.png": png_bytes(montage(panels, 2))}
    _make_directory(out)
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    map_rows, map_cols = result.shape
    print(f"canvas {height}x{width} with {len(placements)} held-out digits (test split of "
          f"seed {split['split_seed']}); map {map_rows}x{map_cols} at stride 1")  # fmt: skip
    print(f"{'digit':>5} {'sample':>6} {'at (x, y)':>10} {'p(digit) there':>14} "
          f"{'predicted there':>15} {'peak of p(digit) at':>19}")  # fmt: skip
    for label, index, (x, y), here, predicted, (px, py) in rows:
        print(f"{label:>5} {index:>6} {f'({x}, {y})':>10} {here:>14.3f} {predicted:>15} "
              f"{f'({px}, {py})':>19}")  # fmt: skip
    correct = sum(predicted == label for label, _, _, _, predicted, _ in rows)
    placed = sum(abs(px - x) <= 1 and abs(py - y) <= 1 for _, _, (x, y), _, _, (px, py) in rows)
    print(f"{correct}/{len(rows)} digits classified correctly at their own window; "
          f"{placed}/{len(rows)} digits' classes peak within 1 px of the digit")  # fmt: skip
    print(f"wrote {out / 'canvas.png'} ({width}x{height}, an input for scoremap) and "
          f"{out / 'heatmaps.png'} (zoom {zoom})")  # fmt: skip
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

    convert = commands.add_parser(
        "convert",
        help="turn a model's fully connected layers into convolutions (dense score maps)",
        description="Convert a trained model into a fully convolutional network that slides "
        "over larger images; print its geometry and the self-check of the conversion.",
    )
    convert.add_argument("model", help="a trained .safetensors model file")
    convert.add_argument("--out", help="the converted model file (default: MODEL_fcn.safetensors)")
    convert.add_argument(
        "--check-size",
        type=_positive_int,
        default=8,
        help="random training-size inputs in the self-check (default 8)",
    )
    convert.add_argument("--json", action="store_true", help="print the result as JSON")
    convert.set_defaults(handler=_cmd_convert)

    scoremap = commands.add_parser(
        "scoremap",
        help="dense class-score map of an image of any size at least the training size",
        description="Slide a model over an image in one pass and report the map of class "
        "scores: one cell per training-size window at the network's stride.",
    )
    scoremap.add_argument("model", help="a trained or converted .safetensors model file")
    scoremap.add_argument("image", help="an image file (PNG, JPEG, ...) or a .npy array")
    scoremap.add_argument(
        "--class",
        dest="class_",
        metavar="K",
        help="the class for the heatmap and the report, by name or index (default: the top one "
        "by max over the cells, other than 'background')",
    )
    scoremap.add_argument(
        "--stride-divisor",
        type=_positive_int,
        default=1,
        metavar="D",
        help="a map D times finer (shift-and-stitch; D must divide the stride)",
    )
    scoremap.add_argument(
        "--scales", help="resize factors separated by commas, e.g. 1,0.5 (default: 1)"
    )
    scoremap.add_argument("--top-k", type=_positive_int, default=5, help="default 5")
    scoremap.add_argument(
        "--json", metavar="OUT.json", help="write the map (scores as base64 float32) as JSON"
    )
    scoremap.add_argument(
        "--cells", action="store_true", help="with --json: also list every cell's box and top-k"
    )
    scoremap.add_argument("--png", metavar="HEAT.png", help="write the class's heatmap picture")
    scoremap.add_argument(
        "--alpha", type=float, default=0.5, help="heatmap opacity over the image (default 0.5)"
    )
    scoremap.add_argument(
        "--zoom", type=_positive_int, default=1, help="enlarge the heatmap picture (default 1)"
    )
    scoremap.add_argument("--quiet", action="store_true", help="no progress bar")
    scoremap.set_defaults(handler=_cmd_scoremap)

    predict = commands.add_parser(
        "predict",
        help="the top classes of one image (the service's /predict without a server)",
        description="Classify one image as a whole: an image of another size than the "
        "training size is resized to it first (bilinear).",
    )
    predict.add_argument("model", help="a trained or converted .safetensors model file")
    predict.add_argument("image", help="an image file (PNG, JPEG, BMP, GIF, TIFF) or a .npy array")
    predict.add_argument("--top-k", type=_positive_int, default=5, help="default 5")
    predict.add_argument("--json", action="store_true", help="print the result as JSON")
    predict.set_defaults(handler=_cmd_predict)

    serve = commands.add_parser(
        "serve",
        help="start the HTTP service (class scores, score maps, a web page)",
        description="Serve every model file of a directory over HTTP (uvicorn). Options not "
        "given come from CNNSERVE_* environment variables, then the defaults.",
    )
    serve.add_argument(
        "--models", metavar="DIR", help="directory of .safetensors model files (default models)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument(
        "--workers", type=_positive_int, default=1, help="uvicorn worker processes (default 1)"
    )
    serve.add_argument(
        "--max-body-bytes", type=_positive_int, help="largest request body (default 20 MiB)"
    )
    serve.add_argument(
        "--max-pixels", type=_positive_int, help="largest image in pixels (default 4096*4096)"
    )
    serve.add_argument(
        "--max-concurrency",
        type=_positive_int,
        help="inferences at once per endpoint and worker (default: the cores this process may use)",
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        help="requests waiting for a slot per endpoint; one more gets a 503 at once (default 16)",
    )
    serve.add_argument(
        "--max-map-cells",
        type=_positive_int,
        help="largest score map, in cells (default 2**22)",
    )
    serve.add_argument(
        "--max-json-cells",
        type=_positive_int,
        help="largest score map whose arrays a JSON answer carries (default 2**18)",
    )
    serve.add_argument(
        "--queue-timeout",
        type=float,
        help="seconds a request waits for an inference slot before a 503 (default 10)",
    )
    serve.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_const",
        const=False,
        help="skip running each model once before /readyz",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default info",
    )
    serve.set_defaults(handler=_cmd_serve)

    demo = commands.add_parser(
        "demo",
        help="a canvas of held-out digits and each digit's class heatmap (digits models)",
        description="Place held-out test digits on a larger canvas, map it densely and draw, "
        "for each digit, the heatmap of its class with the digit's true box.",
    )
    demo.add_argument("model", help="a digits model file (trained or converted)")
    demo.add_argument("--out", default="demo", help="output directory (default: demo)")
    demo.add_argument("--size", type=_size, default=(48, 96), help="canvas HxW (default 48x96)")
    demo.add_argument("--count", type=_positive_int, default=6, help="digits (default 6)")
    demo.add_argument("--seed", type=int, default=0, help="layout seed (default 0)")
    demo.add_argument("--zoom", type=_positive_int, default=4, help="picture zoom (default 4)")
    demo.set_defaults(handler=_cmd_demo)
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
