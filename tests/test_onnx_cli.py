"""`cnnserve import` / `cnnserve export`, and *.onnx files in the service's model directory."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cnnserve.cli import main
from cnnserve.modelfile import load_model
from cnnserve.service import Settings, create_app
from tests.onnx_graphs import DATA, REFUSALS, expected
from tests.test_onnx import assert_scores_close, ort_scores

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits.safetensors"


def decode(array: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(array["data"]), "<f4").reshape(array["shape"])


def test_torch_lenet_goes_import_then_scoremap_and_matches_torch(tmp_path, capsys):
    """The issue's end to end: a PyTorch-trained LeNet, exported to ONNX by torch, imported,
    mapped by `cnnserve scoremap`: every cell is torch's logits on that crop."""
    out = tmp_path / "lenet.safetensors"
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(f"digit {k}" for k in range(10)) + "\n")
    args = ["import", str(DATA / "lenet.onnx"), "--out", str(out), "--classes-file", str(classes)]
    assert main([*args, "--mean", "0.5", "--std", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert f"imported {DATA / 'lenet.onnx'} -> {out}" in printed
    assert "10  affine 10  (classifier)" in printed
    model = load_model(out)
    assert model.class_names[3] == "digit 3" and model.normalization == {
        "mean": [0.5],
        "std": [0.25],
    }
    assert model.layers[0] == {"type": "conv", "filters": 6, "size": [5, 5], "stride": 1, "pad": 0}
    stored = expected("lenet")
    image = tmp_path / "canvas.npy"
    np.save(image, stored["image01"])
    answer = tmp_path / "map.json"
    assert main(["scoremap", str(out), str(image), "--json", str(answer), "--quiet"]) == 0
    result = json.loads(answer.read_text())
    assert result["map_shape"] == [4, 6]
    assert_scores_close(decode(result["logits"]), stored["dense"])


def test_import_json_and_default_out(tmp_path, capsys):
    source = tmp_path / "bn_avg.onnx"
    shutil.copy(DATA / "bn_avg.onnx", source)
    assert main(["import", str(source), "--classes", "a,b,c,d", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["out"] == str(tmp_path / "bn_avg.safetensors")
    assert info["class_names"] == ["a", "b", "c", "d"]
    assert info["notes"] == [
        "node '/LogSoftmax' (LogSoftmax) dropped: cnnserve's scores are the logits before it "
        "(cnnserve applies the softmax for probabilities itself)"
    ]
    stored = expected("bn_avg")
    model = load_model(tmp_path / "bn_avg.safetensors")
    scores = model.scores(stored["inputs"])
    assert np.allclose(
        scores - scores.max(1, keepdims=True),
        stored["scores"] - stored["scores"].max(1, keepdims=True),
        atol=1e-5,
    )


@pytest.mark.parametrize(("case", "make", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_import_refusals_exit_2_with_one_line(case, make, message, tmp_path, capsys):
    source = tmp_path / "bad.onnx"
    source.write_bytes(make())
    out = tmp_path / "bad.safetensors"
    assert main(["import", str(source), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnserve import: error: ONNX model ")
    assert message in lines[0] and "Traceback" not in captured.err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classes", "a,b"], "class_names must be 5 non-empty strings"),
        (
            ["--classes", "a,b,c,d,e", "--classes-file", "x"],
            "give --classes or --classes-file, not both",
        ),
        (["--classes-file", "nope.txt"], "--classes-file nope.txt not found"),
        (["--mean", "0.5"], "give --mean and --std together"),
        (["--mean", "0.5", "0.5", "--std", "x"], "--std must be numbers, got 'x'"),
        (["--mean", "0.5", "--std", "0.2"], "normalization['mean'] must be 2 finite numbers"),
        (["--out", "m.onnx"], "--out must end in .safetensors"),
    ],
)
def test_import_bad_options_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["import", str(DATA / "fc357.onnx"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_export_shipped_model_runs_in_onnx_runtime(tmp_path, capsys, digits):
    out = tmp_path / "digits.onnx"
    assert main(["export", str(DIGITS), "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "trained" and info["opset"] == 17
    assert info["input"] == {"name": "image", "shape": ["N", 1, 8, 8]}
    assert info["output"] == {"name": "scores", "shape": ["N", 10]}
    x = digits.X_test.astype(np.float32)
    assert_scores_close(ort_scores(out.read_bytes(), x), load_model(DIGITS).scores(x))


def test_export_converted_model_file_has_dynamic_height_and_width(tmp_path, capsys):
    converted = tmp_path / "digits_fcn.safetensors"
    assert main(["convert", str(DIGITS), "--out", str(converted)]) == 0
    capsys.readouterr()
    assert main(["export", str(converted)]) == 0
    printed = capsys.readouterr().out
    assert f"exported {converted} -> {tmp_path / 'digits_fcn.onnx'}" in printed
    assert (
        "a converted network: image ['N', 1, 'H', 'W'] -> scores ['N', 10, 'rows', 'cols']"
        in printed
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "m.safetensors"], "--out must end in .onnx"),
        (["--out", "nope/m.onnx"], "--out nope/m.onnx: directory nope not found"),
        (["--out", "."], "--out must end in .onnx"),
    ],
)
def test_export_bad_options_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(DIGITS), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_export_of_a_broken_model_file_exits_2(tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(DIGITS.read_bytes()[:500])
    assert main(["export", str(broken), "--out", str(tmp_path / "b.onnx")]) == 2
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize("command", ["import", "export"])
def test_without_onnx_the_commands_say_which_extra_to_install(
    command, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "onnx", None)
    source = DATA / "fc357.onnx" if command == "import" else DIGITS
    assert (
        main(
            [
                command,
                str(source),
                "--out",
                str(tmp_path / ("m.safetensors" if command == "import" else "m.onnx")),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(
        f"cnnserve {command}: error: ONNX import and export need the onnx package: pip install onnx (from a clone: .venv/bin/pip install -e '.[onnx]')"
    )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------


def wait_ready(client: TestClient) -> dict:
    import time

    deadline = time.monotonic() + 60
    while not (ready := client.get("/readyz").json()).get("status") == "ready":
        assert time.monotonic() < deadline, ready
        time.sleep(0.02)
    return ready


def test_service_applies_the_model_size_limits_to_onnx_files(tmp_path):
    """An imported graph over the service's limits is listed as failed, like a model file."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(DATA / "lenet.onnx", folder / "lenet.onnx")
    shutil.copy(DATA / "fc357.onnx", folder / "small.onnx")
    settings = Settings(models=folder, warmup=False, max_model_params=20_000)
    with TestClient(create_app(settings)) as client:
        ready = wait_ready(client)
    assert ready["models"] == ["small"]
    assert list(ready["failed"]) == ["lenet"]
    assert "more than the limit of 20,000" in ready["failed"]["lenet"], ready["failed"]


def test_service_serves_onnx_files_and_lists_refused_ones_as_failed(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(DIGITS, folder / "digits.safetensors")
    shutil.copy(DATA / "lenet.onnx", folder / "lenet.onnx")
    (folder / "digits.onnx").write_bytes((DATA / "fc357.onnx").read_bytes())  # a name taken
    refused = {}
    for k, (_case, make, message) in enumerate(REFUSALS):
        (folder / f"bad{k}.onnx").write_bytes(make())
        refused[f"bad{k}"] = message
    with TestClient(create_app(Settings(models=folder, warmup=False))) as client:
        ready = wait_ready(client)
        assert ready["models"] == ["digits", "lenet"]
        assert set(ready["failed"]) == {*refused, "digits.onnx"}
        for name, message in refused.items():
            assert message in ready["failed"][name], (name, ready["failed"][name])
            assert str(folder) not in ready["failed"][name]
        assert "another model file already has the name 'digits'" in ready["failed"]["digits.onnx"]
        detail = client.get("/v1/models/lenet").json()
        assert detail["input_shape"] == [1, 28, 28] and detail["geometry"]["stride"] == 4
        assert detail["training"]["imported_from"] == "onnx"
        assert detail["self_check"]["passed"] is True
        # the imported network classifies and maps like any other
        stored = expected("lenet")
        pixels = (stored["image01"][0] * 255).round().astype(np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, "PNG")
        png = {"Content-Type": "image/png"}
        answer = client.post("/v1/models/lenet/scoremap", content=encoded.getvalue(), headers=png)
        assert answer.status_code == 200, answer.text
        assert answer.json()["map_shape"] == [4, 6]


def test_import_input_shape_fixes_a_graph_without_a_fixed_size(tmp_path, capsys):
    from tests.onnx_graphs import _input_of

    source = tmp_path / "dynamic.onnx"
    source.write_bytes(_input_of(["N", 2, "H", 6]))
    assert main(["import", str(source)]) == 2
    assert "cnnserve import --input-shape C,H,W" in capsys.readouterr().err
    assert not (tmp_path / "dynamic.safetensors").exists()
    assert main(["import", str(source), "--input-shape", "2,6,6"]) == 0
    assert load_model(tmp_path / "dynamic.safetensors").input_shape == (2, 6, 6)
    with pytest.raises(SystemExit):
        main(["import", str(source), "--input-shape", "2,6"])
    assert "must be C,H,W, three positive ints, got '2,6'" in capsys.readouterr().err


def test_export_never_replaces_an_existing_file_by_default(tmp_path, capsys):
    """After `cnnserve import net.onnx`, `cnnserve export net.safetensors` would write net.onnx:
    the file the model came from is kept unless --out names it."""
    model = tmp_path / "net.safetensors"
    shutil.copy(DIGITS, model)
    (tmp_path / "net.onnx").write_bytes(b"the original")
    assert main(["export", str(model)]) == 2
    assert "net.onnx already exists" in capsys.readouterr().err
    assert (tmp_path / "net.onnx").read_bytes() == b"the original"
    assert main(["export", str(model), "--out", str(tmp_path / "net.onnx")]) == 0
    assert (tmp_path / "net.onnx").read_bytes() != b"the original"


@pytest.mark.parametrize("command", ["predict", "info"])
def test_model_commands_given_an_onnx_file_say_to_import_it(command, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    args = [str(DATA / "lenet.onnx"), *([str(image)] if command == "predict" else [])]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert "is an ONNX file: import it first with `cnnserve import" in err
