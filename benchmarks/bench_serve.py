"""Throughput and latency of ``edgemm serve`` under concurrent clients, with and without its dynamic batcher.

The server runs in its own process (``python -m edgemm._cli serve``), as in
deployment; the clients are threads of this process, each with one keep-alive
HTTP connection, sending binary-tensor requests in a closed loop for a fixed
time. Two servers in the same run, one after the other on the same bundle:

* ``batched``: ``--max-batch 32`` and the default ``--max-delay-ms 0`` (a run takes what queued meanwhile);
* ``batched, wait D ms``: ``--max-delay-ms D`` (the oldest request waits up to D ms for company);
* ``one at a time``: ``--max-batch 1`` (every request its own graph run — the baseline).

Workloads: ``classify`` with one JPEG frame per request (the camera call) and
``embed_text`` with one sentence per request. Ratios are against the baseline
at concurrency 1 measured in the same run.

Usage:
    python benchmarks/bench_serve.py BUNDLE [--seconds 6 --concurrency 1,4,16 --threads 2 --json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import CLASSIFY_LABELS, device_info, percentiles, print_device

SENTENCES = ("a forklift moving a pallet in a warehouse", "a person walking a dog", "two cups of coffee",
             "a red car parked on the street", "a rocket on the launch pad", "a cat asleep on a sofa")


def _bytes_tensor(name: str, items: list[bytes]) -> tuple[dict[str, Any], bytes]:
    raw = b"".join(len(b).to_bytes(4, "little") + b for b in items)
    return {"name": name, "datatype": "BYTES", "shape": [len(items)],
            "parameters": {"binary_data_size": len(raw)}}, raw


def _request(tensors: list[tuple[dict[str, Any], bytes]]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [t for t, _ in tensors], "parameters": {"binary_data_output": True}}).encode()
    return head + b"".join(raw for _, raw in tensors), {"Inference-Header-Content-Length": str(len(head)),
                                                       "Content-Type": "application/octet-stream"}


def workloads() -> dict[str, list[tuple[bytes, dict[str, str]]]]:
    """Request bodies per workload, cycled by the clients."""
    import cv2
    from edgemm.runtime.datasets import sample_photos

    from _common import frame_from_photo

    labels = _bytes_tensor("labels", [label.encode() for label in CLASSIFY_LABELS])
    frames = [cv2.imencode(".jpg", frame_from_photo(p.image, (640, 480))[:, :, ::-1])[1].tobytes()
              for p in sample_photos()[:6]]
    return {"classify": [_request([_bytes_tensor("image", [f]), labels]) for f in frames],
            "embed_text": [_request([_bytes_tensor("text", [s.encode()])]) for s in SENTENCES]}


class Server:
    """``edgemm serve`` in a child process, on a free port."""

    def __init__(self, bundle: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "edgemm._cli", "serve", bundle, "--port", "0", *args],
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if " at http://" not in line:
            self.proc.kill()
            raise SystemExit(f"the server did not start: {line}{self.proc.stderr.read()}")
        host_port = line.split(" at http://")[1].split(" ")[0]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_load(server: Server, model: str, bodies: list, concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed-loop clients for ``seconds`` (after a short warm-up): requests/s and latency percentiles."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0]
    start_at = time.perf_counter() + 1.0  # the first second warms connections and the batcher
    stop_at = start_at + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        n = i
        while True:
            body, headers = bodies[n % len(bodies)]
            n += 1
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            conn.request("POST", f"/v2/models/{model}/infer", body, headers)
            reply = conn.getresponse()
            reply.read()
            t1 = time.perf_counter()
            if reply.status != 200:
                errors[0] += 1
            elif t0 >= start_at:
                latencies[i].append((t1 - t0) * 1e3)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples = [x for lat in latencies for x in lat]
    return {"requests_per_s": len(samples) / seconds, "latency_ms": percentiles(samples, (50, 90, 99)),
            "requests": len(samples), "errors": errors[0]}


def graph_runs(server: Server, model: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("GET", f"/v2/models/{model}/stats")
    stats = json.loads(conn.getresponse().read())["model_stats"][0]
    conn.close()
    return {"rows": stats["inference_count"], "runs": stats["execution_count"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--threads", type=int, default=2, help="the server's intra-op threads per graph")
    ap.add_argument("--max-delay-ms", type=float, default=5.0, help="the waiting batched server's delay")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    info = device_info(args.threads)
    print_device(info)
    bodies = workloads()
    graph_of = {"classify": "image_encoder", "embed_text": "text_encoder"}
    servers = {"batched": ["--max-batch", "32", "--max-delay-ms", "0"],
               f"batched, wait {args.max_delay_ms:g} ms": ["--max-batch", "32", "--max-delay-ms", str(args.max_delay_ms)],
               "one at a time": ["--max-batch", "1", "--max-delay-ms", "0"]}
    results: dict[str, Any] = {"device": info, "seconds": args.seconds, "threads": args.threads,
                               "max_delay_ms": args.max_delay_ms, "runs": []}
    for side, flags in servers.items():
        server = Server(args.bundle, "--threads", str(args.threads), *flags)
        try:
            for workload, reqs in bodies.items():
                for c in levels:
                    before = graph_runs(server, graph_of[workload])
                    r = run_load(server, workload, reqs, c, args.seconds)
                    after = graph_runs(server, graph_of[workload])
                    runs = after["runs"] - before["runs"]
                    r.update(server=side, workload=workload, concurrency=c,
                             rows_per_run=round((after["rows"] - before["rows"]) / runs, 2) if runs else None)
                    results["runs"].append(r)
                    print(f"{side:20s} {workload:10s} c={c:<3d} {r['requests_per_s']:8.1f} req/s  "
                          f"p50 {r['latency_ms']['p50']:7.2f} ms  p99 {r['latency_ms']['p99']:7.2f} ms  "
                          f"rows/run {r['rows_per_run']}  errors {r['errors']}", flush=True)
        finally:
            server.close()
    for workload in bodies:
        base = next(r for r in results["runs"] if r["workload"] == workload and r["server"] == "one at a time"
                    and r["concurrency"] == levels[0])["requests_per_s"]
        for r in results["runs"]:
            if r["workload"] == workload:
                r["vs_baseline"] = round(r["requests_per_s"] / base, 2)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    print(_table(results))


def _table(results: dict[str, Any]) -> str:
    lines = ["| workload | server | concurrency | requests/s | × baseline | p50 ms | p99 ms | rows per graph run |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    order = {side: i for i, side in enumerate(dict.fromkeys(r["server"] for r in results["runs"]))}
    for r in sorted(results["runs"], key=lambda r: (r["workload"], order[r["server"]], r["concurrency"])):
        lat = r["latency_ms"]
        lines.append(f"| {r['workload']} | {r['server']} | {r['concurrency']} | {r['requests_per_s']:.1f} | "
                     f"{r['vs_baseline']:.2f}× | {lat['p50']:.2f} | {lat['p99']:.2f} | {r['rows_per_run']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
