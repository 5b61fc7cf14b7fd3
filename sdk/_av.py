"""The audio-visual model: frames and sound → labels, zero-shot.

Both towers give probabilities over one class set (ImageNet for the default:
EfficientNet-Lite0 for frames, SoundNet-8 for sound). Frames are pooled over
time, mixed with the audio (late fusion), and the mix is scored against any
label set through the text tower, as :class:`DualEncoder` scores one image.

    >>> model = edgemm.load("bundles/audio-visual")
    >>> result = model.classify_av(frames, "clip.wav", labels=["sea", "traffic", "speech"])
    >>> result.label, result.modalities
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemm._model import FAMILIES, DualEncoder, Prediction, _check_labels, _check_positive_int
from edgemm.runtime.audio import AudioPreprocessor, check_sample_rate, to_mono
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BundleError, InputError
from edgemm.runtime.image import IMAGE_SUFFIXES
from edgemm.runtime.manifest import VIDEO_POOLINGS

POOLINGS = VIDEO_POOLINGS
ATTENTION_TEMPERATURE = 0.5  # nats: a frame one nat less uncertain than another weighs e² ≈ 7× more


@dataclass(frozen=True)
class AVResult:
    """What :meth:`AudioVisual.classify_av` decided, and from what."""

    predictions: list[Prediction]  # best first
    modalities: tuple[str, ...]  # the inputs used: ("video", "audio"), ("video",) or ("audio",)
    missing: tuple[str, ...]  # the inputs that were absent; the result rests on the others alone
    audio_weight: float  # weight the audio got in the mix (0 without audio, 1 without frames)
    frames: int  # frames pooled
    frame_weights: tuple[float, ...]  # each frame's share of the video pooling (sums to 1)
    audio_seconds: float  # length of the audio heard (before tiling), 0 without audio
    scenes: list[Prediction] = ()  # what the audio sounds like among the audio tower's scenes, if it has them

    @property
    def label(self) -> str:
        return self.predictions[0].label

    @property
    def score(self) -> float:
        return self.predictions[0].score


def _check_weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value <= 1.0:
        raise InputError(f"audio_weight must be a number from 0 (frames only) to 1 (audio only), got {value!r}.")
    return float(value)


def _check_pooling(value: Any) -> str:
    if value not in POOLINGS:
        raise InputError(f"pooling must be one of {POOLINGS}, got {value!r}.")
    return value


def _frame_size(frame: Any) -> tuple[int, int] | None:
    if isinstance(frame, np.ndarray):
        return frame.shape[:2] if frame.ndim >= 2 else None
    size = getattr(frame, "size", None)  # PIL: (width, height)
    return (size[1], size[0]) if isinstance(size, tuple) and len(size) == 2 else None


def pool_frames(probs: np.ndarray, pooling: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Pool per-frame class probabilities (F, C) over time.

    ``"attention"`` weighs each frame by a softmax of its negative entropy:
    confident frames (the object in view and in focus) count more than
    blurred or empty ones.

    Returns:
        The pooled distribution (C,) and the frame weights (F,).
    """
    pooling = _check_pooling(pooling)
    if pooling == "mean":
        weights = np.full(len(probs), 1.0 / len(probs))
    else:
        entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(axis=1)
        logits = -entropy / ATTENTION_TEMPERATURE
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
    return (weights[:, None] * probs).sum(axis=0), weights


