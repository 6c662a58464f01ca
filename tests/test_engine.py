"""Compiled plans (cnnserve.engine) against the layer-by-layer path they replace."""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import pytest

from cnnserve import engine
from cnnserve.convert import to_fully_convolutional
from cnnserve.network import ConvNet, layer_forward

# Every layer type and fusion of a trained network, with odd shapes: a 3x2 kernel at stride 2
# with padding, batch norm folded into it, ReLU fused, an overlapping max pool (2x2 stride 1),
# a stride-3 conv, an average pool, an affine layer with a folded vector batch norm, dropout
# (removed) and a layer norm.
NET_A = (
    (3, 11, 10),
    [
        {"type": "conv", "filters": 5, "size": [3, 2], "stride": 2, "pad": 1},  # (5, 6, 6)
        {"type": "spatial_batchnorm"},
        {"type": "relu"},
        {"type": "max_pool", "size": 2, "stride": 1},  # (5, 5, 5)
        {"type": "conv", "filters": 4, "size": 3, "stride": 3, "pad": 2},  # (4, 3, 3)
        {"type": "relu"},
        {"type": "avg_pool", "size": [2, 3], "stride": 1},  # (4, 2, 1)
        {"type": "affine", "units": 7},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "dropout", "keep": 0.5},
        {"type": "layernorm"},
    ],
)
# A ReLU with nothing before it, group norm, a pool of 3x3 at stride 2, a batch norm after a
# pool (a scale op: nothing to fold into), a 3x1 conv, many filters (several panels).
NET_B = (
    (2, 9, 9),
    [
        {"type": "relu"},
        {"type": "conv", "filters": 6, "size": 3, "stride": 1, "pad": 0},  # (6, 7, 7)
        {"type": "spatial_groupnorm", "groups": 3},
        {"type": "relu"},
        {"type": "max_pool", "size": 3, "stride": 2},  # (6, 3, 3)
        {"type": "spatial_batchnorm"},
        {"type": "conv", "filters": 20, "size": [3, 1], "stride": 1, "pad": 0},  # (20, 1, 3)
        {"type": "relu"},
        {"type": "affine", "units": 9},
    ],
)
# Trained for the converted-network tests: padding inside, a pool, a converted affine layer
# and a converted layer norm (channel layer norm).
NET_C = (
    (1, 10, 10),
    [
        {"type": "conv", "filters": 4, "size": 3, "stride": 1, "pad": 1},
        {"type": "spatial_batchnorm"},
        {"type": "relu"},
        {"type": "max_pool", "size": 2, "stride": 2},  # (4, 5, 5)
        {"type": "conv", "filters": 6, "size": 3, "stride": 1, "pad": 0},  # (6, 3, 3)
        {"type": "relu"},
        {"type": "affine", "units": 8},
        {"type": "relu"},
        {"type": "layernorm"},
    ],
)


