"""Write runtime/data/preprocess_frame.onnx: a camera frame's resize and normalisation, to run on the GPU.

On a GPU the image graph takes 1-2 ms, and resizing a 1080p frame on the CPU took as
long again (``edgemm bench`` on an H200). This graph does on the device what
``ImagePreprocessor`` does on the CPU for a frame whose centre crop is more than
twice the model's input: a bilinear resize (half-pixel centres, as OpenCV's
INTER_LINEAR) to twice the size, then a 2x2 mean (what INTER_AREA is at exactly 2x),
then ``x * scale + shift`` per channel, rounding to whole grey levels after each
resize as OpenCV does on uint8. Only the crop travels to the GPU, as uint8.
The file is committed (the runtime has no onnx package); a test checks it matches this script.

    python scripts/make_preprocess_graph.py

Inputs: ``frame`` uint8 (N, H, W, 3); ``channels`` int64 (3,), the order that makes it
RGB ([2, 1, 0] for BGR); ``sizes`` int64 (4,) = (N, 3, 2*size, 2*size); ``scale`` and
``shift`` float32 (1, 3, 1, 1). Output: ``pixels`` float32 (N, 3, size, size).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parents[1] / "runtime" / "data" / "preprocess_frame.onnx"


def preprocess_graph() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["frame"], ["frame_f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["frame_f"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Gather", ["nchw", "channels"], ["rgb"], axis=1),
        helper.make_node("Resize", ["rgb", "", "", "sizes"], ["twice"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Round", ["twice"], ["twice_u8"]),  # to 8 bits after each resize, as OpenCV's are
        helper.make_node("AveragePool", ["twice_u8"], ["mean"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Round", ["mean"], ["small"]),
        helper.make_node("Mul", ["small", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "shift"], ["pixels"]),
    ]
    graph = helper.make_graph(
        nodes, "preprocess_frame",
        [helper.make_tensor_value_info("frame", TensorProto.UINT8, ["n", "h", "w", 3]),
         helper.make_tensor_value_info("channels", TensorProto.INT64, [3]),
         helper.make_tensor_value_info("sizes", TensorProto.INT64, [4]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1, 3, 1, 1]),
         helper.make_tensor_value_info("shift", TensorProto.FLOAT, [1, 3, 1, 1])],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["n", 3, "size", "size"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgemm")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(preprocess_graph().SerializeToString())


if __name__ == "__main__":
    main()
