"""Bytes to pixels to a network's input: decoding, channels, resizing, normalisation.

Every input path (training data, ``cnnserve predict`` and ``scoremap``, the service) turns
images into a network's input here, by one set of rules:

- **Decoding** (:func:`read_image`): PNG, JPEG, BMP, GIF, TIFF or WebP from a file or bytes, with
  Pillow; an image with more pixels than the limit is refused before it is decoded
  (decompression bombs), and every failure is an :class:`ImageError`. :func:`read_image_file`
  also reads ``.npy`` arrays of pixels, their header checked before anything is allocated.
  An image keeps its own channels (grey 1, colour 3; transparency flattened over white).
- **Pixels** (:func:`as_image`): ``(C, H, W)`` float32 in [0, 1], from uint8 (divided by
  255) or floats in [0, 1].
- **Channels** (:func:`to_channels`, :func:`model_pixels`): an image of other channels than
  the model's is converted, colour to grey by ITU-R 601 luma (:func:`luma`,
  ``0.299 R + 0.587 G + 0.114 B``), grey to RGB by repetition, and the conversion is named
  (:data:`RGB_TO_GREY`, :data:`GREY_TO_RGB`) for the answer's ``converted``. Pictures are
  drawn over the image as it came, not over the converted copy.
- **Resizing** (:func:`resize`): bilinear, channel by channel.
- **Normalisation** (:func:`normalize`, :func:`preprocess`): ``(x - mean[c]) / std[c]`` per
  channel with the statistics of the training split, which the model file keeps.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from cnnserve._checks import FLOAT_DTYPES, check_dtype, check_int

__all__ = [
    "GREY_TO_RGB",
    "LUMA",
    "MAX_PIXELS",
    "RGB_TO_GREY",
    "ImageError",
    "ImageTooLargeError",
    "as_image",
    "flatten_8bit",
    "image_pixels",
    "luma",
    "model_pixels",
    "normalize",
    "normalize_raw",
    "preprocess",
    "read_image",
    "read_image_file",
    "read_npy",
    "resize",
    "to_channels",
]

#: Images decoded, or resized for a scale, above this many pixels are refused.
MAX_PIXELS = 64 * 2**20
# normalize() accepts pixels this far outside [0, 1]: the round-off of un-normalising data.
_X01_SLACK = 1e-3
# Samples normalised at a time, so that the float64 temporaries stay near 8 MiB.
_CHUNK_BYTES = 8 << 20


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


class ImageError(ValueError):
    """An image file or upload that cannot be decoded or is too large."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than the limit, refused before it is decoded."""


