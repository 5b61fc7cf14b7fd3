"""The built-in image–text matching model: the default towers plus an early-fusion head trained on emoji.

``edgemm.load(default="matching")`` builds it. The head answers "does this
text describe this image?" (``model.match``) and reranks vector searches
(``index.search(..., rerank=k, reranker=model.reranker(queries))``).

Which head, and why: ``benchmarks/fusion_study.py`` trained every fusion
architecture on the packaged emoji (each image captioned by its Unicode name)
and measured held-out pair accuracy and ranking against the dual encoder's
cosine; early fusion over both embeddings and the mean patch token won. The
trained weights are committed (``data/matching_head.npz``, float16, 2.4 MB)
with their held-out measurements; ``scripts/train_matching_head.py`` rebuilds
them from the packaged data with :func:`train_matching_head`.

The protocol (shared with the study):

* Emoji split by index with a fixed seed, 70% train / 10% validation / 20%
  test; names never cross splits.
* Negatives mined by the dual encoder as whole permutations of the names (the
  assignment of wrong names with the highest total cosine, then random ones),
  so every name is a negative as often as every image and only the pair can
  tell a match; mining each image's top wrong names instead lets a text-only
  head win on "hub" names.
* The decision threshold is the best one on the validation split.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgemm.export.fusion_train import Example, TrainOptions, cache_features, predict_logits, train_head
from edgemm.export.models.fusion import FusionConfig, FusionHead, build_head, tower_features
from edgemm.export.models.fusion_bundle import build_fusion_bundle
from edgemm.runtime.datasets import split_rows
from edgemm.runtime.errors import ExportError
from edgemm.runtime.manifest import Manifest

SEED = 0
PROMPT = "an emoji of {}"  # the caption template (the better of "{}" and this one by validation recall@1)
NEGATIVES = (1, 8)  # hard-permutation and random wrong names per training image (picked on validation)
RERANK_K = 50  # the shortlist the recorded rerank figures use
RERANK_WEIGHTS = (0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0)  # cosine weights tried for reranking (on validation)
CONFIG = FusionConfig.default("early", pooled_image_tokens=True)
OPTIONS = TrainOptions(epochs=40, batch_size=64, lr=1e-3, weight_decay=1e-2, patience=6, seed=SEED)
WEIGHTS = Path(__file__).with_name("data") / "matching_head.npz"
_RECORD = "__record__"  # the npz entry holding the JSON record beside the weights

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image rows, text rows) → a score per pair


# --------------------------------------------------------------------------- splits and mining


def negative_permutations(rows: np.ndarray, sim: np.ndarray, hard: int, random: int,
                          rng: np.random.Generator) -> list[np.ndarray]:
    """Permutations of ``rows`` pairing each image with a wrong name, never reusing a pair.

    The first ``hard`` maximise the total dual-encoder cosine (an exact assignment), the rest are random.
    """
    from scipy.optimize import linear_sum_assignment

    s = sim[np.ix_(rows, rows)]
    used = np.eye(len(rows), dtype=bool)
    out = []
    for i in range(hard + random):
        weights = s if i < hard else rng.random(s.shape)
        _, cols = linear_sum_assignment(np.where(used, -1e6, weights), maximize=True)
        used[np.arange(len(rows)), cols] = True
        out.append(rows[cols])
    return out


def permutation_pairs(rows: np.ndarray, sim: np.ndarray, hard: int, random: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image rows, text rows, 0/1) with one positive and hard + random negatives per image."""
    negatives = negative_permutations(rows, sim, hard, random, rng)
    images = np.tile(rows, 1 + len(negatives))
    texts = np.concatenate([rows, *negatives])
    return images, texts, np.r_[np.ones(len(rows)), np.zeros(len(rows) * len(negatives))].astype(np.int64)


def training_data(splits: dict[str, np.ndarray], sim: np.ndarray, hard: int, random: int) -> dict[str, Any]:
    """Pairs over the training and validation splits, with the validation mask, for one negative mix."""
    rng = np.random.default_rng(SEED)
    train = permutation_pairs(splits["train"], sim, hard, random, rng)
    val = permutation_pairs(splits["val"], sim, hard, random, rng)
    return {"pairs": (np.r_[train[0], val[0]], np.r_[train[1], val[1]]), "targets": np.r_[train[2], val[2]],
            "validation": np.r_[np.zeros(len(train[2]), bool), np.ones(len(val[2]), bool)],
            "train_pairs": len(train[2]), "val_pairs": len(val[2])}


