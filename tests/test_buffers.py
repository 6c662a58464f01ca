"""The buffer cache that training steps allocate their large arrays from."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from cnnserve import _buffers
from cnnserve._buffers import (
    buffer_cache_stats,
    release_buffer_cache,
    reusing_buffers,
    with_reused_buffers,
)
from cnnserve.model import ThreeLayerConvNet

MIB = 2**20


@pytest.fixture(autouse=True)
def empty_cache():
    release_buffer_cache()
    yield
    release_buffer_cache()


def test_a_freed_block_is_handed_out_again_for_the_same_size():
    with reusing_buffers():
        a = np.ones(MIB, dtype=np.float32)  # 4 MiB
        address = a.__array_interface__["data"][0]
        del a
        assert buffer_cache_stats()["cached_bytes"] == 4 * MIB
        before = buffer_cache_stats()["hits"]
        b = np.empty(MIB, dtype=np.float32)
        assert b.__array_interface__["data"][0] == address
        assert buffer_cache_stats()["hits"] == before + 1
        assert buffer_cache_stats()["cached_bytes"] == 0
        b[:] = 2.0  # the reused block is ordinary writable memory
        np.testing.assert_array_equal(b[:3], 2.0)
        z = np.zeros(MIB, dtype=np.float32)  # calloc: always zeros, never a cached block
        assert not z.any()


def test_small_arrays_and_arrays_outside_the_context_are_not_cached():
    with reusing_buffers():
        small = np.ones(1000)
        del small
    assert buffer_cache_stats()["cached_bytes"] == 0
    outside = np.ones(MIB, dtype=np.float32)
    del outside
    assert buffer_cache_stats()["cached_bytes"] == 0


def test_an_array_freed_outside_the_context_still_goes_back_to_the_cache():
    with reusing_buffers():
        a = np.ones(MIB, dtype=np.float32)
    del a  # freed with the handler it was allocated with
    assert buffer_cache_stats()["cached_bytes"] == 4 * MIB


def test_the_cache_is_bounded_and_can_be_released(monkeypatch):
    _buffers._memory.set_limit(10 * MIB)
    try:
        with reusing_buffers():
            arrays = [np.ones(MIB, dtype=np.float32) for _ in range(5)]  # 5 x 4 MiB
            del arrays
        assert buffer_cache_stats()["cached_bytes"] == 8 * MIB  # the last two under 10 MiB
        with reusing_buffers():
            other = np.ones(2 * MIB, dtype=np.float32)  # 8 MiB of a new size
            del other
        stats = buffer_cache_stats()  # it takes the place of the older blocks
        assert stats["cached_bytes"] == 8 * MIB and stats["cached_blocks"] == 1
        with reusing_buffers():
            huge = np.ones(3 * MIB, dtype=np.float32)  # 12 MiB: more than the limit
            del huge
        assert buffer_cache_stats()["cached_blocks"] == 1
        assert release_buffer_cache() == 8 * MIB
        assert buffer_cache_stats()["cached_bytes"] == 0
    finally:
        _buffers._memory.set_limit(_buffers._limit_from_environment())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", "number of MiB"),
        ("-1", ">= 0"),
        ("inf", "<= 1048576"),
        ("nan", ">= 0"),
        ("1e30", ">= 0"),
    ],
)
def test_the_limit_from_the_environment_is_checked(monkeypatch, value, message):
    monkeypatch.setenv("CNNSERVE_ARRAY_CACHE_MB", value)
    with pytest.raises(ValueError, match=f"CNNSERVE_ARRAY_CACHE_MB must be .*{message}"):
        _buffers._limit_from_environment()


def test_other_threads_do_not_see_the_handler():
    seen = []

    def allocate():
        a = np.ones(MIB, dtype=np.float32)
        del a
        seen.append(buffer_cache_stats()["cached_bytes"])

    with reusing_buffers():
        thread = threading.Thread(target=allocate)
        thread.start()
        thread.join()
    assert seen == [0]


def test_training_steps_reuse_their_buffers_and_give_the_same_results():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 3, 32, 32), dtype=np.float32)
    y = rng.integers(10, size=20)
    model = ThreeLayerConvNet()
    first = model.loss(X, y)
    stats = buffer_cache_stats()
    second = model.loss(X, y)
    assert buffer_cache_stats()["hits"] > stats["hits"]  # the second step reused blocks
    assert first[0] == second[0]
    for name in first[1]:
        np.testing.assert_array_equal(first[1][name], second[1][name])


def test_decorated_functions_keep_their_name_and_docs():
    @with_reused_buffers
    def step(x):
        """Doc."""
        return x * 2

    assert step.__name__ == "step" and step.__doc__ == "Doc." and step(2) == 4


def test_a_forked_child_can_use_the_cache():
    code = (
        "import os, numpy as np\n"
        "from cnnserve._buffers import reusing_buffers, buffer_cache_stats\n"
        "with reusing_buffers():\n"
        "    a = np.ones(2**20, np.float32); del a\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    import signal; signal.alarm(20)\n"
        "    with reusing_buffers():\n"
        "        b = np.ones(2**20, np.float32); del b\n"
        "    os._exit(0 if buffer_cache_stats()['hits'] >= 1 else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=60, env=dict(os.environ))
    assert done.returncode == 0
