"""The real service app on 127.0.0.1 in a background thread, for tests that need a URL.

uvicorn serves it with the service's own HTTP protocol class, as ``cnnserve serve`` does.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from cnnserve.service import Settings, create_app
from cnnserve.service.server import ServiceHTTPProtocol

START_TIMEOUT = 60  # s, for the server to answer /readyz


def http_get(url: str) -> tuple[int, bytes]:
    """``(status, body)`` of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@contextlib.contextmanager
def live_server(models: Path, **settings) -> Iterator[str]:
    """Serve the model files of ``models`` until the block ends; yields the base URL.

    ``settings`` are further :class:`~cnnserve.service.Settings` fields.
    """
    app = create_app(Settings(models=models, **settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held from now on: no race with other processes
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws="none",
        http=ServiceHTTPProtocol,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        status = None
        while time.monotonic() < deadline and thread.is_alive():
            try:
                status, _ = http_get(f"{base}/readyz")
            except OSError:  # not listening yet
                status = None
            if status == 200:
                break
            time.sleep(0.1)
        if status != 200:
            raise AssertionError(
                f"the service did not become ready within {START_TIMEOUT} s "
                f"(last /readyz status: {status}, server thread alive: {thread.is_alive()})"
            )
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive(), "the server thread did not stop"
