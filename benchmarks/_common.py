"""Shared pieces of the edgemm-vs-PyTorch benchmark scripts.

Device description, percentiles, interleaved timing rounds and the 1080p test
frames. Imported by the scripts as ``_common`` (they run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``). It
imports neither torch nor edgemm, so ``bench_memory.py`` can use it in a parent
process without loading what its children measure.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np

DEFAULT_BUNDLE = "/tmp/b/default"
FRAME_SIZE = (1920, 1080)  # (width, height) of a 1080p camera frame
# The 10 labels classify is benchmarked with: everyday subjects, a few matching the sample photos.
CLASSIFY_LABELS = ("cat", "dog", "person", "car", "forklift", "cup of coffee", "rocket", "flower", "building", "clock")


def status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (e.g. VmHWM, VmRSS) in MiB; None off Linux.

    (bench_memory.py keeps its own copy: its children must not import numpy before they are measured.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(*dists: str) -> str | None:
    """Installed version of the first distribution found, without importing it."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def device_info(threads: int | None) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, threads, library versions, load."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "threads": threads,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "onnxruntime": version("onnxruntime", "onnxruntime-gpu"),
        "torch": version("torch"),
        "numpy": np.__version__,
        "opencv": version("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
        "pillow": version("pillow", "Pillow"),
        "tokenizers": version("tokenizers"),
    }


def limit_native_threads(threads: int) -> list[dict[str, Any]] | str:
    """Cap every native thread pool (OpenBLAS, OpenMP, MKL) at ``threads``; returns the pools.

    Both sides then run numpy's small matmuls and torch's kernels with the same
    thread count as ONNX Runtime's intra-op pool, so the ratio compares runtimes,
    not thread counts. Call it after importing torch so its pools are seen.
    """
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return "unknown (pip install threadpoolctl to cap and record native pools)"
    threadpool_limits(threads)
    return [
        {"api": p.get("internal_api"), "threads": p.get("num_threads"),
         "lib": os.path.basename(p.get("filepath") or "")}
        for p in threadpool_info()
    ]


def print_device(info: Mapping[str, Any]) -> None:
    """Print the device block that precedes each table."""
    print(f"device: {info['cpu_model']} ({info['machine']}), cpu_count={info['cpu_count']}, "
          f"usable cores={info['usable_cores']}, threads={info['threads']}, "
          f"load avg (1 min) at start={info['loadavg_1m']}")
    print(f"versions: python {info['python']}, onnxruntime {info['onnxruntime']}, torch {info['torch']}, "
          f"numpy {info['numpy']}, opencv {info['opencv']}, pillow {info['pillow']}, "
          f"tokenizers {info['tokenizers']}")
    pools = info.get("native_pools")
    if pools:
        shown = pools if isinstance(pools, str) else ", ".join(f"{p['api']}={p['threads']} ({p['lib']})" for p in pools)
        print(f"native pools: {shown}")


def percentiles(samples: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": ..., ...}`` of the samples (linear interpolation)."""
    values = np.percentile(np.asarray(samples, np.float64), qs)
    return {f"p{q}": float(v) for q, v in zip(qs, values, strict=True)}


Sample = dict[str, float]  # stage name → milliseconds; "total" is always present


def interleaved_rounds(sides: Mapping[str, Callable[[], Sample]], *, rounds: int, block: int,
                       warmup: int) -> tuple[dict[str, list[Sample]], list[dict[str, float]]]:
    """Time each side in alternating blocks so background load falls on both alike.

    Each round runs ``block`` calls of every side, reversing the side order on
    odd rounds so neither side always follows the other (ONNX Runtime's and
    OpenMP's spinning threads linger briefly after a call). Calls are grouped in
    blocks rather than strictly alternated so a side's caches and thread pools
    are warm for most of its calls, as in a camera loop.

    Args:
        sides: Name → callable that runs one call and returns its own timings
            (it times itself so it can leave untimed work, e.g. a separate
            preprocess call, out of ``"total"``).
        rounds: Rounds to run.
        block: Calls per side per round.
        warmup: Untimed calls per side first.

    Returns:
        All samples per side, and for each round the median ``total`` per side.
    """
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    names = list(sides)
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        medians: dict[str, float] = {}
        for name in names if r % 2 == 0 else names[::-1]:
            got = [sides[name]() for _ in range(block)]
            samples[name].extend(got)
            medians[name] = float(np.median([s["total"] for s in got]))
        per_round.append(medians)
    return samples, per_round


def stage(samples: Sequence[Sample], key: str) -> list[float]:
    """One stage's values across samples."""
    return [s[key] for s in samples]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, milliseconds) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def frame_from_photo(rgb: np.ndarray, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """A real photo as a camera frame: centre-cropped to the frame's aspect, resized, BGR uint8.

    Cropping first keeps the subject's proportions, so the frame looks like a
    real 16:9 capture rather than a stretched photo.
    """
    import cv2

    width, height = size
    h, w = rgb.shape[:2]
    if w * height > h * width:  # too wide: trim the sides
        new_w = max(1, round(h * width / height))
        left = (w - new_w) // 2
        rgb = rgb[:, left : left + new_w]
    else:  # too tall: trim top and bottom
        new_h = max(1, round(w * height / width))
        top = (h - new_h) // 2
        rgb = rgb[top : top + new_h]
    frame = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))


