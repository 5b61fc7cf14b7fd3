"""Real evaluation data that installs offline: sample photos, Fashion-MNIST, emoji.

Sample photos come from the scikit-image, scikit-learn and matplotlib wheels
(the ``eval`` extra); Fashion-MNIST from Debian's ``dataset-fashion-mnist``;
emoji images with their Unicode names as captions from Debian's
``fonts-noto-color-emoji``, drawn with Pillow.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemm.runtime.errors import InputError, require

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class SamplePhoto:
    name: str  # where it comes from, e.g. "skimage.chelsea"
    image: np.ndarray  # RGB uint8 (H, W, 3)
    label: str  # the subject, one of SAMPLE_LABELS
    imagenet_like: bool  # subject is an everyday object of the kind ImageNet covers


# One label vocabulary for every photo, so each photo is classified among all of them.
SAMPLE_LABELS = (
    "brick wall", "building", "camera", "cat", "clock", "coins", "cup of coffee", "flower",
    "galaxy", "grass", "gravel", "moon", "person", "rocket",
)

_PHOTOS = (
    # (loader, name, label, imagenet_like)
    ("skimage", "astronaut", "person", True),
    ("skimage", "chelsea", "cat", True),
    ("skimage", "camera", "camera", True),
    ("skimage", "clock", "clock", True),
    ("skimage", "coffee", "cup of coffee", True),
    ("skimage", "coins", "coins", True),
    ("skimage", "rocket", "rocket", True),
    ("sklearn", "china.jpg", "building", True),
    ("sklearn", "flower.jpg", "flower", True),
    ("matplotlib", "grace_hopper.jpg", "person", True),
    ("skimage", "hubble_deep_field", "galaxy", False),
    ("skimage", "moon", "moon", False),
    ("skimage", "brick", "brick wall", False),
    ("skimage", "grass", "grass", False),
    ("skimage", "gravel", "gravel", False),
)


EMOJI_SPLIT = (0.7, 0.1)  # train and validation fractions of the emoji; the rest is the held-out test split


def split_rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices of the train / val / test splits (sorted), by a seeded permutation.

    The emoji's split: the matching head and the caption adapter train on
    ``train``, choose on ``val``, and are measured on ``test``.
    """
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(EMOJI_SPLIT[0] * n), int((EMOJI_SPLIT[0] + EMOJI_SPLIT[1]) * n)
    return {"train": np.sort(order[:a]), "val": np.sort(order[a:b]), "test": np.sort(order[b:])}


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3].astype(np.uint8))


def sample_photos() -> list[SamplePhoto]:
    """The 15 real sample photos with their subjects (RGB arrays).

    Raises:
        MissingDependencyError: scikit-image / scikit-learn / matplotlib are not installed.
    """
    skdata = require("skimage.data", "eval", "The sample photos")
    sk_datasets = require("sklearn.datasets", "eval", "The sample photos")
    mpl = require("matplotlib", "eval", "The sample photos")
    from PIL import Image

    sklearn_images = dict(zip(("china.jpg", "flower.jpg"), sk_datasets.load_sample_images().images))
    photos = []
    for source, name, label, like in _PHOTOS:
        if source == "skimage":
            image = getattr(skdata, name)()
        elif source == "sklearn":
            image = sklearn_images[name]
        else:
            with Image.open(Path(mpl.get_data_path()) / "sample_data" / name) as im:
                image = np.asarray(im.convert("RGB"))
        photos.append(SamplePhoto(f"{source}.{name.split('.')[0]}", _rgb(image), label, like))
    return photos


