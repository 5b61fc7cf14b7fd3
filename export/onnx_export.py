"""ONNX export of one module by its spec, and verification against PyTorch."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgemm.export.specs import ExportSpec
from edgemm.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgemm.runtime.errors import ExportError, VerificationError

OPSET = 17


def export_onnx(module: torch.nn.Module, spec: ExportSpec, path: str | Path) -> Path:
    """Export ``module`` to ``path`` with the spec's names and dynamic axes.

    The TorchScript exporter (``dynamo=False``) is used on purpose: in torch
    2.13 the dynamo exporter emits a duplicate output name for the text tower's
    graph, which ONNX Runtime rejects.
    """
    path = Path(path)
    module = module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                spec.dummy_inputs(),
                str(path),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes(),
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as e:
        raise ExportError(f"exporting '{spec.role}' to ONNX failed: {type(e).__name__}: {e}") from e
    _trim_empty_pad_inputs(path)
    return path


def _trim_empty_pad_inputs(path: Path) -> None:
    """Drop the empty optional inputs the TorchScript exporter gives Pad nodes.

    ONNX Runtime folds a Pad into the following Conv only when every Pad input
    is a constant; an empty ``""`` input counts as non-constant, so the 17 SAME
    pads of EfficientNet-Lite stayed separate ops (24% of the graph's time).
    Outputs are unchanged; verification runs on the trimmed file.
    """
    import onnx

    model = onnx.load(str(path))
    changed = False
    for node in model.graph.node:
        if node.op_type == "Pad":
            while node.input and node.input[-1] == "":
                node.input.pop()
                changed = True
    if changed:
        onnx.save(model, str(path))


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(num / np.maximum(den, 1e-12)))


def verify_onnx(
    module: torch.nn.Module,
    spec: ExportSpec,
    path: str | Path,
    batches: Sequence[dict[str, np.ndarray]],
    *,
    description: str,
    atol: float | None = None,
) -> dict[str, Any]:
    """Run the exported graph and the module on the same real inputs and compare.

    Args:
        module: The PyTorch reference.
        spec: The graph's spec.
        path: The exported ONNX file.
        batches: Input feeds (name → array), several batch sizes/lengths so the
            dynamic axes are exercised.
        description: What the inputs are, for the report.
        atol: Override of the spec's tolerance.

    Returns:
        Figures for the manifest: max abs diff per output, worst cosine, tolerance.

    Raises:
        VerificationError: An output differs by more than the tolerance.
    """
    atol = spec.atol if atol is None else atol
    backend = OnnxRuntimeBackend(path, providers=("cpu",))
    worst = {t.name: 0.0 for t in spec.outputs}
    cos = 1.0
    count = 0
    for feeds in batches:
        got = backend.infer(feeds)
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        for t, r in zip(spec.outputs, ref):
            r = r.numpy()
            worst[t.name] = max(worst[t.name], float(np.max(np.abs(got[t.name] - r))))
            cos = min(cos, _cosine_min(got[t.name], r))
        count += len(next(iter(feeds.values())))
    report = {
        "precision": "fp32",
        "metric": "max_abs_diff",
        "max_abs_diff": worst,
        "min_cosine": cos,
        "tolerance": atol,
        "inputs": f"{count} input rows of {description}",
        "passed": all(v <= atol for v in worst.values()),
    }
    if not report["passed"]:
        bad = {k: v for k, v in worst.items() if v > atol}
        raise VerificationError(
            f"'{spec.role}' ONNX output drifts from PyTorch: max abs diff {bad} > tolerance {atol} "
            f"on {report['inputs']}. The export is not trustworthy; nothing was written."
        )
    return report
