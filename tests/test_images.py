"""Bytes to a network's input (cnnserve.images): decoding, pixels, .npy arrays, normalisation."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cnnserve.convert import to_fully_convolutional
from cnnserve.images import (
    ImageError,
    as_image,
    normalize_raw,
    preprocess,
    read_image,
    read_image_file,
    read_npy,
)
from cnnserve.network import ConvNet


def test_as_image_shapes_and_scaling():
    gray = np.array([[0, 51, 255], [102, 204, 153]], dtype=np.uint8)
    out = as_image(gray, 1)
    assert out.shape == (1, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], gray / 255.0, rtol=1e-7)
    assert out[0, 0, 2] == 1.0 and out[0, 0, 0] == 0.0
    np.testing.assert_array_equal(as_image(gray[None], 1), out)
    rgb = np.random.default_rng(0).random((3, 4, 5))
    out = as_image(rgb, 3)
    assert out.shape == (3, 4, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out, rgb.astype(np.float32))
    edges = np.array([[0.0, 1.0]], dtype=np.float64)
    np.testing.assert_array_equal(as_image(edges, 1), [[[0.0, 1.0]]])


@pytest.mark.parametrize(
    ("image", "channels", "error", "message"),
    [
        ([[0.5]], 1, TypeError, "numpy.ndarray, got list"),
        (np.zeros((4, 4)), 3, ValueError, r"\(3, H, W\) for this model, got \(4, 4\)"),
        (np.zeros((3, 4, 4)), 1, ValueError, r"\(H, W\) or \(1, H, W\)"),
        (np.zeros((1, 4, 4)), 3, ValueError, r"\(3, H, W\)"),
        (np.zeros((4,)), 1, ValueError, "shape"),
        (np.zeros((1, 1, 4, 4)), 1, ValueError, "shape"),
        (np.zeros((0, 4)), 1, ValueError, "empty"),
        (np.zeros((3, 4, 0)), 3, ValueError, "empty"),
        (np.full((2, 2), 1.5), 1, ValueError, "in \\[0, 1\\], got values from 1.5 to 1.5"),
        (np.full((2, 2), -0.1), 1, ValueError, "\\[0, 1\\]"),
        (np.array([[0.5, np.nan]]), 1, ValueError, "\\[0, 1\\]"),
        (np.array([[0.5, np.inf]]), 1, ValueError, "\\[0, 1\\]"),
        (np.zeros((2, 2), dtype=np.int32), 1, TypeError, "uint8 .* or float .* got int32"),
        (np.zeros((2, 2), dtype=bool), 1, TypeError, "got bool"),
        (np.zeros((2, 2), dtype=np.uint16), 1, TypeError, "got uint16"),
        (np.zeros((2, 2), dtype=np.complex64), 1, TypeError, "complex64"),
    ],
)
def test_as_image_errors(image, channels, error, message):
    with pytest.raises(error, match=message):
        as_image(image, channels)


def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_read_image_gray_png_bytes_and_files(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (6, 9), dtype=np.uint8)
    data = png_bytes(gray)
    out = read_image(data, 1)
    assert out.shape == (1, 6, 9) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], gray.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(read_image(bytearray(data), 1), out)
    path = tmp_path / "gray.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(read_image(path, 1), out)
    np.testing.assert_array_equal(read_image(str(path), 1), out)
    three = read_image(path, 3)  # gray -> RGB: three equal planes
    assert three.shape == (3, 6, 9)
    for c in range(3):
        np.testing.assert_array_equal(three[c], out[0])


def test_read_image_rgb_and_rgba(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = read_image(png_bytes(rgb), 3)
    assert out.shape == (3, 5, 7)
    np.testing.assert_array_equal(out, rgb.transpose(2, 0, 1) / np.float32(255))
    gray = read_image(png_bytes(rgb), 1)  # ITU-R 601 luma, unrounded
    r, g, b = (rgb[..., c].astype(np.float64) / 255 for c in range(3))
    np.testing.assert_allclose(gray[0], 0.299 * r + 0.587 * g + 0.114 * b, rtol=0, atol=1e-6)
    pillow = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(gray[0], pillow, atol=0.5 / 255 + 1e-6)  # Pillow rounds
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, dtype=np.uint8)], axis=2)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    np.testing.assert_array_equal(read_image(path, 3), out)  # opaque: the colours as they are
    assert read_image(path, 1).shape == (1, 5, 7)
    rgba[..., 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(path)
    np.testing.assert_array_equal(read_image(path, 3), 1.0)  # transparent: over white
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG", quality=95)
    assert read_image(jpeg.getvalue(), 3).shape == (3, 5, 7)


def test_read_image_16_bit_png(tmp_path):
    deep = np.array([[0, 1000, 65535], [32768, 257, 12345]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    out = read_image(path, 1)
    assert out.shape == (1, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], deep / 65535.0, rtol=1e-6)
    assert out[0, 0, 2] == 1.0 and out[0, 0, 0] == 0.0
    three = read_image(path, 3)
    assert three.shape == (3, 2, 3)
    np.testing.assert_array_equal(three[1], out[0])


def test_read_image_errors(tmp_path):
    with pytest.raises(ImageError, match="the data cannot be decoded as an image"):
        read_image(b"definitely not an image", 1)
    with pytest.raises(ImageError, match="cannot be decoded"):
        read_image(png_bytes(np.zeros((4, 4), np.uint8))[:40], 1)  # truncated PNG
    text = tmp_path / "notes.txt"
    text.write_text("hello, world\n" * 10)
    with pytest.raises(ImageError, match=f"image {text} cannot be decoded"):
        read_image(text, 1)
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match=f"image {missing} does not exist"):
        read_image(missing, 1)
    with pytest.raises(ImageError):
        read_image(b"", 3)
    with pytest.raises(
        ValueError, match=r"channels must be 1, 3 or None \(the image's own\), got 2"
    ):
        read_image(png_bytes(np.zeros((4, 4), np.uint8)), 2)
    assert issubclass(ImageError, ValueError)


def test_read_image_refuses_too_many_pixels():
    data = png_bytes(np.zeros((20, 30), np.uint8))
    assert read_image(data, 1, max_pixels=600).shape == (1, 20, 30)
    with pytest.raises(ImageError, match=r"20x30 \(HxW\) = 600 pixels, more than the limit of 599"):
        read_image(data, 1, max_pixels=599)


def test_read_image_refuses_a_bomb_before_decoding():
    """A PNG header claiming 9000 x 9000 pixels, with garbage where the pixels should be."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"\x00" * 16)
    with pytest.raises(
        ImageError, match=r"9000x9000 \(HxW\) = 81,000,000 pixels, more than the limit"
    ):
        read_image(data, 1)  # the default limit: 64 Mi pixels


