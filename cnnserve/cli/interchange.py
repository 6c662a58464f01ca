"""``cnnserve import`` and ``cnnserve export``: models in from ONNX, and out to ONNX."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cnnserve.cli._common import CommandError, check_output

__all__ = ["add_export", "add_import"]


def _numbers(values: list[str] | None, option: str) -> list[float] | None:
    """``--mean 0.5 0.5`` or ``--mean 0.5,0.5`` as floats."""
    if values is None:
        return None
    parts = [p for v in values for p in v.split(",") if p.strip()]
    try:
        return [float(p) for p in parts]
    except ValueError as exc:
        raise CommandError(f"--{option} must be numbers, got {' '.join(values)!r}") from exc


def _chw(text: str) -> tuple[int, int, int]:
    """An argparse type: ``C,H,W``, three positive ints."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be C,H,W, three positive ints, got {text!r}")
    return values


def _class_names(args: argparse.Namespace) -> list[str] | None:
    if args.classes is not None and args.classes_file is not None:
        raise CommandError("give --classes or --classes-file, not both")
    if args.classes is not None:
        return [name.strip() for name in args.classes.split(",")]
    if args.classes_file is not None:
        path = Path(args.classes_file)
        if not path.exists():
            raise CommandError(f"--classes-file {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError(f"--classes-file {path} is not UTF-8 text: {exc}") from exc
        return [line.strip() for line in text.splitlines() if line.strip()]
    return None


def _cmd_import(args: argparse.Namespace) -> int:
    from cnnserve.modelfile import save_model
    from cnnserve.onnx import OnnxUnavailableError, read_onnx

    source = Path(args.model)
    out = Path(args.out) if args.out else source.with_suffix(".safetensors")
    check_output(out)
    mean, std = _numbers(args.mean, "mean"), _numbers(args.std, "std")
    if (mean is None) != (std is None):
        raise CommandError("give --mean and --std together")
    normalization = None if mean is None else {"mean": mean, "std": std}
    class_names = _class_names(args)
    try:
        result = read_onnx(
            source,
            class_names=class_names,
            normalization=normalization,
            input_shape=args.input_shape,
        )
    except OnnxUnavailableError as exc:
        raise CommandError(str(exc)) from exc
    model = result.model
    save_model(model, out, training=result.record)
    if args.json:
        info = {
            "model": str(source),
            "out": str(out),
            "architecture": model.config(),
            "class_names": list(model.class_names),
            "normalization": model.normalization,
            "notes": result.notes,
        }
        print(json.dumps(info, indent=2))
        return 0
    print(f"imported {source} -> {out}")
    print(f"input shape (C, H, W): {model.input_shape}, dtype {model.dtype.name}")
    print(f"classes ({model.num_classes}): {', '.join(model.class_names)}")
    if model.normalization is None:
        print("input normalisation: none (give --mean and --std if the network was trained so)")
    else:
        mean, std = model.normalization["mean"], model.normalization["std"]
        print(f"input normalisation: (x - mean) / std per channel, mean {mean}, std {std}")
    print(model.summary())
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cnnserve.onnx import OnnxUnavailableError, export_onnx

    source = Path(args.model)
    out = Path(args.out) if args.out else source.with_suffix(".onnx")
    if args.out is None and out.exists():
        raise CommandError(
            f"{out} already exists (perhaps the ONNX file this model was imported from); "
            "give --out to choose the file to write"
        )
    if out.suffix != ".onnx":
        raise CommandError(f"--out must end in .onnx, got {out}")
    if out.is_dir():
        raise CommandError(f"--out {out} is a directory; give a file name ending in .onnx")
    if not out.parent.is_dir():
        raise CommandError(f"--out {out}: directory {out.parent} not found")
    try:
        proto = export_onnx(source, out)
    except OnnxUnavailableError as exc:
        raise CommandError(str(exc)) from exc
    meta = {p.key: p.value for p in proto.metadata_props}

    def dims(value_info: Any) -> list:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    info = {
        "model": str(source),
        "out": str(out),
        "kind": meta.get("cnnserve_kind"),
        "opset": proto.opset_import[0].version,
        "input": {"name": proto.graph.input[0].name, "shape": dims(proto.graph.input[0])},
        "output": {"name": proto.graph.output[0].name, "shape": dims(proto.graph.output[0])},
        "bytes": out.stat().st_size,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"exported {source} -> {out} ({info['bytes']:,} bytes, opset {info['opset']})")
    print(f"a {info['kind']} network: {info['input']['name']} {info['input']['shape']} -> ", end="")
    print(f"{info['output']['name']} {info['output']['shape']}")
    print("inputs are preprocessed pixels; the classes and the normalisation are in the "
          "model's metadata_props")  # fmt: skip
    return 0


def add_import(commands: Any) -> None:
    """The ``import`` command."""
    parser = commands.add_parser(
        "import",
        help="read an ONNX classifier (e.g. exported by PyTorch) into a cnnserve model file",
        description="Read an ONNX classifier into a cnnserve model file, exactly or with an "
        "error naming the node, op and attribute that cnnserve cannot reproduce. Needs the "
        "onnx package: pip install onnx (from a clone: .venv/bin/pip install -e '.[onnx]').",
    )
    parser.add_argument("model", help="an .onnx file")
    parser.add_argument("--out", help="the model file to write (default: MODEL.safetensors)")
    parser.add_argument("--classes", help="class names separated by commas")
    parser.add_argument("--classes-file", help="a text file with one class name a line")
    parser.add_argument(
        "--input-shape",
        type=_chw,
        metavar="C,H,W",
        help="the training input (channels, height, width), for a graph whose input has no "
        "fixed height and width",
    )
    parser.add_argument(
        "--mean",
        nargs="+",
        help="per-channel mean of the inputs' normalisation, of [0, 1] pixels (with --std)",
    )
    parser.add_argument("--std", nargs="+", help="per-channel standard deviation (with --mean)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_cmd_import)


def add_export(commands: Any) -> None:
    """The ``export`` command."""
    parser = commands.add_parser(
        "export",
        help="write a trained or converted model file as ONNX (opset 17)",
        description="Write a model file as ONNX: a trained model with its fixed input size, a "
        "converted one with dynamic height and width (the dense score map). Needs the onnx "
        "package: pip install onnx (from a clone: .venv/bin/pip install -e '.[onnx]').",
    )
    parser.add_argument("model", help="a trained or converted .safetensors model file")
    parser.add_argument(
        "--out", help="the .onnx file to write (default: MODEL.onnx, if no such file exists)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_cmd_export)
