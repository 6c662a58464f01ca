"""Service load benchmark: latency and throughput of ``cnnserve serve`` on loopback.

By default the script starts the server itself (``<venv>/bin/cnnserve serve`` next to this
Python, else ``python -m cnnserve serve``) on a free port of 127.0.0.1 with the repository's
``models/`` directory, waits for ``GET /readyz`` (bounded by ``--start-timeout``), runs the
cases and stops the server (SIGINT, then SIGTERM, then SIGKILL, each wait bounded; also on an
error or Ctrl-C). ``--url http://host:port`` measures an already running server instead.

Cases (``--only TEXT`` keeps the cases whose name contains TEXT):

- ``predict``: ``POST /v1/models/digits/predict?top_k=5`` with an 8x8 PNG of a held-out digit
  (``--digit``-th image of the test split of ``cnnserve.data.load_dataset("digits")``, split as
  in the shipped model's training record), at 1, 4 and 16 concurrent clients.
- ``predict-cifar``: the same at 1 and 16 clients on ``cifar``, a CIFAR-sized classifier
  (3x32x32 input, four 3x3 convs of 32-64 filters, 15 M multiply-adds an image; random
  weights, made by the child step) with a 32x32 RGB PNG: a model where compute, not HTTP,
  dominates. Run it with ``--serve-args "--max-batch-size 1"`` and without to see what
  dynamic batching gives.
- ``predict-reload``: ``predict`` at 16 clients while, half-way through the timed phase,
  ``POST /v1/models/digits/reload`` loads, warms and swaps the model in: its status and time
  are under the table, and every request of the case still counts in ``errors``.
- ``scoremap-json`` and ``scoremap-png``: ``POST /v1/models/digits/scoremap?format=json|png``
  (``stride_divisor=1``) with a 512x512 PNG canvas of 10 held-out digits
  (``cnnserve.data.digits_canvas``; a 253x253 map), at 1 and 4 concurrent clients.

The server serves copies of ``models/*.safetensors`` and ``cifar.safetensors`` from a
temporary directory. Bodies are the raw PNG bytes with ``Content-Type: image/png``
(``--multipart``: a multipart/form-data body with the field ``file``). The PNGs are written
by a child step (``--make-images``) that imports cnnserve, NumPy and Pillow; this process
imports only the standard library.

Clients: each client is a thread with one keep-alive HTTP/1.1 connection
(``http.client.HTTPConnection``, TCP_NODELAY), sending its next request as soon as the last
response is read (closed loop, no think time). The clients of a case are spread over
``--procs`` worker processes (this script with ``--worker``; standard library only), so
that one GIL does not serialise 16 clients. Each client first sends ``--warmup`` requests
(not timed in the table; the very first one of the case, on a fresh connection, is the
``first ms`` column); when every worker is warm, all start together and send requests until
the case has sent ``--requests`` (``--map-requests`` for score maps) or ``--seconds`` have
passed, whichever comes first. ``req/s`` is the requests completed over the wall time from
the common start to the last response; the percentiles are over every timed request
(send to last byte read), errors included. Every status is checked; the non-200 ones (and
connection errors) are counted in ``errors`` and listed under the table. The first response
of each case is also checked for content: predict's top-1 label must be the digit's true
label, the JSON map must have a ``map_shape``, the PNG must be a PNG.

Cost of the measurement: ``client CPU`` is the CPU time (user + system) of the worker
processes over the timed phase, per request: on the 2 cores shared with the server it is
what the load generator took from the machine. ``server CPU`` is the same for the server
process (``/proc/<pid>/stat``, all threads; its child processes too with ``--workers``),
only when this script started it, with the server's peak RSS (``VmHWM`` of
``/proc/<pid>/status``) after each case and at the end. The server runs with
``--log-level warning`` by default (no access log line per request; ``--log-level info`` to
include that cost). A line per case under the table gives the number of connections opened
(one per client when keep-alive holds), the warm-up's slowest request, the client's and the
server's CPU as a share of one core, and the whole machine's busy and steal shares with what
other processes took (``/proc/stat``): on a shared machine that line says how much a row can
be trusted. When there were errors and the server was started here, the tail of its log is
printed too.

The exit status is 0, or 1 when a request failed or a content check did not pass (130 on
Ctrl-C or SIGTERM, after stopping the server and the workers). The server and the workers
run in sessions of their own (Ctrl-C in a terminal reaches this script only, which stops
them in order) and get SIGTERM if this script dies (Linux ``PR_SET_PDEATHSIG``).

Usage::

    python bench/service.py                        # all cases, a server of its own
    python bench/service.py --only predict --seconds 5
    python bench/service.py --url http://127.0.0.1:8000 --requests 500
    python bench/service.py --serve-args "--max-concurrency 1" --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from _common import cpu_model, ms  # bench/ is on sys.path: these scripts run as files

# Only the standard library here: the worker processes are this script too, and they should
# cost the shared cores as little as possible. The images are made in a child process.

ROOT = Path(__file__).resolve().parent.parent
MODEL = "digits"
CANVAS_SIZE = 512
CANVAS_DIGITS = 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (name, endpoint, query, image, client counts)
CASES = [
    ("predict", "predict", "top_k=5", "digit", (1, 4, 16)),
    ("predict-cifar", "predict", "top_k=5", "cifar", (1, 16)),
    ("predict-reload", "predict", "top_k=5", "digit", (16,)),
    ("scoremap-json", "scoremap", "format=json&stride_divisor=1", "canvas", (1, 4)),
    ("scoremap-png", "scoremap", "format=png&stride_divisor=1", "canvas", (1, 4)),
]
CONNECTION_ERRORS = (OSError, http.client.HTTPException)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The images (a child step: the only place that imports cnnserve, NumPy and Pillow)
# ---------------------------------------------------------------------------------------------


def make_images(folder: str, digit: int) -> int:
    """Write ``digit.png``, ``canvas.png`` and ``images.json`` (labels, versions) to ``folder``.

    Parameters
    ----------
    folder : str
        An existing directory.
    digit : int
        Index of the digit in the test split.

    Returns
    -------
    int
        The exit status, 0.
    """
    import cnnserve  # isort: skip  (before NumPy, as in any program that uses it)
    import numpy as np
    from PIL import Image

    from cnnserve.data import digits_canvas, load_dataset
    from cnnserve.model import read_model_file

    training = read_model_file(ROOT / "models" / f"{MODEL}.safetensors").training
    split = {
        "seed": int(training.get("seed", 0)),
        "val_fraction": float(training.get("val_fraction", 0.1)),
        "test_fraction": float(training.get("test_fraction", 0.2)),
    }
    data = load_dataset("digits", **split)
    if not 0 <= digit < len(data.y_test):
        raise SystemExit(f"--digit {digit}: the test split has {len(data.y_test)} images")
    x01 = data.X_test[digit, 0] * data.std[0] + data.mean[0]  # (8, 8), un-normalised
    pixels = np.rint(np.clip(x01, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(os.path.join(folder, "digit.png"))

    canvas, placed = digits_canvas(
        size=(CANVAS_SIZE, CANVAS_SIZE), count=CANVAS_DIGITS, seed=0, split_seed=split["seed"]
    )
    pixels = np.rint(np.clip(canvas[0], 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(os.path.join(folder, "canvas.png"))
    info = {
        "digit_index": digit,
        "digit_label": data.class_names[int(data.y_test[digit])],
        "split": split,
        "canvas_labels": [int(p["label"]) for p in placed],
        "cnnserve": cnnserve.__version__,
        "numpy": np.__version__,
    }
    with open(os.path.join(folder, "images.json"), "w") as f:
        json.dump(info, f)

    # The served models: the shipped ones, and a CIFAR-sized one whose compute dominates.
    from cnnserve.model import ConvNet, save_model

    models = os.path.join(folder, "models")
    os.mkdir(models)
    for path in (ROOT / "models").glob("*.safetensors"):
        with open(path, "rb") as src, open(os.path.join(models, path.name), "wb") as dst:
            dst.write(src.read())
    layers = [
        {"type": "conv", "filters": 32, "size": 3},
        {"type": "relu"},
        {"type": "conv", "filters": 32, "size": 3},
        {"type": "relu"},
        {"type": "max_pool", "size": 2, "stride": 2},
        {"type": "conv", "filters": 64, "size": 3},
        {"type": "relu"},
        {"type": "conv", "filters": 64, "size": 3},
        {"type": "relu"},
        {"type": "max_pool", "size": 2, "stride": 2},
        {"type": "affine", "units": 256},
        {"type": "relu"},
    ]
    save_model(ConvNet(layers, (3, 32, 32), 10, seed=0), os.path.join(models, "cifar.safetensors"))
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(os.path.join(folder, "cifar.png"))
    return 0


# ---------------------------------------------------------------------------------------------
# A worker process: some clients of one case
# ---------------------------------------------------------------------------------------------


class Client(threading.Thread):
    """One client: a keep-alive connection, warm-up requests, then timed ones.

    Parameters
    ----------
    job : dict
        The worker's job (see :func:`worker`).
    shared : dict
        ``{"budget": a callable giving True while requests remain, "start": an Event,
        "deadline": the monotonic time to stop at (set before "start")}``.
    check : bool
        Check the content of this client's first response.
    """

    def __init__(self, job: dict, shared: dict, check: bool) -> None:
        super().__init__(daemon=True)
        self.job = job
        self.shared = shared
        self.check = check
        self.conn: http.client.HTTPConnection | None = None
        self.latencies: list[float] = []
        self.sent: list[float] = []  # monotonic time of each timed request's start
        self.warmup: list[float] = []
        self.statuses: dict[str, int] = {}  # timed requests
        self.warmup_statuses: dict[str, int] = {}
        self.samples: dict[str, str] = {}  # first body (or exception text) of each error kind
        self.connects = 0
        self.checked: str | None = None
        self.warm = threading.Event()
        self.end = 0.0

    def request(self) -> tuple[float, str, bytes | None]:
        """One request: ``(seconds, status or error kind, body)``."""
        job = self.job
        if self.conn is None:
            self.conn = http.client.HTTPConnection(job["host"], job["port"], timeout=job["timeout"])
        if self.conn.sock is None:
            self.connects += 1
        start = time.perf_counter()
        try:
            self.conn.request("POST", job["path"], body=job["body"], headers=job["headers"])
            response = self.conn.getresponse()
            body = response.read()
        except CONNECTION_ERRORS as exc:
            seconds = time.perf_counter() - start
            self.conn.close()  # the next request opens a new connection
            kind = type(exc).__name__
            self.samples.setdefault(kind, str(exc)[:300])
            return seconds, kind, None
        seconds = time.perf_counter() - start
        status = str(response.status)
        if response.status != 200:
            self.samples.setdefault(status, body[:300].decode("utf-8", "replace"))
        if response.will_close:
            self.conn.close()
        return seconds, status, body

    def count(self, counts: dict[str, int], status: str, body: bytes | None) -> None:
        counts[status] = counts.get(status, 0) + 1
        if self.check and self.checked is None and status == "200":
            self.checked = check_body(self.job["check"], body or b"")

    def run(self) -> None:
        try:
            for _ in range(self.job["warmup"]):
                seconds, status, body = self.request()
                self.warmup.append(seconds)
                self.count(self.warmup_statuses, status, body)
            self.warm.set()
            self.shared["start"].wait()
            deadline = self.shared["deadline"]
            budget = self.shared["budget"]
            while (now := time.monotonic()) < deadline and budget():
                seconds, status, body = self.request()
                self.sent.append(now)
                self.latencies.append(seconds)
                self.count(self.statuses, status, body)
            self.end = time.monotonic()
        finally:
            self.warm.set()
            if self.conn is not None:
                self.conn.close()


def check_body(check: str, body: bytes) -> str:
    """``"ok ..."`` or ``"FAILED ..."``: the content check of a case's first response."""
    kind, _, expected = check.partition(":")
    if kind == "png":
        ok = body.startswith(PNG_SIGNATURE)
        return f"{'ok' if ok else 'FAILED'}: PNG signature, {len(body):,} bytes"
    try:
        doc = json.loads(body)
    except ValueError as exc:
        return f"FAILED: not JSON ({exc})"
    if kind == "predict":
        try:
            top1 = doc["predictions"][0]
        except (KeyError, IndexError, TypeError):
            return f"FAILED: no predictions in {body[:200]!r}"
        ok = top1.get("label") == expected or not expected  # cifar: random weights
        return (
            f"{'ok' if ok else 'FAILED'}: top-1 {top1.get('label')!r} "
            f"(p={top1.get('probability')}), true label {expected!r}"
        )
    shape = doc.get("map_shape") if isinstance(doc, dict) else None
    ok = isinstance(shape, list) and len(shape) == 2
    return f"{'ok' if ok else 'FAILED'}: map_shape {shape}, {len(body):,} bytes of JSON"


