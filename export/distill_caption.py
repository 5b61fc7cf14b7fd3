"""Captioner decoder students: fewer layers, trained to write the teacher's captions.

The student is the teacher's own decoder with some layers dropped
(:func:`decoder_student`; the token and position embeddings, the final norm and
the tied LM head are kept, so it writes in the teacher's vocabulary), and it
keeps the teacher's image side: only the decoder, which runs once per token,
gets smaller.

Training (:func:`distill_decoder`) is sequence-level knowledge distillation
(Kim & Rush 2016): the targets are the captions the teacher *writes* for
unlabelled images, with the bundle's own decoding settings, not reference
captions. Each step runs teacher and student teacher-forced on a batch of those
captions over the images' encoder states and minimises

    ce_weight × cross-entropy(student, the teacher's tokens)
    + kl_weight × T² × KL(teacher ‖ student) at temperature T,

over the generated positions (token-level distillation, Hinton et al. 2015,
on top of the sequence-level targets). Only the kept layers and the final norm
are trained; the embeddings and head stay the teacher's. The loop is the text
students' (``edgemm.export.distill``): AdamW with warmup and cosine decay,
length-bucketed batches, a held-out split scored each epoch, early stopping that
restores the best epoch, and atomic checkpoints that a resumed run continues to
the same final weights.

Supported decoders: Whisper (``WhisperForCausalLM``, the built-in captioner),
GPT-2 with cross-attention (``VisionEncoderDecoderModel`` captioners) and BLIP's
text decoder (``BlipTextLMHeadModel``).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.export.distill import _hash_module, _Run, _selection, _start, _Task, _threads, _train, only_trained
from edgemm.runtime.errors import ExportError, InputError

Progress = Callable[[int, int, int, dict[str, float]], None]  # (epoch, step, total_steps, metrics)
MAX_MEMORY_BYTES = 4 << 30  # encoder states kept in RAM for training; more must come from fewer images


@dataclass(frozen=True)
class _Layout:
    """Where a decoder keeps its layers, what counts them, and what a student trains."""

    layers: str  # dotted path of the nn.ModuleList
    count: str  # config attribute holding the layer count
    trained: tuple[str, ...]  # parameter-name prefixes the student trains (layers, final norm)


_LAYOUTS = {
    "whisper": _Layout("model.decoder.layers", "decoder_layers", ("model.decoder.layers.", "model.decoder.layer_norm.")),
    "gpt2": _Layout("transformer.h", "n_layer", ("transformer.h.", "transformer.ln_f.")),
    "blip_text_model": _Layout("bert.encoder.layer", "num_hidden_layers",
                               ("bert.encoder.layer.", "cls.predictions.transform.")),
}


def _layout(lm: nn.Module) -> _Layout:
    kind = getattr(getattr(lm, "config", None), "model_type", None)
    if kind not in _LAYOUTS:
        raise ExportError(f"cannot distil a {type(lm).__name__} decoder (model_type {kind!r}); edgemm distils "
                          "Whisper, GPT-2 (VisionEncoderDecoderModel) and BLIP text decoders.")
    return _LAYOUTS[kind]


def _resolve(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def decoder_layers(lm: nn.Module) -> int:
    """How many layers a supported decoder has."""
    return len(_resolve(lm, _layout(lm).layers))


def selected_layers(layers: int | Sequence[int], count: int) -> list[int]:
    """The teacher layers a student keeps: ``layers`` of ``count`` spread evenly, or the indices given (checked)."""
    return _selection(layers, count)


def decoder_student(teacher: nn.Module, layers: int | Sequence[int]) -> nn.Module:
    """A copy of ``teacher`` (a transformers decoder LM) keeping only some of its layers.

    Args:
        teacher: ``WhisperForCausalLM``, ``GPT2LMHeadModel`` (with cross-attention) or ``BlipTextLMHeadModel``;
            left unchanged.
        layers: How many layers to keep, spread evenly with first and last kept
            (``edgemm.export.distill.default_layer_selection``), or the 0-based indices to keep, increasing.

    Returns:
        The student in eval mode, its config's layer count updated.

    Raises:
        InputError: ``layers`` keeps every layer, or names an index out of range, twice or out of order.
        ExportError: Not a supported decoder.
    """
    layout = _layout(teacher)
    chosen = _selection(layers, decoder_layers(teacher))
    student = copy.deepcopy(teacher)
    parent_path, _, name = layout.layers.rpartition(".")
    parent = _resolve(student, parent_path)
    kept = nn.ModuleList([getattr(parent, name)[i] for i in chosen])
    setattr(parent, name, kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # transformers' cache bookkeeping numbers layers from 0
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(student.config, layout.count, len(chosen))
    return student.eval()


def teacher_forced_logits(lm: nn.Module, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits (batch, length, vocab) of ``ids`` in one causal pass over the encoder states ``memory``."""
    if _layout(lm) is _LAYOUTS["whisper"]:
        return lm(input_ids=ids, encoder_outputs=(memory,), use_cache=False).logits
    return lm(input_ids=ids, encoder_hidden_states=memory, use_cache=False).logits


