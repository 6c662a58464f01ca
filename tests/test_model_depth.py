"""Deep model files and long metadata: bounded from the header, in messages and in memory.

A file within the pixel and parameter limits can still declare thousands of relu layers
(each its own activation in the conversion's self-check and warm-up): ``max_layers``
(``--max-model-layers``) bounds them. A file whose metadata carries megabytes (1 MB class
names) gets an abbreviated message, in ``cnnserve info`` and in /readyz.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cnnserve.cli import main
from cnnserve.model import ConvNet, ModelFileError, load_model, save_model
from cnnserve.modelfile import MAX_MODEL_LAYERS
from cnnserve.service import Settings, create_app

MODELS = Path(__file__).resolve().parents[1] / "models"
DEPTH = 300


def rewrite_meta(path: Path, change) -> None:
    """Rewrite a safetensors file's ``cnnserve`` metadata with ``change(meta)``."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["cnnserve"])
    change(meta)
    header["__metadata__"]["cnnserve"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Path:
    """A trained model file of DEPTH relu layers and a classifier on an 8x8 input."""
    path = tmp_path_factory.mktemp("deep") / "deep.safetensors"
    save_model(ConvNet([{"type": "relu"}] * DEPTH, (1, 8, 8), 10), path)
    return path


def test_the_default_fits_the_shipped_models_many_times_over():
    for path in MODELS.glob("*.safetensors"):
        assert len(load_model(path).config()["layers"]) * 10 < MAX_MODEL_LAYERS


def test_load_model_refuses_too_many_layers_from_the_header(deep):
    with pytest.raises(
        ModelFileError, match=rf"declares {DEPTH} layers, more than the limit of 256"
    ):
        load_model(deep)
    assert len(load_model(deep, max_layers=DEPTH).config()["layers"]) == DEPTH


def test_cnnserve_info_and_serve_take_max_model_layers(deep, capsys, monkeypatch):
    assert main(["info", str(deep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-model-layers" in err
    assert main(["info", str(deep), "--max-model-layers", "1000"]) == 0
    capsys.readouterr()
    import uvicorn

    for field in Settings.model_fields:  # serve sets them in os.environ: undone at the end
        monkeypatch.setenv(f"CNNSERVE_{field.upper()}", "")
        monkeypatch.delenv(f"CNNSERVE_{field.upper()}")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    argv = ["serve", "--models", str(MODELS), "--max-model-layers", "12"]
    assert main([*argv, "--max-body-memory", "1000000"]) == 0
    assert (Settings().max_model_layers, Settings().max_body_memory) == (12, 1_000_000)


def wait_loaded(client: TestClient) -> dict:
    registry = client.app.state.service.registry
    deadline = time.monotonic() + 60
    while not registry.finished:
        assert time.monotonic() < deadline, "loading did not finish"
        time.sleep(0.02)
    return registry.failed


def test_the_service_skips_a_model_over_its_layer_limit(deep, tmp_path):
    shutil.copy(deep, tmp_path / "deep.safetensors")
    shutil.copy(MODELS / "digits.safetensors", tmp_path / "digits.safetensors")
    with TestClient(create_app(Settings(models=tmp_path, allow_failed=True))) as c:
        failed = wait_loaded(c)
        assert c.get("/readyz").json()["failed"] == failed
    assert "more than the limit of 256" in failed["deep"] and "digits" not in failed
    os.remove(tmp_path / "deep.safetensors")
    settings = Settings(models=tmp_path, max_model_layers=3, allow_failed=True)
    with TestClient(create_app(settings)) as c:
        failed = wait_loaded(c)
    assert "more than the limit of 3" in failed["digits"]


def test_a_forward_pass_in_test_mode_keeps_no_activation_of_every_layer():
    layers = 64
    net = ConvNet([{"type": "relu"}] * layers, (1, 64, 64), 10)
    X = np.random.default_rng(0).standard_normal((4, 1, 64, 64))
    one = X.size * 8  # bytes of one activation
    tracemalloc.start()
    try:
        net.scores(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * one  # with every activation kept: 64 of them


def test_megabytes_of_class_names_give_a_short_message(tmp_path, capsys):
    path = tmp_path / "long.safetensors"
    save_model(ConvNet([{"type": "relu"}], (1, 8, 8), 10), path)
    rewrite_meta(path, lambda meta: meta.update(class_names=["x" * 10**6] * 10))
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "class_names must be distinct" in err and len(err) < 1000, len(err)
    shutil.copy(MODELS / "digits.safetensors", tmp_path / "digits.safetensors")
    with TestClient(create_app(Settings(models=tmp_path, allow_failed=True))) as c:
        wait_loaded(c)
        failed = c.get("/readyz").json()["failed"]
    assert "class_names must be distinct" in failed["long"] and len(failed["long"]) < 1000


def test_a_failure_message_of_the_registry_is_bounded(tmp_path):
    from cnnserve.service.registry import MAX_REASON_CHARS, ModelRegistry

    def fails(path, **_):
        raise ValueError("y" * 10**6)

    shutil.copy(MODELS / "digits.safetensors", tmp_path / "other.safetensors")
    registry = ModelRegistry(tmp_path, warmup=False, loader=fails)
    registry.discover()
    registry.load_all()
    reason = registry.failed["other"]
    assert len(reason) <= MAX_REASON_CHARS and reason.startswith("other.safetensors: yyy")
    assert reason.endswith("(1,000,019 characters in all)")
