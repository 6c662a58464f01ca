"""``cnnserve predict`` and ``cnnserve serve``: the service's answers from the command line,
and the service as a real process on 127.0.0.1 with the shipped models (the ``digits``
classifier and the ``digits_detector``, trained with a background class)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.cli import main
from cnnserve.convert import load_fully_convolutional
from cnnserve.data import digits_canvas
from cnnserve.predict import predict

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "digits.safetensors"


def write_png(path: Path, pixels: np.ndarray) -> Path:
    a = np.asarray(pixels)
    a = a[0] if a.ndim == 3 else a
    Image.fromarray(np.round(a * 255).astype(np.uint8)).save(path)
    return path


def held_out_digit(seed: int) -> tuple[np.ndarray, int]:
    canvas, placements = digits_canvas((8, 8), 1, seed=seed, margin=0)
    return canvas, placements[0]["label"]


# ---------------------------------------------------------------------------------------------
# cnnserve predict
# ---------------------------------------------------------------------------------------------


def test_predict_prints_the_top_classes(tmp_path, capsys):
    digit, label = held_out_digit(0)
    image = write_png(tmp_path / "digit.png", digit)
    assert main(["predict", str(MODEL), str(image), "--top-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"image {image}: 8x8 pixels; ")
    assert len(out) == 4
    assert out[1].split()[:2] == ["1.", str(label)]
    expected = predict(load_fully_convolutional(MODEL), np.asarray(Image.open(image)))
    for line, ranked in zip(out[1:], expected.top_k(3), strict=True):
        assert line.split()[1:3] == [ranked["label"], f"{ranked['probability']:.4f}"]


def test_predict_json_equals_the_library(tmp_path, capsys):
    digit, _ = held_out_digit(1)
    big = np.kron(digit[0], np.ones((3, 3), np.float32))
    image = write_png(tmp_path / "big.png", big)
    assert main(["predict", str(MODEL), str(image), "--json", "--top-k", "20"]) == 0
    record = json.loads(capsys.readouterr().out)
    expected = predict(load_fully_convolutional(MODEL), np.asarray(Image.open(image)))
    assert record["predictions"] == expected.top_k(10)
    assert record["image_size"] == [24, 24] and record["resized_to"] == [8, 8]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "MODEL", "missing.png"], "does not exist"),
        (["predict", "MODEL", "notes.png"], "cannot be decoded as an image"),
        (
            ["predict", "nope.safetensors", "digit.png"],
            "model file nope.safetensors does not exist",
        ),
    ],
)
def test_predict_errors_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    write_png(tmp_path / "digit.png", held_out_digit(0)[0])
    args = [str(MODEL) if a == "MODEL" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnserve predict: error:") and message in err


# ---------------------------------------------------------------------------------------------
# cnnserve serve: refusals before uvicorn starts
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_environment():
    """`cnnserve serve` puts its settings in the environment, for uvicorn's workers."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_serve_refuses_a_missing_or_empty_model_directory(tmp_path, capsys, monkeypatch):
    for name in [k for k in os.environ if k.startswith("CNNSERVE_")]:
        monkeypatch.delenv(name)
    assert main(["serve", "--models", str(tmp_path / "nope")]) == 2
    assert "does not exist (set --models or CNNSERVE_MODELS)" in capsys.readouterr().err
    assert main(["serve", "--models", str(tmp_path)]) == 2
    assert "holds no *.safetensors model file" in capsys.readouterr().err


def test_serve_refuses_bad_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CNNSERVE_QUEUE_TIMEOUT", "-1")
    assert main(["serve", "--models", str(MODEL.parent)]) == 2
    assert "CNNSERVE_QUEUE_TIMEOUT: Input should be greater than or equal to 0" in (
        capsys.readouterr().err
    )


def test_serve_flags_are_checked_by_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--max-pixels", "0"])
    assert info.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "99999"], "argument --port: must be 0 to 65535, got 99999"),
        (["--port", "-1"], "argument --port: must be 0 to 65535, got -1"),
        (["--max-connections", "0"], "argument --max-connections: must be >= 1, got 0"),
    ],
)
def test_serve_refuses_bad_flags_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--models", str(MODEL.parent), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--queue-timeout", "nan"], "CNNSERVE_QUEUE_TIMEOUT: Input should be a finite number"),
        (["--header-timeout", "inf"], "CNNSERVE_HEADER_TIMEOUT: Input should be a finite number"),
        (["--max-waiting", "-1"], "CNNSERVE_MAX_WAITING: Input should be greater than or equal"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' is not an address"),
        (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1:"),  # TEST-NET: no interface
    ],
)
def test_serve_refuses_bad_settings_and_addresses_before_serving(flags, message, capsys):
    assert main(["serve", "--models", str(MODEL.parent), *flags]) == 2
    out, err = capsys.readouterr()
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "serving" not in out  # refused before it says it serves