# ----------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class CaptionDistillOptions:
    """How a decoder student is trained; every field but ``threads`` and ``checkpoint_every`` must match on resume."""

    epochs: int = 6  # most passes over the training captions
    max_steps: int = 0  # stop after this many optimizer steps in all (0: the epochs decide)
    batch_size: int = 32  # captions per optimizer step
    lr: float = 3e-4  # AdamW peak learning rate
    weight_decay: float = 0.01  # on weight matrices only
    warmup: float = 0.05  # share of the steps with a linear rise; then cosine decay to 0
    ce_weight: float = 1.0  # cross-entropy on the teacher's generated tokens (sequence-level distillation)
    kl_weight: float = 1.0  # KL(teacher ‖ student) per position (token-level distillation)
    temperature: float = 1.0  # softmax temperature of the KL term
    dropout: bool = False  # keep the decoder's dropout on while training (off: the student copies exactly)
    seed: int = 0  # shuffling and the held-out split
    patience: int = 2  # epochs without a lower held-out loss before stopping; 0 never stops early
    held_out_fraction: float = 0.1  # share of the training images held out to choose the epoch
    checkpoint_every: int = 100  # steps between checkpoints (0: only at epoch ends)
    threads: int | None = None  # torch intra-op threads while training

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"caption distill options: {name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_steps", "patience", "checkpoint_every", "weight_decay", "ce_weight", "kl_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"caption distill options: {name} must be 0 or more, got {getattr(self, name)}.")
        if self.ce_weight == 0 and self.kl_weight == 0:
            raise InputError("caption distill options: ce_weight and kl_weight are both 0; nothing would be learnt.")
        for name in ("lr", "temperature"):
            if getattr(self, name) <= 0:
                raise InputError(f"caption distill options: {name} must be above 0, got {getattr(self, name)}.")
        if not 0.0 <= self.warmup < 1.0:
            raise InputError(f"caption distill options: warmup is a share of the steps in [0, 1), got {self.warmup}.")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise InputError("caption distill options: held_out_fraction must be in (0, 1), got "
                             f"{self.held_out_fraction}.")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"caption distill options: threads must be a positive integer or None, got {self.threads}.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaptionDistillOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown caption distill options {unknown}; the options are {sorted(known)}.")
        return cls(**values)


@dataclass
class CaptionSet:
    """Encoder states of images and the teacher's captions of them (start ids, generated ids, end id if any)."""

    memory: torch.Tensor  # (N, M, W) float32
    tokens: list[list[int]]

    def __post_init__(self) -> None:
        if self.memory.dim() != 3 or len(self.memory) != len(self.tokens):
            raise InputError(f"caption distillation needs one (M, W) encoder state per caption, got memory "
                             f"{tuple(self.memory.shape)} for {len(self.tokens)} captions.")

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, rows: np.ndarray) -> CaptionSet:
        return CaptionSet(self.memory[torch.from_numpy(rows)], [self.tokens[i] for i in rows])

    def digest(self) -> str:
        h = hashlib.sha256(self.memory.numpy().tobytes())
        for t in self.tokens:
            h.update(np.asarray(t, np.int64).tobytes() + b"\x1f")
        return h.hexdigest()


def split_captions(data: CaptionSet, held_out_fraction: float, seed: int = 0) -> tuple[CaptionSet, CaptionSet]:
    """(train, held out): a seeded share of the rows, at least one on each side."""
    if len(data) < 2:
        raise InputError(f"caption distillation needs at least 2 captioned images, got {len(data)}.")
    order = np.random.default_rng([seed, 7]).permutation(len(data))
    held = min(len(data) - 1, max(1, round(held_out_fraction * len(data))))
    return data.subset(np.sort(order[held:])), data.subset(np.sort(order[:held]))