class AudioVisual(DualEncoder):
    """Frames + sound → labels: a dual encoder with an audio tower in its class space.

    Args:
        bundle: An opened bundle of family ``audio_visual``.
        backend: Backend name (``"onnxruntime"``).
        providers: Execution providers for ONNX Runtime, e.g. ``("cpu",)`` or ``("cuda",)``.
        threads: Intra-op threads per graph; ``None`` uses every core.
        spinning: Whether ONNX Runtime's idle threads spin after a run (``None``: off).
    """

    def __init__(self, bundle: Bundle, *, backend: str = "onnxruntime",
                 providers: Sequence[str] = ("cpu",), threads: int | None = None, spinning: bool | None = None):
        super().__init__(bundle, backend=backend, providers=providers, threads=threads, spinning=spinning)
        m = self.manifest
        if m.audio is None or "audio_encoder" not in m.graphs or m.scoring.audio_output is None:
            raise BundleError(f"bundle '{bundle.path}' has no audio graph or audio preprocessing; "
                              "it is not an audio-visual bundle.")
        if self._class_embeddings is None:
            raise BundleError(f"bundle '{bundle.path}': audio-visual fusion needs class-space scoring, "
                              f"got {m.scoring.kind!r}.")
        self.audio_backend = self._open(bundle, "audio_encoder", backend)
        self.audio_preprocess = AudioPreprocessor(m.audio)
        self.audio_weight = m.scoring.audio_weight  # both checked with the manifest
        self.video_pooling = m.scoring.video_pooling
        self.scene_labels: tuple[str, ...] = (
            bundle.read_labels(m.scoring.scene_labels, "scoring.scene_labels") if m.scoring.scene_labels else ()
        )

    def __repr__(self) -> str:
        return (f"AudioVisual({str(self.bundle.path)!r}, audio_weight={self.audio_weight}, "
                f"precision={self.manifest.precision!r})")

    # -- per-modality class probabilities ----------------------------------------

    def frame_probs(self, frames: Sequence[Any], *, color: str = "bgr", batch_size: int = 32) -> np.ndarray:
        """Class probabilities (F, classes) of a clip's frames.

        Raises:
            InputError: No frames, a single frame not in a list, frames of different sizes, or a bad frame.
        """
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            frames = list(frames)
        if not isinstance(frames, (list, tuple)):
            raise InputError("frames must be a list of images (one clip's frames); for one frame pass [frame].")
        if not frames:
            raise InputError("frames is empty; pass at least one frame, or frames=None for audio only.")
        sizes = {s for s in map(_frame_size, frames) if s is not None}
        if len(sizes) > 1:
            raise InputError(f"frames of one clip must share a size, got {sorted(sizes)}; frames from different "
                             "cameras or clips belong in separate calls.")
        return self._run_images(list(frames), color, batch_size)[self.manifest.scoring.class_output]

    def audio_outputs(self, audio: Any, sample_rate: int | None = None) -> tuple[dict[str, np.ndarray], float]:
        """The audio graph's outputs for one clip (a WAV path, or an array with its sample rate), and its seconds.

        Raises:
            InputError: Unreadable, empty, too short, NaN, channels-first or non-numeric audio.
        """
        mono = self.audio_preprocess.load(audio, sample_rate)
        outputs = self.audio_backend.infer({"waveform": self.audio_preprocess.tile(mono)})
        return {k: v[0] for k, v in outputs.items()}, len(mono) / self.audio_preprocess.spec.sample_rate

    def _exercise(self, images: list[np.ndarray]) -> None:
        super()._exercise(images)
        rate = self.audio_preprocess.spec.sample_rate
        t = np.arange(2 * rate) / rate  # two seconds: a chord, a sweep and noise, deterministic
        rng = np.random.default_rng(0)
        wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (200 + 400 * t) * t)
        self.audio_outputs((wave + 0.05 * rng.standard_normal(len(t))).astype(np.float32), rate)

    # -- fusion -------------------------------------------------------------------

    def _fuse(self, video: np.ndarray | None, audio: np.ndarray | None, labels: tuple[str, ...],
              audio_weight: float) -> tuple[np.ndarray, float]:
        if video is None:
            mix, weight = audio, 1.0
        elif audio is None:
            mix, weight = video, 0.0
        else:
            mix, weight = (1.0 - audio_weight) * video + audio_weight * audio, audio_weight
        mass = mix @ self.label_weights(labels)
        return mass / max(float(mass.sum()), 1e-30), weight

    def classify_av(self, frames: Sequence[Any] | None = None, audio: Any = None, labels: Sequence[str] | None = None,
                    *, sample_rate: int | None = None, audio_weight: float | None = None,
                    pooling: str | None = None, top_k: int = 5, color: str = "bgr") -> AVResult:
        """Classify one clip from its frames and its sound, or from either alone.

        Args:
            frames: The clip's frames (a list of images as :meth:`classify` takes them, all one size),
                or ``None`` for audio only.
            audio: A WAV file path, or a numpy array (samples,) or (samples, channels) with
                ``sample_rate``; any rate is resampled. ``None`` for frames only.
            labels: Candidate labels; the bundle's default labels when ``None``.
            sample_rate: Hz of an array ``audio``.
            audio_weight: The audio's share of the mix (0..1); the bundle's when ``None``.
            pooling: How frames pool over time: ``"mean"`` or ``"attention"``; the bundle's when ``None``.
            top_k: Predictions to return.
            color: Channel order of 3/4-channel frames: ``"bgr"`` or ``"rgb"``.

        Returns:
            The predictions, with which modalities were used and which were missing.

        Raises:
            InputError: Neither frames nor audio, bad frames (mixed sizes, unreadable), bad audio (empty,
                too short, NaN, channels first, wrong dtype), bad labels, weight or pooling.
        """
        top_k = _check_positive_int(top_k, "top_k")
        names = _check_labels(self.default_labels if labels is None else labels)
        weight = self.audio_weight if audio_weight is None else _check_weight(audio_weight)
        pooling = self.video_pooling if pooling is None else _check_pooling(pooling)
        if frames is None and audio is None:
            raise InputError("classify_av needs frames, audio or both; got neither.")
        video = frame_weights = None
        if frames is not None:
            video, frame_weights = pool_frames(self.frame_probs(frames, color=color), pooling)
        audio_probs, seconds, scenes = None, 0.0, []
        if audio is not None:
            outputs, seconds = self.audio_outputs(audio, sample_rate)
            audio_probs = outputs[self.manifest.scoring.audio_output]
            scenes = self._scenes(outputs)
        probs, used_weight = self._fuse(video, audio_probs, names, weight)
        return self._result(probs, names, top_k, video is not None, audio_probs is not None, used_weight,
                            frame_weights, seconds, scenes)

    def _scenes(self, outputs: dict[str, np.ndarray], k: int = 3) -> list[Prediction]:
        name = self.manifest.scoring.scene_output
        if not name or name not in outputs or len(self.scene_labels) != len(outputs[name]):
            return []
        p = outputs[name]
        return [Prediction(self.scene_labels[i], float(p[i])) for i in np.argsort(-p)[:k]]

    @staticmethod
    def _result(probs: np.ndarray, names: tuple[str, ...], top_k: int, has_video: bool, has_audio: bool,
                weight: float, frame_weights: np.ndarray | None, seconds: float,
                scenes: list[Prediction]) -> AVResult:
        best = np.argsort(-probs, kind="stable")[: min(top_k, len(names))]
        modalities = tuple(m for m, present in (("video", has_video), ("audio", has_audio)) if present)
        return AVResult(
            predictions=[Prediction(names[j], float(probs[j])) for j in best],
            modalities=modalities,
            missing=tuple(m for m in ("video", "audio") if m not in modalities),
            audio_weight=weight,
            frames=0 if frame_weights is None else len(frame_weights),
            frame_weights=() if frame_weights is None else tuple(float(w) for w in frame_weights),
            audio_seconds=float(seconds),
            scenes=scenes,
        )

    def stream(self, labels: Sequence[str] | None = None, **options: Any) -> AVStream:
        """A :class:`AVStream` over this model (frames and microphone chunks as they arrive)."""
        return AVStream(self, labels, **options)


