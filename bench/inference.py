"""Inference benchmark: cnnserve against PyTorch and ONNX Runtime, float32, 2 threads each.

Cases (``--only`` picks the ones whose name contains a text):

- ``digits-b1``, ``digits-b256``: the shipped model (``models/digits.safetensors``, 1x8x8),
  a batch of 1 and of 256 random inputs.
- ``lenet-b1``, ``lenet-b256``: LeNet-5 on 1x28x28 (conv 6 5x5 pad 2, pool, conv 16 5x5,
  pool, affine 120, 84, 10), random weights.
- ``vgg-b1``, ``vgg-b64``: a VGG-style CIFAR net on 3x32x32 (four 3x3 pad-1 convs, each with
  spatial batch norm with random running statistics, two 2x2 pools, affine 256, dropout, 10).
- ``detector-1024``: the shipped detector (``models/digits_detector.safetensors``) converted,
  one forward over a 1x1024x1024 image (a 509x509 map).
- ``alexnet-611``: an AlexNet-style padding-free net (five convs, three 3x3 stride-2 pools,
  affine 4096, 4096, 1000; random weights) converted, one forward over 3x611x611 (13x13 map).

Engines, each in a process of its own (two OpenMP runtimes in one process fight over the
cores), all limited to 2 threads: ``layers`` (cnnserve layer by layer, as before plans:
``ConvNet.loss`` in test mode, the converted layers through ``layer_forward`` with batch
norm folded), ``plan`` (a compiled :mod:`cnnserve.engine` plan, when that module
exists), ``torch`` (the same network in ``torch.nn.functional``, ``inference_mode``) and
``ort`` (ONNX Runtime on the network exported by :mod:`cnnserve.onnx`; intra-op threads 2,
inter-op 1). The processes start once per case, build or load the same network and input,
and their outputs are checked equal (float32 tolerance, relative to the scores' scale) before
anything is timed. Then ``--rounds`` interleaved rounds: in each, every engine in turn (the
order rotates) runs enough calls for about ``--round-seconds`` and reports their median; the
ratios ``ours / theirs`` are taken per round and the table gives their median and range.
Each turn starts after ``SETTLE`` seconds of quiet, so that threads the engine before left
spinning (OpenBLAS's spin for about 0.1 s) do not share the cores with it. The machine's
load average is printed with each case: the machine is shared, read the figures with it.

Usage::

    .venv/bin/pip install -e ".[bench]"          # torch and onnxruntime: bench extra only
    .venv/bin/python bench/inference.py           # every case, every engine that imports
    .venv/bin/python bench/inference.py --only digits --rounds 5
    .venv/bin/python bench/inference.py --only vgg --profile 20   # each plan op's time
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ALEXNET, cpu_model  # bench/ is on sys.path: these scripts run as files

THREADS = 2
#: Seconds of quiet before each engine's turn: the engine before it may leave threads spinning
#: (OpenBLAS's spin for about 0.1 s after a call), and they would share the cores with the next.
SETTLE = 0.3
ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits.safetensors"
DETECTOR = ROOT / "models" / "digits_detector.safetensors"

LENET = [
    {"type": "conv", "filters": 6, "size": 5, "stride": 1, "pad": 2},
    {"type": "relu"},
    {"type": "max_pool", "size": 2, "stride": 2},
    {"type": "conv", "filters": 16, "size": 5, "stride": 1, "pad": 0},
    {"type": "relu"},
    {"type": "max_pool", "size": 2, "stride": 2},
    {"type": "affine", "units": 120},
    {"type": "relu"},
    {"type": "affine", "units": 84},
    {"type": "relu"},
]


def _conv_bn(filters: int) -> list[dict]:
    return [
        {"type": "conv", "filters": filters, "size": 3, "stride": 1, "pad": 1},
        {"type": "spatial_batchnorm"},
        {"type": "relu"},
    ]


VGG = [
    *_conv_bn(32),
    *_conv_bn(32),
    {"type": "max_pool", "size": 2, "stride": 2},
    *_conv_bn(64),
    *_conv_bn(64),
    {"type": "max_pool", "size": 2, "stride": 2},
    {"type": "affine", "units": 256},
    {"type": "relu"},
    {"type": "dropout", "keep": 0.5},
]

# name: (what, network, input shape (N, C, H, W))
CASES = {
    "digits-b1": ("shipped digits model, batch 1", "digits", (1, 1, 8, 8)),
    "digits-b256": ("shipped digits model, batch 256", "digits", (256, 1, 8, 8)),
    "lenet-b1": ("LeNet-5 28x28, batch 1", "lenet", (1, 1, 28, 28)),
    "lenet-b256": ("LeNet-5 28x28, batch 256", "lenet", (256, 1, 28, 28)),
    "vgg-b1": ("VGG-style CIFAR net with BN, batch 1", "vgg", (1, 3, 32, 32)),
    "vgg-b64": ("VGG-style CIFAR net with BN, batch 64", "vgg", (64, 3, 32, 32)),
    "detector-1024": ("detector, converted, 1024x1024", "detector", (1, 1, 1024, 1024)),
    "alexnet-611": ("AlexNet-style padding-free, converted, 611x611", "alexnet", (1, 3, 611, 611)),
}
ENGINES = ("layers", "plan", "torch", "ort")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_text() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} {five:.2f}"


# ---------------------------------------------------------------------------------------------
# Networks (cnnserve side: the layers and plan workers, and --prepare)
# ---------------------------------------------------------------------------------------------


def build(network: str):
    """The cnnserve network of a case: a ConvNet (test mode) or a FullyConvNet."""
    import numpy as np

    from cnnserve.convert import load_fully_convolutional, to_fully_convolutional
    from cnnserve.model import ConvNet, load_model

    if network == "digits":
        return load_model(DIGITS)
    if network == "detector":
        return load_fully_convolutional(DETECTOR)
    if network == "alexnet":
        return to_fully_convolutional(ConvNet(ALEXNET, (3, 227, 227), num_classes=1000, seed=0))
    layers, shape = (LENET, (1, 28, 28)) if network == "lenet" else (VGG, (3, 32, 32))
    model = ConvNet(layers, shape, num_classes=10, seed=0)
    rng = np.random.default_rng(1)
    for bn in model.bn_params:  # statistics that make folding the batch norm matter
        C = bn["running_mean"].shape[0]
        bn["running_mean"] = rng.normal(0, 0.5, C).astype(model.dtype)
        bn["running_var"] = rng.uniform(0.5, 2.0, C).astype(model.dtype)
    for name, value in model.params.items():
        if name.startswith(("gamma", "beta")):
            model.params[name] = (value + rng.normal(0, 0.2, value.shape)).astype(model.dtype)
    return model


def is_converted(model) -> bool:
    return hasattr(model, "geometry")


def describe(model) -> tuple[list[dict], dict]:
    """The network as a list of layers for the torch worker, and its tensors."""
    import numpy as np

    layers = []
    if is_converted(model):
        tensors = dict(model.params)
        for layer in model.layers:
            names = list(layer.param_names)
            layers.append({"kind": layer.kind, "spec": layer.spec, "names": names})
    else:
        tensors = model.state_tensors()
        for info in model.info:
            kind = info.spec["type"]
            layers.append({"kind": kind, "spec": info.spec, "names": list(info.param_names)})
    for layer in layers:
        if layer["kind"] in ("spatial_batchnorm", "batchnorm"):
            k = layer["names"][0][len("gamma") :]
            layer["stats"] = [f"running_mean{k}", f"running_var{k}"]
            layer["eps"] = layer["spec"]["eps"]
    return layers, {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def case_input(shape):
    import numpy as np

    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def prepare(case: str, folder: str, onnx: bool) -> int:
    """Write what the torch and ORT workers read: input, tensors, layers, and (``onnx``: for
    the ORT worker) the ONNX file."""
    import numpy as np

    _, network, shape = CASES[case]
    model = build(network)
    layers, tensors = describe(model)
    np.save(os.path.join(folder, "x.npy"), case_input(shape))
    np.savez(os.path.join(folder, "tensors.npz"), **tensors)
    with open(os.path.join(folder, "layers.json"), "w") as f:
        json.dump(layers, f)
    if onnx:
        from cnnserve.onnx import export_onnx

        export_onnx(model, os.path.join(folder, "model.onnx"))
    return 0


# ---------------------------------------------------------------------------------------------
# Workers: one engine on one case, driven over stdin / stdout
# ---------------------------------------------------------------------------------------------


def cnnserve_runner(engine: str, network: str, x):
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=THREADS)
    model = build(network)
    if engine == "plan":
        from cnnserve import engine as plans

        plan = plans.compile(model, x.shape[1:], dtype=x.dtype, max_batch=x.shape[0])
        out = plan(x)
        return lambda: plan(x, out=out)
    if is_converted(model):
        return lambda: converted_layer_path(model, x)
    return lambda: model.loss(x)  # test mode, layer by layer (scores may run a plan)


def converted_layer_path(fcn, x):
    """A converted network layer by layer, its batch norms folded as FullyConvNet did before
    plans (FullyConvNet.forward now runs one): the ``layers`` engine of converted cases."""
    from cnnserve.network import layer_forward

    out = x
    for k, layer in enumerate(fcn.layers):
        if layer.kind == "spatial_batchnorm" and k and fcn.layers[k - 1].kind == "conv":
            continue  # folded into the conv before it
        weights = tuple(fcn.params[name] for name in layer.param_names)
        nxt = fcn.layers[k + 1] if k + 1 < len(fcn.layers) else None
        if layer.kind == "conv" and nxt is not None and nxt.kind == "spatial_batchnorm":
            n = nxt.param_names[0][len("gamma") :]
            var = fcn.params[f"running_var{n}"].astype("float64")
            scale = fcn.params[nxt.param_names[0]] / (var + nxt.eps) ** 0.5
            mean = fcn.params[f"running_mean{n}"]
            w = (weights[0] * scale[:, None, None, None]).astype(fcn.dtype)
            b = ((weights[1] - mean) * scale + fcn.params[nxt.param_names[1]]).astype(fcn.dtype)
            weights = (w, b)
        out = layer_forward(layer.spec, out, weights)[0]
    return out


def torch_runner(folder: str, x):
    import numpy as np
    import torch

    torch.set_num_threads(THREADS)
    F = torch.nn.functional
    with open(os.path.join(folder, "layers.json")) as f:
        layers = json.load(f)
    with np.load(os.path.join(folder, "tensors.npz")) as archive:
        p = {k: torch.from_numpy(archive[k]) for k in archive.files}
    weights = {}
    for layer in layers:  # the affine weights as torch wants them, once
        if layer["kind"] == "affine":
            weights[layer["names"][0]] = p[layer["names"][0]].t().contiguous()

    def net(t):
        for layer in layers:
            kind, spec, names = layer["kind"], layer["spec"], layer["names"]
            if kind == "conv":
                t = F.conv2d(
                    t, p[names[0]], p[names[1]], stride=spec["stride"], padding=spec["pad"]
                )
            elif kind == "affine":
                t = F.linear(t.reshape(t.shape[0], -1), weights[names[0]], p[names[1]])
            elif kind == "relu":
                t = F.relu(t, inplace=True)
            elif kind in ("max_pool", "avg_pool"):
                pool = F.max_pool2d if kind == "max_pool" else F.avg_pool2d
                t = pool(t, tuple(spec["size"]), spec["stride"])
            elif kind in ("spatial_batchnorm", "batchnorm"):
                mean, var = (p[n] for n in layer["stats"])
                t = F.batch_norm(t, mean, var, p[names[0]], p[names[1]], False, 0.0, layer["eps"])
            elif kind == "dropout":
                continue
            else:
                raise ValueError(f"no torch equivalent in this bench for layer {kind}")
        return t

    xt = torch.from_numpy(x)

    def run():
        with torch.inference_mode():
            return net(xt).numpy()

    return run, torch.__version__


def ort_runner(folder: str, x):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(
        os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name

    def run():
        return session.run(None, {name: x})[0]

    return run, ort.__version__


def worker(engine: str, case: str, folder: str) -> int:
    import numpy as np

    _, network, _ = CASES[case]
    x = np.load(os.path.join(folder, "x.npy"))
    version = ""
    if engine in ("layers", "plan"):
        import cnnserve

        fn, version = cnnserve_runner(engine, network, x), cnnserve.__version__
    elif engine == "torch":
        fn, version = torch_runner(folder, x)
    else:
        fn, version = ort_runner(folder, x)
    y = np.asarray(fn())
    np.save(os.path.join(folder, f"out-{engine}.npy"), y)
    fn()
    print(json.dumps({"ready": True, "version": version}), flush=True)
    for line in sys.stdin:
        calls = int(line)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(json.dumps({"median": statistics.median(times)}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def available(engine: str) -> bool:
    if engine == "plan":
        return (ROOT / "cnnserve" / "engine" / "__init__.py").exists()
    if engine == "torch":
        return importlib.util.find_spec("torch") is not None
    if engine == "ort":
        return importlib.util.find_spec("onnxruntime") is not None
    return True


class Worker:
    def __init__(self, engine: str, case: str, folder: str, env: dict[str, str]) -> None:
        self.engine = engine
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", engine, "--case", case, "--folder", folder],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.version = self.read()["version"]

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"the {self.engine} worker stopped (exit status {code})")
        return json.loads(line)

    def time(self, calls: int) -> float:
        time.sleep(SETTLE)
        self.proc.stdin.write(f"{calls}\n")
        self.proc.stdin.flush()
        return self.read()["median"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def check_outputs(folder: str, engines: list[str]) -> str:
    """Every engine's output against the ``layers`` one: SystemExit when one differs."""
    import numpy as np

    ref = np.load(os.path.join(folder, "out-layers.npy")).astype(np.float64)
    scale = max(1.0, float(np.abs(ref).max()))
    diffs = []
    for engine in engines:
        if engine == "layers":
            continue
        out = np.load(os.path.join(folder, f"out-{engine}.npy")).astype(np.float64)
        if out.shape != ref.shape:
            raise SystemExit(f"{engine} output shape {out.shape} != layers {ref.shape}")
        diff = float(np.abs(out - ref).max())
        if diff > 1e-3 * scale:
            raise SystemExit(f"{engine} output differs from layers by {diff:.3g} (scale {scale})")
        diffs.append(f"{engine} {diff:.1e}")
    return f"max |diff| vs layers (scale {scale:.3g}): {', '.join(diffs)}"


