"""How fast hostile files are refused, against loading a genuine file of the same kind in the same run.

Each hostile case is one that exhausted memory or time before edgemm checked declared sizes first.
Each row reports the median time to refuse, the error class, the median time to load a genuine file
of the same kind, and the ratio between the two.

Usage:
    python benchmarks/bench_refusal.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import sys
import tempfile
import time
import wave
import zipfile
import zlib
from pathlib import Path

import numpy as np

import edgemm
from edgemm.runtime.audio import AudioPreprocessor
from edgemm.runtime.image import to_rgb
from edgemm.runtime.manifest import AudioPreprocess


def _wav(path: Path, rate: int, seconds: float = 1.0, declared_rate: int | None = None) -> Path:
    samples = (np.sin(np.arange(int(rate * seconds)) * 0.05) * 20000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    if declared_rate is not None:  # forge the header's rate (and byte rate) as a hostile file would
        data = bytearray(path.read_bytes())
        data[24:32] = struct.pack("<II", declared_rate, (declared_rate * 2) % 2**32)
        path.write_bytes(bytes(data))
    return path


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A real 8x8 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed, so decoders trust it)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _index_bomb(path: Path, genuine: Path, declared_rows: int) -> Path:
    """The genuine index with its vectors member replaced by one declaring ``declared_rows`` rows of zeros."""
    with zipfile.ZipFile(genuine) as z:
        header = z.read("header.npy")
    meta = {"descr": "<f4", "fortran_order": False, "shape": (declared_rows, 384)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, meta)
    buf.write(b"\0" * (1 << 20))  # 1 MiB of real data behind a header declaring gigabytes
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("header.npy", header)
        z.writestr("vectors.npy", buf.getvalue())
    return path


def _time(call, repeats: int) -> tuple[float, str]:
    times, outcome = [], "ok"
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            call()
        except edgemm.EdgemmError as e:
            outcome = type(e).__name__
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    audio = AudioPreprocessor(AudioPreprocess(sample_rate=22050, min_samples=1, clip_samples=22050))
    index = edgemm.VectorIndex(384)
    index.add(np.random.default_rng(0).normal(size=(1000, 384)).astype(np.float32))
    index.save(tmp / "genuine.idx")
    from PIL import Image

    Image.fromarray(np.full((1080, 1920, 3), 90, np.uint8)).save(tmp / "genuine.png")
    tone = np.zeros(16000, np.float32)
    # Every file is written before timing: the rows time reading, not making, them.
    g_wav, one_hz = _wav(tmp / "g.wav", 16000), _wav(tmp / "a.wav", 16000, declared_rate=1)
    huge_hz = _wav(tmp / "b.wav", 16000, declared_rate=2**32 - 1)
    big_png = _png_declaring(tmp / "big.png", 100_000, 100_000)
    bomb = _index_bomb(tmp / "bomb.idx", tmp / "genuine.idx", 2_800_000)
    cases = [
        ("WAV declaring 1 Hz (32 KB)", lambda: audio.load(one_hz), lambda: audio.load(g_wav)),
        ("WAV declaring 4,294,967,295 Hz", lambda: audio.load(huge_hz), lambda: audio.load(g_wav)),
        ("array with sample_rate=10**12", lambda: audio.load(tone, 10**12), lambda: audio.load(tone, 16000)),
        ("PNG declaring 100000 x 100000", lambda: to_rgb(big_png), lambda: to_rgb(tmp / "genuine.png")),
        ("index declaring 4.3 GB (1 MB of data)", lambda: edgemm.VectorIndex.load(bomb),
         lambda: edgemm.VectorIndex.load(tmp / "genuine.idx")),
    ]
    rows = []
    print("| hostile input | refused in | as | genuine file of the kind | ratio |")
    print("|---|---:|---|---:|---:|")
    for name, hostile, genuine in cases:
        refused_ms, outcome = _time(hostile, args.repeats)
        genuine_ms, _ = _time(genuine, args.repeats)
        rows.append({"case": name, "refused_ms": refused_ms, "outcome": outcome, "genuine_ms": genuine_ms})
        print(f"| {name} | {refused_ms:.3f} ms | {outcome} | {genuine_ms:.2f} ms | {refused_ms / genuine_ms:.2f}x |")
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
