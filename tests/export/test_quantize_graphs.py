"""Graph-level conversion: Q/DQ placement, fp16 interface, calibration cache, sensitivity, bad graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgemm.export import quantize as q
from edgemm.export.calibration import calibration_data, gate_data, split_user_files, text_file
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import ExportError, InputError
from edgemm.runtime.text import TextTokenizer


@pytest.fixture(scope="module")
def text_graph(tiny_clip_bundle, tmp_path_factory):
    bundle = Bundle(tiny_clip_bundle)
    tmp = tmp_path_factory.mktemp("quantize")
    prepared = q.prepare(bundle.graph_path("text_encoder"), tmp / "prepared.onnx")
    t = bundle.manifest.text
    tok = TextTokenizer(bundle.file(t.tokenizer), max_length=t.max_length, pad_id=t.pad_id)
    calib, _ = calibration_data(max_texts=64)
    feeds = [tok(calib.texts[i : i + 16]) for i in range(0, 64, 16)]
    return prepared, feeds, tmp


def test_static_int8_places_qdq_on_weight_matmuls_only(text_graph):
    prepared, feeds, tmp = text_graph
    nodes = q.quantizable_nodes(prepared)
    everything = q.quantizable_nodes(prepared, q.Int8Options(matmul_weights_only=False))
    assert nodes and len(everything) > len(nodes)  # attention products are left out by default
    out = q.quantize_static(prepared, tmp / "int8.onnx", lambda: feeds, cache=tmp / "cache.json")
    graph = onnx.load(str(out)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DequantizeLinear") >= 2 * len(nodes)  # weight + activation for each quantized MatMul
    assert (tmp / "cache.json").is_file()
    got = q.graph_outputs(out, feeds)
    ref = q.graph_outputs(prepared, feeds)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98 and not np.allclose(got, ref, atol=1e-6)  # close, and really quantized


def test_exclusion_reuses_the_cache_and_keeps_nodes_float(text_graph):
    prepared, feeds, tmp = text_graph
    cache = tmp / "cache-exclusion.json"
    q.quantize_static(prepared, tmp / "a.onnx", lambda: feeds, cache=cache)
    keep = q.quantizable_nodes(prepared)[:3]

    def no_calibration():
        raise AssertionError("calibration ran again despite the cache")

    out = q.quantize_static(prepared, tmp / "b.onnx", no_calibration, cache=cache, exclude=keep)
    graph = onnx.load(str(out)).graph
    float_matmuls = {n.name for n in graph.node if n.op_type == "MatMul"}
    by_name = {n.name: n for n in graph.node}
    for name in keep:
        assert name in float_matmuls
        assert all(not i.endswith("_DequantizeLinear_Output") for i in by_name[name].input)


def test_sensitivity_ranks_every_candidate(text_graph):
    prepared, feeds, tmp = text_graph
    cache = tmp / "cache-sensitivity.json"
    q.quantize_static(prepared, tmp / "c.onnx", lambda: feeds, cache=cache)
    nodes = q.quantizable_nodes(prepared)
    ranked = q.rank_sensitivity(prepared, nodes, feeds[:1],
                                lambda dst, only: q.quantize_static(prepared, dst, None, cache=cache, only=only))
    assert sorted(r["node"] for r in ranked) == sorted(nodes)
    costs = [r["cost"] for r in ranked]
    assert costs == sorted(costs, reverse=True) and costs[0] > 0


def test_dynamic_int8_and_fp16_keep_the_interface(text_graph, tiny_clip_bundle):
    prepared, feeds, tmp = text_graph
    dyn = q.quantize_dynamic(prepared, tmp / "dyn.onnx")
    assert "DynamicQuantizeLinear" in {n.op_type for n in onnx.load(str(dyn)).graph.node}
    half = q.to_fp16(Bundle(tiny_clip_bundle).graph_path("text_encoder"), tmp / "half.onnx")
    model = onnx.load(str(half))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.INT64}
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 out, as before
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    ref = q.graph_outputs(prepared, feeds)
    for path in (dyn, half):
        got = q.graph_outputs(path, feeds)
        assert ((got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)).min() > 0.98


def test_bad_graphs_and_calibration_are_clear_errors(tmp_path, text_graph):
    prepared, _, _ = text_graph
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(prepared.read_bytes()[:5000])
    with pytest.raises(ExportError, match="not a valid ONNX model"):
        q.check_graph(broken)
    with pytest.raises(ExportError, match="does not exist"):
        q.check_graph(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="calibration data is empty"):
        q.quantize_static(prepared, tmp_path / "x.onnx", lambda: [], cache=tmp_path / "none.json")
    with pytest.raises(InputError, match="calibration method"):
        q.Int8Options(method="mse").resolved()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(InputError, match="no non-empty lines"):
        text_file(empty)
    with pytest.raises(InputError, match="no image files"):
        calibration_data(image_dir=tmp_path)
    (tmp_path / "bad.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="cannot be read as UTF-8"):
        text_file(tmp_path / "bad.bin")


def test_held_out_data_never_meets_calibration(tmp_path):
    texts = tmp_path / "corpus.txt"
    texts.write_text("\n".join(f"sentence number {i}" for i in range(20)))
    calib, held = calibration_data(text_path=texts)
    assert len(held.texts) == 4 and not set(held.texts) & set(calib.texts)
    gate = gate_data(held)
    assert set(held.texts) <= set(gate.texts) and not set(calib.texts) & set(gate.texts)
    packaged, _ = calibration_data()
    assert not set(packaged.texts) & set(gate_data().texts)
    assert split_user_files(list(range(10))) == ([0, 1, 2, 3, 5, 6, 7, 8], [4, 9])


def test_the_gate_images_are_not_what_calibration_or_students_see(photos):
    """Calibration crops the even photos, the gate measures the odd ones; students train on the even LFW faces."""
    from edgemm.export.calibration import gate_photo_indices, lfw_faces
    from edgemm.export.distill_image import default_image_data

    gate = gate_data(fashion_images=10)
    odd = [photos[i].image for i in gate_photo_indices(len(photos))]
    assert all(np.array_equal(a, b) for a, b in zip(gate.images, odd))
    assert not any(np.array_equal(gate.images[0], p.image) for i, p in enumerate(photos) if i % 2 == 0)
    held_faces, train_faces = lfw_faces(1), lfw_faces(0)
    assert len(held_faces) == len(train_faces) == 50
    student_images = default_image_data(fashion=0).images
    digest = {im.tobytes() for im in student_images if im.shape == held_faces[0].shape}
    assert all(f.tobytes() in digest for f in train_faces) and not any(f.tobytes() in digest for f in held_faces)
    assert {gate.images[-1].tobytes()} <= {f.tobytes() for f in held_faces}  # the faces are in the gate
    kinds = set(gate.label_kinds)
    assert {"photos", "fashion-mnist", "imagenet names", "categories", "bundle labels"} <= kinds


def test_calibration_accepts_any_iterable_of_images_and_texts(photos):
    images = (p.image for p in photos[:10])  # a generator, as a camera loop would give
    calib, held = calibration_data(image_dir=images, text_path=iter(f"text {i}" for i in range(10)))
    assert len(calib.images) == 8 and len(held.images) == 2 and isinstance(calib.images[0], np.ndarray)
    assert calib.describe["texts"] == "8 texts from the texts given (2 more held out)"
    with pytest.raises(InputError, match="item 1 is not a non-empty string"):
        calibration_data(text_path=["fine", 3])
    with pytest.raises(InputError, match="gave nothing"):
        calibration_data(image_dir=iter([]))
    with pytest.raises(InputError, match="not a single item"):
        calibration_data(image_dir=photos[0].image)
