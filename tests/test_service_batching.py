"""Dynamic batching: classifications that arrive together run as one batch, with the answers
they would have alone, and a request alone waits no longer than the batch delay."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cnnserve.convert import load_fully_convolutional
from cnnserve.predict import predict
from cnnserve.service import Settings, create_app
from tests.test_service import PNG, png, probabilities, test_digit, wait_ready

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(MODEL, folder / "digits.safetensors")
    return folder


def test_batched_answers_equal_unbatched(model_dir):
    fcn = load_fully_convolutional(MODEL)
    images = [png(test_digit(seed)[0]) for seed in range(12)]
    settings = {"max_batch_size": 8, "max_batch_delay_ms": 200, "max_concurrency": 1}
    with TestClient(create_app(Settings(models=model_dir, **settings))) as c:
        wait_ready(c)
        url = "/v1/models/digits/predict?top_k=10"
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda b: c.post(url, content=b, headers=PNG), images))
        sizes = c.app.state.service.batcher.batch_sizes
    assert [a.status_code for a in answers] == [200] * 12
    assert max(sizes) > 1 and max(sizes) <= 8 and sum(sizes) == 12, sizes
    for seed, answer in enumerate(answers):
        pixels = np.round(test_digit(seed)[0] * 255).astype(np.uint8)  # as the PNG holds them
        alone = predict(fcn, pixels).probabilities
        np.testing.assert_allclose(probabilities(answer.json()), alone, rtol=0, atol=1e-6)


def test_a_lone_request_waits_at_most_the_delay(model_dir):
    image = png(test_digit(0)[0])
    with TestClient(create_app(Settings(models=model_dir, max_batch_delay_ms=300))) as c:
        wait_ready(c)
        c.post("/v1/models/digits/predict", content=image, headers=PNG)  # first-call costs
        started = time.monotonic()
        assert c.post("/v1/models/digits/predict", content=image, headers=PNG).status_code == 200
        waited = time.monotonic() - started
        assert c.app.state.service.batcher.batch_sizes[-1] == 1
    assert 0.3 <= waited < 0.3 + 0.5  # the delay, then one small inference


def test_a_full_batch_runs_without_waiting_for_the_delay(model_dir):
    image = png(test_digit(0)[0])
    settings = {"max_batch_size": 2, "max_batch_delay_ms": 1000}
    with TestClient(create_app(Settings(models=model_dir, **settings))) as c:
        wait_ready(c)
        url = "/v1/models/digits/predict"
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: c.post(url, content=image, headers=PNG), range(2)))
        waited = time.monotonic() - started
        assert c.app.state.service.batcher.batch_sizes == [2]
    assert [a.status_code for a in answers] == [200, 200]
    assert waited < 0.9  # the second arrival filled the batch: no 1 s wait


def test_batching_off_runs_each_request_alone(model_dir):
    with TestClient(create_app(Settings(models=model_dir, max_batch_size=1))) as c:
        wait_ready(c)
        assert c.app.state.service.batcher is None
        r = c.post("/v1/models/digits/predict", content=png(test_digit(1)[0]), headers=PNG)
        assert r.status_code == 200
