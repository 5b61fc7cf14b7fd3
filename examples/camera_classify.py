"""Zero-shot classification of camera frames, with per-frame latency.

    python examples/camera_classify.py                    # webcam 0
    python examples/camera_classify.py clip.mp4 --labels person dog forklift
    python examples/camera_classify.py photo.jpg --max-frames 1

Frames come from OpenCV as BGR uint8, exactly what ``model.classify`` expects.
"""

from __future__ import annotations

import argparse
import time

import cv2

import edgemm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default="0", help="camera index, video file or image file")
    parser.add_argument("--labels", nargs="+", default=["person", "dog", "cat", "car", "forklift", "bicycle"])
    parser.add_argument("--bundle", default=None, help="bundle directory (default model when omitted)")
    parser.add_argument("--max-frames", type=int, default=100)
    args = parser.parse_args()

    model = edgemm.load(args.bundle)
    capture = cv2.VideoCapture(int(args.source) if args.source.isdigit() else args.source)
    if not capture.isOpened():
        raise SystemExit(f"cannot open {args.source!r}")
    for n in range(args.max_frames):
        ok, frame = capture.read()
        if not ok:
            break
        start = time.perf_counter()
        top = model.classify(frame, labels=args.labels, top_k=2)
        ms = (time.perf_counter() - start) * 1e3
        print(f"frame {n}: {top[0].label} {top[0].score:.2f}, {top[1].label} {top[1].score:.2f}  ({ms:.1f} ms)")


if __name__ == "__main__":
    main()
