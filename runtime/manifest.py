"""The bundle manifest: the contract between the workstation and the device.

Typed dataclasses, converted from the JSON dict once, here, with every field
checked; the rest of the runtime only sees these objects. A manifest is
untrusted input (bundles are copied, downloaded, shared): every value is
checked on construction, every file it names must be a plain relative path
inside the bundle, and :meth:`Manifest.check_graph` checks it against the graphs
themselves once they are open.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Formatter
from typing import Any

import numpy as np

from edgemm.runtime.errors import BundleError, EdgemmError
from edgemm.runtime.limits import LIMITS

SCHEMA_VERSION = 5  # the newest manifest schema this runtime understands
# 2: image.resize, text.padding, scoring "sigmoid" with logit_bias, precision "int8"/"fp16" bundles
# 3: family "captioner" with a "generation" entry; "scoring" and "embedding_dim" only for families that embed
# 4: scoring.hierarchy (labels grounded in WordNet over the classes) and scoring.grounding_weight
# 5: scoring.grounding_prior (the classes' response to content-free images, divided out of grounded masses)
MANIFEST_NAME = "manifest.json"
SCORING_KINDS = ("cosine", "sigmoid", "class_space")
FUSION_TASKS = ("matching", "classification")
VIDEO_POOLINGS = ("mean", "attention")
CAPTION_ENCODER, CAPTION_DECODER = "caption_encoder", "caption_decoder"  # a captioner's image and decoder-step graphs
QUESTION_ENCODER = "question_encoder"  # visual question answering: image states + question → the decoder's memory
GENERATIVE_FAMILIES = ("captioner",)  # families that generate text rather than embed: no scoring, no embedding_dim
TOKENS = "tokens"  # pseudo graph role of the tokenizer's own arrays (fusion inputs may read its attention mask)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestFieldError(BundleError):
    """One manifest field is malformed; ``field`` is its dotted name (``"image.std"``)."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"manifest field '{field}' {problem}")

    def within(self, section: str) -> ManifestFieldError:
        return ManifestFieldError(f"{section}.{self.field}", self.problem)


# -- value checks, shared by every section --------------------------------------------


