"""Graph-level precision conversion: fp16, static int8 (explicit Q/DQ) and dynamic int8.

Static int8 places QuantizeLinear/DequantizeLinear pairs on the inputs of
MatMul/Gemm/Conv (weights per channel, activations from calibrated ranges),
the explicit form both ONNX Runtime and TensorRT build int8 kernels from. By
default only MatMuls with a constant weight are quantized: the attention
products (activation × activation) stay float, where quantization hurts most.
Nodes can be kept in float by name; :func:`rank_sensitivity` finds which.

The calibrated ranges are cached as JSON beside the graph, so re-quantizing
with other nodes excluded does not calibrate again, and the cache ships in the
bundle for engine builders that want it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.errors import ExportError, InputError, require

PRECISIONS = ("fp16", "int8")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class Int8Options:
    """How a graph is quantized to int8.

    Attributes:
        op_types: Operator types that get quantized.
        matmul_weights_only: Quantize a MatMul only when its second input is a constant.
        per_channel: One weight scale per output channel.
        activations: ``"uint8"`` (asymmetric; best on x86 CPUs) or ``"int8"``
            (symmetric; what TensorRT and ARM prefer).
        reduce_range: 7-bit weights, which avoids int16 overflow on x86 CPUs
            without VNNI; ``None`` decides from this CPU.
        method: Calibration: ``"minmax"``, ``"percentile"`` (99.999th) or ``"entropy"``.
    """

    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    matmul_weights_only: bool = True
    per_channel: bool = True
    activations: str = "uint8"
    reduce_range: bool | None = None
    method: str = "minmax"

    def resolved(self) -> Int8Options:
        if self.activations not in ("uint8", "int8"):
            raise InputError(f"activations must be 'uint8' or 'int8', got {self.activations!r}.")
        if self.method not in CALIBRATION_METHODS:
            raise InputError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}.")
        if self.reduce_range is not None:
            return self
        return Int8Options(**{**asdict(self), "reduce_range": not cpu_has_vnni()})


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has the int8 dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _quiet_ort_logging() -> None:
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


def check_graph(path: str | Path) -> None:
    """Fail clearly on a missing or corrupted ONNX file before anything is quantized.

    Raises:
        ExportError: The file is missing or not a valid ONNX model.
    """
    onnx = require("onnx", "export", "Quantization")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"graph '{path}' does not exist.")
    try:
        onnx.checker.check_model(onnx.load(str(path)))
    except Exception as e:  # onnx raises DecodeError, ValidationError, …
        raise ExportError(f"graph '{path}' is not a valid ONNX model ({type(e).__name__}: {e}); "
                          "re-export the bundle.") from e


def prepare(src: str | Path, dst: str | Path) -> Path:
    """Shape inference and graph optimisation ahead of quantization; every node gets a name."""
    onnx = require("onnx", "export", "Quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _quiet_ort_logging()
    src, dst = Path(src).absolute(), Path(dst).absolute()
    # ONNX Runtime's symbolic shape inference drops a debug file into the working directory when it gives up
    with tempfile.TemporaryDirectory(prefix="edgemm-prepare-") as tmp, contextlib.chdir(tmp):
        try:
            quant_pre_process(str(src), str(dst))
        except Exception:  # it gives up on some dynamic graphs; ONNX's own shape inference is enough
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    model = onnx.load(str(dst))
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    onnx.save(model, str(dst))
    return dst


def quantizable_nodes(path: str | Path, options: Int8Options = Int8Options()) -> list[str]:
    """Names of the nodes int8 quantization would touch, in graph order."""
    onnx = require("onnx", "export", "Quantization")
    model = onnx.load(str(path))
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    names = []
    for node in model.graph.node:
        if node.op_type not in options.op_types:
            continue
        if node.op_type == "MatMul" and options.matmul_weights_only and node.input[1] not in constants:
            continue
        names.append(node.name)
    return names


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over an iterable of feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_static(prepared: str | Path, dst: str | Path, feeds: Callable[[], Iterable[dict[str, np.ndarray]]], *,
                    cache: str | Path, options: Int8Options = Int8Options(), exclude: Sequence[str] = (),
                    only: Sequence[str] | None = None) -> Path:
    """Static int8 with explicit Q/DQ nodes.

    Args:
        prepared: A graph from :func:`prepare`.
        dst: Output ONNX file.
        feeds: Returns the calibration feeds; called only when ``cache`` does not exist yet.
        cache: The calibration cache (JSON tensor ranges), written on first use.
        options: See :class:`Int8Options`.
        exclude: Node names kept in float.
        only: Quantize just these nodes (for sensitivity analysis).

    Raises:
        InputError: The calibration feeds are empty.
        ExportError: ONNX Runtime's quantizer failed.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    options = options.resolved()
    _quiet_ort_logging()
    cache = Path(cache)
    reader = None
    if not cache.is_file():
        batches = list(feeds())
        if not batches:
            raise InputError("the calibration data is empty; give images/texts to calibrate with.")
        reader = _Reader(batches)
    targets = list(only) if only is not None else quantizable_nodes(prepared, options)
    targets = [n for n in targets if n not in set(exclude)]
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[options.method]
    activation = QuantType.QUInt8 if options.activations == "uint8" else QuantType.QInt8
    try:
        ort_quantize_static(
            str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(options.op_types),
            per_channel=options.per_channel, reduce_range=options.reduce_range, activation_type=activation,
            weight_type=QuantType.QInt8, nodes_to_quantize=targets or ["<none>"], calibrate_method=method,
            calibration_cache_path=str(cache),
            extra_options={"ActivationSymmetric": options.activations == "int8", "WeightSymmetric": True,
                           "MatMulConstBOnly": options.matmul_weights_only},
        )
    except InputError:
        raise
    except Exception as e:
        raise ExportError(f"int8 quantization of '{prepared}' failed: {type(e).__name__}: {e}") from e
    return Path(dst)


