"""TensorRT engines' pure logic: optimization profiles, cache keys, sidecars and staleness (no GPU needed).

An engine is valid only for the TensorRT version that built it, the GPU (its
compute capability, and in practice its model), the precision and builder
flags, the optimization profiles, and the exact ONNX file. edgemm keys its
engine cache by all of them, keeps each engine a **plain** ``.plan`` that
trtexec, Triton and DeepStream load, and writes what the key is made of to a
JSON sidecar beside it. An engine whose sidecar does not match what would be
built now is stale: it is rebuilt (or refused, naming every difference), never run.

Profiles come from the manifest's dynamic axes: every axis name a graph uses
has a default (min, opt, max) here, bounded by the manifest where it knows
better (``text.max_length``, ``generation.max_positions``), and a user can
override any of them (``batch=1:8:64``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.errors import BackendError, InputError
from edgemm.runtime.manifest import GraphSpec, Manifest, parse_json

SIDECAR_VERSION = 1
_MAX_SIDECAR_BYTES = 1 << 20
# Default (min, opt, max) per dynamic axis name; None: taken from the manifest.
DEFAULT_AXES: dict[str, tuple[int, int, int | None]] = {
    "batch": (1, 8, 32),  # frames or texts per call
    "seq": (1, 16, None),  # text tokens: max from text.max_length
    "tokens": (1, 1, None),  # decoder tokens per step: the whole prompt on the first step
    "past": (0, 16, None),  # decoder self-attention past: empty on the first step
    "question": (1, 16, 64),  # VQA question tokens
}  # "samples" (audio): from the manifest's audio section, min_samples / clip_samples
Range = tuple[int, int, int]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) shape of every graph input."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict[str, list[list[int]]]:
        return {name: [list(s) for s in shapes] for name, shapes in sorted(self.shapes.items())}


def parse_axis_overrides(items: list[str] | tuple[str, ...] | None) -> dict[str, Range]:
    """``["batch=1:8:64", "seq=1:32:128"]`` → ``{"batch": (1, 8, 64), …}``.

    Raises:
        InputError: A malformed item, or min ≤ opt ≤ max does not hold.
    """
    out: dict[str, Range] = {}
    for item in items or ():
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(\d+):(\d+):(\d+)", item.strip())
        if not m:
            raise InputError(f"axis range {item!r} is not NAME=MIN:OPT:MAX (e.g. batch=1:8:32).")
        lo, opt, hi = (int(g) for g in m.groups()[1:])
        if not lo <= opt <= hi or hi < 1:
            raise InputError(f"axis range {item!r} must have MIN ≤ OPT ≤ MAX and MAX ≥ 1.")
        out[m.group(1)] = (lo, opt, hi)
    return out


def axis_ranges(manifest: Manifest, overrides: Mapping[str, Range] | None = None) -> dict[str, Range]:
    """Every dynamic axis the bundle's graphs use → (min, opt, max), from the defaults, the manifest and overrides.

    Raises:
        InputError: An axis with no default and no override, or an override of an axis no graph has.
    """
    overrides = dict(overrides or {})
    used = {d for g in manifest.graphs.values() for t in g.inputs for d in t.shape if isinstance(d, str)}
    unknown = sorted(set(overrides) - used)
    if unknown:
        raise InputError(f"axis overrides {unknown} name no dynamic axis of this bundle (it has {sorted(used)}).")
    limits = {"seq": manifest.text.max_length if manifest.text else None,
              "tokens": manifest.generation.max_positions if manifest.generation else None,
              "past": manifest.generation.max_positions - 1 if manifest.generation else None}
    ranges: dict[str, Range] = {}
    for axis in sorted(used):
        if axis in overrides:
            ranges[axis] = overrides[axis]
            continue
        if axis == "samples" and manifest.audio:
            a = manifest.audio
            ranges[axis] = (a.min_samples, a.clip_samples, a.clip_samples)
            continue
        lo, opt, hi = DEFAULT_AXES.get(axis, (None, None, None))
        hi = hi if hi is not None else limits.get(axis)
        if lo is None or opt is None or hi is None:
            raise InputError(f"dynamic axis {axis!r} has no default range; give one, e.g. {axis}=1:8:32.")
        ranges[axis] = (lo, min(opt, hi), hi)
    return ranges  # output-only axes (an embedding's "dim", the present's "length") follow from the inputs


def graph_profile(graph: GraphSpec, ranges: Mapping[str, Range]) -> Profile:
    """The profile of one graph: its inputs' fixed sizes, and each dynamic axis at its (min, opt, max).

    Raises:
        InputError: An input uses an axis ``ranges`` lacks.
    """
    shapes = {}
    for t in graph.inputs:
        dims: list[Range] = []
        for d in t.shape:
            if isinstance(d, int):
                dims.append((d, d, d))
            elif d in ranges:
                dims.append(ranges[d])
            else:
                raise InputError(f"input {t.name!r} uses dynamic axis {d!r}, which has no range; give one.")
        shapes[t.name] = tuple(tuple(dim[i] for dim in dims) for i in range(3))
    return Profile(shapes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine's validity depends on; its hash names the cached plan."""

    role: str  # the graph
    onnx_sha256: str  # the exact ONNX file (from the manifest's hashes)
    precision: str  # "fp32", "fp16", "int8" (explicit: from the graph's Q/DQ nodes)
    tensorrt: str  # TensorRT version ("10.13.0.35"), and which module ("tensorrt", "tensorrt_rtx")
    gpu: str  # device name
    compute_capability: str  # "8.7"
    profile: dict[str, list[list[int]]]  # Profile.to_dict()
    flags: list[str] = field(default_factory=list)  # builder flags that change the engine (sorted)

    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def file_stem(self) -> str:
        return f"{self.role}.{self.precision}.{self.digest()[:16]}"

    def differences(self, other: EngineKey) -> list[str]:
        """What differs from ``other``, field by field, in words (empty: the same engine)."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: engine has {theirs[k]!r}, now {mine[k]!r}" for k in mine if mine[k] != theirs[k]]


def sidecar(key: EngineKey, *, build_seconds: float, verification: dict[str, Any],
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON written beside a plan: its key, how it was built, and how it was verified."""
    return {"sidecar_version": SIDECAR_VERSION, "key": asdict(key), "digest": key.digest(),
            "build_seconds": round(float(build_seconds), 2), "verification": verification, **(extra or {})}


