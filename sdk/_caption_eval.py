"""Caption evaluation on held-out real images: BLEU-1/2, CIDEr-D, exact match, caption → label retrieval.

Three sources that install offline, none of which the built-in captioner's
adapter trained on:

* **emoji**: the test split of the rendered emoji (``split_rows``, the same
  split the matching head and the caption adapter hold out), referenced by
  their Unicode names, with and without an article;
* **Fashion-MNIST**: the first test images, referenced by natural phrases for
  their class ("a pair of trousers", "trousers", …);
* **sample photos**: the 15 real photos, referenced by short phrases for their
  subject.

Captions are compared in their short phrase form (``plain``: "A tabby cat." →
"a tabby cat"). Caption → label retrieval embeds each caption and the source's
label names with a text tower (the default dual encoder's) and counts how often
the nearest label is the image's own: whether the caption names the right thing
even when its words differ from the references.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgemm._caption_metrics import caption_scores
from edgemm.runtime.datasets import (FASHION_CAPTIONS, FASHION_MNIST_CLASSES, PHOTO_REFERENCES, SAMPLE_LABELS,
                                     emoji, emoji_references, fashion_mnist, plain, sample_photos, split_rows)

def held_out_sources(fashion_limit: int = 1000) -> dict[str, dict[str, Any]]:
    """Per source: RGB images, their references, the source's label names and each image's label index.

    Raises:
        InputError: The emoji font, Fashion-MNIST or the sample photos' packages are missing (names what to install).
    """
    pairs = emoji()
    test = split_rows(len(pairs))["test"]
    emoji_names = [pairs[r][0] for r in test]
    x, y = fashion_mnist("test")
    x, y = x[:fashion_limit], y[:fashion_limit]
    photos = sample_photos()
    return {
        "emoji": {"images": [pairs[r][1] for r in test], "refs": [emoji_references(n) for n in emoji_names],
                  "labels": emoji_names, "label": np.arange(len(test))},
        "fashion_mnist": {"images": [np.repeat(a[:, :, None], 3, axis=2) for a in x],
                          "refs": [list(FASHION_CAPTIONS[FASHION_MNIST_CLASSES[int(c)]]) for c in y],
                          "labels": [c.lower() for c in FASHION_MNIST_CLASSES], "label": y.astype(np.int64)},
        "photos": {"images": [p.image for p in photos], "refs": [PHOTO_REFERENCES[p.label] for p in photos],
                   "labels": list(SAMPLE_LABELS), "label": np.array([SAMPLE_LABELS.index(p.label) for p in photos]),
                   "names": [p.name for p in photos]},
    }


def score_captions(captions: dict[str, list[str]], sources: dict[str, dict[str, Any]],
                   embed_texts: Callable[[Sequence[str]], np.ndarray] | None) -> dict[str, Any]:
    """Metrics per source, over all captions (``overall``) and averaged over sources (``macro``)."""
    out: dict[str, Any] = {}
    for name, src in sources.items():
        caps = captions[name]
        row = {**caption_scores(caps, src["refs"]), "n": len(caps)}
        if embed_texts is not None:
            c, lab = embed_texts(caps), embed_texts(src["labels"])
            row["label_accuracy"] = float(np.mean((c @ lab.T).argmax(1) == src["label"]))
        out[name] = row
    every = [c for name in sources for c in captions[name]]
    refs = [r for src in sources.values() for r in src["refs"]]
    out["overall"] = {**caption_scores(every, refs), "n": len(every)}
    keys = ["bleu1", "bleu2", "cider_d", "exact_match"] + (["label_accuracy"] if embed_texts is not None else [])
    if embed_texts is not None:
        out["overall"]["label_accuracy"] = float(np.average([out[s]["label_accuracy"] for s in sources],
                                                            weights=[out[s]["n"] for s in sources]))
    out["macro"] = {k: float(np.mean([out[s][k] for s in sources])) for k in keys}
    return out


def eval_captioner(model: Any, *, fashion_limit: int = 1000, batch_size: int = 16, text_model: Any = None,
                   progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Caption the held-out sources with a captioner bundle and score the captions.

    Args:
        model: A :class:`~edgemm.Captioner`.
        fashion_limit: Fashion-MNIST test images (the split is class-balanced throughout).
        batch_size: Images per caption call.
        text_model: A dual encoder for caption → label retrieval (``None``: skip it).
        progress: Show a progress bar.
        **settings: Decoding settings for ``caption()`` (the bundle's defaults otherwise).
    """
    from tqdm import tqdm

    sources = held_out_sources(fashion_limit)
    captions: dict[str, list[str]] = {}
    for name, src in sources.items():
        caps = []
        images = src["images"]
        for start in tqdm(range(0, len(images), batch_size), desc=name, unit="batch", disable=not progress):
            caps += [plain(c.text) for c in model.caption(images[start: start + batch_size], color="rgb",
                                                          batch_size=batch_size, **settings)]
        captions[name] = caps
    scores = score_captions(captions, sources, text_model.embed_texts if text_model is not None else None)
    photos = sources["photos"]
    return {"scores": scores, "settings": {k: v for k, v in settings.items() if v is not None},
            "metrics": "corpus BLEU-1/2 and CIDEr-D as coco-caption computes them (edgemm._caption_metrics), "
                       "on lower-cased, punctuation-free words",
            "photos": [{"photo": n, "subject": photos["labels"][i], "caption": c}
                       for n, i, c in zip(photos["names"], photos["label"], captions["photos"])]}
