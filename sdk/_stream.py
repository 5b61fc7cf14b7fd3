"""Live frames from cameras, files and RTSP through a model: latest-frame readers, micro-batches, smoothing, timing.

    >>> stream = edgemm.Stream(model, sources=["rtsp://cam1/live", 0, "clip.mp4"],
    ...                        labels=["person", "forklift", "pallet"], max_batch=8, max_delay_ms=10)
    >>> with stream:
    ...     for r in stream:
    ...         print(r.source, r.frame_index, r.label, r.latency_ms["total"])
    >>> stream.stats()

One reader thread per source decodes frames and keeps only the newest one
(``realtime``), so when inference is slower than the cameras the frames it
skips are counted as dropped instead of queueing up into seconds of lag. The
iterating thread gathers the sources' newest frames, waits at most
``max_delay_ms`` for the others, and runs them through the image graph as one
batch of up to ``max_batch``; a slow, dead or reconnecting camera is simply not
in the batch. Label probabilities are smoothed per source (an exponential
moving average, and ``hold``: a new label must lead for that many frames before
it is reported). With a captioner, every frame runs the image graph, and the
decoder runs only when the frame's scene embedding has moved away from the one
last captioned.

Sources: a camera index (``0``), a video file, an ``rtsp://`` / ``http(s)://``
/ ``udp://`` URL (OpenCV's FFmpeg backend, with open and read timeouts), a
GStreamer pipeline ending in ``appsink`` (OpenCV's GStreamer backend, where the
OpenCV build has one), an object with OpenCV's ``read() -> (ok, frame)``
(``release()`` optional), or a zero-argument callable returning one (called
again to reconnect). Live sources reconnect with exponential backoff; a file
ends its source at its end. Errors are results with ``error`` set, never
exceptions from a background thread.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgemm._caption import Caption, Captioner
from edgemm._model import DualEncoder, Prediction, _check_labels, _check_positive_int
from edgemm.runtime.errors import EdgemmError, InputError
from edgemm.runtime.limits import LIMITS

STAGES = ("decode", "wait", "preprocess", "inference", "postprocess", "total")
_URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
_SAMPLES_KEPT = 4096  # per stage and source: enough for a p99 over the last minutes at camera rates
_RATE_WINDOW = 120  # frames over which fps is measured
_OPEN_TIMEOUT_MS = 10_000  # OpenCV's FFmpeg backend: how long an RTSP/HTTP open may take
_READ_TIMEOUT_MS = 5_000  # ... and one read, so a camera that stops is noticed and reconnected
_JOIN_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class StreamResult:
    """One processed frame of one source (or, with ``error`` set, something that went wrong with the source)."""

    source: str  # the source as given (a camera index as its number's text)
    source_index: int  # its place in ``sources``
    frame_index: int  # the frame's number in its source, from 0, counting frames dropped before it
    timestamp: float  # time.time() when the frame was read
    predictions: list[Prediction] = field(default_factory=list)  # smoothed label probabilities, best first
    label: str | None = None  # the label held by hysteresis (``hold``); None before the first frame
    caption: Caption | None = None  # a captioner's caption of the current scene
    recaptioned: bool = False  # the caption was decoded for this frame (the scene changed)
    latency_ms: dict[str, float] = field(default_factory=dict)  # decode, wait, preprocess, inference, ...
    frame: np.ndarray | None = None  # the frame itself (BGR uint8), for overlays
    error: str | None = None  # what went wrong; the other fields are then empty

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Frame:
    image: np.ndarray
    index: int
    timestamp: float  # wall clock when read
    ready: float  # perf_counter when the decoder returned it
    decode_ms: float


class _Percentiles:
    """The last ``_SAMPLES_KEPT`` milliseconds of each stage."""

    def __init__(self) -> None:
        self.samples: dict[str, deque[float]] = {stage: deque(maxlen=_SAMPLES_KEPT) for stage in STAGES}

    def add(self, latency: dict[str, float]) -> None:
        for stage, ms in latency.items():
            self.samples[stage].append(ms)

    def summary(self) -> dict[str, dict[str, float] | None]:
        out: dict[str, dict[str, float] | None] = {}
        for stage, values in self.samples.items():
            if values:
                p50, p90, p99 = np.percentile(np.fromiter(values, np.float64), (50, 90, 99))
                out[stage] = {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3)}
            else:
                out[stage] = None
        return out


def _rate(times: deque) -> float | None:
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return round((len(times) - 1) / (times[-1] - times[0]), 2)


def _check_number(value: Any, name: str, *, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '≥'} {low}" + (f" and ≤ {high}" if high != math.inf else "")
        raise InputError(f"{name} must be a number {bound}, got {value!r}.")
    return float(value)


def _gstreamer_available() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return line.split(":", 1)[1].strip().upper().startswith("YES")
    return False


class _Source:
    """How to open one source, whether it is live, and its name."""

    def __init__(self, spec: Any, index: int):
        self.index = index
        self.spec = spec
        self.is_file = False
        self.reopenable = True
        if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            self.kind, self.name = "camera", str(int(spec))
        elif isinstance(spec, (str, os.PathLike)):
            text = os.fspath(spec)
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"source {index} is {spec!r}; pass a camera index, a video file, a URL or a "
                                 "GStreamer pipeline.")
            self.name = text
            if text.isdigit():
                self.kind, self.spec = "camera", int(text)
            elif "!" in text:
                if not _gstreamer_available():
                    raise InputError(f"source {index} is a GStreamer pipeline, but this OpenCV was built without "
                                     "GStreamer (cv2.getBuildInformation()). Use an OpenCV built with it (on a "
                                     "Jetson, JetPack's python3-opencv), or pass an object with read() that pulls "
                                     "frames from your appsink (docs/streams.md).")
                self.kind = "gstreamer"
            elif text.lower().startswith(_URL_SCHEMES):
                self.kind = "url"
            elif os.path.isfile(text):
                self.kind, self.is_file = "file", True
            else:
                raise InputError(f"source {index} {text!r} is not a video file, a camera index, a URL "
                                 f"({', '.join(s[:-3] for s in _URL_SCHEMES)}) or a GStreamer pipeline.")
        elif callable(getattr(spec, "read", None)):
            self.kind, self.name, self.reopenable = "reader", f"{type(spec).__name__}#{index}", False
        elif callable(spec):
            self.kind, self.name = "factory", getattr(spec, "__name__", f"source#{index}")
        else:
            raise InputError(f"source {index} is a {type(spec).__name__}; pass a camera index, a video file, a URL, "
                             "a GStreamer pipeline, an object with read() -> (ok, frame), or a callable returning "
                             "one.")

    def open(self) -> Any:
        """An opened reader, or raises EdgemmError saying why not."""
        import cv2

        if self.kind == "reader":
            return self.spec
        if self.kind == "factory":
            reader = self.spec()
            if not callable(getattr(reader, "read", None)):
                raise InputError(f"source {self.name}: the callable returned a {type(reader).__name__}, which has "
                                 "no read() method.")
            return reader
        if self.kind == "url":
            capture = cv2.VideoCapture(self.spec, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _OPEN_TIMEOUT_MS,
                                                                   cv2.CAP_PROP_READ_TIMEOUT_MSEC, _READ_TIMEOUT_MS])
        elif self.kind == "gstreamer":
            capture = cv2.VideoCapture(self.spec, cv2.CAP_GSTREAMER)
        else:
            capture = cv2.VideoCapture(self.spec)
        if not capture.isOpened():
            capture.release()
            what = {"file": "OpenCV cannot decode this file", "camera": "no such camera, or it is busy",
                    "url": "nothing answered, or the stream is not video", "gstreamer": "the pipeline failed"}
            raise EdgemmError(f"cannot open {self.name!r} ({what[self.kind]}).")
        return capture

    def fps(self, reader: Any) -> float:
        """The file's frame rate (30 when it does not say), for pacing a file like a camera."""
        import cv2

        try:
            fps = float(reader.get(cv2.CAP_PROP_FPS))
        except Exception:  # a user's reader without get()
            fps = 0.0
        return fps if math.isfinite(fps) and 1.0 <= fps <= 1000.0 else 30.0