def read_sidecar(path: str | Path) -> tuple[EngineKey, dict[str, Any]]:
    """An engine's sidecar, strictly parsed and size-bounded (it is a file, so untrusted).

    Raises:
        BackendError: Missing, too large, malformed, of a newer version, or its digest does not match its key.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_SIDECAR_BYTES + 1)
    except OSError as e:
        raise BackendError(f"engine sidecar '{path}' cannot be read ({e.strerror or e}); rebuild the engine "
                           "(edgemm engine build).") from None
    if len(data) > _MAX_SIDECAR_BYTES:
        raise BackendError(f"engine sidecar '{path}' is larger than {_MAX_SIDECAR_BYTES} bytes; it is not edgemm's.")
    obj = parse_json(data, str(path), BackendError)
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), dict):
        raise BackendError(f"engine sidecar '{path}' has no key; rebuild the engine.")
    version = obj.get("sidecar_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SIDECAR_VERSION:
        raise BackendError(f"engine sidecar '{path}' is version {version!r}; this edgemm reads up to "
                           f"{SIDECAR_VERSION}. Rebuild the engine or upgrade edgemm.")
    try:
        key = EngineKey(**obj["key"])
    except TypeError as e:
        raise BackendError(f"engine sidecar '{path}' has a malformed key ({e}); rebuild the engine.") from None
    if obj.get("digest") != key.digest():
        raise BackendError(f"engine sidecar '{path}': its digest does not match its key (edited by hand?); "
                           "rebuild the engine.")
    return key, obj


def check_engine(plan: str | Path, expected: EngineKey) -> list[str]:
    """Why the cached plan cannot be used for ``expected`` (empty: it can).

    A missing plan, a missing or unreadable sidecar, or any key difference is a reason.
    """
    plan = Path(plan)
    if not plan.is_file():
        return [f"no engine at {plan}"]
    try:
        key, _ = read_sidecar(plan.with_suffix(".json"))
    except BackendError as e:
        return [str(e)]
    return expected.differences(key)


def engine_dir(bundle_dir: str | Path, home: str | Path) -> Path:
    """Where a bundle's engines live: ``<bundle>/engines`` when the bundle is writable, else under ``home``."""
    beside = Path(bundle_dir).resolve() / "engines"
    try:
        beside.mkdir(exist_ok=True)
        probe = beside / ".write-test"
        probe.touch()
        probe.unlink()
        return beside
    except OSError:
        return home_engine_dir(bundle_dir, home)


