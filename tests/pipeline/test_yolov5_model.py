"""scripts/make_yolov5s.py: the YOLOv5 v7.0 export graph with random weights, checked on YOLOv5n at 320 (fast)."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_yolov5s.py"

# What the real `export.py --weights yolov5n.pt --include onnx --opset 12` holds, Constant nodes aside.
EXPORT_OP_CENSUS = {
    "Conv": 60, "Sigmoid": 60, "Mul": 69, "Add": 10, "Concat": 17, "MaxPool": 3, "Resize": 2,
    "Reshape": 6, "Transpose": 3, "Split": 3, "Pow": 3,
}


def load_script():
    spec = importlib.util.spec_from_file_location("make_yolov5s", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def yolov5n(script) -> onnx.ModelProto:
    return script.build_yolov5("n", imgsz=320, seed=0)


def test_checker_passes_with_full_check(yolov5n):
    onnx.checker.check_model(yolov5n, full_check=True)


def test_runs_in_onnxruntime_with_the_export_shapes(yolov5n):
    session = ort.InferenceSession(yolov5n.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("images", [1, 3, 320, 320])]
    assert [o.name for o in session.get_outputs()] == ["output0"]
    image = np.random.default_rng(1).random((1, 3, 320, 320), dtype=np.float32)
    (output,) = session.run(None, {"images": image})
    assert output.shape == (1, 6300, 85)  # 3 anchors x (40^2 + 20^2 + 10^2) cells, 80 classes + 5
    assert np.isfinite(output).all()
    low, high = np.percentile(output[0, :, 4], [1, 99])
    assert 0.0 < low < 0.4 and 0.6 < high < 1.0, "objectness should spread over (0, 1), not saturate or sit at 0.5"


def test_bytes_are_deterministic(script, yolov5n):
    again = script.build_yolov5("n", imgsz=320, seed=0).SerializeToString()
    assert again == yolov5n.SerializeToString()
    assert script.build_yolov5("n", imgsz=320, seed=1).SerializeToString() != again


def test_op_census_is_the_export_one(yolov5n):
    assert collections.Counter(node.op_type for node in yolov5n.graph.node) == EXPORT_OP_CENSUS


def test_parameter_count_is_the_fused_yolov5n(script, yolov5n):
    assert script.parameter_count(yolov5n) == 1_867_405  # "YOLOv5n summary: 157 layers, 1867405 parameters"


def test_decode_constants_are_the_real_anchors(yolov5n):
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in yolov5n.graph.initializer}
    anchor_grid = constants["model.24.anchor_grid.2"]
    assert anchor_grid.shape == (1, 3, 10, 10, 2)
    assert anchor_grid[0, :, 0, 0].tolist() == [[116, 90], [156, 198], [373, 326]]
    assert constants["model.24.grid.0"][0, 0, 0, :2].tolist() == [[-0.5, -0.5], [0.5, -0.5]]


def test_imgsz_must_be_a_multiple_of_32(script):
    with pytest.raises(ValueError, match="multiple of 32"):
        script.build_yolov5("n", imgsz=300)
