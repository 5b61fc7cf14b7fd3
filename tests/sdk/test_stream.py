"""edgemm.Stream on real video: files written from the sample photos, played offline and as live cameras.

Every loop here is bounded (``results(duration=…)`` or a file's end), so a broken stream fails
the test instead of hanging it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import cv2
import numpy as np
import pytest

import edgemm
from edgemm._stream import _Smoother
from rtsp import FAST_OPEN_OPTIONS, RtspCamera, free_port, rtsp_available, write_test_video

PHOTO_LABELS = ["person", "cat", "camera", "clock", "cup of coffee", "coins", "rocket", "building", "flower",
                "galaxy", "moon", "brick wall", "grass", "gravel"]
SIZE = (320, 240)


def bgr(photo) -> np.ndarray:
    return cv2.resize(photo.image[:, :, ::-1], SIZE)


def write_clip(path, frames, fps: float = 15.0) -> str:
    """A real MJPG video file (OpenCV's writer), checked to read back whole."""
    return str(write_test_video(path, frames, fps, SIZE))


def decoded(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


@pytest.fixture(scope="module")
def scenes(photos):
    """Five photos, six frames each: person, cat, coffee, rocket, flower."""
    return [bgr(photos[i]) for i in (0, 1, 4, 6, 8)]


def test_offline_file_gives_every_frame_in_order_with_classify_s_answers(model, scenes, tmp_path):
    clip = write_clip(tmp_path / "clip.avi", [s for s in scenes for _ in range(6)])
    frames = decoded(clip)
    stream = edgemm.Stream(model, [clip], labels=PHOTO_LABELS, smoothing=0, top_k=2)
    with stream:
        results = list(stream.results(duration=60))
    assert [r.frame_index for r in results] == list(range(30))
    for r, frame in zip(results, frames):
        want = model.classify(frame, labels=PHOTO_LABELS, top_k=2)
        assert [p.label for p in r.predictions] == [p.label for p in want]
        assert r.predictions[0].score == pytest.approx(want[0].score, abs=1e-5)
        assert r.label == want[0].label
        assert set(r.latency_ms) == {"decode", "wait", "preprocess", "inference", "postprocess", "total"}
        assert r.latency_ms["total"] >= r.latency_ms["inference"] > 0
    s = stream.stats()["sources"][0]
    assert (s["state"], s["frames_read"], s["frames_processed"], s["frames_dropped"], s["pending"]) == \
        ("ended", 30, 30, 0, 0)
    assert s["latency_ms"]["total"]["p99"] >= s["latency_ms"]["total"]["p50"] > 0


def test_realtime_keeps_the_newest_frame_and_counts_the_dropped(model, scenes, tmp_path):
    # 200 frames/s is faster than the model on these cores: a FIFO would fall further behind every frame.
    clip = write_clip(tmp_path / "fast.avi", [scenes[i % 5] for i in range(400)], fps=200)
    stream = edgemm.Stream(model, [clip], labels=PHOTO_LABELS, realtime=True)
    behind = []
    with stream:
        for r in stream.results(duration=60):
            s = stream.stats()["sources"][0]
            # Frames newer than this result's: those the camera made while it was being processed.
            behind.append((s["frames_read"] - 1 - r.frame_index, r.latency_ms["total"] / 5))
    s = stream.stats()["sources"][0]
    assert s["frames_read"] == 400
    assert s["frames_dropped"] > 100, s
    assert s["frames_read"] == s["frames_processed"] + s["frames_dropped"] + s["frames_skipped"] + s["pending"]
    assert s["frames_processed"] == len(behind)
    # Never stale: a result is at most as many frames old as the camera made while it was processed (one
    # per 5 ms), plus the frame being decoded; a queue would be hundreds behind by the end.
    assert all(n <= made + 3 for n, made in behind), behind
    total = stream.stats()["sources"][0]["latency_ms"]["total"]
    inference = stream.stats()["sources"][0]["latency_ms"]["inference"]
    assert total["p90"] < 4 * inference["p90"] + 30, (total, inference)


def test_sources_are_batched_together_and_a_dead_camera_stalls_nobody(model, scenes, tmp_path):
    clips = [write_clip(tmp_path / f"cam{i}.avi", [scenes[i + 1]] * 45, fps=30) for i in range(3)]  # cat, cup, rocket
    attempts = []

    def dead_camera():
        attempts.append(time.perf_counter())
        raise ConnectionError("camera 4 unplugged")

    stream = edgemm.Stream(model, [*clips, dead_camera], labels=PHOTO_LABELS, realtime=True, max_batch=8,
                           max_delay_ms=20, reconnect_backoff=(0.05, 0.2), max_reconnects=3)
    with stream:
        results = list(stream.results(duration=30))
    frames = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    assert {r.source_index for r in frames} == {0, 1, 2}
    for i, want in enumerate(("cat", "cup of coffee", "rocket")):
        assert {r.label for r in frames if r.source_index == i} == {want}
    stats = stream.stats()
    assert stats["mean_batch"] > 1.5, stats  # three cameras' frames shared graph runs
    assert len(attempts) == 4 and all(r.source_index == 3 for r in errors)
    assert "camera 4 unplugged" in errors[0].error and "giving up" in errors[-1].error
    assert stats["sources"][3]["state"] == "failed"
    for s in stats["sources"][:3]:
        assert s["state"] == "ended" and s["frames_read"] == 45
        assert s["frames_processed"] >= 30, s  # the dead camera's backoff never held the others back


def test_smoothing_and_hold_reduce_label_flips_on_a_noisy_clip(model, photos, tmp_path):
    rng = np.random.default_rng(0)
    building = bgr(photos[7]).astype(np.float32)
    noisy = [np.clip(building + rng.normal(0, 60, building.shape), 0, 255).astype(np.uint8) for _ in range(60)]
    clip = write_clip(tmp_path / "noisy.avi", noisy)

    def flips(**settings) -> tuple[int, list[str]]:
        with edgemm.Stream(model, [clip], labels=PHOTO_LABELS, **settings) as stream:
            labels = [r.label for r in stream.results(duration=60)]
        assert len(labels) == 60
        return sum(a != b for a, b in zip(labels, labels[1:])), labels

    weight, model.grounding_weight = model.grounding_weight, 0.0  # grounded "building" is steady through this noise
    try:
        raw, raw_labels = flips(smoothing=0)
        smooth, smooth_labels = flips(smoothing=0.8, hold=3)
    finally:
        model.grounding_weight = weight
    assert raw >= 8, raw_labels  # the clip really is noisy
    assert smooth <= raw // 3, (raw, smooth)
    assert smooth_labels.count("building") > raw_labels.count("building")


def test_hold_switches_only_after_the_new_label_leads_long_enough():
    s = _Smoother(0.0, hold=3)
    a, b = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    assert [s.update(p, 0)[1] for p in (a, b, b, a, b, b, b, a)] == [0, 0, 0, 0, 0, 0, 1, 1]
    assert s.update(b, 1)[1] == 1  # a reconnected source starts again from its first frame


def test_every_processes_one_frame_per_interval_of_the_file(model, scenes, tmp_path):
    clip = write_clip(tmp_path / "clip.avi", [scenes[i // 15] for i in range(45)])  # 3 s at 15 fps
    with edgemm.Stream(model, [clip], labels=PHOTO_LABELS, every=0.2) as stream:
        results = list(stream.results(duration=60))
    assert [r.frame_index for r in results] == list(range(0, 45, 3))
    s = stream.stats()["sources"][0]
    assert (s["frames_processed"], s["frames_skipped"]) == (15, 30)


def test_broken_sources_are_results_not_exceptions(model, scenes, tmp_path):
    not_video = tmp_path / "notes.mp4"
    not_video.write_bytes(b"this is not a video" * 100)
    clip = write_clip(tmp_path / "clip.avi", [scenes[0]] * 5)

    class WrongFrames:
        """A user's reader that returns float frames, then runs out."""

        def __init__(self):
            self.left = 3

        def read(self):
            self.left -= 1
            return self.left >= 0, np.zeros((10, 10, 3), np.float64)

    with edgemm.Stream(model, [str(not_video), clip, WrongFrames()], labels=PHOTO_LABELS) as stream:
        results = list(stream.results(duration=30))
    errors = {r.source_index: [] for r in results if not r.ok}
    for r in results:
        if not r.ok:
            errors[r.source_index].append(r.error)
    assert "cannot open" in errors[0][0] and "OpenCV cannot decode this file" in errors[0][0]
    assert len(errors[2]) == 4 and "not a uint8 array" in errors[2][0] and "cannot be reopened" in errors[2][-1]
    assert sum(r.ok for r in results) == 5
    states = [s["state"] for s in stream.stats()["sources"]]
    assert states == ["failed", "ended", "ended"]


@pytest.mark.parametrize("bad, message", [
    (dict(sources="clip.mp4"), "sources must be a list"),
    (dict(sources=[]), "sources is empty"),
    (dict(sources=["/no/such/clip.mp4"]), "is not a video file, a camera index, a URL"),
    (dict(sources=[0, "0"]), "appears twice"),
    (dict(sources=[3.5]), "source 0 is a float"),
    (dict(sources=["videotestsrc ! appsink"]), "GStreamer"),
    (dict(max_batch=0), "max_batch must be a positive integer"),
    (dict(smoothing=1.0), "smoothing must be a number"),
    (dict(max_delay_ms=float("nan")), "max_delay_ms must be a number"),
    (dict(hold=0), "hold must be a positive integer"),
    (dict(every=0), "every must be a number > 0"),
    (dict(reconnect_backoff=(2, 1)), "reconnect_backoff[1] must be a number"),
    (dict(labels=["cat", "cat"]), "appears more than once"),
    (dict(realtime="yes"), "realtime must be True, False or None"),
])
def test_bad_settings_are_refused_before_any_thread_starts(model, bad, message):
    if "GStreamer" in message and "YES" in cv2.getBuildInformation().split("GStreamer:")[1].split("\n")[0]:
        pytest.skip("this OpenCV has GStreamer")
    before = threading.active_count()
    settings = {"sources": [0], "labels": ["cat", "dog"], **bad}
    with pytest.raises(edgemm.InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        edgemm.Stream(model, **settings)
    assert threading.active_count() == before


def test_close_stops_every_reader_thread(model, scenes, tmp_path):
    clip = write_clip(tmp_path / "long.avi", [scenes[i % 5] for i in range(600)], fps=30)  # 20 s
    stream = edgemm.Stream(model, [clip], labels=PHOTO_LABELS, realtime=True)
    got = list(stream.results(max_results=5))
    assert len(got) == 5
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 2
    assert not [t for t in threading.enumerate() if t.name.startswith("edgemm-stream")]
    with pytest.raises(edgemm.InputError, match="closed"):
        next(stream.results(duration=1))


def test_ctrl_c_ends_a_stream_promptly(default_bundle, scenes, tmp_path):
    clip = write_clip(tmp_path / "long.avi", [scenes[i % 5] for i in range(900)], fps=30)
    code = textwrap.dedent(f"""
        import sys, threading, edgemm
        model = edgemm.load({str(default_bundle)!r}, threads=1)
        try:
            with edgemm.Stream(model, [{clip!r}], labels=["cat", "person"], realtime=True) as stream:
                for n, r in enumerate(stream.results(duration=60)):
                    if n == 3:
                        print("RUNNING", flush=True)
        except KeyboardInterrupt:
            left = [t.name for t in threading.enumerate() if t.name.startswith("edgemm-stream")]
            print("INTERRUPTED", left, flush=True)
            sys.exit(3)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "RUNNING"
        child.send_signal(subprocess.signal.SIGINT)
        out, err = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 3, err
    assert out.strip() == "INTERRUPTED []"


def test_captioner_recaptions_only_when_the_scene_changes(default_captioner_bundle, scenes, tmp_path):
    captioner = edgemm.load(default_captioner_bundle, threads=2)
    clip = write_clip(tmp_path / "clip.avi", [s for s in scenes[:3] for _ in range(5)])
    frames = decoded(clip)
    with edgemm.Stream(captioner, [clip]) as stream:
        results = list(stream.results(duration=120))
    assert [r.frame_index for r in results] == list(range(15))
    assert [i for i, r in enumerate(results) if r.recaptioned] == [0, 5, 10]
    for first in (0, 5, 10):
        assert results[first].caption.text == captioner.caption(frames[first]).text
        assert all(r.caption == results[first].caption for r in results[first: first + 5])
    assert all(r.predictions == [] and r.label is None for r in results)


def test_watch_prints_each_frame_writes_json_lines_and_summarises(default_bundle, scenes, tmp_path):
    import json

    from clirun import run_cli

    clip = write_clip(tmp_path / "clip.avi", [scenes[i // 15] for i in range(30)])  # 1 s of the person, 1 s of the cat
    out = run_cli("watch", clip, "--bundle", default_bundle, "--labels", *PHOTO_LABELS, "--every", "0.5",
                  "--smoothing", "0", "--jsonl", tmp_path / "out.jsonl", "--threads", "2")
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"{clip} #{i}" for i in (0, 8, 15, 23)]  # 15 fps
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["frame_index"] for r in records] == [0, 8, 15, 23]
    assert records[-1]["label"] == "cat" and records[-1]["predictions"][0]["label"] == "cat"
    assert set(records[0]["latency_ms"]) >= {"decode", "inference", "total"}
    assert "ended" in out.stderr and "4 batches" in out.stderr

    bad = run_cli("watch", tmp_path / "missing.mp4", "--bundle", default_bundle, check=False)
    assert bad.returncode == 2 and "is not a video file" in bad.stderr
    (tmp_path / "fake.mp4").write_bytes(b"\0" * 1000)
    none = run_cli("watch", tmp_path / "fake.mp4", "--bundle", default_bundle, check=False)
    assert none.returncode == 1 and "cannot open" in none.stderr and "no frame was processed" in none.stderr


def test_an_rtsp_camera_that_stops_and_comes_back_is_reconnected(model, scenes, tmp_path, monkeypatch):
    if (reason := rtsp_available()) is not None:
        pytest.skip(reason)
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", FAST_OPEN_OPTIONS)  # opens in 0.25 s instead of 2.4 s
    clip = write_clip(tmp_path / "camera.avi", [scenes[1]] * 60, fps=12)  # the cat, looped by the camera
    before, after, errors = [], [], []
    with RtspCamera(clip, free_port()) as camera:
        stream = edgemm.Stream(model, [camera.url], labels=PHOTO_LABELS, reconnect_backoff=(0.2, 0.5))
        phase, down_at = "live", 0.0
        with stream:
            for r in stream.results(duration=60):
                if not r.ok:
                    errors.append((phase, r.error))
                else:
                    (before if phase == "live" else after).append(r)
                if phase == "live" and len(before) == 15:
                    camera.stop()  # the camera goes away ...
                    phase, down_at = "down", time.perf_counter()
                elif phase == "down" and len(errors) >= 2 and time.perf_counter() - down_at > 1:
                    camera.start()  # ... and comes back on the same URL
                    phase = "back"
                elif phase == "back" and len(after) == 15:
                    break
            stats = stream.stats()["sources"][0]
    assert len(before) == 15 and len(after) == 15, (len(before), len(after), errors)
    assert {r.label for r in before + after} == {"cat"}
    assert after[0].frame_index > before[-1].frame_index  # numbering carries on across the reconnect
    assert all(phase != "live" for phase, _ in errors)
    assert "reconnecting" in errors[0][1]
    assert any("cannot open" in e for _, e in errors)  # refused while it was down
    assert stats["reconnects"] >= 1 and stats["state"] == "live"
    assert stats["frames_read"] == stats["frames_processed"] + stats["frames_dropped"] + stats["pending"]
    # A 12 fps camera and a ~20 ms model: each frame is processed as it comes, without a queue.
    assert stats["latency_ms"]["total"]["p90"] < 250, stats
    steady = after[-10:]  # (the first frame after a reconnect can come a second or two before the next)
    rate = (len(steady) - 1) / (steady[-1].timestamp - steady[0].timestamp)
    assert 9 < rate < 15, rate  # the camera's own pace once it is back
