"""edgemm's models inside Triton's Python backend: what the ``model.py`` files of ``edgemm export triton`` run.

``PythonModel`` opens the model's folder (``<model>/<version>/``) and serves one
request list per ``execute`` call with the same served models ``edgemm serve`` uses
(:mod:`edgemm._serve`): ``classify``, ``embed_*`` and ``caption`` over a bundle copy
without graphs, whose graph calls become BLS requests to the repository's graph models
(backend ``"triton"``); or, for ``graph:<role>`` models, one graph on edgemm's ONNX
Runtime backend. A request that fails gets its own error response; the others in
the list are answered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.errors import EdgemmError


class PythonModel:
    """One model of a Triton repository made by edgemm (see the module docstring).

    Args:
        config: The model's configuration (Triton's ``args["model_config"]``, parsed).
        model_dir: Triton's ``args["model_repository"]``: the model's folder.
        version: Triton's ``args["model_version"]``.
    """

    def __init__(self, config: dict[str, Any], model_dir: str, version: str):
        from edgemm._model import FAMILIES
        from edgemm._serve import GraphModel, high_level_models
        from edgemm.runtime.backends import open_backend
        from edgemm.runtime.bundle import Bundle
        from edgemm.runtime.manifest import read_manifest

        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        kind = parameters.get("edgemm_model", "")
        folder = Path(model_dir) / str(version)
        if kind.startswith("graph:"):
            role = kind.split(":", 1)[1]
            manifest = read_manifest(folder)
            backend = open_backend(folder / "model.onnx", "onnxruntime")
            manifest.check_graph(role, backend.inputs, backend.outputs)
            self.served = GraphModel(role, manifest, backend, max_delay_ms=0, instances=1)
            self.served.max_batch_size = int(config.get("max_batch_size", 0))
        else:
            bundle = Bundle(folder / "bundle", graphs=False)  # checked now: a damaged copy fails the load
            max_items = int(parameters.get("edgemm_max_items", 256))

            def open_model() -> Any:
                model = FAMILIES[bundle.manifest.family](bundle, backend="triton")
                served = {m.name: m for m in high_level_models(model, max_items)}
                if kind not in served:
                    raise EdgemmError(f"model '{config.get('name')}': edgemm_model {kind!r} is none of "
                                      f"{sorted(served)}.")
                return served[kind]

            self._open = open_model  # opening the model runs graphs, and BLS calls work only inside execute

    served: Any = None
    _open: Any = None

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        if self.served is None:
            try:
                self.served = self._open()
            except EdgemmError as e:
                return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
                        for _ in requests]
        responses = []
        for request in requests:
            try:
                inputs = {}
                for t in self.served.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, t.name)
                    if tensor is not None:
                        inputs[t.name] = tensor.as_numpy()
                parameters = json.loads(request.parameters() or "{}")
                outputs = self.served.infer(inputs, parameters)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, _for_triton(value)) for name, value in outputs.items()]))
            except EdgemmError as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses


def _for_triton(value: np.ndarray) -> np.ndarray:
    """BYTES as an object array of bytes (what pb_utils.Tensor takes), everything else contiguous."""
    return value if value.dtype == object else np.ascontiguousarray(value)
