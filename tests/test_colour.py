"""Colour end to end: decoding keeps an image's channels, a model of other channels converts
(ITU-R 601 luma / repetition) and says so, pictures are drawn over the colour original."""

import contextlib
import importlib.util
import io
import json
import re
import shlex
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cnnserve.cli import main
from cnnserve.convert import load_fully_convolutional, to_fully_convolutional
from cnnserve.dense import score_map
from cnnserve.heatmap import heatmap_image
from cnnserve.images import (
    GREY_TO_RGB,
    LUMA,
    RGB_TO_GREY,
    image_pixels,
    luma,
    model_pixels,
    read_image,
    to_channels,
)
from cnnserve.modelfile import read_model_file, save_model
from cnnserve.network import ConvNet
from cnnserve.predict import predict
from cnnserve.service import Settings, create_app

LAYERS = [
    {"type": "conv", "filters": 4, "size": 3, "stride": 1, "pad": 0},
    {"type": "relu"},
    {"type": "affine", "units": 3},
]


def small_net(channels: int, dtype=np.float32) -> ConvNet:
    """A padding-free 3-class net on 6x6 windows with some normalisation per channel."""
    return ConvNet(
        LAYERS,
        (channels, 6, 6),
        3,
        dtype=dtype,
        seed=3,
        class_names=["a", "b", "c"],
        normalization={"mean": [0.4] * channels, "std": [0.2] * channels},
    )


def encode(array: np.ndarray, mode: str | None = None, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def pixels_of(source) -> np.ndarray:
    """The pixels of an image file (or stream), the file closed."""
    with Image.open(source) as img:
        return np.asarray(img)


def luma_reference(rgb: np.ndarray) -> np.ndarray:
    """0.299 R + 0.587 G + 0.114 B per pixel, in float64, of (3, H, W)."""
    r, g, b = rgb.astype(np.float64)
    return (0.299 * r + 0.587 * g + 0.114 * b)[None]


RNG = np.random.default_rng(7)
RGB8 = RNG.integers(0, 256, (9, 11, 3), dtype=np.uint8)  # (H, W, 3)
GREY8 = RNG.integers(0, 256, (9, 11), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Decoding and conversion
# ---------------------------------------------------------------------------------------------


def test_read_image_keeps_the_images_own_channels():
    rgb = read_image(encode(RGB8))
    assert rgb.shape == (3, 9, 11) and rgb.dtype == np.float32
    np.testing.assert_array_equal(rgb, RGB8.transpose(2, 0, 1) / np.float32(255))
    grey = read_image(encode(GREY8))
    assert grey.shape == (1, 9, 11)
    np.testing.assert_array_equal(grey[0], GREY8 / np.float32(255))
    # A photo of greys saved as RGB is still RGB: a file's mode decides, not its content.
    assert read_image(encode(np.repeat(GREY8[:, :, None], 3, axis=2))).shape == (3, 9, 11)
    cmyk = Image.fromarray(RGB8).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=95)
    assert read_image(buffer.getvalue()).shape == (3, 9, 11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_luma_is_itu_r_601(dtype):
    rgb = RNG.random((3, 5, 4)).astype(dtype)
    out = luma(rgb)
    assert out.shape == (1, 5, 4) and out.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(out, luma_reference(rgb), rtol=0, atol=tol)
    batch = RNG.integers(0, 256, (2, 3, 4, 5), dtype=np.uint8)  # (N, 3, H, W)
    out8 = luma(batch)
    assert out8.shape == (2, 1, 4, 5) and out8.dtype == np.float32
    np.testing.assert_allclose(out8[1], luma_reference(batch[1]), atol=1e-4)
    assert LUMA == (0.299, 0.587, 0.114)
    np.testing.assert_allclose(luma(np.ones((3, 1, 1))), 1.0, atol=1e-15)  # weights sum to 1


def test_to_channels_and_what_it_says():
    rgb = RGB8.transpose(2, 0, 1) / np.float32(255)  # (3, H, W)
    grey, said = to_channels(rgb, 1)
    assert said == RGB_TO_GREY == "RGB to grey (ITU-R 601 luma)"
    assert grey.shape == (1, 9, 11) and grey.dtype == np.float32
    np.testing.assert_allclose(grey, luma_reference(rgb), atol=1e-6)
    three, said = to_channels(grey, 3)
    assert said == GREY_TO_RGB and three.shape == (3, 9, 11)
    for c in range(3):
        np.testing.assert_array_equal(three[c], grey[0])
    same, said = to_channels(rgb, 3)
    assert same is rgb and said is None
    with pytest.raises(ValueError, match="cannot convert an image of 2 channels to 1"):
        to_channels(np.zeros((2, 3, 3), np.float32), 1)


def test_read_image_with_channels_converts_as_to_channels_does():
    data = encode(RGB8)
    native = read_image(data)
    np.testing.assert_array_equal(read_image(data, 1), to_channels(native, 1)[0])
    np.testing.assert_array_equal(
        read_image(encode(GREY8), 3), to_channels(read_image(encode(GREY8)), 3)[0]
    )
    with pytest.raises(ValueError, match="channels must be 1, 3 or None"):
        read_image(data, 2)


def test_transparency_is_flattened_over_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = [200, 10, 0]
    rgba[..., 3] = [[255, 0, 128], [51, 255, 0]]
    out = read_image(encode(rgba, "RGBA"))
    assert out.shape == (3, 2, 3)
    a = rgba[..., 3:].astype(np.int64)
    expected = (rgba[..., :3] * a + 255 * (255 - a) + 127) // 255  # over white
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1).astype(np.float32) / 255)
    assert out[:, 0, 1].tolist() == [1.0, 1.0, 1.0]  # fully transparent: white
    la = np.stack([np.full((2, 2), 40, np.uint8), np.array([[255, 0], [0, 255]], np.uint8)], -1)
    grey = read_image(encode(la, "LA"))
    assert grey.shape == (1, 2, 2)
    np.testing.assert_array_equal(grey[0] * 255, [[40, 255], [255, 40]])


