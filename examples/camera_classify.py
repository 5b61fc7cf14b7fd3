"""Zero-shot classification of one or many cameras, with the label and latency drawn on each frame.

    python examples/camera_classify.py                                   # webcam 0
    python examples/camera_classify.py 0 rtsp://cam2/live clip.mp4 --labels person forklift pallet
    python examples/camera_classify.py clip.mp4 --save annotated/        # one annotated video per source
    python examples/camera_classify.py 0 --show                          # a window per source (GUI OpenCV)

edgemm.Stream reads every source on its own thread, keeps only its newest
frame, and runs the sources' frames through the model together; labels are
smoothed so one odd frame does not flip them. Ctrl-C (or q in a window) stops.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

import edgemm


def overlay(frame, text: str, detail: str):
    """The frame with a label line and a latency line in its top-left corner."""
    out = frame.copy()
    for row, (line, scale) in enumerate(((text, 0.8), (detail, 0.5))):
        y = 30 + 28 * row
        cv2.putText(out, line, (10, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(out, line, (10, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", default=["0"], help="camera indices, video files or RTSP URLs")
    parser.add_argument("--labels", nargs="+", default=["person", "dog", "cat", "car", "forklift", "bicycle"])
    parser.add_argument("--bundle", default=None, help="bundle directory (default model when omitted)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--show", action="store_true", help="show each source in a window")
    parser.add_argument("--save", type=Path, default=None, help="write an annotated video per source here")
    args = parser.parse_args()

    model = edgemm.load(args.bundle)
    stream = edgemm.Stream(model, args.sources, labels=args.labels, top_k=2, smoothing=0.6, hold=2)
    writers: dict[str, cv2.VideoWriter] = {}
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    try:
        with stream:
            for r in stream.results(max_results=args.max_frames, duration=args.duration):
                if not r.ok:
                    print(f"{r.source}: {r.error}")
                    continue
                top = r.predictions
                ms = r.latency_ms
                print(f"{r.source} #{r.frame_index}: {r.label} {top[0].score:.2f}, {top[1].label} {top[1].score:.2f}"
                      f"  ({ms['total']:.1f} ms: inference {ms['inference']:.1f})", flush=True)
                if not (args.show or args.save):
                    continue
                image = overlay(r.frame, f"{r.label} {top[0].score:.2f}",
                                f"{ms['total']:.0f} ms, inference {ms['inference']:.0f} ms")
                if args.save:
                    if r.source not in writers:
                        name = f"{r.source_index}-{Path(r.source).stem or 'camera'}.avi"
                        writers[r.source] = cv2.VideoWriter(str(args.save / name), cv2.VideoWriter_fourcc(*"MJPG"),
                                                            15, (image.shape[1], image.shape[0]))
                    writers[r.source].write(image)
                if args.show:
                    try:
                        cv2.imshow(r.source, image)
                    except cv2.error:
                        raise SystemExit("--show needs OpenCV with a GUI (pip install opencv-python); this one is "
                                         "headless. Use --save DIR instead.") from None
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        break
    except KeyboardInterrupt:
        pass
    finally:
        for writer in writers.values():
            writer.release()
    for s in stream.stats()["sources"]:
        total = s["latency_ms"]["total"]
        print(f"{s['source']}: {s['frames_processed']} processed, {s['frames_dropped']} dropped, "
              f"p50 {total['p50'] if total else float('nan'):.1f} ms")


if __name__ == "__main__":
    main()
