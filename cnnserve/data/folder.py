"""Image folders: the ``"folder"`` format of :mod:`cnnserve.data`.

``root/<class name>/<image>.png|.jpg|.jpeg``, read with Pillow. Class names are the sorted
sub-folder names. With ``channels=None`` the images are grayscale (one channel) when every
image is grayscale, otherwise RGB (gray images are repeated in three channels); with
``channels=1`` colour images become grey by ITU-R 601 luma (``0.299 R + 0.587 G + 0.114 B``,
rounded to 8 bits), with ``channels=3`` grey images are repeated. Transparency is flattened
over white, 16-bit grey is scaled to 8 bits, and a palette of greys is grey
(:func:`cnnserve.images.flatten_8bit`). All images must share one size unless
``image_size=(H, W)`` is given, which resizes each image (bilinear, antialiased when it
shrinks). Hidden files and folders are ignored, and so are non-image files beside the class
folders; any other file inside a class folder, and any unreadable image, is an error naming
the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnserve.data._common import DataError, visible
from cnnserve.images import flatten_8bit, luma

__all__ = ["IMAGE_SUFFIXES", "load_folder"]

#: The image files a class folder may hold.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if visible(p) and p.is_dir()), key=lambda p: p.name)


def _read_image(path: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """(H, W) uint8 for a grayscale image, (H, W, 3) uint8 for a colour one."""
    from PIL import Image

    try:
        with Image.open(path, formats=("PNG", "JPEG")) as img:
            img.load()
            if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit (or 32-bit) grey
                deep = np.asarray(img, dtype=np.float64)
                pixels = np.rint(np.clip(deep, 0, 65535) / 257).astype(np.uint8)
            elif img.mode == "F":
                raise DataError(f"{path}: unsupported image mode 'F' (8- or 16-bit pixels)")
            else:
                pixels = flatten_8bit(img)
        if image_size is not None and pixels.shape[:2] != image_size:
            resized = Image.fromarray(pixels).resize(
                (image_size[1], image_size[0]), Image.Resampling.BILINEAR
            )
            pixels = np.asarray(resized, dtype=np.uint8)
        return pixels
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def _stack(images: list[np.ndarray], channels: int) -> np.ndarray:
    """(N, channels, H, W) uint8 of (H, W) grey and (H, W, 3) colour images."""
    H, W = images[0].shape[:2]
    X = np.empty((len(images), channels, H, W), dtype=np.uint8)
    for i, img in enumerate(images):
        if img.ndim == 2:
            X[i] = img  # grey: one channel, or repeated in three
        elif channels == 3:
            X[i] = img.transpose(2, 0, 1)  # (3, H, W)
        else:  # colour to grey by ITU-R 601 luma, rounded to 8 bits
            grey = luma(img.transpose(2, 0, 1))  # (1, H, W) float32 on 0..255
            X[i] = np.clip(np.rint(grey), 0, 255)
    return X


def load_folder(
    root: Path, image_size: tuple[int, int] | None, channels: int | None = None
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """``(class_names, X, y)`` of an image folder.

    Parameters
    ----------
    root : Path
    image_size : (int, int) or None
        ``(H, W)`` to resize every image to; None: all images must share one size.
    channels : {None, 1, 3}
        None: 1 when every image is grey, else 3. 1 or 3: converted (see the module).

    Returns
    -------
    class_names : tuple of str
    X : ndarray of uint8, shape (N, C, H, W)
    y : ndarray of int64, shape (N,)
    """
    classes = _class_dirs(root)
    for entry in sorted(root.iterdir()):
        if visible(entry) and entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            raise DataError(f"{entry}: an image outside a class folder (use root/<class>/image)")
    if len(classes) < 2:
        raise DataError(
            f"{root}: an image folder needs at least 2 class sub-folders, found "
            f"{len(classes)}" + (f" ({classes[0].name})" if classes else "")
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, ...]] | None = None
    for k, cdir in enumerate(classes):
        files = sorted((p for p in cdir.iterdir() if visible(p)), key=lambda p: p.name)
        if not files:
            raise DataError(f"{cdir}: empty class folder (no .png/.jpg/.jpeg images)")
        for path in files:
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{path}: not an image file (a class folder may hold only .png, .jpg and "
                    ".jpeg files; hidden files are ignored)"
                )
            img = _read_image(path, image_size)
            if first is None:
                first = (path, img.shape[:2])
            elif img.shape[:2] != first[1]:
                (h, w), (fh, fw) = img.shape[:2], first[1]
                raise DataError(
                    f"{path}: the image is {h}x{w} (HxW), {first[0]} is {fh}x{fw}; pass "
                    "image_size=(H, W) (cnnserve train --image-size H,W) to resize every image"
                )
            images.append(img)
            labels.append(k)
    if channels is None:
        channels = 1 if all(img.ndim == 2 for img in images) else 3
    return tuple(c.name for c in classes), _stack(images, channels), np.array(labels, np.int64)
