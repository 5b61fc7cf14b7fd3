"""``edgemm bench``: latency, throughput and memory of bundles on this device, beside the PyTorch reference.

    edgemm bench bundles/myclip bundles/myclip-int8 --batch 1,8,32 --report bench/ \\
        [--providers cpu] [--providers tensorrt,cuda] [--threads 2] [--warmup 3] [--min-time 2.0] \\
        [--min-iters 10] [--no-reference] [--tasks image,text] [--backend onnxruntime] [-q] \\
        [--scenarios singlestream,multistream,offline] [--offline-samples 256] [--offline-batch 32]

For each bundle × backend × provider group (a bundle carries its precision),
one fresh worker process (``edgemm._bench_worker``) measures every task and
batch size, so its peak memory is that bundle's alone. Per task and batch:

* ``image``: ``model.classify(frames, labels, top_k=5)`` on 1920x1080 BGR
  uint8 frames made from the real sample photos (cycled to the batch size),
  10 everyday labels whose weights are cached before timing. Stages:
  preprocess = crop, resize and normalise the frames; inference = the image
  graph (``backend.infer``); postprocess = the rest of the call: label scoring
  against the cached weights (cosine, sigmoid or class-space), softmax, top-5.
* ``text``: ``model.embed_texts(sentences)`` on ``SAMPLE_SENTENCES`` (cycled).
  Stages: preprocess = tokenize; inference = the text graph; postprocess = the
  rest (input checks, length sort, feed selection, gathering the rows). The
  graph already normalises, so this is small by design.

Every stage is timed inside the one timed call, so the three add up to it.
Latency is per call (one whole batch): warm-up calls, then calls until
``--min-time`` seconds have passed and ``--min-iters`` ran. Throughput is
items / mean seconds per call. Threads (ONNX Runtime intra-op, torch, and the
OpenMP/BLAS/tokenizer pools through the environment) and providers are set
explicitly and recorded.

The PyTorch eager reference (:mod:`edgemm.export.reference`, the bundle's
source model, fp32) is timed in the same worker after the edgemm measurements,
inference only, on the very arrays the graph gets, in alternating blocks with
the bundle's graph (each block after a short pause, so neither runtime's
still-spinning worker threads slow the other); ``speedup`` = reference p50 /
edgemm graph p50 from those same blocks. It is absent, with the reason recorded, when the source model is
not on this machine or ``--no-reference`` was given.

Memory: ``peak_rss_mib`` is the worker's resident high-water mark (VmHWM)
after the edgemm measurements and before torch is imported: Python, numpy,
edgemm, the input frames and the bundle's sessions. ``baseline_rss_mib`` is
the same mark before the bundle was loaded (imports and input frames), so the
bundle's own share is the difference. GPU memory is not measured.

Report JSON (``report.json``; schema ``edgemm.bench/1``; new keys may be
added, existing ones keep their meaning)::

    schema      "edgemm.bench/1"
    created     ISO 8601 UTC time
    device      cpu_model, machine, logical_cores, usable_cores, threads, os, python,
                gpus [{name, driver, memory_mib}] (nvidia-smi; [] when none), jetson (L4T line or null),
                onnxruntime_providers [available in this onnxruntime build],
                libraries {edgemm, onnxruntime, numpy, torch, opencv, tokenizers, transformers: version or null},
                loadavg_1m_start, loadavg_1m_end
    settings    bundles, batches, tasks, backends, provider_groups [[short names]], threads,
                thread_env {OMP_NUM_THREADS, ...}, warmup, min_time_s, min_iterations, reference (bool),
                image_input {frame_size, frames, labels, top_k}, text_input {sentences}
    results     one per bundle × backend × provider group × task × batch:
                bundle (path), name, precision, backend, providers [requested], active_providers
                [onnxruntime's, in priority order], threads, task ("image" | "text"), batch,
                input_shape [graph input shape], iterations,
                latency_ms {p50, p90, p99, mean, min, max} (per call, end to end),
                stages_ms {preprocess, inference, postprocess} (p50 of each),
                throughput_per_s, background_cpu_cores (CPU cores other processes kept busy meanwhile;
                null off Linux), peak_rss_mib, baseline_rss_mib,
                engine_precision (TensorRT's, when it ran; null: the bundle's),
                reference {kind: "pytorch-eager", description, device, precision (fp16 against fp16 engines and
                           bundles on a GPU, else fp32), threads, iterations,
                           inference_ms_p50, edgemm_inference_ms_p50, speedup, embedding_cosine_min,
                           background_cpu_cores,
                           peak_rss_mib_combined (the worker after the reference ran: edgemm + torch)}
                          or null, with reference_unavailable: the reason (null when measured),
                notes [strings, e.g. that fp16 on the CPU provider is expected to be slower than fp32]
    scenarios   (with --scenarios) one per bundle × backend × provider group × scenario, MLPerf's edge
                scenarios of classify on the same frames: bundle, name, precision, backend, providers,
                scenario ("singlestream": 1 frame a query, the next when it returns; "multistream": 8 frames
                a query; "offline": one query of --offline-samples frames in batches of --offline-batch,
                repeated for --min-time), samples_per_query, queries, metric {name: "p90_latency_ms" |
                "p99_latency_ms" | "samples_per_s", value}, latency_ms {min, max, mean, p50, p90, p95, p99}
                (per query), throughput_samples_per_s, duration_s (summed query time), stages_ms
                {preprocess, inference, postprocess} (p50 per query), offline_batch, mlperf_minimum_met
                (MLPerf's 1024 queries and 600 s), background_cpu_cores
    notes       report-wide notes (rows measured while other processes used the CPU; the plot was
                skipped and why)

``report.md`` holds the device lines, one table and the notes;
``latency.png`` plots p50 latency against batch size (log x), one line per
bundle/precision/provider group, one panel per task.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgemm._bench_worker import GPU_PROVIDERS, MLPERF_MIN_QUERIES, MLPERF_MIN_S, SCENARIOS, TASKS, TOP_K
from edgemm.runtime import errors
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BackendError, BundleError, InputError, MissingDependencyError, require

SCHEMA = "edgemm.bench/1"
FRAME_SIZE = (1920, 1080)  # (width, height) of a 1080p camera frame
MAX_DISTINCT_FRAMES = 15  # the sample photos; larger batches cycle them
# The labels the image task classifies among: everyday subjects, a few matching the sample photos.
LABELS = ("cat", "dog", "person", "car", "forklift", "cup of coffee", "rocket", "flower", "building", "clock")
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")
REPORT_FILES = {"json": "report.json", "markdown": "report.md", "plot": "latency.png"}
FP16_ON_CPU_NOTE = ("fp16 bundle on the CPU provider: fp16 bundles are meant for GPUs (cuda, tensorrt); ONNX "
                    "Runtime's CPU kernels mostly compute fp16 by casting to fp32 and back, so expect it to be "
                    "slower than the fp32 bundle here")
BUSY_CORES = 0.25  # other processes' average CPU use (cores) during a measurement that gets it a note
BUSY_NOTE_START = "other processes kept"
GPU_MEMORY_NOTE = "peak MiB is host memory; GPU memory is not measured"


@dataclass(frozen=True)
class BenchSettings:
    """What one ``edgemm bench`` run measures."""

    bundles: tuple[str, ...]  # bundle directories, in report order
    batches: tuple[int, ...] = (1, 8, 32)  # batch sizes, ascending
    tasks: tuple[str, ...] = TASKS  # "image" (classify frames) and/or "text" (embed sentences)
    provider_groups: tuple[tuple[str, ...], ...] = (("cpu",),)  # each group is one provider priority list
    backends: tuple[str, ...] = ("onnxruntime",)  # names from edgemm.runtime.backends.BACKENDS
    threads: int | None = None  # intra-op threads everywhere; None: every usable core (resolved, then recorded)
    warmup: int = 3  # untimed calls before each measurement
    min_time: float = 2.0  # seconds each measurement runs at least
    min_iters: int = 10  # timed calls each measurement makes at least
    reference: bool = True  # also time the PyTorch eager source model where it is available
    labels: tuple[str, ...] = field(default=LABELS)  # the image task's label set
    engine_precision: str | None = None  # TensorRT engines (native or ONNX Runtime's provider); None: the bundle's
    scenarios: tuple[str, ...] = ()  # MLPerf edge scenarios of classify: singlestream, multistream, offline
    offline_samples: int = 256  # frames in the Offline scenario's one query
    offline_batch: int | None = None  # the Offline scenario's batch size; None: the largest of ``batches``


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), or the logical core count off Linux."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- parsing the command line's specs ----------------------------------------------------------


def parse_batches(spec: str) -> tuple[int, ...]:
    """``"1,8,32"`` → ``(1, 8, 32)``: positive integers, duplicates dropped, ascending.

    Raises:
        InputError: An empty spec or an item that is not a positive integer.
    """
    items = [s.strip() for s in str(spec).split(",")]
    if not any(items):
        raise InputError("--batch is empty; give batch sizes separated by commas, e.g. --batch 1,8,32.")
    batches = set()
    for item in items:
        if not item.isdigit() or int(item) <= 0:
            raise InputError(f"--batch: {item!r} in {spec!r} is not a positive integer; give batch sizes "
                             "separated by commas, e.g. --batch 1,8,32.")
        batches.add(int(item))
    return tuple(sorted(batches))


def parse_tasks(spec: str) -> tuple[str, ...]:
    """``"image,text"`` → ``("image", "text")`` (in that canonical order).

    Raises:
        InputError: An empty spec or an unknown task.
    """
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    unknown = [t for t in items if t not in TASKS]
    if not items or unknown:
        raise InputError(f"--tasks: {', '.join(map(repr, unknown)) or 'nothing'} given; choose from "
                         f"{', '.join(TASKS)}, comma-separated, e.g. --tasks image,text.")
    return tuple(t for t in TASKS if t in items)


def parse_providers(groups: Sequence[str] | None) -> tuple[tuple[str, ...], ...]:
    """``["cpu", "tensorrt,cuda"]`` → ``(("cpu",), ("tensorrt", "cuda"))``; ``None`` → ``(("cpu",),)``.

    Each value is one provider group (a priority list ONNX Runtime gets as is).

    Raises:
        InputError: An empty group or a provider named twice in one group.
    """
    if not groups:
        return (("cpu",),)
    out: list[tuple[str, ...]] = []
    for value in groups:
        group = tuple(p.strip().lower() for p in str(value).split(",") if p.strip())
        if not group:
            raise InputError(f"--providers {value!r} is empty; give e.g. --providers cpu or --providers tensorrt,cuda.")
        if len(set(group)) != len(group):
            raise InputError(f"--providers {value!r} names a provider twice.")
        if group not in out:
            out.append(group)
    return tuple(out)


def check_settings(settings: BenchSettings) -> BenchSettings:
    """Check every setting before anything runs; returns them with ``threads`` resolved.

    Raises:
        InputError: A bad number, batch, task, backend or provider name.
        BundleError: A bundle path that is missing, incomplete or not a dual encoder.
        BackendError: A provider this onnxruntime build does not have.
        MissingDependencyError: onnxruntime is not installed.
    """
    from edgemm.runtime.backends import BACKENDS

    if not settings.bundles:
        raise InputError("no bundle given; pass one or more bundle directories, e.g. edgemm bench bundles/myclip.")
    if not settings.batches or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in settings.batches):
        raise InputError(f"batch sizes must be positive integers, got {settings.batches!r}.")
    if not settings.tasks or any(t not in TASKS for t in settings.tasks):
        raise InputError(f"tasks must be among {TASKS}, got {settings.tasks!r}.")
    threads = usable_cores() if settings.threads is None else settings.threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"--threads must be a positive integer, got {settings.threads!r}.")
    if isinstance(settings.warmup, bool) or not isinstance(settings.warmup, int) or settings.warmup < 0:
        raise InputError(f"--warmup must be an integer >= 0, got {settings.warmup!r}.")
    if isinstance(settings.min_iters, bool) or not isinstance(settings.min_iters, int) or settings.min_iters < 1:
        raise InputError(f"--min-iters must be a positive integer, got {settings.min_iters!r}.")
    if not isinstance(settings.min_time, (int, float)) or not math.isfinite(settings.min_time) or settings.min_time < 0:
        raise InputError(f"--min-time must be a number of seconds >= 0, got {settings.min_time!r}.")
    if not settings.labels:
        raise InputError("the image task needs at least one label.")
    unknown = [name for name in settings.scenarios if name not in SCENARIOS]
    if unknown:
        raise InputError(f"--scenarios: unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}.")
    if settings.scenarios and "image" not in settings.tasks:
        raise InputError("--scenarios measure classify(frames): include the image task (--tasks image).")
    for name, value in (("--offline-samples", settings.offline_samples), ("--offline-batch", settings.offline_batch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}.")
    for backend in settings.backends:
        if backend not in BACKENDS:
            raise InputError(f"--backend: unknown backend {backend!r}; choose from {', '.join(sorted(BACKENDS))}.")
    if "onnxruntime" in settings.backends:
        _check_ort_providers(settings.provider_groups)
    for path in settings.bundles:
        _open_bundle(path, settings.tasks)
    return BenchSettings(**{**vars(settings), "threads": threads})


def _check_ort_providers(groups: Sequence[Sequence[str]]) -> None:
    from edgemm.runtime.backends.onnxruntime import PROVIDERS

    ort = require("onnxruntime", "onnx", "Benchmarking with ONNX Runtime")
    available = set(ort.get_available_providers())
    if not groups:
        raise InputError("no provider group given; pass e.g. --providers cpu.")
    for group in groups:
        for short in group:
            if short not in PROVIDERS:
                raise InputError(f"--providers: unknown provider {short!r}; choose from "
                                 f"{', '.join(sorted(PROVIDERS))} (a group is comma-separated, e.g. tensorrt,cuda).")
            full, extra = PROVIDERS[short]
            if full not in available:
                raise BackendError(
                    f"provider {short!r} ({full}) is not available in this onnxruntime build (available: "
                    f"{sorted(available)}); nothing was run. Install it with: pip install 'edgemm[{extra}]' "
                    "(in place of the CPU-only onnxruntime) on a machine with the matching GPU drivers, "
                    "or leave that --providers group out."
                )


def _open_bundle(path: str, tasks: Sequence[str]) -> Bundle:
    """Open a bundle without hashing its files (the worker's load() checks them)."""
    p = Path(path)
    if not p.exists():
        raise BundleError(f"bundle path '{p}' does not exist; pass a bundle directory made by 'edgemm export' "
                          "(e.g. 'edgemm export clip --from FOLDER -o bundles/myclip').")
    bundle = Bundle(p, check_hashes=False)
    m = bundle.manifest
    if m.family != "dual_encoder":
        raise BundleError(f"bundle '{p}' is a {m.family!r} bundle; 'edgemm bench' measures dual encoders.")
    needed = {"image": "image_encoder", "text": "text_encoder"}
    for task in tasks:
        bundle.graph_path(needed[task])  # raises BundleError naming the graphs it has
    return bundle


# -- device -------------------------------------------------------------------------------------


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):  # x86 / some ARM boards
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(*dists: str) -> str | None:
    """Installed version of the first distribution found, without importing it."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs as nvidia-smi lists them; [] without nvidia-smi (e.g. no GPU, or a Jetson)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return [{"name": "unknown (nvidia-smi failed)", "driver": None, "memory_mib": None}]
    gpus = []
    for line in out.strip().splitlines():
        parts = [s.strip() for s in line.split(",")]
        if len(parts) >= 3:
            memory = float(parts[2]) if parts[2].replace(".", "", 1).isdigit() else None
            gpus.append({"name": parts[0], "driver": parts[1], "memory_mib": memory})
    return gpus


def _jetson() -> str | None:
    try:
        return Path("/etc/nv_tegra_release").read_text(encoding="utf-8").splitlines()[0].strip("# ").strip()
    except (OSError, IndexError):
        return None


def device_info(threads: int | None) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, threads, GPUs and driver, OS, library versions.

    Imports onnxruntime (for its provider list) but not torch.
    """
    try:
        ort = require("onnxruntime", "onnx", "Listing ONNX Runtime providers")
        providers, ort_version = list(ort.get_available_providers()), ort.__version__
    except MissingDependencyError:
        providers, ort_version = [], None
    return {
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "threads": threads,
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "gpus": _gpus(),
        "jetson": _jetson(),
        "onnxruntime_providers": providers,
        "libraries": {
            "edgemm": _version("edgemm"),
            # The module that runs: with onnxruntime-gpu earlier on the path than a CPU onnxruntime, the
            # distributions' metadata would name the other one.
            "onnxruntime": ort_version,
            "numpy": np.__version__,
            "torch": _version("torch"),
            "opencv": _version("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
            "tokenizers": _version("tokenizers"),
            "transformers": _version("transformers"),
        },
        "loadavg_1m_start": _loadavg(),
    }


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# -- inputs --------------------------------------------------------------------------------------


def frame_from_photo(rgb: np.ndarray, size: tuple[int, int] = FRAME_SIZE) -> np.ndarray:
    """A photo as a camera frame: centre-cropped to the frame's aspect, resized, BGR uint8.

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


def _frames(count: int) -> np.ndarray:
    """``count`` (at most 15) 1080p BGR frames from the sample photos, as one (N, H, W, 3) array.

    Raises:
        MissingDependencyError: The sample photos' packages (the ``eval`` extra) are missing.
    """
    from edgemm.runtime.datasets import sample_photos

    photos = sample_photos()[: max(1, min(count, MAX_DISTINCT_FRAMES))]
    return np.stack([frame_from_photo(p.image) for p in photos])


# -- running -------------------------------------------------------------------------------------


def run_notes(precision: str, providers: Sequence[str]) -> list[str]:
    """Notes every result of a bundle of this precision on this provider group carries."""
    gpu = any(p in GPU_PROVIDERS for p in providers)
    notes = []
    if precision == "fp16" and not gpu:
        notes.append(FP16_ON_CPU_NOTE)
    if gpu:
        notes.append(GPU_MEMORY_NOTE)
    return notes


def _run_worker(job: dict[str, Any], tmp: Path, index: int, threads: int,
                progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Run one worker process and return its result, or raise the error it reported."""
    where = f"'{job['bundle']}' on {job['backend']} [{','.join(job['providers'])}]"
    job = {**job, "result": str(tmp / f"result-{index}.json"), "verbose": progress is not None}
    job_path = tmp / f"job-{index}.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ, **{var: str(threads) for var in THREAD_ENV})
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen([sys.executable, "-m", "edgemm._bench_worker", str(job_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout or ():
            line = line.rstrip("\n")
            tail.append(line)
            if progress is not None and line.startswith("bench: "):
                progress(line[len("bench: "):])
        code = proc.wait()
    result_path = Path(job["result"])
    if result_path.is_file():
        out = json.loads(result_path.read_text(encoding="utf-8"))
        if out.get("ok"):
            return out["result"]
        kind = getattr(errors, out["error"]["type"], None)
        if not (isinstance(kind, type) and issubclass(kind, errors.EdgemmError)):
            kind = BackendError
        message = f"benchmarking {where} failed: {out['error']['message']}"
        if code == 1:  # not an EdgemmError: show where it came from
            message += "\nworker output:\n" + "\n".join(tail)
        raise kind(message)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    if code == -9:
        how += " (out of memory? try smaller --batch sizes)"
    raise BackendError(f"the benchmark worker for {where} {how} without a result; its last output:\n"
                       + "\n".join(tail))


def background_cores(row: Mapping[str, Any]) -> float:
    """The most CPU cores other processes kept busy during a row's measurements (0 where unknown)."""
    values = (row.get("background_cpu_cores"), (row.get("reference") or {}).get("background_cpu_cores"))
    return max((v for v in values if v is not None), default=0.0)


def _row(settings: BenchSettings, bundle: str, backend: str, group: tuple[str, ...], out: Mapping[str, Any],
         point: Mapping[str, Any]) -> dict[str, Any]:
    task, batch = point["task"], point["batch"]
    notes = run_notes(out["precision"], group)
    reference, unavailable, match = None, "not measured (--no-reference)", None
    ref = out.get("reference")
    if ref is not None and not ref["available"]:
        unavailable = ref["reason"]
    elif ref is not None:
        match = next(p for p in ref["points"] if p["task"] == task and p["batch"] == batch)
        unavailable = match.get("unavailable")  # this tower has no reference (a distilled student)
    if match is not None and unavailable is None:
        reference = {"kind": ref["kind"], "description": ref["description"], "device": ref["device"],
                     "precision": ref.get("precision", "fp32"), "threads": ref["torch_threads"], "iterations": match["iterations"],
                     "inference_ms_p50": match["inference_ms_p50"],
                     "edgemm_inference_ms_p50": match["edgemm_inference_ms_p50"],
                     "speedup": match["speedup"], "embedding_cosine_min": match["embedding_cosine_min"],
                     "background_cpu_cores": match["background_cpu_cores"],
                     "peak_rss_mib_combined": ref["peak_rss_mib_with_reference"]}
        if out["precision"] != reference["precision"]:
            notes.append(f"the PyTorch reference is the {reference['precision']} source model; the "
                         f"{out['precision']} bundle's "
                         f"embeddings agree with it to a minimum cosine of {match['embedding_cosine_min']:.5f}")
        if match["embedding_cosine_min"] < 0.9:
            notes.append(f"the reference's embeddings differ from the bundle's (minimum cosine "
                         f"{match['embedding_cosine_min']:.3f}): it may not be this bundle's source model")
    busy = background_cores({"background_cpu_cores": point["background_cpu_cores"], "reference": reference})
    if busy >= BUSY_CORES:
        notes.append(f"{BUSY_NOTE_START} {busy:.2f} CPU cores busy during the {task} batch {batch} "
                     "measurement; its latency is inflated")
    if out.get("torch_imported_at_peak"):
        notes.append("torch was imported before the peak memory was read, so peak MiB includes it")
    return {
        "bundle": str(Path(bundle).absolute()), "name": out["name"], "precision": out["precision"],
        "engine_precision": settings.engine_precision if "tensorrt" in (backend, *group) else None,
        "backend": backend, "providers": list(group), "active_providers": out["active_providers"][task],
        "threads": settings.threads, "task": task, "batch": batch, "input_shape": point["input_shape"],
        "iterations": point["iterations"], "latency_ms": point["latency_ms"], "stages_ms": point["stages_ms"],
        "throughput_per_s": point["throughput_per_s"], "background_cpu_cores": point["background_cpu_cores"],
        "peak_rss_mib": out["peak_rss_mib"],
        "baseline_rss_mib": out["baseline_rss_mib"], "reference": reference,
        "reference_unavailable": unavailable, "notes": notes,
    }


def run_bench(settings: BenchSettings, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every bundle × backend × provider group × task × batch; return the report.

    Args:
        settings: What to measure.
        progress: Called with one line per finished measurement; ``None`` for silence.

    Returns:
        The report as a JSON-ready dict (schema in this module's docstring).

    Raises:
        InputError: A bad setting.
        BundleError: A missing or unusable bundle.
        BackendError: A provider that is not available, or a worker that failed.
        MissingDependencyError: onnxruntime, or the sample photos' packages, are missing.
    """
    settings = check_settings(settings)
    threads = int(settings.threads)  # resolved by check_settings
    device = device_info(threads)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows: list[dict[str, Any]] = []
    scenarios: list[dict[str, Any]] = []
    frame_count = 0
    with tempfile.TemporaryDirectory(prefix="edgemm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        frames_path = None
        if "image" in settings.tasks:
            # Made here, once, so no worker pays for the sample photos' loaders (scikit-image & co).
            frames = _frames(max(settings.batches))
            frame_count = len(frames)
            frames_path = tmp / "frames.npy"
            np.save(frames_path, frames)
            del frames
        from edgemm.runtime.datasets import SAMPLE_SENTENCES

        index = 0
        for bundle in settings.bundles:
            for backend in settings.backends:
                for group in settings.provider_groups:
                    job = {"bundle": str(Path(bundle).absolute()), "backend": backend, "providers": list(group),
                           "threads": threads, "tasks": list(settings.tasks), "batches": list(settings.batches),
                           "warmup": settings.warmup, "min_time": settings.min_time,
                           "min_iters": settings.min_iters, "reference": settings.reference,
                           "frames": str(frames_path) if frames_path else None, "labels": list(settings.labels),
                           "sentences": list(SAMPLE_SENTENCES), "engine_precision": settings.engine_precision,
                           "scenarios": list(settings.scenarios), "offline_samples": settings.offline_samples,
                           "offline_batch": settings.offline_batch or max(settings.batches)}
                    started = time.perf_counter()
                    out = _run_worker(job, tmp, index, threads, progress)
                    index += 1
                    if progress is not None:
                        progress(f"{bundle} [{','.join(group)}] done in {time.perf_counter() - started:.1f} s")
                    rows.extend(_row(settings, bundle, backend, group, out, p) for p in out["points"])
                    scenarios.extend({"bundle": str(Path(bundle).absolute()), "name": out["name"],
                                      "precision": out["precision"], "backend": backend, "providers": list(group),
                                      **row} for row in out.get("scenarios", []))
    device["loadavg_1m_end"] = _loadavg()
    notes = []
    busy = [r for r in rows if background_cores(r) >= BUSY_CORES]
    if busy:
        notes.append(f"{len(busy)} of {len(rows)} rows (marked * in report.md) were measured while other "
                     f"processes kept at least {BUSY_CORES} CPU cores busy (background_cpu_cores in report.json): "
                     "their latencies are inflated and noisy and their PyTorch ratios unreliable; rerun on an "
                     "idle machine")
    return {
        "schema": SCHEMA,
        "created": created,
        "device": device,
        "settings": {
            "bundles": [str(Path(b).absolute()) for b in settings.bundles],
            "batches": list(settings.batches), "tasks": list(settings.tasks), "backends": list(settings.backends),
            "provider_groups": [list(g) for g in settings.provider_groups], "threads": threads,
            "thread_env": {var: str(threads) for var in THREAD_ENV}, "warmup": settings.warmup,
            "min_time_s": settings.min_time, "min_iterations": settings.min_iters, "reference": settings.reference,
            "image_input": {"frame_size": list(FRAME_SIZE), "frames": frame_count, "color": "bgr",
                            "labels": list(settings.labels), "top_k": TOP_K},
            "text_input": {"sentences": len(SAMPLE_SENTENCES)},
        },
        "results": rows,
        "scenarios": scenarios,
        "notes": notes,
    }


# -- report ----------------------------------------------------------------------------------------


def _series_label(row: Mapping[str, Any], with_backend: bool) -> str:
    label = f"{Path(row['bundle']).name} {row['precision']} [{','.join(row['providers'])}]"
    return f"{label} {row['backend']}" if with_backend else label


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: device lines, one table, notes."""
    d, s = report["device"], report["settings"]
    gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in d["gpus"]) or "none"
    if d.get("jetson"):
        gpus += f"; Jetson {d['jetson']}"
    libs = ", ".join(f"{k} {v}" for k, v in d["libraries"].items() if v)
    lines = [
        "## edgemm bench",
        "",
        f"- device: {d['cpu_model']} ({d['machine']}), {d['logical_cores']} logical cores "
        f"({d['usable_cores']} usable), threads {s['threads']}; GPU: {gpus}; {d['os']}",
        f"- versions: python {d['python']}, {libs}; onnxruntime providers: {', '.join(d['onnxruntime_providers'])}",
        f"- timing per row: {s['warmup']} warm-up call(s), then calls for at least {s['min_time_s']:g} s and "
        f"{s['min_iterations']} calls; created {report['created']}; load average {d['loadavg_1m_start']} at start, "
        f"{d.get('loadavg_1m_end')} at end",
        "",
    ]
    with_backend = len(s["backends"]) > 1
    header = ["bundle", "precision", "providers", "task", "batch", "p50 ms", "p90 ms", "p99 ms", "pre ms",
              "inf ms", "post ms", "items/s", "vs PyTorch", "peak MiB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 5 + "---:|" * 9]
    for r in report["results"]:
        lat, st = r["latency_ms"], r["stages_ms"]
        vs = "n/a"
        if r["reference"]:
            vs = f"{r['reference']['speedup']:.2f}x"
            vs += " *" if (r["reference"]["background_cpu_cores"] or 0) >= BUSY_CORES else ""
        providers = ",".join(r["providers"]) + (f" ({r['backend']})" if with_backend else "")
        busy = " *" if (r["background_cpu_cores"] or 0) >= BUSY_CORES else ""
        cells = [Path(r["bundle"]).name, r["precision"], providers, r["task"], str(r["batch"]),
                 _ms(lat["p50"]) + busy, _ms(lat["p90"]), _ms(lat["p99"]), _ms(st["preprocess"]), _ms(st["inference"]),
                 _ms(st["postprocess"]), f"{r['throughput_per_s']:.1f}", vs, f"{r['peak_rss_mib']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    image = s["image_input"]
    lines += [
        "",
        f"- image: `classify()` of {image['frame_size'][0]}x{image['frame_size'][1]} BGR frames "
        f"({image['frames']} sample photos, cycled) among {len(image['labels'])} labels, top {image['top_k']}; "
        "pre = crop, resize, normalise; inf = image graph; post = label scoring (cached label weights), top-k.",
        f"- text: `embed_texts()` of the {s['text_input']['sentences']} sample sentences (cycled); pre = tokenize; "
        "inf = text graph; post = the rest of the call.",
        "- latency is per call (one batch), end to end; stage columns are p50s; items/s = batch / mean latency.",
        "- vs PyTorch = PyTorch eager inference p50 / edgemm graph p50, on the same arrays, timed in alternating "
        "blocks in the same process, each after a 0.1 s pause (graph only; >1 means edgemm is faster).",
        "- peak MiB = resident high-water mark of the edgemm worker process (one per bundle and provider group) "
        "before torch is imported; it includes Python, the imports and the input frames "
        + ", ".join(sorted({f"{r['baseline_rss_mib']:.0f} MiB before loading {Path(r['bundle']).name}"
                            for r in report["results"]})) + ".",
    ]
    lines += _scenario_lines(report.get("scenarios", []), with_backend)
    notes: dict[str, None] = {}
    for r in report["results"]:
        who = _series_label(r, with_backend)
        for note in r["notes"]:
            if not note.startswith(BUSY_NOTE_START):  # the table marks those rows; one report-wide note explains
                notes[f"{who}: {note}"] = None
        if r["reference_unavailable"] and r["reference_unavailable"] != "not measured (--no-reference)":
            notes[f"{who}: no PyTorch reference: {r['reference_unavailable']}"] = None
    for note in report.get("notes", []):
        notes[note] = None
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


SCENARIO_NAMES = {"singlestream": "SingleStream", "multistream": "MultiStream", "offline": "Offline"}


def _scenario_lines(scenarios: Sequence[Mapping[str, Any]], with_backend: bool) -> list[str]:
    """The MLPerf scenarios' section: one trtexec-style summary line each, then a table."""
    if not scenarios:
        return []
    lines = ["", "### Scenarios (MLPerf edge)", ""]
    for r in scenarios:
        lat, name = r["latency_ms"], SCENARIO_NAMES[r["scenario"]]
        who = _series_label(r, with_backend)
        if r["metric"]["name"] == "samples_per_s":
            head = f"{name}: {r['metric']['value']:.1f} samples/s ({r['queries']} queries of {r['samples_per_query']} " \
                   f"frames in batches of {r['offline_batch']}, {r['duration_s']:.1f} s)"
        else:
            pct = r["metric"]["name"].split("_")[0][1:]
            head = f"{name}: {pct}th percentile latency {_ms(r['metric']['value'])} ms ({r['queries']} queries of " \
                   f"{r['samples_per_query']} frame{'s' if r['samples_per_query'] > 1 else ''}, mean " \
                   f"{_ms(lat['mean'])} ms, min {_ms(lat['min'])}, max {_ms(lat['max'])})"
        lines.append(f"- {who}: {head}" + ("" if r["mlperf_minimum_met"] else " — shorter than MLPerf's minimum run"))
    lines += ["", "| bundle | providers | scenario | samples/query | queries | metric | p50 ms | p90 ms | p99 ms | "
                  "samples/s |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in scenarios:
        lat, metric = r["latency_ms"], r["metric"]
        lines.append(f"| {Path(r['bundle']).name} | {','.join(r['providers'])} | {SCENARIO_NAMES[r['scenario']]} | "
                     f"{r['samples_per_query']} | {r['queries']} | {metric['name']} = {metric['value']:.2f} | "
                     f"{_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | "
                     f"{r['throughput_samples_per_s']:.1f} |")
    lines += ["", f"- MLPerf's minimum run is {MLPERF_MIN_QUERIES} queries and {MLPERF_MIN_S:.0f} s; these runs "
                  "follow --min-time and --min-iters. Latency is per query, `classify()` end to end; Offline "
                  "throughput is every sample over the summed query time."]
    return lines


def write_plot(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Plot p50 latency against batch size (log x), one line per series, one panel per task.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    matplotlib = require("matplotlib", "eval", "The latency plot (latency.png)")
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in report["results"])] or list(TASKS[:1])
    with_backend = len(report["settings"]["backends"]) > 1
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    titles = {"image": "image: classify() of 1080p frames", "text": "text: embed_texts()"}
    for ax, task in zip(axes[0], tasks):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in report["results"]:
            if r["task"] == task:
                series.setdefault(_series_label(r, with_backend), []).append((r["batch"], r["latency_ms"]["p50"]))
        for label, points in series.items():
            points.sort()
            ax.plot([b for b, _ in points], [ms for _, ms in points], marker="o", label=label)
        batches = sorted({r["batch"] for r in report["results"] if r["task"] == task})
        ax.set_xscale("log", base=2)
        if batches:
            ax.set_xticks(batches)
            ax.set_xticklabels([str(b) for b in batches])
            ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel("p50 latency per call (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(titles[task])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    device = report["device"]
    fig.suptitle(f"edgemm bench: {device['cpu_model']}, {report['settings']['threads']} threads", fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path | None]:
    """Write ``latency.png``, ``report.json`` and ``report.md`` into ``out_dir`` (created if needed).

    Without matplotlib the plot is skipped and a note saying how to get it goes
    into the report instead.

    Returns:
        ``{"json": path, "markdown": path, "plot": path or None}``.

    Raises:
        InputError: ``out_dir`` exists and is not a directory, or cannot be created.
    """
    out = prepare_report_dir(out_dir)
    try:
        plot: Path | None = write_plot(report, out / REPORT_FILES["plot"])
    except MissingDependencyError as e:
        plot = None
        report.setdefault("notes", []).append(f"{REPORT_FILES['plot']} was not written: {e}")
    json_path = out / REPORT_FILES["json"]
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path = out / REPORT_FILES["markdown"]
    md_path.write_text(to_markdown(report), encoding="utf-8")
    return {"json": json_path, "markdown": md_path, "plot": plot}


def prepare_report_dir(out_dir: str | os.PathLike) -> Path:
    """Create the report directory (checked before a long run, so a bad path fails fast).

    Raises:
        InputError: The path exists and is not a directory, or cannot be created.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--report '{out}' is a file; give a directory for report.json, report.md and latency.png.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--report '{out}' cannot be created ({e}); give a writable directory.") from e
    return out


# -- command line ----------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on an ``add_subparsers()`` object; returns its parser."""
    p = subparsers.add_parser(
        "bench", help="latency, throughput and memory of bundles, with the PyTorch reference",
        description="Measure bundles on this device: per bundle, backend, provider group, task and batch size, "
                    "latency p50/p90/p99 split into preprocess / inference / postprocess, throughput, peak memory "
                    "and the PyTorch eager reference where the source model is available. Writes report.json, "
                    "report.md and latency.png.")
    p.add_argument("bundles", nargs="+", help="bundle directories")
    p.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated (default: 1,8,32)")
    p.add_argument("--report", default="bench", help="directory for report.json, report.md, latency.png "
                                                     "(default: bench)")
    p.add_argument("--providers", action="append", metavar="GROUP",
                   help="one ONNX Runtime provider group, comma-separated in priority order (cpu, cuda, "
                        "tensorrt,cuda); repeat for several groups (default: cpu)")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="backend; repeat for several (default: onnxruntime)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for ONNX Runtime, torch and native pools (default: every usable core)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each measurement (default: 3)")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement, at least (default: 2.0)")
    p.add_argument("--min-iters", type=int, default=10, help="timed calls per measurement, at least (default: 10)")
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch eager reference")
    p.add_argument("--engine-precision", default=None, choices=("fp32", "fp16", "int8"),
                   help="TensorRT engines' precision, native or ONNX Runtime's provider (default: the bundle's); "
                        "fp16 also makes the PyTorch reference fp16")
    p.add_argument("--tasks", default="image,text", help="image, text or both, comma-separated (default: both)")
    p.add_argument("--scenarios", default=None,
                   help="MLPerf edge scenarios of classify, comma-separated: singlestream (1 frame a query, p90), "
                        "multistream (8 frames a query, p99), offline (samples/s)")
    p.add_argument("--offline-samples", type=int, default=256, help="frames in the Offline query (default: 256)")
    p.add_argument("--offline-batch", type=int, default=None,
                   help="the Offline scenario's batch size (default: the largest --batch)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench)
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The command line's options as settings (specs parsed; checked later by run_bench).

    Raises:
        InputError: A malformed --batch, --tasks or --providers.
    """
    return BenchSettings(
        bundles=tuple(args.bundles),
        batches=parse_batches(args.batch),
        tasks=parse_tasks(args.tasks),
        provider_groups=parse_providers(args.providers),
        backends=tuple(dict.fromkeys(args.backend or ["onnxruntime"])),
        threads=args.threads,
        warmup=args.warmup,
        min_time=args.min_time,
        min_iters=args.min_iters,
        reference=not args.no_reference,
        engine_precision=args.engine_precision,
        scenarios=tuple(dict.fromkeys(n.strip().lower() for n in args.scenarios.split(",") if n.strip()))
        if args.scenarios else (),
        offline_samples=args.offline_samples,
        offline_batch=args.offline_batch,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    """``edgemm bench``: run, write the report files, print the Markdown."""
    settings = check_settings(settings_from_args(args))  # every argument checked before the directory is made
    prepare_report_dir(args.report)
    quiet = getattr(args, "quiet", False)
    progress = None if quiet else (lambda message: print(f"bench: {message}", file=sys.stderr, flush=True))
    report = run_bench(settings, progress=progress)
    paths = write_report(report, args.report)
    print(to_markdown(report))
    for path in paths.values():
        if path is not None:
            print(f"wrote {path}")
    return 0