def read_image(
    source: str | os.PathLike | bytes,
    channels: int | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode a PNG, JPEG, BMP, GIF, TIFF or WebP image: float32 pixels in [0, 1], ``(C, H, W)``.

    The image keeps its own channels unless ``channels`` asks for others: a grey image
    (modes ``1``, ``L``, ``LA``, 16-bit and float grey, or a palette of greys) has one, any
    other three (RGB; CMYK, YCbCr, LAB and HSV are converted to RGB). Transparency is
    flattened over white, as a viewer shows the image on a white page. 16-bit grey is
    divided by 65535.

    Parameters
    ----------
    source : str, PathLike or bytes
        A file or the encoded bytes.
    channels : {None, 1, 3}, optional
        None: the image's own channels. 1 or 3: converted as :func:`to_channels` does (a
        colour image to grey by ITU-R 601 luma, grey to RGB by repetition).
    max_pixels : int
        Larger images are refused before they are decoded (decompression bombs).

    Raises
    ------
    ImageError
        The data is not a decodable image.
    ImageTooLargeError
        The image has more than ``max_pixels`` pixels (an :class:`ImageError` too).
    """
    from PIL import Image, UnidentifiedImageError

    max_pixels = check_int(max_pixels, "max_pixels", 1)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (the image's own), got {channels}")
    data = isinstance(source, bytes | bytearray)
    where = "the image" if data else f"image {source}"
    undecodable = f"{'the data' if data else where} cannot be decoded as an image"
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            # Our own limit below applies, not Pillow's bomb warning; and a damaged file's
            # warnings (truncated tags, corrupt EXIF) say nothing its error does not.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            img = Image.open(stream, formats=("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"))
            pixels = _decode(img, max_pixels, where, undecodable)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{where} does not exist") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above ours
        raise ImageTooLargeError(f"{where} is too large to decode: {exc}") from exc
    except UnidentifiedImageError as exc:  # its message shows a stream object: not for people
        raise ImageError(
            f"{undecodable}: it is not a PNG, JPEG, BMP, GIF, TIFF or WebP file"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{undecodable}: {exc}") from exc
    except MemoryError as exc:
        raise ImageError(f"{undecodable}: it needs more memory than there is") from exc
    except Exception as exc:  # noqa: BLE001 - a damaged file trips decoders in many ways
        # A TIFF tag of an unexpected type or value makes Pillow raise TypeError,
        # OverflowError, KeyError...: still a file that cannot be decoded, never a crash.
        raise ImageError(f"{undecodable}: {type(exc).__name__}: {exc}") from exc
    return pixels if channels is None else to_channels(pixels, channels)[0]


def _decode(img: Any, max_pixels: int, where: str, undecodable: str) -> np.ndarray:
    """The pixels of an opened Pillow image, its own channels (:func:`read_image`)."""
    from PIL import ImageOps

    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"{where} has {height}x{width} (HxW) = {width * height:,} pixels, more "
                f"than the limit of {max_pixels:,}"
            )
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # a photo's orientation tag, if any
        if img.mode.startswith("I") or img.mode == "F":  # 16-bit, 32-bit or float gray
            gray = np.asarray(img, dtype=np.float64)
            gray = gray / 65535.0 if img.mode != "F" else gray
            if not np.isfinite(gray).all():
                raise ImageError(f"{undecodable}: it holds NaN or infinite pixel values")
            return np.clip(gray, 0.0, 1.0).astype(np.float32)[None]
        pixels = flatten_8bit(img)  # (H, W) or (H, W, 3) uint8
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
    return pixels.astype(np.float32) / np.float32(255)


def flatten_8bit(img: Any) -> np.ndarray:
    """A Pillow image as 8-bit pixels of its own channels, transparency over white.

    Grey modes (``1``, ``L``, ``LA``) and palette images whose colours are all greys give
    ``(H, W)``; every other mode ``(H, W, 3)`` RGB. Alpha is composited over white:
    ``(c * a + 255 * (255 - a) + 127) // 255``, with ``c`` and ``a`` in 0..255.

    Parameters
    ----------
    img : PIL.Image.Image
        8-bit (modes other than ``I*`` and ``F``).

    Returns
    -------
    ndarray of uint8, shape ``(H, W)`` or ``(H, W, 3)``.
    """
    palette = img.mode in ("P", "PA")
    if palette:
        transparent = img.mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if transparent else "RGB")
    elif img.mode in ("La", "RGBa"):  # premultiplied alpha
        img = img.convert(img.mode.upper())
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if img.mode in ("LA", "RGBA"):
        both = np.asarray(img, dtype=np.uint16)  # (H, W, 2 or 4)
        a = both[..., -1:]
        flat = ((both[..., :-1] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        pixels = flat[..., 0] if img.mode == "LA" else flat
    else:
        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if palette and _all_grey(pixels):  # a GIF or PNG of greys: one channel, as it looks
        return np.ascontiguousarray(pixels[..., 0])
    return pixels


def _all_grey(pixels: np.ndarray) -> bool:
    """Whether every pixel of ``(H, W, 3)`` has R == G == B."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return bool(np.array_equal(r, g) and np.array_equal(g, b))


def read_npy(path: str | os.PathLike, max_values: int) -> np.ndarray:
    """A ``.npy`` array, its header checked (size, dtype) before anything is allocated.

    Raises
    ------
    ImageError
        Not a readable ``.npy`` file, a version this reader does not know, more than
        ``max_values`` numbers, Python objects, or fewer bytes than the header says.
    """
    try:
        with open(path, "rb") as handle:
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(np.lib.format.read_magic(handle))
            if read_header is None:
                raise ImageError(f"image array {path}: unsupported .npy format version")
            shape, _, dtype = read_header(handle)
            if dtype.hasobject or math.prod(shape) > max_values:
                raise ImageError(
                    f"image array {path} has shape {shape} and dtype {dtype}: at most "
                    f"{max_values:,} numbers, and no Python objects"
                )
            data_bytes = os.fstat(handle.fileno()).st_size - handle.tell()
            if data_bytes < math.prod(shape) * dtype.itemsize:
                raise ImageError(f"image array {path} is shorter than its header says")
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot read image array {path}: {exc}") from exc


