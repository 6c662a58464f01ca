"""The web page at ``GET /``, driven by a real browser against the real service.

The service runs in-process (uvicorn in a background thread, on a free port of 127.0.0.1) with
copies of the shipped ``models/digits.safetensors`` and ``models/faces.safetensors``; headless
Chromium loads the page through Selenium, uploads images with the page's file input and reads
what the page rendered.

- A held-out digit (the test split the model's training record names) that the model
  classifies correctly: the page lists its label first, the service picks it as the score
  map's class, and the page shows the heatmap PNG.
- A larger canvas of held-out digits: the heatmap has the canvas's size, and the class shown
  is the one the service chose.
- The astronaut photo and the face detector, at the scales of the README: the class is
  ``face`` (the service's choice, never ``background``), the heatmap is drawn over the colour
  photo with the class and the scale in its caption, the best box with its label is on the
  astronaut's face, and the PNG and JSON downloads are the service's answers.
- A text file: the page shows the service's 400 ``invalid_image`` error.
- Inside the network: a figure per layer, captioned with its name and shape, whose grid
  loads only when it scrolls into view and is the service's own PNG of that layer; the
  heatmap's colour bar carries the class label.

Requirements
------------
Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``)
and the ``selenium`` package. Selenium Manager never runs (it would download a driver): the
test names both binaries. A missing browser or driver fails the test with the command that
installs them; it is never skipped.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.data import digits_canvas, load_dataset
from cnnserve.model import read_model_file
from tests.live_server import http_get, live_server
from tests.shipped_models import (
    ASTRONAUT_FACE,
    FACE_SCALES,
    FACE_STRIDE_DIVISOR,
    FACE_THRESHOLD,
    FACES,
    iou,
    save_photo,
)

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as exc:  # the driver fixture fails, saying how to install it
    webdriver = None
    SELENIUM_MISSING = str(exc)

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = ROOT / "models" / "digits.safetensors"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver"
RENDER_TIMEOUT = 60  # s, for the page to reach a final state
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1400",
)


# ---------------------------------------------------------------------------------------------
# The server and the browser
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app on 127.0.0.1 serving copies of the shipped digits and faces models."""
    models = tmp_path_factory.mktemp("page-models")
    for path in (MODEL_FILE, FACES):
        shutil.copy(path, models / path.name)
    with live_server(models) as base:
        yield base


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """Headless Chromium through Debian's chromedriver (never Selenium Manager)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(
            f"the browser test needs Chromium and its driver; missing {', '.join(missing)}. "
            f"Install them with: {INSTALL}"
        )
    if webdriver is None:
        pytest.fail(f"the browser test needs selenium ({SELENIUM_MISSING}): pip install selenium")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as exc:  # a broken install: say how to fix it rather than skip
        pytest.fail(f"cannot start headless Chromium ({exc}); (re)install it with: {INSTALL}")
    try:
        yield browser
    finally:
        browser.quit()


def _state(browser) -> str:
    return browser.execute_script("return document.body.dataset.state")


def _wait_state(browser, states: tuple[str, ...]) -> str:
    WebDriverWait(browser, RENDER_TIMEOUT, poll_frequency=0.1).until(
        lambda b: _state(b) in states,
        message=f"the page did not reach state {states} within {RENDER_TIMEOUT} s",
    )
    return _state(browser)


def _open_page(browser, base: str) -> None:
    browser.get_log("browser")  # drop the messages of earlier pages
    browser.get(f"{base}/")
    assert _wait_state(browser, ("ready", "error")) == "ready", _text(browser, "error")
    assert _text(browser, "status") == "Ready"


def _text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def _upload(browser, path: Path) -> str:
    """Send ``path`` to the file input; the page's final state, "done" or "error"."""
    browser.find_element(By.ID, "file").send_keys(str(path))
    return _wait_state(browser, ("done", "error"))


def _values(browser, selector: str, attribute: str = "value") -> list[str]:
    return [e.get_attribute(attribute) for e in browser.find_elements(By.CSS_SELECTOR, selector)]


def _heatmap(browser) -> dict:
    return browser.execute_script(
        "const img = document.getElementById('heatmap');"
        "return {complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,"
        " src: img.src, rendering: getComputedStyle(img).imageRendering,"
        " shownWidth: img.getBoundingClientRect().width};"
    )


