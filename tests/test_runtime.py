"""Runtime behaviour of the kernels: OpenMP, forked processes, and the conv scratch memory."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnserve import layers
from cnnserve._ext import conv as conv_ext
from cnnserve._ext import norm as norm_ext
from cnnserve._ext import pool as pool_ext
from cnnserve.layers import _runtime

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_are_built_with_openmp():
    """setup.py adds -fopenmp when gcc accepts it; a serial build would pass every other test."""
    for module in (conv_ext, norm_ext, pool_ext):
        assert module.openmp_enabled()
    # OpenMP's default team is the CPUs this process may run on.
    usable = len(os.sched_getaffinity(0))
    all_threads = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0] or usable)
    assert conv_ext.threads_for(10**9) == all_threads
    assert conv_ext.threads_for(10) == 1  # small calls run serially


FORK_SCRIPT = """
import os, signal, sys
import numpy as np
from cnnserve import layers
from cnnserve._ext import conv, norm, pool

mode = sys.argv[1]
x = np.random.default_rng(0).standard_normal((8, 16, 32, 32), dtype=np.float32)
param = {"pool_height": 2, "pool_width": 2, "stride": 2}
w = np.ones((4, 16, 3, 3), np.float32)
assert pool.threads_for(10**9) == 2, "the parent must be able to run 2 threads"
if mode == "parallel":
    expected, _ = layers.max_pool_forward(x, param)  # a 2-thread region in the parent
    assert pool._parallel_used()
elif mode == "winograd":  # a kernel whose thread count comes from Python
    layers.conv_forward(x, w, np.zeros(4, np.float32), {"pad": 1})
    assert conv._parallel_used()
elif mode == "packed":
    filters = layers.pack_filters(np.ones((1024, 256, 4, 4), np.float32))
    print("packed", filters.packed, flush=True)  # the packing kernel runs on AVX-512 CPUs only
    assert conv._parallel_used() == filters.packed
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a hung child is killed, never left behind
    threads = [m.threads_for(10**9) for m in (conv, norm, pool)]
    out, _ = layers.max_pool_forward(x, param)
    conv_out, _ = layers.conv_forward(x, w, np.zeros(4, np.float32), {"pad": 1})
    if mode == "packed":
        small = np.ones((1, 256, 6, 6), np.float32)
        layers.conv_forward(small, filters, np.zeros(1024, np.float32), {"pad": 0})
    ok = np.array_equal(out, layers.max_pool_forward(x, param)[0]) and conv_out.shape == (8, 4, 32, 32)
    print("child threads", threads, flush=True)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
"""


def _run_fork_script(mode: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("mode", ["parallel", "winograd", "packed"])
def test_child_forked_after_a_parallel_region_runs_kernels_on_one_thread(mode):
    """GNU OpenMP hangs in a child forked after a parallel region; the kernels must not, also
    after kernels whose thread count the Python side chose (Winograd, packing filters)."""
    stdout = _run_fork_script(mode)
    if mode == "packed" and "packed False" in stdout:
        # No packing kernel on this CPU, so no parallel region before the fork: the child
        # keeps its threads, and its kernels (the packed-filters path included) do not hang.
        assert "child threads [2, 2, 2]" in stdout, stdout
    else:
        assert "child threads [1, 1, 1]" in stdout, stdout
    assert "child exit 0" in stdout, stdout


def test_child_forked_before_any_parallel_region_keeps_its_threads():
    stdout = _run_fork_script("serial")
    assert "child threads [2, 2, 2]" in stdout, stdout
    assert "child exit 0" in stdout, stdout


def test_conv_scratch_is_reused_and_large_buffers_are_freed(monkeypatch):
    pool = _runtime.ScratchPool(keep=4, max_bytes=_runtime.SCRATCH.max_bytes)
    monkeypatch.setattr(_runtime, "SCRATCH", pool)
    taken = []
    take = pool._take
    monkeypatch.setattr(pool, "_take", lambda nbytes: taken.append(take(nbytes)) or taken[-1])
    w = np.ones((8, 64, 3, 3), np.float32)
    b = np.zeros(8, np.float32)
    # One image whose column matrix (576 x 16384 float32 = 36 MiB) is over the pool's limit.
    big = np.ones((1, 64, 128, 128), np.float32)
    out, cache = layers.conv_forward(big, w, b, {"pad": 1})
    assert max(buf.nbytes for buf in taken) > pool.max_bytes
    assert all(buf.nbytes <= pool.max_bytes for buf in pool._free)  # the big one was freed
    # Small calls: the second reuses the buffers of the first.
    small = np.ones((2, 64, 8, 8), np.float32)
    taken.clear()
    layers.conv_forward(small, w, b, {"pad": 1})
    first = {id(buf) for buf in taken}
    taken.clear()
    layers.conv_forward(small, w, b, {"pad": 1})
    assert {id(buf) for buf in taken} == first
    assert len(pool._free) <= pool.keep


def test_scratch_pool_reuses_and_bounds_buffers():
    pool = _runtime.ScratchPool(keep=2, max_bytes=1000)
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


def test_importing_cnnserve_sets_thread_defaults_before_numpy_loads_blas():
    """Idle OpenMP threads spin briefly then sleep and idle OpenBLAS workers stop spinning
    after ~2**20 cycles, unless the environment chose otherwise; set by `import cnnserve`,
    before NumPy loads."""
    script = (
        "import os, sys\n"
        "import cnnserve\n"
        "assert 'numpy' not in sys.modules\n"
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_THREAD_TIMEOUT'],\n"
        "      os.environ.get('GOMP_SPINCOUNT', '-'),\n"
        "      ','.join(cnnserve._ext.ENV_SET_BY_CNNSERVE))\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")
    }

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )

    result = run()
    assert result.returncode == 0, result.stderr
    set_all = "OMP_WAIT_POLICY,OPENBLAS_THREAD_TIMEOUT,GOMP_SPINCOUNT"
    assert result.stdout.split() == ["PASSIVE", "20", "10000", set_all]
    env["OPENBLAS_THREAD_TIMEOUT"] = "28"
    # only what it set
    assert run().stdout.split() == ["PASSIVE", "28", "10000", "OMP_WAIT_POLICY,GOMP_SPINCOUNT"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a policy of the user's own: no spin count either
    assert run().stdout.split() == ["ACTIVE", "28", "-"]  # and set nothing
