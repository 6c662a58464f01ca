"""``POST /v1/models/{name}/activations``: pictures and numbers of every layer, and its
errors (always JSON, never a 500)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cnnserve import heatmap as heatmap_module
from cnnserve.model import ConvNet, load_model, save_model
from cnnserve.service import Settings, create_app
from cnnserve.visualise import activation_grid, activation_sheet, activations
from tests.test_service import PNG, assert_error, decode, png, wait_ready

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"
URL = "/v1/models/digits/activations"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(MODEL, folder / "digits.safetensors")
    # A model without conv layers is served too: its activations work all the same.
    save_model(ConvNet([{"type": "affine", "units": 6}], (1, 8, 8), 3), folder / "flat.safetensors")
    with TestClient(create_app(Settings(models=folder, max_json_cells=2000))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    y, x = np.mgrid[0:8, 0:8]
    return np.rint((np.sin(x / 2.0) * np.cos(y / 3.0) * 0.5 + 0.5) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def expected(image):
    return activations(load_model(MODEL), image)


def test_json_gives_every_layer_with_per_channel_statistics(client, image, expected):
    r = client.post(URL, content=png(image), headers=PNG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "digits" and body["image_size"] == [8, 8] and body["resized_to"] is None
    layers = body["layers"]
    assert [layer["layer"] for layer in layers] == ["input", *map(str, range(11))]
    assert [layer["name"] for layer in layers][1:3] == ["conv 32 3x3 s1 p0", "spatial_batchnorm"]
    for layer, a in zip(layers, expected, strict=True):
        assert layer["shape"] == list(a.shape) and "values" not in layer
        for key, value in a.channel_stats().items():
            np.testing.assert_allclose(decode(layer["stats"][key]), value, rtol=1e-6, atol=1e-6)
    assert decode(layers[3]["stats"]["min"]).min() == 0  # the ReLU


def test_json_with_layers_gives_their_values(client, image, expected):
    r = client.post(f"{URL}?layer=input,6,10", content=png(image), headers=PNG)
    assert r.status_code == 200, r.text
    layers = r.json()["layers"]
    with_values = [layer["layer"] for layer in layers if "values" in layer]
    assert with_values == ["input", "6", "10"]
    for key in with_values:
        a = expected[0 if key == "input" else int(key) + 1]
        np.testing.assert_allclose(
            decode(layers[[x["layer"] for x in layers].index(key)]["values"]),
            a.values,
            rtol=1e-6,
            atol=1e-6,
        )


def test_png_of_one_layer_is_its_grid(client, image, expected):
    r = client.post(f"{URL}?layer=2&format=png&tile=24", content=png(image), headers=PNG)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-cnnserve-layers"] == "2"
    picture = Image.open(io.BytesIO(r.content)).convert("RGB")
    grid = activation_sheet(activation_grid(expected, layers="2", tile=24))
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(grid))
    every = client.post(f"{URL}?format=png", content=png(image), headers=PNG)
    assert every.headers["x-cnnserve-layers"] == "input," + ",".join(map(str, range(11)))


def test_other_sizes_and_channels_are_converted_as_in_predict(client, image):
    rgb = np.stack([np.kron(image, np.ones((2, 2), np.uint8))] * 3, axis=-1)  # 16x16 RGB
    body = client.post(URL, content=png(rgb), headers=PNG).json()
    assert body["image_size"] == [16, 16] and body["resized_to"] == [8, 8]
    assert body["layers"][0]["shape"] == [1, 8, 8]


def test_bad_requests_are_422_naming_the_valid_layers(client, image, monkeypatch):
    data = png(image)
    r = client.post(f"{URL}?layer=11", content=data, headers=PNG)
    assert_error(
        r,
        422,
        "invalid_parameter",
        "layer '11' is not a layer of this network; the layers are input, 0 (conv 32 3x3 s1 p0)",
    )
    r = client.post(f"{URL}?layer=relu&format=png", content=data, headers=PNG)
    assert_error(r, 422, "invalid_parameter", "10 (scores)")
    assert_error(
        client.post(f"{URL}?format=svg", content=data, headers=PNG),
        422,
        "invalid_parameter",
        "format",
    )
    assert_error(
        client.post(f"{URL}?tile=1000", content=data, headers=PNG), 422, "invalid_parameter", "tile"
    )
    # The values of 32x6x6 + 32x6x6 maps are more than max_json_cells (2000) in one answer.
    r = client.post(f"{URL}?layer=0,1", content=data, headers=PNG)
    assert_error(
        r, 422, "map_too_large", "the chosen layers hold 2,304 values, more than the 2,000"
    )
    monkeypatch.setattr(heatmap_module, "MAX_PICTURE_PIXELS", 50_000)
    r = client.post(f"{URL}?layer=0&format=png", content=data, headers=PNG)
    assert_error(r, 422, "picture_too_large", "more than 50,000 pixels")
    assert_error(client.post(URL, content=b"not an image", headers=PNG), 400, "invalid_image")
    assert_error(
        client.post("/v1/models/nope/activations", content=data, headers=PNG),
        404,
        "model_not_found",
    )


def test_a_model_without_conv_layers_has_activations_too(client, image):
    r = client.post(
        "/v1/models/flat/activations?layer=0,1&format=json", content=png(image), headers=PNG
    )
    assert r.status_code == 200, r.text
    assert [x["shape"] for x in r.json()["layers"]] == [[1, 8, 8], [6], [3]]


def test_the_route_is_documented(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/models/{name}/activations"]["post"]
    assert {p["name"] for p in post["parameters"]} == {"name", "layer", "format", "tile"}
    assert set(post["responses"]["200"]["content"]) == {"application/json", "image/png"}
