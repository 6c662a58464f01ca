"""Absurd but valid model files: refused from their header, before anything is allocated.

A model file of a few kilobytes can declare an 8000 x 8000 input: its conversion self-check
and the service's warm-up would then take minutes and gigabytes. ``max_pixels`` and
``max_params`` (``--max-model-pixels``, ``--max-model-params``) bound what a file may
declare, in :func:`~cnnserve.modelfile.load_model`, ``cnnserve info`` and the service.
"""

from __future__ import annotations

import os
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cnnserve.cli import main
from cnnserve.convert import (
    load_fully_convolutional,
    save_fully_convolutional,
    to_fully_convolutional,
)
from cnnserve.model import ConvNet, ModelFileError, load_model, save_model
from cnnserve.modelfile import MAX_MODEL_PARAMS, MAX_MODEL_PIXELS
from cnnserve.service import Settings, create_app
from cnnserve.service import registry as registry_module

MODELS = Path(__file__).resolve().parents[1] / "models"

# Strided convolutions bring 8000 x 8000 down to 5 x 5 with a few hundred weights.
STRIDED = [
    {"type": "conv", "filters": 2, "size": 8, "stride": 8, "pad": 0},
    {"type": "relu"},
    {"type": "conv", "filters": 2, "size": 8, "stride": 8, "pad": 0},
    {"type": "conv", "filters": 2, "size": 5, "stride": 5, "pad": 0},
    {"type": "conv", "filters": 2, "size": 5, "stride": 5, "pad": 0},
]


@pytest.fixture(scope="module")
def huge(tmp_path_factory) -> Path:
    """A trained model file of a few KB that declares a 1 x 8000 x 8000 input."""
    path = tmp_path_factory.mktemp("huge") / "huge.safetensors"
    save_model(ConvNet(STRIDED, (1, 8000, 8000), 10), path)
    assert path.stat().st_size < 10_000
    return path


def test_the_defaults_fit_the_shipped_models_many_times_over():
    for path in MODELS.glob("*.safetensors"):
        model = load_model(path)
        _, H, W = model.input_shape
        params = sum(v.size for v in model.params.values())
        assert H * W * 100 < MAX_MODEL_PIXELS and params * 100 < MAX_MODEL_PARAMS


