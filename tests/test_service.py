"""The HTTP service through FastAPI's TestClient (inside ``with``, so that the lifespan runs).

Every endpoint, every error status the service promises (400, 404, 405, 413, 415, 422, 503)
and the metrics are checked against the library's own answers: the service must return what
:func:`cnnserve.predict.predict` and :func:`cnnserve.dense.score_map` compute.
"""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cnnserve.convert import load_fully_convolutional, save_fully_convolutional
from cnnserve.data import digits_canvas
from cnnserve.dense import score_map
from cnnserve.predict import predict
from cnnserve.service import Settings, create_app
from cnnserve.service import deps as deps_module
from cnnserve.service.registry import ModelDirectoryError, ModelRegistry, load_one

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode (H, W) or (1, H, W) pixels in [0, 1] (or uint8) as an image file."""
    a = np.asarray(pixels)
    a = a[0] if a.ndim == 3 and a.shape[0] == 1 else a
    if a.dtype != np.uint8:
        a = np.round(a * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    return buf.getvalue()


def decode(encoded: dict) -> np.ndarray:
    dtype = {"float32": "<f4", "int32": "<i4"}[encoded["dtype"]]
    assert encoded["order"] == "C"
    return np.frombuffer(base64.b64decode(encoded["data"]), dtype=dtype).reshape(encoded["shape"])


def test_digit(seed: int) -> tuple[np.ndarray, int]:
    """One held-out test digit, (1, 8, 8) float32, and its label."""
    canvas, placements = digits_canvas((8, 8), 1, seed=seed, margin=0)
    return canvas, placements[0]["label"]


test_digit.__test__ = False  # a helper, not a test


def probabilities(answer: dict) -> np.ndarray:
    """A /predict answer's probabilities as a (10,) array (classes not in its top k: 0)."""
    p = np.zeros(10)
    for ranked in answer["predictions"]:
        p[ranked["index"]] = ranked["probability"]
    return p


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the models did not load in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(MODEL, folder / "digits.safetensors")
    return folder


@pytest.fixture(scope="module")
def fcn():
    return load_fully_convolutional(MODEL)


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(Settings(models=model_dir))) as c:
        wait_ready(c)
        yield c


def make_client(folder: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(models=folder, **settings)))


def assert_error(response, status: int, code: str, text: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    assert text in body["error"]["message"], body
    return body


# ---------------------------------------------------------------------------------------------
# Health, readiness, models
# ---------------------------------------------------------------------------------------------


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.head("/healthz").status_code == client.head("/readyz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready", "models": ["digits"], "failed": {}}


def test_readyz_is_503_until_the_models_are_loaded(model_dir):
    release = threading.Event()

    def slow_loader(path, warmup):
        assert release.wait(30)
        return load_one(path, warmup=warmup)

    registry = ModelRegistry(model_dir, loader=slow_loader)
    with TestClient(create_app(Settings(models=model_dir), registry=registry)) as c:
        assert c.get("/healthz").status_code == 200
        assert_error(c.get("/readyz"), 503, "not_ready", "loading models (0 of 1 done)")
        assert c.get("/readyz").headers["retry-after"] == "1"
        image = png(test_digit(0)[0])
        answer = c.post("/v1/models/digits/predict", content=image, headers=PNG)
        assert_error(answer, 503, "not_ready", "still loading")
        assert_error(c.get("/v1/models"), 503, "not_ready")
        release.set()
        wait_ready(c)
        assert c.post("/v1/models/digits/predict", content=image, headers=PNG).status_code == 200


def test_models_list(client, fcn):
    models = client.get("/v1/models").json()["models"]
    assert models == [
        {
            "name": "digits",
            "version": "1",
            "input_shape": [1, 8, 8],
            "num_classes": 10,
            "classes": [str(k) for k in range(10)],
            "dtype": "float32",
            "geometry": {
                "stride": 2,
                "window": [8, 8],
                "receptive_field": [8, 8],
                "offset": [0, 0],
                "exact": True,
            },
        }
    ]


def test_model_detail(client, fcn):
    d = client.get("/v1/models/digits").json()
    assert d["name"] == "digits" and d["file"] == "digits.safetensors"
    assert d["geometry"] == fcn.geometry.to_dict()
    assert d["training"]["test_acc"] == fcn.training["test_acc"] > 0.99
    assert d["training"]["dataset"] == "digits"
    assert d["self_check"]["passed"] is True
    assert d["architecture"] == fcn.config
    assert d["parameters"] == sum(
        v.size for k, v in fcn.params.items() if not k.startswith("running_")
    )
    assert "(classifier)" in d["summary"] and "total parameters" in d["summary"]
    assert d["converted_summary"] == fcn.summary()
    assert d["normalization"] == fcn.normalization
    converted = [layer["converted_from"] for layer in d["converted_layers"]]
    assert [c for c in converted if c] == ["affine 128", "affine 10"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/nope",
        "/v1/models/digits.safetensors",
        "/v1/models/..%2Fsecret",
        "/v1/models/%2E%2E",
        "/v1/models/DIGITS",
    ],
)
def test_unknown_model_is_404(client, path):
    # "..%2Fsecret" reaches the app as "/v1/models/../secret", which no route matches
    code = "not_found" if "%2F" in path else "model_not_found"
    assert_error(client.get(path), 404, code)
    image = png(test_digit(0)[0])
    assert_error(client.post(f"{path}/predict", content=image, headers=PNG), 404, code)
    if code == "model_not_found":
        assert "served: digits" in client.get(path).json()["error"]["message"]


