"""edgemm serve: the real server on 127.0.0.1, driven with Triton's own HTTP client, compared with in-process calls."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

pytest.importorskip("tritonclient.http")
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from edgemm._serve import InferenceServer  # noqa: E402


@pytest.fixture(scope="module")
def server(default_bundle):
    with InferenceServer(default_bundle, port=0, threads=2, max_delay_ms=20, max_body_bytes=8 << 20) as srv:
        yield srv
    assert not any(t.is_alive() for b in srv._batchers for t in b._threads), "batcher threads outlived close()"


@pytest.fixture(scope="module")
def client(server):
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=16)


@pytest.fixture(scope="module")
def jpegs(photos):
    return [cv2.imencode(".jpg", p.image[:, :, ::-1])[1].tobytes() for p in photos[:4]]


def _input(name, array, datatype, binary=True):
    t = httpclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def _post(server, path, body, headers=None):
    request = urllib.request.Request(server.url + path, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_routes_and_configs_follow_triton(server, client):
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "edgemm" and "binary_tensor_data" in meta["extensions"]
    index = client.get_model_repository_index()
    assert {m["name"] for m in index} == {"image_encoder", "text_encoder", "classify", "embed_image", "embed_text"}
    for name in server.models:
        assert client.is_model_ready(name)
        config = client.get_model_config(name)
        parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())  # Triton's own schema
        assert parsed.name == name
    image = client.get_model_config("image_encoder")
    assert image["max_batch_size"] == 32 and image["input"][0]["dims"] == [3, 224, 224]  # batch axis left out
    assert image["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    assert client.get_model_metadata("image_encoder")["inputs"][0]["shape"] == [-1, 3, 224, 224]
    assert client.get_model_config("classify")["max_batch_size"] == 0


def test_graph_and_high_level_models_match_in_process(server, client, model, photos, jpegs):
    pixels = model.preprocess([p.image for p in photos[:3]], color="rgb")
    got = client.infer("image_encoder", [_input("pixels", pixels, "FP32")])
    reference = model.image_backend.infer({"pixels": pixels})
    np.testing.assert_allclose(got.as_numpy("embedding"), reference["embedding"], atol=1e-5)
    np.testing.assert_allclose(got.as_numpy("class_probs"), reference["class_probs"], atol=1e-6)

    labels = ["a cat", "a rocket", "a person", "coffee"]
    result = client.infer("classify", [_input("image", np.array(jpegs, dtype=object), "BYTES"),
                                       _input("labels", np.array(labels, dtype=object), "BYTES", binary=False),
                                       _input("top_k", np.array([2], np.int32), "INT32", binary=False)])
    decoded = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
    expected = model.classify(decoded, labels, top_k=2)
    assert [[x.decode() for x in row] for row in result.as_numpy("labels")] == [[p.label for p in r] for r in expected]
    np.testing.assert_allclose(result.as_numpy("scores"), [[p.score for p in r] for r in expected], atol=1e-5)

    frames = np.stack([cv2.resize(d, (320, 240)) for d in decoded])  # BGR, as OpenCV reads them
    by_frames = client.infer("embed_image", [_input("frames", frames, "UINT8")])
    np.testing.assert_allclose(by_frames.as_numpy("embedding"), model.embed_images(list(frames)), atol=1e-5)

    texts = np.array(["a rocket on the launch pad", "dog", "a cup of coffee on a table"], dtype=object)
    embedded = client.infer("embed_text", [_input("text", texts, "BYTES", binary=False)],
                            outputs=[httpclient.InferRequestedOutput("embedding", binary_data=False)])
    np.testing.assert_allclose(embedded.as_numpy("embedding"), model.embed_texts(list(texts)), atol=1e-5)


def _embed_over_http(server, texts):
    """One JSON request per text, from one thread each (the test's client threads release the GIL on sockets)."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    host, port = server._httpd.server_address[:2]

    def one(text):
        conn = http.client.HTTPConnection(host, port, timeout=60)
        body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})
        conn.request("POST", "/v2/models/embed_text/infer", body)
        reply = json.loads(conn.getresponse().read())
        conn.close()
        return reply["outputs"][0]["data"]

    with ThreadPoolExecutor(len(texts)) as pool:
        return np.array(list(pool.map(one, texts)), np.float32)


def test_concurrent_requests_share_graph_runs(server, model):
    texts = [f"{word} number {i}" if i % 2 else word for i, word in
             enumerate(["dog", "a small red car", "the astronaut", "coffee", "a rocket", "cat"] * 3)]
    before = server.models["text_encoder"].statistics()
    got = _embed_over_http(server, texts)
    np.testing.assert_allclose(got, model.embed_texts(texts), atol=1e-5)  # padded together: the same answers
    after = server.models["text_encoder"].statistics()
    runs = after["execution_count"] - before["execution_count"]
    assert after["inference_count"] - before["inference_count"] == len(texts)
    assert runs <= len(texts) / 2, f"{len(texts)} concurrent requests took {runs} runs: the batcher did not batch"
    assert any(b["batch_size"] > 2 for b in after["batch_stats"])


