"""A loopback RTSP camera for stream tests: write a clip, serve it live, stop it, bring it back.

The server (``tests/rtsp_camera.py``) runs under the system interpreter, which has GStreamer's
RTSP server bindings; the tests run in the venv and read the stream with OpenCV's FFmpeg backend::

    from rtsp import FAST_OPEN_OPTIONS, RtspCamera, free_port, rtsp_available, write_test_video

    if (reason := rtsp_available()) is not None:
        pytest.skip(reason)
    clip = write_test_video(tmp_path / "clip.avi", frames, fps=12, size=(640, 480))
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", FAST_OPEN_OPTIONS)  # open in 0.2 s, not 2.4 s
    with RtspCamera(clip, free_port()) as camera:
        cap = cv2.VideoCapture(camera.url, cv2.CAP_FFMPEG, [...])
        camera.stop()   # the camera goes away ...
        camera.start()  # ... and comes back on the same port and URL

Every wait is bounded, and a camera process never outlives the test run: ``stop()`` escalates from
SIGTERM to SIGKILL, cameras still running are stopped at garbage collection and at exit, and the
server exits by itself when its stdin (a pipe from this process) closes, which covers a parent
that is killed outright.
"""

from __future__ import annotations

import atexit
import functools
import os
import selectors
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = Path(__file__).with_name("rtsp_camera.py")
INSTALL_HINT = (
    "apt-get install -y gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-libav"
)
# What the camera's pipelines use: decoding an MJPEG/AVI or MPEG-4/MP4 clip (jpegdec, avdec_mpeg4),
# pacing it (appsink/appsrc, base), x264 (ugly) and RTP/UDP (good).
_ELEMENTS = ("filesrc", "decodebin", "avidemux", "qtdemux", "jpegdec", "avdec_mpeg4", "videoconvert",
             "appsink", "appsrc", "x264enc", "rtph264pay", "rtpbin", "udpsink")
_PROBE = f"""
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
print(" ".join(e for e in {_ELEMENTS!r} if Gst.ElementFactory.find(e) is None))
"""
# For OPENCV_FFMPEG_CAPTURE_OPTIONS (read at every open, so it can be set in os.environ). FFmpeg
# otherwise probes ~2.4 s of a 12 fps stream before open() returns and then hands those frames
# out in a burst, ~2.3 s old. Setting the variable at all drops OpenCV's own default of
# rtsp_transport=tcp, hence it is repeated here (UDP works too on loopback).
FAST_OPEN_OPTIONS = "rtsp_transport;tcp|analyzeduration;0|probesize;32"
# The container and codec OpenCV's FFmpeg writer is asked for, by file extension.
_FOURCC = {".avi": "MJPG", ".mp4": "mp4v"}


