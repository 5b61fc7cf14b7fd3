"""Many cameras through one model: ``edgemm.Stream`` batched across cameras against one frame per graph run.

Each camera is a real MJPG video of the sample photos (640x480, or ``--size``)
played like a live camera at ``--fps`` (``realtime=True``: a reader thread per
camera decodes at the file's rate and keeps only the newest frame). For 1, 4
and 8 cameras, in the same run, two streams on the same model one after the
other:

* ``batched``: ``max_batch=8``, ``max_delay_ms=10`` — the cameras' newest frames share a graph run;
* ``one at a time``: ``max_batch=1`` — each frame its own run (what a loop of ``classify(frame)`` does).

Reported per configuration: frames processed per second (all cameras), per
camera, the share of frames dropped because the model had no time for them,
the end-to-end latency (frame decoded → result) p50/p99, and the mean batch.
Decoding runs on the same cores as the model, as on a device.

Usage:
    python benchmarks/bench_stream.py BUNDLE [--cameras 1,4,8 --seconds 8 --fps 30 --threads 2 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2

from _common import CLASSIFY_LABELS, device_info, print_device


def write_cameras(folder: Path, count: int, size: tuple[int, int], fps: float, seconds: float) -> list[str]:
    """``count`` videos of ``seconds``, each cycling through the sample photos from a different one."""
    from edgemm.runtime.datasets import sample_photos

    photos = [cv2.resize(p.image[:, :, ::-1], size) for p in sample_photos()]
    paths = []
    frames = int(fps * seconds)
    for c in range(count):
        path = folder / f"camera{c}.avi"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
        for i in range(frames):
            writer.write(photos[(c + i // int(fps)) % len(photos)])  # a new scene every second
        writer.release()
        paths.append(str(path))
    return paths


def measure(model: Any, sources: list[str], max_batch: int, seconds: float) -> dict[str, Any]:
    import edgemm

    stream = edgemm.Stream(model, sources, labels=list(CLASSIFY_LABELS), realtime=True, max_batch=max_batch,
                           max_delay_ms=10, keep_frames=False)
    totals = []
    started = time.perf_counter()
    with stream:
        for r in stream.results(duration=seconds):
            if r.ok:
                totals.append(r.latency_ms["total"])
    elapsed = time.perf_counter() - started
    stats = stream.stats()
    read = sum(s["frames_read"] for s in stats["sources"])
    dropped = sum(s["frames_dropped"] for s in stats["sources"])
    import numpy as np

    p50, p99 = np.percentile(totals, (50, 99)) if totals else (float("nan"), float("nan"))
    return {"cameras": len(sources), "max_batch": max_batch, "processed_fps": len(totals) / elapsed,
            "per_camera_fps": len(totals) / elapsed / len(sources), "dropped_share": dropped / max(read, 1),
            "latency_ms": {"p50": float(p50), "p99": float(p99)}, "mean_batch": stats["mean_batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--cameras", default="1,4,8")
    parser.add_argument("--seconds", type=float, default=8.0, help="per configuration")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import edgemm

    size = tuple(int(v) for v in args.size.split("x"))
    counts = [int(c) for c in args.cameras.split(",")]
    model = edgemm.load(args.bundle, threads=args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_cameras(Path(tmp), max(counts), size, args.fps, args.seconds + 4)
        for count in counts:
            for max_batch in (8, 1):
                row = measure(model, paths[:count], max_batch, args.seconds)
                rows.append(row)
                print(f"{count} cameras, max_batch {max_batch}: {row['processed_fps']:.1f} frames/s", flush=True)
    print_device(device_info(args.threads))
    print(f"\n{args.fps:g} fps cameras ({args.size}, MJPG), {args.seconds:g} s each, threads {args.threads}\n")
    print("| cameras | batching | frames/s (all) | per camera | dropped | latency p50 | p99 | mean batch |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        mode = "batched (max 8, 10 ms)" if row["max_batch"] > 1 else "one at a time"
        print(f"| {row['cameras']} | {mode} | {row['processed_fps']:.1f} | {row['per_camera_fps']:.1f} | "
              f"{row['dropped_share']:.0%} | {row['latency_ms']['p50']:.1f} ms | {row['latency_ms']['p99']:.1f} ms | "
              f"{row['mean_batch'] or 0:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_info(args.threads), "settings": vars(args),
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