def test_bad_requests_get_protocol_errors_and_the_server_stays_up(server, client, jpegs):
    cases = [
        ("/v2/models/nope/infer", b'{"inputs": []}', {}, 404),
        ("/v2/models/embed_text/infer", b"{not json", {}, 400),
        ("/v2/models/embed_text/infer", b'{"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", '
                                        b'"data": [1.0]}]}', {}, 400),  # wrong datatype
        ("/v2/models/image_encoder/infer", b'{"inputs": [{"name": "pixels", "shape": [1, 3, 4, 4], '
                                           b'"datatype": "FP32", "data": [0.0]}]}', {}, 400),  # 1 value for 48
        ("/v2/models/embed_text/infer", b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", '
                                        b'"parameters": {"binary_data_size": 99}}]}', {"Inference-Header-Content-Length": "93"}, 400),
        ("/v2/models/image_encoder/infer", json.dumps({"inputs": [{"name": "pixels", "shape": [33, 3, 224, 224],
                                                                   "datatype": "FP32", "data": [0.0]}]}).encode(), {}, 400),
        ("/v2/models/embed_text/versions/7/infer", b'{"inputs": []}', {}, 404),
        ("/v2/models/classify/infer", json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                              "data": ["not an image"]}]}).encode(), {}, 400),
        ("/v2/models/embed_text/infer", gzip.compress(b" " * (9 << 20)), {"Content-Encoding": "gzip"}, 413),
        ("/v2/models/embed_text/infer", b"x" * 64, {"Content-Encoding": "br"}, 415),
    ]
    for path, body, headers, status in cases:
        code, payload = _post(server, path, body, headers)
        assert code == status, (path, code, payload)
        assert "error" in json.loads(payload), payload
    code, payload = _post(server, "/v2/models/embed_text/infer", b"x" * (9 << 20))
    assert code == 413 and b"more than this server takes" in payload
    with socket.create_connection(server._httpd.server_address[:2], timeout=10) as s:  # not HTTP at all
        s.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.")
    result = client.infer("classify", [_input("image", np.array(jpegs[:1], dtype=object), "BYTES")])
    assert result.as_numpy("labels").shape == (1, 5)
    with pytest.raises(InferenceServerException, match="takes inputs"):
        client.infer("embed_text", [_input("txt", np.array(["x"], dtype=object), "BYTES")])


def test_one_failing_request_does_not_fail_the_others_in_its_batch(server, model):
    """Token ids past the vocabulary pass every shape check and fail inside ONNX Runtime: only their caller sees it."""
    batched = server.model.text_backend
    good = model.text_feeds(["a dog on the beach"])
    bad = {k: v.copy() for k, v in good.items()}
    bad["input_ids"][0, 1] = 10**9
    results: dict[str, object] = {}

    def call(name, feeds):
        try:
            results[name] = batched.infer(feeds)["embedding"]
        except Exception as e:  # noqa: BLE001
            results[name] = e

    threads = [threading.Thread(target=call, args=(n, f)) for n, f in (("good", good), ("bad", bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert isinstance(results["bad"], Exception)
    np.testing.assert_allclose(results["good"], model.embed_texts(["a dog on the beach"]), atol=1e-5)
    assert batched.stats.failures >= 1


def test_statistics_count_requests(server, client):
    texts = _input("text", np.array(["one", "two"], dtype=object), "BYTES")
    before = client.get_inference_statistics("embed_text")["model_stats"][0]
    client.infer("embed_text", [texts])
    with pytest.raises(InferenceServerException):
        client.infer("embed_text", [_input("text", np.array([b"\xff\xfe"], dtype=object), "BYTES")])
    after = client.get_inference_statistics("embed_text")["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
    assert after["inference_count"] == before["inference_count"] + 2
    everything = json.loads(urllib.request.urlopen(server.url + "/v2/models/stats", timeout=10).read())
    assert {m["name"] for m in everything["model_stats"]} == set(server.models)


def test_caption_model_matches_the_captioner(default_captioner_bundle, photos):
    import edgemm

    captioner = edgemm.load(default_captioner_bundle, threads=2)
    jpeg = cv2.imencode(".png", photos[0].image[:, :, ::-1])[1].tobytes()  # lossless: the same pixels
    with InferenceServer(default_captioner_bundle, port=0, threads=2) as srv:
        assert set(srv.models) == {"caption_encoder", "caption_decoder", "caption"}
        c = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
        assert c.get_model_config("caption_decoder")["max_batch_size"] == 0  # step calls are not batched
        r = c.infer("caption", [_input("image", np.array([jpeg], dtype=object), "BYTES")])
        assert r.as_numpy("caption")[0].decode() == captioner.caption(photos[0].image, color="rgb").text


def test_cli_serve_answers_and_stops_on_interrupt(default_bundle):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "edgemm._cli", "serve", str(default_bundle), "--port", "0",
                             "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving" in line, line
        url = line.split(" at ")[1].split(" ")[0]
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as r:
                    assert r.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
