"""Graphs run by Triton itself: the backend of edgemm's models inside Triton's Python backend.

In a repository made by ``edgemm export triton``, ``classify`` or ``caption`` is a
Python-backend model that runs edgemm's own preprocessing, label scoring and
decoding loop, and hands every graph call to the repository's graph model of the
same name (``image_encoder``, ``caption_decoder``, …) as a BLS request
(``pb_utils.InferenceRequest(...).exec()``). Those run on Triton's ONNX Runtime or
TensorRT backend, batched by Triton's dynamic batcher with every other client's
requests.

The graph's inputs and outputs come from the bundle's manifest (the repository's
graph models were copied from that bundle and checked against it), so the checked
``Backend.infer`` refuses a wrong feed before Triton sees it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from edgemm.runtime.backends.base import Backend
from edgemm.runtime.errors import BackendError, BundleError
from edgemm.runtime.manifest import read_manifest


class TritonGraphBackend(Backend):
    """One graph of a bundle, run by the Triton model named after its file (``image_encoder.onnx`` → ``image_encoder``).

    Args:
        path: Where the graph file would be in the bundle (it need not exist).

    Raises:
        BackendError: Not inside Triton's Python backend (``triton_python_backend_utils`` is missing).
        BundleError: The bundle's manifest lists no graph of that file.
    """

    name = "triton"

    def __init__(self, path: str | Path, **_options):
        super().__init__()
        try:
            import triton_python_backend_utils as pb_utils  # noqa: F401 - present only inside Triton
        except ImportError:
            raise BackendError("backend 'triton' runs inside Triton's Python backend, where "
                               "triton_python_backend_utils exists; elsewhere use backend='onnxruntime'.") from None
        path = Path(path)
        graph = next((g for g in read_manifest(path.parent).graphs.values() if g.file == path.name), None)
        if graph is None:
            raise BundleError(f"bundle '{path.parent}' lists no graph file '{path.name}'.")
        self.model = path.stem
        self.inputs, self.outputs = list(graph.inputs), list(graph.outputs)

    def _infer(self, feeds: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        import triton_python_backend_utils as pb_utils

        request = pb_utils.InferenceRequest(
            model_name=self.model, requested_output_names=[t.name for t in self.outputs],
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise BackendError(f"Triton model '{self.model}': {response.error().message()}")
        out = OrderedDict()
        for t in self.outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, t.name)
            if tensor is None:
                raise BackendError(f"Triton model '{self.model}' returned no output '{t.name}'.")
            out[t.name] = tensor.as_numpy()
        return out
