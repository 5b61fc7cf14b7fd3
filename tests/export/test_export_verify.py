"""Export + verification with tiny fixture modules, and atomic bundle writing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgemm.export.bundle_writer import BundleWriter
from edgemm.export.onnx_export import export_onnx, verify_onnx
from edgemm.export.specs import SPECS, ExportSpec
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import ExportError, VerificationError
from edgemm.runtime.manifest import TensorSpec

TINY = ExportSpec(
    role="tiny",
    family="test",
    inputs=(TensorSpec("x", "float32", ["batch", 8]),),
    outputs=(TensorSpec("y", "float32", ["batch", 4]),),
    dummy_inputs=lambda: (torch.zeros(2, 8),),
    atol=1e-5,
)


def tiny_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()


def test_every_registered_spec_is_exported_by_a_test():
    import edgemm.export.models.captioner  # noqa: F401
    import edgemm.export.models.dual_encoder  # noqa: F401  (registers the family's specs)

    # Each registered role must be exercised by the default-bundle build tests.
    assert {"image_encoder", "text_encoder", "caption_encoder", "caption_decoder"} <= set(SPECS)
    for spec in SPECS.values():
        assert spec.file.endswith(".onnx")
        assert all(isinstance(d, (int, str)) for t in spec.inputs for d in t.shape)


def test_export_has_named_io_and_dynamic_batch(tmp_path):
    path = export_onnx(tiny_module(), TINY, tmp_path / "tiny.onnx")
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["x"]
    assert [o.name for o in graph.output] == ["y"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    rng = np.random.default_rng(0)
    report = verify_onnx(tiny_module(), TINY, path, [{"x": rng.standard_normal((1, 8), np.float32)},
                                                      {"x": rng.standard_normal((5, 8), np.float32)}],
                         description="random data")
    assert report["passed"] and report["max_abs_diff"]["y"] < 1e-5
    assert report["inputs"] == "6 input rows of random data"


def test_drifting_export_fails_verification(tmp_path):
    module = tiny_module()
    path = export_onnx(module, TINY, tmp_path / "tiny.onnx")
    with torch.no_grad():
        module[2].bias += 1e-3  # the reference moves after export: the graph no longer matches it
    with pytest.raises(VerificationError, match="drifts from PyTorch"):
        verify_onnx(module, TINY, path, [{"x": np.ones((3, 8), np.float32)}], description="rows")


def test_bundle_writer_publishes_only_on_commit(tmp_path):
    out = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with BundleWriter(out) as w:
            w.write_json("labels.json", ["a"])
            raise RuntimeError("export crashed half-way")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left either


def test_bundle_writer_refuses_existing_directory(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        BundleWriter(tmp_path / "b")


def test_committed_bundle_opens_with_hashes(tmp_path):
    path = tmp_path / "b"
    with BundleWriter(path) as w:
        export_onnx(tiny_module(), TINY, w.path(TINY.file))
        w.write_json("labels.json", ["a", "b"])
        w.commit(name="tiny", family="test", embedding_dim=4, precision="fp32",
                 graphs={"tiny": {"file": TINY.file, "inputs": [vars(t) for t in TINY.inputs],
                                  "outputs": [vars(t) for t in TINY.outputs]}},
                 image=None, text=None, scoring={"kind": "cosine"}, labels={"file": "labels.json"})
    bundle = Bundle(path)
    assert set(bundle.manifest.files) == {"tiny.onnx", "labels.json"}
    assert bundle.manifest.tools["onnx"] == onnx.__version__
    assert bundle.read_json("labels.json") == ["a", "b"]


def test_default_bundle_manifest_records_verification(default_bundle):
    m = Bundle(default_bundle).manifest
    assert set(m.graphs) == {"image_encoder", "text_encoder"}
    for role in m.graphs:
        v = m.verification[role]
        assert v["passed"] and max(v["max_abs_diff"].values()) <= v["tolerance"] <= 1e-4
    assert m.embedding_dim == 384 and m.precision == "fp32"
    assert {"torch", "onnxruntime", "onnx"} <= set(m.tools)


def test_pads_fold_into_convs_in_the_optimised_image_graph(default_bundle, tmp_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(default_bundle / "image_encoder.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimised.onnx").graph.node]
    assert "Pad" not in ops
