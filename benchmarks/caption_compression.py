"""Compressed captioners (quantized or distilled) against their fp32 teacher: size, speed per token and caption, gate.

Every bundle captions the same held-out images (the caption gate's) with greedy
decoding and exactly ``--new-tokens`` new tokens (``min_new_tokens =
max_new_tokens``, so an early end cannot flatter a side), at batch 1 and batch
8, in alternating blocks (``_common.interleaved_rounds``); speed-ups are ratios
of medians from this one run. The gate figures are the ones
recorded in each bundle's manifest (``edgemm quantize`` or ``edgemm distill --tower decoder``).

Usage:
    python benchmarks/caption_compression.py TEACHER CANDIDATE [CANDIDATE ...] [--threads 2] [--new-tokens 20]
                                             [--rounds 6 --block 2] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from _common import device_info, interleaved_rounds, limit_native_threads, publish  # beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    limit_native_threads(args.threads)
    import edgemm
    from edgemm._caption_gate import caption_gate_images

    images = caption_gate_images(fashion=4, emoji=4)[0][:8]
    models = {Path(b).name: edgemm.load(b, threads=args.threads) for b in args.bundles}
    n = args.new_tokens
    rows = {}
    for batch in (1, 8):
        def side(model, batch=batch):
            def run():
                t0 = time.perf_counter()
                model.caption(images[:batch], color="rgb", max_new_tokens=n, min_new_tokens=n, num_beams=1,
                              batch_size=batch)
                return {"total": (time.perf_counter() - t0) * 1e3}
            return run

        samples, _ = interleaved_rounds({name: side(m) for name, m in models.items()}, rounds=args.rounds,
                                        block=args.block, warmup=1)
        for name, got in samples.items():
            rows.setdefault(name, {})[batch] = float(np.median([s["total"] for s in got]))
    teacher = Path(args.bundles[0]).name
    lines = ["| bundle | graphs | caption, batch 1 | per token | caption batch of 8 | per token | exact match | "
             "token agreement | BLEU-4 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    report = []
    for b, (name, times) in zip(args.bundles, rows.items()):
        model = models[name]
        size = sum(model.bundle.graph_path(r).stat().st_size for r in model.manifest.graphs) / 1e6
        v = model.manifest.verification
        gate = (v.get("quantization") or v.get("distillation") or {}).get("gate")
        student = (v.get("distillation") or {}).get("student")
        kind = model.manifest.precision + (f", decoder {student['layers']} of {student['teacher_layers']} layers"
                                           if student else "")
        speed = {k: rows[teacher][k] / v for k, v in times.items()}
        report.append({"bundle": b, "precision": model.manifest.precision, "graphs_mb": size, "ms": times,
                       "speedup": speed, "gate": gate})
        figures = (f"{gate['exact_match']:.1%} | {gate['token_agreement']:.1%} | {gate['bleu4']:.3f}" if gate
                   else "teacher | teacher | teacher")
        lines.append(f"| {name} ({kind}) | {size:.1f} MB | {times[1]:.1f} ms ({speed[1]:.2f}x) | "
                     f"{times[1] / n:.2f} ms | {times[8]:.1f} ms ({speed[8]:.2f}x) | {times[8] / n:.2f} ms | {figures} |")
    table = "\n".join(lines)
    notes = (f"{len(images)} held-out images, greedy, exactly {n} new tokens; medians of {args.rounds} rounds x "
             f"{args.block} calls, alternating; gate figures from each bundle's manifest (137 held-out images). "
             f"Reproduce: `python benchmarks/caption_compression.py {' '.join(args.bundles)} --threads {args.threads}`.")
    publish(device_info(args.threads), table, title="Compressed captioners vs their fp32 teacher",
            threads=args.threads, notes=notes, markdown_path=args.markdown, json_path=args.json,
            payload={"rows": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
