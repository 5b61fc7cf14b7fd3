"""The accuracy gate: a converted bundle measured against its fp32 source on held-out inputs.

Figures: embedding cosine to the source per tower (mean and worst), zero-shot
top-1 agreement on label sets (and each side's accuracy where the truth is
known), and text → image recall@1/5 on a small retrieval set for both sides.
The thresholds apply to cosine and agreement; recall and accuracy are reported
beside them so a user sees what the conversion costs in their terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgemm._model import DualEncoder
from edgemm.runtime.errors import InputError


@dataclass(frozen=True)
class GateThresholds:
    mean_cosine: float = 0.99  # per tower, mean over held-out inputs
    worst_cosine: float = 0.97  # per tower, the worst held-out input
    top1_agreement: float = 0.98  # fraction of images whose top label is unchanged

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise InputError(f"gate threshold {name} must be between 0 and 1, got {value}.")


@dataclass
class Outputs:
    """What one bundle produces on the gate data (computed once for the source)."""

    image: np.ndarray  # (N, dim) image embeddings
    text: np.ndarray  # (T, dim) text embeddings
    scores: list[np.ndarray]  # per label set, (n, L) label probabilities
    captions: np.ndarray  # (R, dim) retrieval caption embeddings


def label_scores(model: DualEncoder, data) -> list[np.ndarray]:
    """Label probabilities per label set of the gate data (every image run once, then scored per set)."""
    out = model._run_images(list(data.images), "rgb", 32)
    return [model.scores_of({k: v[indices] for k, v in out.items()}, labels or None)
            for indices, labels, _truth in data.label_sets]


def agreement(source: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Fraction of images whose top label is the same on both sides."""
    same = sum(int((s.argmax(1) == c.argmax(1)).sum()) for s, c in zip(source, candidate))
    total = sum(len(s) for s in source)
    return same / total if total else 1.0


def measure(model: DualEncoder, data) -> Outputs:
    """Run ``model`` over the gate data (an ``edgemm.export.calibration.DataSet``)."""
    scores = label_scores(model, data)
    return Outputs(
        image=model.embed_images(data.images, color="rgb"),
        text=model.embed_texts(data.texts),
        scores=scores,
        captions=model.embed_texts([caption for _, caption in data.retrieval]) if data.retrieval else np.zeros((0, 1)),
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-12)


def _recall(images: np.ndarray, captions: np.ndarray, targets: list[int]) -> dict[str, float]:
    if not targets:
        return {}
    sim = captions @ images[targets].T  # caption i belongs to image column i
    rank = (sim > np.diag(sim)[:, None]).sum(1)
    return {"recall@1": float((rank < 1).mean()), "recall@5": float((rank < 5).mean())}


def compare(source: Outputs, candidate: Outputs, data, thresholds: GateThresholds = GateThresholds()) -> dict[str, Any]:
    """The gate report: figures, the thresholds, what failed, and whether it passed."""
    report: dict[str, Any] = {"thresholds": asdict(thresholds), "data": dict(data.describe)}
    failures = []
    for tower, a, b in (("image", source.image, candidate.image), ("text", source.text, candidate.text)):
        cos = _cosine(a, b)
        report[f"{tower}_cosine"] = {"mean": float(cos.mean()), "worst": float(cos.min()), "inputs": len(cos)}
        if cos.mean() < thresholds.mean_cosine:
            failures.append(f"{tower} mean cosine {cos.mean():.4f} < {thresholds.mean_cosine}")
        if cos.min() < thresholds.worst_cosine:
            failures.append(f"{tower} worst cosine {cos.min():.4f} < {thresholds.worst_cosine}")
    sets = []
    kinds = list(getattr(data, "label_kinds", [])) or ["labels"] * len(data.label_sets)
    for (indices, labels, truth), kind, s, c in zip(data.label_sets, kinds, source.scores, candidate.scores):
        entry = {"kind": kind, "images": len(indices), "labels": len(labels) or "bundle's own",
                 "agreement": agreement([s], [c])}
        if truth is not None:
            entry["source_top1"] = float((s.argmax(1) == np.asarray(truth)).mean())
            entry["candidate_top1"] = float((c.argmax(1) == np.asarray(truth)).mean())
        sets.append(entry)
    report["top1_agreement"] = agreement(source.scores, candidate.scores)
    report["agreement_by_kind"] = {
        kind: agreement([s for s, k in zip(source.scores, kinds) if k == kind],
                        [c for c, k in zip(candidate.scores, kinds) if k == kind]) for kind in dict.fromkeys(kinds)}
    report["decisions"] = sum(len(s) for s in source.scores)
    report["label_sets"] = sets
    if report["top1_agreement"] < thresholds.top1_agreement:
        worst = min(report["agreement_by_kind"].items(), key=lambda kv: kv[1])
        failures.append(f"top-1 agreement {report['top1_agreement']:.3f} < {thresholds.top1_agreement} over "
                        f"{report['decisions']} held-out decisions (lowest: {worst[0]} {worst[1]:.3f})")
    targets = [i for i, _ in data.retrieval]
    report["retrieval"] = {"source": _recall(source.image, source.captions, targets),
                           "candidate": _recall(candidate.image, candidate.captions, targets), "pairs": len(targets)}
    report["failures"] = failures
    report["passed"] = not failures
    return report


