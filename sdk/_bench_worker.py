"""The measured process of ``edgemm bench``: one bundle on one backend and provider group.

``edgemm bench`` starts ``python -m edgemm._bench_worker JOB.json`` once per
(bundle, backend, provider group), so every process's peak memory belongs to
that bundle alone and no allocator state carries over. The job file says what
to run (see :func:`run_job`); the worker writes its result, or the error it
hit, as JSON to the path the job names, and progress lines to stdout.

What one worker does, in order:

1. imports edgemm and loads the job's inputs (1080p frames, sentences), then
   reads the memory high-water mark: ``baseline_rss_mib``;
2. loads the bundle, caches the label weights, and for each task and batch
   size times the SDK call a camera app makes: warm-up calls, then calls until
   ``min_time`` has passed and at least ``min_iters`` ran. The stages are timed
   inside that same call (see ``_StageTimer``), so they add up to it;
3. reads the high-water mark again: ``peak_rss_mib``, the edgemm process's peak
   (torch is not imported before this point, and the report says so);
4. only then, if asked, builds the PyTorch reference (which imports torch) and,
   per task and batch, times its towers and the bundle's graph on the same
   input arrays in alternating blocks, so background load falls on both
   (see ``interleaved``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

TASKS = ("image", "text")
TOP_K = 5  # predictions per frame in the timed classify() call
GPU_PROVIDERS = ("cuda", "tensorrt")
# MLPerf Inference's edge scenarios: samples per query and the latency percentile that is their metric.
SCENARIOS = {"singlestream": (1, 90), "multistream": (8, 99), "offline": (None, None)}
MLPERF_MIN_QUERIES, MLPERF_MIN_S = 1024, 600.0  # MLPerf's minimum run for SingleStream / MultiStream
# Calls per side per round in the interleaved reference timing: as many as fill _BLOCK_S, within bounds.
_BLOCK_S = 0.2
_MIN_BLOCK = 3
_MAX_BLOCK = 1000
# Pause before each block of the interleaved timing. ONNX Runtime's intra-op threads keep
# spinning for a while after a run, and OpenMP's (torch's) after theirs: on 2 cores the
# other side's next calls measured 2-4x slower (MiniLM, batch 1) unless about 50 ms passed.
_SETTLE_S = 0.1


def peak_rss_mib() -> float:
    """This process's resident high-water mark in MiB.

    ``VmHWM`` from /proc/self/status belongs to this address space, which exec
    starts afresh. ``ru_maxrss`` does not (Linux carries the parent's RSS at
    fork into it), so it is only the fallback where there is no /proc.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class BackgroundLoad:
    """How many CPU cores other processes kept busy while a measurement ran.

    All CPUs' busy time (/proc/stat) minus this process's own CPU time, over
    the wall time between ``start()`` and ``cores()``. On a shared machine
    other work inflates latencies (and hurts OpenMP's torch more than ONNX
    Runtime), so a report needs to say when it happened. ``None`` off Linux.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def start(self) -> None:
        self._start = self._sample()

    def cores(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return round(max(0.0, other / (end[0] - self._start[0])), 3)


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 (linear interpolation), mean, min and max of a list of milliseconds."""
    a = np.asarray(samples_ms, np.float64)
    p50, p90, p99 = np.percentile(a, (50, 90, 99))
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max())}


