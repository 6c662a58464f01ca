"""Image folders: the ``"folder"`` format of :mod:`cnnserve.data`.

``root/<class name>/<image>.png|.jpg|.jpeg``, read with Pillow. Class names are the sorted
sub-folder names. Images are grayscale (one channel) when every image is grayscale, otherwise
RGB (gray images are replicated to three channels; alpha is dropped). All images must share
one size unless ``image_size=(H, W)`` is given, which resizes each image (bilinear). Hidden
files and folders are ignored, and so are non-image files beside the class folders; any other
file inside a class folder, and any unreadable image, is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnserve.data._common import DataError, visible

__all__ = ["IMAGE_SUFFIXES", "load_folder"]

#: The image files a class folder may hold.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA", "La")
_COLOR_MODES = ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if visible(p) and p.is_dir()), key=lambda p: p.name)


def _read_image(path: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """(H, W) uint8 for a grayscale image, (H, W, 3) uint8 for a colour one."""
    from PIL import Image

    try:
        with Image.open(path, formats=("PNG", "JPEG")) as img:
            img.load()
            mode = img.mode
            if mode in _GRAY_MODES:
                img = img.convert("L")
            elif mode in _COLOR_MODES:
                img = img.convert("RGB")
            else:
                raise DataError(f"{path}: unsupported image mode {mode!r} (8-bit gray or colour)")
            if image_size is not None and img.size != (image_size[1], image_size[0]):
                img = img.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def load_folder(root: Path, image_size: tuple[int, int] | None):
    """``(class_names, X, y)`` of an image folder: X uint8 (N, 1 or 3, H, W)."""
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
                raise DataError(
                    f"{path}: image size {img.shape[:2]} (H, W) differs from {first[1]} of "
                    f"{first[0]}; pass image_size=(H, W) to resize every image"
                )
            images.append(img)
            labels.append(k)
    if all(img.ndim == 2 for img in images):
        X = np.stack(images)[:, None]  # (N, 1, H, W)
    else:
        H, W = first[1]
        X = np.empty((len(images), 3, H, W), dtype=np.uint8)
        for i, img in enumerate(images):
            X[i] = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)  # (3, H, W)
    return tuple(c.name for c in classes), X, np.array(labels, dtype=np.int64)