def worker(job: dict) -> int:
    """Run ``job["clients"]`` clients; talk to the parent over stdin / stdout.

    Protocol: the job is the JSON of the ``--worker`` argument. The worker warms its clients
    up, prints ``ready``, waits for a line on stdin (``go``), runs the timed phase and prints
    one line of JSON with its results.

    Parameters
    ----------
    job : dict
        ``host``, ``port``, ``path``, ``headers``, ``body_file``, ``clients``, ``requests``
        (this worker's share), ``seconds``, ``warmup``, ``timeout``, ``check``, ``check_first``.

    Returns
    -------
    int
        The exit status, 0.
    """
    with open(job["body_file"], "rb") as f:
        job["body"] = f.read()
    left = [job["requests"]]
    lock = threading.Lock()

    def budget() -> bool:
        with lock:
            left[0] -= 1
            return left[0] >= 0

    shared = {"budget": budget, "start": threading.Event(), "deadline": 0.0}
    clients = [
        Client(job, shared, check=job["check_first"] and k == 0) for k in range(job["clients"])
    ]
    for c in clients:
        c.start()
    for c in clients:
        c.warm.wait()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":  # the parent is gone or gave up: no load
        return 1
    cpu0 = time.process_time()
    start = time.monotonic()
    shared["deadline"] = start + job["seconds"]
    shared["start"].set()
    for c in clients:
        c.join()
    cpu = time.process_time() - cpu0
    statuses: dict[str, int] = {}
    warmup_statuses: dict[str, int] = {}
    samples: dict[str, str] = {}
    for c in clients:
        for status, n in c.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
        for status, n in c.warmup_statuses.items():
            warmup_statuses[status] = warmup_statuses.get(status, 0) + n
        for kind, text in c.samples.items():
            samples.setdefault(kind, text)
    result = {
        "start": start,
        "end": max(c.end for c in clients) or time.monotonic(),
        "cpu": cpu,
        "series": [
            [[round(t - start, 6), round(s, 6)] for t, s in zip(c.sent, c.latencies, strict=True)]
            for c in clients
        ],
        "warmup": [[round(s, 6) for s in c.warmup] for c in clients],
        "statuses": statuses,
        "warmup_statuses": warmup_statuses,
        "samples": samples,
        "connects": sum(c.connects for c in clients),
        "checked": next((c.checked for c in clients if c.checked is not None), None),
    }
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The server (a child process of its own session, so that Ctrl-C reaches this script only)
# ---------------------------------------------------------------------------------------------


