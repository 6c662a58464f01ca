"""``cnnserve scoremap ... --out map.zarr``: the zarr map from the command line, its refusals."""

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from cnnserve.cli import main
from cnnserve.convert import load_fully_convolutional
from cnnserve.dense import score_map

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_detector.safetensors"
IMAGE = (np.random.default_rng(4).random((75, 101)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiff(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiff") / "big.tif"
    tifffile.imwrite(path, IMAGE, bigtiff=True, tile=(32, 32))
    return path


@pytest.fixture(scope="module")
def expected():
    return score_map(load_fully_convolutional(MODEL), IMAGE).probabilities


def test_scoremap_out_zarr_writes_the_map_and_its_picture(tiff, expected, tmp_path, capsys):
    out, png = tmp_path / "map.zarr", tmp_path / "map.png"
    argv = ["scoremap", str(MODEL), str(tiff), "--out", str(out), "--tile-cells", "8",
            "--png", str(png), "--png-max-side", "20", "--class", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert (
        "75x101 pixels; map 34x47 cells at stride 2 px in 30 tiles (30 computed, 0 already " in text
    )
    assert "top-5 by max over cells:" in text
    assert f"wrote {out}: array 'probabilities' of shape (11, 34, 47), float32" in text
    assert "class '3' probability, each pixel the max over 3x3 cells" in text
    array = zarr.open_group(str(out), mode="r")["probabilities"]
    np.testing.assert_allclose(array[:], expected, atol=2e-6)
    with Image.open(png) as picture:
        assert picture.width > 16 and picture.height >= 120  # 16 x 12 map, colour bar, title
    assert main(argv) == 0  # again: nothing left to compute
    assert "(0 computed, 30 already done)" in capsys.readouterr().out


def test_scoremap_out_zarr_on_a_local_cluster(tiff, expected, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    argv = ["scoremap", str(MODEL), str(tiff), "--out", str(out), "--tile-cells", "16",
            "--local-cluster", "2", "--dtype", "float16", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "(9 computed, 0 already done)" in capsys.readouterr().out
    half = zarr.open_group(str(out), mode="r")["probabilities"][:]
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, expected, atol=1e-3)


def test_scoremap_out_zarr_refusals(tiff, tmp_path, capsys):
    out = str(tmp_path / "m.zarr")
    bad = tmp_path / "five.tif"
    tifffile.imwrite(bad, np.zeros((20, 20, 5), np.uint8), photometric="minisblack",
                     planarconfig="contig")  # fmt: skip
    base = ["scoremap", str(MODEL), str(tiff)]
    cases = [
        (["--out", out, "--json", "x.json"], r"--json does not apply to a zarr map \(--out\)"),
        (["--out", out, "--scales", "1,2"], "--scales does not apply to a zarr map"),
        (["--out", out, "--stride-divisor", "2"], "--stride-divisor does not apply"),
        (["--level", "1"], "--level needs --out MAP.zarr"),
        (["--local-cluster", "2"], "--local-cluster needs --out MAP.zarr"),
        (["--out", str(tmp_path / "m.h5")], "--out must be a zarr store ending in .zarr"),
        (["--out", str(tmp_path / "no" / "m.zarr")], "directory .*no not found"),
        (
            ["--out", out, "--local-cluster", "2", "--scheduler", "tcp://127.0.0.1:9"],
            "give --scheduler or --local-cluster, not both",
        ),
        (
            ["--out", out, "--scheduler", "tcp://127.0.0.1:9", "--scheduler-timeout", "1"],
            "no Dask scheduler answers at tcp://127.0.0.1:9 within 1 s",
        ),
        (["--out", out, "--level", "3"], "has 1 pyramid level"),
        (["--out", out, "--class", "seven"], "--class"),
    ]
    for extra, message in cases:
        assert main([*base, *extra, "--quiet"]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("cnnserve scoremap: error: ") and err.count("\n") == 1, err
        assert re.search(message, err), (message, err)
    assert main(["scoremap", str(MODEL), str(bad), "--out", out, "--quiet"]) == 2
    assert "has 5 samples per pixel: at most 4" in capsys.readouterr().err
    assert not Path(out).exists()  # no refusal left a store behind
    assert main([*base, "--out", out, "--quiet", "--tile-cells", "10"]) == 0
    assert main([*base, "--out", out, "--quiet", "--tile-cells", "12"]) == 2
    assert "its tile_cells differ from this run's" in capsys.readouterr().err
    assert main([*base, "--out", out, "--quiet", "--tile-cells", "12", "--overwrite"]) == 0
    assert "(12 computed, 0 already done)" in capsys.readouterr().out


def test_readme_gigapixel_example_runs(tmp_path, monkeypatch, expected):
    readme = (MODEL.parents[1] / "README.md").read_text()
    (block,) = re.findall(r"```py\n(.*?)```", readme, flags=re.DOTALL)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").symlink_to(MODEL.parent)
    tifffile.imwrite(tmp_path / "BIG.tif", IMAGE, bigtiff=True, tile=(32, 32))
    example: dict = {"__name__": "__main__"}  # run as a script runs it (the block's guard)
    exec(compile(block, "README.md", "exec"), example)
    np.testing.assert_allclose(example["result"].open()[:], expected, atol=2e-6)
    second = zarr.open_group(str(tmp_path / "map2.zarr"), mode="r")["probabilities"][:]
    np.testing.assert_allclose(second, expected, atol=2e-6)


def test_tile_memory_sizes_and_the_progress_bar(tiff, tmp_path, capsys):
    from cnnserve.cli.large import memory_size

    assert memory_size("256M") == 256 * 2**20 and memory_size("1g") == 2**30
    assert memory_size("4096") == 4096 and memory_size("64MiB") == 64 * 2**20
    with pytest.raises(SystemExit) as exit_info:
        main(["scoremap", str(MODEL), str(tiff), "--out", "x.zarr", "--tile-memory", "lots"])
    assert exit_info.value.code == 2
    assert "--tile-memory: must be a size like 256M or 1G, got 'lots'" in capsys.readouterr().err
    out = tmp_path / "p.zarr"
    argv = ["scoremap", str(MODEL), str(tiff), "--out", str(out), "--tile-memory", "1M"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    tiles = int(re.search(r"in (\d+) tiles", captured.out).group(1))
    assert tiles > 1  # 1 MiB does not hold the whole 34 x 47 map in one tile
    # tqdm writes the rate as tile/s, or as s/tile when a tile takes over a second (loaded machine)
    rate = r"(tile/s|s/tile)"
    assert re.search(rf"score map: 100%.* {tiles}/{tiles} .*{rate}, [\d.]+ Mpx/s", captured.err)
