"""``cnnserve train``'s augmentation, early stopping, run directory, resume and progress, its
usage and messages, and ``cnnserve evaluate``'s per-class table."""

import argparse
import json

import numpy as np
import pytest

from cnnserve.cli import build_parser, main
from cnnserve.evaluate import Evaluation, class_metrics
from cnnserve.model import read_model_file

SMALL = ["--data", "digits", "--limit", "200", "--seed", "1", "--batch-size", "100"]


@pytest.fixture(autouse=True)
def in_a_fresh_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_the_run_directory_holds_checkpoint_and_history_not_the_model_folder(tmp_path, capsys):
    assert main(["train", *SMALL, "--epochs", "2", "--out", "trained/m.safetensors"]) == 0
    assert files(tmp_path / "trained") == ["m.safetensors"]
    assert files(tmp_path / "runs") == [
        "m/m_checkpoint.safetensors",
        "m/m_checkpoint_history.json",
        "m/m_checkpoint_history.png",
        "m/m_history.json",
        "m/m_history.png",
    ]
    out = capsys.readouterr().out
    assert "wrote trained/m.safetensors; history runs/m/m_history.json" in out
    record = read_model_file("trained/m.safetensors").training
    assert record["augment"] == "none"  # the digits' default
    assert record["out"] == "trained/m.safetensors" and record["run_dir"] == "runs/m"
    argv = ["train", *SMALL, "--epochs", "1", "--augment", "shift=1,flip=0"]
    assert main([*argv, "--out", "m2.safetensors", "--run-dir", "r"]) == 0
    assert read_model_file("m2.safetensors").training["augment"] == "shift=1"
    assert files(tmp_path / "r") == [
        "m2_checkpoint.safetensors",
        "m2_checkpoint_history.json",
        "m2_checkpoint_history.png",
        "m2_history.json",
        "m2_history.png",
    ]