def _boxes(browser) -> list[dict]:
    """The detection boxes drawn over the heatmap: their data, label and place on screen."""
    return browser.execute_script(
        "const img = document.getElementById('heatmap').getBoundingClientRect();"
        "return [...document.querySelectorAll('#boxes .det-box')].map((b) => {"
        " const r = b.getBoundingClientRect();"
        " return {box: JSON.parse(b.dataset.box), score: Number(b.dataset.score),"
        "  label: b.querySelector('.det-label').textContent, best: b.classList.contains('best'),"
        "  shown: [r.left - img.left, r.top - img.top, r.right - img.left, r.bottom - img.top],"
        "  imageShown: [img.width, img.height]}; });"
    )


def _set(browser, element_id: str, value: str) -> None:
    """Set a control's value as a user would, and let the page react (a change event)."""
    browser.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('change'));",
        element_id,
        value,
    )


def _heatmap_pixels(browser, points: list[tuple[int, int]]) -> list[list[int]]:
    """RGB of the heatmap image at (x, y) points of its own pixels."""
    return browser.execute_script(
        "const img = document.getElementById('heatmap');"
        "const c = document.createElement('canvas');"
        "c.width = img.naturalWidth; c.height = img.naturalHeight;"
        "const g = c.getContext('2d'); g.drawImage(img, 0, 0);"
        "return arguments[0].map(([x, y]) => [...g.getImageData(x, y, 1, 1).data.slice(0, 3)]);",
        [list(p) for p in points],
    )


def _downloaded(folder: Path, suffix: str) -> Path:
    """The file of ``suffix`` that the browser saved into ``folder`` (waits for it)."""
    deadline = time.monotonic() + RENDER_TIMEOUT
    while time.monotonic() < deadline:
        done = [p for p in folder.iterdir() if p.suffix == suffix]
        if done and not any(p.suffix == ".crdownload" for p in folder.iterdir()):
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no {suffix} file downloaded into {folder}: {list(folder.iterdir())}")


