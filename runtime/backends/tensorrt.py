"""Native TensorRT backend: one plain ``.plan`` engine, run on its own CUDA stream with ``execute_async_v3``.

One code path for the ``tensorrt`` module (JetPack, NVIDIA's builds) and
``tensorrt_rtx`` (TensorRT for RTX), which share the TensorRT 10 Python API;
device memory, pinned host memory and the stream come from ``cuda-python``
(no torch in the runtime). Buffers are kept between calls and grown only when
a call needs more. A missing TensorRT, CUDA driver or GPU, or an engine this
TensorRT or GPU cannot run, is one ``BackendError`` naming what to do — never a
fallback to another runtime.

Not yet run on a GPU in this project's CI (none is lent there); it is
type-checked against ``tensorrt-stubs`` and exercised by the GPU check
(``benchmarks/gpu_check.sh``) when a device is available.
"""

from __future__ import annotations

import ctypes
import importlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgemm.runtime.backends.base import Backend
from edgemm.runtime.errors import BackendError, InputError
from edgemm.runtime.manifest import TensorSpec

if TYPE_CHECKING:  # the TensorRT 10 API as tensorrt-stubs declares it: CI type-checks this file against it
    import tensorrt as trt_api

TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")  # JetPack / NVIDIA builds, then TensorRT for RTX
INSTALL = ("install TensorRT 10: on a Jetson it comes with JetPack (python3-libnvinfer); on an RTX desktop "
           "pip install 'edgemm[tensorrt-rtx]'; elsewhere NVIDIA's wheels or containers, with "
           "pip install 'edgemm[tensorrt]' for cuda-python")


def import_tensorrt() -> tuple[Any, str]:
    """The installed TensorRT module and its name.

    ``tensorrt-stubs`` leaves an importable, empty ``tensorrt`` namespace, and the
    ``tensorrt`` wheels on the package index are stubs that download at install
    time: a module counts only if it has the runtime API (``Runtime``, ``__version__``).

    Raises:
        BackendError: No usable TensorRT (names how to install one).
    """
    seen = []
    for name in TENSORRT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            seen.append(f"{name}: {e}")
            continue
        if hasattr(module, "Runtime") and hasattr(module, "__version__"):
            return module, name
        seen.append(f"{name}: imports but has no TensorRT runtime (a stub or type-stub package)")
    raise BackendError(f"TensorRT is not available ({'; '.join(seen)}); {INSTALL}.")


def import_cudart() -> Any:
    """``cuda-python``'s runtime bindings.

    Raises:
        BackendError: cuda-python is missing.
    """
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendError("the TensorRT backend needs cuda-python for device memory and streams: "
                       "pip install 'edgemm[tensorrt]' (cuda-python matching your driver's CUDA version).")


def _dims(dims: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (tuple-like: indexable, sized) as a tuple of ints."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (error, value…); raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA {what} failed: {err}. Is an NVIDIA GPU present, with a driver recent enough for "
                           "this cuda-python?")
    return values[0] if len(values) == 1 else values


def gpu_info(cudart: Any, device: int = 0) -> dict[str, str]:
    """Name and compute capability of a device (what an engine is tied to).

    Raises:
        BackendError: No driver or no such device.
    """
    count = _check(cudart.cudaGetDeviceCount(), "device query")
    if not count or device >= count:
        raise BackendError(f"no CUDA device {device} (found {count or 0}); TensorRT needs an NVIDIA GPU.")
    props = _check(cudart.cudaGetDeviceProperties(device), "device properties")
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name, "compute_capability": f"{props.major}.{props.minor}"}


class _Buffer:
    """A device allocation and a pinned host allocation of the same size, grown on demand."""

    def __init__(self, cudart: Any):
        self.cudart, self.nbytes, self.device, self.host = cudart, 0, 0, 0

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.free()
        self.device = _check(self.cudart.cudaMalloc(nbytes), f"allocation of {nbytes} device bytes")
        self.host = _check(self.cudart.cudaMallocHost(nbytes), f"allocation of {nbytes} pinned host bytes")
        self.nbytes = nbytes

    def host_view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape)) * dtype.itemsize
        raw = memoryview((ctypes.c_byte * max(count, 1)).from_address(self.host)).cast("B")
        return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def free(self) -> None:
        if self.device:
            self.cudart.cudaFree(self.device)
        if self.host:
            self.cudart.cudaFreeHost(self.host)
        self.nbytes, self.device, self.host = 0, 0, 0