def home_engine_dir(bundle_dir: str | Path, home: str | Path) -> Path:
    """The engine directory of a read-only bundle: under ``home``, named by the bundle's real path."""
    bundle_dir = Path(bundle_dir).resolve()
    tag = hashlib.sha256(str(bundle_dir).encode()).hexdigest()[:12]
    return Path(home) / "engines" / f"{bundle_dir.name}-{tag}"


PRECISIONS = ("fp32", "fp16", "int8")
BUILDER_VERSION = 1  # how edgemm configures the builder; a change rebuilds every cached engine


@dataclass(frozen=True)
class EngineOptions:
    """How TensorRT engines are built for a bundle (native backend, and ONNX Runtime's TensorRT provider)."""

    precision: str | None = None  # None: the bundle's own types (strongly typed); "fp16" on an fp32 bundle: the
    #                               builder may run layers in fp16 (TensorRT ≤ 10 only; TensorRT 11 and for RTX
    #                               build strongly typed: quantize the bundle to fp16 instead)
    axes: Mapping[str, Range] = field(default_factory=dict)  # (min, opt, max) per dynamic axis, over the defaults
    rebuild: bool = True  # build missing or stale engines; False refuses them, naming every difference
    directory: str | None = None  # the engine cache; None: <bundle>/engines, or under EDGEMM_HOME if read-only
    workspace_mib: int | None = None  # builder workspace; None: half the free device memory, at most 4 GiB
    images: str | None = None  # a folder of your own images to verify on (default: the sample photos)
    device: int = 0  # CUDA device index
    quiet: bool = False  # no progress lines on stderr while building

    def __post_init__(self):
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"engine precision must be one of {', '.join(PRECISIONS)} (or None: the bundle's), "
                             f"got {self.precision!r}.")
        if self.workspace_mib is not None and (isinstance(self.workspace_mib, bool)
                                               or not isinstance(self.workspace_mib, int) or self.workspace_mib < 16):
            raise InputError(f"workspace_mib must be an integer of at least 16 MiB, got {self.workspace_mib!r}.")
        if isinstance(self.device, bool) or not isinstance(self.device, int) or self.device < 0:
            raise InputError(f"device must be a CUDA device index (0, 1, …), got {self.device!r}.")
        for name, rng in self.axes.items():
            if (not isinstance(rng, tuple) or len(rng) != 3 or not all(isinstance(v, int) for v in rng)
                    or not rng[0] <= rng[1] <= rng[2] or rng[2] < 1):
                raise InputError(f"axis range {name}={rng!r} must be (min, opt, max) with min ≤ opt ≤ max, max ≥ 1.")

    def resolve(self, bundle_precision: str) -> tuple[str, list[str]]:
        """The engine's precision and the builder flags that make it (part of its key).

        Raises:
            InputError: A precision this bundle cannot give (int8 of a float bundle, fp32 of an fp16 one).
        """
        precision = self.precision or bundle_precision
        if precision == bundle_precision:  # the graph's own types: fp32, fp16 weights, or int8 Q/DQ nodes
            flags = ["strongly-typed", *(["no-tf32"] if precision == "fp32" else [])]
        elif precision == "fp16" and bundle_precision == "fp32":
            flags = ["fp16"]
        elif precision == "int8":
            raise InputError(f"int8 engines are built from an int8 bundle's Q/DQ nodes (explicit quantization, no "
                             f"calibrator), and this bundle is {bundle_precision}. Quantize it first (edgemm quantize "
                             "BUNDLE --precision int8 --activations int8 -o BUNDLE-int8), or build fp16.")
        else:
            raise InputError(f"this bundle is {bundle_precision}; its engines are {bundle_precision} (built from the "
                             f"graph's own types), not {precision}. Build the fp32 bundle's engines for fp32.")
        return precision, [f"edgemm-builder-{BUILDER_VERSION}", *flags]


@dataclass(frozen=True)
class Target:
    """The TensorRT and the GPU an engine is built for."""

    tensorrt: str  # module and version, e.g. "tensorrt 10.13.0.35" or "tensorrt_rtx 1.2.0.54"
    gpu: str  # device name, e.g. "Orin (nvgpu)"
    compute_capability: str  # e.g. "8.7"


