"""The native TensorRT backend where there is no GPU: every way it cannot run is one clear BackendError."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from edgemm.runtime.backends import open_backend
from edgemm.runtime.backends import tensorrt as trt_backend
from edgemm.runtime.errors import BackendError

ROOT = Path(__file__).resolve().parents[2]


def test_no_tensorrt_is_one_error_naming_what_to_install(tmp_path):
    if any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
        pytest.skip("a TensorRT module is importable here")
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"not an engine")
    with pytest.raises(BackendError, match=r"TensorRT is not available.*JetPack.*edgemm\[tensorrt-rtx\]"):
        open_backend(plan, "tensorrt")


def test_a_stub_tensorrt_namespace_does_not_count(tmp_path, monkeypatch):
    """tensorrt-stubs leaves an importable, empty `tensorrt`; the real module has Runtime and __version__."""
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    if importlib.util.find_spec("tensorrt_rtx"):
        pytest.skip("TensorRT for RTX is installed here")
    try:
        with pytest.raises(BackendError, match="tensorrt: imports but has no TensorRT runtime"):
            trt_backend.import_tensorrt()
    finally:
        sys.modules.pop("tensorrt", None)  # the empty namespace must not outlive the test
        importlib.invalidate_caches()


def test_no_gpu_is_one_error():
    cudart = pytest.importorskip("cuda.bindings.runtime")
    count = cudart.cudaGetDeviceCount()
    if int(count[0]) == 0 and count[1]:
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendError, match="CUDA device query failed|no CUDA device"):
        trt_backend.gpu_info(cudart)


def test_tensorrt_on_an_onnx_graph_says_what_to_do(tiny_clip_bundle):
    with pytest.raises(BackendError, match=r"backend='tensorrt'.*builds, verifies and caches.*"
                                           r"providers=\('tensorrt', 'cuda'\)"):
        open_backend(tiny_clip_bundle / "image_encoder.onnx", "tensorrt")


def test_the_backend_type_checks_against_the_tensorrt_api():
    """A misspelt TensorRT call fails here, without a GPU (scripts/typecheck: mypy + tensorrt-stubs)."""
    pytest.importorskip("mypy")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "typecheck")], capture_output=True, text=True, cwd=ROOT,
                         env={"PY": sys.executable, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success" in out.stdout


def test_building_without_tensorrt_is_one_error(tiny_clip_bundle, tmp_path):
    if any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
        pytest.skip("a TensorRT module is importable here")
    with pytest.raises(BackendError, match="TensorRT is not available"):
        trt_backend.build_engine(tiny_clip_bundle / "image_encoder.onnx", tmp_path / "e.plan", {})
    with pytest.raises(BackendError, match="precision must be"):
        trt_backend.build_engine(tiny_clip_bundle / "image_encoder.onnx", tmp_path / "e.plan", {}, precision="int4")
    assert not list(tmp_path.iterdir())  # nothing half-written