def _int(name: str, value: Any, low: int = 1, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"≥ {low}" if high is None else f"in [{low}, {high}]"
        raise ManifestFieldError(name, f"must be an integer {span}, got {value!r}")


def _number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < low or (open_low and value == low) or value > high:
        span = "" if (low, high) == (-math.inf, math.inf) else f" in {'(' if open_low else '['}{low}, {high}]"
        raise ManifestFieldError(name, f"must be a finite number{span}, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ManifestFieldError(name, f"is {value!r}; this runtime knows {', '.join(map(repr, choices))} "
                                       "(a newer edgemm may know more)")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ManifestFieldError(name, f"must be a non-empty string, got {value!r}")


def check_relative_path(name: str, value: Any) -> None:
    """A file a manifest names: a relative POSIX path that stays in the bundle (no ``..``, no absolute path).

    Raises:
        ManifestFieldError: Naming ``name`` and what is wrong with the path.
    """
    _text(name, value)
    if "\\" in value or "\0" in value or len(value) > 1024:
        raise ManifestFieldError(name, f"{value!r} is not a plain relative path (no backslashes or NUL)")
    if value.startswith("/") or re.match(r"[A-Za-z]:", value):
        raise ManifestFieldError(name, f"{value!r} is an absolute path; a bundle names its files relative to itself")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise ManifestFieldError(name, f"{value!r} has '..', '.' or empty components; it must stay inside the bundle")


def _optional_path(name: str, value: Any) -> None:
    if value is not None:
        check_relative_path(name, value)


def _build(section: str, cls: type, value: Any) -> Any:
    """One manifest section: a JSON object → its dataclass, errors naming ``section.field``."""
    if not isinstance(value, dict):
        raise ManifestFieldError(section, f"must be a JSON object, got {type(value).__name__}")
    try:
        return cls(**value)
    except ManifestFieldError as e:
        raise e.within(section) from None
    except TypeError as e:  # a missing or unknown key
        raise ManifestFieldError(section, f"has missing or unknown fields ({e})") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str  # graph input/output name
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    shape: list[int | str]  # ints are fixed, strings name dynamic axes ("batch", "seq")

    def __post_init__(self):
        _text("name", self.name)
        _text("dtype", self.dtype)
        if not isinstance(self.shape, (list, tuple)) or len(self.shape) > 8 or not all(
                (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d)
                for d in self.shape):
            raise ManifestFieldError("shape", f"must be a list of sizes (integers ≥ 0) or axis names, got {self.shape!r}")


@dataclass(frozen=True)
class GraphSpec:
    file: str  # ONNX file, relative to the bundle directory
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def __post_init__(self):
        check_relative_path("file", self.file)
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            if not isinstance(specs, (list, tuple)) or not specs or not all(isinstance(t, TensorSpec) for t in specs):
                raise ManifestFieldError(kind, "must be a non-empty list of tensors")
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise ManifestFieldError(kind, f"names a tensor twice ({names})")
            for t in specs:
                try:
                    np.dtype(t.dtype)
                except TypeError:
                    raise ManifestFieldError(f"{kind}.{t.name}.dtype", f"{t.dtype!r} is not a numpy dtype") from None

    @classmethod
    def from_dict(cls, value: Any) -> GraphSpec:
        if not isinstance(value, dict):
            raise ManifestFieldError("", f"must be a JSON object, got {type(value).__name__}")
        tensors = {}
        for kind in ("inputs", "outputs"):
            if not isinstance(value.get(kind), list):
                raise ManifestFieldError(kind, "must be a list of tensors")
            tensors[kind] = [_build(f"{kind}[{i}]", TensorSpec, t) for i, t in enumerate(value[kind])]
        return cls(file=value.get("file"), **tensors)


@dataclass(frozen=True)
class ImagePreprocess:
    size: int  # square side fed to the image graph
    crop_fraction: float  # centre square kept before resizing, as a fraction of the short side
    mean: list[float]  # per channel, subtracted from 0..255 RGB values
    std: list[float]  # per channel, divides after the mean
    color: str = "RGB"  # channel order the graph expects
    interpolation: str = "bilinear-antialias"  # resampling the reference pipeline uses
    resize: str = "crop"  # "crop": centre square, then resize; "squash": the whole image resized to a square

    def __post_init__(self):
        _int("size", self.size, 1, 8192)
        _number("crop_fraction", self.crop_fraction, low=0.0, high=1.0, open_low=True)
        for name, values in (("mean", self.mean), ("std", self.std)):
            if not isinstance(values, (list, tuple)) or len(values) != 3:
                raise ManifestFieldError(name, f"must be 3 numbers, one per channel, got {values!r}")
            for v in values:
                _number(name, v, low=0.0, open_low=name == "std")
        _choice("color", self.color, ("RGB",))
        _text("interpolation", self.interpolation)  # the reference's filter, recorded; the runtime resizes its own way
        _choice("resize", self.resize, ("crop", "squash"))


@dataclass(frozen=True)
class TextPreprocess:
    tokenizer: str  # tokenizer.json (Hugging Face `tokenizers` format), relative to the bundle
    max_length: int  # longer texts are truncated to this many tokens
    pad_id: int  # id used for padding; the attention mask marks real tokens
    padding: str = "longest"  # "longest": pad a batch to its longest text; "max_length": always to max_length

    def __post_init__(self):
        check_relative_path("tokenizer", self.tokenizer)
        _int("max_length", self.max_length, 1, 1 << 16)
        _int("pad_id", self.pad_id, 0)
        _choice("padding", self.padding, ("longest", "max_length"))


@dataclass(frozen=True)
class AudioPreprocess:
    sample_rate: int  # Hz the audio graph expects
    min_samples: int  # the audio graph's shortest input
    clip_samples: int  # shorter audio is tiled to this many samples (the model's own preprocessing)

    def __post_init__(self):
        _int("sample_rate", self.sample_rate, 1000, 384_000)
        _int("min_samples", self.min_samples, 1, 1 << 28)
        _int("clip_samples", self.clip_samples, self.min_samples, 1 << 28)


@dataclass(frozen=True)
class Scoring:
    """How classify() turns image outputs and label texts into label scores."""

    kind: str  # "cosine": softmax(logit_scale * cos); "sigmoid": sigmoid(logit_scale * cos + logit_bias);
    #            "class_space": label weights over a fixed class set
    logit_scale: float = 100.0  # for "cosine" and "sigmoid"
    logit_bias: float = 0.0  # for "sigmoid"
    class_embeddings: str | None = None  # for "class_space": .npy (classes, dim) of unit vectors
    class_output: str | None = None  # for "class_space": image-graph output with class probabilities
    tau: float = 0.05  # for "class_space": temperature of the label → class softmax
    audio_output: str | None = None  # audio-visual: audio-graph output with probabilities over the same classes
    audio_weight: float = 0.5  # audio-visual: default weight of the audio in the late fusion (video: 1 - this)
    video_pooling: str = "mean"  # audio-visual: how frames' class probabilities pool over time ("mean", "attention")
    scene_output: str | None = None  # audio-visual: audio-graph output with scene probabilities (reported, not fused)
    scene_labels: str | None = None  # audio-visual: JSON list naming the scene output's classes
    hierarchy: str | None = None  # "class_space": JSON table of the classes each WordNet noun covers (grounding)
    grounding_weight: float = 0.5  # with a hierarchy: weight of a resolving label's class mass (text: 1 - this)
    grounding_power: float = 1.0  # with a hierarchy: class_output ** this, renormalised, is what masses sum
    grounding_min_classes: int = 1  # with a hierarchy: labels covering fewer classes keep the text scoring
    grounding_prior: str | None = None  # with a hierarchy: .npy (classes,) class_output on content-free images
    grounding_prior_power: float = 0.0  # grounded masses sum class_output ** power / prior ** this

    def __post_init__(self):
        _choice("kind", self.kind, SCORING_KINDS)
        _number("logit_scale", self.logit_scale, low=0.0, high=1e4, open_low=True)  # ≤ 0 would invert the ranking
        _number("logit_bias", self.logit_bias, low=-1e4, high=1e4)
        _number("tau", self.tau, low=0.0, high=1e4, open_low=True)
        _number("audio_weight", self.audio_weight, low=0.0, high=1.0)
        _choice("video_pooling", self.video_pooling, VIDEO_POOLINGS)
        _number("grounding_weight", self.grounding_weight, low=0.0, high=1.0)
        _number("grounding_power", self.grounding_power, low=0.0, high=100.0, open_low=True)
        _int("grounding_min_classes", self.grounding_min_classes, 1)
        _number("grounding_prior_power", self.grounding_prior_power, low=0.0, high=100.0)
        for name in ("class_embeddings", "scene_labels", "hierarchy", "grounding_prior"):
            _optional_path(name, getattr(self, name))
        for name in ("class_output", "audio_output", "scene_output"):
            if getattr(self, name) is not None:
                _text(name, getattr(self, name))
        if self.kind == "class_space" and (self.class_embeddings is None or self.class_output is None):
            raise ManifestFieldError("kind", "'class_space' needs both 'class_embeddings' and 'class_output'")
        if self.hierarchy is not None and self.kind != "class_space":
            raise ManifestFieldError("hierarchy", "grounds labels in the classes of 'class_space' scoring only")
        if self.grounding_prior is not None and self.hierarchy is None:
            raise ManifestFieldError("grounding_prior", "corrects grounded masses, so it needs a 'hierarchy'")


@dataclass(frozen=True)
class Fusion:
    """How a fusion bundle feeds its ``fusion`` graph and reads its logits."""

    task: str  # "matching": one logit, does the text describe the image; "classification": logits over `labels`
    architecture: str  # "early", "late", "gated" or "cross_attention" (what the graph holds)
    inputs: dict[str, str]  # fusion-graph input → "<graph role>/<output name>", or "tokens/attention_mask"
    labels: str | None = None  # classification: JSON list of the class names, in logit order
    threshold: float = 0.5  # matching: probability from which a pair counts as a match (picked on validation)
    rerank_cosine_weight: float = 0.0  # matching: a reranker scores head logit + this × the search's cosine (0: p)

    def __post_init__(self):
        _choice("task", self.task, FUSION_TASKS)
        _text("architecture", self.architecture)
        if not isinstance(self.inputs, dict) or not self.inputs or not all(
                isinstance(k, str) and isinstance(v, str) and v.count("/") == 1 for k, v in self.inputs.items()):
            raise ManifestFieldError("inputs", f"must map fusion-graph inputs to '<role>/<output>', got {self.inputs!r}")
        _optional_path("labels", self.labels)
        _number("threshold", self.threshold, low=0.0, high=1.0)
        _number("rerank_cosine_weight", self.rerank_cosine_weight, low=-1e4, high=1e4)
        if self.task == "classification" and self.labels is None:
            raise ManifestFieldError("labels", "is required by a classification head (its class names)")


@dataclass(frozen=True)
class Generation:
    """How a captioner's decoder-step graph is driven: its tokens, its cache and its default decoding settings."""

    tokenizer: str  # tokenizer.json that decodes the generated ids (and encodes prompts)
    start_ids: list[int]  # decoder ids before any prompt (transformers' decoder start / BOS tokens)
    eos_ids: list[int]  # ids that end a caption
    pad_id: int  # id transformers fills finished positions with (never returned)
    max_positions: int  # the decoder's position table: prompt + generated tokens must fit
    cache: dict[str, str]  # decoder past input → the present output that feeds it at the next step
    memory: list[str]  # decoder inputs the image graph outputs under the same names (cross-attention keys/values)
    input_ids: str = "input_ids"  # decoder input: new token ids (batch, tokens)
    logits: str = "logits"  # decoder output: next-token logits of the last position (batch, vocab)
    prompt: bool = False  # whether the model takes a text prompt after start_ids (BLIP's conditional captioning)
    settings: dict[str, Any] = field(default_factory=dict)  # default decoding settings (max_new_tokens, num_beams, …)
    question_graph: str | None = None  # VQA: the graph that reads the image graph's outputs and the question's
    #                                    input_ids / attention_mask and outputs the memory (None: captioning)

    def __post_init__(self):
        check_relative_path("tokenizer", self.tokenizer)
        if self.question_graph is not None:
            _choice("question_graph", self.question_graph, (QUESTION_ENCODER,))
        for name in ("start_ids", "eos_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, list) or not 0 < len(ids) <= 64:
                raise ManifestFieldError(name, f"must be a list of 1 to 64 token ids, got {ids!r}")
            for i in ids:
                _int(name, i, 0, 1 << 31)
        _int("pad_id", self.pad_id, 0, 1 << 31)
        _int("max_positions", self.max_positions, len(self.start_ids) + 1, 1 << 20)
        for name in ("input_ids", "logits"):
            _text(name, getattr(self, name))
        if not isinstance(self.cache, dict) or not self.cache or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.cache.items()):
            raise ManifestFieldError("cache", f"must map each past input to its present output, got {self.cache!r}")
        if not isinstance(self.memory, list) or not self.memory or not all(
                isinstance(m, str) and m for m in self.memory) or len(set(self.memory)) != len(self.memory):
            raise ManifestFieldError("memory", f"must be a list of distinct tensor names, got {self.memory!r}")
        if not isinstance(self.prompt, bool):
            raise ManifestFieldError("prompt", f"must be true or false, got {self.prompt!r}")
        if not isinstance(self.settings, dict) or not all(isinstance(k, str) for k in self.settings):
            raise ManifestFieldError("settings", f"must be a JSON object of decoding settings, got {self.settings!r}")
        for key, value in self.settings.items():
            if not (value is None or isinstance(value, (bool, int, float, str)) or (
                    isinstance(value, list) and len(value) <= 1 << 16 and all(isinstance(v, int) for v in value))):
                raise ManifestFieldError(f"settings.{key}", f"must be a number, a string or a list of ids, got {value!r}")


@dataclass(frozen=True)
class Labels:
    file: str  # JSON list of default label names, relative to the bundle
    prompt: str = "{}"  # template a label is put in before embedding

    def __post_init__(self):
        check_relative_path("file", self.file)
        _text("prompt", self.prompt)
        try:  # exactly one bare "{}"; "{{" and "}}" are literal braces, as in str.format
            fields = [(name, spec, conv) for _, name, spec, conv in Formatter().parse(self.prompt) if name is not None]
        except ValueError as e:
            raise ManifestFieldError("prompt", f"{self.prompt!r} is not a valid template ({e})") from None
        if fields != [("", "", None)]:
            raise ManifestFieldError("prompt", f"{self.prompt!r} must contain exactly one '{{}}' where the label goes")


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    name: str  # bundle name, e.g. "default"
    family: str  # model family, e.g. "dual_encoder"
    embedding_dim: int | None  # size of every embedding output (None: a generative family, which embeds nothing)
    precision: str  # "fp32", "fp16", "int8"
    graphs: dict[str, GraphSpec]  # role ("image_encoder", "text_encoder", …) → graph
    image: ImagePreprocess | None
    text: TextPreprocess | None
    scoring: Scoring | None  # None only for generative families
    labels: Labels | None
    files: dict[str, str]  # every file of the bundle (but the manifest) → sha256 hex digest
    verification: dict[str, Any] = field(default_factory=dict)  # graph → figures measured at export
    audio: AudioPreprocess | None = None  # audio-visual bundles
    fusion: Fusion | None = None  # fusion bundles
    generation: Generation | None = None  # captioners
    source: dict[str, Any] = field(default_factory=dict)  # what the model was built from
    tools: dict[str, str] = field(default_factory=dict)  # package → version that made the bundle
    created: str = ""  # ISO 8601 UTC time of export

    def __post_init__(self):
        _int("schema_version", self.schema_version, 1, SCHEMA_VERSION)
        for name in ("name", "family", "precision"):
            _text(name, getattr(self, name))
        if self.family in GENERATIVE_FAMILIES:
            if self.generation is None:
                raise ManifestFieldError("generation", f"is required by a {self.family} bundle")
            if self.embedding_dim is not None:
                _int("embedding_dim", self.embedding_dim, 1, 1 << 16)
            roles = (CAPTION_ENCODER, CAPTION_DECODER) + ((self.generation.question_graph,)
                                                          if self.generation.question_graph else ())
            for role in roles:
                if role not in self.graphs:
                    raise ManifestFieldError("graphs", f"lacks {role!r}, which a {self.family} bundle needs")
            g, inputs = self.generation, {t.name for t in self.graphs[CAPTION_DECODER].inputs}
            for name, value in (("input_ids", g.input_ids), *((f"cache.{p}", p) for p in g.cache),
                                *((f"memory.{m}", m) for m in g.memory)):
                if value not in inputs:
                    raise ManifestFieldError(f"generation.{name}", f"names {value!r}, which graph {CAPTION_DECODER!r} "
                                                                  f"does not take (it takes {sorted(inputs)})")
        else:
            _int("embedding_dim", self.embedding_dim, 1, 1 << 16)
            if self.scoring is None:
                raise ManifestFieldError("scoring", "is missing")
        if not isinstance(self.graphs, dict) or not self.graphs:
            raise ManifestFieldError("graphs", "must name at least one graph")
        if not isinstance(self.files, dict) or not all(
                isinstance(d, str) and _SHA256.fullmatch(d) for d in self.files.values()):
            raise ManifestFieldError("files", "must map each file to its sha256 (64 lowercase hex digits)")
        for rel in self.files:
            check_relative_path(f"files[{rel!r}]", rel)
        for name, rel in self.named_files():
            if rel not in self.files:
                raise ManifestFieldError(name, f"names {rel!r}, which 'files' does not list (so it has no hash)")
        for name in ("verification", "source", "tools"):
            if not isinstance(getattr(self, name), dict):
                raise ManifestFieldError(name, "must be a JSON object")
        for name, role, output in self.output_references():
            if role == TOKENS and output != "attention_mask":
                raise ManifestFieldError(name, f"reads {role}/{output}; the tokenizer gives only 'attention_mask'")
            if role != TOKENS and role not in self.graphs:
                raise ManifestFieldError(name, f"reads graph {role!r}, which 'graphs' does not have")

    def named_files(self) -> list[tuple[str, str]]:
        """(field, relative path) of every file a manifest field names; each must also be in ``files``."""
        named = [(f"graphs.{role}.file", g.file) for role, g in self.graphs.items()]
        for section, attrs in (("text", ("tokenizer",)), ("labels", ("file",)),
                               ("scoring", ("class_embeddings", "scene_labels", "hierarchy", "grounding_prior")),
                               ("fusion", ("labels",)),
                               ("generation", ("tokenizer",))):
            part = getattr(self, section)
            named += [(f"{section}.{a}", getattr(part, a)) for a in attrs if part and getattr(part, a) is not None]
        return named

    def output_references(self) -> list[tuple[str, str, str]]:
        """(field, graph role, output name) of every graph output a manifest field reads."""
        s, refs = self.scoring, []
        if s is not None:
            refs += [("scoring.class_output", "image_encoder", s.class_output)] if s.class_output else []
            refs += [(f"scoring.{a}", "audio_encoder", getattr(s, a)) for a in ("audio_output", "scene_output")
                     if getattr(s, a)]
        if self.fusion:
            refs += [(f"fusion.inputs.{k}", *v.split("/")) for k, v in self.fusion.inputs.items()]
        if self.generation:
            g = self.generation
            refs += [("generation.logits", CAPTION_DECODER, g.logits)]
            refs += [(f"generation.cache.{p}", CAPTION_DECODER, present) for p, present in g.cache.items()]
            refs += [(f"generation.memory.{m}", g.question_graph or CAPTION_ENCODER, m) for m in g.memory]
        return refs

    def check_graph(self, role: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        """Check the manifest against one opened graph's real inputs and outputs.

        The declared tensors must be the graph's (names, dtypes, ranks, fixed
        sizes), every ``embedding`` output must be ``embedding_dim`` wide, the
        image graph must take ``image.size`` pixels, and every output a field
        reads (``scoring.class_output`` …) must exist.

        Raises:
            BundleError: Naming the field and what the graph has instead.
        """
        declared = self.graphs[role]
        for kind, want, have in (("inputs", declared.inputs, inputs), ("outputs", declared.outputs, outputs)):
            actual = {t.name: t for t in have}
            if kind == "inputs" and {t.name for t in want} != set(actual):
                raise ManifestFieldError(f"graphs.{role}.inputs", f"are {[t.name for t in want]}, but the graph "
                                                                  f"takes {sorted(actual)}")
            for t in want:
                real = actual.get(t.name)
                if real is None:
                    raise ManifestFieldError(f"graphs.{role}.outputs", f"lists {t.name!r}, which the graph does not "
                                                                       f"output (it has {sorted(actual)})")
                if (real.dtype != t.dtype or len(real.shape) != len(t.shape) or any(
                        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(t.shape, real.shape))):
                    raise ManifestFieldError(f"graphs.{role}.{kind}.{t.name}", f"is declared {t.dtype} {t.shape}, but "
                                                                             f"the graph has {real.dtype} {real.shape}")
        for t in outputs:
            width = t.shape[-1] if t.shape else None
            if t.name == "embedding" and isinstance(width, int) and width != self.embedding_dim:
                raise ManifestFieldError("embedding_dim", f"is {self.embedding_dim}, but graph {role!r} outputs "
                                                          f"{width}-wide embeddings")
        if role == "image_encoder" and self.image is not None:
            for t in inputs:
                sides = [d for d in t.shape[2:] if isinstance(d, int)]
                if len(t.shape) == 4 and any(d != self.image.size for d in sides):
                    raise ManifestFieldError("image.size", f"is {self.image.size}, but the image graph takes "
                                                           f"{t.name!r} of shape {t.shape}")
        names = {t.name for t in outputs}
        for name, ref_role, output in self.output_references():
            if ref_role == role and output not in names:
                raise ManifestFieldError(name, f"reads output {output!r} of graph {role!r}, which has only "
                                               f"{sorted(names)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def distilled_towers(self) -> list[str]:
        """The towers ("text", "image") replaced by distilled students, latest first (``source.distilled_from``)."""
        towers, entry = [], self.source.get("distilled_from")
        while isinstance(entry, dict) and len(towers) < 64:
            towers.append(str(entry.get("tower")))
            entry = entry.get("earlier")
        return towers

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        """Build a manifest from its JSON form, checking the schema and every field.

        Raises:
            BundleError: The schema is newer than this runtime, or a field is missing or
                malformed (the message names the field).
        """
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}.")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise BundleError(f"{where}: 'schema_version' is missing or not a positive integer; "
                              "this is not an edgemm bundle.")
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"{where}: bundle schema version {version} is newer than this edgemm understands "
                f"(up to {SCHEMA_VERSION}). Upgrade edgemm on this device, or re-export the bundle with this version."
            )
        try:
            required = ["name", "family", "precision", "graphs", "files"]
            if data.get("family") not in GENERATIVE_FAMILIES:
                required += ["embedding_dim", "scoring"]
            missing = [k for k in required if k not in data]
            if missing:
                raise ManifestFieldError(missing[0], "is missing")
            if not isinstance(data["graphs"], dict):
                raise ManifestFieldError("graphs", "must be a JSON object of role → graph")
            graphs = {}
            for role, g in data["graphs"].items():
                try:
                    graphs[role] = GraphSpec.from_dict(g)
                except ManifestFieldError as e:
                    raise e.within(f"graphs.{role}") from None
            sections = {name: _build(name, kind, data[name]) if data.get(name) else None
                        for name, kind in (("image", ImagePreprocess), ("text", TextPreprocess), ("labels", Labels),
                                           ("audio", AudioPreprocess), ("fusion", Fusion),
                                           ("generation", Generation))}
            return cls(
                schema_version=version, name=data["name"], family=data["family"],
                embedding_dim=data.get("embedding_dim"), precision=data["precision"], graphs=graphs,
                scoring=_build("scoring", Scoring, data["scoring"]) if data.get("scoring") is not None else None,
                files=data["files"],
                verification=data.get("verification", {}), source=data.get("source", {}),
                tools=data.get("tools", {}), created=str(data.get("created", "")), **sections,
            )
        except ManifestFieldError as e:
            raise BundleError(f"{where}: {e}. Re-export the bundle (or fix that field).") from None


