"""Do text students trained on the runtime's label scores agree more with their teacher? One run, same preset.

For each ``label_kl_weight`` the default text student (its preset, the packaged
corpus, the same seed) is distilled and gated with ``edgemm distill``'s own gate:
top-1 agreement with the teacher over the diverse held-out label sets (per kind),
held-out text cosine, zero-shot retention, and the text graph's speed-up at batch 32.
Weight 0 is today's cosine-only training.

Usage:
    python benchmarks/agreement_ablation.py TEACHER_BUNDLE [--weights 0,1] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from edgemm._distill import DistillThresholds, distill_bundle
from edgemm.export.distill import DistillOptions

from _common import device_info, publish  # beside this script

OPEN = DistillThresholds(mean_cosine=-1.0, retention=0.0, top1_agreement=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("--weights", default="0,1", help="label_kl_weight values, comma-separated")
    parser.add_argument("--student", default=None, help="the student spec or preset (default: the default's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    rows = []
    for weight in [float(w) for w in args.weights.split(",")]:
        work = Path(tempfile.mkdtemp(prefix="edgemm-ablation-"))
        started = time.perf_counter()
        options = replace(DistillOptions(), threads=args.threads, label_kl_weight=weight)
        _, info = distill_bundle(args.teacher, work / "student", tower="text", student=args.student,
                                 options=options, thresholds=OPEN, threads=args.threads)
        gate = info["gate"]
        rows.append({"label_kl_weight": weight, "seconds": round(time.perf_counter() - started, 1),
                     "top1_agreement": gate["top1_agreement"], "decisions": gate["decisions"],
                     "agreement_by_kind": gate["agreement_by_kind"],
                     "text_cosine": gate["text_cosine"], "retention": info["retention"],
                     "speedup": info["speed"]["speedup"], "training_steps": info["training"]["steps"]})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    kinds = list(rows[0]["agreement_by_kind"])
    table = "\n".join([
        "| label-KL weight | top-1 agreement | " + " | ".join(kinds) + " | text cosine (mean / worst) | "
        "retention | speed-up, batch 32 | time |",
        "|---:|---:|" + "---:|" * len(kinds) + "---:|---:|---:|---:|",
        *(f"| {r['label_kl_weight']:g} | {r['top1_agreement']:.1%} | "
          + " | ".join(f"{r['agreement_by_kind'][k]:.1%}" for k in kinds)
          + f" | {r['text_cosine']['mean']:.4f} / {r['text_cosine']['worst']:.4f} | "
          f"{r['retention']['retention']:.1%} | {r['speedup']:.2f}x | {r['seconds']:.0f} s |" for r in rows)])
    notes = (f"Teacher `{args.teacher}`, student {args.student or 'the default preset'}, packaged corpus, seed 0; "
             "the gate's "
             f"{rows[0]['decisions']} held-out decisions (label sets and images never trained on). Reproduce: "
             f"`python benchmarks/agreement_ablation.py TEACHER --weights {args.weights} --threads {args.threads}"
             f"{' --student ' + args.student if args.student else ''}`.")
    out = Path(args.out)
    publish(device_info(args.threads), table, title="Text students trained for agreement: label-score KL ablation",
            threads=args.threads, notes=notes, markdown_path=str(out / "agreement-ablation.md"),
            json_path=str(out / "agreement-ablation.json"), payload={"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
