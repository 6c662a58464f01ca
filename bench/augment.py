"""Augmentation overhead: the time :meth:`Augment.apply` adds to a training step.

For the default augmentations of ``mnist-5k`` and ``faces``
(``cnnserve.data.augment.AUGMENT_DEFAULTS``), the latter also on 3-channel images, times one
batch's augmentation against one training step (loss, gradients and an adam update) of a
network of that input size, batches of 50, float32. Times are medians of ``--repeat`` runs
after a warm-up.

Usage::

    python bench/augment.py
    python bench/augment.py --repeat 50
"""

from __future__ import annotations

import argparse

import cnnserve  # isort: skip  (before NumPy: its thread defaults apply to its BLAS)
import numpy as np
from _common import median_time, ms  # bench/ is the script's directory

BATCH = 50

CASES = [  # (augmentation, preset architecture, input shape)
    ("mnist-5k", "lenet", (1, 28, 28)),
    ("faces", "lenet", (1, 28, 28)),
    ("faces", "three_layer", (3, 32, 32)),
]


def time_row(name: str, arch: str, shape: tuple[int, int, int], repeat: int) -> None:
    """Time one row: the augmentation of a batch, and a training step on it."""
    from cnnserve.data.augment import AUGMENT_DEFAULTS
    from cnnserve.network import ConvNet
    from cnnserve.optim import adam
    from cnnserve.specs import preset_layers

    aug = AUGMENT_DEFAULTS[name]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, *shape)).astype(np.float32)
    y = rng.integers(10, size=BATCH)
    stats = {"mean": [0.5] * shape[0], "std": [0.25] * shape[0]}
    net = ConvNet(preset_layers(arch, shape), shape, 10, seed=0, dtype=np.float32)
    configs = {p: {"learning_rate": 1e-3} for p in net.params}

    def step() -> None:
        _, grads = net.loss(X, y)
        for p, w in net.params.items():
            net.params[p], configs[p] = adam(w, grads[p], configs[p])

    augment = median_time(lambda: aug.apply(X, rng, **stats), repeat)
    train = median_time(step, max(5, repeat // 3))
    share = augment / (augment + train)
    label = f"{name}: {aug.spec()}"
    print(
        f"{label:<70} {arch:<11} {'x'.join(map(str, shape)):<9} {augment * 1e3:>7.2f} "
        f"{ms(train):>8} {share:>6.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per row (default 30)")
    args = parser.parse_args()
    print(f"cnnserve {cnnserve.__version__}, batch {BATCH}, float32, median of {args.repeat}")
    print(f"{'augment':<70} {'arch':<11} {'input':<9} {'aug ms':>7} {'step ms':>8} {'share':>6}")
    for name, arch, shape in CASES:
        time_row(name, arch, shape, args.repeat)


if __name__ == "__main__":
    main()
