"""Frames from your own GStreamer (or DeepStream) pipeline into edgemm.Stream, through an appsink.

    python examples/gstreamer_appsink.py \\
        "rtspsrc location=rtsp://cam1/live latency=100 ! rtph264depay ! h264parse ! avdec_h264 ! videoconvert"
    # On a Jetson, decode on the NVDEC engine instead:
    #   "... ! h264parse ! nvv4l2decoder ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert"
    # DeepStream: "uridecodebin uri=rtsp://cam1/live ! nvvideoconvert ! video/x-raw,format=BGRx ! videoconvert"

OpenCV's pip wheels have no GStreamer, so ``edgemm.Stream(model, ["... ! appsink"])``
works only with an OpenCV built with it (JetPack's ``python3-opencv``). This
reader needs only GStreamer's Python bindings (``python3-gi``): it ends your
pipeline in ``video/x-raw,format=BGR ! appsink``, keeps at most one buffer
(``drop=true``: the newest), and gives frames the way OpenCV's ``read()``
does. Pass ``lambda: AppsinkReader(pipeline)``, not the reader itself, so the
stream can rebuild the pipeline when the camera drops.
"""

from __future__ import annotations

import argparse

import numpy as np


class AppsinkReader:
    """``read() -> (ok, frame)`` over a GStreamer pipeline description ending in raw video.

    Args:
        pipeline: A ``gst-launch-1.0`` description producing raw video (no sink).
        timeout_s: How long one read waits for a frame before it reports none (the
            stream then reconnects).
    """

    def __init__(self, pipeline: str, timeout_s: float = 5.0):
        import gi

        gi.require_version("Gst", "1.0")
        from gi.repository import Gst

        Gst.init(None)
        self._gst = Gst
        self.timeout_ns = int(timeout_s * Gst.SECOND)
        self.pipeline = Gst.parse_launch(
            f"{pipeline} ! videoconvert ! video/x-raw,format=BGR ! "
            "appsink name=edgemm_sink max-buffers=1 drop=true sync=false emit-signals=false")
        self.sink = self.pipeline.get_by_name("edgemm_sink")
        if self.pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            self.release()
            raise RuntimeError(f"GStreamer could not start the pipeline {pipeline!r}")

    def read(self) -> tuple[bool, np.ndarray | None]:
        sample = self.sink.emit("try-pull-sample", self.timeout_ns)
        if sample is None:  # end of stream, an error, or no frame within the timeout
            return False, None
        caps = sample.get_caps().get_structure(0)
        width, height = caps.get_value("width"), caps.get_value("height")
        buffer = sample.get_buffer()
        ok, info = buffer.map(self._gst.MapFlags.READ)
        if not ok:
            return False, None
        try:
            rows = np.frombuffer(info.data, np.uint8)
            stride = rows.size // height  # GStreamer pads each row of BGR to a multiple of 4 bytes
            frame = rows[: stride * height].reshape(height, stride)[:, : width * 3].reshape(height, width, 3).copy()
        finally:
            buffer.unmap(info)
        return True, frame

    def release(self) -> None:
        self.pipeline.set_state(self._gst.State.NULL)


def main() -> None:
    import edgemm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", help="a GStreamer description producing raw video, e.g. 'videotestsrc'")
    parser.add_argument("--labels", nargs="+", default=["person", "car", "forklift", "dog"])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--max-frames", type=int, default=50)
    args = parser.parse_args()

    model = edgemm.load(args.bundle)
    with edgemm.Stream(model, [lambda: AppsinkReader(args.pipeline)], labels=args.labels,
                       max_reconnects=3) as stream:
        for r in stream.results(max_results=args.max_frames):
            if r.ok:
                print(f"#{r.frame_index} {r.frame.shape[1]}x{r.frame.shape[0]}: {r.label} "
                      f"{r.predictions[0].score:.2f} ({r.latency_ms['total']:.1f} ms)", flush=True)
            else:
                print(f"error: {r.error}", flush=True)


if __name__ == "__main__":
    main()