def _severe_console_messages(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _save_png(x01: np.ndarray, path: Path) -> Path:
    """Save (H, W) pixels in [0, 1] as an 8-bit grayscale PNG."""
    Image.fromarray(np.rint(x01 * 255).astype(np.uint8), mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory) -> tuple[Path, str]:
    """A held-out digit the shipped model classifies correctly, as a PNG, and its label.

    The test split is the one the model's training record names; the digit is the first
    of that split that the model gets right with probability above 0.9, read back from the
    PNG's own 8-bit pixels, so that the service has the same input.
    """
    model_file = read_model_file(MODEL_FILE)
    model, training = model_file.model, model_file.training
    data = load_dataset(
        "digits",
        seed=training["seed"],
        val_fraction=training["val_fraction"],
        test_fraction=training["test_fraction"],
    )
    x01 = data.X_test[:, 0] * data.std[0] + data.mean[0]  # (N, 8, 8), un-normalised
    x01 = np.rint(np.clip(x01, 0, 1) * 255) / 255  # what the PNG will hold
    scores = model.scores(model.preprocess(x01[:, None]))
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    good = np.flatnonzero((p.argmax(axis=1) == data.y_test) & (p.max(axis=1) > 0.9))
    assert good.size, "the shipped model classifies no test digit correctly"
    i = int(good[0])
    label = data.class_names[int(data.y_test[i])]
    path = _save_png(x01[i], tmp_path_factory.mktemp("upload") / f"digit_{label}.png")
    return path, label


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_page_classifies_a_held_out_digit_and_shows_its_heatmap(server, driver, digit_png):
    path, label = digit_png
    _open_page(driver, server)
    assert _values(driver, "#model option") == ["digits", "faces"]
    assert "8\u00d78" in _text(driver, "model-info")

    state = _upload(driver, path)
    assert state == "done", _text(driver, "error")

    items = driver.find_elements(By.CSS_SELECTOR, "#predictions li")
    assert len(items) == 5  # top_k=5 by default
    top1 = driver.find_element(By.CSS_SELECTOR, "#predictions li.top1")
    assert top1 == items[0]
    assert top1.get_attribute("data-label") == label
    assert float(top1.get_attribute("data-probability")) > 0.9
    assert top1.text.startswith(label) and top1.text.endswith("%")

    # The score map of an 8x8 image has one cell: the service's class, its top class by max,
    # is the prediction; a detection box covers the whole image.
    assert driver.find_element(By.ID, "class").get_attribute("value") == label
    assert _boxes(driver)[0]["box"] == [0, 0, 8, 8]
    assert _values(driver, "#stride-divisor option") == ["1", "2"]  # divisors of the stride, 2

    heat = _heatmap(driver)
    assert heat["complete"] and heat["width"] == 8 and heat["height"] == 8, heat
    assert heat["src"].startswith("blob:"), heat
    assert heat["rendering"] == "pixelated"
    assert heat["shownWidth"] >= 64, heat  # scaled up for display
    assert "1\u00d71" in _text(driver, "scoremap-summary")
    assert not driver.find_element(By.ID, "error").is_displayed()
    assert _severe_console_messages(driver) == []


def test_page_maps_a_canvas_of_digits(server, driver, tmp_path):
    canvas, placements = digits_canvas((48, 96), count=5, seed=1)
    path = _save_png(canvas[0], tmp_path / "canvas.png")
    _open_page(driver, server)
    assert _upload(driver, path) == "done", _text(driver, "error")

    heat = _heatmap(driver)
    assert heat["complete"] and (heat["width"], heat["height"]) == (96, 48), heat
    # The class shown by default is the one the service chooses when asked for none.
    chosen = driver.find_element(By.ID, "class").get_attribute("value")
    assert chosen == _service_json(server, "digits", path, {})["class"]["label"]
    assert "the service\u2019s default class" in _text(driver, "heatmap-caption")
    summary = _text(driver, "scoremap-summary")
    assert "21\u00d745" in summary  # (48 - 8) // 2 + 1 by (96 - 8) // 2 + 1 cells

    # A finer map, and another class: the page asks again and shows that class.
    other = next(str(p["label"]) for p in placements if str(p["label"]) != chosen)
    driver.execute_script(
        "const s = document.getElementById('stride-divisor'); s.value = '2';"
        "s.dispatchEvent(new Event('change'));"
        "const c = document.getElementById('class'); c.value = arguments[0];"
        "c.dispatchEvent(new Event('change'));",
        other,
    )
    assert _wait_state(driver, ("done", "error")) == "done", _text(driver, "error")
    assert "41\u00d789" in _text(driver, "scoremap-summary")  # stride 1
    assert f"\u201c{other}\u201d" in _text(driver, "heatmap-caption")
    assert "default class" not in _text(driver, "heatmap-caption")
    assert _heatmap(driver)["width"] == 96

    # Scales the service refuses: its 422 on the page, and no stale map left on screen.
    _set(driver, "scales", "1,zero")
    assert _wait_state(driver, ("done", "error")) == "error"
    error = driver.find_element(By.ID, "error")
    assert error.get_attribute("data-status") == "422" and "scales" in error.text, error.text
    assert not driver.find_element(By.ID, "heatmap").is_displayed()
    assert driver.find_element(By.ID, "download-png").get_attribute("disabled") == "true"


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory) -> Path:
    """scikit-image's astronaut photo (512 x 512, RGB) as a PNG."""
    return save_photo("astronaut", tmp_path_factory.mktemp("photo") / "astronaut.png")


