"""Image preprocessing: every input form, the reference resize, and bad input."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from edgemm.export.models.dual_encoder import DEFAULT_IMAGE, reference_pixels
from edgemm.runtime.errors import BundleError, InputError
from edgemm.runtime.image import ImagePreprocessor, to_rgb
from edgemm.runtime.limits import LIMITS


@pytest.fixture(scope="module")
def pre():
    return ImagePreprocessor(DEFAULT_IMAGE)


def test_bgr_rgb_pil_and_file_agree(pre, photos, tmp_path):
    rgb = photos[1].image  # chelsea
    path = tmp_path / "cat.png"
    Image.fromarray(rgb).save(path)
    a = pre([rgb[:, :, ::-1].copy()])  # BGR, the default
    b = pre([rgb], color="rgb")
    c = pre([Image.fromarray(rgb)])
    d = pre([str(path)])
    assert a.shape == (1, 3, 224, 224) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, d)


def test_gray_and_bgra(pre, photos):
    gray = photos[2].image[:, :, 0]  # skimage camera is grey
    g = pre([gray])
    assert np.allclose(g[0, 0], g[0, 1]) and np.allclose(g[0, 1], g[0, 2])
    np.testing.assert_array_equal(g, pre([gray[:, :, None]]))
    bgr = photos[4].image[:, :, ::-1]
    bgra = np.ascontiguousarray(np.dstack([bgr, np.full(bgr.shape[:2], 255, np.uint8)]))
    np.testing.assert_array_equal(pre([bgra]), pre([np.ascontiguousarray(bgr)]))


# Measured bounds (README): cv2's own exact area filter is ~2 grey levels from PIL's
# box filter, so the fast path is held to the reference statistically, not bit for bit.
@pytest.mark.parametrize(("size", "max_mean_err"), [((1080, 1920), 4.5), ((300, 451), 1.0), ((28, 28), 0.5)])
def test_fast_resize_stays_close_to_the_reference(pre, photos, size, max_mean_err):
    for p in photos:
        rgb = cv2.resize(p.image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        err = np.abs(pre([rgb], color="rgb")[0] - reference_pixels([rgb])[0]) * 128  # in 0-255 units
        assert err.mean() < max_mean_err, (p.name, err.mean())


def test_fast_path_keeps_embeddings_of_the_reference(model, photos):
    cosines = []
    for p in photos:
        frame = cv2.resize(p.image, (1920, 1080))
        ours = model.image_backend.infer({"pixels": model.preprocess([frame], color="rgb")})["embedding"][0]
        ref = model.image_backend.infer({"pixels": reference_pixels([frame])})["embedding"][0]
        cosines.append(float(ours @ ref))
    assert np.mean(cosines) > 0.985 and min(cosines) > 0.95, cosines


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((10, 10, 5), np.uint8), "expected shape"),
    (np.zeros((0, 0, 3), np.uint8), "empty"),
    (np.zeros((10, 0), np.uint8), "empty"),
    (np.zeros((10, 10, 3), np.float32), "expected dtype uint8"),
    (np.zeros((2, 10, 10, 3), np.uint8)[0:1].reshape(1, 10, 10, 3, 1)[0, ..., 0][None], "expected shape"),
    ([[1, 2], [3, 4]], "expected a numpy array, a PIL image or a file path"),
    ("/definitely/not/here.jpg", "does not exist"),
])
def test_bad_images(pre, image, message):
    with pytest.raises(InputError, match=message):
        pre([image])


def test_unreadable_file(pre, tmp_path):
    f = tmp_path / "notes.jpg"
    f.write_text("this is not a JPEG")
    with pytest.raises(InputError, match="could not be read as an image"):
        pre([f])
    with pytest.raises(InputError, match="is not a file"):
        pre([tmp_path])


def test_empty_batch_and_bad_color(pre):
    with pytest.raises(InputError, match="no images"):
        pre([])
    with pytest.raises(InputError, match="color must be one of"):
        pre([np.zeros((4, 4), np.uint8)], color="hsv")


def test_squash_resizes_the_whole_frame(photos):
    from dataclasses import replace

    squash = ImagePreprocessor(replace(DEFAULT_IMAGE, resize="squash"))
    frame = np.zeros((100, 300, 3), np.uint8)
    frame[:, :150] = 255  # left half white: squashing keeps both halves, cropping would not
    rgb = squash([frame], color="rgb")[0]
    assert rgb[:, :, :100].mean() > 0.9 and rgb[:, :, -100:].mean() < -0.9
    cropped = ImagePreprocessor(DEFAULT_IMAGE)([frame], color="rgb")[0]
    assert abs(cropped[:, :, :100].mean() - rgb[:, :, :100].mean()) < 0.1
    with pytest.raises(BundleError, match="'resize' is 'pad'"):  # the manifest's own check, at construction
        ImagePreprocessor(replace(DEFAULT_IMAGE, resize="pad"))


def _png(width: int, height: int, rows: bytes, color_type: int = 0, second_chunk: bytes = b"IDAT") -> bytes:
    """8-bit PNG bytes with any IHDR (the data need not match it), the data split over two chunks."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compress(rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + chunk(b"IDAT", z[:10]) + chunk(second_chunk, z[10:]) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def gray16(photos):
    """A real photo as 8-bit grey and as 16-bit grey, 8 more bits of (noise) detail under each pixel."""
    gray8 = cv2.cvtColor(photos[0].image, cv2.COLOR_RGB2GRAY)  # astronaut
    low = np.random.default_rng(0).integers(0, 256, gray8.shape, dtype=np.uint16)
    return gray8, (gray8.astype(np.uint16) << 8) | low


