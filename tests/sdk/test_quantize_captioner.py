"""edgemm quantize on captioners: dynamic int8 and fp16, gated on the teacher's own captions."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import edgemm
from clirun import run_cli
from edgemm._caption_gate import CaptionGateThresholds, caption_gate_images, compare_captions
from edgemm._quantize_caption import CaptionGateError, quantize_captioner
from edgemm.runtime.bundle import Bundle

OPEN = CaptionGateThresholds(exact_match=0.0, token_agreement=0.0, mean_similarity=0.0)


@pytest.fixture(scope="module")
def gate_images():
    return caption_gate_images(fashion=6, emoji=6)[0][:24]


def test_int8_captioner_is_written_with_its_caption_gate(tiny_vit_gpt2_bundle, gate_images, tmp_path):
    manifest, info = quantize_captioner(tiny_vit_gpt2_bundle, tmp_path / "q", precision="int8", thresholds=OPEN,
                                        images=gate_images, threads=1)
    assert manifest.precision == "int8" and info["mode"] == "dynamic"
    gate = manifest.verification["quantization"]["gate"]
    assert gate["images"] == len(gate_images) and 0.0 <= gate["exact_match"] <= 1.0
    assert 0.0 <= gate["token_agreement"] <= 1.0 and gate["bleu4"] >= 0.0 and gate["passed"]
    import onnx

    sizes = info["size_bytes"]
    assert sizes["caption_encoder"]["int8"] < 0.8 * sizes["caption_encoder"]["fp32"]  # its MatMuls int8
    # the tied LM head stays one float table (ONNX Runtime would copy it transposed), so no larger than fp32
    assert sizes["caption_decoder"]["int8"] <= 1.01 * sizes["caption_decoder"]["fp32"]
    decoder = onnx.load(tmp_path / "q" / "caption_decoder.onnx")
    names = {i.name for i in decoder.graph.initializer}
    assert not [n for n in names if n.endswith("_Transposed") and n[: -len("_Transposed")] in names]
    model = edgemm.load(tmp_path / "q", threads=1)  # an ordinary, hash-checked captioner bundle
    assert isinstance(model.caption(gate_images[0], color="rgb", max_new_tokens=5).text, str)
    shown = run_cli("info", tmp_path / "q").stdout
    assert "int8" in shown


def test_fp16_captioner_keeps_its_captions(tiny_blip_bundle, gate_images, tmp_path):
    manifest, info = quantize_captioner(tiny_blip_bundle, tmp_path / "h", precision="fp16", images=gate_images,
                                        threads=1, thresholds=CaptionGateThresholds(mean_similarity=0.0))
    assert info["gate"]["passed"] and info["gate"]["token_agreement"] >= 0.85  # fp16 masks did not overflow
    assert info["size_bytes"]["caption_decoder"]["fp16"] < 0.6 * info["size_bytes"]["caption_decoder"]["fp32"]


def test_a_damaged_decoder_fails_the_gate_naming_token_agreement(tiny_blip_bundle, gate_images, tmp_path):
    import onnx
    from onnx import numpy_helper

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_blip_bundle, damaged)
    model = onnx.load(damaged / "caption_decoder.onnx")
    for init in model.graph.initializer:  # every weight matrix scrambled by a fixed permutation of its rows
        a = numpy_helper.to_array(init)
        if a.ndim == 2 and a.shape[0] > 8:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a[::-1]), init.name))
    onnx.save(model, damaged / "caption_decoder.onnx")
    teacher = edgemm.load(tiny_blip_bundle, threads=1)
    broken = edgemm.Captioner(Bundle(damaged, check_hashes=False), threads=1)
    report = compare_captions(teacher.caption(gate_images, color="rgb"), broken.caption(gate_images, color="rgb"),
                              prompt_length=len(teacher.manifest.generation.start_ids))
    assert not report["passed"] and report["token_agreement"] < 0.85
    assert any(f.startswith("token agreement") for f in report["failures"]) and report["changed"]


def test_a_failing_captioner_gate_writes_nothing(tiny_vit_gpt2_bundle, gate_images, tmp_path):
    out = tmp_path / "strict"
    impossible = CaptionGateThresholds(exact_match=1.0, token_agreement=1.0, mean_similarity=0.0)
    try:
        _, info = quantize_captioner(tiny_vit_gpt2_bundle, out, precision="int8", images=gate_images, threads=1,
                                     thresholds=impossible, recover=False)
    except CaptionGateError as e:
        assert "Nothing was written" in str(e) and not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]
    else:  # int8 changed no caption of these images: then the gate rightly passed
        assert info["gate"]["exact_match"] == 1.0 and info["gate"]["token_agreement"] == 1.0


def test_quantize_cli_routes_captioners_and_refuses_calibration(tiny_vit_gpt2_bundle, tmp_path):
    result = run_cli("quantize", tiny_vit_gpt2_bundle, "--precision", "int8", "--calibration", str(tmp_path),
                     "-o", tmp_path / "x", check=False)
    assert result.returncode == 2 and "quantizes dynamically" in result.stderr
