"""``cnnserve activations`` and ``cnnserve filters``: the pictures, and one-line errors that
write nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve import heatmap as heatmap_module
from cnnserve.cli import main
from cnnserve.model import ConvNet, load_model, save_model
from cnnserve.visualise import activation_grid, activation_sheet, activations, filter_grid

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:16, 0:16]
    pixels = np.rint((np.sin(x / 3.0) * np.cos(y / 4.0) * 0.5 + 0.5) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("image") / "digit.png"
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(path)  # RGB: converted to gray
    return path


def test_activations_writes_the_chosen_layers(digit_png, tmp_path, capsys):
    out = tmp_path / "act.png"
    assert (
        main(
            [
                "activations",
                str(MODEL),
                str(digit_png),
                "--out",
                str(out),
                "--layers",
                "input,0,2,10",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "16x16 pixels, resized to 8x8" in text
    assert "0  conv 32 3x3 s1 p0  (32, 6, 6)" in text and "10  scores  (10)" in text
    assert "wrote" in text and "4 layer(s)" in text
    model = load_model(MODEL)
    image = np.asarray(Image.open(digit_png).convert("L"))
    expected = activation_sheet(
        activation_grid(
            activations(model, image), layers="input,0,2,10", class_names=model.class_names
        )
    )
    with Image.open(out) as picture:
        np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), np.asarray(expected))


def test_filters_writes_a_layers_filters(tmp_path, capsys):
    out = tmp_path / "filters.png"
    assert main(["filters", str(MODEL), "--out", str(out), "--layer", "2", "--tile", "12"]) == 0
    assert (
        "W2: conv 64 3x3 s1 p0 (layer 3), filters of shape (64, 32, 3, 3)"
        in capsys.readouterr().out
    )
    expected = filter_grid(load_model(MODEL), 2, tile=12).picture
    with Image.open(out) as picture:
        np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), np.asarray(expected))


def test_errors_are_one_line_and_write_nothing(digit_png, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.png"
    base = ["activations", str(MODEL), str(digit_png), "--out", str(out)]
    assert main([*base, "--layers", "0,11"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        "cnnserve activations: error: layer '11' is not a layer of this network; the layers are input, 0 (conv 32 3x3 s1 p0)"
        in err
    )
    assert main(["filters", str(MODEL), "--out", str(out), "--layer", "3"]) == 2
    assert (
        "its conv layers are 1 (conv 32 3x3 s1 p0, layer 0), 2 (conv 64 3x3 s1 p0, layer 3)"
        in capsys.readouterr().err
    )
    no_conv = tmp_path / "dense.safetensors"
    save_model(ConvNet([{"type": "affine", "units": 8}], (1, 8, 8), 3), no_conv)
    assert main(["filters", str(no_conv), "--out", str(out)]) == 2
    assert "error: the model has no conv layers, so no filters to draw" in capsys.readouterr().err
    assert main(["activations", str(MODEL), str(tmp_path / "none.png"), "--out", str(out)]) == 2
    assert main([*base[:3], "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    monkeypatch.setattr(heatmap_module, "MAX_PICTURE_PIXELS", 50_000)
    assert main(base) == 2
    assert (
        "more than 50,000 pixels; ask for fewer layers or a smaller tile" in capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.safetensors"]


@pytest.mark.parametrize("command", ["activations", "filters"])
@pytest.mark.parametrize("tile", ["0", "1", "3", "513", "100000"])
def test_tile_out_of_range_is_one_argparse_error(digit_png, tmp_path, capsys, command, tile):
    """Every tile outside 4..512 gets the same message, from argparse, before any work."""
    out = tmp_path / "x.png"
    args = [str(MODEL), str(digit_png)] if command == "activations" else [str(MODEL)]
    with pytest.raises(SystemExit) as exc:
        main([command, *args, "--out", str(out), "--tile", tile])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --tile: must be 4 to 512, got {int(tile)}" in err
    assert not out.exists()


def test_the_cli_tile_range_is_the_library_s():
    from cnnserve.cli import inside
    from cnnserve.visualise import TILE_RANGE

    assert inside.TILE_RANGE == TILE_RANGE
