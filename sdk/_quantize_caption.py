"""``edgemm quantize`` for captioners: int8 or fp16 graphs, kept only if the captions stay the teacher's.

int8 is dynamic (weights int8 ahead of time, activations scaled per call) on
every MatMul of each graph (a tied LM head, a Gemm, stays float: its weight is the
token embedding, stored once): the decoder step is a stack of MatMuls on a
few positions per call, where dynamic int8 is what ONNX Runtime's CPU kernels
are fast at, and the image graph runs once per image. Convolutions (a ViT's
patch embedding) stay float. fp16 converts weights and compute with float32
inputs and outputs; the graphs' masks are float32 constants of -1e4-scale or
comparisons, which fp16 holds, and the gate would catch a mask that overflowed.

The gate (:mod:`edgemm._caption_gate`) captions held-out images with both the
fp32 teacher and the candidate, with the bundle's own decoding settings. When an
int8 candidate fails it, the graphs are put back to float one at a time (the
decoder first: it runs at every token) and the first combination that passes is
kept; when none does, nothing is written unless the degradation is accepted.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgemm._caption import Captioner
from edgemm._caption_gate import CaptionGateThresholds, caption_gate_images, caption_gate_summary, compare_captions
from edgemm._quantize import fp32_source
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import InputError
from edgemm.runtime.manifest import CAPTION_DECODER


class CaptionGateError(InputError):
    """The compressed captioner changes its captions beyond the gate; nothing was written."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def _recovery_order(roles: Sequence[str]) -> list[list[str]]:
    """The sets of graphs to keep int8 after a failed gate: all but the decoder, then all but each other one."""
    order = sorted(roles, key=lambda r: r != CAPTION_DECODER)  # the decoder first
    return [[r for r in roles if r != back] for back in order if len(roles) > 1]


