"""``edgemm serve``: a bundle behind the Open Inference Protocol (KServe v2) over HTTP.

The routes are Triton's, so ``tritonclient`` and ``perf_analyzer`` work against
edgemm unchanged::

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/{m}[/versions/1]           model metadata       .../ready  .../config  .../stats
    GET  /v2/models/stats                      every model's statistics
    POST /v2/models/{m}[/versions/1]/infer     JSON tensors, or the binary-tensor extension
    POST /v2/repository/index                  the models and their state

Every graph of the bundle is a model (``image_encoder``, ``text_encoder``, …: tensors
in, tensors out), behind a dynamic batcher where it batches (:mod:`edgemm._batcher`).
On top, the models a client wants without preprocessing of its own: ``classify``,
``embed_image`` and ``embed_text`` for a dual encoder, ``caption`` for a captioner —
they take encoded images (BYTES) or frames (UINT8) and texts (BYTES), and their
graph calls go through the same batchers, so concurrent ``classify`` requests share
image-graph runs.

The HTTP side is the standard library's threading server with ``TCP_NODELAY`` on
every connection (Nagle's algorithm plus the client's delayed ACK otherwise holds
each small response for ~40 ms), HTTP/1.1 keep-alive, bounded bodies, a bounded
number of connections and a read timeout; a bad request gets ``{"error": ...}`` and
its status code, and nothing a request does takes the server down.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edgemm._batcher import BatchedBackend, batching
from edgemm._kserve import ProtocolError, datatype_of, decode_request, encode_response, error_body
from edgemm._triton import ServedTensor, graph_tensors, known_sizes, model_config
from edgemm.runtime.backends import Backend
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.engines import EngineOptions
from edgemm.runtime.errors import BackendError, BundleError, EdgemmError, InputError
from edgemm.runtime.manifest import CAPTION_DECODER

__all__ = ["InferenceServer", "ServedModel"]

VERSION = "1"
_MODEL_ROUTE = re.compile(r"/v2/models/([A-Za-z0-9_.-]+)(?:/versions/([^/]+))?(/ready|/config|/stats|/infer)?")


class ServedModel:
    """One model the server answers for: its tensors, its Triton configuration and its statistics.

    ``infer`` checks a request's tensors against the declared ones (names, datatypes,
    ranks, fixed sizes, the batch limit) before ``_infer`` sees them.
    """

    backend = "python"  # Triton backend named in the configuration
    platform: str | None = None

    def __init__(self, name: str, inputs: list[ServedTensor], outputs: list[ServedTensor], *,
                 max_batch_size: int = 0):
        self.name, self.inputs, self.outputs, self.max_batch_size = name, inputs, outputs, max_batch_size
        self._lock = threading.Lock()
        self._success = [0, 0]  # requests, ns
        self._fail = [0, 0]
        self._items = 0
        self._last_ms = 0
        self.exclusive: threading.Lock | None = None  # held around each call where the backend is not thread-safe

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [VERSION], "platform": self.platform or self.backend,
                "inputs": [t.metadata() for t in self.inputs], "outputs": [t.metadata() for t in self.outputs]}

    def config(self) -> dict[str, Any]:
        return model_config(self.name, self.inputs, self.outputs, max_batch_size=self.max_batch_size,
                            platform=self.platform, backend=None if self.platform else self.backend)

    def infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        try:
            self._check(inputs)
            if self.exclusive is None:
                outputs = self._infer(inputs, parameters)
            else:
                with self.exclusive:
                    outputs = self._infer(inputs, parameters)
        except BaseException:
            self._count(self._fail, start, 0)
            raise
        self._count(self._success, start, self._items_of(inputs))
        return outputs

    def _infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _items_of(self, inputs: dict[str, np.ndarray]) -> int:
        return next(iter(inputs.values())).shape[0] if self.max_batch_size else 1

    def _count(self, counter: list[int], start: float, items: int) -> None:
        with self._lock:
            counter[0] += 1
            counter[1] += int((time.perf_counter() - start) * 1e9)
            self._items += items
            self._last_ms = int(time.time() * 1000)

    def _check(self, inputs: dict[str, np.ndarray]) -> None:
        declared = {t.name: t for t in self.inputs}
        unknown = sorted(set(inputs) - set(declared))
        missing = sorted(t.name for t in self.inputs if not t.optional and t.name not in inputs)
        if unknown or missing:
            raise ProtocolError(f"model '{self.name}' takes inputs {sorted(declared)} (missing: {missing or 'none'}, "
                                f"unexpected: {unknown or 'none'}).")
        for name, array in inputs.items():
            t = declared[name]
            want = list(t.shape)
            if datatype_of(array.dtype) != t.datatype:
                raise ProtocolError(f"model '{self.name}': input '{name}' must be {t.datatype}, "
                                    f"got {datatype_of(array.dtype)}.")
            if array.ndim != len(want) or any(w not in (-1, g) for w, g in zip(want, array.shape)):
                raise ProtocolError(f"model '{self.name}': input '{name}' must have shape {want} (-1: any size), "
                                    f"got {list(array.shape)}.")
            if self.max_batch_size and not 0 < array.shape[0] <= self.max_batch_size:
                raise ProtocolError(f"model '{self.name}': a batch of {array.shape[0]} rows; send 1 to "
                                    f"{self.max_batch_size} (its max_batch_size).")

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            success, fail, items, last = list(self._success), list(self._fail), self._items, self._last_ms
        zero = {"count": 0, "ns": 0}
        # As in Triton, every successful request counts once in queue and in each compute stage (perf_analyzer
        # finds the model's version by its queue count growing, and refuses compute counts that differ); the time
        # is all in compute_infer, as this model does not split its stages.
        passed = {"count": success[0], "ns": 0}
        return {"name": self.name, "version": VERSION, "last_inference": last, "inference_count": items,
                "execution_count": success[0],
                "inference_stats": {"success": {"count": success[0], "ns": success[1]},
                                    "fail": {"count": fail[0], "ns": fail[1]}, "queue": dict(passed),
                                    "compute_input": dict(passed), "compute_infer": {"count": success[0],
                                                                                     "ns": success[1]},
                                    "compute_output": dict(passed), "cache_hit": dict(zero),
                                    "cache_miss": dict(zero)},
                "batch_stats": []}


class GraphModel(ServedModel):
    """A graph of the bundle as it is: named tensors in, named tensors out."""

    backend = "onnxruntime"
    platform = "onnxruntime_onnx"

    def __init__(self, role: str, manifest: Any, backend: Backend, *, max_delay_ms: float, instances: int):
        inputs, outputs, batches = graph_tensors(manifest.graphs[role], known_sizes(manifest))
        self.graph_backend = backend
        self._batcher = backend if isinstance(backend, BatchedBackend) else None
        super().__init__(role, inputs, outputs, max_batch_size=self._batcher.max_batch if self._batcher else 0)
        self._max_delay_ms, self._instances = max_delay_ms, instances
        if batches and not self._batcher:  # it could batch, but is served call by call (the decoder step)
            self.max_batch_size = 0

    def config(self) -> dict[str, Any]:
        return model_config(self.name, self.inputs, self.outputs, max_batch_size=self.max_batch_size,
                            platform=self.platform, backend=self.backend,
                            max_delay_ms=self._max_delay_ms if self._batcher else None, instances=self._instances)

    def _infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        return dict(self.graph_backend.infer(inputs))

    def statistics(self) -> dict[str, Any]:
        out = super().statistics()
        if self._batcher is None:
            return out
        s = self._batcher.stats  # every call of the graph: this route's and those of classify, embed_*, …
        stats = out["inference_stats"]
        out["inference_count"] = s.rows
        stats["success"] = {"count": s.requests - s.failures, "ns": s.request_ns}
        stats["fail"] = {"count": s.failures, "ns": 0}
        stats["queue"] = {"count": s.requests, "ns": s.queue_ns}
        stats["compute_infer"] = {"count": s.executions, "ns": s.compute_ns}
        stats["compute_input"] = {"count": s.executions, "ns": 0}  # the same count in every stage (perf_analyzer)
        stats["compute_output"] = {"count": s.executions, "ns": 0}
        out["execution_count"] = s.executions
        out["batch_stats"] = [
            {"batch_size": rows, "compute_input": {"count": runs, "ns": 0},
             "compute_infer": {"count": runs, "ns": ns}, "compute_output": {"count": runs, "ns": 0}}
            for rows, (runs, ns) in sorted(s.batch_sizes.items())]
        return out


# -- models with preprocessing -------------------------------------------------------------

_IMAGE = ServedTensor("image", "BYTES", (-1,), optional=True)  # encoded images (JPEG, PNG, …), one per element
_FRAMES = ServedTensor("frames", "UINT8", (-1, -1, -1, -1), optional=True)  # (N, H, W, C) pixels; C = 1, 3 or 4


def _text_list(array: np.ndarray, name: str) -> list[str]:
    try:
        return [bytes(x).decode("utf-8") for x in array.reshape(-1)]
    except (UnicodeDecodeError, TypeError):
        raise ProtocolError(f"input '{name}' must hold UTF-8 text.") from None


def _parameter(parameters: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = parameters.get(key, default)
    if value is not default and (not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)):
        raise ProtocolError(f"request parameter '{key}' must be {kind.__name__}, got {value!r}.")
    return value


class _ImageModel(ServedModel):
    """A model that takes images: ``image`` (encoded, BYTES) or ``frames`` (UINT8 pixels), exactly one."""

    def __init__(self, name: str, model: Any, inputs: list[ServedTensor], outputs: list[ServedTensor],
                 max_items: int):
        super().__init__(name, inputs, outputs)
        self.model, self.max_items = model, max_items

    def _images(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> list[np.ndarray]:
        from edgemm.runtime.image import decode_image, to_rgb

        given = [name for name in ("image", "frames") if name in inputs]
        if len(given) != 1:
            raise ProtocolError(f"model '{self.name}' takes either 'image' (encoded images as BYTES) or 'frames' "
                                f"(UINT8 pixels, N x H x W x C); got {given or 'neither'}.")
        array = inputs[given[0]]
        if not 0 < len(array) <= self.max_items:
            raise ProtocolError(f"model '{self.name}': send 1 to {self.max_items} images per request, "
                                f"got {len(array)}.", 413 if len(array) else 400)
        if given[0] == "image":
            return [decode_image(bytes(b), f"image[{i}]") for i, b in enumerate(array)]
        color = _parameter(parameters, "color", str, "bgr")
        return [to_rgb(frame, color, where=f"frames[{i}]") for i, frame in enumerate(array)]

    def _items_of(self, inputs: dict[str, np.ndarray]) -> int:
        return len(inputs.get("image", inputs.get("frames", ())))


class ClassifyModel(_ImageModel):
    """``model.classify``: images and (optionally) labels in; the top-k labels and scores per image out."""

    @staticmethod
    def signature(dim: int) -> tuple[list[ServedTensor], list[ServedTensor]]:
        return ([_IMAGE, _FRAMES, ServedTensor("labels", "BYTES", (-1,), optional=True),
                 ServedTensor("top_k", "INT32", (1,), optional=True)],
                [ServedTensor("labels", "BYTES", (-1, -1)), ServedTensor("scores", "FP32", (-1, -1))])

    def __init__(self, model: Any, max_items: int):
        super().__init__("classify", model, *self.signature(model.dim), max_items)

    def _infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        images = self._images(inputs, parameters)
        labels = _text_list(inputs["labels"], "labels") if "labels" in inputs else None
        top_k = int(inputs["top_k"][0]) if "top_k" in inputs else 5
        found = self.model.classify(images, labels, top_k=top_k, color="rgb")
        names = np.array([[p.label.encode() for p in row] for row in found], dtype=object)
        scores = np.array([[p.score for p in row] for row in found], dtype=np.float32)
        return {"labels": names, "scores": scores}


class EmbedImageModel(_ImageModel):
    """``model.embed_images``: images in, L2-normalised embeddings out."""

    @staticmethod
    def signature(dim: int) -> tuple[list[ServedTensor], list[ServedTensor]]:
        return [_IMAGE, _FRAMES], [ServedTensor("embedding", "FP32", (-1, dim))]

    def __init__(self, model: Any, max_items: int):
        super().__init__("embed_image", model, *self.signature(model.dim), max_items)

    def _infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"embedding": self.model.embed_images(self._images(inputs, parameters), color="rgb")}


class EmbedTextModel(ServedModel):
    """``model.embed_texts``: UTF-8 texts in, L2-normalised embeddings out."""

    @staticmethod
    def signature(dim: int) -> tuple[list[ServedTensor], list[ServedTensor]]:
        return [ServedTensor("text", "BYTES", (-1,))], [ServedTensor("embedding", "FP32", (-1, dim))]

    def __init__(self, model: Any, max_items: int):
        super().__init__("embed_text", *self.signature(model.dim))
        self.model, self.max_items = model, max_items

    def _infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        texts = _text_list(inputs["text"], "text")
        if not 0 < len(texts) <= self.max_items:
            raise ProtocolError(f"model 'embed_text': send 1 to {self.max_items} texts per request, got {len(texts)}.",
                                413 if texts else 400)
        return {"embedding": self.model.embed_texts(texts)}

    def _items_of(self, inputs: dict[str, np.ndarray]) -> int:
        return len(inputs["text"])


class CaptionModel(_ImageModel):
    """``captioner.caption``: images (and an optional prompt) in; captions and their scores out.

    Request parameters ``max_new_tokens`` and ``num_beams`` override the bundle's decoding settings.
    """

    @staticmethod
    def signature(dim: int) -> tuple[list[ServedTensor], list[ServedTensor]]:
        return ([_IMAGE, _FRAMES, ServedTensor("prompt", "BYTES", (1,), optional=True)],
                [ServedTensor("caption", "BYTES", (-1,)), ServedTensor("score", "FP32", (-1,))])

    def __init__(self, model: Any, max_items: int):
        super().__init__("caption", model, *self.signature(0), max_items)

    def _infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        images = self._images(inputs, parameters)
        prompt = _text_list(inputs["prompt"], "prompt")[0] if "prompt" in inputs else None
        found = self.model.caption(images, prompt=prompt, color="rgb",
                                   max_new_tokens=_parameter(parameters, "max_new_tokens", int, None),
                                   num_beams=_parameter(parameters, "num_beams", int, None))
        return {"caption": np.array([c.text.encode() for c in found], dtype=object),
                "score": np.array([c.score for c in found], dtype=np.float32)}


# -- the repository --------------------------------------------------------------------------


class _Policy:
    """How the server batches the bundle's graphs: every graph that batches, except a captioner's decoder step
    (its calls carry a growing cache and run on device-bound paths), and text inputs padded to merge."""

    def __init__(self, max_batch: int, max_delay_ms: float, workers: int):
        self.max_batch, self.max_delay_ms, self.workers = max_batch, max_delay_ms, workers
        self.opened: dict[str, Backend] = {}

    def __call__(self, role: str, bundle: Bundle, backend: Backend) -> Backend:
        m = bundle.manifest
        _, _, batches = graph_tensors(m.graphs[role])
        decoder = m.generation is not None and role == CAPTION_DECODER
        if batches and not decoder:
            backend = BatchedBackend(backend, max_batch=self.max_batch, max_delay_ms=self.max_delay_ms,
                                     workers=self.workers, pad_values=_pad_values(bundle, role), name=role)
        self.opened[role] = backend
        return backend


def _pad_values(bundle: Bundle, role: str) -> dict[str, int]:
    """Inputs of a text graph that requests of different lengths may be right-padded in (as its tokenizer pads)."""
    m, graph = bundle.manifest, bundle.manifest.graphs[role]
    if m.text is None or m.text.padding != "longest":
        return {}
    seq_inputs = {t.name for t in graph.inputs if "seq" in t.shape}
    if not seq_inputs or any("seq" in t.shape for t in graph.outputs):
        return {}  # an output along the sequence would come back padded
    return {name: m.text.pad_id if name == "input_ids" else 0 for name in seq_inputs}


class InferenceServer:
    """A bundle served over the Open Inference Protocol (see the module docstring).

    Args:
        bundle: Bundle directory; ``None``: the built-in model ``default``.
        host: Address to listen on (``127.0.0.1``: this machine only; ``0.0.0.0``: every interface).
        port: TCP port; 0 picks a free one (see :attr:`url`).
        max_batch: Rows one graph run takes at most (Triton's ``max_batch_size``).
        max_delay_ms: How long a request waits for others to share its graph run. 0 (Triton's default too):
            no waiting — a run takes whatever queued while the previous one ran, so batches grow with the
            load and an idle server adds no latency. Measured on 2 cores (``benchmarks/bench_serve.py``),
            a 5 ms wait cost a lone request 7 ms and bought no throughput.
        workers: Graph runs in flight at once per graph (Triton's instance count).
        threads: Intra-op threads per graph; ``None``: the cores shared among the workers.
        providers: ONNX Runtime execution providers.
        backend: ``"onnxruntime"`` or ``"tensorrt"`` (native engines, built on first use; one worker).
        engines: How TensorRT engines are built (see :func:`edgemm.load`).
        default: Which built-in model when ``bundle`` is None (``"default"``, ``"captioner"``, …).
        max_body_bytes: Largest request body taken (after decompression).
        max_items: Images or texts one request to ``classify``, ``embed_*`` or ``caption`` may carry.
        max_connections: Connections served at once; more are answered 503.
        verbose: Log every request to stderr.

    Raises:
        InputError: A bad setting.
        BundleError, BackendError: The bundle cannot be opened.
    """

    def __init__(self, bundle: str | os.PathLike | None = None, *, host: str = "127.0.0.1", port: int = 8000,
                 max_batch: int = 32, max_delay_ms: float = 0.0, workers: int = 1, threads: int | None = None,
                 providers: Sequence[str] = ("cpu",), backend: str = "onnxruntime",
                 engines: EngineOptions | None = None, default: str = "default", max_body_bytes: int = 64 << 20,
                 max_items: int = 256, max_connections: int = 256, verbose: bool = False):
        import edgemm

        if backend == "tensorrt" and workers != 1:
            raise InputError("a TensorRT engine runs one call at a time (its buffers and stream are its own); "
                             "serve it with workers=1 and let the batcher fill its batches.")
        for name, value in (("max_body_bytes", max_body_bytes), ("max_items", max_items),
                            ("max_connections", max_connections), ("workers", workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}.")
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // workers)
        policy = _Policy(max_batch, max_delay_ms, workers)
        with batching(policy):
            self.model = edgemm.load(bundle, default=default, backend=backend, providers=providers, threads=threads,
                                     engines=engines)
        self.bundle: Bundle = self.model.bundle
        self.models: dict[str, ServedModel] = {}
        for role, backend in policy.opened.items():
            self.models[role] = GraphModel(role, self.bundle.manifest, backend,
                                           max_delay_ms=max_delay_ms, instances=workers)
        for served in high_level_models(self.model, max_items):
            self.models[served.name] = served
        if backend == "tensorrt":  # calls that do not pass through a batcher's single worker take turns
            exclusive = threading.Lock()
            for served in self.models.values():
                if not isinstance(served, GraphModel) or served.max_batch_size == 0:
                    served.exclusive = exclusive
        self._batchers = [b for b in policy.opened.values() if isinstance(b, BatchedBackend)]
        self.max_body_bytes, self.verbose = max_body_bytes, verbose
        self._slots = threading.BoundedSemaphore(max_connections)
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self._thread: threading.Thread | None = None
        self._serving = False

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> InferenceServer:
        """Serve on a background thread (returns at once)."""
        self._serving = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="edgemm-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`close` from another thread (or Ctrl-C)."""
        self._serving = True
        self._httpd.serve_forever()

    def close(self) -> None:
        """Stop serving: the listening socket closes, queued graph runs fail, worker threads end."""
        if self._serving:  # shutdown() waits for serve_forever, so only where it ran
            self._httpd.shutdown()
            self._serving = False
        self._httpd.server_close()
        for b in self._batchers:
            b.close()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- what the routes answer ------------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        import edgemm

        return {"name": "edgemm", "version": edgemm.__version__,
                "extensions": ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]}

    def served_model(self, name: str, version: str | None) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise ProtocolError(f"unknown model '{name}'; this server has {sorted(self.models)}.", 404)
        if version not in (None, "", VERSION):
            raise ProtocolError(f"model '{name}' has only version {VERSION}, not {version!r}.", 404)
        return served

    def repository_index(self) -> list[dict[str, str]]:
        return [{"name": name, "version": VERSION, "state": "READY"} for name in sorted(self.models)]


# The models with preprocessing each family gets (fusion and audio-visual bundles serve their graphs only).
HIGH_LEVEL: dict[str, dict[str, Any]] = {
    "dual_encoder": {"classify": ClassifyModel, "embed_image": EmbedImageModel, "embed_text": EmbedTextModel},
    "captioner": {"caption": CaptionModel},
}


def high_level_models(model: Any, max_items: int) -> list[ServedModel]:
    """The family's models with preprocessing, over an opened model."""
    return [cls(model, max_items) for cls in HIGH_LEVEL.get(model.manifest.family, {}).values()]


# -- HTTP ----------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type, app: InferenceServer):
        self.app = app
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.app._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: 39\r\n\r\n"
                                b'{"error": "too many open connections"}\n')
            finally:
                self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app._slots.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests reuse one connection
    server_version = "edgemm"
    timeout = 60  # seconds a connection may sit idle or send its body slowly

    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    default_request_version = "HTTP/1.0"  # a request line that cannot be parsed still gets a status line

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (a malformed request line, oversized headers) as protocol errors."""
        from http import HTTPStatus

        self.close_connection = True
        self._send(code, error_body(message or HTTPStatus(code).phrase))

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def _answer(self, method: str) -> None:
        app = self.server.app
        try:
            body = self._read_body() if method == "POST" else b""
            self._route(app, method, self.path.split("?", 1)[0].rstrip("/") or "/", body)
        except ProtocolError as e:
            self._send(e.status, error_body(str(e)))
        except InputError as e:
            self._send(400, error_body(str(e)))
        except (BundleError, BackendError, EdgemmError) as e:
            self._send(500, error_body(str(e)))
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug must cost one request, never the server
            traceback.print_exc(file=sys.stderr)
            self._send(500, error_body(f"internal error ({type(e).__name__}: {e}); please report it."))

    def _route(self, app: InferenceServer, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path == "/v2":
            return self._json(app.server_metadata())
        if method == "GET" and path in ("/v2/health/live", "/v2/health/ready"):
            return self._send(200, b"")
        if method == "GET" and path == "/v2/models/stats":
            return self._json({"model_stats": [m.statistics() for _, m in sorted(app.models.items())]})
        if method == "POST" and path == "/v2/repository/index":
            return self._json(app.repository_index())
        match = _MODEL_ROUTE.fullmatch(path)
        if match is None:
            raise ProtocolError(f"no route {method} {path}; see GET /v2 and /v2/models/{{name}}.", 404)
        served = app.served_model(match.group(1), match.group(2))
        action = match.group(3)
        if method == "POST" and action == "/infer":
            return self._infer(served, body)
        if method != "GET" or action == "/infer":
            raise ProtocolError(f"{path} takes {'POST' if action == '/infer' else 'GET'}, not {method}.", 405)
        if action is None:
            return self._json(served.metadata())
        if action == "/ready":
            return self._send(200, b"")
        if action == "/config":
            return self._json(served.config())
        return self._json({"model_stats": [served.statistics()]})

    def _infer(self, served: ServedModel, body: bytes) -> None:
        header = self.headers.get("Inference-Header-Content-Length")
        try:
            header_length = None if header is None else int(header)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length must be an integer, got {header!r}.") from None
        request = decode_request(body, header_length, max_elements=self.server.app.max_body_bytes)
        outputs = served.infer(request.inputs, request.parameters)
        if request.outputs is not None:
            unknown = [name for name in request.outputs if name not in outputs]
            if unknown:
                raise ProtocolError(f"model '{served.name}' has no output {unknown}; it has {sorted(outputs)}.")
        payload, json_length = encode_response(served.name, VERSION, outputs, request)
        extra = {} if json_length is None else {"Inference-Header-Content-Length": str(json_length)}
        self._send(200, payload, "application/octet-stream" if json_length is not None else "application/json",
                   extra)

    def _read_body(self) -> bytes:
        app = self.server.app
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ProtocolError("chunked request bodies are not taken; send a Content-Length.", 411)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ProtocolError("a POST needs a Content-Length header.", 411) from None
        if not 0 <= length <= app.max_body_bytes:
            self._discard(length)
            raise ProtocolError(f"the body is {length:,} bytes, more than this server takes "
                                f"({app.max_body_bytes:,}; edgemm serve --max-body-mb).", 413)
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise ConnectionError("the client closed the connection mid-body")
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding == "identity":
            return body
        if encoding not in ("gzip", "deflate"):
            raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none.", 415)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            out = inflater.decompress(body, app.max_body_bytes + 1)
        except zlib.error as e:
            raise ProtocolError(f"the {encoding} body cannot be decompressed ({e}).") from None
        if len(out) > app.max_body_bytes or inflater.unconsumed_tail:
            raise ProtocolError(f"the body inflates to more than {app.max_body_bytes:,} bytes.", 413)
        if not inflater.eof:
            raise ProtocolError(f"the {encoding} body is truncated.")
        return out

    def _discard(self, length: int) -> None:
        """Read and drop a refused body of up to twice the limit, so the client sees the 413 rather than a reset
        connection; a larger one is not read, and the connection closes."""
        self.close_connection = True
        left = length if 0 <= length <= 2 * self.server.app.max_body_bytes else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                return
            left -= len(chunk)

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` (curl's way with large bodies): refuse a body over the limit before it is sent."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if length > self.server.app.max_body_bytes:
            self.close_connection = True
            self._send(413, error_body(f"the body is {length:,} bytes, more than this server takes "
                                       f"({self.server.app.max_body_bytes:,})."))
            return False
        return super().handle_expect_100()

    def _json(self, obj: Any) -> None:
        import json

        self._send(200, json.dumps(obj, separators=(",", ":")).encode())

    def _send(self, status: int, payload: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
