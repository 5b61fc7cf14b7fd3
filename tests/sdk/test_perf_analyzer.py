"""Triton's perf_analyzer against edgemm serve: it reads the models' metadata, configs and statistics, and loads them.

perf_analyzer comes from scripts/perf_analyzer_env (scripts/test runs it and exports what it prints), or from PATH.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest

from edgemm._serve import InferenceServer

LABELS = ["cat", "dog", "person", "car", "forklift"]


@pytest.fixture(scope="module")
def perf_analyzer() -> str:
    prepared = os.environ.get("EDGEMM_TEST_PERF_ANALYZER")
    binary = prepared or shutil.which("perf_analyzer")
    if binary is None:
        pytest.skip("no perf_analyzer: run scripts/perf_analyzer_env and export the variable it prints (scripts/test "
                    "does); it unpacks the tritonclient 2.41 wheel's binary with nvidia-cuda-runtime-cu12 and needs "
                    "Debian's libb64-0d")
    ran = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    if ran.returncode != 0:
        message = f"perf_analyzer at {binary} does not run: {(ran.stderr or ran.stdout).strip()[-500:]}"
        if prepared:  # prepared on purpose and broken: a failure, not a skip
            pytest.fail(message)
        pytest.skip(message + " (it needs libb64-0d and libcudart.so.12: scripts/perf_analyzer_env prepares both)")
    return binary


@pytest.fixture(scope="module")
def server(default_bundle):
    with InferenceServer(default_bundle, port=0, threads=2) as srv:
        yield srv


def _input_data(path: Path, model: str, photos) -> Path:
    """perf_analyzer's --input-data file: a BYTES image is base64 of its wire form (4-byte length, then the bytes)."""
    if model == "embed_text":
        steps = [{"text": {"content": [t], "shape": [1]}} for t in ("a red car parked on the street", "two cups")]
    else:
        jpeg = cv2.imencode(".jpg", photos[0].image[:, :, ::-1])[1].tobytes()
        wire = len(jpeg).to_bytes(4, "little") + jpeg
        steps = [{"image": {"b64": base64.b64encode(wire).decode(), "shape": [1]},
                  "labels": {"content": LABELS, "shape": [len(LABELS)]}, "top_k": {"content": [2], "shape": [1]}}]
    path.write_text(json.dumps({"data": steps}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model", ["embed_text", "classify"])
def test_perf_analyzer_loads_edgemm_serve(perf_analyzer, server, model, photos, tmp_path):
    before = server.models[model].statistics()["inference_stats"]
    report = tmp_path / "report.csv"
    # Count windows of 50 requests, concurrency 1 then 4; any latency spread counts as stable (a shared CI machine
    # is noisy), so each level ends after three windows.
    ran = subprocess.run([perf_analyzer, "-u", server.url.removeprefix("http://"), "-i", "http", "-m", model,
                          "--input-data", _input_data(tmp_path / "input.json", model, photos),
                          "--concurrency-range", "1:4:3", "--measurement-mode", "count_windows",
                          "--measurement-request-count", "50", "--stability-percentage", "1000", "-f", report],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    rows = list(csv.DictReader(report.open()))
    assert [int(r["Concurrency"]) for r in rows] == [1, 4]
    for r in rows:
        assert float(r["Inferences/Second"]) > 0 and int(r["p99 latency"]) > 0
        assert int(r["Server Compute Infer"]) > 0  # perf_analyzer read the server's statistics
    after = server.models[model].statistics()["inference_stats"]
    assert after["fail"]["count"] == before["fail"]["count"]
    assert after["success"]["count"] - before["success"]["count"] >= 2 * 3 * 50