def quantize_captioner(source: str | Path, out_dir: str | Path, *, precision: str, graphs: Sequence[str] | None = None,
                       thresholds: CaptionGateThresholds = CaptionGateThresholds(), recover: bool = True,
                       accept_degradation: bool = False, overwrite: bool = False, threads: int | None = None,
                       text_model: Any = None, images: Sequence[Any] | None = None,
                       progress: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Convert an fp32 captioner bundle to int8 or fp16 and gate it on its captions.

    Args:
        source: The fp32 captioner bundle.
        out_dir: Bundle directory to create.
        precision: ``"int8"`` (dynamic MatMul/Gemm) or ``"fp16"``.
        graphs: Roles to convert (default: all).
        thresholds: The caption gate.
        recover: On a failed int8 gate, put graphs back to float until it passes.
        accept_degradation: Write the bundle even when the gate fails (the manifest says so).
        overwrite: Replace an existing bundle.
        threads: ONNX Runtime threads while captioning.
        text_model: A dual encoder to measure caption similarity with (None: not measured).
        images: Held-out images for the gate (default: the accuracy gate's).
        progress: Called with a short description before each step.

    Returns:
        (the written manifest, the report).

    Raises:
        InputError: Unknown precision or graphs.
        BundleError: The source is not an fp32 captioner bundle.
        CaptionGateError: The captions changed beyond the gate and the degradation was not accepted.
    """
    from edgemm.export import quantize as q
    from edgemm.export.bundle_writer import BundleWriter

    step = progress or (lambda _msg: None)
    if precision not in q.PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose from {list(q.PRECISIONS)}.")
    src, roles = fp32_source(source, "captioner", graphs)
    manifest = src.manifest
    started = time.perf_counter()
    teacher = Captioner(src, threads=threads)
    if images is None:
        images, described = caption_gate_images()
    else:
        images, described = list(images), f"{len(images)} images given"
    prompt_length = len(manifest.generation.start_ids)

    def captions(model: Captioner) -> list:
        if model.answers_questions:
            return model.answer(list(images), "what is in the picture?", color="rgb")
        return model.caption(list(images), color="rgb")

    step(f"captioning {len(images)} held-out images with the fp32 teacher")
    reference = captions(teacher)
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        work = w.path(".work")
        work.mkdir()
        converted: dict[str, Path] = {}
        for role in roles:
            step(f"converting {role} to {precision}")
            graph = src.graph_path(role)
            if precision == "fp16":
                converted[role] = q.to_fp16(graph, work / f"{role}.fp16.onnx")
            else:
                prepared = q.prepare(graph, work / f"{role}.prepared.onnx")
                # MatMuls only: the tied LM head is a Gemm over the token embedding; quantizing it would store
                # that 20M-parameter table twice (int8 for the head, float for the lookup).
                converted[role] = q.quantize_dynamic(prepared, work / f"{role}.int8.onnx", op_types=("MatMul",))
        fields = {k: v for k, v in manifest.to_dict().items() if k not in ("schema_version", "files", "tools", "created")}
        fields["precision"] = precision
        fields["source"] = {**manifest.source, "quantized_from": {"path": str(src.path), "name": manifest.name,
                                                                  "created": manifest.created}}

        graph_files = {g.file for g in manifest.graphs.values()}
        for rel in manifest.files:
            if rel not in graph_files:
                w.path(rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.file(rel), w.path(rel))

        def stage(kept: Sequence[str]) -> Path:
            for role in manifest.graphs:
                shutil.copyfile(converted[role] if role in kept else src.graph_path(role),
                                w.path(manifest.graphs[role].file))
            return w.stage(**fields)

        def gate(kept: Sequence[str]) -> dict[str, Any]:
            candidate = Captioner(Bundle(stage(kept), check_hashes=False), threads=threads)
            return compare_captions(reference, captions(candidate), prompt_length=prompt_length,
                                    text_model=text_model, thresholds=thresholds, images=described)

        step(f"captioning them with the {precision} candidate")
        report = first = gate(roles)
        attempts = [{"converted": list(roles), "passed": report["passed"], "failures": report["failures"]}]
        kept = list(roles)
        if not report["passed"] and recover and precision == "int8":
            for subset in _recovery_order(roles):
                step(f"the gate failed; trying with only {', '.join(subset)} in int8")
                report = gate(subset)
                attempts.append({"converted": subset, "passed": report["passed"], "failures": report["failures"]})
                if report["passed"]:
                    kept = subset
                    break
        if not report["passed"]:
            kept, report = list(roles), first  # what is written when the degradation is accepted: every graph
            info = {"precision": precision, "attempts": attempts, "gate": report}
            if not accept_degradation:
                raise CaptionGateError(
                    f"the {precision} captioner changes its captions beyond the gate: {'; '.join(report['failures'])}. "
                    f"Nothing was written. Convert fewer graphs (--graphs), or pass --accept-degradation to write it "
                    f"anyway.\n{caption_gate_summary(report)}", info)
            if len(attempts) > 1:
                stage(kept)  # the last attempt staged a subset
        sizes = {role: (src.graph_path(role).stat().st_size, w.path(manifest.graphs[role].file).stat().st_size)
                 for role in manifest.graphs}
        info = {
            "precision": precision, "mode": "dynamic" if precision == "int8" else "fp16",
            "graphs": {role: precision if role in kept else "fp32" for role in manifest.graphs},
            "attempts": attempts, "gate": report, "accepted_degradation": not report["passed"],
            "size_bytes": {role: {"fp32": a, precision: b} for role, (a, b) in sizes.items()},
            "seconds": round(time.perf_counter() - started, 1),
        }
        if precision == "fp16":
            info["note"] = ("fp16 is for GPU targets: ONNX Runtime's CPU provider has few fp16 kernels and "
                            "inserts casts, so on a CPU this bundle usually runs slower than fp32.")
        shutil.rmtree(work)
        fields["verification"] = {**manifest.verification, "quantization": info}
        step("writing bundle")
        written = w.commit(**fields)
    return written, info
