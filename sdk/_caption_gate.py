"""The gate for a generative model: a compressed captioner against its fp32 teacher, caption by caption.

A captioner is judged by what it writes, so the figures compare captions on
held-out images (the accuracy gate's images: odd sample photos, Fashion-MNIST
test images, odd emoji, odd LFW faces; never calibration's):

* exact match: the candidate writes the teacher's caption, word for word;
* token agreement: of the teacher's generated tokens, the share the candidate
  emits at the same position (a caption that diverges early loses the rest);
* BLEU-4 and CIDEr-D of the candidate's captions with the teacher's as the references;
* caption similarity: the default text tower's cosine between the two captions
  (mean and worst), when a dual-encoder bundle is given to embed them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgemm._caption import Caption
from edgemm._caption_metrics import corpus_bleu, cider_d
from edgemm.runtime.errors import InputError


@dataclass(frozen=True)
class CaptionGateThresholds:
    exact_match: float = 0.75  # captions identical to the teacher's
    token_agreement: float = 0.85  # the teacher's generated tokens reproduced at their position
    mean_similarity: float = 0.95  # text-tower cosine between the two captions, mean (when measured)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise InputError(f"caption gate threshold {name} must be between 0 and 1, got {value}.")


def caption_gate_images(fashion: int = 40, emoji: int = 40) -> tuple[list[np.ndarray], str]:
    """Held-out images for the caption gate, and where they come from."""
    from edgemm.export.calibration import gate_data

    data = gate_data(fashion_images=fashion, emoji_pairs=emoji, texts=0)
    return list(data.images), data.describe["images"]


def _generated(c: Caption, prompt_length: int) -> list[int]:
    return list(c.token_ids[prompt_length:])


def compare_captions(teacher: Sequence[Caption], candidate: Sequence[Caption], *, prompt_length: int,
                     text_model: Any = None, thresholds: CaptionGateThresholds = CaptionGateThresholds(),
                     images: str = "") -> dict[str, Any]:
    """The gate report: figures, thresholds, failures, whether it passed, and the captions that changed most.

    Args:
        teacher: The fp32 captioner's captions of the held-out images.
        candidate: The compressed one's, same images, same settings.
        prompt_length: Decoder start tokens each caption begins with (not counted as agreement).
        text_model: A dual encoder whose text tower embeds both captions (None: similarity not measured).
        thresholds: The gate.
        images: Where the images came from, for the report.
    """
    if len(teacher) != len(candidate) or not teacher:
        raise InputError(f"the caption gate needs the same non-empty images on both sides, got {len(teacher)} and "
                         f"{len(candidate)} captions.")
    same = [t.text == c.text for t, c in zip(teacher, candidate)]
    agreed = total = 0
    for t, c in zip(teacher, candidate):
        gt, gc = _generated(t, prompt_length), _generated(c, prompt_length)
        agreed += sum(a == b for a, b in zip(gt, gc))
        total += max(len(gt), len(gc))
    texts_t, texts_c = [t.text for t in teacher], [c.text for c in candidate]
    report: dict[str, Any] = {
        "images": len(teacher), "data": images, "thresholds": asdict(thresholds),
        "exact_match": float(np.mean(same)), "token_agreement": agreed / max(total, 1),
        "bleu4": corpus_bleu(texts_c, [[t] for t in texts_t], max_n=4)["bleu4"],
        "cider_d": float(cider_d(texts_c, [[t] for t in texts_t])["cider_d"]),
    }
    failures = []
    if report["exact_match"] < thresholds.exact_match:
        failures.append(f"exact caption match {report['exact_match']:.1%} < {thresholds.exact_match:.0%}")
    if report["token_agreement"] < thresholds.token_agreement:
        failures.append(f"token agreement {report['token_agreement']:.1%} < {thresholds.token_agreement:.0%}")
    if text_model is not None:
        a, b = text_model.embed_texts(texts_t), text_model.embed_texts(texts_c)
        cos = (a * b).sum(1)
        report["similarity"] = {"mean": float(cos.mean()), "worst": float(cos.min()),
                                "text_tower": str(text_model.bundle.path)}
        if cos.mean() < thresholds.mean_similarity:
            failures.append(f"caption similarity {cos.mean():.4f} < {thresholds.mean_similarity}")
    else:
        report["similarity"] = None
    changed = [i for i, s in enumerate(same) if not s]
    report["changed"] = [{"teacher": texts_t[i], "candidate": texts_c[i]} for i in changed[:8]]
    report["failures"] = failures
    report["passed"] = not failures
    return report


def caption_gate_summary(report: dict[str, Any]) -> str:
    """A few printable lines."""
    sim = report.get("similarity")
    lines = [
        f"{report['images']} held-out images ({report['data']})",
        f"exact caption match {report['exact_match']:.1%}, token agreement {report['token_agreement']:.1%}, "
        f"BLEU-4 {report['bleu4']:.3f} and CIDEr-D {report['cider_d']:.3f} against the teacher's captions",
        f"caption similarity (text tower cosine): mean {sim['mean']:.4f}, worst {sim['worst']:.4f}" if sim else
        "caption similarity: not measured (no dual-encoder bundle to embed the captions)",
    ]
    for c in report["changed"][:3]:
        lines.append(f"  teacher: {c['teacher']!r} -> {c['candidate']!r}")
    lines.append("gate: PASSED" if report["passed"] else "gate: FAILED (" + "; ".join(report["failures"]) + ")")
    return "\n".join(lines)