def balanced_pairs(splits: dict[str, np.ndarray], sim: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """Evaluation pairs of the val and test splits: each image with its name and its hardest-permutation wrong one."""
    rng = np.random.default_rng(SEED + 1)
    return {s: permutation_pairs(splits[s], sim, 1, 0, rng) for s in ("val", "test")}


# --------------------------------------------------------------------------- metrics


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The cut on ``scores`` with the best accuracy on ``labels`` (a midpoint between observed scores)."""
    candidates = np.unique(scores)
    cuts = np.r_[candidates[0] - 1, (candidates[1:] + candidates[:-1]) / 2, candidates[-1] + 1]
    accuracy = [((scores > c) == labels).mean() for c in cuts]
    return float(cuts[int(np.argmax(accuracy))])


def ranking(score: Scorer, rows: np.ndarray, sim: np.ndarray, k: int | None) -> dict[str, float]:
    """Recall@1/@5 of each image's own name among the split's names, from the dual encoder's top k (None: all)."""
    s = sim[np.ix_(rows, rows)]
    k = len(rows) if k is None else min(k, len(rows))
    shortlist = np.argsort(-s, axis=1, kind="stable")[:, :k]
    scores = score(np.repeat(rows, k), rows[shortlist.ravel()]).reshape(len(rows), k)
    order = np.take_along_axis(shortlist, np.argsort(-scores, axis=1, kind="stable"), axis=1)
    truth = np.arange(len(rows))[:, None]
    return {"r1": float((order[:, :1] == truth).any(1).mean()), "r5": float((order[:, :5] == truth).any(1).mean()),
            "shortlist_recall": float((shortlist == truth).any(1).mean())}


def evaluate(score: Scorer, splits: dict[str, np.ndarray], sim: np.ndarray,
             balanced: dict[str, tuple[np.ndarray, ...]], rerank_k: int = RERANK_K) -> dict[str, Any]:
    """Held-out metrics of a pair scorer: pair accuracy at the validation threshold, rerank@k and rank-all recall."""
    vi, vt, vy = balanced["val"]
    threshold = best_threshold(score(vi, vt), vy)
    ti, tt, ty = balanced["test"]
    return {
        "threshold": threshold,
        "pair_accuracy": float(((score(ti, tt) > threshold) == ty).mean()),
        "val_pair_accuracy": float(((score(vi, vt) > threshold) == vy).mean()),
        "rerank_k": rerank_k,
        "rerank": ranking(score, splits["test"], sim, rerank_k),
        "rank_all": ranking(score, splits["test"], sim, None),
        "val_rank_all": ranking(score, splits["val"], sim, None),
    }


def search_recall(scores: np.ndarray, cosine: np.ndarray, k: int | None = None) -> dict[str, float]:
    """Recall@1/5/10 of text→image search: rows are query texts, columns candidate images, truth on the diagonal.

    With ``k``, ``scores`` reorder the cosine's top ``k`` (a reranked vector search); else they rank everything.
    """
    order = np.argsort(-cosine if k else -scores, axis=1, kind="stable")
    if k:
        shortlist = order[:, :k]
        order = np.take_along_axis(shortlist, np.argsort(-np.take_along_axis(scores, shortlist, 1), 1,
                                                         kind="stable"), 1)
    truth = np.arange(len(scores))[:, None]
    return {f"r{n}": float((order[:, :n] == truth).any(1).mean()) for n in (1, 5, 10)}


def search_matrices(head: FusionHead, features: dict[str, np.ndarray], sim: np.ndarray,
                    rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(head logits, cosines) of every (text, image) pair of a split, rows = texts, columns = images."""
    n = len(rows)
    logits = predict_logits(head, features, pairs=(np.tile(rows, n), np.repeat(rows, n)))[:, 0]
    return logits.reshape(n, n), sim[np.ix_(rows, rows)].T


def rerank_weight(logits: np.ndarray, cosine: np.ndarray, k: int = RERANK_K) -> float:
    """The cosine weight w (of ``RERANK_WEIGHTS``) whose reranking score logit + w·cosine gives the best R@1 + R@5."""
    def quality(w: float) -> float:
        r = search_recall(logits + w * cosine, cosine, k)
        return r["r1"] + r["r5"]

    return max(RERANK_WEIGHTS, key=lambda w: (quality(w), -w))


def head_scorer(head: FusionHead, features: dict[str, np.ndarray]) -> Scorer:
    return lambda images, texts: predict_logits(head, features, pairs=(images, texts))[:, 0]


# --------------------------------------------------------------------------- data


def emoji_features(cache_dir: str | Path, prompt: str = PROMPT,
                   progress: Callable[[int, int], None] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
    """The packaged emoji's names and their default-tower features (cached), texts captioned with ``prompt``.

    Raises:
        InputError: The emoji font (``fonts-noto-color-emoji``) is not installed.
    """
    from edgemm.export.models.dual_encoder import default_towers
    from edgemm.runtime.datasets import emoji

    pairs = emoji()
    examples = [Example(rgb, prompt.format(name), name) for name, rgb in pairs]
    return [name for name, _ in pairs], cache_features(default_towers(), examples, cache_dir, progress)


# --------------------------------------------------------------------------- the head


def train_matching_head(cache_dir: str | Path, *, progress: Callable[[str, int, int], None] | None = None,
                        ) -> tuple[FusionHead, dict[str, Any]]:
    """Train the default matching head on the packaged emoji and measure it on the held-out test split.

    The weights are rounded to float16 (as committed) before measuring, so the
    record describes exactly what ships.

    Args:
        cache_dir: Folder for the tower-feature cache (about 340 MB).
        progress: ``progress(stage, done, total)`` with stage ``"features"`` or ``"train"``.

    Returns:
        The head and its record: threshold (a probability), held-out metrics
        for the head and for the dual encoder's cosine, split sizes, the
        training report.
    """
    report_to = progress or (lambda *_args: None)
    names, features = emoji_features(cache_dir, progress=lambda d, t: report_to("features", d, t))
    sim = features["image_embedding"] @ features["text_embedding"].T
    splits = split_rows(len(names))
    data = training_data(splits, sim, *NEGATIVES)
    head, report = train_head(CONFIG, features, data["targets"], OPTIONS, pairs=data["pairs"],
                              validation=data["validation"], progress=lambda e, t, _m: report_to("train", e, t))
    head = _rounded(head)
    balanced = balanced_pairs(splits, sim)
    metrics = evaluate(head_scorer(head, features), splits, sim, balanced)
    cosine = evaluate(lambda i, t: sim[i, t], splits, sim, balanced)
    weight = rerank_weight(*search_matrices(head, features, sim, splits["val"]))
    logits, cos = search_matrices(head, features, sim, splits["test"])
    search = {"rerank_k": RERANK_K, "cosine_weight": weight, "cosine": search_recall(cos, cos),
              "head_rerank": search_recall(logits, cos, RERANK_K),
              "mixed_rerank": search_recall(logits + weight * cos, cos, RERANK_K)}
    record = {
        "task": "image-text matching: does the text describe the image?",
        "data": "fonts-noto-color-emoji single-codepoint emoji, captioned by their Unicode names",
        "prompt": PROMPT, "seed": SEED, "split": {k: len(v) for k, v in splits.items()},
        "negatives_per_image": {"hard": NEGATIVES[0], "random": NEGATIVES[1]},
        "training_pairs": data["train_pairs"], "test_pairs": int(len(balanced["test"][2])),
        "threshold": float(1 / (1 + np.exp(-metrics["threshold"]))),
        "held_out": metrics, "cosine_baseline": cosine, "search": search,
        "config": CONFIG.to_dict(), "training": report.to_dict(),
    }
    return head, record


def _rounded(head: FusionHead) -> FusionHead:
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(p.half().float())
    return head.eval()


def save_matching_head(head: FusionHead, record: dict[str, Any], path: str | Path = WEIGHTS) -> Path:
    """Write the head's weights (float16) and its record to one ``.npz``, atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().numpy().astype(np.float16) for k, v in head.state_dict().items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays, **{_RECORD: np.array(json.dumps(record))})
    os.replace(tmp, path)
    return path


def load_matching_head(path: str | Path = WEIGHTS) -> tuple[FusionHead, dict[str, Any]]:
    """The committed head (float32 in memory) and its record.

    Raises:
        ExportError: The weights file is missing or does not fit the config.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"the matching head's weights are not at {path}; reinstall edgemm, or rebuild them with "
                          "python scripts/train_matching_head.py.")
    with np.load(path, allow_pickle=False) as z:
        record = json.loads(str(z[_RECORD]))
        state = {k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files if k != _RECORD}
    head = build_head(FusionConfig.from_dict(record["config"]))
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"the matching head's weights at {path} do not fit its config: {e}") from e
    return head.eval(), record


# --------------------------------------------------------------------------- the bundle


def _verification_features(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Real tower features to verify the exported head on: the sample photos and real captions."""
    from edgemm.export.models.dual_encoder import default_towers, reference_pixels
    from edgemm.runtime.datasets import sample_photos

    image, text, _ = default_towers()
    photos = [p.image for p in sample_photos()]
    n = min(len(photos), len(texts))
    return tower_features(image, text, reference_pixels(photos[:n]), list(texts[:n]))


def build_matching_bundle(out_dir: str | Path, *, overwrite: bool = False,
                          progress: Callable[[str], None] | None = None) -> Manifest:
    """Build the built-in matching bundle: default towers (with patch tokens) + the committed head, verified.

    Args:
        out_dir: Bundle directory to create.
        overwrite: Replace an existing bundle.
        progress: Called with a short description before each step.

    Returns:
        The written manifest; ``source.fusion_head.training`` holds the held-out record.

    Raises:
        ExportError: The directory exists (without overwrite), or the weights are missing.
        VerificationError: A graph drifts from PyTorch.
    """
    from edgemm.runtime.datasets import SAMPLE_SENTENCES

    head, record = load_matching_head()
    captions = [PROMPT.format(s.rstrip(".").lower()) for s in SAMPLE_SENTENCES]
    return build_fusion_bundle(out_dir, head, FusionConfig.from_dict(record["config"]), task="matching",
                               verify_features=_verification_features(captions), threshold=record["threshold"],
                               rerank_cosine_weight=record["search"]["cosine_weight"], name="matching",
                               training=record, overwrite=overwrite, progress=progress)
