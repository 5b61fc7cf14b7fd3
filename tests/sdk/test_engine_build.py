"""Engine building without a GPU: the plan, the refusals, the recorded verification calls and the comparison."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

import edgemm
from edgemm import _engines
from edgemm.runtime.backends import open_backend
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.engines import (
    ENGINE_GATES,
    EngineOptions,
    OutputComparison,
    Target,
    plan_engines,
    sidecar,
)
from edgemm.runtime.errors import BackendError, InputError
from clirun import run_cli

def _has_tensorrt() -> bool:
    return any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))


ORIN = Target(tensorrt="tensorrt 10.3.0.30", gpu="Orin (nvgpu)", compute_capability="8.7")


def _replay(bundle: Bundle, calls: dict[str, list], graphs: dict[str, str], precision: str = "fp32") -> dict:
    """Each role's recorded calls run again on ``graphs[role]`` (ONNX Runtime), compared with the recording."""
    reports = {}
    for role, path in graphs.items():
        backend = open_backend(path, "onnxruntime", threads=1)
        comparison = OutputComparison(_engines.score_outputs(bundle, role))
        for feeds, reference in calls[role]:
            comparison.add(reference, backend.infer(feeds))
        reports[role] = comparison.report(ENGINE_GATES[precision])
    return reports


def test_a_fresh_cache_plans_every_graph_and_a_kept_engine_is_reused(tiny_clip_bundle, tmp_path):
    bundle = Bundle(tiny_clip_bundle)
    planned = plan_engines(bundle.manifest, ORIN, EngineOptions(), tmp_path)
    assert [p.role for p in planned] == list(bundle.manifest.graphs)
    assert all(p.reasons == [f"no engine at {p.plan}"] for p in planned)
    assert all(p.key.precision == "fp32" and "no-tf32" in p.key.flags for p in planned)

    image = planned[0]
    image.plan.write_bytes(b"plan")
    image.plan.with_suffix(".json").write_text(json.dumps(sidecar(image.key, build_seconds=1.0, verification={})))
    again = plan_engines(bundle.manifest, ORIN, EngineOptions(), tmp_path)
    assert again[0].reasons == [] and again[1].reasons
    other_gpu = Target(ORIN.tensorrt, "NVIDIA GeForce RTX 4090", "8.9")
    assert plan_engines(bundle.manifest, other_gpu, EngineOptions(), tmp_path)[0].plan != image.plan


def test_rebuild_off_refuses_stale_engines_naming_each_graph(tiny_clip_bundle, tmp_path):
    bundle = Bundle(tiny_clip_bundle)
    options = EngineOptions(rebuild=False, directory=str(tmp_path))
    with pytest.raises(BackendError, match=r"(?s)rebuilding is off.*image_encoder: no engine.*text_encoder: no "
                                           r"engine.*edgemm engine build"):
        _engines.ensure_engines(bundle, options, target=ORIN)
    assert bundle.engines == {}


def test_precisions_a_bundle_cannot_give_are_refused(tiny_clip_bundle):
    manifest = Bundle(tiny_clip_bundle).manifest
    with pytest.raises(InputError, match=r"int8 engines are built from an int8 bundle's Q/DQ.*edgemm quantize"):
        plan_engines(manifest, ORIN, EngineOptions(precision="int8"), "/nonexistent")
    fp16, flags = EngineOptions(precision="fp16").resolve("fp32")
    assert (fp16, "fp16" in flags, "strongly-typed" in flags) == ("fp16", True, False)
    assert EngineOptions().resolve("int8") == ("int8", ["edgemm-builder-1", "strongly-typed"])
    with pytest.raises(InputError, match="this bundle is fp16; its engines are fp16"):
        EngineOptions(precision="fp32").resolve("fp16")
    with pytest.raises(InputError, match="engine precision must be one of"):
        EngineOptions(precision="tf32")