@functools.lru_cache(maxsize=1)
def rtsp_available() -> str | None:
    """Why the RTSP camera cannot run here, or None when it can.

    Returns:
        None when the system Python has GstRtspServer and every GStreamer element the camera uses;
        otherwise the reason, with the apt-get line that installs them (for ``pytest.skip``).
    """
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"no {SYSTEM_PYTHON} for the GStreamer RTSP camera; install: {INSTALL_HINT}"
    try:
        out = subprocess.run([SYSTEM_PYTHON, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"{SYSTEM_PYTHON} took over 60 s to load GStreamer"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["failed"])[-1]
        return f"{SYSTEM_PYTHON} cannot load GstRtspServer ({last}); install: {INSTALL_HINT}"
    if missing := out.stdout.strip():
        return f"GStreamer elements missing: {missing}; install: {INSTALL_HINT}"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_test_video(path: str | Path, frames: Sequence[np.ndarray], fps: float,
                     size: tuple[int, int]) -> Path:
    """Write frames to a real video file with OpenCV and check that it reads back whole.

    ``.avi`` is written as MJPEG (decoded by GStreamer's plugins-good alone), ``.mp4`` as MPEG-4
    Part 2 (``mp4v``; GStreamer needs gstreamer1.0-libav to decode it).

    Args:
        path: Output file, ending in .avi or .mp4.
        frames: BGR uint8 images (H, W, 3); any not of ``size`` are resized to it, since
            OpenCV's writer silently drops frames of the wrong size.
        fps: Frame rate stored in the file.
        size: (width, height) of the video.

    Returns:
        The path written.

    Raises:
        ValueError: No frames, a frame that is not BGR uint8, or an extension other than .avi/.mp4.
        RuntimeError: The codec is not available to OpenCV, or the file does not read back with
            as many frames as were written.
    """
    path = Path(path)
    fourcc = _FOURCC.get(path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"write_test_video writes .avi (MJPG) or .mp4 (mp4v), not {path.name!r}")
    if not frames:
        raise ValueError("write_test_video needs at least one frame")
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {fourcc} into {path.suffix} here (FFmpeg backend)")
    try:
        for i, frame in enumerate(frames):
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frame {i} is {frame.dtype} {frame.shape}, expected BGR uint8 (H, W, 3)")
            if frame.shape[:2] != (height, width):
                frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
            writer.write(np.ascontiguousarray(frame))
    finally:
        writer.release()
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    count = 0
    try:
        while cap.read()[0]:
            count += 1
    finally:
        cap.release()
    if count != len(frames):
        raise RuntimeError(f"{path} reads back {count} frames, {len(frames)} were written ({fourcc})")
    return path


_running: weakref.WeakSet[RtspCamera] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for camera in list(_running):
        camera.stop()


class RtspCamera:
    """A live RTSP camera on 127.0.0.1 serving a video file, looped, at the file's frame rate.

    ``stop()`` then ``start()`` again gives "a camera that goes away and comes back" on the
    same URL.

    Args:
        video: The clip to serve (see ``write_test_video``).
        port: TCP port for RTSP; ``free_port()`` when None.
        path: Mount point of the stream.
    """

    def __init__(self, video: str | Path, port: int | None = None, path: str = "/live"):
        self.video = Path(video)
        self.port = free_port() if port is None else int(port)
        self.path = path if path.startswith("/") else "/" + path
        self.returncode: int | None = None  # the server's exit status after stop()
        self._proc: subprocess.Popen | None = None
        self._stderr = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> RtspCamera:
        """Start the server and wait until it is serving.

        Raises:
            RuntimeError: Already running; or the server exited or did not report READY within
                ``timeout`` seconds (the message carries its stderr). The process is stopped first.
        """
        if self.running:
            raise RuntimeError(f"RTSP camera on {self.url} is already running")
        if not self.video.is_file():
            raise FileNotFoundError(f"no video file {self.video} to serve")
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server can never block on it
        self._proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(SCRIPT), "--video", str(self.video), "--port", str(self.port),
             "--path", self.path, "--exit-with-stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )
        self.returncode = None
        _running.add(self)
        line = self._read_line(timeout)
        if not line.startswith("READY "):
            self.stop()
            why = {"": f"exited with status {self.returncode}",
                   "TIMEOUT": f"did not report READY within {timeout:g} s"}.get(line, f"printed {line!r}")
            raise RuntimeError(f"RTSP camera on {self.url} {why}; stderr:\n{self.stderr()}")
        return self

    def _read_line(self, timeout: float) -> str:
        """The server's first stdout line ('' if it closed stdout first), waiting at most timeout seconds."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        data = b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in data:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return "TIMEOUT"
                chunk = os.read(fd, 4096)
                if not chunk:
                    return ""
                data += chunk
        return data.split(b"\n", 1)[0].decode(errors="replace").strip()

    def stderr(self) -> str:
        """What the server has written to stderr so far (or in its last run)."""
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it has not exited within timeout seconds."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.returncode = proc.returncode
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:  # stdin's pipe is broken if the server died first
                pass

    def __enter__(self) -> RtspCamera:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:  # interpreter shutdown: the stdin pipe closing still stops the server
            pass

    def __repr__(self) -> str:
        return f"RtspCamera({str(self.video)!r}, {self.port}, running={self.running})"
