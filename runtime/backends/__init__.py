"""Backends, picked from a table by name: ``open_backend(path, "onnxruntime", ...)``."""

from __future__ import annotations

from pathlib import Path

from edgemm.runtime.backends.base import Backend
from edgemm.runtime.errors import BackendError


def _onnxruntime(path: Path, **options) -> Backend:
    from edgemm.runtime.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path, **options)


def _tensorrt(path: Path, **options) -> Backend:
    from edgemm.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(path, **options)


def _triton(path: Path, **options) -> Backend:
    from edgemm.runtime.backends.triton import TritonGraphBackend

    return TritonGraphBackend(path, **options)


# backend name → (file suffix it loads, factory)
BACKENDS = {
    "onnxruntime": (".onnx", _onnxruntime),
    "tensorrt": (".plan", _tensorrt),
    "triton": (".onnx", _triton),  # inside Triton's Python backend: graph calls become BLS requests
}


def open_backend(path: str | Path, backend: str = "onnxruntime", **options) -> Backend:
    """Open one graph file with the named backend.

    Args:
        path: Graph file (``.onnx`` for ONNX Runtime).
        backend: A name from ``BACKENDS``.
        **options: Passed to the backend (e.g. ``providers``, ``threads``).

    Raises:
        BackendError: Unknown backend, or a file type the backend does not load.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend '{backend}'; choose from {sorted(BACKENDS)}.")
    suffix, factory = BACKENDS[backend]
    path = Path(path)
    if backend == "tensorrt" and path.suffix == ".onnx":
        raise BackendError(f"backend 'tensorrt' runs TensorRT engines (.plan) built on the target from the ONNX "
                           f"graphs; '{path.name}' is an ONNX graph. Load the bundle with edgemm.load(path, "
                           "backend='tensorrt'), which builds, verifies and caches its engines (or run edgemm engine "
                           "build first), or use backend='onnxruntime' with providers=('tensorrt', 'cuda').")
    if path.suffix != suffix:
        raise BackendError(f"backend '{backend}' loads {suffix} files, not '{path.name}'.")
    return factory(path, **options)


__all__ = ["BACKENDS", "Backend", "open_backend"]
