"""The KServe v2 codec: tensors through JSON and binary bodies, and hostile bodies refused with ProtocolError only."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemm._kserve import InferRequest, ProtocolError, decode_request, encode_response

MAX = 1 << 20


def _binary_request(arrays: dict[str, np.ndarray]) -> tuple[bytes, int]:
    entries, chunks = [], []
    for name, a in arrays.items():
        if a.dtype == object:
            raw = b"".join(struct.pack("<I", len(x)) + x for x in a.reshape(-1))
            datatype = "BYTES"
        else:
            raw = a.tobytes()
            datatype = {"float32": "FP32", "int64": "INT64", "uint8": "UINT8", "float16": "FP16"}[str(a.dtype)]
        entries.append({"name": name, "shape": list(a.shape), "datatype": datatype,
                        "parameters": {"binary_data_size": len(raw)}})
        chunks.append(raw)
    head = json.dumps({"inputs": entries}).encode()
    return head + b"".join(chunks), len(head)


def test_binary_and_json_inputs_decode_to_the_arrays_sent():
    arrays = {"pixels": np.random.default_rng(0).random((2, 3, 4), dtype=np.float32),
              "ids": np.array([[1, -2], [3, 2**40]], np.int64), "half": np.array([0.5, 2], np.float16),
              "text": np.array([b"caf\xc3\xa9", b"", b"x" * 300], dtype=object)}
    body, head = _binary_request(arrays)
    got = decode_request(body, head, max_elements=MAX).inputs
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape
        assert (got[name] == a).all()
    nested = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]},
                                    {"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hé"]}]}).encode()
    request = decode_request(nested, None, max_elements=MAX)
    assert request.inputs["x"].tolist() == [[1, 2], [3, 4]] and request.inputs["t"][0] == "hé".encode()


def test_responses_are_json_or_binary_as_asked():
    outputs = {"scores": np.array([[0.25, 0.75]], np.float32), "labels": np.array([[b"cat", b"dog"]], dtype=object)}
    body, head = encode_response("m", "1", outputs, InferRequest(inputs={}, id="7"))
    assert head is None
    doc = json.loads(body)
    assert doc["id"] == "7" and doc["outputs"][0]["data"] == [0.25, 0.75] and doc["outputs"][1]["data"] == ["cat", "dog"]
    body, head = encode_response("m", "1", outputs, InferRequest(inputs={}, outputs=["labels"], binary={"labels": True}))
    doc = json.loads(body[:head])
    assert [o["name"] for o in doc["outputs"]] == ["labels"]
    assert body[head:] == struct.pack("<I", 3) + b"cat" + struct.pack("<I", 3) + b"dog"


@pytest.mark.parametrize("body, binary, match", [
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}',
     None, "only 0 follow"),
    (b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}', None, "holds 2"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}', None, "in range"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [true]}]}', None, "FP32 values"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "COMPLEX", "data": [1]}]}', None, "not a KServe"),
    (b'{"inputs": [{"name": "x", "shape": [1048577], "datatype": "UINT8", "data": []}]}', None, "more than"),
    (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "UINT8", "data": []}]}', None, "sizes"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [1]}, '
     b'{"name": "x", "shape": [1], "datatype": "UINT8", "data": [1]}]}', None, "twice"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [1]}], "inputs": []}', None, "twice"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [1]}]}', b"xyz", "binary tensor data"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [NaN]}]}', None, "not a JSON number"),
    (b'[' * 100_000, None, "nest"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}',
     b"\x05\x00\x00\x00ab", "declares 5 bytes"),
])
def test_malformed_bodies_are_protocol_errors(body, binary, match):
    header = len(body) if binary is not None else None
    with pytest.raises(ProtocolError, match=match):
        decode_request(body + (binary or b""), header, max_elements=MAX)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 400), st.data())
def test_any_damaged_body_is_refused_cleanly(noise, cut, data):
    """Bit flips, truncations and junk in a valid binary request: decoded, or a ProtocolError — nothing else."""
    body, head = _binary_request({"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                  "t": np.array([b"hello", b"world"], dtype=object)})
    body = bytearray(body)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] ^= data.draw(st.integers(1, 255))
    mutated = bytes(body[: max(1, len(body) - cut)]) + noise[: data.draw(st.integers(0, len(noise)))]
    header = data.draw(st.sampled_from([head, None, len(mutated), head + 3]))
    try:
        request = decode_request(mutated, header, max_elements=MAX)
    except ProtocolError:
        return
    assert all(isinstance(v, np.ndarray) for v in request.inputs.values())