class DeviceArray:
    """A tensor in device memory that a decoder's cache keeps between steps (freed on its stream when dropped)."""

    def __init__(self, cudart: Any, stream: Any, shape: tuple[int, ...], dtype: np.dtype):
        self.cudart, self.stream, self.shape, self.dtype = cudart, stream, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        # A zero-length past still needs a valid address; stream-ordered allocation is cheap enough per step.
        self.ptr = _check(cudart.cudaMallocAsync(max(self.nbytes, 1), stream), f"allocation of {self.nbytes} bytes")

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        if self.nbytes:
            _check(self.cudart.cudaStreamSynchronize(self.stream), "stream synchronisation")
            _check(self.cudart.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes,
                                          self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost), "copy to the host")
        return out

    def __del__(self) -> None:
        try:
            self.cudart.cudaFreeAsync(self.ptr, self.stream)
        except Exception:  # interpreter shutdown
            pass


class TensorRTBackend(Backend):
    """One TensorRT engine (a plain ``.plan`` file).

    Args:
        path: The plan.
        device: CUDA device index.
        providers, threads, spinning: Accepted for the common backend options;
            ``providers`` must be empty or ``("tensorrt",)`` (TensorRT runs on the GPU only).

    Raises:
        BackendError: TensorRT, cuda-python, the driver or the GPU is missing, or this
            TensorRT cannot deserialize the plan (built by another version or for another GPU).
    """

    name = "tensorrt"

    def __init__(self, path: str | Path, *, device: int = 0, providers: tuple[str, ...] | list[str] = (),
                 threads: int | None = None, spinning: bool | None = None):
        super().__init__()
        if tuple(providers) not in ((), ("tensorrt",), ("cuda",), ("tensorrt", "cuda")):
            raise BackendError(f"the TensorRT backend runs on the GPU; providers {tuple(providers)} do not apply "
                               "(use backend='onnxruntime' for those).")
        self.path = Path(path)
        self.trt, self.module = import_tensorrt()
        self.cudart = import_cudart()
        self.gpu = gpu_info(self.cudart, device)
        _check(self.cudart.cudaSetDevice(device), "device selection")
        if TYPE_CHECKING:
            trt = trt_api
        else:
            trt = self.trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            plan = self.path.read_bytes()
        except OSError as e:
            raise BackendError(f"cannot read engine '{self.path}': {e.strerror or e}.") from None
        engine: trt_api.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(f"{self.module} {trt.__version__} cannot load engine '{self.path}' on {self.gpu['gpu']} "
                               f"(compute capability {self.gpu['compute_capability']}): engines run only on the "
                               "TensorRT version and GPU that built them. Rebuild it here: edgemm engine build.")
        self.engine: trt_api.ICudaEngine = engine
        self.context: trt_api.IExecutionContext = engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate(), "stream creation")
        self._buffers: dict[str, _Buffer] = {}
        self._profiles: dict[str, list[tuple[int, ...]]] = {}
        for i in range(self.engine.num_io_tensors):
            tensor = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(tensor)))
            shape: list[int | str] = [d if d >= 0 else "dynamic" for d in _dims(self.engine.get_tensor_shape(tensor))]
            spec = TensorSpec(name=tensor, dtype=dtype.name, shape=shape)
            if self.engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT:
                self.inputs.append(spec)
                self._profiles[tensor] = [_dims(d) for d in self.engine.get_tensor_profile_shape(tensor, 0)]
            else:
                self.outputs.append(spec)
            self._buffers[tensor] = _Buffer(self.cudart)

    device = "cuda"  # where run_bound keeps what it is asked to keep

    def profile(self, name: str) -> list[tuple[int, ...]]:
        """(min, opt, max) shape of an input in the engine's profile."""
        return self._profiles[name]

    def to_device(self, array: np.ndarray, device: str | None = None) -> DeviceArray:
        """A numpy array copied into device memory (for state kept there between calls)."""
        array = np.ascontiguousarray(array)
        out = DeviceArray(self.cudart, self.stream, array.shape, array.dtype)
        if array.nbytes:
            _check(self.cudart.cudaMemcpyAsync(out.ptr, array.ctypes.data, array.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
                   "copy to the device")
            _check(self.cudart.cudaStreamSynchronize(self.stream), "stream synchronisation")  # array may go
        return out

    def take_rows(self, value: DeviceArray, rows: np.ndarray) -> DeviceArray:
        """Rows of a device tensor (reordered, repeated or dropped) in a new one, copied on the device."""
        out = DeviceArray(self.cudart, self.stream, (len(rows), *value.shape[1:]), value.dtype)
        row_bytes = value.nbytes // max(value.shape[0], 1)
        if row_bytes:
            kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            for i, r in enumerate(np.asarray(rows, np.int64)):
                _check(self.cudart.cudaMemcpyAsync(out.ptr + i * row_bytes, value.ptr + int(r) * row_bytes,
                                                   row_bytes, kind, self.stream), "row copy on the device")
        return out

    def run_bound(self, feeds: dict[str, Any], keep: set[str], device: str | None = None) -> dict[str, Any]:
        """Run with device-resident state: ``DeviceArray`` feeds are used where they are, ``keep`` outputs come
        back as new ``DeviceArray``s (a decoder's present, the next step's past), the rest as numpy."""
        return self._run(feeds, keep, {})

    def _bind_input(self, name: str, value: Any) -> None:
        shape = tuple(value.shape)
        lo, _, hi = self._profiles[name]
        if any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise InputError(f"tensorrt: input '{name}' has shape {shape}, outside the engine's profile "
                             f"{lo} … {hi}; rebuild the engine with a wider range (edgemm engine build --axis).")
        if not self.context.set_input_shape(name, shape):
            raise BackendError(f"tensorrt: the engine refused input shape {shape} for '{name}'.")
        if isinstance(value, DeviceArray):
            self.context.set_tensor_address(name, value.ptr)
            return
        buf = self._buffers[name]
        buf.ensure(value.nbytes)
        np.copyto(buf.host_view(value.dtype, value.shape), value)
        _check(self.cudart.cudaMemcpyAsync(buf.device, buf.host, value.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
               f"copy of '{name}' to the device")
        self.context.set_tensor_address(name, buf.device)

    def _infer(self, feeds: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        return OrderedDict(self._run(feeds, set(), {}))

    def _run(self, feeds: dict[str, Any], keep: set[str], kept: dict[str, DeviceArray]) -> dict[str, Any]:
        cudart, kind = self.cudart, self.cudart.cudaMemcpyKind
        for name, value in feeds.items():
            self._bind_input(name, value)
        shapes = {}
        for spec in self.outputs:
            shape = _dims(self.context.get_tensor_shape(spec.name))
            nbytes = int(np.prod(shape)) * np.dtype(spec.dtype).itemsize
            if spec.name in keep:
                kept[spec.name] = DeviceArray(cudart, self.stream, shape, np.dtype(spec.dtype))
                self.context.set_tensor_address(spec.name, kept[spec.name].ptr)
            else:
                self._buffers[spec.name].ensure(max(nbytes, 1))
                self.context.set_tensor_address(spec.name, self._buffers[spec.name].device)
            shapes[spec.name] = (shape, nbytes)
        if not self.context.execute_async_v3(self.stream):
            raise BackendError(f"tensorrt: '{self.path.name}' failed to run (see TensorRT's log above).")
        for spec in self.outputs:
            shape, nbytes = shapes[spec.name]
            if spec.name in keep or not nbytes:
                continue
            buf = self._buffers[spec.name]
            _check(cudart.cudaMemcpyAsync(buf.host, buf.device, nbytes, kind.cudaMemcpyDeviceToHost, self.stream),
                   f"copy of '{spec.name}' to the host")
        _check(cudart.cudaStreamSynchronize(self.stream), "stream synchronisation")
        out: dict[str, Any] = {}
        for spec in self.outputs:
            shape, _ = shapes[spec.name]
            out[spec.name] = kept[spec.name] if spec.name in keep else \
                self._buffers[spec.name].host_view(np.dtype(spec.dtype), shape).copy()
        return out

    def close(self) -> None:
        """Free the buffers and the stream (also on garbage collection)."""
        for buf in getattr(self, "_buffers", {}).values():
            buf.free()
        if getattr(self, "stream", None):
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: cuda-python may be gone already
            pass


def build_engine(onnx_path: str | Path, plan_path: str | Path, shapes: dict[str, tuple[tuple[int, ...], ...]], *,
                 precision: str = "fp32", strongly_typed: bool = True, timing_cache: str | Path | None = None,
                 workspace_bytes: int | None = None) -> dict[str, Any]:
    """Build a plain ``.plan`` from an ONNX graph on this GPU (the caller keys, verifies and records it).

    Args:
        onnx_path: The bundle's graph.
        plan_path: Where the engine goes (written atomically: a temporary file, then a rename).
        shapes: One optimization profile: input → (min, opt, max) shape (``engines.graph_profile(...).shapes``).
        precision: The engine's precision, ``"fp32"``, ``"fp16"`` or ``"int8"``.
        strongly_typed: Build from the graph's own types (an fp16 bundle computes in fp16, an int8 bundle by its
            Q/DQ nodes: explicit quantization, no calibrator). ``False`` with ``"fp16"``: an fp32 graph whose
            layers the builder may run in fp16 (``BuilderFlag.FP16``; gone in TensorRT 11 and for RTX).
        timing_cache: A timing cache file, read if present and written back, so rebuilds take seconds.
        workspace_bytes: Builder workspace limit; default half the free device memory, at most 4 GiB (an 8 GB
            Orin shares it with the CPU).

    Returns:
        What the sidecar records of the build: flags, workspace, seconds.

    Raises:
        BackendError: TensorRT or the GPU is missing, this TensorRT cannot build the precision asked, the parser
            rejects the graph (its errors listed), or the build fails.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise BackendError(f"precision must be fp32, fp16 or int8, got {precision!r}.")
    found, module = import_tensorrt()
    if TYPE_CHECKING:
        trt = trt_api
    else:
        trt = found
    if not strongly_typed and (precision != "fp16" or not hasattr(trt.BuilderFlag, "FP16")):
        raise BackendError(f"{module} {found.__version__} builds strongly typed networks only, so an fp32 graph "
                           "cannot become an fp16 engine here: quantize the bundle to fp16 (edgemm quantize BUNDLE "
                           "--precision fp16 -o BUNDLE-fp16) and build that bundle's engines.")
    cudart = import_cudart()
    free, _total = _check(cudart.cudaMemGetInfo(), "memory query")
    workspace = workspace_bytes if workspace_bytes is not None else min(int(free) // 2, 4 << 30)
    try:
        serialized, config, flags, seconds = _build(trt, onnx_path, shapes, precision, strongly_typed, workspace,
                                                    timing_cache)
    except (AttributeError, TypeError, RuntimeError) as e:  # a TensorRT whose Python API differs from 10's
        raise BackendError(f"{module} {found.__version__} could not build '{onnx_path}': {type(e).__name__}: {e}. "
                           "edgemm builds with the TensorRT 10 API; report this with your TensorRT version.") from e
    cache_path = Path(timing_cache) if timing_cache else None
    plan_path = Path(plan_path)
    tmp = plan_path.with_name(f".{plan_path.name}.tmp")
    tmp.write_bytes(bytes(memoryview(serialized)))
    tmp.replace(plan_path)
    if cache_path is not None and hasattr(config, "get_timing_cache"):
        tmp_cache = cache_path.with_name(f".{cache_path.name}.tmp")
        tmp_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
        tmp_cache.replace(cache_path)
    return {"flags": flags, "workspace_bytes": workspace, "build_seconds": round(seconds, 2),
            "tensorrt": f"{module} {found.__version__}"}


def _build(trt: Any, onnx_path: str | Path, shapes: dict[str, tuple[tuple[int, ...], ...]], precision: str,
           strongly_typed: bool, workspace: int, timing_cache: str | Path | None) -> tuple[Any, Any, list[str], float]:
    """Parse, configure and build; returns the serialized plan, the config, the flags set and the seconds."""
    import time

    if TYPE_CHECKING:
        trt = trt_api
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = ["strongly-typed"] if strongly_typed else []
    network = builder.create_network(
        1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT's ONNX parser rejected '{onnx_path}': {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls drift ~1e-3 from the reference
        flags.append("no-tf32")
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        flags.append("fp16")
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    if hasattr(config, "create_timing_cache"):  # TensorRT for RTX keeps a runtime cache instead
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
        config.set_timing_cache(cache, False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine from '{onnx_path}' (see its log above); with a "
                           f"{workspace >> 20} MiB workspace.")
    return serialized, config, flags, time.perf_counter() - start