def failing_towers(report: dict[str, Any]) -> list[str]:
    """Which towers to recover first: those below a cosine threshold; else, when only agreement
    fails, the tower whose conversion alone agrees least (``report["agreement_alone"]``, when
    measured), or the one further from the source."""
    towers = [t for t in ("image", "text") if any(f.startswith(t) for f in report["failures"])]
    if towers or report["passed"]:
        return towers
    alone = report.get("agreement_alone")
    if alone:
        return [min(alone, key=alone.get)]
    return [min(("image", "text"), key=lambda t: report[f"{t}_cosine"]["mean"])]


def _labelled_by_kind(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The label sets with the truth known, pooled per kind (image-weighted)."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        if "source_top1" not in e:
            continue
        g = out.setdefault(e.get("kind", "labels"), {"sets": 0, "images": 0, "labels": e["labels"], "source_top1": 0.0,
                                                    "candidate_top1": 0.0, "agreement": 0.0})
        g["sets"] += 1
        g["images"] += e["images"]
        for key in ("source_top1", "candidate_top1", "agreement"):
            g[key] += e[key] * e["images"]
    for g in out.values():
        for key in ("source_top1", "candidate_top1", "agreement"):
            g[key] /= max(g["images"], 1)
    return out


def summary(report: dict[str, Any]) -> str:
    """A few printable lines."""
    lines = [
        f"image embedding cosine: mean {report['image_cosine']['mean']:.4f}, worst {report['image_cosine']['worst']:.4f}",
        f"text embedding cosine:  mean {report['text_cosine']['mean']:.4f}, worst {report['text_cosine']['worst']:.4f}",
        f"zero-shot top-1 agreement: {report['top1_agreement']:.1%} over {report.get('decisions', '?')} held-out "
        "decisions (" + ", ".join(f"{k} {v:.1%}" for k, v in report.get("agreement_by_kind", {}).items()) + ")",
    ]
    for kind, group in _labelled_by_kind(report["label_sets"]).items():
        sets = f" in {group['sets']} sets" if group["sets"] > 1 else ""
        lines.append(f"  {kind}: {group['images']} images{sets}, {group['labels']} labels: top-1 "
                     f"{group['source_top1']:.1%} (source) → {group['candidate_top1']:.1%}, agreement "
                     f"{group['agreement']:.1%}")
    r = report["retrieval"]
    if r["source"]:
        lines.append(f"text→image recall@1/5 on {r['pairs']} pairs: {r['source']['recall@1']:.2f}/"
                     f"{r['source']['recall@5']:.2f} (source) → {r['candidate']['recall@1']:.2f}/"
                     f"{r['candidate']['recall@5']:.2f}")
    lines.append("gate: PASSED" if report["passed"] else "gate: FAILED (" + "; ".join(report["failures"]) + ")")
    return "\n".join(lines)
