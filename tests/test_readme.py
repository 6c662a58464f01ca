"""The README's code examples run as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    # The layer example ends with the gradients of a conv layer.
    assert namespace["dw"].shape == (16, 3, 5, 5)
    assert namespace["dx"].shape == (8, 3, 32, 32)
    assert np.isfinite(namespace["dx"]).all()
