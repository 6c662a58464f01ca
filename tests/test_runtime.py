"""Runtime behaviour of the kernels: OpenMP, forked processes, and the conv scratch memory."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from cnnserve import layers
from cnnserve._ext import conv as conv_ext

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_are_built_with_openmp():
    """setup.py adds -fopenmp when gcc accepts it; a serial build would pass every other test."""
    assert conv_ext.openmp_enabled()
    all_threads = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0] or os.cpu_count())
    assert conv_ext.threads_for(10**9) == all_threads
    assert conv_ext.threads_for(10) == 1  # small calls run serially


def test_forked_child_runs_kernels_instead_of_hanging():
    """GNU OpenMP hangs in a child forked after a parallel region; the kernels must not."""
    code = textwrap.dedent(
        """
        import os, sys
        import numpy as np
        from cnnserve import layers

        x = np.random.default_rng(0).standard_normal((8, 16, 32, 32), dtype=np.float32)
        param = {"pool_height": 2, "pool_width": 2, "stride": 2}
        expected, _ = layers.max_pool_forward(x, param)  # a parallel region in the parent
        w = np.ones((4, 16, 3, 3), np.float32)
        conv_expected, _ = layers.conv_forward(x, w, np.zeros(4, np.float32), {"pad": 1})
        pid = os.fork()
        if pid == 0:
            out, _ = layers.max_pool_forward(x, param)
            conv_out, _ = layers.conv_forward(x, w, np.zeros(4, np.float32), {"pad": 1})
            ok = np.array_equal(out, expected) and np.allclose(conv_out, conv_expected)
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "child exit 0" in result.stdout, result.stdout + result.stderr


def test_scratch_memory_held_between_calls_is_bounded():
    pool = layers._SCRATCH
    # One image whose column matrix (576 x 16384 float32 = 36 MiB) is over the pool's limit.
    x = np.ones((1, 64, 128, 128), np.float32)
    w = np.ones((8, 64, 3, 3), np.float32)
    out, cache = layers.conv_forward(x, w, np.zeros(8, np.float32), {"pad": 1})
    layers.conv_backward(out, cache)
    held = [buf.nbytes for buf in pool._free]
    assert len(held) <= pool.keep
    assert all(nbytes <= pool.max_bytes for nbytes in held)


def test_scratch_pool_reuses_and_bounds_buffers():
    pool = layers._ScratchPool(keep=2, max_bytes=1000)
    with pool.borrow((10, 20), np.float64) as (a, b):
        assert a.shape == (10,) and b.shape == (20,) and a.dtype == np.float64
        a[:] = 1
        b[:] = 2  # the two buffers are distinct
        assert a.sum() == 10
    assert sorted(buf.nbytes for buf in pool._free) == [80, 160]
    with pool.borrow((15,), np.float32) as (c,):  # 60 bytes: reuses the smallest that fits
        assert c.shape == (15,)
        assert sorted(buf.nbytes for buf in pool._free) == [160]
    with pool.borrow((500,), np.float64):  # 4000 bytes: over max_bytes, freed afterwards
        pass
    assert sorted(buf.nbytes for buf in pool._free) == [80, 160]
    with pool.borrow((1, 1, 1), np.float32):  # three new small buffers, only `keep` stay
        pass
    assert len(pool._free) == 2
