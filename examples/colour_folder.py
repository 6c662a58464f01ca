"""Make a small colour image folder whose two classes differ by colour only.

    python examples/colour_folder.py OUT [--per-class N] [--seed S]

writes ``OUT/train/red/*.png`` and ``OUT/train/green/*.png`` (N images a class, of mixed
sizes from 14x14 to 24x24: train with ``--image-size``), and three pictures to try the
models on: ``OUT/red.png`` and ``OUT/green.png`` (one 20x20 image of each class, not in
the folder) and ``OUT/photo.png`` (48x64, red on its left half, green on its right).

Every image is a random grey texture of brightness ``L`` tinted by ``(+58.7, -29.9, 0)``
(red) or ``(-58.7, +29.9, 0)`` (green) in (R, G, B): a tint whose ITU-R 601 luma
(``0.299 R + 0.587 G + 0.114 B``) is 0. So the grey copies of the two classes have the same
distribution (to 8-bit rounding): a grey model cannot tell them apart, a colour one can.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

#: The tint of the class ``red`` in (R, G, B); ``green`` is its negative. Its luma is 0.
TINT = np.array([58.7, -29.9, 0.0])
CLASSES = {"red": 1.0, "green": -1.0}


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random grey texture, (H, W) float64 in [70, 185]."""
    coarse = rng.random((height // 4 + 2, width // 4 + 2))
    picture = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    return 70 + np.asarray(picture, dtype=np.float64) * (115 / 255)


def tinted(rng: np.random.Generator, height: int, width: int, sign: float) -> np.ndarray:
    """(H, W, 3) uint8: a texture with the class's tint."""
    grey = texture(rng, height, width)[:, :, None]  # (H, W, 1)
    return np.clip(np.rint(grey + sign * TINT), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--per-class", type=int, default=60, help="images a class (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for name, sign in CLASSES.items():
        folder = args.out / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            height, width = rng.integers(14, 25, size=2)
            Image.fromarray(tinted(rng, height, width, sign)).save(folder / f"{i:03d}.png")
        Image.fromarray(tinted(rng, 20, 20, sign)).save(args.out / f"{name}.png")
    photo = np.concatenate([tinted(rng, 48, 32, 1.0), tinted(rng, 48, 32, -1.0)], axis=1)
    Image.fromarray(photo).save(args.out / "photo.png")
    print(
        f"wrote {2 * args.per_class} images in {args.out / 'train'} (classes red, green) and "
        f"{args.out / 'red.png'}, {args.out / 'green.png'}, {args.out / 'photo.png'}"
    )


if __name__ == "__main__":
    main()
