"""The GPU check's figures against the goals of issue 14, from the bench reports under one directory.

    python benchmarks/gpu_summary.py LOGS_DIR > gpu-summary.md

Reads every ``*/report.json`` (``edgemm bench``) below LOGS_DIR and prints one
table of the GPU rows and the three ratios the goals name, each measured in
one run: TensorRT fp16 vs PyTorch CUDA eager fp16 (image, batch 32), ONNX
Runtime CUDA vs PyTorch eager, and ``classify(frame)`` p50 vs the bare graph.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GPU = {"cuda", "tensorrt"}


def rows(root: Path) -> list[dict]:
    out = []
    for report in sorted(root.glob("*/report.json")):
        data = json.loads(report.read_text())
        for r in data["results"]:
            r["report"] = report.parent.name
            out.append(r)
    return out


def where(r: dict) -> str:
    engine = f" {r['engine_precision']} engine" if r.get("engine_precision") else ""
    return f"{r['name']} {r['precision']}{engine} [{','.join(r['providers'])}] ({r['backend']})"


def main(root: str) -> int:
    found = [r for r in rows(Path(root)) if GPU & {r["backend"], *r["providers"]}]
    print("| bundle / runtime | task | batch | p50 ms | graph p50 ms | items/s | PyTorch eager | vs PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in found:
        ref = r.get("reference") or {}
        vs = f"{ref['speedup']:.2f}x" if ref else "-"
        torch = f"{ref.get('precision', 'fp32')} {ref['inference_ms_p50']:.2f} ms" if ref else "-"
        print(f"| {where(r)} | {r['task']} | {r['batch']} | {r['latency_ms']['p50']:.2f} | "
              f"{r['stages_ms']['inference']:.2f} | {r['throughput_per_s']:.0f} | {torch} | {vs} |")
    if not found:
        print("| no GPU rows: see summary.txt for why | | | | | | | |")
    print()
    goals = []
    trt16 = [r for r in found if r["backend"] == "tensorrt" and r.get("engine_precision") == "fp16"
             and r["task"] == "image" and r["batch"] == 32 and r.get("reference")]
    goals.append(("TensorRT fp16 image embedding, batch 32, vs PyTorch CUDA eager fp16", ">= 2.0x",
                  [r["reference"]["speedup"] for r in trt16]))
    ort = [r for r in found if r["backend"] == "onnxruntime" and r["providers"] == ["cuda"] and r.get("reference")]
    goals.append(("ONNX Runtime CUDA vs PyTorch CUDA eager (every task and batch)", ">= 1.2x",
                  [r["reference"]["speedup"] for r in ort]))
    frame = [r for r in found if r["task"] == "image" and r["batch"] == 1 and r["stages_ms"]["inference"] > 0
             and r.get("preprocess_on", "cpu") != "cpu"]
    goals.append(("classify(frame) p50 / bare graph p50, batch 1 (frames preprocessed on the GPU)", "<= 1.3",
                  [r["latency_ms"]["p50"] / r["stages_ms"]["inference"] for r in frame]))
    print("| goal | target | measured |")
    print("|---|---|---|")
    for name, target, values in goals:
        shown = ", ".join(f"{v:.2f}" for v in values) if values else "not measured here"
        print(f"| {name} | {target} | {shown} |")
    preprocessing(found)
    return 0


def preprocessing(found: list[dict]) -> None:
    """classify(frame) with frames preprocessed on the GPU against the CPU (EDGEMM_PREPROCESS=cpu), same GPU graph."""
    on = {}
    for r in found:
        if r["task"] == "image" and r["backend"] == "onnxruntime":
            on[(f"{r['name']} {r['precision']}", ",".join(r["providers"]), r["batch"],
                r.get("preprocess_on", "cpu"))] = r
    pairs = [(key, r, on.get((*key[:3], "cpu"))) for key, r in sorted(on.items()) if key[3] != "cpu"]
    pairs = [p for p in pairs if p[2] is not None]
    if not pairs:
        return
    print()
    print("| classify(frame), 1080p BGR | batch | pre ms GPU / CPU | p50 ms GPU / CPU | p50 / graph GPU / CPU |")
    print("|---|---|---|---|---|")
    for (name, providers, batch, _), gpu, cpu in pairs:
        ratio = [x["latency_ms"]["p50"] / x["stages_ms"]["inference"] for x in (gpu, cpu)]
        print(f"| {name} [{providers}] | {batch} | {gpu['stages_ms']['preprocess']:.2f} / "
              f"{cpu['stages_ms']['preprocess']:.2f} | {gpu['latency_ms']['p50']:.2f} / {cpu['latency_ms']['p50']:.2f}"
              f" | {ratio[0]:.2f} / {ratio[1]:.2f} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