def test_int8_bundles_tensorrt_cannot_build_are_refused(tiny_clip_bundle, tmp_path):
    from edgemm._quantize import quantize_bundle

    quantize_bundle(tiny_clip_bundle, tmp_path / "dyn", precision="int8", dynamic=True, threads=1)
    with pytest.raises(InputError, match=r"dynamically quantized.*--activations int8"):
        plan_engines(Bundle(tmp_path / "dyn").manifest, ORIN, EngineOptions(), tmp_path)


def test_without_tensorrt_load_says_what_to_install(tiny_clip_bundle):
    pytest.importorskip("onnxruntime")
    if _has_tensorrt():
        pytest.skip("a TensorRT module is importable here")
    with pytest.raises(BackendError, match=r"TensorRT is not available.*JetPack.*tensorrt-rtx"):
        edgemm.load(tiny_clip_bundle, backend="tensorrt")


def test_verification_records_every_graph_and_replays_exactly(tiny_clip_bundle):
    bundle = Bundle(tiny_clip_bundle)
    images, source = _engines.verification_images()
    calls = _engines.record_verification_calls(bundle, images)
    assert set(calls) == set(bundle.manifest.graphs)
    batches = sorted({feeds["pixels"].shape[0] for feeds, _ in calls["image_encoder"]})
    assert batches == [1, len(images)]  # the full batch and one frame alone
    lengths = {feeds["input_ids"].shape[1] for feeds, _ in calls["text_encoder"]}
    assert bundle.manifest.text.max_length in lengths  # the constructor's longest-text check is recorded too
    graphs = {role: bundle.graph_path(role) for role in calls}
    reports = _replay(bundle, calls, graphs)
    for report in reports.values():
        assert report["passed"], report["failures"]
        assert all(f["max_abs_diff"] == 0.0 and f["cosine_min"] > 0.99999 for f in report["outputs"].values())


def test_an_engine_that_drifts_fails_its_gate_with_the_figures(tiny_clip_bundle, tmp_path):
    """The int8 bundle's graphs stand in for an engine that drifts: the fp32 gate must catch it."""
    from edgemm._quantize import quantize_bundle

    quantized = tmp_path / "int8"
    quantize_bundle(tiny_clip_bundle, quantized, precision="int8", threads=1)
    with pytest.raises(InputError, match=r"activations as uint8.*--activations int8"):
        plan_engines(Bundle(quantized).manifest, ORIN, EngineOptions(), tmp_path)  # the default is for CPUs
    bundle = Bundle(tiny_clip_bundle)
    calls = _engines.record_verification_calls(bundle, _engines.verification_images(count=4)[0])
    drifted = Bundle(quantized)
    reports = _replay(bundle, calls, {role: drifted.graph_path(role) for role in calls})
    text = reports["text_encoder"]
    assert not text["passed"] and text["failures"][0].startswith("embedding: relative max abs diff")
    assert 0.5 < text["outputs"]["embedding"]["cosine_min"] < 1.0


def test_captioner_verification_covers_greedy_and_beam_steps(tiny_blip_bundle):
    bundle = Bundle(tiny_blip_bundle)
    calls = _engines.record_verification_calls(bundle, _engines.verification_images(count=4)[0])
    assert set(calls) == set(bundle.manifest.graphs)
    pasts = [feeds for feeds, _ in calls["caption_decoder"]]
    past_name = next(iter(bundle.manifest.generation.cache))
    assert pasts[0][past_name].shape[2] == 0  # the first step, on an empty cache
    assert max(f[past_name].shape[2] for f in pasts) >= 4  # and later cached steps
    assert _engines.score_outputs(bundle, "caption_decoder") == {"logits"}
    reports = _replay(bundle, calls, {role: bundle.graph_path(role) for role in calls})
    assert reports["caption_decoder"]["outputs"]["logits"]["top1_agreement"] == 1.0


def test_vqa_verification_reaches_the_question_graph(tiny_blip_vqa_bundle):
    bundle = Bundle(tiny_blip_vqa_bundle)
    calls = _engines.record_verification_calls(bundle, _engines.verification_images(count=2)[0])
    assert set(calls) == {"caption_encoder", "question_encoder", "caption_decoder"}


