"""Frames preprocessed by the device graph (runtime/data/preprocess_frame.onnx) against the CPU's OpenCV path.

The graph runs here on ONNX Runtime's CPU provider, the same graph the GPU runs
(tests/gpu checks the CUDA provider gives the same pixels).
"""

from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest

import edgemm
from edgemm.runtime.image import DevicePreprocessor, ImagePreprocessor, frame_preprocessor


@pytest.fixture(scope="module")
def pair(model):
    spec = model.manifest.image
    return ImagePreprocessor(spec), DevicePreprocessor(spec, "cpu")


def _frames(photos, size=(1920, 1080)):
    """The sample photos as camera frames: BGR uint8 at ``size`` (width, height)."""
    return [cv2.resize(np.ascontiguousarray(p.image[:, :, ::-1]), size, interpolation=cv2.INTER_LINEAR)
            for p in photos]


def test_the_committed_graph_is_the_scripts():
    import runpy

    from edgemm.runtime import image

    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "make_preprocess_graph.py"))
    assert image._PREPROCESS_GRAPH.read_bytes() == script["preprocess_graph"]().SerializeToString()


@pytest.mark.parametrize("size", [(1920, 1080), (640, 480), (1080, 1920)])
def test_frames_match_the_cpu_path_within_a_grey_level(pair, model, photos, size):
    cpu, device = pair
    frames = _frames(photos, size)
    a, b = cpu(frames), device(frames)
    std = np.asarray(model.manifest.image.std, np.float32).reshape(1, 3, 1, 1)
    levels = np.abs(a - b) * std
    assert levels.max() <= 1.0 + 1e-3  # OpenCV's fixed-point weights: a rounding apart at most
    assert (levels > 0.5).mean() < 0.3
    ea = model.image_backend.infer({"pixels": a})["embedding"]
    eb = model.image_backend.infer({"pixels": b})["embedding"]
    cosine = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
    # One grey level on a seventh of the pixels moves fine textures' embeddings most (0.987 seen on gravel);
    # what users rely on is the label, below.
    assert np.median(cosine) > 0.9999 and cosine.min() > 0.98
    labels = ["a dog", "a cat", "a person", "a car", "a building", "food", "a bird", "a tree", "the sea", "a flower"]
    on_cpu = model.classify(frames, labels)
    model.preprocess = device
    try:
        on_device = model.classify(frames, labels)
    finally:
        model.preprocess = cpu
    for i, (x, y) in enumerate(zip(on_cpu, on_device)):  # the same label, but where the CPU's top two tie
        assert x[0].label == y[0].label or x[0].score - x[1].score < 0.005, (i, x[:2], y[:2])
    assert sum(x[0].label == y[0].label for x, y in zip(on_cpu, on_device)) >= len(frames) - 1


def test_rgb_frames_are_reordered_on_the_device(pair, photos):
    cpu, device = pair
    frames = _frames(photos[:3])
    np.testing.assert_allclose(device([f[:, :, ::-1].copy() for f in frames], color="rgb"), device(frames), atol=1e-6)
    assert not np.allclose(device(frames, color="rgb"), device(frames))  # the order is not ignored


def test_what_the_device_path_does_not_cover_stays_on_the_cpu(pair, photos, tmp_path):
    """Small frames, files, PIL images, grey and uint16 arrays: exactly the CPU path's pixels."""
    from PIL import Image

    cpu, device = pair
    small = _frames(photos[:2], (400, 300))  # a 300-pixel crop: no more than twice 224
    path = tmp_path / "photo.jpg"
    cv2.imwrite(str(path), _frames(photos[:1])[0])
    pil = Image.fromarray(photos[1].image)
    grey = cv2.cvtColor(_frames(photos[:1])[0], cv2.COLOR_BGR2GRAY)
    deep = (_frames(photos[:1])[0].astype(np.uint16) * 257)
    for images in (small, [str(path)], [pil], [grey], [deep]):
        np.testing.assert_array_equal(device(images), cpu(images))


def test_a_mixed_batch_is_each_frame_on_its_own(pair, photos):
    """Frames of several shapes and CPU-only images, interleaved: each row as if preprocessed alone."""
    _, device = pair
    big, tall, small = _frames(photos[:2]), _frames(photos[2:3], (1080, 1920)), _frames(photos[3:4], (320, 240))
    batch = [big[0], big[1], small[0], tall[0], big[0]]
    together = device(batch)
    for i, image in enumerate(batch):
        np.testing.assert_allclose(together[i], device([image])[0], atol=1e-6)


def test_bad_input_is_named_by_its_place(pair, photos):
    _, device = pair
    with pytest.raises(edgemm.InputError, match="image 4"):
        device(_frames(photos[:1]) + [np.zeros((4, 4), np.float32)], first_index=3)
    with pytest.raises(edgemm.InputError, match="no images"):
        device([])


def test_the_gpu_is_chosen_only_where_the_image_graph_runs_on_one(model, monkeypatch):
    spec = model.manifest.image
    assert type(frame_preprocessor(spec, ("cpu",))) is ImagePreprocessor
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    chosen = frame_preprocessor(spec, ("cuda",))
    assert isinstance(chosen, DevicePreprocessor) == has_cuda
    monkeypatch.setenv("EDGEMM_PREPROCESS", "cpu")
    assert type(frame_preprocessor(spec, ("cuda",))) is ImagePreprocessor
    monkeypatch.setenv("EDGEMM_PREPROCESS", "gpu-please")
    with pytest.raises(edgemm.BackendError, match="EDGEMM_PREPROCESS must be"):
        frame_preprocessor(spec, ("cuda",))


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_preprocessing_without_cuda_names_what_to_install(model):
    with pytest.raises(edgemm.BackendError, match=r"edgemm\[gpu\]"):
        DevicePreprocessor(model.manifest.image, "cuda")