@pytest.mark.parametrize("route", ["png", "tiff", "tiff-big-endian", "pil-I;16", "pil-I", "uint16", "uint16-bgr"])
def test_16_bit_grey_matches_8_bit(gray16, tmp_path, route):
    gray8, g16 = gray16
    if route == "png" or route == "tiff":
        Image.fromarray(g16).save(tmp_path / f"g.{route}")
        image = tmp_path / f"g.{route}"
        assert Image.open(image).mode == "I;16"
    elif route == "tiff-big-endian":
        Image.frombytes("I;16B", g16.shape[::-1], g16.astype(">u2").tobytes()).save(tmp_path / "g.tif")
        image = tmp_path / "g.tif"
        assert Image.open(image).mode == "I;16B"
    elif route.startswith("pil"):
        image = Image.fromarray(g16 if route == "pil-I;16" else g16.astype(np.int32))
    else:
        image = g16 if route == "uint16" else np.dstack([g16] * 3)
    rgb = to_rgb(image)  # Pillow's convert("RGB") used to clip every 16-bit value above 255 to white
    assert rgb.dtype == np.uint8 and rgb.shape == (*gray8.shape, 3)
    assert np.abs(rgb.astype(int) - gray8[:, :, None]).max() <= 1


def test_16_bit_rgb_png_and_float_images(photos, tmp_path):
    rgb8 = photos[1].image
    cv2.imwrite(str(tmp_path / "rgb48.png"), (rgb8[:, :, ::-1].astype(np.uint16) * 257 + 100))  # 48-bit PNG
    assert Image.open(tmp_path / "rgb48.png").mode == "RGB"  # Pillow keeps the high byte itself
    assert np.abs(to_rgb(tmp_path / "rgb48.png").astype(int) - rgb8).max() <= 1
    gray8 = rgb8[:, :, 1]
    for floats in (gray8 / np.float32(255), gray8.astype(np.float32)):  # [0, 1] and 0-255 are both taken
        assert np.abs(to_rgb(Image.fromarray(floats)).astype(int) - gray8[:, :, None]).max() <= 1
    with pytest.raises(InputError, match="NaN or infinite"):
        to_rgb(Image.fromarray(np.full((4, 4), np.nan, np.float32)))
    with pytest.raises(InputError, match="32-bit integer pixels up to 100000 have no known range"):
        to_rgb(Image.fromarray(np.full((4, 4), 100_000, np.int32)))


def test_16_bit_png_keeps_the_embedding(model, photos, tmp_path):
    # Widened as image tools widen 8 to 16 bits (x 257). Not with noise in the low byte: +-1 grey level of
    # noise alone moves the astronaut's embedding to a cosine of 0.985; the pixel test above covers that case.
    for p in photos[:4]:
        gray8 = cv2.cvtColor(p.image, cv2.COLOR_RGB2GRAY)
        Image.fromarray(gray8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
        ours, ref = (model.image_backend.infer({"pixels": model.preprocess([x])})["embedding"][0]
                     for x in (tmp_path / "g16.png", gray8))
        assert float(ours @ ref) >= 0.99, p.name


def test_png_declaring_huge_dimensions_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(100_000, 100_000, b"\0" * 1000))  # 10 G pixels declared, 1 KB of data
    with pytest.raises(InputError, match="bomb.png.*edgemm.limits.max_image_pixels"):
        to_rgb(path)  # Pillow's own check refuses it inside Image.open, and is reported the same way
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a user who turned Pillow's check off
    start = time.perf_counter()
    with pytest.raises(InputError, match="100000x100000 is 10,000,000,000 pixels.*edgemm.limits.max_image_pix"):
        to_rgb(path)
    with pytest.raises(InputError, match="image 3: 100000x100000 is 10,000,000,000 pixels"):
        ImagePreprocessor(DEFAULT_IMAGE)([Image.open(path)], first_index=3)
    assert time.perf_counter() - start < 0.5


