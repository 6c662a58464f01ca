"""The models a service instance serves: found in one directory, loaded, converted, warmed up.

A model's name is its file's stem (``models/digits.safetensors`` is ``digits``); training
checkpoints (files whose stem holds ``_checkpoint``) are never served. Requests name
models only by these names, looked up in :attr:`ModelRegistry.models`: no part of a request
ever becomes a path.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cnnserve.convert import FullyConvNet, load_fully_convolutional
from cnnserve.dense import score_map
from cnnserve.images import read_image
from cnnserve.network import ConvNet
from cnnserve.predict import predict

__all__ = ["LoadedModel", "ModelDirectoryError", "ModelRegistry", "load_one"]

log = logging.getLogger("cnnserve.service")

# A name that is safe in a URL path segment and a Prometheus label.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelDirectoryError(RuntimeError):
    """The model directory is missing or holds no model file: the service cannot start."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to serve: its converted network and what the API says about it."""

    name: str
    file: Path
    fcn: FullyConvNet
    architecture_summary: str  # the trained network's layer table
    parameters: int
    load_seconds: float

    def summary(self) -> dict:
        """The short description of ``GET /v1/models``."""
        fcn = self.fcn
        return {
            "name": self.name,
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


def load_one(path: Path, *, warmup: bool = True) -> LoadedModel:
    """Load a trained or converted model file, convert it, and run it once.

    Raises
    ------
    ModelFileError, ConversionError
        A corrupt or mismatched file, or a conversion whose self-check fails.
    """
    start = time.perf_counter()
    fcn = load_fully_convolutional(path)  # a trained file is converted and self-checked
    model = ConvNet.from_config(
        fcn.config, class_names=fcn.class_names, normalization=fcn.normalization
    )  # for its layer table and parameter count only: fresh weights, same shapes
    if warmup:
        # One decode, one classification and one small map: Pillow loads its format plugins
        # at its first decode (about 7 ms), and the first call of each conv path sets up its
        # thread pools and scratch buffers; neither should be a user's first request.
        C, th, tw = fcn.input_shape
        Image.init()
        encoded = io.BytesIO()
        Image.new("RGB", (tw, th)).save(encoded, "PNG")
        pixels = read_image(encoded.getvalue(), C)
        predict(fcn, pixels)
        score_map(fcn, np.zeros((C, 4 * th, 4 * tw), dtype=np.float32))
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
        Holds ``*.safetensors`` model files (trained or converted).
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
        self._done = threading.Event()

    @property
    def ready(self) -> bool:
        """Loading has finished and at least one model is served."""
        return self._done.is_set() and bool(self.models)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def discover(self) -> list[Path]:
        """The model files of the directory, checked before anything is loaded.

        Raises
        ------
        ModelDirectoryError
            The directory does not exist or holds no ``*.safetensors`` file other than
            training checkpoints (``*_checkpoint*``), which are never served.
        """
        if not self.directory.is_dir():
            raise ModelDirectoryError(
                f"model directory {self.directory.resolve()} does not exist (set --models or "
                "CNNSERVE_MODELS)"
            )
        found = sorted(p for p in self.directory.glob("*.safetensors") if p.is_file())
        files = [p for p in found if "_checkpoint" not in p.stem]
        for path in found:
            if path not in files:
                log.info("not serving %s: a training checkpoint", path.name)
        if not files:
            skipped = " (only training checkpoints, which are never served)" if found else ""
            raise ModelDirectoryError(
                f"model directory {self.directory.resolve()} holds no *.safetensors model "
                f"file{skipped}"
            )
        self.files = files
        return files

    def load_all(self, on_loaded: Callable[[LoadedModel], Any] | None = None) -> None:
        """Load every discovered file; one that fails is logged and listed in :attr:`failed`."""
        try:
            for path in self.files:
                name = path.stem
                if not _NAME.match(name):
                    self.failed[name] = (
                        f"{path.name}: a model name must be 1-64 letters, digits, '.', '_' or "
                        "'-', starting with a letter or digit; rename the file"
                    )
                    log.error("skipping %s", self.failed[name])
                    continue
                try:
                    model = self.loader(path, warmup=self.warmup)
                except Exception as exc:  # noqa: BLE001 - any failure skips this model only
                    # /readyz shows this: the file's name, not where the directory is
                    reason = str(exc).replace(str(path), path.name)
                    self.failed[name] = reason if path.name in reason else f"{path.name}: {reason}"
                    log.error("cannot load model %r: %s", name, exc)
                    continue
                self.models[name] = model
                log.info(
                    "model %r loaded from %s in %.2f s: %r",
                    name,
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

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading has finished (for scripts and tests); returns :attr:`ready`."""
        self._done.wait(timeout)
        return self.ready
