"""Dense-map benchmark: one fully convolutional pass against the explicit loop over crops.

Three cases, each in a fresh process (so that its peak RSS is its own):

- ``digits-256``: the shipped model (``models/digits.safetensors``, 8x8 window, stride 2) on a
  256x256 canvas of held-out digits (``cnnserve.data.digits_canvas``; random pixels when it is
  missing): 125x125 cells.
- ``alexnet-384``: an AlexNet-sized padding-free network with random weights (five convs and
  three 3x3 stride-2 max pools: window 227, total stride 32; affine 4096, 4096, 1000) on a
  random 384x384 RGB image: 5x5 cells.
- ``digits-4096``: the shipped model on a 4096x4096 canvas (2045x2045 cells): the dense pass
  and its peak RSS only (target: under 1 GiB); the crop loop (4.2 million crops) is skipped.

Columns: ``dense ms`` is ``score_map(fcn, image)`` (preprocessing, tiles, softmax included);
``fwd ms`` is ``FullyConvNet.forward`` on the preprocessed image, the same work as the
``torch ms`` column (the converted network rebuilt in ``torch.nn.functional`` with the same
weights, 2 threads, ``inference_mode``); ``loop ms`` runs the *original* ConvNet's ``loss``
on every cell's crop of the preprocessed image, one crop per call (the explicit loop);
``batched ms`` runs ``model.scores`` on all the crops stacked (``batch_size=256``), a fairer
baseline. Ratios are computed in the same run. ``base``/``setup``/``peak`` are the process's
``ru_maxrss`` after the imports, after building the model and the image, and after the
dense passes (before the loops), in MiB. Times are medians of ``--repeat`` runs after a
warm-up (the loops: a short warm-up on a few crops).

cnnserve runs in case processes that never import torch; torch runs in a helper process
started with this process's original environment that never imports cnnserve (two OpenMP
runtimes in one process compete for the cores, and torch would inflate the RSS).

Usage::

    python bench/dense.py                      # the three cases, torch when importable
    python bench/dense.py --repeat 5 --no-torch
    python bench/dense.py --only digits-256    # the cases whose name contains the text
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (
    ALEXNET,
    cpu_model,
    median_time,
    ms,
)  # bench/ is on sys.path: these scripts run as files

# No numpy or cnnserve import here: case processes import cnnserve before NumPy (its thread
# defaults apply to NumPy's BLAS), the torch helper never imports cnnserve.

THREADS = 2
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "digits.safetensors"
MIB = 2**20
CASES = {
    "digits-256": "shipped digits model, canvas",
    "alexnet-384": "AlexNet-sized, random weights",
    "digits-4096": "shipped digits model, canvas",
}
# Padding-free, AlexNet's five convs and three pools: 227 -> 55 -> 27 -> 23 -> 11 -> 9 -> 7
# -> 5 -> 2 (every size divides evenly); total stride 4 * 2 * 2 * 2 = 32, window 227.
ALEXNET_INPUT = (3, 227, 227)
ALEXNET_CLASSES = 1000


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (``ru_maxrss``: KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / MIB  # macOS counts bytes


def current_rss_mib() -> float:
    """This process's resident set size now (Linux ``/proc/self/statm``; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        return float("nan")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# A case (a process of its own)
# ---------------------------------------------------------------------------------------------


def digits_image(size: int):
    """The shipped model's canvas: held-out digits, or random pixels without digits_canvas."""
    import numpy as np

    from cnnserve import data

    if hasattr(data, "digits_canvas"):
        canvas, _ = data.digits_canvas(size=(size, size), count=10, seed=0)
        return canvas, "digits_canvas, 10 digits"
    rng = np.random.default_rng(0)
    return rng.random((1, size, size), dtype=np.float32), "random pixels"


def build(name: str):
    """``(model, fcn, image, image description)`` of a case."""
    import numpy as np

    from cnnserve.convert import load_fully_convolutional, to_fully_convolutional
    from cnnserve.model import ConvNet, load_model

    if name.startswith("digits-"):
        image, what = digits_image(int(name.split("-")[1]))
        return load_model(SHIPPED), load_fully_convolutional(SHIPPED), image, what
    model = ConvNet(ALEXNET, ALEXNET_INPUT, num_classes=ALEXNET_CLASSES, seed=0)
    fcn = to_fully_convolutional(model)
    g = fcn.geometry
    if not (g.stride in (16, 32) and g.window == ALEXNET_INPUT[1:] and g.exact):
        raise RuntimeError(f"the AlexNet-sized stack has an unexpected geometry: {g}")
    rng = np.random.default_rng(0)
    return model, fcn, rng.random((3, 384, 384), dtype=np.float32), "random pixels"


