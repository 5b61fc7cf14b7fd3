"""Image preprocessing: every input form, the reference resize, and bad input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from edgemm.export.models.dual_encoder import DEFAULT_IMAGE, reference_pixels
from edgemm.runtime.errors import InputError
from edgemm.runtime.image import ImagePreprocessor


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
    with pytest.raises(InputError, match="resize mode"):
        ImagePreprocessor(replace(DEFAULT_IMAGE, resize="pad"))
