"""The shipped models of ``models/`` and what they are held to: paths, the astronaut's face box,
the scales and threshold the README's detection figures use.

Shared by ``tests/test_shipped_models.py`` (the targets) and ``tests/test_service_browser.py``
(the web page finds the face).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cnnserve.data.faces import photo

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MNIST_LENET = MODELS / "mnist_lenet.safetensors"
FACES = MODELS / "faces.safetensors"

#: The astronaut's face in scikit-image's ``astronaut()`` (512 x 512), measured by hand on an
#: enlarged crop: (x0, y0, x1, y1), x1/y1 exclusive; the hairline (y 80) to the chin (y 182),
#: the left cheek's edge (x 182) to the right one's (x 268). README: "The shipped face detector".
ASTRONAUT_FACE = (182.0, 80.0, 268.0, 182.0)

#: Scales that bring the face (about 100 to 125 pixels across, with the forehead and chin that
#: the LFW crops show) to the 25 x 25 training window.
FACE_SCALES = (0.18, 0.2, 0.22, 0.24)

#: Shift-and-stitch: a cell every 2 pixels of each resized image, not 4.
FACE_STRIDE_DIVISOR = 2

#: The lowest face probability reported as a detection.
FACE_THRESHOLD = 0.9


def iou(a, b) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (a plain reference)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def save_photo(name: str, path: Path) -> Path:
    """Save one of scikit-image's bundled photos (RGB) as a PNG at ``path``."""
    Image.fromarray(np.asarray(photo(name))).save(path)
    return path
