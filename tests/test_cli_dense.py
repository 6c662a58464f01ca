"""The convert, scoremap and demo commands, and info on a converted model file."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.cli import main
from cnnserve.convert import load_fully_convolutional
from cnnserve.data import digits_canvas
from cnnserve.dense import score_map

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "digits_fcn.safetensors"
    assert main(["convert", str(MODEL), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    pixels, placements = digits_canvas((40, 64), 4, seed=1)
    path = tmp_path_factory.mktemp("canvas") / "canvas.png"
    Image.fromarray(np.rint(pixels[0] * 255).astype(np.uint8)).save(path)
    return path, placements


def test_convert_prints_geometry_and_check(converted, tmp_path, capsys):
    out = tmp_path / "again.safetensors"
    assert main(["convert", str(MODEL), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "total stride S: 2" in text
    assert "window T: 8x8" in text
    assert "receptive field R: 8x8" in text
    assert "dense maps: exact" in text
    assert "self-check: passed on 8 training-size inputs" in text
    assert "layer 7 (affine 128)" in text
    fcn = load_fully_convolutional(out)
    assert fcn.check["passed"] and fcn.check["max_abs_diff"] <= fcn.check["tolerance"]
    assert fcn.training["dataset"] == "digits"  # the training record travels along


def test_convert_default_out_and_json(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    model.write_bytes(MODEL.read_bytes())
    assert main(["convert", str(model), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["out"] == str(tmp_path / "m_fcn.safetensors")
    assert (tmp_path / "m_fcn.safetensors").is_file()
    assert record["geometry"] == {
        "stride": 2,
        "window": [8, 8],
        "receptive_field": [8, 8],
        "offset": [0, 0],
        "exact": True,
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "missing.safetensors", "--out", "x.safetensors"], "does not exist"),
        (["convert", str(MODEL), "--out", "x.bin"], "must end in .safetensors"),
    ],
)
def test_convert_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_convert_refuses_a_converted_file(converted, tmp_path, capsys):
    assert main(["convert", str(converted), "--out", str(tmp_path / "b.safetensors")]) == 2
    assert "is a converted (fully convolutional) model file" in capsys.readouterr().err


def test_info_on_a_converted_file(converted, capsys):
    assert main(["info", str(converted)]) == 0
    text = capsys.readouterr().out
    assert "a converted (fully convolutional) network" in text
    assert "total stride S: 2" in text and "self-check: passed" in text
    assert main(["info", str(converted), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["converted"] is True and record["geometry"]["stride"] == 2


def test_scoremap_json_and_png(converted, canvas, tmp_path, capsys):
    image, placements = canvas
    out_json, out_png = tmp_path / "map.json", tmp_path / "heat.png"
    argv = ["scoremap", str(converted), str(image), "--class", "3", "--quiet"]
    argv += ["--json", str(out_json), "--png", str(out_png), "--zoom", "2", "--cells"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "map 17x29 cells at stride 2 px" in text
    assert "class '3': highest probability" in text

    record = json.loads(out_json.read_text())
    assert record["map_shape"] == [17, 29]
    assert record["image_size"] == [40, 64]
    logits = record["logits"]
    values = np.frombuffer(base64.b64decode(logits["data"]), dtype="<f4").reshape(logits["shape"])
    pixels = np.asarray(Image.open(image), dtype=np.uint8)
    expected = score_map(load_fully_convolutional(MODEL), pixels)
    np.testing.assert_array_equal(values, expected.logits)
    assert len(record["cells"]) == 17 * 29
    assert record["cells"][30]["box"] == [2, 2, 10, 10]  # row 1, column 1

    with Image.open(out_png) as picture:  # the heatmap, its class label and colour bar
        assert picture.width > 128 + 30 and picture.height > 80 + 15 and picture.mode == "RGB"
        framed = np.asarray(picture.convert("RGB"))
    bare_png = tmp_path / "bare.png"
    assert main([*argv[:6], "--png", str(bare_png), "--zoom", "2", "--no-legend"]) == 0
    with Image.open(bare_png) as picture:  # just the heatmap, to lay over the image
        assert picture.size == (128, 80)
        bare = np.asarray(picture.convert("RGB"))
    assert any(np.array_equal(framed[y : y + 80, 6 : 6 + 128], bare) for y in range(40))


def test_scoremap_accepts_a_trained_model_a_npy_array_and_finer_maps(canvas, tmp_path, capsys):
    image, _ = canvas
    array = tmp_path / "canvas.npy"
    np.save(array, np.asarray(Image.open(image), dtype=np.uint8))
    argv = ["scoremap", str(MODEL), str(array), "--stride-divisor", "2", "--quiet"]
    assert main(argv) == 0
    assert "map 33x57 cells at stride 1 px" in capsys.readouterr().out
    assert main(["scoremap", str(MODEL), str(array), "--scales", "1,1.5", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "scale 1: map 17x29" in text and "scale 1.5: map 27x45" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--class", "eleven"], "neither a class name nor an index"),
        (["--class", "10"], "neither a class name nor an index"),
        (["--stride-divisor", "3"], "must divide the network's total stride 2"),
        (["--scales", "1,x"], "--scales must be numbers"),
        (["--scales", "0.1"], "smaller than the network's 8x8 window"),
        (["--json", "no/such/dir/out.json"], "directory no/such/dir not found"),
    ],
)
def test_scoremap_option_errors(extra, message, canvas, capsys):
    image, _ = canvas
    assert main(["scoremap", str(MODEL), str(image), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err


def test_scoremap_image_errors(tmp_path, capsys):
    small = tmp_path / "small.png"
    Image.new("L", (7, 20)).save(small)
    assert main(["scoremap", str(MODEL), str(small)]) == 2
    assert "smaller than the network's 8x8 window" in capsys.readouterr().err
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["scoremap", str(MODEL), str(text)]) == 2
    assert "cannot be decoded as an image" in capsys.readouterr().err
    assert main(["scoremap", str(MODEL), str(tmp_path / "none.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((20, 20), 2.0))
    assert main(["scoremap", str(MODEL), str(bad)]) == 2
    assert "must hold pixels in [0, 1]" in capsys.readouterr().err


def test_demo_finds_every_digit_at_its_window(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", str(MODEL), "--out", str(out), "--size", "40x80", "--count", "5"]) == 0
    text = capsys.readouterr().out
    assert "5/5 digits classified correctly at their own window" in text
    with Image.open(out / "canvas.png") as picture:  # the canvas itself, for scoremap
        assert picture.size == (80, 40) and picture.mode == "L"
    assert main(["scoremap", str(MODEL), str(out / "canvas.png"), "--quiet"]) == 0
    assert "map 17x37 cells" in capsys.readouterr().out
    with Image.open(out / "heatmaps.png") as picture:
        # 5 panels, 2 columns: each heatmap (320 x 160) with its label and colour bar
        width, height = picture.size
        assert (width - 4) % 2 == 0 and (height - 2 * 4) % 3 == 0
        assert (width - 4) // 2 > 320 + 30 and (height - 2 * 4) // 3 > 160 + 15


def test_demo_with_the_detector_puts_every_peak_on_its_digit(tmp_path, capsys):
    detector = MODEL.parent / "digits_detector.safetensors"
    out = tmp_path / "demo"
    assert main(["demo", str(detector), "--out", str(out), "--size", "48x96", "--count", "6"]) == 0
    text = capsys.readouterr().out
    assert "6/6 digits' classes peak within 1 px of the digit" in text


def test_demo_needs_a_digits_model(tmp_path, capsys):
    from cnnserve.model import ConvNet, save_model

    other = tmp_path / "other.safetensors"
    save_model(ConvNet([{"type": "conv", "filters": 2, "size": 3}], (1, 9, 9), 10), other)
    assert main(["demo", str(other), "--out", str(tmp_path / "d")]) == 2
    assert "it needs a digits model" in capsys.readouterr().err


def test_scoremap_refuses_bad_options_before_any_work_and_writes_nothing(canvas, tmp_path, capsys):
    image, _ = canvas
    out_json, out_png = tmp_path / "map.json", tmp_path / "heat.png"
    base = ["scoremap", str(MODEL), str(image), "--quiet", "--json", str(out_json)]
    assert main([*base, "--png", str(out_png), "--alpha", "2"]) == 2
    assert "--alpha must be in [0, 1]" in capsys.readouterr().err
    assert main([*base, "--png", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    assert main([*base, "--png", str(out_png), "--zoom", "100000"]) == 2
    assert "--zoom 100000 would make a 4000000x6400000 (HxW) picture" in (capsys.readouterr().err)
    assert sorted(tmp_path.iterdir()) == []  # no JSON written before the PNG failed


def test_scoremap_zoom_has_the_services_limit(tmp_path, capsys):
    """An 8 x 8 image at --zoom 1000 would fit the picture limit; the zoom limit refuses it."""
    from cnnserve.heatmap import MAX_ZOOM

    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    base = ["scoremap", str(MODEL), str(image), "--quiet", "--png", str(tmp_path / "h.png")]
    assert main([*base, "--zoom", "1000"]) == 2
    err = capsys.readouterr().err
    assert f"--zoom must be at most {MAX_ZOOM}, got 1000" in err and err.count("\n") == 1
    assert not (tmp_path / "h.png").exists()
    assert main([*base, "--zoom", str(MAX_ZOOM)]) == 0
    with Image.open(tmp_path / "h.png") as picture:
        assert picture.width >= 8 * MAX_ZOOM


@pytest.mark.parametrize(
    "content, message",
    [
        ("huge", "at most"),
        ("objects", "no Python objects"),
        ("truncated", "shorter than its header says"),
        ("garbage", "cannot read image array"),
    ],
)
def test_scoremap_npy_checked_before_loading(content, message, tmp_path, capsys):
    path = tmp_path / "x.npy"
    if content == "huge":  # a 128-byte file whose header claims 40 billion values
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(
                handle, {"descr": "<f4", "fortran_order": False, "shape": (200000, 200000)}
            )
    elif content == "objects":
        np.save(path, np.array([[None]], dtype=object), allow_pickle=True)
    elif content == "truncated":
        np.save(path, np.zeros((64, 64), dtype=np.float32))
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path.write_bytes(b"not a numpy file at all")
    assert main(["scoremap", str(MODEL), str(path)]) == 2
    assert message in capsys.readouterr().err


def test_demo_refuses_before_writing_anything(tmp_path, capsys):
    from cnnserve.model import ConvNet, preset_layers, save_model

    out = tmp_path / "demo"
    assert main(["demo", str(MODEL), "--out", str(out), "--size", "4096x4096"]) == 2
    assert "is over 4,194,304 pixels" in capsys.readouterr().err
    assert main(["demo", str(MODEL), "--out", str(out), "--zoom", "5000"]) == 2
    assert "--zoom 5000 would make a 240000x480000 (HxW) picture" in capsys.readouterr().err
    # A digits model without a test split: its "held-out" digits would be training digits.
    no_test = tmp_path / "no_test.safetensors"
    net = ConvNet(preset_layers("digits", (1, 8, 8)), (1, 8, 8), 10)
    save_model(net, no_test, training={"dataset": "digits", "seed": 0, "test_fraction": 0.0})
    assert main(["demo", str(no_test), "--out", str(out)]) == 2
    assert "needs a model trained on 'digits' or 'digits-windows' with a test split" in (
        capsys.readouterr().err
    )
    assert not out.exists()


def test_scoremap_default_class_skips_background(capsys):
    detector = MODEL.parent / "digits_detector.safetensors"
    canvas = MODEL.parent / "digits_demo" / "canvas.png"
    assert main(["scoremap", str(detector), str(canvas), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "top-5 by max over cells: background" in text
    assert "class 'background'" not in text and "highest probability" in text