def crops(x, boxes):
    """The crops ``x[:, y0:y1, x0:x1]`` of a (C, H, W) image at every box, row-major."""
    return [x[:, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes.reshape(-1, 4).tolist()]


def run_case(name: str, repeat: int, torch_data: str | None) -> dict:
    import cnnserve  # noqa: F401  # isort: skip  (before NumPy: its thread defaults apply)
    import numpy as np

    from cnnserve import dense, layers  # noqa: F401  (layers loads the OpenMP runtime)

    pools = limit_threads()
    rss_base = peak_rss_mib()
    model, fcn, image, what = build(name)
    rss_setup = peak_rss_mib()
    g = fcn.geometry
    rows, cols = g.map_size(image.shape[1], image.shape[2])
    result = {
        "case": name,
        "label": CASES[name],
        "image": f"{image.shape[0]}x{image.shape[1]}x{image.shape[2]}",
        "image_source": what,
        "map": f"{rows}x{cols}",
        "cells": rows * cols,
        "geometry": g.to_dict(),
        "params": int(sum(v.size for v in model.params.values())),
        "numpy": np.__version__,
        "pools": pools,
        "rss_base": rss_base,
        "rss_setup": rss_setup,
    }

    result["rss_before"] = current_rss_mib()
    log(f"{name}: dense pass ({rows}x{cols} cells)")
    holder = {}

    def dense_pass():
        holder.clear()  # the last run's map is freed first: one map alive at a time
        holder["map"] = dense.score_map(fcn, image)

    result["dense_s"] = median_time(dense_pass, repeat, dense_pass)
    result["rss_peak"] = peak_rss_mib()
    logits = holder.pop("map").logits  # (K, H', W')
    result["peak_below_1gib"] = result["rss_peak"] < 1024

    x = fcn.preprocess(image)  # (C, H, W), the model's dtype
    dense_cells = logits.reshape(logits.shape[0], -1).T  # (H'*W', K), row-major cells
    if name == "digits-4096":  # no full forward (it is what tiles avoid) and no loop
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(rows * cols, size=256, replace=False))
        sample = []
        for k in pick.tolist():
            x0, y0, x1, y1 = g.box(*divmod(k, cols))
            sample.append(x[:, y0:y1, x0:x1])
        diff = np.abs(model.scores(np.stack(sample)) - dense_cells[pick]).max()
        result["diff_sample"] = float(diff)
        result["rss_final"] = peak_rss_mib()
        return result

    boxes = g.boxes(rows, cols)  # (H', W', 4)
    X = x[None]  # (1, C, H, W)
    hc, wc = g.covered(image.shape[1], image.shape[2])
    X = np.ascontiguousarray(X[:, :, :hc, :wc])
    log(f"{name}: forward")
    out = {}

    def forward():
        out["fwd"] = fcn.forward(X)

    result["fwd_s"] = median_time(forward, repeat, forward)
    result["diff_fwd_dense"] = float(np.abs(out["fwd"][0] - logits).max())

    log(f"{name}: crop loop ({rows * cols} crops, one per call)")
    windows = crops(x, boxes)
    found = {}

    def loop():
        xp = fcn.preprocess(image)
        found["loop"] = [
            model.loss(c[None])[0] for c in crops(xp, boxes)
        ]  # (K,) per crop, row-major

    def loop_warmup():
        for c in windows[:20]:
            model.loss(c[None])

    result["loop_s"] = median_time(loop, repeat, loop_warmup)
    result["diff_loop"] = float(np.abs(np.stack(found["loop"]) - dense_cells).max())

    log(f"{name}: batched crops")

    def batched():
        xp = fcn.preprocess(image)
        found["batched"] = model.scores(np.stack(crops(xp, boxes)), batch_size=256)

    def batched_warmup():
        model.scores(np.stack(windows[:256]), batch_size=256)

    result["batched_s"] = median_time(batched, repeat, batched_warmup)
    result["diff_batched"] = float(np.abs(found["batched"] - dense_cells).max())
    result["score_scale"] = float(np.abs(dense_cells).max())
    result["rss_final"] = peak_rss_mib()

    if torch_data:
        layers_json = json.dumps(
            [
                {"kind": lay.kind, "spec": lay.spec, "names": list(lay.param_names), "eps": lay.eps}
                for lay in fcn.layers
            ]
        )
        np.savez(
            torch_data,
            __x=X,
            __ours=out["fwd"],
            __layers=np.array(layers_json),
            **fcn.params,
        )
        result["torch_data"] = torch_data
    return result