def test_page_finds_the_astronauts_face_and_downloads_the_answers(
    server, driver, astronaut_png, tmp_path
):
    _open_page(driver, server)
    _set(driver, "model", "faces")
    assert _values(driver, "#class option") == ["background", "face"]
    assert "25\u00d725" in _text(driver, "model-info")
    for element_id, value in [
        ("scales", ",".join(f"{s:g}" for s in FACE_SCALES)),
        ("threshold", f"{FACE_THRESHOLD:g}"),
        ("stride-divisor", str(FACE_STRIDE_DIVISOR)),
    ]:
        driver.execute_script(
            "document.getElementById(arguments[0]).value = arguments[1]", element_id, value
        )
    assert _upload(driver, astronaut_png) == "done", _text(driver, "error")

    # The class is the service's choice for a detector: face, never background.
    assert driver.find_element(By.ID, "class").get_attribute("value") == "face"
    heat = _heatmap(driver)
    assert (heat["width"], heat["height"]) == (512, 512), heat

    boxes = _boxes(driver)
    assert boxes and boxes[0]["best"] and not any(b["best"] for b in boxes[1:]), boxes
    best = boxes[0]
    assert all(b["score"] >= FACE_THRESHOLD for b in boxes)
    assert iou(best["box"], ASTRONAUT_FACE) >= 0.5, best
    assert best["label"] == f"face {best['score']:.2f}"
    # The box is drawn where its pixels are on the image as shown (to a pixel).
    ratio = best["imageShown"][0] / 512
    for shown, pixel in zip(best["shown"], best["box"], strict=True):
        assert abs(shown - pixel * ratio) <= 1.5, (best["shown"], best["box"], ratio)

    # The caption and the colour bar name the class and the scale of the map shown: the
    # scale where the face is most likely, that of the best detection.
    caption = _text(driver, "heatmap-caption")
    assert f"class \u201cface\u201d at scale {best_scale(driver):g}" in caption, caption
    legend = _text(driver, "heatmap-legend-label")
    assert legend == f"Class \u201cface\u201d, scale {best_scale(driver):g}: probability"
    assert driver.find_element(By.ID, "heatmap-legend").is_displayed()
    assert "RGB to grey (ITU-R 601 luma) for the network" in _text(driver, "scoremap-summary")
    rows = driver.find_elements(By.CSS_SELECTOR, "#detections-table tbody tr")
    assert len(rows) == len(boxes)
    assert json.loads(rows[0].get_attribute("data-box")) == best["box"]
    assert rows[0].get_attribute("data-class") == "face"

    # Downloads: the JSON on screen, and the service's PNG with its colour bar and boxes.
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)}
    )
    driver.find_element(By.ID, "download-json").click()
    answer = json.loads(_downloaded(tmp_path, ".json").read_text())
    assert answer["class"]["label"] == "face"
    assert answer["scales"] == list(FACE_SCALES)
    assert answer["detections"][0]["box"] == best["box"]
    assert len(answer["detections"]) == len(boxes)
    driver.find_element(By.ID, "download-png").click()
    with Image.open(_downloaded(tmp_path, ".png")) as png:
        assert png.format == "PNG" and png.width > 512 and png.height >= 512, png.size

    # At opacity 0 the heatmap is the colour photo itself: drawn over the original, not a
    # grey copy of it (the network sees grey).
    _set(driver, "alpha", "0")
    assert _wait_state(driver, ("done", "error")) == "done", _text(driver, "error")
    photo = np.asarray(Image.open(astronaut_png).convert("RGB"))
    points = [(100, 400), (30, 60), (420, 100), (225, 128)]
    shown = np.array(_heatmap_pixels(driver, points))
    expected = np.array([photo[y, x] for x, y in points])
    assert np.abs(shown.astype(int) - expected).max() <= 2, (shown, expected)
    assert _severe_console_messages(driver) == []


def best_scale(browser) -> float:
    """The scale of the best detection, from the page's table."""
    row = browser.find_element(By.CSS_SELECTOR, "#detections-table tbody tr")
    return float(row.get_attribute("data-scale"))


def _layers(browser) -> list[dict]:
    return browser.execute_script(
        "return [...document.querySelectorAll('#layers figure')].map((f) => {"
        " const img = f.querySelector('img');"
        " return {layer: f.dataset.layer, state: f.dataset.state,"
        "  caption: f.querySelector('figcaption').textContent,"
        "  width: img.naturalWidth, height: img.naturalHeight, hidden: img.hidden}; });"
    )


