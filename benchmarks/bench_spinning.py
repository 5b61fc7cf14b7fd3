"""ONNX Runtime thread-pool spinning, on and off, for the public calls of each kind of model.

ONNX Runtime's intra-op threads spin for a while after each run
(``session.intra_op.allow_spinning``, on by default). A call that runs several
sessions back to back (``match``: image graph with patch tokens, text graph,
fusion head; ``classify_av``: frames through the image graph, then the audio
graph) can then have one session's idle threads spinning while the next
session needs the cores, and even a camera loop's ``classify(frame)`` (one
graph) has the frame's preprocessing wanting the cores the graph's threads
spin on. ``edgemm.load(..., spinning=...)`` chooses; the default
(``DualEncoder.SPINNING``) is off, from this benchmark on a 2-core CPU. On a
device with many cores, run it there: spinning costs less when cores are spare.

This loads each model twice (spinning on, spinning off) and times the same
calls on the same inputs with the benchmark harness's alternating blocks.

Usage:
    python benchmarks/bench_spinning.py [--default bundles/default] [--matching bundles/matching]
                                        [--audio-visual bundles/av]
                                        [--threads 2] [--min-time 6] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import edgemm
from edgemm._bench_worker import interleaved
from edgemm.export.models.audio_visual import build_audio_visual_bundle
from edgemm.export.models.matching import PROMPT, build_matching_bundle
from edgemm.runtime.datasets import emoji, sample_photos

from _common import device_info, frame_from_photo, publish  # shared helpers beside this script

SETTINGS = {"spinning on": True, "spinning off": False}
CLIP_FRAMES = 8  # frames of an audio-visual clip, with NOISE as its sound
NOISE = Path("/usr/share/sounds/alsa/Noise.wav")  # a real 1.4 s recording (alsa-utils), as the tests use


def _bundle(path: str, build: Callable[[str], Any]) -> str:
    if not (Path(path) / "manifest.json").is_file():
        print(f"building {path} ...", flush=True)
        build(path)
    return path


def _both(path: str, threads: int) -> dict[str, Any]:
    """The bundle loaded once per setting."""
    return {k: edgemm.load(path, threads=threads, spinning=v) for k, v in SETTINGS.items()}


def cases(args: argparse.Namespace) -> dict[str, dict[str, Callable[[], Any]]]:
    """Case → setting → a call of the public API, on one model per setting."""
    frame = frame_from_photo(sample_photos()[0].image)
    name, picture = emoji()[0]
    out: dict[str, dict[str, Callable[[], Any]]] = {}
    if args.default:
        models = _both(args.default, args.threads)
        for m in models.values():
            m.classify(frame)
        out["default: classify(frame)"] = {k: (lambda m=m: m.classify(frame)) for k, m in models.items()}
        texts = [PROMPT.format(n) for n, _ in emoji()[:32]]
        out["default: embed_texts(32 texts)"] = {k: (lambda m=m: m.embed_texts(texts)) for k, m in models.items()}
    matching = _bundle(args.matching, build_matching_bundle)
    models = _both(matching, args.threads)
    text = PROMPT.format(name)
    out["matching: match(frame, text), 3 graphs"] = {k: (lambda m=m: m.match(picture, text, color="rgb"))
                                                     for k, m in models.items()}
    for m in models.values():
        m.classify(frame)  # label embeddings cached, as in a camera loop
    out["matching: classify(frame), image graph alone"] = {k: (lambda m=m: m.classify(frame))
                                                           for k, m in models.items()}
    if args.audio_visual:
        av = _bundle(args.audio_visual, build_audio_visual_bundle)
        models = _both(av, args.threads)
        frames = [frame] * CLIP_FRAMES
        for m in models.values():
            m.classify_av(frames, NOISE)
        out[f"audio-visual: classify_av({CLIP_FRAMES} frames, {NOISE.name})"] = {
            k: (lambda m=m: m.classify_av(frames, NOISE)) for k, m in models.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", default=None, help="a dual-encoder bundle (e.g. bundles/default)")
    parser.add_argument("--matching", default="bundles/matching", help="matching bundle (built there if missing)")
    parser.add_argument("--audio-visual", default=None, help="audio-visual bundle (built there if missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=6.0, help="seconds per case, at least")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--markdown", dest="markdown_path")
    args = parser.parse_args(argv)
    info = device_info(args.threads)
    rows = []
    for case, sides in cases(args).items():
        times = interleaved(sides, warmup=3, min_time=args.min_time, min_iters=30)
        p50 = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"case": case, **{f"{k} p50 ms": v for k, v in p50.items()},
                     "off / on": p50["spinning off"] / p50["spinning on"], "calls": min(map(len, times.values()))})
        print(rows[-1], flush=True)
    lines = ["| case | spinning on, p50 | spinning off, p50 | off / on |", "|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['spinning on p50 ms']:.2f} ms | {r['spinning off p50 ms']:.2f} ms | "
              f"{r['off / on']:.2f} |" for r in rows]
    table = "\n".join(lines)
    publish(info, table, title="ONNX Runtime spinning, on and off", threads=args.threads,
            notes=("Each model loaded twice (`edgemm.load(..., spinning=True/False)`), the same calls timed in "
                   "alternating blocks (the `edgemm bench` harness). Below 1 in the last column: spinning off is "
                   "faster. Reproduce: `python benchmarks/bench_spinning.py "
                   f"{'--default ' + args.default + ' ' if args.default else ''}--matching {args.matching}"
                   f"{' --audio-visual ' + args.audio_visual if args.audio_visual else ''} --threads {args.threads}`."),
            markdown_path=args.markdown_path, json_path=args.json_path, payload={"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