class _StageTimer:
    """Wraps a callable the model calls inside an SDK call and adds up its wall time.

    Set as an instance attribute on our own model object (``model.preprocess``,
    ``model.tokenizer``, ``backend.infer``), it splits the real ``classify()`` /
    ``embed_texts()`` call into stages without running any stage a second time.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.ms = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.ms = 0.0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.ms += (time.perf_counter() - start) * 1e3
            self.calls += 1


def _repeat(call: Callable[[], dict[str, float]], *, warmup: int, min_time: float,
            min_iters: int) -> list[dict[str, float]]:
    """Warm-up calls, then calls until ``min_time`` seconds have passed and ``min_iters`` ran."""
    for _ in range(warmup):
        call()
    samples: list[dict[str, float]] = []
    start = time.perf_counter()
    while len(samples) < min_iters or time.perf_counter() - start < min_time:
        samples.append(call())
    return samples


def interleaved(sides: Mapping[str, Callable[[], Any]], *, warmup: int, min_time: float,
                 min_iters: int) -> dict[str, list[float]]:
    """Milliseconds per call of each side, run in alternating blocks.

    Each round runs one block per side, the side order reversed every other
    round so neither always follows the other, until every side has
    ``min_iters`` calls and ``min_time`` seconds have passed. A block is as
    many calls as fill about ``_BLOCK_S`` (a quarter of ``min_time`` if less;
    at least ``_MIN_BLOCK`` calls) and starts after a ``_SETTLE_S`` pause, so
    the other runtime's worker threads have stopped spinning. Alternating
    spreads background load over both sides alike.
    """
    block: dict[str, int] = {}
    for name, fn in sides.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        target = min(_BLOCK_S, min_time / 4)  # several rounds even in a short measurement
        block[name] = max(_MIN_BLOCK, min(_MAX_BLOCK, int(target / max(once, 1e-6))))
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while min(len(t) for t in times.values()) < min_iters or time.perf_counter() - start < min_time:
        for name in names if r % 2 == 0 else names[::-1]:
            time.sleep(_SETTLE_S)
            for _ in range(block[name]):
                t0 = time.perf_counter()
                sides[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
    return times


def _cast(feeds: Mapping[str, np.ndarray], backend: Any) -> dict[str, np.ndarray]:
    """Feeds as the graph's declared input dtypes (e.g. a float16 graph input), the graph's inputs only."""
    return {t.name: np.asarray(feeds[t.name], dtype=t.dtype) for t in backend.inputs}


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
    return float(np.sum(a * b, axis=1).min())


def _say(job: Mapping[str, Any], message: str) -> None:
    if job.get("verbose", True):
        print(f"bench: {message}", flush=True)


def run_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Run one job in this process and return its result (see the module docstring).

    Args:
        job: ``bundle`` (directory), ``backend``, ``providers`` (short names),
            ``threads``, ``tasks``, ``batches``, ``warmup``, ``min_time`` (s),
            ``min_iters``, ``reference`` (bool), ``frames`` (.npy of uint8
            (N, 1080, 1920, 3) BGR frames, needed for the image task),
            ``labels``, ``sentences``, ``verbose``.

    Returns:
        ``name``, ``precision``, ``source``, ``active_providers`` per graph,
        ``baseline_rss_mib``, ``peak_rss_mib``, ``torch_imported_at_peak``,
        ``points`` (one per task and batch) and ``reference``.

    Raises:
        EdgemmError: The bundle cannot be loaded or run.
    """
    from edgemm._model import load

    tasks, batches = list(job["tasks"]), [int(b) for b in job["batches"]]
    threads = int(job["threads"])
    frames = np.load(job["frames"]) if "image" in tasks else None
    sentences = list(job["sentences"])
    labels = list(job["labels"])
    baseline = peak_rss_mib()

    started = time.perf_counter()
    engines = None
    if job["backend"] == "tensorrt" or "tensorrt" in job["providers"]:
        from edgemm.runtime.engines import EngineOptions

        engines = EngineOptions(precision=job.get("engine_precision"), quiet=True)
    model = load(job["bundle"], backend=job["backend"], providers=tuple(job["providers"]), threads=threads,
                 engines=engines)
    load_s = time.perf_counter() - started
    model.label_weights(labels)  # cached before timing, as a camera app's first call does
    preprocess = model.preprocess = _StageTimer(model.preprocess)
    tokenize = model.tokenizer = _StageTimer(model.tokenizer)
    image_infer = model.image_backend.infer = _StageTimer(model.image_backend.infer)
    text_infer = model.text_backend.infer = _StageTimer(model.text_backend.infer)

    def image_inputs(batch: int) -> list[np.ndarray]:
        return [frames[i % len(frames)] for i in range(batch)]

    def text_inputs(batch: int) -> list[str]:
        return [sentences[i % len(sentences)] for i in range(batch)]

    def timed(run: Callable[[], Any], pre: _StageTimer, infer: _StageTimer) -> dict[str, float]:
        pre.reset()
        infer.reset()
        t0 = time.perf_counter()
        run()
        total = (time.perf_counter() - t0) * 1e3
        if pre.calls != 1 or infer.calls != 1:  # the SDK call changed shape; the split would be wrong
            raise RuntimeError(f"expected one preprocess and one graph call per timed call, got {pre.calls} and "
                               f"{infer.calls}; edgemm._bench_worker needs updating to match edgemm._model.")
        # The stage timers run inside the call, so the rest is never negative.
        return {"total": total, "preprocess": pre.ms, "inference": infer.ms,
                "postprocess": total - pre.ms - infer.ms}

    points: list[dict[str, Any]] = []
    background = BackgroundLoad()
    for task in tasks:
        for batch in batches:
            if task == "image":
                sdk_call = partial(model.classify, image_inputs(batch), labels, top_k=TOP_K, batch_size=batch)
                call = partial(timed, sdk_call, preprocess, image_infer)
                shape = [batch, 3, preprocess.fn.size, preprocess.fn.size]
            else:
                texts = text_inputs(batch)
                call = partial(timed, partial(model.embed_texts, texts, batch_size=batch), tokenize, text_infer)
                shape = list(tokenize.fn(texts)["input_ids"].shape)
            background.start()
            samples = _repeat(call, warmup=int(job["warmup"]), min_time=float(job["min_time"]),
                              min_iters=int(job["min_iters"]))
            other_cores = background.cores()
            total = [s["total"] for s in samples]
            latency = summarize(total)
            points.append({
                "task": task, "batch": batch, "input_shape": shape, "iterations": len(samples),
                "latency_ms": latency,
                "stages_ms": {k: summarize([s[k] for s in samples])["p50"]
                              for k in ("preprocess", "inference", "postprocess")},
                # Sustained rate over every timed call: items / mean seconds per call.
                "throughput_per_s": batch * 1e3 / latency["mean"],
                "background_cpu_cores": other_cores,
                **({"preprocess_on": getattr(preprocess.fn, "provider", "cpu")} if task == "image" else {}),
            })
            _say(job, f"{model.manifest.name} [{','.join(job['providers'])}] {task} batch {batch}: "
                      f"p50 {latency['p50']:.2f} ms over {len(samples)} calls")
    scenarios = [_scenario(job, name, model, image_inputs, timed, preprocess, image_infer)
                 for name in job.get("scenarios", ())]
    peak = peak_rss_mib()
    torch_at_peak = "torch" in sys.modules

    result: dict[str, Any] = {
        "name": model.manifest.name,
        "precision": model.manifest.precision,
        "source": model.manifest.source,
        "load_s": load_s,
        "active_providers": {"image": list(getattr(model.image_backend, "providers", [])),
                             "text": list(getattr(model.text_backend, "providers", []))},
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak,
        "torch_imported_at_peak": torch_at_peak,
        "points": points,
        "scenarios": scenarios,
        "reference": None,
    }
    if job.get("reference"):
        result["reference"] = _run_reference(job, model, points, image_inputs, text_inputs)
    return result


