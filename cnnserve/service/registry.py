"""The models a service instance serves: found in one directory, loaded, converted, warmed up.

A model is a file of the directory, its name the file's stem (``models/digits.safetensors``
is ``digits``, version 1; training checkpoints, files whose stem holds ``_checkpoint``, are
never served), or a directory of numbered versions in Triton's layout
(``models/digits/2/model.safetensors`` or ``model.onnx``), of which the highest is served.
Requests name models only by these names, looked up in :attr:`ModelRegistry.models`: no part
of a request ever becomes a path.

:meth:`ModelRegistry.reload` loads and warms a model's current file next to the version being
served, then swaps: requests that already hold the old version finish with it, and a file that
fails to load never replaces a working version.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cnnserve.convert import FullyConvNet, load_fully_convolutional, to_fully_convolutional
from cnnserve.dense import score_map
from cnnserve.images import read_image
from cnnserve.modelfile import (
    MAX_MODEL_LAYERS,
    MAX_MODEL_PARAMS,
    MAX_MODEL_PIXELS,
    check_model_size,
)
from cnnserve.network import ConvNet
from cnnserve.predict import predict
from cnnserve.specs import tensor_shapes

__all__ = ["LoadedModel", "ModelDirectoryError", "ModelRegistry", "Source", "load_one"]

log = logging.getLogger("cnnserve.service")

# The largest image of a model's warm-up map (4 x 4 windows when they fit in it).
WARMUP_MAP_PIXELS = 2**18

# A name that is safe in a URL path segment and a Prometheus label.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODEL_SUFFIXES = (".safetensors", ".onnx")  # .onnx: imported at start (cnnserve.onnx)


class ModelDirectoryError(RuntimeError):
    """The model directory is missing or holds no model file: the service cannot start."""


@dataclass(frozen=True)
class Source:
    """Where a model's served version comes from: its name, version and file, and the file's
    state when it was found (a change of size or time is a new file to a watcher)."""

    name: str
    version: str
    path: Path
    stamp: tuple[int, int]  # (size, mtime_ns)

    @classmethod
    def of(cls, name: str, version: str, path: Path) -> Source:
        st = path.stat()
        return cls(name, version, path, (st.st_size, st.st_mtime_ns))


def _versions(folder: Path) -> list[tuple[int, Path]]:
    """``(version, file)`` of each numbered subdirectory of ``folder`` holding a model file."""
    found = []
    for sub in folder.iterdir():
        if not (sub.is_dir() and sub.name.isascii() and sub.name.isdigit()):
            continue
        for suffix in MODEL_SUFFIXES:
            file = sub / f"model{suffix}"
            if file.is_file():
                found.append((int(sub.name), file))
                break
    return sorted(found)


def find_sources(directory: Path) -> list[Source]:
    """The model sources of a directory, by name: flat files (version 1) and the highest
    version of each versioned subdirectory. A .safetensors file comes before an .onnx file of
    the same stem (the second is then refused as a duplicate name)."""
    sources = []
    for entry in directory.iterdir():
        try:
            if entry.is_file() and entry.suffix in MODEL_SUFFIXES:
                if "_checkpoint" in entry.stem:  # a training run's, never served
                    log.info("not serving %s: a training checkpoint", entry.name)
                    continue
                sources.append(Source.of(entry.stem, "1", entry))
            elif entry.is_dir():
                versions = _versions(entry)
                if versions:
                    version, file = versions[-1]
                    sources.append(Source.of(entry.name, str(version), file))
        except FileNotFoundError:  # removed while the directory was read
            continue
    return sorted(sources, key=lambda s: (s.name, MODEL_SUFFIXES.index(s.path.suffix)))


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to serve: its converted network and what the API says about it."""

    name: str
    file: Path
    fcn: FullyConvNet
    architecture_summary: str  # the trained network's layer table
    parameters: int
    load_seconds: float
    version: str = "1"
    stamp: tuple[int, int] | None = None  # the file's (size, mtime_ns) when it was loaded

    def summary(self) -> dict:
        """The short description of ``GET /v1/models``."""
        fcn = self.fcn
        return {
            "name": self.name,
            "version": self.version,
            "input_shape": list(fcn.input_shape),
            "num_classes": fcn.num_classes,
            "classes": list(fcn.class_names),
            "dtype": fcn.dtype.name,
            "geometry": fcn.geometry.to_dict(),
        }

    def detail(self) -> dict:
        """The full description of ``GET /v1/models/{name}``."""
        fcn = self.fcn
        converted = fcn.to_dict()
        return {
            **self.summary(),
            "file": self.file.name,
            "parameters": self.parameters,
            "architecture": fcn.config,
            "summary": self.architecture_summary,
            "converted_summary": fcn.summary(),
            "converted_layers": converted["layers"],
            "per_window_from": converted["per_window_from"],
            "geometry_text": fcn.geometry.describe(),
            "normalization": fcn.normalization,
            "training": fcn.training,
            "self_check": fcn.check,
            "load_seconds": round(self.load_seconds, 4),
        }


