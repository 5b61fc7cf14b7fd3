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
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    bundle_dir = Path(bundle_dir).resolve()
    beside = bundle_dir / "engines"
    try:
        beside.mkdir(exist_ok=True)
        probe = beside / ".write-test"
        probe.touch()
        probe.unlink()
        return beside
    except OSError:
        tag = hashlib.sha256(str(bundle_dir).encode()).hexdigest()[:12]
        return Path(home) / "engines" / f"{bundle_dir.name}-{tag}"
