"""The ``cnnserve`` command: train, evaluate, info, and their errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnserve.cli import main
from cnnserve.model import read_model_file

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "digits.safetensors"


@pytest.fixture(autouse=True)
def in_a_fresh_directory(tmp_path, monkeypatch):
    """Every test runs in its own directory: the default run directory, runs/NAME/, is there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained for two epochs on part of the digits; its run in run/."""
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
            "--run-dir",
            str(out.parent / "run"),
            "--quiet",
            "--seed",
            "1",
        ]
    )
    assert status == 0
    return out


def test_train_writes_model_history_and_checkpoint(trained):
    folder = trained.parent
    assert sorted(p.name for p in folder.iterdir()) == ["run", "small.safetensors"]
    folder = folder / "run"  # the checkpoint and the histories, never beside the model
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
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


SMALL = ["--data", "digits", "--limit", "300", "--seed", "1", "--quiet"]


def test_resume_continues_the_run_bit_for_bit(trained, tmp_path):
    # The fixture ran 2 epochs of a planned 2; resuming with --epochs 3 adds one more, and
    # must end exactly where a straight 3-epoch run ends.
    checkpoint = trained.parent / "run" / "small_checkpoint.safetensors"
    resumed, straight = tmp_path / "resumed.safetensors", tmp_path / "straight.safetensors"
    assert (
        main(
            [
                "train",
                "--resume",
                str(checkpoint),
                "--epochs",
                "3",
                "--quiet",
                "--out",
                str(resumed),
                "--run-dir",
                str(tmp_path),
            ]
        )
        == 0
    )  # the data and options come from the checkpoint
    assert main(["train", *SMALL, "--epochs", "3", "--out", str(straight)]) == 0
    a, b = read_model_file(resumed), read_model_file(straight)
    for name, value in b.model.state_tensors().items():
        np.testing.assert_array_equal(a.model.state_tensors()[name], value, err_msg=name)
    assert a.training["test_acc"] == b.training["test_acc"]
    history = json.loads((tmp_path / "resumed_history.json").read_text())
    assert len(history["train_acc_history"]) == 3


def test_resume_refuses_options_that_would_change_the_run(trained, tmp_path, capsys):
    checkpoint = trained.parent / "run" / "small_checkpoint.safetensors"
    argv = [
        "train",
        "--resume",
        str(checkpoint),
        "--out",
        str(tmp_path / "m.safetensors"),
        "--lr",
        "0.01",
        "--arch",
        "lenet",
        "--quiet",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 (the run has 0.001)" in err and "--arch lenet (the run has digits)" in err
    assert not (tmp_path / "m.safetensors").exists()
    assert main(["train", "--resume", str(trained), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "not a checkpoint written by `cnnserve train`" in capsys.readouterr().err


def test_evaluate_keeps_the_training_split_for_the_same_data_named_differently(trained, capsys):
    assert main(["evaluate", str(trained), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(trained), "--data", "DIGITS", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == default  # still the seed-1 split
    assert main(["evaluate", str(trained), "--seed", "0", "--json"]) == 0
    captured = capsys.readouterr()
    assert "overlap its training images" in captured.err


def test_evaluate_a_folder_data_set_by_relative_path(tmp_path, monkeypatch, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("dark", "light"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for k in range(20):
            level = 40 if name == "dark" else 200
            pixels = np.clip(rng.normal(level, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{k}.png")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "f.safetensors"
    assert (
        main(
            [
                "train",
                "--data",
                "imgs",
                "--seed",
                "5",
                "--epochs",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert read_model_file(out).training["dataset"] == str(tmp_path / "imgs")
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", "imgs", "--json"]) == 0
    relative = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == relative
    assert relative["samples"] == 8 and relative["accuracy"] == 1.0


def test_an_empty_test_split_still_saves_the_model(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["train", *SMALL, "--epochs", "1", "--test-fraction", "0", "--out", str(out)]) == 0
    assert "test n/a" in capsys.readouterr().out
    assert "test_acc" not in read_model_file(out).training


def test_output_problems_are_found_before_training(tmp_path, capsys):
    (tmp_path / "taken.safetensors").mkdir()
    assert main(["train", *SMALL, "--out", str(tmp_path / "taken.safetensors")]) == 2
    assert "is a directory" in capsys.readouterr().err
    new_dir = tmp_path / "new" / "deeper"
    assert main(["train", *SMALL, "--lr", "-1", "--out", str(new_dir / "m.safetensors")]) == 2
    assert "--lr must be in [0, inf), got -1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nothing is left behind for a run that never ran


def test_checkpoint_name_may_carry_the_suffix(tmp_path):
    out, checkpoint = tmp_path / "m.safetensors", tmp_path / "ck.safetensors"
    assert (
        main(["train", *SMALL, "--epochs", "1", "--out", str(out), "--checkpoint", str(checkpoint)])
        == 0
    )
    assert checkpoint.is_file() and read_model_file(checkpoint).state is not None


def test_a_failed_write_is_one_line_with_status_1(tmp_path, capsys, monkeypatch):
    import cnnserve.modelfile

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cnnserve.modelfile, "save_model", disk_full)
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path / "m.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "cnnserve train: error: [Errno 28] No space left on device"


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
            "--lr must be in [0, inf), got -1",
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


def test_a_reader_that_leaves_early_is_not_an_error():
    # `cnnserve info MODEL | head -1`: the reader is gone by the time the command prints.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cnnserve", "info", str(SHIPPED)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0
    assert done.stderr == b""


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "--lr must be in [0, inf), got -1"),
        (["--lr", "inf"], "--lr must be in [0, inf), got inf"),
        (["--lr-decay", "1.5"], "--lr-decay must be in (0, 1], got 1.5"),
        (["--lr-decay", "0"], "--lr-decay must be in (0, 1], got 0"),
        (["--reg", "nan"], "--reg must be in [0, inf), got nan"),
        (["--weight-scale", "0"], "--weight-scale must be in (0, inf), got 0"),
        (
            ["--arch", "resnet"],
            "--arch 'resnet' is neither a preset (digits, three_layer, lenet) nor a JSON file",
        ),
        (["--epochs", "x"], "argument --epochs: expected a positive integer, got 'x'"),
    ],
)
def test_train_checks_every_flag_before_loading_data(tmp_path, monkeypatch, capsys, flags, message):
    import cnnserve.data

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the flags were checked")

    monkeypatch.setattr(cnnserve.data, "load_dataset", no_data)
    out = tmp_path / "m.safetensors"
    try:  # argparse's own errors exit with 2, the command's return 2
        status = main(["train", "--data", "digits", *flags, "--out", str(out), "--quiet"])
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # not even the data summary
    assert captured.err.strip().splitlines()[-1] == f"cnnserve train: error: {message}"
    assert "Traceback" not in captured.err and "positive_int" not in captured.err
    assert list(tmp_path.iterdir()) == []
