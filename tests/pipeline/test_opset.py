"""A model newer than the board's onnxruntime: converted down where onnx's converter can, said by the checks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.checks import check_opset
from pipeline.opset import for_onnxruntime, model_opset, ort_max_opset
from scripts.make_yolov5s import build_yolov5
from targets.profiles import load_profile


@pytest.fixture(scope="module")
def yolov5_opset17(tmp_path_factory):
    """What YOLOv5's exporter writes by default (opset 17), for a Jetson Nano whose onnxruntime 1.11 runs up to 16."""
    path = tmp_path_factory.mktemp("opset") / "yolov5n.onnx"
    onnx.save(build_yolov5(size="n", imgsz=320, opset=17, seed=0), str(path))
    return path


def test_the_table(tmp_path):
    assert ort_max_opset("1.11.0") == 16 and ort_max_opset("1.31.1") == 23 and ort_max_opset(None) is None


def test_an_opset_17_export_goes_to_the_nano_as_opset_16_with_the_same_outputs(yolov5_opset17, tmp_path):
    down = for_onnxruntime(yolov5_opset17, "1.11.0", tmp_path)
    assert down != yolov5_opset17 and model_opset(onnx.load(str(down))) == 16
    assert for_onnxruntime(down, "1.11.0", tmp_path) == down  # already there: itself
    x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
               for p in (yolov5_opset17, down)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    result = check_opset(onnx.load(str(yolov5_opset17)), load_profile("jetson-nano"), "onnxruntime-tensorrt")
    assert result.verdict == "warn" and "converted to opset 16" in result.reason


def test_a_model_the_converter_cant_take_down_is_sent_as_it_is_and_the_check_says_it_wont_load(tmp_path):
    """Split has no adapter from opset 18 down: the model goes unchanged, and the check says so beforehand."""
    path = tmp_path / "yolov5n-18.onnx"
    onnx.save(build_yolov5(size="n", imgsz=320, opset=18, seed=0), str(path))
    assert for_onnxruntime(path, "1.11.0", tmp_path / "out") == path
    result = check_opset(onnx.load(str(path)), load_profile("jetson-nano"), "onnxruntime-tensorrt")
    assert result.verdict == "warn" and "won't load there" in result.reason and "re-export" in result.fix