def _scenario(job: Mapping[str, Any], name: str, model: Any, image_inputs: Callable[[int], list[np.ndarray]],
              timed: Callable[..., dict[str, float]], preprocess: _StageTimer,
              image_infer: _StageTimer) -> dict[str, Any]:
    """One MLPerf edge scenario of ``classify``: SingleStream (1 frame a query, next query when it returns;
    p90), MultiStream (8 frames a query; p99) or Offline (one query of ``offline_samples`` frames in batches of
    ``offline_batch``, repeated for ``min_time``; samples per second)."""
    labels, warmup = list(job["labels"]), int(job["warmup"])
    min_time, min_iters = float(job["min_time"]), int(job["min_iters"])
    per_query, percentile = SCENARIOS[name]
    background = BackgroundLoad()
    background.start()
    if per_query is not None:
        frames = image_inputs(per_query)
        query = partial(model.classify, frames if per_query > 1 else frames[0], labels, top_k=TOP_K,
                        batch_size=per_query)
        samples = _repeat(partial(timed, query, preprocess, image_infer), warmup=warmup, min_time=min_time,
                          min_iters=min_iters)
    else:
        count, batch = int(job["offline_samples"]), int(job["offline_batch"])
        frames = image_inputs(count)

        def offline() -> dict[str, float]:
            preprocess.reset()
            image_infer.reset()
            t0 = time.perf_counter()
            model.classify(frames, labels, top_k=TOP_K, batch_size=batch)
            total = (time.perf_counter() - t0) * 1e3
            return {"total": total, "preprocess": preprocess.ms, "inference": image_infer.ms,
                    "postprocess": total - preprocess.ms - image_infer.ms}

        samples = _repeat(offline, warmup=min(warmup, 1), min_time=min_time, min_iters=1)
        per_query = count
    totals = [q["total"] for q in samples]
    a = np.asarray(totals, np.float64)
    latency = {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()),
               **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)}}
    duration_s = float(a.sum()) / 1e3
    throughput = len(samples) * per_query / duration_s
    if percentile is not None:
        metric = {"name": f"p{percentile}_latency_ms", "value": latency[f"p{percentile}"]}
        met = len(samples) >= MLPERF_MIN_QUERIES and duration_s >= MLPERF_MIN_S
    else:
        metric = {"name": "samples_per_s", "value": throughput}
        met = duration_s >= MLPERF_MIN_S
    _say(job, f"{model.manifest.name} [{','.join(job['providers'])}] {name}: {metric['name']} "
              f"{metric['value']:.2f} over {len(samples)} queries")
    return {"scenario": name, "samples_per_query": per_query, "queries": len(samples), "metric": metric,
            "latency_ms": latency, "throughput_samples_per_s": throughput, "duration_s": duration_s,
            "stages_ms": {k: summarize([q[k] for q in samples])["p50"]
                          for k in ("preprocess", "inference", "postprocess")},
            "offline_batch": int(job["offline_batch"]) if name == "offline" else None,
            "mlperf_minimum_met": met, "background_cpu_cores": background.cores()}