class AVStream:
    """Camera frames and microphone chunks in, a smoothed label over a sliding window out.

    Frames are run through the image graph as they arrive (so a result costs
    only the fusion); the audio graph runs on the window's audio at most once
    per ``audio_hop`` seconds of new sound. Each :meth:`result` fuses what the
    window holds and smooths the label probabilities over time (exponential
    moving average), so one odd frame does not flip the label. Safe to feed
    from a camera thread and a microphone thread at once.

    Args:
        model: The audio-visual model.
        labels: Candidate labels; the bundle's default labels when ``None``.
        window: Seconds of frames and audio the result is about.
        audio_hop: Seconds of new audio before the audio graph runs again.
        smoothing: Weight of the previous smoothed probabilities (0: no smoothing, < 1).
        audio_weight: The audio's share of the mix; the bundle's when ``None``.
        pooling: Frame pooling, ``"mean"`` or ``"attention"``; the bundle's when ``None``.
        color: Channel order of the camera frames.
    """

    def __init__(self, model: AudioVisual, labels: Sequence[str] | None = None, *, window: float = 5.0,
                 audio_hop: float = 1.0, smoothing: float = 0.6, audio_weight: float | None = None,
                 pooling: str | None = None, color: str = "bgr"):
        if not isinstance(model, AudioVisual):
            raise InputError(f"AVStream needs an audio-visual model, got {type(model).__name__}.")
        for name, value in (("window", window), ("audio_hop", audio_hop)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"{name} must be a positive number of seconds, got {value!r}.")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
            raise InputError(f"smoothing must be in [0, 1), got {smoothing!r}.")
        self.model = model
        self.labels = _check_labels(model.default_labels if labels is None else labels)
        self.window, self.audio_hop, self.smoothing = float(window), float(audio_hop), float(smoothing)
        self.audio_weight = model.audio_weight if audio_weight is None else _check_weight(audio_weight)
        self.pooling = model.video_pooling if pooling is None else _check_pooling(pooling)
        self.color = color
        self._lock = threading.Lock()
        self._frames: deque[tuple[float, np.ndarray]] = deque()  # (time, class probs)
        self._audio: deque[np.ndarray] = deque()  # mono chunks at the model's rate, newest last
        self._audio_samples = 0
        self._audio_rate: int | None = None
        self._new_audio = 0  # samples since the audio graph last ran
        self._audio_probs: np.ndarray | None = None
        self._smoothed: np.ndarray | None = None
        self._last_time = 0.0
        self._result_lock = threading.Lock()  # one result() at a time: the smoothing state is sequential

    def add_frame(self, frame: Any, timestamp: float | None = None) -> None:
        """One camera frame, taken at ``timestamp`` seconds (default: now, monotonic clock)."""
        probs = self.model.frame_probs([frame], color=self.color)[0]
        t = time.monotonic() if timestamp is None else float(timestamp)
        with self._lock:
            self._frames.append((t, probs))
            self._last_time = max(self._last_time, t)
            while self._frames and self._frames[0][0] < self._last_time - self.window:
                self._frames.popleft()

    def add_audio(self, chunk: Any, sample_rate: int) -> None:
        """One microphone chunk: (samples,) or (samples, channels), at ``sample_rate`` (the same every call).

        Raises:
            InputError: A bad chunk, or a sample rate that changed mid-stream.
        """
        mono = to_mono(chunk, where="audio chunk")
        if self._audio_rate is not None and sample_rate != self._audio_rate:
            raise InputError(f"the stream's audio is at {self._audio_rate} Hz; this chunk says {sample_rate} Hz. "
                             "Start a new stream for a new microphone setting.")
        sample_rate = check_sample_rate(sample_rate, "audio chunk")
        keep = int(self.window * sample_rate)
        with self._lock:
            self._audio_rate = int(sample_rate)
            self._audio.append(mono)
            self._audio_samples += len(mono)
            self._new_audio += len(mono)
            while self._audio and self._audio_samples - len(self._audio[0]) >= keep:
                self._audio_samples -= len(self._audio.popleft())

    def result(self, top_k: int = 5) -> AVResult | None:
        """The smoothed label over the window, or ``None`` before any frame or audio arrived."""
        top_k = _check_positive_int(top_k, "top_k")
        with self._result_lock:
            return self._update(top_k)

    def _update(self, top_k: int) -> AVResult | None:
        with self._lock:
            frames = [p for _t, p in self._frames]
            rate = self._audio_rate
            run_audio = rate is not None and (self._audio_probs is None or self._new_audio >= self.audio_hop * rate)
            audio = np.concatenate(self._audio)[-int(self.window * rate):] if run_audio else None
            if run_audio:
                self._new_audio = 0
        if audio is not None:
            outputs, _ = self.model.audio_outputs(audio, rate)
            self._audio_probs = outputs[self.model.manifest.scoring.audio_output]
        if not frames and self._audio_probs is None:
            return None
        video = weights = None
        if frames:
            video, weights = pool_frames(np.stack(frames), self.pooling)
        probs, used = self.model._fuse(video, self._audio_probs, self.labels, self.audio_weight)
        if self._smoothed is not None:
            probs = self.smoothing * self._smoothed + (1.0 - self.smoothing) * probs
        self._smoothed = probs
        seconds = self._audio_samples / rate if rate else 0.0
        return AudioVisual._result(probs, self.labels, top_k, video is not None,
                                   self._audio_probs is not None, used, weights, seconds, [])