@dataclass(frozen=True)
class PlannedEngine:
    """One graph's engine: its key, where its plan lives, and why the cached one cannot be used (empty: it can)."""

    role: str
    key: EngineKey
    plan: Path
    reasons: list[str]


def plan_engines(manifest: Manifest, target: Target, options: EngineOptions, directory: str | Path,
                 roles: list[str] | None = None) -> list[PlannedEngine]:
    """The engine each graph needs on ``target``, and whether the cache already holds it.

    Raises:
        InputError: A bad axis override, or a precision the bundle cannot give (:meth:`EngineOptions.resolve`).
    """
    precision, flags = options.resolve(manifest.precision)
    if precision == "int8":
        check_int8_for_tensorrt(manifest)
    ranges = axis_ranges(manifest, options.axes)
    planned = []
    for role in roles or list(manifest.graphs):
        graph = manifest.graphs[role]
        key = EngineKey(role=role, onnx_sha256=manifest.files.get(graph.file, ""), precision=precision,
                        tensorrt=target.tensorrt, gpu=target.gpu, compute_capability=target.compute_capability,
                        profile=graph_profile(graph, ranges).to_dict(), flags=flags)
        plan = Path(directory) / f"{key.file_stem()}.plan"
        planned.append(PlannedEngine(role, key, plan, check_engine(plan, key)))
    return planned


def check_int8_for_tensorrt(manifest: Manifest) -> None:
    """Refuse int8 bundles TensorRT cannot build: dynamic quantization, or uint8 (asymmetric) activations.

    Raises:
        InputError: Naming how to quantize for TensorRT instead.
    """
    quant = manifest.verification.get("quantization") or {}
    mode, activations = quant.get("mode"), (quant.get("options") or {}).get("activations")
    advice = "re-quantize it for TensorRT: edgemm quantize FP32_BUNDLE --precision int8 --activations int8 -o OUT"
    if mode == "dynamic":
        raise InputError(f"this int8 bundle is dynamically quantized (DynamicQuantizeLinear, MatMulInteger: ONNX "
                         f"Runtime's CPU form), which TensorRT has no kernels for; {advice}.")
    if activations == "uint8":
        raise InputError(f"this int8 bundle quantizes activations as uint8 (asymmetric, for x86 CPUs); TensorRT "
                         f"takes symmetric int8 Q/DQ only; {advice}.")


def refusal(planned: list[PlannedEngine]) -> str:
    """Why engines cannot be used with rebuilding off, graph by graph."""
    lines = [f"  {p.role}: " + "; ".join(p.reasons) for p in planned if p.reasons]
    return ("TensorRT engines are missing or stale, and rebuilding is off (rebuild=False / --no-rebuild):\n"
            + "\n".join(lines) + "\nBuild them on this device: edgemm engine build BUNDLE.")