_LIBC: list = []  # libc, loaded by the parent before it starts children (see die_with_parent)


def die_with_parent() -> None:
    """In a child, before exec: SIGTERM when this script dies, even by SIGKILL (Linux).

    Runs between fork and exec, so it only calls into a libc loaded beforehand.
    """
    if _LIBC:
        _LIBC[0].prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_setup():
    """The ``preexec_fn`` of the server and the workers (None off Linux)."""
    if sys.platform != "linux":
        return None
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            return None
    return die_with_parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "cnnserve"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "serve"]
    return [sys.executable, "-m", "cnnserve", "serve"]


def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(host: str, port: int, timeout: float, proc: subprocess.Popen | None) -> dict:
    """Poll ``/readyz`` until a 200 (its JSON), the process exits, or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} while starting")
        try:
            status, body = http_get(host, port, "/readyz", timeout=2.0)
        except CONNECTION_ERRORS as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200:
                return json.loads(body)
            last = f"{status} {body[:200].decode('utf-8', 'replace')}"
        time.sleep(0.1)
    raise RuntimeError(f"/readyz did not answer 200 within {timeout:g} s (last: {last})")


def stop(proc: subprocess.Popen, name: str) -> None:
    """SIGINT, then SIGTERM, then SIGKILL, each with a bounded wait."""
    for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            log(f"{name} (pid {proc.pid}) still running {wait} s after {sig.name}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc/*/stat`` parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (all their threads), from ``/proc/<pid>/stat``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, ValueError, IndexError):
            pass
    return total / tick


def status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` line of ``/proc/<pid>/status`` (``VmHWM``, ``VmRSS``), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class Server:
    """The server under test: started here, or an already running one (``--url``)."""

    def __init__(self, url: str | None, args: argparse.Namespace, tmp: str) -> None:
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(tmp, "server.log")
        if url:
            parsed = urllib.parse.urlsplit(url if "//" in url else f"http://{url}")
            if parsed.scheme != "http" or not parsed.hostname:
                raise SystemExit(f"--url {url}: expected http://host:port")
            self.host, self.port = parsed.hostname, parsed.port or 80
            self.command: list[str] | None = None
            return
        self.host, self.port = "127.0.0.1", free_port()
        self.command = [
            *serve_command(),
            "--models",
            os.path.join(tmp, "models"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log-level",
            args.log_level,
            *shlex.split(args.serve_args),
        ]

    def start(self, timeout: float) -> dict:
        if self.command is not None:
            log(f"starting: {shlex.join(self.command)}")
            with open(self.log_path, "wb") as out:
                self.proc = subprocess.Popen(
                    self.command,
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=child_setup(),
                )
        started = time.monotonic()
        try:
            ready = wait_ready(self.host, self.port, timeout, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        ready["seconds"] = time.monotonic() - started
        return ready

    def log_tail(self, lines: int = 30) -> str:
        if self.command is None:
            return "(the server was not started here: no log)"
        try:
            with open(self.log_path, errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            return "(no server log)"
        return "server log (last lines):\n" + "\n".join(f"  {line}" for line in tail)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None else []

    def cpu(self) -> float | None:
        return cpu_seconds(self.pids()) if self.proc is not None else None

    def memory(self) -> dict | None:
        """``{pid: {"hwm": MiB, "rss": MiB}}`` of the server's processes (None with --url)."""
        if self.proc is None:
            return None
        found = {}
        for pid in self.pids():
            hwm, rss = status_kib(pid, "VmHWM"), status_kib(pid, "VmRSS")
            if hwm is not None:
                found[str(pid)] = {"hwm": hwm / 1024, "rss": (rss or 0) / 1024}
        return found

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, "the server")