#: Longest message /readyz lists for a model that failed (and the log writes): a file's
#: metadata can carry megabytes, which no message should echo whole.
MAX_REASON_CHARS = 1000


def bounded(message: str, limit: int = MAX_REASON_CHARS) -> str:
    """``message``, cut to ``limit`` characters with a note of its full length."""
    if len(message) <= limit:
        return message
    return f"{message[: limit - 40]}... ({len(message):,} characters in all)"


def load_one(
    path: Path,
    *,
    warmup: bool = True,
    max_pixels: int = MAX_MODEL_PIXELS,
    max_params: int = MAX_MODEL_PARAMS,
    max_layers: int = MAX_MODEL_LAYERS,
) -> LoadedModel:
    """Load a trained or converted model file (or import an ONNX one), convert it, and run it
    once.

    Parameters
    ----------
    path : Path
    warmup : bool
        Run the model once: a classification and a map of 4 x 4 windows, whose work the
        limit on the model's input bounds.
    max_pixels, max_params, max_layers : int
        The largest training input (H*W), the most parameters and layers the file may declare,
        checked from its header before anything is allocated.

    Raises
    ------
    ModelFileError, ConversionError, OnnxError, OnnxUnavailableError
        A corrupt or mismatched file, a model over the limits, an ONNX graph cnnserve cannot
        read (or no onnx package), or a conversion whose self-check fails.
    """
    start = time.perf_counter()
    if path.suffix == ".onnx":  # imported (the onnx package loads only for such a file)
        from cnnserve.onnx import read_onnx

        imported = read_onnx(path)
        config = imported.model.config()
        check_model_size(
            path,
            config,
            tensor_shapes(config),
            max_pixels=max_pixels,
            max_params=max_params,
            max_layers=max_layers,
        )
        fcn = to_fully_convolutional(imported.model)
        fcn.training = imported.record
    else:  # a trained file is converted and self-checked
        fcn = load_fully_convolutional(
            path, max_pixels=max_pixels, max_params=max_params, max_layers=max_layers
        )
    model = ConvNet.from_config(
        fcn.config, class_names=fcn.class_names, normalization=fcn.normalization
    )  # for its layer table and parameter count only: fresh weights, same shapes
    if warmup:
        # One decode, one classification and one small map: Pillow loads its format plugins
        # at its first decode (about 7 ms), and the first call of each conv path sets up its
        # thread pools and scratch buffers; neither should be a user's first request.
        # The map is of 4 x 4 windows, or of 2 x 2 cells for a large window, so that the
        # warm-up's work stays within a few passes of the largest input a model may have.
        C, th, tw = fcn.input_shape
        Image.init()
        encoded = io.BytesIO()
        Image.new("RGB", (tw, th)).save(encoded, "PNG")
        pixels = read_image(encoded.getvalue(), C)
        predict(fcn, pixels)
        if 16 * th * tw <= WARMUP_MAP_PIXELS:
            mh, mw = 4 * th, 4 * tw
        else:
            mh, mw = th + fcn.geometry.stride, tw + fcn.geometry.stride
        score_map(fcn, np.zeros((C, mh, mw), dtype=np.float32))
    return LoadedModel(
        name=path.stem,
        file=path,
        fcn=fcn,
        architecture_summary=model.summary(),
        parameters=model.num_parameters(),
        load_seconds=time.perf_counter() - start,
    )


