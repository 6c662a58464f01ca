"""Damaged image files against the service and the CLI: a 400 ``invalid_image``, never a 500.

A seeded mutator damages valid PNG, JPEG, GIF, BMP, TIFF and WebP files (bytes flipped, words
overwritten with extreme values, truncations, TIFF tags given another type, count or value)
and every mutant goes to ``/predict``: each must get a clean 2xx or 4xx. The mutants are the
same on every run (one seed), and their number is bounded so that the test takes seconds.
"""

from __future__ import annotations

import collections
import io
import random
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cnnserve.cli import main
from cnnserve.images import ImageError, read_image
from cnnserve.service import Settings, create_app

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"
SEED = 20
# Mutants per format: TIFF, with its many tags of many types, gets the most.
MUTANTS = {"PNG": 120, "JPEG": 120, "GIF": 120, "BMP": 120, "TIFF": 400, "WEBP": 120}
# How each format's file is sent: its own media type, or (WebP) as a multipart upload of
# unnamed type, so that the decoder finds the format from the bytes alone.
MEDIA = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "WEBP": None,
}
# TIFF field types (1 BYTE ... 18 IFD8) and a few that do not exist.
TIFF_TYPES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18, 99)
EXTREMES = (0, 1, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1)
STRIP_TAGS = (273, 278, 279)  # StripOffsets, RowsPerStrip, StripByteCounts


def originals() -> dict[str, list[bytes]]:
    """Small valid files of each format: gray and colour, and TIFF in three compressions."""
    rng = np.random.default_rng(SEED)
    rgb = (rng.random((12, 10, 3)) * 255).astype(np.uint8)
    gray = rgb[..., 0]
    files: dict[str, list[bytes]] = collections.defaultdict(list)
    for fmt, options in [
        ("PNG", {}),
        ("JPEG", {"quality": 80}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("TIFF", {"compression": "tiff_adobe_deflate"}),
        ("WEBP", {"quality": 80}),
    ]:
        for pixels in (rgb, gray):
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, fmt, **options)
            files[fmt].append(buf.getvalue())
    return files


def tiff_entry(data: bytes, rnd: random.Random) -> tuple[str, int]:
    """The byte order and the offset of one entry of a TIFF's first directory.

    Half the time one of the strip tags (offsets, byte counts, rows per strip), whose damage
    reaches deepest into the decoder; else any entry.
    """
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
    entries = [ifd + 2 + 12 * i for i in range(count)]
    strips = [e for e in entries if struct.unpack(order + "H", data[e : e + 2])[0] in STRIP_TAGS]
    return order, rnd.choice(strips if strips and rnd.random() < 0.5 else entries)


def mutate(data: bytes, fmt: str, rnd: random.Random) -> tuple[str, bytes]:
    """One damaged copy of ``data``: ``(kind of damage, bytes)``."""
    kinds = ["flip", "word", "truncate", "splice"] + ["tag"] * 4 * (fmt == "TIFF")
    kind = rnd.choice(kinds)
    d = bytearray(data)
    if kind == "flip":
        for _ in range(rnd.randint(1, 8)):
            d[rnd.randrange(len(d))] ^= 1 << rnd.randrange(8)
    elif kind == "word":
        at = rnd.randrange(len(d) - 4)
        d[at : at + 4] = struct.pack(rnd.choice("<>") + "I", rnd.choice(EXTREMES))
    elif kind == "truncate":
        del d[rnd.randrange(1, len(d)) :]
    elif kind == "splice":  # a span repeated or removed
        a, b = sorted(rnd.sample(range(len(d)), 2))
        d[a:b] = d[a:b] * 2 if rnd.random() < 0.5 else b""
    else:  # a TIFF tag of another type, count or value
        order, e = tiff_entry(data, rnd)
        field = rnd.choice("ttcv")  # mostly the type: what tripped Pillow before
        if field == "t":
            d[e + 2 : e + 4] = struct.pack(order + "H", rnd.choice(TIFF_TYPES))
        elif field == "c":
            d[e + 4 : e + 8] = struct.pack(order + "I", rnd.choice(EXTREMES))
        else:
            d[e + 8 : e + 12] = struct.pack(order + "I", rnd.choice(EXTREMES))
    return kind, bytes(d)


def retyped_strip_offsets(field_type: int) -> bytes:
    """A valid 8x8 TIFF whose StripOffsets tag (273) claims another field type."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, "TIFF")
    d = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", d[4:8])[0]
    for i in range(struct.unpack("<H", d[ifd : ifd + 2])[0]):
        e = ifd + 2 + 12 * i
        if struct.unpack("<H", d[e : e + 2])[0] == 273:
            d[e + 2 : e + 4] = struct.pack("<H", field_type)
            return bytes(d)
    raise AssertionError("no StripOffsets tag")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(MODEL, folder / "digits.safetensors")
    # A 500 comes back as a response to assert on, not as the server's exception.
    with TestClient(create_app(Settings(models=folder)), raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load in time"
            time.sleep(0.02)
        yield c


def post(client: TestClient, fmt: str, data: bytes):
    url = "/v1/models/digits/predict"
    if MEDIA[fmt] is None:
        return client.post(url, files={"file": ("upload", data, "application/octet-stream")})
    return client.post(url, content=data, headers={"Content-Type": MEDIA[fmt]})


# TIFF types 2 (ASCII), 5 (RATIONAL), 7 (UNDEFINED), 10, 11, 12 made Pillow raise TypeError
# while loading: a 500 before every decoder error became a 400.
@pytest.mark.parametrize("field_type", [2, 5, 7, 10, 11, 12])
def test_a_tiff_tag_of_another_type_is_a_400(client, field_type):
    data = retyped_strip_offsets(field_type)
    with pytest.raises(ImageError, match="cannot be decoded as an image"):
        read_image(data, 1)
    response = post(client, "TIFF", data)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_image"
    assert "cannot be decoded" in response.json()["error"]["message"]


def test_the_cli_reports_a_damaged_tiff_in_one_line(tmp_path, capsys):
    image = tmp_path / "bad.tif"
    image.write_bytes(retyped_strip_offsets(5))
    assert main(["predict", str(MODEL), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnserve predict: error: ") and "cannot be decoded" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_mutated_images_get_a_clean_answer(client):
    files = originals()
    statuses: dict[str, collections.Counter] = {}
    kinds: collections.Counter = collections.Counter()
    for fmt in MEDIA:
        counts = statuses[fmt] = collections.Counter()
        rnd = random.Random(f"{SEED}-{fmt}")  # each format's mutants, whatever the others
        for _ in range(MUTANTS[fmt]):
            kind, data = mutate(rnd.choice(files[fmt]), fmt, rnd)
            kinds[kind] += 1
            response = post(client, fmt, data)
            counts[response.status_code] += 1
            assert response.status_code < 500, (fmt, kind, data, response.text)
            if response.status_code >= 400:
                body = response.json()["error"]
                assert body["code"] in {"invalid_image", "image_too_large"}, (fmt, kind, body)
            else:
                assert response.json()["predictions"]
    print(f"\nmutants by format and status: { {f: dict(c) for f, c in statuses.items()} }")
    print(f"mutants by kind: {dict(kinds)}")
    assert {f: sum(c.values()) for f, c in statuses.items()} == MUTANTS
    # The mutants are not all refused: some damage is survivable, and those still run.
    assert sum(c[200] for c in statuses.values()) > 0
    assert all(c[400] > 0 for c in statuses.values())
    for fmt in MEDIA:  # each valid original is still answered
        for data in files[fmt]:
            assert post(client, fmt, data).status_code == 200
