"""Bundle-level quantization with the accuracy gate, on a real tiny CLIP export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgemm
from edgemm._gate import GateThresholds
from edgemm._quantize import QuantizationGateError, quantize_bundle
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.datasets import EMOJI_FONT
from edgemm.runtime.errors import BundleError, InputError

STRICT = GateThresholds(mean_cosine=0.99999, worst_cosine=0.9999, top1_agreement=1.0)


def _no_partial(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def int8_bundle(tiny_clip_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "b"
    manifest, info = quantize_bundle(tiny_clip_bundle, out, precision="int8", threads=1)
    return out, manifest, info


def test_int8_bundle_passes_the_gate_and_records_it(int8_bundle, tiny_clip_bundle):
    out, manifest, info = int8_bundle
    assert manifest.precision == "int8" and info["mode"] == "static"
    gate = manifest.verification["quantization"]["gate"]
    assert gate["passed"] and gate["image_cosine"]["mean"] >= 0.99 and gate["top1_agreement"] >= 0.98
    assert 0.99 < gate["text_cosine"]["mean"] < 1.0  # measured, and really changed
    emoji_pairs = 100 if EMOJI_FONT.is_file() else 0
    assert gate["retrieval"]["pairs"] == 7 + emoji_pairs  # the odd-numbered photos: calibration crops the others
    kinds = {"photos", "fashion-mnist", "imagenet names", "categories", "bundle labels"} | (
        {"emoji names"} if emoji_pairs else set())
    assert set(gate["agreement_by_kind"]) == kinds and gate["decisions"] > 2000
    assert set(gate["retrieval"]["candidate"]) == {"recall@1", "recall@5"}
    assert manifest.verification["image_encoder"] == Bundle(tiny_clip_bundle).manifest.verification["image_encoder"]
    assert manifest.source["quantized_from"]["path"] == str(tiny_clip_bundle)
    assert sorted(p.name for p in (out / "calibration").iterdir()) == ["image_encoder.json", "text_encoder.json"]
    m = edgemm.load(out, threads=1)  # hashes checked: the calibration caches are part of the bundle
    ref = edgemm.load(tiny_clip_bundle, threads=1)
    texts = ["a photo of a dog", "a red car parked outside"]
    cos = (m.embed_texts(texts) * ref.embed_texts(texts)).sum(1)
    assert cos.min() > 0.97


def test_failed_gate_recovers_by_keeping_sensitive_nodes_float(int8_bundle, tiny_clip_bundle, tmp_path):
    plain = int8_bundle[2]["gate"]  # the same quantization with nothing kept in float
    towers = ("image_cosine", "text_cosine")
    # halfway between plain int8 and float: the first attempt must fail, and float can pass
    mean = min((plain[t]["mean"] + 1.0) / 2 for t in towers)
    worst = min((plain[t]["worst"] + 1.0) / 2 for t in towers)
    manifest, info = quantize_bundle(tiny_clip_bundle, tmp_path / "b", precision="int8", threads=1,
                                     thresholds=GateThresholds(mean_cosine=mean, worst_cosine=worst))
    assert not info["attempts"][0]["passed"]
    kept = info["kept_in_float"]
    assert any(kept.values())
    final = {role: len(nodes) for role, nodes in kept.items()}
    assert any(a["passed"] and a["excluded"] == final for a in info["attempts"])  # the bisection's last trial may fail
    for role, count in final.items():  # bisected: one fewer node kept in float failed the gate
        fewer = [a for a in info["attempts"] if a["excluded"][role] == count - 1 and
                 all(a["excluded"][r] == c for r, c in final.items() if r != role)]
        assert count == 0 or all(not a["passed"] for a in fewer)
    for role, nodes in kept.items():
        ranked = [r["node"] for r in info["sensitivity"].get(role, [])]
        assert nodes == ranked[: len(nodes)] or len(nodes) > len(ranked)  # costliest first
    assert info["gate"]["passed"]


def test_unrecoverable_gate_fails_and_writes_nothing(tiny_clip_bundle, tmp_path):
    out = tmp_path / "b"
    with pytest.raises(QuantizationGateError, match="misses the accuracy gate") as err:
        quantize_bundle(tiny_clip_bundle, out, precision="int8", threads=1, thresholds=STRICT, recover=False)
    assert err.value.report["gate"]["failures"]
    _no_partial(out)


def test_accepted_degradation_is_written_and_marked(tiny_clip_bundle, tmp_path):
    manifest, info = quantize_bundle(tiny_clip_bundle, tmp_path / "b", precision="int8", dynamic=True, threads=1,
                                     thresholds=STRICT, recover=False, accept_degradation=True)
    assert info["accepted_degradation"] and not info["gate"]["passed"] and info["mode"] == "dynamic"
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["verification"]["quantization"][
        "accepted_degradation"]


def test_fp16_one_graph_and_its_note(tiny_clip_bundle, tmp_path):
    manifest, info = quantize_bundle(tiny_clip_bundle, tmp_path / "b", precision="fp16", graphs=["text_encoder"],
                                     threads=1)
    assert info["graphs"] == {"image_encoder": "fp32", "text_encoder": "fp16"}
    assert "slower than fp32" in info["note"]
    src = Bundle(tiny_clip_bundle)
    assert (tmp_path / "b" / "image_encoder.onnx").read_bytes() == src.graph_path("image_encoder").read_bytes()
    assert info["gate"]["text_cosine"]["worst"] > 0.999


def test_bad_requests_are_clear_errors(tiny_clip_bundle, int8_bundle, tmp_path):
    out = tmp_path / "b"
    with pytest.raises(InputError, match="unknown precision 'int4'"):
        quantize_bundle(tiny_clip_bundle, out, precision="int4")
    with pytest.raises(InputError, match="dynamic quantization is an int8 mode"):
        quantize_bundle(tiny_clip_bundle, out, precision="fp16", dynamic=True)
    with pytest.raises(BundleError, match="already int8"):
        quantize_bundle(int8_bundle[0], out, precision="int8")
    with pytest.raises(InputError, match="not in"):
        quantize_bundle(tiny_clip_bundle, out, precision="int8", graphs=["decoder"])
    with pytest.raises(InputError, match="no image files"):
        quantize_bundle(tiny_clip_bundle, out, precision="int8", calibration_images=tmp_path)
    _no_partial(out)


def test_corrupted_graph_is_refused(tiny_clip_bundle, tmp_path):
    from edgemm.runtime.errors import EdgemmError

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_clip_bundle, damaged)
    graph = damaged / "text_encoder.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(EdgemmError, match="text_encoder.onnx"):  # the hash check names the file first
        quantize_bundle(damaged, tmp_path / "out", precision="int8")
    _no_partial(tmp_path / "out")


def test_cli_quantize_with_user_calibration(tiny_clip_bundle, tmp_path, capsys):
    from PIL import Image

    from edgemm._cli import main
    from edgemm.runtime.datasets import sample_photos

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, photo in enumerate(sample_photos()[:10]):
        Image.fromarray(photo.image).save(frames / f"{i:02d}.jpg")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"a photo of a thing number {i}" for i in range(30)))
    out = tmp_path / "b"
    code = main(["quantize", str(tiny_clip_bundle), "--precision", "int8", "--calibration", str(frames),
                 "--calibration", str(corpus), "-o", str(out), "--threads", "1", "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "gate: PASSED" in printed and "top-1 agreement" in printed
    info = Bundle(out).manifest.verification["quantization"]
    assert "8 images from" in info["calibration"]["images"] and "2 more held out" in info["calibration"]["images"]
    assert "2 held-out user images" in info["gate"]["data"]["images"]
    assert main(["quantize", str(tiny_clip_bundle), "--precision", "int8", "--calibration", str(frames),
                 "--calibration", str(frames), "-o", str(tmp_path / "c")]) == 2
    assert "two image folders" in capsys.readouterr().err
    assert np.isfinite(info["seconds"])


def test_recovery_blames_the_tower_whose_conversion_alone_disagrees():
    from edgemm._gate import failing_towers

    base = {"passed": False, "image_cosine": {"mean": 0.995}, "text_cosine": {"mean": 0.999}}
    assert failing_towers({**base, "failures": ["text worst cosine 0.96 < 0.97"]}) == ["text"]
    only_agreement = {**base, "failures": ["top-1 agreement 0.95 < 0.98"]}
    assert failing_towers(only_agreement) == ["image"]  # unmeasured: the tower further from its source
    assert failing_towers({**only_agreement, "agreement_alone": {"image": 0.99, "text": 0.96}}) == ["text"]
    assert failing_towers({**base, "passed": True, "failures": []}) == []


def test_a_damaged_int8_graph_fails_the_gate_naming_its_agreement(int8_bundle, tiny_clip_bundle, tmp_path):
    """One weight's dequantization scale flipped in the int8 text graph: the gate must say agreement fell."""
    import onnx
    from onnx import numpy_helper

    from edgemm._gate import compare, measure
    from edgemm.export.calibration import gate_data

    damaged = tmp_path / "damaged"
    shutil.copytree(int8_bundle[0], damaged)
    model = onnx.load(damaged / "text_encoder.onnx")
    scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    init = next(i for i in model.graph.initializer if i.name in scales and numpy_helper.to_array(i).size > 8)
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, damaged / "text_encoder.onnx")
    data = gate_data()
    report = compare(measure(edgemm.load(tiny_clip_bundle, threads=1), data),
                     measure(edgemm.DualEncoder(Bundle(damaged, check_hashes=False), threads=1), data), data)
    assert not report["passed"] and report["top1_agreement"] < 0.98
    failure = next(f for f in report["failures"] if f.startswith("top-1 agreement"))
    assert f"over {report['decisions']} held-out decisions (lowest: " in failure
