"""``edgemm export triton BUNDLE -o REPO``: a Triton model repository made from a verified bundle.

::

    REPO/
      image_encoder/config.pbtxt   1/model.onnx           a graph: onnxruntime_onnx (or python, see below)
      text_encoder/config.pbtxt    1/model.onnx
      classify/config.pbtxt        1/model.py 1/bundle/   edgemm's preprocessing and scoring (Python backend)
      embed_image/ …  embed_text/ …                       (caption/ for a captioner)

Each graph is a model of its own, with ``max_batch_size`` and ``dynamic_batching``
where it batches (the batch axis left out of ``dims``, ``-1`` for every other dynamic
axis), an ``instance_group``, and a ``model_warmup`` at the manifest's typical shapes
so that the first client request does not pay for session creation or a TensorRT
engine build. For ``--target gpu`` the graphs run on ``KIND_GPU`` with ONNX Runtime's
TensorRT accelerator: engine cache and timing cache on disk (built once, at warm-up),
a workspace limit, and FP16 for the image graphs only — an fp16 text encoder is a known
accuracy trap (overflowing attention and LayerNorm sums), so text graphs stay FP32
unless ``--fp16-text`` asks otherwise.

The models a client sends raw data to (``classify``: image bytes and label strings)
are Python-backend models running edgemm's own code over a copy of the bundle's small
files (manifest, tokenizer, labels, class embeddings — no graphs): their graph calls go
to the graph models above as BLS requests (:mod:`edgemm.runtime.backends.triton`), so
Triton batches them with every other client's. Triton's Python environment needs
edgemm's runtime (``pip install edgemm[onnx]``, no torch); ``--site-packages`` adds a
virtualenv's site-packages folder to it instead.

``--graph-backend python`` serves the graphs themselves from the Python backend too
(edgemm's ONNX Runtime backend, CPU), for a Triton build without the ONNX Runtime
backend (the ``tritonserver`` that ships in the ``nvidia-pytriton`` wheel has only
the Python backend).

The repository is written beside ``REPO`` and renamed into place, so a failure leaves
no half-written repository.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemm._files import staged_directory
from edgemm._serve import HIGH_LEVEL
from edgemm._triton import graph_tensors, known_sizes, model_config, to_pbtxt
from edgemm.runtime.bundle import Bundle, sha256_file
from edgemm.runtime.engines import EngineOptions, axis_ranges, graph_profile
from edgemm.runtime.errors import ExportError, InputError
from edgemm.runtime.manifest import CAPTION_DECODER

__all__ = ["TritonOptions", "export_triton"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
GiB = 1 << 30

_MODEL_PY = '''"""{name}: edgemm inside Triton's Python backend. Written by `edgemm export triton`; regenerate, do not edit."""

import json
import site

