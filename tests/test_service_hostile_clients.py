"""Slow, faulty and departed clients against a real server (uvicorn, the service's protocol).

Raw sockets do what HTTP client libraries will not: stall mid-upload, send malformed HTTP,
leave while their request waits. The server must keep answering everyone else, close what
stalls after its timeout, answer every error in JSON, and never run a request whose client
has gone.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import shutil
import socket
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cnnserve.service import Settings, create_app
from tests.live_server import live_server

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"
TIMEOUT = 2.0  # header and body timeouts of the test server, in seconds
STALLED = 50


def png(height: int, width: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((height, width)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            total += float(m.group(3))
    return total


def request_bytes(method: str, path: str, body: bytes = b"", media: str = "image/png") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {media}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        data += b"<still open>"
    return data


def parse(response: bytes) -> tuple[int, dict, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def assert_json_error(response: bytes, status: int, code: str) -> dict:
    got, headers, body = parse(response)
    assert got == status, response
    assert headers["content-type"] == "application/json", headers
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"], error
    return error


class Client:
    """A keep-alive HTTP client of the test server."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def post(self, path: str, body: bytes) -> tuple[int, bytes, float]:
        start = time.perf_counter()
        self.conn.request("POST", path, body=body, headers={"Content-Type": "image/png"})
        response = self.conn.getresponse()
        return response.status, response.read(), time.perf_counter() - start

    def metrics(self) -> str:
        # A connection of its own each time: the kept-alive one may have been closed by the
        # server's keep-alive timeout while a test waited (seen on a loaded machine).
        conn = http.client.HTTPConnection(*self.address, timeout=30)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(MODEL, folder / "digits.safetensors")
    with live_server(
        folder, max_concurrency=1, header_timeout=TIMEOUT, body_timeout=TIMEOUT
    ) as base:
        yield base


@pytest.fixture
def client(server):
    c = Client(server)
    yield c
    c.close()


def test_stalled_uploads_neither_lock_out_others_nor_stay_open(client):
    image = png(8, 8)
    url = "/v1/models/digits/predict"
    usual = statistics.median(client.post(url, image)[2] for _ in range(7))
    # 50 uploads that send their headers and a little of their body, then stall
    stalled = []
    started = time.monotonic()
    for _ in range(STALLED):
        sock = client.connect()
        sock.sendall(request_bytes("POST", url, image)[: -len(image) + 10])
        stalled.append(sock)
    time.sleep(0.3)  # every upload has reached the server and waits for the rest
    times = []
    for _ in range(5):
        status, body, seconds = client.post(url, image)
        assert status == 200, body
        times.append(seconds)
    with_stalls = statistics.median(times)
    assert with_stalls < usual + 0.1, (usual, times)
    # each stalled upload gets a JSON 408 and its connection closed, after the body timeout
    closed_after = []
    for sock in stalled:
        with sock:
            response = read_all(sock, TIMEOUT + 5)
            closed_after.append(time.monotonic() - started)
        assert_json_error(response, 408, "request_timeout")
        assert b"<still open>" not in response
    assert TIMEOUT - 0.5 < min(closed_after) and max(closed_after) < TIMEOUT + 3
    text = client.metrics()
    assert metric(text, "cnnserve_http_requests_total", route=url.replace("digits", "{name}"),
                  status="408") == STALLED  # fmt: skip
    print(
        f"\n/predict median {usual * 1e3:.1f} ms alone, {with_stalls * 1e3:.1f} ms beside "
        f"{STALLED} stalled uploads; those closed after {min(closed_after):.2f}-"
        f"{max(closed_after):.2f} s (body timeout {TIMEOUT:g} s)"
    )


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /healthz HTTP/1.1\r\nHost: te"],
    ids=["nothing", "half-headers"],
)
def test_a_connection_without_headers_is_closed_after_the_header_timeout(client, sent):
    with client.connect() as sock:
        start = time.monotonic()
        sock.sendall(sent)
        response = read_all(sock, TIMEOUT + 5)
        elapsed = time.monotonic() - start
    assert TIMEOUT - 0.5 < elapsed < TIMEOUT + 2
    if not sent:  # nothing asked, nothing to answer: closed like an idle keep-alive connection
        assert response == b""
        return
    error = assert_json_error(response, 408, "request_timeout")
    assert "headers" in error["message"]


def test_a_keep_alive_connection_gets_a_new_header_timeout_per_request(client):
    for _ in range(3):  # each well within the timeout, together longer than it
        time.sleep(TIMEOUT / 2)
        client.conn.request("GET", "/healthz")
        assert client.conn.getresponse().read() == b'{"status":"ok"}'
    assert client.conn.sock is not None  # one connection throughout


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: test\r\n\r\n",
        b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: test\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!",
        b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n-3\r\n",
        b"GET /hea\x00lthz HTTP/1.1\r\nHost: test\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nBad Header\r\n\r\n",
    ],
    ids=[
        "garbage-request-line",
        "extra-in-request-line",
        "content-length-not-a-number",
        "content-length-negative",
        "duplicate-content-length",
        "chunk-size-not-hex",
        "chunk-size-negative",
        "nul-in-path",
        "header-without-colon",
    ],
)
def test_malformed_http_gets_a_json_400(client, raw):
    with client.connect() as sock:
        sock.sendall(raw)
        response = read_all(sock, 5)
    assert_json_error(response, 400, "bad_request")
    assert parse(response)[1]["connection"] == "close"
    assert b"<still open>" not in response