def write_json(path: str, report: Mapping[str, Any]) -> None:
    """Write the report and say where."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {path}")


def publish(info: Mapping[str, Any], table: str, *, title: str, threads: int, notes: str,
            markdown_path: str | None = None, json_path: str | None = None,
            payload: Mapping[str, Any] | None = None) -> None:
    """Print the device and the table; write the Markdown (title with the device and its load, table,
    notes) and the JSON (device plus ``payload``) where asked."""
    print()
    print_device(info)
    print(table)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(f"## {title} ({info['cpu_model']}, {threads} threads, load avg at start {info['loadavg_1m']})"
                    f"\n\n{table}\n\n{notes}\n")
    if json_path:
        write_json(json_path, {"device": info, **(payload or {})})


def target_line(name: str, ok: bool, detail: str) -> str:
    """One 'target: met/MISSED' line for the summary."""
    return f"target {name}: {'met' if ok else 'MISSED'} ({detail})"


def clustered_vectors(n: int, dim: int, *, n_queries: int = 0, seed: int = 0, clusters: int = 1000,
                      spread: tuple[float, float] = (0.8, 1.6), decay: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Unit float32 vectors from a Gaussian mixture shaped like text/image embeddings, and held-out queries.

    Uniform noise makes every neighbour almost equally far and flatters no index;
    real embeddings are clustered, share a common direction and spread unevenly
    over their axes, which is what approximate indexes exploit (and where their
    recall drops). Here cluster centres mix a shared mean, one of ``clusters // 20``
    topics and their own direction; cluster sizes are log-normal; each cluster's
    noise has its own radius (``spread``), a power-law spectrum (axis i scaled by
    ``(1 + i) ** -decay``) and one shared random rotation. With the defaults and
    50k vectors of dim 384 a query's best neighbour has cosine 0.63, its tenth 0.55,
    and random pairs 0.04.

    Args:
        n: Stored vectors.
        dim: Vector length.
        n_queries: Queries, drawn after (and independently of) the stored vectors.
        seed: Everything is a function of it.
        clusters: Mixture components.
        spread: Range of the per-cluster noise radius, relative to the unit centre.
        decay: Exponent of the noise spectrum (0: isotropic).

    Returns:
        ``(data, queries)``: float32 arrays of shape (n, dim) and (n_queries, dim), rows of norm 1.
    """
    rng = np.random.default_rng(seed)

    def gauss(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    mean, topics = unit(gauss(dim)), unit(gauss(max(1, clusters // 20), dim))
    topic = topics[rng.integers(0, len(topics), clusters)]
    centres = unit(0.3 * mean + 0.6 * topic + 0.74 * unit(gauss(clusters, dim)))
    weights = rng.lognormal(0.0, 1.0, clusters)
    weights /= weights.sum()
    radius = rng.uniform(*spread, clusters).astype(np.float32)
    scale = (1 + np.arange(dim, dtype=np.float32)) ** -decay
    scale /= np.linalg.norm(scale)
    rotation = np.linalg.qr(gauss(dim, dim))[0].astype(np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for start in range(0, m, 65536):  # bounded temporaries at any n
            stop = min(m, start + 65536)
            label = rng.choice(clusters, stop - start, p=weights)
            noise = (gauss(stop - start, dim) * scale) @ rotation
            out[start:stop] = unit(centres[label] + radius[label, None] * noise)
        return out

    return draw(n), draw(n_queries)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (Q, k) that appears in the same row of ``found`` (Q, >= k)."""
    k = truth.shape[1]
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=1).sum(axis=1)
    return float(np.mean(hits / k))
