"""``edgemm serve`` measured by Triton's own load generator, perf_analyzer, instead of edgemm's clients.

The server runs in its own process (``python -m edgemm._cli serve``, as in bench_serve.py, with its default
batcher: ``--max-batch 32 --max-delay-ms 0``); perf_analyzer (C++, HTTP, binary tensors, one synchronous
connection per concurrent request) sends the same workloads as bench_serve.py: ``classify`` with one 640×480
JPEG frame and 10 labels per request, ``embed_text`` with one sentence per request. Each concurrency level is
its own perf_analyzer run of three time windows; its throughput and client-side p50/p99 latency are reported,
with the rows per graph run read from the server's statistics (how much the batcher merged).

perf_analyzer comes from ``bash scripts/perf_analyzer_env`` (the tritonclient 2.41 wheel's binary).

Usage:
    python benchmarks/perf_analyzer_serve.py [--bundle /tmp/b/default --concurrency 1,4,16 --window-ms 3000
                                              --threads 2 --json out.json]
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from _common import CLASSIFY_LABELS, DEFAULT_BUNDLE, device_info, print_device
from bench_serve import SENTENCES, Server, graph_runs

ROOT = Path(__file__).resolve().parents[1]
GRAPH_OF = {"classify": "image_encoder", "embed_text": "text_encoder"}


def input_data(model: str) -> dict[str, Any]:
    """perf_analyzer's ``--input-data`` JSON: one step per request body, cycled."""
    if model == "embed_text":
        return {"data": [{"text": {"content": [s], "shape": [1]}} for s in SENTENCES]}
    import cv2
    from edgemm.runtime.datasets import sample_photos

    from _common import frame_from_photo

    steps = []
    for p in sample_photos()[:6]:
        jpeg = cv2.imencode(".jpg", frame_from_photo(p.image, (640, 480))[:, :, ::-1])[1].tobytes()
        wire = len(jpeg).to_bytes(4, "little") + jpeg  # a BYTES tensor's raw form: 4-byte length, then the bytes
        steps.append({"image": {"b64": base64.b64encode(wire).decode(), "shape": [1]},
                      "labels": {"content": list(CLASSIFY_LABELS), "shape": [len(CLASSIFY_LABELS)]}})
    return {"data": steps}


def find_perf_analyzer(given: str | None) -> str:
    for candidate in (given, os.environ.get("EDGEMM_TEST_PERF_ANALYZER"),
                      str(ROOT / ".cache" / "perf_analyzer" / "perf_analyzer"), shutil.which("perf_analyzer")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit("no perf_analyzer: run `bash scripts/perf_analyzer_env` (or pass --perf-analyzer PATH)")


def run_level(perf_analyzer: str, server: Server, model: str, data: Path, concurrency: int, window_ms: int,
              workdir: Path) -> dict[str, Any]:
    """One perf_analyzer run at one concurrency: its CSV row, in infer/s and milliseconds."""
    report = workdir / f"{model}-{concurrency}.csv"
    # Any spread between windows counts as stable: the machine is shared, and an unstable level would end the run
    # with no numbers; the three windows are averaged either way.
    cmd = [perf_analyzer, "-u", f"{server.host}:{server.port}", "-i", "http", "-m", model, "--input-data", str(data),
           "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode", "time_windows",
           "--measurement-interval", str(window_ms), "--stability-percentage", "1000", "-f", str(report)]
    ran = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + 10 * window_ms / 1000)
    if ran.returncode != 0:
        raise SystemExit(f"perf_analyzer failed on {model} at concurrency {concurrency}:\n{ran.stdout[-3000:]}"
                         f"{ran.stderr[-3000:]}")
    row = next(csv.DictReader(report.open()))
    return {"infer_per_s": float(row["Inferences/Second"]), "p50_ms": int(row["p50 latency"]) / 1e3,
            "p99_ms": int(row["p99 latency"]) / 1e3, "server_compute_ms": int(row["Server Compute Infer"]) / 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=DEFAULT_BUNDLE, help="default bundle (built there if missing)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer's measurement window")
    ap.add_argument("--threads", type=int, default=2, help="the server's intra-op threads per graph")
    ap.add_argument("--perf-analyzer", default=None, help="the binary (default: what scripts/perf_analyzer_env made)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    perf_analyzer = find_perf_analyzer(args.perf_analyzer)
    if not (Path(args.bundle) / "manifest.json").is_file():
        from edgemm.export.models.dual_encoder import build_default_bundle

        print(f"building the default bundle in {args.bundle} ...", flush=True)
        build_default_bundle(args.bundle, overwrite=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    ran = subprocess.run([perf_analyzer, "--version"], capture_output=True, text=True)
    version = (ran.stdout.strip() or ran.stderr.strip() or "perf_analyzer (version unknown)").splitlines()[-1]
    info = device_info(args.threads)
    print_device(info)
    print(version)
    results: dict[str, Any] = {"device": info, "perf_analyzer": version, "window_ms": args.window_ms,
                               "threads": args.threads, "runs": []}
    server = Server(args.bundle, "--threads", str(args.threads), "--max-batch", "32", "--max-delay-ms", "0")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            for model in GRAPH_OF:
                data = workdir / f"{model}.json"
                data.write_text(json.dumps(input_data(model)))
                for c in levels:
                    before = graph_runs(server, GRAPH_OF[model])
                    r = run_level(perf_analyzer, server, model, data, c, args.window_ms, workdir)
                    after = graph_runs(server, GRAPH_OF[model])
                    runs = after["runs"] - before["runs"]
                    r.update(model=model, concurrency=c,
                             rows_per_run=round((after["rows"] - before["rows"]) / runs, 2) if runs else None)
                    results["runs"].append(r)
                    print(f"{model:10s} c={c:<3d} {r['infer_per_s']:8.1f} infer/s  p50 {r['p50_ms']:7.2f} ms  "
                          f"p99 {r['p99_ms']:7.2f} ms  rows/run {r['rows_per_run']}", flush=True)
    finally:
        server.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    print(_table(results))


def _table(results: dict[str, Any]) -> str:
    lines = ["| model | concurrency | infer/s | p50 ms | p99 ms | server compute ms | rows per graph run |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['infer_per_s']:.1f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['server_compute_ms']:.2f} | {r['rows_per_run']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