def test_the_pixel_limit_is_read_at_call_time(photos, tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(photos[1].image[:40, :40]).save(path)
    monkeypatch.setattr(LIMITS, "max_image_pixels", 40 * 40 - 1)
    for image in (path, Image.open(path)):
        with pytest.raises(InputError, match="40x40 is 1,600 pixels, more than the limit of 1,599.*max_image_pixels"):
            to_rgb(image)
    monkeypatch.setattr(LIMITS, "max_image_pixels", 40 * 40)
    np.testing.assert_array_equal(to_rgb(path), photos[1].image[:40, :40])


def test_a_limit_above_pillows_own_lets_big_images_load(photos, tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.fromarray(photos[1].image[:40, :40]).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels is a bomb to Pillow (over twice 100)
    monkeypatch.setattr(LIMITS, "max_image_pixels", 2000)  # but the user allowed it
    np.testing.assert_array_equal(to_rgb(path), photos[1].image[:40, :40])
    assert Image.MAX_IMAGE_PIXELS == 2000


def test_truncated_images(photos, tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(photos[1].image).save(path)
    path.write_bytes(path.read_bytes()[:20_000])
    lazy = Image.open(path)  # Pillow reads the header only; the pixels fail later
    with pytest.raises(InputError, match="image 0: the PIL image could not be decoded .OSError: image file is trunc"):
        ImagePreprocessor(DEFAULT_IMAGE)([lazy])
    with pytest.raises(InputError, match="cut.png': could not be read as an image .OSError"):
        to_rgb(path)


def _hostile(kind: str) -> bytes:
    """Real files on which Pillow 13 raises something other than OSError (found by fuzzing it)."""
    import io

    if kind == "png-broken-chunk":  # SyntaxError: a chunk type of non-letters after the first IDAT
        return _png(32, 32, b"".join(b"\0" + bytes(range(32)) for _ in range(32)), second_chunk=b"\xcf\xcd\xf0\x9f")
    out = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out, "DDS" if kind == "dds-no-format" else "BMP")
    data = bytearray(out.getvalue())
    if kind == "dds-no-format":  # NotImplementedError: pixel format flags 0
        data[80:84] = bytes(4)
    else:  # DecompressionBombError from Image.open: 10 G pixels declared
        data[18:26] = struct.pack("<ii", 100_000, 100_000)
    return bytes(data)


@pytest.mark.parametrize("kind, message", [
    ("png-broken-chunk", "SyntaxError: broken PNG file"),
    ("dds-no-format", "NotImplementedError"),
    ("bmp-bomb", "decompression bomb.*edgemm.limits.max_image_pixels"),
])
def test_whatever_pillow_raises_on_hostile_files_is_an_input_error(tmp_path, kind, message):
    path = tmp_path / f"{kind}.img"
    path.write_bytes(_hostile(kind))
    with pytest.raises(InputError, match=f"'{path}'.*{message}"):
        to_rgb(path)


def test_running_out_of_memory_while_decoding_is_an_input_error(tmp_path):
    """A 20k x 20k PNG the limits allow, decoded under a 1 GiB address-space margin: MemoryError → InputError."""
    path = tmp_path / "big.png"
    path.write_bytes(_png(20_000, 20_000, b"\0" * 1000, color_type=2))  # RGB: 1.6 GB once decoded
    code = f"""
import resource, re
import edgemm
from edgemm.runtime.image import to_rgb
from edgemm.runtime.errors import InputError
edgemm.limits.max_image_pixels = 10**9
size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30) if hard < 0 else min(size + (1 << 30), hard), hard))
try:
    to_rgb({str(path)!r})
except InputError as e:
    print("InputError:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "InputError: '" in out.stdout and "not enough memory to decode" in out.stdout, out.stdout + out.stderr
