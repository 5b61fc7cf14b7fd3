"""Zero-shot evaluation on real data: Fashion-MNIST and the sample photos."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgemm._model import DualEncoder
from edgemm.runtime.datasets import FASHION_MNIST_CLASSES, SAMPLE_LABELS, fashion_mnist, sample_photos


def eval_fashion_mnist(model: DualEncoder, *, limit: int | None = None, batch_size: int = 64,
                       progress: bool = False) -> dict[str, Any]:
    """Zero-shot top-1 on Fashion-MNIST's test split with its own class names as labels.

    Args:
        model: The model.
        limit: Evaluate only the first ``limit`` test images (the split is class-balanced throughout).
        batch_size: Images per call.
        progress: Show a progress bar.
    """
    from tqdm import tqdm

    x, y = fashion_mnist("test")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    labels = list(FASHION_MNIST_CLASSES)
    pred = np.empty(len(x), np.int64)
    for start in tqdm(range(0, len(x), batch_size), desc="fashion-mnist", unit="batch", disable=not progress):
        scores = model.scores(list(x[start : start + batch_size]), labels, batch_size=batch_size)
        pred[start : start + batch_size] = scores.argmax(1)
    per_class = {labels[c]: float(np.mean(pred[y == c] == c)) for c in range(len(labels))}
    return {"dataset": "fashion-mnist test", "images": int(len(x)), "labels": labels,
            "top1": float(np.mean(pred == y)), "chance": 1 / len(labels), "per_class_top1": per_class}


def eval_sample_photos(model: DualEncoder) -> dict[str, Any]:
    """Classify each real sample photo among one shared vocabulary of subjects."""
    photos = sample_photos()
    labels = list(SAMPLE_LABELS)
    scores = model.scores([p.image for p in photos], labels, color="rgb")
    rows = []
    for p, s in zip(photos, scores):
        best = int(s.argmax())
        rows.append({"photo": p.name, "subject": p.label, "predicted": labels[best], "score": float(s[best]),
                     "correct": labels[best] == p.label, "imagenet_like": p.imagenet_like})
    objects = [r for r in rows if r["imagenet_like"]]
    return {"dataset": "sample photos", "labels": labels, "photos": rows,
            "top1": float(np.mean([r["correct"] for r in rows])),
            "objects_top1": float(np.mean([r["correct"] for r in objects])),
            "objects_correct": sum(r["correct"] for r in objects), "objects": len(objects)}
