"""Triton's model configuration, made from a bundle's manifest: the JSON ``edgemm serve`` answers on
``/v2/models/{m}/config`` and the ``config.pbtxt`` files of ``edgemm export triton``.

Both come from one dict in the JSON form of Triton's ``ModelConfig`` protobuf
(``model_config.proto``); :func:`to_pbtxt` writes that dict as protobuf text.
Triton's conventions, which its users trip over when writing these by hand:

* With ``max_batch_size > 0`` the batch axis is left out of ``dims``; every other
  dynamic axis is ``-1``. A graph whose first axis is not a shared dynamic batch
  axis gets ``max_batch_size: 0`` and full ``dims``.
* BYTES tensors are ``TYPE_STRING``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgemm._kserve import datatype_of
from edgemm.runtime.manifest import GraphSpec, TensorSpec

__all__ = ["ServedTensor", "graph_tensors", "model_config", "to_pbtxt"]

# KServe datatype → Triton config data_type.
TRITON_TYPES = {"BYTES": "TYPE_STRING", **{t: f"TYPE_{t}" for t in (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64")}}

_ENUM_FIELDS = {"data_type", "kind", "format"}  # written bare in text format (TYPE_FP32, KIND_CPU)
_MAP_FIELDS = {"parameters", "inputs"}  # protobuf maps: one {key, value} entry each in text format


@dataclass(frozen=True)
class ServedTensor:
    """One input or output of a served model, as the protocol describes it.

    ``shape`` is the full shape with ``-1`` for dynamic axes, batch axis included
    when the model batches (KServe metadata); :meth:`dims` is Triton's (batch left out).
    """

    name: str
    datatype: str  # KServe datatype: FP32, INT64, BYTES, …
    shape: tuple[int, ...]
    optional: bool = False  # a request may leave it out

    def dims(self, batched: bool) -> list[int]:
        return list(self.shape[1:] if batched else self.shape)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def config(self, batched: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "data_type": TRITON_TYPES[self.datatype],
                                 "dims": self.dims(batched)}
        if self.optional:
            entry["optional"] = True
        return entry


def _tensor(spec: TensorSpec, sizes: dict[str, int]) -> ServedTensor:
    return ServedTensor(spec.name, datatype_of(np.dtype(spec.dtype)),
                        tuple(d if isinstance(d, int) else sizes.get(d, -1) for d in spec.shape))


def graph_tensors(graph: GraphSpec, sizes: dict[str, int] | None = None,
                  ) -> tuple[list[ServedTensor], list[ServedTensor], bool]:
    """A graph's inputs and outputs as served tensors, and whether it batches.

    It batches when every input and output starts with the same named dynamic
    axis: then concurrent requests can be concatenated along it.

    Args:
        sizes: Named axes whose size the manifest knows (an embedding's ``dim``); others are ``-1``.
    """
    sizes = sizes or {}
    firsts = {t.shape[0] if t.shape else None for t in (*graph.inputs, *graph.outputs)}
    batched = len(firsts) == 1 and isinstance(next(iter(firsts)), str)
    return [_tensor(t, sizes) for t in graph.inputs], [_tensor(t, sizes) for t in graph.outputs], batched


def known_sizes(manifest: Any) -> dict[str, int]:
    """Named axes whose size a manifest fixes: the embedding width."""
    return {"dim": manifest.embedding_dim} if getattr(manifest, "embedding_dim", None) else {}


def model_config(name: str, inputs: list[ServedTensor], outputs: list[ServedTensor], *, max_batch_size: int,
                 platform: str | None = None, backend: str | None = None, max_delay_ms: float | None = None,
                 instances: int = 1, kind: str = "KIND_CPU", **extra: Any) -> dict[str, Any]:
    """A model's configuration in the JSON form of Triton's ``ModelConfig``.

    Args:
        max_batch_size: 0 for a model that does not batch (full dims).
        platform: e.g. ``"onnxruntime_onnx"``, ``"tensorrt_plan"``, ``"ensemble"``.
        backend: e.g. ``"onnxruntime"``, ``"python"``.
        max_delay_ms: Adds ``dynamic_batching`` with this queue delay (batching models only).
        instances: Copies of the model that run at once (``instance_group``).
        kind: ``KIND_CPU`` or ``KIND_GPU``.
        **extra: Further top-level fields (``optimization``, ``model_warmup``, ``parameters``, …).
    """
    batched = max_batch_size > 0
    config: dict[str, Any] = {"name": name}
    if platform:
        config["platform"] = platform
    if backend:
        config["backend"] = backend
    config["max_batch_size"] = max_batch_size
    config["input"] = [t.config(batched) for t in inputs]
    config["output"] = [t.config(batched) for t in outputs]
    if batched and max_delay_ms is not None:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": int(round(max_delay_ms * 1000))}
    if platform != "ensemble":
        config["instance_group"] = [{"count": instances, "kind": kind}]
    config.update(extra)
    return config


def to_pbtxt(config: dict[str, Any]) -> str:
    """A configuration dict as protobuf text format (``config.pbtxt``)."""
    lines: list[str] = []
    _fields(config, 0, lines)
    return "\n".join(lines) + "\n"


def _fields(obj: dict[str, Any], depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for key, value in obj.items():
        if key in _MAP_FIELDS and isinstance(value, dict):
            for k, v in value.items():  # a protobuf map: one {key, value} message per entry
                lines.append(f"{pad}{key} {{")
                lines.append(f"{pad}  key: {_quoted(k)}")
                if isinstance(v, dict):
                    _message("value", v, depth + 1, lines)
                else:
                    lines.append(f"{pad}  value: {_scalar(key, v)}")
                lines.append(f"{pad}}}")
        elif isinstance(value, dict):
            _message(key, value, depth, lines)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                _message(key, v, depth, lines)
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(key, v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(key, value)}")


def _message(key: str, obj: dict[str, Any], depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    lines.append(f"{pad}{key} {{")
    _fields(obj, depth + 1, lines)
    lines.append(f"{pad}}}")


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if key in _ENUM_FIELDS and re.fullmatch(r"[A-Z][A-Z0-9_]*", str(value)):
        return str(value)
    return _quoted(str(value))


def _quoted(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
