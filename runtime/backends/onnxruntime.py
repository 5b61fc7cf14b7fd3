"""ONNX Runtime backend with explicit execution providers and threads."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgemm.runtime.backends.base import Backend
from edgemm.runtime.errors import BackendError, require
from edgemm.runtime.manifest import TensorSpec

# Our short names → ONNX Runtime provider names, and the extra that brings each.
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnx"),
    "cuda": ("CUDAExecutionProvider", "gpu"),
    "tensorrt": ("TensorrtExecutionProvider", "gpu"),
}

_GATHER_GRAPHS = Path(__file__).resolve().parents[1] / "data"
CUDA_DEFAULTS = {"arena_extend_strategy": "kSameAsRequested"}

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(bool)": "bool",
}


def _spec(arg) -> TensorSpec:
    shape = [d if isinstance(d, int) else (d or "dynamic") for d in arg.shape]
    return TensorSpec(name=arg.name, dtype=_ORT_TYPES.get(arg.type, arg.type), shape=shape)


class OnnxRuntimeBackend(Backend):
    """One ONNX graph in an ``onnxruntime.InferenceSession``.

    Args:
        path: The ``.onnx`` file.
        providers: Short provider names in priority order (``"cpu"``, ``"cuda"``,
            ``"tensorrt"``). Every one must be available: a missing one is an
            error, never a quiet fall back to the CPU.
        threads: Intra-op threads; ``None`` lets ONNX Runtime use every core.
        provider_options: Short provider name → its ONNX Runtime options (e.g. the
            TensorRT provider's engine cache and profiles, from ``edgemm._engines``).
            The CUDA provider grows its arena by what is asked (``kSameAsRequested``)
            unless told otherwise: on a Jetson the GPU shares the CPU's memory.
        spinning: Whether idle intra-op threads spin after a run
            (``session.intra_op.allow_spinning``); ``None`` keeps ONNX Runtime's
            default (on). Spinning threads hold the cores that the caller's next
            work needs (a frame's preprocessing, the next session), which on
            2 cores made every public call measured slower
            (``benchmarks/bench_spinning.py``).

    Raises:
        BackendError: A provider is unknown or unavailable, or the file cannot be loaded.
        MissingDependencyError: onnxruntime is not installed.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, providers: tuple[str, ...] | list[str] = ("cpu",), threads: int | None = None,
                 spinning: bool | None = None, provider_options: Mapping[str, Mapping[str, str]] | None = None):
        super().__init__()
        ort = require("onnxruntime", "onnx", "The ONNX Runtime backend")
        if not providers:
            raise BackendError("onnxruntime: no execution provider given; pass e.g. providers=('cpu',).")
        available = set(ort.get_available_providers())
        chosen = []
        for short in providers:
            if short not in PROVIDERS:
                raise BackendError(f"onnxruntime: unknown provider '{short}'; choose from {sorted(PROVIDERS)}.")
            full, extra = PROVIDERS[short]
            if full not in available:
                raise BackendError(
                    f"onnxruntime: provider '{short}' ({full}) is not available in this onnxruntime build "
                    f"(available: {sorted(available)}). Install it with: pip install 'edgemm[{extra}]' "
                    "(in place of the CPU-only onnxruntime), on a machine with the matching GPU drivers."
                )
            extra_options = dict(CUDA_DEFAULTS if short == "cuda" else {})
            extra_options.update((provider_options or {}).get(short, {}))
            chosen.append((full, extra_options) if extra_options else full)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise BackendError(f"onnxruntime: threads must be a positive integer or None, got {threads!r}.")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if spinning is not None:
            if not isinstance(spinning, bool):
                raise BackendError(f"onnxruntime: spinning must be True, False or None, got {spinning!r}.")
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
        except Exception as e:  # onnxruntime raises its own untyped errors for corrupt files
            raise BackendError(f"onnxruntime could not load '{path}': {e}") from e
        self.providers = list(self.session.get_providers())
        dropped = [short for short in providers if PROVIDERS[short][0] not in self.providers]
        if dropped:  # ONNX Runtime logs a provider that fails to load and runs on what is left: never here
            raise BackendError(
                f"onnxruntime: provider(s) {dropped} could not start for '{Path(path).name}' (the session got "
                f"{self.providers}; ONNX Runtime's log above says why): their libraries failed to load — CUDA "
                "and cuDNN of the versions this onnxruntime-gpu was built for, and TensorRT for 'tensorrt' — or no "
                "GPU is present. Install them, put their lib folders on LD_LIBRARY_PATH, or ask for "
                "providers=('cpu',) explicitly."
            )
        self.threads = threads
        self.spinning = spinning
        self.path = Path(path)
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self._gather: dict[tuple[str, str], object] = {}  # (dtype, device) → the row-gather session

    @property
    def device(self) -> str:
        """Where the session's first provider computes: ``"cuda"`` (CUDA, TensorRT) or ``"cpu"``."""
        return "cuda" if self.providers and self.providers[0] in ("CUDAExecutionProvider",
                                                                  "TensorrtExecutionProvider") else "cpu"

    def to_device(self, array: np.ndarray, device: str | None = None):
        """A numpy array as an ONNX Runtime ``OrtValue`` on ``device`` (default: the session's)."""
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device or self.device, 0)

    def run_bound(self, feeds: dict[str, object], keep: set[str], device: str | None = None) -> dict[str, object]:
        """Run with I/O binding, for state that should stay on the device between calls (a decoder's cache).

        Args:
            feeds: Input name → numpy array (copied in) or ``OrtValue`` (used where it is, no copy).
            keep: Outputs returned as ``OrtValue``s left on the device; the others come back as numpy.
            device: Where outputs are allocated (default: the session's device).

        Raises:
            BackendError: The run failed.
        """
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._output_names:
            binding.bind_output(name, device or self.device if name in keep else "cpu")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime's own untyped errors
            raise BackendError(f"onnxruntime: '{self.path.name}' failed to run: {e}") from e
        values = binding.get_outputs()
        return {name: (v if name in keep else v.numpy()) for name, v in zip(self._output_names, values)}

    def take_rows(self, value, rows: np.ndarray):
        """Rows of an ``OrtValue`` (reordered, repeated or dropped) in a new one on the same device.

        A captioner's beams reorder their cache at every step; on a GPU this keeps it
        there (a one-node Gather graph, ``runtime/data/gather_rows.*.onnx``) instead
        of a round trip through the host.
        """
        import onnxruntime as ort

        dtype = {"tensor(float)": "float32", "tensor(float16)": "float16"}.get(value.data_type())
        if dtype is None:
            return self.to_device(value.numpy()[rows], value.device_name())
        key = (dtype, value.device_name())
        session = self._gather.get(key)
        if session is None:
            provider = "CUDAExecutionProvider" if key[1] == "cuda" else "CPUExecutionProvider"
            session = ort.InferenceSession(str(_GATHER_GRAPHS / f"gather_rows.{dtype}.onnx"), providers=[provider])
            self._gather[key] = session
        binding = session.io_binding()
        binding.bind_ortvalue_input("data", value)
        binding.bind_cpu_input("rows", np.ascontiguousarray(rows, np.int64))
        binding.bind_output("out", key[1])
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _infer(self, feeds: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        if self.device != "cpu":  # inputs copied to the GPU once, outputs allocated there and copied back once
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name in self._output_names:
                binding.bind_output(name, self.device)
            try:
                self.session.run_with_iobinding(binding)
            except Exception as e:  # onnxruntime's own untyped errors
                raise BackendError(f"onnxruntime: '{self.path.name}' failed to run: {e}") from e
            return OrderedDict(zip(self._output_names, binding.copy_outputs_to_cpu()))
        try:
            values = self.session.run(self._output_names, feeds)
        except Exception as e:  # onnxruntime's own untyped errors: a graph that fails on valid-looking feeds
            raise BackendError(f"onnxruntime: '{self.path.name}' failed to run: {e}") from e
        return OrderedDict(zip(self._output_names, values))
