"""Data augmentation applied to every training batch: shifts with padding, horizontal flips,
brightness and contrast jitter, small scale jitter.

::

    from cnnserve.data.augment import Augment, default_augment

    aug = Augment(shift=2, flip=0.5, brightness=0.2, contrast=0.2, scale=0.1)
    aug = Augment.parse("shift=2,flip=0.5,brightness=0.2")     # the --augment spec
    aug = default_augment("faces")                              # a data set's default
    batch = aug.apply(X, np.random.default_rng(0), mean=mean, std=std)

What each parameter does to one image, drawn independently per image of the batch:

``shift`` (int, pixels, >= 0)
    Moves the image by ``dy, dx``, each uniform in ``-shift .. shift``; the uncovered border
    is filled by ``pad`` (a random crop of the padded image, as ``RandomCrop(padding=...)``).
``flip`` (probability in [0, 1])
    Mirrors the image left to right with this probability (0 for digits: a mirrored 2 is
    no digit).
``brightness`` (in [0, 1))
    Multiplies the pixels by a factor uniform in ``[1 - brightness, 1 + brightness]``.
``contrast`` (in [0, 1))
    Blends the image with its mean grey level: ``m + f * (x - m)``, ``f`` uniform in
    ``[1 - contrast, 1 + contrast]``, ``m`` the mean of all its pixels and channels.
``scale`` (in [0, 0.5])
    Zooms about the image centre by a factor uniform in ``[1 - scale, 1 + scale]``
    (bilinear; the image keeps its size, a zoom out is padded by ``pad``).
``pad`` (``"zero"`` or ``"edge"``)
    What fills the border a shift or a zoom out uncovers: black (pixel value 0, as the
    digits' background) or the nearest edge pixel.

The geometric steps (flip, zoom, shift) are one bilinear resampling, then brightness, then
contrast, then the pixels are clipped to [0, 1]. The resampling is separable: per image, a
small interpolation matrix for the rows and one for the columns, applied as two batched matrix
products; with integer shifts and no zoom it is exact (whole pixels move). Every step is
vectorised over the batch with NumPy.

Data in cnnserve are normalised, ``X = (x01 - mean[c]) / std[c]``: :meth:`Augment.apply` takes
the ``mean``/``std`` (a model's ``normalization``), works on the [0, 1] pixels and normalises
again. Without them it works on ``X`` as it is and does not clip.

Reproducible: the draws come only from the generator given to :meth:`Augment.apply`, in a
fixed order, so the same generator state and batch give the same augmented batch. The
:class:`~cnnserve.solver.Solver` seeds one generator per epoch from ``(seed, epoch)``: the same
seed gives the same batches, a resumed run continues exactly, and the batch order is the
order of a run without augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

__all__ = ["AUGMENT_DEFAULTS", "Augment", "default_augment", "resolve_augment"]

_PADS = ("zero", "edge")


@dataclass(frozen=True)
class Augment:
    """An augmentation of training batches (see the module docstring for each parameter).

    Parameters
    ----------
    shift : int
        Largest shift in pixels along each axis, >= 0 (default 0).
    flip : float
        Probability of a horizontal flip, in [0, 1] (default 0).
    brightness : float
        Brightness factor range ``1 +- brightness``, in [0, 1) (default 0).
    contrast : float
        Contrast factor range ``1 +- contrast``, in [0, 1) (default 0).
    scale : float
        Zoom factor range ``1 +- scale``, in [0, 0.5] (default 0).
    pad : {"zero", "edge"}
        The fill of uncovered borders (default ``"zero"``).

    Raises
    ------
    ValueError
        A parameter out of its range (named, with the range).
    TypeError
        A parameter of the wrong type.
    """

    shift: int = 0
    flip: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    scale: float = 0.0
    pad: str = "zero"

    def __post_init__(self) -> None:
        if isinstance(self.shift, bool) or not isinstance(self.shift, int | np.integer):
            if not (isinstance(self.shift, float) and self.shift.is_integer()):
                raise TypeError(
                    f"augment shift must be a whole number of pixels, got {self.shift!r}"
                )
        object.__setattr__(self, "shift", int(self.shift))
        if self.shift < 0:
            raise ValueError(f"augment shift must be >= 0 pixels, got {self.shift}")
        ranges = {
            "flip": (0.0, 1.0, "]"),
            "brightness": (0.0, 1.0, ")"),
            "contrast": (0.0, 1.0, ")"),
            "scale": (0.0, 0.5, "]"),
        }
        for name, (low, high, end) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise TypeError(f"augment {name} must be a number, got {value!r}")
            value = float(value)
            inside = low <= value < high or (end == "]" and value == high)
            if not math.isfinite(value) or not inside:
                raise ValueError(
                    f"augment {name} must be in [{low:g}, {high:g}{end}, got {value:g}"
                )
            object.__setattr__(self, name, value)
        if self.pad not in _PADS:
            raise ValueError(f"augment pad must be one of {', '.join(_PADS)}, got {self.pad!r}")

    # -- the spec -----------------------------------------------------------------------------

    @classmethod
    def parse(cls, spec: str) -> Augment:
        """An Augment from a spec such as ``"shift=2,flip=0.5,brightness=0.1"``.

        ``"none"`` (or ``""``) is no augmentation; parameters not named are 0 (``pad``:
        ``zero``). Raises ``ValueError`` naming an unknown parameter or a bad value.
        """
        if not isinstance(spec, str):
            raise TypeError(f"an augment spec must be a str, got {type(spec).__name__}")
        text = spec.strip()
        if text.lower() in ("", "none"):
            return cls()
        known = [f.name for f in fields(cls)]
        values: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, raw = (part.strip() for part in item.partition("="))
            if not sep or not key or not raw:
                raise ValueError(
                    f"augment spec {spec!r}: expected NAME=VALUE items separated by commas "
                    f"(e.g. shift=2,flip=0.5), got {item.strip()!r}"
                )
            if key not in known:
                raise ValueError(
                    f"augment spec {spec!r}: unknown parameter {key!r}; known: {', '.join(known)}"
                )
            if key in values:
                raise ValueError(f"augment spec {spec!r}: {key} is given twice")
            if key == "pad":
                values[key] = raw
                continue
            try:
                number = float(raw)
            except ValueError:
                raise ValueError(f"augment spec {spec!r}: {key}={raw!r} is not a number") from None
            values[key] = number
        return cls(**values)

    def spec(self) -> str:
        """The compact spec of this augmentation (``"none"`` when it does nothing); parsing
        it gives an equal Augment."""
        if not self:
            return "none"
        parts = []
        for name, value in asdict(self).items():
            default = getattr(Augment, name)
            if value != default:
                parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
        return ",".join(parts)

    def __bool__(self) -> bool:
        """False when the augmentation leaves every image as it is."""
        return bool(self.shift or self.flip or self.brightness or self.contrast or self.scale)

    def check_shape(self, input_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` unless ``input_shape`` is that of images, (C, H, W) or
        (N, C, H, W), and ``shift`` is below half of their height and width (no
        augmentation fits any data)."""
        if not self:
            return
        if len(input_shape) not in (3, 4):
            raise ValueError(
                f"augment needs images of shape (N, C, H, W), got samples of shape "
                f"{tuple(input_shape)}"
            )
        H, W = input_shape[-2:]
        if 2 * self.shift >= min(H, W):
            raise ValueError(
                f"augment shift={self.shift} is too large for {H} x {W} (H x W) images: it "
                f"must be below half the smaller side, at most {(min(H, W) - 1) // 2}"
            )

    # -- applying -----------------------------------------------------------------------------

    def apply(
        self,
        X: np.ndarray,
        rng: np.random.Generator,
        *,
        mean: Any = None,
        std: Any = None,
    ) -> np.ndarray:
        """The augmented batch (a new array; ``X`` is not changed).

        Parameters
        ----------
        X : ndarray, shape (N, C, H, W), float32 or float64
            Normalised images, ``(x01 - mean[c]) / std[c]``.
        rng : numpy.random.Generator
            Where every random draw comes from.
        mean, std : array_like of shape (C,), optional
            The normalisation of ``X``: the pixels are augmented in [0, 1] and clipped there.
            Without them ``X`` is augmented as it is, without clipping.

        Returns
        -------
        ndarray, shape (N, C, H, W), the dtype of ``X``
            ``X`` itself when the augmentation does nothing.
        """
        if not isinstance(X, np.ndarray) or X.ndim != 4:
            raise ValueError(f"X must be an (N, C, H, W) array, got {getattr(X, 'shape', X)!r}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if not self:
            return X
        self.check_shape(X.shape)
        N, C, H, W = X.shape
        dtype = X.dtype
        # The draws, always all of them and in this order: a batch's augmentation depends
        # only on the generator state.
        dy = rng.integers(-self.shift, self.shift + 1, size=N)
        dx = rng.integers(-self.shift, self.shift + 1, size=N)
        flips = rng.random(N) < self.flip
        zoom = 1.0 + rng.uniform(-self.scale, self.scale, size=N)
        bright = 1.0 + rng.uniform(-self.brightness, self.brightness, size=N)
        contrast = 1.0 + rng.uniform(-self.contrast, self.contrast, size=N)

        normalised = mean is not None and std is not None
        if normalised:
            m = np.asarray(mean, dtype=dtype).reshape(1, C, 1, 1)
            s = np.asarray(std, dtype=dtype).reshape(1, C, 1, 1)
            x = X * s + m
        else:
            x = X.astype(dtype, copy=True)
        if self.shift or self.flip or self.scale:
            # Output pixel i samples the source at (i - c) / zoom + c - shift; a flip mirrors
            # the column first.
            cy, cx = (H - 1) / 2.0, (W - 1) / 2.0
            rows = (np.arange(H) - cy)[None, :] / zoom[:, None] + cy - dy[:, None]
            cols = np.broadcast_to(np.arange(W, dtype=np.float64), (N, W))
            cols = np.where(flips[:, None], W - 1 - cols, cols)
            cols = (cols - cx) / zoom[:, None] + cx - dx[:, None]
            # Separable: out[n, c] = Ry[n] @ x[n, c] @ Rx[n].T, two small batched products
            # (whole-pixel moves have weights 1 and 0: exact).
            ry = _interpolation(rows, H, self.pad, dtype)[:, None]
            rx = _interpolation(cols, W, self.pad, dtype)[:, None]
            x = ry @ x @ rx.transpose(0, 1, 3, 2)
        if self.brightness:
            x *= bright.astype(dtype)[:, None, None, None]
        if self.contrast:
            grey = x.mean(axis=(1, 2, 3), keepdims=True)
            x = grey + contrast.astype(dtype)[:, None, None, None] * (x - grey)
        if normalised:
            np.clip(x, 0.0, 1.0, out=x)
            x = (x - m) / s
        return x.astype(dtype, copy=False)


def _interpolation(coords: np.ndarray, size: int, pad: str, dtype: np.dtype) -> np.ndarray:
    """Per image, the (L, size) matrix of linear interpolation at ``coords`` (N, L): row ``l``
    weighs the two source pixels around ``coords[n, l]``; a source pixel outside the image
    weighs nothing (``pad="zero"``), or the coordinates are clipped to the edge first."""
    N, L = coords.shape
    if pad == "edge":
        coords = np.clip(coords, 0, size - 1)
    low = np.floor(coords)
    weight = coords - low
    low = low.astype(np.intp)
    matrix = np.zeros((N, L, size), dtype=dtype)
    n, row = np.arange(N)[:, None], np.arange(L)[None, :]
    for index, w in ((low, 1.0 - weight), (low + 1, weight)):
        inside = (index >= 0) & (index < size)
        matrix[n, row, np.clip(index, 0, size - 1)] += np.where(inside, w, 0.0)
    return matrix


#: The default augmentation of each data set taken by name (``--augment default``); every
#: other source (IDX, CIFAR-10, image folders) has none unless asked for.
AUGMENT_DEFAULTS: dict[str, Augment] = {
    # 8x8 digits, centred and size-normalised: a shift of one pixel (an eighth of the image)
    # cost accuracy (the README's 30-epoch run: 98.33 % with shift=1, 99.44 % without), so
    # none; no flips either way (a mirrored digit is none).
    "digits": Augment(),
    # the window's position is its label (a digit within 1 pixel, background 2 or more off)
    "digits-windows": Augment(),
    "mnist-5k": Augment(shift=2, scale=0.1),
    # faces are left-right symmetric; photos vary in light
    "faces": Augment(shift=2, flip=0.5, brightness=0.2, contrast=0.2, scale=0.1, pad="edge"),
}


def default_augment(source: str | None) -> Augment:
    """The default augmentation of a data set (:data:`AUGMENT_DEFAULTS`), none for others."""
    return AUGMENT_DEFAULTS.get(str(source), Augment())


def resolve_augment(value: Any, source: str | None = None) -> Augment:
    """An :class:`Augment` from what ``augment=`` accepts.

    Parameters
    ----------
    value : Augment, str, dict or None
        An Augment; ``None``, ``False`` or ``"none"`` for none; ``"default"`` for the
        default of ``source`` (see :func:`default_augment`); another str is a spec
        (:meth:`Augment.parse`); a dict holds the parameters.
    source : str, optional
        The data set's name, for ``"default"``.
    """
    if value is None or value is False:
        return Augment()
    if isinstance(value, Augment):
        return value
    if isinstance(value, str):
        if value.strip().lower() == "default":
            if source is None:
                raise ValueError(
                    "augment='default' is a data set's own augmentation, but no data set is "
                    "named: pass default_augment(name), e.g. default_augment('faces')"
                )
            return default_augment(source)
        return Augment.parse(value)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {f.name for f in fields(Augment)})
        if unknown:
            raise ValueError(f"augment has unknown parameter(s) {', '.join(map(repr, unknown))}")
        return Augment(**value)
    raise TypeError(f"augment must be an Augment, a spec str, a dict or None, got {value!r}")