def fashion_mnist(split: str = "test", root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) from the IDX files.

    Raises:
        InputError: Unknown split, or the files are not installed (names the package).
    """
    prefix = {"test": "t10k", "train": "train"}.get(split)
    if prefix is None:
        raise InputError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'.")
    root = Path(root)
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise InputError(
            f"Fashion-MNIST is not installed at {root}. Install it with: apt-get install dataset-fashion-mnist"
        )
    with gzip.open(images) as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], ">u4")
    if magic != 2051:
        raise InputError(f"{images} is not an IDX image file (magic {magic}).")
    x = np.frombuffer(raw, np.uint8, offset=16).reshape(int(n), int(rows), int(cols))
    with gzip.open(labels) as f:
        raw = f.read()
    if np.frombuffer(raw[:4], ">u4")[0] != 2049:
        raise InputError(f"{labels} is not an IDX label file.")
    y = np.frombuffer(raw, np.uint8, offset=8)
    return x, y.astype(np.int64)


EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
_EMOJI_RANGES = ((0x1F300, 0x1F5FF), (0x1F600, 0x1F64F), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF),
                 (0x2600, 0x27BF))


def emoji(font: str | Path = EMOJI_FONT) -> list[tuple[str, np.ndarray]]:
    """Single-codepoint emoji drawn in colour (RGB 128x136), each with its lower-cased Unicode name.

    Codepoints the font has no colour glyph for are skipped (about 1,240 remain).

    Raises:
        InputError: The font is not installed (names the package).
    """
    import unicodedata

    from PIL import Image, ImageDraw, ImageFont

    if not Path(font).is_file():
        raise InputError(f"the emoji font is not installed at {font}. Install it with: "
                         "apt-get install fonts-noto-color-emoji")
    face = ImageFont.truetype(str(font), 109)  # the size the bitmap font is drawn at
    out = []
    for lo, hi in _EMOJI_RANGES:
        for cp in range(lo, hi + 1):
            name = unicodedata.name(chr(cp), "")
            if not name:
                continue
            canvas = Image.new("RGB", (136, 128), "white")
            ImageDraw.Draw(canvas).text((0, 0), chr(cp), font=face, embedded_color=True)
            rgb = np.asarray(canvas)
            if rgb.std() > 5 and not (rgb[..., 0] == rgb[..., 1]).all():  # drawn, and in colour (not a tofu box)
                out.append((name.lower(), rgb))
    return out


# Real sentences of varied length, for verifying text graphs and benchmarking them.
SAMPLE_SENTENCES = (
    "a photo of a cat",
    "a red car parked on a wet street at night",
    "forklift",
    "two people walking a dog along the beach at sunset, with waves breaking behind them",
    "an espresso in a white cup on a saucer",
    "a rocket lifting off from the launch pad, trailing smoke and fire across the sky above the ocean",
    "person",
    "an empty warehouse aisle with pallets stacked high on metal shelves",
)


# -- reference captions (what a caption of each held-out image may say) --------------------

# Accepted captions per Fashion-MNIST class; the first is the one the built-in captioner trains on.
FASHION_CAPTIONS: dict[str, tuple[str, ...]] = {
    "T-shirt/top": ("a t-shirt", "a top", "a t-shirt or top"),
    "Trouser": ("a pair of trousers", "trousers", "a pair of pants"),
    "Pullover": ("a pullover", "a sweater", "a jumper"),
    "Dress": ("a dress",),
    "Coat": ("a coat", "a jacket"),
    "Sandal": ("a sandal", "a pair of sandals"),
    "Shirt": ("a shirt",),
    "Sneaker": ("a sneaker", "a running shoe", "a shoe"),
    "Bag": ("a bag", "a handbag"),
    "Ankle boot": ("an ankle boot", "a boot"),
}
# Accepted captions per sample-photo subject (runtime/datasets.py: SAMPLE_LABELS).
PHOTO_REFERENCES: dict[str, list[str]] = {
    "brick wall": ["a brick wall", "a wall of bricks"], "building": ["a building", "a photo of a building"],
    "camera": ["a camera", "a man with a camera"], "cat": ["a cat", "a tabby cat"], "clock": ["a clock"],
    "coins": ["coins", "some coins", "a pile of coins"], "cup of coffee": ["a cup of coffee", "a coffee"],
    "flower": ["a flower", "a photo of a flower"], "galaxy": ["a galaxy", "galaxies in space"],
    "grass": ["grass", "a field of grass"], "gravel": ["gravel", "a pile of gravel"], "moon": ["the moon", "a moon"],
    "person": ["a person", "a woman"], "rocket": ["a rocket", "a rocket on a launch pad"],
}


def with_article(name: str) -> str:
    """A name as a short caption: "tabby cat" → "a tabby cat", "umbrella" → "an umbrella", plurals bare."""
    first = name.split()[0].lower() if name.split() else ""
    if first in ("a", "an", "the") or first[:1].isdigit() or first in ("two", "three", "four", "five"):
        return name
    if first.endswith("s") and not first.endswith(("ss", "us", "is", "as")) and len(first) > 3:
        return name  # "sparkles", "busts in silhouette": a plural takes no article
    return ("an " if first[:1] in "aeiou" else "a ") + name


def emoji_references(name: str) -> list[str]:
    """An emoji's accepted captions: its Unicode name with and without an article."""
    return list(dict.fromkeys([with_article(name), name]))


def plain(text: str) -> str:
    """A decoded caption in the short lower-case phrase form ("A tabby cat." → "a tabby cat")."""
    t = text.strip().rstrip(".!?").strip()
    return t[:1].lower() + t[1:]
