"""The Open Inference Protocol (KServe v2) on the wire: tensors in and out of HTTP bodies.

A request body is a JSON object, optionally followed by raw tensor bytes (the
binary-tensor extension Triton defines): the header ``Inference-Header-Content-Length``
says where the JSON ends, and each input with ``"parameters": {"binary_data_size": n}``
takes the next ``n`` bytes, in the order the inputs are listed. BYTES elements are
4-byte little-endian lengths, each followed by that many bytes. Responses are built
the same way, binary for the outputs a client asks so (``"binary_data": true`` on an
output, or ``"binary_data_output": true`` for the whole request).

Everything here is pure: bytes in, arrays out, and every way a body can lie (sizes
that do not add up, shapes that overflow, types that do not match, deep JSON) is a
``ProtocolError`` naming the tensor and what to send instead.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgemm.runtime.errors import InputError
from edgemm.runtime.manifest import parse_json

# KServe v2 datatype → numpy dtype (BYTES are numpy object arrays of ``bytes``).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items() if name != "BYTES"}

MAX_RANK = 8  # no edgemm graph has more; a request claiming more is refused before any allocation


class ProtocolError(InputError):
    """A request the protocol cannot accept; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def datatype_of(dtype: np.dtype | str) -> str:
    """The KServe datatype of a numpy dtype (``object`` and strings are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} has no KServe v2 datatype.", 500) from None


@dataclass
class InferRequest:
    """One decoded ``/infer`` request."""

    inputs: dict[str, np.ndarray]  # name → array (BYTES as an object array of bytes)
    outputs: list[str] | None = None  # the outputs asked for, in order; None: all
    binary: dict[str, bool] = field(default_factory=dict)  # output name → send as binary
    binary_default: bool = False  # "binary_data_output" of the request
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def decode_request(body: bytes, header_length: int | None, *, max_elements: int) -> InferRequest:
    """Parse an inference request body.

    Args:
        body: The whole (decompressed) HTTP body.
        header_length: ``Inference-Header-Content-Length``; None when the body is JSON only.
        max_elements: Elements one tensor may hold.

    Raises:
        ProtocolError: Anything about the body that is not a valid request.
    """
    if header_length is None:
        header_length = len(body)
    if not 0 < header_length <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes; "
                            "it must be the size of the JSON part.")
    header = _parse(body[:header_length])
    binary = memoryview(body)[header_length:]
    if not isinstance(header, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list.")
    entries = header.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise ProtocolError("the request has no 'inputs'; send a non-empty list of "
                            "{'name', 'shape', 'datatype', 'data'} objects.")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, entry in enumerate(entries):
        name, array, used = _decode_input(entry, i, binary[offset:], max_elements)
        if name in inputs:
            raise ProtocolError(f"input '{name}' is given twice; send each input once.")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise ProtocolError(f"the body carries {len(binary)} bytes of binary tensor data but the inputs' "
                            f"binary_data_size add up to {offset}.")
    request = InferRequest(inputs=inputs, id=_optional_str(header, "id"),
                           parameters=_parameters(header, "the request"))
    request.binary_default = _flag(request.parameters, "binary_data_output", "the request")
    if "outputs" in header:
        outs = header["outputs"]
        if not isinstance(outs, list) or not outs:
            raise ProtocolError("'outputs' must be a non-empty list of {'name': ...} objects (or left out for all).")
        request.outputs = []
        for j, out in enumerate(outs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise ProtocolError(f"outputs[{j}] must be an object with a 'name' string.")
            if out["name"] in request.outputs:
                raise ProtocolError(f"output '{out['name']}' is asked for twice.")
            request.outputs.append(out["name"])
            params = _parameters(out, f"output '{out['name']}'")
            if "binary_data" in params:
                request.binary[out["name"]] = _flag(params, "binary_data", f"output '{out['name']}'")
    return request


def encode_response(model: str, version: str, outputs: dict[str, np.ndarray], request: InferRequest,
                    ) -> tuple[bytes, int | None]:
    """The response body for ``outputs`` and, when any output is binary, the JSON part's length.

    Returns:
        (body, header_length): ``header_length`` goes into ``Inference-Header-Content-Length``; None for JSON only.
    """
    names = request.outputs if request.outputs is not None else list(outputs)
    entries, chunks = [], []
    for name in names:
        array = outputs[name]
        datatype = datatype_of(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.binary.get(name, request.binary_default):
            raw = _bytes_elements(array) if datatype == "BYTES" else np.ascontiguousarray(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(array, name)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response, allow_nan=False, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def error_body(message: str) -> bytes:
    """The protocol's error object."""
    return json.dumps({"error": message}).encode()


# -- inputs ------------------------------------------------------------------------------


def _parse(data: bytes | memoryview) -> Any:
    return parse_json(bytes(data), "the request's JSON", ProtocolError)