def _service_json(base: str, model: str, path: Path, params: dict) -> dict:
    """The service's own /scoremap JSON answer for ``path``."""
    query = urllib.parse.urlencode({"arrays": "false", **params})
    request = urllib.request.Request(
        f"{base}/v1/models/{model}/scoremap?{query}",
        path.read_bytes(),
        {"Content-Type": "image/png"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _service_png(base: str, path: Path, layer: str) -> Image.Image:
    request = urllib.request.Request(
        f"{base}/v1/models/digits/activations?format=png&layer={layer}",
        path.read_bytes(),
        {"Content-Type": "image/png"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return Image.open(io.BytesIO(response.read()))


def test_page_shows_inside_the_network_layer_by_layer(server, driver, digit_png):
    path, label = digit_png
    _open_page(driver, server)
    driver.execute_script("window.scrollTo(0, 0)")
    assert _upload(driver, path) == "done", _text(driver, "error")
    assert driver.find_element(By.ID, "layers").get_attribute("data-state") == "ready"

    # The heatmap's colour bar and its class label, beside the bare heatmap.
    assert driver.find_element(By.ID, "heatmap-legend").is_displayed()
    assert (
        _text(driver, "heatmap-legend-label") == f"Class \u201c{label}\u201d, scale 1: probability"
    )

    layers = _layers(driver)
    assert [f["layer"] for f in layers] == ["input", *map(str, range(11))]
    assert layers[0]["caption"].startswith("input (1, 8, 8)")
    assert layers[1]["caption"].startswith("0 \u00b7 conv 32 3x3 s1 p0 (32, 6, 6) \u00b7 values")
    assert "zeros" in layers[3]["caption"]  # the ReLU
    assert layers[11]["caption"].startswith("10 \u00b7 scores (10)")
    # Lazy: the last layers, far below the fold, have not been fetched yet.
    assert layers[-1]["state"] == "waiting" and layers[-1]["width"] == 0, layers[-1]

    for k, figure in enumerate(driver.find_elements(By.CSS_SELECTOR, "#layers figure")):
        driver.execute_script("arguments[0].scrollIntoView()", figure)
        WebDriverWait(driver, RENDER_TIMEOUT, poll_frequency=0.1).until(
            lambda b, k=k: _layers(b)[k]["state"] in ("loaded", "error")
        )
    layers = _layers(driver)
    assert all(f["state"] == "loaded" and not f["hidden"] for f in layers), layers
    for key in ("input", "2", "10"):
        shown = next(f for f in layers if f["layer"] == key)
        assert (shown["width"], shown["height"]) == _service_png(server, path, key).size
    assert _severe_console_messages(driver) == []


def test_page_shows_the_service_error_for_a_text_file(server, driver, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n")
    _open_page(driver, server)
    assert _upload(driver, path) == "error"

    error = driver.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.get_attribute("data-code") == "invalid_image"
    assert error.text.startswith("400: "), error.text
    assert "decode" in error.text.lower(), error.text
    assert driver.find_elements(By.CSS_SELECTOR, "#predictions li") == []
    assert _text(driver, "status") != "Working..."


def test_index_and_assets_are_served(server):
    status, body = http_get(f"{server}/")
    assert status == 200
    page = body.decode()
    for needle in ('id="file"', 'id="predictions"', 'id="heatmap"', "static/app.js"):
        assert needle in page
    for asset in ("app.js", "style.css"):
        status, body = http_get(f"{server}/static/{asset}")
        assert status == 200 and body, asset
    status, body = http_get(f"{server}/v1/models")
    names = [m["name"] for m in json.loads(body)["models"]]
    assert status == 200 and names == ["digits", "faces"], names


@pytest.mark.parametrize(
    ("path", "selector"),
    [
        ("/docs", ".opblock-summary-path"),  # Swagger UI: one row per operation
        ("/redoc", "[data-section-id^='operation/'] h2"),  # ReDoc: one section per operation
    ],
)
def test_api_docs_render_the_endpoints_with_no_internet(server, driver, path, selector):
    """The docs' assets come from the app itself: every URL the page loads is the server's."""
    driver.get_log("browser")
    driver.get(f"{server}{path}")

    def rendered(b):
        return [
            e.text or e.get_attribute("textContent")
            for e in b.find_elements(By.CSS_SELECTOR, selector)
        ]

    WebDriverWait(driver, RENDER_TIMEOUT, poll_frequency=0.2).until(
        lambda b: len(rendered(b)) >= 7, message=f"{path} did not render the endpoints"
    )
    text = " ".join(rendered(driver)) + driver.find_element(By.TAG_NAME, "body").text
    assert "/v1/models/{name}/predict" in text or "The top-k classes" in text, text[:500]
    entries = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus])"
    )
    fetched = [url for url, status in entries if status]
    assert fetched and all(url.startswith(server) for url in fetched), entries
    # Nothing else was fetched: ReDoc's logo from its CDN is refused by the page's policy
    # (ReDoc then hides it), and no script, style or font comes from elsewhere.
    refused = [url for url, status in entries if not status]
    assert refused in ([], ["https://cdn.redoc.ly/redoc/logo-mini.svg"]), entries
    severe = [m for m in _severe_console_messages(driver) if "logo-mini.svg" not in m]
    assert not severe, severe
