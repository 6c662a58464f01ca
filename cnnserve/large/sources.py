"""Images read by region: tiled or strip TIFF (BigTIFF, pyramids), zarr, ``.npy``, pictures.

:func:`open_source` opens an image without reading its pixels; :meth:`Source.read` returns
the pixels of one region as a network's input pixels, ``(C, h, w)`` float32 in [0, 1], with
the model's number of channels. Only the TIFF tiles or strips (or zarr chunks) that the
region touches are decoded.

The pixel rules are those of :mod:`cnnserve.images`:

- **TIFF** (``tifffile``, through its zarr view ``aszarr``): 8-bit pixels divided by 255,
  16-bit by 65535, floats clipped to [0, 1] (as :func:`~cnnserve.images.read_image` does);
  1 to 4 samples (gray, gray + alpha, RGB, RGBA; alpha is dropped); RGB to one channel by
  ITU-R 601 luma (``0.299 R + 0.587 G + 0.114 B`` of the [0, 1] pixels), gray to three
  channels repeated (:func:`~cnnserve.images.to_channels`). Series 0; ``level`` picks a
  level of a pyramid (0: full resolution).
- **zarr arrays and ``.npy`` files** (memory-mapped): ``(H, W)`` or ``(C, H, W)`` with C the
  model's channels, uint8, uint16 or floats in [0, 1] (as :func:`~cnnserve.images.as_image`).
- **Other image files** (PNG, JPEG, ...): decoded whole by
  :func:`~cnnserve.images.read_image`, so limited to its ``MAX_PIXELS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve._checks import check_int
from cnnserve.images import ImageError, as_image, read_image, to_channels

__all__ = ["Source", "SourceError", "SourceSpec", "open_source"]

_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs")
_ZARR_SUFFIXES = (".zarr", ".zr3")
# Layouts of a TIFF series that are one image: gray, samples last (contiguous), samples first.
_TIFF_AXES = {"YX": "gray", "YXS": "last", "SYX": "first", "CYX": "first"}


class SourceError(ImageError):
    """An image source that cannot be read as an image (an :class:`ImageError`)."""


@dataclass(frozen=True)
class SourceSpec:
    """What a worker needs to open a source again: its path and pyramid level (picklable)."""

    path: str
    level: int = 0

    def open(self, channels: int) -> Source:
        """:func:`open_source` of this path and level."""
        return open_source(self.path, channels, level=self.level)


class Source:
    """A lazily read image: its size, and the pixels of any region.

    Attributes
    ----------
    height, width : int
        The image's size in pixels (of the chosen pyramid level).
    channels : int
        The channels :meth:`read` returns (the model's).
    samples : int
        The samples per pixel as stored (1 to 4).
    dtype : numpy.dtype
        The stored pixel type.
    description : str
        For people and for the map's attributes: kind, path, level.
    spec : SourceSpec or None
        How to open it again elsewhere (None for an in-memory array).
    """

    def __init__(
        self,
        array: Any,
        layout: str,
        channels: int,
        *,
        description: str,
        spec: SourceSpec | None,
        clip_floats: bool,
        closer: Any = None,
    ) -> None:
        self._array = array
        self._layout = layout  # "gray" (H, W), "first" (S, H, W) or "last" (H, W, S)
        self.channels = channels
        shape = tuple(array.shape)
        self.height, self.width = shape[-2:] if layout != "last" else shape[:2]
        self.samples = 1 if layout == "gray" else shape[0 if layout == "first" else 2]
        self.dtype = np.dtype(array.dtype)
        self.description = description
        self.spec = spec
        self._clip = clip_floats
        self._closer = closer

    def close(self) -> None:
        """Release the file (a TIFF's handle); reading afterwards is an error."""
        if self._closer is not None:
            self._closer.close()
            self._closer = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The pixels of rows ``[y0, y1)`` and columns ``[x0, x1)``, as the network sees them.

        Returns
        -------
        ndarray, shape (C, y1 - y0, x1 - x0)
            float32 in [0, 1], C = :attr:`channels`.

        Raises
        ------
        ValueError
            A region outside the image, or float pixels outside [0, 1] in a zarr or ``.npy``
            array.
        """
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ValueError(
                f"region rows [{y0}, {y1}) x columns [{x0}, {x1}) is outside the "
                f"{self.height}x{self.width} image"
            )
        if self._layout == "gray":
            raw = np.asarray(self._array[y0:y1, x0:x1])[None]
        elif self._layout == "first":
            raw = np.asarray(self._array[:, y0:y1, x0:x1])
        else:
            raw = np.moveaxis(np.asarray(self._array[y0:y1, x0:x1, :]), 2, 0)
        return _model_pixels(raw, self.channels, self._clip, self.description)


def _model_pixels(raw: np.ndarray, channels: int, clip: bool, where: str) -> np.ndarray:
    """``(S, h, w)`` stored samples -> ``(channels, h, w)`` float32 in [0, 1]."""
    if raw.shape[0] in (2, 4):
        raw = raw[:-1]  # alpha
    if raw.dtype == np.uint8:
        x = raw.astype(np.float32) / np.float32(255)
    elif raw.dtype == np.uint16:
        x = (raw / 65535.0).astype(np.float32)
    else:
        x = raw.astype(np.float32)
        if clip:
            if not np.isfinite(x).all():
                raise SourceError(f"{where} holds NaN or infinite pixel values")
            np.clip(x, 0.0, 1.0, out=x)
        else:
            x = as_image(x, x.shape[0])  # checks [0, 1]
    return to_channels(x, channels)[0]  # the rule of read_image: ITU-R 601 luma, repetition


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype not in (np.uint8, np.uint16) and dtype.kind != "f":
        raise SourceError(
            f"{where} has {dtype} pixels: cnnserve reads 8-bit, 16-bit or floating-point "
            "pixels (bit depth 8, 16 or float)"
        )


def open_source(source: Any, channels: int, *, level: int = 0) -> Source:
    """Open an image for reading by region, without reading its pixels.

    Parameters
    ----------
    source : str, PathLike, ndarray or zarr.Array
        A TIFF file (``.tif``, ``.tiff``, ...), a zarr array (a ``.zarr`` directory holding
        one array, or a ``zarr.Array``), a ``.npy`` file (memory-mapped), another image file
        (PNG, JPEG, ...: decoded whole), or an in-memory array ``(H, W)`` / ``(C, H, W)``.
    channels : int
        The model's input channels (1 or 3): what :meth:`Source.read` returns.
    level : int
        The pyramid level of a TIFF (0: full resolution).

    Raises
    ------
    ImageError
        A file that does not exist or is not an image: a TIFF with other dimensions than one
        image (Y, X and samples), more than 4 samples, a bit depth other than 8, 16 or float;
        a level the pyramid does not have; a zarr group that is not an array; an array of
        the wrong shape or dtype.
    TypeError
        ``source`` is none of the above.
    """
    channels = check_int(channels, "channels", 1, 3)
    level = check_int(level, "level", 0)
    if isinstance(source, np.ndarray) or _is_zarr_array(source):
        if level:
            raise ValueError(f"level must be 0 for an array source, got {level}")
        return _array_source(source, channels, "the array", None)
    if not isinstance(source, str | os.PathLike):
        raise TypeError(
            f"source must be a file path, a numpy array or a zarr array, got "
            f"{type(source).__name__}"
        )
    path = Path(source)
    if not path.exists():
        raise SourceError(f"image {path} does not exist")
    suffix = path.suffix.lower()
    if level and suffix not in _TIFF_SUFFIXES:
        raise ValueError(f"level applies to TIFF pyramids only, got level {level} for {path}")
    spec = SourceSpec(str(path.resolve()), level)
    if suffix in _TIFF_SUFFIXES:
        return _tiff_source(path, channels, level, spec)
    if suffix in _ZARR_SUFFIXES or path.is_dir():
        return _array_source(_open_zarr(path), channels, f"zarr array {path}", spec)
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise SourceError(f"cannot read image array {path}: {exc}") from exc
        return _array_source(array, channels, f"image array {path}", spec)
    pixels = read_image(path, channels)  # (C, H, W) float32 in [0, 1]
    return Source(
        pixels, "first", channels, description=f"image {path}", spec=spec, clip_floats=True
    )


def _is_zarr_array(obj: Any) -> bool:
    return type(obj).__module__.startswith("zarr") and type(obj).__name__ == "Array"


def _open_zarr(path: Path) -> Any:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises many kinds for a directory that is not a store
        raise SourceError(f"{path} cannot be opened as a zarr array: {exc}") from exc
    if not _is_zarr_array(node):
        raise SourceError(
            f"{path} is a zarr group, not an array: give the path of the image array inside "
            "it (e.g. store.zarr/image)"
        )
    return node


def _array_source(array: Any, channels: int, where: str, spec: SourceSpec | None) -> Source:
    shape = tuple(array.shape)
    if len(shape) == 2 and channels == 1:
        layout = "gray"
    elif len(shape) == 3 and shape[0] == channels:
        layout = "first"
    else:
        expected = "(H, W) or (1, H, W)" if channels == 1 else f"({channels}, H, W)"
        raise SourceError(f"{where} must have shape {expected} for this model, got {shape}")
    if min(shape) == 0:
        raise SourceError(f"{where} must not be empty, got shape {shape}")
    _check_dtype(np.dtype(array.dtype), where)
    return Source(array, layout, channels, description=where, spec=spec, clip_floats=False)


def _tiff_source(path: Path, channels: int, level: int, spec: SourceSpec) -> Source:
    import tifffile
    import zarr

    where = f"TIFF {path}"
    try:
        tif = tifffile.TiffFile(path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise SourceError(f"{where} cannot be read: {exc}") from exc
    try:
        if not tif.series:
            raise SourceError(f"{where} holds no image")
        series = tif.series[0]
        if level >= len(series.levels):
            raise SourceError(
                f"{where} has {len(series.levels)} pyramid level(s) (0 to "
                f"{len(series.levels) - 1}), got level {level}"
            )
        image = series.levels[level]
        axes, shape = image.axes, tuple(image.shape)
        samples = shape[axes.index("S")] if "S" in axes else shape[0] if axes == "CYX" else 1
        if axes not in _TIFF_AXES:
            raise SourceError(
                f"{where} is not one image: its dimensions are {axes} {shape}, expected Y and "
                "X with at most one axis of samples (YX, YXS or SYX)"
            )
        if samples > 4:
            raise SourceError(
                f"{where} has {samples} samples per pixel: at most 4 (gray, gray + alpha, "
                "RGB, RGBA)"
            )
        _check_dtype(np.dtype(image.dtype), where)
        array = zarr.open(tif.aszarr(series=0, level=level), mode="r")
    except BaseException:
        tif.close()
        raise
    description = where if level == 0 else f"{where} level {level}"
    return Source(
        array,
        _TIFF_AXES[axes],
        channels,
        description=description,
        spec=spec,
        clip_floats=True,
        closer=tif,
    )