# ---------------------------------------------------------------------------------------------
# A case: the worker processes, their results
# ---------------------------------------------------------------------------------------------


def multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    """A multipart/form-data body with one field ``file``, and its Content-Type."""
    boundary = "cnnserve-bench-7d1c9a"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal shares, largest first."""
    return [total // parts + (k < total % parts) for k in range(parts)]


def run_case(server: Server, case: dict, args: argparse.Namespace) -> dict:
    """Warm up, run and collect one case; the server's CPU time and memory around it."""
    clients = case["clients"]
    procs = max(1, min(args.procs, clients))
    job = {
        "host": server.host,
        "port": server.port,
        "path": case["path"],
        "headers": {"Content-Type": case["content_type"], "Connection": "keep-alive"},
        "body_file": case["body_file"],
        "seconds": case["seconds"],
        "warmup": args.warmup,
        "timeout": args.timeout,
        "check": case["check"],
    }
    workers = []
    try:
        for k, (n, share) in enumerate(
            zip(split(clients, procs), split(case["requests"], procs), strict=True)
        ):
            spec = {**job, "clients": n, "requests": share, "check_first": k == 0}
            workers.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                    preexec_fn=child_setup(),
                )
            )
        bound = args.timeout * (args.warmup + 1) + 30
        for w in workers:  # every worker warm
            line = read_line(w, bound)
            if line.strip() != "ready":
                raise RuntimeError(f"a worker said {line!r} instead of 'ready'")
        cpu0, machine0 = server.cpu(), machine_times()
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        reload: dict = {}
        reloader = None
        if case["name"] == "predict-reload":
            reloader = threading.Thread(
                target=reload_model, args=(server, case, args, reload), daemon=True
            )
            reloader.start()
        bound = case["seconds"] + args.timeout + 30
        results = [json.loads(read_line(w, bound)) for w in workers]
        if reloader is not None:
            reloader.join(args.timeout)
        cpu1, machine1 = server.cpu(), machine_times()
        for w in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.wait(10)  # a worker that does not exit is killed below
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    result = summarise(case, results, procs, cpu0, cpu1, server.memory())
    result["machine"] = machine_share(machine0, machine1)
    if case["name"] == "predict-reload":
        result["reload"] = reload or {"status": None, "error": "did not end in time"}
    return result


