"""On a GPU: ONNX Runtime's CUDA and TensorRT providers, and native TensorRT engines built, verified and run.

Every test here is marked ``gpu`` and skips, saying why, where no GPU or no
TensorRT is present (CI has none); ``benchmarks/gpu_check.sh`` runs them on a
lent GPU machine.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgemm
from edgemm import _engines
from edgemm.runtime import generation as gen
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.engines import EngineOptions
from edgemm.runtime.errors import BackendError, EdgemmError

pytestmark = pytest.mark.gpu


def _ort_cuda(bundle) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (install edgemm[gpu])")
    try:
        edgemm.load(bundle, providers=("cuda",)).embed_texts(["a cat"])
    except EdgemmError as e:
        pytest.skip(f"the CUDA provider cannot run here: {e}")


def _tensorrt() -> None:
    try:
        _engines.detect_target()
    except BackendError as e:
        pytest.skip(str(e))


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_cuda_provider_embeds_as_the_cpu_does(tiny_clip_bundle, photos, monkeypatch):
    _ort_cuda(tiny_clip_bundle)
    monkeypatch.setenv("EDGEMM_PREPROCESS", "cpu")  # the same pixels for both: the graphs are compared here
    cpu, cuda = edgemm.load(tiny_clip_bundle), edgemm.load(tiny_clip_bundle, providers=("cuda",))
    assert cuda.image_backend.providers[0] == "CUDAExecutionProvider"
    images = [p.image for p in photos[:8]]
    assert _cosine_min(cpu.embed_images(images, color="rgb"), cuda.embed_images(images, color="rgb")) > 0.9999
    texts = ["a cat", "two dogs on a sofa", "a forklift"]
    assert _cosine_min(cpu.embed_texts(texts), cuda.embed_texts(texts)) > 0.9999


def test_frames_are_preprocessed_on_the_gpu_as_on_the_cpu(default_bundle, photos):
    """A model on CUDA resizes frames there (DevicePreprocessor): the CPU provider's pixels, to a rounding."""
    import cv2

    from edgemm.runtime.image import DevicePreprocessor, ImagePreprocessor

    _ort_cuda(default_bundle)
    model = edgemm.load(default_bundle, providers=("cuda",))
    assert isinstance(model.preprocess, DevicePreprocessor) and model.preprocess.provider == "cuda"
    frames = [cv2.resize(np.ascontiguousarray(p.image[:, :, ::-1]), (1920, 1080)) for p in photos]
    on_gpu = model.preprocess(frames)
    std = np.asarray(model.manifest.image.std, np.float32).reshape(1, 3, 1, 1)
    same_graph = np.abs(on_gpu - DevicePreprocessor(model.manifest.image, "cpu")(frames)) * std
    opencv = np.abs(on_gpu - ImagePreprocessor(model.manifest.image)(frames)) * std
    assert same_graph.max() <= 1.0 + 1e-3 and (same_graph > 0.5).mean() < 0.01
    assert opencv.max() <= 1.0 + 1e-3 and (opencv > 0.5).mean() < 0.3


def test_cuda_captions_keep_the_cache_on_the_device(tiny_clip_bundle, tiny_blip_bundle, photos):
    _ort_cuda(tiny_clip_bundle)
    cpu, cuda = edgemm.load(tiny_blip_bundle), edgemm.load(tiny_blip_bundle, providers=("cuda",))
    g = cuda.graphs
    pixels = cuda.preprocess([p.image for p in photos[:4]], color="rgb")
    assert isinstance(gen.open_decoder(g.decoder_backend, g.graph, g.memory(pixels)), gen.DeviceCachedDecoder)
    images = [p.image for p in photos[:4]]
    for beams in (1, 3):
        a = cpu.caption(images, color="rgb", num_beams=beams, max_new_tokens=12)
        b = cuda.caption(images, color="rgb", num_beams=beams, max_new_tokens=12)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_tensorrt_provider_caches_its_engines(tiny_clip_bundle, tmp_path):
    _ort_cuda(tiny_clip_bundle)
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no TensorRT provider")
    options = EngineOptions(directory=str(tmp_path))
    try:
        model = edgemm.load(tiny_clip_bundle, providers=("tensorrt", "cuda"), engines=options)
        model.embed_texts(["a cat"])
    except EdgemmError as e:
        pytest.skip(f"the TensorRT provider cannot run here (TensorRT's libraries missing?): {e}")
    cache = tmp_path / "onnxruntime-tensorrt" / "fp32"
    assert any(cache.iterdir()), "ONNX Runtime wrote no engine to its cache"


