"""The dual-encoder model users hold: embed images and texts, classify frames."""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.backends import Backend, open_backend
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.engines import EngineOptions
from edgemm.runtime.errors import BackendError, BundleError, InputError
from edgemm.runtime.grounding import LabelGrounding
from edgemm.runtime.image import frame_preprocessor
from edgemm.runtime.text import TextTokenizer

_LABEL_CACHE_SIZE = 32  # label sets kept; a camera app typically cycles through a few


@dataclass(frozen=True)
class Prediction:
    """One label and its score (a probability over the label set)."""

    label: str
    score: float


def _check_labels(labels: Any) -> tuple[str, ...]:
    if isinstance(labels, str):
        raise InputError(f"labels must be a list of strings, got the single string {labels!r}; wrap it in a list.")
    try:
        labels = tuple(labels)
    except TypeError:
        raise InputError(f"labels must be a list of strings, got {type(labels).__name__}.") from None
    if not labels:
        raise InputError("labels is empty; pass at least one label, e.g. labels=['person', 'dog'].")
    seen = set()
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise InputError(f"label {i} is {type(label).__name__}, not a string.")
        if not label.strip():
            raise InputError(f"label {i} is empty or blank; every label needs text.")
        if label in seen:
            raise InputError(f"label {label!r} appears more than once; labels must be unique.")
        seen.add(label)
    return labels


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def open_graph(bundle: Bundle, role: str, backend: str, options: dict[str, Any]) -> Backend:
    """Open one of the bundle's graphs with a model's providers, threads and spinning, checked against the manifest.

    ``backend="tensorrt"`` opens the graph's engine (``bundle.engines``, set by
    :func:`edgemm._engines.ensure_engines`); ONNX Runtime's TensorRT provider gets
    its engine cache and profiles from the bundle (:func:`edgemm._engines.ort_provider_options`).
    Inside :func:`edgemm._engines.recording`, every call's feeds and outputs are kept; inside
    :func:`edgemm._batcher.batching`, concurrent calls share graph runs.

    Raises:
        BundleError: The graph does not match what the manifest declares.
        BackendError: TensorRT was asked for and the bundle's engines were not prepared.
    """
    from edgemm import _batcher, _engines

    if backend == "tensorrt":
        if role not in bundle.engines:
            raise BackendError(f"bundle '{bundle.path}' has no TensorRT engine for '{role}' prepared; open it with "
                               "edgemm.load(path, backend='tensorrt'), which builds or checks them.")
        opened = open_backend(bundle.engines[role], backend, **options)
    else:
        options = {**options, **_engines.ort_provider_options(bundle, role, options.get("providers", ()))}
        opened = open_backend(bundle.graph_path(role), backend, **options)
    try:
        bundle.manifest.check_graph(role, opened.inputs, opened.outputs)
    except BundleError as e:
        raise BundleError(f"bundle '{bundle.path}': {e}. Re-export the bundle.") from None
    return _batcher.batched(bundle, role, _engines.record(role, opened))


def _is_batch(images: Any) -> bool:
    return isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4)


