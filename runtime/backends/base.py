"""The one backend interface: checked ``infer(feeds)`` over named tensors."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from edgemm.runtime.errors import InputError
from edgemm.runtime.manifest import TensorSpec


class Backend:
    """Runs one graph. Subclasses implement ``_infer`` and fill ``inputs``/``outputs``.

    ``infer`` checks names, dtypes, ranks and fixed dimensions against the
    graph's metadata before anything reaches the runtime, so a wrong feed is an
    ``InputError`` naming the tensor, not a runtime stack trace.
    """

    name = "base"

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.last_inference_ms: float = 0.0  # wall time of the last _infer, for benchmarks

    def infer(self, feeds: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        """Run the graph on named inputs.

        Args:
            feeds: Input name → array, exactly the graph's inputs.

        Returns:
            Output name → array, in the graph's output order.

        Raises:
            InputError: A feed is missing, unexpected, or of the wrong dtype or shape.
        """
        expected = {t.name: t for t in self.inputs}
        missing = sorted(set(expected) - set(feeds))
        extra = sorted(set(feeds) - set(expected))
        if missing or extra:
            raise InputError(
                f"{self.name}: feeds do not match the graph inputs {sorted(expected)} "
                f"(missing: {missing or 'none'}, unexpected: {extra or 'none'})."
            )
        for name, spec in expected.items():
            array = feeds[name]
            if not isinstance(array, np.ndarray):
                raise InputError(f"{self.name}: input '{name}' must be a numpy array, got {type(array).__name__}.")
            if array.dtype != np.dtype(spec.dtype):
                raise InputError(f"{self.name}: input '{name}' must be {spec.dtype}, got {array.dtype}.")
            if array.ndim != len(spec.shape):
                raise InputError(
                    f"{self.name}: input '{name}' must have {len(spec.shape)} dimensions {spec.shape}, got shape {array.shape}."
                )
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
                if isinstance(want, int) and want != got:
                    raise InputError(
                        f"{self.name}: input '{name}' axis {axis} must be {want} (shape {spec.shape}), got shape {array.shape}."
                    )
            if array.shape[0] == 0:
                raise InputError(f"{self.name}: input '{name}' is an empty batch; pass at least one item.")
        start = time.perf_counter()
        out = self._infer({name: feeds[name] for name in expected})
        self.last_inference_ms = (time.perf_counter() - start) * 1e3
        return out

    def _infer(self, feeds: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        raise NotImplementedError
