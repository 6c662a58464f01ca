"""The Open Inference Protocol (KServe V2) with Triton's own client, against a real server.

``tritonclient.http`` speaks to ``cnnserve serve`` as it would to Triton: server and model
metadata, readiness, and inference with JSON and with binary tensors. The answers must be the
ones ``/v1/models/{name}/predict`` gives for the same pixels, and the library's score maps.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from cnnserve.convert import load_fully_convolutional
from cnnserve.data import digits_canvas
from cnnserve.dense import score_map
from cnnserve.service.errors import ServiceError
from cnnserve.service.routes.v2 import parse_request
from tests.live_server import server_process
from tests.test_service import probabilities

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(MODEL, folder / "digits.safetensors")
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with server_process(folder, log, "--max-batch-delay-ms", "2") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.removeprefix("http://"), network_timeout=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def fcn():
    return load_fully_convolutional(MODEL)


def digits(n: int) -> np.ndarray:
    """n held-out digits as uint8 (n, 8, 8, 1)."""
    out = []
    for seed in range(n):
        canvas, _ = digits_canvas((8, 8), 1, seed=seed, margin=0)
        out.append(np.round(canvas[0] * 255).astype(np.uint8))
    return np.stack(out)[..., None]


def predict_probabilities(server: str, pixels: np.ndarray) -> np.ndarray:
    """/v1/models/digits/predict's probabilities (all 10) of one (8, 8) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    req = urllib.request.Request(
        f"{server}/v1/models/digits/predict?top_k=10",
        data=buf.getvalue(),
        headers={"Content-Type": "image/png"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return probabilities(json.load(r))


def test_metadata_and_health(client, fcn):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "cnnserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("digits")
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {
        ("image", "UINT8"),
        ("image", "FP32"),
    }
    assert {t["name"] for t in meta["outputs"]} == {
        "scores",
        "probabilities",
        "score_map",
        "probability_map",
    }
    assert "(N, H, W, 1)" in meta["parameters"]["image_layout"]["UINT8"]
    assert "already preprocessed" in meta["parameters"]["image_layout"]["FP32"]
    assert client.get_model_metadata("digits", "1") == meta


@pytest.mark.parametrize("binary", [False, True])
def test_uint8_inference_equals_predict(client, server, binary):
    images = digits(4)
    tensor = triton.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary)
        for name in ("scores", "probabilities")
    ]
    result = client.infer("digits", [tensor], outputs=outputs)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (4, 10) and probabilities.dtype == np.float32
    assert result.as_numpy("scores").shape == (4, 10)
    assert result.get_response()["model_version"] == "1"
    for image, p in zip(images, probabilities, strict=True):
        np.testing.assert_allclose(p, predict_probabilities(server, image[..., 0]), atol=1e-6)


def test_fp32_preprocessed_inference_with_default_binary_outputs(client, fcn):
    images = digits(3)
    x = fcn.preprocess(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)  # (3, 1, 8, 8)
    tensor = triton.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x.astype(np.float32))
    result = client.infer("digits", [tensor], model_version="1")  # outputs: all, binary
    expected = fcn.forward(x)[:, :, 0, 0]
    np.testing.assert_allclose(result.as_numpy("scores"), expected, rtol=1e-5, atol=1e-5)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_larger_uint8_input_gives_the_score_map(client, fcn):
    canvas, _ = digits_canvas((20, 28), 2, seed=3, margin=0)
    image = np.round(canvas[0] * 255).astype(np.uint8)
    tensor = triton.InferInput("image", [1, 20, 28, 1], "UINT8")
    tensor.set_data_from_numpy(image[None, :, :, None])
    result = client.infer("digits", [tensor])
    expected = score_map(fcn, image[None])
    maps = result.as_numpy("score_map")
    assert maps.shape == (1, 10, *expected.shape)
    np.testing.assert_allclose(maps[0], expected.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        result.as_numpy("probability_map")[0], expected.probabilities, atol=1e-6
    )


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "message"),
    [
        ("pixels", "UINT8", [1, 8, 8, 1], "unknown input 'pixels'"),
        ("image", "INT32", [1, 8, 8, 1], "expected UINT8 or FP32"),
        ("image", "UINT8", [1, 8, 8, 3], "has 3 channel(s); model 'digits' takes 1"),
        ("image", "UINT8", [1, 4, 8, 1], "smaller than the model's 8x8 window"),
        ("image", "FP32", [1, 1, 16, 16], "an FP32 input must be the training size 8x8"),
    ],
)
def test_bad_requests_are_protocol_errors(client, name, datatype, shape, message):
    tensor = triton.InferInput(name, shape, datatype)
    dtype = np.float32 if datatype == "FP32" else np.int32 if datatype == "INT32" else np.uint8
    tensor.set_data_from_numpy(np.zeros(shape, dtype))
    with pytest.raises(InferenceServerException, match=re.escape(message)) as info:
        client.infer("digits", [tensor])
    assert info.value.status() == "400"


