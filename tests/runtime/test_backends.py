"""The ONNX Runtime backend: checked feeds, explicit providers, no silent fallback."""

from __future__ import annotations

import numpy as np
import pytest

from edgemm.runtime.backends import open_backend
from edgemm.runtime.errors import BackendError, InputError
from sessions import spinning_entry


@pytest.fixture(scope="module")
def text_backend(default_bundle):
    return open_backend(default_bundle / "text_encoder.onnx", "onnxruntime", providers=("cpu",), threads=1)


def feeds(batch=2, seq=5):
    return {"input_ids": np.full((batch, seq), 1000, np.int64), "attention_mask": np.ones((batch, seq), np.int64)}


def test_infer_returns_named_outputs_and_timing(text_backend):
    out = text_backend.infer(feeds(3, 7))
    assert list(out) == ["embedding"] and out["embedding"].shape == (3, 384)
    assert np.allclose(np.linalg.norm(out["embedding"], axis=1), 1, atol=1e-5)
    assert text_backend.last_inference_ms > 0
    assert text_backend.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f.pop("attention_mask"), "missing: \\['attention_mask'\\]"),
    (lambda f: f.update(extra=np.zeros(1)), "unexpected: \\['extra'\\]"),
    (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "must be int64, got int32"),
    (lambda f: f.update(input_ids=f["input_ids"][0]), "must have 2 dimensions"),
    (lambda f: f.update(input_ids=f["input_ids"].tolist()), "must be a numpy array"),
    (lambda f: f.update(input_ids=np.zeros((0, 5), np.int64)), "empty batch"),
])
def test_infer_checks_feeds(text_backend, change, message):
    f = feeds()
    change(f)
    with pytest.raises(InputError, match=message):
        text_backend.infer(f)


def test_fixed_dimension_is_checked(default_bundle):
    image = open_backend(default_bundle / "image_encoder.onnx", providers=("cpu",), threads=1)
    with pytest.raises(InputError, match="axis 2 must be 224"):
        image.infer({"pixels": np.zeros((1, 3, 200, 224), np.float32)})


def test_unavailable_provider_is_an_error_not_a_fallback(default_bundle):
    with pytest.raises(BackendError, match=r"provider 'cuda'.*not available.*edgemm\[gpu\]"):
        open_backend(default_bundle / "text_encoder.onnx", providers=("cuda",))


def test_spinning_is_set_on_the_session_only_when_asked(default_bundle, text_backend):
    path = default_bundle / "text_encoder.onnx"
    off, on = open_backend(path, threads=1, spinning=False), open_backend(path, threads=1, spinning=True)
    assert (spinning_entry(off), spinning_entry(on), spinning_entry(text_backend)) == ("0", "1", None)
    np.testing.assert_allclose(off.infer(feeds())["embedding"], text_backend.infer(feeds())["embedding"], atol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"backend": "tensorflow"}, "unknown backend 'tensorflow'"),
    ({"providers": ("npu",)}, "unknown provider 'npu'"),
    ({"threads": 0}, "threads must be a positive integer"),
    ({"spinning": "no"}, "spinning must be True, False or None"),
])
def test_bad_backend_options(default_bundle, kwargs, message):
    with pytest.raises(BackendError, match=message):
        open_backend(default_bundle / "text_encoder.onnx", **kwargs)


def test_corrupt_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(BackendError, match="could not load"):
        open_backend(bad)


def test_triton_backend_outside_triton_says_where_it_runs(default_bundle):
    from edgemm.runtime.backends import open_backend
    from edgemm.runtime.errors import BackendError

    with pytest.raises(BackendError, match="inside Triton's Python backend"):
        open_backend(default_bundle / "image_encoder.onnx", "triton")