def make(net, dtype, classes=3, seed=0) -> ConvNet:
    """A network with random weights, batch-norm statistics and norm parameters."""
    shape, layers = net
    model = ConvNet(layers, shape, num_classes=classes, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for bn in model.bn_params:
        C = bn["running_mean"].shape[0]
        bn["running_mean"] = rng.normal(0, 0.5, C).astype(dtype)
        bn["running_var"] = rng.uniform(0.5, 2.0, C).astype(dtype)
    for name, value in model.params.items():
        if name.startswith(("gamma", "beta", "b")):
            model.params[name] = (value + rng.normal(0, 0.3, value.shape)).astype(dtype)
    return model


def layer_path(fcn, x: np.ndarray) -> np.ndarray:
    """A converted network layer by layer (FullyConvNet.forward itself runs a plan), with its
    batch norms unfolded."""
    for layer in fcn.layers:
        weights = tuple(fcn.params[name] for name in layer.param_names)
        options = {}
        if layer.kind == "spatial_batchnorm":
            k = layer.param_names[0][len("gamma") :]
            stats = {"running_mean": fcn.params[f"running_mean{k}"]}
            stats["running_var"] = fcn.params[f"running_var{k}"]
            options["bn_param"] = {"mode": "test", "eps": layer.eps, **stats}
        x = layer_forward(layer.spec, x, weights, **options)[0]
    return x


def inputs(shape, dtype, seed=2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(1.0, float(np.abs(want).max()))
    tol = 1e-11 if want.dtype == np.float64 else 2e-5
    assert float(np.abs(got - want).max()) <= tol * scale


@pytest.fixture(params=engine.available_cpu_paths())
def cpu_path(request):
    """Every path of the float32 tiles this CPU runs: AVX-512 and AVX2 where it has them
    (forced one at a time), and the portable one."""
    engine.set_cpu_path(request.param)
    assert engine.cpu_path() == request.param
    yield request.param
    engine.set_cpu_path()


def test_the_cpu_path_switch_changes_the_path():
    assert engine.cpu_path() == engine.available_cpu_paths()[0]
    assert engine.available_cpu_paths()[-1] == "portable"
    engine.set_cpu_path("portable")
    try:
        assert engine.cpu_path() == "portable"
        paths = engine.available_cpu_paths()  # what the CPU has, whatever the cap
        assert engine.cpu_path() == "portable"  # and asking changes nothing
        assert paths == tuple(p for p in engine.CPU_PATHS if p in paths)
    finally:
        engine.set_cpu_path()
    with pytest.raises(ValueError, match="path must be 'best' or one of avx512, avx2"):
        engine.set_cpu_path("sse")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("net", [NET_A, NET_B], ids=["A", "B"])
@pytest.mark.parametrize("N, max_batch", [(1, 1), (5, 16), (7, 3)])
def test_plans_equal_the_layer_path(cpu_path, dtype, net, N, max_batch):
    model = make(net, dtype)
    x = inputs((N, *net[0]), dtype)
    plan = engine.compile(model, max_batch=max_batch)
    assert plan.output_shape == (3,)
    assert_close(plan(x), model.scores(x))


def test_compiled_ops_fold_and_fuse():
    plan = engine.compile(make(NET_A, np.float32))
    assert plan.ops == [
        "conv 3x2 s2 p1 +relu",  # batch norm folded, ReLU fused
        "max_pool 2x2 s1",
        "conv 3x3 s3 p2 +relu",
        "avg_pool 2x3 s1",
        "affine +relu",  # its batch norm folded; dropout gone
        "channel_norm",
        "affine",
    ]
    plan = engine.compile(make(NET_B, np.float32))
    assert plan.ops[:4] == ["relu", "conv 3x3 s1 p0", "group_norm +relu", "max_pool 3x3 s2"]
    assert plan.ops[4] == "scale"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize(
    "pool, shape, filters, relu",
    [(2, (5, 12, 9), 40, True), (3, (4, 11, 10), 7, False), (2, (3, 6, 5), 70, True)],
)
def test_a_max_pool_after_a_conv_is_fused_exactly(cpu_path, dtype, N, pool, shape, filters, relu):
    """A k x k max pool at stride k after a direct conv runs in the conv's epilogue (one pool
    row at a time, through a slot per thread): the same as conv then pool, ReLU before or
    after, a pair of panels and one left over (40, 70 channels) or a lone panel (7), a NaN
    included."""
    layers = [{"type": "conv", "filters": filters, "size": [3, 2], "stride": 1, "pad": 0}]
    layers += [{"type": "relu"}] if relu else []
    layers += [{"type": "max_pool", "size": pool, "stride": pool}, {"type": "affine", "units": 6}]
    model = make((shape, layers), dtype)
    plan = engine.compile(model, max_batch=2)
    fused = "conv 3x2 s1 p0" + (" +relu" if relu else "") + f" +max_pool {pool}x{pool} s{pool}"
    assert plan.ops == [fused, "affine", "affine"]  # the network's own last affine layer
    x = inputs((N, *shape), dtype)
    assert_close(plan(x), model.loss(x))
    x[-1, 0, 4, 3] = np.nan  # the conv spreads it over a window of pixels, the pool keeps it
    got, want = plan(x), model.loss(x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[-1]).all() and not np.isnan(got[:-1]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 5])
def test_a_conv_writes_the_zero_border_the_next_conv_pads_with(cpu_path, dtype, N):
    """A direct conv (a fused pool's, too) followed by a padded direct conv writes its output
    with that conv's zero border, which then reads it in place: the same as copying it padded,
    over batches larger than max_batch (buffers reused by other ops in between)."""
    shape = (3, 12, 10)
    layers = [
        {"type": "conv", "filters": 20, "size": 3, "stride": 1, "pad": 1},  # (20, 12, 10)
        {"type": "relu"},
        {"type": "max_pool", "size": 2, "stride": 2},  # (20, 6, 5), fused
        {"type": "conv", "filters": 36, "size": [3, 2], "stride": 1, "pad": 2},  # (36, 8, 8)
        {"type": "conv", "filters": 9, "size": 3, "stride": 1, "pad": 1},  # (9, 8, 8)
        {"type": "relu"},
        {"type": "affine", "units": 5},
    ]
    model = make((shape, layers), dtype)
    plan = engine.compile(model, max_batch=2)
    opad = plan._desc[:, engine.F_OPAD].tolist()
    copy = plan._desc[:, engine.F_COPY].tolist()
    assert opad[:3] == [2, 1, 0] and copy[:3] == [2, 0, 0]  # the first conv reads NCHW
    x = inputs((N, *shape), dtype)
    assert_close(plan(x), model.loss(x))


def test_only_pools_that_tile_at_their_own_size_are_fused():
    shape = (2, 9, 9)
    for size, stride, fused in [(2, 1, False), (3, 2, False), (3, 3, True)]:
        layers = [
            {"type": "conv", "filters": 4, "size": 3, "stride": 1, "pad": 1},
            {"type": "max_pool", "size": size, "stride": stride},
        ]
        plan = engine.compile(make((shape, layers), np.float32))
        assert (len(plan.ops) == 2) == fused, plan.ops  # the conv (and pool), the classes


def test_a_plan_keeps_the_weights_it_was_compiled_with():
    model = make(NET_A, np.float64)
    x = inputs((2, *NET_A[0]), np.float64)
    plan = engine.compile(model)
    before = model.scores(x)
    for value in model.params.values():
        value *= 2
    assert_close(plan(x), before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N, size", [(1, (10, 10)), (1, (16, 20)), (3, (12, 18)), (2, (14, 44))])
def test_plans_of_converted_networks_equal_forward(cpu_path, dtype, N, size):
    fcn = to_fully_convolutional(make(NET_C, dtype))
    x = inputs((N, 1, *size), dtype)
    plan = engine.compile(fcn, (1, *size), max_batch=2)
    want = layer_path(fcn, x)
    assert plan.output_shape == want.shape[1:]
    assert_close(plan(x), want)
    assert_close(fcn.forward(x), want)  # forward runs plans, one per input size


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride, pad", [(1, 0), (1, 2), (2, 1)])
def test_wide_images_take_the_direct_path_exactly(cpu_path, dtype, stride, pad):
    """Rows of 40 and more output pixels: whole tiles of stride-1 convs read the input in place
    (no gathering); the tiles at the edges and the strided conv gather. Both give the same."""
    shape = (3, 9, 84 if stride == 2 else 45)
    layers = [
        {"type": "conv", "filters": 13, "size": [3, 4], "stride": stride, "pad": pad},
        {"type": "relu"},
        {"type": "conv", "filters": 7, "size": [1, 3], "stride": 1, "pad": 0},
    ]
    fcn = to_fully_convolutional(make((shape, layers), dtype))
    x = inputs((2, *shape), dtype)
    plan = engine.compile(fcn, shape, max_batch=2)
    assert_close(plan(x), layer_path(fcn, x))


def test_a_plan_compiled_in_another_dtype():
    model = make(NET_B, np.float64)
    x = inputs((4, *NET_B[0]), np.float64)
    plan = engine.compile(model, dtype=np.float32)
    assert plan.dtype == np.float32
    got = plan(x.astype(np.float32))
    assert float(np.abs(got - model.scores(x)).max()) < 1e-4 * max(1, np.abs(got).max())


def test_out_is_written_and_returned():
    model = make(NET_A, np.float32)
    x = inputs((4, *NET_A[0]), np.float32)
    plan = engine.compile(model, max_batch=4)
    out = np.full((4, 3), np.nan, dtype=np.float32)
    assert plan(x, out=out) is out
    assert_close(out, model.scores(x))


@pytest.mark.parametrize(
    "x, error, message",
    [
        (
            np.zeros((2, 3, 11, 10), np.float64),
            TypeError,
            "x must be a numpy array of float32, got float64",
        ),
        (
            np.zeros((2, 3, 11, 10), np.int64),
            TypeError,
            "x must be a numpy array of float32, got int64",
        ),
        ([[0.0]], TypeError, "x must be a numpy array of float32, got list"),
        (
            np.zeros((2, 3, 10, 11), np.float32),
            ValueError,
            r"x must have shape \(N, 3, 11, 10\) with N >= 1, got \(2, 3, 10, 11\)",
        ),
        (np.zeros((3, 11, 10), np.float32), ValueError, r"x must have shape \(N, 3, 11, 10\)"),
        (np.zeros((0, 3, 11, 10), np.float32), ValueError, r"N >= 1, got \(0, 3, 11, 10\)"),
        (np.zeros((2, 3, 11, 20), np.float32)[..., ::2], ValueError, "x must be C-contiguous"),
    ],
)
def test_a_wrong_input_is_a_clear_error(x, error, message):
    plan = engine.compile(make(NET_A, np.float32))
    with pytest.raises(error, match=message):
        plan(x)


def test_a_wrong_out_is_a_clear_error():
    plan = engine.compile(make(NET_A, np.float32))
    x = np.zeros((2, 3, 11, 10), np.float32)
    with pytest.raises(ValueError, match=r"out must be a C-contiguous array of shape \(2, 3\)"):
        plan(x, out=np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="out must be a numpy array of float32, got float64"):
        plan(x, out=np.zeros((2, 3), np.float64))
    with pytest.raises(ValueError, match=r"out must be C-contiguous \(its shape \(2, 3\) is"):
        plan(x, out=np.zeros((3, 2), np.float32).T)
    frozen = np.zeros((2, 3), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        plan(x, out=frozen)
    assert not frozen.any()


def test_compile_refuses_what_it_cannot_plan():
    model = make(NET_A, np.float32)
    with pytest.raises(TypeError, match="model must be a ConvNet or a FullyConvNet, got dict"):
        engine.compile({})
    with pytest.raises(ValueError, match=r"input_shape must be this network's \(3, 11, 10\)"):
        engine.compile(model, (3, 12, 10))
    with pytest.raises(ValueError, match="max_batch"):
        engine.compile(model, max_batch=0)
    with pytest.raises(TypeError, match="dtype"):
        engine.compile(model, dtype=np.int32)
    fcn = to_fully_convolutional(make(NET_C, np.float32))
    with pytest.raises(ValueError, match=r"input_shape must have 1 channels, got \(2, 12, 12\)"):
        engine.compile(fcn, (2, 12, 12))
    with pytest.raises(ValueError, match="does not tile 11 exactly"):
        engine.compile(fcn, (1, 11, 12))
    grouped = to_fully_convolutional(make(NET_B, np.float32))
    with pytest.raises(ValueError, match="window by window"):
        engine.compile(grouped, (2, 9, 9))


@pytest.mark.parametrize("name", ["NET_B", "NET_W"])
def test_plans_are_safe_to_call_from_several_threads(name, monkeypatch):
    """Each call has its own buffers (NET_W: the Winograd convs' per-thread slots too)."""
    monkeypatch.setattr(engine, "WINO_MIN_CHANNELS", 5)
    net = globals()[name]
    model = make(net, np.float32)
    plan = engine.compile(model, max_batch=4)
    assert any("winograd" in op for op in plan.ops) == (name == "NET_W")
    xs = [inputs((k + 1, *net[0]), np.float32, seed=k) for k in range(6)]
    want = [model.scores(x) for x in xs]
    errors = []

    def work(k):
        try:
            for _ in range(20):
                np.testing.assert_array_equal(plan(xs[k]), plan(xs[k]))
                assert_close(plan(xs[k]), want[k])
        except Exception as exc:  # reported below, with the thread's index
            errors.append((k, exc))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_plan_runs_in_a_forked_child():
    """A child forked after the parent ran a plan (and so started its OpenMP threads) runs it too:
    the service's worker processes are forked from one that compiled the plans."""
    model = make(NET_A, np.float32)
    plan = engine.compile(model, max_batch=64)
    x = inputs((64, *NET_A[0]), np.float32)
    want = plan(x)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's exit handlers
        try:
            os.write(write, b"1" if np.array_equal(plan(x), want) else b"0")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1" and status == 0
    os.close(read)


# 3x3 stride-1 convs that the engine runs as Winograd F(2x2, 3x3) once the threshold is lowered:
# channel counts that are not multiples of 16, odd output sizes (a half tile at the edges), pad 0.
NET_W = (
    (5, 7, 9),
    [
        {"type": "conv", "filters": 20, "size": 3, "stride": 1, "pad": 1},  # (20, 7, 9)
        {"type": "spatial_batchnorm"},
        {"type": "relu"},
        {"type": "conv", "filters": 17, "size": 3, "stride": 1, "pad": 0},  # (17, 5, 7)
        {"type": "affine", "units": 6},
    ],
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("band_bytes", [engine.WINO_BAND_BYTES, 1], ids=["one-band", "bands"])
def test_winograd_convs_equal_the_layer_path(cpu_path, dtype, band_bytes, monkeypatch):
    monkeypatch.setattr(engine, "WINO_MIN_CHANNELS", 5)
    monkeypatch.setattr(engine, "WINO_BAND_BYTES", band_bytes)  # 1: bands of 48 tiles
    model = make(NET_W, dtype)
    plan = engine.compile(model, max_batch=3)
    assert plan.ops[:2] == ["conv 3x3 s1 p1 winograd +relu", "conv 3x3 s1 p0 winograd"]
    for N in (1, 7):  # 7 images of 20 tiles: several bands, and more images than max_batch
        x = inputs((N, *NET_W[0]), dtype, seed=N)
        assert_close(plan(x), model.scores(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 5])
def test_winograd_fuses_its_pool_and_reads_and_writes_borders_in_place(cpu_path, dtype, N):
    """A Winograd conv after a direct one reads that conv's output in place (its zero border),
    pools each 2 x 2 block of outputs, and writes the border the next Winograd conv, then a
    direct one, pad with (odd sizes, which need a padded copy, are NET_W's). A NaN in a pool
    window wins as in conv then pool."""
    shape = (3, 12, 12)
    layers = [
        {"type": "conv", "filters": 24, "size": 3, "stride": 1, "pad": 1},  # (24, 12, 12)
        {"type": "conv", "filters": 24, "size": 3, "stride": 1, "pad": 1},
        {"type": "relu"},
        {"type": "max_pool", "size": 2, "stride": 2},  # (24, 6, 6)
        {"type": "conv", "filters": 26, "size": 3, "stride": 1, "pad": 1},  # (26, 6, 6)
        {"type": "conv", "filters": 9, "size": [3, 2], "stride": 1, "pad": 1},  # (9, 6, 7)
        {"type": "affine", "units": 5},
    ]
    model = make((shape, layers), dtype)
    plan = engine.compile(model, max_batch=2)
    assert plan.ops[:4] == [
        "conv 3x3 s1 p1",
        "conv 3x3 s1 p1 winograd +relu +max_pool 2x2 s2",
        "conv 3x3 s1 p1 winograd",
        "conv 3x2 s1 p1",
    ]
    opad = plan._desc[:4, engine.F_OPAD].tolist()
    copy = plan._desc[:4, engine.F_COPY].tolist()
    assert opad == [1, 1, 1, 0] and copy == [2, 0, 0, 0]
    x = inputs((N, *shape), dtype)
    assert_close(plan(x), model.loss(x))
    x[-1, 0, 5, 3] = np.nan
    got, want = plan(x), model.loss(x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[-1]).all() and not np.isnan(got[:-1]).any()


def test_a_first_layer_runs_as_winograd_from_the_nchw_input():
    shape = (24, 9, 8)  # odd rows: a half block at the bottom
    conv = {"type": "conv", "filters": 40, "size": 3, "stride": 1, "pad": 1}
    model = make((shape, [conv, {"type": "affine", "units": 4}]), np.float32)
    plan = engine.compile(model, max_batch=3)
    assert plan.ops[0] == "conv 3x3 s1 p1 winograd" and plan._desc[0, engine.F_COPY] == 2
    x = inputs((4, *shape), np.float32)
    assert_close(plan(x), model.scores(x))


# One input channel at stride 1, rows at least engine RX wide: ROWCONV, vectorised along the
# rows. 13 filters: two whole blocks of 6 and one of 1; 19 output columns: a row's last tile
# overlaps the one before; a non-square kernel with padding.
NET_R = (
    (1, 13, 21),
    [
        {"type": "conv", "filters": 13, "size": [3, 5], "stride": 1, "pad": 1},  # (13, 13, 19)
        {"type": "spatial_batchnorm"},
        {"type": "relu"},
        {"type": "max_pool", "size": 3, "stride": 2},  # (13, 6, 9)
        {"type": "conv", "filters": 6, "size": 3, "stride": 1, "pad": 0},  # (6, 4, 7)
        {"type": "affine", "units": 5},
    ],
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("filters", [13, 6])
def test_single_channel_convs_run_along_rows_exactly(cpu_path, dtype, filters):
    shape, layers = NET_R
    layers = [{**layers[0], "filters": filters}, *layers[1:]]
    model = make((shape, layers), dtype)
    plan = engine.compile(model, max_batch=3)
    assert plan.ops[0] == "conv 3x5 s1 p1 rowwise +relu"
    assert plan.ops[2] == "conv 3x3 s1 p0"  # 13 or 6 channels in: the channel tiles
    for N in (1, 7):
        x = inputs((N, *shape), dtype, seed=N)
        assert_close(plan(x), model.scores(x))
    narrow = make(((1, 13, 14), layers[:1] + layers[-1:]), dtype)  # 12 columns out: too few
    assert engine.compile(narrow).ops[0] == "conv 3x5 s1 p1"


def test_wide_3x3_convs_run_as_winograd():
    shape = (engine.WINO_MIN_CHANNELS, 5, 6)
    conv = {"type": "conv", "filters": engine.WINO_MIN_CHANNELS, "size": 3, "stride": 1, "pad": 1}
    model = make((shape, [conv, {"type": "relu"}, {"type": "affine", "units": 4}]), np.float32)
    narrow = make(((shape[0] - 1, *shape[1:]), [conv, {"type": "affine", "units": 4}]), np.float32)
    plan = engine.compile(model, max_batch=2)
    assert plan.ops[0] == "conv 3x3 s1 p1 winograd +relu"
    assert engine.compile(narrow).ops[0] == "conv 3x3 s1 p1"
    x = inputs((3, *shape), np.float32)
    assert_close(plan(x), model.scores(x))


def test_a_plan_cache_keeps_the_most_recent_sizes():
    fcn = to_fully_convolutional(make(NET_C, np.float64))
    cache = engine.PlanCache(fcn, size=1)
    for size in [(12, 12), (14, 16), (12, 12)]:
        x = inputs((2, 1, *size), np.float64)
        assert_close(cache(x), layer_path(fcn, x))
    assert list(cache._plans) == [(1, 12, 12)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_of_many_images_run_a_plan_of_the_current_weights(dtype):
    from cnnserve.network import PLAN_MIN_IMAGES

    model = make(NET_A, dtype)
    x = inputs((PLAN_MIN_IMAGES + 3, *NET_A[0]), dtype)
    assert_close(model.scores(x, batch_size=4), model.loss(x))
    model.params["W1"] *= -1  # compiled per call: never stale
    assert_close(model.scores(x, batch_size=4), model.loss(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_sums_run_in_chunks_exactly(cpu_path, dtype):
    """K = 60 * 3 * 3 = 540 values per output: two chunks of k, on direct and gathered tiles
    and on an affine layer run as a GEMM (a batch of 9)."""
    shape = (60, 3, 40)
    layers = [
        {"type": "conv", "filters": 7, "size": 3, "stride": 1, "pad": 0},  # (7, 1, 38)
        {"type": "relu"},
        {"type": "affine", "units": 5},
    ]
    model = make((shape, layers), dtype)
    x = inputs((9, *shape), dtype)
    assert_close(engine.compile(model, max_batch=9)(x), model.loss(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 2, 13])
@pytest.mark.parametrize("filters", [32, 40, 56, 80])
def test_pairs_of_panels_and_a_panel_left_over(cpu_path, dtype, N, filters):
    """The AVX-512 tile runs two panels of 16 channels at once: 32 (a pair), 40 (a pair, the
    second panel partly used), 56 (a pair and a partial panel left) and 80 (two pairs and one
    left, or the panels split between threads for one image), on tiles of 6 pixels, a short
    last tile and lone pixels (the affine layer at N = 1), chunked sums included."""
    shape = (50, 7, 8)
    layers = [
        {"type": "conv", "filters": filters, "size": [3, 2], "stride": 2, "pad": 1},
        {"type": "relu"},
        {"type": "conv", "filters": filters, "size": 3, "stride": 1, "pad": 1},
        {"type": "affine", "units": filters},
    ]
    model = make((shape, layers), dtype)
    x = inputs((N, *shape), dtype)
    assert_close(engine.compile(model, max_batch=N)(x), model.loss(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_and_buffers_start_on_cache_lines(dtype):
    plan = engine.compile(make(NET_A, dtype), max_batch=3)
    plan(inputs((3, *NET_A[0]), dtype))
    starts = [plan._params, *plan._free[0]]
    assert all(a.ctypes.data % engine.ALIGN == 0 for a in starts)
    item = np.dtype(dtype).itemsize
    offsets = plan._desc[:, engine.F_W_OFS : engine.F_B_OFS + 1]  # filters, bias, shift
    assert all(o * item % engine.ALIGN == 0 for o in offsets.ravel())


def test_idle_buffers_are_kept_within_one_budget_for_all_plans(monkeypatch):
    model = make(NET_A, np.float32)
    x = inputs((4, *NET_A[0]), np.float32)
    plan = engine.compile(model, max_batch=4)
    gc.collect()  # the plans of earlier tests leave the total now, not during this test
    before = engine._kept[0]
    want = plan(x)
    assert len(plan._free) == 1 and plan._held[0] > 0  # kept for the next call
    assert engine._kept[0] == before + plan._held[0]
    monkeypatch.setattr(engine, "KEEP_BYTES", engine._kept[0])  # the budget is full
    other = engine.compile(model, max_batch=4)
    assert_close(other(x), want)
    assert other._free == [] and other._held[0] == 0  # freed after its call
    assert_close(plan(x), want)  # took its set and gave it back: the total did not change
    assert len(plan._free) == 1
    del plan
    gc.collect()
    assert engine._kept[0] == before  # a collected plan's buffers leave the total


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_nan_in_a_max_pool_window_wins(cpu_path, dtype):
    layers = [{"type": "max_pool", "size": 2, "stride": 2}]
    fcn = to_fully_convolutional(make(((2, 4, 4), layers), dtype))
    x = inputs((2, 2, 12, 10), dtype)
    x[0, 1, 5, 3] = np.nan
    x[1, 0, 2, 2] = -np.inf
    x[1, 1, 7, 7] = np.inf
    plan = engine.compile(fcn, (2, 12, 10))
    got, want = plan(x), layer_path(fcn, x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got).any() and not np.isnan(got).all()
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    ok = np.isfinite(want)
    assert_close(np.where(ok, got, 0), np.where(ok, want, 0))


def test_a_profile_times_every_op_and_leaves_the_plan_exact():
    model = make(NET_A, np.float32)
    x = inputs((7, *NET_A[0]), np.float32)
    plan = engine.compile(model, max_batch=3)
    rows = plan.profile(x, calls=2)
    assert [op for op, _ in rows] == plan.ops
    assert all(t >= 0 for _, t in rows) and sum(t for _, t in rows) > 0
    assert_close(plan(x), model.scores(x))
    with pytest.raises(ValueError, match="calls"):
        plan.profile(x, calls=0)
    with pytest.raises(ValueError, match=r"x must have shape"):
        plan.profile(x[0])
