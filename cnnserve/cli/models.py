"""``cnnserve info`` and ``cnnserve convert``: what a model file holds, and its conversion into
a fully convolutional network."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.cli._common import (
    CommandError,
    add_model_limits,
    check_output,
    positive_int,
)

__all__ = ["add_convert", "add_info"]


def _limits(args: argparse.Namespace) -> dict[str, int]:
    """The model-size limits of ``--max-model-pixels`` / ``--max-model-params``, if given."""
    limits = {"max_pixels": args.max_model_pixels, "max_params": args.max_model_params}
    return {key: value for key, value in limits.items() if value is not None}


def _cmd_info(args: argparse.Namespace) -> int:
    from cnnserve.modelfile import FCN_FORMAT_NAME, read_metadata, read_model_file

    if read_metadata(args.model).get("format") == FCN_FORMAT_NAME:
        return _info_converted(args)
    file = read_model_file(args.model, **_limits(args))
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

    fcn = load_fully_convolutional(args.model, **_limits(args))
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
    check_output(out)
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


def add_info(commands: Any) -> None:
    """The ``info`` command."""
    info = commands.add_parser(
        "info",
        help="architecture, shapes, parameter count and training record of a model file",
    )
    info.add_argument("model", help="a .safetensors model file")
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    add_model_limits(info)
    info.set_defaults(handler=_cmd_info)


def add_convert(commands: Any) -> None:
    """The ``convert`` command."""
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
        type=positive_int,
        default=8,
        help="random training-size inputs in the self-check (default 8)",
    )
    convert.add_argument("--json", action="store_true", help="print the result as JSON")
    convert.set_defaults(handler=_cmd_convert)