@dataclass(frozen=True)
class AVFit:
    """The late-fusion setting that classifies a user's labelled clips best (see :func:`fit_av_fusion`)."""

    audio_weight: float  # the audio's share of the mix that scored best
    pooling: str  # the frame pooling that scored best
    accuracy: float  # top-1 accuracy on the clips with this setting
    video_only: float  # top-1 accuracy from the frames alone (mean pooling: the better of the two poolings)
    audio_only: float  # top-1 accuracy from the audio alone
    grid: dict[str, list[float]]  # pooling → accuracy at each of ``weights``
    weights: tuple[float, ...]  # the audio weights tried
    clips: int  # how many clips it was fitted on

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}


def fit_av_fusion(model: AudioVisual, clips: Sequence[tuple[Any, Any, str]], labels: Sequence[str],
                  *, sample_rate: int | None = None, steps: int = 20) -> AVFit:
    """Learn the audio weight and the frame pooling from labelled clips.

    Each tower runs once per clip; then every weight in ``0, 1/steps, …, 1``
    and both poolings are scored, and the most accurate setting wins (ties go
    to the higher mean log-probability of the true label).

    Args:
        model: The audio-visual model.
        clips: ``(frames, audio, label)`` per clip: frames as :meth:`AudioVisual.classify_av` takes
            them, audio a WAV path or an array (at ``sample_rate``), label one of ``labels``.
        labels: The label set the clips are classified among.
        sample_rate: Hz of array audio.
        steps: Grid steps between audio weight 0 and 1.

    Returns:
        The best setting and the accuracy grid; :func:`save_av_fusion` writes it into a bundle.

    Raises:
        InputError: Fewer than two clips, a clip missing frames or audio, or a label not in ``labels``.
    """
    names = _check_labels(labels)
    steps = _check_positive_int(steps, "steps")
    clips = list(clips)
    if len(clips) < 2:
        raise InputError(f"fitting the fusion needs at least 2 labelled clips, got {len(clips)}.")
    index = {name: i for i, name in enumerate(names)}
    targets, video, audio = [], {p: [] for p in POOLINGS}, []
    for n, clip in enumerate(clips):
        if not isinstance(clip, (tuple, list)) or len(clip) != 3:
            raise InputError(f"clip {n} must be a (frames, audio, label) tuple.")
        frames, sound, label = clip
        if label not in index:
            raise InputError(f"clip {n}: label {label!r} is not among the labels ({', '.join(names[:5])}, …).")
        if frames is None or sound is None:
            raise InputError(f"clip {n} lacks {'frames' if frames is None else 'audio'}; fitting the mix needs both.")
        probs = model.frame_probs(frames)
        for pooling in POOLINGS:
            video[pooling].append(pool_frames(probs, pooling)[0])
        audio.append(model.audio_outputs(sound, sample_rate)[0][model.manifest.scoring.audio_output])
        targets.append(index[label])
    weights = model.label_weights(names)
    y = np.asarray(targets)
    a = np.stack(audio) @ weights

    def score(mass: np.ndarray) -> tuple[float, float]:
        p = mass / np.maximum(mass.sum(axis=1, keepdims=True), 1e-30)
        return float((p.argmax(axis=1) == y).mean()), float(np.log(np.maximum(p[np.arange(len(y)), y], 1e-30)).mean())

    grid_weights = tuple(i / steps for i in range(steps + 1))
    grid: dict[str, list[float]] = {}
    best = (-1.0, -np.inf, 0.0, "mean")
    for pooling in POOLINGS:
        v = np.stack(video[pooling]) @ weights
        grid[pooling] = []
        for w in grid_weights:
            accuracy, loglik = score((1 - w) * v + w * a)
            grid[pooling].append(accuracy)
            if (accuracy, loglik) > best[:2]:
                best = (accuracy, loglik, w, pooling)
    return AVFit(audio_weight=best[2], pooling=best[3], accuracy=best[0],
                 video_only=max(grid[p][0] for p in POOLINGS), audio_only=grid["mean"][-1],
                 grid=grid, weights=grid_weights, clips=len(clips))


