"""Detections over HTTP (``/detect``, ``/scoremap?scales=...&detections=true``), the scales'
limits, unknown query parameters on every route, and WebP uploads.

The service must return what :func:`cnnserve.dense.score_map` and ``detections()`` compute on
the same pixels.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image

from cnnserve.boxes import BOX_COLOUR
from cnnserve.convert import load_fully_convolutional
from cnnserve.dense import score_map
from cnnserve.images import read_image
from cnnserve.service import Settings, create_app
from cnnserve.service.schemas import DetectResponse, ScoreMapResponse

ROOT = Path(__file__).resolve().parents[1]
DETECTOR = ROOT / "models" / "digits_detector.safetensors"
CANVAS = ROOT / "models" / "digits_demo" / "canvas.png"  # 48 x 96, six held-out digits
PNG = {"content-type": "image/png"}
URL = "/v1/models/digits_detector"


def assert_error(response, status: int, code: str, text: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert text in body["error"]["message"], body
    return body


def wait_ready(client: TestClient) -> None:
    import time

    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(DETECTOR, folder / "digits_detector.safetensors")
    return folder


def make_client(folder: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(models=folder, **settings)))


@pytest.fixture(scope="module")
def client(model_dir):
    with make_client(model_dir) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def fcn():
    return load_fully_convolutional(DETECTOR)


@pytest.fixture(scope="module")
def canvas() -> bytes:
    return CANVAS.read_bytes()


def library(fcn, data: bytes, scales, cls, threshold=0.5, nms_iou=0.3, divisor=1):
    result = score_map(fcn, read_image(data, 1), scales=scales, stride_divisor=divisor)
    return result, [d.to_dict() for d in result.detections(cls, threshold, nms_iou)]


def same_detections(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["score"] == pytest.approx(w["score"], abs=1e-6)
        assert {**g, "score": 0} == {**w, "score": 0}


# ---------------------------------------------------------------------------------------------
# /detect and /scoremap against the library
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "scales", "cls", "threshold", "nms_iou", "divisor"),
    [
        ("class=3", [1.0], "3", 0.5, 0.3, 1),
        (
            "class=2&scales=1,0.75&threshold=0.6&nms_iou=0.1&stride_divisor=2",
            [1, 0.75],
            "2",
            0.6,
            0.1,
            2,
        ),  # fmt: skip
        ("scales=1.25,1", [1.25, 1.0], None, 0.5, 0.3, 1),
    ],
)
def test_detect_matches_the_library(client, fcn, canvas, query, scales, cls, threshold, nms_iou,
                                    divisor):  # fmt: skip
    r = client.post(f"{URL}/detect?{query}", content=canvas, headers=PNG)
    assert r.status_code == 200, r.text
    body = r.json()
    DetectResponse.model_validate(body)
    result, want = library(fcn, canvas, scales, cls, threshold, nms_iou, divisor)
    same_detections(body["detections"], want)
    assert want, "the canvas's digits are found"
    assert body["scales"] == [float(s) for s in scales]
    assert body["image"] == {"height": 48, "width": 96}
    assert (body["threshold"], body["nms_iou"]) == (threshold, nms_iou)
    assert body["class"]["label"] == want[0]["class"] != "background"
    assert body["model"] == "digits_detector" and body["version"] == "1"


def test_detect_with_nothing_to_find(client):
    blank = io.BytesIO()
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(blank, "PNG")
    r = client.post(f"{URL}/detect?class=3", content=blank.getvalue(), headers=PNG)
    assert r.status_code == 200 and r.json()["detections"] == []


def test_scoremap_scales_and_detections_json(client, fcn, canvas):
    r = client.post(
        f"{URL}/scoremap?class=7&scales=1,0.75&detections=true&arrays=false",
        content=canvas,
        headers=PNG,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ScoreMapResponse.model_validate(body)
    result, want = library(fcn, canvas, [1, 0.75], "7")
    same_detections(body["detections"], want)
    assert body["scales"] == [1.0, 0.75] and body["threshold"] == 0.5
    # The map fields describe the scale where "7" is most likely: the best detection's.
    assert body["scale"] == want[0]["scale"]
    shown = next(m for m in result.maps if m.scale == body["scale"])
    assert body["map_shape"] == list(shown.shape)
    assert body["class"]["peak"]["probability"] == pytest.approx(want[0]["score"], abs=1e-6)
    for name, value in result.aggregate_dict(5)["max"].items():  # over both scales
        assert body["aggregate"]["max"][name] == pytest.approx(value, abs=1e-6)
    plain = client.post(f"{URL}/scoremap?arrays=false", content=canvas, headers=PNG).json()
    assert plain["scales"] == [1.0] and plain["scale"] == 1.0
    assert "detections" not in plain and "threshold" not in plain


def test_scoremap_png_draws_the_boxes(client, fcn, canvas):
    query = "class=3&scales=1,0.75&legend=false&alpha=0"
    bare = client.post(f"{URL}/scoremap?format=png&{query}", content=canvas, headers=PNG)
    boxed = client.post(
        f"{URL}/scoremap?format=png&detections=true&{query}", content=canvas, headers=PNG
    )
    assert bare.status_code == boxed.status_code == 200
    assert "X-Cnnserve-Detections" not in bare.headers
    _, want = library(fcn, canvas, [1, 0.75], "3")
    assert boxed.headers["X-Cnnserve-Detections"] == str(len(want))
    assert boxed.headers["X-Cnnserve-Scale"] == f"{want[0]['scale']:g}"
    a = np.asarray(Image.open(io.BytesIO(bare.content)).convert("RGB"))
    b = np.asarray(Image.open(io.BytesIO(boxed.content)).convert("RGB"))
    assert a.shape == b.shape == (48, 96, 3)
    assert not (a == BOX_COLOUR).all(axis=2).any()
    x0, y0, x1, y1 = (int(round(v)) for v in want[0]["box"])
    # the box's bottom edge (the label's tab covers part of the top)
    bottom = b[min(y1, 48) - 1, x0 : x1 - 1]
    assert (bottom == BOX_COLOUR).all(), bottom
    legend = client.post(
        f"{URL}/scoremap?format=png&detections=true&class=3&scales=1,0.75",
        content=canvas,
        headers=PNG,
    )
    assert Image.open(io.BytesIO(legend.content)).size[0] > 96  # the colour bar beside it


# ---------------------------------------------------------------------------------------------
# Bad parameters and limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["detect", "scoremap"])
@pytest.mark.parametrize(
    ("query", "text"),
    [
        ("scales=0", "scales must be comma-separated numbers in (0, 64]"),
        ("scales=-1", "'-1' is not one"),
        ("scales=abc", "'abc' is not one"),
        ("scales=", "scales must be"),
        ("scales=1,,2", "'' is not one"),
        ("scales=nan", "'nan' is not one"),
        ("scales=inf", "'inf' is not one"),
        ("scales=65", "'65' is not one"),
        ("scales=" + ",".join(["1"] * 17), "17 factors, more than 16"),
        ("threshold=1.5", "threshold: Input should be less than or equal to 1"),
        ("threshold=-0.1", "threshold"),
        ("nms_iou=2", "nms_iou: Input should be less than or equal to 1"),
        ("class=cat", "class 'cat' is neither a class name nor an index"),
        ("stride_divisor=3", "stride_divisor must divide"),
    ],
)
def test_bad_detection_parameters_are_422(client, canvas, endpoint, query, text):
    r = client.post(f"{URL}/{endpoint}?{query}", content=canvas, headers=PNG)
    assert_error(r, 422, "invalid_parameter", text)


@pytest.mark.parametrize("endpoint", ["detect", "scoremap", "scoremap?format=png"])
def test_scales_limits_are_422_before_any_work(model_dir, canvas, endpoint, monkeypatch):
    import cnnserve.service.routes.detect as routes

    def never(*args, **kwargs):
        raise AssertionError("a map was computed")

    monkeypatch.setattr(routes, "dense_score_map", never)
    join = "&" if "?" in endpoint else "?"
    # 48 x 96 at stride 2: 21 x 45 = 945 cells; at 0.5 (24 x 48): 9 x 21 = 189.
    with make_client(model_dir, max_map_cells=1000, max_pixels=6000) as c:
        wait_ready(c)
        r = c.post(f"{URL}/{endpoint}{join}scales=1,0.5", content=canvas, headers=PNG)
        assert_error(r, 422, "map_too_large", "makes 21x45 + 9x21 maps: 1,134 cells, more than")
        r = c.post(f"{URL}/{endpoint}{join}scales=0.1", content=canvas, headers=PNG)
        assert_error(r, 422, "image_too_small", "scale 0.1 resizes the 48x96 image to 5x10")
    with make_client(model_dir, max_map_cells=10**6, max_pixels=5000) as c:
        wait_ready(c)
        r = c.post(f"{URL}/{endpoint}{join}scales=1,0.5", content=canvas, headers=PNG)
        assert_error(r, 422, "map_too_large", "5,760 pixels in all, more than the limit of 5,000")


# ---------------------------------------------------------------------------------------------
# Unknown query parameters, on every route
# ---------------------------------------------------------------------------------------------


def routes_of(app) -> list[tuple[str, str, str]]:
    """``(method, URL, route template)`` of every API route."""
    found, stack = [], list(app.routes)
    while stack:
        route = stack.pop(0)
        if hasattr(route, "original_router"):  # FastAPI >= 0.16x keeps included routers
            stack.extend(route.original_router.routes)
        if isinstance(route, APIRoute):
            path = route.path.replace("{name}", "digits_detector").replace("{version}", "1")
            found.extend((method, path, route.path) for method in sorted(route.methods))
    return found


def test_unknown_query_parameters_are_422_on_every_route(client, canvas):
    routes = routes_of(client.app)
    paths = {p for _, p, _ in routes}
    assert {"/", "/healthz", "/metrics", f"{URL}/detect", f"{URL}/scoremap", f"{URL}/predict",
            "/v2/models/digits_detector/infer", "/v2/health/ready"} <= paths  # fmt: skip
    assert len(routes) >= 20
    for method, path, template in routes:
        r = client.request(method, f"{path}?treshold=0.9&zz=1", content=canvas, headers=PNG)
        assert r.status_code == 422, (method, path, r.text)
        if method == "HEAD":
            continue
        text = f"unknown query parameters 'treshold', 'zz' for {template}; accepted:"
        if path.startswith("/v2"):  # the Open Inference Protocol's errors: {"error": "..."}
            assert text in r.json()["error"], r.text
        else:
            assert_error(r, 422, "unknown_parameter", text)
    # the message lists what the route accepts
    r = client.post(f"{URL}/detect?treshold=0.9", content=canvas, headers=PNG)
    assert_error(r, 422, "unknown_parameter", "accepted: class, nms_iou, scales, stride_divisor")
    r = client.get("/healthz?verbose=1")
    assert_error(r, 422, "unknown_parameter", "unknown query parameter 'verbose'")
    # declared ones still pass
    assert (
        client.post(f"{URL}/detect?threshold=0.9", content=canvas, headers=PNG).status_code == 200
    )


# ---------------------------------------------------------------------------------------------
# WebP
# ---------------------------------------------------------------------------------------------


def test_webp_uploads_are_decoded(client, canvas):
    pixels = np.asarray(Image.open(io.BytesIO(canvas)).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, "WEBP", lossless=True)
    webp = buf.getvalue()
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    want = client.post(f"{URL}/detect?class=3", content=canvas, headers=PNG).json()
    raw = client.post(f"{URL}/detect?class=3", content=webp, headers={"content-type": "image/webp"})
    form = client.post(f"{URL}/detect?class=3", files={"file": ("c.webp", webp, "image/webp")})
    for r in (raw, form):
        assert r.status_code == 200, r.text
        same_detections(r.json()["detections"], want["detections"])
    r = client.post(f"{URL}/predict", content=webp, headers={"content-type": "image/webp"})
    assert r.status_code == 200 and r.json()["image_size"] == [48, 96]
