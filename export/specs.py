"""Export specs: one registered spec per graph role, declaring its interface.

A spec names the graph's inputs and outputs (with dynamic axes as strings in
their shapes), makes dummy inputs for tracing, and sets the fp32 tolerance the
exported graph is verified to. Adding a model family is adding specs in its file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from edgemm.runtime.errors import ExportError
from edgemm.runtime.manifest import TensorSpec


@dataclass(frozen=True)
class ExportSpec:
    role: str  # graph role; the ONNX file is "<role>.onnx"
    family: str  # model family the role belongs to
    inputs: tuple[TensorSpec, ...]  # graph inputs, in forward() argument order
    outputs: tuple[TensorSpec, ...]  # graph outputs, in forward() return order
    dummy_inputs: Callable[[], tuple[torch.Tensor, ...]]  # small inputs for tracing
    atol: float = 1e-4  # fp32 verification: max abs difference allowed per output

    @property
    def file(self) -> str:
        return f"{self.role}.onnx"

    def manifest_entry(self) -> dict[str, Any]:
        """The graph as the manifest's ``graphs`` entry."""
        return {"file": self.file, "inputs": [vars(t) for t in self.inputs],
                "outputs": [vars(t) for t in self.outputs]}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {axis: dim for axis, dim in enumerate(t.shape) if isinstance(dim, str)}
            for t in (*self.inputs, *self.outputs)
        }


SPECS: dict[str, ExportSpec] = {}


def register_spec(spec: ExportSpec) -> ExportSpec:
    """Add a spec to the registry (each role once)."""
    if spec.role in SPECS:
        raise ExportError(f"export spec '{spec.role}' is registered twice.")
    SPECS[spec.role] = spec
    return spec


def get_spec(role: str) -> ExportSpec:
    if role not in SPECS:
        raise ExportError(f"no export spec for graph role '{role}'; registered: {sorted(SPECS)}.")
    return SPECS[role]
