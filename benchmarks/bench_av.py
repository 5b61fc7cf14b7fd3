"""End-to-end ``classify_av(frames, audio)`` latency: edgemm (ONNX Runtime) vs the PyTorch reference.

One clip: 8 BGR uint8 640x480 frames made from a real sample photo (a slow
pan: each frame is a 640x480 window of the photo, moved 8 px right and 3 px
down per frame) and 1 s of real audio (the first second of
``/usr/share/sounds/alsa/Noise.wav``, 48 kHz mono float32), 10 labels. Both
pipelines cache their label weights before timing, as the SDK does after its
first call:

* edgemm: ``model.classify_av(frames, audio, labels, sample_rate=48000, top_k=5)``.
  Its time is split into audio preprocessing (a separate
  ``model.audio_preprocess.load`` + ``.tile`` call after each timed call:
  48 kHz -> 22,050 Hz resampling, then SoundNet's tiling of anything shorter
  than 20 s to 20 s, so the audio graph always sees 441,000 samples), the
  audio graph (``audio_backend.last_inference_ms``), image preprocessing (a
  separate ``model.preprocess(frames)`` call), the image graph for the 8
  frames in one batch (``image_backend.last_inference_ms``) and the rest
  (= total - the four: input checks, frame pooling, the audio/video mix,
  label scoring, top-k and the top-3 audio scenes).
* PyTorch eager: ``scipy.signal.resample_poly(x, 147, 320)`` (22050/48000)
  and the same tiling to 20 s, the torch SoundNet-8 (``soundnet.soundnet8()``);
  BGR->RGB and the reference PIL preprocessing (``reference_pixels``) of the 8
  frames, the torch image tower on them in one batch; then the same fusion in
  torch: mean of the frames' class probabilities, ``0.5 * video + 0.5 *
  audio`` (the bundle's ``audio_weight``), times the label weights, normalised,
  top-k (and the top-3 scenes, as edgemm). The label weights (1000, L) are
  computed once by the torch text tower (softmax over the classes of
  class-embedding . label-embedding / tau), not taken from edgemm. All under
  ``torch.inference_mode()`` with ``torch.set_num_threads(threads)``.

The "frames only" and "audio only" variants time ``classify_av(frames, None)``
and ``classify_av(None, audio)`` against the matching half of the reference,
in their own alternating rounds (``--variant-rounds``, 0 skips them).

The two sides run in alternating blocks (see ``_common.interleaved_rounds``)
so load from other processes falls on both; the speed-up is a ratio of
percentiles from the same run. The script fails (exit 1) if the two
pipelines disagree on the clip's top-1 label, in any of the modes timed.

Usage:
    python benchmarks/bench_av.py [--bundle /tmp/av] [--threads 2] [--rounds 12 --block 3]
                                  [--variant-rounds 6] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from scipy.signal import resample_poly

import edgemm
from edgemm.export.models import soundnet
from edgemm.export.models.dual_encoder import default_towers, reference_pixels
from edgemm.runtime.audio import read_wav
from edgemm.runtime.datasets import sample_photos

from _common import (  # shared helpers beside this script
    Sample,
    device_info,
    frame_from_photo,
    interleaved_rounds,
    limit_native_threads,
    percentiles,
    print_device,
    stage,
    write_json,
)

DEFAULT_AV_BUNDLE = "/tmp/av"
LABELS = ("the sea", "a cat", "traffic", "music", "a person speaking", "a rocket", "rain", "a dog barking",
          "birds", "a crowd")
FRAMES = 8
FRAME_W, FRAME_H = 640, 480
PAN_PX = (8, 3)  # (x, y) pixels the window moves per frame
RECORDING = "/usr/share/sounds/alsa/Noise.wav"  # real recording, 48 kHz, ~1.4 s (alsa-utils)
AUDIO_RATE = 48000
AUDIO_SECONDS = 1.0
RESAMPLE_UP, RESAMPLE_DOWN = 147, 320  # 22050 / 48000
MODES = {  # mode -> (uses frames, uses audio)
    "av": (True, True),
    "frames": (True, False),
    "audio": (False, True),
}
MODE_TITLES = {"av": "frames + audio", "frames": "frames only", "audio": "audio only"}
STAGES = (  # key, description, used in modes
    ("audio_pre", "audio preprocess (48k->22.05k resample, tile to 20 s)", ("av", "audio")),
    ("audio_graph", "audio graph (SoundNet-8, 441,000 samples)", ("av", "audio")),
    ("image_pre", f"image preprocess ({FRAMES} frames: crop, resize, normalise)", ("av", "frames")),
    ("image_graph", f"image graph ({FRAMES} frames, one batch)", ("av", "frames")),
    ("rest", "rest (checks, pooling, mix, label scoring, top-k, scenes)", ("av", "frames", "audio")),
)


def busy_cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes spent busy, CPU seconds this process spent), or None off Linux.

    Their difference over the timed phase is what other processes took from the cores.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait (guest time is inside user)
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def pan_frames(rgb: np.ndarray, n: int = FRAMES, size: tuple[int, int] = (FRAME_W, FRAME_H),
               step: tuple[int, int] = PAN_PX) -> list[np.ndarray]:
    """``n`` BGR uint8 frames of a slow pan over a real photo: windows of one slightly larger frame."""
    width, height = size
    dx, dy = step
    base = frame_from_photo(rgb, (width + dx * (n - 1), height + dy * (n - 1)))  # BGR
    return [np.ascontiguousarray(base[i * dy : i * dy + height, i * dx : i * dx + width]) for i in range(n)]


def recording(path: str = RECORDING, seconds: float = AUDIO_SECONDS) -> np.ndarray:
    """The first ``seconds`` of a real 48 kHz recording, float32 mono."""
    samples, rate = read_wav(path)
    if rate != AUDIO_RATE:
        raise SystemExit(f"error: {path} is at {rate} Hz; this benchmark expects {AUDIO_RATE} Hz")
    n = int(round(seconds * rate))
    if len(samples) < n:
        raise SystemExit(f"error: {path} holds {len(samples) / rate:.2f} s; {seconds} s are needed")
    return np.ascontiguousarray(samples[:n].mean(axis=1), dtype=np.float32)


class TorchAV:
    """The same classify_av pipeline in PyTorch eager, label weights cached like the SDK's."""

    def __init__(self, labels: Sequence[str], *, tau: float, prompt: str, audio_weight: float,
                 clip_samples: int, scene_labels: Sequence[str]):
        self.tower, self.text_embedder, _ = default_towers()
        self.sound = soundnet.soundnet8()
        self.labels = tuple(labels)
        self.audio_weight = float(audio_weight)
        self.clip_samples = int(clip_samples)
        self.scene_labels = tuple(scene_labels)
        with torch.inference_mode():
            text = self.text_embedder([prompt.format(label) for label in self.labels])  # (L, dim), unit rows
            sim = self.tower.class_embeddings @ text.T / tau  # (classes, L)
            self.weights = torch.softmax(sim, dim=0)

    def waveform(self, audio_48k: np.ndarray) -> np.ndarray:
        """48 kHz mono -> (1, clip_samples) at 22,050 Hz, tiled as SoundNet's preprocessing does."""
        x = resample_poly(audio_48k, RESAMPLE_UP, RESAMPLE_DOWN).astype(np.float32, copy=False)
        if len(x) < self.clip_samples:
            x = np.tile(x, -(-self.clip_samples // len(x)))[: self.clip_samples]
        return x[None, :]

    def __call__(self, frames_bgr: Sequence[np.ndarray] | None, audio_48k: np.ndarray | None,
                 top_k: int = 5) -> tuple[list[tuple[str, float]], np.ndarray, Sample]:
        """Classify one clip: (top-k (label, score), all probabilities, stage timings)."""
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        video = audio = None
        with torch.inference_mode():
            if audio_48k is not None:
                a0 = time.perf_counter()
                wave = torch.from_numpy(self.waveform(audio_48k))
                a1 = time.perf_counter()
                audio, places = self.sound(wave)
                audio, places = audio[0], places[0]
                a2 = time.perf_counter()
                t["audio_pre"], t["audio_graph"] = (a1 - a0) * 1e3, (a2 - a1) * 1e3
            if frames_bgr is not None:
                i0 = time.perf_counter()
                pixels = reference_pixels([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames_bgr])
                i1 = time.perf_counter()
                _, class_probs = self.tower(torch.from_numpy(pixels))
                i2 = time.perf_counter()
                t["image_pre"], t["image_graph"] = (i1 - i0) * 1e3, (i2 - i1) * 1e3
                video = class_probs.mean(dim=0)  # mean pooling over time
            if video is None:
                mix = audio
            elif audio is None:
                mix = video
            else:
                mix = (1.0 - self.audio_weight) * video + self.audio_weight * audio
            mass = mix @ self.weights
            probs = mass / mass.sum().clamp_min(1e-30)
            top = torch.topk(probs, min(top_k, len(self.labels)))
            preds = [(self.labels[j], float(s)) for s, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
            if audio is not None and self.scene_labels:  # edgemm also reports the top-3 audio scenes
                scenes = torch.topk(places, 3)
                _ = [(self.scene_labels[j], float(s)) for s, j in
                     zip(scenes.values.tolist(), scenes.indices.tolist(), strict=True)]
        t3 = time.perf_counter()
        t["total"] = (t3 - t0) * 1e3
        t["rest"] = t["total"] - sum(v for k, v in t.items() if k != "total")
        return preds, probs.numpy(), t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=DEFAULT_AV_BUNDLE, help="edgemm audio-visual bundle directory")
    parser.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime, torch and native pools")
    parser.add_argument("--photo", default="skimage.chelsea", help="sample photo the frames are made from")
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds, frames + audio")
    parser.add_argument("--block", type=int, default=3, help="calls per side per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per side first")
    parser.add_argument("--variant-rounds", type=int, default=6,
                        help="alternating rounds for each of 'frames only' and 'audio only' (0: skip them)")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    parser.add_argument("--markdown", dest="markdown_path", help="also write the tables here (Markdown)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    info = device_info(args.threads)
    photos = {p.name: p for p in sample_photos()}
    if args.photo not in photos:
        parser.error(f"--photo must be one of {sorted(photos)}")
    frames = pan_frames(photos[args.photo].image)
    audio = recording()

    model = edgemm.load(args.bundle, providers=("cpu",), threads=args.threads)
    if not hasattr(model, "classify_av"):
        parser.error(f"{args.bundle} is not an audio-visual bundle (family {model.manifest.family!r})")
    clip_samples = model.audio_preprocess.spec.clip_samples
    reference = TorchAV(LABELS, tau=model.manifest.scoring.tau, prompt=model.prompt,
                        audio_weight=model.audio_weight, clip_samples=clip_samples,
                        scene_labels=model.scene_labels)
    info["native_pools"] = limit_native_threads(args.threads)
    modes = ["av"] + (["frames", "audio"] if args.variant_rounds > 0 else [])

    def inputs(mode: str) -> tuple[list[np.ndarray] | None, np.ndarray | None]:
        use_frames, use_audio = MODES[mode]
        return (frames if use_frames else None), (audio if use_audio else None)

    # Correctness first: a fast pipeline that answers differently is not a speed-up.
    top1: dict[str, dict[str, Any]] = {}
    for mode in modes:
        f, a = inputs(mode)
        ours = model.classify_av(f, a, LABELS, sample_rate=AUDIO_RATE, top_k=len(LABELS))  # fills the label cache
        theirs, torch_probs, _ = reference(f, a, top_k=len(LABELS))
        by_label = {p.label: p.score for p in ours.predictions}
        our_probs = np.array([by_label[label] for label in LABELS])
        top1[mode] = {"edgemm": ours.label, "torch": theirs[0][0], "edgemm_score": ours.score,
                      "torch_score": theirs[0][1], "max_abs_prob_diff": float(np.max(np.abs(our_probs - torch_probs))),
                      "modalities": list(ours.modalities),
                      "scenes": [(s.label, round(s.score, 4)) for s in ours.scenes]}

    def edgemm_side(mode: str) -> Callable[[], Sample]:
        f, a = inputs(mode)

        def call() -> Sample:
            t0 = time.perf_counter()
            model.classify_av(f, a, LABELS, sample_rate=AUDIO_RATE, top_k=5)
            s: Sample = {"total": (time.perf_counter() - t0) * 1e3}
            if a is not None:
                s["audio_graph"] = model.audio_backend.last_inference_ms
            if f is not None:
                s["image_graph"] = model.image_backend.last_inference_ms
            if a is not None:
                t1 = time.perf_counter()
                model.audio_preprocess.tile(model.audio_preprocess.load(a, AUDIO_RATE))
                s["audio_pre"] = (time.perf_counter() - t1) * 1e3
            if f is not None:
                t1 = time.perf_counter()
                model.preprocess(f)
                s["image_pre"] = (time.perf_counter() - t1) * 1e3
            # Not clipped at 0: a negative rest shows the separate preprocess calls ran slower.
            s["rest"] = s["total"] - sum(v for k, v in s.items() if k != "total")
            return s

        return call

    def torch_side(mode: str) -> Callable[[], Sample]:
        f, a = inputs(mode)
        return lambda: reference(f, a, top_k=5)[2]

    results: dict[str, dict[str, Any]] = {}
    started, cpu_before = time.perf_counter(), busy_cpu_seconds()
    for mode in modes:
        rounds = args.rounds if mode == "av" else args.variant_rounds
        samples, per_round = interleaved_rounds({"edgemm": edgemm_side(mode), "torch": torch_side(mode)},
                                                rounds=rounds, block=args.block, warmup=args.warmup)
        keys = ["total"] + [k for k, _, used in STAGES if mode in used]
        res: dict[str, Any] = {side: {k: percentiles(stage(samples[side], k)) for k in keys}
                               for side in ("edgemm", "torch")}
        e, t = res["edgemm"]["total"], res["torch"]["total"]
        res["speedup"] = {q: t[q] / e[q] for q in ("p50", "p90", "p99")}
        res["per_round_speedup"] = percentiles([r["torch"] / r["edgemm"] for r in per_round], (10, 50, 90))
        res["rounds"], res["n"] = rounds, len(samples["edgemm"])
        results[mode] = res
    wall_s, cpu_after = time.perf_counter() - started, busy_cpu_seconds()
    info["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    # Cores' worth of CPU other processes used while timing ran: with threads = cores, any of it
    # preempts pool threads, which costs torch's OpenMP pool (a barrier per op) far more than ONNX Runtime.
    other = None
    if cpu_before and cpu_after:
        other = max(0.0, ((cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / wall_s)
    info["other_processes_cores"] = None if other is None else round(other, 2)

    print_device(info)
    lines = [
        f"clip: {FRAMES} frames {FRAME_W}x{FRAME_H} BGR uint8 ({args.photo}, centre-cropped to 4:3, cv2 INTER_CUBIC, "
        f"panned {PAN_PX[0]} px right / {PAN_PX[1]} px down per frame) + {AUDIO_SECONDS:g} s of {RECORDING} "
        f"({AUDIO_RATE} Hz mono float32; tiled to {clip_samples / soundnet.SAMPLE_RATE:g} s = {clip_samples:,} "
        f"samples at {soundnet.SAMPLE_RATE} Hz for the audio graph); {len(LABELS)} labels, top_k=5, "
        f"audio_weight {model.audio_weight:g}, mean pooling; label weights cached on both sides "
        "(PyTorch's from the torch text tower)",
        f"timing: {args.warmup} warm-up calls per side per mode, then rounds x {args.block} calls per side, "
        f"alternating order; frames + audio {args.rounds} rounds"
        + (f", each variant {args.variant_rounds} rounds" if len(modes) > 1 else "")
        + f"; {wall_s:.0f} s timed in all; load avg at end={info['loadavg_1m_end']}"
        + ("" if other is None else f"; other processes used {other:.2f} of {info['usable_cores']} cores meanwhile"),
        "",
        "| clip | pipeline | p50 ms | p90 ms | p99 ms | n |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode in modes:
        res = results[mode]
        e, t, s = res["edgemm"]["total"], res["torch"]["total"], res["speedup"]
        title = MODE_TITLES[mode]
        lines += [
            f"| {title} | edgemm (ONNX Runtime) | {e['p50']:.1f} | {e['p90']:.1f} | {e['p99']:.1f} | {res['n']} |",
            f"| {title} | PyTorch eager reference | {t['p50']:.1f} | {t['p90']:.1f} | {t['p99']:.1f} | {res['n']} |",
            f"| {title} | **speed-up (torch / edgemm)** | **{s['p50']:.2f}x** | {s['p90']:.2f}x | {s['p99']:.2f}x | |",
        ]
    lines.append("")
    for mode in modes:
        spread = results[mode]["per_round_speedup"]
        lines.append(f"per-round speed-up, {MODE_TITLES[mode]} (median of each block): p10 {spread['p10']:.2f}x, "
                     f"p50 {spread['p50']:.2f}x, p90 {spread['p90']:.2f}x over {results[mode]['rounds']} rounds")
    lines += ["", "| stage, frames + audio (p50 ms) | edgemm | PyTorch | ratio | edgemm share |",
              "|---|---:|---:|---:|---:|"]
    av = results["av"]
    e_total = av["edgemm"]["total"]["p50"]
    for key, what, _used in STAGES:
        a, b = av["edgemm"][key]["p50"], av["torch"][key]["p50"]
        ratio = f"{b / a:.1f}x" if a > 0 else "n/a"
        lines.append(f"| {what} | {a:.1f} | {b:.1f} | {ratio} | {100 * a / e_total:.0f}% |")
    lines.append(f"| total | {e_total:.1f} | {av['torch']['total']['p50']:.1f} | "
                 f"{av['speedup']['p50']:.1f}x | |")
    lines += ["", "edgemm's audio and image preprocessing are separate calls after each timed classify_av; its rest = "
              "total - the four stages per call (so it also absorbs timer and call overhead). Stage p50s need not "
              "add up to the total's p50."]
    if other is not None and other > 0.1 and args.threads + other > info["usable_cores"]:
        lines += ["", f"warning: other processes used {other:.2f} cores during timing; with {args.threads} "
                  f"thread{'s' if args.threads != 1 else ''} "
                  f"on {info['usable_cores']} cores that preempts the pools' threads, which slows torch's "
                  "OpenMP ops (a barrier each) far more than ONNX Runtime, so the speed-ups above are inflated. "
                  "Rerun on an idle machine."]
    lines.append("")
    for mode in modes:
        r = top1[mode]
        lines.append(f"top-1, {MODE_TITLES[mode]}: edgemm {r['edgemm']!r} ({r['edgemm_score']:.3f}), PyTorch "
                     f"{r['torch']!r} ({r['torch_score']:.3f}); max |prob diff| over the labels "
                     f"{r['max_abs_prob_diff']:.4f}" + (f"; edgemm's audio scenes {r['scenes']}" if r["scenes"] else ""))
    print("\n".join(lines))

    if args.markdown_path:
        pools = info.get("native_pools")
        shown = pools if isinstance(pools, str) else ", ".join(f"{p['api']}={p['threads']} ({p['lib']})"
                                                               for p in pools or ())
        head = [
            "## edgemm bench: audio-visual classify_av (1 s of audio + 8 frames)", "",
            f"- device: {info['cpu_model']} ({info['machine']}), cpu_count={info['cpu_count']}, usable cores="
            f"{info['usable_cores']}, threads={info['threads']}, load avg (1 min) {info['loadavg_1m']} at start, "
            f"{info['loadavg_1m_end']} at end",
            f"- versions: python {info['python']}, onnxruntime {info['onnxruntime']}, torch {info['torch']}, "
            f"numpy {info['numpy']}, opencv {info['opencv']}, pillow {info['pillow']}",
            f"- native pools: {shown}",
            f"- bundle: {args.bundle}; command: `python benchmarks/bench_av.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        ]
        with open(args.markdown_path, "w") as fh:
            fh.write("\n".join(head + ["- " + lines[0], "- " + lines[1]] + lines[2:]) + "\n")
        print(f"\nwrote {args.markdown_path}")

    if args.json_path:
        write_json(args.json_path, {
            "benchmark": "classify_av", "device": info, "bundle": args.bundle, "photo": args.photo,
            "frames": [FRAMES, FRAME_H, FRAME_W, 3], "pan_px_per_frame": list(PAN_PX),
            "audio": {"file": RECORDING, "seconds": AUDIO_SECONDS, "sample_rate": AUDIO_RATE,
                      "graph_samples": clip_samples, "graph_rate": soundnet.SAMPLE_RATE},
            "labels": list(LABELS), "audio_weight": model.audio_weight, "torch_label_weights": "torch text tower",
            "rounds": args.rounds, "variant_rounds": args.variant_rounds, "block": args.block,
            "warmup": args.warmup, "timed_s": wall_s,
            "results_ms": {m: {side: results[m][side] for side in ("edgemm", "torch")} for m in modes},
            "speedup": {m: results[m]["speedup"] for m in modes},
            "per_round_speedup": {m: results[m]["per_round_speedup"] for m in modes},
            "n": {m: results[m]["n"] for m in modes}, "top1": top1,
        })
    wrong = [m for m in modes if top1[m]["edgemm"] != top1[m]["torch"]]
    for mode in wrong:
        print(f"error: top-1 differs ({MODE_TITLES[mode]}): edgemm {top1[mode]['edgemm']!r} vs PyTorch "
              f"{top1[mode]['torch']!r}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
