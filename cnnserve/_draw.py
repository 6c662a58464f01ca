"""Text on pictures, with Pillow only: what the history plot, the heatmaps' legends and the
activation and filter grids share. A private helper module of :mod:`cnnserve`.

Pillow's built-in font is scalable when Pillow has FreeType (its wheels do); without it the
small bitmap font is used, and text is positioned from its measured box so that both work.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["INK", "font", "line_height", "text", "text_width"]

INK = (40, 40, 40)  # text and axes


@cache
def font(size: int) -> Any:
    """Pillow's default font at ``size`` pixels (the bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: the small bitmap font
        return ImageFont.load_default()


_PROBE = ImageDraw.Draw(Image.new("L", (1, 1)))  # measures text only


def line_height(f: Any) -> int:
    """Pixel height of a line of digits and letters (with descenders) in font ``f``."""
    _, y0, _, y1 = _PROBE.textbbox((0, 0), "0123456789lgy(", font=f)
    return y1 - y0


def text_width(s: str, f: Any) -> int:
    """Pixel width of ``s`` in font ``f``."""
    x0, _, x1, _ = _PROBE.textbbox((0, 0), s, font=f)
    return x1 - x0


def text(draw: ImageDraw.ImageDraw, xy, s: str, f: Any, anchor: str = "lt", fill=INK) -> None:
    """Draw ``s`` anchored like Pillow's ``anchor`` (``'lt'``, ``'lm'``, ``'rm'``, ``'mt'``,
    ``'mb'``, ...): the first letter is the horizontal place (left, middle, right) of ``xy``
    on the text's box, the second the vertical one (top, middle, bottom)."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), s, font=f)
    w, h = x1 - x0, y1 - y0
    x, y = xy
    x -= {"l": 0, "m": w / 2, "r": w}[anchor[0]] + x0
    y -= {"t": 0, "m": h / 2, "b": h}[anchor[1]] + y0
    draw.text((x, y), s, fill=fill, font=f)
