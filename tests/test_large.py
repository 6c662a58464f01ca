"""Gigapixel maps: lazy sources, zarr maps equal to the in-memory map, resume, refusals."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from cnnserve.convert import load_fully_convolutional, to_fully_convolutional
from cnnserve.dense import score_map, softmax_cells
from cnnserve.images import ImageError, read_image
from cnnserve.large import MapStoreError, SourceError, open_source, score_map_to_zarr, sinks
from cnnserve.large import run as large_run
from cnnserve.large.picture import map_picture
from cnnserve.large.run import compute_tile, connect, plan_tile, tile_halo
from tests.test_convert import build
from tests.test_dense import PADDED, STRIDE4

MODELS = Path(__file__).resolve().parents[1] / "models"
DETECTOR = MODELS / "digits_detector.safetensors"
DIGITS = MODELS / "digits.safetensors"


@pytest.fixture(scope="module")
def detector():
    return load_fully_convolutional(DETECTOR)


def gray(shape, seed=0):
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


# 93 x 131: margins of one row and one column at stride 2 and window 8.
IMAGE = gray((93, 131), 1)


def write_source(kind, image, folder):
    """``image`` ((H, W) or (H, W, 3) uint8) as a file of ``kind``; returns its path."""
    if kind == "tiled_bigtiff":
        path = folder / "image.tif"
        tifffile.imwrite(path, image, bigtiff=True, tile=(32, 48))
    elif kind == "strip_tiff":
        path = folder / "image.tiff"
        tifffile.imwrite(path, image, rowsperstrip=7)
    elif kind == "zarr":
        path = folder / "image.zarr"
        zarr.create_array(str(path), data=image, chunks=(40, 40))
    elif kind == "npy":
        path = folder / "image.npy"
        np.save(path, image)
    else:
        path = folder / "image.png"
        Image.fromarray(image).save(path)
    return path


def stored(store, name="probabilities"):
    return zarr.open_group(str(store), mode="r")[name][:]


def assert_maps_equal(got, expected):
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * max(1, np.abs(expected).max()))


# ---------------------------------------------------------------------------------------------
# The zarr map is the in-memory map
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tiled_bigtiff", "strip_tiff", "zarr", "npy", "png"])
@pytest.mark.parametrize("tile_cells", [5, 16, None])
def test_zarr_map_equals_the_in_memory_map(detector, tmp_path, kind, tile_cells):
    path = write_source(kind, IMAGE, tmp_path)
    expected = score_map(detector, IMAGE)
    result = score_map_to_zarr(DETECTOR, path, tmp_path / "map.zarr", tile_cells=tile_cells)
    assert result.map_shape == expected.shape == (43, 62)
    assert result.image_size == (93, 131)
    t = tile_cells or 62
    assert result.tiles == -(-43 // t) * -(-62 // t) == result.computed
    array = zarr.open_group(str(tmp_path / "map.zarr"), mode="r")["probabilities"]
    assert array.dtype == np.float32 and array.chunks == (11, t, t)
    assert_maps_equal(array[:], expected.probabilities)
    np.testing.assert_allclose(result.max, expected.max, atol=1e-6)
    np.testing.assert_allclose(result.mean, expected.mean, atol=1e-6)


def test_bigtiff_tiles_not_aligned_to_the_stride_and_attributes(detector, tmp_path):
    # stride 4, window 12; TIFF tiles of 16 x 32 pixels, chunks of 3 cells = 12 pixels
    model = build(STRIDE4, (1, 12, 12), 4, dtype=np.float32, seed=4)
    image = gray((77, 90), 3)
    tifffile.imwrite(tmp_path / "big.tif", image, bigtiff=True, tile=(16, 32))
    fcn = to_fully_convolutional(model)
    result = score_map_to_zarr(fcn, tmp_path / "big.tif", tmp_path / "m.zarr", tile_cells=3)
    expected = score_map(fcn, image)
    assert result.map_shape == (17, 20)  # margins: 1 row, 2 columns
    assert_maps_equal(stored(tmp_path / "m.zarr"), expected.probabilities)
    attrs = zarr.open_group(str(tmp_path / "m.zarr"), mode="r").attrs["cnnserve"]
    assert attrs["geometry"] == fcn.geometry.to_dict()
    assert attrs["image_size"] == [77, 90] and attrs["map_shape"] == [17, 20]
    assert attrs["tile_cells"] == 3 and attrs["complete"] is True
    assert attrs["output"] == "probabilities" and attrs["dtype"] == "float32"


@pytest.mark.parametrize("tile_cells", [1, 2, 5])
def test_padded_network_tiles_with_the_exact_halo(tmp_path, tile_cells):
    fcn = to_fully_convolutional(build(PADDED, (1, 8, 8), 3, dtype=np.float64, seed=2))
    assert tile_halo(fcn.geometry) == (2, 2, 2, 2)  # R = 14, P = 3, S = 2
    image = np.random.default_rng(5).random((29, 34))  # float pixels in [0, 1]
    result = score_map_to_zarr(fcn, image, tmp_path / "p.zarr", output="logits",
                               tile_cells=tile_cells)  # fmt: skip
    expected = score_map(fcn, image)
    got = stored(tmp_path / "p.zarr", "logits")
    assert got.dtype == np.float32
    assert_maps_equal(got, expected.logits.astype(np.float32))
    assert result.output == "logits"


def test_float16_and_logits(detector, tmp_path):
    expected = score_map(detector, IMAGE)
    score_map_to_zarr(detector, IMAGE, tmp_path / "h.zarr", dtype="float16", tile_cells=9)
    half = stored(tmp_path / "h.zarr")
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, expected.probabilities, atol=1e-3)
    score_map_to_zarr(detector, IMAGE, tmp_path / "l.zarr", output="logits", tile_cells=9)
    logits = stored(tmp_path / "l.zarr", "logits")
    assert_maps_equal(logits, expected.logits)
    assert_maps_equal(softmax_cells(logits), expected.probabilities)


def test_pyramid_level_and_rgb_tiff(detector, tmp_path):
    rgb = gray((70, 84, 3), 7)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(rgb, tile=(32, 32), photometric="rgb", subifds=1)
        tif.write(rgb[::2, ::2], tile=(32, 32), photometric="rgb", subfiletype=1)
    for level, pixels in ((0, rgb), (1, rgb[::2, ::2])):
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp_path / f"l{level}.png")
        expected = score_map(detector, read_image(tmp_path / f"l{level}.png", 1))  # Pillow's L
        out = tmp_path / f"l{level}.zarr"
        result = score_map_to_zarr(DETECTOR, path, out, level=level, tile_cells=6)
        assert result.image_size == pixels.shape[:2]
        assert_maps_equal(stored(out), expected.probabilities)
    with pytest.raises(ImageError, match=r"has 2 pyramid level\(s\) \(0 to 1\), got level 2"):
        open_source(path, 1, level=2)


def test_sixteen_bit_and_float_tiff(detector, tmp_path):
    deep = (np.random.default_rng(2).random((40, 50)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", deep, tile=(16, 16))
    with open_source(tmp_path / "deep.tif", 1) as src:
        np.testing.assert_allclose(src.read(3, 20, 5, 9), (deep[None, 3:20, 5:9] / 65535.0))
    floats = np.random.default_rng(3).random((40, 50)).astype(np.float32) * 1.5 - 0.25
    tifffile.imwrite(tmp_path / "f.tif", floats)
    with open_source(tmp_path / "f.tif", 3) as src:  # clipped, repeated to 3 channels
        region = src.read(0, 40, 0, 50)
    assert region.shape == (3, 40, 50)
    np.testing.assert_array_equal(region[2], np.clip(floats, 0, 1))


# ---------------------------------------------------------------------------------------------
# Resume, progress, refusal to mix maps
# ---------------------------------------------------------------------------------------------


class Killed(BaseException):
    """A stand-in for the process dying (not an Exception: nothing catches it)."""


def test_resume_after_a_kill_between_a_chunk_and_its_mark(detector, tmp_path, monkeypatch):
    store = tmp_path / "r.zarr"
    expected = score_map(detector, IMAGE).probabilities
    real_mark = sinks.MapStore.mark_done
    calls = []

    def dying_mark(self, ti, tj, stats):
        calls.append((ti, tj))
        if len(calls) == 4:  # the 4th tile's chunk is written, its mark never is
            raise Killed
        real_mark(self, ti, tj, stats)

    monkeypatch.setattr(sinks.MapStore, "mark_done", dying_mark)
    with pytest.raises(Killed):
        score_map_to_zarr(detector, IMAGE, store, tile_cells=10)
    monkeypatch.undo()
    marked = sorted(p.name for p in (store / "done").glob("*.json"))
    assert marked == ["0_0.json", "0_1.json", "0_2.json"]
    assert not zarr.open_group(str(store), mode="r").attrs["cnnserve"]["complete"]
    assert not np.isnan(stored(store)[:, 0, 35]).any()  # tile (0, 3): written, not marked
    assert np.isnan(stored(store)[:, 0, 45]).all()  # tile (0, 4): never written

    seen = []
    result = score_map_to_zarr(
        detector, IMAGE, store, tile_cells=10, progress=lambda done, total: seen.append(done)
    )
    assert result.tiles == 35 and result.computed == 32  # 3 skipped, tile (0, 3) redone
    assert seen == list(range(4, 36))
    assert_maps_equal(stored(store), expected)
    again = score_map_to_zarr(detector, IMAGE, store, tile_cells=10)
    assert again.computed == 0
    np.testing.assert_array_equal(again.max, result.max)


def test_resume_after_a_kill_inside_a_tile(detector, tmp_path, monkeypatch):
    store = tmp_path / "k.zarr"
    real = large_run.compute_tile
    count = [0]

    def dying(*args, **kwargs):
        count[0] += 1
        if count[0] == 6:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(large_run, "compute_tile", dying)
    with pytest.raises(Killed):
        score_map_to_zarr(detector, IMAGE, store, tile_cells=15)
    monkeypatch.undo()
    assert len(list((store / "done").glob("*.json"))) == 5
    result = score_map_to_zarr(detector, IMAGE, store, tile_cells=15)
    assert result.computed == result.tiles - 5 == 10
    assert_maps_equal(stored(store), score_map(detector, IMAGE).probabilities)


def test_a_store_of_another_map_is_refused_unless_overwrite(detector, tmp_path):
    store = tmp_path / "m.zarr"
    score_map_to_zarr(detector, IMAGE, store, tile_cells=20)
    for kwargs, names in [
        ({"model": DIGITS}, "model, class_names"),
        ({"tile_cells": 10}, "tile_cells"),
        ({"output": "logits"}, "output"),
        ({"dtype": "float16"}, "dtype"),
        ({"source": IMAGE[:-2]}, "image_size, map_shape"),
    ]:
        args = {"model": detector, "source": IMAGE, "tile_cells": 20, **kwargs}
        with pytest.raises(MapStoreError, match=f"its {names} differ from this run's"):
            score_map_to_zarr(args.pop("model"), args.pop("source"), store, **args)
    assert stored(store).shape == (11, 43, 62)  # untouched
    digits = load_fully_convolutional(DIGITS)
    result = score_map_to_zarr(digits, IMAGE, store, tile_cells=10, overwrite=True)
    assert result.computed == result.tiles == 35
    assert_maps_equal(stored(store), score_map(digits, IMAGE).probabilities)
    assert len(list((store / "done").glob("*.json"))) == 35  # the old marks are gone


def test_a_directory_that_is_not_a_map_is_never_deleted(detector, tmp_path):
    folder = tmp_path / "precious.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(MapStoreError, match="is not a cnnserve map store"):
        score_map_to_zarr(detector, IMAGE, folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(MapStoreError, match="is not a cnnserve map store"):
        score_map_to_zarr(detector, IMAGE, tmp_path / "file.zarr")


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written
# ---------------------------------------------------------------------------------------------


def bad_sources(folder):
    tifffile.imwrite(folder / "five.tif", gray((30, 30, 5)), planarconfig="contig",
                     photometric="minisblack")  # fmt: skip
    tifffile.imwrite(folder / "int32.tif", np.zeros((30, 30), np.int32))
    tifffile.imwrite(folder / "bits.tif", np.zeros((30, 30), bool))
    tifffile.imwrite(folder / "stack.tif", gray((3, 30, 30)), photometric="minisblack")
    tifffile.imwrite(folder / "small.tif", gray((7, 30)))
    (folder / "text.tif").write_text("not a TIFF at all")
    zarr.create_array(str(folder / "four_d.zarr"), data=np.zeros((1, 1, 30, 30), np.uint8))
    zarr.create_array(str(folder / "rgb.zarr"), data=np.zeros((3, 30, 30), np.uint8))
    zarr.open_group(str(folder / "group.zarr"), mode="w").create_array("a", shape=(30, 30),
                                                                       dtype="u1")  # fmt: skip
    np.save(folder / "wrong.npy", np.zeros((30, 30, 3), np.uint8))
    np.save(folder / "int64.npy", np.zeros((30, 30), np.int64))
    return [
        ("five.tif", {}, SourceError, "has 5 samples per pixel: at most 4"),
        ("int32.tif", {}, ImageError, "has int32 pixels: .*bit depth 8, 16 or float"),
        ("bits.tif", {}, ImageError, "has bool pixels"),
        ("stack.tif", {}, ImageError, r"is not one image: its dimensions are \w+ \(3, 30, 30\)"),
        ("small.tif", {}, ValueError, "smaller than the network's 8x8 window"),
        ("text.tif", {}, ImageError, "cannot be read"),
        ("missing.tif", {}, ImageError, "does not exist"),
        (
            "four_d.zarr",
            {},
            ImageError,
            r"must have shape \(H, W\) or \(1, H, W\) .*\(1, 1, 30, 30\)",
        ),
        ("rgb.zarr", {}, ImageError, r"must have shape .* got \(3, 30, 30\)"),
        ("group.zarr", {}, ImageError, "is a zarr group, not an array"),
        ("wrong.npy", {}, ImageError, r"got \(30, 30, 3\)"),
        ("int64.npy", {}, ImageError, "has int64 pixels"),
        ("five.tif", {"level": 1}, ImageError, "has 1 pyramid level"),
        ("wrong.npy", {"level": 1}, ValueError, "level applies to TIFF pyramids only"),
        (
            "five.tif",
            {"output": "scores"},
            ValueError,
            "output must be one of probabilities, logits",
        ),
        ("five.tif", {"dtype": "float64"}, ValueError, "dtype must be one of float32, float16"),
        ("five.tif", {"tile_memory": 0}, ValueError, "tile_memory"),
    ]


def test_bad_inputs_are_clear_errors_and_write_nothing(detector, tmp_path):
    for name, kwargs, error, message in bad_sources(tmp_path):
        store = tmp_path / "never.zarr"
        with pytest.raises(error, match=message):
            score_map_to_zarr(detector, tmp_path / name, store, **kwargs)
        assert not store.exists(), name


def test_out_of_range_floats_fail_a_tile_which_is_not_marked_done(detector, tmp_path):
    image = np.random.default_rng(0).random((60, 60)).astype(np.float32)
    image[50, 50] = 1.5  # in the last tile
    np.save(tmp_path / "f.npy", image)
    with pytest.raises(ValueError, match=r"a float image must hold pixels in \[0, 1\]"):
        score_map_to_zarr(detector, tmp_path / "f.npy", tmp_path / "f.zarr", tile_cells=14)
    done = sorted(p.name for p in (tmp_path / "f.zarr" / "done").iterdir())
    assert len(done) == 3 and "1_1.json" not in done


def test_sources_read_only_their_region(detector, tmp_path):
    path = write_source("tiled_bigtiff", IMAGE, tmp_path)
    with open_source(path, 1) as src:
        assert (src.height, src.width, src.samples, src.dtype) == (93, 131, 1, np.uint8)
        np.testing.assert_array_equal(
            src.read(10, 50, 7, 99)[0], IMAGE[10:50, 7:99].astype(np.float32) / np.float32(255)
        )
        with pytest.raises(ValueError, match=r"region rows \[0, 94\) .* outside the 93x131"):
            src.read(0, 94, 0, 10)
    with pytest.raises(TypeError, match="source must be a file path, a numpy array or a zarr"):
        open_source(42, 1)


def test_tile_plan_follows_tile_memory(detector):
    small, large = plan_tile(detector, 8 * 2**20), plan_tile(detector, 256 * 2**20)
    assert 1 <= small < large == 512
    cells = (0, 7, 0, 9)
    logits, probabilities = compute_tile(detector, open_source(IMAGE, 1), cells, (43, 62), 2**20)
    assert_maps_equal(probabilities, score_map(detector, IMAGE).probabilities[:, :7, :9])
    assert logits.shape == (11, 7, 9)


# ---------------------------------------------------------------------------------------------
# The picture
# ---------------------------------------------------------------------------------------------


def test_map_picture_is_the_block_max_of_one_class(detector, tmp_path):
    store = tmp_path / "m.zarr"
    score_map_to_zarr(detector, IMAGE, store, tile_cells=7, output="logits")
    probabilities = softmax_cells(stored(store, "logits"))
    picture, shown, factor = map_picture(store, 3, max_side=10, legend=False)
    assert factor == 7 and picture.size == (9, 7)  # ceil(62 / 7), ceil(43 / 7)
    block = probabilities[3, 7:14, 14:21].max()
    from cnnserve.heatmap import colorize

    assert tuple(np.asarray(picture)[1, 2]) == tuple(colorize(np.array([[block]]))[0, 0])
    _, default, _ = map_picture(store, max_side=10)
    attrs = zarr.open_group(str(store), mode="r").attrs["cnnserve"]
    top = [k for k in np.argsort(attrs["max"])[::-1] if k != 10][0]
    assert default == top


def test_picture_of_an_unfinished_map_is_refused(detector, tmp_path):
    store = tmp_path / "u.zarr"
    score_map_to_zarr(detector, IMAGE, store, tile_cells=20)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["cnnserve"]["complete"] = False
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(MapStoreError, match="unfinished map"):
        map_picture(store)
    shutil.rmtree(store / "probabilities")
    with pytest.raises(MapStoreError, match="is not a cnnserve map store"):
        map_picture(tmp_path)


# ---------------------------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------------------------


def test_local_cluster_of_two_processes_gives_the_same_map(detector, tmp_path):
    from distributed import Client

    path = write_source("tiled_bigtiff", IMAGE, tmp_path)
    expected = score_map(detector, IMAGE).probabilities
    before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with large_run.local_cluster(2) as cluster, Client(cluster, set_as_default=False) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        threads = client.run(lambda: __import__("os").environ["OMP_NUM_THREADS"])
        assert set(threads.values()) == {str(max(1, len(os.sched_getaffinity(0)) // 2))}
        assert {k: os.environ.get(k) for k in before} == before  # ours is left alone
        with pytest.raises(TypeError, match="model must be a model file path with client"):
            score_map_to_zarr(detector, path, tmp_path / "x.zarr", client=client)
        with pytest.raises(TypeError, match="source must be a file path with client"):
            score_map_to_zarr(DETECTOR, IMAGE, tmp_path / "x.zarr", client=client)
        result = score_map_to_zarr(DETECTOR, path, tmp_path / "d.zarr", tile_cells=8,
                                   client=client)  # fmt: skip
        pids = client.run(lambda: __import__("os").getpid())
    assert len(set(pids.values())) == 2
    assert result.computed == result.tiles == 48
    assert len(list((tmp_path / "d.zarr" / "done").glob("*.json"))) == 48
    assert_maps_equal(stored(tmp_path / "d.zarr"), expected)


def test_unreachable_scheduler_is_a_clear_error_within_the_timeout():
    started = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"no Dask scheduler answers at tcp://127.0.0.1:9 "):
        connect("tcp://127.0.0.1:9", timeout=1)
    assert time.perf_counter() - started < 10
    with pytest.raises(ValueError, match="scheduler must be an address like tcp://HOST:PORT"):
        connect("localhost")


def test_a_worker_that_dies_mid_run_leaves_the_run_to_the_others(detector, tmp_path):
    from distributed import Client

    path = write_source("tiled_bigtiff", IMAGE, tmp_path)
    killed = []
    with large_run.local_cluster(2) as cluster, Client(cluster, set_as_default=False) as client:
        victim = sorted(client.run(os.getpid).values())[0]

        def kill_one_worker(done, total):
            if not killed:  # after the first block: the other blocks are queued or running
                killed.append(done)
                os.kill(victim, signal.SIGKILL)

        result = score_map_to_zarr(DETECTOR, path, tmp_path / "w.zarr", tile_cells=4,
                                   client=client, progress=kill_one_worker)  # fmt: skip
    assert killed and killed[0] < result.tiles
    assert result.computed == result.tiles == 176
    assert_maps_equal(stored(tmp_path / "w.zarr"), score_map(detector, IMAGE).probabilities)


@pytest.mark.parametrize("compression", ["jpeg", "lzw", "zlib"])
def test_compressed_tiles_as_whole_slide_scans_store_them(detector, tmp_path, compression):
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, IMAGE, tile=(32, 32), compression=compression)
    decoded = tifffile.imread(path)  # JPEG is lossy: the map is that of the decoded pixels
    assert (compression == "jpeg") != np.array_equal(decoded, IMAGE)
    score_map_to_zarr(DETECTOR, path, tmp_path / "c.zarr", tile_cells=9)
    assert_maps_equal(stored(tmp_path / "c.zarr"), score_map(detector, decoded).probabilities)
