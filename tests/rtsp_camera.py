"""A loopback RTSP camera for tests: serves a video file, looped forever, as a live H.264 stream.

Run with the system interpreter (``/usr/bin/python3``), which has GStreamer's Python bindings; the
venv does not. ``tests/rtsp.py`` starts and stops it for pytest::

    /usr/bin/python3 tests/rtsp_camera.py --video clip.avi --port 8554 [--path /live]

It prints one line, ``READY rtsp://127.0.0.1:PORT/PATH``, once it is serving, and exits with status 0
on SIGTERM or SIGINT (and, with ``--exit-with-stdin``, when its stdin closes, so a parent that dies
without stopping it does not leave it behind). It can be started again on the same port at once:
the RTSP server binds its listening socket with SO_REUSEADDR.

Two pipelines, so that the camera behaves like a real one:

- the *source* decodes the file (``decodebin``: MJPEG/AVI, MPEG-4/MP4, ...) into an ``appsink`` that
  syncs to the clock, so frames come out at the file's frame rate, never faster; it loops the file
  with segment seeks and runs whether or not anyone is watching;
- each client's *media* is a live ``appsrc`` fed with the source's current frame, re-encoded with
  x264 (zerolatency, ultrafast, a key frame every second) and sent as RTP/H.264 over UDP or TCP.
  A client that connects sees what the camera shows now, not the start of the file.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

# x264 re-encoding for low latency: no B-frames, no lookahead (zerolatency), a key frame every
# second so a client that joins or loses packets recovers quickly, SPS/PPS with every key frame.
# One thread, hence one slice per frame: zerolatency's sliced threads (several slices a frame) come
# out of OpenCV's FFmpeg as half-concealed frames ("concealing 600 DC, 600 AC, 600 MV errors in
# I frame") and an extra, repeated frame per GOP; frame threads instead would add a frame of delay
# per thread. One thread encodes 640x480 far faster than real time.
_MEDIA = (
    "( appsrc name=src is-live=true format=time do-timestamp=false max-buffers=2 leaky-type=downstream"
    " ! videoconvert ! video/x-raw,format=I420"
    " ! x264enc tune=zerolatency speed-preset=ultrafast threads=1 bframes=0 key-int-max={gop}"
    " ! video/x-h264,profile=constrained-baseline"
    " ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
)


def _fail(message: str) -> None:
    print(f"rtsp_camera: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class Camera:
    """The looping file source and the RTSP server that re-encodes it for each client."""

    def __init__(self, video: str, port: int, path: str):
        self.loop = GLib.MainLoop()
        self.error: str | None = None
        self._lock = threading.Lock()
        self._appsrcs: set[Gst.Element] = set()
        self._caps: Gst.Caps | None = None
        self._frame_ns = Gst.CLOCK_TIME_NONE

        self.source = Gst.parse_launch(
            "filesrc name=file ! decodebin ! videoconvert ! video/x-raw,format=I420"
            " ! identity name=loop ! appsink name=sink sync=true emit-signals=true max-buffers=2 drop=true"
        )
        self.source.get_by_name("file").set_property("location", video)
        self.source.get_by_name("sink").connect("new-sample", self._on_sample)
        bus = self.source.get_bus()
        bus.add_signal_watch()
        bus.connect("message", self._on_message)
        self._preroll()

        fps = self._caps.get_structure(0).get_fraction("framerate")
        num, den = (fps[1], fps[2]) if fps[0] and fps[1] > 0 else (0, 1)
        if num:
            self._frame_ns = Gst.util_uint64_scale(Gst.SECOND, den, num)
        self.server = GstRtspServer.RTSPServer()
        self.server.set_address("127.0.0.1")
        self.server.set_service(str(port))
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(_MEDIA.format(gop=max(1, round(num / den)) if num else 30))
        factory.set_shared(False)  # one encoder per client: each starts on a key frame of its own
        factory.connect("media-configure", self._on_media_configure)
        self.server.get_mount_points().add_factory(path, factory)
        self.path = path

    def _preroll(self) -> None:
        """Pause the source until its first frame is decoded, so its caps (size, rate) are known."""
        self.source.set_state(Gst.State.PAUSED)
        result, _, _ = self.source.get_state(10 * Gst.SECOND)
        if result == Gst.StateChangeReturn.FAILURE or self.error:
            self._pop_error()
            _fail(f"cannot play the video: {self.error or 'the pipeline failed to start'}")
        if result != Gst.StateChangeReturn.SUCCESS:
            _fail("the video did not preroll within 10 s")
        pad = self.source.get_by_name("sink").get_static_pad("sink")
        self._caps = pad.get_current_caps()
        if self._caps is None:
            _fail("the video has no decodable video stream")
        # A flushing segment seek starts the loop; each SEGMENT_DONE then seeks back without a flush,
        # so running time (and so the pacing) carries on smoothly across the loop point.
        ok, self._duration = self.source.query_duration(Gst.Format.TIME)
        if not ok or self._duration <= 0:
            self._duration = -1
        self._loops = -1
        self.source.get_by_name("loop").get_static_pad("sink").add_probe(
            Gst.PadProbeType.EVENT_DOWNSTREAM | Gst.PadProbeType.EVENT_FLUSH, self._on_loop_event)
        self._loop_seek(Gst.SeekFlags.FLUSH)

    def _loop_seek(self, flags: Gst.SeekFlags = Gst.SeekFlags.NONE) -> None:
        self.source.seek(1.0, Gst.Format.TIME, flags | Gst.SeekFlags.SEGMENT,
                         Gst.SeekType.SET, 0, Gst.SeekType.NONE, -1)

    def _on_loop_event(self, pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        """Make loop k start at running time k * duration.

        Demuxers start the next loop's segment where the last frame *starts* (qtdemux: 4.933 s
        for a 5 s clip at 15 fps), not where it ends, so without this every loop comes one frame
        early: a burst at the loop point and a frame rate a little above the file's.
        """
        event = info.get_event()
        if event.type == Gst.EventType.FLUSH_STOP:  # a flushing seek restarts running time at 0
            self._loops = -1
        elif event.type == Gst.EventType.SEGMENT and self._duration > 0:
            self._loops += 1
            segment = event.parse_segment()
            # The offset of identity's src pad is added to the running time of what it pushes.
            self.source.get_by_name("loop").get_static_pad("src").set_offset(
                self._loops * self._duration - segment.base)
        return Gst.PadProbeReturn.OK

    def _pop_error(self) -> None:
        msg = self.source.get_bus().pop_filtered(Gst.MessageType.ERROR)
        if msg is not None and not self.error:
            err, debug = msg.parse_error()
            self.error = f"{err.message} ({debug})"

    def start(self) -> int:
        """Play the source and start serving; returns the bound port."""
        self.source.set_state(Gst.State.PLAYING)
        if self.server.attach(None) == 0:
            _fail(f"cannot listen on 127.0.0.1:{self.server.get_service()} (port in use?)")
        return self.server.get_bound_port()

    def stop(self) -> None:
        # Drop every client (and its media pipeline) before tearing down, so nothing is left streaming.
        self.server.client_filter(lambda server, client, *_: GstRtspServer.RTSPFilterResult.REMOVE)
        with self._lock:
            self._appsrcs.clear()
        self.source.set_state(Gst.State.NULL)

    def _on_message(self, bus: Gst.Bus, msg: Gst.Message) -> None:
        if msg.type == Gst.MessageType.SEGMENT_DONE:
            self._loop_seek()
        elif msg.type == Gst.MessageType.EOS:  # a demuxer that ignores segment seeks: flush back to the start
            self.source.seek_simple(Gst.Format.TIME, Gst.SeekFlags.FLUSH, 0)
        elif msg.type == Gst.MessageType.ERROR:
            err, debug = msg.parse_error()
            self.error = f"{err.message} ({debug})"
            print(f"rtsp_camera: source error: {self.error}", file=sys.stderr, flush=True)
            self.loop.quit()

    def _on_media_configure(self, factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        appsrc = media.get_element().get_by_name("src")
        appsrc.set_property("caps", self._caps)
        with self._lock:
            self._appsrcs.add(appsrc)
        media.connect("unprepared", self._on_media_unprepared, appsrc)

    def _on_media_unprepared(self, media: GstRtspServer.RTSPMedia, appsrc: Gst.Element) -> None:
        with self._lock:
            self._appsrcs.discard(appsrc)

    def _on_sample(self, sink: Gst.Element) -> Gst.FlowReturn:
        """Hand the frame the camera shows now to every client, stamped with its media's running time."""
        sample = sink.emit("pull-sample")
        if sample is None:
            return Gst.FlowReturn.OK
        buffer = sample.get_buffer()
        with self._lock:
            appsrcs = list(self._appsrcs)
        for appsrc in appsrcs:
            clock = appsrc.get_clock()
            if clock is None:  # media not playing yet
                continue
            now = clock.get_time() - appsrc.get_base_time()
            frame = buffer.copy()  # shares the memory; only the timestamps differ per client
            frame.pts = frame.dts = now
            frame.duration = self._frame_ns
            appsrc.emit("push-buffer", frame)
        return Gst.FlowReturn.OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", required=True, help="video file to serve, looped")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--path", default="/live", help="mount point (default /live)")
    parser.add_argument("--exit-with-stdin", action="store_true", help="exit when stdin reaches end of file")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.video):
        _fail(f"no such video file: {args.video}")
    path = args.path if args.path.startswith("/") else "/" + args.path

    Gst.init(None)
    camera = Camera(args.video, args.port, path)
    port = camera.start()

    def quit_loop(*_) -> bool:
        camera.loop.quit()
        return GLib.SOURCE_REMOVE

    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGTERM, quit_loop)
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGINT, quit_loop)
    if args.exit_with_stdin:
        def on_stdin(fd: int, condition: GLib.IOCondition) -> bool:
            if condition & (GLib.IO_HUP | GLib.IO_ERR) or not os.read(fd, 4096):
                camera.loop.quit()
                return GLib.SOURCE_REMOVE
            return GLib.SOURCE_CONTINUE

        GLib.io_add_watch(sys.stdin.fileno(), GLib.PRIORITY_DEFAULT, GLib.IO_IN | GLib.IO_HUP | GLib.IO_ERR, on_stdin)

    print(f"READY rtsp://127.0.0.1:{port}{path}", flush=True)
    camera.loop.run()
    camera.stop()
    return 1 if camera.error else 0


if __name__ == "__main__":
    sys.exit(main())