def parse_json(data: bytes, where: str, error: type[EdgemmError] = BundleError) -> Any:
    """Strict JSON from an untrusted file: UTF-8, no duplicate keys, no NaN/Infinity, nesting the parser can take.

    Raises:
        EdgemmError: ``error`` (a ``BundleError`` unless given), naming ``where`` and what is wrong.
    """

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise error(f"{where}: key {dup!r} appears twice in one object; a reader could take either value.")
        return obj

    def not_a_number(name: str) -> Any:
        raise error(f"{where}: holds {name}, which is not a JSON number (Python's json writes it; the standard "
                    "does not).")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=not_a_number)
    except RecursionError:
        raise error(f"{where}: nests too deeply to parse; this file was not made by edgemm.") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{where}: cannot be read as JSON ({e}).") from None


def read_json_file(path: Path, max_bytes: int, limit: str) -> Any:
    """A JSON file of at most ``max_bytes`` (the ``edgemm.limits`` field ``limit``), strictly parsed.

    Raises:
        BundleError: Unreadable, too large or malformed.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise BundleError(f"{path}: cannot be read ({e.strerror or e}).") from None
    if len(data) > max_bytes:
        raise BundleError(f"{path}: larger than {max_bytes} bytes; {LIMITS.hint(limit)}.")
    return parse_json(data, str(path))


def read_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and check ``manifest.json`` of a bundle directory.

    Raises:
        BundleError: The file is missing, too large, not strict JSON, or not a manifest this runtime understands.
    """
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST_NAME}; this is not an edgemm bundle directory.")
    return Manifest.from_dict(read_json_file(path, LIMITS.max_json_bytes, "max_json_bytes"), where=str(path))