def _on_gpu(model: DualEncoder | Captioner) -> bool:
    """Whether the model's image graph runs on a GPU (TensorRT engines, or a CUDA/TensorRT provider first)."""
    backend = model.encoder_backend if isinstance(model, Captioner) else model.image_backend
    providers = tuple(model._backend_options.get("providers", ()))
    return getattr(backend, "name", "") == "tensorrt" or (bool(providers) and providers[0] in ("cuda", "tensorrt"))


def _check_frame(frame: Any) -> str | None:
    """Why a decoded frame cannot be used, or None."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        return f"the reader returned a {type(frame).__name__}" + (f" of {frame.dtype}" if isinstance(frame, np.ndarray)
                                                                  else "") + ", not a uint8 array"
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)) or 0 in frame.shape:
        return f"the reader returned a frame of shape {frame.shape}, not HxW, HxWx3 or HxWx4"
    if frame.shape[0] * frame.shape[1] > LIMITS.max_image_pixels:
        return (f"a {frame.shape[1]}x{frame.shape[0]} frame is larger than edgemm.limits.max_image_pixels="
                f"{LIMITS.max_image_pixels}; {LIMITS.hint('max_image_pixels')}")
    return None


class _Reader(threading.Thread):
    """One source's thread: open, read, keep the newest frame, reconnect."""

    def __init__(self, stream: Stream, source: _Source, realtime: bool):
        super().__init__(name=f"edgemm-stream-{source.index}", daemon=True)
        self.stream, self.source, self.realtime = stream, source, realtime
        self.pending: _Frame | None = None
        self.state = "opening"
        self.frames_read = self.frames_processed = self.frames_dropped = self.frames_skipped = 0
        self.reconnects = self.errors = 0
        self.last_error: str | None = None
        self.read_times: deque[float] = deque(maxlen=_RATE_WINDOW)
        self.processed_times: deque[float] = deque(maxlen=_RATE_WINDOW)
        self.latency = _Percentiles()
        self.last_taken = -math.inf  # perf_counter of the last frame taken (``every``)
        self.generation = 0  # bumped at every reconnect: the smoother starts again

    @property
    def finished(self) -> bool:
        return self.state in ("ended", "failed")

    def run(self) -> None:
        s = self.stream
        failures = 0
        try:
            while not s._stop.is_set():
                try:
                    reader = self.source.open()
                except Exception as e:  # a user's factory may raise anything; the stream must carry on
                    self._error(f"{e}" if isinstance(e, EdgemmError) else f"opening failed: {type(e).__name__}: {e}")
                    if self.source.is_file or not self.source.reopenable:
                        self._finish("failed")
                        return
                    failures += 1
                    if not self._backoff(failures):
                        return
                    continue
                if self.frames_read:
                    self.reconnects += 1
                    self.generation += 1
                self._set_state("live")
                got_any = self._read_all(reader)
                if got_any:
                    failures = 0
                if self.source.kind != "reader":  # a reader object the caller passed stays theirs to release
                    try:
                        getattr(reader, "release", lambda: None)()
                    except Exception:  # a failing release must not end the reconnect loop
                        pass
                if s._stop.is_set():
                    break
                if self.source.is_file:
                    self._finish("ended")
                    return
                if not self.source.reopenable:
                    self._error("the reader returned no frame; it cannot be reopened, so the source ends.")
                    self._finish("ended")
                    return
                failures += 1
                self._error(f"no frame from {self.source.name!r}; reconnecting.")
                if not self._backoff(failures):
                    return
        finally:
            if not self.finished:
                self._finish("ended")

    def _read_all(self, reader: Any) -> bool:
        """Read until the source fails or the stream stops; whether any frame came."""
        s = self.stream
        pace = self.source.fps(reader) if self.source.is_file and self.realtime else None
        started = time.perf_counter()
        first_index = self.frames_read
        next_due = 0.0
        got_any = False
        while not s._stop.is_set():
            t0 = time.perf_counter()
            try:
                ok, image = reader.read()
            except Exception as e:
                self._error(f"reading failed: {type(e).__name__}: {e}")
                return got_any
            t1 = time.perf_counter()
            if not ok or image is None:
                return got_any
            got_any = True
            problem = _check_frame(image)
            if problem:
                self._error(f"{problem}; the frame is skipped.")
                self._count_read(skipped=True)
                continue
            if pace is not None:  # a file played as a camera: no faster than its frame rate
                due = started + (self.frames_read - first_index) / pace
                if due > t1 and s._stop.wait(due - t1):
                    return got_any
            if s.every_s and not self.realtime and self.source.is_file:  # the first frame at or after each k·every s
                position = (self.frames_read - first_index) / self.source.fps(reader)
                if position + 1e-9 < next_due:
                    self._count_read(skipped=True)
                    continue
                next_due = (math.floor(position / s.every_s + 1e-9) + 1) * s.every_s
            self._put(_Frame(image, self.frames_read, time.time(), time.perf_counter(), (t1 - t0) * 1e3))
        return got_any

    def _count_read(self, *, skipped: bool) -> None:
        with self.stream._cond:
            self.frames_read += 1
            self.frames_skipped += skipped
            self.read_times.append(time.perf_counter())

    def _put(self, frame: _Frame) -> None:
        s = self.stream
        with s._cond:
            if not self.realtime:  # offline: wait for the batcher to take the previous frame
                while self.pending is not None and not s._stop.is_set():
                    s._cond.wait(0.1)
                if s._stop.is_set():  # closed meanwhile: the frame was never offered, so it is not counted
                    return
            if self.pending is not None:  # replaced unseen: dropped, or skipped when ``every`` held it back
                if s.every_s and frame.ready - self.last_taken < s.every_s:
                    self.frames_skipped += 1
                else:
                    self.frames_dropped += 1
            self.pending = frame
            self.frames_read += 1
            self.read_times.append(frame.ready)
            s._cond.notify_all()

    def _error(self, message: str) -> None:
        s = self.stream
        with s._cond:
            self.errors += 1
            self.last_error = message
            s._events.append(StreamResult(self.source.name, self.source.index, self.frames_read, time.time(),
                                          error=message))
            s._cond.notify_all()

    def _set_state(self, state: str) -> None:
        with self.stream._cond:
            self.state = state
            self.stream._cond.notify_all()

    def _finish(self, state: str) -> None:
        self._set_state(state)

    def _backoff(self, failures: int) -> bool:
        """Wait before reconnecting; False when the stream stops or the source has failed too often."""
        s = self.stream
        if s.max_reconnects is not None and failures > s.max_reconnects:
            self._error(f"{self.source.name!r} failed {failures} times in a row; giving up "
                        f"(max_reconnects={s.max_reconnects}).")
            self._finish("failed")
            return False
        self._set_state("reconnecting")
        delay = min(s.backoff[1], s.backoff[0] * 2 ** (failures - 1))
        return not s._stop.wait(delay)

    def stats(self) -> dict[str, Any]:
        return {
            "source": self.source.name, "state": self.state,
            "frames_read": self.frames_read, "frames_processed": self.frames_processed,
            "frames_dropped": self.frames_dropped, "frames_skipped": self.frames_skipped,
            "pending": int(self.pending is not None), "reconnects": self.reconnects, "errors": self.errors,
            "last_error": self.last_error, "fps_read": _rate(self.read_times),
            "fps_processed": _rate(self.processed_times), "latency_ms": self.latency.summary(),
        }