def test_load_model_refuses_a_huge_input_from_the_header(huge):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelFileError, match=r"declares a 1x8000x8000 input: 64,000,000 "):
            load_model(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1 and peak < 2**20
    # the limit, and nothing else, refused it: a trusted file loads with a larger one
    assert load_model(huge, max_pixels=8000 * 8000).input_shape == (1, 8000, 8000)
    with pytest.raises(ModelFileError, match=r"input: 64,000,000 pixels, more than the limit"):
        load_fully_convolutional(huge)  # which would convert and self-check it


def test_the_parameter_limit(tmp_path):
    path = save_model(ConvNet([], (1, 8, 8), 10), tmp_path / "m.safetensors")  # 64 * 10 + 10
    assert load_model(path, max_params=650).num_parameters() == 650
    with pytest.raises(
        ModelFileError, match=r"declares 650 parameters, more than the limit of 649"
    ):
        load_model(path, max_params=649)
    with pytest.raises(ModelFileError, match=r"declares 650 parameters"):
        load_fully_convolutional(path, max_params=649)


def test_a_converted_file_is_checked_from_its_header_too(tmp_path):
    model = ConvNet(STRIDED[:1], (1, 600, 600), 3)  # 360,000 pixels: over the default
    fcn = to_fully_convolutional(model, check_size=1)
    path = save_fully_convolutional(fcn, tmp_path / "wide_fcn.safetensors")
    with pytest.raises(ModelFileError, match=r"declares a 1x600x600 input: 360,000 pixels"):
        load_fully_convolutional(path)
    assert load_fully_convolutional(path, max_pixels=600 * 600).input_shape == (1, 600, 600)
    params = sum(v.size for v in fcn.params.values())
    with pytest.raises(ModelFileError, match=rf"declares {params:,} parameters"):
        load_fully_convolutional(path, max_pixels=600 * 600, max_params=params - 1)


def test_cnnserve_info_refuses_it_in_one_line_unless_told(huge, capsys):
    assert main(["info", str(huge)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnserve info: error: ") and err.count("\n") == 1
    assert "declares a 1x8000x8000 input" in err and "--max-model-pixels" in err
    assert main(["info", str(huge), "--max-model-pixels", "64000000"]) == 0
    assert "(1, 8000, 8000)" in capsys.readouterr().out
    assert main(["info", str(MODELS / "digits.safetensors"), "--max-model-params", "100"]) == 2
    assert "parameters, more than the limit of 100" in capsys.readouterr().err


def wait_loaded(client: TestClient) -> dict:
    """``{"models": [...], "failed": {...}}`` once the service has tried every file."""
    registry = client.app.state.service.registry
    deadline = time.monotonic() + 60
    while not registry.finished:
        assert time.monotonic() < deadline, "loading did not finish"
        time.sleep(0.02)
    ready = client.get("/readyz")
    if registry.failed:  # not ready: the reasons are in the 503
        assert ready.status_code == 503
        assert all(
            reason in ready.json()["error"]["message"] for reason in registry.failed.values()
        )
    else:
        assert ready.json()["failed"] == {}
    return {"models": sorted(registry.models), "failed": registry.failed}


def test_the_service_skips_a_model_over_its_limits(huge, tmp_path):
    shutil.copy(huge, tmp_path / "huge.safetensors")
    shutil.copy(MODELS / "digits.safetensors", tmp_path / "digits.safetensors")
    start = time.perf_counter()
    with TestClient(create_app(Settings(models=tmp_path))) as c:
        ready = wait_loaded(c)
    assert time.perf_counter() - start < 20  # not the minutes of an 8000 x 8000 self-check
    assert ready["models"] == ["digits"]
    assert "declares a 1x8000x8000 input" in ready["failed"]["huge"]
    # the service's settings set the limits: digits' 8 x 8 = 64 pixels over a limit of 63
    os.remove(tmp_path / "huge.safetensors")
    with TestClient(create_app(Settings(models=tmp_path, max_model_pixels=63))) as c:
        ready = wait_loaded(c)
    assert ready["models"] == [] and "limit of 63" in ready["failed"]["digits"]
    with TestClient(create_app(Settings(models=tmp_path, max_model_params=1000))) as c:
        ready = wait_loaded(c)
    assert "more than the limit of 1,000" in ready["failed"]["digits"]


def test_serve_passes_the_model_limits_to_every_worker(monkeypatch):
    import uvicorn

    for name in [k for k in os.environ if k.startswith("CNNSERVE_")]:
        monkeypatch.delenv(name)
    for field in Settings.model_fields:  # serve sets them in os.environ: undone at the end
        monkeypatch.setenv(f"CNNSERVE_{field.upper()}", "")
        monkeypatch.delenv(f"CNNSERVE_{field.upper()}")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    argv = ["serve", "--models", str(MODELS), "--max-model-pixels", "4096"]
    argv += ["--max-model-params", "99999", "--header-timeout", "3", "--body-timeout", "4.5"]
    assert main([*argv, "--max-connections", "7"]) == 0
    settings = Settings()  # what a worker reads from the environment
    assert (settings.max_model_pixels, settings.max_model_params) == (4096, 99999)
    assert (settings.header_timeout, settings.body_timeout) == (3.0, 4.5)
    assert settings.max_connections == 7
    assert main(["serve", "--models", str(MODELS), "--body-timeout", "0"]) == 2


def test_the_warm_up_map_stays_small_for_a_large_window(tmp_path, monkeypatch):
    shapes = []
    real = registry_module.score_map
    monkeypatch.setattr(
        registry_module, "score_map", lambda fcn, x, **k: shapes.append(x.shape) or real(fcn, x)
    )
    registry_module.load_one(MODELS / "digits.safetensors")  # 8 x 8: a map of 4 x 4 windows
    wide = save_model(ConvNet(STRIDED[:1], (1, 200, 200), 3), tmp_path / "wide.safetensors")
    registry_module.load_one(wide)  # 200 x 200: 2 x 2 cells, not 800 x 800 pixels
    assert shapes == [(1, 32, 32), (1, 208, 208)]
    assert np.prod(shapes[1]) <= registry_module.WARMUP_MAP_PIXELS
