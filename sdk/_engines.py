"""TensorRT engines for a bundle: built on the target, keyed by what makes them valid, verified, then kept.

    edgemm engine build BUNDLE [--precision fp16] [--axis batch=1:8:32] [--images DIR] [--no-rebuild]
    edgemm.load(BUNDLE, backend="tensorrt", engines=edgemm.EngineOptions(precision="fp16"))

Each graph gets a plain ``.plan`` (trtexec, Triton and DeepStream load it) and
a JSON sidecar beside it (:mod:`edgemm.runtime.engines`). A new engine is kept
only after it reproduces ONNX Runtime's outputs on the verification inputs:
the family's own calls (embed, classify, caption…) run once on ONNX Runtime's
CPU provider on real images, every graph call's feeds and outputs are
recorded, and the engine replays them. The figures go into the sidecar and
``edgemm engine list`` / ``edgemm info``; a failing engine is deleted.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.backends.base import Backend
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.engines import (
    ENGINE_GATES,
    EngineOptions,
    OutputComparison,
    PlannedEngine,
    Target,
    axis_ranges,
    engine_dir,
    graph_profile,
    home_engine_dir,
    plan_engines,
    read_sidecar,
    refusal,
    sidecar,
    tensorrt_provider_options,
)
from edgemm.runtime.errors import BackendError, InputError, MissingDependencyError, VerificationError

VERIFY_IMAGES = 8  # images the verification calls run on (one batch, then one image alone)
_MAX_CALLS_KEPT = 12  # recorded calls replayed per graph (spread over a caption's steps)
_RECORDING: contextvars.ContextVar[dict[str, list] | None] = contextvars.ContextVar("edgemm_recording", default=None)
Progress = Callable[[str], None]


def edgemm_home() -> Path:
    """``$EDGEMM_HOME``, else ``~/.cache/edgemm``: built-in bundles, and engines of read-only bundles."""
    return Path(os.environ.get("EDGEMM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "edgemm"))


def engine_directory(bundle: Bundle, options: EngineOptions) -> Path:
    """Where this bundle's engines live (created if needed)."""
    if options.directory is None:
        return engine_dir(bundle.path, edgemm_home())
    path = Path(options.directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"engine directory '{path}' cannot be created ({e.strerror or e}).") from None
    return path


# -- recording the graph calls of a family's own workload ------------------------------------------------


class _Recorder(Backend):
    """Runs a backend and keeps each call's feeds and outputs (the verification inputs of an engine)."""

    def __init__(self, inner: Backend, calls: list):
        super().__init__()
        self.inner, self.calls = inner, calls
        self.name, self.inputs, self.outputs = inner.name, inner.inputs, inner.outputs

    def _infer(self, feeds: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        out = self.inner.infer(feeds)
        self.calls.append(({k: np.array(v) for k, v in feeds.items()}, {k: np.array(v) for k, v in out.items()}))
        return out


def record(role: str, backend: Backend) -> Backend:
    """``backend`` itself, or inside :func:`recording` a recorder of its calls."""
    store = _RECORDING.get()
    if store is None:
        return backend
    return _Recorder(backend, store.setdefault(role, []))


@contextlib.contextmanager
def recording() -> Iterator[dict[str, list]]:
    """Graphs opened inside record every call: role → [(feeds, outputs), …]."""
    store: dict[str, list] = {}
    token = _RECORDING.set(store)
    try:
        yield store
    finally:
        _RECORDING.reset(token)


def _spread(calls: list, keep: int) -> list:
    """At most ``keep`` calls, evenly spread, the first and the last included."""
    if len(calls) <= keep:
        return calls
    picks = sorted({round(i * (len(calls) - 1) / (keep - 1)) for i in range(keep)})
    return [calls[i] for i in picks]


def verification_images(folder: str | None = None, count: int = VERIFY_IMAGES) -> tuple[list[np.ndarray], str]:
    """RGB images to verify engines on, and where they came from.

    Your own folder when given (what the device will see); else the sample
    photos (the ``eval`` extra); else a deterministic synthetic set, so that a
    bare Jetson can still verify.

    Raises:
        InputError: The folder holds no readable images.
    """
    from edgemm.runtime.image import IMAGE_SUFFIXES, to_rgb

    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise InputError(f"verification image folder '{root}' is not a directory.")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:count]
        if not paths:
            raise InputError(f"verification image folder '{root}' holds no image files.")
        return [to_rgb(str(p)) for p in paths], f"{len(paths)} images from {root}"
    try:
        from edgemm.runtime.datasets import sample_photos

        photos = sample_photos()[:count]
        return [p.image for p in photos], f"{len(photos)} sample photos"
    except MissingDependencyError:
        pass
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:240, 0:320]
    images = []
    for i in range(count):  # gradients, stripes and noise: every value range a frame has
        base = np.stack([(x * (i + 1)) % 256, (y * (i + 2)) % 256, ((x + y) * (3 + i)) % 256], axis=-1)
        noise = rng.integers(0, 64, base.shape)
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images, f"{count} synthetic images (install edgemm[eval] or pass --images to verify on real ones)"


