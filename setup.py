"""Build the Cython kernels in ``cython_ext/`` into ``cnnserve._ext.<name>``.

Each ``cython_ext/<name>.pyx`` becomes the private extension module ``cnnserve._ext.<name>``.
OpenMP is used when the C compiler accepts ``-fopenmp``; without it the ``prange`` loops run
serially, with the same results.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent.resolve()
KERNEL_DIR = "cython_ext"

COMPILER_DIRECTIVES = {
    "language_level": "3",
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "nonecheck": False,
    "embedsignature": True,
}


def _compiler_accepts_openmp(compiler_cmd: list[str]) -> bool:
    """Compile and link a one-line OpenMP program with ``-fopenmp``."""
    source = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "check_openmp.c")
        with open(src, "w") as fh:
            fh.write(source)
        cmd = [*compiler_cmd, "-fopenmp", src, "-o", os.path.join(tmp, "a.out")]
        try:
            result = subprocess.run(cmd, capture_output=True, check=False)
        except OSError:
            return False
        return result.returncode == 0


class BuildExt(build_ext):
    """``build_ext`` that adds OpenMP flags when the compiler supports them."""

    def build_extensions(self):
        # The whole compiler command (it may be a wrapper such as "ccache gcc"), without -c.
        compiler_cmd = [arg for arg in self.compiler.compiler_so if arg != "-c"]
        use_openmp = os.environ.get("CNNSERVE_NO_OPENMP") != "1" and _compiler_accepts_openmp(
            compiler_cmd
        )
        if not use_openmp:
            sys.stderr.write("cnnserve: building WITHOUT OpenMP; kernels will run on one thread\n")
        for ext in self.extensions:
            ext.extra_compile_args = ["-O3", *(["-fopenmp"] if use_openmp else [])]
            ext.extra_link_args = ["-fopenmp"] if use_openmp else []
        super().build_extensions()


def _extensions() -> list[Extension]:
    pyx_files = sorted((HERE / KERNEL_DIR).glob("*.pyx"))
    return [
        Extension(f"cnnserve._ext.{p.stem}", [f"{KERNEL_DIR}/{p.name}"], include_dirs=[KERNEL_DIR])
        for p in pyx_files
    ]


setup(
    ext_modules=cythonize(_extensions(), compiler_directives=COMPILER_DIRECTIVES, quiet=True),
    cmdclass={"build_ext": BuildExt},
)