def test_resume_without_out_writes_the_runs_model_file_and_a_finished_run_writes_nothing(
    tmp_path, capsys
):
    assert main(["train", *SMALL, "--epochs", "1", "--out", "trained/m.safetensors"]) == 0
    checkpoint = tmp_path / "runs/m/m_checkpoint.safetensors"
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    # finished: 1 of 1 epochs done
    assert main(["train", "--resume", str(checkpoint), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "the run is finished: 1 of 1 epochs are done; give --epochs above 1" in err
    assert "Nothing was written" in err
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    # go on to 2 epochs: the model file the run records, the checkpoint where it was
    assert main(["train", "--resume", str(checkpoint), "--epochs", "2", "--quiet"]) == 0
    assert read_model_file("trained/m.safetensors").training["epochs"] == 2
    assert read_model_file(checkpoint).state["epoch"] == 2
    assert files(tmp_path / "trained") == ["m.safetensors"]


def test_resume_keeps_the_augmentation(tmp_path, capsys):
    assert (
        main(["train", *SMALL, "--epochs", "1", "--augment", "none", "--out", "m.safetensors"]) == 0
    )
    argv = ["train", "--resume", "runs/m/m_checkpoint.safetensors", "--epochs", "2"]
    assert main([*argv, "--augment", "shift=1"]) == 2
    assert "--augment shift=1 (the run has none)" in capsys.readouterr().err
    assert main([*argv, "--augment", "none", "--quiet"]) == 0


def test_patience_stops_early_and_says_so(tmp_path, capsys):
    argv = ["train", *SMALL, "--epochs", "10", "--lr", "0", "--patience", "2"]
    assert main([*argv, "--out", "m.safetensors"]) == 0
    captured = capsys.readouterr()
    assert "stopped early after epoch 3 of 10 (patience 2): kept the weights of epoch 1" in (
        captured.out
    )
    assert "early stopping after epoch 3 of 10" in captured.err
    record = read_model_file("m.safetensors").training
    assert record["stopped_early"] is True and record["epochs_run"] == 3
    history = json.loads((tmp_path / "runs/m/m_history.json").read_text())
    assert history["stopped_early"] is True and len(history["val_acc_history"]) == 3
    # resuming it: finished by early stopping
    assert main(["train", "--resume", "runs/m/m_checkpoint.safetensors"]) == 0
    assert "it stopped early after epoch 3 (patience 2, best epoch 1)" in capsys.readouterr().err


def test_one_line_per_epoch_and_no_carriage_returns_without_a_terminal(capsys):
    assert main(["train", *SMALL, "--epochs", "3", "--out", "m.safetensors"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]


def test_usage_shows_the_required_flags():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    usage = train.format_usage()
    assert "train --data DATA --out OUT.safetensors [options]" in usage
    assert "train --resume CHECKPOINT" in usage


def test_every_flag_of_every_command_has_help():
    parser = build_parser()
    missing = []
    for name, command in parser._subparsers._group_actions[0].choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["--patience", "x"], "argument --patience: expected a positive integer, got 'x'"),
        (["--limit", "-3"], "argument --limit: must be >= 1, got -3"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["--augment", "shfit=2"], "--augment shfit=2: augment spec 'shfit=2': unknown parameter"),
        (["--augment", "brightness=1.5"], r"augment brightness must be in [0, 1), got 1.5"),
        (["--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1"),
    ],
)
def test_bad_flags_fail_before_the_data_loads_with_no_internal_names(
    tmp_path, monkeypatch, capsys, flags, message
):
    import cnnserve.data

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the flags were checked")

    monkeypatch.setattr(cnnserve.data, "load_dataset", no_data)
    try:
        status = main(["train", "--data", "digits", *flags, "--out", "m.safetensors"])
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err
    assert "_int" not in err and "<function" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_shift_too_large_for_the_images_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *SMALL, "--augment", "shift=4", "--out", "m.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "--augment shift=4: augment shift=4 is too large for 8 x 8 (H x W) images" in err
    assert list(tmp_path.iterdir()) == []


def test_out_is_required_for_a_new_run(capsys):
    assert main(["train", "--data", "digits"]) == 2
    assert "--out is required" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# evaluate: per-class precision, recall, F1
# ---------------------------------------------------------------------------------------------


def test_class_metrics_against_scikit_learn():
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(4, size=200), rng.integers(4, size=200)
    matrix = np.zeros((4, 4), np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    got = class_metrics(matrix)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(4))
    np.testing.assert_allclose(got["precision"], p)
    np.testing.assert_allclose(got["recall"], r)
    np.testing.assert_allclose(got["f1"], f)
    assert got["support"] == s.tolist()


def test_undefined_ratios_are_none_and_shown_as_a_dash():
    # class 2 ("background") has no samples and is never predicted; class 1 never predicted
    matrix = np.array([[3, 0, 0], [2, 0, 0], [0, 0, 0]])
    got = class_metrics(matrix)
    assert got["precision"] == [0.6, None, None] and got["recall"] == [1.0, 0.0, None]
    assert got["f1"][0] == pytest.approx(0.75) and got["f1"][1:] == [None, None]
    result = Evaluation(0.6, matrix, ("zero", "one", "background"))
    text = result.text()
    assert "background" in text.splitlines()[-4]  # every class in the table, named in full
    assert "macro avg" in text and "weighted avg" in text
    data = result.to_dict()
    assert data["per_class"][1] == {
        "class": "one",
        "index": 1,
        "precision": None,
        "recall": 0.0,
        "f1": None,
        "support": 2,
    }
    assert data["averages"]["macro"]["recall"] == pytest.approx(0.5)
    assert data["averages"]["weighted"]["recall"] == pytest.approx(0.6)
    json.dumps(data, allow_nan=False)


def test_evaluate_prints_the_per_class_table(tmp_path, capsys):
    assert main(["train", *SMALL, "--epochs", "2", "--out", "m.safetensors", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "m.safetensors"]) == 0
    text = capsys.readouterr().out
    assert "true \\ predicted" in text
    assert "class         precision  recall      f1  support" in text
    table = text.split("precision")[1].splitlines()
    assert [row.split()[0] for row in table[1:11]] == [str(k) for k in range(10)]
    assert main(["evaluate", "m.safetensors", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["class"] for c in result["per_class"]] == [str(k) for k in range(10)]
    assert sum(c["support"] for c in result["per_class"]) == result["samples"]
    matrix = np.array(result["confusion_matrix"])
    for k, row in enumerate(result["per_class"]):
        assert row["recall"] == pytest.approx(matrix[k, k] / matrix[k].sum())


def test_the_data_summary_names_every_class(capsys):
    argv = ["train", "--data", "digits-windows", "--limit", "100", "--epochs", "1", "--quiet"]
    assert main([*argv, "--out", "w.safetensors"]) == 0
    out = capsys.readouterr().out
    assert "classes (11): 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, background" in out
