"""The README's code examples run as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 6, (
        "expected the layer, training, dense-map, inside, client and detections examples"
    )
    monkeypatch.chdir(tmp_path)  # the training example writes a model file
    layer_example, training_example, dense_example = ({}, {}, {})
    exec(compile(blocks[0], str(README), "exec"), layer_example)
    exec(compile(blocks[1], str(README), "exec"), training_example)
    monkeypatch.chdir(README.parent)  # the dense example reads the shipped model
    exec(compile(blocks[2], str(README), "exec"), dense_example)
    # The layer example ends with the gradients of a conv layer.
    assert layer_example["dw"].shape == (16, 3, 5, 5)
    assert layer_example["dx"].shape == (8, 3, 32, 32)
    assert np.isfinite(layer_example["dx"]).all()
    # The training example trains, saves and loads a model that has learnt something.
    assert training_example["test_accuracy"] > 0.5
    loaded, net = training_example["same_net"], training_example["net"]
    for name, value in net.params.items():
        np.testing.assert_array_equal(loaded.params[name], value)
    assert (tmp_path / "small.safetensors").is_file()
    # The dense example: the map, the box and the finer map it states.
    result, finer = dense_example["result"], dense_example["finer"]
    assert result.logits.shape == (10, 21, 45)
    assert result.box(5, 17) == (34, 10, 42, 18)
    assert finer.logits.shape == (10, 41, 89)
    np.testing.assert_allclose(finer.logits[:, ::2, ::2], result.logits, rtol=0, atol=1e-4)


def test_readme_inside_example_runs(monkeypatch, capsys):
    """The visualise example: the activations and pictures it states."""
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)[3]
    monkeypatch.chdir(README.parent)  # it reads the shipped model and docs/digit_7.png
    example: dict = {}
    exec(compile(block, str(README), "exec"), example)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "input input (1, 8, 8)",
        "0 conv 32 3x3 s1 p0 (32, 6, 6)",
        "1 spatial_batchnorm (32, 6, 6)",
    ]
    assert [p.activation.key for p in example["pictures"]] == ["input", "0", "2", "10"]
    assert len(example["relu"].tiles) == 32 and example["relu"].zoom == 8
    assert len(example["filters"].tiles) == 32
    assert example["conv0"].size == example["pictures"][1].picture.size
    assert example["stats"]["zero_fraction"].shape == (32,)
    assert example["sheet"].height == sum(p.picture.height for p in example["pictures"]) + 3 * 8


def test_readme_client_example_runs_against_the_service(live_service, monkeypatch):
    """The Python client example, against the real service on a free port."""
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)[4]
    monkeypatch.chdir(README.parent)  # the example reads the shipped demo canvas
    assert "http://127.0.0.1:8000" in block
    example: dict = {}
    exec(
        compile(block.replace("http://127.0.0.1:8000", live_service), str(README), "exec"), example
    )
    assert [p["label"] for p in example["top3"]][0] == "4" and len(example["top3"]) == 3
    assert example["probabilities"].shape == (10, 41, 89)
    np.testing.assert_allclose(example["probabilities"].sum(axis=0), 1.0, atol=1e-5)
    assert example["heatmap_png"].startswith(b"\x89PNG")


def test_readme_detections_example_runs(monkeypatch, capsys):
    """The detections example: the boxes it prints are the ones it states."""
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)[5]
    assert "detections(" in block
    monkeypatch.chdir(README.parent)  # it reads the shipped detector and demo canvas
    example: dict = {}
    exec(compile(block, str(README), "exec"), example)
    printed = capsys.readouterr().out.splitlines()
    stated = [line.split("# ", 1)[1] for line in block.splitlines() if "# " in line]
    assert printed[0] == stated[1]  # 3 0.999 (40.0, 24.0, 48.0, 32.0)
    assert printed[1] == stated[-1].lstrip("# ")
    assert len(example["found"]) == 6
