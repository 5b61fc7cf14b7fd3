"""Write runtime/data/gather_rows.<dtype>.onnx: one Gather on axis 0, any rank, for each cache dtype.

A captioner's cache lives on the GPU between decoding steps; reordering beams or
dropping finished rows runs this graph on the same device (ONNX Runtime has no
slicing of an OrtValue), so the cache never travels through the host. The files
are committed (the runtime has no onnx package); tests check they match this script.

    python scripts/make_gather_graphs.py
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
OUT = Path(__file__).resolve().parents[1] / "runtime" / "data"


def gather_graph(dtype: str) -> onnx.ModelProto:
    elem = DTYPES[dtype]
    node = helper.make_node("Gather", ["data", "rows"], ["out"], axis=0)
    graph = helper.make_graph([node], f"gather_rows_{dtype}",
                              [helper.make_tensor_value_info("data", elem, None),  # any rank
                               helper.make_tensor_value_info("rows", TensorProto.INT64, ["rows"])],
                              [helper.make_tensor_value_info("out", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgemm")
    model.ir_version = 8
    return model


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for dtype in DTYPES:
        (OUT / f"gather_rows.{dtype}.onnx").write_bytes(gather_graph(dtype).SerializeToString())


if __name__ == "__main__":
    main()
