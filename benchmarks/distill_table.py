"""Teacher vs distilled students vs quantized students: size, latency, accuracy, measured in one run.

For each bundle: both graphs' sizes; the text graph's latency at batch 32 on
real held-out texts and the image graph's on one camera-sized frame (ONNX
Runtime, CPU, alternating blocks over all bundles so load falls on each alike;
median); each tower's embedding cosine to the teacher's (held-out texts; the
sample photos and Fashion-MNIST test images); zero-shot top-1 on the
Fashion-MNIST test split (its class names as labels) and on the sample photos;
and top-1 agreement with the teacher over the gate's diverse held-out label sets
and images, with ``edgemm distill``'s own gate (its ImageNet-name sets drawn from
the corpus classes a text student never trained on).
A text student keeps the teacher's image graph and vice versa, so each row's
differences come from the tower it replaced (and from quantization).

Usage:
    python benchmarks/distill_table.py TEACHER STUDENT [STUDENT ...] [--threads 2]
                                      [--fashion-limit N] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import edgemm
from edgemm._distill import graph_speed
from edgemm._eval import eval_fashion_mnist, eval_sample_photos
from edgemm._gate import GateThresholds, compare, measure
from edgemm.export.calibration import gate_data
from edgemm.export.distill import default_text_corpus, split_corpus
from edgemm.runtime.datasets import fashion_mnist, sample_photos

from _common import FRAME_SIZE, device_info, frame_from_photo, publish  # beside this script

BATCH = 32
COSINE_IMAGES = 500  # Fashion-MNIST test images in the image cosine, besides the sample photos


def held_out_texts(n: int | None = 512) -> list[str]:
    """Held-out texts of the packaged corpus (the split edgemm distill trains without), the first ``n``."""
    from edgemm.export.distill import DistillOptions

    o = DistillOptions()
    return split_corpus(default_text_corpus(), o.held_out_fraction, o.seed)[1][:n]


def latency(models: dict[str, edgemm.DualEncoder], texts: list[str], frame: np.ndarray) -> dict[str, dict[str, float]]:
    """Median ms per call: the text graph at batch 32 and the image graph on one frame (its own preprocessing)."""
    runs = {}
    for name, m in models.items():
        runs[name, "text"] = (m.text_backend, m.text_feeds(texts[:BATCH]))
        runs[name, "image"] = (m.image_backend, {"pixels": m.preprocess([frame])})
    ms = graph_speed(runs)  # every graph of every bundle in one alternating measurement
    return {name: {graph: ms[name, graph] for graph in ("text", "image")} for name in models}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", help="the teacher bundle first, then its students")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fashion-limit", type=int, default=None, help="only the first N Fashion-MNIST test images")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--markdown", dest="markdown_path")
    args = parser.parse_args(argv)
    info = device_info(args.threads)
    models = {b: edgemm.load(b, threads=args.threads) for b in args.bundles}
    texts = held_out_texts()
    photos = [p.image for p in sample_photos()]
    clothes = [np.repeat(x[:, :, None], 3, axis=2) for x in fashion_mnist("test")[0][:COSINE_IMAGES]]
    first = models[args.bundles[0]]
    teacher_text, teacher_image = first.embed_texts(texts), first.embed_images(photos + clothes, color="rgb")
    ms = latency(models, texts, frame_from_photo(photos[1]))
    gate = gate_data(fashion_images=1000, label_pool=[t for t in held_out_texts(None) if len(t.split()) <= 3])  # distill's gate
    reference = measure(first, gate)
    rows = []
    for path, m in models.items():
        agreement = compare(reference, measure(m, gate), gate, GateThresholds(0.0, 0.0, 0.0))
        text_cos = (m.embed_texts(texts) * teacher_text).sum(1)
        image_cos = (m.embed_images(photos + clothes, color="rgb") * teacher_image).sum(1)
        size = sum(m.bundle.graph_path(g).stat().st_size for g in ("image_encoder", "text_encoder")) / 2**20
        fashion = eval_fashion_mnist(m, limit=args.fashion_limit)
        distilled = m.manifest.source.get("distilled_from", {})
        rows.append({"bundle": path, "name": m.manifest.name, "precision": m.manifest.precision,
                     "distilled": distilled.get("tower"), "student": distilled.get("student"),
                     "graphs_mb": size, "image_px": m.manifest.image.size,
                     "text_ms_batch32": ms[path]["text"], "image_ms_frame": ms[path]["image"],
                     "text_speedup": ms[args.bundles[0]]["text"] / ms[path]["text"],
                     "image_speedup": ms[args.bundles[0]]["image"] / ms[path]["image"],
                     "text_cosine_mean": float(text_cos.mean()), "text_cosine_worst": float(text_cos.min()),
                     "image_cosine_mean": float(image_cos.mean()), "image_cosine_worst": float(image_cos.min()),
                     "fashion_top1": fashion["top1"], "fashion_images": fashion["images"],
                     "photos_top1": eval_sample_photos(m)["top1"],
                     "top1_agreement": agreement["top1_agreement"], "decisions": agreement["decisions"],
                     "agreement_by_kind": agreement["agreement_by_kind"]})
        print(f"{path}: {rows[-1]}", flush=True)
    base = rows[0]
    lines = ["| bundle | graphs | image, one frame | text, batch 32 | top-1 agreement | image cosine (mean / worst) | "
             "text cosine (mean / worst) | Fashion-MNIST top-1 (retention) | sample photos top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kind = "teacher" if r is base else f"{r['distilled']} student" if r["distilled"] else "copy"
        lines.append(
            f"| {Path(r['bundle']).name} ({kind}, {r['precision']}) | {r['graphs_mb']:.1f} MB | "
            f"{r['image_ms_frame']:.1f} ms ({r['image_speedup']:.2f}×, {r['image_px']} px) | "
            f"{r['text_ms_batch32']:.1f} ms ({r['text_speedup']:.2f}×) | {r['top1_agreement']:.1%} | "
            f"{r['image_cosine_mean']:.4f} / {r['image_cosine_worst']:.4f} | "
            f"{r['text_cosine_mean']:.4f} / {r['text_cosine_worst']:.4f} | "
            f"{r['fashion_top1']:.1%} ({r['fashion_top1'] / base['fashion_top1']:.1%}) | {r['photos_top1']:.1%} |")
    table = "\n".join(lines)
    publish(info, table, title="Distillation: teacher vs students", threads=args.threads,
            notes=(f"{len(texts)} held-out texts of the packaged corpus; Fashion-MNIST test split "
                   f"({base['fashion_images']} images); image cosine over the {len(photos)} sample photos and "
                   f"{len(clothes)} Fashion-MNIST test images; agreement over {base['decisions']} held-out decisions "
                   f"({gate.describe['label_sets']}); frames {FRAME_SIZE[0]}x{FRAME_SIZE[1]}. Reproduce: "
                   f"`python benchmarks/distill_table.py {' '.join(args.bundles)}`."),
            markdown_path=args.markdown_path, json_path=args.json_path, payload={"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