def test_a_client_that_left_while_its_request_waited_does_not_run(server, client):
    url = "/v1/models/digits/scoremap"
    before = client.metrics()
    # one large map holds the only slot for a few seconds
    blocker: dict = {}
    big = png(1280, 1280, seed=1)
    other = Client(server)
    thread = threading.Thread(
        target=lambda: blocker.update(r=other.post(f"{url}?arrays=false", big))
    )
    thread.start()
    deadline = time.monotonic() + 20
    while metric(client.metrics(), "cnnserve_inferences_in_progress", endpoint="scoremap") < 1:
        assert time.monotonic() < deadline and thread.is_alive(), "the map never started"
        time.sleep(0.01)
    # five clients send whole requests, wait in the queue, then leave
    small = request_bytes("POST", url, png(16, 16))
    leaving = [client.connect() for _ in range(5)]
    for sock in leaving:
        sock.sendall(small)
    while metric(client.metrics(), "cnnserve_inferences_waiting", endpoint="scoremap") < 5:
        assert time.monotonic() < deadline, "the requests never waited"
        time.sleep(0.01)
    for sock in leaving:
        sock.close()
    # noticed at once, while the map still runs: not when a slot comes free
    route = "/v1/models/{name}/scoremap"
    while metric(client.metrics(), "cnnserve_http_requests_total", route=route, status="499") < 5:
        assert time.monotonic() < deadline, "the departed clients were not noticed"
        time.sleep(0.01)
    text = client.metrics()
    assert metric(text, "cnnserve_inferences_in_progress", endpoint="scoremap") == 1
    assert metric(text, "cnnserve_inferences_waiting", endpoint="scoremap") == 0
    assert thread.is_alive()
    thread.join(60)
    other.close()
    assert blocker["r"][0] == 200
    after = client.metrics()
    ran = metric(after, "cnnserve_images_processed_total", endpoint="scoremap") - metric(
        before, "cnnserve_images_processed_total", endpoint="scoremap"
    )
    assert ran == 1  # the map only: none of the departed requests ran
    assert metric(after, "cnnserve_http_requests_total", route=route, status="499") == 5


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/models/digits%2Fpredict"),
        ("POST", "/v1/models/digits%2fscoremap"),
        ("GET", "/v1/models%2Fdigits"),
        ("GET", "/v1/models/digits%5Cpredict"),
        ("GET", "/static%2Fapp.js"),
    ],
)
def test_an_encoded_slash_is_never_routed(client, method, path):
    with client.connect() as sock:
        sock.sendall(
            request_bytes(method, path, png(8, 8)).replace(
                b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1
            )
        )
        response = read_all(sock, 5)
    error = assert_json_error(response, 404, "not_found")
    assert "encode a slash" in error["message"]


def test_an_encoded_slash_is_a_404_through_the_test_client_too(tmp_path):
    shutil.copy(MODEL, tmp_path / "digits.safetensors")
    with TestClient(create_app(Settings(models=tmp_path, warmup=False))) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        image = png(8, 8)
        r = c.post(
            "/v1/models/digits%2Fpredict", content=image, headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.post(
            "/v1/models/digits/predict", content=image, headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 200


def test_cnnserve_serve_applies_its_flags_in_its_own_process(tmp_path):
    """The flags reach the protocol of a real `cnnserve serve` process, through the
    environment of its worker and uvicorn's wrapping of the app."""
    import subprocess
    import sys
    import urllib.request

    shutil.copy(MODEL, tmp_path / "digits.safetensors")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "cnnserve", "serve", "--models", str(tmp_path)]
    argv += ["--port", str(port), "--header-timeout", "1", "--max-connections", "4"]
    argv += ["--log-level", "warning", "--no-warmup"]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        client = Client(base)
        with client.connect() as sock:  # the header timeout of the flag, 1 s
            start = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            response = read_all(sock, 10)
            assert time.monotonic() - start < 3
        assert_json_error(response, 408, "request_timeout")
        with client.connect() as sock:
            sock.sendall(b"GET /he\x00 HTTP/1.1\r\n\r\n")
            assert_json_error(read_all(sock, 5), 400, "bad_request")
        with client.connect() as sock:  # no WebSocket: answered as plain HTTP, in JSON
            sock.sendall(
                b"GET /nope HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, close\r\n"
                b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            assert_json_error(read_all(sock, 5), 404, "not_found")
        idle = [client.connect() for _ in range(4)]  # the connection limit of the flag
        time.sleep(0.2)
        with client.connect() as extra:
            assert_json_error(read_all(extra, 5), 503, "too_many_connections")
        for sock in idle:
            sock.close()
        client.close()
    finally:
        server.terminate()
        server.wait(30)
        server.stderr.close()


def test_a_stalled_body_after_an_early_answer_is_closed_too(client):
    """A 404 goes out before the body is read; the rest of the body never comes."""
    with client.connect() as sock:
        start = time.monotonic()
        sock.sendall(request_bytes("POST", "/v1/models/nope/predict", b"x" * 1000)[:-990])
        response = read_all(sock, TIMEOUT + 5)
        elapsed = time.monotonic() - start
    assert_json_error(response, 404, "model_not_found")  # the one answer: no 408 after it
    assert response.count(b"HTTP/1.1") == 1
    assert TIMEOUT - 0.5 < elapsed < TIMEOUT + 2
