"""``cnnserve detect``: the library's detections, as a table, as JSON and drawn; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.boxes import BOX_COLOUR
from cnnserve.cli import main
from cnnserve.dense import score_map
from cnnserve.images import read_image_file

ROOT = Path(__file__).resolve().parents[1]
DETECTOR = str(ROOT / "models" / "digits_detector.safetensors")
CANVAS = str(ROOT / "models" / "digits_demo" / "canvas.png")


def test_json_is_the_librarys(capsys):
    argv = ["detect", DETECTOR, CANVAS, "--class", "7", "--scales", "1,0.75", "--json"]
    assert main([*argv, "--threshold", "0.4", "--nms-iou", "0.2", "--quiet"]) == 0
    record = json.loads(capsys.readouterr().out)
    result = score_map(DETECTOR, read_image_file(CANVAS, 1), scales=[1, 0.75])
    want = [d.to_dict() for d in result.detections("7", 0.4, 0.2)]
    assert want and record["detections"] == want
    assert record["class"] == {"label": "7", "index": 7}
    assert record["scales"] == [1.0, 0.75] and record["image_size"] == {"height": 48, "width": 96}
    assert (record["threshold"], record["nms_iou"]) == (0.4, 0.2)


def test_table_and_png(tmp_path, capsys):
    out = tmp_path / "boxes.png"
    assert main(["detect", DETECTOR, CANVAS, "--class", "3", "--png", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    best = score_map(DETECTOR, read_image_file(CANVAS, 1)).detections("3")[0]
    box = ", ".join(f"{v:.1f}" for v in best.box)
    assert f"  1. 3 {best.score:.3f} at scale 1: box (x0, y0, x1, y1) = ({box})" in text
    assert f"wrote {out}: 1 box(es)" in text
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert (picture == BOX_COLOUR).all(axis=2).sum() > 20  # the box's outline and label tab


def test_nothing_found_says_so(capsys):
    assert main(["detect", DETECTOR, CANVAS, "--class", "8", "--threshold", "1", "--quiet"]) == 0
    assert "no detection of '8' at or above 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--threshold", "2"], "argument --threshold: must be in [0, 1], got 2"),
        (["--threshold", "nan"], "argument --threshold: must be in [0, 1]"),
        (["--nms-iou", "x"], "argument --nms-iou: expected a number in [0, 1], got 'x'"),
        (["--scales", "0"], "--scales must be numbers in (0, 64] separated by commas"),
        (["--scales", "1,,0.5"], "--scales must be numbers"),
        (["--class", "cat"], "--class 'cat' is neither a class name nor an index"),
        (["--stride-divisor", "3"], "--stride-divisor must divide the network's total stride 2"),
        (["--png", "/no/such/dir/x.png"], "--png /no/such/dir/x.png: directory /no/such/dir"),
        (["--png", "out.png", "--zoom", "1000"], "--zoom"),
    ],
)
def test_bad_flags_are_one_line_errors(args, text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        status = main(["detect", DETECTOR, CANVAS, "--quiet", *args])
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_missing_image(tmp_path, capsys):
    assert main(["detect", DETECTOR, str(tmp_path / "none.png"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