AV_COLUMNS = ("frames", "audio", "label")  # a clips CSV's header


def _clip_frames(path: Path) -> list[str] | None:
    if path.is_dir():
        found = sorted(str(q) for q in path.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        return found or None
    return [str(path)] if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES else None


def read_av_clips(source: str | os.PathLike, labels: Sequence[str] | None = None,
                  ) -> tuple[list[tuple[list[str], str, str]], list[str]]:
    """Labelled clips from a CSV with the columns ``frames,audio,label``, every row checked before any work.

    ``frames`` is an image file or a folder of frames (taken in name order),
    ``audio`` a WAV file; relative paths are relative to the CSV's folder.

    Args:
        source: The CSV file.
        labels: The label set; ``None`` takes the CSV's own labels (sorted).

    Returns:
        ``(frame paths, audio path, label)`` per clip (what :func:`fit_av_fusion` takes) and the label set.

    Raises:
        InputError: No such CSV, a wrong header, missing frames or audio (listed by line), a label
            outside ``labels``, or fewer than two clips.
    """
    import csv

    path = Path(source)
    if not path.is_file():
        raise InputError(f"clips file '{path}' does not exist; give a CSV with the columns {','.join(AV_COLUMNS)}.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in AV_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise InputError(f"'{path}' lacks the column(s) {', '.join(missing)}; its header must hold "
                             f"{','.join(AV_COLUMNS)}.")
        rows = [(n, row) for n, row in enumerate(reader, start=2)]
    clips, problems = [], []
    for n, row in rows:
        frames = _clip_frames(path.parent / (row["frames"] or "").strip()) if (row["frames"] or "").strip() else None
        audio = path.parent / (row["audio"] or "").strip()
        label = (row["label"] or "").strip()
        if frames is None:
            problems.append(f"line {n}: frames '{row['frames']}' is not an image file or a folder of them")
        if not (row["audio"] or "").strip() or not audio.is_file():
            problems.append(f"line {n}: audio '{row['audio']}' does not exist")
        if not label:
            problems.append(f"line {n}: the label is empty")
        elif labels is not None and label not in labels:
            problems.append(f"line {n}: label {label!r} is not among the labels {list(labels)}")
        clips.append((frames, str(audio), label))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InputError(f"'{path}': {len(problems)} bad row(s): {shown}. Fix them; nothing was fitted.")
    if len(clips) < 2:
        raise InputError(f"'{path}' holds {len(clips)} clip(s); fitting the fusion needs at least 2.")
    return clips, list(labels) if labels is not None else sorted({c[2] for c in clips})


def save_av_fusion(model: AudioVisual, fit: AVFit, out_dir: str, *, overwrite: bool = False) -> Bundle:
    """Write a copy of the model's bundle whose default fusion is the fitted one (the fit is recorded).

    Raises:
        ExportError: ``out_dir`` exists and ``overwrite`` is false.
    """
    import shutil

    from edgemm.export.bundle_writer import BundleWriter

    m = model.manifest
    fields = {k: v for k, v in m.to_dict().items() if k not in ("schema_version", "files", "tools", "created")}
    fields["scoring"].update(audio_weight=fit.audio_weight, video_pooling=fit.pooling)
    fields["source"] = {**fields["source"], "av_fusion_fit": fit.to_dict()}
    with BundleWriter(out_dir, overwrite=overwrite) as w:
        for rel in m.files:
            w.path(rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model.bundle.file(rel), w.path(rel))
        w.commit(**fields)
    return Bundle(out_dir)


FAMILIES["audio_visual"] = AudioVisual