def test_palette_images_grey_or_colour():
    grey_palette = Image.fromarray(GREY8).convert("P")  # a palette of greys: one channel
    buffer = io.BytesIO()
    grey_palette.save(buffer, format="GIF")
    out = read_image(buffer.getvalue())
    assert out.shape == (1, 9, 11)
    np.testing.assert_array_equal(out[0], GREY8 / np.float32(255))
    colour = Image.fromarray(RGB8).quantize(16)  # mode P, colours
    buffer = io.BytesIO()
    colour.save(buffer, format="PNG")
    out = read_image(buffer.getvalue())
    assert out.shape == (3, 9, 11)
    np.testing.assert_array_equal(out, read_image(encode(np.asarray(colour.convert("RGB")))))
    # A palette with a transparent entry: transparent pixels are white.
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    buffer = io.BytesIO()
    pal.save(buffer, format="PNG", transparency=1)
    out = read_image(buffer.getvalue())
    np.testing.assert_array_equal(out[:, 0, 0], [1, 0, 0])
    np.testing.assert_array_equal(out[:, 0, 1], [1, 1, 1])


def test_16_bit_grey_stays_one_channel_at_full_depth():
    deep = np.array([[0, 1000, 65535]], dtype=np.uint16)
    out = read_image(encode(deep))
    assert out.shape == (1, 1, 3)
    np.testing.assert_allclose(out[0], deep / 65535.0, rtol=1e-6)
    three, said = model_pixels(out, 3)
    assert said == GREY_TO_RGB and three.shape == (3, 1, 3)


