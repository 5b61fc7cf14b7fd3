"""Training a fusion head on frozen tower features.

Three steps, each usable alone (``edgemm train fusion`` chains them):

1. ``read_examples``: (image, text, label) rows from a CSV, checked in full
   before anything runs, so a bad row is reported with its line number instead
   of failing an hour in.
2. ``cache_features``: the towers are frozen, so their features are computed
   once per image and per text and kept on disk (one ``.npz`` per item, keyed
   by a hash of the item's bytes and of the towers' weights, written
   atomically); a second run, or a run on an extended CSV, reuses them.
3. ``train_head``: AdamW on the head alone, a validation split (stratified, or
   given), early stopping that restores the best epoch, optional modality
   dropout, and a ``TrainReport``.

Kept apart from the model file (``models/fusion.py``) as open_clip keeps its
training code apart from its models.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgemm.export.models.fusion import IMAGE_FEATURES, FusionConfig, FusionHead, build_head, tower_features
from edgemm.runtime.errors import InputError

CSV_NAMES = ("data.csv", "labels.csv")  # what a folder source may hold (exactly one of them)
COLUMNS = ("image", "text", "label")  # required CSV header columns
CACHE_VERSION = 1  # bump when the cached arrays change meaning
MAX_LISTED = 5  # problems of one kind listed in an error message


@dataclass(frozen=True)
class Example:
    image: Path | np.ndarray  # an image file, or an RGB uint8 array (H, W, 3)
    text: str  # the text paired with the image
    label: str  # the class name


def _load_rgb(image: Path | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"an example's image array must be RGB uint8 (H, W, 3), got {image.dtype} "
                             f"{image.shape}.")
        return image
    from PIL import Image

    try:
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read image {image}: {e}. Replace or remove the file.") from e


def _check_image_file(path: Path) -> str | None:
    """None if ``path`` is a readable image, else what is wrong with it."""
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for damaged files
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def _csv_of(source: Path) -> Path:
    if source.is_dir():
        found = [source / n for n in CSV_NAMES if (source / n).is_file()]
        if not found:
            raise InputError(f"{source} holds neither {' nor '.join(CSV_NAMES)}; put the rows (header "
                             f"{','.join(COLUMNS)}) in {CSV_NAMES[0]}.")
        if len(found) > 1:
            raise InputError(f"{source} holds both {' and '.join(CSV_NAMES)}; keep one, so it is clear which "
                             "rows to train on.")
        return found[0]
    if not source.is_file():
        raise InputError(f"training data {source} does not exist; give a CSV file or a folder holding "
                         f"{CSV_NAMES[0]}.")
    return source


def _problem_list(kind: str, items: list[str], advice: str) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {kind}: {'; '.join(items[:MAX_LISTED])}{more}. {advice}"


def read_examples(source: str | Path, labels: Sequence[str] | None = None, *,
                  min_per_label: int = 2) -> tuple[list[Example], list[str]]:
    """Read and check (image, text, label) rows.

    Args:
        source: A CSV file with the header ``image,text,label`` (other columns
            are ignored; image paths are relative to the CSV's folder), or a
            folder holding one such file named ``data.csv`` or ``labels.csv``.
        labels: The allowed labels (e.g. an existing bundle's); rows with
            another label are errors. When None, the labels are those found.
        min_per_label: Fewest rows a label needs (it must land in both the
            training and the validation split).

    Returns:
        The examples in file order, and the label names: ``labels`` in the
        order given, or else the labels found, sorted.

    Raises:
        InputError: The file is missing or has no such header; or rows have
            empty fields, missing or unreadable images, unknown labels; or a
            label has fewer than ``min_per_label`` rows, or there are fewer
            than two labels. Each problem names its line; every row is checked
            before raising, and nothing is written.
    """
    path = _csv_of(Path(source))
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(_rows(path, csv.reader(f)))
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e}); save it as UTF-8 CSV.") from e
    except csv.Error as e:
        raise InputError(f"{path} is not a valid CSV file: {e}.") from e
    if not rows:
        raise InputError(f"{path} has a header but no rows; add one row per (image, text, label).")

    allowed = None if labels is None else list(labels)
    empty, missing, unreadable, unknown = [], [], [], []
    examples = []
    for line, image, text, label in rows:
        blank = [name for name, value in zip(COLUMNS, (image, text, label)) if not value]
        if blank:
            empty.append(f"line {line} ({', '.join(blank)})")
            continue
        if allowed is not None and label not in allowed:
            unknown.append(f"line {line}: {label!r}")
        file = Path(image).expanduser()
        file = file if file.is_absolute() else path.parent / file
        problem = _check_image_file(file)
        if problem == "missing":
            missing.append(f"line {line}: {image}")
        elif problem:
            unreadable.append(f"line {line}: {image} {problem}")
        examples.append(Example(file, text, label))

    problems = []
    if empty:
        problems.append(_problem_list("rows with empty fields", empty, "Fill in or remove those rows."))
    if missing:
        problems.append(_problem_list(f"missing image files (paths are relative to {path.parent})", missing,
                                      "Fix the paths or remove those rows."))
    if unreadable:
        problems.append(_problem_list("unreadable image files", unreadable, "Replace or remove those files."))
    if unknown:
        problems.append(_problem_list(f"rows with unknown labels (allowed: {allowed})", unknown,
                                      "Fix the labels or add them to the label list."))
    if problems:
        raise InputError(f"{path}: " + " ".join(problems))

    counts = Counter(e.label for e in examples)
    names = allowed if allowed is not None else sorted(counts)
    if len(names) < 2:
        raise InputError(f"{path}: only one label ({names}); a classifier needs at least two.")
    few = [f"{n!r} ({counts.get(n, 0)})" for n in names if counts.get(n, 0) < min_per_label]
    if few:
        raise InputError(f"{path}: labels with fewer than {min_per_label} rows: {', '.join(few)}. Each label needs "
                         f"{min_per_label} rows or more so it appears in both the training and the validation split; "
                         "add rows or drop the label.")
    return examples, names


def _rows(path: Path, reader: Any):
    """(line, image, text, label) per non-blank data row, after checking the header."""
    header = next(reader, None)
    if header is None:
        raise InputError(f"{path} is empty; it needs the header {','.join(COLUMNS)} and one row per example.")
    names = [h.strip().lower() for h in header]
    absent = [c for c in COLUMNS if c not in names]
    if absent:
        raise InputError(f"{path} line 1: the header lacks the column(s) {absent}; found {header}. The header must "
                         f"name {','.join(COLUMNS)} (any order, other columns ignored).")
    where = [names.index(c) for c in COLUMNS]
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        cells = [row[i].strip() if i < len(row) else "" for i in where]
        yield (reader.line_num, *cells)


def label_targets(examples: Sequence[Example], labels: Sequence[str]) -> np.ndarray:
    """Class index per example (int64), by position in ``labels``.

    Raises:
        InputError: An example's label is not in ``labels``.
    """
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({e.label for e in examples} - set(index))
    if unknown:
        raise InputError(f"labels {unknown[:MAX_LISTED]} are not in the label list {list(labels)}.")
    return np.array([index[e.label] for e in examples], np.int64)


# --------------------------------------------------------------------------- feature cache


def _tower_identity(image_tower: nn.Module, text_embedder: Any) -> str:
    """A hash of everything that shapes the features: weights, tokenizer, preprocessing."""
    from edgemm.export.models.dual_encoder import DEFAULT_IMAGE

    h = hashlib.sha256(f"fusion-features-v{CACHE_VERSION}".encode())
    for prefix, module in (("image.", image_tower), ("text.", text_embedder.tower)):
        for name, tensor in module.state_dict().items():
            h.update((prefix + name).encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    tokenizer = getattr(text_embedder, "tokenizer", None)
    if tokenizer is not None:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps({"max_length": getattr(text_embedder, "max_length", None),
                         "image": asdict(DEFAULT_IMAGE)}, sort_keys=True).encode())
    return h.hexdigest()


def _image_key(identity: str, image: Path | np.ndarray) -> str:
    h = hashlib.sha256(identity.encode() + b"image")
    if isinstance(image, np.ndarray):
        h.update(f"{image.dtype}{image.shape}".encode())
        h.update(np.ascontiguousarray(image).tobytes())
    else:
        try:
            h.update(Path(image).read_bytes())
        except OSError as e:
            raise InputError(f"cannot read image {image}: {e}. Fix the path or remove the row.") from e
    return h.hexdigest()[:32]


def _text_key(identity: str, text: str) -> str:
    return hashlib.sha256(identity.encode() + b"text" + text.encode()).hexdigest()[:32]


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz so that a reader sees the whole file or none (temp file + os.replace)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> dict[str, np.ndarray] | None:
    """A cached entry, or None when absent or damaged (it is then recomputed and replaced)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # a truncated or foreign file: treat as a miss
        return None


def cache_features(towers: Sequence[Any], examples: Sequence[Example], cache_dir: str | Path,
                   progress: Callable[[int, int], None] | None = None, *,
                   chunk: int = 64) -> dict[str, np.ndarray]:
    """Frozen tower features for every example, computed once and cached on disk.

    Each distinct image and text is one ``.npz`` in ``cache_dir`` named by a
    hash of its bytes (file bytes for paths) and of the towers (weights,
    tokenizer, preprocessing), so changed towers never reuse stale features.

    Args:
        towers: ``(image_tower, text_embedder)``; the triple ``default_towers()``
            returns works as is.
        examples: The rows (images as paths or RGB arrays).
        cache_dir: Folder for the cache (created if needed).
        progress: Called as ``progress(done, total)`` while computing the
            items not yet cached (images then texts).
        chunk: Images/texts computed (and reported to ``progress``) per step.

    Returns:
        Per example: ``image_embedding`` (N, D), ``image_tokens`` (N, P, C),
        ``text_embedding`` (N, D), ``text_tokens`` (N, T, D) and ``text_mask``
        (N, T) int64, padded to the longest text.

    Raises:
        InputError: No examples, or an image cannot be read.
    """
    from edgemm.export.models.dual_encoder import reference_pixels

    if not examples:
        raise InputError("no examples to compute features for.")
    image_tower, text_embedder = towers[0], towers[1]
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    identity = _tower_identity(image_tower, text_embedder)

    image_keys = [_image_key(identity, e.image) for e in examples]
    text_keys = [_text_key(identity, e.text) for e in examples]
    images: dict[str, dict[str, np.ndarray]] = {}
    texts: dict[str, dict[str, np.ndarray]] = {}
    todo_images: dict[str, Path | np.ndarray] = {}
    todo_texts: dict[str, str] = {}
    for e, ik, tk in zip(examples, image_keys, text_keys):
        if ik not in images and ik not in todo_images:
            hit = _load(cache / f"image-{ik}.npz")
            if hit is None:
                todo_images[ik] = e.image
            else:
                images[ik] = hit
        if tk not in texts and tk not in todo_texts:
            hit = _load(cache / f"text-{tk}.npz")
            if hit is None:
                todo_texts[tk] = e.text
            else:
                texts[tk] = hit

    total, done = len(todo_images) + len(todo_texts), 0
    keys = list(todo_images)
    for i in range(0, len(keys), chunk):
        step = keys[i:i + chunk]
        feats = tower_features(image_tower, text_embedder, reference_pixels([_load_rgb(todo_images[k]) for k in step]),
                               None)
        for j, k in enumerate(step):
            entry = {"image_embedding": feats["image_embedding"][j], "image_tokens": feats["image_tokens"][j]}
            _save_atomic(cache / f"image-{k}.npz", **entry)
            images[k] = entry
        done += len(step)
        if progress:
            progress(done, total)
    keys = list(todo_texts)
    for i in range(0, len(keys), chunk):
        step = keys[i:i + chunk]
        feats = tower_features(image_tower, text_embedder, None, [todo_texts[k] for k in step])
        for j, k in enumerate(step):
            length = int(feats["text_mask"][j].sum())
            entry = {"text_embedding": feats["text_embedding"][j], "text_tokens": feats["text_tokens"][j, :length]}
            _save_atomic(cache / f"text-{k}.npz", **entry)
            texts[k] = entry
        done += len(step)
        if progress:
            progress(done, total)

    length = max(len(texts[k]["text_tokens"]) for k in text_keys)
    dim = texts[text_keys[0]]["text_tokens"].shape[1]
    tokens = np.zeros((len(examples), length, dim), np.float32)
    mask = np.zeros((len(examples), length), np.int64)
    for row, k in enumerate(text_keys):
        t = texts[k]["text_tokens"]
        tokens[row, :len(t)] = t
        mask[row, :len(t)] = 1
    return {
        "image_embedding": np.stack([images[k]["image_embedding"] for k in image_keys]).astype(np.float32),
        "image_tokens": np.stack([images[k]["image_tokens"] for k in image_keys]).astype(np.float32),
        "text_embedding": np.stack([texts[k]["text_embedding"] for k in text_keys]).astype(np.float32),
        "text_tokens": tokens,
        "text_mask": mask,
    }


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 60  # most passes over the training rows
    batch_size: int = 64  # rows per optimizer step
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW weight decay
    modality_dropout: float = 0.0  # chance, per training row, of zeroing one whole modality (image or text, 50/50)
    patience: int = 8  # epochs without a lower validation loss before stopping; 0 never stops early
    val_fraction: float = 0.2  # rows held out per class when no validation rows are given
    seed: int = 0  # seeds the split, the initialisation, shuffling and dropout
    balance: bool = True  # weight the loss so each class counts equally (for matching: positives vs negatives)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"train options: {name} must be at least 1, got {getattr(self, name)}.")
        if self.patience < 0:
            raise InputError(f"train options: patience must be 0 (off) or more, got {self.patience}.")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise InputError(f"train options: modality_dropout is a probability in [0, 1], got "
                             f"{self.modality_dropout}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"train options: val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.lr <= 0 or self.weight_decay < 0:
            raise InputError(f"train options: lr must be > 0 and weight_decay >= 0, got {self.lr}, "
                             f"{self.weight_decay}.")


@dataclass
class TrainReport:
    architecture: str  # the head's architecture
    config: dict[str, Any]  # FusionConfig.to_dict() of the trained head
    options: dict[str, Any]  # the TrainOptions used
    train_rows: int  # rows trained on
    val_rows: int  # rows validated on
    epochs_run: int  # epochs actually run
    best_epoch: int  # 1-based epoch whose weights were kept
    stopped_early: bool  # validation loss stopped improving before the last epoch
    val_loss: float  # validation loss at the best epoch
    val_accuracy: float  # validation accuracy at the best epoch
    seconds: float  # wall time of the training loop
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: train/val loss and accuracy
    baseline_name: str = "majority class"  # what the baseline is
    baseline_accuracy: float | None = None  # the baseline's validation accuracy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [
            f"fusion head '{self.architecture}': {self.train_rows} training rows, {self.val_rows} validation rows",
            f"epochs run {self.epochs_run} (best {self.best_epoch}{', stopped early' if self.stopped_early else ''}), "
            f"{self.seconds:.1f} s",
            f"validation accuracy {self.val_accuracy:.1%}, loss {self.val_loss:.4f}",
        ]
        if self.baseline_accuracy is not None:
            lines.append(f"baseline ({self.baseline_name}) accuracy {self.baseline_accuracy:.1%}")
        return "\n".join(lines)


def _check_features(head: FusionHead, features: dict[str, np.ndarray], targets: np.ndarray,
                    pairs: tuple[np.ndarray, np.ndarray] | None) -> None:
    missing = [n for n in head.input_names if n not in features]
    if missing:
        raise InputError(f"features lack {missing}, which the '{head.config.architecture}' head reads; "
                         f"got {sorted(features)}.")
    n = len(targets)
    for name in head.input_names:
        rows = len(features[name])
        if pairs is None and rows != n:
            raise InputError(f"feature {name!r} has {rows} rows but there are {n} targets; give one row per target.")
        if pairs is not None:
            index = pairs[0] if name in IMAGE_FEATURES else pairs[1]
            if len(index) != n:
                raise InputError(f"pairs hold {len(index)} rows but there are {n} targets.")
            if len(index) and (index.min() < 0 or index.max() >= rows):
                raise InputError(f"pairs index rows outside feature {name!r} ({rows} rows).")
    classes = head.config.classes
    high = 2 if classes == 1 else classes
    if len(targets) and (targets.min() < 0 or targets.max() >= high):
        raise InputError(f"targets must be in [0, {high}) for a head with classes={classes}, got "
                         f"[{targets.min()}, {targets.max()}].")


def _drop_masks(n: int, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (drop the image, drop the text); a dropped row loses one modality, picked 50/50."""
    drop = torch.rand(n, generator=generator) < p
    image_side = torch.rand(n, generator=generator) < 0.5
    return drop & image_side, drop & ~image_side


def _zero_rows(batch: dict[str, torch.Tensor], drop_image: torch.Tensor,
               drop_text: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in batch.items():
        if name == "text_mask":  # kept: a dropped text pools over its real length, to zeros
            out[name] = t
            continue
        drop = drop_image if name in IMAGE_FEATURES else drop_text
        out[name] = t * (~drop).to(t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
    return out


def apply_modality_dropout(batch: dict[str, torch.Tensor], p: float,
                           generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Zero one whole modality (image or text, picked 50/50) of each row with probability ``p``.

    Teaches a head to cope when one tower's input is absent or poor. The text
    mask is kept, so a dropped text still pools over its real length (to zeros).

    Args:
        batch: Named features of one batch (rows first).
        p: Probability per row.
        generator: Random source (seeded by the caller, for determinism).

    Returns:
        A new dict; the input tensors are not modified.
    """
    if p <= 0:
        return dict(batch)
    drop_image, drop_text = _drop_masks(len(next(iter(batch.values()))), p, generator)
    return _zero_rows(batch, drop_image, drop_text)


class _Rows:
    """Batches of named features, row by row or through a pair index (without copying the full set).

    Through a pair index each distinct image of a batch is encoded once
    (``encode_image``) and shared by its pairs; a row whose image is dropped
    by modality dropout points at an all-zero image instead.
    """

    def __init__(self, names: Sequence[str], features: dict[str, np.ndarray],
                 pairs: tuple[np.ndarray, np.ndarray] | None):
        self.tensors = {n: torch.from_numpy(np.ascontiguousarray(features[n])) for n in names}
        self.image_names = [n for n in names if n in IMAGE_FEATURES]
        self.text_names = [n for n in names if n not in IMAGE_FEATURES]
        self.pairs = None if pairs is None else tuple(torch.from_numpy(np.asarray(p, np.int64)) for p in pairs)

    def _text(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {n: self.tensors[n][rows] for n in self.text_names}
        if "text_tokens" in out and "text_mask" in out:  # drop columns that are padding in every row
            length = max(int(out["text_mask"].sum(1).max()), 1)
            out["text_tokens"], out["text_mask"] = out["text_tokens"][:, :length], out["text_mask"][:, :length]
        return out

    def logits(self, head: FusionHead, rows: torch.Tensor, dropout: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        if self.pairs is None:
            batch = {**{n: self.tensors[n][rows] for n in self.image_names}, **self._text(rows)}
            if dropout > 0:
                batch = apply_modality_dropout(batch, dropout, generator)
            return head.forward_named(batch)
        unique, inverse = torch.unique(self.pairs[0][rows], return_inverse=True)
        images = {n: self.tensors[n][unique] for n in self.image_names}
        text = self._text(self.pairs[1][rows])
        if dropout > 0:
            drop_image, drop_text = _drop_masks(len(rows), dropout, generator)
            images = {n: torch.cat([t, t.new_zeros((1, *t.shape[1:]))]) for n, t in images.items()}
            inverse = torch.where(drop_image, len(unique), inverse)
            text = _zero_rows(text, torch.zeros_like(drop_image), drop_text)
        encoded = head.encode_image(images)
        return head.fuse_encoded({k: v[inverse] for k, v in encoded.items()}, text)


def _epoch_order(train_rows: np.ndarray, pairs: tuple[np.ndarray, np.ndarray] | None,
                 generator: torch.Generator) -> torch.Tensor:
    """Shuffled training rows; through a pair index, the pairs of one image stay together.

    Grouping lets a batch encode each of its images once (a batch of 64 pairs
    built from 7 per image holds ~9 images instead of ~60), and puts an
    image's positive beside its negatives, as matching heads are usually trained.
    """
    rows = torch.from_numpy(train_rows)
    shuffle = torch.randperm(len(rows), generator=generator)
    if pairs is None:
        return rows[shuffle]
    images = torch.from_numpy(np.asarray(pairs[0], np.int64))[rows]
    image_rank = torch.randperm(int(images.max()) + 1, generator=generator)[images]
    key = image_rank * len(rows) + torch.argsort(shuffle)  # by image, then randomly within an image
    return rows[torch.argsort(key)]


def _split(targets: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified validation mask: ``fraction`` of each class (at least one row of each with two or more)."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(targets), bool)
    for c in np.unique(targets):
        rows = np.flatnonzero(targets == c)
        rng.shuffle(rows)
        take = int(round(len(rows) * fraction))
        take = min(max(take, 1 if len(rows) >= 2 else 0), len(rows) - 1)
        val[rows[:take]] = True
    return val


def _loss_fn(config: FusionConfig, targets: np.ndarray, balance: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if config.classes == 1:
        positives = float((targets == 1).sum())
        negatives = float(len(targets) - positives)
        weight = torch.tensor([negatives / positives]) if balance and positives and negatives else None
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), pos_weight=weight)
    weight = None
    if balance:
        counts = np.bincount(targets, minlength=config.classes).astype(np.float64)
        weight = torch.tensor(np.where(counts > 0, len(targets) / (config.classes * np.maximum(counts, 1)), 0.0),
                              dtype=torch.float32)
    return lambda logits, y: F.cross_entropy(logits, y, weight=weight)


def _correct(config: FusionConfig, logits: torch.Tensor, y: torch.Tensor) -> int:
    predicted = (logits[:, 0] > 0).long() if config.classes == 1 else logits.argmax(1)
    return int((predicted == y).sum())


@torch.no_grad()
def predict_logits(head: FusionHead, features: dict[str, np.ndarray], *,
                   pairs: tuple[np.ndarray, np.ndarray] | None = None, batch_size: int = 512) -> np.ndarray:
    """The head's logits (rows, classes) for features, row by row or through a pair index.

    Args:
        head: A trained head (it is put in eval mode).
        features: Named features (``tower_features``/``cache_features`` output).
        pairs: (image rows, text rows): score image ``pairs[0][i]`` with text
            ``pairs[1][i]``; None scores row i with row i.
        batch_size: Rows per forward pass.

    Returns:
        float32 logits.
    """
    head.eval()
    if pairs is None:
        n = len(features[head.input_names[0]])
    else:
        n = len(pairs[0])
    rows = _Rows(head.input_names, features, pairs)
    out = [rows.logits(head, torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if not out:
        return np.zeros((0, head.config.classes), np.float32)
    return torch.cat(out).numpy()


def train_head(config: FusionConfig, features: dict[str, np.ndarray], targets: np.ndarray,
               options: TrainOptions = TrainOptions(),
               progress: Callable[[int, int, dict[str, float]], None] | None = None, *,
               pairs: tuple[np.ndarray, np.ndarray] | None = None,
               validation: np.ndarray | None = None) -> tuple[FusionHead, TrainReport]:
    """Train a fusion head on frozen features, with early stopping on a validation split.

    Deterministic for a given ``options.seed`` (the caller's global torch RNG
    state is left as it was).

    Args:
        config: The head to build.
        features: Named features (``cache_features`` output), one row per
            target, or per image/text when ``pairs`` is given.
        targets: Per row: 0/1 for matching (``classes=1``, BCE on the one
            logit), else the class index (cross-entropy).
        options: Epochs, optimiser, modality dropout, early stopping, seed.
        progress: Called after each epoch as ``progress(epoch, epochs, metrics)``
            with train/val loss and accuracy, for a progress bar.
        pairs: (image rows, text rows) per target, indexing the image and the
            text features separately: many pairs share one image's features
            without copying them.
        validation: Boolean mask over targets marking validation rows (e.g. to
            keep every pair of one image on one side); None draws a stratified
            ``options.val_fraction`` split.

    Returns:
        The head in eval mode holding the best epoch's weights, and the report.

    Raises:
        InputError: Features missing or misaligned, targets out of range, or
            an empty training or validation split.
    """
    targets = np.asarray(targets, np.int64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        head = build_head(config)
        _check_features(head, features, targets, pairs)
        val = _split(targets, options.val_fraction, options.seed) if validation is None else np.asarray(validation, bool)
        if len(val) != len(targets):
            raise InputError(f"validation mask has {len(val)} entries for {len(targets)} targets.")
        train_rows, val_rows = np.flatnonzero(~val), np.flatnonzero(val)
        if not len(train_rows) or not len(val_rows):
            raise InputError(f"need rows on both sides of the split; got {len(train_rows)} training and "
                             f"{len(val_rows)} validation rows. Add rows or change val_fraction.")
        data = _Rows(head.input_names, features, pairs)
        y = torch.from_numpy(targets)
        loss_fn = _loss_fn(config, targets[train_rows], options.balance)
        optimiser = torch.optim.AdamW(head.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        generator = torch.Generator().manual_seed(options.seed)
        val_index = torch.from_numpy(val_rows)

        best_loss, best_state, best_epoch, best_accuracy = float("inf"), None, 0, 0.0
        history: list[dict[str, float]] = []
        stale = 0
        start = time.perf_counter()
        epoch = 0
        for epoch in range(1, options.epochs + 1):
            head.train()
            order = _epoch_order(train_rows, pairs, generator)
            total_loss, correct = 0.0, 0
            for i in range(0, len(order), options.batch_size):
                rows = order[i:i + options.batch_size]
                logits = data.logits(head, rows, options.modality_dropout, generator)
                loss = loss_fn(logits, y[rows])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total_loss += loss.item() * len(rows)
                correct += _correct(config, logits.detach(), y[rows])
            head.eval()
            with torch.no_grad():
                val_logits = torch.cat([data.logits(head, val_index[i:i + 512])
                                        for i in range(0, len(val_index), 512)])
                val_loss = float(loss_fn(val_logits, y[val_index]))
                val_accuracy = _correct(config, val_logits, y[val_index]) / len(val_rows)
            metrics = {"epoch": epoch, "train_loss": total_loss / len(train_rows),
                       "train_accuracy": correct / len(train_rows), "val_loss": val_loss, "val_accuracy": val_accuracy}
            history.append(metrics)
            if progress:
                progress(epoch, options.epochs, metrics)
            if best_state is None or val_loss < best_loss:  # the first epoch counts even if its loss is nan
                best_loss, best_epoch, best_accuracy, stale = val_loss, epoch, val_accuracy, 0
                best_state = copy.deepcopy(head.state_dict())
            else:
                stale += 1
                if options.patience and stale >= options.patience:
                    break
        seconds = time.perf_counter() - start
        head.load_state_dict(best_state)
        head.eval()

    majority = np.bincount(targets[train_rows]).argmax()
    report = TrainReport(
        architecture=config.architecture,
        config=config.to_dict(),
        options=asdict(options),
        train_rows=len(train_rows),
        val_rows=len(val_rows),
        epochs_run=epoch,
        best_epoch=best_epoch,
        stopped_early=epoch < options.epochs,
        val_loss=best_loss,
        val_accuracy=best_accuracy,
        seconds=seconds,
        history=history,
        baseline_name="majority class",
        baseline_accuracy=float((targets[val_rows] == majority).mean()),
    )
    return head, report
