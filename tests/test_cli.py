"""The ``cnnserve`` command: train, evaluate, info, and their errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnserve.cli import confusion_matrix, format_confusion, main
from cnnserve.model import read_model_file

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "digits.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained for two epochs on part of the digits."""
    out = tmp_path_factory.mktemp("cli") / "small.safetensors"
    status = main(
        [
            "train",
            "--data",
            "digits",
            "--limit",
            "300",
            "--epochs",
            "2",
            "--out",
            str(out),
            "--quiet",
            "--seed",
            "1",
        ]
    )
    assert status == 0
    return out


def test_train_writes_model_history_and_checkpoint(trained):
    folder = trained.parent
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "small.safetensors",
        "small_checkpoint.safetensors",
        "small_checkpoint_history.json",
        "small_checkpoint_history.png",
        "small_history.json",
        "small_history.png",
    ]
    file = read_model_file(trained)
    record = file.training
    assert record["dataset"] == "digits" and record["epochs"] == 2 and record["seed"] == 1
    assert record["num_train"] == 300
    assert 0.5 < record["test_acc"] <= 1.0  # two epochs on 300 images already learn a lot
    assert file.model.normalization is not None
    history = json.loads((folder / "small_history.json").read_text())
    assert len(history["train_acc_history"]) == 2


def test_evaluate_prints_accuracy_and_confusion_matrix(trained, capsys):
    assert main(["evaluate", str(trained), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    matrix = np.array(result["confusion_matrix"])
    assert result["split"] == "test" and result["dataset"] == "digits"
    assert matrix.sum() == result["samples"] == 359
    assert result["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    # The model file's record gives the test accuracy of the same split.
    assert result["accuracy"] == pytest.approx(read_model_file(trained).training["test_acc"])
    assert main(["evaluate", str(trained)]) == 0
    text = capsys.readouterr().out
    assert "accuracy:" in text and "true \\ predicted" in text


def test_info_shows_architecture_and_record(trained, capsys):
    assert main(["info", str(trained)]) == 0
    text = capsys.readouterr().out
    for expected in (
        "input shape (C, H, W): (1, 8, 8)",
        "conv 32 3x3 s1 p0",
        "training record",
        "test_acc",
        "total parameters",
    ):
        assert expected in text
    assert main(["info", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_shape"] == [1, 8, 8] and info["parameters"] > 0


def test_resume_continues_from_a_checkpoint(trained, tmp_path):
    checkpoint = trained.parent / "small_checkpoint.safetensors"
    out = tmp_path / "more.safetensors"
    status = main(
        [
            "train",
            "--data",
            "digits",
            "--limit",
            "300",
            "--epochs",
            "3",
            "--seed",
            "1",
            "--out",
            str(out),
            "--resume",
            str(checkpoint),
            "--quiet",
        ]
    )
    assert status == 0
    history = json.loads((tmp_path / "more_history.json").read_text())
    assert len(history["train_acc_history"]) == 3


def test_architecture_from_a_json_file(tmp_path):
    arch = tmp_path / "arch.json"
    arch.write_text(
        json.dumps({"layers": [{"type": "conv", "filters": 4, "size": 3}, {"type": "relu"}]})
    )
    out = tmp_path / "tiny.safetensors"
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--limit",
                "100",
                "--epochs",
                "1",
                "--arch",
                str(arch),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert read_model_file(out).model.layers[0]["filters"] == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "no/such/dir", "--out", "{tmp}/m.safetensors"], "no/such/dir"),
        (
            ["train", "--data", "digits", "--arch", "resnet", "--out", "{tmp}/m.safetensors"],
            "neither a preset",
        ),
        (
            [
                "train",
                "--data",
                "digits",
                "--arch",
                "{tmp}/bad.json",
                "--out",
                "{tmp}/m.safetensors",
            ],
            "not a readable JSON file",
        ),
        (["train", "--data", "digits", "--out", "{tmp}/m.pt"], "must end in .safetensors"),
        (
            [
                "train",
                "--data",
                "digits",
                "--lr",
                "-1",
                "--epochs",
                "1",
                "--out",
                "{tmp}/m.safetensors",
            ],
            "learning_rate",
        ),
        (["evaluate", "{tmp}/missing.safetensors"], "does not exist"),
        (["evaluate", "{tmp}/bad.json"], "not a readable safetensors file"),
        (["info", "{tmp}/bad.json"], "not a readable safetensors file"),
    ],
)
def test_errors_are_one_line_with_status_2(tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text("{not json")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cnnserve {argv[0]}: error:")
    assert message in err and "\n" not in err
    assert not (tmp_path / "m.safetensors").exists()


def test_evaluate_refuses_data_of_another_shape(tmp_path, capsys):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for k in range(5):
            Image.new("L", (5, 5), color=40 * k).save(tmp_path / "imgs" / name / f"{k}.png")
    status = main(["evaluate", str(SHIPPED), "--data", str(tmp_path / "imgs")])
    assert status == 2
    assert "takes (1, 8, 8) images of 10 classes" in capsys.readouterr().err


def test_confusion_matrix_counts():
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    assert format_confusion(matrix, ["x", "y", "z"]).splitlines()[2].split() == ["x", "1", "1", "0"]


def test_shipped_model_reaches_98_percent_on_the_held_out_digits(capsys):
    assert SHIPPED.is_file(), "models/digits.safetensors is missing"
    assert main(["evaluate", str(SHIPPED), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "digits" and result["split"] == "test"
    assert result["accuracy"] >= 0.98
    record = read_model_file(SHIPPED).training
    assert record["test_acc"] == pytest.approx(result["accuracy"])
    model = read_model_file(SHIPPED).model
    assert all(spec.get("pad", 0) == 0 for spec in model.layers)  # dense maps are exact


def test_the_module_runs_as_a_command():
    done = subprocess.run(
        [sys.executable, "-m", "cnnserve", "info", str(SHIPPED)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "classes (10): 0, 1, 2" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "cnnserve", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.startswith("cnnserve 0.1.0")