def test_model_pixels_accepts_one_or_three_channels():
    pixels, said = model_pixels(RGB8.transpose(2, 0, 1), 1)  # uint8 (3, H, W)
    assert said == RGB_TO_GREY and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, luma_reference(RGB8.transpose(2, 0, 1) / 255), atol=1e-6)
    pixels, said = model_pixels(GREY8, 3)  # (H, W) for an RGB model
    assert said == GREY_TO_RGB and pixels.shape == (3, 9, 11)
    pixels, said = model_pixels(GREY8[None] / 255.0, 1)
    assert said is None and pixels.shape == (1, 9, 11)
    assert image_pixels(RGB8.transpose(2, 0, 1)).shape == (3, 9, 11)
    with pytest.raises(
        ValueError, match=r"\(H, W\), \(1, H, W\) or \(3, H, W\) for this model, got \(4, 9, 11\)"
    ):
        model_pixels(np.zeros((4, 9, 11), np.uint8), 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model_pixels(np.full((3, 2, 2), 2.0), 1)


# ---------------------------------------------------------------------------------------------
# predict and score maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_predict_converts_and_says_so(dtype):
    grey_net, rgb_net = small_net(1, dtype), small_net(3, dtype)
    photo = RNG.integers(0, 256, (3, 6, 6), dtype=np.uint8)
    result = predict(grey_net, photo)
    assert result.converted == RGB_TO_GREY
    expected = predict(grey_net, luma(photo / np.float32(255)))
    assert expected.converted is None
    np.testing.assert_allclose(result.probabilities, expected.probabilities, rtol=1e-6)
    assert result.to_dict()["converted"] == RGB_TO_GREY
    # A colour photo through a grey model differs from its red channel alone: luma is used.
    red = predict(grey_net, photo[:1])
    assert not np.allclose(red.probabilities, result.probabilities)
    grey = photo[0]
    result = predict(rgb_net, grey)
    assert result.converted == GREY_TO_RGB
    np.testing.assert_allclose(
        result.probabilities, predict(rgb_net, np.stack([grey] * 3)).probabilities, rtol=1e-6
    )
    assert predict(rgb_net, photo).to_dict()["converted"] is None


def test_score_map_converts_and_says_so_at_every_scale():
    fcn = to_fully_convolutional(small_net(1))
    photo = RNG.integers(0, 256, (3, 14, 17), dtype=np.uint8)
    result = score_map(fcn, photo)
    assert result.converted == RGB_TO_GREY
    assert result.to_dict(scores=False)["converted"] == RGB_TO_GREY
    reference = score_map(fcn, luma(photo / np.float32(255)))
    assert reference.converted is None
    np.testing.assert_allclose(result.probabilities, reference.probabilities, rtol=1e-5)
    multi = score_map(fcn, photo, scales=[1, 0.5])
    assert multi.converted == RGB_TO_GREY
    assert {m.converted for m in multi.maps} == {RGB_TO_GREY}
    assert multi.to_dict(scores=False)["converted"] == RGB_TO_GREY
    rgb_map = score_map(to_fully_convolutional(small_net(3)), photo[0])
    assert rgb_map.converted == GREY_TO_RGB


def test_heatmap_of_a_grey_model_is_drawn_over_the_colour_photo():
    fcn = to_fully_convolutional(small_net(1))
    photo = RNG.integers(0, 256, (3, 12, 16), dtype=np.uint8)
    result = score_map(fcn, photo)
    bare = result.heatmap(photo, 0, alpha=0.0)  # the photo itself, as the picture's base
    np.testing.assert_array_equal(np.asarray(bare), photo.transpose(1, 2, 0))
    half = np.asarray(result.heatmap(photo, 0, alpha=0.5)).astype(np.int64)
    grey = np.asarray(result.heatmap(luma(photo / 255.0), 0, alpha=0.5)).astype(np.int64)
    assert np.abs(half - grey).max() > 20  # the colours of the photo show through
    same = heatmap_image(photo, result.probabilities[0], stride=1, window=(6, 6), alpha=0.5)
    assert same.size == (16, 12)


# ---------------------------------------------------------------------------------------------
# The service: answers say what was converted, pictures are over the photo as sent
# ---------------------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A service of the shipped grey digits model and a small RGB model ``rgb``."""
    folder = tmp_path_factory.mktemp("colour-models")
    shutil.copy(SHIPPED, folder / "digits.safetensors")
    save_model(small_net(3), folder / "rgb.safetensors")
    with TestClient(create_app(Settings(models=folder))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the models did not load in time"
            time.sleep(0.02)
        yield client


def ranked_probabilities(answer: dict, k: int) -> np.ndarray:
    p = np.zeros(k)
    for r in answer["predictions"]:
        p[r["index"]] = r["probability"]
    return p


def test_service_predict_says_what_it_converted(service):
    photo = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # (H, W, 3)
    r = service.post("/v1/models/digits/predict?top_k=10", content=encode(photo), headers=PNG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["converted"] == "RGB to grey (ITU-R 601 luma)"
    fcn = load_fully_convolutional(SHIPPED)
    expected = predict(fcn, luma(photo.transpose(2, 0, 1) / np.float32(255)))
    np.testing.assert_allclose(ranked_probabilities(body, 10), expected.probabilities, atol=1e-6)
    grey = service.post("/v1/models/digits/predict", content=encode(photo[..., 0]), headers=PNG)
    assert grey.json()["converted"] is None
    r = service.post("/v1/models/rgb/predict", content=encode(photo[..., 0]), headers=PNG)
    assert r.json()["converted"] == "grey to RGB (repeated)"
    expected = predict(small_net(3), np.stack([photo[..., 0]] * 3))
    np.testing.assert_allclose(ranked_probabilities(r.json(), 3), expected.probabilities, atol=1e-6)
    assert (
        service.post("/v1/models/rgb/predict", content=encode(photo), headers=PNG).json()[
            "converted"
        ]
        is None
    )


def test_service_scoremap_converts_and_draws_over_the_colour_photo(service):
    photo = RNG.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    data = encode(photo)
    r = service.post("/v1/models/digits/scoremap?arrays=false", content=data, headers=PNG)
    assert r.status_code == 200, r.text
    assert r.json()["converted"] == "RGB to grey (ITU-R 601 luma)"
    url = "/v1/models/digits/scoremap?format=png&legend=false&class=3"
    r = service.post(url + "&alpha=0", content=data, headers=PNG)
    assert r.headers["x-cnnserve-converted"] == "RGB to grey (ITU-R 601 luma)"
    picture = pixels_of(io.BytesIO(r.content))
    np.testing.assert_array_equal(picture, photo)  # alpha 0: the photo itself, in colour
    r = service.post(url + "&alpha=0.6", content=data, headers=PNG)
    fcn = load_fully_convolutional(SHIPPED)
    pixels = photo.transpose(2, 0, 1)
    expected = score_map(fcn, pixels).heatmap(pixels, 3, alpha=0.6)
    np.testing.assert_array_equal(pixels_of(io.BytesIO(r.content)), expected)
    grey = service.post(url, content=encode(photo[..., 1]), headers=PNG)
    assert "x-cnnserve-converted" not in grey.headers
    r = service.post(
        "/v1/models/rgb/scoremap?arrays=false", content=encode(photo[..., 1]), headers=PNG
    )
    assert r.json()["converted"] == "grey to RGB (repeated)"


def test_service_schemas_document_converted(service):
    schemas = service.get("/openapi.json").json()["components"]["schemas"]
    for name in ("PredictResponse", "ScoreMapResponse"):
        converted = schemas[name]["properties"]["converted"]
        assert "converted" in schemas[name]["required"]
        assert {"type": "null"} in converted["anyOf"] and "ITU-R 601" in converted["description"]


# ---------------------------------------------------------------------------------------------
# The command line: colour folders train colour models; flags and folders checked
# ---------------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "colour_folder.py"


def make_colour_folder(out: Path, per_class: int = 60) -> None:
    """examples/colour_folder.py: classes red and green of equal luma, mixed sizes."""
    spec = importlib.util.spec_from_file_location("colour_folder", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()):
        module.main([str(out), "--per-class", str(per_class)])


README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def colour_runs(tmp_path_factory):
    """The README's colour commands, run as written in a fresh directory: a colour folder,
    the models `cnnserve train` makes of it (in colour and grey), predictions and maps."""
    root = tmp_path_factory.mktemp("colour")
    section = README.read_text().split("\n## Colour images\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)[0]
    printed = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for line in block.strip().splitlines():
            command = shlex.split(line, comments=True)
            if command[0] == ".venv/bin/python":
                assert command[1] == "examples/colour_folder.py"
                make_colour_folder(Path(command[2]))
                continue
            assert command[0] == "cnnserve", line
            output = io.StringIO()
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
                assert main(command[1:]) == 0, line
            printed[line] = output.getvalue()
    return root / "runs", printed


def test_readme_colour_commands_run_as_written(colour_runs):
    runs, printed = colour_runs
    lines = list(printed)
    assert [line.split()[1] for line in lines] == ["train"] * 2 + ["predict"] * 2 + ["scoremap"] * 2
    assert printed[lines[2]].splitlines()[1].split()[:2] == ["1.", "red"]
    assert "converted RGB to grey (ITU-R 601 luma) for the model;" in printed[lines[3]]
    assert "3 channel(s), converted RGB to grey" in printed[lines[5]]
    for name in ("rgb_red.png", "grey_red.png"):
        picture = pixels_of(runs / "colour" / name)
        assert picture.ndim == 3 and picture.shape[2] == 3
    assert (README.parent / "docs" / "colour_red_heatmaps.png").is_file()


def test_rgb_folders_train_colour_models_that_tell_what_grey_ones_cannot(colour_runs, capsys):
    # The folder's classes differ by colour only (their grey copies are alike): the colour
    # model learns them, the grey one stays near chance.
    runs = colour_runs[0] / "colour"
    rgb = read_model_file(runs / "rgb.safetensors")
    grey = read_model_file(runs / "grey.safetensors")
    assert rgb.model.input_shape == (3, 16, 16) and grey.model.input_shape == (1, 16, 16)
    assert rgb.training["image_size"] == [16, 16] and "channels" not in rgb.training
    assert grey.training["channels"] == 1
    assert min(rgb.training[k] for k in ("train_acc", "val_acc", "test_acc")) >= 0.95
    assert grey.training["test_acc"] <= 0.75
    # evaluate takes the image size and channels the model was trained with.
    capsys.readouterr()
    assert main(["evaluate", str(runs / "grey.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == grey.training["test_acc"]


def test_cli_predict_and_scoremap_of_a_colour_photo(colour_runs, capsys, tmp_path):
    data, runs = colour_runs[0] / "colour-data", colour_runs[0] / "colour"
    capsys.readouterr()
    assert main(["predict", str(runs / "rgb.safetensors"), str(data / "red.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["converted"] is None
    grey_model = str(runs / "grey.safetensors")
    assert main(["predict", grey_model, str(data / "red.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["converted"] == RGB_TO_GREY
    heat = tmp_path / "heat.png"
    command = ["scoremap", grey_model, str(data / "photo.png"), "--quiet", "--png", str(heat)]
    assert main([*command, "--alpha", "0", "--no-legend", "--json", str(tmp_path / "m.json")]) == 0
    assert "3 channel(s), converted RGB to grey" in capsys.readouterr().out
    photo = pixels_of(data / "photo.png")
    np.testing.assert_array_equal(pixels_of(heat), photo)  # over the colour photo
    assert json.loads((tmp_path / "m.json").read_text())["converted"] == RGB_TO_GREY
    rgb_model = str(runs / "rgb.safetensors")
    assert main(["scoremap", rgb_model, str(data / "photo.png"), "--quiet", "--class", "red"]) == 0
    out = capsys.readouterr().out
    assert "converted" not in out
    peak = re.search(r"class 'red': highest probability ([0-9.]+) at .* = \(([0-9.]+),", out)
    assert float(peak.group(1)) > 0.9 and float(peak.group(2)) < 16  # red is on the left


@pytest.mark.parametrize("value", ["0,4", "16", "a,b", "16,16,3", "-1,5", "16,"])
def test_bad_image_size_is_an_error_naming_the_flag(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "digits", f"--image-size={value}", "--out", "x.safetensors"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --image-size: must be two positive integers H,W" in err
    assert repr(value) in err


def test_bad_channels_and_image_size_for_a_named_set(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--data", "digits", "--channels", "2", "--out", "x.safetensors"])
    assert "argument --channels: invalid choice: 2 (choose from 1, 3)" in capsys.readouterr().err
    out = tmp_path / "m.safetensors"
    assert main(["train", "--data", "digits", "--image-size", "8,8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--image-size applies to image folders only, not to --data digits" in err
    assert not out.exists() and sorted(tmp_path.iterdir()) == []
    assert (
        main(
            [
                "train",
                "--data",
                str(_idx_folder(tmp_path)),
                "--image-size",
                "8,8",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert (
        "--image-size applies to image folders only, not to format 'idx'" in capsys.readouterr().err
    )


def _idx_folder(root: Path) -> Path:
    """An IDX directory of 4 tiny images a part (the header and nothing else checked)."""
    folder = root / "idx"
    folder.mkdir()
    for part, n in (("train", 20), ("t10k", 4)):
        images = struct.pack(">HBBIII", 0, 0x08, 3, n, 4, 4) + bytes(16 * n)
        labels = struct.pack(">HBBI", 0, 0x08, 1, n) + bytes(i % 2 for i in range(n))
        (folder / f"{part}-images-idx3-ubyte").write_bytes(images)
        (folder / f"{part}-labels-idx1-ubyte").write_bytes(labels)
    return folder


def test_bad_folders_are_errors_naming_the_folder_or_file(tmp_path, capsys):
    root = tmp_path / "folder"
    make_colour_folder(root, per_class=6)
    train = root / "train"
    command = ["train", "--data", str(train), "--image-size", "16,16", "--out"]
    out = str(tmp_path / "m.safetensors")
    shutil.rmtree(train / "green")
    assert main([*command, out]) == 2
    assert "an image folder needs at least 2 class sub-folders, found 1 (red)" in (
        capsys.readouterr().err
    )
    (train / "green").mkdir()
    assert main([*command, out]) == 2
    assert f"{(train / 'green').resolve()}: empty class folder" in capsys.readouterr().err
    (train / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert main([*command, out]) == 2
    err = capsys.readouterr().err
    assert f"{(train / 'green' / 'broken.png').resolve()}: cannot read image" in err
    (train / "green" / "broken.png").unlink()
    shutil.copy(train / "red" / "000.png", train / "green" / "000.png")
    assert main(["train", "--data", str(train), "--out", out]) == 2  # mixed sizes
    err = capsys.readouterr().err
    assert "(HxW)" in err and "(cnnserve train --image-size H,W) to resize every image" in err
    assert not (tmp_path / "m.safetensors").exists()
