"""The dependency direction (runtime imports no torch) and the public surface."""

from __future__ import annotations

import subprocess
import sys

import edgemm


def test_runtime_path_imports_no_torch_transformers_or_export(default_bundle):
    code = f"""
import sys, numpy as np
import edgemm
m = edgemm.load({str(default_bundle)!r}, threads=1)
m.classify(np.zeros((48, 64, 3), np.uint8), labels=["cat", "dog"])
m.embed_texts(["hello"])
idx = edgemm.VectorIndex(m.dim); idx.add(m.embed_texts(["a", "b"]))
bad = sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript")
             or n.startswith("edgemm.export"))
print("BAD", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "BAD []" in out.stdout, out.stdout + out.stderr


def test_public_all_is_sorted_and_importable():
    assert edgemm.__all__ == sorted(edgemm.__all__)
    for name in edgemm.__all__:
        assert hasattr(edgemm, name), name


def test_one_exception_tree():
    for name in ("InputError", "BundleError", "BackendError", "ExportError", "MissingDependencyError"):
        assert issubclass(getattr(edgemm, name), edgemm.EdgemmError)
    assert issubclass(edgemm.VerificationError, edgemm.ExportError)
    assert issubclass(edgemm.InputError, ValueError)
