"""Teacher vs distilled student vs quantized student: size, text latency, accuracy, measured in one run.

For each bundle: the text graph's size; its latency at batch 32 on real
held-out texts (ONNX Runtime, CPU, alternating rounds over all bundles so load
falls on each alike; median); the held-out text cosine to the teacher's
embeddings; zero-shot top-1 on the full Fashion-MNIST test split (10,000
images, its class names as labels) and on the sample photos. The image tower
is the teacher's in every bundle, so accuracy differences come from the text
side alone.

Usage:
    python benchmarks/distill_table.py TEACHER STUDENT [STUDENT_INT8 ...] [--threads 2]
                                      [--fashion-limit N] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import edgemm
from edgemm._eval import eval_fashion_mnist, eval_sample_photos
from edgemm.export.distill import default_text_corpus, split_corpus

from _common import device_info, print_device, write_json  # shared helpers beside this script

BATCH = 32
ROUNDS = 9
CALLS = 3  # per bundle per round


def held_out_texts(n: int = 512) -> list[str]:
    """Held-out texts of the packaged corpus (the split edgemm distill trains without)."""
    from edgemm.export.distill import DistillOptions

    o = DistillOptions()
    return split_corpus(default_text_corpus(), o.held_out_fraction, o.seed)[1][:n]


def latency(models: dict[str, edgemm.DualEncoder], texts: list[str]) -> dict[str, float]:
    feeds = next(iter(models.values())).text_feeds(texts[:BATCH])
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.text_backend.infer(feeds)
    for r in range(ROUNDS):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            for _ in range(CALLS):
                t0 = time.perf_counter()
                models[name].text_backend.infer(feeds)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


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
    teacher = models[args.bundles[0]].embed_texts(texts)
    ms = latency(models, texts)
    rows = []
    for path, m in models.items():
        cos = (m.embed_texts(texts) * teacher).sum(1)
        graph = m.bundle.graph_path("text_encoder")
        fashion = eval_fashion_mnist(m, limit=args.fashion_limit)
        photos = eval_sample_photos(m)
        rows.append({"bundle": path, "name": m.manifest.name, "precision": m.manifest.precision,
                     "student": m.manifest.source.get("distilled_from", {}).get("student"),
                     "text_graph_mb": graph.stat().st_size / 2**20, "text_ms_batch32": ms[path],
                     "speedup": ms[args.bundles[0]] / ms[path], "cosine_mean": float(cos.mean()),
                     "cosine_worst": float(cos.min()), "fashion_top1": fashion["top1"],
                     "fashion_images": fashion["images"], "photos_top1": photos["top1"]})
        print(f"{path}: {rows[-1]}", flush=True)
    base = rows[0]
    lines = ["| bundle | text graph | text latency, batch 32 | speed-up | held-out cosine to teacher (mean / worst) "
             "| Fashion-MNIST top-1 (retention) | sample photos top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kind = "teacher" if r is base else f"student {r['student']}"
        lines.append(f"| {Path(r['bundle']).name} ({kind}, {r['precision']}) | {r['text_graph_mb']:.1f} MB | "
                     f"{r['text_ms_batch32']:.1f} ms | {r['speedup']:.2f}× | {r['cosine_mean']:.4f} / "
                     f"{r['cosine_worst']:.4f} | {r['fashion_top1']:.1%} ({r['fashion_top1'] / base['fashion_top1']:.1%})"
                     f" | {r['photos_top1']:.1%} |")
    table = "\n".join(lines)
    print()
    print_device(info)
    print(table)
    if args.markdown_path:
        Path(args.markdown_path).write_text(
            f"## Distillation: teacher vs students ({info['cpu_model']}, {args.threads} threads, load avg at start "
            f"{info['loadavg_1m']})\n\n{table}\n\n{len(texts)} held-out texts of the packaged corpus; Fashion-MNIST "
            f"test split ({base['fashion_images']} images). Reproduce: "
            f"`python benchmarks/distill_table.py {' '.join(args.bundles)}`.\n")
    if args.json_path:
        write_json(args.json_path, {"device": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