def _run_reference(job: Mapping[str, Any], model: Any, points: list[dict[str, Any]],
                   image_inputs: Callable[[int], list[np.ndarray]],
                   text_inputs: Callable[[int], list[str]]) -> dict[str, Any]:
    """Time the PyTorch reference against the bundle's graphs, inference only, on the same arrays."""
    gpu = job["backend"] == "tensorrt" or any(p in GPU_PROVIDERS for p in job["providers"])
    half = gpu and "fp16" in (model.manifest.precision, job.get("engine_precision"))
    try:
        from edgemm.export.reference import torch_reference
    except ImportError as e:
        return {"available": False, "reason": f"the PyTorch reference needs edgemm's export extra ({e}); "
                                              "install it with: pip install 'edgemm[export]'"}
    started = time.perf_counter()
    reference, reason = torch_reference(model.manifest, threads=int(job["threads"]), device="cuda" if gpu else "cpu",
                                        half=half)
    if reference is None:
        _say(job, f"{model.manifest.name}: no PyTorch reference: {reason}")
        return {"available": False, "reason": reason}
    load_s = time.perf_counter() - started
    # Undo the stage timers: here the graph is called directly.
    image_infer, text_infer = model.image_backend.infer.fn, model.text_backend.infer.fn
    per_point: list[dict[str, Any]] = []
    for point in points:
        batch = point["batch"]
        if point["task"] in reference.unavailable:
            per_point.append({"task": point["task"], "batch": batch, "unavailable": reference.unavailable[point["task"]]})
            continue
        if point["task"] == "image":
            pixels = model.preprocess.fn(image_inputs(batch), color="bgr")
            ours = partial(image_infer, _cast({"pixels": pixels}, model.image_backend))
            theirs = partial(reference.embed_images, pixels)
        else:
            tokens = model.tokenizer.fn(text_inputs(batch))
            ours = partial(text_infer, _cast(tokens, model.text_backend))
            theirs = partial(reference.embed_texts, tokens)
        cosine = _cosine_min(ours()["embedding"], theirs())
        background = BackgroundLoad()
        background.start()
        times = interleaved({"edgemm": ours, "reference": theirs}, warmup=int(job["warmup"]),
                             min_time=float(job["min_time"]), min_iters=int(job["min_iters"]))
        ref_p50 = summarize(times["reference"])["p50"]
        ours_p50 = summarize(times["edgemm"])["p50"]
        per_point.append({"task": point["task"], "batch": batch, "iterations": len(times["reference"]),
                          "inference_ms_p50": ref_p50, "edgemm_inference_ms_p50": ours_p50,
                          "speedup": ref_p50 / ours_p50, "embedding_cosine_min": cosine,
                          "background_cpu_cores": background.cores()})
        _say(job, f"{model.manifest.name} {point['task']} batch {batch}: PyTorch {ref_p50:.2f} ms vs "
                  f"{ours_p50:.2f} ms ({ref_p50 / ours_p50:.2f}x)")
    return {"available": True, "reason": None, "kind": reference.kind, "description": reference.description,
            "device": reference.device, "precision": "fp16" if half else "fp32", "load_s": load_s, "torch_threads": _torch_threads(),
            "peak_rss_mib_with_reference": peak_rss_mib(), "points": per_point}


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgemm._bench_worker JOB.json``: run the job, write its result file."""
    from edgemm.runtime.errors import EdgemmError

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m edgemm._bench_worker JOB.json (started by 'edgemm bench')", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    try:
        out: dict[str, Any] = {"ok": True, "result": run_job(job)}
        code = 0
    except EdgemmError as e:
        out = {"ok": False, "error": {"type": type(e).__name__, "message": str(e)}}
        code = 3
    except Exception as e:  # anything else is a bug or a runtime crash; the parent shows the traceback
        traceback.print_exc()
        out = {"ok": False, "error": {"type": type(e).__name__, "message": f"{type(e).__name__}: {e}"}}
        code = 1
    tmp = job["result"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f)
    os.replace(tmp, job["result"])
    return code


if __name__ == "__main__":
    raise SystemExit(main())
