"""Training benchmark: one epoch of ``ThreeLayerConvNet`` defaults, against PyTorch.

One epoch is 2,000 random 3x32x32 float32 images in batches of 50 (40 steps), each step the
model's loss and gradients plus an adam update of every parameter (learning rate 1e-3), as the
Solver runs it. PyTorch, when importable, runs the same network (conv 32 7x7 pad 3, relu,
2x2 max pool, affine 100, relu, affine 10, softmax cross-entropy), the same initial weights,
the same batches and ``torch.optim.Adam`` with the same hyper-parameters, with 2 threads, in a
helper process started with this process's original environment (two OpenMP runtimes in one
process slow each other down). Times are medians of ``--repeat`` epochs after a warm-up epoch.

Usage::

    python bench/train.py               # cnnserve, and torch when importable
    python bench/train.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import cnnserve  # isort: skip  (before NumPy: its thread defaults apply to its BLAS)
import numpy as np

THREADS = 2
N_IMAGES, BATCH = 2000, 50


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    """Images, labels, the batch order and the initial weights shared by both sides."""
    rng = np.random.default_rng(seed)
    from_model = _initial_params()
    return {
        "X": rng.standard_normal((N_IMAGES, 3, 32, 32), dtype=np.float32),
        "y": rng.integers(10, size=N_IMAGES),
        "order": rng.permutation(N_IMAGES),
        **from_model,
    }


def _initial_params() -> dict[str, np.ndarray]:
    from cnnserve.model import ThreeLayerConvNet

    return dict(ThreeLayerConvNet().params)


def cnnserve_epoch(data: dict[str, np.ndarray]):
    """A closure running one training epoch with cnnserve (fresh optimizer state each time)."""
    from cnnserve.model import ThreeLayerConvNet
    from cnnserve.optim import adam

    model = ThreeLayerConvNet()
    X, y, order = data["X"], data["y"], data["order"]

    def epoch() -> float:
        for name in model.params:
            model.params[name] = data[name].copy()
        configs = {name: {"learning_rate": 1e-3} for name in model.params}
        loss = float("nan")
        for start in range(0, N_IMAGES, BATCH):
            batch = order[start : start + BATCH]
            loss, grads = model.loss(X[batch], y[batch])
            for name, value in model.params.items():
                model.params[name], configs[name] = adam(value, grads[name], configs[name])
        return loss

    return epoch


def torch_epoch(torch, data: dict[str, np.ndarray]):
    """The same epoch in PyTorch."""
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 32, 7, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(32 * 16 * 16, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    X = torch.from_numpy(data["X"])
    y = torch.from_numpy(data["y"].astype(np.int64))
    order = torch.from_numpy(data["order"])
    # cnnserve's affine weights are (D, M): torch's Linear holds the transpose.
    initial = {
        "0.weight": data["W1"],
        "0.bias": data["b1"],
        "4.weight": data["W2"].T,
        "4.bias": data["b2"],
        "6.weight": data["W3"].T,
        "6.bias": data["b3"],
    }

    def epoch() -> float:
        with torch.no_grad():
            for name, param in net.named_parameters():
                param.copy_(torch.from_numpy(np.ascontiguousarray(initial[name])))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        loss = None
        for start in range(0, N_IMAGES, BATCH):
            batch = order[start : start + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(X[batch]), y[batch])
            loss.backward()
            optimizer.step()
        return float(loss)

    return epoch


def median_epoch(epoch, repeat: int) -> tuple[float, float, float]:
    """Median, min and max seconds of ``repeat`` epochs after one warm-up; and the last loss."""
    loss = epoch()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        loss = epoch()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times), loss


def torch_worker(path: str, repeat: int) -> int:
    import torch

    torch.set_num_threads(THREADS)
    with np.load(path) as archive:
        data = dict(archive)
    median, low, high, loss = median_epoch(torch_epoch(torch, data), repeat)
    print(
        json.dumps(
            {"version": torch.__version__, "median": median, "min": low, "max": high, "loss": loss}
        )
    )
    return 0


def run_torch(data: dict[str, np.ndarray], repeat: int, env: dict[str, str]) -> dict | None:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, **data)
        done = subprocess.run(
            [sys.executable, __file__, "--torch-worker", path, "--repeat", str(repeat)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed epochs (median)")
    parser.add_argument("--torch-worker", metavar="NPZ", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        return torch_worker(args.torch_worker, args.repeat)

    # torch's helper gets the environment as it was before cnnserve set its thread defaults
    env = {k: v for k, v in os.environ.items() if k not in cnnserve._ext.ENV_SET_BY_CNNSERVE}
    data = make_data()
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=THREADS)
    except ImportError:
        print(f"threadpoolctl is not installed: cnnserve may use more than {THREADS} threads")
    print(
        f"one epoch: ThreeLayerConvNet defaults, {N_IMAGES} images 3x32x32 float32, "
        f"batch {BATCH}, adam lr 1e-3, {THREADS} threads; median of {args.repeat} epochs"
    )
    ours = median_epoch(cnnserve_epoch(data), args.repeat)
    print(
        f"cnnserve : {ours[0]:7.3f} s/epoch  (min {ours[1]:.3f}, max {ours[2]:.3f}; "
        f"{N_IMAGES / ours[0]:6.0f} images/s; last loss {ours[3]:.4f})",
        flush=True,
    )
    theirs = run_torch(data, args.repeat, env)
    if theirs is None:
        print("torch    : not installed, no comparison")
        return 0
    print(
        f"torch {theirs['version']}: {theirs['median']:7.3f} s/epoch  (min {theirs['min']:.3f}, "
        f"max {theirs['max']:.3f}; {N_IMAGES / theirs['median']:6.0f} images/s; "
        f"last loss {theirs['loss']:.4f})"
    )
    print(f"ratio cnnserve/torch: {ours[0] / theirs['median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
