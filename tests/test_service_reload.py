"""Model versions and reload: Triton's directory layout, a swap with no failed request, and a
file that fails to load never replacing the version that works."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cnnserve.modelfile import load_model, save_model
from cnnserve.predict import predict
from cnnserve.service import Settings, create_app
from tests.live_server import live_server
from tests.test_service import PNG, png, probabilities, test_digit, wait_ready

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """The digits model with a changed classifier bias: answers unlike version 1's."""
    net = load_model(MODEL)
    last = sorted(k for k in net.params if k.startswith("b"))[-1]
    net.params[last] = net.params[last] + np.linspace(-2, 2, net.params[last].size).astype(
        net.params[last].dtype
    )
    return save_model(net, tmp_path_factory.mktemp("v2") / "model.safetensors")


def versioned(folder: Path, version: int, source: Path) -> Path:
    target = folder / "digits" / str(version) / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return target


def test_versioned_directories_serve_their_highest_version(tmp_path, other_model):
    versioned(tmp_path, 1, MODEL)
    versioned(tmp_path, 2, other_model)
    (tmp_path / "digits" / "notes").mkdir()  # not a version: ignored
    shutil.copy(MODEL, tmp_path / "flat.safetensors")
    with TestClient(create_app(Settings(models=tmp_path))) as c:
        wait_ready(c)
        listed = {m["name"]: m["version"] for m in c.get("/v1/models").json()["models"]}
        assert listed == {"digits": "2", "flat": "1"}
        image = png(test_digit(3)[0])
        answer = c.post("/v1/models/digits/predict?top_k=10", content=image, headers=PNG).json()
        assert answer["version"] == "2"
        pixels = np.round(test_digit(3)[0] * 255).astype(np.uint8)
        expected = predict(load_model(other_model), pixels).probabilities
        np.testing.assert_allclose(probabilities(answer), expected, atol=1e-6)
        assert c.get("/v2/models/digits").json()["versions"] == ["2"]
        assert c.get("/v2/models/digits/versions/1").status_code == 404


def test_a_failing_file_never_replaces_the_working_version(tmp_path):
    versioned(tmp_path, 1, MODEL)
    with TestClient(create_app(Settings(models=tmp_path))) as c:
        wait_ready(c)
        broken = tmp_path / "digits" / "2" / "model.safetensors"
        broken.parent.mkdir()
        broken.write_bytes(MODEL.read_bytes()[:500])
        r = c.post("/v1/models/digits/reload")
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "digits/2/model.safetensors" in message and "version 1 still serves" in message
        assert str(tmp_path) not in message
        image = png(test_digit(0)[0])
        assert (
            c.post("/v1/models/digits/predict", content=image, headers=PNG).json()["version"] == "1"
        )
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/models/nope/reload").status_code == 404
        shutil.copy(MODEL, broken)  # fixed: the reload now swaps
        r = c.post("/v1/models/digits/reload").json()
        assert (r["name"], r["version"], r["previous"]) == ("digits", "2", "1")


def test_reload_under_load_fails_no_request_and_each_answer_is_one_version(tmp_path, other_model):
    versioned(tmp_path, 1, MODEL)
    pixels = np.round(test_digit(7)[0] * 255).astype(np.uint8)
    expected = {
        "1": predict(load_model(MODEL), pixels).probabilities,
        "2": predict(load_model(other_model), pixels).probabilities,
    }
    assert np.abs(expected["1"] - expected["2"]).max() > 1e-3  # the versions can be told apart
    image = png(pixels)
    answers: list[tuple[int, dict | None]] = []
    stop = threading.Event()

    def client(base: str) -> None:
        host = urllib.parse.urlsplit(base).netloc
        conn = http.client.HTTPConnection(host, timeout=30)
        while not stop.is_set():
            conn.request("POST", "/v1/models/digits/predict?top_k=10", image, PNG)
            r = conn.getresponse()
            body = r.read()
            answers.append((r.status, json.loads(body) if r.status == 200 else None))
        conn.close()

    with live_server(tmp_path) as base:
        clients = [threading.Thread(target=client, args=(base,)) for _ in range(4)]
        for t in clients:
            t.start()
        time.sleep(0.3)
        versioned(tmp_path, 2, other_model)
        host = urllib.parse.urlsplit(base).netloc
        conn = http.client.HTTPConnection(host, timeout=60)
        conn.request("POST", "/v1/models/digits/reload")
        reload = conn.getresponse()
        assert reload.status == 200 and json.loads(reload.read())["version"] == "2"
        conn.close()
        time.sleep(0.3)
        stop.set()
        for t in clients:
            t.join(30)
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == len(statuses) > 20, set(statuses)
    seen = {"1": 0, "2": 0}
    for _, answer in answers:
        version = answer["version"]
        np.testing.assert_allclose(probabilities(answer), expected[version], atol=1e-6)
        seen[version] += 1
    assert seen["1"] > 0 and seen["2"] > 0, seen
    assert answers[-1][1]["version"] == "2"  # after the swap, only the new version answers


def test_watch_notices_a_new_version(tmp_path, other_model):
    versioned(tmp_path, 1, MODEL)
    with TestClient(create_app(Settings(models=tmp_path, watch=True, watch_interval=0.1))) as c:
        wait_ready(c)
        versioned(tmp_path, 2, other_model)
        deadline = time.monotonic() + 30
        while c.get("/v1/models/digits").json()["version"] != "2":
            assert time.monotonic() < deadline, "the watcher did not load version 2"
            time.sleep(0.05)
        (tmp_path / "digits" / "3").mkdir()
        (tmp_path / "digits" / "3" / "model.safetensors").write_bytes(b"\0" * 100)
        time.sleep(0.5)  # several looks: the broken version 3 is tried and refused
        assert c.get("/v1/models/digits").json()["version"] == "2"
        assert c.get("/readyz").status_code == 200