def quantize_dynamic(prepared: str | Path, dst: str | Path, *, options: Int8Options = Int8Options(),
                     exclude: Sequence[str] = (), only: Sequence[str] | None = None,
                     op_types: tuple[str, ...] = ("MatMul", "Gemm")) -> Path:
    """Dynamic int8: weights quantized ahead of time, activations per batch at run time.

    Only MatMul/Gemm are quantized (ONNX Runtime's dynamic Conv is slower than float).
    ``op_types=("MatMul",)`` leaves Gemms alone: ONNX Runtime turns every Gemm of a
    graph into a MatMul with a transposed *copy* of its weight before quantizing,
    which doubles a tied LM head (the token embedding, stored once).
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    options = Int8Options(**{**asdict(options.resolved()), "op_types": tuple(op_types)})
    _quiet_ort_logging()
    targets = list(only) if only is not None else quantizable_nodes(prepared, options)
    targets = [n for n in targets if n not in set(exclude)]
    try:
        ort_quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=list(options.op_types),
                             per_channel=options.per_channel, reduce_range=options.reduce_range,
                             weight_type=QuantType.QInt8, nodes_to_quantize=targets or ["<none>"],
                             extra_options={"MatMulConstBOnly": True})
    except Exception as e:
        raise ExportError(f"dynamic int8 quantization of '{prepared}' failed: {type(e).__name__}: {e}") from e
    _untranspose_float_gemms(Path(dst))
    return Path(dst)


def _untranspose_float_gemms(path: Path) -> None:
    """Undo ONNX Runtime's Gemm → MatMul rewrite where the MatMul stayed float.

    Dynamic quantization rewrites every Gemm as a MatMul on a transposed copy of
    its weight, quantized or not. A float one keeps both the weight and its copy —
    for a tied LM head, the whole token embedding twice. Such MatMuls become
    ``Gemm(transB=1)`` on the original weight again (they came from Gemms, so
    their input is 2-D), and the copy goes.
    """
    onnx = require("onnx", "export", "int8 quantization")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    changed = False
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        m = re.fullmatch(r"(.+)_Transposed(?:_\d+)?", node.input[1])
        if not m or m.group(1) not in inits or node.input[1] not in inits:
            continue
        node.op_type = "Gemm"
        node.input[1] = m.group(1)
        node.attribute.append(onnx.helper.make_attribute("transB", 1))
        changed = True
    if not changed:
        return
    used = {x for n in model.graph.node for x in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.save(model, str(path))


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """fp16 weights and compute, float32 inputs and outputs (the graph interface does not change).

    Meant for GPUs: ONNX Runtime's CPU provider lacks fp16 kernels for most ops
    and inserts casts, so on a CPU this graph usually runs slower than fp32.
    """
    onnx = require("onnx", "export", "fp16 conversion")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))
    except Exception as e:
        raise ExportError(f"fp16 conversion of '{src}' failed: {type(e).__name__}: {e}") from e
    return Path(dst)


def graph_outputs(path: str | Path, feeds: Sequence[dict[str, np.ndarray]], output: str = "embedding") -> np.ndarray:
    """Run a graph on CPU over several feeds and stack one output (for sensitivity analysis)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return np.concatenate([session.run([output], {k: v for k, v in f.items() if k in names})[0] for f in feeds])


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(1).mean())


def rank_sensitivity(prepared: str | Path, nodes: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
                     quantize: Callable[[Path, Sequence[str]], Path], *,
                     progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """How much quantizing each node alone costs, worst first.

    Each node is quantized on its own (everything else float) and the graph's
    ``embedding`` output is compared with the float graph's on ``feeds``
    (calibration-side inputs, not the gate's): the cost is 1 - mean cosine.

    Args:
        prepared: The float graph from :func:`prepare`.
        nodes: Candidate node names.
        feeds: Inputs to measure on.
        quantize: ``quantize(dst, only)`` writes a graph with just ``only`` quantized.
        progress: Called with (done, total).

    Returns:
        ``[{"node", "op", "cost"}]`` sorted by cost, highest first.
    """
    onnx = require("onnx", "export", "Quantization")
    ops = {n.name: n.op_type for n in onnx.load(str(prepared)).graph.node}
    reference = graph_outputs(prepared, feeds)
    ranked = []
    with tempfile.TemporaryDirectory(prefix="edgemm-sensitivity-") as tmp:
        for i, node in enumerate(nodes):
            path = quantize(Path(tmp) / "one.onnx", [node])
            cost = 1.0 - _mean_cosine(graph_outputs(path, feeds), reference)
            ranked.append({"node": node, "op": ops.get(node, "?"), "cost": cost})
            if progress:
                progress(i + 1, len(nodes))
    return sorted(ranked, key=lambda r: -r["cost"])