def test_serve_refuses_a_port_in_use(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--models", str(MODEL.parent), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "serving" not in out


# ---------------------------------------------------------------------------------------------
# The service as a real process
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None, media: str = ""):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": media} if media else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@contextlib.contextmanager
def running_server(log: Path, *flags: str):
    """``cnnserve serve`` on a free port of 127.0.0.1 with the shipped model(s), until ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNNSERVE_", "PROMETHEUS_"))}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cnnserve",
                "serve",
                "--models",
                str(MODEL.parent),
                "--port",
                str(port),
                *flags,
            ],  # fmt: skip
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"the server exited: {log.read_text()}"
                try:
                    if request(port, "GET", "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"not ready in 60 s: {log.read_text()}"
                time.sleep(0.1)
            yield port, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(log, "--max-concurrency", "2") as (port, proc):
        yield port, proc, log


def test_real_server_classifies_a_held_out_digit(server, tmp_path):
    port, _, _ = server
    digit, label = held_out_digit(2)
    data = (write_png(tmp_path / "d.png", digit)).read_bytes()
    status, headers, body = request(port, "POST", "/v1/models/digits/predict", data, "image/png")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["predictions"][0]["label"] == str(label)
    assert answer["predictions"][0]["probability"] > 0.5


def test_real_server_maps_a_canvas(server, tmp_path):
    port, _, _ = server
    canvas, placements = digits_canvas((48, 96), 6, seed=0)
    data = write_png(tmp_path / "canvas.png", canvas).read_bytes()
    status, _, body = request(
        port, "POST", "/v1/models/digits/scoremap?stride_divisor=2", data, "image/png"
    )
    assert status == 200, body
    answer = json.loads(body)
    assert answer["map_shape"] == [41, 89]
    p = answer["probabilities"]
    probabilities = np.frombuffer(base64.b64decode(p["data"]), "<f4").reshape(p["shape"])
    assert probabilities.shape == (10, 41, 89)
    for placed in placements:
        x0, y0, _, _ = placed["box"]
        # at stride 1, cell (y0, x0) is the digit's own window: its class wins there
        assert probabilities[:, y0, x0].argmax() == placed["label"]


@pytest.mark.parametrize("seed", [0, 1])
def test_real_server_detector_finds_each_digit_where_it_was_placed(server, tmp_path, seed):
    """The shipped detector (a background class): each digit's class peaks on that digit."""
    port, _, _ = server
    canvas, placements = digits_canvas((64, 128), 8, seed=seed)
    data = write_png(tmp_path / "canvas.png", canvas).read_bytes()
    path = "/v1/models/digits_detector/scoremap?stride_divisor=2"
    status, _, body = request(port, "POST", path, data, "image/png")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["map_shape"] == [57, 121]
    assert answer["classes"] == [*map(str, range(10)), "background"]
    p = answer["probabilities"]
    probabilities = np.frombuffer(base64.b64decode(p["data"]), "<f4").reshape(p["shape"])
    for placed in placements:
        x0, y0, _, _ = placed["box"]
        plane = probabilities[placed["label"]]
        i, j = np.unravel_index(np.argmax(plane), plane.shape)
        assert abs(i - y0) <= 1 and abs(j - x0) <= 1, (placed, (i, j))
        assert plane[i, j] > 0.5
    # and the service reports the same peak for a chosen class
    label = placements[0]["label"]
    status, _, body = request(port, "POST", f"{path}&class={label}", data, "image/png")
    peak = json.loads(body)["class"]["peak"]
    assert abs(peak["box"][0] - placements[0]["box"][0]) <= 1
    assert abs(peak["box"][1] - placements[0]["box"][1]) <= 1


