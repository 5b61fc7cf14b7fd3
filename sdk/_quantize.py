"""``edgemm quantize``: an fp32 bundle → an fp16 or int8 bundle that passed the accuracy gate.

The steps: calibrate (int8), convert every graph, measure the result against
the source on held-out inputs (see ``_gate``), and when the gate fails try to
recover: rank the quantized nodes by how much each costs alone and keep the
worst in float, doubling the count, until the gate passes or nothing is left
to keep. A bundle that still fails is not written unless the user accepts the
degradation. Everything happens in a staging directory; the bundle appears
only at the end.

This is workstation code: it needs the ``export`` extra (onnx, the quantizer).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgemm._gate import GateThresholds, agreement, compare, failing_towers, label_scores, measure, summary
from edgemm._model import DualEncoder
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BundleError, InputError, VerificationError

CALIBRATION_BATCH = 16


class QuantizationGateError(VerificationError):
    """The converted bundle missed the accuracy gate; nothing was written."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def _image_feeds(model: DualEncoder, images: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    return [{"pixels": model.preprocess(images[i : i + CALIBRATION_BATCH], color="rgb", first_index=i)}
            for i in range(0, len(images), CALIBRATION_BATCH)]


def _text_feeds(model: DualEncoder, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
    # one tokenizer call, so every batch has the same length (histogram calibrators need that)
    feeds = model.text_feeds(list(texts))
    return [{k: v[i : i + CALIBRATION_BATCH] for k, v in feeds.items()} for i in range(0, len(texts), CALIBRATION_BATCH)]


def _hybrid(staged: Path, reference: DualEncoder, converted: str, threads: int | None) -> DualEncoder:
    """The staged bundle with only the ``converted`` tower ("image"/"text") taken from it, the other from the source."""
    model = DualEncoder(Bundle(staged, check_hashes=False), threads=threads)
    if converted == "image":
        model.text_backend = reference.text_backend
    else:
        model.image_backend = reference.image_backend
    return model


def fp32_source(source: str | Path, family: str, graphs: Sequence[str] | None) -> tuple[Bundle, list[str]]:
    """The fp32 bundle to convert, checked (family, precision, graphs intact), and the roles to convert.

    Raises:
        BundleError: Not an fp32 bundle of ``family``, or a corrupted graph.
        InputError: Graphs the bundle does not have.
    """
    from edgemm.export import quantize as q

    src = Bundle(source)
    manifest = src.manifest
    if manifest.family != family:
        raise BundleError(f"'{src.path}' is a {manifest.family!r} bundle; this quantizes {family} bundles.")
    if manifest.precision != "fp32":
        raise BundleError(f"'{src.path}' is already {manifest.precision}; quantize from the fp32 bundle it came from.")
    for role in manifest.graphs:
        q.check_graph(src.graph_path(role))
    roles = list(manifest.graphs) if graphs is None else list(graphs)
    unknown = sorted(set(roles) - set(manifest.graphs))
    if unknown or not roles:
        raise InputError(f"graphs {unknown or roles} are not in '{src.path}'; it has {sorted(manifest.graphs)}.")
    return src, roles


def quantize_bundle(
    source: str | Path,
    out_dir: str | Path,
    *,
    precision: str,
    dynamic: bool = False,
    graphs: Sequence[str] | None = None,
    calibration_images: Any = None,
    calibration_texts: Any = None,
    options: Any = None,
    thresholds: GateThresholds = GateThresholds(),
    recover: bool = True,
    accept_degradation: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Convert an fp32 dual-encoder bundle to ``precision`` and gate it.

    Args:
        source: The fp32 bundle.
        out_dir: Bundle directory to create.
        precision: ``"fp16"`` or ``"int8"``.
        dynamic: int8 only: dynamic quantization (activations scaled per batch at
            run time, MatMul/Gemm only; no calibration).
        graphs: Roles to convert (default: all); the others stay fp32, e.g. when
            int8 does not pay off for one tower on the target.
        calibration_images: A folder of images, or any iterable of images (RGB
            arrays, PIL images, paths); default: packaged images.
        calibration_texts: A text file (one text per line), or any iterable of
            strings; default: packaged texts. Every fifth item is held out for the gate.
        options: ``edgemm.export.quantize.Int8Options``.
        thresholds: The gate.
        recover: On a failed int8 gate, keep the most sensitive nodes in float until it passes.
        accept_degradation: Write the bundle even when the gate fails (the manifest says so).
        overwrite: Replace an existing bundle.
        threads: ONNX Runtime threads for measuring.
        progress: Called with a short description before each step.

    Returns:
        (the written manifest, the quantization report).

    Raises:
        InputError: Unknown precision, bad calibration data or options.
        BundleError: The source is not an fp32 dual-encoder bundle.
        ExportError: A graph is corrupted or conversion failed.
        QuantizationGateError: The gate failed and the degradation was not accepted.
    """
    from edgemm.export import quantize as q
    from edgemm.export.bundle_writer import BundleWriter
    from edgemm.export.calibration import calibration_data, gate_data

    step = progress or (lambda _msg: None)
    if precision not in q.PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {list(q.PRECISIONS)}.")
    if dynamic and precision != "int8":
        raise InputError("dynamic quantization is an int8 mode; drop --dynamic or use --precision int8.")
    options = (options or q.Int8Options()).resolved()
    src, roles = fp32_source(source, "dual_encoder", graphs)
    manifest = src.manifest
    started = time.perf_counter()
    reference = DualEncoder(src, threads=threads)
    calib, held = calibration_data(calibration_images, calibration_texts)
    gate = gate_data(held)

    with BundleWriter(out_dir, overwrite=overwrite) as w:
        converted = {manifest.graphs[role].file for role in roles}
        for rel in manifest.files:
            if rel not in converted:
                w.path(rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.file(rel), w.path(rel))
        work = w.path(".work")
        work.mkdir()
        (w.path("calibration")).mkdir()
        made: dict[str, list[dict[str, np.ndarray]]] = {}  # preprocessed once, on first need

        def calibration_feeds(role: str) -> list[dict[str, np.ndarray]]:
            if role not in made:
                made[role] = (_image_feeds(reference, calib.images) if role == "image_encoder"
                              else _text_feeds(reference, calib.texts))
            return made[role]

        feeds = {role: (lambda r=role: calibration_feeds(r)) for role in ("image_encoder", "text_encoder")}
        prepared: dict[str, Path] = {}
        excluded: dict[str, list[str]] = {role: [] for role in roles}

        def convert(role: str, dst: Path, exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> Path:
            if precision == "fp16":
                return q.to_fp16(src.graph_path(role), dst)
            if dynamic:
                return q.quantize_dynamic(prepared[role], dst, options=options, exclude=exclude, only=only)
            return q.quantize_static(prepared[role], dst, feeds[role], cache=w.path(f"calibration/{role}.json"),
                                     options=options, exclude=exclude, only=only)

        for role in roles:
            if precision == "int8":
                step(f"preparing {role} for int8")
                prepared[role] = q.prepare(src.graph_path(role), work / f"{role}.prepared.onnx")
            step(f"converting {role} to {precision}{' (dynamic)' if dynamic else ''}")
            convert(role, w.path(manifest.graphs[role].file))

        fields = {k: v for k, v in manifest.to_dict().items() if k not in ("schema_version", "files", "tools", "created")}
        fields["precision"] = precision
        fields["source"] = {**manifest.source, "quantized_from": {"path": str(src.path), "name": manifest.name,
                                                                  "created": manifest.created}}

        def gate_report() -> dict[str, Any]:
            staged = w.stage(**fields)
            candidate = DualEncoder(Bundle(staged, check_hashes=False), threads=threads)
            report = compare(source_outputs, measure(candidate, gate), gate, thresholds)
            only_agreement = report["failures"] and all(f.startswith("top-1") for f in report["failures"])
            if only_agreement and len(roles) > 1:
                # measure each tower's conversion alone, to know which one to recover
                report["agreement_alone"] = {
                    tower: agreement(source_outputs.scores,
                                     label_scores(_hybrid(staged, reference, tower, threads), gate))
                    for tower in ("image", "text")}
            return report

        step("measuring the fp32 source on held-out inputs")
        source_outputs = measure(reference, gate)
        step("measuring the converted bundle against it")
        report = gate_report()
        attempts = [{"excluded": {role: 0 for role in roles}, "passed": report["passed"], "failures": report["failures"]}]
        sensitivity: dict[str, list[dict[str, Any]]] = {}
        if not report["passed"] and recover and precision == "int8":
            candidates = q.Int8Options(**{**asdict(options), "op_types": ("MatMul", "Gemm")}) if dynamic else options
            report = _recover(q, convert, prepared, feeds, excluded, sensitivity, attempts, report, gate_report, w,
                              manifest, step, candidates)
        info = {
            "precision": precision,
            "graphs": {role: precision if role in roles else "fp32" for role in manifest.graphs},
            "mode": "fp16" if precision == "fp16" else ("dynamic" if dynamic else "static"),
            "options": asdict(options) if precision == "int8" else {},
            "calibration": {} if precision == "fp16" or dynamic else dict(calib.describe),
            "kept_in_float": excluded,
            "sensitivity": {role: ranked[:10] for role, ranked in sensitivity.items()},
            "attempts": attempts,
            "gate": report,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if precision == "int8" and sensitivity:
            whole = [role for role in roles if role in sensitivity and len(excluded[role]) >= len(sensitivity[role])]
            if whole:
                info["note"] = (f"every quantizable node of {', '.join(whole)} had to stay float to pass the gate, so "
                                "that graph is effectively fp32; convert only the others with --graphs.")
        if precision == "fp16":
            info["note"] = ("fp16 is for GPU targets: ONNX Runtime's CPU provider has few fp16 kernels and "
                            "inserts casts, so on a CPU this bundle usually runs slower than fp32.")
        if not report["passed"]:
            if not accept_degradation:
                raise QuantizationGateError(
                    f"the {precision} bundle misses the accuracy gate: {'; '.join(report['failures'])}. Nothing was "
                    f"written. Try other calibration data or --calibrate-method, keep more in float, or pass "
                    f"--accept-degradation to write it anyway.\n{summary(report)}", info)
            info["accepted_degradation"] = True
        shutil.rmtree(work)
        for cache in w.path("calibration").glob("*.json"):
            cache.chmod(0o644)  # ONNX Runtime writes it owner-only; a bundle is shipped
        if not any(w.path("calibration").iterdir()):
            w.path("calibration").rmdir()
        fields["verification"] = {**manifest.verification, "quantization": info}
        step("writing bundle")
        written = w.commit(**fields)
    return written, info


def _recover(q, convert, prepared, feeds, excluded, sensitivity, attempts, report, gate_report, w, manifest, step,
             candidates):
    """Keep the costliest nodes of the failing tower(s) in float until the gate passes.

    The count kept doubles (1, 2, 4, …) per failing tower; once the gate passes,
    a bisection between the last failing and the passing count finds the fewest
    nodes that still pass, so no more of the graph than needed leaves int8.
    """
    counts = {role: 0 for role in excluded}
    sizes = {role: len(q.quantizable_nodes(prepared[role], candidates)) for role in excluded}

    def keep(role: str, count: int) -> None:
        counts[role] = count
        excluded[role] = [r["node"] for r in sensitivity[role][:count]]
        step(f"keeping {count} {role} node(s) in float")
        convert(role, w.path(manifest.graphs[role].file), exclude=excluded[role])

    def attempt() -> dict[str, Any]:
        result = gate_report()
        attempts.append({"excluded": {r: len(v) for r, v in excluded.items()}, "passed": result["passed"],
                         "failures": result["failures"]})
        return result

    previous: dict[str, int] = {}
    while not report["passed"]:
        towers = [f"{t}_encoder" for t in failing_towers(report)]
        towers = [r for r in towers if r in counts and counts[r] < sizes[r]] or \
                 [r for r in counts if counts[r] < sizes[r]]
        if not towers:
            return report
        previous = {}
        for role in towers:
            if role not in sensitivity:
                step(f"gate failed; ranking {role} nodes by sensitivity")
                sensitivity[role] = q.rank_sensitivity(
                    prepared[role], q.quantizable_nodes(prepared[role], candidates), feeds[role]()[:2],
                    lambda dst, only, r=role: convert(r, dst, only=only))
            previous[role] = counts[role]
            keep(role, min(sizes[role], max(1, 2 * counts[role])))
        report = attempt()
    for role, low in previous.items():  # bisect (low fails, counts[role] passes)
        best, best_report = counts[role], report
        while best - low > 1:
            mid = (low + best) // 2
            keep(role, mid)
            trial = attempt()
            if trial["passed"]:
                best, best_report = mid, trial
            else:
                low = mid
        if counts[role] != best:
            keep(role, best)
        report = best_report
    return report