def test_native_engines_are_built_verified_kept_and_reused(tiny_clip_bundle, tmp_path, photos):
    _tensorrt()
    copy = tmp_path / "b"
    shutil.copytree(tiny_clip_bundle, copy)
    lines: list[str] = []
    engines = _engines.ensure_engines(Bundle(copy), EngineOptions(), progress=lines.append)
    assert set(engines) == {"image_encoder", "text_encoder"} and any("verifying" in line for line in lines)
    for plan in engines.values():
        record = json.loads(plan.with_suffix(".json").read_text())
        assert plan.stat().st_size > 0 and record["verification"]["passed"]
        assert record["key"]["onnx_sha256"] == Bundle(copy).manifest.files[plan.name.split(".")[0] + ".onnx"]
    stamps = {role: p.stat().st_mtime_ns for role, p in engines.items()}
    again: list[str] = []
    assert _engines.ensure_engines(Bundle(copy), EngineOptions(rebuild=False), progress=again.append) == engines
    assert again == [] and stamps == {role: p.stat().st_mtime_ns for role, p in engines.items()}

    trt = edgemm.load(copy, backend="tensorrt", engines=EngineOptions(rebuild=False))
    ort = edgemm.load(copy)
    images = [p.image for p in photos[:8]]
    assert _cosine_min(trt.embed_images(images, color="rgb"), ort.embed_images(images, color="rgb")) > 0.9999
    with pytest.raises(edgemm.InputError, match="outside the engine's profile"):
        trt.embed_images(images * 5, color="rgb", batch_size=40)  # the default profile stops at 32

    stale = EngineOptions(rebuild=False, axes={"batch": (1, 4, 16)})
    with pytest.raises(BackendError, match="rebuilding is off"):
        edgemm.load(copy, backend="tensorrt", engines=stale)


def test_native_fp16_engines_agree_with_onnx_runtime(tiny_clip_bundle, tmp_path, photos):
    _tensorrt()
    copy = tmp_path / "b"
    shutil.copytree(tiny_clip_bundle, copy)
    try:
        engines = _engines.ensure_engines(Bundle(copy), EngineOptions(precision="fp16"))
    except BackendError as e:
        if "strongly typed" not in str(e):
            raise
        pytest.skip(str(e))  # TensorRT for RTX, TensorRT 11: fp16 comes from an fp16 bundle
    report = json.loads(engines["image_encoder"].with_suffix(".json").read_text())["verification"]
    assert report["passed"] and report["outputs"]["embedding"]["cosine_min"] >= 0.995


def test_native_captioner_gives_onnx_runtimes_tokens(tiny_blip_bundle, tmp_path, photos):
    _tensorrt()
    copy = tmp_path / "c"
    shutil.copytree(tiny_blip_bundle, copy)
    trt = edgemm.load(copy, backend="tensorrt")
    ort = edgemm.load(copy)
    assert isinstance(gen.open_decoder(trt.decoder_backend, trt.graphs.graph,
                                       trt.graphs.memory(trt.preprocess([photos[0].image], color="rgb"))),
                      gen.DeviceCachedDecoder)
    images = [p.image for p in photos[:4]]
    for beams in (1, 3):
        a = ort.caption(images, color="rgb", num_beams=beams, max_new_tokens=12)
        b = trt.caption(images, color="rgb", num_beams=beams, max_new_tokens=12)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_triton_repository_serves_the_checked_plans(tiny_clip_bundle, tmp_path):
    """export triton --engines: tensorrt_plan models holding the plans edgemm built and verified here."""
    _tensorrt()
    from edgemm._triton_repo import TritonOptions, export_triton

    bundle = tmp_path / "b"
    shutil.copytree(tiny_clip_bundle, bundle)
    repo = tmp_path / "repo"
    export_triton(bundle, repo, TritonOptions(target="gpu", engines=EngineOptions(quiet=True)))
    for role in ("image_encoder", "text_encoder"):
        config = (repo / role / "config.pbtxt").read_text()
        assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 32" in config
        plan = Bundle(bundle).engines.get(role) or next((bundle / "engines").rglob(f"{role}*.plan"))
        assert (repo / role / "1" / "model.plan").read_bytes() == plan.read_bytes()