class _Smoother:
    """EMA of one source's label probabilities, and the label held until another leads for ``hold`` frames."""

    def __init__(self, smoothing: float, hold: int):
        self.smoothing, self.hold = smoothing, hold
        self.probs: np.ndarray | None = None
        self.label: int | None = None
        self.candidate: int | None = None
        self.count = 0
        self.generation = -1

    def update(self, probs: np.ndarray, generation: int) -> tuple[np.ndarray, int]:
        if generation != self.generation or self.probs is None:  # a new source or a reconnected one
            self.probs, self.label, self.candidate, self.count = probs.copy(), None, None, 0
            self.generation = generation
        else:
            self.probs = self.smoothing * self.probs + (1.0 - self.smoothing) * probs
        best = int(np.argmax(self.probs))
        if self.label is None:
            self.label = best
        elif best == self.label:
            self.candidate, self.count = None, 0
        else:
            self.count = self.count + 1 if best == self.candidate else 1
            self.candidate = best
            if self.count >= self.hold:
                self.label, self.candidate, self.count = best, None, 0
        return self.probs, self.label


class Stream:
    """Frames from one or many sources through a model, batched across sources, smoothed and timed.

    Args:
        model: A :class:`~edgemm.DualEncoder` (zero-shot labels) or a :class:`~edgemm.Captioner`
            (captions, re-decoded when the scene changes).
        sources: Camera indices, video files, URLs, GStreamer pipelines, reader objects or
            factories (see the module docstring).
        labels: Candidate labels for a dual encoder; the bundle's when ``None``.
        top_k: Predictions per result.
        max_batch: Frames per graph run at most (one per source per run). ``None``: 8 when the
            model runs on a GPU (CUDA or TensorRT), 1 on the CPU, where batching 8 cameras bought
            4% more frames at 3× the latency on 2 cores (``benchmarks/bench_stream.py``).
        max_delay_ms: How long the first ready frame waits for other sources' frames.
        smoothing: Weight of the previous smoothed probabilities, in [0, 1); 0 turns smoothing off.
        hold: Frames a new label must lead before ``label`` switches to it (1: at once).
        realtime: Keep only the newest frame of each source and drop the rest (files are then
            played at their frame rate, like a camera). ``False`` processes every frame, as fast
            as the model goes (offline). ``None``: ``True`` for cameras and URLs, ``False`` for files.
        every: Process at most one frame per source every this many seconds (files offline:
            every this many seconds of video); the frames between are counted as skipped.
        scene_threshold: Captioner only: the cosine distance between the frame's scene embedding
            and the last captioned one above which the frame is captioned again.
        reconnect_backoff: ``(first, longest)`` seconds between reconnection attempts (doubling).
        max_reconnects: Failed attempts in a row before a source is given up; ``None``: never.
        keep_frames: Put each frame in its result (for overlays); off saves holding them.
        color: Channel order of the readers' 3-channel frames (OpenCV's: ``"bgr"``).
        caption_settings: Captioner only: decoding settings for :meth:`~edgemm.Captioner.caption`.

    Raises:
        InputError: A bad source or setting (checked before any thread starts).
    """

    def __init__(self, model: DualEncoder | Captioner, sources: Sequence[Any], *, labels: Sequence[str] | None = None,
                 top_k: int = 3, max_batch: int | None = None, max_delay_ms: float = 10.0, smoothing: float = 0.6,
                 hold: int = 1, realtime: bool | None = None, every: float | None = None,
                 scene_threshold: float = 0.15, reconnect_backoff: tuple[float, float] = (0.5, 10.0),
                 max_reconnects: int | None = None, keep_frames: bool = True, color: str = "bgr",
                 caption_settings: dict[str, Any] | None = None):
        if isinstance(model, Captioner):
            if model.answers_questions:
                raise InputError("Stream captions frames; this model answers questions (call answer() per frame).")
            self.labels: tuple[str, ...] = ()
            self._caption_settings = model._settings(dict(caption_settings or {}))
        elif isinstance(model, DualEncoder):
            self.labels = _check_labels(model.default_labels if labels is None else labels)
            if caption_settings:
                raise InputError("caption_settings is for a captioner; this model classifies.")
        else:
            raise InputError(f"Stream takes a dual encoder or a captioner, got {type(model).__name__}.")
        if isinstance(sources, (str, os.PathLike, int)) or not isinstance(sources, Sequence):
            raise InputError("sources must be a list, e.g. sources=[0] or sources=['rtsp://cam1/live'].")
        if not sources:
            raise InputError("sources is empty; pass at least one camera, file or URL.")
        self.model = model
        self.sources = [_Source(spec, i) for i, spec in enumerate(sources)]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise InputError(f"a source appears twice in {names}; each camera needs one reader.")
        self.top_k = _check_positive_int(top_k, "top_k")
        self.max_batch = (8 if _on_gpu(model) else 1) if max_batch is None else _check_positive_int(max_batch,
                                                                                                   "max_batch")
        self.max_delay_s = _check_number(max_delay_ms, "max_delay_ms", low=0, high=10_000) / 1e3
        self.smoothing = _check_number(smoothing, "smoothing", low=0, high=0.999)
        self.hold = _check_positive_int(hold, "hold")
        if realtime is not None and not isinstance(realtime, bool):
            raise InputError(f"realtime must be True, False or None, got {realtime!r}.")
        self.every_s = None if every is None else _check_number(every, "every", low=0, low_open=True)
        self.scene_threshold = _check_number(scene_threshold, "scene_threshold", low=0, high=2)
        if not (isinstance(reconnect_backoff, (tuple, list)) and len(reconnect_backoff) == 2):
            raise InputError(f"reconnect_backoff must be (first, longest) seconds, got {reconnect_backoff!r}.")
        first = _check_number(reconnect_backoff[0], "reconnect_backoff[0]", low=0, low_open=True, high=3600)
        longest = _check_number(reconnect_backoff[1], "reconnect_backoff[1]", low=first, high=3600)
        self.backoff = (first, longest)
        if max_reconnects is not None:
            if isinstance(max_reconnects, bool) or not isinstance(max_reconnects, int) or max_reconnects < 0:
                raise InputError(f"max_reconnects must be a whole number ≥ 0 or None, got {max_reconnects!r}.")
        self.max_reconnects = max_reconnects
        if color not in ("bgr", "rgb"):
            raise InputError(f"color must be 'bgr' or 'rgb', got {color!r}.")
        self.color, self.keep_frames = color, bool(keep_frames)
        if self.labels:
            model.label_weights(self.labels)  # embedded once, before the first frame
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._events: deque[StreamResult] = deque(maxlen=1024)  # error results not yet taken; the oldest go first
        self._readers = [_Reader(self, s, (not s.is_file) if realtime is None else realtime) for s in self.sources]
        self._smoothers = [_Smoother(self.smoothing, self.hold) for _ in self.sources]
        self._scenes: list[tuple[np.ndarray, Caption] | None] = [None] * len(self.sources)
        self._batches = self._batched_frames = 0
        self._started: float | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Stream:
        """Start the reader threads (iterating starts them too)."""
        if self._closed:
            raise InputError("this stream is closed; make a new Stream.")
        if self._started is None:
            self._started = time.perf_counter()
            for reader in self._readers:
                reader.start()
        return self

    def close(self) -> None:
        """Stop every reader and release the sources; safe to call twice."""
        self._closed = True
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for reader in self._readers:
            if reader.is_alive():
                reader.join(_JOIN_TIMEOUT_S)  # a blocked read returns within OpenCV's read timeout at worst

    def __enter__(self) -> Stream:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[StreamResult]:
        """Results as frames are processed, until every source has ended or the stream is closed."""
        return self.results()

    def results(self, *, max_results: int | None = None, duration: float | None = None) -> Iterator[StreamResult]:
        """Results until every source has ended, the stream is closed, ``max_results`` frames were
        processed, or ``duration`` seconds have passed (even with no frame coming).

        Raises:
            InputError: A bad ``max_results`` or ``duration``.
        """
        if max_results is not None:
            _check_positive_int(max_results, "max_results")
        until = None if duration is None else time.perf_counter() + _check_number(duration, "duration", low=0)
        self.start()
        count = 0
        try:
            while max_results is None or count < max_results:
                events, batch = self._next(until)
                yield from events
                if batch is None:
                    return
                for result in self._process(batch) if batch else ():
                    count += 1
                    yield result
                    if count == max_results:
                        return
        except GeneratorExit:  # the caller stopped iterating: the stream stays open for another loop
            raise
        except BaseException:  # Ctrl-C or an inference error: no reader left behind
            self.close()
            raise

    # -- batching -------------------------------------------------------------------------

    def _next(self, until: float | None) -> tuple[list[StreamResult], list[tuple[_Reader, _Frame]] | None]:
        """Queued error results, and the next batch (None when nothing more can come, or at ``until``)."""
        with self._cond:
            deadline = None
            while True:
                if self._events:
                    events = list(self._events)
                    self._events.clear()
                    return events, []
                now = time.perf_counter()
                if self._stop.is_set() or (until is not None and now >= until):
                    return [], None
                ready = [r for r in self._readers if r.pending is not None and self._due(r, now)]
                if not ready and all(r.finished and r.pending is None for r in self._readers):
                    return [], None
                if ready:
                    if deadline is None:
                        deadline = now + self.max_delay_s
                    coming = [r for r in self._readers if r.pending is None and r.state == "live"]
                    if len(ready) >= self.max_batch or not coming or now >= deadline:
                        frames = sorted(((r, r.pending) for r in ready if r.pending is not None),
                                        key=lambda pair: pair[1].ready)  # the longest-waiting frames first
                        batch = frames[: self.max_batch]
                        for r, _ in batch:
                            r.pending = None
                            r.last_taken = now
                        self._cond.notify_all()  # offline readers may read on
                        return [], batch
                    timeout = deadline - now
                else:
                    every = self.every_s or 0.0
                    waits = [r.last_taken + every - now for r in self._readers if r.pending is not None and every]
                    timeout = min(waits) if waits else 0.1
                if until is not None:
                    timeout = min(timeout, until - now)
                self._cond.wait(max(1e-4, min(timeout, 0.1)))

    def _due(self, reader: _Reader, now: float) -> bool:
        """Whether ``every`` lets this live source's frame be taken now."""
        if not self.every_s or (reader.source.is_file and not reader.realtime):
            return True
        return now - reader.last_taken >= self.every_s

    # -- processing -----------------------------------------------------------------------

    def _process(self, batch: list[tuple[_Reader, _Frame]]) -> list[StreamResult]:
        t0 = time.perf_counter()
        images = [f.image for _, f in batch]
        model = self.model
        pixels = model.preprocess(images, color=self.color)
        t1 = time.perf_counter()
        if isinstance(model, Captioner):
            results = self._caption(batch, pixels, t0, t1)
        else:
            results = self._classify(batch, pixels)
        t3 = time.perf_counter()
        out = []
        with self._cond:
            self._batches += 1
            self._batched_frames += len(batch)
            for reader, frame, fields, t_infer in results:
                latency = {"decode": frame.decode_ms, "wait": (t0 - frame.ready) * 1e3,
                           "preprocess": (t1 - t0) * 1e3, "inference": (t_infer - t1) * 1e3,
                           "postprocess": (t3 - t_infer) * 1e3, "total": (t3 - frame.ready) * 1e3}
                latency = {k: round(v, 3) for k, v in latency.items()}
                reader.frames_processed += 1
                reader.processed_times.append(t3)
                reader.latency.add(latency)
                out.append(StreamResult(reader.source.name, reader.source.index, frame.index, frame.timestamp,
                                        latency_ms=latency, frame=frame.image if self.keep_frames else None,
                                        **fields))
        return out

    def _classify(self, batch: list[tuple[_Reader, _Frame]],
                  pixels: np.ndarray) -> list[tuple[_Reader, _Frame, dict[str, Any], float]]:
        """Label probabilities of the batch, smoothed per source; the time the graph finished."""
        model = self.model
        assert isinstance(model, DualEncoder)
        outputs = model.image_backend.infer({"pixels": pixels})
        done = time.perf_counter()
        results = []
        k = min(self.top_k, len(self.labels))
        for (reader, frame), row in zip(batch, model.scores_of(outputs, self.labels)):
            smoothed, held = self._smoothers[reader.source.index].update(row, reader.generation)
            best = np.argsort(-smoothed, kind="stable")[:k]
            predictions = [Prediction(self.labels[j], float(smoothed[j])) for j in best]
            results.append((reader, frame, {"predictions": predictions, "label": self.labels[held]}, done))
        return results

    def _caption(self, batch: list[tuple[_Reader, _Frame]], pixels: np.ndarray, t0: float,
                 t1: float) -> list[tuple[_Reader, _Frame, dict[str, Any], float]]:
        """Run the image graph on every frame; decode the frames whose scene moved since their last caption."""
        model = self.model
        assert isinstance(model, Captioner)
        graphs = model.graphs
        memory = graphs.memory(pixels)
        scene = scene_embeddings(memory)
        fresh = []
        for row, (reader, _) in enumerate(batch):
            last = self._scenes[reader.source.index]
            if last is None or 1.0 - float(scene[row] @ last[0]) > self.scene_threshold:
                fresh.append(row)
        captions: dict[int, Caption] = {}
        if fresh:
            rows = np.asarray(fresh)
            hypotheses = graphs.decode({k: v[rows] for k, v in memory.items()}, self._caption_settings)
            captions = {row: model._caption(h) for row, h in zip(fresh, hypotheses)}
        t2 = time.perf_counter()
        results = []
        for row, (reader, frame) in enumerate(batch):
            if row in captions:
                self._scenes[reader.source.index] = (scene[row], captions[row])
            caption = captions.get(row) or self._scenes[reader.source.index][1]  # type: ignore[index]
            results.append((reader, frame, {"caption": caption, "recaptioned": row in captions}, t2))
        return results

    # -- reporting ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per source: state, frames read / processed / dropped / skipped / pending, reconnects, errors,
        fps read and processed, and p50/p90/p99 milliseconds of every stage; and the batches run.

        ``frames_read == frames_processed + frames_dropped + frames_skipped + pending`` always holds.
        """
        with self._cond:
            return {
                "sources": [r.stats() for r in self._readers],
                "batches": self._batches,
                "mean_batch": round(self._batched_frames / self._batches, 3) if self._batches else None,
                "elapsed_s": round(time.perf_counter() - self._started, 3) if self._started else 0.0,
                "max_batch": self.max_batch, "max_delay_ms": self.max_delay_s * 1e3,
            }

    def __repr__(self) -> str:
        return f"Stream({[s.name for s in self.sources]}, max_batch={self.max_batch})"


def scene_embeddings(memory: dict[str, np.ndarray]) -> np.ndarray:
    """One unit vector per image from a captioner's decoder memory: its first tensor (the first layer's
    cross-attention keys), flattened.

    Measured on the 15 sample photos with the built-in captioner: two different photos are at
    least 0.22 apart (cosine distance), the same photo cropped by 5% at most 0.075; hence the
    default ``scene_threshold`` of 0.15.
    """
    first = np.asarray(next(iter(memory.values())), np.float32)
    flat = first.reshape(first.shape[0], -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