def limit_threads() -> list[str]:
    """THREADS threads for BLAS and OpenMP; the pools, for the report."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return [f"threadpoolctl is not installed: cnnserve may use more than {THREADS} threads"]
    threadpool_limits(limits=THREADS)
    return [
        f"{p['user_api']}: {p['internal_api']} {p.get('version') or ''} "
        f"({p['num_threads']} threads)"
        for p in threadpool_info()
    ]


# ---------------------------------------------------------------------------------------------
# torch (a helper process that never imports cnnserve)
# ---------------------------------------------------------------------------------------------


def torch_forward(torch, layers: list[dict], p: dict):
    """The converted network in ``torch.nn.functional``: a function of an NCHW tensor."""
    F = torch.nn.functional

    def run(x):
        for layer in layers:
            kind, spec, names, eps = layer["kind"], layer["spec"], layer["names"], layer["eps"]
            if kind == "conv":
                x = F.conv2d(
                    x, p[names[0]], p[names[1]], stride=spec["stride"], padding=spec["pad"]
                )
            elif kind == "relu":
                x = F.relu(x, inplace=True)
            elif kind in ("max_pool", "avg_pool"):
                pool = F.max_pool2d if kind == "max_pool" else F.avg_pool2d
                x = pool(x, tuple(spec["size"]), spec["stride"])
            elif kind == "spatial_batchnorm":
                k = names[0][len("gamma") :]
                mean, var = p[f"running_mean{k}"], p[f"running_var{k}"]
                x = F.batch_norm(x, mean, var, p[names[0]], p[names[1]], False, 0.0, eps)
            elif kind == "spatial_groupnorm":
                x = F.group_norm(x, spec["groups"], p[names[0]], p[names[1]], eps)
            elif kind == "channel_layernorm":
                C = x.shape[1]
                x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
                x = F.layer_norm(x, (C,), p[names[0]], p[names[1]], eps).permute(0, 3, 1, 2)
            else:
                raise ValueError(f"no torch equivalent for converted layer {kind}")
        return x

    return run


def torch_worker(path: str, repeat: int) -> int:
    import numpy as np
    import torch

    torch.set_num_threads(THREADS)
    rss_base = peak_rss_mib()
    with np.load(path) as archive:
        arrays = dict(archive)
    layers = json.loads(str(arrays.pop("__layers")))
    x = torch.from_numpy(arrays.pop("__x"))
    ours = arrays.pop("__ours")
    params = {k: torch.from_numpy(v) for k, v in arrays.items()}
    net = torch_forward(torch, layers, params)
    out = {}

    def forward():
        with torch.inference_mode():
            out["y"] = net(x)

    seconds = median_time(forward, repeat, forward)
    diff = float(np.abs(out["y"].numpy() - ours).max())
    print(
        json.dumps(
            {
                "version": torch.__version__,
                "threads": torch.get_num_threads(),
                "seconds": seconds,
                "diff": diff,
                "rss_base": rss_base,
                "rss_peak": peak_rss_mib(),
            }
        )
    )
    return 0


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def run_json(args: list[str], env: dict[str, str]) -> dict:
    """Run this script with ``args`` in a fresh process; its last stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, text=True
    )
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch column")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--torch-data", help=argparse.SUPPRESS)
    parser.add_argument("--torch-worker", metavar="NPZ", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        return torch_worker(args.torch_worker, args.repeat)
    if args.case:
        print(json.dumps(run_case(args.case, args.repeat, args.torch_data)))
        return 0

    names = [name for name in CASES if args.only in name]
    if not names:
        parser.error(f"--only {args.only!r} matches no case; cases: {', '.join(CASES)}")
    env = dict(os.environ)  # this process imports neither cnnserve nor torch
    use_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    results, torch_results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            case_args = ["--case", name, "--repeat", str(args.repeat)]
            if use_torch and name != "digits-4096":
                case_args += ["--torch-data", os.path.join(tmp, f"{name}.npz")]
            result = run_json(case_args, env)
            results.append(result)
            if "torch_data" in result:
                log(f"{name}: torch")
                torch_args = ["--torch-worker", result["torch_data"], "--repeat", str(args.repeat)]
                torch_results[name] = run_json(torch_args, env)
                os.unlink(result["torch_data"])

    first = results[0]
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {first['numpy']}"
    )
    for pool in first["pools"]:
        print(f"  {pool}")
    if torch_results:
        info = next(iter(torch_results.values()))
        print(f"torch {info['version']}, {info['threads']} threads")
    elif args.no_torch:
        print("torch: --no-torch, no torch column")
    elif not use_torch:
        print("torch: not installed, no torch column")
    else:
        print("torch: not run for these cases (never on the 4096x4096 image)")
    print(f"times: median of {args.repeat} runs; RSS: ru_maxrss of each case's own process, MiB")

    header = (
        f"{'case':<12} {'image':>11} {'map':>9} {'cells':>7} {'dense ms':>9} {'fwd ms':>8} "
        f"{'loop ms':>9} {'loop/dense':>10} {'batched ms':>10} {'batch/dense':>11} "
        f"{'torch ms':>9} {'fwd/torch':>9} {'base':>6} {'setup':>6} {'peak':>6}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    for r in results:
        theirs = torch_results.get(r["case"], {}).get("seconds")
        loop = ms(r.get("loop_s")) if r["case"] != "digits-4096" else "skipped"
        batched = ms(r.get("batched_s")) if r["case"] != "digits-4096" else "skipped"
        print(
            f"{r['case']:<12} {r['image']:>11} {r['map']:>9} {r['cells']:>7} "
            f"{ms(r['dense_s']):>9} {ms(r.get('fwd_s')):>8} {loop:>9} "
            f"{ratio(r.get('loop_s'), r['dense_s']):>10} {batched:>10} "
            f"{ratio(r.get('batched_s'), r['dense_s']):>11} {ms(theirs):>9} "
            f"{ratio(r.get('fwd_s'), theirs):>9} {r['rss_base']:6.0f} {r['rss_setup']:6.0f} "
            f"{r['rss_peak']:6.0f}"
        )

    print()
    for r in results:
        g = r["geometry"]
        print(
            f"{r['case']}: {r['label']} ({r['params']:,} parameters), image {r['image_source']}; "
            f"window {g['window'][0]}x{g['window'][1]}, stride {g['stride']}, "
            f"exact {g['exact']}"
        )
        if "diff_loop" in r:
            print(
                f"  max |dense - crop loop| {r['diff_loop']:.3g}, |dense - batched crops| "
                f"{r['diff_batched']:.3g}, |forward - dense| {r['diff_fwd_dense']:.3g} "
                f"(largest |score| {r['score_scale']:.3g})"
            )
        if "diff_sample" in r:
            print(
                f"  crop loop skipped ({r['cells']:,} crops); max |dense - crops| on 256 random "
                f"cells {r['diff_sample']:.3g}; peak RSS {r['rss_peak']:.0f} MiB "
                f"({'under' if r['peak_below_1gib'] else 'NOT under'} the 1 GiB target)"
            )
        if r["case"] in torch_results:
            t = torch_results[r["case"]]
            print(
                f"  torch: max |torch - forward| {t['diff']:.3g}; torch process RSS "
                f"{t['rss_base']:.0f} MiB after import, peak {t['rss_peak']:.0f} MiB"
            )
        print(
            f"  RSS right before the dense passes {r['rss_before']:.0f} MiB (current); "
            f"peak after the loops {r['rss_final']:.0f} MiB"
        )
    print(
        "dense: score_map (preprocess, tiles, softmax); fwd: FullyConvNet.forward on the\n"
        "preprocessed image (what torch runs); loop: the original model's loss, one crop a\n"
        "call; batched: model.scores on all crops stacked (batch 256); base/setup/peak:\n"
        "ru_maxrss (MiB) after imports / after model and image / after the dense passes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