def read_image_file(path: str | os.PathLike, channels: int | None = None) -> np.ndarray:
    """An image file (PNG, JPEG, BMP, GIF, TIFF, WebP) or a ``.npy`` array of pixels.

    Parameters
    ----------
    path : str or PathLike
    channels : {None, 1, 3}, optional
        For an image file, as for :func:`read_image` (None: the image's own channels).

    Returns
    -------
    ndarray
        An image file: ``(C, H, W)`` float32 in [0, 1] (:func:`read_image`). A ``.npy``
        file: the array as stored (at most ``3 * MAX_PIXELS`` numbers), for
        :func:`as_image` or :func:`model_pixels` to check.
    """
    if os.fspath(path).endswith(".npy"):
        return read_npy(path, (channels or 3) * MAX_PIXELS)
    return read_image(path, channels)


# ---------------------------------------------------------------------------------------------
# Pixels and their size
# ---------------------------------------------------------------------------------------------


def as_image(image: Any, channels: int) -> np.ndarray:
    """An image as float32 pixels in [0, 1], shape ``(C, H, W)``.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` (one channel) or ``(C, H, W)``: uint8 pixels (divided by 255) or floats
        in [0, 1].
    channels : int
        The model's input channels C.

    Raises
    ------
    TypeError
        Not an ndarray, or a dtype other than uint8 and float.
    ValueError
        A shape that does not have ``channels`` channels, an empty image, or float values
        outside [0, 1] (or NaN).
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy.ndarray, got {type(image).__name__}")
    if image.ndim == 2 and channels == 1:
        image = image[None]
    if image.ndim != 3 or image.shape[0] != channels:
        expected = "(H, W) or (1, H, W)" if channels == 1 else f"({channels}, H, W)"
        raise ValueError(f"image must have shape {expected} for this model, got {image.shape}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"image must have dtype uint8 (0..255) or float (0..1), got {image.dtype}")
    out = np.asarray(image, dtype=np.float32)
    low, high = float(np.min(out)), float(np.max(out))
    if not (low >= 0.0 and high <= 1.0):  # NaN fails too
        raise ValueError(
            f"a float image must hold pixels in [0, 1], got values from {low:g} to {high:g} "
            "(divide 8-bit pixels by 255, or pass a uint8 array)"
        )
    return out


#: ITU-R BT.601 luma weights of R, G and B: grey = 0.299 R + 0.587 G + 0.114 B.
LUMA = (0.299, 0.587, 0.114)
#: What ``converted`` says of a colour image given to a one-channel model.
RGB_TO_GREY = "RGB to grey (ITU-R 601 luma)"
#: What ``converted`` says of a grey image given to a three-channel model.
GREY_TO_RGB = "grey to RGB (repeated)"


def luma(rgb: np.ndarray) -> np.ndarray:
    """Grey from RGB by the ITU-R 601 rule, ``0.299 R + 0.587 G + 0.114 B``.

    Parameters
    ----------
    rgb : ndarray, shape (..., 3, H, W)
        float32 or float64 pixels (any scale), or uint8.

    Returns
    -------
    ndarray, shape (..., 1, H, W)
        float32 for float32 or uint8 input (uint8 stays on the 0..255 scale), float64 for
        float64.
    """
    dtype = np.float64 if rgb.dtype == np.float64 else np.float32
    r, g, b = (rgb[..., c : c + 1, :, :].astype(dtype, copy=False) for c in range(3))
    out = r * dtype(LUMA[0])
    out += g * dtype(LUMA[1])
    out += b * dtype(LUMA[2])
    return out


def to_channels(pixels: np.ndarray, channels: int) -> tuple[np.ndarray, str | None]:
    """Pixels with a model's channels, and what was converted.

    A colour image for a one-channel model becomes grey by :func:`luma`; a grey image for a
    three-channel model is repeated in R, G and B.

    Parameters
    ----------
    pixels : ndarray, shape (C, H, W)
        C 1 or 3; float pixels in [0, 1].
    channels : {1, 3}
        The model's input channels.

    Returns
    -------
    pixels : ndarray, shape (channels, H, W)
        ``pixels`` itself when it has them already, else a new array of its dtype.
    converted : str or None
        None, :data:`RGB_TO_GREY` or :data:`GREY_TO_RGB`.
    """
    C = pixels.shape[0]
    if C == channels:
        return pixels, None
    if C == 3 and channels == 1:
        return luma(pixels).astype(pixels.dtype, copy=False), RGB_TO_GREY
    if C == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=0), GREY_TO_RGB
    raise ValueError(f"cannot convert an image of {C} channels to {channels} (1 or 3 only)")


def image_pixels(image: Any) -> np.ndarray:
    """An image as float32 pixels in [0, 1] with its own channels, ``(C, H, W)``.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` (one channel) or ``(C, H, W)``: uint8 pixels or floats in [0, 1].

    Raises
    ------
    TypeError, ValueError
        As :func:`as_image`.
    """
    own = image.shape[0] if isinstance(image, np.ndarray) and image.ndim == 3 else 1
    return as_image(image, own)


def model_pixels(image: Any, channels: int) -> tuple[np.ndarray, str | None]:
    """An image as a model's input pixels, converted to its channels when they differ.

    Like :func:`as_image`, but a grey image for a three-channel model or a colour image
    for a one-channel model is converted (:func:`to_channels`) instead of refused.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` or ``(C, H, W)``: uint8 pixels or floats in [0, 1]. ``C`` is the model's,
        or 1 or 3 for a model of 3 or 1 channels.
    channels : int
        The model's input channels.

    Returns
    -------
    pixels : ndarray of float32, shape (channels, H, W)
    converted : str or None
        None, :data:`RGB_TO_GREY` or :data:`GREY_TO_RGB`.

    Raises
    ------
    TypeError, ValueError
        As :func:`as_image`.
    """
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        own = image.shape[0] if image.ndim == 3 else 1
        if own != channels and {own, channels} == {1, 3}:
            return to_channels(as_image(image, own), channels)
        if own != channels and channels in (1, 3):
            raise ValueError(
                "image must have shape (H, W), (1, H, W) or (3, H, W) for this model, got "
                f"{image.shape}"
            )
    return as_image(image, channels), None


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (C, H, W) float32 pixels, channel by channel (Pillow mode F)."""
    from PIL import Image

    out = np.empty((image.shape[0], height, width), dtype=np.float32)
    for c, plane in enumerate(image):
        resized = Image.fromarray(plane, mode="F").resize(
            (width, height), Image.Resampling.BILINEAR
        )
        out[c] = np.asarray(resized, dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def _check_stat(a: Any, name: str, C: int) -> np.ndarray:
    try:
        arr = np.array(a, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of {C} numbers, got {a!r}") from None
    if arr.shape != (C,):
        raise ValueError(f"{name} must have one value per channel ({C}), got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def _normalize_into(out: np.ndarray, src: np.ndarray, scale: float, mean, std) -> None:
    """``out[:] = (src / scale - mean[c]) / std[c]``, a few MiB of samples at a time."""
    N = src.shape[0]
    per_sample = max(1, math.prod(src.shape[1:]) * 8)
    step = max(1, _CHUNK_BYTES // per_sample)
    m = mean[:, None, None]  # (C, 1, 1)
    s = std[:, None, None]
    for start in range(0, N, step):
        x = src[start : start + step].astype(np.float64)  # (n, C, H, W)
        if scale != 1:
            x /= scale
        x -= m
        x /= s
        out[start : start + step] = x


def normalize(x01: np.ndarray, mean, std, dtype=np.float32) -> np.ndarray:
    """Normalise [0, 1] pixels per channel: ``(x01 - mean[c]) / std[c]``.

    Parameters
    ----------
    x01 : numpy.ndarray
        float32 or float64 pixels in [0, 1], shape ``(N, C, H, W)`` or ``(C, H, W)``. Not
        modified. Values up to 1e-3 outside [0, 1] (round-off, e.g. of ``X * std + mean``)
        are taken as they are; anything further out is an error.
    mean, std : array_like
        Per-channel statistics, shape ``(C,)`` (e.g. ``Dataset.mean`` / ``Dataset.std``);
        ``std`` must be positive.
    dtype : {numpy.float32, numpy.float64}, optional
        dtype of the result (the arithmetic is done in float64).

    Returns
    -------
    numpy.ndarray
        A new array of ``x01``'s shape in ``dtype``.

    Raises
    ------
    TypeError
        ``x01`` is not a float array, or ``dtype`` is not float32/float64.
    ValueError
        Wrong number of dimensions or channels, values outside [0, 1] or NaN (pixels of 0..255
        must be divided by 255 first), non-finite statistics or ``std <= 0``.
    """
    dt = check_dtype(dtype)
    if not isinstance(x01, np.ndarray):
        raise TypeError(f"x01 must be a numpy.ndarray, got {type(x01).__name__}")
    if x01.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"x01 must have dtype float32 or float64 (pixels scaled to [0, 1]), got {x01.dtype}"
        )
    if x01.ndim not in (3, 4):
        raise ValueError(f"x01 must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {x01.shape}")
    x = x01 if x01.ndim == 4 else x01[None]  # (N, C, H, W)
    C = x.shape[1]
    mean_arr = _check_stat(mean, "mean", C)
    std_arr = _check_stat(std, "std", C)
    if np.any(std_arr <= 0):
        raise ValueError(f"std must be positive, got {std_arr.tolist()}")
    outside = ~((x >= -_X01_SLACK) & (x <= 1 + _X01_SLACK))  # NaN is outside too
    if outside.any():
        raise ValueError(
            "x01 must hold pixels in [0, 1] (divide 8-bit values by 255), got "
            f"{int(outside.sum())} values outside, e.g. {x[outside][0]}"
        )
    out = np.empty(x.shape, dtype=dt)
    _normalize_into(out, x, 1, mean_arr, std_arr)
    return out if x01.ndim == 4 else out[0]


def normalize_raw(raw: np.ndarray, levels: int, mean, std, dtype=np.float32) -> np.ndarray:
    """Normalise integer pixels of ``0..levels``: ``(raw / levels - mean[c]) / std[c]``.

    The training data's path (8-bit images have ``levels`` 255; the bundled digits 16),
    a few MiB of samples at a time in float64.

    Parameters
    ----------
    raw : ndarray, shape (N, C, H, W)
        Integer pixels.
    levels : int
        The largest pixel value, which maps to 1.
    mean, std : array_like, shape (C,)
        Statistics of the [0, 1] pixels.
    dtype : {numpy.float32, numpy.float64}

    Returns
    -------
    ndarray, shape of ``raw``, in ``dtype``.
    """
    out = np.empty(raw.shape, dtype=check_dtype(dtype))
    C = raw.shape[1]
    _normalize_into(out, raw, levels, _check_stat(mean, "mean", C), _check_stat(std, "std", C))
    return out


def preprocess(
    x01: np.ndarray, normalization: Mapping | None, dtype: Any, *, channels: int | None = None
) -> np.ndarray:
    """A network's input from [0, 1] pixels: the normalisation its model file keeps.

    Both :meth:`cnnserve.network.ConvNet.preprocess` and
    :meth:`cnnserve.convert.FullyConvNet.preprocess` run this, so that a trained network and
    its converted form accept and refuse the same pixels.

    Parameters
    ----------
    x01 : ndarray, shape (N, C, H, W) or (C, H, W)
        float32 or float64 pixels in [0, 1] (1e-3 of round-off allowed).
    normalization : dict or None
        ``{"mean": [...], "std": [...]}`` per channel; None: the pixels as they are.
    dtype : {numpy.float32, numpy.float64}
        The network's dtype.
    channels : int, optional
        The network's input channels C.

    Returns
    -------
    ndarray of ``dtype``, the shape of ``x01``.
    """
    if channels is not None and isinstance(x01, np.ndarray) and x01.ndim in (3, 4):
        if x01.shape[-3] != channels:
            raise ValueError(
                f"x01 must be (N, {channels}, H, W) or ({channels}, H, W) for this network, "
                f"got shape {x01.shape}"
            )
    if normalization is None:
        C = x01.shape[-3] if isinstance(x01, np.ndarray) and x01.ndim in (3, 4) else 1
        return normalize(x01, np.zeros(C), np.ones(C), dtype)
    return normalize(x01, normalization["mean"], normalization["std"], dtype)
