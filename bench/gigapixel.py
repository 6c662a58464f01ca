"""Gigapixel maps: Mpx/s and peak memory of ``cnnserve scoremap BIG.tif --out map.zarr``.

For each size (a square image, ``--sizes``) the benchmark writes a tiled BigTIFF (512 x 512
tiles, 8-bit gray) of a synthetic pattern: a 512 x 512 canvas of held-out digits
(``cnnserve.data.digits_canvas``) repeated, each copy rolled by a different amount so that no
two tiles are equal. It then maps it with the shipped detector
(``models/digits_detector.safetensors``, window 8, stride 2, 11 classes) through the command
line, in a fresh process per run:

- ``1 process``: ``cnnserve scoremap MODEL BIG.tif --out map.zarr``;
- ``2 workers``: the same with ``--local-cluster 2`` (two worker processes of one thread each).

Columns: wall time of the command (start-up, the map, closing; the cluster's start included),
Mpx/s (image pixels over that time), the peak RSS of the largest process of the run
(``ru_maxrss`` of the command and the processes it waited for: for the cluster, its largest
worker), and the peak of the sum of the RSS of every process of the run (sampled every 0.2 s
with psutil), in MiB. The target is a peak under 1.5 GiB at every size. The zarr store is
deleted after each run (at 32k it is about 11 GiB of float32); the TIFFs are kept in
``--dir`` for the next run.

``--resume-check SIZE`` kills (SIGKILL) a run of that size once a third of its tiles are
marked done, reruns the same command, and compares the map chunk by chunk with an
uninterrupted run's.

Usage::

    python bench/gigapixel.py --sizes 8192,16384
    python bench/gigapixel.py --sizes 32768 --modes 1
    python bench/gigapixel.py --sizes 0 --resume-check 4096
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_detector.safetensors"
CNNSERVE = [sys.executable, "-m", "cnnserve"]
TILE = 512


def make_tiff(path: Path, side: int) -> None:
    """A ``side x side`` tiled BigTIFF of rolled copies of a digits canvas, tile by tile."""
    import tifffile

    from cnnserve.data import digits_canvas

    canvas, _ = digits_canvas((TILE, TILE), 150, seed=0)
    base = np.rint(canvas[0] * 255).astype(np.uint8)  # (512, 512)

    def tiles():
        for ty in range(-(-side // TILE)):
            for tx in range(-(-side // TILE)):
                k = ty * 7919 + tx * 104729
                yield np.roll(base, (k % TILE, (k // TILE) % TILE), axis=(0, 1))

    tmp = path.with_suffix(".part")
    tifffile.imwrite(tmp, tiles(), shape=(side, side), dtype=np.uint8, tile=(TILE, TILE),
                     bigtiff=True, photometric="minisblack")  # fmt: skip
    os.replace(tmp, path)


def tree_rss(pid: int) -> int:
    """The RSS of a process and all its descendants, in bytes (0 once it is gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(command: list[str], kill_when=None) -> dict:
    """Run ``command``; its wall time, exit status, peak RSS (largest process) and peak of the
    tree's summed RSS. ``kill_when()`` true: SIGKILL it."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                return
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "seconds": time.perf_counter() - started,
        "status": proc.returncode,
        "max_rss": usage.ru_maxrss * 1024,
        "tree_rss": peak[0],
        "out": out.decode(),
        "err": err.decode(),
    }


def scoremap(tif: Path, store: Path, workers: int, extra: list[str] = ()) -> list[str]:
    cluster = ["--local-cluster", str(workers)] if workers > 1 else []
    return [*CNNSERVE, "scoremap", str(MODEL), str(tif), "--out", str(store), "--quiet",
            *cluster, *extra]  # fmt: skip


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def compare_stores(a: Path, b: Path) -> float:
    """The largest difference between two maps, read chunk by chunk."""
    import zarr

    x = zarr.open_group(str(a), mode="r")["probabilities"]
    y = zarr.open_group(str(b), mode="r")["probabilities"]
    assert x.shape == y.shape and x.chunks == y.chunks
    t = x.chunks[1]
    worst = 0.0
    for i in range(0, x.shape[1], t):
        for j in range(0, x.shape[2], t):
            worst = max(worst, float(np.max(np.abs(x[:, i : i + t, j : j + t]
                                                   - y[:, i : i + t, j : j + t]))))  # fmt: skip
    return worst


def resume_check(folder: Path, side: int) -> None:
    tif = folder / f"digits_{side}.tif"
    if not tif.exists():
        make_tiff(tif, side)
    full, killed = folder / "full.zarr", folder / "killed.zarr"
    for store in (full, killed):
        shutil.rmtree(store, ignore_errors=True)
    args = ["--tile-cells", "128"]
    total = (-(-((side - 8) // 2 + 1) // 128)) ** 2
    done = killed / "done"

    def third_done() -> bool:
        return done.is_dir() and len(os.listdir(done)) >= total // 3

    first = run(scoremap(tif, killed, 1, args), kill_when=third_done)
    marked = len([n for n in os.listdir(done) if n.endswith(".json")])
    second = run(scoremap(tif, killed, 1, args))
    print(f"resume check, {side}x{side}, {total} tiles: killed (exit {first['status']}) after "
          f"{first['seconds']:.1f} s with {marked} tiles marked done")  # fmt: skip
    print("rerun: " + second["out"].splitlines()[0])
    reference = run(scoremap(tif, full, 1, args))
    assert reference["status"] == 0, reference["err"]
    print(f"largest difference from an uninterrupted run: {compare_stores(full, killed):.3g}")
    for store in (full, killed):
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8192,16384,32768", help="sides, comma-separated")
    parser.add_argument("--modes", default="1,2", help="1: one process; N > 1: N workers")
    parser.add_argument("--dir", default="/tmp/cnnserve-gigapixel", help="TIFFs and stores")
    parser.add_argument("--resume-check", type=int, metavar="SIZE")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if int(s) > 0]
    modes = [int(m) for m in args.modes.split(",")]
    print(f"{os.cpu_count()} cores; model {MODEL.name}")
    print(f"{'size':>12} {'run':>10} {'seconds':>8} {'Mpx/s':>6} {'peak RSS MiB':>12} "
          f"{'sum RSS MiB':>11}")  # fmt: skip
    for side in sizes:
        tif = folder / f"digits_{side}.tif"
        if not tif.exists():
            started = time.perf_counter()
            make_tiff(tif, side)
            print(f"(wrote {tif}, {tif.stat().st_size / 2**20:.0f} MiB, in "
                  f"{time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        for workers in modes:
            store = folder / f"map_{side}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            r = run(scoremap(tif, store, workers))
            if r["status"] != 0:
                print(r["err"][-2000:], file=sys.stderr)
                raise SystemExit(f"the run failed with status {r['status']}")
            name = "1 process" if workers == 1 else f"{workers} workers"
            rate = side * side / r["seconds"] / 1e6
            print(f"{f'{side}x{side}':>12} {name:>10} {r['seconds']:>8.1f} {rate:>6.2f} "
                  f"{mib(r['max_rss']):>12} {mib(r['tree_rss']):>11}", flush=True)  # fmt: skip
            shutil.rmtree(store, ignore_errors=True)
    if args.resume_check:
        resume_check(folder, args.resume_check)


if __name__ == "__main__":
    main()