def test_model_names_never_reach_the_file_system(model_dir, monkeypatch):
    """After start-up, no request opens or loads a file, whatever model name it gives."""
    import builtins
    import os

    from cnnserve.service import registry as registry_module

    shutil.copy(MODEL, model_dir.parent / "secret.safetensors")  # a valid model, next door
    with make_client(model_dir) as c:
        wait_ready(c)
        touched = []

        def spy(name, real):
            def wrapper(*args, **kwargs):
                touched.append((name, args[:1]))
                return real(*args, **kwargs)

            return wrapper

        monkeypatch.setattr(builtins, "open", spy("open", builtins.open))
        monkeypatch.setattr(os, "open", spy("os.open", os.open))
        for name in ("load_one", "load_fully_convolutional"):
            monkeypatch.setattr(registry_module, name, spy(name, getattr(registry_module, name)))
        image = png(test_digit(0)[0])
        names = ["secret", "../secret", "..%2Fsecret", "%2E%2E%2Fsecret", "secret.safetensors",
                 "models%2Fdigits", "%2Ftmp%2Fsecret"]  # fmt: skip
        for name in names:
            assert c.get(f"/v1/models/{name}").status_code == 404
            r = c.post(f"/v1/models/{name}/predict", content=image, headers=PNG)
            assert r.status_code == 404
    assert touched == []


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------

PNG = {"content-type": "image/png"}


