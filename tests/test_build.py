"""The kernels are the compiled Cython extension, and a missing build fails loudly."""

import importlib
import importlib.machinery
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np

import cnnserve._ext.conv as conv_ext

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_are_compiled_extension_modules():
    suffix = "".join(Path(conv_ext.__file__).suffixes)
    assert suffix in importlib.machinery.EXTENSION_SUFFIXES, conv_ext.__file__
    # A Cython-compiled function is not a Python function object.
    mro_names = [cls.__name__ for cls in type(conv_ext.im2col).__mro__]
    assert "cython_function_or_method" in mro_names, mro_names
    assert not isinstance(conv_ext.im2col, types.FunctionType)


def test_every_pyx_file_is_built():
    for pyx in sorted((ROOT / "cython_ext").glob("*.pyx")):
        module = importlib.import_module(f"cnnserve._ext.{pyx.stem}")
        assert "".join(Path(module.__file__).suffixes) in importlib.machinery.EXTENSION_SUFFIXES


def test_missing_extension_raises_import_error_that_says_how_to_build():
    # A fresh interpreter in which cnnserve._ext.conv cannot be imported.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["cnnserve._ext.conv"] = None  # makes `import` of it raise ImportError
        try:
            import cnnserve.layers
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        else:
            print("IMPORTED")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert "IMPORT-ERROR:" in result.stdout, result.stdout + result.stderr
    assert "make install" in result.stdout
    assert "cnnserve._ext" in result.stdout


def test_kernels_run_in_both_dtypes():
    from cnnserve import layers

    for dtype in (np.float32, np.float64):
        x = np.ones((1, 1, 3, 3), dtype=dtype)
        out, _ = layers.conv_forward(
            x, np.ones((1, 1, 3, 3), dtype), np.zeros(1, dtype), {"pad": 0}
        )
        assert out.dtype == dtype and out.item() == 9