def run_case(case: str, engines: list[str], args, env: dict[str, str]) -> dict:
    what = CASES[case][0]
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, __file__, "--prepare", case, "--folder", folder]
        done = subprocess.run(command + (["--onnx"] if "ort" in engines else []), env=env)
        if done.returncode:
            raise SystemExit(f"preparing {case} failed")
        workers = {}
        try:
            for engine in engines:
                workers[engine] = Worker(engine, case, folder, env)
            check = check_outputs(folder, engines)
            one = {e: w.time(3) for e, w in workers.items()}
            calls = {
                e: max(1, min(2000, int(args.round_seconds / max(t, 1e-7)))) for e, t in one.items()
            }
            load_before = load_text()
            rounds = []
            for r in range(args.rounds):
                order = engines[r % len(engines) :] + engines[: r % len(engines)]
                rounds.append({e: workers[e].time(calls[e]) for e in order})
            load_after = load_text()
        finally:
            for w in workers.values():
                w.close()
    return {
        "case": case,
        "what": what,
        "check": check,
        "calls": calls,
        "rounds": rounds,
        "load": f"{load_before} -> {load_after}",
        "versions": {e: w.version for e, w in workers.items()},
    }


def ratio_text(rounds: list[dict], ours: str, theirs: str) -> str:
    if ours not in rounds[0] or theirs not in rounds[0]:
        return "-"
    values = sorted(r[ours] / r[theirs] for r in rounds)
    return f"{statistics.median(values):.2f} ({values[0]:.2f}-{values[-1]:.2f})"