def _decode_input(entry: Any, i: int, binary: memoryview, max_elements: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ProtocolError(f"inputs[{i}] must be an object with a non-empty 'name' string.")
    name = entry["name"]
    datatype = entry.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(f"input '{name}': datatype {datatype!r} is not a KServe v2 datatype "
                            f"({', '.join(DATATYPES)}).")
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError(f"input '{name}': shape must be a list of at most {MAX_RANK} sizes ≥ 0, got {shape!r}.")
    count = math.prod(shape)
    if count > max_elements:
        raise ProtocolError(f"input '{name}' has {count:,} elements, more than this server takes per tensor "
                            f"({max_elements:,}); send smaller batches.", 413)
    params = _parameters(entry, f"input '{name}'")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(f"input '{name}': binary_data_size must be an integer ≥ 0, got {size!r}.")
        if "data" in entry:
            raise ProtocolError(f"input '{name}' has both 'data' and binary_data_size; send one.")
        if size > len(binary):
            raise ProtocolError(f"input '{name}' declares {size} bytes of binary data but only {len(binary)} follow.")
        return name, _from_binary(name, datatype, shape, count, binary[:size]), size
    if "data" not in entry:
        raise ProtocolError(f"input '{name}' has neither 'data' nor a binary_data_size parameter.")
    return name, _from_json(name, datatype, shape, count, entry["data"]), 0


def _from_binary(name: str, datatype: str, shape: list[int], count: int, raw: memoryview) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise ProtocolError(f"input '{name}': BYTES data ends inside a 4-byte length prefix.")
            (n,) = struct.unpack_from("<I", raw, pos)
            if pos + 4 + n > len(raw):
                raise ProtocolError(f"input '{name}': element {len(items)} declares {n} bytes but only "
                                    f"{len(raw) - pos - 4} follow.")
            items.append(bytes(raw[pos + 4 : pos + 4 + n]))
            pos += 4 + n
            if len(items) > count:
                break
        if len(items) != count:
            raise ProtocolError(f"input '{name}' has shape {shape} ({count} elements) but its BYTES data holds "
                                f"{len(items) if len(items) <= count else 'more'} elements.")
        return _object_array(items, shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(f"input '{name}' has shape {shape} of {datatype}: {count * dtype.itemsize} bytes, "
                            f"but binary_data_size is {len(raw)}.")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()  # copied: the body's buffer is reused


def _from_json(name: str, datatype: str, shape: list[int], count: int, data: Any) -> np.ndarray:
    flat = _flatten(data, name)
    if len(flat) != count:
        raise ProtocolError(f"input '{name}' has shape {shape} ({count} elements) but 'data' holds {len(flat)}.")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise ProtocolError(f"input '{name}': BYTES data in JSON must be strings.")
        return _object_array([x.encode("utf-8", "surrogatepass") for x in flat], shape)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        ok = all(isinstance(x, bool) for x in flat)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        ok = all(isinstance(x, int) and not isinstance(x, bool) and info.min <= x <= info.max for x in flat)
    else:
        ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat)
    if not ok:
        raise ProtocolError(f"input '{name}': 'data' must hold only {datatype} values (in range).")
    return np.array(flat, dtype=dtype).reshape(shape)


def _flatten(data: Any, name: str) -> list:
    """Row-major elements of a flat or nested JSON list (both are allowed by the protocol)."""
    if not isinstance(data, list):
        raise ProtocolError(f"input '{name}': 'data' must be a list.")
    flat: list = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                if len(stack) > MAX_RANK:
                    raise ProtocolError(f"input '{name}': 'data' is nested deeper than {MAX_RANK} levels.")
                stack.append(iter(x))
                break
            flat.append(x)
        else:
            stack.pop()
    return flat


def _object_array(items: list[bytes], shape: list[int]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def _parameters(obj: dict, where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}: 'parameters' must be an object.")
    return params


def _flag(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: parameter '{key}' must be true or false, got {value!r}.")
    return value


def _optional_str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"'{key}' must be a string.")
    return value


# -- outputs -----------------------------------------------------------------------------


def _as_bytes(x: Any) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode("utf-8")


def _bytes_elements(array: np.ndarray) -> bytes:
    parts = []
    for x in array.reshape(-1):
        b = _as_bytes(x)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _json_data(array: np.ndarray, name: str) -> list:
    if array.dtype.kind in "OSU":
        try:
            return [_as_bytes(x).decode("utf-8") for x in array.reshape(-1)]
        except UnicodeDecodeError:
            raise ProtocolError(f"output '{name}' holds bytes that are not UTF-8; ask for it as binary data "
                                "(\"parameters\": {\"binary_data\": true}).") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ProtocolError(f"output '{name}' holds NaN or infinity, which JSON cannot carry; ask for it as "
                            "binary data.", 500)
    return array.reshape(-1).tolist()
