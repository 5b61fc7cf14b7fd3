"""Per-operator time of ONNX graphs under ONNX Runtime's profiler, side by side.

Explains where a graph's time goes, e.g. why int8 does or does not pay for a
tower on this CPU:

    python benchmarks/profile_ops.py bundles/default/image_encoder.onnx int8/image_encoder.onnx \\
        --input pixels=8x3x224x224 --threads 2 [--json]

Each graph runs the same random input; kernel times are summed per operator
type over the timed runs (warm-up excluded) and shown per run, with the share
of the graph's total.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def _feeds(session, specs: dict[str, tuple[int, ...]], seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        if arg.name in specs:
            shape = specs[arg.name]
        else:
            shape = tuple(8 if i == 0 else seq for i, _ in enumerate(arg.shape))
        if "int64" in arg.type:
            feeds[arg.name] = np.ones(shape, np.int64) if arg.name == "attention_mask" else \
                rng.integers(1000, 2000, shape).astype(np.int64)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def profile(path: Path, specs: dict[str, tuple[int, ...]], *, threads: int, runs: int, warmup: int,
            seq: int) -> dict[str, float]:
    """Mean milliseconds per run for each operator type (kernel time)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = _feeds(session, specs, seq)
        for _ in range(warmup):
            session.run(None, feeds)
        marker = len(json.loads(Path(session.end_profiling()).read_text()))  # events so far: setup + warm-up
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            session.run(None, feeds)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())[marker:]
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3 / runs
    return dict(per_op)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--input", action="append", default=[], help="NAME=AxBxC fixed input shape")
    parser.add_argument("--seq", type=int, default=16, help="sequence length for int64 inputs without --input")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    specs = {}
    for item in args.input:
        name, shape = item.split("=")
        specs[name] = tuple(int(d) for d in shape.split("x"))
    tables = {str(g): profile(g, specs, threads=args.threads, runs=args.runs, warmup=args.warmup, seq=args.seq)
              for g in args.graphs}
    if args.json:
        print(json.dumps(tables, indent=2))
        return
    ops = sorted({op for t in tables.values() for op in t}, key=lambda op: -max(t.get(op, 0) for t in tables.values()))
    names = [Path(g).parent.name + "/" + Path(g).name for g in tables]
    print("| operator | " + " | ".join(f"{n} ms (share)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    totals = [sum(t.values()) for t in tables.values()]
    for op in ops:
        cells = []
        for t, total in zip(tables.values(), totals):
            ms = t.get(op, 0.0)
            cells.append(f"{ms:.2f} ({ms / total:.0%})" if ms else "–")
        print(f"| {op} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"**{t:.2f}**" for t in totals) + " |")


if __name__ == "__main__":
    main()