def record_verification_calls(bundle: Bundle, images: list[np.ndarray]) -> dict[str, list]:
    """Run the family's own calls on ONNX Runtime's CPU provider and record every graph call.

    Raises:
        VerificationError: A graph of the bundle was never called.
    """
    from edgemm._model import FAMILIES

    family = FAMILIES[bundle.manifest.family]
    with recording() as calls:
        model = family(bundle, backend="onnxruntime", providers=("cpu",))
        model._exercise(images)
    missing = sorted(set(bundle.manifest.graphs) - set(calls))
    if missing:
        raise VerificationError(f"the verification run never called graphs {missing} of '{bundle.path}'; "
                                "their engines cannot be verified.")
    return {role: _spread(c, _MAX_CALLS_KEPT) for role, c in calls.items()}


def score_outputs(bundle: Bundle, role: str) -> set[str]:
    """Outputs of a graph whose argmax is an answer (top-1 agreement is measured on them): class
    probabilities, next-token logits, a fusion head's logits."""
    m = bundle.manifest
    names = {getattr(m.scoring, field, None) for field in ("class_output", "audio_output")} if m.scoring else set()
    if m.generation is not None:
        names.add(m.generation.logits)
    outputs = [t.name for t in m.graphs[role].outputs]
    if role == "fusion":
        names.update(outputs)
    return {n for n in outputs if n in names or n == "logits" or n.endswith("probs")}


# -- building, verifying, keeping ----------------------------------------------------------------------


def detect_target(device: int = 0) -> Target:
    """The TensorRT and GPU here.

    Raises:
        BackendError: No usable TensorRT, cuda-python, driver or GPU (naming what to install).
    """
    from edgemm.runtime.backends.tensorrt import gpu_info, import_cudart, import_tensorrt

    trt, module = import_tensorrt()
    gpu = gpu_info(import_cudart(), device)
    return Target(tensorrt=f"{module} {trt.__version__}", gpu=gpu["gpu"], compute_capability=gpu["compute_capability"])


def ensure_engines(bundle: Bundle, options: EngineOptions | None = None, *, target: Target | None = None,
                   progress: Progress | None = None) -> dict[str, Path]:
    """The bundle's engines for this device: the cached ones where valid, the rest built and verified.

    Sets ``bundle.engines`` (what ``load(..., backend="tensorrt")`` opens).

    Raises:
        BackendError: No TensorRT or GPU; or engines missing or stale with ``rebuild=False`` (every difference named).
        InputError: Bad options (an axis no graph has, int8 of a float bundle).
        VerificationError: A new engine's outputs differ from ONNX Runtime's beyond its gate (it is deleted).
    """
    options = options or EngineOptions()
    target = target or detect_target(options.device)
    directory = engine_directory(bundle, options)
    planned = plan_engines(bundle.manifest, target, options, directory)
    stale = [p for p in planned if p.reasons]
    if stale and not options.rebuild:
        raise BackendError(refusal(planned))
    if stale:
        _build_and_verify(bundle, stale, target, options, directory, progress or (lambda line: None))
    bundle.engines = {p.role: p.plan for p in planned}
    return dict(bundle.engines)


