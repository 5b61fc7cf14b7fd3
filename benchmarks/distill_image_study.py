"""Image student presets compared: each distilled from one teacher bundle by ``edgemm distill --tower image``.

For each student: the gate's figures (image cosine to the teacher on held-out
images, zero-shot top-1 retention on Fashion-MNIST and the sample photos,
text→image recall), its FLOPs, the image graph's speed-up on one frame and at
batch 16 (timed by the command, teacher and student in alternating rounds) and
the training time. Students that miss the gate are kept (``--accept-degradation``)
so every row is reported.

Usage:
    python benchmarks/distill_image_study.py TEACHER_BUNDLE --students lite0-128 lite0-160-e75 \
        [--epochs 4] [--threads 2] [--work DIR] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from edgemm._distill import DistillThresholds, distill_bundle
from edgemm.export.distill_image import IMAGE_OPTIONS

from _common import device_info, publish  # beside this script


def row(student: str, info: dict) -> dict:
    gate, speed, training = info["gate"], info["speed"], info["training"]
    return {
        "student": student, "spec": info["student"], "gflops": info["student_gflops"],
        "teacher_gflops": info["teacher_gflops"], "image_cosine_mean": gate["image_cosine"]["mean"],
        "image_cosine_worst": gate["image_cosine"]["worst"], "held_out_views_cosine": training["held_out_mean_cosine"],
        "teacher_top1": info["retention"]["teacher_top1"], "student_top1": info["retention"]["student_top1"],
        "retention": info["retention"]["retention"], "agreement": gate["top1_agreement"],
        "recall": gate["retrieval"], "speedup_frame": speed["speedup"], "speedup_batch16": speed["speedup_batch16"],
        "student_ms_frame": speed["student_ms"], "teacher_ms_frame": speed["teacher_ms"],
        "train_seconds": training["seconds"], "steps": training["steps"], "passed": info["passed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", help="an fp32 dual-encoder bundle (e.g. the default)")
    parser.add_argument("--students", nargs="+", default=["lite0-160", "lite0-128"])
    parser.add_argument("--epochs", type=int, default=IMAGE_OPTIONS.epochs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", help="where the students are written (default: a temporary folder)")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--markdown", dest="markdown_path")
    args = parser.parse_args(argv)
    info = device_info(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="distill-image-study-"))
    options = replace(IMAGE_OPTIONS, epochs=args.epochs, threads=args.threads)
    rows = []
    for student in args.students:
        _, report = distill_bundle(args.teacher, work / student, tower="image", student=student, options=options,
                                   thresholds=DistillThresholds(), accept_degradation=True, overwrite=True,
                                   threads=args.threads)
        rows.append(row(student, report))
        print(rows[-1], flush=True)
    lines = ["| student | GFLOPs | image cosine (mean / worst) | zero-shot top-1 teacher → student (retention) | "
             "speed-up, one frame | speed-up, batch 16 | training |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['gflops']:.2f} (teacher {r['teacher_gflops']:.2f}) | "
                     f"{r['image_cosine_mean']:.4f} / {r['image_cosine_worst']:.4f} | {r['teacher_top1']:.1%} → "
                     f"{r['student_top1']:.1%} ({r['retention']:.1%}) | {r['speedup_frame']:.2f}× | "
                     f"{r['speedup_batch16']:.2f}× | {r['train_seconds'] / 60:.1f} min, {r['steps']} steps |")
    table = "\n".join(lines)
    publish(info, table, title=f"Image students of {args.teacher}", threads=args.threads,
            notes=(f"{args.epochs} epochs on the packaged images; the gate's held-out images (sample photos, "
                   "Fashion-MNIST test, odd emoji) were never trained on. Reproduce: `python "
                   f"benchmarks/distill_image_study.py {args.teacher} --students {' '.join(args.students)}`."),
            markdown_path=args.markdown_path, json_path=args.json_path, payload={"epochs": args.epochs, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