import triton_python_backend_utils as pb_utils  # noqa: F401 - Triton's own module; edgemm's backend uses it


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {{k: v.get("string_value", "") for k, v in config.get("parameters", {{}}).items()}}
        for folder in filter(None, parameters.get("edgemm_site_packages", "").split(":")):
            site.addsitedir(folder)  # a virtualenv with edgemm (its .pth files included)
        from edgemm._triton_python import PythonModel

        self.model = PythonModel(config, args["model_repository"], args["model_version"])

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model = None
'''


@dataclass(frozen=True)
class TritonOptions:
    """How the repository's models run."""

    target: str = "cpu"  # "cpu" (KIND_CPU) or "gpu" (KIND_GPU, TensorRT accelerator for the ONNX graphs)
    graph_backend: str = "onnxruntime"  # "onnxruntime" (Triton's) or "python" (edgemm's, inside the Python backend)
    max_batch: int = 32  # max_batch_size of the graphs that batch
    max_delay_ms: float = 0.0  # dynamic_batching queue delay (0, Triton's default: batch what is queued)
    instances: int = 1  # instance_group count per model
    fp16: bool = True  # GPU: TensorRT FP16 for the image graphs
    fp16_text: bool = False  # GPU: FP16 for text graphs too (measure first: a known accuracy trap)
    workspace_gb: float = 2.0  # GPU: TensorRT workspace limit
    engine_cache: str = "/tmp/edgemm-triton-engines"  # GPU: where TensorRT engines and timing caches persist
    site_packages: str = ""  # folders (":"-separated) added to Triton's Python for the Python-backend models
    max_items: int = 256  # images or texts one request to classify / embed / caption may carry
    engines: EngineOptions | None = None  # GPU: serve TensorRT plans (tensorrt_plan), checked or built on this machine

    def __post_init__(self):
        if self.target not in ("cpu", "gpu"):
            raise InputError(f"target must be 'cpu' or 'gpu', got {self.target!r}.")
        if self.graph_backend not in ("onnxruntime", "python"):
            raise InputError(f"graph_backend must be 'onnxruntime' or 'python', got {self.graph_backend!r}.")
        if self.graph_backend == "python" and self.target == "gpu":
            raise InputError("graph_backend 'python' runs the graphs on the CPU; for a GPU use Triton's "
                             "onnxruntime backend (the default).")
        for name in ("max_batch", "instances", "max_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}.")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise InputError(f"max_delay_ms must be between 0 and 10000, got {self.max_delay_ms!r}.")
        if self.engines is not None and (self.target != "gpu" or self.graph_backend != "onnxruntime"):
            raise InputError("TensorRT plans (--engines) are for --target gpu with Triton's own backends.")
        if not 0 < self.workspace_gb <= 1024:
            raise InputError(f"workspace_gb must be in (0, 1024], got {self.workspace_gb!r}.")


def export_triton(bundle_dir: str | os.PathLike, out: str | os.PathLike, options: TritonOptions | None = None, *,
                  overwrite: bool = False) -> list[str]:
    """Write a Triton model repository for a bundle (see the module docstring).

    Returns:
        The repository's model names.

    Raises:
        BundleError: The bundle is missing or altered.
        InputError: ``out`` exists and ``overwrite`` is off.
        ExportError: A graph file has a name Triton cannot use.
    """
    options = options or TritonOptions()
    bundle = Bundle(bundle_dir)  # every file checked against its hash before anything is copied
    m = bundle.manifest
    out = Path(out)
    ranges = axis_ranges(m, options.engines.axes if options.engines else None)
    plans: dict[str, Path] = {}
    if options.engines is not None:
        from edgemm._engines import ensure_engines

        # Checked against this machine's TensorRT and GPU (built and verified where missing): Triton's
        # tensorrt backend loads only plans made by its own TensorRT version, so run this on the Triton host.
        plans = ensure_engines(bundle, options.engines)
    names = []
    with staged_directory(out, overwrite=overwrite) as staging:
        for role, graph in m.graphs.items():
            name = Path(graph.file).stem  # what edgemm's Triton backend calls it by (runtime/backends/triton.py)
            if not _NAME.fullmatch(name) or name in HIGH_LEVEL.get(m.family, {}):
                raise ExportError(f"graph file '{graph.file}' cannot name a Triton model; rename it in the bundle.")
            _write_graph_model(staging / name, bundle, role, name, options, ranges, plans.get(role))
            names.append(name)
        for name, cls in HIGH_LEVEL.get(m.family, {}).items():
            inputs, outputs = cls.signature(m.embedding_dim or 0)
            parameters = {"edgemm_model": {"string_value": name},
                          "edgemm_max_items": {"string_value": str(options.max_items)}}
            if options.site_packages:
                parameters["edgemm_site_packages"] = {"string_value": options.site_packages}
            config = model_config(name, inputs, outputs, max_batch_size=0, backend="python",
                                  instances=options.instances, kind="KIND_CPU", parameters=parameters)
            version = staging / name / "1"
            version.mkdir(parents=True)
            (version / "model.py").write_text(_MODEL_PY.format(name=name))
            _copy_bundle(bundle, version / "bundle", graphs=False)
            (staging / name / "config.pbtxt").write_text(to_pbtxt(config))
            names.append(name)
    return names


def _write_graph_model(folder: Path, bundle: Bundle, role: str, name: str, options: TritonOptions,
                       ranges: dict[str, Any], plan: Path | None) -> None:
    m = bundle.manifest
    graph = m.graphs[role]
    inputs, outputs, batches = graph_tensors(graph, known_sizes(m))
    # A captioner's decoder step carries a cache that grows per call: Triton cannot batch it (shapes differ).
    max_batch = options.max_batch if batches and role != CAPTION_DECODER else 0
    if plan is not None and max_batch:
        max_batch = min(max_batch, ranges[graph.inputs[0].shape[0]][2])  # the engine's profile ends there
    gpu = options.target == "gpu"
    extra: dict[str, Any] = {"model_warmup": [_warmup(graph, ranges, batched=max_batch > 0)]}
    if plan is not None:
        platform, backend = "tensorrt_plan", "tensorrt"
    elif options.graph_backend == "python":
        platform, backend = None, "python"
        extra["parameters"] = {"edgemm_model": {"string_value": f"graph:{role}"}}
        if options.site_packages:
            extra["parameters"]["edgemm_site_packages"] = {"string_value": options.site_packages}
    else:
        platform, backend = "onnxruntime_onnx", "onnxruntime"
        if gpu:
            extra["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [
                _tensorrt_accelerator(graph, name, options)]}}
    config = model_config(name, inputs, outputs, max_batch_size=max_batch, platform=platform, backend=backend,
                          max_delay_ms=options.max_delay_ms, instances=options.instances,
                          kind="KIND_GPU" if gpu else "KIND_CPU", **extra)
    version = folder / "1"
    version.mkdir(parents=True)
    if plan is not None:  # a plain plan: Triton loads it as it is; its sidecar stays with edgemm's cache
        shutil.copyfile(plan, version / "model.plan")
        (folder / "config.pbtxt").write_text(to_pbtxt(config))
        return
    shutil.copyfile(bundle.graph_path(role), version / "model.onnx")
    if sha256_file(version / "model.onnx") != m.files[graph.file]:
        raise ExportError(f"'{graph.file}' changed while it was copied; run the export again.")
    if options.graph_backend == "python":
        (version / "model.py").write_text(_MODEL_PY.format(name=name))
        (version / "manifest.json").write_bytes((bundle.path / "manifest.json").read_bytes())
    (folder / "config.pbtxt").write_text(to_pbtxt(config))


def _is_text(graph: Any) -> bool:
    return any("seq" in t.shape for t in graph.inputs)


def _tensorrt_accelerator(graph: Any, name: str, options: TritonOptions) -> dict[str, Any]:
    fp16 = options.fp16 and (options.fp16_text or not _is_text(graph))
    return {"name": "tensorrt", "parameters": {
        "precision_mode": "FP16" if fp16 else "FP32",
        "max_workspace_size_bytes": str(int(options.workspace_gb * GiB)),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"{options.engine_cache}/{name}"}}


def _warmup(graph: Any, ranges: dict[str, Any], *, batched: bool) -> dict[str, Any]:
    """One warm-up request at the profile's typical (opt) shape: zeros for integers (valid token ids), random floats."""
    from edgemm._kserve import datatype_of
    from edgemm._triton import TRITON_TYPES

    import numpy as np

    opt = {t: shapes[1] for t, shapes in graph_profile(graph, ranges).shapes.items()}
    inputs = {}
    for t in graph.inputs:
        dims = list(opt[t.name][1:] if batched else opt[t.name])
        kind = "zero_data" if np.dtype(t.dtype).kind in "iub" else "random_data"
        inputs[t.name] = {"data_type": TRITON_TYPES[datatype_of(t.dtype)], "dims": dims, kind: True}
    return {"name": "typical shape", "batch_size": 1 if batched else 0, "inputs": inputs}


def _copy_bundle(bundle: Bundle, dest: Path, *, graphs: bool) -> None:
    """The bundle's manifest and files (without its graphs unless ``graphs``), as read and checked at open."""
    dest.mkdir(parents=True)
    graph_files = {g.file for g in bundle.manifest.graphs.values()}
    shutil.copyfile(bundle.path / "manifest.json", dest / "manifest.json")
    for rel in bundle.manifest.files:
        if graphs or rel not in graph_files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.file(rel), target)