def shape_string(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """ONNX Runtime's TensorRT profile syntax: ``"pixels:1x3x224x224,input_ids:1x16"``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in sorted(shapes.items()))


def tensorrt_provider_options(profile: Profile, cache_dir: str | Path, options: EngineOptions,
                              bundle_precision: str) -> dict[str, str]:
    """Options for ONNX Runtime's TensorRT execution provider, so that it does not rebuild at every start.

    Engines and the timing cache persist under ``cache_dir``; the profile is
    explicit (the manifest's axes), so ONNX Runtime builds one engine that covers
    every batch in range instead of a new one whenever a larger shape arrives.
    With fp16 and int8 off, ONNX Runtime builds strongly typed: an fp16 bundle runs
    in fp16 and an int8 bundle by its Q/DQ scales. ``precision="fp16"`` on an fp32
    bundle turns the provider's fp16 flag on.

    Raises:
        InputError: A precision the bundle cannot give.
    """
    _, flags = options.resolve(bundle_precision)
    cache = str(Path(cache_dir))
    out = {
        "device_id": str(options.device),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_fp16_enable": "True" if "fp16" in flags else "False",
        "trt_int8_enable": "False",  # int8 comes from the Q/DQ nodes of a strongly typed build, not a calibrator
        "trt_profile_min_shapes": shape_string({n: s[0] for n, s in profile.shapes.items()}),
        "trt_profile_opt_shapes": shape_string({n: s[1] for n, s in profile.shapes.items()}),
        "trt_profile_max_shapes": shape_string({n: s[2] for n, s in profile.shapes.items()}),
    }
    if options.workspace_mib is not None:
        out["trt_max_workspace_size"] = str(options.workspace_mib << 20)
    return out


@dataclass(frozen=True)
class EngineGate:
    """What an engine must reproduce of ONNX Runtime's outputs on the verification inputs to be kept."""

    max_rel_diff: float | None = None  # max abs diff / max(1, max |reference|), per output (fp32)
    min_cosine: float | None = None  # worst per-row cosine of every float output (fp16, int8)
    min_agreement: float | None = None  # top-1 agreement of score outputs: class probabilities, logits (fp16, int8)


# fp32 is TF32-off TensorRT against ONNX Runtime's fp32: only summation order differs.
ENGINE_GATES = {
    "fp32": EngineGate(max_rel_diff=1e-3),
    "fp16": EngineGate(min_cosine=0.995, min_agreement=0.95),
    "int8": EngineGate(min_cosine=0.98, min_agreement=0.90),
}


class OutputComparison:
    """Running figures of one graph's engine outputs against the reference's, over every verification call."""

    def __init__(self, scores: set[str]):
        self.scores = scores  # outputs whose argmax is an answer (class probabilities, next-token logits)
        self.figures: dict[str, dict[str, float]] = {}
        self.calls = 0

    def add(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        self.calls += 1
        for name, ref in reference.items():
            got = candidate[name]
            if got.shape != ref.shape:
                raise BackendError(f"engine output '{name}' has shape {got.shape}, ONNX Runtime's {ref.shape}.")
            f = self.figures.setdefault(name, {"max_abs_diff": 0.0, "scale": 0.0, "cosine_min": 1.0,
                                               "matches": 0, "rows": 0})
            if ref.size == 0 or ref.dtype.kind not in "fc":
                f["max_abs_diff"] = max(f["max_abs_diff"], float(np.abs(ref.astype(np.int64) - got).max(initial=0)))
                continue
            r, g = ref.astype(np.float64), got.astype(np.float64)
            if not np.isfinite(g).all():
                f["max_abs_diff"] = math.inf
                f["cosine_min"] = -1.0
                continue
            f["max_abs_diff"] = max(f["max_abs_diff"], float(np.abs(r - g).max()))
            f["scale"] = max(f["scale"], float(np.abs(r).max()))
            rows_r, rows_g = r.reshape(len(r), -1), g.reshape(len(g), -1)
            norms = np.linalg.norm(rows_r, axis=1) * np.linalg.norm(rows_g, axis=1)
            both_zero = (np.linalg.norm(rows_r, axis=1) == 0) & (np.linalg.norm(rows_g, axis=1) == 0)
            cos = np.where(both_zero, 1.0, (rows_r * rows_g).sum(axis=1) / np.maximum(norms, 1e-30))
            f["cosine_min"] = min(f["cosine_min"], float(cos.min()))
            if name in self.scores:
                f["matches"] += int((rows_r.argmax(axis=1) == rows_g.argmax(axis=1)).sum())
                f["rows"] += len(rows_r)

    def report(self, gate: EngineGate) -> dict[str, Any]:
        """Figures per output, and whether the gate passed (with the reasons it did not)."""
        outputs, failures = {}, []
        for name, f in self.figures.items():
            rel = f["max_abs_diff"] / max(1.0, f["scale"])
            entry: dict[str, Any] = {"max_abs_diff": f["max_abs_diff"], "relative_diff": rel,
                                     "cosine_min": f["cosine_min"]}
            if f["rows"]:
                entry["top1_agreement"] = f["matches"] / f["rows"]
                entry["rows"] = int(f["rows"])
            outputs[name] = entry
            if gate.max_rel_diff is not None and not rel <= gate.max_rel_diff:
                failures.append(f"{name}: relative max abs diff {rel:.3g} > {gate.max_rel_diff}")
            if gate.min_cosine is not None and not f["cosine_min"] >= gate.min_cosine:
                failures.append(f"{name}: worst cosine {f['cosine_min']:.5f} < {gate.min_cosine}")
            if gate.min_agreement is not None and f["rows"] and not entry["top1_agreement"] >= gate.min_agreement:
                failures.append(f"{name}: top-1 agreement {entry['top1_agreement']:.1%} < {gate.min_agreement:.0%}")
        return {"reference": "onnxruntime cpu", "calls": self.calls, "gate": asdict(gate), "outputs": outputs,
                "passed": not failures, "failures": failures}
