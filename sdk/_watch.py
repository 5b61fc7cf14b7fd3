"""``edgemm watch``: classify (or caption) live cameras, RTSP streams and video files, one line per frame.

    edgemm watch rtsp://cam1/live clip.mp4 --labels person forklift [--every 0.5] [--jsonl out.jsonl]
    edgemm watch 0 --captions                          # the built-in captioner on webcam 0

Results go to stdout (text, or JSON lines with ``--json``) and, with
``--jsonl``, to a file as well; errors of a source go to stderr as they
happen; the per-source summary of :meth:`edgemm.Stream.stats` goes to stderr
at the end (Ctrl-C, ``--max-frames``, ``--duration`` or every source ended).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from edgemm._stream import StreamResult
from edgemm.runtime.errors import InputError


def result_json(r: StreamResult) -> dict[str, Any]:
    """A result as one JSON object (no frame)."""
    out: dict[str, Any] = {"source": r.source, "frame_index": r.frame_index, "timestamp": round(r.timestamp, 6)}
    if r.error is not None:
        return {**out, "error": r.error}
    if r.caption is not None:
        out.update(caption=r.caption.text, recaptioned=r.recaptioned)
    else:
        out.update(label=r.label, predictions=[{"label": p.label, "score": round(p.score, 6)} for p in r.predictions])
    return {**out, "latency_ms": r.latency_ms}


def result_line(r: StreamResult) -> str:
    """A result as one line of text."""
    head = f"{r.source} #{r.frame_index}"
    if r.caption is not None:
        body = ("* " if r.recaptioned else "  ") + r.caption.text
    else:
        body = f"{r.label}  (" + ", ".join(f"{p.label} {p.score:.2f}" for p in r.predictions) + ")"
    return f"{head}: {body}  {r.latency_ms['total']:.1f} ms"


def summary(stats: dict[str, Any]) -> str:
    """The stats as a small table: one row per source."""
    rows = [f"{'source':<28} {'state':<12} {'read':>6} {'done':>6} {'drop':>6} {'skip':>6} {'fps':>6} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"]
    for s in stats["sources"]:
        total = s["latency_ms"]["total"] or {"p50": float("nan"), "p99": float("nan")}
        fps = s["fps_processed"] if s["fps_processed"] is not None else float("nan")
        name = s["source"] if len(s["source"]) <= 28 else "…" + s["source"][-27:]
        rows.append(f"{name:<28} {s['state']:<12} {s['frames_read']:>6} {s['frames_processed']:>6} "
                    f"{s['frames_dropped']:>6} {s['frames_skipped']:>6} {fps:>6.1f} {total['p50']:>7.1f} "
                    f"{total['p99']:>7.1f} {s['errors']:>6}")
    batch = stats["mean_batch"]
    rows.append(f"{stats['batches']} batches, {batch if batch is not None else 0:.2f} frames each on average, "
                f"{stats['elapsed_s']:.1f} s")
    return "\n".join(rows)


def add_parser(subparsers: Any, runtime_options: Any) -> argparse.ArgumentParser:
    """Register ``watch`` on an ``add_subparsers()`` object; returns its parser."""
    p = subparsers.add_parser(
        "watch", help="classify (or caption) cameras, RTSP streams and video files as they play",
        description="Run a model on live sources: camera indices, video files, rtsp:// or http:// URLs, or "
                    "GStreamer pipelines (where OpenCV has GStreamer). One reader per source keeps the newest "
                    "frame; frames of all sources share graph runs. Prints one line per processed frame.")
    p.add_argument("sources", nargs="+", help="camera index (0), video file, URL or GStreamer pipeline")
    p.add_argument("--labels", nargs="+", help="candidate labels (default: the bundle's labels)")
    p.add_argument("--labels-file", help="a text file with one label per line")
    p.add_argument("-k", "--top-k", type=int, default=3)
    p.add_argument("--captions", action="store_true",
                   help="caption the scenes instead (the built-in captioner, or --bundle a captioner bundle)")
    p.add_argument("--every", type=float, default=None,
                   help="at most one frame per source every this many seconds (default: as fast as the model goes)")
    p.add_argument("--jsonl", default=None, help="also write every result as a JSON line to this file")
    p.add_argument("--max-batch", type=int, default=None,
                   help="frames per graph run at most (default: 8 on a GPU, 1 on the CPU)")
    p.add_argument("--max-delay-ms", type=float, default=10.0,
                   help="how long a ready frame waits for other sources' (default: 10)")
    p.add_argument("--smoothing", type=float, default=0.6,
                   help="weight of the previous smoothed probabilities, 0 to turn off (default: 0.6)")
    p.add_argument("--hold", type=int, default=1, help="frames a new label must lead before it is shown (default: 1)")
    p.add_argument("--scene-threshold", type=float, default=0.15,
                   help="--captions: scene change (cosine distance) that triggers a new caption (default: 0.15)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--realtime", dest="realtime", action="store_const", const=True, default=None,
                      help="files too: play at their frame rate and drop frames the model has no time for")
    mode.add_argument("--offline", dest="realtime", action="store_const", const=False,
                      help="every frame of every source, however long it takes (default for files)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many processed frames")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--max-reconnects", type=int, default=None,
                   help="failed reconnection attempts in a row before a live source is given up (default: never)")
    runtime_options(p)
    p.set_defaults(func=cmd_watch)
    return p


def _open_jsonl(path: str | None) -> TextIO | None:
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise InputError(f"--jsonl '{target}' is a directory; give a file name.")
    if not target.parent.is_dir():
        raise InputError(f"--jsonl: the folder '{target.parent}' does not exist.")
    return target.open("w", encoding="utf-8")


def cmd_watch(args: argparse.Namespace) -> int:
    """``edgemm watch``: stream, print, summarise. 0 when frames were processed, 1 when none were."""
    from edgemm._cli import _labels, _load
    from edgemm._stream import Stream

    model = _load(args, default="captioner" if args.captions else "default", captioner=args.captions)
    stream = Stream(model, args.sources, labels=None if args.captions else _labels(args), top_k=args.top_k,
                    max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, smoothing=args.smoothing,
                    hold=args.hold, realtime=args.realtime, every=args.every, scene_threshold=args.scene_threshold,
                    max_reconnects=args.max_reconnects, keep_frames=False)
    jsonl = _open_jsonl(args.jsonl)
    processed, interrupted = 0, False
    try:
        with stream:
            for r in stream.results(max_results=args.max_frames, duration=args.duration):
                if r.error is not None:
                    print(f"edgemm: {r.source}: {r.error}", file=sys.stderr, flush=True)
                else:
                    processed += 1
                    print(json.dumps(result_json(r)) if args.json else result_line(r), flush=True)
                if jsonl is not None:
                    jsonl.write(json.dumps(result_json(r)) + "\n")
                    jsonl.flush()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if jsonl is not None:
            jsonl.close()
    if not args.quiet:
        print(summary(stream.stats()), file=sys.stderr)
    if interrupted:
        return 130
    if not processed:
        print("edgemm: error: no frame was processed; see the errors above.", file=sys.stderr)
        return 1
    return 0