def test_real_server_errors_and_metrics(server):
    port, _, _ = server
    status, headers, body = request(port, "POST", "/v1/models/digits/predict", b"junk", "image/png")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_image"
    status, _, body = request(port, "GET", "/v1/models/nope")
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    status, headers, body = request(port, "GET", "/metrics")
    assert status == 200
    assert 'cnnserve_http_requests_total{method="POST",route="/v1/models/{name}/predict"' in (
        body.decode()
    )
    status, headers, body = request(port, "GET", "/")
    assert status == 200 and b"<html" in body.lower()
    assert io.BytesIO(body).read(15).lower().startswith(b"<!doctype html")


def test_real_server_stops_cleanly_on_sigint(tmp_path):
    log = tmp_path / "serve.log"
    with running_server(log, "--max-waiting", "4", "--max-map-cells", "5000") as (port, proc):
        assert request(port, "GET", "/healthz")[0] == 200
        canvas = write_png(tmp_path / "c.png", np.zeros((1, 200, 200), np.float32)).read_bytes()
        status, _, body = request(port, "POST", "/v1/models/digits/scoremap", canvas, "image/png")
        assert status == 422 and "more than the limit of 5,000" in body.decode()  # the flag
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    text = log.read_text()
    assert "model 'digits' loaded" in text and "model 'digits_detector' loaded" in text
    assert "Shutting down" in text


def test_real_server_with_two_workers_reports_the_metrics_of_both(tmp_path):
    digit, label = held_out_digit(3)
    data = write_png(tmp_path / "d.png", digit).read_bytes()
    with running_server(tmp_path / "serve.log", "--workers", "2") as (port, _):
        # /readyz answered for one worker; the other may still be loading: a client retries
        # a 503 not_ready, as its Retry-After says (those answers count in the metrics too)
        deadline = time.monotonic() + 60
        answered = 0
        while answered < 8:  # a new connection each: the kernel spreads them over the workers
            status, _, body = request(port, "POST", "/v1/models/digits/predict", data, "image/png")
            if status == 503 and json.loads(body)["error"]["code"] == "not_ready":
                assert time.monotonic() < deadline, "the second worker did not get ready"
                time.sleep(0.2)
                continue
            assert status == 200 and json.loads(body)["predictions"][0]["label"] == str(label)
            answered += 1
        # every worker reports its loaded models under its own pid, once it has loaded them
        shipped = f"{len(list(MODEL.parent.glob('*.safetensors'))):.1f}"
        deadline = time.monotonic() + 60
        while True:
            text = request(port, "GET", "/metrics")[2].decode()
            loaded = [ln for ln in text.splitlines() if ln.startswith("cnnserve_models_loaded{")]
            counts = sorted(ln.rsplit(" ", 1)[1] for ln in loaded)
            if counts == [shipped, shipped] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert counts == [shipped, shipped]  # every shipped model in each worker
    line = (
        'cnnserve_http_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"}'
    )
    assert f"{line} 8.0" in text  # whichever worker answered /metrics: the sum of both
    log = (tmp_path / "serve.log").read_text()
    assert log.count("model 'digits' loaded") == 2


def test_serve_hands_uvicorn_the_service_protocol(monkeypatch, capsys):
    import uvicorn

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    for name in [k for k in os.environ if k.startswith("CNNSERVE_")]:
        monkeypatch.delenv(name)
    assert main(["serve", "--models", str(MODEL.parent), "--port", "9", "--workers", "3"]) == 0
    assert seen["app"] == "cnnserve.service.app:create_app" and seen["factory"] is True
    assert (seen["port"], seen["workers"]) == (9, 3)
    assert seen["http"] == "cnnserve.service.server:ServiceHTTPProtocol"
    assert seen["ws"] == "none"  # an Upgrade request gets the JSON of plain HTTP
    assert "serving digits, digits_detector" in capsys.readouterr().out


def test_nodelay_protocol_sets_tcp_nodelay_on_tcp_connections_only():
    from uvicorn.importer import import_from_string

    from cnnserve.service.server import ServiceHTTPProtocol, set_nodelay

    assert import_from_string("cnnserve.service.server:ServiceHTTPProtocol") is ServiceHTTPProtocol

    class Transport:
        def __init__(self, sock):
            self.sock = sock

        def get_extra_info(self, name):
            return self.sock if name == "socket" else None

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0) as sock:  # proto 0, like uvicorn's
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert set_nodelay(Transport(sock)) is True
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    a, b = socket.socketpair()  # a Unix socket: nothing to set
    with a, b:
        assert set_nodelay(Transport(a)) is False
    assert set_nodelay(Transport(None)) is False