@dataclass
class CaptionDistillReport:
    """What a decoder distillation run did, and how close the student came to the teacher on held-out captions."""

    train_items: int
    held_out_items: int
    epochs_run: int
    best_epoch: int  # 0: the untrained student
    stopped_early: bool
    steps: int
    seconds: float
    held_out_loss: float
    held_out_token_agreement: float  # teacher-forced: the student's top token is the teacher's, per generated position
    held_out_caption_agreement: float  # teacher-forced: every generated token of the caption is the teacher's
    initial_token_agreement: float  # before training (the layers dropped, nothing trained)
    resumed_from_step: int | None
    unit: str = "captions"
    options: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        stop = ", stopped early" if self.stopped_early else ""
        return "\n".join([
            f"distilled on the teacher's captions of {self.train_items} images, {self.held_out_items} held out; "
            f"{self.steps} steps, {self.epochs_run} epoch(s) (best {self.best_epoch}{stop}), {self.seconds:.0f} s",
            f"held-out, teacher-forced: token agreement {self.held_out_token_agreement:.1%} (before training "
            f"{self.initial_token_agreement:.1%}), whole captions {self.held_out_caption_agreement:.1%}",
        ])


def _batch(data: CaptionSet, idx: np.ndarray, pad_id: int, prompt_length: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(memory, inputs, targets, mask of the generated positions) of rows ``idx``, right-padded."""
    rows = [data.tokens[i] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, prompt_length - 1 : len(r) - 1] = True  # positions whose next token the teacher generated
    return data.memory[torch.from_numpy(idx)], ids[:, :-1], ids[:, 1:], mask


def _losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
            options: CaptionDistillOptions) -> torch.Tensor:
    s, t, y = student_logits[mask].float(), teacher_logits[mask].float(), targets[mask]
    loss = options.ce_weight * F.cross_entropy(s, y) if options.ce_weight else s.new_zeros(())
    if options.kl_weight:
        temp = options.temperature
        kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True, reduction="batchmean")
        loss = loss + options.kl_weight * temp * temp * kl
    return loss


class _CaptionRun(_Run):
    """The text students' training run (checkpoints, epochs, early stopping) with a decoder's step and scores."""

    def __init__(self, student: nn.Module, teacher: nn.Module, params: dict[str, nn.Parameter],
                 data: tuple[CaptionSet, CaptionSet], pad_id: int, prompt_length: int,
                 options: CaptionDistillOptions, folder: Path | None, fingerprint: dict[str, str]):
        self.teacher, self.train_data, self.held_data = teacher, data[0], data[1]
        self.pad_id, self.prompt_length = pad_id, prompt_length
        lengths = tuple(np.array([len(t) for t in d.tokens]) for d in data)
        task = _Task("captions", lambda idx, held: {}, lengths, lambda out, target: out)
        rows = (torch.arange(len(data[0])), torch.arange(len(data[1])))
        super().__init__(student, params, task, rows, options, folder, fingerprint)  # type: ignore[arg-type]

    def _pass(self, data: CaptionSet, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        memory, inputs, targets, mask = _batch(data, idx, self.pad_id, self.prompt_length)
        with torch.no_grad():
            teacher = teacher_forced_logits(self.teacher, memory, inputs)
        return teacher_forced_logits(self.student, memory, inputs), teacher, targets, mask

    def loss(self, idx: np.ndarray) -> torch.Tensor:
        student, teacher, targets, mask = self._pass(self.train_data, idx)
        return _losses(student, teacher, targets, mask, self.options)  # type: ignore[arg-type]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.student.eval()
        loss_sum = agreed = positions = whole = 0.0
        for idx in self.eval_batches:
            student, teacher, targets, mask = self._pass(self.held_data, idx)
            loss_sum += float(_losses(student, teacher, targets, mask, self.options)) * len(idx)  # type: ignore[arg-type]
            hit = student.argmax(-1) == targets
            agreed += float((hit & mask).sum())
            positions += float(mask.sum())
            whole += float((hit | ~mask).all(dim=1).sum())
        n = len(self.held_data)
        return {"held_out_loss": loss_sum / n, "held_out_token_agreement": agreed / max(positions, 1.0),
                "held_out_caption_agreement": whole / n}

    def report(self, resumed_from: int | None) -> CaptionDistillReport:  # type: ignore[override]
        s = self.state
        kept = next(h for h in s.history if h["epoch"] == s.best_epoch)
        return CaptionDistillReport(
            train_items=len(self.train_data), held_out_items=len(self.held_data), epochs_run=s.epoch,
            best_epoch=s.best_epoch, stopped_early=s.stopped, steps=s.step, seconds=self.elapsed(),
            held_out_loss=kept["held_out_loss"], held_out_token_agreement=kept["held_out_token_agreement"],
            held_out_caption_agreement=kept["held_out_caption_agreement"],
            initial_token_agreement=s.history[0]["held_out_token_agreement"], resumed_from_step=resumed_from,
            options=asdict(self.options), history=s.history)


def trainable(student: nn.Module) -> dict[str, nn.Parameter]:
    """The student's kept layers and final norm (embeddings and the tied head stay the teacher's)."""
    prefixes = _layout(student).trained
    return {name: p for name, p in student.named_parameters() if name.startswith(prefixes)}


def distill_decoder(teacher: nn.Module, student: nn.Module, train_data: CaptionSet, held_out: CaptionSet, *,
                    pad_id: int, prompt_length: int, options: CaptionDistillOptions = CaptionDistillOptions(),
                    checkpoint_dir: str | Path | None = None, resume: bool = False,
                    progress: Progress | None = None) -> tuple[nn.Module, CaptionDistillReport]:
    """Train ``student`` (from :func:`decoder_student`) to write ``teacher``'s captions.

    Deterministic for a given ``options.seed`` and thread count; the caller's torch
    RNG state is left as it was. With ``checkpoint_dir`` a checkpoint is written
    atomically every ``checkpoint_every`` steps and after each epoch, and
    ``resume=True`` continues it to the weights an uninterrupted run reaches.

    Args:
        teacher: The teacher decoder LM (not modified).
        student: Trained in place.
        train_data: Encoder states and the teacher's captions to train on.
        held_out: The same for choosing the epoch (``split_captions``).
        pad_id: Fills short captions in a batch (masked out of the loss).
        prompt_length: Start ids every caption begins with (not trained on).
        options: Optimiser, schedule, losses, early stopping, checkpointing.
        checkpoint_dir: Folder for ``checkpoint.pt``; None writes none.
        resume: Continue from the checkpoint in ``checkpoint_dir``.
        progress: ``progress(epoch, step, total_steps, metrics)`` after every step and evaluation.

    Returns:
        The student in eval mode with the best epoch's weights, and the report.

    Raises:
        InputError: Empty data, captions shorter than the prompt, a checkpoint folder that holds
            another run, or a checkpoint from a different run (with ``resume``).
        ExportError: Not a supported decoder.
    """
    for name, data in (("training", train_data), ("held-out", held_out)):
        if not len(data):
            raise InputError(f"no {name} captions; split the captioned images with split_captions().")
        short = [i for i, t in enumerate(data.tokens) if len(t) <= prompt_length]
        if short:
            raise InputError(f"{len(short)} {name} captions have no generated token after the {prompt_length} "
                             "start ids; caption the images again.")
    folder = _start(checkpoint_dir, resume)
    teacher.eval()
    params = trainable(student)
    with only_trained(student, params), torch.random.fork_rng(devices=[]), _threads(options.threads):
        torch.manual_seed(options.seed)
        fingerprint = {}
        if folder is not None:
            settings = {k: v for k, v in asdict(options).items() if k not in ("threads", "checkpoint_every")}
            fingerprint = {"teacher": _hash_module(teacher), "student": _hash_module(student),
                           "data": hashlib.sha256((train_data.digest() + held_out.digest()
                                                   + f"{pad_id}:{prompt_length}").encode()).hexdigest(),
                           "options": hashlib.sha256(repr(sorted(settings.items())).encode()).hexdigest()}
        run = _CaptionRun(student, teacher, params, (train_data, held_out), pad_id, prompt_length, options,
                          folder, fingerprint)
        return _train(run, resume, progress)  # type: ignore[return-value]


def memory_bytes(rows: int, memory_shape: Sequence[int]) -> int:
    """Bytes of float32 encoder states for ``rows`` images of one image's ``(M, W)`` states."""
    return rows * math.prod(memory_shape) * 4

