"""Detection boxes drawn on a picture, each with its label (Pillow's ImageDraw).

:func:`draw_boxes` takes a picture of the image (a heatmap, or the image itself), and the
detections of :mod:`cnnserve.detect` (anything with ``box``, ``class_name`` and ``score``), and
draws each box in the picture's pixels (the image's times ``zoom``) with ``"label 0.93"`` on a
filled tab above it (inside the box when there is no room above).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

from cnnserve import _draw
from cnnserve._checks import check_int

__all__ = ["BOX_COLOUR", "draw_boxes"]

BOX_COLOUR = (0, 230, 118)  # a green that stands out on the inferno map and on photos


def draw_boxes(
    picture: Image.Image,
    found: Sequence[Any],
    *,
    zoom: int = 1,
    colour: tuple[int, int, int] = BOX_COLOUR,
) -> Image.Image:
    """A copy of ``picture`` (RGB) with each detection's box and label drawn on it.

    Parameters
    ----------
    picture : PIL.Image.Image
        The image, or a picture of it ``zoom`` times its size (e.g. a heatmap without legend).
    found : sequence of Detection
        Each with ``box`` ``(x0, y0, x1, y1)`` in the image's pixels (x1, y1 exclusive),
        ``class_name`` and ``score``. Drawn worst first, so that the best is on top.
    zoom : int
        Picture pixels per image pixel.
    colour : tuple of int
        RGB of the boxes and label tabs.

    Returns
    -------
    PIL.Image.Image
        RGB, the picture's size.
    """
    if not isinstance(picture, Image.Image):
        raise TypeError(f"picture must be a PIL.Image.Image, got {type(picture).__name__}")
    zoom = check_int(zoom, "zoom", 1)
    out = picture.convert("RGB")  # a copy
    draw = ImageDraw.Draw(out)
    f = _draw.font(12)
    tab_h = _draw.line_height(f) + 4
    width = max(1, round(min(out.size) / 150))
    for d in reversed(list(found)):
        x0, y0, x1, y1 = (float(c) * zoom for c in d.box)
        # x1, y1 exclusive: the last pixel inside the box is x1 - 1.
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
        label = f"{d.class_name} {d.score:.2f}"
        tab_w = _draw.text_width(label, f) + 6
        top = y0 - tab_h if y0 >= tab_h else y0  # above the box, else inside it
        draw.rectangle([x0, top, x0 + tab_w, top + tab_h - 1], fill=colour)
        _draw.text(draw, (x0 + 3, top + tab_h / 2), label, f, "lm", fill=(0, 0, 0))
    return out
