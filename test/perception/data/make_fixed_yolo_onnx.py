"""Write the two tiny ONNX "detectors" test_detector.py reads: fixed outputs in the Ultralytics layouts.

Each graph ignores its image (it multiplies the image's mean by 0) and returns one constant
tensor, so the test knows exactly which boxes the network "found" and checks only what our
code does with them: reading the ONNX file with ``cv2.dnn.readNet``, letterboxing the frame,
decoding the layout, mapping boxes back to frame pixels, NMS and class names.

* ``fixed_yolov8.onnx``: output ``[1, 4 + 3, 5]`` (YOLOv8 and later: cx, cy, w, h in input
  pixels, then one score per class, no objectness), input ``[1, 3, 320, 320]``.
* ``fixed_yolov5.onnx``: output ``[1, 5, 5 + 3]`` (YOLOv5/v7: cx, cy, w, h, objectness, class
  probabilities), the same boxes.

Boxes (input pixels of the 320x320 letterboxed input): a "cup" at (160, 120, 80, 40) scoring
0.9, a "dog" at (60, 200, 40, 80) scoring 0.8, a second "dog" box nearly on the first (IoU
> 0.45) scoring 0.5 (removed by NMS), and two rows under the 0.4 threshold.

Regenerate (needs the ``onnx`` package, not a dependency of the project):
``python test/perception/data/make_fixed_yolo_onnx.py``.
"""

import sys
from pathlib import Path

import numpy as np

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # pragma: no cover - a maintainer's tool
    sys.exit("needs the onnx package (pip install onnx) to regenerate the fixtures")

HERE = Path(__file__).resolve().parent
CLASSES = 3  # names: person, cup, dog (fixed_yolo.names)
BOXES = np.array([
    [160, 120, 80, 40], [60, 200, 40, 80], [62, 202, 40, 80], [250, 250, 20, 20], [10, 10, 5, 5],
], dtype=np.float32)
SCORES = np.zeros((5, CLASSES), np.float32)
SCORES[0, 1] = 0.9   # cup
SCORES[1, 2] = 0.8   # dog
SCORES[2, 2] = 0.5   # the same dog again: NMS removes it
SCORES[3, 0] = 0.3   # a person under the 0.4 threshold
SCORES[4, 0] = 0.1


def save(name: str, table: np.ndarray) -> None:
    image = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 320, 320])
    out = helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(table.shape))
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=1),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Reshape", ["nothing", "shape"], ["flat"]),
        helper.make_node("Add", ["flat", "table"], ["output0"]),
    ]
    inits = [numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "zero"),
             numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(table.astype(np.float32), "table")]
    graph = helper.make_graph(nodes, name, [image], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="infmllm_ros tests")
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(HERE / name))


v8 = np.concatenate([BOXES, SCORES], axis=1).T[None]  # [1, 4 + C, N]
objectness = SCORES.max(axis=1, keepdims=True)
v5 = np.concatenate([BOXES, objectness, np.divide(SCORES, objectness, out=np.zeros_like(SCORES),
                                                  where=objectness > 0)], axis=1)[None]  # [1, N, 5 + C]
save("fixed_yolov8.onnx", v8)
save("fixed_yolov5.onnx", v5)
(HERE / "fixed_yolo.names").write_text("person\ncup\ndog\n")
print("wrote", sorted(p.name for p in HERE.glob("fixed_yolo*")))
