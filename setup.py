"""Build the Cython kernels in ``cython_ext/`` into ``cnnserve._ext.<name>``.

Each ``cython_ext/<name>.pyx`` becomes the private extension module ``cnnserve._ext.<name>``.
OpenMP is used when the C compiler accepts ``-fopenmp``; without it the ``prange`` loops run
serially, with the same results.
"""

import os
import sys
import tempfile
from pathlib import Path

import numpy
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


def _compiler_accepts_openmp(compiler) -> bool:
    """Compile and link a one-line OpenMP program with this build's compiler and linker."""
    source = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "check_openmp.c")
        with open(src, "w") as fh:
            fh.write(source)
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(
                objects, "check_openmp", output_dir=tmp, extra_postargs=["-fopenmp"]
            )
        except Exception:  # CompileError, LinkError, or a compiler that is not gcc-like
            return False
        return True


class BuildExt(build_ext):
    """``build_ext`` that adds OpenMP flags when the compiler supports them."""

    def build_extensions(self):
        use_openmp = os.environ.get("CNNSERVE_NO_OPENMP") != "1" and _compiler_accepts_openmp(
            self.compiler
        )
        if not use_openmp:
            sys.stderr.write("cnnserve: building WITHOUT OpenMP; kernels will run on one thread\n")
        for ext in self.extensions:
            ext.extra_compile_args = ["-O3", *(["-fopenmp"] if use_openmp else [])]
            ext.extra_link_args = ["-fopenmp"] if use_openmp else []
        super().build_extensions()


def _extensions() -> list[Extension]:
    pyx_files = sorted((HERE / KERNEL_DIR).glob("*.pyx"))
    headers = sorted(
        f"{KERNEL_DIR}/{h.name}"
        for pattern in ("*.h", "*.pxd", "*.pxi")
        for h in (HERE / KERNEL_DIR).glob(pattern)
    )
    return [
        Extension(
            f"cnnserve._ext.{p.stem}",
            [f"{KERNEL_DIR}/{p.name}"],
            include_dirs=[KERNEL_DIR, numpy.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_22_API_VERSION")],
            depends=headers,  # rebuild when a shared header or declaration changes
        )
        for p in pyx_files
    ]


setup(
    ext_modules=cythonize(_extensions(), compiler_directives=COMPILER_DIRECTIVES, quiet=True),
    cmdclass={"build_ext": BuildExt},
)