def _build_and_verify(bundle: Bundle, todo: list[PlannedEngine], target: Target, options: EngineOptions,
                      directory: Path, progress: Progress) -> None:
    from edgemm._files import atomic_write
    from edgemm.runtime.backends.tensorrt import TensorRTBackend, build_engine

    ranges = axis_ranges(bundle.manifest, options.axes)
    precision, flags = todo[0].key.precision, todo[0].key.flags
    slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in target.tensorrt)
    timing = directory / f"timing-{slug}-sm{target.compute_capability.replace('.', '')}.cache"
    unverified = {p.role: p.plan.with_name(f".{p.plan.stem}.{os.getpid()}.unverified.plan") for p in todo}
    try:
        builds = {}
        for i, p in enumerate(todo, 1):
            why = p.reasons[0] if len(p.reasons) == 1 else f"{len(p.reasons)} differences"
            progress(f"[{i}/{len(todo)}] building {p.role} ({precision}) for {target.gpu} with "
                     f"{target.tensorrt} ({why}); minutes on a Jetson, seconds with the timing cache")
            shapes = graph_profile(bundle.manifest.graphs[p.role], ranges).shapes
            builds[p.role] = build_engine(bundle.graph_path(p.role), unverified[p.role], shapes,
                                          precision=precision, strongly_typed="strongly-typed" in flags,
                                          timing_cache=timing,
                                          workspace_bytes=None if options.workspace_mib is None
                                          else options.workspace_mib << 20)
        images, source = verification_images(options.images)
        progress(f"verifying against ONNX Runtime on {source}")
        calls = record_verification_calls(bundle, images)
        reports = {}
        for p in todo:
            engine = TensorRTBackend(unverified[p.role], device=options.device)
            try:
                comparison = OutputComparison(score_outputs(bundle, p.role))
                for feeds, reference in calls[p.role]:
                    comparison.add(reference, engine.infer(feeds))
            finally:
                engine.close()
            reports[p.role] = {**comparison.report(ENGINE_GATES[precision]), "inputs": source}
        failed = {role: r for role, r in reports.items() if not r["passed"]}
        if failed:
            lines = "; ".join(f"{role}: {', '.join(r['failures'])}" for role, r in failed.items())
            raise VerificationError(f"TensorRT {precision} engines of '{bundle.path}' differ from ONNX "
                                    f"Runtime on {source}: {lines}. Nothing was kept. Try a higher precision "
                                    "(fp32), or check the graph with polygraphy run --trt --onnxrt.")
        for p in todo:
            build = builds[p.role]
            record_ = sidecar(p.key, build_seconds=build["build_seconds"], verification=reports[p.role],
                              extra={"plan": p.plan.name, "onnx": bundle.manifest.graphs[p.role].file,
                                     "bundle": str(bundle.path), "workspace_bytes": build["workspace_bytes"]})
            unverified[p.role].replace(p.plan)  # the plan first: a sidecar never describes a missing plan
            atomic_write(p.plan.with_suffix(".json"),
                         lambda f, r=record_: f.write(json.dumps(r, indent=2).encode()), what="engine sidecar")
            progress(f"kept {p.plan.name}: {_verification_summary(reports[p.role])}")
    finally:
        for path in unverified.values():
            path.unlink(missing_ok=True)


def _verification_summary(report: dict[str, Any]) -> str:
    parts = []
    for name, f in report["outputs"].items():
        agree = f", top-1 {f['top1_agreement']:.1%}" if "top1_agreement" in f else ""
        parts.append(f"{name} cosine {f['cosine_min']:.5f}, max diff {f['max_abs_diff']:.2g}{agree}")
    return f"{report['calls']} calls; " + "; ".join(parts)


def list_engines(bundle: Bundle, options: EngineOptions | None = None) -> list[dict[str, Any]]:
    """The engines cached for a bundle (any device), each with its sidecar and whether it matches the bundle now."""
    options = options or EngineOptions()
    if options.directory is not None:
        directories = [Path(options.directory)]
    else:  # looked for, not created
        directories = [bundle.path.resolve() / "engines", home_engine_dir(bundle.path, edgemm_home())]
    found = []
    for path in sorted(p for d in directories if d.is_dir() for p in d.glob("*.json")):
        try:
            key, data = read_sidecar(path)
        except BackendError as e:
            found.append({"sidecar": path.name, "error": str(e)})
            continue
        graph = bundle.manifest.graphs.get(key.role)
        current = graph is not None and bundle.manifest.files.get(graph.file) == key.onnx_sha256
        found.append({"sidecar": path.name, "plan": data.get("plan"), "present": path.with_suffix(".plan").is_file(),
                      "matches_bundle": current, "key": vars(key), "build_seconds": data.get("build_seconds"),
                      "verification": data.get("verification")})
    return found


def ort_provider_options(bundle: Bundle, role: str, providers: Sequence[str]) -> dict[str, Any]:
    """ONNX Runtime's TensorRT provider options for one graph: engine and timing caches, precision, its profile.

    Returns ``{}`` unless ``"tensorrt"`` is among ``providers``, else
    ``{"provider_options": {"tensorrt": {...}}}`` for :class:`OnnxRuntimeBackend`.
    The precision and axes come from ``bundle.engine_options`` (``load(..., engines=)``).
    """
    if "tensorrt" not in providers:
        return {}
    options = bundle.engine_options or EngineOptions()
    precision, _ = options.resolve(bundle.manifest.precision)
    cache = engine_directory(bundle, options) / "onnxruntime-tensorrt" / precision
    cache.mkdir(parents=True, exist_ok=True)
    profile = graph_profile(bundle.manifest.graphs[role], axis_ranges(bundle.manifest, options.axes))
    return {"provider_options": {"tensorrt": tensorrt_provider_options(profile, cache, options,
                                                                       bundle.manifest.precision)}}