def test_errors_have_the_protocols_form(server):
    for path, status in [("/v2/models/nope", 404), ("/v2/models/digits/versions/7", 404)]:
        try:
            urllib.request.urlopen(server + path, timeout=10)
        except urllib.error.HTTPError as exc:
            with exc:
                assert exc.code == status
                body = json.load(exc)
        assert set(body) == {"error"} and isinstance(body["error"], str), body
    req = urllib.request.Request(
        server + "/v2/models/digits/infer",
        data=b'{"inputs": []}0123',
        headers={"Inference-Header-Content-Length": "14"},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as exc:
        with exc:
            assert exc.code == 400
            assert json.load(exc) == {"error": "inputs must be a list of one tensor named 'image'"}


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b'{"id": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "nested too deep"),
        (b'{"data": [' + b"9" * 5000 + b"]}", None, "a number it cannot read"),
        (b"{}", "9" * 5000, "5000 digits long: too large"),
        (b"{}", "12", "more than the body's 2 bytes"),
        (b"[1]", None, "must be a JSON object"),
    ],
)
def test_hostile_request_bodies_are_refused_before_any_work(body, header, message):
    """Bodies that made Python's own parsers raise (found by a hostile client: 500s) are 400s."""
    with pytest.raises(ServiceError, match=re.escape(message)) as info:
        parse_request(body, header)
    assert info.value.status == 400


def _refused(server: str, body: dict) -> str:
    """The error message of a JSON inference request to the digits model that must be a 400."""
    req = urllib.request.Request(
        server + "/v2/models/digits/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    with info.value as exc:
        assert exc.code == 400
        return json.load(exc)["error"]


def test_a_datatype_that_is_not_a_string_is_a_400(server):
    body = {"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": ["UINT8"]}]}
    body["inputs"][0]["data"] = [0] * 64
    assert "has datatype ['UINT8']; expected UINT8 or FP32" in _refused(server, body)


def test_finite_fp32_values_that_overflow_the_network_are_refused(server):
    """3e38 is a finite float32, but the network's sums overflow: a 400 naming it, not a 200
    of NaN scores (which JSON cannot even carry)."""
    body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}
    body["inputs"][0]["data"] = [3e38] * 64
    assert "overflows the network: its scores are not finite" in _refused(server, body)


def test_a_huge_declared_shape_is_refused_not_wrapped(server):
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": [2**40, 2**40, 2**40, 1],
                    "parameters": {"binary_data_size": 64},
                }
            ]
        }
    ).encode()
    req = urllib.request.Request(
        server + "/v2/models/digits/infer",
        data=head + bytes(64),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    with info.value as exc:
        assert exc.code == 400
        assert f"needs {2**120} bytes" in json.load(exc)["error"]  # 2**40 cubed, exactly


def test_a_map_too_large_for_json_is_refused_unless_sent_as_binary(client):
    """Over max_json_cells (2**18) cells a map goes as binary data only, as /scoremap's JSON."""
    image = np.zeros((1, 1100, 1100, 1), np.uint8)  # a 547 x 547 map: 299,209 cells
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image, binary_data=True)
    as_json = [triton.InferRequestedOutput("probability_map", binary_data=False)]
    with pytest.raises(InferenceServerException, match="as binary data") as info:
        client.infer("digits", [tensor], outputs=as_json)
    assert "547x547 cells" in str(info.value)
    as_binary = [triton.InferRequestedOutput("probability_map", binary_data=True)]
    result = client.infer("digits", [tensor], outputs=as_binary)
    assert result.as_numpy("probability_map").shape == (1, 10, 547, 547)