@pytest.mark.parametrize("seed", range(6))
def test_predict_matches_the_library_on_held_out_digits(client, fcn, seed):
    digit, label = test_digit(seed)
    data = png(digit)
    expected = predict(fcn, np.asarray(Image.open(io.BytesIO(data))))
    r = client.post("/v1/models/digits/predict?top_k=3", files={"file": ("d.png", data)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "digits"
    assert body["image_size"] == [8, 8] and body["resized_to"] is None
    assert body["predictions"] == expected.top_k(3)
    assert body["predictions"][0]["label"] == str(label)
    assert body["time_ms"] > 0


def test_predict_raw_body_and_formats(client, fcn):
    digit, label = test_digit(1)
    answers = []
    for fmt, media in [("PNG", "image/png"), ("BMP", "image/bmp"), ("TIFF", "image/tiff")]:
        r = client.post(
            "/v1/models/digits/predict", content=png(digit, fmt), headers={"content-type": media}
        )
        assert r.status_code == 200, r.text
        answers.append(r.json()["predictions"])
    assert answers[0] == answers[1] == answers[2]  # lossless formats: the same pixels
    jpeg = png(digit, "JPEG")
    r = client.post(
        "/v1/models/digits/predict", content=jpeg, headers={"content-type": "image/jpeg"}
    )
    assert r.status_code == 200
    assert r.json()["predictions"][0]["label"] == str(label)


def test_predict_top_k_is_clamped_and_sorted(client):
    r = client.post(
        "/v1/models/digits/predict?top_k=50", content=png(test_digit(2)[0]), headers=PNG
    )
    predictions = r.json()["predictions"]
    assert len(predictions) == 10
    assert sorted(p["index"] for p in predictions) == list(range(10))
    probs = [p["probability"] for p in predictions]
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-9)
    r = client.post("/v1/models/digits/predict", content=png(test_digit(2)[0]), headers=PNG)
    assert len(r.json()["predictions"]) == 5  # the default


def test_predict_resizes_other_sizes(client, fcn):
    digit, label = test_digit(3)
    big = np.kron(digit[0], np.ones((4, 4), np.float32))  # 32x32, each pixel a 4x4 block
    data = png(big)
    r = client.post("/v1/models/digits/predict", content=data, headers=PNG)
    body = r.json()
    assert body["image_size"] == [32, 32] and body["resized_to"] == [8, 8]
    expected = predict(fcn, np.asarray(Image.open(io.BytesIO(data))))
    assert body["predictions"] == expected.top_k(5)
    assert body["predictions"][0]["label"] == str(label)


def test_predict_rgb_image_is_converted_to_the_models_channels(client, fcn):
    digit, _ = test_digit(4)
    gray = np.round(digit[0] * 255).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    r_gray = client.post("/v1/models/digits/predict", content=png(gray), headers=PNG)
    r_rgb = client.post("/v1/models/digits/predict", content=png(rgb), headers=PNG)
    assert r_rgb.json()["predictions"] == r_gray.json()["predictions"]


# ---------------------------------------------------------------------------------------------
# scoremap
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canvas():
    return digits_canvas((48, 96), 6, seed=0)


@pytest.mark.parametrize("divisor", [1, 2])
def test_scoremap_json_matches_the_library(client, fcn, canvas, divisor):
    image, _ = canvas
    data = png(image)
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    expected = score_map(fcn, pixels, stride_divisor=divisor)
    r = client.post(
        f"/v1/models/digits/scoremap?stride_divisor={divisor}&top_k=3",
        files={"file": ("canvas.png", data, "image/png")},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    rows, cols = expected.shape
    assert (
        body["map_shape"]
        == [rows, cols]
        == [(48 - 8) * divisor // 2 + 1, (96 - 8) * divisor // 2 + 1]
    )
    assert body["classes"] == [str(k) for k in range(10)]
    g = body["geometry"]
    assert g["stride_divisor"] == divisor and g["cell_stride"] == [2 / divisor, 2 / divisor]
    assert g["image_size"] == [48, 96] and g["window"] == [8, 8] and g["exact"] is True
    logits = decode(body["logits"])
    probabilities = decode(body["probabilities"])
    assert logits.shape == probabilities.shape == (10, rows, cols)
    np.testing.assert_allclose(logits, expected.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    boxes = decode(body["boxes"])
    assert boxes.shape == (rows, cols, 4)
    np.testing.assert_array_equal(boxes, expected.boxes())
    np.testing.assert_array_equal(
        boxes[1, 2], [2 * 2 // divisor, 2 // divisor, 2 * 2 // divisor + 8, 2 // divisor + 8]
    )
    idx, prob = decode(body["cell_top_k"]["indices"]), decode(body["cell_top_k"]["probabilities"])
    assert idx.shape == prob.shape == (3, rows, cols)
    np.testing.assert_array_equal(idx[0], probabilities.argmax(axis=0))
    assert np.all(np.diff(prob, axis=0) <= 0)
    assert body["aggregate"]["top_k_by_mean"] == expected.top_k(3, "mean")
    assert body["aggregate"]["top_k_by_max"] == expected.top_k(3, "max")
    top = expected.top_k(1, "max")[0]["index"]
    assert body["class"] == {"label": str(top), "index": top, "peak": expected.peak(top)}


def test_scoremap_class_by_name_or_index(client, canvas):
    data = png(canvas[0])
    for value in ("7", 7):
        body = client.post(
            f"/v1/models/digits/scoremap?class={value}", content=data, headers=PNG
        ).json()
        assert body["class"]["index"] == 7 and body["class"]["label"] == "7"
        probabilities = decode(body["probabilities"])
        i, j = np.unravel_index(np.argmax(probabilities[7]), probabilities.shape[1:])
        assert (body["class"]["peak"]["row"], body["class"]["peak"]["col"]) == (i, j)
        assert body["class"]["peak"]["box"] == [2.0 * j, 2.0 * i, 2.0 * j + 8, 2.0 * i + 8]


def test_scoremap_png(client, fcn, canvas):
    image, placements = canvas
    data = png(image)
    r = client.post(
        "/v1/models/digits/scoremap?format=png&class=3&stride_divisor=2&zoom=2&alpha=0.7",
        content=data,
        headers=PNG,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-cnnserve-class"] == "3"
    assert r.headers["x-cnnserve-map-shape"] == "41x89"
    assert float(r.headers["x-cnnserve-time-ms"]) > 0
    picture = Image.open(io.BytesIO(r.content))
    assert picture.format == "PNG" and picture.mode == "RGB"
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    result = score_map(fcn, pixels, stride_divisor=2)
    expected = result.heatmap(pixels, 3, alpha=0.7, zoom=2, legend="class '3': probability")
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(expected))
    assert picture.width > 192 + 30 and picture.height > 96 + 15  # label above, bar beside
    # legend=false: the bare heatmap, the image's size times the zoom, to lay over the image.
    bare = client.post(
        r.url.path + "?" + r.url.query.decode() + "&legend=false", content=data, headers=PNG
    )
    picture = Image.open(io.BytesIO(bare.content))
    assert picture.size == (192, 96)
    expected = result.heatmap(pixels, 3, alpha=0.7, zoom=2)
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(expected))
    other = client.post("/v1/models/digits/scoremap?format=png&class=4", content=data, headers=PNG)
    assert other.content != r.content


# ---------------------------------------------------------------------------------------------
# Errors: each status the service promises, always JSON, never a 500
# ---------------------------------------------------------------------------------------------


def truncated_png() -> bytes:
    return png(np.zeros((16, 16), np.uint8))[:40]


def multipart(body_parts: list[tuple[str, str, bytes, str | None]]) -> tuple[bytes, str]:
    boundary = "cnnserve-test-boundary"
    out = b""
    for name, filename, data, media in body_parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if media:
            out += f"Content-Type: {media}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("endpoint", ["predict", "scoremap"])
@pytest.mark.parametrize(
    ("body", "media", "status", "code", "text"),
    [
        (
            b"definitely not an image",
            "image/png",
            400,
            "invalid_image",
            "cannot be decoded as an image",
        ),
        (truncated_png(), "image/png", 400, "invalid_image", "cannot be decoded"),
        (b"", "image/png", 400, "invalid_image", "empty"),
        (b"\x89PNG", "image/avif", 415, "unsupported_media_type", "image/avif"),
        (b"abc", "text/plain", 415, "unsupported_media_type", "text/plain is not accepted"),
        (b"abc", "application/octet-stream", 415, "unsupported_media_type", "multipart/form-data"),
        (b"abc", "", 415, "unsupported_media_type", "missing"),
        (b"--x\r\nbroken", "multipart/form-data", 400, "invalid_multipart", "multipart"),
    ],
)
def test_bad_bodies(client, endpoint, body, media, status, code, text):
    headers = {"content-type": media} if media else {}
    r = client.post(f"/v1/models/digits/{endpoint}", content=body, headers=headers)
    assert_error(r, status, code, text)


@pytest.mark.parametrize("endpoint", ["predict", "scoremap"])
def test_bad_multipart_forms(client, endpoint):
    url = f"/v1/models/digits/{endpoint}"
    image = png(np.zeros((8, 8), np.uint8))
    body, media = multipart([("image", "d.png", image, "image/png")])
    assert_error(
        client.post(url, content=body, headers={"content-type": media}),
        400,
        "missing_file",
        "'file'",
    )
    body, media = multipart([("file", "", b"not a file", None)])  # a plain field, not a file
    assert_error(
        client.post(url, content=body, headers={"content-type": media}), 400, "missing_file"
    )
    body, media = multipart([("file", "d.avif", image, "image/avif")])
    r = client.post(url, content=body, headers={"content-type": media})
    assert_error(r, 415, "unsupported_media_type", "the uploaded file is image/avif")
    body, media = multipart(
        [("file", "a.png", image, "image/png"), ("file", "b.png", image, "image/png")]
    )
    assert_error(
        client.post(url, content=body, headers={"content-type": media}),
        400,
        "invalid_multipart",
        "files",
    )
    body, media = multipart([("file", "notes.txt", b"hello", "text/plain")])
    r = client.post(url, content=body, headers={"content-type": media})
    assert_error(r, 400, "invalid_image", "cannot be decoded")
    body, media = multipart([("file", "d.png", image, None)])  # no part type: decoded by content
    assert client.post(url, content=body, headers={"content-type": media}).status_code == 200


@pytest.mark.parametrize(
    ("query", "text"),
    [
        ("top_k=0", "top_k: Input should be greater than or equal to 1"),
        ("top_k=-3", "top_k"),
        ("top_k=abc", "top_k: Input should be a valid integer"),
        ("top_k=2.5", "top_k"),
        ("stride_divisor=3", "stride_divisor must divide the network's total stride 2, got 3"),
        ("stride_divisor=0", "stride_divisor: Input should be greater than or equal to 1"),
        ("stride_divisor=4", "must divide"),
        ("format=gif", "format: Input should be 'json' or 'png'"),
        ("class=eleven", "class 'eleven' is neither a class name nor an index in [0, 10)"),
        ("class=10", "neither a class name nor an index"),
        ("class=-1", "neither a class name nor an index"),
        ("alpha=2", "alpha: Input should be less than or equal to 1"),
        ("alpha=nan", "alpha"),
        ("zoom=0", "zoom: Input should be greater than or equal to 1"),
        ("zoom=65", "zoom"),
    ],
)
def test_bad_scoremap_parameters_are_422(client, canvas, query, text):
    r = client.post(f"/v1/models/digits/scoremap?{query}", content=png(canvas[0]), headers=PNG)
    assert_error(r, 422, "invalid_parameter", text)


def test_bad_predict_parameters_are_422(client):
    r = client.post("/v1/models/digits/predict?top_k=0", content=png(test_digit(0)[0]), headers=PNG)
    assert_error(r, 422, "invalid_parameter", "top_k")


def test_scoremap_image_smaller_than_the_window_is_422(client):
    for shape in [(7, 20), (20, 7), (1, 1)]:
        r = client.post(
            "/v1/models/digits/scoremap", content=png(np.zeros(shape, np.uint8)), headers=PNG
        )
        assert_error(
            r, 422, "image_too_small", f"the image is {shape[0]}x{shape[1]} pixels, smaller"
        )
    # /predict resizes any size to the training size instead
    r = client.post(
        "/v1/models/digits/predict", content=png(np.zeros((1, 1), np.uint8)), headers=PNG
    )
    assert r.status_code == 200 and r.json()["resized_to"] == [8, 8]


def test_zoom_beyond_the_picture_limit_is_422(model_dir):
    with make_client(model_dir, max_pixels=2**30, max_body_bytes=2**26) as c:
        wait_ready(c)
        big = png(np.zeros((2048, 4096), np.uint8))
        r = c.post("/v1/models/digits/scoremap?format=png&zoom=8", content=big, headers=PNG)
        assert_error(r, 422, "invalid_parameter", "zoom 8 would make a 16384x32768 (HxW) picture")


def test_zoom_limit_is_the_clis(client):
    from cnnserve.heatmap import MAX_ZOOM

    url = "/v1/models/digits/scoremap?format=png&zoom="
    image = png(np.zeros((8, 8), np.uint8))
    assert client.post(url + str(MAX_ZOOM), content=image, headers=PNG).status_code == 200
    r = client.post(url + str(MAX_ZOOM + 1), content=image, headers=PNG)
    assert_error(r, 422, "invalid_parameter", f"less than or equal to {MAX_ZOOM}")


def test_unknown_routes_and_methods(client):
    assert_error(client.get("/v3/anything"), 404, "not_found", "no such endpoint: GET /v3/anything")
    assert_error(
        client.get("/v1/models/digits/predict"), 405, "method_not_allowed", "GET is not allowed"
    )
    assert_error(client.delete("/v1/models/digits"), 405, "method_not_allowed")


def test_body_over_the_byte_limit_is_413(model_dir):
    with make_client(model_dir, max_body_bytes=1000) as c:
        wait_ready(c)
        small = png(test_digit(0)[0])
        assert len(small) < 1000
        assert c.post("/v1/models/digits/predict", content=small, headers=PNG).status_code == 200
        noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
        big = png(noise)
        assert len(big) > 1000
        for endpoint in ("predict", "scoremap"):
            url = f"/v1/models/digits/{endpoint}"
            r = c.post(url, content=big, headers=PNG)
            assert_error(r, 413, "payload_too_large", "larger than the limit of 1,000 bytes")
            # without a Content-Length (chunked): refused while it streams in
            r = c.post(url, content=iter([big[:600], big[600:]]), headers=PNG)
            assert_error(r, 413, "payload_too_large")
            r = c.post(url, files={"file": ("big.png", big, "image/png")})
            assert_error(r, 413, "payload_too_large")
        r = c.post(
            "/v1/models/digits/predict", content=small, headers={**PNG, "content-length": "12x"}
        )
        assert r.status_code == 400


def test_image_over_the_pixel_limit_is_413(model_dir):
    with make_client(model_dir, max_pixels=400) as c:
        wait_ready(c)
        ok = png(np.zeros((20, 20), np.uint8))
        assert c.post("/v1/models/digits/scoremap", content=ok, headers=PNG).status_code == 200
        r = c.post(
            "/v1/models/digits/scoremap", content=png(np.zeros((20, 21), np.uint8)), headers=PNG
        )
        assert_error(
            r, 413, "image_too_large", "20x21 (HxW) = 420 pixels, more than the limit of 400"
        )
        r = c.post(
            "/v1/models/digits/predict", content=png(np.zeros((21, 20), np.uint8)), headers=PNG
        )
        assert_error(r, 413, "image_too_large")


def test_decompression_bomb_is_413_before_decoding(client):
    bomb = png(np.zeros((12000, 12000), np.uint8))  # 144 Mpx, under 200 KB of PNG
    assert len(bomb) < 300_000
    r = client.post("/v1/models/digits/scoremap", content=bomb, headers=PNG)
    assert_error(r, 413, "image_too_large", "12000x12000 (HxW) = 144,000,000 pixels")
    huge = io.BytesIO()
    Image.new("1", (30000, 30000)).save(huge, "PNG")  # above Pillow's own bomb limit too
    r = client.post("/v1/models/digits/predict", content=huge.getvalue(), headers=PNG)
    assert_error(r, 413, "image_too_large")


def test_busy_slots_give_503_after_the_queue_timeout(model_dir, monkeypatch):
    image = png(test_digit(0)[0])
    url = "/v1/models/digits/predict"
    with make_client(model_dir, max_concurrency=1, queue_timeout=0.2) as c:
        wait_ready(c)
        with one_predict_held(c, monkeypatch, image):
            started = time.monotonic()
            r = c.post(url, content=image, headers=PNG)
            waited = time.monotonic() - started
            assert_error(r, 503, "busy", "all 1 predict slots stayed busy for 0.2 s")
            assert r.headers["retry-after"] == "1"
            assert waited >= 0.2
            # score maps have their own lane: a held classification does not hold them up
            r = c.post("/v1/models/digits/scoremap", content=png(np.zeros((8, 8))), headers=PNG)
            assert r.status_code == 200
        # the slot is free again
        assert c.post(url, content=image, headers=PNG).status_code == 200
        text = c.get("/metrics").text
    assert metric(text, "cnnserve_inferences_rejected_total", endpoint="predict") == 1
    assert metric(text, "cnnserve_inferences_in_progress", endpoint="predict") == 0
    assert metric(text, "cnnserve_inferences_waiting", endpoint="predict") == 0


def test_random_bodies_never_give_a_500(client):
    rng = np.random.default_rng(1)
    good = png(test_digit(0)[0])
    for trial in range(40):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 8))):  # corrupt a few bytes, or cut the file
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if trial % 3 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        for endpoint in ("predict", "scoremap"):
            r = client.post(f"/v1/models/digits/{endpoint}", content=bytes(data), headers=PNG)
            assert r.status_code in (200, 400), r.text
            assert r.headers["content-type"] in ("application/json", "image/png")


# ---------------------------------------------------------------------------------------------
# Metrics, docs, web page, settings, start-up
# ---------------------------------------------------------------------------------------------


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no sample {name} {labels} in the metrics")


def test_metrics_count_requests_latency_inference_and_images(model_dir):
    with make_client(model_dir) as c:
        wait_ready(c)
        image = png(test_digit(0)[0])
        for _ in range(3):
            assert (
                c.post("/v1/models/digits/predict", content=image, headers=PNG).status_code == 200
            )
        c.post("/v1/models/digits/scoremap", content=png(np.zeros((16, 24), np.uint8)), headers=PNG)
        c.post("/v1/models/digits/predict?top_k=0", content=image, headers=PNG)
        c.get("/nowhere")
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    route = "/v1/models/{name}/predict"
    assert (
        metric(text, "cnnserve_http_requests_total", method="POST", route=route, status="200") == 3
    )
    assert (
        metric(text, "cnnserve_http_requests_total", method="POST", route=route, status="422") == 1
    )
    assert metric(text, "cnnserve_http_requests_total", route="unmatched", status="404") == 1
    assert (
        metric(text, "cnnserve_http_request_duration_seconds_count", method="POST", route=route)
        == 4
    )
    assert (
        metric(
            text, "cnnserve_inference_duration_seconds_count", model="digits", endpoint="predict"
        )
        == 3
    )
    assert metric(text, "cnnserve_images_processed_total", model="digits", endpoint="predict") == 3
    assert metric(text, "cnnserve_images_processed_total", model="digits", endpoint="scoremap") == 1
    assert (
        metric(text, "cnnserve_image_pixels_processed_total", model="digits", endpoint="scoremap")
        == 16 * 24
    )
    assert metric(text, "cnnserve_models_loaded") == 1
    assert metric(text, "cnnserve_inferences_in_progress") == 0


def test_openapi_documents_every_request_and_response(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {
        "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/models/{name}",
        "/v1/models/{name}/predict", "/v1/models/{name}/scoremap",
    }  # fmt: skip
    for endpoint in ("predict", "scoremap", "detect", "activations"):
        op = paths[f"/v1/models/{{name}}/{endpoint}"]["post"]
        assert set(op["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
        for status in ("400", "404", "413", "415", "422", "503"):
            schema = op["responses"][status]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ErrorResponse")
    predict_ok = paths["/v1/models/{name}/predict"]["post"]["responses"]["200"]
    assert predict_ok["content"]["application/json"]["schema"]["$ref"].endswith("/PredictResponse")
    scoremap_ok = paths["/v1/models/{name}/scoremap"]["post"]["responses"]["200"]["content"]
    assert set(scoremap_ok) == {"application/json", "image/png"}
    params = {p["name"] for p in paths["/v1/models/{name}/scoremap"]["post"]["parameters"]}
    assert params == {
        "name", "stride_divisor", "top_k", "format", "class", "alpha", "zoom", "legend", "arrays",
        "scales", "detections", "threshold", "nms_iou",
    }  # fmt: skip
    detect = paths["/v1/models/{name}/detect"]["post"]
    assert {p["name"] for p in detect["parameters"]} == {
        "name", "class", "scales", "threshold", "nms_iou", "stride_divisor",
    }  # fmt: skip
    detect_ok = detect["responses"]["200"]["content"]["application/json"]["schema"]
    assert detect_ok["$ref"].endswith("/DetectResponse")
    for path in ("/v1/models", "/v1/models/{name}"):  # lookups: 404, 503, and 422 for an
        # unknown query parameter (as on every route)
        assert set(paths[path]["get"]["responses"]) == {"200", "404", "422", "503"}
        error = paths[path]["get"]["responses"]["422"]["content"]["application/json"]["schema"]
        assert error["$ref"].endswith("/ErrorResponse")
    schemas = spec["components"]["schemas"]
    assert "class" in schemas["ScoreMapResponse"]["properties"]
    assert client.get("/docs").status_code == 200


def test_web_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in r.text  # relative: works behind a path prefix too
    assert client.get("/static/app.js").status_code == 200
    assert_error(client.get("/static/..%2F..%2Fsettings.py"), 404, "not_found")
    assert_error(client.get("/static/..%2Fapp.py"), 404, "not_found")
    assert client.head("/").status_code == 200


def test_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNSERVE_MODELS", str(tmp_path))
    monkeypatch.setenv("CNNSERVE_MAX_BODY_BYTES", "1234")
    monkeypatch.setenv("CNNSERVE_QUEUE_TIMEOUT", "0.5")
    s = Settings()
    assert (s.models, s.max_body_bytes, s.queue_timeout) == (tmp_path, 1234, 0.5)
    monkeypatch.setenv("CNNSERVE_MAX_PIXELS", "0")
    with pytest.raises(ValueError, match="max_pixels"):
        Settings()


def test_a_missing_or_empty_model_directory_stops_the_start(tmp_path):
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        with make_client(tmp_path / "nope"):
            pass
    with pytest.raises(ModelDirectoryError, match=r"holds no \*.safetensors model file"):
        with make_client(tmp_path):
            pass


def test_training_checkpoints_are_never_served(tmp_path):
    shutil.copy(MODEL, tmp_path / "digits_checkpoint.safetensors")
    with pytest.raises(
        ModelDirectoryError,
        match=r"holds no \*.safetensors model file .* other than training checkpoints, which are never served",
    ):
        ModelRegistry(tmp_path).discover()
    shutil.copy(MODEL, tmp_path / "digits.safetensors")
    shutil.copy(MODEL, tmp_path / "run_checkpoint_3.safetensors")
    assert ModelRegistry(tmp_path).discover() == [tmp_path / "digits.safetensors"]


def test_bad_model_files_are_skipped_and_reported(model_dir, tmp_path, fcn):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(MODEL, folder / "digits.safetensors")
    (folder / "broken.safetensors").write_bytes(MODEL.read_bytes()[:1000])
    (folder / "notes.txt").write_text("not a model")  # not a model file: ignored
    (folder / "-bad name.safetensors").write_bytes(MODEL.read_bytes())
    save_fully_convolutional(fcn, folder / "digits_fcn.safetensors")  # converted files load too
    with make_client(folder) as c:  # by default, a failed model means not ready
        assert c.app.state.service.registry.wait(60)
        body = assert_error(c.get("/readyz"), 503, "not_ready", "2 model file(s) failed to load")
        assert "--allow-failed" in body["error"]["message"]
        assert "broken.safetensors" in body["error"]["message"]
        v2 = c.get("/v2/health/ready")  # the Open Inference Protocol's readiness too
        assert v2.status_code == 503 and v2.json() == {"error": body["error"]["message"]}
    with make_client(folder, allow_failed=True) as c:
        wait_ready(c)
        assert c.get("/v2/health/ready").json() == {"ready": True}
        ready = c.get("/readyz").json()
        assert ready["models"] == ["digits", "digits_fcn"]
        assert set(ready["failed"]) == {"broken", "-bad name"}
        assert "not a readable safetensors file" in ready["failed"]["broken"]
        assert all(str(folder) not in reason for reason in ready["failed"].values())
        assert "rename the file" in ready["failed"]["-bad name"]
        image = png(test_digit(5)[0])
        a = c.post("/v1/models/digits/predict", content=image, headers=PNG).json()
        b = c.post("/v1/models/digits_fcn/predict", content=image, headers=PNG).json()
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert c.get("/v1/models/digits_fcn").json()["summary"].count("(classifier)") == 1
        assert_error(c.get("/v1/models/broken"), 404, "model_not_found")


def test_no_loadable_model_keeps_readyz_503(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 100)
    with make_client(tmp_path) as c:
        app = c.app
        assert not app.state.service.registry.wait(30)
        body = assert_error(
            c.get("/readyz"),
            503,
            "not_ready",
            "no model could be loaded: model file broken.safetensors",
        )
        assert str(tmp_path) not in body["error"]["message"]  # the name only, not where it is
        assert c.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------
# Found in review: bounded maps, JSON off the event loop, cancelled and departed clients
# ---------------------------------------------------------------------------------------------


def test_maps_over_the_cell_limits_are_422(model_dir):
    with make_client(model_dir, max_map_cells=1000, max_json_cells=100) as c:
        wait_ready(c)
        url = "/v1/models/digits/scoremap"
        image = png(np.zeros((26, 26), np.uint8))  # a 10x10 map at stride 2, 19x19 at stride 1
        body = c.post(url, content=image, headers=PNG).json()
        assert body["map_shape"] == [10, 10] and decode(body["logits"]).shape == (10, 10, 10)
        r = c.post(f"{url}?stride_divisor=2", content=image, headers=PNG)
        assert_error(r, 422, "map_too_large", "a 19x19 map has 361 cells, more than the 100")
        slim = c.post(f"{url}?stride_divisor=2&arrays=false", content=image, headers=PNG).json()
        assert slim["map_shape"] == [19, 19]
        assert {"logits", "probabilities", "boxes", "cell_top_k"}.isdisjoint(slim)
        assert slim["class"]["peak"]["box"] and slim["aggregate"]["top_k_by_max"]
        r = c.post(f"{url}?stride_divisor=2&format=png", content=image, headers=PNG)
        assert r.status_code == 200  # a picture has no per-cell arrays
        big = png(np.zeros((80, 80), np.uint8))  # 37x37 = 1369 cells
        for query in ("", "?format=png", "?arrays=false"):
            r = c.post(f"{url}{query}", content=big, headers=PNG)
            assert_error(r, 422, "map_too_large", "1,369 cells, more than the limit of 1,000")


def test_scoremap_json_follows_its_schema(client, canvas):
    from cnnserve.service.schemas import ScoreMapResponse

    for query in ("", "?arrays=false&top_k=2"):
        r = client.post(f"/v1/models/digits/scoremap{query}", content=png(canvas[0]), headers=PNG)
        assert r.headers["content-type"] == "application/json"
        parsed = ScoreMapResponse.model_validate(r.json())
        assert parsed.map_shape == [21, 45] and (parsed.logits is None) == bool(query)


TIFF = {"content-type": "image/tiff"}


def test_float_image_with_nan_is_400(client):
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), np.nan, np.float32), "F").save(buf, "TIFF")
    for endpoint in ("predict", "scoremap", "scoremap?format=png"):
        r = client.post(f"/v1/models/digits/{endpoint}", content=buf.getvalue(), headers=TIFF)
        assert_error(r, 400, "invalid_image", "NaN or infinite pixel values")


def test_png_class_header_of_a_non_latin_label(tmp_path):
    import urllib.parse

    named = load_fully_convolutional(MODEL)
    named.class_names = ("ноль", "один", "два", "три", "четыре", "пять", "шесть", "семь",
                         "восемь", "девять")  # fmt: skip
    save_fully_convolutional(named, tmp_path / "ru.safetensors")
    with make_client(tmp_path) as c:
        wait_ready(c)
        url = "/v1/models/ru/scoremap?format=png&class=три"
        r = c.post(url, content=png(np.zeros((8, 8))), headers=PNG)
        assert r.status_code == 200
        assert urllib.parse.unquote(r.headers["x-cnnserve-class"]) == "три"
        assert r.headers["x-cnnserve-class-index"] == "3"


@contextlib.contextmanager
def one_predict_held(client: TestClient, monkeypatch, image: bytes) -> Iterator[list]:
    """A /predict whose inference waits, in a thread, for the block to end; yields the list of
    inferences started (the held one first), then checks that the held one answered 200."""
    entered, release = threading.Event(), threading.Event()
    real = deps_module.class_scores
    calls: list = []

    def held(*args, **kwargs):
        calls.append(1)
        entered.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(deps_module, "class_scores", held)
    first: dict = {}
    url = "/v1/models/digits/predict"
    thread = threading.Thread(
        target=lambda: first.update(r=client.post(url, content=image, headers=PNG))
    )
    thread.start()
    assert entered.wait(30)
    try:
        yield calls
    finally:
        release.set()
        thread.join(30)
    assert first["r"].status_code == 200


def test_arrivals_beyond_running_and_waiting_are_refused_at_once(model_dir, monkeypatch):
    image = png(test_digit(0)[0])
    with make_client(model_dir, max_concurrency=1, max_waiting=0, queue_timeout=20) as c:
        wait_ready(c)
        with one_predict_held(c, monkeypatch, image):
            started = time.monotonic()
            r = c.post("/v1/models/digits/predict", content=image, headers=PNG)
            assert time.monotonic() - started < 5  # not after the 20 s queue timeout
            assert_error(r, 503, "busy", "1 predict inferences are running and 0 waiting")


def test_a_cancelled_request_keeps_its_slot_until_its_thread_is_done(model_dir):
    import asyncio

    entered, release = threading.Event(), threading.Event()

    def blocking_work():
        entered.set()
        assert release.wait(30)
        return "done"

    class StillThere:
        async def is_disconnected(self):
            return False

    with make_client(model_dir, max_concurrency=1) as c:
        wait_ready(c)
        service = c.app.state.service
        model = service.registry.models["digits"]
        lane = service.lanes["predict"]

        async def scenario():
            task = asyncio.create_task(lane.run(StillThere(), model, blocking_work))
            assert await asyncio.to_thread(entered.wait, 30)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            held_after_cancel = lane.slots.locked()
            release.set()
            for _ in range(500):
                if not lane.slots.locked():
                    break
                await asyncio.sleep(0.01)
            return held_after_cancel, lane.slots.locked()

        assert c.portal.call(scenario) == (True, False)
        assert metric(c.get("/metrics").text, "cnnserve_inferences_in_progress") == 0


def call_asgi(client: TestClient, method: str, path: str, messages: list[dict]) -> list[dict]:
    """One request straight through the app, receiving ``messages`` then a disconnect."""
    sent: list[dict] = []
    queue = list(messages)

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    path, _, query = path.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
        "root_path": "", "headers": [(b"content-type", b"image/png")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    client.portal.call(client.app, scope, receive, send)
    return sent


def test_a_client_that_leaves_mid_upload_is_a_499_not_a_500(model_dir, caplog):
    with make_client(model_dir) as c:
        wait_ready(c)
        body = png(test_digit(0)[0])
        partial = [{"type": "http.request", "body": body[:20], "more_body": True}]
        sent = call_asgi(c, "POST", "/v1/models/digits/predict", partial)  # then it leaves
        assert sent[0]["status"] == 499
        text = c.get("/metrics").text
    assert metric(text, "cnnserve_http_requests_total", status="499") == 1
    assert 'status="500"' not in text
    assert "unexpected error" not in caplog.text


def test_a_request_whose_client_left_while_it_waited_does_not_run(model_dir, monkeypatch):
    body = png(test_digit(0)[0])
    with make_client(model_dir, max_concurrency=1, queue_timeout=20) as c:
        wait_ready(c)
        with one_predict_held(c, monkeypatch, body) as calls:
            # the second request's body arrives whole, then its client leaves while it waits
            whole = [{"type": "http.request", "body": body, "more_body": False}]
            second: dict = {}
            waiter = threading.Thread(
                target=lambda: second.update(
                    sent=call_asgi(c, "POST", "/v1/models/digits/predict", whole)
                )
            )
            waiter.start()
            # noticed while the slot is still busy: the connection is watched as it waits
            waiter.join(30)
            assert second["sent"][0]["status"] == 499
            assert metric(c.get("/metrics").text, "cnnserve_inferences_waiting") == 0
        assert len(calls) == 1  # the second one never ran


def test_metrics_labels_stay_bounded(client):
    client.request("FOO", "/healthz")
    client.request("BAR", "/healthz")
    client.get("/static/app.js")
    client.get("/docs")
    text = client.get("/metrics").text
    assert 'method="FOO"' not in text and 'method="BAR"' not in text
    assert metric(text, "cnnserve_http_requests_total", method="other", route="/healthz") == 2
    assert metric(text, "cnnserve_http_requests_total", route="/static", status="200") >= 1
    assert metric(text, "cnnserve_http_requests_total", route="/docs", status="200") >= 1


@pytest.mark.parametrize("value", [" 3", "0_3", "\u0663", "3.0", "+3"])
def test_class_indices_are_plain_digits(client, canvas, value):
    url = "/v1/models/digits/scoremap"
    r = client.post(url, params={"class": value}, content=png(canvas[0]), headers=PNG)
    assert_error(r, 422, "invalid_parameter", "neither a class name nor an index")


def test_warm_up_decodes_an_image(model_dir, monkeypatch):
    """Pillow loads its plugins at the first decode: the warm-up pays that, not a user."""
    from cnnserve.service import registry as registry_module

    decoded = []
    real = registry_module.read_image
    monkeypatch.setattr(
        registry_module, "read_image", lambda *a, **k: decoded.append(1) or real(*a, **k)
    )
    with make_client(model_dir) as c:
        wait_ready(c)
    assert decoded == [1]
    loaded = registry_module.load_one(model_dir / "digits.safetensors", warmup=False)
    assert decoded == [1] and loaded.name == "digits"


def test_a_detectors_default_class_is_not_background(tmp_path):
    detector = MODEL.parent / "digits_detector.safetensors"
    shutil.copy(detector, tmp_path)
    canvas, placements = digits_canvas((48, 96), 6, seed=0)
    with make_client(tmp_path) as c:
        wait_ready(c)
        url = "/v1/models/digits_detector/scoremap"
        body = c.post(url, content=png(canvas), headers=PNG).json()
        assert body["aggregate"]["top_k_by_max"][0]["label"] == "background"
        assert body["class"]["label"] != "background"
        assert int(body["class"]["label"]) in {p["label"] for p in placements}
        blank = c.post(url, content=png(np.zeros((16, 16))), headers=PNG).json()
        assert blank["class"]["label"] != "background"  # even where nothing else is likely


@pytest.mark.parametrize(
    ("path", "asset"), [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")]
)
def test_api_docs_are_served_with_their_assets(client, path, asset):
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'src="/docs-assets/{asset}"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no web fonts
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = client.get(f"/docs-assets/{asset}")
    assert script.status_code == 200 and len(script.content) > 100_000