def test_audio_visual_verification_reaches_the_audio_graph(av_bundle):
    bundle = Bundle(av_bundle)
    calls = _engines.record_verification_calls(bundle, _engines.verification_images(count=2)[0])
    assert "audio_encoder" in calls and calls["audio_encoder"][0][0]["waveform"].ndim == 2
    assert bundle.manifest.scoring.class_output in _engines.score_outputs(bundle, "image_encoder")


def test_own_verification_images_and_bad_folders(tmp_path, photos):
    from PIL import Image

    for i, photo in enumerate(photos[:3]):
        Image.fromarray(photo.image).save(tmp_path / f"{i}.png")
    images, source = _engines.verification_images(str(tmp_path))
    assert len(images) == 3 and str(tmp_path) in source
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no image files"):
        _engines.verification_images(str(tmp_path / "empty"))


def test_tensorrt_provider_gets_caches_and_the_manifest_profile(tiny_clip_bundle, tmp_path):
    bundle = Bundle(tiny_clip_bundle)
    assert _engines.ort_provider_options(bundle, "image_encoder", ("cuda",)) == {}
    bundle.engine_options = EngineOptions(precision="fp16", directory=str(tmp_path), axes={"batch": (1, 4, 16)})
    opts = _engines.ort_provider_options(bundle, "text_encoder", ("tensorrt", "cuda"))["provider_options"]["tensorrt"]
    cache = tmp_path / "onnxruntime-tensorrt" / "fp16"
    assert cache.is_dir() and opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(cache)
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_fp16_enable"] == "True"
    seq = bundle.manifest.text.max_length
    assert opts["trt_profile_min_shapes"] == "attention_mask:1x1,input_ids:1x1"
    assert opts["trt_profile_max_shapes"] == f"attention_mask:16x{seq},input_ids:16x{seq}"


def test_the_cpu_provider_accepts_provider_options(tiny_clip_bundle):
    backend = open_backend(Bundle(tiny_clip_bundle).graph_path("text_encoder"), "onnxruntime",
                           provider_options={"cpu": {"arena_extend_strategy": "kSameAsRequested"}})
    assert backend.providers == ["CPUExecutionProvider"]


def test_engine_cli_without_tensorrt(tiny_clip_bundle, tmp_path):
    if _has_tensorrt():
        pytest.skip("a TensorRT module is importable here")
    copy = tmp_path / "b"
    shutil.copytree(tiny_clip_bundle, copy)
    result = run_cli("engine", "build", copy, "--precision", "fp16", "--axis", "batch=1:4:8", check=False)
    assert result.returncode == 2 and "TensorRT is not available" in result.stderr
    result = run_cli("engine", "build", copy, "--axis", "batch=8", check=False)
    assert result.returncode == 2 and "NAME=MIN:OPT:MAX" in result.stderr
    listed = run_cli("engine", "list", copy, "--json", check=False)
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_listing_reads_sidecars_and_flags_hostile_ones(tiny_clip_bundle, tmp_path):
    bundle = Bundle(tiny_clip_bundle)
    planned = plan_engines(bundle.manifest, ORIN, EngineOptions(), tmp_path)
    p = planned[0]
    p.plan.write_bytes(b"plan")
    verification = {"passed": True, "outputs": {}}
    p.plan.with_suffix(".json").write_text(json.dumps(sidecar(p.key, build_seconds=2.5, verification=verification,
                                                              extra={"plan": p.plan.name})))
    (tmp_path / "junk.json").write_text("[1, 2")
    found = _engines.list_engines(bundle, EngineOptions(directory=str(tmp_path)))
    good = next(e for e in found if "key" in e)
    assert good["present"] and good["matches_bundle"] and good["key"]["gpu"] == ORIN.gpu
    assert good["build_seconds"] == 2.5 and good["verification"] == verification
    assert "error" in next(e for e in found if e["sidecar"] == "junk.json")
    assert np.isfinite(good["build_seconds"])