def reload_model(server: Server, case: dict, args: argparse.Namespace, out: dict) -> None:
    """Half-way through a case's timed phase, ``POST .../reload``: its status, time, answer."""
    time.sleep(min(case["seconds"] / 2, 2.0))
    model = case["path"].split("/")[3]
    started = time.monotonic()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=args.timeout)
    try:
        conn.request("POST", f"/v1/models/{model}/reload")
        response = conn.getresponse()
        out.update(status=response.status, body=response.read().decode(errors="replace")[:200])
    except CONNECTION_ERRORS as exc:
        out.update(status=None, error=str(exc))
    finally:
        conn.close()
    out["seconds"] = time.monotonic() - started


def machine_times() -> list[int] | None:
    """The ``cpu`` line of ``/proc/stat`` (ticks: user, nice, system, idle, iowait, irq,
    softirq, steal, ...), or None."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def machine_share(before: list[int] | None, after: list[int] | None) -> dict | None:
    """Shares of the machine's CPU time between two ``/proc/stat`` readings, in %."""
    if not before or not after:
        return None
    d = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(d[:8]) or 1
    return {
        "busy_seconds": (total - d[3] - d[4] - d[7]) / os.sysconf("SC_CLK_TCK"),
        "busy": 100 * (total - d[3] - d[4] - d[7]) / total,
        "idle": 100 * (d[3] + d[4]) / total,
        "steal": 100 * d[7] / total,
    }


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of a worker's stdout, waited for up to ``timeout`` seconds."""
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        raise RuntimeError(f"a worker (pid {proc.pid}) gave no answer within {timeout:g} s")
    if not found[0]:
        raise RuntimeError(f"a worker (pid {proc.pid}) exited with status {proc.wait()}")
    return found[0]