class DualEncoder:
    """An image/text dual encoder loaded from a bundle.

    Args:
        bundle: An opened bundle of family ``dual_encoder``.
        backend: Backend name (``"onnxruntime"``).
        providers: Execution providers for ONNX Runtime, e.g. ``("cpu",)`` or ``("cuda",)``.
        threads: Intra-op threads per graph; ``None`` uses every core.
        spinning: Whether ONNX Runtime's idle threads spin after a run
            (``None``: ``SPINNING``, off). Spinning threads hold the cores that the
            frame's preprocessing and the next graph need: with it off,
            ``classify(frame)`` took 9.2 ms instead of 16.0 on 2 cores, and batched
            text embedding was unchanged (``benchmarks/bench_spinning.py``).
    """

    SPINNING: bool | None = False  # the default for every family (None would leave ONNX Runtime's: on)

    def __init__(self, bundle: Bundle, *, backend: str = "onnxruntime",
                 providers: Sequence[str] = ("cpu",), threads: int | None = None, spinning: bool | None = None):
        m = bundle.manifest
        if m.image is None or m.text is None:
            raise BundleError(f"bundle '{bundle.path}' lacks image or text preprocessing; it is not a dual encoder.")
        self.bundle = bundle
        self.manifest = m
        self.dim = m.embedding_dim
        self._backend_options: dict[str, Any] = {"providers": tuple(providers), "threads": threads,
                                                 "spinning": self.SPINNING if spinning is None else spinning}
        self.image_backend = self._open(bundle, "image_encoder", backend)
        self.text_backend = self._open(bundle, "text_encoder", backend)
        self.preprocess = frame_preprocessor(m.image, self._backend_options["providers"])
        self.tokenizer = TextTokenizer(bundle.file(m.text.tokenizer), max_length=m.text.max_length,
                                       pad_id=m.text.pad_id, padding=m.text.padding)
        self._text_inputs = [t.name for t in self.text_backend.inputs]
        self._check_max_length()
        self.default_labels: tuple[str, ...] = bundle.read_labels(m.labels.file, "labels.file") if m.labels else ()
        self.prompt = m.labels.prompt if m.labels else "{}"
        self._class_embeddings = self._read_class_embeddings() if m.scoring.kind == "class_space" else None
        self.grounding = (LabelGrounding(bundle.read_json(m.scoring.hierarchy), len(self._class_embeddings),
                                         f"bundle '{bundle.path}': scoring.hierarchy", m.scoring.grounding_min_classes)
                          if m.scoring.hierarchy and self._class_embeddings is not None else None)
        self.grounding_weight = m.scoring.grounding_weight  # a resolving label's class mass against its text score
        self.grounding_prior = self._read_grounding_prior() if self.grounding is not None else None
        self.grounding_prior_power = m.scoring.grounding_prior_power if self.grounding_prior is not None else 0.0
        self._label_cache: OrderedDict[tuple[str, ...], tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]] = \
            OrderedDict()
        self._label_lock = threading.Lock()

    def _open(self, bundle: Bundle, role: str, backend: str) -> Backend:
        return open_graph(bundle, role, backend, self._backend_options)

    def _check_max_length(self) -> None:
        """Run the text graph once on a text of ``text.max_length`` tokens: its positions must reach that far."""
        longest = self.text_feeds([" ".join(["a"] * 2 * self.manifest.text.max_length)])
        try:
            width = self.text_backend.infer(longest)["embedding"].shape[-1]
        except (BackendError, KeyError) as e:
            raise BundleError(f"bundle '{self.bundle.path}': the text graph fails on a text of text.max_length="
                              f"{self.manifest.text.max_length} tokens ({e}); lower it to what the graph's positions "
                              "allow, or re-export the bundle.") from None
        if width != self.dim:
            raise BundleError(f"bundle '{self.bundle.path}': embedding_dim is {self.dim}, but the text graph outputs "
                              f"{width}-wide embeddings. Re-export the bundle.")

    def _read_class_embeddings(self) -> np.ndarray:
        """The class-space scoring's (classes, dim) class text embeddings, matched to the image graph's classes."""
        s = self.manifest.scoring
        array = self.bundle.read_array(s.class_embeddings)
        classes = next(t.shape[-1] for t in self.image_backend.outputs if t.name == s.class_output)
        if array.shape[1] != self.dim or (isinstance(classes, int) and array.shape[0] != classes):
            raise BundleError(f"bundle '{self.bundle.path}': scoring.class_embeddings has shape {array.shape}, but "
                              f"the image graph's {s.class_output!r} has {classes} classes and embeddings are "
                              f"{self.dim} wide. Re-export the bundle.")
        return array

    def _read_grounding_prior(self) -> np.ndarray | None:
        """The classes' mean response to content-free images (``scoring.grounding_prior``), or None without one."""
        rel = self.manifest.scoring.grounding_prior
        if rel is None:
            return None
        prior = self.bundle.read_array(rel, ndim=1)
        if prior.shape != (self.grounding.classes,) or not (prior > 0).all():
            raise BundleError(f"bundle '{self.bundle.path}': scoring.grounding_prior must be {self.grounding.classes} "
                              f"positive class probabilities, got shape {prior.shape} (min {prior.min():.3g}). "
                              "Re-export the bundle.")
        return prior

    @property
    def grounding_prior_power(self) -> float:
        """How strongly grounded masses divide out the content-free prior (0: not at all)."""
        return self._prior_power

    @grounding_prior_power.setter
    def grounding_prior_power(self, power: float) -> None:
        self._prior_power = float(power)
        prior = self.grounding_prior
        # computed once here, not per frame; scaled to ≤ 1 so that it cannot overflow
        self._prior_factor = (None if not power or prior is None
                              else np.power(prior / prior.min(), -self._prior_power).astype(np.float32))

    def __repr__(self) -> str:
        return f"DualEncoder({str(self.bundle.path)!r}, dim={self.dim}, precision={self.manifest.precision!r})"

    # -- embeddings -------------------------------------------------------------

    def _run_images(self, images: Sequence[Any], color: str, batch_size: int) -> dict[str, np.ndarray]:
        batch_size = _check_positive_int(batch_size, "batch_size")
        if len(images) == 0:
            raise InputError("no images given; pass at least one image.")
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start : start + batch_size], color=color, first_index=start)
            for name, value in self.image_backend.infer({"pixels": pixels}).items():
                parts.setdefault(name, []).append(value)
        return {name: np.concatenate(v) for name, v in parts.items()}

    def embed_images(self, images: Sequence[Any], *, color: str = "bgr", batch_size: int = 32) -> np.ndarray:
        """Embed images into the shared space.

        Args:
            images: A list of frames (uint8 BGR HxWx3 by default; also HxW, HxWx4,
                RGB with ``color="rgb"``), PIL images or file paths.
            color: Channel order of 3/4-channel arrays: ``"bgr"`` or ``"rgb"``.
            batch_size: Images per graph call.

        Returns:
            float32 (N, dim), L2-normalised.

        Raises:
            InputError: Empty input or an unusable image.
        """
        if not _is_batch(images):
            raise InputError("embed_images takes a list of images; for one image pass [image].")
        return self._run_images(list(images), color, batch_size)["embedding"]

    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Embed texts into the shared space.

        Returns:
            float32 (N, dim), L2-normalised.

        Raises:
            InputError: Empty input, a single string instead of a list, or a non-string item.
        """
        batch_size = _check_positive_int(batch_size, "batch_size")
        if isinstance(texts, str):
            raise InputError("embed_texts takes a list of texts, got a single string; wrap it in a list.")
        try:
            texts = list(texts)
        except TypeError:
            raise InputError(f"embed_texts takes a list of texts, got {type(texts).__name__}.") from None
        if not texts:
            raise InputError("no texts given; pass at least one text.")
        # Sorting by length keeps padding small inside each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]) if isinstance(texts[i], str) else 0)
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.text_backend.infer(self.text_feeds([texts[i] for i in idx]))["embedding"]
        return out

    def text_feeds(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenized texts as the text graph takes them (one batch, padded alike)."""
        feeds = self.tokenizer(texts)
        return {name: feeds[name] for name in self._text_inputs}  # e.g. SigLIP takes no attention mask

    # -- classification -----------------------------------------------------------

    def label_weights(self, labels: Sequence[str]) -> np.ndarray:
        """The per-label-set matrix classify() scores with, cached per label set.

        For ``cosine`` scoring: label text embeddings (L, dim). For
        ``class_space``: label weights over the classes (classes, L).
        """
        return self._label_entry(labels)[0]

    def _label_entry(self, labels: Sequence[str]) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """A label set's weights and WordNet grounding (``_grounded``), cached together per label set."""
        key = _check_labels(labels)
        with self._label_lock:  # another thread may evict between a lookup and move_to_end
            cached = self._label_cache.get(key)
            if cached is not None:
                self._label_cache.move_to_end(key)
                return cached
        # Computed outside the lock: two threads may both embed a new label set; both get the same weights.
        text = self.embed_texts([self.prompt.format(label) for label in key])
        if self._class_embeddings is not None:
            sim = self._class_embeddings @ text.T / self.manifest.scoring.tau  # (classes, L)
            sim -= sim.max(axis=0, keepdims=True)
            weights = np.exp(sim)
            weights /= weights.sum(axis=0, keepdims=True)
        else:
            weights = text
        entry = (weights, self._grounded(key))
        with self._label_lock:
            self._label_cache[key] = entry
            if len(self._label_cache) > _LABEL_CACHE_SIZE:
                self._label_cache.popitem(last=False)
        return entry

    def scores(self, images: Any, labels: Sequence[str] | None = None, *, color: str = "bgr",
               batch_size: int = 32) -> np.ndarray:
        """Label probabilities (N, L) for a list of images.

        Rows sum to 1 (a softmax over the labels), except for ``sigmoid`` scoring
        (SigLIP), where each label gets its own independent probability.
        """
        entry = self._label_entry(self.default_labels if labels is None else labels)  # bad labels fail first
        if not _is_batch(images):
            images = [images]
        return self._probs(self._run_images(list(images), color, batch_size), *entry)

    def scores_of(self, outputs: dict[str, np.ndarray], labels: Sequence[str] | None = None) -> np.ndarray:
        """Label probabilities from the image graph's outputs (``_run_images``): images run once, scored
        against many label sets (the accuracy gate)."""
        return self._probs(outputs, *self._label_entry(self.default_labels if labels is None else labels))

    def _probs(self, outputs: dict[str, np.ndarray], weights: np.ndarray,
               grounded: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        if self._class_embeddings is not None:
            classes = outputs[self.manifest.scoring.class_output]
            mass = classes @ weights
            text = mass / np.maximum(mass.sum(axis=1, keepdims=True), 1e-30)
            if grounded is None:
                return text
            # Labels naming a synset above the classes: the mass of the classes beneath it, in the tower's own
            # (unsoftened) probabilities, blended with the text scoring; the others keep the text scoring.
            s = self.manifest.scoring
            sharp = np.power(np.maximum(classes, 0.0), s.grounding_power)
            if self._prior_factor is not None:  # divide out what the tower says of an image with nothing in it
                sharp *= self._prior_factor
            sharp /= np.maximum(sharp.sum(axis=1, keepdims=True), 1e-30)
            masks, resolved = grounded
            alpha = self.grounding_weight
            blend = np.where(resolved, alpha * (sharp @ masks) + (1 - alpha) * text, text)
            return blend / np.maximum(blend.sum(axis=1, keepdims=True), 1e-30)
        logits = self.manifest.scoring.logit_scale * (outputs["embedding"] @ weights.T)
        if self.manifest.scoring.kind == "sigmoid":
            return 1.0 / (1.0 + np.exp(-(logits + self.manifest.scoring.logit_bias)))
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def _grounded(self, labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
        """(classes, L) masks of the classes each label covers and which labels resolve; None without any."""
        if self.grounding is None:
            return None
        masks = self.grounding.masks(labels)
        resolved = np.array([m is not None for m in masks])
        if not resolved.any():
            return None
        return np.stack([np.zeros(self.grounding.classes, np.float32) if m is None else m for m in masks], 1), resolved

    def classify(self, images: Any, labels: Sequence[str] | None = None, *, top_k: int = 5,
                 color: str = "bgr", batch_size: int = 32) -> list[Prediction] | list[list[Prediction]]:
        """Zero-shot classification of a frame (or a list of frames) among labels.

        The label embeddings are computed once per label set and cached, so
        repeated calls on new frames run only the image graph.

        Args:
            images: One image (uint8 BGR HxWx3 frame by default, grayscale, BGRA,
                PIL image or file path) or a list of them.
            labels: Candidate labels; the bundle's default labels when ``None``.
            top_k: How many predictions to return per image (at most len(labels)).
            color: Channel order of 3/4-channel arrays: ``"bgr"`` or ``"rgb"``.
            batch_size: Images per graph call.

        Returns:
            For one image, its top-k predictions best first; for a list, one such list per image.

        Raises:
            InputError: Bad image, empty/duplicate/blank labels, or top_k ≤ 0.
        """
        top_k = _check_positive_int(top_k, "top_k")
        names = _check_labels(self.default_labels if labels is None else labels)
        single = not _is_batch(images)
        probs = self.scores(images, names, color=color, batch_size=batch_size)
        k = min(top_k, len(names))
        best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        result = [[Prediction(names[j], float(row[j])) for j in idx] for row, idx in zip(probs, best)]
        return result[0] if single else result

    # -- engine verification ------------------------------------------------------

    def _exercise(self, images: list[np.ndarray]) -> None:
        """The calls a TensorRT engine is verified on: each graph at a full batch and at batch 1 (RGB images)."""
        from edgemm.runtime.datasets import SAMPLE_SENTENCES

        self.embed_images(images, color="rgb", batch_size=len(images))
        self.embed_images(images[:1], color="rgb")
        texts = [self.prompt.format(label) for label in self.default_labels[:8]] + list(SAMPLE_SENTENCES[:8])
        self.embed_texts(texts, batch_size=16)
        self.embed_texts(texts[:1])


FAMILIES: dict[str, type[DualEncoder]] = {"dual_encoder": DualEncoder}  # others register on import


# Built-in models that load() builds from packaged weights on first use: name → (module, builder).
DEFAULT_MODELS = {
    "default": ("edgemm.export.models.dual_encoder", "build_default_bundle"),
    "audio-visual": ("edgemm.export.models.audio_visual", "build_audio_visual_bundle"),
    "matching": ("edgemm.export.models.matching", "build_matching_bundle"),
    "captioner": ("edgemm.export.models.captioner", "build_default_captioner_bundle"),
}


def default_bundle_dir(name: str = "default") -> Path:
    """Where ``edgemm.load()`` finds (or builds) a built-in model: ``$EDGEMM_HOME/bundles/<name>``."""
    from edgemm._engines import edgemm_home

    return edgemm_home() / "bundles" / name


def _to_stderr(line: str) -> None:
    print(f"edgemm: {line}", file=sys.stderr, flush=True)


def _build_default(name: str) -> Path:
    import importlib

    if name not in DEFAULT_MODELS:
        raise InputError(f"no built-in model {name!r}; choose one of {sorted(DEFAULT_MODELS)}.")
    path = default_bundle_dir(name)
    stale = _stale_default(path)
    if stale is None:
        return path
    module, builder = DEFAULT_MODELS[name]
    try:
        build = getattr(importlib.import_module(module), builder)
    except ImportError as e:
        if (path / "manifest.json").is_file():  # a runtime-only device keeps the model it has
            _to_stderr(f"the built-in {name} model at {path} {stale}; it cannot be rebuilt here ({e}), so the "
                       "old one is used. Install edgemm[export] to rebuild it.")
            return path
        raise BundleError(
            f"the {name} bundle is not at {path} and cannot be built here ({e}). Build it on a workstation "
            f"with pip install 'edgemm[export]' and 'edgemm export {name} -o DIR', then load(DIR)."
        ) from e
    if path.exists():
        _to_stderr(f"the built-in {name} model at {path} {stale}; rebuilding it")
    build(path, overwrite=path.exists())  # staged and swapped in whole: a failed build leaves the old one
    return path


def _stale_default(path: Path) -> str | None:
    """Why a built-in bundle must be (re)built, or None when this edgemm made it: an upgrade brings its new model."""
    from edgemm import __version__
    from edgemm.runtime.manifest import SCHEMA_VERSION, read_manifest

    if not (path / "manifest.json").is_file():
        return "is not built"
    try:
        m = read_manifest(path)
    except BundleError as e:
        return f"cannot be read ({e})"
    made_by = m.tools.get("edgemm")
    if m.schema_version != SCHEMA_VERSION or made_by != __version__:
        return (f"was built by edgemm {made_by} (manifest schema {m.schema_version}); this is edgemm {__version__} "
                f"(schema {SCHEMA_VERSION})")
    return None


def load(path: str | os.PathLike | None = None, *, default: str = "default", backend: str = "onnxruntime",
         providers: Sequence[str] = ("cpu",), threads: int | None = None, check_hashes: bool = True,
         spinning: bool | None = None, engines: EngineOptions | None = None) -> Any:
    """Load a bundle; with no path, a built-in model (built on first use).

    Args:
        path: Bundle directory. ``None`` means the built-in model ``default`` under
            ``$EDGEMM_HOME`` (``~/.cache/edgemm``), built from packaged weights the
            first time if the ``export`` extra is installed.
        default: Which built-in model when ``path`` is ``None``: ``"default"`` (the
            dual encoder), ``"audio-visual"``, ``"matching"`` (the dual encoder
            plus an image-text matching head) or ``"captioner"``.
        backend: ``"onnxruntime"``, or ``"tensorrt"``: native TensorRT engines, built on this
            device on first use (progress on stderr), verified against ONNX Runtime and cached
            beside the bundle; later loads check their sidecars and reuse them.
        providers: Execution providers, e.g. ``("cpu",)``, ``("cuda",)``; an unavailable one is an error.
            ``("tensorrt", "cuda")`` gets an engine cache, a timing cache and the manifest's profiles.
        threads: Intra-op threads per graph; ``None`` uses every core.
        check_hashes: Verify every bundle file against the manifest's sha256.
        spinning: Whether ONNX Runtime's idle threads spin after a run; ``None``:
            ``DualEncoder.SPINNING`` (off: faster for every public call measured on
            a 2-core CPU; ``benchmarks/bench_spinning.py`` measures a device).
        engines: How TensorRT engines are built (precision, axes, cache, rebuilding), for
            ``backend="tensorrt"`` and ONNX Runtime's TensorRT provider alike.

    Returns:
        The model: a :class:`DualEncoder`, the family's subclass (e.g. :class:`AudioVisual`), or a
        :class:`~edgemm.Captioner` for a captioner bundle.

    Raises:
        BundleError: Missing, altered or unsupported bundle.
        BackendError: The backend or a provider is unavailable; TensorRT engines are stale and
            ``engines.rebuild`` is off.
        VerificationError: A newly built engine differs from ONNX Runtime beyond its gate.
    """
    if path is None:
        path = _build_default(default)
    bundle = Bundle(path, check_hashes=check_hashes)
    bundle.engine_options = engines
    family = FAMILIES.get(bundle.manifest.family)
    if family is None:
        raise BundleError(
            f"bundle '{bundle.path}' is of family {bundle.manifest.family!r}, which this edgemm cannot run "
            f"(supported: {sorted(FAMILIES)}). Upgrade edgemm."
        )
    if backend == "tensorrt":
        from edgemm._engines import ensure_engines

        options = engines or EngineOptions()
        ensure_engines(bundle, options, progress=None if options.quiet else _to_stderr)
    return family(bundle, backend=backend, providers=providers, threads=threads, spinning=spinning)