def test_read_image_file_reads_npy_arrays_and_images(tmp_path):
    pixels = np.random.default_rng(2).random((3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", pixels)
    np.testing.assert_array_equal(read_image_file(tmp_path / "x.npy", 3), pixels)
    (tmp_path / "x.png").write_bytes(png_bytes(np.zeros((4, 5), np.uint8)))
    assert read_image_file(str(tmp_path / "x.png"), 3).shape == (3, 4, 5)


def test_read_npy_checks_the_header_before_loading(tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((10, 10), np.uint8))
    with pytest.raises(ImageError, match=r"shape \(10, 10\) .* at most 99 numbers"):
        read_npy(tmp_path / "big.npy", 99)
    np.save(tmp_path / "objects.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError, match="no Python objects"):
        read_npy(tmp_path / "objects.npy", 99)
    data = (tmp_path / "big.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(data[:-10])
    with pytest.raises(ImageError, match="shorter than its header says"):
        read_npy(tmp_path / "short.npy", 1000)
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ImageError, match="cannot read image array"):
        read_npy(tmp_path / "text.npy", 1000)


def test_normalize_raw_scales_integer_levels():
    raw = np.array([[[[0, 8, 16]]]], dtype=np.uint8)  # (1, 1, 1, 3), digits' 0..16
    out = normalize_raw(raw, 16, [0.5], [0.25], np.float64)
    np.testing.assert_allclose(out[0, 0, 0], [-2.0, 0.0, 2.0])
    assert out.dtype == np.float64


def test_a_network_and_its_conversion_preprocess_by_one_rule():
    """The trained network and the converted one accept and refuse the same pixels."""
    norm = {"mean": [0.5], "std": [0.25]}
    model = ConvNet([{"type": "relu"}], (1, 4, 4), 2, normalization=norm)
    fcn = to_fully_convolutional(model)
    good = np.full((2, 1, 4, 4), 0.75)
    np.testing.assert_array_equal(model.preprocess(good), fcn.preprocess(good))
    np.testing.assert_array_equal(model.preprocess(good), np.ones((2, 1, 4, 4), np.float32))
    for bad, error, message in [
        (np.full((1, 1, 4, 4), 1.5), ValueError, r"pixels in \[0, 1\]"),
        (np.full((1, 1, 4, 4), np.nan), ValueError, r"pixels in \[0, 1\]"),
        (np.zeros((1, 1, 4, 4), np.uint8), TypeError, "float32 or float64"),
        (np.zeros((1, 3, 4, 4)), ValueError, r"\(N, 1, H, W\)"),
    ]:
        for net in (model, fcn):
            with pytest.raises(error, match=message):
                net.preprocess(bad)
    plain = ConvNet([{"type": "relu"}], (1, 4, 4), 2)  # no normalisation: the range still holds
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        preprocess(np.full((1, 1, 4, 4), 2.0), plain.normalization, plain.dtype, channels=1)
    np.testing.assert_array_equal(plain.preprocess(good), good.astype(np.float32))