def percentile(ordered: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of sorted values, linear between ranks."""
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(case, results, procs, cpu0, cpu1, memory) -> dict:
    """One case's row: the workers' results merged, percentiles, rates, CPU and memory."""
    start = min(r["start"] for r in results)
    series = [  # per client: [seconds since the common start, latency]
        [[round(t + r["start"] - start, 6), s] for t, s in client]
        for r in results
        for client in r["series"]
    ]
    latencies = sorted(s for client in series for _, s in client)
    statuses: dict[str, int] = {}
    samples: dict[str, str] = {}
    for r in results:
        for status, n in r["statuses"].items():
            statuses[status] = statuses.get(status, 0) + n
        for kind, text in r["samples"].items():
            samples.setdefault(kind, text)
    warmup = [w for r in results for w in r["warmup"]]
    n = len(latencies)
    wall = max(r["end"] for r in results) - start
    client_cpu = sum(r["cpu"] for r in results)
    server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    warm_statuses: dict[str, int] = {}
    for r in results:
        for status, n_status in r["warmup_statuses"].items():
            warm_statuses[status] = warm_statuses.get(status, 0) + n_status
    errors = sum(v for k, v in statuses.items() if k != "200")
    return {
        "case": case["name"],
        "clients": case["clients"],
        "procs": procs,
        "path": case["path"],
        "body_bytes": case["body_bytes"],
        "requests": n,
        "requests_limit": case["requests"],
        "seconds_limit": case["seconds"],
        "wall": wall,
        "rate": n / wall if wall > 0 else None,
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": latencies[-1] if latencies else None,
        "mean": sum(latencies) / n if n else None,
        "first": warmup[0][0] if warmup and warmup[0] else None,
        "warmup_max": max((s for w in warmup for s in w), default=None),
        "statuses": statuses,  # the timed requests'
        "errors": errors,
        "warmup_statuses": warm_statuses,
        "warmup_errors": sum(v for k, v in warm_statuses.items() if k != "200"),
        "samples": samples,
        "connects": sum(r["connects"] for r in results),
        "checked": next((r["checked"] for r in results if r["checked"]), None),
        "client_cpu": client_cpu,
        "server_cpu": server_cpu,
        "server_memory": memory,
        "series": series,
        "warmup": warmup,
    }


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def error_text(r: dict) -> str:
    """The timed requests' errors by kind, and the warm-up's when it had any."""
    parts = []
    for label, counts, total in (
        ("", r["statuses"], r["errors"]),
        ("warm-up ", r["warmup_statuses"], r["warmup_errors"]),
    ):
        if total:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k != "200")
            parts.append(f"**{label}{total}** ({kinds})")
    return "; ".join(parts) or "0"


def per_request(seconds: float | None, r: dict) -> str:
    if seconds is None or not r["requests"]:
        return "-"
    return f"{seconds / r['requests'] * 1e3:.2f}"


def table(results: list[dict]) -> str:
    """The markdown table of the cases."""
    header = [
        "case",
        "clients",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "first ms",
        "client CPU ms/req",
        "server CPU ms/req",
        "server peak RSS MiB",
    ]
    rows = [header, ["---"] * len(header)]
    for r in results:
        memory = r["server_memory"]
        peak = max((m["hwm"] for m in memory.values()), default=None) if memory else None
        rows.append(
            [
                r["case"],
                str(r["clients"]),
                str(r["requests"]),
                error_text(r),
                "-" if r["rate"] is None else f"{r['rate']:.1f}",
                ms(r["p50"]),
                ms(r["p90"]),
                ms(r["p99"]),
                ms(r["max"]),
                ms(r["first"]),
                per_request(r["client_cpu"], r),
                per_request(r["server_cpu"], r),
                "-" if peak is None else f"{peak:.0f}",
            ]
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def build_cases(args: argparse.Namespace, images: dict[str, str], info: dict) -> list[dict]:
    """The cases to run, one per (case, client count), with their bodies and checks."""
    cases = []
    for name, endpoint, query, image, counts in CASES:
        if args.only not in name:
            continue
        with open(images[image], "rb") as f:
            data = f.read()
        body_file, content_type = images[image], "image/png"
        if args.multipart:
            data, content_type = multipart(data, os.path.basename(images[image]))
            body_file = images[image] + ".multipart"
            with open(body_file, "wb") as f:
                f.write(data)
        model = "cifar" if image == "cifar" else args.model
        if endpoint == "predict":
            check = f"predict:{info['digit_label'] if image == 'digit' else ''}"
        else:
            check = "png" if "format=png" in query else "json"
        for clients in counts:
            cases.append(
                {
                    "name": name,
                    "clients": clients,
                    "path": f"/v1/models/{model}/{endpoint}?{query}",
                    "body_file": body_file,
                    "body_bytes": len(data),
                    "content_type": content_type,
                    "requests": args.requests if endpoint == "predict" else args.map_requests,
                    "seconds": args.seconds,
                    "check": check,
                }
            )
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", default=MODEL, help=f"model name (default {MODEL})")
    parser.add_argument(
        "--requests", type=int, default=2000, help="timed requests per predict case (2000)"
    )
    parser.add_argument(
        "--map-requests", type=int, default=60, help="timed requests per scoremap case (60)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="time bound of each case's timed phase (10)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="warm-up requests per client (3)")
    parser.add_argument(
        "--procs", type=int, default=2, help="client processes per case, at most one a client (2)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="socket timeout, s (30)")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--digit", type=int, default=0, help="test-split index of the digit (0)")
    parser.add_argument(
        "--multipart", action="store_true", help="send multipart/form-data, not raw image/png"
    )
    parser.add_argument(
        "--log-level", default="warning", help="the server's --log-level (default warning)"
    )
    parser.add_argument(
        "--serve-args", default="", help='more `cnnserve serve` flags, e.g. "--workers 2"'
    )
    parser.add_argument(
        "--start-timeout", type=float, default=60.0, help="seconds to wait for /readyz (60)"
    )
    parser.add_argument("--json", metavar="OUT", help="write the raw results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--make-images", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.make_images:
        return make_images(args.make_images, args.digit)
    for option in ("requests", "map_requests", "procs"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.seconds <= 0 or args.timeout <= 0 or args.warmup < 0:
        parser.error("--seconds and --timeout must be positive, --warmup at least 0")
    if not any(args.only in name for name, *_ in CASES):
        parser.error(f"--only {args.only!r} matches no case; cases: predict, scoremap-json/png")

    def terminated(signum, frame):
        raise KeyboardInterrupt  # SIGTERM: stop the server and the workers as on Ctrl-C

    signal.signal(signal.SIGTERM, terminated)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-") as tmp:
        log("making the images (digit and canvas)")
        done = subprocess.run(
            [sys.executable, __file__, "--make-images", tmp, "--digit", str(args.digit)],
            cwd=ROOT,
        )
        if done.returncode:
            raise SystemExit(f"making the images failed with exit status {done.returncode}")
        with open(os.path.join(tmp, "images.json")) as f:
            info = json.load(f)
        images = {
            "digit": os.path.join(tmp, "digit.png"),
            "canvas": os.path.join(tmp, "canvas.png"),
            "cifar": os.path.join(tmp, "cifar.png"),
        }
        cases = build_cases(args, images, info)

        server = Server(args.url, args, tmp)
        results: list[dict] = []
        try:
            ready = server.start(args.start_timeout)
            log(f"ready in {ready['seconds']:.1f} s: {ready.get('models')}")
            if args.model not in ready.get("models", []):
                raise RuntimeError(f"the server does not serve {args.model!r}: {ready}")
            status, body = http_get(server.host, server.port, "/openapi.json")
            server_version = json.loads(body)["info"]["version"] if status == 200 else "?"
            memory_ready = server.memory()
            for case in cases:
                log(
                    f"{case['name']}, {case['clients']} client(s): up to {case['requests']} "
                    f"requests or {case['seconds']:g} s"
                )
                results.append(run_case(server, case, args))
            memory_end = server.memory()
        except KeyboardInterrupt:
            log("interrupted: stopping")
            return 130
        except RuntimeError as exc:
            log(f"error: {exc}")
            return 1
        finally:
            server.stop()
        errors = any(r["errors"] or r["warmup_errors"] for r in results)
        log_tail = server.log_tail() if errors and server.command else None

    report(args, info, server, server_version, date, memory_ready, memory_end, results)
    if log_tail:
        print(f"\nthere were errors; the {log_tail}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "date": date,
                    "machine": {"cpus": os.cpu_count(), "cpu": cpu_model()},
                    "python": platform.python_version(),
                    "cnnserve": info["cnnserve"],
                    "server_version": server_version,
                    "server_command": server.command,
                    "url": f"http://{server.host}:{server.port}",
                    "images": info,
                    "options": {k: v for k, v in vars(args).items() if k not in ("worker",)},
                    "memory_ready": memory_ready,
                    "memory_end": memory_end,
                    "server_log_tail": log_tail,
                    "results": results,
                },
                f,
                indent=1,
            )
        log(f"raw results written to {args.json}")
    failed = any(
        r["errors"]
        or r["warmup_errors"]
        or (r["checked"] or "").startswith("FAILED")
        or r.get("reload", {"status": 200})["status"] != 200
        for r in results
    )
    return 1 if failed else 0


def report(args, info, server, server_version, date, memory_ready, memory_end, results) -> None:
    """Print the run's context, the markdown table and the notes under it."""
    where = (
        f"{shlex.join(server.command[:2])} ... (started here, log level {args.log_level})"
        if server.command
        else f"{args.url} (already running)"
    )
    print(
        f"date: {date}\n"
        f"machine: {cpu_model()}, {os.cpu_count()} cpus; Python {platform.python_version()}; "
        f"cnnserve {info['cnnserve']} (server reports {server_version}), numpy {info['numpy']}\n"
        f"server: {where}, http://{server.host}:{server.port}"
    )
    if server.command and args.serve_args:
        print(f"  extra serve flags: {args.serve_args}")
    body = "multipart/form-data (field file)" if args.multipart else "raw image/png"
    print(
        f"bodies: {body}; digit: test split #{info['digit_index']} (label "
        f"{info['digit_label']}), canvas {CANVAS_SIZE}x{CANVAS_SIZE} with {CANVAS_DIGITS} digits; "
        f"limits: {args.requests} predict / {args.map_requests} scoremap requests or "
        f"{args.seconds:g} s a case; {args.warmup} warm-up requests a client; "
        f"up to {args.procs} client processes\n"
    )
    print(table(results))
    print()
    for r in results:
        notes = [f"{r['connects']} connection(s)", f"wall {r['wall']:.2f} s"]
        if r["warmup_max"] is not None:
            notes.append(f"warm-up max {ms(r['warmup_max'])} ms")
        if r["client_cpu"] and r["wall"] > 0:
            notes.append(f"client CPU {r['client_cpu'] / r['wall'] * 100:.0f} % of a core")
        if r["server_cpu"] is not None and r["wall"] > 0:
            notes.append(f"server CPU {r['server_cpu'] / r['wall'] * 100:.0f} % of a core")
        if r["machine"]:
            m = r["machine"]
            notes.append(f"all cores: busy {m['busy']:.0f} %, steal {m['steal']:.0f} %")
            if r["server_cpu"] is not None and r["wall"] > 0:
                others = m["busy_seconds"] - r["server_cpu"] - r["client_cpu"]
                notes.append(f"other processes {max(others, 0) / r['wall'] * 100:.0f} % of a core")
        notes.append(f"check {r['checked'] or 'not done (no 200 response)'}")
        if "reload" in r:
            rl = r["reload"]
            notes.append(
                f"reload during the case: status {rl.get('status')} in "
                f"{rl.get('seconds', 0) * 1e3:.0f} ms, {rl.get('body') or rl.get('error')}"
            )
        print(f"- {r['case']} x{r['clients']}: " + "; ".join(notes))
        for kind, text in r["samples"].items():
            seen = r["statuses"].get(kind, 0) + r["warmup_statuses"].get(kind, 0)
            print(f"  - {kind} ({seen}x), first answer: {text!r}")
    if memory_end:
        for pid, m in memory_end.items():
            ready = (memory_ready or {}).get(pid, {})
            print(
                f"server pid {pid}: peak RSS (VmHWM) {m['hwm']:.0f} MiB at the end, "
                f"{ready.get('hwm', float('nan')):.0f} MiB when ready; RSS now {m['rss']:.0f} MiB"
            )
    print(
        "percentiles over the timed requests (errors included); first ms: the first warm-up "
        "request of the case (a fresh connection); CPU ms/req: over the timed phase"
    )


if __name__ == "__main__":
    sys.exit(main())