class ModelRegistry:
    """The models of one directory, loaded in the background while the service starts.

    Parameters
    ----------
    directory : Path
        Holds ``*.safetensors`` model files (trained or converted) and ``*.onnx`` classifiers
        (imported with :func:`cnnserve.onnx.read_onnx`).
    warmup : bool
        Run each model once after loading it.
    loader : callable, optional
        ``loader(path, warmup=...) -> LoadedModel``; :func:`load_one` by default.
    """

    def __init__(
        self,
        directory: Path,
        *,
        warmup: bool = True,
        loader: Callable[..., LoadedModel] = load_one,
    ) -> None:
        self.directory = Path(directory)
        self.warmup = warmup
        self.loader = loader
        self.models: dict[str, LoadedModel] = {}
        self.failed: dict[str, str] = {}  # name -> why it could not be loaded
        self.files: list[Path] = []
        self.sources: list[Source] = []
        self._done = threading.Event()
        self._reloading = threading.Lock()  # one reload at a time
        self._tried: dict[str, Source] = {}  # the last source a reload tried, by name

    @property
    def ready(self) -> bool:
        """Loading has finished and at least one model is served."""
        return self._done.is_set() and bool(self.models)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def discover(self) -> list[Path]:
        """The model files of the directory, checked before anything is loaded.

        Returns
        -------
        list of Path
            The file of each model (the highest version of a versioned one), by name.

        Raises
        ------
        ModelDirectoryError
            The directory does not exist or holds no model file (``*.safetensors``, ``*.onnx``
            or ``NAME/VERSION/model.safetensors``) other than training checkpoints
            (``*_checkpoint*``), which are never served.
        """
        if not self.directory.is_dir():
            raise ModelDirectoryError(
                f"model directory {self.directory.resolve()} does not exist (set --models or "
                "CNNSERVE_MODELS)"
            )
        sources = find_sources(self.directory)
        if not sources:
            found = self.directory.glob("*.safetensors")
            checkpoints = any("_checkpoint" in p.stem for p in found)
            skipped = (
                " other than training checkpoints, which are never served" if checkpoints else ""
            )
            raise ModelDirectoryError(
                f"model directory {self.directory.resolve()} holds no *.safetensors model file "
                f"(nor any *.onnx file, nor NAME/1/model.safetensors){skipped}"
            )
        self.sources = sources
        self.files = [source.path for source in sources]
        return self.files

    def _load(self, source: Source) -> LoadedModel:
        """Load one source (any failure raises, its message naming the file, not where it is)."""
        path = source.path
        shown = (
            path.name
            if source.path.parent == self.directory
            else (f"{source.name}/{source.version}/{path.name}")
        )
        try:
            model = self.loader(path, warmup=self.warmup)
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            reason = str(exc).replace(str(path), shown)
            reason = reason if shown in reason else f"{shown}: {reason}"
            raise RuntimeError(bounded(reason)) from exc  # /readyz lists it
        return replace(model, name=source.name, version=source.version, stamp=source.stamp)

    def load_all(self, on_loaded: Callable[[LoadedModel], Any] | None = None) -> None:
        """Load every discovered model; one that fails is logged and listed in :attr:`failed`."""
        try:
            for source in self.sources:
                name, path = source.name, source.path
                self._tried.setdefault(name, source)
                if not _NAME.match(name):
                    self.failed[name] = (
                        f"{path.name}: a model name must be 1-64 letters, digits, '.', '_' or "
                        "'-', starting with a letter or digit; rename the file"
                    )
                    log.error("skipping %s", self.failed[name])
                    continue
                if name in self.models or name in self.failed:  # x.onnx beside x.safetensors
                    self.failed[path.name] = (
                        f"{path.name}: another model file already has the name {name!r}; "
                        "rename one of them"
                    )
                    log.error("skipping %s", self.failed[path.name])
                    continue
                try:
                    model = self._load(source)
                except RuntimeError as exc:
                    self.failed[name] = str(exc)
                    log.error("cannot load model %r: %s", name, bounded(str(exc.__cause__ or exc)))
                    continue
                self.models[name] = model
                log.info(
                    "model %r loaded (version %s) from %s in %.2f s: %r",
                    name,
                    model.version,
                    path,
                    model.load_seconds,
                    model.fcn,
                )
                if on_loaded is not None:
                    on_loaded(model)
        finally:
            self._done.set()
        if not self.models:
            log.error("no model could be loaded from %s; /readyz stays 503", self.directory)

    def changed(self) -> list[Source]:
        """The sources of the directory whose file differs from the one served (a new
        version, a changed file, a new model), for a watcher. Names that failed at start are
        tried again only when their file changes."""
        found, seen = [], set()
        for source in find_sources(self.directory):
            if not _NAME.match(source.name) or source.name in seen:
                continue  # a second file of one name (x.onnx beside x.safetensors) is not it
            seen.add(source.name)
            if self._tried.get(source.name) == source:
                continue  # tried already (served, or failed: tried again once it changes)
            served = self.models.get(source.name)
            if served is not None:
                if (served.version, served.file, served.stamp) != (
                    source.version,
                    source.path,
                    source.stamp,
                ):
                    found.append(source)
            elif self._tried.get(source.name) != source:
                found.append(source)
        return found

    def reload(self, name: str, source: Source | None = None) -> LoadedModel:
        """Load a model's current file next to the version served, then swap.

        Runs on a worker thread; the swap is one dict assignment, so a request that already
        looked up the old version finishes with it and the next gets the new one.

        Parameters
        ----------
        name : str
            A model's name.
        source : Source, optional
            What to load; by default the model's current file in the directory.

        Returns
        -------
        LoadedModel
            The version now served.

        Raises
        ------
        KeyError
            No model of that name in the directory.
        RuntimeError
            The file failed to load: the version served (if any) stays.
        """
        with self._reloading:
            if source is None:
                found = [s for s in find_sources(self.directory) if s.name == name]
                if not found or not _NAME.match(name):
                    raise KeyError(name)
                source = found[0]
            self._tried[name] = source
            model = self._load(source)  # raises: nothing is replaced
            # New dicts, swapped in one assignment each: a reader on another thread iterates
            # the old one undisturbed.
            self.models = {**self.models, name: model}
            self.failed = {k: v for k, v in self.failed.items() if k != name}
            log.info(
                "model %r version %s reloaded from %s in %.2f s",
                name,
                model.version,
                source.path,
                model.load_seconds,
            )
            return model

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading has finished (for scripts and tests); returns :attr:`ready`."""
        self._done.wait(timeout)
        return self.ready
