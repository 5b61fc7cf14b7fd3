"""edgemm export triton: repositories checked against Triton's own config schema, and loaded by a real tritonserver."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgemm._triton_repo import TritonOptions, export_triton
from edgemm.runtime.bundle import sha256_file
from edgemm.runtime.errors import BundleError, InputError
from edgemm.runtime.manifest import read_manifest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402


def _configs(repo: Path) -> dict:
    """Every config.pbtxt parsed by protobuf into Triton's ModelConfig (a typo'd field fails here)."""
    return {d.name: text_format.Parse((d / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
            for d in sorted(repo.iterdir())}


def _accelerator(config) -> dict:
    [acc] = config.optimization.execution_accelerators.gpu_execution_accelerator
    return dict(acc.parameters)


def test_cpu_repository_follows_tritons_conventions(default_bundle, tmp_path):
    repo = tmp_path / "repo"
    names = export_triton(default_bundle, repo)
    configs = _configs(repo)
    assert set(names) == set(configs) == {"image_encoder", "text_encoder", "classify", "embed_image", "embed_text"}
    image, text = configs["image_encoder"], configs["text_encoder"]
    assert image.platform == "onnxruntime_onnx" and image.max_batch_size == 32
    assert list(image.input[0].dims) == [3, 224, 224]  # the batch axis is left out
    assert list(text.input[0].dims) == [-1]  # the sequence axis stays dynamic
    assert image.HasField("dynamic_batching") and image.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    [warmup] = image.model_warmup
    assert warmup.batch_size == 1 and list(warmup.inputs["pixels"].dims) == [3, 224, 224]
    assert warmup.inputs["pixels"].random_data
    assert text.model_warmup[0].inputs["input_ids"].zero_data  # valid token ids, not random ones
    classify = configs["classify"]
    assert classify.backend == "python" and classify.max_batch_size == 0
    assert classify.parameters["edgemm_model"].string_value == "classify"
    manifest = read_manifest(default_bundle)
    for role, graph in manifest.graphs.items():  # the graphs are the bundle's own, byte for byte
        assert sha256_file(repo / role / "1" / "model.onnx") == manifest.files[graph.file]
    copy = repo / "classify" / "1" / "bundle"
    assert (copy / "manifest.json").is_file() and not list(copy.glob("*.onnx"))  # the graphs are Triton's models


def test_gpu_repository_uses_tensorrt_with_fp32_text(default_bundle, tmp_path):
    repo = tmp_path / "gpu"
    export_triton(default_bundle, repo, TritonOptions(target="gpu", workspace_gb=1.5, engine_cache="/var/cache/trt"))
    configs = _configs(repo)
    image, text = _accelerator(configs["image_encoder"]), _accelerator(configs["text_encoder"])
    assert image["precision_mode"] == "FP16" and text["precision_mode"] == "FP32"
    assert image["max_workspace_size_bytes"] == str(int(1.5 * 2**30))
    assert image["trt_engine_cache_enable"] == "1" and image["trt_engine_cache_path"] == "/var/cache/trt/image_encoder"
    assert configs["image_encoder"].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    export_triton(default_bundle, repo, TritonOptions(target="gpu", fp16_text=True), overwrite=True)
    assert _accelerator(_configs(repo)["text_encoder"])["precision_mode"] == "FP16"


def test_captioner_decoder_is_not_batched(default_captioner_bundle, tmp_path):
    export_triton(default_captioner_bundle, tmp_path / "cap")
    configs = _configs(tmp_path / "cap")
    assert set(configs) == {"caption_encoder", "caption_decoder", "caption"}
    assert configs["caption_encoder"].max_batch_size == 32
    decoder = configs["caption_decoder"]
    assert decoder.max_batch_size == 0 and not decoder.HasField("dynamic_batching")
    assert list(decoder.input[1].dims)[:2] == [-1, 6]  # (batch, heads, past, head_dim): batch in dims, dynamic


def test_failed_exports_leave_nothing_behind(default_bundle, tmp_path, bundle_copy):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep").write_text("mine")
    with pytest.raises(InputError, match="exists"):
        export_triton(default_bundle, repo)
    assert (repo / "keep").read_text() == "mine"
    with (bundle_copy / "tokenizer.json").open("ab") as f:
        f.write(b" ")
    with pytest.raises(BundleError, match="does not match"):
        export_triton(bundle_copy, tmp_path / "damaged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "repo"]
    with pytest.raises(InputError, match="graph_backend 'python'"):
        TritonOptions(target="gpu", graph_backend="python")


def test_cli_export_triton(default_bundle, tmp_path):
    from clirun import run_cli

    out = run_cli("export", "triton", default_bundle, "-o", tmp_path / "r", "--target", "gpu", "--max-batch", "8")
    assert "classify" in out.stdout
    assert _configs(tmp_path / "r")["image_encoder"].max_batch_size == 8
    bad = run_cli("export", "triton", "-o", tmp_path / "s", check=False)
    assert bad.returncode == 2 and "needs the bundle" in bad.stderr


@pytest.fixture(scope="module")
def tritonserver():
    server = os.environ.get("EDGEMM_TEST_TRITONSERVER")
    site = os.environ.get("EDGEMM_TEST_TRITON_SITE")
    if not server or not site:
        pytest.skip("no tritonserver prepared: run scripts/triton_env and export the two variables it prints "
                    "(scripts/test does)")
    return Path(server), site


def _start(tritonserver, repo: Path, port: int) -> subprocess.Popen:
    server, _ = tritonserver
    proc = subprocess.Popen([server / "bin" / "tritonserver", "--model-repository", repo,
                             "--backend-directory", server / "backends", "--http-port", str(port),
                             "--allow-grpc", "false", "--allow-metrics", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tritonserver exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("tritonserver was not ready within 120 s")


@pytest.mark.slow
def test_real_tritonserver_serves_the_repository(tritonserver, default_bundle, model, photos, tmp_path):
    """Triton's own server loads every model (graphs on edgemm's Python-backend runtime here: this tritonserver has
    no ONNX Runtime backend), and classify / embed_text answer what edgemm answers in process."""
    import tritonclient.http as httpclient

    _, site = tritonserver
    repo = tmp_path / "repo"
    export_triton(default_bundle, repo, TritonOptions(graph_backend="python", site_packages=site))
    port = 18000 + os.getpid() % 1000
    proc = _start(tritonserver, repo, port)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert {m["name"] for m in client.get_model_repository_index() if m["state"] == "READY"} == set(
            _configs(repo))
        small = [cv2.resize(p.image, (96, 96)) for p in photos[:3]]
        pngs = np.array([cv2.imencode(".png", im[:, :, ::-1])[1].tobytes() for im in small], dtype=object)
        labels = ["a cat", "a person", "a rocket", "coffee"]
        inputs = [httpclient.InferInput("image", [3], "BYTES"), httpclient.InferInput("labels", [4], "BYTES")]
        inputs[0].set_data_from_numpy(pngs)
        inputs[1].set_data_from_numpy(np.array(labels, dtype=object))
        got = client.infer("classify", inputs)
        want = model.classify(small, labels, color="rgb")
        assert [[x.decode() for x in row] for row in got.as_numpy("labels")] == [[p.label for p in r] for r in want]
        np.testing.assert_allclose(got.as_numpy("scores"), [[p.score for p in r] for r in want], atol=1e-5)
        text = httpclient.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array(["a dog on a beach", "coffee"], dtype=object))
        np.testing.assert_allclose(client.infer("embed_text", [text]).as_numpy("embedding"),
                                   model.embed_texts(["a dog on a beach", "coffee"]), atol=1e-5)
        bad = httpclient.InferInput("image", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"not an image"], dtype=object))
        with pytest.raises(Exception, match="could not be decoded"):
            client.infer("classify", [bad])
        assert client.is_server_live()  # a bad request costs that request only
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    shutil.rmtree(repo)


def test_plans_are_for_gpu_targets_and_need_tensorrt(default_bundle, tmp_path):
    from edgemm.runtime.engines import EngineOptions

    with pytest.raises(InputError, match="--target gpu"):
        TritonOptions(engines=EngineOptions())
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from edgemm.runtime.errors import BackendError

        with pytest.raises(BackendError, match="TensorRT is not available"):
            export_triton(default_bundle, tmp_path / "r", TritonOptions(target="gpu", engines=EngineOptions()))
        assert not (tmp_path / "r").exists()