def report(results: list[dict], engines: list[str]) -> None:
    ours = [e for e in ("layers", "plan") if e in engines]
    theirs = [e for e in ("torch", "ort") if e in engines]
    head = f"{'case':<15}" + "".join(f"{e + ' ms':>11}" for e in engines)
    head += "".join(f"  {o + '/' + t:<19}" for o in ours for t in theirs)
    print(head)
    print("-" * len(head))
    for res in results:
        med = {e: statistics.median(r[e] for r in res["rounds"]) for e in engines}
        line = f"{res['case']:<15}" + "".join(f"{med[e] * 1e3:>11.3f}" for e in engines)
        line += "".join(f"  {ratio_text(res['rounds'], o, t):<19}" for o in ours for t in theirs)
        print(line)
    print()
    for res in results:
        print(f"{res['case']}: {res['what']}; {res['load']}; calls/round {res['calls']}")
        print(f"    {res['check']}")
    gm = {}
    for o in ours:
        for t in theirs:
            vals = [statistics.median(r[o] / r[t] for r in res["rounds"]) for res in results]
            prod = 1.0
            for v in vals:
                prod *= v
            gm[f"{o}/{t}"] = prod ** (1 / len(vals))
    print(
        "geometric means of the median ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in gm.items())
    )


def profile(cases: list[str], calls: int) -> int:
    """Each case's plan op by op (Plan.profile), in this process, at THREADS threads."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from cnnserve import engine as plans

    threadpool_limits(limits=THREADS)
    for case in cases:
        what, network, shape = CASES[case]
        x = case_input(shape)
        plan = plans.compile(build(network), shape[1:], dtype=np.float32, max_batch=shape[0])
        rows = plan.profile(x, calls=calls)
        total = sum(t for _, t in rows)
        print(f"{case}: {what}; {total * 1e3:.3f} ms a call, {load_text()}")
        for k, (op, t) in enumerate(rows):
            print(f"  {k:>2} {op:<36} {t * 1e3:>9.3f} ms {100 * t / total:>5.1f}%")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case")
    parser.add_argument("--round-seconds", type=float, default=0.3, help="per engine and round")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="CALLS",
        help="instead: time each op of each case's plan over CALLS calls (Plan.profile)",
    )
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--onnx", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare(args.prepare, args.folder, args.onnx)
    if args.worker:
        return worker(args.worker, args.case, args.folder)

    cases = [c for c in CASES if args.only in c]
    if not cases:
        parser.error(f"--only {args.only!r} matches no case; cases: {', '.join(CASES)}")
    if args.profile is not None:
        if args.profile < 1:
            parser.error("--profile: CALLS must be at least 1")
        os.environ.update(OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS))
        return profile(cases, args.profile)
    wanted = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(wanted) - set(ENGINES))
    if unknown:
        parser.error(
            f"--engines: unknown engine(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}"
        )
    if "layers" not in wanted:
        parser.error(
            "--engines must include layers (the reference every output is checked against)"
        )
    engines = [e for e in ENGINES if e in wanted and available(e)]
    for e in wanted:
        if e not in engines:
            log(f"skipping engine {e}: not available (pip install -e '.[bench]' for torch and ort)")
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS))
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"threads per engine: {THREADS}; rounds {args.rounds}; start {load_text()}")
    print(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    results = []
    for case in cases:
        log(f"{case} ...")
        results.append(run_case(case, engines, args, env))
    versions = results[0]["versions"]
    print("versions: " + ", ".join(f"{e} {v}" for e, v in versions.items()))
    print(f"end {load_text()}")
    print()
    report(results, engines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
