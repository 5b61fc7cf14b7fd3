"""``edgemm bench`` on tiny CLIP bundles: real worker processes, ONNX Runtime and PyTorch reference.

One module-wide run benchmarks two bundles with tiny settings: the tiny CLIP
(its source folder exists, so the PyTorch reference is measured) and an fp16
bundle quantized from a second export whose source folder was then deleted
(so it has no reference, and runs fp16 on the CPU provider).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import shutil
import sys

import pytest

from edgemm import _bench
from edgemm.runtime.errors import BackendError, BundleError, InputError

TOP_LEVEL = {"schema", "created", "device", "settings", "results", "scenarios", "notes"}
ROW_KEYS = {"bundle", "name", "precision", "engine_precision", "backend", "providers", "active_providers", "threads", "task", "batch",
            "input_shape", "iterations", "latency_ms", "stages_ms", "throughput_per_s", "background_cpu_cores",
            "peak_rss_mib",
            "baseline_rss_mib", "reference", "reference_unavailable", "notes"}
BATCHES = (1, 3)
MIN_ITERS = 5


def parse(*argv: str) -> argparse.Namespace:
    """The command line as 'edgemm bench' will get it, through add_parser on a fresh parser."""
    parser = argparse.ArgumentParser(prog="edgemm")
    _bench.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


@pytest.fixture(scope="module")
def bundles(tiny_clip_bundle, tiny_clip_dir, tmp_path_factory):
    """(tiny CLIP bundle with its source folder, fp16 bundle whose source folder is gone)."""
    from edgemm._quantize import quantize_bundle
    from edgemm.export.models.clip import build_clip_bundle

    root = tmp_path_factory.mktemp("bench-bundles")
    moved = shutil.copytree(tiny_clip_dir, root / "moved-ckpt")
    build_clip_bundle(moved, root / "orphan-fp32")
    quantize_bundle(root / "orphan-fp32", root / "orphan-fp16", precision="fp16", threads=1)
    shutil.rmtree(moved)  # as on a device the checkpoint folder never reached
    return tiny_clip_bundle, root / "orphan-fp16"


@pytest.fixture(scope="module")
def run(bundles, tmp_path_factory):
    """(report dict read back from report.json, report directory, what cmd_bench printed)."""
    out_dir = tmp_path_factory.mktemp("bench-report") / "bench"
    args = parse(*map(str, bundles), "--batch", ",".join(map(str, BATCHES)), "--report", str(out_dir),
                 "--threads", "1", "--warmup", "1", "--min-time", "0.05", "--min-iters", str(MIN_ITERS), "-q")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert args.func(args) == 0
    report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    return report, out_dir, printed.getvalue()


def rows(report, bundle=None, task=None):
    return [r for r in report["results"]
            if (bundle is None or r["bundle"] == str(bundle)) and (task is None or r["task"] == task)]


def test_report_files_are_written_and_follow_the_schema(run, bundles):
    report, out_dir, _ = run
    assert set(report) == TOP_LEVEL and report["schema"] == "edgemm.bench/1"
    device = report["device"]
    for key in ("cpu_model", "logical_cores", "usable_cores", "threads", "os", "python", "gpus",
                "onnxruntime_providers", "libraries"):
        assert key in device, key
    assert device["threads"] == 1 and "CPUExecutionProvider" in device["onnxruntime_providers"]
    assert device["libraries"]["onnxruntime"] and device["libraries"]["numpy"]
    settings = report["settings"]
    assert settings["batches"] == list(BATCHES) and settings["provider_groups"] == [["cpu"]]
    assert settings["thread_env"]["OMP_NUM_THREADS"] == "1"
    assert len(report["results"]) == 2 * 2 * len(BATCHES)  # bundles x tasks x batches
    for r in report["results"]:
        assert set(r) == ROW_KEYS
        assert r["providers"] == ["cpu"] and r["active_providers"] == ["CPUExecutionProvider"]
        assert r["threads"] == 1 and r["backend"] == "onnxruntime" and r["engine_precision"] is None
    assert {r["precision"] for r in report["results"]} == {"fp32", "fp16"}
    assert (out_dir / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latencies_stages_throughput_and_memory_are_consistent(run):
    report, _, _ = run
    for r in report["results"]:
        lat, stages = r["latency_ms"], r["stages_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["min"] <= lat["mean"] <= lat["max"]
        assert r["iterations"] >= MIN_ITERS
        # Throughput is items per mean call time, by definition.
        assert r["throughput_per_s"] == pytest.approx(r["batch"] * 1e3 / lat["mean"], rel=1e-9)
        # The stages are timed inside each call and add up to it.
        assert all(v >= 0 for v in stages.values())
        assert 0.5 * lat["p50"] <= sum(stages.values()) <= lat["max"]
        assert r["input_shape"][0] == r["batch"]
        if r["task"] == "image":
            assert r["input_shape"][1:] == [3, 32, 32]
        assert r["peak_rss_mib"] > r["baseline_rss_mib"] > 0
        assert r["background_cpu_cores"] >= 0  # Linux: measured from /proc/stat
        assert not any("torch was imported" in n for n in r["notes"])  # the edgemm peak is torch-free


def test_reference_ratio_where_the_source_exists_and_a_reason_where_it_is_gone(run, bundles):
    report, _, _ = run
    tiny, orphan = bundles
    measured = rows(report, tiny)
    assert len(measured) == 2 * len(BATCHES)
    for r in measured:
        ref = r["reference"]
        assert r["reference_unavailable"] is None
        assert ref["kind"] == "pytorch-eager" and ref["device"] == "cpu" and ref["threads"] == 1
        assert ref["speedup"] == pytest.approx(ref["inference_ms_p50"] / ref["edgemm_inference_ms_p50"])
        assert ref["speedup"] > 0 and ref["iterations"] >= MIN_ITERS
        assert ref["embedding_cosine_min"] > 0.9999  # the same fp32 model in both runtimes
        assert ref["peak_rss_mib_combined"] >= r["peak_rss_mib"]
    missing = rows(report, orphan)
    assert len(missing) == 2 * len(BATCHES)
    for r in missing:
        assert r["reference"] is None
        assert "moved-ckpt" in r["reference_unavailable"] and "not on this machine" in r["reference_unavailable"]


def test_fp16_on_the_cpu_provider_is_noted(run, bundles):
    report, out_dir, printed = run
    tiny, orphan = bundles
    assert all(any("slower than the fp32" in n for n in r["notes"]) for r in rows(report, orphan))
    assert not any("slower than the fp32" in n for r in rows(report, tiny) for n in r["notes"])
    markdown = (out_dir / "report.md").read_text(encoding="utf-8")
    assert "fp16 bundle on the CPU provider" in markdown and "no PyTorch reference" in markdown


def test_markdown_table_is_printed_and_written(run):
    report, out_dir, printed = run
    markdown = (out_dir / "report.md").read_text(encoding="utf-8")
    assert markdown == _bench.to_markdown(report)
    assert markdown in printed and f"wrote {out_dir / 'report.json'}" in printed
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| bundle | precision | providers | task | batch | p50 ms")
    assert len(table) == 1 + len(report["results"])
    assert any(re.search(r"\| \d+\.\d\dx( \*)? \|", line) for line in table[1:])  # a "vs PyTorch" ratio
    assert "n/a" in markdown  # the bundle without a reference
    assert report["device"]["cpu_model"] in markdown


def test_without_matplotlib_the_plot_is_skipped_with_a_note(run, tmp_path, monkeypatch):
    report, _, _ = run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    report = copy.deepcopy(report)
    paths = _bench.write_report(report, tmp_path / "bench")
    assert paths["plot"] is None and not (tmp_path / "bench" / "latency.png").exists()
    note = next(n for n in report["notes"] if "latency.png was not written" in n)
    assert "pip install 'edgemm[eval]'" in note
    assert note in json.loads(paths["json"].read_text())["notes"]
    assert note in paths["markdown"].read_text()


@pytest.mark.parametrize(("argv", "error", "message"), [
    (["--batch", "0"], InputError, "'0' in '0' is not a positive integer"),
    (["--batch", "1,a"], InputError, "'a' in '1,a' is not a positive integer"),
    (["--batch", ""], InputError, "--batch is empty"),
    (["--tasks", "audio"], InputError, "choose from image, text"),
    (["--providers", "gpu"], InputError, "unknown provider 'gpu'"),
    (["--threads", "0"], InputError, "--threads must be a positive integer"),
    (["--min-time", "-1"], InputError, "--min-time"),
    (["--backend", "coreml"], InputError, "unknown backend 'coreml'"),
    (["--scenarios", "server"], InputError, "unknown scenario 'server'; choose from singlestream, multistream"),
    (["--scenarios", "offline", "--tasks", "text"], InputError, "include the image task"),
    (["--scenarios", "offline", "--offline-samples", "0"], InputError, "--offline-samples must be a positive"),
])
def test_bad_arguments_are_clear_errors(tiny_clip_bundle, tmp_path, argv, error, message):
    args = parse(str(tiny_clip_bundle), "--report", str(tmp_path / "bench"), *argv)
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        args.func(args)
    assert not (tmp_path / "bench").exists()  # nothing was made before the arguments were checked


def test_missing_or_wrong_bundles_are_bundle_errors(tmp_path):
    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    for path, message in ((tmp_path / "nope", "does not exist"), (not_a_bundle, "no manifest.json")):
        args = parse(str(path), "--report", str(tmp_path / "bench"))
        with pytest.raises(BundleError, match=message):
            args.func(args)


def test_a_worker_error_comes_back_as_its_own_class(tiny_clip_bundle, tmp_path):
    damaged = shutil.copytree(tiny_clip_bundle, tmp_path / "damaged")
    with open(damaged / "tokenizer.json", "a", encoding="utf-8") as f:
        f.write(" ")  # found by the worker's load(), which checks every file's hash
    args = parse(str(damaged), "--tasks", "text", "--batch", "1", "--no-reference", "--report", str(tmp_path / "b"),
                 "--min-time", "0", "--warmup", "0", "-q")
    with pytest.raises(BundleError, match=r"benchmarking '.*damaged' on onnxruntime \[cpu\] failed: .*tokenizer.json"):
        args.func(args)


def test_rows_measured_under_background_load_are_marked(run):
    report = copy.deepcopy(run[0])
    for r in report["results"]:  # as if measured on an idle machine ...
        r["background_cpu_cores"] = 0.0
        if r["reference"]:
            r["reference"]["background_cpu_cores"] = 0.0
    table = [line for line in _bench.to_markdown(report).splitlines() if line.startswith("| ")]
    assert not any(" *" in line for line in table)
    report["results"][0]["background_cpu_cores"] = 1.5  # ... but for the first row's edgemm timing
    table = [line for line in _bench.to_markdown(report).splitlines() if line.startswith("| ")]
    assert f"| {_bench._ms(report['results'][0]['latency_ms']['p50'])} * |" in table[1]
    assert not any(" *" in line for line in table[2:])


def test_an_unavailable_provider_is_an_error_before_anything_runs(tiny_clip_bundle, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the error is for builds without it")
    args = parse(str(tiny_clip_bundle), "--providers", "cpu", "--providers", "cuda", "--report", str(tmp_path / "b"))
    with pytest.raises(BackendError, match="provider 'cuda'.*not available.*pip install 'edgemm\\[gpu\\]'"):
        args.func(args)


def test_spec_parsing_and_notes():
    assert _bench.parse_batches(" 8, 1,8 ") == (1, 8)
    assert _bench.parse_tasks("text,image") == ("image", "text")
    assert _bench.parse_providers(None) == (("cpu",),)
    assert _bench.parse_providers(["cpu", "TensorRT,cuda", "cpu"]) == (("cpu",), ("tensorrt", "cuda"))
    with pytest.raises(InputError, match="names a provider twice"):
        _bench.parse_providers(["cuda,cuda"])
    assert _bench.run_notes("fp32", ("cpu",)) == []
    assert _bench.run_notes("fp16", ("cpu",)) == [_bench.FP16_ON_CPU_NOTE]
    assert _bench.run_notes("fp16", ("tensorrt", "cuda")) == [_bench.GPU_MEMORY_NOTE]


def test_torch_reference_says_why_when_there_is_none(tiny_clip_bundle):
    import dataclasses

    from edgemm.export.reference import torch_reference
    from edgemm.runtime.manifest import read_manifest

    manifest = read_manifest(tiny_clip_bundle)
    for source, reason in (({}, "records no source model"), ({"kind": "onnx-zoo"}, "'onnx-zoo' has no PyTorch"),
                           ({"kind": "huggingface"}, "is not on this machine")):
        ref, why = torch_reference(dataclasses.replace(manifest, source=source))
        assert ref is None and reason in why


def test_mlperf_scenarios_are_measured_and_reported(tiny_clip_bundle, tmp_path):
    out_dir = tmp_path / "bench"
    args = parse(str(tiny_clip_bundle), "--tasks", "image", "--batch", "1,4", "--report", str(out_dir),
                 "--threads", "1", "--warmup", "1", "--min-time", "0.2", "--min-iters", "12", "--no-reference",
                 "--scenarios", "SingleStream,multistream,offline", "--offline-samples", "20", "-q")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert args.func(args) == 0
    report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    single, multi, offline = report["scenarios"]
    assert [r["scenario"] for r in report["scenarios"]] == ["singlestream", "multistream", "offline"]
    assert (single["samples_per_query"], multi["samples_per_query"], offline["samples_per_query"]) == (1, 8, 20)
    assert single["queries"] >= 12 and multi["queries"] >= 12 and offline["queries"] >= 1
    assert single["metric"] == {"name": "p90_latency_ms", "value": single["latency_ms"]["p90"]}
    assert multi["metric"] == {"name": "p99_latency_ms", "value": multi["latency_ms"]["p99"]}
    assert offline["metric"]["name"] == "samples_per_s" and offline["offline_batch"] == 4
    for r in report["scenarios"]:
        lat = r["latency_ms"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert r["throughput_samples_per_s"] == pytest.approx(r["queries"] * r["samples_per_query"] / r["duration_s"])
        assert r["duration_s"] == pytest.approx(r["queries"] * lat["mean"] / 1e3)
        assert not r["mlperf_minimum_met"]
        assert r["stages_ms"]["inference"] > 0
    assert offline["metric"]["value"] == offline["throughput_samples_per_s"]
    md = (out_dir / "report.md").read_text()
    assert "### Scenarios (MLPerf edge)" in md
    assert re.search(r"SingleStream: 90th percentile latency [0-9.]+ ms \(\d+ queries of 1 frame, mean", md)
    assert re.search(r"MultiStream: 99th percentile latency [0-9.]+ ms \(\d+ queries of 8 frames", md)
    assert re.search(r"Offline: [0-9.]+ samples/s \(\d+ queries of 20 frames in batches of 4", md)
    assert "shorter than MLPerf's minimum run" in md and md in printed.getvalue()
